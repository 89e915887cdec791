// CUDA for Python: availability and device queries, the layer-offload Backend, and kernel-level entry
// points (lowbit._core.cuda.*) used by the GPU tests and benchmarks.
#include "bindings.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

#include "lowbit/cuda.h"

namespace {

#ifdef LOWBIT_HAVE_CUDA
using lowbit::Error;
using lowbit::QType;
namespace lc = lowbit::cuda;
using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// A QType from an int or an enum member (IntEnum or Enum with an int value).
QType to_qtype(py::handle h) {
    if (py::hasattr(h, "value")) return static_cast<QType>(h.attr("value").cast<uint32_t>());
    return static_cast<QType>(h.cast<uint32_t>());
}

// A weight matrix over the bytes of a contiguous buffer (kept alive by the caller for the call).
lc::Matrix to_matrix(py::handle qtype, const py::buffer& data, int64_t n_rows, int64_t n_cols) {
    py::buffer_info info = data.request();
    lc::Matrix m;
    m.type = to_qtype(qtype);
    m.data = info.ptr;
    m.n_rows = n_rows;
    m.n_cols = n_cols;
    const size_t have = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
    size_t need;
    if (m.type == QType::NF4_DQ) {
        need = lowbit::nf4_dq_nbytes(n_rows * n_cols);
    } else {
        need = static_cast<size_t>(n_rows) * lc::device_row_bytes(m.type, n_cols);
    }
    if (have != need) {
        throw Error("weight buffer has " + std::to_string(have) + " bytes, a (" + std::to_string(n_rows) + ", " +
                    std::to_string(n_cols) + ") matrix of this type needs " + std::to_string(need));
    }
    return m;
}

// A Matrix from a (qtype, data, n_rows, n_cols) tuple.
lc::Matrix tuple_matrix(const py::handle& t) {
    py::tuple tup = py::reinterpret_borrow<py::tuple>(t);
    if (tup.size() != 4) throw Error("a weight is a (qtype, data, n_rows, n_cols) tuple");
    return to_matrix(tup[0], tup[1].cast<py::buffer>(), tup[2].cast<int64_t>(), tup[3].cast<int64_t>());
}

lc::RopeMode to_rope_mode(const std::string& mode) {
    if (mode == "normal") return lc::RopeMode::Normal;
    if (mode == "neox") return lc::RopeMode::Neox;
    throw Error("rope_mode must be 'normal' or 'neox', got '" + mode + "'");
}

lc::GatedAct to_gated_act(const std::string& act) {
    if (act == "silu") return lc::GatedAct::Silu;
    if (act == "gelu_tanh") return lc::GatedAct::GeluTanh;
    throw Error("act must be 'silu' or 'gelu_tanh', got '" + act + "'");
}

lc::BackendConfig to_config(const py::dict& d) {
    lc::BackendConfig c;
    auto get_i = [&](const char* k, int& dst) { if (d.contains(k)) dst = d[k].cast<int>(); };
    auto get_f = [&](const char* k, float& dst) { if (d.contains(k)) dst = d[k].cast<float>(); };
    get_i("device", c.device);
    get_i("n_embd", c.n_embd);
    get_i("n_head", c.n_head);
    get_i("n_head_kv", c.n_head_kv);
    get_i("head_dim", c.head_dim);
    get_i("n_ff", c.n_ff);
    get_i("n_ctx", c.n_ctx);
    get_i("rope_dim", c.rope_dim);
    get_f("rms_eps", c.rms_eps);
    get_f("rope_freq_base", c.rope_freq_base);
    get_f("rope_freq_scale", c.rope_freq_scale);
    get_f("attn_scale", c.attn_scale);
    get_f("logit_softcap", c.logit_softcap);
    get_f("rope_mscale", c.rope_mscale[0]);
    get_f("rope_mscale_swa", c.rope_mscale[1]);
    if (d.contains("rope_mode")) c.rope_mode = to_rope_mode(d["rope_mode"].cast<std::string>());
    if (d.contains("act")) c.act = to_gated_act(d["act"].cast<std::string>());
    const char* tables[2] = {"rope_inv_freq", "rope_inv_freq_swa"};
    for (int t = 0; t < 2; ++t) {
        if (!d.contains(tables[t]) || d[tables[t]].is_none()) continue;
        F32Array f = d[tables[t]].cast<F32Array>();
        c.rope_inv_freq[t].assign(f.data(), f.data() + f.size());
    }
    if (d.contains("matvec")) {
        const std::string mode = d["matvec"].cast<std::string>();
        if (mode == "int8") c.matvec = lc::MatvecMode::Int8Act;
        else if (mode == "float") c.matvec = lc::MatvecMode::FloatAct;
        else throw Error("matvec must be 'int8' or 'float', got '" + mode + "'");
    }
    return c;
}

void check_2d(const F32Array& a, int64_t cols, const char* name) {
    if (a.ndim() != 2 || a.shape(1) != cols) {
        throw Error(std::string(name) + " must have shape (n, " + std::to_string(cols) + ")");
    }
}

py::dict device_dict(int index, const lc::DeviceInfo& di) {
    py::dict dev;
    dev["index"] = index;
    dev["name"] = di.name;
    dev["total_memory"] = di.total_memory;
    dev["free_memory"] = di.free_memory;
    dev["compute_capability"] = py::make_tuple(di.compute_major, di.compute_minor);
    return dev;
}

void bind_backend(py::module_& sub) {
    py::class_<lc::Backend>(sub, "Backend", "Transformer blocks and their fp16 KV cache on one GPU.")
        .def(py::init([](const py::dict& cfg, int n_batch) { return new lc::Backend(to_config(cfg), n_batch); }),
             py::arg("config"), py::arg("n_batch") = 512,
             "config: dict with n_embd, n_head, n_head_kv, head_dim, n_ff, n_ctx, rms_eps, rope_freq_base, "
             "rope_freq_scale, rope_dim (0: head_dim), device, matvec ('int8' | 'float'), and for other "
             "architectures than llama: attn_scale (0: 1/sqrt(head_dim)), rope_mode ('normal' | 'neox'), "
             "act ('silu' | 'gelu_tanh'), rope_inv_freq and rope_inv_freq_swa (float32 (rope_dim / 2): the "
             "two RoPE tables; rope_inv_freq replaces base and scale), rope_mscale and rope_mscale_swa (their "
             "cos/sin magnitude, YaRN's attn_factor; 1: none), logit_softcap (0: none).")
        .def("add_layer",
             [](lc::Backend& b, const py::dict& w, int window, int rope_table) {
                 const lc::BackendConfig& c = b.config();
                 const int64_t q_dim = static_cast<int64_t>(c.n_head) * c.head_dim;
                 const int64_t kv_dim = static_cast<int64_t>(c.n_head_kv) * c.head_dim;
                 std::vector<F32Array> keep;  // the vectors' float32 copies, alive until add_layer returns
                 auto vec = [&](const char* key, int64_t n, bool required) -> const float* {
                     if (!w.contains(key) || w[key].is_none()) {
                         if (required) throw Error(std::string("add_layer: '") + key + "' is missing");
                         return nullptr;
                     }
                     keep.push_back(w[key].cast<F32Array>());
                     if (keep.back().size() != n) {
                         throw Error(std::string("add_layer: '") + key + "' must have " + std::to_string(n) +
                                     " elements, got " + std::to_string(keep.back().size()));
                     }
                     return keep.back().data();
                 };
                 keep.reserve(9);
                 lc::LayerWeights lw;
                 lw.attn_norm = vec("attn_norm", c.n_embd, true);
                 lw.ffn_norm = vec("ffn_norm", c.n_embd, true);
                 lw.bq = vec("bq", q_dim, false);
                 lw.bk = vec("bk", kv_dim, false);
                 lw.bv = vec("bv", kv_dim, false);
                 lw.q_norm = vec("q_norm", c.head_dim, false);
                 lw.k_norm = vec("k_norm", c.head_dim, false);
                 lw.attn_post_norm = vec("attn_post_norm", c.n_embd, false);
                 lw.ffn_post_norm = vec("ffn_post_norm", c.n_embd, false);
                 lw.wq = tuple_matrix(w["wq"]);
                 lw.wk = tuple_matrix(w["wk"]);
                 lw.wv = tuple_matrix(w["wv"]);
                 lw.wo = tuple_matrix(w["wo"]);
                 lw.w_gate = tuple_matrix(w["w_gate"]);
                 lw.w_up = tuple_matrix(w["w_up"]);
                 lw.w_down = tuple_matrix(w["w_down"]);
                 return b.add_layer(lw, window, rope_table);
             },
             py::arg("weights"), py::arg("window") = 0, py::arg("rope_table") = 0,
             "weights: attn_norm, ffn_norm (float32 (n_embd)) and wq, wk, wv, wo, w_gate, w_up, w_down as "
             "(qtype, uint8 data, n_rows, n_cols) tuples; optional float32 vectors bq, bk, bv (biases), q_norm, "
             "k_norm (head_dim), attn_post_norm, ffn_post_norm (n_embd). window > 0: the block attends to the "
             "last `window` positions only; rope_table 1: the config's rope_inv_freq_swa. Returns the block's "
             "index.")
        .def("forward",
             [](lc::Backend& b, const F32Array& x, int n_past, int first, int last) {
                 check_2d(x, b.config().n_embd, "x");
                 py::array_t<float> out({x.shape(0), x.shape(1)});
                 std::memcpy(out.mutable_data(), x.data(), static_cast<size_t>(x.size()) * 4);
                 float* p = out.mutable_data();
                 const int n_tok = static_cast<int>(x.shape(0));
                 const int hi = last < 0 ? b.n_layers() : last;
                 {
                     py::gil_scoped_release release;
                     b.forward(first, hi, p, n_tok, n_past);
                 }
                 return out;
             },
             py::arg("x"), py::arg("n_past"), py::arg("first") = 0, py::arg("last") = -1,
             "Hidden states (n_tok, n_embd) through blocks [first, last) at positions n_past..; returns a new array.")
        .def("set_output",
             [](lc::Backend& b, const F32Array& norm, const py::tuple& w) {
                 if (norm.size() != b.config().n_embd) throw Error("output_norm must have n_embd elements");
                 b.set_output(norm.data(), tuple_matrix(w));
             },
             py::arg("output_norm"), py::arg("output"))
        .def("output",
             [](lc::Backend& b, const F32Array& x) {
                 check_2d(x, b.config().n_embd, "x");
                 if (!b.has_output()) throw Error("output() needs set_output() first");
                 py::array_t<float> logits({x.shape(0), static_cast<py::ssize_t>(b.n_vocab())});
                 float* lp = logits.mutable_data();
                 {
                     py::gil_scoped_release release;
                     b.output(x.data(), static_cast<int>(x.shape(0)), lp);
                 }
                 return logits;
             },
             py::arg("x"), "logits (n_tok, n_vocab) of hidden states x (n_tok, n_embd) through the output head.")
        .def("truncate", &lc::Backend::truncate, py::arg("n_keep"))
        .def("n_cached", &lc::Backend::n_cached, py::arg("layer"))
        .def_property_readonly("n_layers", &lc::Backend::n_layers)
        .def_property_readonly("device_bytes", &lc::Backend::device_bytes)
        .def("info", [](const lc::Backend& b) { return device_dict(b.config().device, b.info()); });
}
#endif

}  // namespace

void bind_cuda(py::module_& m) {
    m.def("cuda_info", []() {
        py::dict info;
        info["compiled"] = lowbit::cuda::compiled();
        py::list devices;
#ifdef LOWBIT_HAVE_CUDA
        std::string error;
        int n = lowbit::cuda::device_count(&error);
        for (int d = 0; d < n; ++d) devices.append(device_dict(d, lowbit::cuda::device_info(d)));
        info["error"] = n == 0 ? py::cast(error.empty() ? "no CUDA device found" : error) : py::none();
#else
        info["error"] = "this lowbit build has no CUDA backend (rebuild with LOWBIT_CUDA=ON and nvcc on PATH)";
#endif
        info["devices"] = devices;
        return info;
    }, "CUDA backend: compiled in?, devices visible to the runtime, and why none when none.");

    py::module_ sub = m.def_submodule("cuda", "CUDA backend: layer offload and kernel entry points (CUDA builds)");
    sub.attr("compiled") = lowbit::cuda::compiled();
#ifdef LOWBIT_HAVE_CUDA
    namespace lt = lowbit::cuda::testing;
    sub.attr("GEMM_MIN_TOKENS") = lowbit::cuda::kGemmMinTokens;
    bind_backend(sub);

    sub.def("dequantize",
            [](py::handle qtype, const py::buffer& data, int64_t n, bool f16) -> py::array {
                lc::Matrix m = to_matrix(qtype, data, 1, n);
                if (f16) {
                    py::array_t<uint16_t> out(n);
                    {
                        py::gil_scoped_release release;
                        lt::dequantize_f16(m.type, m.data, n, out.mutable_data());
                    }
                    return out.attr("view")("float16");
                }
                py::array_t<float> out(n);
                {
                    py::gil_scoped_release release;
                    lt::dequantize(m.type, m.data, n, out.mutable_data());
                }
                return out;
            },
            py::arg("qtype"), py::arg("data"), py::arg("n"), py::arg("f16") = false,
            "n elements of qtype (raw block bytes) -> float32 (or float16) on the GPU.");

    sub.def("quantize_act",
            [](const F32Array& x) {
                if (x.ndim() != 2) throw Error("x must be 2-D (n_tok, k)");
                const int64_t n_tok = x.shape(0), k = x.shape(1);
                if (k % 32 != 0) throw Error("k must be a multiple of 32");
                const int64_t nb = n_tok * k / 32;
                std::vector<block_q8_act> blocks(static_cast<size_t>(nb));
                lt::quantize_act(x.data(), n_tok, k, blocks.data());
                py::array_t<float> d(nb), s(nb);
                py::array_t<int8_t> qs({nb, static_cast<int64_t>(32)});
                for (int64_t i = 0; i < nb; ++i) {
                    d.mutable_at(i) = blocks[i].d;
                    s.mutable_at(i) = blocks[i].s;
                    std::memcpy(qs.mutable_data(i, 0), blocks[i].qs, 32);
                }
                return py::make_tuple(d, s, qs);
            },
            py::arg("x"), "x (n_tok, k) -> activation blocks as (d (nb), s (nb), qs (nb, 32) int8).");

    sub.def("matmul",
            [](py::handle qtype, const py::buffer& w, int64_t n_rows, int64_t n_cols, const F32Array& x,
               const std::string& path) {
                lc::Matrix m = to_matrix(qtype, w, n_rows, n_cols);
                check_2d(x, n_cols, "x");
                lt::MatmulPath p;
                if (path == "int8") p = lt::MatmulPath::MatvecInt8;
                else if (path == "float") p = lt::MatmulPath::MatvecFloat;
                else if (path == "gemm") p = lt::MatmulPath::Gemm;
                else throw Error("path must be 'int8', 'float' or 'gemm', got '" + path + "'");
                const int64_t n_tok = x.shape(0);
                py::array_t<float> y({n_tok, n_rows});
                float* yp = y.mutable_data();
                {
                    py::gil_scoped_release release;
                    lt::matmul(m, x.data(), n_tok, yp, p);
                }
                return y;
            },
            py::arg("qtype"), py::arg("w"), py::arg("n_rows"), py::arg("n_cols"), py::arg("x"), py::arg("path"),
            "Y (n_tok, n_rows) = X @ W^T through one kernel path: 'int8' (matvec, int8 activations), "
            "'float' (matvec, fp32 activations) or 'gemm' (tensor cores).");

    sub.def("rmsnorm",
            [](const F32Array& x, const F32Array& w, float eps) {
                if (x.ndim() != 2 || w.ndim() != 1 || w.shape(0) != x.shape(1)) {
                    throw Error("rmsnorm: x (n_rows, n) and weight (n)");
                }
                py::array_t<float> y({x.shape(0), x.shape(1)});
                lt::rmsnorm(x.data(), w.data(), x.shape(0), x.shape(1), eps, y.mutable_data());
                return y;
            },
            py::arg("x"), py::arg("weight"), py::arg("eps"));

    sub.def("head_norm",
            [](const F32Array& x, const F32Array& w, float eps) {
                if (x.ndim() != 2 || w.ndim() != 1 || w.shape(0) != x.shape(1)) {
                    throw Error("head_norm: x (n_rows, head_dim) and weight (head_dim)");
                }
                py::array_t<float> y({x.shape(0), x.shape(1)});
                std::memcpy(y.mutable_data(), x.data(), static_cast<size_t>(x.size()) * 4);
                lt::head_norm(y.mutable_data(), w.data(), x.shape(0), static_cast<int>(x.shape(1)), eps);
                return y;
            },
            py::arg("x"), py::arg("weight"), py::arg("eps"),
            "Every row (a head) through RMSNorm with weight (head_dim): the per-head q/k norm.");

    sub.def("rope",
            [](const F32Array& x, int rope_dim, int pos0, float base, float scale, const std::string& mode,
               const py::object& inv_freq, float mscale) {
                if (x.ndim() != 3) throw Error("rope: x must be (n_tok, n_heads, head_dim)");
                std::vector<float> freq;
                if (inv_freq.is_none()) {
                    freq = lc::rope_inv_freq(rope_dim, base, scale);
                } else {
                    F32Array f = inv_freq.cast<F32Array>();
                    if (f.size() != rope_dim / 2) throw Error("rope: inv_freq must have rope_dim / 2 elements");
                    freq.assign(f.data(), f.data() + f.size());
                }
                if (freq.empty()) throw Error("rope: rope_dim must be even and in 2..head_dim");
                py::array_t<float> y({x.shape(0), x.shape(1), x.shape(2)});
                std::memcpy(y.mutable_data(), x.data(), static_cast<size_t>(x.size()) * 4);
                lt::rope(y.mutable_data(), static_cast<int>(x.shape(0)), static_cast<int>(x.shape(1)),
                         static_cast<int>(x.shape(2)), rope_dim, pos0, freq.data(), to_rope_mode(mode), mscale);
                return y;
            },
            py::arg("x"), py::arg("rope_dim"), py::arg("pos0"), py::arg("freq_base") = 10000.0f,
            py::arg("freq_scale") = 1.0f, py::arg("mode") = "normal", py::arg("inv_freq") = py::none(),
            py::arg("mscale") = 1.0f,
            "x (n_tok, n_heads, head_dim) rotated for positions pos0..: mode 'normal' (pairs 2i, 2i+1) or 'neox' "
            "(pairs i, i + rope_dim/2); inv_freq (rope_dim / 2) replaces freq_scale * freq_base^(-2i/rope_dim); "
            "cos and sin scaled by mscale (YaRN).");

    sub.def("attention",
            [](const F32Array& q, const F32Array& k, const F32Array& v, int n_past, int window, float scale) {
                if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3) {
                    throw Error("attention: q (n_tok, n_head, head_dim), k and v (n_past + n_tok, n_head_kv, head_dim)");
                }
                const int n_tok = static_cast<int>(q.shape(0));
                if (k.shape(0) != n_past + n_tok || v.shape(0) != k.shape(0) || k.shape(1) != v.shape(1) ||
                    k.shape(2) != q.shape(2) || v.shape(2) != q.shape(2)) {
                    throw Error("attention: k and v must be (n_past + n_tok, n_head_kv, head_dim)");
                }
                py::array_t<float> out({q.shape(0), q.shape(1), q.shape(2)});
                lt::attention(q.data(), k.data(), v.data(), n_tok, n_past, static_cast<int>(q.shape(1)),
                              static_cast<int>(k.shape(1)), static_cast<int>(q.shape(2)), window, scale,
                              out.mutable_data());
                return out;
            },
            py::arg("q"), py::arg("k"), py::arg("v"), py::arg("n_past"), py::arg("window") = 0,
            py::arg("scale") = 0.0f,
            "Causal GQA attention through the fp16 KV cache; query t sits at position n_past + t. window > 0: "
            "each query sees only the last `window` positions up to its own; scale 0: 1/sqrt(head_dim).");

    auto gated = [](lc::GatedAct act) {
        return [act](const F32Array& g, const F32Array& u) {
            if (g.size() != u.size()) throw Error("gated activation: gate and up differ in size");
            py::array_t<float> out(g.size());
            lt::gated_act(act, g.data(), u.data(), g.size(), out.mutable_data());
            return out;
        };
    };
    sub.def("silu_mul", gated(lc::GatedAct::Silu), py::arg("gate"), py::arg("up"), "silu(gate) * up");
    sub.def("gelu_tanh_mul", gated(lc::GatedAct::GeluTanh), py::arg("gate"), py::arg("up"),
            "gelu_tanh(gate) * up (GELU's tanh approximation)");

    sub.def("copy_bandwidth", &lt::copy_bandwidth, py::arg("bytes"), py::arg("reps") = 10,
            py::call_guard<py::gil_scoped_release>(),
            "Device-to-device cudaMemcpy bandwidth in bytes/s (read + write), median of reps.");
#endif
}
