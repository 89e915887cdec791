// placeholder
#include "bindings.h"
void bind_quants(py::module_& m) {}
