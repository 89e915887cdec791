// AVX2 + FMA + F16C kernels (256-bit, vpmaddubsw integer dots); bodies in kernels_x86.inc.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"
#include "cpu/panels_kquants.h"

namespace lowbit {
namespace cpu {
namespace avx2 {
namespace {

#define LOWBIT_X86_VNNI 0
#include "cpu/kernels_x86.inc"
#undef LOWBIT_X86_VNNI

constexpr Kernels make_avx2_table() {
    Kernels t{Isa::AVX2, "avx2", quantize_act_x86, rmsnorm_x86, silu_mul_x86, dot_f32_f32_x86, axpy_f32_x86,
              exp_sub_sum_x86, axpy_f16_x86, gelu_mul_x86};
    t.weighted_rows = weighted_rows_x86;
    t.attn_scores = attn_scores_x86;
    // Per-call prompt GEMM on rows: the AVX-512 VNNI table only. Load-time panels: Q4_0/Q4_1 unsigned nibbles;
    // Q8_0 and NF4 signed weights with the sign trick.
    t.at(QType::Q4_0) = {dot_quant<FmtQ4_0>, nullptr, panel_q4_x86<false>, quantize_row_as<block_q4_0, quantize_row_q4_0_avx2>};
    t.at(QType::Q4_1) = {dot_quant<FmtQ4_1>, nullptr, panel_q4_x86<true>, quantize_row_as<block_q4_1, quantize_row_q4_1_avx2>};
    t.at(QType::Q8_0) = {dot_quant<FmtQ8_0>, nullptr, panel_s8_x86<PanelS8Q8_0>, quantize_row_as<block_q8_0, quantize_row_q8_0_avx2>};
    t.at(QType::NF4) = {dot_quant<FmtNF4>, nullptr, panel_s8_x86<PanelS8NF4>, nullptr};
    t.at(QType::F16).dot = dot_float<LoadF16>;
    t.at(QType::BF16).dot = dot_float<LoadBF16>;
    t.at(QType::F32).dot = dot_float<LoadF32>;
    set_added_types_avx2(t);  // Q5_0, Q5_1, IQ4_NL, IQ4_XS, FP4, Q2_K..Q6_K
    return t;
}

const Kernels kAvx2 = make_avx2_table();

}  // namespace
}  // namespace avx2

const Kernels* avx2_kernels() { return &avx2::kAvx2; }

}  // namespace cpu
}  // namespace lowbit
