// C++ kernel test: every runnable ISA against a double-precision oracle written here from the spec and
// against the generic table, on odd shapes, with 1 and 2 threads. Exit status 0 = all passed.
// Runs without Python (native, under qemu for NEON via tests/cpp/run_neon_qemu.sh, and with sanitizers).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "lowbit/kernels.h"
#include "lowbit/types.h"

using lowbit::QType;
namespace cpu = lowbit::cpu;

namespace {

int g_failures = 0;
int g_checks = 0;

void fail(const std::string& what) {
    if (++g_failures <= 20) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

std::mt19937_64 g_rng(12345);

float randn() {
    static std::normal_distribution<float> nd(0.0f, 1.0f);
    return nd(g_rng);
}
uint32_t randu(uint32_t n) { return static_cast<uint32_t>(g_rng() % n); }

// fp16 bits -> double from the IEEE definition (normals, subnormals, zero; the test never makes inf/NaN).
double half_value(uint16_t h) {
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    const double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
    return (h & 0x8000) ? -v : v;
}
// A random finite fp16 scale of magnitude about 2^-10 .. 2^-4.
uint16_t random_half_scale() {
    const uint16_t e = static_cast<uint16_t>(5 + randu(6));
    return static_cast<uint16_t>((randu(2) << 15) | (e << 10) | randu(1024));
}

// bitsandbytes NF4 code book (spec/quant-types.md#nf4) and the documented runtime int8 table round(c*127).
const double kCodes[16] = {-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};

struct Weights {
    std::vector<uint8_t> bytes;
    std::vector<double> value;  // (n_out, k) what the kernel must compute with
    size_t row_bytes = 0;
};

Weights make_weights(QType t, int n_out, int k) {
    Weights w;
    w.value.resize(static_cast<size_t>(n_out) * k);
    auto put16 = [](uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); };
    switch (t) {
        case QType::Q4_0:
        case QType::Q4_1: {
            const bool q41 = t == QType::Q4_1;
            const size_t bb = q41 ? 20 : 18;
            w.row_bytes = k / 32 * bb;
            w.bytes.resize(w.row_bytes * n_out);
            for (int r = 0; r < n_out; ++r) {
                for (int b = 0; b < k / 32; ++b) {
                    uint8_t* p = w.bytes.data() + r * w.row_bytes + b * bb;
                    const uint16_t d = random_half_scale(), m = random_half_scale();
                    put16(p, d);
                    if (q41) put16(p + 2, m);
                    uint8_t* qs = p + (q41 ? 4 : 2);
                    for (int j = 0; j < 16; ++j) {
                        qs[j] = static_cast<uint8_t>(randu(256));
                        // low nibble = element j, high nibble = element j + 16
                        const int lo = qs[j] & 15, hi = qs[j] >> 4;
                        double* v = &w.value[static_cast<size_t>(r) * k + b * 32];
                        if (q41) {
                            v[j] = lo * half_value(d) + half_value(m);
                            v[j + 16] = hi * half_value(d) + half_value(m);
                        } else {
                            v[j] = (lo - 8) * half_value(d);
                            v[j + 16] = (hi - 8) * half_value(d);
                        }
                    }
                }
            }
            break;
        }
        case QType::Q8_0: {
            w.row_bytes = k / 32 * 34;
            w.bytes.resize(w.row_bytes * n_out);
            for (int r = 0; r < n_out; ++r) {
                for (int b = 0; b < k / 32; ++b) {
                    uint8_t* p = w.bytes.data() + r * w.row_bytes + b * 34;
                    const uint16_t d = random_half_scale();
                    put16(p, d);
                    for (int j = 0; j < 32; ++j) {
                        const int8_t q = static_cast<int8_t>(randu(256) - 128);
                        p[2 + j] = static_cast<uint8_t>(q);
                        w.value[static_cast<size_t>(r) * k + b * 32 + j] = q * half_value(d);
                    }
                }
            }
            break;
        }
        case QType::NF4: {
            w.row_bytes = k / 64 * 36;
            w.bytes.resize(w.row_bytes * n_out);
            for (int r = 0; r < n_out; ++r) {
                for (int b = 0; b < k / 64; ++b) {
                    uint8_t* p = w.bytes.data() + r * w.row_bytes + b * 36;
                    const float absmax = std::fabs(randn()) * 0.1f;
                    std::memcpy(p, &absmax, 4);
                    for (int j = 0; j < 32; ++j) {
                        p[4 + j] = static_cast<uint8_t>(randu(256));
                        // element 2j in the HIGH nibble (bitsandbytes), int8 code round(c*127), scale absmax/127
                        const int i0 = p[4 + j] >> 4, i1 = p[4 + j] & 15;
                        double* v = &w.value[static_cast<size_t>(r) * k + b * 64 + 2 * j];
                        v[0] = std::round(kCodes[i0] * 127) * (static_cast<double>(absmax) * (1.0f / 127.0f));
                        v[1] = std::round(kCodes[i1] * 127) * (static_cast<double>(absmax) * (1.0f / 127.0f));
                    }
                }
            }
            break;
        }
        case QType::F16:
        case QType::BF16:
        case QType::F32: {
            const size_t es = t == QType::F32 ? 4 : 2;
            w.row_bytes = k * es;
            w.bytes.resize(w.row_bytes * n_out);
            for (size_t i = 0; i < w.value.size(); ++i) {
                if (t == QType::F32) {
                    const float f = randn();
                    std::memcpy(&w.bytes[i * 4], &f, 4);
                    w.value[i] = f;
                } else if (t == QType::F16) {
                    // random finite halves of magnitude 2^-6 .. 2^2
                    const uint16_t h = static_cast<uint16_t>((randu(2) << 15) | ((9 + randu(8)) << 10) | randu(1024));
                    put16(&w.bytes[i * 2], h);
                    w.value[i] = half_value(h);
                } else {
                    const float f = randn();
                    uint32_t u;
                    std::memcpy(&u, &f, 4);
                    const uint16_t h = static_cast<uint16_t>(u >> 16);
                    put16(&w.bytes[i * 2], h);
                    const uint32_t back = static_cast<uint32_t>(h) << 16;
                    float fb;
                    std::memcpy(&fb, &back, 4);
                    w.value[i] = fb;
                }
            }
            break;
        }
        case QType::Q5_0:
        case QType::Q4_K:
        case QType::Q5_K:
        case QType::Q6_K: {
            // Random bytes with finite fp16 scales; the values from the reference dequantizer (quants_more.cpp,
            // quants_k.cpp), which the golden-vector tests hold to llama.cpp's.
            const int block = t == QType::Q5_0 ? 32 : 256;
            const size_t bb = t == QType::Q5_0 ? 22 : t == QType::Q4_K ? 144 : t == QType::Q5_K ? 176 : 210;
            w.row_bytes = k / block * bb;
            w.bytes.resize(w.row_bytes * n_out);
            for (auto& b : w.bytes) b = static_cast<uint8_t>(randu(256));
            std::vector<float> row(k);
            for (int r = 0; r < n_out; ++r) {
                uint8_t* p = w.bytes.data() + r * w.row_bytes;
                for (int b = 0; b < k / block; ++b) {
                    uint8_t* blk = p + b * bb;
                    put16(t == QType::Q6_K ? blk + 208 : blk, random_half_scale());
                    if (t == QType::Q4_K || t == QType::Q5_K) put16(blk + 2, random_half_scale());
                }
                const int64_t n = k;
                float* out = row.data();
                switch (t) {
                    case QType::Q5_0:
                        lowbit::dequantize_row_q5_0(reinterpret_cast<const block_q5_0*>(p), out, n);
                        break;
                    case QType::Q4_K:
                        lowbit::dequantize_row_q4_K(reinterpret_cast<const block_q4_K*>(p), out, n);
                        break;
                    case QType::Q5_K:
                        lowbit::dequantize_row_q5_K(reinterpret_cast<const block_q5_K*>(p), out, n);
                        break;
                    default: lowbit::dequantize_row_q6_K(reinterpret_cast<const block_q6_K*>(p), out, n);
                }
                for (int j = 0; j < k; ++j) w.value[static_cast<size_t>(r) * k + j] = row[j];
            }
            break;
        }
        default: break;
    }
    return w;
}

// Oracle activation quantizer: d = amax/127, q = roundf(x * (1/d)), s = d*sum(q), all in fp32.
void oracle_quantize(const float* x, int k, std::vector<float>& d, std::vector<int8_t>& q, std::vector<float>& s) {
    d.resize(k / 32);
    s.resize(k / 32);
    q.resize(k);
    for (int b = 0; b < k / 32; ++b) {
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
        d[b] = amax / 127.0f;
        const float id = d[b] != 0.0f ? 1.0f / d[b] : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; ++j) {
            q[b * 32 + j] = static_cast<int8_t>(std::roundf(x[b * 32 + j] * id));
            sum += q[b * 32 + j];
        }
        s[b] = d[b] * static_cast<float>(sum);
    }
}

bool is_quant(QType t) { return t != QType::F16 && t != QType::BF16 && t != QType::F32; }

const char* type_name(QType t) {
    switch (t) {
        case QType::Q4_0: return "q4_0";
        case QType::Q4_1: return "q4_1";
        case QType::Q8_0: return "q8_0";
        case QType::NF4: return "nf4";
        case QType::Q5_0: return "q5_0";
        case QType::Q4_K: return "q4_K";
        case QType::Q5_K: return "q5_K";
        case QType::Q6_K: return "q6_K";
        case QType::F16: return "f16";
        case QType::BF16: return "bf16";
        case QType::F32: return "f32";
        default: return "?";
    }
}

std::vector<float> run_matmul(QType t, const Weights& w, int n_out, int k, const std::vector<float>& x, int n_tok,
                              lowbit::ThreadPool& pool) {
    std::vector<float> y(static_cast<size_t>(n_tok) * n_out);
    std::vector<uint8_t> scratch(cpu::act_scratch_bytes(t, k, n_tok) + 1);
    cpu::matmul(t, w.bytes.data(), w.row_bytes, n_out, k, x.data(), n_tok, y.data(), scratch.data(), pool);
    return y;
}

void check_quantize_act(const cpu::Kernels& kt) {
    for (int k : {32, 64, 96, 4096, 4128}) {
        std::vector<float> x(k);
        for (auto& v : x) v = randn() * (randu(50) == 0 ? 20.0f : 1.0f);
        for (int j = 0; j < 32; ++j) x[j] = 0.0f;  // d = 0 block
        if (k >= 64) {
            const float ties[8] = {127.0f, 0.5f, -0.5f, 1.5f, -1.5f, 2.5f, -2.5f, 126.5f};
            for (int j = 0; j < 32; ++j) x[32 + j] = ties[j % 8];  // d = 1: exact .5 ties, away from zero
        }
        std::vector<block_q8_act> got(k / 32);
        kt.quantize_act(x.data(), got.data(), k);
        std::vector<float> d, s;
        std::vector<int8_t> q;
        oracle_quantize(x.data(), k, d, q, s);
        ++g_checks;
        for (int b = 0; b < k / 32; ++b) {
            if (std::memcmp(&got[b].d, &d[b], 4) != 0 || std::memcmp(&got[b].s, &s[b], 4) != 0 ||
                std::memcmp(got[b].qs, &q[b * 32], 32) != 0) {
                fail(std::string(kt.name) + " quantize_act k=" + std::to_string(k) + " block " + std::to_string(b));
                break;
            }
        }
    }
}

void check_matmul(const cpu::Kernels& kt, QType t, lowbit::ThreadPool& pool1, lowbit::ThreadPool& pool2) {
    const std::vector<int> ks = t == QType::NF4 ? std::vector<int>{64, 128, 4096, 4160}
                                                : std::vector<int>{32, 64, 96, 4096, 4128};
    for (int k : ks) {
        const std::vector<int> n_outs = k <= 128 ? std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17}
                                                 : std::vector<int>{1, 4, 5, 17};
        for (int n_out : n_outs) {
            const Weights w = make_weights(t, n_out, k);
            for (int n_tok : {1, 2, 3, 4, 5, 9, 33}) {
                if (k > 128 && n_tok > 1 && n_tok < 5) continue;
                std::vector<float> x(static_cast<size_t>(n_tok) * k);
                for (auto& v : x) v = randn() * (randu(97) == 0 ? 20.0f : 1.0f);
                cpu::set_isa(kt.isa);
                const auto y1 = run_matmul(t, w, n_out, k, x, n_tok, pool1);
                const auto y2 = run_matmul(t, w, n_out, k, x, n_tok, pool2);
                cpu::set_isa(cpu::Isa::Generic);
                const auto yg = run_matmul(t, w, n_out, k, x, n_tok, pool1);
                cpu::set_isa(kt.isa);
                const std::string where = std::string(kt.name) + " " + type_name(t) + " k=" + std::to_string(k) +
                                          " n_out=" + std::to_string(n_out) + " n_tok=" + std::to_string(n_tok);
                ++g_checks;
                if (std::memcmp(y1.data(), y2.data(), y1.size() * 4) != 0) fail(where + ": 1 vs 2 threads differ");
                for (int c = 0; c < n_tok; ++c) {
                    std::vector<double> xv(k);
                    if (is_quant(t)) {
                        std::vector<float> d, s;
                        std::vector<int8_t> q;
                        oracle_quantize(&x[static_cast<size_t>(c) * k], k, d, q, s);
                        for (int j = 0; j < k; ++j) xv[j] = static_cast<double>(q[j]) * d[j / 32];
                    } else {
                        for (int j = 0; j < k; ++j) xv[j] = x[static_cast<size_t>(c) * k + j];
                    }
                    for (int r = 0; r < n_out; ++r) {
                        double ref = 0.0, mag = 0.0;
                        for (int j = 0; j < k; ++j) {
                            const double term = w.value[static_cast<size_t>(r) * k + j] * xv[j];
                            ref += term;
                            mag += std::fabs(term);
                        }
                        const double tol = 1e-5 * mag + 1e-30;
                        const double got = y1[static_cast<size_t>(c) * n_out + r];
                        const double gen = yg[static_cast<size_t>(c) * n_out + r];
                        if (!(std::fabs(got - ref) <= tol)) {
                            fail(where + " r=" + std::to_string(r) + " c=" + std::to_string(c) + ": got " +
                                 std::to_string(got) + " want " + std::to_string(ref) + " tol " + std::to_string(tol));
                        }
                        if (!(std::fabs(got - gen) <= 2 * tol)) fail(where + ": differs from generic");
                    }
                }
            }
        }
    }
}

// Load-time panels (kernels.h): repack, multiply with the ISA's panel kernel, compare with the oracle and
// with the same ISA's row kernels; 1 and 2 threads bit-identical. Returns the number of shapes run.
int check_panels(const cpu::Kernels& kt, QType t, lowbit::ThreadPool& pool1, lowbit::ThreadPool& pool2) {
    int ran = 0;
    const bool k_quant = t == QType::Q4_K || t == QType::Q5_K || t == QType::Q6_K;
    const std::vector<int> ks = t == QType::NF4 ? std::vector<int>{64, 128, 4160}
                                : k_quant       ? std::vector<int>{256, 512, 2304}
                                                : std::vector<int>{32, 96, 4128};
    for (int k : ks) {
        for (int n_out : {16, 48}) {
            const Weights w = make_weights(t, n_out, k);
            std::vector<uint8_t> panels(cpu::panels_bytes(t, n_out, k));
            cpu::repack_panels(t, w.bytes.data(), w.row_bytes, n_out, k, panels.data(), 0, n_out / cpu::kPanelRows);
            if (cpu::panel_row_exact(t)) {  // every row comes back byte for byte (embeddings read them)
                std::vector<uint8_t> row(w.row_bytes);
                ++g_checks;
                for (int r = 0; r < n_out; ++r) {
                    cpu::panel_row(t, panels.data(), n_out, k, r, row.data());
                    if (std::memcmp(row.data(), w.bytes.data() + r * w.row_bytes, w.row_bytes) != 0) {
                        fail(std::string("panel_row ") + type_name(t) + " k=" + std::to_string(k) + " row " +
                             std::to_string(r) + " differs from the original row");
                        break;
                    }
                }
            }
            for (int n_tok : {1, 2, 3, 4, 5, 9, 26, 33}) {
                std::vector<float> x(static_cast<size_t>(n_tok) * k);
                for (auto& v : x) v = randn() * (randu(97) == 0 ? 20.0f : 1.0f);
                cpu::set_isa(kt.isa);
                std::vector<float> y1(static_cast<size_t>(n_tok) * n_out), y2(y1.size());
                std::vector<uint8_t> scratch(cpu::act_scratch_bytes(t, k, n_tok) + 1);
                if (!cpu::matmul_panels(t, panels.data(), n_out, k, x.data(), n_tok, y1.data(), scratch.data(), pool1)) {
                    return ran;  // this ISA has no panel kernel for t
                }
                cpu::matmul_panels(t, panels.data(), n_out, k, x.data(), n_tok, y2.data(), scratch.data(), pool2);
                const auto yr = run_matmul(t, w, n_out, k, x, n_tok, pool1);
                ++ran;
                ++g_checks;
                const std::string where = std::string(kt.name) + " panels " + type_name(t) + " k=" + std::to_string(k) +
                                          " n_out=" + std::to_string(n_out) + " n_tok=" + std::to_string(n_tok);
                if (std::memcmp(y1.data(), y2.data(), y1.size() * 4) != 0) fail(where + ": 1 vs 2 threads differ");
                for (int c = 0; c < n_tok; ++c) {
                    std::vector<float> d, s;
                    std::vector<int8_t> q;
                    oracle_quantize(&x[static_cast<size_t>(c) * k], k, d, q, s);
                    for (int r = 0; r < n_out; ++r) {
                        double ref = 0.0, mag = 0.0;
                        for (int j = 0; j < k; ++j) {
                            const double term = w.value[static_cast<size_t>(r) * k + j] * static_cast<double>(q[j]) * d[j / 32];
                            ref += term;
                            mag += std::fabs(term);
                        }
                        const double tol = 1e-5 * mag + 1e-30;
                        const double got = y1[static_cast<size_t>(c) * n_out + r];
                        if (!(std::fabs(got - ref) <= tol)) {
                            fail(where + " r=" + std::to_string(r) + " c=" + std::to_string(c) + ": got " +
                                 std::to_string(got) + " want " + std::to_string(ref));
                        }
                        if (!(std::fabs(got - yr[static_cast<size_t>(c) * n_out + r]) <= 2 * tol)) {
                            fail(where + ": differs from the row kernels");
                        }
                    }
                }
            }
        }
    }
    return ran;
}

void check_layer_ops(const cpu::Kernels& kt) {
    for (int n : {1, 7, 32, 100, 2048, 5632}) {
        std::vector<float> x(n), g(n), gate(n), out(n);
        for (int i = 0; i < n; ++i) {
            x[i] = randn() * 3;
            g[i] = randn();
            gate[i] = randn() * 6;
        }
        const std::string where = std::string(kt.name) + " n=" + std::to_string(n);
        ++g_checks;
        double ss = 0, dot = 0, mag = 0;
        for (int i = 0; i < n; ++i) {
            ss += static_cast<double>(x[i]) * x[i];
            dot += static_cast<double>(x[i]) * g[i];
            mag += std::fabs(static_cast<double>(x[i]) * g[i]);
        }
        const double scale = 1.0 / std::sqrt(ss / n + 1e-5);
        kt.rmsnorm(out.data(), x.data(), g.data(), n, 1e-5f);
        for (int i = 0; i < n; ++i) {
            const double ref = x[i] * scale * g[i];
            if (!(std::fabs(out[i] - ref) <= 1e-5 * std::fabs(ref) + 1e-6)) {
                fail(where + " rmsnorm");
                break;
            }
        }
        kt.silu_mul(out.data(), gate.data(), x.data(), n);
        for (int i = 0; i < n; ++i) {
            const double ref = gate[i] / (1.0 + std::exp(-static_cast<double>(gate[i]))) * x[i];
            if (!(std::fabs(out[i] - ref) <= 1e-5 * std::fabs(ref) + 1e-6)) {
                fail(where + " silu_mul");
                break;
            }
        }
        if (!(std::fabs(kt.dot_f32_f32(x.data(), g.data(), n) - dot) <= 1e-5 * mag + 1e-30)) fail(where + " dot_f32_f32");
        out = x;
        kt.axpy_f32(out.data(), 0.37f, g.data(), n);
        for (int i = 0; i < n; ++i) {
            const double ref = static_cast<double>(x[i]) + static_cast<double>(0.37f) * g[i];
            if (!(std::fabs(out[i] - ref) <= 1e-6 * std::fabs(ref) + 1e-6)) {
                fail(where + " axpy_f32");
                break;
            }
        }
    }
}

}  // namespace

int main() {
    lowbit::ThreadPool pool1(1), pool2(2);
    std::printf("compiled ISAs: %s\n", cpu::compiled_isas());
    int n_isas = 0;
    for (cpu::Isa isa : {cpu::Isa::Generic, cpu::Isa::AVX2, cpu::Isa::AVX512, cpu::Isa::NEON}) {
        const cpu::Kernels* kt = cpu::kernels_for(isa);
        if (kt == nullptr) continue;
        ++n_isas;
        std::printf("testing %s\n", kt->name);
        check_quantize_act(*kt);
        for (QType t : {QType::Q4_0, QType::Q4_1, QType::Q8_0, QType::NF4, QType::F16, QType::BF16, QType::F32}) {
            check_matmul(*kt, t, pool1, pool2);
        }
        std::string with_panels;
        for (QType t : {QType::Q4_0, QType::Q4_1, QType::Q8_0, QType::NF4, QType::Q5_0, QType::Q4_K, QType::Q5_K,
                        QType::Q6_K}) {
            if (check_panels(*kt, t, pool1, pool2) > 0) with_panels += std::string(" ") + type_name(t);
        }
        std::printf("  panel kernels:%s\n", with_panels.empty() ? " none" : with_panels.c_str());
        check_layer_ops(*kt);
    }
    cpu::reset_isa();
    bool threw = false;
    try {
        std::vector<float> x(48), y(1);
        std::vector<uint8_t> w(18), scratch(cpu::act_scratch_bytes(QType::Q4_0, 48, 1) + 64);
        cpu::matmul(QType::Q4_0, w.data(), 18, 1, 48, x.data(), 1, y.data(), scratch.data(), pool1);
    } catch (const lowbit::Error&) {
        threw = true;
    }
    ++g_checks;
    if (!threw) fail("matmul accepted k = 48 for Q4_0");
    std::printf("%d ISAs, %d checks, %d failures\n", n_isas, g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
