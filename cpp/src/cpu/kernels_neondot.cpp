// AArch64 NEON kernels for CPUs with the dotprod extension (sdot integer dots, load-time panels); bodies in kernels_neon.inc.
#include <arm_neon.h>

#include <cmath>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"

namespace lowbit {
namespace cpu {
namespace neon_dot {
namespace {

#define LOWBIT_NEON_DOTPROD 1
#include "cpu/kernels_neon.inc"
#undef LOWBIT_NEON_DOTPROD

constexpr Kernels make_neondot_table() {
    Kernels t{Isa::NEON, "neon", quantize_act_neon, rmsnorm_neon, silu_mul_neon, dot_f32_f32_neon, axpy_f32_neon};
    t.at(QType::Q4_0).dot = dot_quant<FmtQ4_0>;
    t.at(QType::Q4_1).dot = dot_quant<FmtQ4_1>;
    t.at(QType::Q8_0).dot = dot_quant<FmtQ8_0>;
    t.at(QType::NF4).dot = dot_quant<FmtNF4>;
    t.at(QType::F16).dot = dot_float<LoadF16>;
    t.at(QType::BF16).dot = dot_float<LoadBF16>;
    t.at(QType::F32).dot = dot_float<LoadF32>;
    t.at(QType::Q4_0).panel = panel_neon<kPQ4_0>;
    t.at(QType::Q4_1).panel = panel_neon<kPQ4_1>;
    t.at(QType::Q8_0).panel = panel_neon<kPQ8_0>;
    t.at(QType::NF4).panel = panel_neon<kPNF4>;
    // The types added with the K-quants (cpu/kernels_more.h, cpu/dot_more_neondot.cpp)
    t.at(QType::Q4_K).dot = dot_q4_K_neondot;
    t.at(QType::Q6_K).dot = dot_q6_K_neondot;
    t.at(QType::Q5_0).dot = dot_q5_0_neondot;
    t.at(QType::Q5_K).dot = dot_q5_K_neondot;
    t.at(QType::IQ4_XS).dot = dot_iq4_xs_neondot;
    t.at(QType::IQ4_NL).dot = dot_iq4_nl_neondot;
    t.at(QType::Q3_K).dot = dot_q3_K_neondot;
    t.at(QType::Q2_K).dot = dot_q2_K_neondot;
    t.at(QType::Q5_1).dot = dot_q5_1_neondot;
    t.at(QType::FP4).dot = dot_fp4_neondot;
    return t;
}

const Kernels kTable = make_neondot_table();

}  // namespace
}  // namespace neon_dot

const Kernels* neondot_kernels() { return &neon_dot::kTable; }

}  // namespace cpu
}  // namespace lowbit
