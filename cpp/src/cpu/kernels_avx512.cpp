// AVX-512 kernels for CPUs without VNNI (AVX-512 F/BW/VL/DQ: the maddubs sequence on 256-bit bodies from
// kernels_x86.inc); compiled without -mavx512vnni so nothing here can use it.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"
#include "cpu/panels_kquants.h"

// GCC 12's AVX-512 intrinsic headers build results on _mm512_undefined_*(), which trips
// -W(maybe-)uninitialized inside the headers themselves (GCC bug 105593); the code here reads no
// uninitialized value.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lowbit {
namespace cpu {
namespace avx512_novnni {
namespace {

#define LOWBIT_X86_VNNI 0
#include "cpu/kernels_x86.inc"
#undef LOWBIT_X86_VNNI

constexpr Kernels make_avx512_table() {
    Kernels t{Isa::AVX512, "avx512", quantize_act_x86, rmsnorm_x86, silu_mul_x86, dot_f32_f32_x86, axpy_f32_x86,
              exp_sub_sum_x86, axpy_f16_x86, gelu_mul_x86};
    t.weighted_rows = weighted_rows_x86;
    t.attn_scores = attn_scores_x86;
    t.at(QType::Q4_0) = {dot_quant<FmtQ4_0>, nullptr, panel_q4_x86<false>,
                         quantize_row_as<block_q4_0, quantize_row_q4_0_avx512>};
    t.at(QType::Q4_1) = {dot_quant<FmtQ4_1>, nullptr, panel_q4_x86<true>,
                         quantize_row_as<block_q4_1, quantize_row_q4_1_avx512>};
    t.at(QType::Q8_0) = {dot_quant<FmtQ8_0>, nullptr, panel_s8_x86<PanelS8Q8_0>,
                         quantize_row_as<block_q8_0, quantize_row_q8_0_avx512>};
    t.at(QType::NF4) = {dot_quant<FmtNF4>, nullptr, panel_s8_x86<PanelS8NF4>, nullptr};
    t.at(QType::F16).dot = dot_float<LoadF16>;
    t.at(QType::BF16).dot = dot_float<LoadBF16>;
    t.at(QType::F32).dot = dot_float<LoadF32>;
    set_added_types_avx2(t);  // the AVX2 kernels of Q5_0 .. Q6_K: no AVX-512 ones without VNNI yet
    return t;
}

const Kernels kTable = make_avx512_table();

}  // namespace
}  // namespace avx512_novnni


const Kernels* avx512_kernels() { return &avx512_novnni::kTable; }

}  // namespace cpu
}  // namespace lowbit
