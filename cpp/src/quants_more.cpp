// Scalar reference quantizers and dequantizers of Q5_0, Q5_1, IQ4_NL, IQ4_XS and bitsandbytes' FP4.
//
// Q5_0/Q5_1 are bit-exact with gguf.quants and llama.cpp's quantize_row_q5_{0,1}_ref; IQ4_NL/IQ4_XS
// reproduce llama.cpp's quantize_iq4_nl / quantize_iq4_xs without an importance matrix (the path
// llama-quantize takes); FP4 is bit-exact with bitsandbytes' quantize_4bit / dequantize_4bit.
// Formulas, byte layouts and rounding rules: spec/quant-types.md.
#include <cmath>
#include <cstring>

#include "lowbit/types.h"

// Products and sums are rounded one by one, as numpy and llama.cpp's portable C evaluate them: a
// fused multiply-add moves ties (spec/quant-types.md#q4_0). Keep the compiler from contracting them.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace lowbit {

const int8_t kIQ4NLValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) divided by its largest value 12, in
// the order of the 4-bit codes (bit 3 = sign). Index 8 is -0.0, as bitsandbytes' CUDA kernel
// returns it (magnitude times sign); its 0.50.2 CPU kernel returns +0.0 (spec/quant-types.md#fp4).
const float kFP4Codes[16] = {
    0.0f,  0x1.555556p-8f,  0x1.555556p-1f,  1.0f,  0x1.555556p-2f,  0.5f,  0x1.555556p-3f,  0.25f,
    -0.0f, -0x1.555556p-8f, -0x1.555556p-1f, -1.0f, -0x1.555556p-2f, -0.5f, -0x1.555556p-3f, -0.25f,
};

namespace {

// numpy's float -> uint8 cast on x86 (what gguf-py does after np.trunc): truncation through int32,
// where a value that does not fit (inf, NaN) becomes INT32_MIN, low byte 0. In range: plain truncation.
inline uint32_t numpy_to_u8(float v) {
    if (!(std::fabs(v) < 2147483648.0f)) return 0;
    return static_cast<uint32_t>(static_cast<int32_t>(v)) & 0xffu;
}

// Split 32 five-bit values into Q5's two arrays: low nibbles as Q4_0 (byte j = element j | element
// j + 16 << 4), fifth bits in qh, bit j = element j (little-endian 32-bit word).
void pack_q5(const uint8_t q[32], uint8_t qh[4], uint8_t qs[16]) {
    uint32_t h = 0;
    for (int j = 0; j < 32; ++j) h |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
    for (int b = 0; b < 4; ++b) qh[b] = static_cast<uint8_t>(h >> (8 * b));
    for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>((q[j] & 0x0f) | (q[j + 16] & 0x0f) << 4);
}

// The five-bit value of element j of a Q5 block.
inline int q5_value(const uint8_t qh[4], const uint8_t qs[16], int j) {
    const int lo = j < 16 ? qs[j] & 0x0f : qs[j - 16] >> 4;
    return lo | ((qh[j / 8] >> (j % 8)) & 1) << 4;
}

// ---- IQ4 helpers ------------------------------------------------------------------------------

// Index of the table value nearest to v; a value exactly halfway goes to the upper one, and anything
// outside the table's range to its end (llama.cpp's best_index_int8).
inline uint8_t iq4_nearest(float v) {
    if (v <= kIQ4NLValues[0]) return 0;
    if (v >= kIQ4NLValues[15]) return 15;
    int up = 1;  // first index whose value is above v (v is strictly inside the range here)
    while (up < 15 && !(v < kIQ4NLValues[up])) ++up;
    const float below = v - static_cast<float>(kIQ4NLValues[up - 1]);
    const float above = static_cast<float>(kIQ4NLValues[up]) - v;
    return static_cast<uint8_t>(below < above ? up - 1 : up);
}

// Round half to even, as llama.cpp's nearest_int (the 1.5 * 2^23 trick) for the small values it sees
// here; NaN maps to 0 instead of an undefined cast.
inline int round_even_int(float v) {
    if (!(std::fabs(v) < 1048576.0f)) return v > 0 ? 1048576 : (v < 0 ? -1048576 : 0);
    return static_cast<int>(std::nearbyint(v));
}

// Blocks whose largest magnitude is below this are stored as zero scale (llama.cpp's GROUP_MAX_EPS).
constexpr float kIQ4GroupEps = 1e-15f;
// The scale search tries 2 * kIQ4Tries + 1 candidates (llama.cpp's ntry = 7 without an imatrix).
constexpr int kIQ4Tries = 7;

// Best scale for 32 values with the weights w = x^2: start from the scale mapping the first element
// of largest magnitude to +127, then try scales mapping it to -(127 - t), t = -7..7, and keep the
// least-squares scale of whichever index assignment explains the data best (largest sumqx^2/sumq2).
float iq4_block_scale(const float* x) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j) {
        const float a = std::fabs(x[j]);
        if (a > amax) {
            amax = a;
            max = x[j];
        }
    }
    if (amax < kIQ4GroupEps) return 0.0f;
    const float v0 = static_cast<float>(kIQ4NLValues[0]);

    // sum over j of w*q*x and w*q*q for the indices chosen with inverse scale id, accumulated in order.
    auto fit = [x](float id, float* sumqx, float* sumq2) {
        float sx = 0.0f, s2 = 0.0f;
        for (int j = 0; j < 32; ++j) {
            const float q = static_cast<float>(kIQ4NLValues[iq4_nearest(id * x[j])]);
            const float wq = (x[j] * x[j]) * q;
            sx += wq * x[j];
            s2 += wq * q;
        }
        *sumqx = sx;
        *sumq2 = s2;
    };

    float sumqx, sumq2;
    const float d0 = -max / v0;
    fit(1.0f / d0, &sumqx, &sumq2);
    float d = sumq2 > 0 ? sumqx / sumq2 : 0.0f;
    float best = d * sumqx;
    for (int t = -kIQ4Tries; t <= kIQ4Tries; ++t) {
        fit(static_cast<float>(t + kIQ4NLValues[0]) / max, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

// Indices of 32 values for inverse scale id, packed in Q4_0's nibble order.
void iq4_pack(const float* x, float id, uint8_t qs[16]) {
    for (int j = 0; j < 16; ++j)
        qs[j] = static_cast<uint8_t>(iq4_nearest(id * x[j]) | iq4_nearest(id * x[j + 16]) << 4);
}

// ---- FP4 helpers ------------------------------------------------------------------------------

// bitsandbytes sorts the code book (argsort; the two zeros keep their index order 0, 8), takes the
// fp32 midpoints of neighbours as decision bounds and maps the bucket back to the 4-bit code.
struct FP4Table {
    uint8_t order[16];  // code index of the i-th smallest value
    float bounds[15];
    FP4Table() {
        static const uint8_t kOrder[16] = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};
        std::memcpy(order, kOrder, 16);
        for (int i = 0; i < 15; ++i) bounds[i] = (kFP4Codes[order[i]] + kFP4Codes[order[i + 1]]) / 2.0f;
    }
};
const FP4Table& fp4_table() {
    static const FP4Table t;
    return t;
}

// Code of one value, s = clamp(x / absmax) as bitsandbytes computes it: the number of bounds strictly
// below s picks the sorted slot (torch.bucketize, right=False: a tie goes to the lower value). So 0 and
// values down to the first negative bound get code 0, small positive values code 8; NaN gets order[0].
inline uint8_t fp4_index(const FP4Table& t, float x, float inv) {
    float s = x * inv;
    s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
    int n = 0;
    for (int i = 0; i < 15; ++i) n += t.bounds[i] < s;
    return t.order[n];
}

}  // namespace

// ---- Q5_0 --------------------------------------------------------------------------------------

void quantize_row_q5_0_ref(const float* x, block_q5_0* y, int64_t k) {
    for (int64_t i = 0; i < k / QK5_0; ++i, x += QK5_0) {
        // As Q4_0: the first element of largest magnitude, with its sign, maps to q = 0.
        int imax = 0;
        float amax = std::fabs(x[0]);
        for (int j = 1; j < QK5_0; ++j)
            if (std::fabs(x[j]) > amax) {
                amax = std::fabs(x[j]);
                imax = j;
            }
        const float d = x[imax] / -16.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;  // from the unrounded fp32 d
        y[i].d = fp32_to_fp16(d);
        uint8_t q[QK5_0];
        for (int j = 0; j < QK5_0; ++j) {
            // x*id and +16.5 rounded separately, then truncated (spec/quant-types.md#q5_0).
            const float p = x[j] * id;
            const uint32_t v = numpy_to_u8(p + 16.5f);
            q[j] = static_cast<uint8_t>(v > 31 ? 31 : v);
        }
        pack_q5(q, y[i].qh, y[i].qs);
    }
}

void dequantize_row_q5_0(const block_q5_0* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK5_0; ++i, y += QK5_0) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK5_0; ++j) y[j] = static_cast<float>(q5_value(x[i].qh, x[i].qs, j) - 16) * d;
    }
}

// ---- Q5_1 --------------------------------------------------------------------------------------

void quantize_row_q5_1_ref(const float* x, block_q5_1* y, int64_t k) {
    for (int64_t i = 0; i < k / QK5_1; ++i, x += QK5_1) {
        float mn = x[0], mx = x[0];
        for (int j = 1; j < QK5_1; ++j) {
            if (x[j] < mn) mn = x[j];
            if (x[j] > mx) mx = x[j];
        }
        const float d = (mx - mn) / 31.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        y[i].m = fp32_to_fp16(mn);
        uint8_t q[QK5_1];
        for (int j = 0; j < QK5_1; ++j) {
            const float p = (x[j] - mn) * id;
            const uint32_t v = numpy_to_u8(p + 0.5f);
            q[j] = static_cast<uint8_t>(v > 31 ? 31 : v);
        }
        pack_q5(q, y[i].qh, y[i].qs);
    }
}

void dequantize_row_q5_1(const block_q5_1* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK5_1; ++i, y += QK5_1) {
        const float d = fp16_to_fp32(x[i].d);
        const float m = fp16_to_fp32(x[i].m);
        for (int j = 0; j < QK5_1; ++j) y[j] = static_cast<float>(q5_value(x[i].qh, x[i].qs, j)) * d + m;
    }
}

// ---- IQ4_NL ------------------------------------------------------------------------------------

void quantize_row_iq4_nl_ref(const float* x, block_iq4_nl* y, int64_t k) {
    for (int64_t i = 0; i < k / QK4_NL; ++i, x += QK4_NL) {
        const float d = iq4_block_scale(x);
        y[i].d = fp32_to_fp16(d);
        // Indices from the fp32 scale, not the stored fp16 one (as llama.cpp).
        iq4_pack(x, d != 0.0f ? 1.0f / d : 0.0f, y[i].qs);
    }
}

void dequantize_row_iq4_nl(const block_iq4_nl* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK4_NL; ++i, y += QK4_NL) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK4_NL / 2; ++j) {
            y[j] = d * static_cast<float>(kIQ4NLValues[x[i].qs[j] & 0x0f]);
            y[j + QK4_NL / 2] = d * static_cast<float>(kIQ4NLValues[x[i].qs[j] >> 4]);
        }
    }
}

// ---- IQ4_XS ------------------------------------------------------------------------------------

void quantize_row_iq4_xs_ref(const float* x, block_iq4_xs* y, int64_t k) {
    constexpr int kSub = QK_K / 32;
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        float scales[kSub];
        float max_scale = 0.0f, amax_scale = 0.0f;
        for (int s = 0; s < kSub; ++s) {
            scales[s] = iq4_block_scale(x + 32 * s);
            if (std::fabs(scales[s]) > amax_scale) {
                amax_scale = std::fabs(scales[s]);
                max_scale = scales[s];
            }
        }
        // The sub-block scale of largest magnitude becomes -32 * d; a block of zeros stores d = -0.
        const float d = -max_scale / 32.0f;
        y[i].d = fp32_to_fp16(d);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t scales_h = 0;
        std::memset(y[i].scales_l, 0, sizeof(y[i].scales_l));
        for (int s = 0; s < kSub; ++s) {
            int l = round_even_int(id * scales[s]);
            l = l < -32 ? -32 : (l > 31 ? 31 : l);
            // Indices from the fp32 d times the 6-bit scale (not the stored fp16 d).
            const float dl = d * static_cast<float>(l);
            iq4_pack(x + 32 * s, dl != 0.0f ? 1.0f / dl : 0.0f, y[i].qs + 16 * s);
            const int stored = l + 32;
            y[i].scales_l[s / 2] |= static_cast<uint8_t>((stored & 0x0f) << (4 * (s % 2)));
            scales_h |= static_cast<uint16_t>((stored >> 4) << (2 * s));
        }
        y[i].scales_h = scales_h;
    }
}

void dequantize_row_iq4_xs(const block_iq4_xs* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const float d = fp16_to_fp32(x[i].d);
        for (int s = 0; s < QK_K / 32; ++s, y += 32) {
            const int ls = ((x[i].scales_l[s / 2] >> (4 * (s % 2))) & 0x0f) | ((x[i].scales_h >> (2 * s)) & 3) << 4;
            const float dl = d * static_cast<float>(ls - 32);
            const uint8_t* qs = x[i].qs + 16 * s;
            for (int j = 0; j < 16; ++j) {
                y[j] = dl * static_cast<float>(kIQ4NLValues[qs[j] & 0x0f]);
                y[j + 16] = dl * static_cast<float>(kIQ4NLValues[qs[j] >> 4]);
            }
        }
    }
}

// ---- FP4 ---------------------------------------------------------------------------------------

void quantize_row_fp4_ref(const float* x, block_fp4* y, int64_t k) {
    const FP4Table& t = fp4_table();
    for (int64_t i = 0; i < k / QK_FP4; ++i, x += QK_FP4) {
        float amax = 0.0f;
        for (int j = 0; j < QK_FP4; ++j) amax = std::fmax(amax, std::fabs(x[j]));
        // bitsandbytes: x * (1 / max(absmax, 1e-38)), so an all-zero block stores absmax 0 and code 0.
        const float inv = 1.0f / (amax < 1e-38f ? 1e-38f : amax);
        y[i].absmax = amax;
        // bitsandbytes' order: the first element of each pair in the HIGH nibble.
        for (int j = 0; j < QK_FP4 / 2; ++j)
            y[i].qs[j] = static_cast<uint8_t>(fp4_index(t, x[2 * j], inv) << 4 | fp4_index(t, x[2 * j + 1], inv));
    }
}

void dequantize_row_fp4(const block_fp4* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_FP4; ++i, y += QK_FP4) {
        const float a = x[i].absmax;
        for (int j = 0; j < QK_FP4 / 2; ++j) {
            y[2 * j] = kFP4Codes[x[i].qs[j] >> 4] * a;
            y[2 * j + 1] = kFP4Codes[x[i].qs[j] & 0x0f] * a;
        }
    }
}

}  // namespace lowbit
