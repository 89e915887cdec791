// Private helpers shared by the per-ISA kernel files: scalar fp16/bf16 decoding, the NF4 int8 table,
// the scalar activation quantizer every ISA must match bit for bit, and the per-ISA table getters.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lowbit/kernels.h"

namespace lowbit {
namespace cpu {

// Per-ISA tables (defined in kernels_<isa>.cpp). They do not check the CPU; dispatch.cpp does.
const Kernels* generic_kernels();
#ifdef LOWBIT_HAVE_AVX2
const Kernels* avx2_kernels();
#endif
#ifdef LOWBIT_HAVE_AVX512
const Kernels* avx512_kernels();      // AVX-512 F/BW/VL/DQ, maddubs dots (cpu/kernels_avx512.cpp)
const Kernels* avx512vnni_kernels();  // + VNNI: vpdpbusd, prompt GEMM (cpu/kernels_avx512vnni.cpp)
#endif
#ifdef LOWBIT_HAVE_NEON
const Kernels* neon_kernels();     // ARMv8.2-A + fp16, widening-multiply dots (cpu/kernels_neon.cpp)
const Kernels* neondot_kernels();  // + dotprod: sdot, load-time panels (cpu/kernels_neondot.cpp)
#endif

// Kernels over load-time panels read each weight byte once per matmul. With several activation columns the
// compute per byte is high enough that the hardware prefetcher alone falls behind and DRAM latency shows (a
// decode step of 8 sequences on the 1.1B shape: 40 ms without, 19 ms with; BENCHMARKS.md "Serving"). Each
// block's kernel asks for the bytes this far ahead of the block it starts.
constexpr int64_t kPanelPrefetchBytes = 4096;
inline void prefetch_panel_ahead(const uint8_t* block, int64_t block_bytes) {
    for (int64_t off = 0; off < block_bytes; off += 64) __builtin_prefetch(block + kPanelPrefetchBytes + off, 0, 3);
}

// A typed row function as TypeOps::quantize_row.
template <class Block, void (*F)(const float*, Block*, int64_t)>
void quantize_row_as(const float* x, void* y, int64_t k) {
    F(x, static_cast<Block*>(y), k);
}

namespace detail {

// IEEE half -> float, exact (every half is a float). Local so the kernels do not depend on types.cpp.
static inline float half_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        // Subnormal half: value = man * 2^-24, exact in float.
        float f = static_cast<float>(man) * 5.9604644775390625e-8f;
        std::memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Runtime NF4 approximation: the matmul kernels replace each NF4 code value c (bitsandbytes'
// get_4bit_type("nf4"), spec/quant-types.md#nf4) by round(c * 127) as int8 and the block scale absmax
// by absmax / 127, so NF4 rows dot int8 activations in integer arithmetic like the ggml types. The
// largest change of a weight is 0.5/127 of its block's absmax; dequantize() stays exact.
alignas(16) static const int8_t kNF4Int8[16] = {-127, -88, -67, -50, -36, -23, -12, 0,
                                                10,   20,  31,  43,  56,  71,  92,  127};

// Scalar activation quantizer, the oracle for every ISA (results must be bit-identical):
//   d = amax / 127, id = d ? 1/d : 0, q = roundf(x * id), s = d * sum(q).
// Why x * id and not x / d: ggml's quantize_row_q8_0 multiplies by the reciprocal, and a multiply is
// what SIMD code does cheaply; roundf rounds half away from zero (spec/quant-types.md#runtime).
static inline void quantize_act_block_ref(const float* x, block_q8_act* y) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
        const int q = static_cast<int>(std::round(x[j] * id));
        y->qs[j] = static_cast<int8_t>(q);
        sum += q;
    }
    y->d = d;
    y->s = d * static_cast<float>(sum);
}

}  // namespace detail
}  // namespace cpu

// Bit-exact SIMD row quantizers (k a multiple of 32), compiled with their ISA's flags
// (cpu/quantize_avx2.cpp, cpu/quantize_avx512.cpp); reached through the kernel tables' TypeOps.
void quantize_row_q4_0_avx2(const float* x, block_q4_0* y, int64_t k);
void quantize_row_q4_1_avx2(const float* x, block_q4_1* y, int64_t k);
void quantize_row_q8_0_avx2(const float* x, block_q8_0* y, int64_t k);
void quantize_row_q4_0_avx512(const float* x, block_q4_0* y, int64_t k);
void quantize_row_q4_1_avx512(const float* x, block_q4_1* y, int64_t k);
void quantize_row_q8_0_avx512(const float* x, block_q8_0* y, int64_t k);

}  // namespace lowbit
