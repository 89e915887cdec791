// Shared CUDA helpers: error checks, fp16/bf16 conversion, and per-type weight access (dequantize 16
// elements, dot a 32-element sub-block with fp32 or int8 activations). Included by every cuda/*.cu.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
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

// Weight type ids as template parameters (keep the instantiation count to one per supported type).
enum : int {
    kF32 = static_cast<int>(QType::F32),
    kF16 = static_cast<int>(QType::F16),
    kBF16 = static_cast<int>(QType::BF16),
    kQ4_0 = static_cast<int>(QType::Q4_0),
    kQ4_1 = static_cast<int>(QType::Q4_1),
    kQ8_0 = static_cast<int>(QType::Q8_0),
    kNF4 = static_cast<int>(QType::NF4),
};

__host__ __device__ constexpr bool is_float_type(int t) { return t == kF32 || t == kF16 || t == kBF16; }

// bitsandbytes' NF4 code book (get_4bit_type("nf4")); the same float values as kNF4Codes on the CPU.
static __constant__ float kNF4Device[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

__device__ __forceinline__ float h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bf2f(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

// Loads a 16-bit value at a 2-byte aligned address (block scales sit at odd multiples of 2 bytes).
__device__ __forceinline__ uint16_t ld_u16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }
// 32 bits from a 2-byte aligned address, little-endian (Q4_0 / Q8_0 quants start at byte 2 of an 18/34-byte block).
__device__ __forceinline__ int ld_i32_a2(const uint8_t* p) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    return static_cast<int>(static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16));
}
__device__ __forceinline__ int ld_i32_a4(const uint8_t* p) { return *reinterpret_cast<const int*>(p); }

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

// ---- dequantize 16 consecutive elements --------------------------------------------------------------
// row: start of a row (or of a flat tensor); i0: element index within it, a multiple of 16; n: elements
// in the row (only the float types can end inside a group of 16; quantized rows are whole blocks).
// The arithmetic is exactly the CPU reference's (spec/quant-types.md), so results are bit-identical.
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
    } else if constexpr (T == kQ8_0) {
        const uint8_t* b = row + (i0 / QK8_0) * sizeof(block_q8_0);
        const int off = static_cast<int>(i0 % QK8_0);
        const float d = h2f(ld_u16(b));
        const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2) + off;
#pragma unroll
        for (int j = 0; j < 16; ++j) out[j] = static_cast<float>(qs[j]) * d;
    } else if constexpr (T == kNF4) {
        const uint8_t* b = row + (i0 / QK_NF4) * sizeof(block_nf4);
        const int off = static_cast<int>(i0 % QK_NF4);  // 0, 16, 32 or 48
        const float absmax = *reinterpret_cast<const float*>(b);
        const uint8_t* qs = b + 4 + off / 2;
        // bitsandbytes order: the first element of each pair is in the HIGH nibble.
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            out[2 * j] = kNF4Device[qs[j] >> 4] * absmax;
            out[2 * j + 1] = kNF4Device[qs[j] & 0x0F] * absmax;
        }
    } else {
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
template <int T> struct has_int8_dot { static constexpr bool value = false; };
template <> struct has_int8_dot<kQ4_0> { static constexpr bool value = true; };
template <> struct has_int8_dot<kQ4_1> { static constexpr bool value = true; };
template <> struct has_int8_dot<kQ8_0> { static constexpr bool value = true; };
template <> struct has_int8_dot<kNF4> { static constexpr bool value = true; };

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
    } else if constexpr (T == kQ8_0) {
        const uint8_t* b = row + ib * sizeof(block_q8_0);
        int sumi = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) sumi = __dp4a(ld_i32_a2(b + 2 + 4 * i), xq[i], sumi);
        return h2f(ld_u16(b)) * dx * static_cast<float>(sumi);
    } else {
        static_assert(T == kNF4, "dot32_q8: no int8 dot for this type");
        // Sub-block ib is half (ib % 2) of NF4 block ib / 2; code book values are not integers, so the
        // products are summed in fp32 and scaled by absmax * dx once.
        const uint8_t* b = row + (ib / 2) * sizeof(block_nf4);
        const uint8_t* qs = b + 4 + (ib % 2) * 16;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            s += kNF4Device[qs[j] >> 4] * static_cast<float>(xa->qs[2 * j]);
            s += kNF4Device[qs[j] & 0x0F] * static_cast<float>(xa->qs[2 * j + 1]);
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

void launch_rmsnorm(const float* x, const float* weight, int64_t n_rows, int64_t n, float eps, float* y,
                    cudaStream_t stream);
// x (n_tok, n_heads * head_dim) in place; inv_freq (rope_dim / 2) already includes freq_scale.
void launch_rope(float* x, int n_tok, int n_heads, int head_dim, int rope_dim, int pos0, const float* inv_freq,
                 cudaStream_t stream);
// k, v (n_tok, kv_dim) fp32 -> caches (n_ctx, kv_dim) fp16 at rows pos0 .. pos0 + n_tok - 1.
void launch_store_kv(const float* k, const float* v, int n_tok, int kv_dim, int pos0, __half* k_cache,
                     __half* v_cache, cudaStream_t stream);
// q (n_tok, n_head * head_dim), caches (>= n_past + n_tok, n_head_kv * head_dim) -> out like q.
void launch_attention(const float* q, const __half* k_cache, const __half* v_cache, int n_tok, int n_past, int n_head,
                      int n_head_kv, int head_dim, float* out, cudaStream_t stream);
void launch_silu_mul(const float* gate, const float* up, int64_t n, float* out, cudaStream_t stream);

// Host: the device layout of a matrix. NF4_DQ is expanded into `scratch` as plain NF4 blocks (and *type
// becomes NF4); every other type is returned as is. Validates the shape.
const void* device_layout(const Matrix& m, std::vector<block_nf4>& scratch, QType* type);

// Host-side inverse frequencies freq_scale * base^(-2i/rope_dim), i < rope_dim / 2, computed in double.
void rope_inv_freq(int rope_dim, float freq_base, float freq_scale, float* out);

inline unsigned int ceil_div_u(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

}  // namespace cuda
}  // namespace lowbit
