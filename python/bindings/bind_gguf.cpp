// Bindings for the GGUF reader and writer; the Python face (lowbit.GGUFFile, lowbit.GGUFWriter) is gguf.py.
//
// Metadata values cross the boundary as typed trees so nothing about a value's GGUF type is lost:
//   scalar: (type, value)                    type is a GGUFType id, value an int/float/bool/str
//   array:  (ARRAY, item_type, items)        items are plain values, or typed trees when item_type is ARRAY
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings.h"
#include "lowbit/gguf.h"

namespace {

using lowbit::Error;
using lowbit::GGUFReader;
using lowbit::GGUFType;
using lowbit::GGUFValue;
using lowbit::GGUFWriter;

// Strings are UTF-8 by the spec, but tokens of real vocabularies are not always; surrogateescape keeps
// every byte so a value read and written back is unchanged.
py::object str_to_py(const std::string& s) {
    PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogateescape");
    if (!o) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(o);
}

std::string str_from_py(py::handle h, const std::string& where) {
    if (PyBytes_Check(h.ptr())) return std::string(PyBytes_AS_STRING(h.ptr()), PyBytes_GET_SIZE(h.ptr()));
    if (!PyUnicode_Check(h.ptr()))
        throw Error(where + ": expected str, got " + std::string(py::str(py::type::of(h).attr("__name__"))));
    PyObject* b = PyUnicode_AsEncodedString(h.ptr(), "utf-8", "surrogateescape");
    if (!b) {
        PyErr_Clear();
        throw Error(where + ": the string cannot be encoded as UTF-8");
    }
    std::string s(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
    Py_DECREF(b);
    return s;
}

py::object plain_to_py(const GGUFValue& v);

py::object tree_to_py(const GGUFValue& v) {
    if (v.type != GGUFType::ARRAY) return py::make_tuple(static_cast<uint32_t>(v.type), plain_to_py(v));
    py::list items(v.arr.size());
    for (size_t k = 0; k < v.arr.size(); ++k)
        items[k] = v.elem_type == GGUFType::ARRAY ? tree_to_py(v.arr[k]) : plain_to_py(v.arr[k]);
    return py::make_tuple(static_cast<uint32_t>(GGUFType::ARRAY), static_cast<uint32_t>(v.elem_type), items);
}

py::object plain_to_py(const GGUFValue& v) {
    switch (v.type) {
        case GGUFType::UINT8: case GGUFType::UINT16: case GGUFType::UINT32: case GGUFType::UINT64:
            return py::int_(v.u);
        case GGUFType::INT8: case GGUFType::INT16: case GGUFType::INT32: case GGUFType::INT64:
            return py::int_(v.i);
        case GGUFType::FLOAT32: case GGUFType::FLOAT64: return py::float_(v.f);
        case GGUFType::BOOL: return py::bool_(v.u != 0);
        case GGUFType::STRING: return str_to_py(v.s);
        case GGUFType::ARRAY: return tree_to_py(v);
    }
    return py::none();
}

GGUFType type_from_py(py::handle h, const std::string& where) {
    long t = py::cast<long>(h);
    if (t < 0 || t > static_cast<long>(GGUFType::FLOAT64))
        throw Error(where + ": " + std::to_string(t) + " is not a GGUF value type (0..12)");
    return static_cast<GGUFType>(t);
}

void scalar_from_py(GGUFType t, py::handle h, GGUFValue& v, const std::string& where) {
    v.type = t;
    auto need_int = [&]() {
        if (PyFloat_Check(h.ptr()) || PyUnicode_Check(h.ptr()) || PyBytes_Check(h.ptr()))
            throw Error(where + ": expected an integer for " + lowbit::gguf_type_name(t));
        PyObject* n = PyNumber_Index(h.ptr());
        if (!n) {
            PyErr_Clear();
            throw Error(where + ": expected an integer for " + lowbit::gguf_type_name(t));
        }
        return py::reinterpret_steal<py::object>(n);
    };
    switch (t) {
        case GGUFType::UINT8: case GGUFType::UINT16: case GGUFType::UINT32: case GGUFType::UINT64: {
            py::object n = need_int();
            unsigned long long u = PyLong_AsUnsignedLongLong(n.ptr());
            if (PyErr_Occurred()) {
                PyErr_Clear();
                throw Error(where + ": " + std::string(py::str(n)) + " does not fit in " + lowbit::gguf_type_name(t));
            }
            v.u = u;
            break;
        }
        case GGUFType::INT8: case GGUFType::INT16: case GGUFType::INT32: case GGUFType::INT64: {
            py::object n = need_int();
            int overflow = 0;
            long long i = PyLong_AsLongLongAndOverflow(n.ptr(), &overflow);
            if (overflow || PyErr_Occurred()) {
                PyErr_Clear();
                throw Error(where + ": " + std::string(py::str(n)) + " does not fit in " + lowbit::gguf_type_name(t));
            }
            v.i = i;
            break;
        }
        case GGUFType::FLOAT32: case GGUFType::FLOAT64: {
            double d = PyFloat_AsDouble(h.ptr());
            if (PyErr_Occurred()) {
                PyErr_Clear();
                throw Error(where + ": expected a float for " + lowbit::gguf_type_name(t));
            }
            v.f = d;
            break;
        }
        case GGUFType::BOOL: {
            int b = PyObject_IsTrue(h.ptr());
            if (b < 0) {
                PyErr_Clear();
                throw Error(where + ": expected a bool");
            }
            v.u = static_cast<uint64_t>(b);
            break;
        }
        case GGUFType::STRING: v.s = str_from_py(h, where); break;
        case GGUFType::ARRAY: throw Error(where + ": an array needs (ARRAY, item_type, items)");
    }
}

GGUFValue tree_from_py(py::handle h, const std::string& where, int depth) {
    if (!py::isinstance<py::tuple>(h))
        throw Error(where + ": expected a (type, value) or (ARRAY, item_type, items) tuple");
    py::tuple t = py::reinterpret_borrow<py::tuple>(h);
    if (t.size() < 2) throw Error(where + ": expected a (type, value) or (ARRAY, item_type, items) tuple");
    GGUFType type = type_from_py(t[0], where);
    GGUFValue v;
    if (type != GGUFType::ARRAY) {
        if (t.size() != 2) throw Error(where + ": a scalar is a (type, value) pair");
        scalar_from_py(type, t[1], v, where);
        return v;
    }
    if (t.size() != 3) throw Error(where + ": an array is an (ARRAY, item_type, items) triple");
    if (depth > lowbit::kGGUFMaxArrayDepth)
        throw Error(where + ": arrays nested more than " + std::to_string(lowbit::kGGUFMaxArrayDepth) + " deep");
    v.type = GGUFType::ARRAY;
    v.elem_type = type_from_py(t[1], where);
    py::sequence items = py::reinterpret_borrow<py::sequence>(t[2]);
    size_t n = py::len(items);
    v.arr.resize(n);
    for (size_t k = 0; k < n; ++k) {
        py::object item = items[k];
        if (v.elem_type == GGUFType::ARRAY) {
            v.arr[k] = tree_from_py(item, where + " item " + std::to_string(k), depth + 1);
        } else {
            scalar_from_py(v.elem_type, item, v.arr[k], where);
        }
    }
    return v;
}

}  // namespace

py::object gguf_value_to_py(const GGUFValue& v) {
    if (v.type != GGUFType::ARRAY) return plain_to_py(v);
    py::list items(v.arr.size());
    for (size_t k = 0; k < v.arr.size(); ++k) items[k] = gguf_value_to_py(v.arr[k]);
    return std::move(items);
}

void bind_gguf(py::module_& m) {
    py::class_<GGUFReader>(m, "GGUFReader", py::buffer_protocol(),
                           "Validating, zero-copy GGUF reader (low level; use lowbit.GGUFFile). The object "
                           "exports the whole mapped file as a read-only uint8 buffer.")
        .def(py::init<const std::string&>(), py::arg("path"), py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("path", &GGUFReader::path)
        .def_property_readonly("version", &GGUFReader::version)
        .def_property_readonly("file_size", &GGUFReader::file_size)
        .def_property_readonly("alignment", &GGUFReader::alignment)
        .def_property_readonly("data_offset", &GGUFReader::data_offset)
        .def("file_changed_on_disk", &GGUFReader::file_changed_on_disk)
        .def(
            "metadata",
            [](const GGUFReader& r) {
                py::list out;
                for (const auto& [key, value] : r.metadata()) out.append(py::make_tuple(str_to_py(key), tree_to_py(value)));
                return out;
            },
            "[(key, typed_tree)] in file order.")
        .def(
            "tensors",
            [](const GGUFReader& r) {
                py::list out;
                for (const auto& t : r.tensors()) {
                    py::list ne;
                    for (int d = 0; d < t.n_dims; ++d) ne.append(t.ne[d]);
                    out.append(py::make_tuple(str_to_py(t.name), t.type_id, ne, r.data_offset() + t.offset, t.nbytes));
                }
                return out;
            },
            "[(name, type_id, ne in ggml order, absolute byte offset, nbytes)] in file order.")
        .def_buffer([](GGUFReader& r) {
            return py::buffer_info(const_cast<uint8_t*>(r.base()), 1, py::format_descriptor<uint8_t>::format(), 1,
                                   {static_cast<py::ssize_t>(r.file_size())}, {static_cast<py::ssize_t>(1)},
                                   /*readonly=*/true);
        });

    py::class_<GGUFWriter>(m, "GGUFWriter", "Streaming, atomic GGUF writer (low level; use lowbit.GGUFWriter).")
        .def(py::init<const std::string&, uint32_t>(), py::arg("path"), py::arg("alignment") = 32)
        .def(
            "add_kv",
            [](GGUFWriter& w, const std::string& key, py::handle tree) {
                w.add_kv(key, tree_from_py(tree, "key '" + key + "'", 1));
            },
            py::arg("key"), py::arg("tree"))
        .def("add_tensor_info", &GGUFWriter::add_tensor_info, py::arg("name"), py::arg("type_id"), py::arg("ne"))
        .def("write_header", &GGUFWriter::write_header, py::call_guard<py::gil_scoped_release>())
        .def(
            "write_tensor_data",
            [](GGUFWriter& w, py::buffer data) {
                py::buffer_info info = data.request();
                py::ssize_t expect = info.itemsize;
                for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
                    if (info.shape[d] > 1 && info.strides[d] != expect)
                        throw Error("write_tensor_data: the buffer is not C-contiguous; pass numpy.ascontiguousarray(x)");
                    expect *= info.shape[d];
                }
                size_t n = static_cast<size_t>(info.size * info.itemsize);
                py::gil_scoped_release release;
                w.write_tensor_data(info.ptr, n);
            },
            py::arg("data"))
        .def("finish", &GGUFWriter::finish, py::call_guard<py::gil_scoped_release>())
        .def("abort", &GGUFWriter::abort);

    m.def(
        "gguf_tensor_nbytes",
        [](uint32_t type_id, const std::vector<int64_t>& ne) { return lowbit::gguf_tensor_nbytes(type_id, ne); },
        py::arg("type_id"), py::arg("ne"), "Bytes of a tensor of this ggml/lowbit type and dims (ggml order).");
}
