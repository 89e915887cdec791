// AArch64 NEON kernels: sdot (vdotq_s32, ARMv8.2 dotprod) integer dots when the CPU has them, else widening multiplies.
#include <arm_neon.h>

#include <cmath>

#include "cpu/kernels_internal.h"

namespace lowbit {
namespace cpu {
namespace neon {
namespace {

static_assert(kTileRows == 4 && kTileCols == 4, "tile tables below assume 4 x 4");

using detail::bf16_to_float;
using detail::half_to_float;

inline float half_scalar(uint16_t h) { return half_to_float(h); }

// ---- activation quantizer (bit-exact with detail::quantize_act_block_ref) ----------------------------
void quantize_act_neon(const float* x, block_q8_act* y, int64_t k) {
    for (int64_t b = 0; b < k / 32; ++b, x += 32) {
        float32x4_t v[8];
        float32x4_t amax = vdupq_n_f32(0.0f);
        for (int i = 0; i < 8; ++i) {
            v[i] = vld1q_f32(x + 4 * i);
            amax = vmaxq_f32(amax, vabsq_f32(v[i]));
        }
        const float d = vmaxvq_f32(amax) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int32x4_t qsum = vdupq_n_s32(0);
        int16x8_t q16[4];
        for (int i = 0; i < 4; ++i) {
            // FCVTAS rounds to nearest with ties away from zero: exactly roundf (spec/quant-types.md#runtime).
            const int32x4_t a = vcvtaq_s32_f32(vmulq_n_f32(v[2 * i], id));
            const int32x4_t c = vcvtaq_s32_f32(vmulq_n_f32(v[2 * i + 1], id));
            qsum = vaddq_s32(qsum, vaddq_s32(a, c));
            q16[i] = vcombine_s16(vqmovn_s32(a), vqmovn_s32(c));
        }
        vst1q_s8(y[b].qs, vcombine_s8(vqmovn_s16(q16[0]), vqmovn_s16(q16[1])));
        vst1q_s8(y[b].qs + 16, vcombine_s8(vqmovn_s16(q16[2]), vqmovn_s16(q16[3])));
        y[b].d = d;
        y[b].s = d * static_cast<float>(vaddvq_s32(qsum));
    }
}

// ---- integer dot of 32 int8 pairs into int32 lanes ---------------------------------------------------
template <bool kDot>
inline int32x4_t dot32(int8x16_t w0, int8x16_t w1, int8x16_t x0, int8x16_t x1) {
    if (kDot) {
#if defined(__ARM_FEATURE_DOTPROD)
        return vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, x0), w1, x1);
#endif
    }
    // |w*x| <= 128*127, so two products fit an int16 lane.
    int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
    p0 = vmlal_s8(p0, vget_high_s8(w0), vget_high_s8(x0));
    int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
    p1 = vmlal_s8(p1, vget_high_s8(w1), vget_high_s8(x1));
    return vpadalq_s16(vpaddlq_s16(p0), p1);
}

// ---- weight formats: one weight block -> S pairs of int8x16 (32 signed weights each) + scale (+ min) ---
struct FmtQ4_0 {
    using Block = block_q4_0;
    static constexpr int S = 1;
    static constexpr bool kMin = false;
    static inline void load(const Block* b, int8x16_t (*w)[2], float* d, float*) {
        // low nibble = element j, high nibble = element j + 16 (ggml order); w = q - 8
        const uint8x16_t v = vld1q_u8(b->qs);
        const int8x16_t eight = vdupq_n_s8(8);
        w[0][0] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))), eight);
        w[0][1] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), eight);
        *d = half_scalar(b->d);
    }
};

struct FmtQ4_1 {
    using Block = block_q4_1;
    static constexpr int S = 1;
    static constexpr bool kMin = true;
    static inline void load(const Block* b, int8x16_t (*w)[2], float* d, float* m) {
        const uint8x16_t v = vld1q_u8(b->qs);
        w[0][0] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f)));
        w[0][1] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        *d = half_scalar(b->d);
        *m = half_scalar(b->m);
    }
};

struct FmtQ8_0 {
    using Block = block_q8_0;
    static constexpr int S = 1;
    static constexpr bool kMin = false;
    static inline void load(const Block* b, int8x16_t (*w)[2], float* d, float*) {
        w[0][0] = vld1q_s8(b->qs);
        w[0][1] = vld1q_s8(b->qs + 16);
        *d = half_scalar(b->d);
    }
};

struct FmtNF4 {
    using Block = block_nf4;
    static constexpr int S = 2;
    static constexpr bool kMin = false;
    static inline void load(const Block* b, int8x16_t (*w)[2], float* d, float*) {
        // kNF4Int8 is the documented runtime approximation; element 2j sits in the HIGH nibble of qs[j].
        const int8x16_t lut = vld1q_s8(detail::kNF4Int8);
        for (int h = 0; h < 2; ++h) {
            const uint8x16_t v = vld1q_u8(b->qs + 16 * h);
            const int8x16_t hi = vqtbl1q_s8(lut, vshrq_n_u8(v, 4));
            const int8x16_t lo = vqtbl1q_s8(lut, vandq_u8(v, vdupq_n_u8(0x0f)));
            w[h][0] = vzip1q_s8(hi, lo);
            w[h][1] = vzip2q_s8(hi, lo);
        }
        *d = b->absmax * (1.0f / 127.0f);
    }
};

template <class F, bool kDot, int NR, int NC>
void tile_quant(int64_t k, const void* w, size_t ws, const void* x, size_t xs, float* y, size_t ys) {
    using Block = typename F::Block;
    constexpr int S = F::S;
    const int64_t nbw = k / (32 * S);
    const Block* wr[NR];
    for (int r = 0; r < NR; ++r) wr[r] = reinterpret_cast<const Block*>(static_cast<const uint8_t*>(w) + r * ws);
    const block_q8_act* xc[NC];
    for (int c = 0; c < NC; ++c) xc[c] = reinterpret_cast<const block_q8_act*>(static_cast<const uint8_t*>(x) + c * xs);
    float32x4_t acc[NR][NC];
    float accm[NR][NC];
    for (int r = 0; r < NR; ++r) {
        for (int c = 0; c < NC; ++c) {
            acc[r][c] = vdupq_n_f32(0.0f);
            accm[r][c] = 0.0f;
        }
    }
    for (int64_t b = 0; b < nbw; ++b) {
        int8x16_t wv[NR][2][2];
        float dw[NR], mw[NR];
        for (int r = 0; r < NR; ++r) F::load(wr[r] + b, wv[r], &dw[r], &mw[r]);
        for (int s = 0; s < S; ++s) {
            for (int c = 0; c < NC; ++c) {
                const block_q8_act& xb = xc[c][b * S + s];
                const int8x16_t x0 = vld1q_s8(xb.qs), x1 = vld1q_s8(xb.qs + 16);
                for (int r = 0; r < NR; ++r) {
                    const int32x4_t isum = dot32<kDot>(wv[r][s][0], wv[r][s][1], x0, x1);
                    acc[r][c] = vfmaq_n_f32(acc[r][c], vcvtq_f32_s32(isum), dw[r] * xb.d);
                    if (F::kMin) accm[r][c] += mw[r] * xb.s;
                }
            }
        }
    }
    for (int r = 0; r < NR; ++r) {
        for (int c = 0; c < NC; ++c) y[c * ys + r] = vaddvq_f32(acc[r][c]) + accm[r][c];
    }
}

// ---- float weights ---------------------------------------------------------------------------------
struct LoadF16 {
    using T = uint16_t;
    static inline float32x4_t load4(const T* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
    static inline float load1(T v) { return half_to_float(v); }
};
struct LoadBF16 {
    using T = uint16_t;
    static inline float32x4_t load4(const T* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
    static inline float load1(T v) { return bf16_to_float(v); }
};
struct LoadF32 {
    using T = float;
    static inline float32x4_t load4(const T* p) { return vld1q_f32(p); }
    static inline float load1(T v) { return v; }
};

template <class L, bool kDot, int NR, int NC>
void tile_float(int64_t k, const void* w, size_t ws, const void* x, size_t xs, float* y, size_t ys) {
    using T = typename L::T;
    const T* wr[NR];
    for (int r = 0; r < NR; ++r) wr[r] = reinterpret_cast<const T*>(static_cast<const uint8_t*>(w) + r * ws);
    const float* xc[NC];
    for (int c = 0; c < NC; ++c) xc[c] = reinterpret_cast<const float*>(static_cast<const uint8_t*>(x) + c * xs);
    float32x4_t acc[NR][NC];
    for (int r = 0; r < NR; ++r) {
        for (int c = 0; c < NC; ++c) acc[r][c] = vdupq_n_f32(0.0f);
    }
    const int64_t k4 = k / 4 * 4;
    for (int64_t j = 0; j < k4; j += 4) {
        float32x4_t xv[NC];
        for (int c = 0; c < NC; ++c) xv[c] = vld1q_f32(xc[c] + j);
        for (int r = 0; r < NR; ++r) {
            const float32x4_t wv = L::load4(wr[r] + j);
            for (int c = 0; c < NC; ++c) acc[r][c] = vfmaq_f32(acc[r][c], wv, xv[c]);
        }
    }
    for (int r = 0; r < NR; ++r) {
        for (int c = 0; c < NC; ++c) {
            float s = vaddvq_f32(acc[r][c]);
            for (int64_t j = k4; j < k; ++j) s += L::load1(wr[r][j]) * xc[c][j];
            y[c * ys + r] = s;
        }
    }
}

using TileImpl = void (*)(int64_t, const void*, size_t, const void*, size_t, float*, size_t);

#define LOWBIT_TILE_ROW(K, P, D, R) {&K<P, D, R, 1>, &K<P, D, R, 2>, &K<P, D, R, 3>, &K<P, D, R, 4>}
#define LOWBIT_TILE_TABLE(K, P, D) \
    {LOWBIT_TILE_ROW(K, P, D, 1), LOWBIT_TILE_ROW(K, P, D, 2), LOWBIT_TILE_ROW(K, P, D, 3), LOWBIT_TILE_ROW(K, P, D, 4)}

template <class F, bool kDot>
void dot_quant(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    static const TileImpl table[4][4] = LOWBIT_TILE_TABLE(tile_quant, F, kDot);
    table[nr - 1][nc - 1](k, w, ws, x, xs, y, ys);
}

template <class L>
void dot_float(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    static const TileImpl table[4][4] = LOWBIT_TILE_TABLE(tile_float, L, false);
    table[nr - 1][nc - 1](k, w, ws, x, xs, y, ys);
}

#undef LOWBIT_TILE_TABLE
#undef LOWBIT_TILE_ROW

// ---- layer ops ----------------------------------------------------------------------------------------
void rmsnorm_neon(float* out, const float* x, const float* weight, int64_t n, float eps) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        acc = vfmaq_f32(acc, v, v);
    }
    float ss = vaddvq_f32(acc);
    for (; i < n; ++i) ss += x[i] * x[i];
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (i = 0; i + 4 <= n; i += 4) {
        vst1q_f32(out + i, vmulq_f32(vmulq_n_f32(vld1q_f32(x + i), scale), vld1q_f32(weight + i)));
    }
    for (; i < n; ++i) out[i] = x[i] * scale * weight[i];
}

void silu_mul_neon(float* out, const float* gate, const float* up, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

float dot_f32_f32_neon(const float* a, const float* b, int64_t n) {
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
        acc1 = vfmaq_f32(acc1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
    }
    for (; i + 4 <= n; i += 4) acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(acc0, acc1));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

void axpy_f32_neon(float* y, float a, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; ++i) y[i] += a * x[i];
}

// ---- load-time panels (kernels.h, repack_panels), with sdot ------------------------------------------
// A 64-byte panel vector is four q-registers of 4 rows each. vdotq_laneq_s32 multiplies a register of 4 rows'
// dwords with one activation dword (a lane of the 32-byte activation block), so 32 sdot cover 16 rows x 32
// elements. sdot is signed x signed: Q8_0's stored w + 128 is flipped back and NF4 codes map to kNF4Int8
// directly, so only Q4_0 (-8 offset) and Q4_1 (minimum) need the activation-sum term.
#if defined(__ARM_FEATURE_DOTPROD)
enum PanelType { kPQ4_0, kPQ4_1, kPQ8_0, kPNF4 };

template <int kLane>
inline void sdot4(int32x4_t* acc, const int8x16_t* w, int8x16_t x) {
    for (int q = 0; q < 4; ++q) acc[q] = vdotq_laneq_s32(acc[q], w[q], x, kLane);
}

template <int T>
void panel_neon(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t xs, int64_t n_tok, float* y,
                size_t ys) {
    constexpr int kSub = T == kPNF4 ? 2 : 1;
    constexpr int kScaleBytes = (T == kPQ4_1 || T == kPNF4) ? 64 : 32;
    constexpr int kSubBytes = T == kPQ8_0 ? 512 : 256;
    constexpr int64_t kBlockBytes = kScaleBytes + kSub * kSubBytes;
    constexpr bool kTerm = T == kPQ4_0 || T == kPQ4_1;
    const int64_t n_sb = k / (32 * kSub);
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    const int8x16_t lut = vld1q_s8(lowbit::cpu::detail::kNF4Int8);
    for (int64_t p = 0; p < n_panels; ++p) {
        const uint8_t* panel = static_cast<const uint8_t*>(panels) + p * n_sb * kBlockBytes;
        for (int64_t c = 0; c < n_tok; ++c) {
            const auto* xb = reinterpret_cast<const block_q8_act*>(static_cast<const uint8_t*>(x) + c * xs);
            float32x4_t acc[4], acc2[4];
            for (int q = 0; q < 4; ++q) acc[q] = acc2[q] = vdupq_n_f32(0.0f);
            for (int64_t sb = 0; sb < n_sb; ++sb) {
                const uint8_t* pb = panel + sb * kBlockBytes;
                float32x4_t dw[4], cw[4];
                for (int q = 0; q < 4; ++q) {
                    if (T == kPNF4) {
                        dw[q] = vld1q_f32(reinterpret_cast<const float*>(pb) + 4 * q);
                    } else {
                        dw[q] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(pb) + 4 * q)));
                    }
                    cw[q] = T == kPQ4_1 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(pb + 32) + 4 * q)))
                                        : dw[q];
                }
                for (int g = 0; g < kSub; ++g) {
                    const block_q8_act& a = xb[sb * kSub + g];
                    const int8x16_t x0 = vld1q_s8(a.qs), x1 = vld1q_s8(a.qs + 16);
                    const uint8_t* pv = pb + kScaleBytes + g * kSubBytes;
                    int32x4_t is[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
                    if (T == kPQ8_0) {
                        int8x16_t w[8][4];
                        for (int j = 0; j < 8; ++j) {
                            for (int q = 0; q < 4; ++q) {
                                w[j][q] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(pv + 64 * j + 16 * q), vdupq_n_u8(0x80)));
                            }
                        }
                        sdot4<0>(is, w[0], x0); sdot4<1>(is, w[1], x0); sdot4<2>(is, w[2], x0); sdot4<3>(is, w[3], x0);
                        sdot4<0>(is, w[4], x1); sdot4<1>(is, w[5], x1); sdot4<2>(is, w[6], x1); sdot4<3>(is, w[7], x1);
                    } else {
                        int8x16_t lo[4][4], hi[4][4];
                        for (int j = 0; j < 4; ++j) {
                            for (int q = 0; q < 4; ++q) {
                                const uint8x16_t v = vld1q_u8(pv + 64 * j + 16 * q);
                                const uint8x16_t l = vandq_u8(v, m4), h = vshrq_n_u8(v, 4);
                                lo[j][q] = T == kPNF4 ? vqtbl1q_s8(lut, l) : vreinterpretq_s8_u8(l);
                                hi[j][q] = T == kPNF4 ? vqtbl1q_s8(lut, h) : vreinterpretq_s8_u8(h);
                            }
                        }
                        // low nibbles: elements 4j.. (x0 lane j); high nibbles: 16 + 4j.. (x1 lane j)
                        sdot4<0>(is, lo[0], x0); sdot4<1>(is, lo[1], x0); sdot4<2>(is, lo[2], x0); sdot4<3>(is, lo[3], x0);
                        sdot4<0>(is, hi[0], x1); sdot4<1>(is, hi[1], x1); sdot4<2>(is, hi[2], x1); sdot4<3>(is, hi[3], x1);
                    }
                    for (int q = 0; q < 4; ++q) {
                        acc[q] = vfmaq_f32(acc[q], vcvtq_f32_s32(is[q]), vmulq_n_f32(dw[q], a.d));
                        if (kTerm) acc2[q] = vfmaq_n_f32(acc2[q], cw[q], a.s);
                    }
                }
            }
            float* out = y + c * ys + p * kPanelRows;
            for (int q = 0; q < 4; ++q) {
                const float32x4_t r = kTerm ? vfmaq_n_f32(acc[q], acc2[q], T == kPQ4_0 ? -8.0f : 1.0f) : acc[q];
                vst1q_f32(out + 4 * q, r);
            }
        }
    }
}
#endif

template <bool kDot>
constexpr Kernels make_table() {
    Kernels t{Isa::NEON, "neon", quantize_act_neon, rmsnorm_neon, silu_mul_neon, dot_f32_f32_neon, axpy_f32_neon};
    t.at(QType::Q4_0).dot = dot_quant<FmtQ4_0, kDot>;
    t.at(QType::Q4_1).dot = dot_quant<FmtQ4_1, kDot>;
    t.at(QType::Q8_0).dot = dot_quant<FmtQ8_0, kDot>;
    t.at(QType::NF4).dot = dot_quant<FmtNF4, kDot>;
    t.at(QType::F16).dot = dot_float<LoadF16>;
    t.at(QType::BF16).dot = dot_float<LoadBF16>;
    t.at(QType::F32).dot = dot_float<LoadF32>;
#if defined(__ARM_FEATURE_DOTPROD)
    if (kDot) {  // load-time panels need sdot
        t.at(QType::Q4_0).panel = panel_neon<kPQ4_0>;
        t.at(QType::Q4_1).panel = panel_neon<kPQ4_1>;
        t.at(QType::Q8_0).panel = panel_neon<kPQ8_0>;
        t.at(QType::NF4).panel = panel_neon<kPNF4>;
    }
#endif
    return t;
}

const Kernels kDotprod = make_table<true>();
const Kernels kPlain = make_table<false>();

}  // namespace
}  // namespace neon

const Kernels* neon_kernels(bool dotprod) {
#if defined(__ARM_FEATURE_DOTPROD)
    return dotprod ? &neon::kDotprod : &neon::kPlain;
#else
    return &neon::kPlain;
#endif
}

}  // namespace cpu
}  // namespace lowbit
