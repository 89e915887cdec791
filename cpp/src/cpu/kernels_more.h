// Dot-tile kernels of the types added after Q4_0/Q4_1/Q8_0/NF4, one function per type and ISA.
//
// Every function has DotTileFn's contract (lowbit/kernels.h): nrows weight rows of the type (row r at
// w + r * w_stride bytes) against ncols rows of block_q8_act activations (k / 32 blocks each, column c at
// x + c * x_stride bytes); y[c * y_stride + r] = dot(row r, column c); 1 <= nrows <= kTileRows,
// 1 <= ncols <= kTileCols; k a multiple of the type's block size. The float64 oracle is
// dequantize_row_<type>(w) . dequantize(activation); FP4 uses the int8 code approximation NF4 uses
// (kernels_internal.h). A kernel an ISA lacks is simply not declared for it; the per-type ops tables
// fall back to the generic kernel visibly (lowbit info lists the ISA each type runs on).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace lowbit {
namespace cpu {

// Runtime FP4 approximation, as kNF4Int8 (kernels_internal.h) for NF4: each bitsandbytes FP4 code c
// (lowbit::kFP4Codes, get_4bit_type("fp4"), index order as stored; spec/quant-types.md) is replaced by
// round(c * 127) as int8 (half away from zero: 0.5 * 127 = 63.5 -> 64) and the block scale absmax by
// absmax / 127, so FP4 rows dot int8 activations in integer arithmetic. Index 8 is the code -0.
alignas(16) static const int8_t kFP4Int8[16] = {0, 1,  85,  127,  42, 64,  21,  32,
                                                0, -1, -85, -127, -42, -64, -21, -32};

namespace detail {

// Q4_K / Q5_K: eight 6-bit scales and eight 6-bit minima packed in 12 bytes (ggml's get_scale_min_k4).
// With the bytes read as little-endian words a0 (bytes 0..3), a1 (4..7), a2 (8..11), byte i of
//   sc[0..3] = a0 & 63,                  mn[0..3] = a1 & 63,
//   sc[4..7] = (a2 & 15) | (a0 >> 6) << 4,  mn[4..7] = (a2 >> 4) | (a1 >> 6) << 4.
static inline void scale_min_k4(const uint8_t* packed, uint8_t* sc, uint8_t* mn) {
    uint32_t a[3];
    std::memcpy(a, packed, 12);
    const uint32_t s03 = a[0] & 0x3f3f3f3fu;
    const uint32_t m03 = a[1] & 0x3f3f3f3fu;
    const uint32_t s47 = (a[2] & 0x0f0f0f0fu) | (((a[0] >> 6) & 0x03030303u) << 4);
    const uint32_t m47 = ((a[2] >> 4) & 0x0f0f0f0fu) | (((a[1] >> 6) & 0x03030303u) << 4);
    std::memcpy(sc, &s03, 4);
    std::memcpy(sc + 4, &s47, 4);
    std::memcpy(mn, &m03, 4);
    std::memcpy(mn + 4, &m47, 4);
}

// Q3_K: sixteen 6-bit scales as stored (the scale is the value minus 32). Low 4 bits: scale i < 8 in the
// low nibble of byte i, scale i + 8 in its high nibble; high 2 bits: scale i in bits 2 * (i / 4) .. + 1 of
// byte 8 + i % 4. With the bytes as little-endian words a0, a1, a2 (as above), word w of the output is
//   (low 4 bits: a0, a1, a0 >> 4, a1 >> 4 for w = 0..3) | ((a2 >> 2w) & 3) << 4 in each byte.
static inline void scales_q3_K(const uint8_t* packed, uint8_t* stored) {
    uint32_t a[3];
    std::memcpy(a, packed, 12);
    const uint32_t low[4] = {a[0], a[1], a[0] >> 4, a[1] >> 4};
    for (int w = 0; w < 4; ++w) {
        const uint32_t v = (low[w] & 0x0f0f0f0fu) | (((a[2] >> (2 * w)) & 0x03030303u) << 4);
        std::memcpy(stored + 4 * w, &v, 4);
    }
}

}  // namespace detail

// cpu/dot_more_generic.cpp, portable C++
void dot_q5_0_generic(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q5_1_generic(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_iq4_nl_generic(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_iq4_xs_generic(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_fp4_generic(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q2_K_generic(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q3_K_generic(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q4_K_generic(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q5_K_generic(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q6_K_generic(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);

// cpu/dot_more_avx2.cpp, AVX2+FMA+F16C
#ifdef LOWBIT_HAVE_AVX2
void dot_q5_0_avx2(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q5_1_avx2(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_iq4_nl_avx2(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_iq4_xs_avx2(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_fp4_avx2(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q2_K_avx2(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q3_K_avx2(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q4_K_avx2(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q5_K_avx2(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q6_K_avx2(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
#endif

// cpu/dot_more_avx512vnni.cpp, AVX-512 F/BW/VL/DQ + VNNI
#ifdef LOWBIT_HAVE_AVX512
void dot_q5_0_avx512vnni(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q5_1_avx512vnni(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_iq4_nl_avx512vnni(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_iq4_xs_avx512vnni(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_fp4_avx512vnni(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q2_K_avx512vnni(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q3_K_avx512vnni(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q4_K_avx512vnni(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q5_K_avx512vnni(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q6_K_avx512vnni(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
#endif

// cpu/dot_more_neon.cpp, AArch64 Advanced SIMD without dotprod
#ifdef LOWBIT_HAVE_NEON
void dot_q5_0_neon(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q5_1_neon(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_iq4_nl_neon(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_iq4_xs_neon(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_fp4_neon(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q2_K_neon(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q3_K_neon(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q4_K_neon(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q5_K_neon(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q6_K_neon(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
#endif

// cpu/dot_more_neondot.cpp, AArch64 with the dotprod extension
#ifdef LOWBIT_HAVE_NEON
void dot_q5_0_neondot(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q5_1_neondot(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_iq4_nl_neondot(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_iq4_xs_neondot(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_fp4_neondot(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q2_K_neondot(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q3_K_neondot(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q4_K_neondot(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q5_K_neondot(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
void dot_q6_K_neondot(int64_t k, const void* w, size_t w_stride, int nrows, const void* x, size_t x_stride, int ncols, float* y, size_t y_stride);
#endif

}  // namespace cpu
}  // namespace lowbit
