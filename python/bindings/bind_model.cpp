// placeholder
#include "bindings.h"
void bind_model(py::module_& m) {}
