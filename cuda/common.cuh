// Shared CUDA helpers: error checks, fp16/bf16 conversion, the per-type dispatch and per-type weight access
// (dequantize 16 elements, dot a 32-element sub-block with fp32 or int8 activations). Included by every
// cuda/*.cu.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "lowbit/blocks.h"
#include "lowbit/cuda.h"
#include "lowbit/types.h"

namespace lowbit {
namespace cuda {

// Throws Error naming the failed call, where, and what to do (defined in device.cu).
[[noreturn]] void throw_cuda(cudaError_t err, const char* what, const char* file, int line);

#define LB_CUDA(expr)                                                                        \
    do {                                                                                     \
        cudaError_t lb_err_ = (expr);                                                        \
        if (lb_err_ != cudaSuccess) ::lowbit::cuda::throw_cuda(lb_err_, #expr, __FILE__, __LINE__); \
    } while (0)
// After a kernel launch: reports bad launch configurations (asynchronous faults surface at the next sync).
#define LB_CUDA_LAUNCHED() LB_CUDA(cudaGetLastError())

// Weight type ids as template parameters, one per row of LOWBIT_CUDA_TYPES (lowbit/cuda.h): kF32, kQ4_0,
// kQ2_K, kIQ4_NL, kFP4, ... (keep the instantiation count to one per supported type).
enum : int {
#define LOWBIT_X(NAME) k##NAME = static_cast<int>(QType::NAME),
    LOWBIT_CUDA_TYPES(LOWBIT_X)
#undef LOWBIT_X
};

__host__ __device__ constexpr bool is_float_type(int t) { return t == kF32 || t == kF16 || t == kBF16; }
// Every quantized type dots int8 activations (dot32_q8 below); float weights use fp32 activations.
__host__ __device__ constexpr bool has_int8_dot(int t) { return !is_float_type(t); }

// Calls f(std::integral_constant<int, kNAME>()) for t's row of LOWBIT_CUDA_TYPES and returns true; returns
// false without calling f for any other type. The one place a runtime QType becomes a kernel template
// argument, so a new row reaches every kernel.
template <class F>
bool with_device_type(QType t, F&& f) {
    switch (t) {
#define LOWBIT_X(NAME)                                \
    case QType::NAME:                                 \
        f(std::integral_constant<int, k##NAME>());    \
        return true;
        LOWBIT_CUDA_TYPES(LOWBIT_X)
#undef LOWBIT_X
        default:
            return false;
    }
}

// bitsandbytes' NF4 code book (get_4bit_type("nf4")); the same float values as kNF4Codes on the CPU.
static __constant__ float kNF4Device[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};
// bitsandbytes' FP4 code book (get_4bit_type("fp4"), but code 8 is -0.0 as bitsandbytes' CUDA kernel
// returns it); the same bits as kFP4Codes on the CPU (spec/quant-types.md#fp4).
static __constant__ float kFP4Device[16] = {
    0.0f,  0x1.555556p-8f,  0x1.555556p-1f,  1.0f,  0x1.555556p-2f,  0.5f,  0x1.555556p-3f,  0.25f,
    -0.0f, -0x1.555556p-8f, -0x1.555556p-1f, -1.0f, -0x1.555556p-2f, -0.5f, -0x1.555556p-3f, -0.25f,
};
static_assert(sizeof(block_fp4) == sizeof(block_nf4) && QK_FP4 == QK_NF4, "FP4 blocks are read with NF4's layout");

// IQ4_NL / IQ4_XS values (kIQ4NLValues on the CPU, spec/quant-types.md#iq4_nl) as four little-endian words
// of four int8 each, the form lookup16_i8x4 reads.
constexpr int8_t kIQ4NLTable[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
constexpr uint32_t pack_i8x4(const int8_t* v) {
    return static_cast<uint32_t>(static_cast<uint8_t>(v[0])) | static_cast<uint32_t>(static_cast<uint8_t>(v[1])) << 8 |
           static_cast<uint32_t>(static_cast<uint8_t>(v[2])) << 16 |
           static_cast<uint32_t>(static_cast<uint8_t>(v[3])) << 24;
}
constexpr uint32_t kIQ4NLWord0 = pack_i8x4(kIQ4NLTable + 0);
constexpr uint32_t kIQ4NLWord1 = pack_i8x4(kIQ4NLTable + 4);
constexpr uint32_t kIQ4NLWord2 = pack_i8x4(kIQ4NLTable + 8);
constexpr uint32_t kIQ4NLWord3 = pack_i8x4(kIQ4NLTable + 12);

// Code q (0..15) of the NF4 or FP4 code book.
template <int T>
__device__ __forceinline__ float bnb4_code(int q) {
    if constexpr (T == kNF4) return kNF4Device[q];
    else return kFP4Device[q];
}

__device__ __forceinline__ float h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bf2f(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

// Loads a 16-bit value at a 2-byte aligned address (block scales sit at odd multiples of 2 bytes).
__device__ __forceinline__ uint16_t ld_u16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }
// 32 bits from a 2-byte aligned address, little-endian (Q4_0 / Q8_0 quants start at byte 2 of an 18/34-byte
// block; Q5_0, IQ4_NL, Q3_K and Q6_K blocks are only 2-byte aligned in a row).
__device__ __forceinline__ int ld_i32_a2(const uint8_t* p) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    return static_cast<int>(static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16));
}
__device__ __forceinline__ int ld_i32_a4(const uint8_t* p) { return *reinterpret_cast<const int*>(p); }

// The IQ4_NL value of each of the four bytes of idx (each 0..15), as four int8 in one word.
__device__ __forceinline__ int lookup16_i8x4(uint32_t idx) {
    // Byte k's index becomes selector nibble k; __byte_perm reads only its low 3 bits, so one call picks
    // among values 0..7 and one among 8..15, and bit 3 of the index chooses between them.
    const uint32_t sel = ((idx | (idx >> 4)) & 0xFFu) | (((idx >> 16) | (idx >> 20)) & 0xFFu) << 8;
    const uint32_t low = __byte_perm(kIQ4NLWord0, kIQ4NLWord1, sel);
    const uint32_t high = __byte_perm(kIQ4NLWord2, kIQ4NLWord3, sel);
    const uint32_t upper = ((idx >> 3) & 0x01010101u) * 0xFFu;  // 0xFF in the bytes whose index is >= 8
    return static_cast<int>((low & ~upper) | (high & upper));
}
// Byte k of word as a signed value.
__device__ __forceinline__ int i8_of(int word, int k) {
    return static_cast<int8_t>(static_cast<uint32_t>(word) >> (8 * k));
}

// Bit k (k < 4) of n moved to bit 8k + 4: the fifth bits of four Q5 elements, placed over their nibbles.
__device__ __forceinline__ int spread_bit4(uint32_t n) {
    return static_cast<int>(((n & 1u) << 4) | ((n & 2u) << 11) | ((n & 4u) << 18) | ((n & 8u) << 25));
}

// Sum of the four int8 of x, added to acc.
__device__ __forceinline__ int sum_i8x4(int x, int acc) { return __dp4a(x, 0x01010101, acc); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---- K-quant sub-block scales (spec/quant-types.md#k-quants) -------------------------------------------
// Q4_K / Q5_K: 6-bit scale and min of 32-element sub-block j (llama.cpp's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(const uint8_t* s, int j, int* sc, int* mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}
// Q3_K: the signed scale (stored code - 32) of 16-element sub-block j.
__device__ __forceinline__ int q3_K_scale(const uint8_t* s, int j) {
    const int low = j < 8 ? (s[j] & 0x0F) : (s[j - 8] >> 4);
    const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    return (low | (high << 4)) - 32;
}

// ---- dequantize 16 consecutive elements --------------------------------------------------------------
// row: start of a row (or of a flat tensor); i0: element index within it, a multiple of 16; n: elements
// in the row (only the float types can end inside a group of 16; quantized rows are whole blocks).
// The arithmetic is exactly the CPU reference's (spec/quant-types.md), so results are bit-identical:
// each product and sum is rounded on its own, as in the reference (compiled without contraction), hence
// __fmul_rn / __fadd_rn / __fsub_rn wherever nvcc would otherwise fuse a multiply and an add.
template <int T>
__device__ __forceinline__ void dequant16(const uint8_t* row, int64_t i0, int64_t n, float out[16]) {
    if constexpr (T == kQ4_0) {
        const uint8_t* b = row + (i0 / QK4_0) * sizeof(block_q4_0);
        const int hi = static_cast<int>(i0 % QK4_0) / 16;  // 0: low nibbles (elements 0..15), 1: high (16..31)
        const float d = h2f(ld_u16(b));
        const uint8_t* qs = b + 2;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int q = hi ? (qs[j] >> 4) : (qs[j] & 0x0F);
            out[j] = static_cast<float>(q - 8) * d;
        }
    } else if constexpr (T == kQ4_1) {
        const uint8_t* b = row + (i0 / QK4_1) * sizeof(block_q4_1);
        const int hi = static_cast<int>(i0 % QK4_1) / 16;
        const float d = h2f(ld_u16(b));
        const float m = h2f(ld_u16(b + 2));
        const uint8_t* qs = b + 4;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int q = hi ? (qs[j] >> 4) : (qs[j] & 0x0F);
            // Why __fmul_rn/__fadd_rn: the reference computes q*d + m with two roundings; nvcc would
            // fuse it into one FMA and differ in the last bit (spec/quant-types.md#q4_1).
            out[j] = __fadd_rn(__fmul_rn(static_cast<float>(q), d), m);
        }
    } else if constexpr (T == kQ5_0 || T == kQ5_1) {
        // Q5_0: d, qh[4], qs[16] (22 bytes); Q5_1: d, m, qh[4], qs[16] (24 bytes). Bit e of the little-endian
        // qh is the fifth bit of element e; nibbles as Q4_0 (spec/quant-types.md#q5_0).
        constexpr int kQh = T == kQ5_0 ? 2 : 4;
        constexpr size_t kBytes = T == kQ5_0 ? sizeof(block_q5_0) : sizeof(block_q5_1);
        const uint8_t* b = row + (i0 / 32) * kBytes;
        const int hi = static_cast<int>(i0 % 32) / 16;
        const float d = h2f(ld_u16(b));
        float m = 0.0f;
        if constexpr (T == kQ5_1) m = h2f(ld_u16(b + 2));
        const uint32_t qh = static_cast<uint32_t>(ld_i32_a2(b + kQh)) >> (16 * hi);
        const uint8_t* qs = b + kQh + 4;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int q = (hi ? (qs[j] >> 4) : (qs[j] & 0x0F)) | static_cast<int>((qh >> j) & 1u) << 4;
            if constexpr (T == kQ5_0) {
                out[j] = static_cast<float>(q - 16) * d;
            } else {
                // q*d + m with two roundings, as Q4_1 (spec/quant-types.md#q5_0).
                out[j] = __fadd_rn(__fmul_rn(static_cast<float>(q), d), m);
            }
        }
    } else if constexpr (T == kQ8_0) {
        const uint8_t* b = row + (i0 / QK8_0) * sizeof(block_q8_0);
        const int off = static_cast<int>(i0 % QK8_0);
        const float d = h2f(ld_u16(b));
        const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2) + off;
#pragma unroll
        for (int j = 0; j < 16; ++j) out[j] = static_cast<float>(qs[j]) * d;
    } else if constexpr (T == kIQ4_NL || T == kIQ4_XS) {
        // IQ4_NL: y = d * value[q] per block of 32. IQ4_XS: y = (d * (ls - 32)) * value[q], ls the 6-bit
        // scale of 32-element sub-block s. Both keep Q4_0's nibble order (spec/quant-types.md#iq4_nl).
        const int hi = static_cast<int>(i0 % 32) / 16;
        const uint8_t* qs;
        float scale;
        if constexpr (T == kIQ4_NL) {
            const uint8_t* b = row + (i0 / QK4_NL) * sizeof(block_iq4_nl);
            scale = h2f(ld_u16(b));
            qs = b + 2;
        } else {
            const uint8_t* b = row + (i0 / QK_K) * sizeof(block_iq4_xs);
            const int s = static_cast<int>(i0 % QK_K) / 32;
            const int ls = ((b[4 + s / 2] >> (4 * (s % 2))) & 0x0F) | ((ld_u16(b + 2) >> (2 * s)) & 3) << 4;
            scale = h2f(ld_u16(b)) * static_cast<float>(ls - 32);
            qs = b + 8 + 16 * s;
        }
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const uint32_t v = static_cast<uint32_t>(ld_i32_a2(qs + 4 * w));
            const int vals = lookup16_i8x4(hi ? (v >> 4) & 0x0F0F0F0Fu : v & 0x0F0F0F0Fu);
#pragma unroll
            for (int k = 0; k < 4; ++k) out[4 * w + k] = scale * static_cast<float>(i8_of(vals, k));
        }
    } else if constexpr (T == kNF4 || T == kFP4) {
        const uint8_t* b = row + (i0 / QK_NF4) * sizeof(block_nf4);  // block_fp4 has NF4's layout
        const int off = static_cast<int>(i0 % QK_NF4);  // 0, 16, 32 or 48
        const float absmax = *reinterpret_cast<const float*>(b);
        const uint8_t* qs = b + 4 + off / 2;
        // bitsandbytes order: the first element of each pair is in the HIGH nibble.
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            out[2 * j] = bnb4_code<T>(qs[j] >> 4) * absmax;
            out[2 * j + 1] = bnb4_code<T>(qs[j] & 0x0F) * absmax;
        }
    } else if constexpr (T == kQ2_K || T == kQ3_K) {
        // Element e = 128c + 32s + l of a super-block: 2 low bits at bits 2s..2s+1 of qs[32c + l]; 16-element
        // sub-block e / 16 has its own scale. Q2_K: y = (d * sc) * q - dmin * m; Q3_K: y = (d * sc) * q3 with
        // q3 = low - (bit e / 32 of hmask[l] ? 0 : 4) (spec/quant-types.md#k-quants).
        constexpr size_t kBytes = T == kQ2_K ? sizeof(block_q2_K) : sizeof(block_q3_K);
        const uint8_t* b = row + (i0 / QK_K) * kBytes;
        const int e0 = static_cast<int>(i0 % QK_K);
        const int c = e0 / 128, s = (e0 / 32) % 4, l0 = e0 % 32;
        if constexpr (T == kQ2_K) {
            const uint8_t sc = b[e0 / 16];
            const float dl = h2f(ld_u16(b + 80)) * static_cast<float>(sc & 0x0F);
            const float ml = h2f(ld_u16(b + 82)) * static_cast<float>(sc >> 4);
            const uint8_t* qs = b + 16 + 32 * c + l0;
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                const int q = (qs[j] >> (2 * s)) & 3;
                out[j] = __fsub_rn(__fmul_rn(dl, static_cast<float>(q)), ml);
            }
        } else {
            const float dl = h2f(ld_u16(b + 108)) * static_cast<float>(q3_K_scale(b + 96, e0 / 16));
            const uint8_t* hmask = b + l0;
            const uint8_t* qs = b + 32 + 32 * c + l0;
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                const int low = (qs[j] >> (2 * s)) & 3;
                const int q = low - (((hmask[j] >> (e0 / 32)) & 1) ? 0 : 4);
                out[j] = dl * static_cast<float>(q);
            }
        }
    } else if constexpr (T == kQ4_K || T == kQ5_K) {
        // 32-element sub-block j: nibbles in qs[32 (j / 2) + l] (low for even j, high for odd); Q5_K's fifth
        // bit is bit j of qh[l]. y = (d * sc) * q - dmin * m (spec/quant-types.md#k-quants).
        constexpr size_t kBytes = T == kQ4_K ? sizeof(block_q4_K) : sizeof(block_q5_K);
        const uint8_t* b = row + (i0 / QK_K) * kBytes;
        const int e0 = static_cast<int>(i0 % QK_K);
        const int j32 = e0 / 32, l0 = e0 % 32;
        int sc, mn;
        scale_min_k4(b + 4, j32, &sc, &mn);
        const float dl = h2f(ld_u16(b)) * static_cast<float>(sc);
        const float ml = h2f(ld_u16(b + 2)) * static_cast<float>(mn);
        const uint8_t* qs = b + (T == kQ4_K ? 16 : 48) + 32 * (j32 / 2) + l0;
        const int shift = 4 * (j32 % 2);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            int q = (qs[j] >> shift) & 0x0F;
            if constexpr (T == kQ5_K) q |= ((b[16 + l0 + j] >> j32) & 1) << 4;
            out[j] = __fsub_rn(__fmul_rn(dl, static_cast<float>(q)), ml);
        }
    } else if constexpr (T == kQ6_K) {
        // Element e = 128c + 32p + l: low 4 bits from ql[64c + 32 (p & 1) + l] (low nibble for p < 2),
        // high 2 bits at bits 2p..2p+1 of qh[32c + l]; y = (d * scales[e / 16]) * (q - 32).
        const uint8_t* b = row + (i0 / QK_K) * sizeof(block_q6_K);
        const int e0 = static_cast<int>(i0 % QK_K);
        const int c = e0 / 128, p = (e0 / 32) % 4, l0 = e0 % 32;
        const float dl = h2f(ld_u16(b + 208)) * static_cast<float>(static_cast<int8_t>(b[192 + e0 / 16]));
        const uint8_t* ql = b + 64 * c + 32 * (p & 1) + l0;
        const uint8_t* qh = b + 128 + 32 * c + l0;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int low = (p < 2 ? ql[j] : ql[j] >> 4) & 0x0F;
            const int high = (qh[j] >> (2 * p)) & 3;
            out[j] = dl * static_cast<float>((low | (high << 4)) - 32);
        }
    } else {
        static_assert(is_float_type(T), "dequant16: no dequantization for this type");
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int64_t i = i0 + j;
            float v = 0.0f;
            if (i < n) {
                if constexpr (T == kF32) v = reinterpret_cast<const float*>(row)[i];
                else if constexpr (T == kF16) v = h2f(reinterpret_cast<const uint16_t*>(row)[i]);
                else v = bf2f(reinterpret_cast<const uint16_t*>(row)[i]);
            }
            out[j] = v;
        }
    }
}

// ---- dot of one 32-element sub-block (index ib) of a quantized row with fp32 activations x[0..31] ----
template <int T>
__device__ __forceinline__ float dot32_f32(const uint8_t* row, int64_t ib, const float* x) {
    float w[16];
    dequant16<T>(row, ib * 32, 0, w);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; ++j) s += w[j] * __ldg(x + j);
    dequant16<T>(row, ib * 32 + 16, 0, w);
#pragma unroll
    for (int j = 0; j < 16; ++j) s += w[j] * __ldg(x + 16 + j);
    return s;
}

// ---- dot of one 32-element sub-block with an int8 activation block (the CPU's runtime scheme) -------
// Sub-block ib covers elements 32 ib .. 32 ib + 31 of the row; for the K-quants and IQ4_XS that is
// sub-block ib % 8 of super-block ib / 8, for NF4/FP4 half ib % 2 of block ib / 2. Integer weight values
// are dotted with the int8 activations by dp4a, scales applied per 16 or 32 elements as the CPU kernels
// do (cpp/src/cpu/dot_more_generic.cpp); minima use s = dx * sum(x.qs) or partial sums of x.qs.
template <int T>
__device__ __forceinline__ float dot32_q8(const uint8_t* row, int64_t ib, const block_q8_act* xa) {
    const int* xq = reinterpret_cast<const int*>(xa->qs);  // block_q8_act.qs is 4-byte aligned (offset 8 of 40)
    const float dx = xa->d;
    if constexpr (T == kQ4_0) {
        const uint8_t* b = row + ib * sizeof(block_q4_0);
        int sumi = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int v = ld_i32_a2(b + 2 + 4 * i);
            // bytes 4i..4i+3: low nibbles are elements 4i..4i+3, high nibbles elements 16+4i..16+4i+3.
            const int lo = __vsubss4(v & 0x0F0F0F0F, 0x08080808);
            const int hi = __vsubss4((v >> 4) & 0x0F0F0F0F, 0x08080808);
            sumi = __dp4a(lo, xq[i], sumi);
            sumi = __dp4a(hi, xq[i + 4], sumi);
        }
        return h2f(ld_u16(b)) * dx * static_cast<float>(sumi);
    } else if constexpr (T == kQ4_1) {
        const uint8_t* b = row + ib * sizeof(block_q4_1);
        int sumi = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int v = ld_i32_a4(b + 4 + 4 * i);
            sumi = __dp4a(v & 0x0F0F0F0F, xq[i], sumi);
            sumi = __dp4a((v >> 4) & 0x0F0F0F0F, xq[i + 4], sumi);
        }
        // sum_j (d q_j + m) * dx x_j = d dx sumi + m * (dx sum_j x_j) = d dx sumi + m * s.
        return h2f(ld_u16(b)) * dx * static_cast<float>(sumi) + h2f(ld_u16(b + 2)) * xa->s;
    } else if constexpr (T == kQ5_0) {
        const uint8_t* b = row + ib * sizeof(block_q5_0);  // 2-byte aligned
        const uint32_t qh = static_cast<uint32_t>(ld_i32_a2(b + 2));
        int sumi = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int v = ld_i32_a2(b + 6 + 4 * i);
            // Elements 4i..4i+3 (low nibbles, qh bits 4i..) and 16+4i.. (high nibbles, qh bits 16+4i..), minus 16.
            const int lo = __vsubss4((v & 0x0F0F0F0F) | spread_bit4((qh >> (4 * i)) & 15u), 0x10101010);
            const int hi = __vsubss4(((v >> 4) & 0x0F0F0F0F) | spread_bit4((qh >> (16 + 4 * i)) & 15u), 0x10101010);
            sumi = __dp4a(lo, xq[i], sumi);
            sumi = __dp4a(hi, xq[i + 4], sumi);
        }
        return h2f(ld_u16(b)) * dx * static_cast<float>(sumi);
    } else if constexpr (T == kQ5_1) {
        const uint8_t* b = row + ib * sizeof(block_q5_1);  // 8-byte aligned
        const uint32_t qh = static_cast<uint32_t>(ld_i32_a4(b + 4));
        int sumi = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int v = ld_i32_a4(b + 8 + 4 * i);
            sumi = __dp4a((v & 0x0F0F0F0F) | spread_bit4((qh >> (4 * i)) & 15u), xq[i], sumi);
            sumi = __dp4a(((v >> 4) & 0x0F0F0F0F) | spread_bit4((qh >> (16 + 4 * i)) & 15u), xq[i + 4], sumi);
        }
        // As Q4_1: d dx sumi + m * s.
        return h2f(ld_u16(b)) * dx * static_cast<float>(sumi) + h2f(ld_u16(b + 2)) * xa->s;
    } else if constexpr (T == kQ8_0) {
        const uint8_t* b = row + ib * sizeof(block_q8_0);
        int sumi = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) sumi = __dp4a(ld_i32_a2(b + 2 + 4 * i), xq[i], sumi);
        return h2f(ld_u16(b)) * dx * static_cast<float>(sumi);
    } else if constexpr (T == kIQ4_NL || T == kIQ4_XS) {
        const uint8_t* qs;
        float d;
        int scale = 1;
        if constexpr (T == kIQ4_NL) {
            const uint8_t* b = row + ib * sizeof(block_iq4_nl);  // 2-byte aligned
            d = h2f(ld_u16(b));
            qs = b + 2;
        } else {
            const uint8_t* b = row + (ib / 8) * sizeof(block_iq4_xs);  // 8-byte aligned
            const int s = static_cast<int>(ib % 8);
            const int ls = ((b[4 + s / 2] >> (4 * (s % 2))) & 0x0F) | ((ld_u16(b + 2) >> (2 * s)) & 3) << 4;
            d = h2f(ld_u16(b));
            scale = ls - 32;
            qs = b + 8 + 16 * s;
        }
        int sumi = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t v = static_cast<uint32_t>(ld_i32_a2(qs + 4 * i));
            sumi = __dp4a(lookup16_i8x4(v & 0x0F0F0F0Fu), xq[i], sumi);
            sumi = __dp4a(lookup16_i8x4((v >> 4) & 0x0F0F0F0Fu), xq[i + 4], sumi);
        }
        return d * dx * static_cast<float>(scale * sumi);
    } else if constexpr (T == kQ2_K || T == kQ3_K || T == kQ6_K) {
        // Two 16-element halves with their own scales. Sub-block j of the super-block is elements
        // 128c + 32s + l (c = j / 4, s = j % 4, l < 32): bytes l of the 32-byte runs below.
        const int j = static_cast<int>(ib % 8);
        const int c = j / 4, s = j % 4;
        int sumi[2] = {0, 0};
        if constexpr (T == kQ2_K) {
            const uint8_t* b = row + (ib / 8) * sizeof(block_q2_K);  // 4-byte aligned
            int sumx[2] = {0, 0};
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int q = (ld_i32_a4(b + 16 + 32 * c + 4 * i) >> (2 * s)) & 0x03030303;
                sumi[i / 4] = __dp4a(q, xq[i], sumi[i / 4]);
                sumx[i / 4] = sum_i8x4(xq[i], sumx[i / 4]);
            }
            const int sc0 = b[2 * j], sc1 = b[2 * j + 1];
            const int isum = (sc0 & 0x0F) * sumi[0] + (sc1 & 0x0F) * sumi[1];
            const int imin = (sc0 >> 4) * sumx[0] + (sc1 >> 4) * sumx[1];
            // sum_e (d sc q - dmin m) dx x_e = dx (d isum - dmin imin).
            const float d = h2f(ld_u16(b + 80)), dmin = h2f(ld_u16(b + 82));
            return dx * (d * static_cast<float>(isum) - dmin * static_cast<float>(imin));
        } else if constexpr (T == kQ3_K) {
            const uint8_t* b = row + (ib / 8) * sizeof(block_q3_K);  // 2-byte aligned
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int low = (ld_i32_a2(b + 32 + 32 * c + 4 * i) >> (2 * s)) & 0x03030303;
                const int high = (ld_i32_a2(b + 4 * i) >> j) & 0x01010101;  // bit j of hmask[l]
                // low - (high ? 0 : 4) = (low | high << 2) - 4, in -4..3.
                const int q = __vsubss4(low | (high << 2), 0x04040404);
                sumi[i / 4] = __dp4a(q, xq[i], sumi[i / 4]);
            }
            const int isum = q3_K_scale(b + 96, 2 * j) * sumi[0] + q3_K_scale(b + 96, 2 * j + 1) * sumi[1];
            return h2f(ld_u16(b + 108)) * dx * static_cast<float>(isum);
        } else {
            const uint8_t* b = row + (ib / 8) * sizeof(block_q6_K);  // 2-byte aligned
            const int p = s;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int low = (ld_i32_a2(b + 64 * c + 32 * (p & 1) + 4 * i) >> (4 * (p >> 1))) & 0x0F0F0F0F;
                const int high = (ld_i32_a2(b + 128 + 32 * c + 4 * i) >> (2 * p)) & 0x03030303;
                const int q = __vsubss4(low | (high << 4), 0x20202020);  // 0..63 - 32
                sumi[i / 4] = __dp4a(q, xq[i], sumi[i / 4]);
            }
            const int sc0 = static_cast<int8_t>(b[192 + 2 * j]), sc1 = static_cast<int8_t>(b[192 + 2 * j + 1]);
            return h2f(ld_u16(b + 208)) * dx * static_cast<float>(sc0 * sumi[0] + sc1 * sumi[1]);
        }
    } else if constexpr (T == kQ4_K || T == kQ5_K) {
        constexpr size_t kBytes = T == kQ4_K ? sizeof(block_q4_K) : sizeof(block_q5_K);  // 16-byte aligned
        const uint8_t* b = row + (ib / 8) * kBytes;
        const int j = static_cast<int>(ib % 8);
        const uint8_t* qs = b + (T == kQ4_K ? 16 : 48) + 32 * (j / 2);
        const int shift = 4 * (j % 2);
        int sumi = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            int q = (ld_i32_a4(qs + 4 * i) >> shift) & 0x0F0F0F0F;
            if constexpr (T == kQ5_K) q |= ((ld_i32_a4(b + 16 + 4 * i) >> j) & 0x01010101) << 4;  // bit j of qh[l]
            sumi = __dp4a(q, xq[i], sumi);
        }
        int sc, mn;
        scale_min_k4(b + 4, j, &sc, &mn);
        // sum_e (d sc q - dmin m) dx x_e = d dx sc sumi - dmin m s.
        const float d = h2f(ld_u16(b)), dmin = h2f(ld_u16(b + 2));
        return d * dx * static_cast<float>(sc * sumi) - dmin * static_cast<float>(mn) * xa->s;
    } else {
        static_assert(T == kNF4 || T == kFP4, "dot32_q8: no int8 dot for this type");
        // Code book values are not integers, so the products are summed in fp32 and scaled by absmax * dx
        // once (the exact codes; the CPU rounds them to int8, see cpp/src/cpu/kernels_more.h).
        const uint8_t* b = row + (ib / 2) * sizeof(block_nf4);  // block_fp4 has NF4's layout
        const uint8_t* qs = b + 4 + (ib % 2) * 16;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            s += bnb4_code<T>(qs[j] >> 4) * static_cast<float>(xa->qs[2 * j]);
            s += bnb4_code<T>(qs[j] & 0x0F) * static_cast<float>(xa->qs[2 * j + 1]);
        }
        return *reinterpret_cast<const float*>(b) * dx * s;
    }
}

// ---- device-side weight matrix --------------------------------------------------------------------
struct DevMatrix {
    QType type = QType::F32;  // never NF4_DQ on the device (expanded to NF4 on upload)
    const uint8_t* data = nullptr;
    int64_t n_rows = 0;
    int64_t n_cols = 0;
    size_t row_bytes = 0;
};

// ---- launchers (all on `stream`, device pointers) -------------------------------------------------
// dst (n) fp32 / fp16 from n elements of type t.
void launch_dequantize(QType t, const void* src, int64_t n, float* dst, cudaStream_t stream);
void launch_dequantize_f16(QType t, const void* src, int64_t n, __half* dst, cudaStream_t stream);
// x (n_tok, k) fp32 -> n_tok * k / 32 blocks; k % 32 == 0.
void launch_quantize_act(const float* x, int64_t n_tok, int64_t k, block_q8_act* dst, cudaStream_t stream);
// y (n_rows) (+)= W x for one token; xa: k/32 activation blocks (Int8Act) or x: k floats (FloatAct).
bool matvec_int8_supported(QType t);
void launch_matvec_int8(const DevMatrix& w, const block_q8_act* xa, float* y, bool accumulate, cudaStream_t stream);
void launch_matvec_f32(const DevMatrix& w, const float* x, float* y, bool accumulate, cudaStream_t stream);
// Y (n_tok, n_rows) (+)= X (n_tok, n_cols) @ W^T on tensor cores.
void launch_gemm(const DevMatrix& w, const float* x, int64_t n_tok, float* y, bool accumulate, cudaStream_t stream);
// Picks the path: matvec for n_tok < kGemmMinTokens (quantizing x into act when mode is Int8Act), else GEMM.
void matmul(const DevMatrix& w, const float* x, int64_t n_tok, float* y, bool accumulate, MatvecMode mode,
            block_q8_act* act, cudaStream_t stream);

// y (n_rows, n) = rmsnorm(x) * weight (n); _add: y += that (a post-norm into the residual stream).
void launch_rmsnorm(const float* x, const float* weight, int64_t n_rows, int64_t n, float eps, float* y,
                    cudaStream_t stream);
void launch_rmsnorm_add(const float* x, const float* weight, int64_t n_rows, int64_t n, float eps, float* y,
                        cudaStream_t stream);
// x (n_rows, n) = rmsnorm(x) * weight (n), in place, one warp per row (per-head q/k norm: n = head_dim).
void launch_head_norm(float* x, const float* weight, int64_t n_rows, int n, float eps, cudaStream_t stream);
// y (n_rows, n) += bias (n).
void launch_add_bias(float* y, const float* bias, int64_t n_rows, int64_t n, cudaStream_t stream);
// cs (n_tok, rope_dim) = mscale * cos, sin of (pos0 + t) * inv_freq[i], i < rope_dim / 2, angles in double.
void launch_rope_table(const float* inv_freq, int n_tok, int rope_dim, int pos0, float mscale, float* cs,
                       cudaStream_t stream);
// x (n_tok, n_heads * head_dim) in place by the chunk's table cs (n_tok, rope_dim), pairs as `mode` says.
void launch_rope(float* x, int n_tok, int n_heads, int head_dim, int rope_dim, RopeMode mode, const float* cs,
                 cudaStream_t stream);
// k, v (n_tok, kv_dim) fp32 -> caches (n_ctx, kv_dim) fp16 at rows pos0 .. pos0 + n_tok - 1.
void launch_store_kv(const float* k, const float* v, int n_tok, int kv_dim, int pos0, __half* k_cache,
                     __half* v_cache, cudaStream_t stream);
// q (n_tok, n_head * head_dim), caches (>= n_past + n_tok, n_head_kv * head_dim) -> out like q. window > 0:
// query t sees only the last `window` positions up to n_past + t; scale 0: 1/sqrt(head_dim).
void launch_attention(const float* q, const __half* k_cache, const __half* v_cache, int n_tok, int n_past, int n_head,
                      int n_head_kv, int head_dim, int window, float scale, float* out, cudaStream_t stream);
// out = act(gate) * up, n elements (out may be gate or up).
void launch_gated_act(GatedAct act, const float* gate, const float* up, int64_t n, float* out, cudaStream_t stream);
// x = cap * tanh(x / cap), n elements.
void launch_softcap(float* x, int64_t n, float cap, cudaStream_t stream);

// Host: the device layout of a matrix. NF4_DQ is expanded into `scratch` as plain NF4 blocks (and *type
// becomes NF4); every other type is returned as is. Validates the shape.
const void* device_layout(const Matrix& m, std::vector<block_nf4>& scratch, QType* type);

inline unsigned int ceil_div_u(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

}  // namespace cuda
}  // namespace lowbit
