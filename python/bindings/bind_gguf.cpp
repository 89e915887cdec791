// placeholder
#include "bindings.h"
void bind_gguf(py::module_& m) {}
