// Scalar reference quantizers and dequantizers of the K-quants (Q2_K..Q6_K, Q8_K), byte-exact with llama.cpp.
//
// The quantizers reproduce llama.cpp's quantize_row_q*_K_ref (what llama-quantize runs without an importance
// matrix): the same search grids, the same fp32 operation order, the same round-half-even integer trick.
// Formulas, packing and every rounding quirk: spec/quant-types.md#k-quants.
#include <cmath>
#include <cstring>

#include "lowbit/types.h"

// Every product and sum is rounded on its own: llama.cpp's reference is plain C compiled without FMA on
// x86-64, and a fused multiply-add changes which grid point wins a search and which way a value rounds
// (spec/quant-types.md#k-quants). Keep the compiler from contracting across statements, whatever the flags.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace lowbit {

namespace {

// Sub-blocks whose largest |x| is below this are treated as all zero by the symmetric searches.
constexpr float kZeroGroup = 1e-15f;

// Round to the nearest integer, ties to even, by adding 1.5 * 2^23: the fp32 addition does the rounding and
// the integer lands in the low mantissa bits. Valid for |v| < 2^22; outside that range (and for inf/NaN)
// this returns the same bits-derived value llama.cpp's nearest_int does, which keeps the bytes identical.
inline int round_nearest(float v) {
    const float shifted = v + 12582912.0f;
    int32_t bits;
    std::memcpy(&bits, &shifted, 4);
    return (bits & 0x007fffff) - 0x00400000;
}

inline int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ---- the three searches ---------------------------------------------------------------------------

// Affine fit x ~ scale * L - neg_min with L in [0, nmax], min clamped to <= 0 (llama.cpp's
// make_qkx2_quants). Starts from the min/max grid, then tries nstep + 1 scales
// (nmax + rmin + rdelta * is) / (max - min), solving weighted least squares for scale and min on each
// candidate assignment, and keeps a candidate only when its weighted error is strictly smaller. The error
// is sum w * |diff| when use_abs_error, else sum w * diff^2. The running min feeds the later grid points.
// Returns the scale; *neg_min receives -min (>= 0).
float fit_affine(int n, int nmax, const float* x, const float* w, uint8_t* L, uint8_t* trial, float* neg_min,
                 float rmin, float rdelta, int nstep, bool use_abs_error) {
    float lo = x[0];
    float hi = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
        sum_w += w[i];
        const float wx = w[i] * x[i];
        sum_x += wx;
    }
    if (lo > 0) lo = 0;
    if (hi == lo) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *neg_min = -lo;
        return 0.0f;
    }
    float iscale = static_cast<float>(nmax) / (hi - lo);
    float scale = 1.0f / iscale;
    float best_err = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float t = iscale * (x[i] - lo);
        L[i] = static_cast<uint8_t>(clamp_int(round_nearest(t), 0, nmax));
        const float sl = scale * static_cast<float>(L[i]);
        const float y = sl + lo;
        float diff = y - x[i];
        diff = use_abs_error ? std::fabs(diff) : diff * diff;
        const float e = w[i] * diff;
        best_err += e;
    }
    if (nstep < 1) {
        *neg_min = -lo;
        return scale;
    }
    for (int is = 0; is <= nstep; ++is) {
        const float step = rdelta * static_cast<float>(is);
        const float top = (rmin + step) + static_cast<float>(nmax);
        iscale = top / (hi - lo);
        float s_l = 0.0f, s_l2 = 0.0f, s_xl = 0.0f;
        for (int i = 0; i < n; ++i) {
            const float t = iscale * (x[i] - lo);
            const int l = clamp_int(round_nearest(t), 0, nmax);
            trial[i] = static_cast<uint8_t>(l);
            const float fl = static_cast<float>(l);
            const float wl = w[i] * fl;
            s_l += wl;
            const float wll = wl * fl;
            s_l2 += wll;
            const float wlx = wl * x[i];
            s_xl += wlx;
        }
        const float a = sum_w * s_l2;
        const float b = s_l * s_l;
        const float det = a - b;
        if (!(det > 0)) continue;
        const float sc_p = sum_w * s_xl;
        const float sc_q = sum_x * s_l;
        float cand_scale = (sc_p - sc_q) / det;
        const float mn_p = s_l2 * sum_x;
        const float mn_q = s_l * s_xl;
        float cand_min = (mn_p - mn_q) / det;
        if (cand_min > 0) {
            cand_min = 0;
            cand_scale = s_xl / s_l2;
        }
        float err = 0.0f;
        for (int i = 0; i < n; ++i) {
            const float sl = cand_scale * static_cast<float>(trial[i]);
            const float y = sl + cand_min;
            float diff = y - x[i];
            diff = use_abs_error ? std::fabs(diff) : diff * diff;
            const float e = w[i] * diff;
            err += e;
        }
        if (err < best_err) {
            std::memcpy(L, trial, static_cast<size_t>(n));
            best_err = err;
            scale = cand_scale;
            lo = cand_min;
        }
    }
    *neg_min = -lo;
    return scale;
}

// Sums of the x^2-weighted least-squares fit of x ~ scale * l (weight w = x^2).
struct WeightedSums {
    float lx = 0.0f;
    float l2 = 0.0f;
    void add(float x, float l) {
        const float w = x * x;
        const float wx = w * x;
        const float wxl = wx * l;
        lx += wxl;
        const float wl = w * l;
        const float wll = wl * l;
        l2 += wll;
    }
};

// Symmetric fit x ~ scale * (L - nmax), L in [0, 2 nmax - 1], weights x^2 (llama.cpp's make_qx_quants with
// rmse_type 1 and no importance weights). The reference grid puts the signed largest value on -nmax; then
// 18 more grids, iscale = -(nmax + 0.1 is) / max for is = -9..9 without 0, each accepted when it raises
// lx^2 / l2 (compared as lx * lx > best * l2). Returns the least-squares scale of the winner.
float fit_symmetric_x2(int n, int nmax, const float* x, int8_t* L) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float ax = std::fabs(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < kZeroGroup) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.0f;
    }
    float iscale = static_cast<float>(-nmax) / max;
    WeightedSums s;
    for (int i = 0; i < n; ++i) {
        const int l = clamp_int(round_nearest(iscale * x[i]), -nmax, nmax - 1);
        L[i] = static_cast<int8_t>(l + nmax);
        s.add(x[i], static_cast<float>(l));
    }
    float scale = s.l2 != 0.0f ? s.lx / s.l2 : 0.0f;
    float best = scale * s.lx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        const float tenth = 0.1f * static_cast<float>(is);
        const float top = static_cast<float>(nmax) + tenth;
        iscale = -top / max;
        WeightedSums t;
        for (int i = 0; i < n; ++i) {
            const int l = clamp_int(round_nearest(iscale * x[i]), -nmax, nmax - 1);
            t.add(x[i], static_cast<float>(l));
        }
        const float lhs = t.lx * t.lx;
        const float rhs = best * t.l2;
        if (t.l2 > 0 && lhs > rhs) {
            for (int i = 0; i < n; ++i)
                L[i] = static_cast<int8_t>(nmax + clamp_int(round_nearest(iscale * x[i]), -nmax, nmax - 1));
            scale = t.lx / t.l2;
            best = scale * t.lx;
        }
    }
    return scale;
}

// Symmetric 3-bit fit (llama.cpp's make_q3_quants with do_rmse): start from the grid that puts the signed
// largest value on -nmax, then up to 5 coordinate-descent passes: each element in turn is moved to
// round(x * l2' / lx') where the primes drop its own term, kept when lx^2 / l2 strictly grows (compared as
// lx'^2 * l2 > lx^2 * l2'). Returns lx / l2; L ends in [0, 2 nmax - 1] (all zero for an all-zero group).
float fit_symmetric_q3(int n, int nmax, const float* x, int8_t* L) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float ax = std::fabs(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < kZeroGroup) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.0f;
    }
    const float iscale = static_cast<float>(-nmax) / max;
    WeightedSums s;
    for (int i = 0; i < n; ++i) {
        const int l = clamp_int(round_nearest(iscale * x[i]), -nmax, nmax - 1);
        L[i] = static_cast<int8_t>(l);
        s.add(x[i], static_cast<float>(l));
    }
    for (int pass = 0; pass < 5; ++pass) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = x[i] * x[i];
            const float wx = w * x[i];
            const float cur = static_cast<float>(L[i]);
            const float own_lx = wx * cur;
            float lx = s.lx - own_lx;
            if (!(lx > 0)) continue;
            const float wl = w * cur;
            const float own_l2 = wl * cur;
            float l2 = s.l2 - own_l2;
            const float xl2 = x[i] * l2;
            const int nl = clamp_int(round_nearest(xl2 / lx), -nmax, nmax - 1);
            if (nl == L[i]) continue;
            const float fnl = static_cast<float>(nl);
            const float add_lx = wx * fnl;
            lx += add_lx;
            const float wnl = w * fnl;
            const float add_l2 = wnl * fnl;
            l2 += add_l2;
            const float lhs0 = lx * lx;
            const float lhs = lhs0 * s.l2;
            const float rhs0 = s.lx * s.lx;
            const float rhs = rhs0 * l2;
            if (l2 > 0 && lhs > rhs) {
                L[i] = static_cast<int8_t>(nl);
                s.lx = lx;
                s.l2 = l2;
                ++changed;
            }
        }
        if (changed == 0) break;
    }
    for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
    return s.l2 > 0.0f ? s.lx / s.l2 : 0.0f;
}

// ---- scale packing ----------------------------------------------------------------------------------

// Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins in 12 bytes (llama.cpp's get_scale_min_k4).
// Sub-blocks 0-3: bytes j and j+4 hold scale and min in their low 6 bits. Sub-blocks 4-7: byte j+4 holds the
// low nibbles (scale low, min high); the top 2 bits come from bits 6-7 of bytes j-4 (scale) and j (min).
inline void scale_min_k4(int j, const uint8_t* s, uint8_t* sc, uint8_t* mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = static_cast<uint8_t>((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4));
        *mn = static_cast<uint8_t>((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// Inverse of scale_min_k4 for all eight sub-blocks (ls, lm each <= 63).
void pack_scale_min_k4(const uint8_t* ls, const uint8_t* lm, uint8_t* s) {
    for (int j = 0; j < 4; ++j) {
        s[j] = ls[j];
        s[j + 4] = lm[j];
    }
    for (int j = 4; j < 8; ++j) {
        s[j + 4] = static_cast<uint8_t>((ls[j] & 0x0f) | ((lm[j] & 0x0f) << 4));
        s[j - 4] = static_cast<uint8_t>(s[j - 4] | ((ls[j] >> 4) << 6));
        s[j] = static_cast<uint8_t>(s[j] | ((lm[j] >> 4) << 6));
    }
}

// Q3_K: sixteen 6-bit values (scale + 32). Low nibbles: value j < 8 in the low nibble of byte j, value j >= 8
// in the high nibble of byte j - 8. High 2 bits: bits 2 (j / 4) .. 2 (j / 4) + 1 of byte 8 + j % 4.
inline int q3_scale(const uint8_t* s, int j) {
    const int low = j < 8 ? (s[j] & 0x0f) : (s[j - 8] >> 4);
    const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    return (low | (high << 4)) - 32;
}

// Q2_K / Q3_K low bits: in each 128-element chunk, byte l holds elements l, l+32, l+64, l+96 at bits 0, 2, 4, 6.
void pack_2bit(const uint8_t* L, uint8_t* qs) {
    for (int c = 0; c < QK_K / 128; ++c) {
        const uint8_t* l4 = L + 128 * c;
        for (int l = 0; l < 32; ++l)
            qs[32 * c + l] =
                static_cast<uint8_t>(l4[l] | (l4[l + 32] << 2) | (l4[l + 64] << 4) | (l4[l + 96] << 6));
    }
}

// The signed element with the largest magnitude (the first one on ties); its magnitude in *amax.
inline float signed_absmax(const float* v, int n, float* amax) {
    float best = 0.0f, a = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float av = std::fabs(v[i]);
        if (av > a) {
            a = av;
            best = v[i];
        }
    }
    *amax = a;
    return best;
}

// Final pass shared by Q2_K/Q4_K/Q5_K: requantize each sub-block against the stored (fp16-rounded) scale and
// min, q = round((x + dm) / d) in [0, nmax]. A sub-block whose effective d is 0 keeps the search's L.
void requantize_affine(const float* x, int n, float d, float dm, int nmax, uint8_t* L) {
    if (d == 0.0f) return;
    for (int i = 0; i < n; ++i) {
        const float shifted = x[i] + dm;
        L[i] = static_cast<uint8_t>(clamp_int(round_nearest(shifted / d), 0, nmax));
    }
}

// Q4_K / Q5_K front half: per 32-element sub-block affine fits, 6-bit scale and min codes, fp16 d and dmin.
// Leaves the final q in L (0..nmax).
template <typename Block>
void quantize_affine_32(const float* x, Block& y, int nmax, float rmin, int nstep, uint8_t* L) {
    constexpr int kSub = QK_K / 32;
    float scales[kSub], mins[kSub], w[32];
    uint8_t trial[32];
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < kSub; ++j) {
        const float* xs = x + 32 * j;
        float sum_x2 = 0.0f;
        for (int l = 0; l < 32; ++l) {
            const float sq = xs[l] * xs[l];
            sum_x2 += sq;
        }
        const float av_x = std::sqrt(sum_x2 / 32.0f);
        for (int l = 0; l < 32; ++l) w[l] = av_x + std::fabs(xs[l]);
        scales[j] = fit_affine(32, nmax, xs, w, L + 32 * j, trial, &mins[j], rmin, 0.1f, nstep, false);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    uint8_t ls[kSub], lm[kSub];
    for (int j = 0; j < kSub; ++j) {
        // Stored through uint8 first, then capped at 63 (a negative code wraps before the cap, as llama.cpp).
        const uint8_t a = static_cast<uint8_t>(round_nearest(inv_scale * scales[j]));
        const uint8_t b = static_cast<uint8_t>(round_nearest(inv_min * mins[j]));
        ls[j] = a < 63 ? a : 63;
        lm[j] = b < 63 ? b : 63;
    }
    pack_scale_min_k4(ls, lm, y.scales);
    y.d = fp32_to_fp16(max_scale / 63.0f);
    y.dmin = fp32_to_fp16(max_min / 63.0f);
    const float d_all = fp16_to_fp32(y.d), dmin_all = fp16_to_fp32(y.dmin);
    for (int j = 0; j < kSub; ++j) {
        uint8_t sc, mn;
        scale_min_k4(j, y.scales, &sc, &mn);
        const float d = d_all * static_cast<float>(sc);
        const float dm = dmin_all * static_cast<float>(mn);
        requantize_affine(x + 32 * j, 32, d, dm, nmax, L + 32 * j);
    }
}

}  // namespace

// ---- Q2_K ---------------------------------------------------------------------------------------------

void quantize_row_q2_K_ref(const float* x, block_q2_K* y, int64_t k) {
    constexpr int kSub = QK_K / 16;
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        uint8_t L[QK_K], trial[16];
        float scales[kSub], mins[kSub], w[16];
        float max_scale = 0.0f, max_min = 0.0f;
        for (int j = 0; j < kSub; ++j) {
            const float* xs = x + 16 * j;
            for (int l = 0; l < 16; ++l) w[l] = std::fabs(xs[l]);
            scales[j] = fit_affine(16, 3, xs, w, L + 16 * j, trial, &mins[j], -0.5f, 0.1f, 15, true);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        block_q2_K& b = y[i];
        // 4-bit codes, scale in the low nibble and min in the high one; codes are not clamped (a value
        // outside 0..15 wraps into the byte exactly as llama.cpp's int-to-uint8 store does).
        if (max_scale > 0) {
            const float iscale = 15.0f / max_scale;
            for (int j = 0; j < kSub; ++j) b.scales[j] = static_cast<uint8_t>(round_nearest(iscale * scales[j]));
            b.d = fp32_to_fp16(max_scale / 15.0f);
        } else {
            std::memset(b.scales, 0, sizeof b.scales);
            b.d = fp32_to_fp16(0.0f);
        }
        if (max_min > 0) {
            const float iscale = 15.0f / max_min;
            for (int j = 0; j < kSub; ++j) {
                const uint32_t code = static_cast<uint32_t>(round_nearest(iscale * mins[j]));
                b.scales[j] = static_cast<uint8_t>(b.scales[j] | (code << 4));
            }
            b.dmin = fp32_to_fp16(max_min / 15.0f);
        } else {
            b.dmin = fp32_to_fp16(0.0f);
        }
        const float d_all = fp16_to_fp32(b.d), dmin_all = fp16_to_fp32(b.dmin);
        for (int j = 0; j < kSub; ++j) {
            const float d = d_all * static_cast<float>(b.scales[j] & 0x0f);
            const float dm = dmin_all * static_cast<float>(b.scales[j] >> 4);
            requantize_affine(x + 16 * j, 16, d, dm, 3, L + 16 * j);
        }
        pack_2bit(L, b.qs);
    }
}

void dequantize_row_q2_K(const block_q2_K* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_K; ++i, y += QK_K) {
        const float d = fp16_to_fp32(x[i].d), dmin = fp16_to_fp32(x[i].dmin);
        for (int e = 0; e < QK_K; ++e) {
            const int c = e / 128, s = (e % 128) / 32, l = e % 32;  // chunk, bit pair, byte in the chunk
            const uint8_t sc = x[i].scales[e / 16];
            const float dl = d * static_cast<float>(sc & 0x0f);
            const float ml = dmin * static_cast<float>(sc >> 4);
            const int q = (x[i].qs[32 * c + l] >> (2 * s)) & 3;
            const float v = dl * static_cast<float>(q);
            y[e] = v - ml;
        }
    }
}

// ---- Q3_K ---------------------------------------------------------------------------------------------

void quantize_row_q3_K_ref(const float* x, block_q3_K* y, int64_t k) {
    constexpr int kSub = QK_K / 16;
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        int8_t L[QK_K];
        float scales[kSub];
        for (int j = 0; j < kSub; ++j) scales[j] = fit_symmetric_q3(16, 4, x + 16 * j, L + 16 * j);
        float amax;
        const float max_scale = signed_absmax(scales, kSub, &amax);
        block_q3_K& b = y[i];
        std::memset(b.scales, 0, sizeof b.scales);
        if (max_scale != 0.0f) {
            const float iscale = -32.0f / max_scale;
            for (int j = 0; j < kSub; ++j) {
                // Narrowed to int8 before the clamp, as llama.cpp stores it.
                const int8_t r = static_cast<int8_t>(round_nearest(iscale * scales[j]));
                const int code = clamp_int(r, -32, 31) + 32;  // 0..63
                if (j < 8) b.scales[j] = static_cast<uint8_t>(code & 0x0f);
                else b.scales[j - 8] = static_cast<uint8_t>(b.scales[j - 8] | ((code & 0x0f) << 4));
                b.scales[8 + j % 4] = static_cast<uint8_t>(b.scales[8 + j % 4] | ((code >> 4) << (2 * (j / 4))));
            }
            b.d = fp32_to_fp16(1.0f / iscale);  // 1/iscale, not max_scale/-32: the two can round differently
        } else {
            b.d = fp32_to_fp16(0.0f);
        }
        const float d_all = fp16_to_fp32(b.d);
        for (int j = 0; j < kSub; ++j) {
            const float d = d_all * static_cast<float>(q3_scale(b.scales, j));
            if (d == 0.0f) continue;
            for (int l = 0; l < 16; ++l)
                L[16 * j + l] = static_cast<int8_t>(clamp_int(round_nearest(x[16 * j + l] / d), -4, 3) + 4);
        }
        // Bit 2 of each q goes to hmask: element e sets bit e / 32 of byte e % 32; the rest is 2-bit packed.
        std::memset(b.hmask, 0, sizeof b.hmask);
        uint8_t low[QK_K];
        for (int e = 0; e < QK_K; ++e) {
            int q = L[e];
            if (q > 3) {
                b.hmask[e % 32] = static_cast<uint8_t>(b.hmask[e % 32] | (1 << (e / 32)));
                q -= 4;
            }
            low[e] = static_cast<uint8_t>(q);
        }
        pack_2bit(low, b.qs);
    }
}

void dequantize_row_q3_K(const block_q3_K* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_K; ++i, y += QK_K) {
        const float d = fp16_to_fp32(x[i].d);
        for (int e = 0; e < QK_K; ++e) {
            const int c = e / 128, s = (e % 128) / 32, l = e % 32;
            const float dl = d * static_cast<float>(q3_scale(x[i].scales, e / 16));
            const int low = (x[i].qs[32 * c + l] >> (2 * s)) & 3;
            const int q = low - ((x[i].hmask[l] >> (e / 32)) & 1 ? 0 : 4);
            y[e] = dl * static_cast<float>(q);
        }
    }
}

// ---- Q4_K ---------------------------------------------------------------------------------------------

void quantize_row_q4_K_ref(const float* x, block_q4_K* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        uint8_t L[QK_K];
        quantize_affine_32(x, y[i], 15, -1.0f, 20, L);
        // Each 64-element chunk: 32 bytes, low nibble = element l, high nibble = element l + 32.
        for (int c = 0; c < QK_K / 64; ++c)
            for (int l = 0; l < 32; ++l)
                y[i].qs[32 * c + l] = static_cast<uint8_t>(L[64 * c + l] | (L[64 * c + l + 32] << 4));
    }
}

void dequantize_row_q4_K(const block_q4_K* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_K; ++i, y += QK_K) {
        const float d = fp16_to_fp32(x[i].d), dmin = fp16_to_fp32(x[i].dmin);
        for (int j = 0; j < QK_K / 32; ++j) {
            uint8_t sc, mn;
            scale_min_k4(j, x[i].scales, &sc, &mn);
            const float dl = d * static_cast<float>(sc);
            const float ml = dmin * static_cast<float>(mn);
            const uint8_t* qs = x[i].qs + 32 * (j / 2);
            const int shift = 4 * (j % 2);
            for (int l = 0; l < 32; ++l) {
                const float v = dl * static_cast<float>((qs[l] >> shift) & 0x0f);
                y[32 * j + l] = v - ml;
            }
        }
    }
}

// ---- Q5_K ---------------------------------------------------------------------------------------------

void quantize_row_q5_K_ref(const float* x, block_q5_K* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        uint8_t L[QK_K];
        quantize_affine_32(x, y[i], 31, -0.5f, 15, L);
        // Low nibbles as Q4_K; the fifth bit of sub-block j (element 32 j + l) is bit j of qh[l].
        std::memset(y[i].qh, 0, sizeof y[i].qh);
        for (int c = 0; c < QK_K / 64; ++c) {
            for (int l = 0; l < 32; ++l) {
                const int q0 = L[64 * c + l], q1 = L[64 * c + l + 32];
                y[i].qh[l] = static_cast<uint8_t>(y[i].qh[l] | ((q0 >> 4) << (2 * c)) | ((q1 >> 4) << (2 * c + 1)));
                y[i].qs[32 * c + l] = static_cast<uint8_t>((q0 & 0x0f) | ((q1 & 0x0f) << 4));
            }
        }
    }
}

void dequantize_row_q5_K(const block_q5_K* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_K; ++i, y += QK_K) {
        const float d = fp16_to_fp32(x[i].d), dmin = fp16_to_fp32(x[i].dmin);
        for (int j = 0; j < QK_K / 32; ++j) {
            uint8_t sc, mn;
            scale_min_k4(j, x[i].scales, &sc, &mn);
            const float dl = d * static_cast<float>(sc);
            const float ml = dmin * static_cast<float>(mn);
            const uint8_t* qs = x[i].qs + 32 * (j / 2);
            const int shift = 4 * (j % 2);
            for (int l = 0; l < 32; ++l) {
                const int q = ((qs[l] >> shift) & 0x0f) | (((x[i].qh[l] >> j) & 1) << 4);
                const float v = dl * static_cast<float>(q);
                y[32 * j + l] = v - ml;
            }
        }
    }
}

// ---- Q6_K ---------------------------------------------------------------------------------------------

void quantize_row_q6_K_ref(const float* x, block_q6_K* y, int64_t k) {
    constexpr int kSub = QK_K / 16;
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        int8_t L[QK_K];
        float scales[kSub];
        for (int j = 0; j < kSub; ++j) scales[j] = fit_symmetric_x2(16, 32, x + 16 * j, L + 16 * j);
        float amax;
        const float max_scale = signed_absmax(scales, kSub, &amax);
        block_q6_K& b = y[i];
        if (amax < kZeroGroup) {
            std::memset(&b, 0, sizeof b);
            continue;
        }
        const float iscale = -128.0f / max_scale;
        b.d = fp32_to_fp16(1.0f / iscale);
        for (int j = 0; j < kSub; ++j) {
            const int r = round_nearest(iscale * scales[j]);
            b.scales[j] = static_cast<int8_t>(r < 127 ? r : 127);
        }
        const float d_all = fp16_to_fp32(b.d);
        for (int j = 0; j < kSub; ++j) {
            const float d = d_all * static_cast<float>(b.scales[j]);
            if (d == 0.0f) continue;
            for (int l = 0; l < 16; ++l)
                L[16 * j + l] = static_cast<int8_t>(clamp_int(round_nearest(x[16 * j + l] / d), -32, 31) + 32);
        }
        // Per 128-element chunk c: ql[64c + l] holds elements l (low) and l+64 (high), ql[64c + 32 + l] holds
        // l+32 and l+96; qh[32c + l] holds the top 2 bits of l, l+32, l+64, l+96 at bits 0, 2, 4, 6.
        for (int c = 0; c < QK_K / 128; ++c) {
            const int8_t* q = L + 128 * c;
            for (int l = 0; l < 32; ++l) {
                b.ql[64 * c + l] = static_cast<uint8_t>((q[l] & 0x0f) | ((q[l + 64] & 0x0f) << 4));
                b.ql[64 * c + l + 32] = static_cast<uint8_t>((q[l + 32] & 0x0f) | ((q[l + 96] & 0x0f) << 4));
                b.qh[32 * c + l] = static_cast<uint8_t>((q[l] >> 4) | ((q[l + 32] >> 4) << 2) |
                                                        ((q[l + 64] >> 4) << 4) | ((q[l + 96] >> 4) << 6));
            }
        }
    }
}

void dequantize_row_q6_K(const block_q6_K* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_K; ++i, y += QK_K) {
        const float d = fp16_to_fp32(x[i].d);
        for (int e = 0; e < QK_K; ++e) {
            const int c = e / 128, part = (e % 128) / 32, l = e % 32;  // part: which 32 of the chunk
            const uint8_t lo_byte = x[i].ql[64 * c + 32 * (part & 1) + l];
            const int lo = (part < 2 ? lo_byte : lo_byte >> 4) & 0x0f;
            const int hi = (x[i].qh[32 * c + l] >> (2 * part)) & 3;
            const float dl = d * static_cast<float>(x[i].scales[e / 16]);
            y[e] = dl * static_cast<float>((lo | (hi << 4)) - 32);
        }
    }
}

// ---- Q8_K ---------------------------------------------------------------------------------------------

void quantize_row_q8_K_ref(const float* x, block_q8_K* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        block_q8_K& b = y[i];
        float amax;
        const float max = signed_absmax(x, QK_K, &amax);
        if (amax == 0.0f) {
            // llama.cpp leaves bsums unwritten here; zeros are the sums of the zero codes.
            std::memset(&b, 0, sizeof b);
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; ++j) {
            const int r = round_nearest(iscale * x[j]);
            b.qs[j] = static_cast<int8_t>(r < 127 ? r : 127);
        }
        for (int g = 0; g < QK_K / 16; ++g) {
            int sum = 0;
            for (int l = 0; l < 16; ++l) sum += b.qs[16 * g + l];
            b.bsums[g] = static_cast<int16_t>(sum);
        }
        b.d = 1.0f / iscale;  // fp32, not max / -127
    }
}

void dequantize_row_q8_K(const block_q8_K* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_K; ++i, y += QK_K)
        for (int j = 0; j < QK_K; ++j) y[j] = x[i].d * static_cast<float>(x[i].qs[j]);
}

}  // namespace lowbit
