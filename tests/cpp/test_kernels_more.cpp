// C++ test of the dot-tile kernels of Q5_0, Q5_1, IQ4_NL, IQ4_XS, FP4 and Q2_K..Q6_K (cpu/kernels_more.h): the
// generic kernel against a double-precision oracle built from the reference dequantizers, and every SIMD
// kernel this CPU can run against the generic one, on random valid blocks and odd tile shapes and strides
// (on AArch64 both NEON files: dot_<t>_neon always, dot_<t>_neondot where the CPU has dotprod).
// Exit status 0 = all passed.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"
#include "lowbit/kernels.h"
#include "lowbit/types.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

namespace cpu = lowbit::cpu;

namespace {

int g_failures = 0;
long g_checks = 0;

void fail(const std::string& what) {
    if (++g_failures <= 20) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

std::mt19937_64 g_rng(20240611);

uint32_t randu(uint32_t n) { return static_cast<uint32_t>(g_rng() % n); }
float randn() {
    static std::normal_distribution<float> nd(0.0f, 1.0f);
    return nd(g_rng);
}
// A random fp16 scale of magnitude 1e-3 .. 1e-1 and random sign (finite, so every value is finite).
uint16_t random_half_scale() {
    const float mag = std::exp(std::log(1e-3f) + (std::log(1e-1f) - std::log(1e-3f)) * (randu(1 << 20) / float(1 << 20)));
    return lowbit::fp32_to_fp16(randu(2) ? mag : -mag);
}

// One weight type: block geometry, how to make a block valid after filling it with random bytes, the
// float oracle of a row, and its kernels.
struct TypeCase {
    const char* name;
    int block_elems;
    size_t block_bytes;
    void (*fix_block)(uint8_t* block);  // random bytes -> a valid block (finite scales)
    void (*dequant)(const uint8_t* row, float* y, int64_t k);
    cpu::DotTileFn generic;
    cpu::DotTileFn avx2;
    cpu::DotTileFn avx512vnni;
    cpu::DotTileFn neon;
    cpu::DotTileFn neondot;
    lowbit::QType qtype;
};

template <class Block>
Block* as(uint8_t* p) {
    return reinterpret_cast<Block*>(p);
}
template <class Block>
const Block* as(const uint8_t* p) {
    return reinterpret_cast<const Block*>(p);
}

// FP4's oracle is the documented runtime approximation (kernels_more.h, kFP4Int8): int8 codes, scale absmax / 127.
void fp4_runtime_values(const uint8_t* row, float* y, int64_t k) {
    for (int64_t b = 0; b < k / QK_FP4; ++b) {
        const block_fp4& blk = as<block_fp4>(row)[b];
        const float scale = blk.absmax * (1.0f / 127.0f);
        for (int j = 0; j < 32; ++j) {
            y[64 * b + 2 * j] = cpu::kFP4Int8[blk.qs[j] >> 4] * scale;
            y[64 * b + 2 * j + 1] = cpu::kFP4Int8[blk.qs[j] & 0x0f] * scale;
        }
    }
}

#ifdef LOWBIT_HAVE_AVX2
#define LOWBIT_AVX2_FN(t) cpu::dot_##t##_avx2
#else
#define LOWBIT_AVX2_FN(t) nullptr
#endif
#ifdef LOWBIT_HAVE_AVX512
#define LOWBIT_AVX512VNNI_FN(t) cpu::dot_##t##_avx512vnni
#else
#define LOWBIT_AVX512VNNI_FN(t) nullptr
#endif
#ifdef LOWBIT_HAVE_NEON
#define LOWBIT_NEON_FNS(t) cpu::dot_##t##_neon, cpu::dot_##t##_neondot
#else
#define LOWBIT_NEON_FNS(t) nullptr, nullptr
#endif

const TypeCase kTypes[] = {
    {"q5_0", QK5_0, sizeof(block_q5_0), [](uint8_t* p) { as<block_q5_0>(p)->d = random_half_scale(); },
     [](const uint8_t* r, float* y, int64_t k) { lowbit::dequantize_row_q5_0(as<block_q5_0>(r), y, k); },
     cpu::dot_q5_0_generic, LOWBIT_AVX2_FN(q5_0), LOWBIT_AVX512VNNI_FN(q5_0),
     LOWBIT_NEON_FNS(q5_0), lowbit::QType::Q5_0},
    {"q5_1", QK5_1, sizeof(block_q5_1),
     [](uint8_t* p) {
         as<block_q5_1>(p)->d = random_half_scale();
         as<block_q5_1>(p)->m = random_half_scale();
     },
     [](const uint8_t* r, float* y, int64_t k) { lowbit::dequantize_row_q5_1(as<block_q5_1>(r), y, k); },
     cpu::dot_q5_1_generic, LOWBIT_AVX2_FN(q5_1), LOWBIT_AVX512VNNI_FN(q5_1),
     LOWBIT_NEON_FNS(q5_1), lowbit::QType::Q5_1},
    {"iq4_nl", QK4_NL, sizeof(block_iq4_nl), [](uint8_t* p) { as<block_iq4_nl>(p)->d = random_half_scale(); },
     [](const uint8_t* r, float* y, int64_t k) { lowbit::dequantize_row_iq4_nl(as<block_iq4_nl>(r), y, k); },
     cpu::dot_iq4_nl_generic, LOWBIT_AVX2_FN(iq4_nl), LOWBIT_AVX512VNNI_FN(iq4_nl),
     LOWBIT_NEON_FNS(iq4_nl), lowbit::QType::IQ4_NL},
    {"iq4_xs", QK_K, sizeof(block_iq4_xs), [](uint8_t* p) { as<block_iq4_xs>(p)->d = random_half_scale(); },
     [](const uint8_t* r, float* y, int64_t k) { lowbit::dequantize_row_iq4_xs(as<block_iq4_xs>(r), y, k); },
     cpu::dot_iq4_xs_generic, LOWBIT_AVX2_FN(iq4_xs), LOWBIT_AVX512VNNI_FN(iq4_xs),
     LOWBIT_NEON_FNS(iq4_xs), lowbit::QType::IQ4_XS},
    {"fp4", QK_FP4, sizeof(block_fp4),
     [](uint8_t* p) {
         const float absmax = std::fabs(randn()) * 0.1f;
         std::memcpy(p, &absmax, sizeof(float));
     },
     fp4_runtime_values, cpu::dot_fp4_generic, LOWBIT_AVX2_FN(fp4), LOWBIT_AVX512VNNI_FN(fp4),
     LOWBIT_NEON_FNS(fp4), lowbit::QType::FP4},
    {"q2_K", QK_K, sizeof(block_q2_K),
     [](uint8_t* p) {
         as<block_q2_K>(p)->d = random_half_scale();
         as<block_q2_K>(p)->dmin = random_half_scale();
     },
     [](const uint8_t* r, float* y, int64_t k) { lowbit::dequantize_row_q2_K(as<block_q2_K>(r), y, k); },
     cpu::dot_q2_K_generic, LOWBIT_AVX2_FN(q2_K), LOWBIT_AVX512VNNI_FN(q2_K),
     LOWBIT_NEON_FNS(q2_K), lowbit::QType::Q2_K},
    {"q3_K", QK_K, sizeof(block_q3_K), [](uint8_t* p) { as<block_q3_K>(p)->d = random_half_scale(); },
     [](const uint8_t* r, float* y, int64_t k) { lowbit::dequantize_row_q3_K(as<block_q3_K>(r), y, k); },
     cpu::dot_q3_K_generic, LOWBIT_AVX2_FN(q3_K), LOWBIT_AVX512VNNI_FN(q3_K),
     LOWBIT_NEON_FNS(q3_K), lowbit::QType::Q3_K},
    {"q4_K", QK_K, sizeof(block_q4_K),
     [](uint8_t* p) {
         as<block_q4_K>(p)->d = random_half_scale();
         as<block_q4_K>(p)->dmin = random_half_scale();
     },
     [](const uint8_t* r, float* y, int64_t k) { lowbit::dequantize_row_q4_K(as<block_q4_K>(r), y, k); },
     cpu::dot_q4_K_generic, LOWBIT_AVX2_FN(q4_K), LOWBIT_AVX512VNNI_FN(q4_K),
     LOWBIT_NEON_FNS(q4_K), lowbit::QType::Q4_K},
    {"q5_K", QK_K, sizeof(block_q5_K),
     [](uint8_t* p) {
         as<block_q5_K>(p)->d = random_half_scale();
         as<block_q5_K>(p)->dmin = random_half_scale();
     },
     [](const uint8_t* r, float* y, int64_t k) { lowbit::dequantize_row_q5_K(as<block_q5_K>(r), y, k); },
     cpu::dot_q5_K_generic, LOWBIT_AVX2_FN(q5_K), LOWBIT_AVX512VNNI_FN(q5_K),
     LOWBIT_NEON_FNS(q5_K), lowbit::QType::Q5_K},
    {"q6_K", QK_K, sizeof(block_q6_K), [](uint8_t* p) { as<block_q6_K>(p)->d = random_half_scale(); },
     [](const uint8_t* r, float* y, int64_t k) { lowbit::dequantize_row_q6_K(as<block_q6_K>(r), y, k); },
     cpu::dot_q6_K_generic, LOWBIT_AVX2_FN(q6_K), LOWBIT_AVX512VNNI_FN(q6_K),
     LOWBIT_NEON_FNS(q6_K), lowbit::QType::Q6_K},
};

#ifdef LOWBIT_HAVE_NEON
// Whether the CPU has the AArch64 dotprod extension (sdot), as cpu/dispatch.cpp asks the kernel.
bool cpu_has_dotprod() {
#if defined(__aarch64__) && defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return false;
#endif
}
#endif

// The SIMD kernels of a type that this build has and this CPU runs.
struct Simd {
    const char* isa;
    cpu::DotTileFn fn;
};
std::vector<Simd> runnable_simd(const TypeCase& t) {
    std::vector<Simd> out;
    if (t.avx2 && cpu::kernels_for(cpu::Isa::AVX2)) out.push_back({"avx2", t.avx2});
#if defined(__x86_64__) || defined(__i386__)
    if (t.avx512vnni && cpu::kernels_for(cpu::Isa::AVX512) && __builtin_cpu_supports("avx512vnni")) {
        out.push_back({"avx512vnni", t.avx512vnni});
    }
#endif
#ifdef LOWBIT_HAVE_NEON
    if (t.neon && cpu::kernels_for(cpu::Isa::NEON)) out.push_back({"neon", t.neon});
    if (t.neondot && cpu::kernels_for(cpu::Isa::NEON) && cpu_has_dotprod()) out.push_back({"neondot", t.neondot});
#endif
    return out;
}

#ifdef LOWBIT_HAVE_NEON
// The NEON table the dispatcher hands out holds the kernels of the file built for this CPU: dot_<t>_neondot
// with dotprod, dot_<t>_neon (compiled without it) otherwise.
void check_neon_table() {
    const cpu::Kernels* kt = cpu::kernels_for(cpu::Isa::NEON);
    if (kt == nullptr) return;
    const bool dotprod = cpu_has_dotprod();
    for (const TypeCase& t : kTypes) {
        ++g_checks;
        if (kt->at(t.qtype).dot != (dotprod ? t.neondot : t.neon)) {
            fail(std::string(t.name) + ": the NEON table does not hold dot_" + t.name +
                 (dotprod ? "_neondot" : "_neon"));
        }
    }
    std::printf("neon table: %s kernels\n", dotprod ? "dotprod" : "widening-multiply");
}
#endif

std::string shape(const TypeCase& t, int64_t k, int nr, int nc, int r, int c) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s k=%lld tile %dx%d (row %d, col %d)", t.name, static_cast<long long>(k), nr, nc, r, c);
    return buf;
}

// One random tile: nr rows (w_stride apart, stride > row bytes when pad > 0) against nc activation columns.
void check_tile(const TypeCase& t, int64_t k, int nr, int nc) {
    const size_t row_bytes = static_cast<size_t>(k / t.block_elems) * t.block_bytes;
    const size_t w_stride = row_bytes + t.block_bytes * randu(3);  // whole blocks keep the blocks aligned
    std::vector<uint8_t> w(w_stride * nr);
    for (auto& byte : w) byte = static_cast<uint8_t>(randu(256));
    std::vector<std::vector<float>> wv(nr, std::vector<float>(k));
    for (int r = 0; r < nr; ++r) {
        uint8_t* row = w.data() + r * w_stride;
        for (int64_t b = 0; b < k / t.block_elems; ++b) t.fix_block(row + b * t.block_bytes);
        t.dequant(row, wv[r].data(), k);
    }

    const int64_t nb = k / 32;
    const int64_t x_blocks = nb + randu(3);  // column stride larger than the column
    std::vector<block_q8_act> x(x_blocks * nc);
    std::vector<float> xf(k);
    for (int c = 0; c < nc; ++c) {
        const float scale = std::ldexp(1.0f, static_cast<int>(randu(9)) - 4);
        for (auto& v : xf) v = randn() * scale;
        if (randu(4) == 0) std::fill(xf.begin(), xf.begin() + 32, 0.0f);  // a block with d = 0
        for (int64_t b = 0; b < nb; ++b) cpu::detail::quantize_act_block_ref(xf.data() + 32 * b, &x[c * x_blocks + b]);
    }
    const size_t x_stride = x_blocks * sizeof(block_q8_act);

    const size_t y_stride = cpu::kTileRows + randu(3);
    std::vector<float> y_gen(y_stride * nc, NAN);
    t.generic(k, w.data(), w_stride, nr, x.data(), x_stride, nc, y_gen.data(), y_stride);
    std::vector<std::vector<float>> y_simd;
    const std::vector<Simd> simd = runnable_simd(t);
    for (const Simd& s : simd) {
        y_simd.emplace_back(y_stride * nc, NAN);
        s.fn(k, w.data(), w_stride, nr, x.data(), x_stride, nc, y_simd.back().data(), y_stride);
    }

    for (int r = 0; r < nr; ++r) {
        for (int c = 0; c < nc; ++c) {
            double oracle = 0.0, magnitude = 0.0;
            for (int64_t j = 0; j < k; ++j) {
                const block_q8_act& xb = x[c * x_blocks + j / 32];
                const double term = static_cast<double>(wv[r][j]) * (static_cast<double>(xb.d) * xb.qs[j % 32]);
                oracle += term;
                magnitude += std::fabs(term);
            }
            // float accumulation: relative to the sum of |w * x| terms (spec/quant-types.md#runtime)
            const double tol = 1e-5 * magnitude + 1e-30;
            const double g = y_gen[c * y_stride + r];
            ++g_checks;
            if (!(std::fabs(g - oracle) <= tol)) {
                fail(shape(t, k, nr, nc, r, c) + ": generic " + std::to_string(g) + " vs oracle " + std::to_string(oracle));
            }
            for (size_t i = 0; i < simd.size(); ++i) {
                const double v = y_simd[i][c * y_stride + r];
                ++g_checks;
                if (!(std::fabs(v - g) <= tol)) {
                    fail(shape(t, k, nr, nc, r, c) + ": " + simd[i].isa + " " + std::to_string(v) + " vs generic " +
                         std::to_string(g));
                }
            }
        }
    }
    // Outputs outside the tile stay untouched.
    for (int c = 0; c < nc; ++c) {
        for (size_t r = nr; r < y_stride; ++r) {
            if (!std::isnan(y_gen[c * y_stride + r])) fail(std::string(t.name) + ": generic wrote outside its tile");
            for (size_t i = 0; i < simd.size(); ++i) {
                if (!std::isnan(y_simd[i][c * y_stride + r])) fail(std::string(t.name) + ": " + simd[i].isa + " wrote outside its tile");
            }
        }
    }
}

void check_fp4_table() {
    for (int i = 0; i < 16; ++i) {
        const int expect = static_cast<int>(std::round(static_cast<double>(lowbit::kFP4Codes[i]) * 127.0));
        ++g_checks;
        if (cpu::kFP4Int8[i] != expect) fail("kFP4Int8[" + std::to_string(i) + "] is not round(kFP4Codes * 127)");
    }
}

}  // namespace

int main() {
    check_fp4_table();
#ifdef LOWBIT_HAVE_NEON
    check_neon_table();
#endif
    for (const TypeCase& t : kTypes) {
        std::vector<int64_t> ks;
        if (t.block_elems == QK_K) {
            ks = {256, 512, 2304};  // 2304: nine super-blocks, an odd count
        } else if (t.block_elems == 64) {
            ks = {64, 128, 192, 2304};
        } else {
            ks = {32, 64, 96, 256, 2304};
        }
        std::string isas = "generic";
        for (const Simd& s : runnable_simd(t)) isas += std::string(", ") + s.isa;
        for (int64_t k : ks) {
            for (int nr = 1; nr <= cpu::kTileRows; ++nr) {
                for (int nc = 1; nc <= cpu::kTileCols; ++nc) {
                    for (int rep = 0; rep < (k > 512 ? 1 : 3); ++rep) check_tile(t, k, nr, nc);
                }
            }
        }
        std::printf("%-7s checked: %s\n", t.name, isas.c_str());
    }
    std::printf("%ld checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
