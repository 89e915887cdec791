// Bindings for the type table and quantize/dequantize (lowbit._core); python/lowbit/quants.py wraps them.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings.h"
#include "lowbit/types.h"

namespace {

using lowbit::Error;
using lowbit::QType;

QType checked_qtype(uint32_t id) {
    const lowbit::TypeTraits& tt = lowbit::supported_traits(id);
    return static_cast<QType>(tt.id);
}

size_t output_bytes(QType t, int64_t n_rows, int64_t n_per_row) {
    const lowbit::TypeTraits& tt = lowbit::supported_traits(t);
    if (n_per_row % tt.block_size != 0)
        throw Error("last axis has " + std::to_string(n_per_row) + " elements, not a multiple of " + tt.name +
                    "'s block size " + std::to_string(tt.block_size) + "; pad it or pick another type");
    uint64_t nbytes = 0;
    if (!lowbit::tensor_nbytes(tt.id, static_cast<uint64_t>(n_rows) * static_cast<uint64_t>(n_per_row), &nbytes))
        throw Error("tensor too large to quantize");
    return static_cast<size_t>(nbytes);
}

// x: C-contiguous float32 array, rows = all axes but the last. Returns the packed bytes (uint8, 1-D).
py::array_t<uint8_t> quantize_py(py::array x, uint32_t type_id, int n_threads) {
    const QType t = checked_qtype(type_id);
    if (!py::isinstance<py::array_t<float>>(x) || !(x.flags() & py::array::c_style))
        throw Error("quantize needs a C-contiguous float32 array (got dtype " +
                    std::string(py::str(x.dtype())) + "); use lowbit.quantize, which converts");
    if (x.ndim() == 0) throw Error("quantize needs at least one axis");
    const int64_t n_per_row = x.shape(x.ndim() - 1);
    const int64_t n = static_cast<int64_t>(x.size());
    const int64_t n_rows = n_per_row == 0 ? 0 : n / n_per_row;
    const size_t nbytes = output_bytes(t, n_rows, n_per_row);
    py::array_t<uint8_t> out(static_cast<py::ssize_t>(nbytes));
    const float* src = static_cast<const float*>(x.data());
    uint8_t* dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        lowbit::quantize(t, src, dst, n_rows, n_per_row, n_threads);
    }
    return out;
}

// data: C-contiguous uint8 bytes of exactly n_elements of type_id. Returns float32 (n_elements,).
py::array_t<float> dequantize_py(py::array data, uint32_t type_id, int64_t n_elements, int n_threads) {
    const QType t = checked_qtype(type_id);
    if (!py::isinstance<py::array_t<uint8_t>>(data) || !(data.flags() & py::array::c_style))
        throw Error("dequantize needs C-contiguous uint8 bytes (got dtype " + std::string(py::str(data.dtype())) +
                    "); use lowbit.dequantize, which converts");
    if (n_elements < 0) throw Error("dequantize: negative element count");
    const size_t need = output_bytes(t, 1, n_elements);
    if (static_cast<size_t>(data.nbytes()) != need)
        throw Error("dequantize: " + std::to_string(n_elements) + " elements of " +
                    lowbit::supported_traits(t).name + " take " + std::to_string(need) + " bytes, got " +
                    std::to_string(data.nbytes()) + "; check the shape and the type");
    py::array_t<float> out(static_cast<py::ssize_t>(n_elements));
    const void* src = data.data();
    float* dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        lowbit::dequantize(t, src, dst, n_elements, n_threads);
    }
    return out;
}

py::object type_info_py(uint32_t id) {
    const lowbit::TypeTraits* t = lowbit::type_traits(id);
    if (t == nullptr) return py::none();
    return py::make_tuple(t->id, t->name, t->block_size, t->type_size, t->is_quantized, t->supported, t->tensor_level);
}

}  // namespace

void bind_quants(py::module_& m) {
    m.def("_quantize", &quantize_py, py::arg("x"), py::arg("type_id"), py::arg("n_threads") = 0,
          "Quantize a C-contiguous float32 array (rows = leading axes) to packed bytes (uint8, 1-D).");
    m.def("_dequantize", &dequantize_py, py::arg("data"), py::arg("type_id"), py::arg("n_elements"),
          py::arg("n_threads") = 0, "Dequantize packed bytes to float32 (n_elements,).");
    m.def("_type_info", &type_info_py, py::arg("type_id"),
          "(id, name, block_size, type_size, is_quantized, supported, tensor_level) or None for an unknown id.");
    m.def(
        "_all_type_ids",
        [] {
            std::vector<uint32_t> ids;
            for (uint32_t id = 0; id < 2048; ++id)
                if (lowbit::type_traits(id) != nullptr) ids.push_back(id);
            return ids;
        },
        "Every type id the table knows.");
    m.def(
        "row_size",
        [](uint32_t type_id, int64_t n) { return lowbit::row_size(checked_qtype(type_id), n); },
        py::arg("qtype"), py::arg("n"), "Bytes of one row of n elements (n a multiple of the block size).");
    m.def(
        "tensor_nbytes",
        [](uint32_t type_id, uint64_t n) {
            const lowbit::TypeTraits* t = lowbit::type_traits(type_id);
            if (t == nullptr) throw Error("unknown tensor type id " + std::to_string(type_id));
            uint64_t nbytes = 0;
            if (!lowbit::tensor_nbytes(type_id, n, &nbytes))
                throw Error(std::to_string(n) + " elements of " + t->name + " is not a whole number of blocks (" +
                            std::to_string(t->block_size) + ") or does not fit in 63 bits");
            return nbytes;
        },
        py::arg("qtype"), py::arg("n"), "Bytes of a whole tensor of n elements (any known type id).");
    m.def(
        "qtypes",
        [] {
            std::vector<py::tuple> out;
#define LOWBIT_X(NAME, lc, id, bs, ts, kind) out.push_back(py::make_tuple(#NAME, id));
            LOWBIT_QTYPES(LOWBIT_X)
#undef LOWBIT_X
            return out;
        },
        "The registry (lowbit/qtypes.def): (name, id) of every type lowbit computes with, in registry order.");
    m.def(
        "nf4_codes", [] { return std::vector<float>(lowbit::kNF4Codes, lowbit::kNF4Codes + 16); },
        "The 16 NF4 code values (bitsandbytes get_4bit_type('nf4')).");
    m.def(
        "dynamic_codes", [] { return std::vector<float>(lowbit::kDynamicCodes, lowbit::kDynamicCodes + 256); },
        "The 256 codes of bitsandbytes' signed dynamic map (NF4_DQ nested absmax).");
}
