// Portable C++ kernels: the table used when no SIMD ISA is available, and the baseline the SIMD tables are tested against.
#include <cmath>
#include <cstring>

#include "cpu/kernels_internal.h"

namespace lowbit {
namespace cpu {
namespace {

using detail::bf16_to_float;
using detail::half_to_float;

void quantize_act_generic(const float* x, block_q8_act* y, int64_t k) {
    for (int64_t b = 0; b < k / 32; ++b) detail::quantize_act_block_ref(x + 32 * b, y + b);
}

template <typename Block>
inline const Block* row_at(const void* w, size_t stride, int r) {
    return reinterpret_cast<const Block*>(static_cast<const uint8_t*>(w) + r * stride);
}
inline const block_q8_act* col_at(const void* x, size_t stride, int c) {
    return reinterpret_cast<const block_q8_act*>(static_cast<const uint8_t*>(x) + c * stride);
}

// Q4_0: w = (q - 8) * d, q low nibble = element j, high nibble = element j + 16.
void dot_q4_0_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y,
                      size_t ys) {
    const int64_t nb = k / 32;
    for (int r = 0; r < nr; ++r) {
        const block_q4_0* wr = row_at<block_q4_0>(w, ws, r);
        for (int c = 0; c < nc; ++c) {
            const block_q8_act* xc = col_at(x, xs, c);
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; ++b) {
                int isum = 0;
                for (int j = 0; j < 16; ++j) {
                    isum += ((wr[b].qs[j] & 0x0f) - 8) * xc[b].qs[j];
                    isum += ((wr[b].qs[j] >> 4) - 8) * xc[b].qs[j + 16];
                }
                acc += static_cast<float>(isum) * (half_to_float(wr[b].d) * xc[b].d);
            }
            y[c * ys + r] = acc;
        }
    }
}

// Q4_1: w = q * d + m, so dot = d * dx * sum(q * qx) + m * s (s = dx * sum(qx)).
void dot_q4_1_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y,
                      size_t ys) {
    const int64_t nb = k / 32;
    for (int r = 0; r < nr; ++r) {
        const block_q4_1* wr = row_at<block_q4_1>(w, ws, r);
        for (int c = 0; c < nc; ++c) {
            const block_q8_act* xc = col_at(x, xs, c);
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; ++b) {
                int isum = 0;
                for (int j = 0; j < 16; ++j) {
                    isum += (wr[b].qs[j] & 0x0f) * xc[b].qs[j];
                    isum += (wr[b].qs[j] >> 4) * xc[b].qs[j + 16];
                }
                acc += static_cast<float>(isum) * (half_to_float(wr[b].d) * xc[b].d) +
                       half_to_float(wr[b].m) * xc[b].s;
            }
            y[c * ys + r] = acc;
        }
    }
}

void dot_q8_0_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y,
                      size_t ys) {
    const int64_t nb = k / 32;
    for (int r = 0; r < nr; ++r) {
        const block_q8_0* wr = row_at<block_q8_0>(w, ws, r);
        for (int c = 0; c < nc; ++c) {
            const block_q8_act* xc = col_at(x, xs, c);
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; ++b) {
                int isum = 0;
                for (int j = 0; j < 32; ++j) isum += wr[b].qs[j] * xc[b].qs[j];
                acc += static_cast<float>(isum) * (half_to_float(wr[b].d) * xc[b].d);
            }
            y[c * ys + r] = acc;
        }
    }
}

// NF4 block of 64 = two activation blocks; qs[j] = q[2j] << 4 | q[2j+1] (bitsandbytes order).
// Integer weights are detail::kNF4Int8 (the runtime approximation documented there), scale absmax/127.
void dot_nf4_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y,
                     size_t ys) {
    const int64_t nb = k / 64;
    for (int r = 0; r < nr; ++r) {
        const block_nf4* wr = row_at<block_nf4>(w, ws, r);
        for (int c = 0; c < nc; ++c) {
            const block_q8_act* xc = col_at(x, xs, c);
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; ++b) {
                const float dw = wr[b].absmax * (1.0f / 127.0f);
                for (int h = 0; h < 2; ++h) {
                    const block_q8_act& xa = xc[2 * b + h];
                    int isum = 0;
                    for (int j = 0; j < 16; ++j) {
                        const uint8_t v = wr[b].qs[16 * h + j];
                        isum += detail::kNF4Int8[v >> 4] * xa.qs[2 * j];
                        isum += detail::kNF4Int8[v & 0x0f] * xa.qs[2 * j + 1];
                    }
                    acc += static_cast<float>(isum) * (dw * xa.d);
                }
            }
            y[c * ys + r] = acc;
        }
    }
}

template <typename T, float (*Load)(T)>
void dot_float_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y,
                       size_t ys) {
    for (int r = 0; r < nr; ++r) {
        const T* wr = reinterpret_cast<const T*>(static_cast<const uint8_t*>(w) + r * ws);
        for (int c = 0; c < nc; ++c) {
            const float* xc = reinterpret_cast<const float*>(static_cast<const uint8_t*>(x) + c * xs);
            float acc = 0.0f;
            for (int64_t j = 0; j < k; ++j) acc += Load(wr[j]) * xc[j];
            y[c * ys + r] = acc;
        }
    }
}
inline float load_f32(float v) { return v; }

void rmsnorm_generic(float* out, const float* x, const float* weight, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float scale = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * weight[i];
}

void silu_mul_generic(float* out, const float* gate, const float* up, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

float dot_f32_f32_generic(const float* a, const float* b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
    return acc;
}

void axpy_f32_generic(float* y, float a, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

const Kernels kGeneric = {
    Isa::Generic,
    "generic",
    quantize_act_generic,
    dot_q4_0_generic,
    dot_q4_1_generic,
    dot_q8_0_generic,
    dot_nf4_generic,
    dot_float_generic<uint16_t, half_to_float>,
    dot_float_generic<uint16_t, bf16_to_float>,
    dot_float_generic<float, load_f32>,
    rmsnorm_generic,
    silu_mul_generic,
    dot_f32_f32_generic,
    axpy_f32_generic,
};

}  // namespace

const Kernels* generic_kernels() { return &kGeneric; }

}  // namespace cpu
}  // namespace lowbit
