// AArch64 NEON dot-tile kernels of Q5_0, Q5_1, IQ4_NL, IQ4_XS, FP4 and the K-quants for CPUs without dotprod (widening multiplies); bodies in dot_more_neon.inc.
#ifdef LOWBIT_HAVE_NEON

#include <arm_neon.h>

#include <cstring>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"

namespace lowbit {
namespace cpu {
namespace {

#define LOWBIT_NEON_DOTPROD 0
#include "cpu/dot_more_neon.inc"
#undef LOWBIT_NEON_DOTPROD

}  // namespace

void dot_q4_K_neon(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_neon<NeonQ4_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q6_K_neon(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_neon<NeonQ6_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q5_0_neon(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_neon<NeonQ5_0>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q5_K_neon(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_neon<NeonQ5_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_iq4_xs_neon(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_neon<NeonIQ4_XS>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_iq4_nl_neon(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_neon<NeonIQ4_NL>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q3_K_neon(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_neon<NeonQ3_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q2_K_neon(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_neon<NeonQ2_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q5_1_neon(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_neon<NeonQ5_1>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_fp4_neon(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_neon<NeonFP4>(k, w, ws, nr, x, xs, nc, y, ys);
}

}  // namespace cpu
}  // namespace lowbit

#endif  // LOWBIT_HAVE_NEON
