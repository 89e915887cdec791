// AArch64 NEON kernels for CPUs without the dotprod extension (ARMv8.2-A + fp16, widening-multiply integer dots); bodies in kernels_neon.inc.
#include <arm_neon.h>

#include <cmath>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"

namespace lowbit {
namespace cpu {
namespace neon_plain {
namespace {

#define LOWBIT_NEON_DOTPROD 0
#include "cpu/kernels_neon.inc"
#undef LOWBIT_NEON_DOTPROD

constexpr Kernels make_neon_table() {
    Kernels t{Isa::NEON, "neon", quantize_act_neon, rmsnorm_neon, silu_mul_neon, dot_f32_f32_neon, axpy_f32_neon};
    // No load-time panels: they are built on sdot (kernels_neondot.cpp).
    t.at(QType::Q4_0).dot = dot_quant<FmtQ4_0>;
    t.at(QType::Q4_1).dot = dot_quant<FmtQ4_1>;
    t.at(QType::Q8_0).dot = dot_quant<FmtQ8_0>;
    t.at(QType::NF4).dot = dot_quant<FmtNF4>;
    t.at(QType::F16).dot = dot_float<LoadF16>;
    t.at(QType::BF16).dot = dot_float<LoadBF16>;
    t.at(QType::F32).dot = dot_float<LoadF32>;
    // The types added with the K-quants (cpu/kernels_more.h, cpu/dot_more_neon.cpp)
    t.at(QType::Q4_K).dot = dot_q4_K_neon;
    t.at(QType::Q6_K).dot = dot_q6_K_neon;
    t.at(QType::Q5_0).dot = dot_q5_0_neon;
    t.at(QType::Q5_K).dot = dot_q5_K_neon;
    t.at(QType::IQ4_XS).dot = dot_iq4_xs_neon;
    t.at(QType::IQ4_NL).dot = dot_iq4_nl_neon;
    t.at(QType::Q3_K).dot = dot_q3_K_neon;
    t.at(QType::Q2_K).dot = dot_q2_K_neon;
    t.at(QType::Q5_1).dot = dot_q5_1_neon;
    t.at(QType::FP4).dot = dot_fp4_neon;
    return t;
}

const Kernels kTable = make_neon_table();

}  // namespace
}  // namespace neon_plain

const Kernels* neon_kernels() { return &neon_plain::kTable; }

}  // namespace cpu
}  // namespace lowbit
