// Declarations shared by the binding files: each bind_*.cpp registers one concern on lowbit._core.
#pragma once

#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_quants(py::module_& m);   // QType, quantize, dequantize, type table
void bind_gguf(py::module_& m);     // GGUF reader / writer
void bind_kernels(py::module_& m);  // ISA selection and kernel entry points for tests and benchmarks
void bind_model(py::module_& m);    // Model, sampler
void bind_cuda(py::module_& m);     // CUDA availability and device queries

namespace lowbit { struct GGUFValue; }
// A metadata value as a plain Python value (arrays as lists, nested arrays as nested lists).
py::object gguf_value_to_py(const lowbit::GGUFValue& v);

// The Python exception every lowbit::Error becomes (lowbit.LowbitError).
extern py::handle g_lowbit_error;
