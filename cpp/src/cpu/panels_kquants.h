// Load-time 16-row panels of Q5_0 and the K-quants (Q4_K, Q5_K, Q6_K): their layouts, and the panel kernels.
//
// As the Q4_0 panels (lowbit/kernels.h), a panel block holds one scale block of 16 rows: their scales, then
// per 32-element sub-block the quant values q (unsigned, 0 .. 2^bits - 1) of the 16 rows in 64-byte vectors
// whose bytes 4r .. 4r+3 belong to row r:
//   - four nibble vectors: vector v holds q & 15 of elements 4v .. 4v+3 in the low nibbles and of elements
//     16 + 4v .. 16 + 4v + 3 in the high nibbles (ggml's Q4 order);
//   - 5-bit values, one more vector: bit v of byte b is bit 4 of element 4v + b, bit 4 + v that of 16 + 4v + b;
//   - 6-bit values, two more vectors: in vector g, bits 2v .. 2v+1 of byte b are q >> 4 of element 16g + 4v + b.
// Scales are unpacked to one byte per (sub-block, row), rows consecutive, so one 16-byte load serves a panel:
//   Q5_0 (32 elements, 352 bytes):   fp16 d[16] | sub-block (256 + 64)                       w = d (q - 16)
//   Q4_K (256 elements, 2368 bytes): fp16 d[16] | fp16 dmin[16] | u8 sc[8][16] | u8 mn[8][16] | 8 x sub-block (256)
//   Q5_K (256 elements, 2880 bytes): as Q4_K, 8 x sub-block (256 + 64)          w = d sc q - dmin mn per 32
//   Q6_K (256 elements, 3360 bytes): fp16 d[16] | i8 sc[16][16] (per 16 elements) | 8 x sub-block (256 + 128)
//                                                                                w = d sc (q - 32) per 16
// Q5_0 and Q6_K keep the size of the rows; Q4_K and Q5_K grow by 64 bytes per 16 rows x 256 (under 3%). The
// bytes are only moved, so cpu/matmul.cpp's panel_row gives every row back exactly.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lowbit {
namespace cpu {

constexpr size_t kPanelQ5_0Bytes = 32 + 256 + 64;
constexpr size_t kPanelQ4_KBytes = 64 + 128 + 128 + 8 * 256;
constexpr size_t kPanelQ5_KBytes = 64 + 128 + 128 + 8 * (256 + 64);
constexpr size_t kPanelQ6_KBytes = 32 + 256 + 8 * (256 + 128);

// PanelFn kernels (lowbit/kernels.h), vpmaddubsw integer dots on 256-bit registers (cpu/panels_kquants_avx2.cpp).
#ifdef LOWBIT_HAVE_AVX2
void panel_q5_0_avx2(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t x_stride, int64_t n_tok,
                     float* y, size_t y_stride);
void panel_q4_K_avx2(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t x_stride, int64_t n_tok,
                     float* y, size_t y_stride);
void panel_q5_K_avx2(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t x_stride, int64_t n_tok,
                     float* y, size_t y_stride);
void panel_q6_K_avx2(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t x_stride, int64_t n_tok,
                     float* y, size_t y_stride);
#endif

}  // namespace cpu
}  // namespace lowbit
