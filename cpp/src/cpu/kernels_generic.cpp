// Portable C++ kernels: the table used when no SIMD ISA is available, and the baseline the SIMD tables are tested against.
#include <cmath>
#include <cstring>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"

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

// Integer dot of 32 int8 pairs; written as a plain loop over unpacked arrays so compilers vectorize it
// with the baseline ISA (SSE2 pmaddwd, NEON smlal).
inline int dot32_i8(const int8_t* a, const int8_t* b) {
    int sum = 0;
    for (int j = 0; j < 32; ++j) sum += a[j] * b[j];
    return sum;
}

// Weight formats: unpack one weight block into S groups of 32 int8 weights, a float scale, and a minimum.
struct GenQ4_0 {  // w = (q - 8) * d; low nibble = element j, high nibble = element j + 16
    using Block = block_q4_0;
    static constexpr int S = 1;
    static constexpr bool kMin = false;
    static void unpack(const Block& b, int8_t* w, float* d, float*) {
        for (int j = 0; j < 16; ++j) {
            w[j] = static_cast<int8_t>((b.qs[j] & 0x0f) - 8);
            w[j + 16] = static_cast<int8_t>((b.qs[j] >> 4) - 8);
        }
        *d = half_to_float(b.d);
    }
};
struct GenQ4_1 {  // w = q * d + m, so dot = d * dx * sum(q * qx) + m * s (s = dx * sum(qx))
    using Block = block_q4_1;
    static constexpr int S = 1;
    static constexpr bool kMin = true;
    static void unpack(const Block& b, int8_t* w, float* d, float* m) {
        for (int j = 0; j < 16; ++j) {
            w[j] = static_cast<int8_t>(b.qs[j] & 0x0f);
            w[j + 16] = static_cast<int8_t>(b.qs[j] >> 4);
        }
        *d = half_to_float(b.d);
        *m = half_to_float(b.m);
    }
};
struct GenQ8_0 {
    using Block = block_q8_0;
    static constexpr int S = 1;
    static constexpr bool kMin = false;
    static void unpack(const Block& b, int8_t* w, float* d, float*) {
        std::memcpy(w, b.qs, 32);
        *d = half_to_float(b.d);
    }
};
// NF4 block of 64 = two activation blocks; qs[j] = q[2j] << 4 | q[2j+1] (bitsandbytes order).
// Integer weights are detail::kNF4Int8 (the runtime approximation documented there), scale absmax/127.
struct GenNF4 {
    using Block = block_nf4;
    static constexpr int S = 2;
    static constexpr bool kMin = false;
    static void unpack(const Block& b, int8_t* w, float* d, float*) {
        for (int j = 0; j < 32; ++j) {
            w[2 * j] = detail::kNF4Int8[b.qs[j] >> 4];
            w[2 * j + 1] = detail::kNF4Int8[b.qs[j] & 0x0f];
        }
        *d = b.absmax * (1.0f / 127.0f);
    }
};

template <class F>
void dot_quant_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y,
                       size_t ys) {
    using Block = typename F::Block;
    const int64_t nbw = k / (32 * F::S);
    float acc[kTileRows][kTileCols] = {};
    alignas(32) int8_t wq[kTileRows][32 * F::S];
    float dw[kTileRows], mw[kTileRows] = {};
    for (int64_t b = 0; b < nbw; ++b) {
        for (int r = 0; r < nr; ++r) F::unpack(row_at<Block>(w, ws, r)[b], wq[r], &dw[r], &mw[r]);
        for (int c = 0; c < nc; ++c) {
            const block_q8_act* xc = col_at(x, xs, c) + b * F::S;
            for (int r = 0; r < nr; ++r) {
                for (int s = 0; s < F::S; ++s) {
                    const int isum = dot32_i8(wq[r] + 32 * s, xc[s].qs);
                    acc[r][c] += static_cast<float>(isum) * (dw[r] * xc[s].d);
                    if (F::kMin) acc[r][c] += mw[r] * xc[s].s;
                }
            }
        }
    }
    for (int r = 0; r < nr; ++r) {
        for (int c = 0; c < nc; ++c) y[c * ys + r] = acc[r][c];
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

void gelu_mul_generic(float* out, const float* gate, const float* up, int64_t n) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    for (int64_t i = 0; i < n; ++i) {
        const float g = gate[i];
        out[i] = 0.5f * g * (1.0f + std::tanh(kSqrt2OverPi * (g + 0.044715f * g * g * g))) * up[i];
    }
}

float dot_f32_f32_generic(const float* a, const float* b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
    return acc;
}

void axpy_f32_generic(float* y, float a, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void weighted_rows_generic(float* out, int nh, int hd, const float* p, size_t p_stride, const void* rows,
                           size_t row_stride, int64_t n, bool f16) {
    for (int64_t t = 0; t < n; ++t) {
        const uint8_t* row = static_cast<const uint8_t*>(rows) + t * row_stride;
        for (int h = 0; h < nh; ++h) {
            const float w = p[h * p_stride + t];
            float* o = out + static_cast<int64_t>(h) * hd;
            if (f16) {
                for (int d = 0; d < hd; ++d) {
                    uint16_t v;
                    std::memcpy(&v, row + 2 * d, 2);
                    o[d] += w * half_to_float(v);
                }
            } else {
                for (int d = 0; d < hd; ++d) {
                    float v;
                    std::memcpy(&v, row + 4 * d, 4);
                    o[d] += w * v;
                }
            }
        }
    }
}

void attn_scores_generic(const float* q, int nh, int hd, const void* rows, size_t row_stride, int64_t n, bool f16,
                         float scale, float* s, size_t s_stride) {
    for (int64_t t = 0; t < n; ++t) {
        const uint8_t* row = static_cast<const uint8_t*>(rows) + t * row_stride;
        for (int h = 0; h < nh; ++h) {
            const float* qh = q + static_cast<int64_t>(h) * hd;
            float acc = 0.0f;
            for (int d = 0; d < hd; ++d) {
                float v;
                if (f16) {
                    uint16_t b;
                    std::memcpy(&b, row + 2 * d, 2);
                    v = half_to_float(b);
                } else {
                    std::memcpy(&v, row + 4 * d, 4);
                }
                acc += qh[d] * v;
            }
            s[h * s_stride + t] = acc * scale;
        }
    }
}

constexpr Kernels make_generic_table() {
    Kernels t{Isa::Generic, "generic", quantize_act_generic, rmsnorm_generic, silu_mul_generic, dot_f32_f32_generic,
              axpy_f32_generic};
    t.gelu_mul = gelu_mul_generic;
    t.weighted_rows = weighted_rows_generic;
    t.attn_scores = attn_scores_generic;
    t.at(QType::Q4_0).dot = dot_quant_generic<GenQ4_0>;
    t.at(QType::Q4_1).dot = dot_quant_generic<GenQ4_1>;
    t.at(QType::Q8_0).dot = dot_quant_generic<GenQ8_0>;
    t.at(QType::NF4).dot = dot_quant_generic<GenNF4>;
    t.at(QType::F16).dot = dot_float_generic<uint16_t, half_to_float>;
    t.at(QType::BF16).dot = dot_float_generic<uint16_t, bf16_to_float>;
    t.at(QType::F32).dot = dot_float_generic<float, load_f32>;
    // The types added with the K-quants (cpu/kernels_more.h)
    t.at(QType::Q5_0).dot = dot_q5_0_generic;
    t.at(QType::Q5_1).dot = dot_q5_1_generic;
    t.at(QType::IQ4_NL).dot = dot_iq4_nl_generic;
    t.at(QType::IQ4_XS).dot = dot_iq4_xs_generic;
    t.at(QType::FP4).dot = dot_fp4_generic;
    t.at(QType::Q2_K).dot = dot_q2_K_generic;
    t.at(QType::Q3_K).dot = dot_q3_K_generic;
    t.at(QType::Q4_K).dot = dot_q4_K_generic;
    t.at(QType::Q5_K).dot = dot_q5_K_generic;
    t.at(QType::Q6_K).dot = dot_q6_K_generic;
    return t;
}

const Kernels kGeneric = make_generic_table();

}  // namespace

const Kernels* generic_kernels() { return &kGeneric; }

}  // namespace cpu
}  // namespace lowbit
