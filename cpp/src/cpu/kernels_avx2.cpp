// AVX2 + FMA + F16C kernels (256-bit, vpmaddubsw integer dots); bodies in kernels_x86.inc.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/kernels_internal.h"

namespace lowbit {
namespace cpu {
namespace avx2 {
namespace {

#define LOWBIT_X86_VNNI 0
#include "cpu/kernels_x86.inc"
#undef LOWBIT_X86_VNNI

const Kernels kAvx2 = {
    Isa::AVX2,
    "avx2",
    quantize_act_x86,
    dot_quant<FmtQ4_0>,
    dot_quant<FmtQ4_1>,
    dot_quant<FmtQ8_0>,
    dot_quant<FmtNF4>,
    dot_float<LoadF16>,
    dot_float<LoadBF16>,
    dot_float<LoadF32>,
    rmsnorm_x86,
    silu_mul_x86,
    dot_f32_f32_x86,
    axpy_f32_x86,
    nullptr,  // per-call prompt GEMM: the AVX-512 VNNI table only
    nullptr,
    nullptr,
    nullptr,
    panel_q4_x86<false>,  // load-time panels: Q4_0
    panel_q4_x86<true>,   // Q4_1
    panel_s8_x86<PanelS8Q8_0>,  // Q8_0 and NF4: signed weights, sign trick
    panel_s8_x86<PanelS8NF4>,
    exp_sub_sum_x86,
    axpy_f16_x86,
};

}  // namespace
}  // namespace avx2

const Kernels* avx2_kernels() { return &avx2::kAvx2; }

}  // namespace cpu
}  // namespace lowbit
