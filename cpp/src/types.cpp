// Tensor types: the traits table for every ggml/lowbit id, fp16/bf16 conversion, and the threaded
// quantize()/dequantize() entry points that pick the scalar or SIMD row quantizers.
#include "lowbit/types.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <vector>

namespace lowbit {

namespace {

// Block sizes and bytes per block as llama.cpp's gguf-py GGML_QUANT_SIZES
// (spec/quant-types.md#type-table); `supported` only for the types lowbit computes with.
constexpr TypeTraits kTypes[] = {
    {0, "F32", 1, 4, false, true, false},
    {1, "F16", 1, 2, false, true, false},
    {2, "Q4_0", 32, 18, true, true, false},
    {3, "Q4_1", 32, 20, true, true, false},
    {6, "Q5_0", 32, 22, true, false, false},
    {7, "Q5_1", 32, 24, true, false, false},
    {8, "Q8_0", 32, 34, true, true, false},
    // Q8_1 never appears in files; ggml-common.h's block is 36 bytes (gguf-py's 40 is stale).
    {9, "Q8_1", 32, 36, true, false, false},
    {10, "Q2_K", 256, 84, true, false, false},
    {11, "Q3_K", 256, 110, true, false, false},
    {12, "Q4_K", 256, 144, true, false, false},
    {13, "Q5_K", 256, 176, true, false, false},
    {14, "Q6_K", 256, 210, true, false, false},
    {15, "Q8_K", 256, 292, true, false, false},
    {16, "IQ2_XXS", 256, 66, true, false, false},
    {17, "IQ2_XS", 256, 74, true, false, false},
    {18, "IQ3_XXS", 256, 98, true, false, false},
    {19, "IQ1_S", 256, 50, true, false, false},
    {20, "IQ4_NL", 32, 18, true, false, false},
    {21, "IQ3_S", 256, 110, true, false, false},
    {22, "IQ2_S", 256, 82, true, false, false},
    {23, "IQ4_XS", 256, 136, true, false, false},
    {24, "I8", 1, 1, false, false, false},
    {25, "I16", 1, 2, false, false, false},
    {26, "I32", 1, 4, false, false, false},
    {27, "I64", 1, 8, false, false, false},
    {28, "F64", 1, 8, false, false, false},
    {29, "IQ1_M", 256, 56, true, false, false},
    {30, "BF16", 1, 2, false, true, false},
    {34, "TQ1_0", 256, 54, true, false, false},
    {35, "TQ2_0", 256, 66, true, false, false},
    {39, "MXFP4", 32, 17, true, false, false},
    {40, "NVFP4", 64, 36, true, false, false},
    {41, "Q1_0", 128, 18, true, false, false},
    {1024, "NF4", QK_NF4, sizeof(block_nf4), true, true, false},
    // Per-block part only: the 4-bit codes (32 bytes) and the 8-bit absmax code; see nf4_dq_nbytes().
    {1025, "NF4_DQ", QK_NF4, QK_NF4 / 2 + 1, true, true, true},
};

bool is_block_type(QType t) {
    return t == QType::Q4_0 || t == QType::Q4_1 || t == QType::Q8_0 || t == QType::NF4;
}

// ---- SIMD quantizer selection ------------------------------------------------------------------

bool cpu_runs(QuantIsa isa) {
    switch (isa) {
        case QuantIsa::Generic:
            return true;
#if defined(LOWBIT_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
        case QuantIsa::AVX2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                   __builtin_cpu_supports("f16c");
#endif
#if defined(LOWBIT_HAVE_AVX512) && (defined(__x86_64__) || defined(__i386__))
        case QuantIsa::AVX512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
#endif
        default:
            return false;
    }
}

QuantIsa best_isa() {
    const char* env = std::getenv("LOWBIT_QUANT_ISA");
    if (env != nullptr && *env != '\0') {
        std::string s(env);
        QuantIsa want = s == "generic"  ? QuantIsa::Generic
                        : s == "avx2"   ? QuantIsa::AVX2
                        : s == "avx512" ? QuantIsa::AVX512
                                        : QuantIsa::Auto;
        if (want == QuantIsa::Auto)
            throw Error("LOWBIT_QUANT_ISA='" + s + "' is not one of generic, avx2, avx512; unset it or fix it");
        if (!cpu_runs(want))
            throw Error(std::string("LOWBIT_QUANT_ISA=") + s + " but this CPU or build cannot run it; unset it");
        return want;
    }
    if (cpu_runs(QuantIsa::AVX512)) return QuantIsa::AVX512;
    if (cpu_runs(QuantIsa::AVX2)) return QuantIsa::AVX2;
    return QuantIsa::Generic;
}

std::atomic<int> g_forced_isa{static_cast<int>(QuantIsa::Auto)};

QuantIsa current_isa() {
    int forced = g_forced_isa.load(std::memory_order_relaxed);
    if (forced != static_cast<int>(QuantIsa::Auto)) return static_cast<QuantIsa>(forced);
    static const QuantIsa detected = best_isa();
    return detected;
}

// Quantize a contiguous run of whole blocks (nblk blocks) of a block type with the chosen ISA.
void quantize_blocks(QType t, QuantIsa isa, const float* x, void* dst, int64_t nblk) {
    switch (t) {
        case QType::Q4_0: {
            auto* y = static_cast<block_q4_0*>(dst);
            if (isa == QuantIsa::AVX512) return quantize_row_q4_0_avx512(x, y, nblk * QK4_0);
            if (isa == QuantIsa::AVX2) return quantize_row_q4_0_avx2(x, y, nblk * QK4_0);
            return quantize_row_q4_0_ref(x, y, nblk * QK4_0);
        }
        case QType::Q4_1: {
            auto* y = static_cast<block_q4_1*>(dst);
            if (isa == QuantIsa::AVX512) return quantize_row_q4_1_avx512(x, y, nblk * QK4_1);
            if (isa == QuantIsa::AVX2) return quantize_row_q4_1_avx2(x, y, nblk * QK4_1);
            return quantize_row_q4_1_ref(x, y, nblk * QK4_1);
        }
        case QType::Q8_0: {
            auto* y = static_cast<block_q8_0*>(dst);
            if (isa == QuantIsa::AVX512) return quantize_row_q8_0_avx512(x, y, nblk * QK8_0);
            if (isa == QuantIsa::AVX2) return quantize_row_q8_0_avx2(x, y, nblk * QK8_0);
            return quantize_row_q8_0_ref(x, y, nblk * QK8_0);
        }
        case QType::NF4:
            return quantize_row_nf4_ref(x, static_cast<block_nf4*>(dst), nblk * QK_NF4);
        default:
            throw Error("internal: quantize_blocks called for a non-block type");
    }
}

void dequantize_blocks(QType t, const void* src, float* y, int64_t nblk) {
    switch (t) {
        case QType::Q4_0:
            return dequantize_row_q4_0(static_cast<const block_q4_0*>(src), y, nblk * QK4_0);
        case QType::Q4_1:
            return dequantize_row_q4_1(static_cast<const block_q4_1*>(src), y, nblk * QK4_1);
        case QType::Q8_0:
            return dequantize_row_q8_0(static_cast<const block_q8_0*>(src), y, nblk * QK8_0);
        case QType::NF4:
            return dequantize_row_nf4(static_cast<const block_nf4*>(src), y, nblk * QK_NF4);
        default:
            throw Error("internal: dequantize_blocks called for a non-block type");
    }
}

// Inputs below this many elements are converted on the calling thread: thread start-up would cost more.
constexpr int64_t kParallelMinElements = 256 * 1024;

// Split [0, n_units) into n contiguous chunks and run fn(begin, end) on std::threads (the caller runs
// chunk 0). Results do not depend on the split because every unit is independent.
template <typename Fn>
void parallel_units(int64_t n_units, int64_t elems_per_unit, int n_threads, Fn fn) {
    int nth = n_threads > 0 ? n_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    if (n_units * elems_per_unit < kParallelMinElements) nth = 1;
    nth = static_cast<int>(std::min<int64_t>(nth, n_units));
    if (nth <= 1) {
        if (n_units > 0) fn(int64_t{0}, n_units);
        return;
    }
    std::vector<std::thread> workers;
    std::vector<std::exception_ptr> errors(nth);
    auto chunk = [&](int i) {
        int64_t b = n_units * i / nth, e = n_units * (i + 1) / nth;
        try {
            fn(b, e);
        } catch (...) {
            errors[i] = std::current_exception();
        }
    };
    workers.reserve(nth - 1);
    for (int i = 1; i < nth; ++i) workers.emplace_back(chunk, i);
    chunk(0);
    for (auto& w : workers) w.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace

// ---- traits -------------------------------------------------------------------------------------

const TypeTraits* type_traits(uint32_t id) {
    for (const auto& t : kTypes)
        if (t.id == id) return &t;
    return nullptr;
}

const TypeTraits& supported_traits(uint32_t id) {
    const TypeTraits* t = type_traits(id);
    if (t == nullptr)
        throw Error("unknown tensor type id " + std::to_string(id) +
                    "; lowbit supports F32, F16, BF16, Q8_0, Q4_0, Q4_1, NF4, NF4_DQ");
    if (!t->supported)
        throw Error(std::string("tensor type ") + t->name + " (id " + std::to_string(id) +
                    ") is known but lowbit cannot compute with it; requantize to Q8_0, Q4_0, Q4_1 or NF4");
    return *t;
}

size_t row_size(QType t, int64_t n) {
    const TypeTraits& tt = supported_traits(t);
    if (tt.tensor_level)
        throw Error(std::string(tt.name) + " has a tensor-level layout with no fixed row size; use tensor_nbytes");
    if (n < 0 || n % tt.block_size != 0)
        throw Error(std::string("row of ") + std::to_string(n) + " elements is not a multiple of " + tt.name +
                    "'s block size " + std::to_string(tt.block_size));
    uint64_t nbytes = 0;
    if (!tensor_nbytes(tt.id, static_cast<uint64_t>(n), &nbytes))
        throw Error("row of " + std::to_string(n) + " elements is too large");
    return static_cast<size_t>(nbytes);
}

bool tensor_nbytes(uint32_t type_id, uint64_t n_elements, uint64_t* nbytes) {
    const TypeTraits* t = type_traits(type_id);
    if (t == nullptr || nbytes == nullptr) return false;
    const uint64_t limit = (uint64_t{1} << 63) - 1;
    const uint64_t bs = static_cast<uint64_t>(t->block_size);
    if (n_elements % bs != 0) return false;
    const uint64_t nb = n_elements / bs;
    if (t->type_size != 0 && nb > limit / t->type_size) return false;
    uint64_t total = nb * t->type_size;
    if (t->tensor_level) {
        // NF4_DQ: + float offset + one float nested absmax per 256 blocks.
        const uint64_t ng = nb / 256 + (nb % 256 != 0);
        const uint64_t extra = 4 + 4 * ng;
        if (total > limit - extra) return false;
        total += extra;
    }
    *nbytes = total;
    return true;
}

// ---- fp16 / bf16 ----------------------------------------------------------------------------------

float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f;
    const uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        // zero or subnormal: mant * 2^-24, exact in fp32
        float f = std::ldexp(static_cast<float>(mant), -24);
        std::memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

uint16_t fp32_to_fp16(float f) {
    // IEEE round to nearest even, as F16C (ggml) and numpy's float16 cast; see spec/quant-types.md#fp16.
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00 | static_cast<uint16_t>((ax >> 13) & 0x3ff);  // quiet NaN
    if (ax >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to infinity (65504 is odd)
    if (ax < 0x38800000u) {
        // Below 2^-14: a half subnormal. Adding 0.5 puts the fp32 ulp (2^-24) on the half subnormal unit,
        // so the FPU's own round-to-nearest-even does the rounding.
        float a;
        std::memcpy(&a, &ax, 4);
        float s = a + 0.5f;
        uint32_t sb;
        std::memcpy(&sb, &s, 4);
        return sign | static_cast<uint16_t>(sb - 0x3f000000u);
    }
    const uint32_t odd = (ax >> 13) & 1;
    ax += 0xc8000fffu + odd;  // rebias the exponent (-112 << 23) and round half to even
    return sign | static_cast<uint16_t>(ax >> 13);
}

uint16_t fp32_to_bf16(float f) {
    // gguf-py / ggml: NaN forced quiet (keeping its top bits), then round to nearest even.
    uint32_t n;
    std::memcpy(&n, &f, 4);
    if ((n & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(((n & 0xffff0000u) | (64u << 16)) >> 16);
    return static_cast<uint16_t>((n + 0x7fffu + ((n >> 16) & 1)) >> 16);
}

// ---- SIMD selection ------------------------------------------------------------------------------

void set_quantize_isa(QuantIsa isa) {
    if (isa != QuantIsa::Auto && !cpu_runs(isa))
        throw Error(std::string("quantizer ISA ") + quantize_isa_name(isa) +
                    " is not available on this CPU or in this build; use 'generic' or 'auto'");
    g_forced_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

QuantIsa active_quantize_isa() { return current_isa(); }

const char* quantize_isa_name(QuantIsa isa) {
    switch (isa) {
        case QuantIsa::Auto: return "auto";
        case QuantIsa::Generic: return "generic";
        case QuantIsa::AVX2: return "avx2";
        case QuantIsa::AVX512: return "avx512";
    }
    return "unknown";
}

// ---- quantize / dequantize -------------------------------------------------------------------------

void quantize(QType t, const float* src, void* dst, int64_t n_rows, int64_t n_per_row, int n_threads) {
    const TypeTraits& tt = supported_traits(t);
    if (n_rows < 0 || n_per_row < 0) throw Error("quantize: negative shape");
    if (n_per_row % tt.block_size != 0)
        throw Error("quantize: row length " + std::to_string(n_per_row) + " is not a multiple of " + tt.name +
                    "'s block size " + std::to_string(tt.block_size) + "; pad the last axis");
    if (n_rows != 0 && n_per_row > INT64_MAX / n_rows) throw Error("quantize: tensor too large");
    const int64_t n = n_rows * n_per_row;
    // Rows are contiguous and whole blocks, so the tensor is one flat run of n / block_size blocks.
    switch (t) {
        case QType::F32: {
            auto* y = static_cast<float*>(dst);
            parallel_units(n, 1, n_threads, [&](int64_t b, int64_t e) { std::memcpy(y + b, src + b, (e - b) * 4); });
            return;
        }
        case QType::F16: {
            auto* y = static_cast<uint16_t*>(dst);
            parallel_units(n, 1, n_threads, [&](int64_t b, int64_t e) {
                for (int64_t i = b; i < e; ++i) y[i] = fp32_to_fp16(src[i]);
            });
            return;
        }
        case QType::BF16: {
            auto* y = static_cast<uint16_t*>(dst);
            parallel_units(n, 1, n_threads, [&](int64_t b, int64_t e) {
                for (int64_t i = b; i < e; ++i) y[i] = fp32_to_bf16(src[i]);
            });
            return;
        }
        case QType::NF4_DQ:
            quantize_nf4_dq_ref(src, static_cast<uint8_t*>(dst), n);
            return;
        default:
            break;
    }
    const QuantIsa isa = current_isa();
    const int64_t bs = tt.block_size;
    auto* out = static_cast<uint8_t*>(dst);
    parallel_units(n / bs, bs, n_threads, [&](int64_t b, int64_t e) {
        quantize_blocks(t, isa, src + b * bs, out + b * tt.type_size, e - b);
    });
}

void dequantize(QType t, const void* src, float* dst, int64_t n_elements, int n_threads) {
    const TypeTraits& tt = supported_traits(t);
    if (n_elements < 0 || n_elements % tt.block_size != 0)
        throw Error("dequantize: " + std::to_string(n_elements) + " elements is not a multiple of " + tt.name +
                    "'s block size " + std::to_string(tt.block_size));
    if (reinterpret_cast<uintptr_t>(src) % kDataAlignment != 0) {
        // A file with general.alignment 1 or 2 can place data at an odd address; the typed loads below
        // need natural alignment, so work on an aligned copy (rare: every real file aligns to 32).
        uint64_t nbytes = 0;  // NF4_DQ's tensor-level layout is more than blocks x type_size
        if (!tensor_nbytes(static_cast<uint32_t>(t), static_cast<uint64_t>(n_elements), &nbytes))
            throw Error("dequantize: byte size of " + std::to_string(n_elements) + " " + tt.name + " elements overflows");
        std::vector<uint32_t> copy((nbytes + 3) / 4);
        std::memcpy(copy.data(), src, nbytes);
        dequantize(t, copy.data(), dst, n_elements, n_threads);
        return;
    }
    const int64_t n = n_elements;
    switch (t) {
        case QType::F32: {
            auto* x = static_cast<const float*>(src);
            parallel_units(n, 1, n_threads, [&](int64_t b, int64_t e) { std::memcpy(dst + b, x + b, (e - b) * 4); });
            return;
        }
        case QType::F16: {
            auto* x = static_cast<const uint16_t*>(src);
            parallel_units(n, 1, n_threads, [&](int64_t b, int64_t e) {
                for (int64_t i = b; i < e; ++i) dst[i] = fp16_to_fp32(x[i]);
            });
            return;
        }
        case QType::BF16: {
            auto* x = static_cast<const uint16_t*>(src);
            parallel_units(n, 1, n_threads, [&](int64_t b, int64_t e) {
                for (int64_t i = b; i < e; ++i) dst[i] = bf16_to_fp32(x[i]);
            });
            return;
        }
        case QType::NF4_DQ:
            dequantize_nf4_dq(static_cast<const uint8_t*>(src), dst, n);
            return;
        default:
            break;
    }
    const int64_t bs = tt.block_size;
    auto* in = static_cast<const uint8_t*>(src);
    parallel_units(n / bs, bs, n_threads, [&](int64_t b, int64_t e) {
        dequantize_blocks(t, in + b * tt.type_size, dst + b * bs, e - b);
    });
}

}  // namespace lowbit
