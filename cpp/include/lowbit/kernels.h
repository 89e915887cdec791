// CPU kernel tables (one per ISA, chosen at run time) and the matmul driver built on them.
//
// Semantics (spec/quant-types.md#runtime): activations are quantized to block_q8_act (int8, fp32 scale,
// block 32) and dotted with quantized weight rows in integer arithmetic, as ggml does; F16/BF16/F32
// weights are dotted with the float activations directly.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lowbit/blocks.h"
#include "lowbit/threads.h"
#include "lowbit/types.h"

namespace lowbit {
namespace cpu {

enum class Isa : int { Generic = 0, AVX2 = 1, AVX512 = 2, NEON = 3 };
const char* isa_name(Isa isa);

// Dot products of a tile: nrows weight rows (row r at w + r*w_stride bytes) against ncols activation
// rows (column c at x + c*x_stride bytes), each k elements long; y[c*y_stride + r] = dot(row r, col c).
// 1 <= nrows <= kTileRows, 1 <= ncols <= kTileCols. k is a multiple of the weight block size.
// For quantized weights x points at block_q8_act blocks; for F16/BF16/F32 weights at floats.
constexpr int kTileRows = 4;
constexpr int kTileCols = 4;
using DotTileFn = void (*)(int64_t k, const void* w, size_t w_stride, int nrows, const void* x,
                           size_t x_stride, int ncols, float* y, size_t y_stride);

// Prompt GEMM over a panel of up to kPanelRows weight rows against all n_tok activation columns (same
// argument meaning as DotTileFn, y[c*y_stride + r]). Kernels that have one repack the panel into a
// row-interleaved layout (in per-thread scratch, nothing kept) so one integer dot instruction serves
// kPanelRows rows and the per-block float work is paid once per 16 rows instead of once per row.
constexpr int kPanelRows = 16;
using GemmPanelFn = void (*)(int64_t k, const void* w, size_t w_stride, int nrows, const void* x,
                             size_t x_stride, int64_t n_tok, float* y, size_t y_stride);

// Matmul over weights repacked at load into 16-row panels (see repack_panels below): n_panels consecutive
// panels (rows p*16 .. p*16+15 of y) against n_tok activation columns (block_q8_act, x_stride apart).
using PanelFn = void (*)(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t x_stride,
                         int64_t n_tok, float* y, size_t y_stride);

// What one ISA does with one tensor type. Every field may be nullptr: the dispatcher (type_ops) then takes
// the generic table's entry for `dot` and `quantize_row`; gemm and panel stay absent (the matmul driver
// multiplies the rows with the dot tiles instead).
struct TypeOps {
    DotTileFn dot = nullptr;              // tiles of rows x activation columns
    GemmPanelFn gemm = nullptr;           // prompt GEMM on the file's rows, per 16-row panel
    PanelFn panel = nullptr;              // matmul on load-time panels (repack_panels)
    // Row quantizer bit-exact with the type's reference (TypeTraits::from_float_ref), n a multiple of the block.
    void (*quantize_row)(const float* x, void* y, int64_t n) = nullptr;
};

struct Kernels {
    Isa isa;
    const char* name;
    // x (k floats, k % 32 == 0) -> k / 32 activation blocks.
    void (*quantize_act)(const float* x, block_q8_act* y, int64_t k);
    // Layer ops (float, n elements).
    void (*rmsnorm)(float* out, const float* x, const float* weight, int64_t n, float eps);
    void (*silu_mul)(float* out, const float* gate, const float* up, int64_t n);  // silu(gate) * up
    float (*dot_f32_f32)(const float* a, const float* b, int64_t n);               // attention scores
    void (*axpy_f32)(float* y, float a, const float* x, int64_t n);                  // y += a * x
    // Optional attention helpers (nullptr: the caller's scalar loop).
    // s[i] = exp(s[i] - sub) for n floats; returns their sum. Within 2 ulp of std::exp for s - sub <= 0
    // (inputs below -87 give about 1e-38 instead of a smaller number).
    float (*exp_sub_sum)(float* s, int64_t n, float sub) = nullptr;
    void (*axpy_f16)(float* y, float a, const uint16_t* x, int64_t n) = nullptr;  // y += a * fp16 x
    // gelu(gate) * up with GELU's tanh approximation (Gemma), written as gate / (1 + exp(-2u)),
    // u = sqrt(2/pi) (gate + 0.044715 gate^3). Null in an ISA's table: the generic one serves.
    void (*gelu_mul)(float* out, const float* gate, const float* up, int64_t n) = nullptr;
    // Attention's probability-weighted sum of value rows for nh query heads that share them:
    //   out[h * hd + d] += sum_{t < n} p[h * p_stride + t] * row_t[d],  h < nh, d < hd,
    // row_t at rows + t * row_stride bytes, float32 elements or (f16) fp16 ones. Null in an ISA's table: the
    // generic one serves.
    void (*weighted_rows)(float* out, int nh, int hd, const float* p, size_t p_stride, const void* rows,
                          size_t row_stride, int64_t n, bool f16) = nullptr;
    // Attention scores of nh query heads against n key rows they share:
    //   s[h * s_stride + t] = scale * dot(q + h * hd, row_t),  h < nh, t < n,
    // row_t at rows + t * row_stride bytes (float32, or fp16 with f16). Null: the generic one serves.
    void (*attn_scores)(const float* q, int nh, int hd, const void* rows, size_t row_stride, int64_t n, bool f16,
                        float scale, float* s, size_t s_stride) = nullptr;
    // Per tensor type, indexed by qtype_index (registry order, lowbit/qtypes.def).
    TypeOps ops[kNumQTypes] = {};

    constexpr TypeOps& at(QType t) { return ops[qtype_index(t)]; }
    constexpr const TypeOps& at(QType t) const { return ops[qtype_index(t)]; }
};

// Table for one ISA, or nullptr when it was not compiled in or this CPU (and OS) cannot run it.
const Kernels* kernels_for(Isa isa);
// The active table: LOWBIT_ISA (generic|avx2|avx512|neon) if set, else the best this CPU supports.
// Throws Error when LOWBIT_ISA names an ISA that is not available.
const Kernels& kernels();
// Force a table for tests and benchmarks (throws Error if unavailable).
void set_isa(Isa isa);
// Names of the ISAs compiled into this build, and of those this CPU can run.
const char* compiled_isas();

// The one dispatcher: the active table's entry for t, with `dot` and `quantize_row` taken from the generic
// table where the active ISA has none (gemm and panel are never borrowed). Throws Error for a type that is
// not in the registry.
const TypeOps& type_ops(QType t);
// Name of the ISA whose kernel type_ops(t).dot / .quantize_row is ("avx512", or "generic" for a fallback).
const char* dot_isa(QType t);
const char* quantize_isa(QType t);

// Does the matmul driver support this weight type?
bool matmul_supported(QType t);
// Bytes of activation scratch needed for n_tok columns of k elements.
size_t act_scratch_bytes(QType wt, int64_t k, int64_t n_tok);

// Y (n_tok, n_out) = X (n_tok, k) @ W^T, W (n_out, k) stored as rows of type wt (rows contiguous,
// w_row_bytes apart). Quantizes X once into `scratch` (act_scratch_bytes) and splits the output rows
// over the pool. With n_tok > 1 it works in tiles so each weight block is read once per kTileCols tokens.
void matmul(QType wt, const void* w, size_t w_row_bytes, int64_t n_out, int64_t k, const float* x,
            int64_t n_tok, float* y, void* scratch, ThreadPool& pool);

// ---- load-time repacked weights ("panels") -------------------------------------------------------
// Q5_0 and the K-quants (Q4_K, Q5_K, Q6_K) have their own panel layouts: cpu/panels_kquants.h.
// Q4_0, Q4_1, Q8_0 and NF4 rows regrouped in panels of kPanelRows rows, per scale block (32 elements; NF4 64)
// of the 16 rows: their scales (fp16 d, then fp16 m for Q4_1; fp32 absmax/127 for NF4), then per 32-element
// sub-block 64-byte vectors whose bytes 4r..4r+3 belong to row r. Nibble types: vector j (0..3) holds, in
// the low nibbles, elements 4j..4j+3 and in the high nibbles 16+4j..16+4j+3 (ggml's Q4 order; NF4 codes are
// rearranged to it). Q8_0: vector j (0..7) holds elements 4j..4j+3 as unsigned bytes w + 128. A 512-bit load
// thus yields the vpdpbusd operands of 16 rows at once. Same size as the rows; only for n_out % 16 == 0.
bool panels_supported(QType t, int64_t n_out, int64_t k);
size_t panels_bytes(QType t, int64_t n_out, int64_t k);
// Rows [p0*16, p1*16) of W (rows w_row_bytes apart) -> panels p0..p1-1 of `out` (the whole tensor's buffer).
void repack_panels(QType t, const void* w, size_t w_row_bytes, int64_t n_out, int64_t k, void* out, int64_t p0,
                   int64_t p1);
// Row `row` of a panel tensor back in the file's row format (row_size bytes at out). Exact for Q4_0, Q4_1
// and Q8_0 (panel_row_exact); NF4 panels keep absmax / 127, so they are not turned back.
bool panel_row_exact(QType t);
void panel_row(QType t, const void* panels, int64_t n_out, int64_t k, int64_t row, void* out);
// As matmul(), on panels. Returns false (and does nothing) when the active kernel table has no panel
// kernel for t; the caller then multiplies the original rows.
bool matmul_panels(QType t, const void* panels, int64_t n_out, int64_t k, const float* x, int64_t n_tok, float* y,
                   void* scratch, ThreadPool& pool);
// Several matrices with the same input (Q/K/V, gate/up): the activations are quantized once and all
// outputs are computed in one pool job (one barrier instead of one per matrix). All or nothing: false
// when any of them has no panel kernel.
struct PanelJob {
    QType type;
    const void* panels;
    int64_t n_out;
    float* y;  // (n_tok, n_out)
};
constexpr int kMaxPanelJobs = 4;
bool matmul_panels_group(const PanelJob* jobs, int n_jobs, int64_t k, const float* x, int64_t n_tok, void* scratch,
                         ThreadPool& pool);

}  // namespace cpu
}  // namespace lowbit

// ---- kernels owner additions
namespace lowbit {
namespace cpu {

// "generic" | "avx2" | "avx512" | "neon" -> Isa; false for any other name.
bool parse_isa(const char* name, Isa* out);
// Drop a set_isa choice: kernels() goes back to LOWBIT_ISA or the best table for this CPU.
void reset_isa();

}  // namespace cpu
}  // namespace lowbit
