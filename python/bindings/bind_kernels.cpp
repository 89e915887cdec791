// Python entry points to the CPU kernels (ISA choice, activation quantizer, matmul, layer ops) for tests and benchmarks.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bindings.h"
#include "lowbit/kernels.h"
#include "lowbit/threads.h"
#include "lowbit/types.h"

namespace {

using lowbit::Error;
namespace cpu = lowbit::cpu;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// One pool per thread count, kept for the life of the module (creating threads per call would dominate
// the benchmarks).
lowbit::ThreadPool& pool_for(int n_threads) {
    static std::mutex mu;
    static std::map<int, std::unique_ptr<lowbit::ThreadPool>> pools;
    if (n_threads <= 0) n_threads = lowbit::ThreadPool::hardware_threads();
    std::lock_guard<std::mutex> lock(mu);
    auto& p = pools[n_threads];
    if (!p) p = std::make_unique<lowbit::ThreadPool>(n_threads);
    return *p;
}

cpu::Isa isa_from_name(const std::string& name) {
    cpu::Isa isa;
    if (!cpu::parse_isa(name.c_str(), &isa)) {
        throw Error("unknown ISA '" + name + "': use one of generic, avx2, avx512, neon");
    }
    return isa;
}

lowbit::QType qtype_from(const py::object& t) {
    const uint32_t id = py::int_(t).cast<uint32_t>();
    const auto q = static_cast<lowbit::QType>(id);
    if (!cpu::matmul_supported(q)) {
        const lowbit::TypeTraits* tt = lowbit::type_traits(id);
        throw Error(std::string("type ") + (tt ? tt->name : "id " + std::to_string(id)) + " has no CPU matmul kernel");
    }
    return q;
}

// Bytes of one row of whole blocks (a k that is not a multiple of the block is refused by matmul itself).
size_t weight_row_bytes(lowbit::QType t, int64_t k) {
    const lowbit::TypeTraits& tt = lowbit::supported_traits(t);
    return static_cast<size_t>(k / tt.block_size) * tt.type_size;
}

py::tuple quantize_act(const FloatArray& x) {
    if (x.ndim() != 1 || x.shape(0) % 32 != 0) throw Error("quantize_act: x must be 1-D with a length divisible by 32");
    const int64_t k = x.shape(0), nb = k / 32;
    std::vector<block_q8_act> blocks(static_cast<size_t>(nb));
    {
        py::gil_scoped_release nogil;
        cpu::kernels().quantize_act(x.data(), blocks.data(), k);
    }
    py::array_t<float> d(nb), s(nb);
    py::array_t<int8_t> qs({nb, static_cast<int64_t>(32)});
    auto dm = d.mutable_unchecked<1>();
    auto sm = s.mutable_unchecked<1>();
    auto qm = qs.mutable_unchecked<2>();
    for (int64_t b = 0; b < nb; ++b) {
        dm(b) = blocks[b].d;
        sm(b) = blocks[b].s;
        for (int j = 0; j < 32; ++j) qm(b, j) = blocks[b].qs[j];
    }
    return py::make_tuple(d, s, qs);
}

py::array_t<float> matmul(const py::object& qtype, const py::buffer& w, int64_t n_out, int64_t k, const FloatArray& x,
                          int n_threads) {
    const lowbit::QType t = qtype_from(qtype);
    if (n_out <= 0 || k <= 0) throw Error("matmul: n_out and k must be positive");
    if (x.size() % k != 0) throw Error("matmul: x has " + std::to_string(x.size()) + " elements, not a multiple of k");
    const int64_t n_tok = x.size() / k;
    py::buffer_info wb = w.request();
    const size_t row_bytes = weight_row_bytes(t, k);
    const size_t need = row_bytes * static_cast<size_t>(n_out);
    const size_t have = static_cast<size_t>(wb.size) * static_cast<size_t>(wb.itemsize);
    if (have != need) {
        throw Error("matmul: weights have " + std::to_string(have) + " bytes, expected " + std::to_string(need) +
                    " for (" + std::to_string(n_out) + ", " + std::to_string(k) + ")");
    }
    std::vector<uint8_t> scratch(cpu::act_scratch_bytes(t, k, n_tok) + 64);
    py::array_t<float> y({n_tok, n_out});
    float* yp = y.mutable_data();
    {
        py::gil_scoped_release nogil;
        cpu::matmul(t, wb.ptr, row_bytes, n_out, k, x.data(), n_tok, yp, scratch.data(), pool_for(n_threads));
    }
    return y;
}

// The same product through load-time panels (repack, then the panel kernel); None when the active ISA has
// no panel kernel for the type or the shape has no panel layout.
py::object matmul_panels(const py::object& qtype, const py::buffer& w, int64_t n_out, int64_t k, const FloatArray& x,
                         int n_threads) {
    const lowbit::QType t = qtype_from(qtype);
    if (!cpu::panels_supported(t, n_out, k)) return py::none();
    if (x.size() % k != 0) throw Error("matmul_panels: x has " + std::to_string(x.size()) + " elements, not a multiple of k");
    const int64_t n_tok = x.size() / k;
    py::buffer_info wb = w.request();
    const size_t row_bytes = weight_row_bytes(t, k);
    const size_t have = static_cast<size_t>(wb.size) * static_cast<size_t>(wb.itemsize);
    if (have != row_bytes * static_cast<size_t>(n_out)) throw Error("matmul_panels: wrong weight byte count");
    std::vector<uint8_t> panels(cpu::panels_bytes(t, n_out, k));
    cpu::repack_panels(t, wb.ptr, row_bytes, n_out, k, panels.data(), 0, n_out / cpu::kPanelRows);
    std::vector<uint8_t> scratch(cpu::act_scratch_bytes(t, k, n_tok) + 64);
    py::array_t<float> y({n_tok, n_out});
    float* yp = y.mutable_data();
    bool ok;
    {
        py::gil_scoped_release nogil;
        ok = cpu::matmul_panels(t, panels.data(), n_out, k, x.data(), n_tok, yp, scratch.data(), pool_for(n_threads));
    }
    if (!ok) return py::none();
    return std::move(y);
}

// Benchmark hook: seconds (min over reps) of the panel matmul alone (repack excluded); None if unavailable.
py::object matmul_panels_seconds(const py::object& qtype, const py::buffer& w, int64_t n_out, int64_t k,
                                 const FloatArray& x, int n_threads, int reps) {
    const lowbit::QType t = qtype_from(qtype);
    if (!cpu::panels_supported(t, n_out, k) || x.size() % k != 0 || reps < 1) return py::none();
    const int64_t n_tok = x.size() / k;
    py::buffer_info wb = w.request();
    const size_t row_bytes = weight_row_bytes(t, k);
    if (static_cast<size_t>(wb.size) * static_cast<size_t>(wb.itemsize) != row_bytes * static_cast<size_t>(n_out))
        throw Error("matmul_panels_seconds: wrong weight byte count");
    std::vector<uint8_t> panels(cpu::panels_bytes(t, n_out, k));
    cpu::repack_panels(t, wb.ptr, row_bytes, n_out, k, panels.data(), 0, n_out / cpu::kPanelRows);
    std::vector<uint8_t> scratch(cpu::act_scratch_bytes(t, k, n_tok) + 64);
    std::vector<float> y(static_cast<size_t>(n_tok * n_out));
    double best = 1e30;
    bool ok = true;
    {
        py::gil_scoped_release nogil;
        for (int i = 0; i < reps && ok; ++i) {
            auto t0 = std::chrono::steady_clock::now();
            ok = cpu::matmul_panels(t, panels.data(), n_out, k, x.data(), n_tok, y.data(), scratch.data(),
                                    pool_for(n_threads));
            best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
    }
    if (!ok) return py::none();
    return py::float_(best);
}

}  // namespace

void bind_kernels(py::module_& m) {
    m.def("pool_barrier_seconds", [](int n_threads, int reps) {
        // Median seconds of one empty ThreadPool::run (wake the workers, run nothing, wait for all): the
        // fixed cost every parallel matmul pays on top of its work.
        lowbit::ThreadPool& pool = pool_for(n_threads);
        std::vector<double> t(static_cast<size_t>(std::max(reps, 1)));
        py::gil_scoped_release nogil;
        std::atomic<int> sink{0};
        for (auto& v : t) {
            auto t0 = std::chrono::steady_clock::now();
            pool.run([&](int ith, int) { sink.fetch_add(ith, std::memory_order_relaxed); });
            v = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
        std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
        return t[t.size() / 2];
    }, "Benchmark: median seconds of an empty pool job (the barrier cost).", py::arg("n_threads"), py::arg("reps") = 10000);
    m.def("matmul_panels_seconds", &matmul_panels_seconds, "Benchmark: min seconds of the panel matmul alone.",
          py::arg("qtype"), py::arg("w"), py::arg("n_out"), py::arg("k"), py::arg("x"), py::arg("n_threads") = 1,
          py::arg("reps") = 5);
    m.def("matmul_panels", &matmul_panels,
          "matmul() through the load-time panel layout (None where the active ISA or the shape has none).",
          py::arg("qtype"), py::arg("w"), py::arg("n_out"), py::arg("k"), py::arg("x"), py::arg("n_threads") = 1);
    m.def("kernels_available", [] {
        std::vector<std::string> out;
        for (auto isa : {cpu::Isa::Generic, cpu::Isa::AVX2, cpu::Isa::AVX512, cpu::Isa::NEON}) {
            if (cpu::kernels_for(isa)) out.emplace_back(cpu::isa_name(isa));
        }
        return out;
    }, "Names of the CPU kernel tables this build and CPU can run.");
    m.def("compiled_isas", [] { return std::string(cpu::compiled_isas()); }, "ISAs compiled into this build.");
    m.def(
        "type_kernels",
        [] {
            // Per computable type: (name, ISA of the dot kernel, ISA of the row quantizer, has a panel kernel,
            // has a prompt GEMM), for the active table; "generic" marks a fallback.
            std::vector<py::tuple> out;
            const cpu::Kernels& kt = cpu::kernels();
#define LOWBIT_X(NAME, lc, id, bs, ts, kind)                                                                \
    out.push_back(py::make_tuple(#NAME, cpu::dot_isa(lowbit::QType::NAME), cpu::quantize_isa(lowbit::QType::NAME), \
                                 kt.at(lowbit::QType::NAME).panel != nullptr, kt.at(lowbit::QType::NAME).gemm != nullptr));
            LOWBIT_QTYPES(LOWBIT_X)
#undef LOWBIT_X
            return out;
        },
        "Per type: (name, dot kernel ISA, quantizer ISA, has panel kernel, has prompt GEMM) in the active table.");
    m.def("set_isa", [](const std::string& name) { cpu::set_isa(isa_from_name(name)); },
          "Force a kernel table (tests, benchmarks).", py::arg("name"));
    m.def("reset_isa", &cpu::reset_isa, "Back to LOWBIT_ISA or the best table for this CPU.");
    m.def("active_isa", [] { return std::string(cpu::kernels().name); }, "Name of the kernel table in use.");
    m.def("quantize_act", &quantize_act, "x (k,) float32 -> (d (nb,), s (nb,), qs (nb, 32) int8) with the active ISA.",
          py::arg("x"));
    m.def("act_block_bytes", [] { return sizeof(block_q8_act); });
    m.def("matmul", &matmul,
          "Y (n_tok, n_out) = X (n_tok, k) @ W^T, W (n_out, k) as raw rows of type qtype, on the active ISA.",
          py::arg("qtype"), py::arg("w"), py::arg("n_out"), py::arg("k"), py::arg("x"), py::arg("n_threads") = 1);
    m.def("rmsnorm", [](const FloatArray& x, const FloatArray& weight, float eps) {
        if (x.ndim() != 1 || weight.ndim() != 1 || x.shape(0) != weight.shape(0)) {
            throw Error("rmsnorm: x and weight must be 1-D of the same length");
        }
        py::array_t<float> out(x.shape(0));
        cpu::kernels().rmsnorm(out.mutable_data(), x.data(), weight.data(), x.shape(0), eps);
        return out;
    }, py::arg("x"), py::arg("weight"), py::arg("eps"));
    // act(gate) * up through the active table's gated-activation kernel (Kernels::silu_mul, ::gelu_mul).
    using GatedFn = void (*cpu::Kernels::*)(float*, const float*, const float*, int64_t);
    auto gated = [&m](const char* name, GatedFn fn) {
        m.def(name, [name, fn](const FloatArray& gate, const FloatArray& up) {
            if (gate.ndim() != 1 || up.ndim() != 1 || gate.shape(0) != up.shape(0)) {
                throw Error(std::string(name) + ": gate and up must be 1-D of the same length");
            }
            py::array_t<float> out(gate.shape(0));
            (cpu::kernels().*fn)(out.mutable_data(), gate.data(), up.data(), gate.shape(0));
            return out;
        }, py::arg("gate"), py::arg("up"));
    };
    gated("silu_mul", &cpu::Kernels::silu_mul);
    gated("gelu_mul", &cpu::Kernels::gelu_mul);
    m.def("dot_f32", [](const FloatArray& a, const FloatArray& b) {
        if (a.ndim() != 1 || b.ndim() != 1 || a.shape(0) != b.shape(0)) throw Error("dot_f32: need two 1-D arrays of one length");
        return cpu::kernels().dot_f32_f32(a.data(), b.data(), a.shape(0));
    }, py::arg("a"), py::arg("b"));
    m.def("axpy_f32", [](const FloatArray& y, float a, const FloatArray& x) {
        if (x.ndim() != 1 || y.ndim() != 1 || x.shape(0) != y.shape(0)) throw Error("axpy_f32: need two 1-D arrays of one length");
        py::array_t<float> out(y.shape(0));
        std::copy(y.data(), y.data() + y.shape(0), out.mutable_data());
        cpu::kernels().axpy_f32(out.mutable_data(), a, x.data(), x.shape(0));
        return out;
    }, "Returns y + a * x (y is not modified).", py::arg("y"), py::arg("a"), py::arg("x"));
    m.def("weighted_rows", [](const FloatArray& out, const FloatArray& p, const py::array& rows) {
        // out (nh, hd) + p (nh, n) @ rows (n, hd), rows float32 or float16, through Kernels::weighted_rows.
        if (out.ndim() != 2 || p.ndim() != 2 || rows.ndim() != 2 || p.shape(0) != out.shape(0) ||
            rows.shape(0) != p.shape(1) || rows.shape(1) != out.shape(1)) {
            throw Error("weighted_rows: need out (nh, hd), p (nh, n), rows (n, hd)");
        }
        const bool f16 = rows.dtype().is(py::dtype("float16"));
        if (!f16 && !rows.dtype().is(py::dtype::of<float>())) throw Error("weighted_rows: rows must be float32 or float16");
        if (!(rows.flags() & py::array::c_style)) throw Error("weighted_rows: rows must be C-contiguous");
        py::array_t<float> res({out.shape(0), out.shape(1)});
        std::copy(out.data(), out.data() + out.size(), res.mutable_data());
        cpu::kernels().weighted_rows(res.mutable_data(), static_cast<int>(out.shape(0)), static_cast<int>(out.shape(1)),
                                     p.data(), static_cast<size_t>(p.shape(1)), rows.data(),
                                     static_cast<size_t>(rows.strides(0)), rows.shape(0), f16);
        return res;
    }, "out + p @ rows (out is not modified), rows float32 or float16.", py::arg("out"), py::arg("p"), py::arg("rows"));
    m.def("attn_scores", [](const FloatArray& q, const py::array& rows, float scale) {
        // scale * q (nh, hd) @ rows (n, hd)^T, rows float32 or float16, through Kernels::attn_scores.
        if (q.ndim() != 2 || rows.ndim() != 2 || rows.shape(1) != q.shape(1)) {
            throw Error("attn_scores: need q (nh, hd) and rows (n, hd)");
        }
        const bool f16 = rows.dtype().is(py::dtype("float16"));
        if (!f16 && !rows.dtype().is(py::dtype::of<float>())) throw Error("attn_scores: rows must be float32 or float16");
        if (!(rows.flags() & py::array::c_style)) throw Error("attn_scores: rows must be C-contiguous");
        py::array_t<float> s({q.shape(0), rows.shape(0)});
        cpu::kernels().attn_scores(q.data(), static_cast<int>(q.shape(0)), static_cast<int>(q.shape(1)), rows.data(),
                                   static_cast<size_t>(rows.strides(0)), rows.shape(0), f16, scale, s.mutable_data(),
                                   static_cast<size_t>(rows.shape(0)));
        return s;
    }, "scale * q @ rows.T, rows float32 or float16.", py::arg("q"), py::arg("rows"), py::arg("scale"));
}
