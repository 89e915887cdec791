// Scalar reference quantizers and dequantizers: the oracle every SIMD and CUDA kernel must match.
//
// Q4_0/Q4_1/Q8_0 are bit-exact with llama.cpp's gguf-py (gguf.quants), NF4/NF4_DQ with bitsandbytes'
// reference (PyTorch) kernels. Formulas and rounding rules: spec/quant-types.md.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "lowbit/types.h"

// Every product and sum below is rounded on its own, as numpy evaluates them: a fused multiply-add
// would change ties (spec/quant-types.md#q4_0). Keep the compiler from contracting them.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace lowbit {

const float kNF4Codes[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

const float kDynamicCodes[256] = {
    -0.992968738079071f, -0.9789062738418579f, -0.96484375f, -0.9507812261581421f, -0.936718761920929f,
    -0.922656238079071f, -0.9085937738418579f, -0.89453125f, -0.8804687261581421f, -0.866406261920929f,
    -0.852343738079071f, -0.8382812738418579f, -0.82421875f, -0.8101562261581421f, -0.796093761920929f,
    -0.782031238079071f, -0.7679687738418579f, -0.75390625f, -0.7398437261581421f, -0.725781261920929f,
    -0.7117187976837158f, -0.6976562738418579f, -0.68359375f, -0.6695312261581421f, -0.655468761920929f,
    -0.6414062976837158f, -0.6273437738418579f, -0.61328125f, -0.5992187261581421f, -0.585156261920929f,
    -0.5710937976837158f, -0.5570312738418579f, -0.54296875f, -0.5289062261581421f, -0.5148437023162842f,
    -0.500781238079071f, -0.48671871423721313f, -0.47265625f, -0.4585937261581421f, -0.44453126192092896f,
    -0.43046873807907104f, -0.4164062440395355f, -0.40234375f, -0.3882812261581421f, -0.37421876192092896f,
    -0.36015623807907104f, -0.3460937440395355f, -0.33203125f, -0.3179687261581421f, -0.30390626192092896f,
    -0.28984373807907104f, -0.2757812738418579f, -0.26171875f, -0.24765624105930328f, -0.23359374701976776f,
    -0.21953125298023224f, -0.20546874403953552f, -0.19140625f, -0.17734375596046448f, -0.16328124701976776f,
    -0.14921875298023224f, -0.13515624403953552f, -0.12109375f, -0.10703125596046448f, -0.09859374910593033f,
    -0.09578125923871994f, -0.09296875447034836f, -0.09015624970197678f, -0.08734375238418579f,
    -0.08453124761581421f, -0.08171875774860382f, -0.07890625298023224f, -0.07609374821186066f,
    -0.07328125089406967f, -0.07046874612569809f, -0.0676562562584877f, -0.06484375149011612f,
    -0.062031250447034836f, -0.05921875312924385f, -0.05640624836087227f, -0.053593751043081284f, -0.05078125f,
    -0.047968748956918716f, -0.04515625163912773f, -0.04234374687075615f, -0.039531249552965164f,
    -0.03671875223517418f, -0.033906251192092896f, -0.031093750149011612f, -0.028281250968575478f,
    -0.025468749925494194f, -0.02265625074505806f, -0.019843751564621925f, -0.017031250521540642f,
    -0.014218750409781933f, -0.011406250298023224f, -0.009718749672174454f, -0.009156249463558197f,
    -0.008593750186264515f, -0.008031249977648258f, -0.0074687497690320015f, -0.006906250026077032f,
    -0.006343749817460775f, -0.005781250074505806f, -0.0052187503315508366f, -0.0046562496572732925f,
    -0.004093749914318323f, -0.0035312497057020664f, -0.002968749962747097f, -0.002406249986961484f,
    -0.001843750011175871f, -0.001281249918974936f, -0.0009437500848434865f, -0.0008312499849125743f,
    -0.0007187500596046448f, -0.0006062500760890543f, -0.000493750034365803f, -0.0003812500217463821f,
    -0.0002687500382307917f, -0.00015625001105945557f, -8.874999912222847e-05f, -6.625000241911039e-05f,
    -4.374999844003469e-05f, -2.1249998098937795e-05f, -7.749999895168003e-06f, -3.250000190746505e-06f,
    -5.500000384017767e-07f, 0.0f, 5.500000384017767e-07f, 3.250000190746505e-06f, 7.749999895168003e-06f,
    2.1249998098937795e-05f, 4.374999844003469e-05f, 6.625000241911039e-05f, 8.874999912222847e-05f,
    0.00015625001105945557f, 0.0002687500382307917f, 0.0003812500217463821f, 0.000493750034365803f,
    0.0006062500760890543f, 0.0007187500596046448f, 0.0008312499849125743f, 0.0009437500848434865f,
    0.001281249918974936f, 0.001843750011175871f, 0.002406249986961484f, 0.002968749962747097f,
    0.0035312497057020664f, 0.004093749914318323f, 0.0046562496572732925f, 0.0052187503315508366f,
    0.005781250074505806f, 0.006343749817460775f, 0.006906250026077032f, 0.0074687497690320015f,
    0.008031249977648258f, 0.008593750186264515f, 0.009156249463558197f, 0.009718749672174454f,
    0.011406250298023224f, 0.014218750409781933f, 0.017031250521540642f, 0.019843751564621925f,
    0.02265625074505806f, 0.025468749925494194f, 0.028281250968575478f, 0.031093750149011612f,
    0.033906251192092896f, 0.03671875223517418f, 0.039531249552965164f, 0.04234374687075615f,
    0.04515625163912773f, 0.047968748956918716f, 0.05078125f, 0.053593751043081284f, 0.05640624836087227f,
    0.05921875312924385f, 0.062031250447034836f, 0.06484375149011612f, 0.0676562562584877f,
    0.07046874612569809f, 0.07328125089406967f, 0.07609374821186066f, 0.07890625298023224f,
    0.08171875774860382f, 0.08453124761581421f, 0.08734375238418579f, 0.09015624970197678f,
    0.09296875447034836f, 0.09578125923871994f, 0.09859374910593033f, 0.10703125596046448f, 0.12109375f,
    0.13515624403953552f, 0.14921875298023224f, 0.16328124701976776f, 0.17734375596046448f, 0.19140625f,
    0.20546874403953552f, 0.21953125298023224f, 0.23359374701976776f, 0.24765624105930328f, 0.26171875f,
    0.2757812738418579f, 0.28984373807907104f, 0.30390626192092896f, 0.3179687261581421f, 0.33203125f,
    0.3460937440395355f, 0.36015623807907104f, 0.37421876192092896f, 0.3882812261581421f, 0.40234375f,
    0.4164062440395355f, 0.43046873807907104f, 0.44453126192092896f, 0.4585937261581421f, 0.47265625f,
    0.48671871423721313f, 0.500781238079071f, 0.5148437023162842f, 0.5289062261581421f, 0.54296875f,
    0.5570312738418579f, 0.5710937976837158f, 0.585156261920929f, 0.5992187261581421f, 0.61328125f,
    0.6273437738418579f, 0.6414062976837158f, 0.655468761920929f, 0.6695312261581421f, 0.68359375f,
    0.6976562738418579f, 0.7117187976837158f, 0.725781261920929f, 0.7398437261581421f, 0.75390625f,
    0.7679687738418579f, 0.782031238079071f, 0.796093761920929f, 0.8101562261581421f, 0.82421875f,
    0.8382812738418579f, 0.852343738079071f, 0.866406261920929f, 0.8804687261581421f, 0.89453125f,
    0.9085937738418579f, 0.922656238079071f, 0.936718761920929f, 0.9507812261581421f, 0.96484375f,
    0.9789062738418579f, 0.992968738079071f, 1.0f,
};

namespace {

// numpy's float -> uint8/int8 cast on x86: values are truncated through int32, and anything that does
// not fit (inf, NaN) becomes INT32_MIN, whose low byte is 0. In range this is plain truncation.
inline int32_t trunc_like_numpy(float v) {
    if (!(std::fabs(v) < 2147483648.0f)) return 0;
    return static_cast<int32_t>(v);
}

// Round half away from zero, as C roundf and gguf-py's np_roundf (floor(a) + floor(2*(a - floor(a)))).
inline float roundf_away(float v) {
    float a = std::fabs(v);
    float f = std::floor(a);
    float b = f + std::floor(2.0f * (a - f));
    return v < 0 ? -b : (v > 0 ? b : 0.0f * v);
}

// Decision bounds between neighbouring codes, computed as bitsandbytes does ((code[i] + code[i+1]) / 2
// in fp32); a value gets the number of bounds strictly below it (torch.bucketize, right=False), so an
// exact tie goes to the lower code.
struct Bounds {
    float nf4[15];
    float dyn[255];
    Bounds() {
        for (int i = 0; i < 15; ++i) nf4[i] = (kNF4Codes[i] + kNF4Codes[i + 1]) / 2.0f;
        for (int i = 0; i < 255; ++i) dyn[i] = (kDynamicCodes[i] + kDynamicCodes[i + 1]) / 2.0f;
    }
};
const Bounds& bounds() {
    static const Bounds b;
    return b;
}

inline uint8_t count_below(const float* b, int n, float s) {
    // Binary search for the number of bounds < s (b ascending). NaN compares false: index 0.
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (b[mid] < s) lo = mid + 1;
        else hi = mid;
    }
    return static_cast<uint8_t>(lo);
}

// bitsandbytes scales by the reciprocal of the absmax clamped to 1e-38 (all-zero blocks give code 0.0),
// and clamps the scaled value to [-1, 1].
inline float bnb_inv_absmax(float absmax) { return 1.0f / (absmax < 1e-38f ? 1e-38f : absmax); }
inline float bnb_clamp(float s) { return s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s); }

inline uint8_t nf4_index(const float* b, float x, float inv) {
    // 15 bounds: a branch-free count beats a binary search. NaN compares false everywhere: index 0.
    const float s = bnb_clamp(x * inv);
    int q = 0;
    for (int i = 0; i < 15; ++i) q += b[i] < s;
    return static_cast<uint8_t>(q);
}

}  // namespace

// ---- Q4_0 --------------------------------------------------------------------------------------

void quantize_row_q4_0_ref(const float* x, block_q4_0* y, int64_t k) {
    for (int64_t i = 0; i < k / QK4_0; ++i, x += QK4_0) {
        // The first element of largest magnitude keeps its sign (numpy argmax / llama.cpp strict <).
        int imax = 0;
        float amax = std::fabs(x[0]);
        for (int j = 1; j < QK4_0; ++j)
            if (std::fabs(x[j]) > amax) {
                amax = std::fabs(x[j]);
                imax = j;
            }
        const float d = x[imax] / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;  // from the unrounded fp32 d
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK4_0 / 2; ++j) {
            // x*id and +8.5 rounded separately (gguf-py, llama.cpp without FMA), then truncated.
            const float p0 = x[j] * id;
            const float p1 = x[j + QK4_0 / 2] * id;
            int32_t q0 = trunc_like_numpy(p0 + 8.5f) & 0xff;
            int32_t q1 = trunc_like_numpy(p1 + 8.5f) & 0xff;
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            y[i].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
        }
    }
}

void dequantize_row_q4_0(const block_q4_0* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK4_0; ++i, y += QK4_0) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK4_0 / 2; ++j) {
            y[j] = static_cast<float>((x[i].qs[j] & 0x0f) - 8) * d;
            y[j + QK4_0 / 2] = static_cast<float>((x[i].qs[j] >> 4) - 8) * d;
        }
    }
}

// ---- Q4_1 --------------------------------------------------------------------------------------

void quantize_row_q4_1_ref(const float* x, block_q4_1* y, int64_t k) {
    for (int64_t i = 0; i < k / QK4_1; ++i, x += QK4_1) {
        float mn = x[0], mx = x[0];
        for (int j = 1; j < QK4_1; ++j) {
            if (x[j] < mn) mn = x[j];
            if (x[j] > mx) mx = x[j];
        }
        const float d = (mx - mn) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        y[i].m = fp32_to_fp16(mn);
        for (int j = 0; j < QK4_1 / 2; ++j) {
            const float p0 = (x[j] - mn) * id;
            const float p1 = (x[j + QK4_1 / 2] - mn) * id;
            int32_t q0 = trunc_like_numpy(p0 + 0.5f) & 0xff;
            int32_t q1 = trunc_like_numpy(p1 + 0.5f) & 0xff;
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            y[i].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
        }
    }
}

void dequantize_row_q4_1(const block_q4_1* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK4_1; ++i, y += QK4_1) {
        const float d = fp16_to_fp32(x[i].d);
        const float m = fp16_to_fp32(x[i].m);
        for (int j = 0; j < QK4_1 / 2; ++j) {
            y[j] = static_cast<float>(x[i].qs[j] & 0x0f) * d + m;
            y[j + QK4_1 / 2] = static_cast<float>(x[i].qs[j] >> 4) * d + m;
        }
    }
}

// ---- Q8_0 --------------------------------------------------------------------------------------

void quantize_row_q8_0_ref(const float* x, block_q8_0* y, int64_t k) {
    for (int64_t i = 0; i < k / QK8_0; ++i, x += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; ++j) amax = std::fmax(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK8_0; ++j)
            y[i].qs[j] = static_cast<int8_t>(static_cast<uint8_t>(trunc_like_numpy(roundf_away(x[j] * id)) & 0xff));
    }
}

void dequantize_row_q8_0(const block_q8_0* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK8_0; ++i, y += QK8_0) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK8_0; ++j) y[j] = static_cast<float>(x[i].qs[j]) * d;
    }
}

// ---- NF4 ---------------------------------------------------------------------------------------

void quantize_row_nf4_ref(const float* x, block_nf4* y, int64_t k) {
    const float* nb = bounds().nf4;
    for (int64_t i = 0; i < k / QK_NF4; ++i, x += QK_NF4) {
        float amax = 0.0f;
        for (int j = 0; j < QK_NF4; ++j) amax = std::fmax(amax, std::fabs(x[j]));
        const float inv = bnb_inv_absmax(amax);
        y[i].absmax = amax;
        // bitsandbytes' order: the first element of each pair in the HIGH nibble.
        for (int j = 0; j < QK_NF4 / 2; ++j)
            y[i].qs[j] = static_cast<uint8_t>(nf4_index(nb, x[2 * j], inv) << 4 | nf4_index(nb, x[2 * j + 1], inv));
    }
}

void dequantize_row_nf4(const block_nf4* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k / QK_NF4; ++i, y += QK_NF4) {
        const float a = x[i].absmax;
        for (int j = 0; j < QK_NF4 / 2; ++j) {
            y[2 * j] = kNF4Codes[x[i].qs[j] >> 4] * a;
            y[2 * j + 1] = kNF4Codes[x[i].qs[j] & 0x0f] * a;
        }
    }
}

// ---- NF4_DQ ------------------------------------------------------------------------------------
// Layout for n elements, nb = n / 64 blocks, ng = ceil(nb / 256) groups:
//   float offset; float absmax2[ng]; uint8 qabsmax[nb]; uint8 qs[nb * 32]

namespace {
constexpr int64_t kNestedBlock = 256;

struct DqView {
    int64_t nb, ng;
    size_t off_absmax2, off_qabsmax, off_qs;
    explicit DqView(int64_t n) {
        if (n < 0 || n % QK_NF4 != 0)
            throw Error("NF4_DQ: " + std::to_string(n) + " elements is not a multiple of the block size 64");
        nb = n / QK_NF4;
        ng = (nb + kNestedBlock - 1) / kNestedBlock;
        off_absmax2 = 4;
        off_qabsmax = off_absmax2 + 4 * static_cast<size_t>(ng);
        off_qs = off_qabsmax + static_cast<size_t>(nb);
    }
};

inline float load_f32(const uint8_t* p) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
}

// Per-block scale: code2[q] * absmax2 + offset, each step rounded (bitsandbytes dequantize_blockwise,
// then `absmax += offset`).
inline float dq_scale(const uint8_t* src, const DqView& v, int64_t b) {
    const float offset = load_f32(src);
    const float a2 = load_f32(src + v.off_absmax2 + 4 * static_cast<size_t>(b / kNestedBlock));
    const float s = kDynamicCodes[src[v.off_qabsmax + b]] * a2;
    return s + offset;
}
}  // namespace

size_t nf4_dq_nbytes(int64_t n) {
    DqView v(n);
    return v.off_qs + static_cast<size_t>(v.nb) * (QK_NF4 / 2);
}

void quantize_nf4_dq_ref(const float* x, uint8_t* dst, int64_t n) {
    DqView v(n);
    std::vector<float> absmax(static_cast<size_t>(v.nb));  // (nb,)
    const float* nb = bounds().nf4;
    double sum = 0.0;
    for (int64_t b = 0; b < v.nb; ++b) {
        const float* xb = x + b * QK_NF4;
        float amax = 0.0f;
        for (int j = 0; j < QK_NF4; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
        absmax[b] = amax;
        sum += amax;
        const float inv = bnb_inv_absmax(amax);
        uint8_t* qs = dst + v.off_qs + static_cast<size_t>(b) * (QK_NF4 / 2);
        for (int j = 0; j < QK_NF4 / 2; ++j)
            qs[j] = static_cast<uint8_t>(nf4_index(nb, xb[2 * j], inv) << 4 | nf4_index(nb, xb[2 * j + 1], inv));
    }
    // offset = absmax.mean(): torch sums in fp32 and divides by the count in fp32; the sum here is the
    // correctly rounded one (torch's blocked fp32 summation can differ in the last bit for large nb).
    const float offset = v.nb > 0 ? static_cast<float>(sum) / static_cast<float>(v.nb) : 0.0f;
    std::memcpy(dst, &offset, 4);
    for (int64_t g = 0; g < v.ng; ++g) {
        const int64_t b0 = g * kNestedBlock, b1 = std::min(v.nb, b0 + kNestedBlock);
        float a2 = 0.0f;
        for (int64_t b = b0; b < b1; ++b) a2 = std::fmax(a2, std::fabs(absmax[b] - offset));
        std::memcpy(dst + v.off_absmax2 + 4 * g, &a2, 4);
        const float inv = bnb_inv_absmax(a2);
        for (int64_t b = b0; b < b1; ++b)
            dst[v.off_qabsmax + b] = count_below(bounds().dyn, 255, bnb_clamp((absmax[b] - offset) * inv));
    }
}

void dequantize_nf4_dq(const uint8_t* src, float* y, int64_t n) {
    DqView v(n);
    for (int64_t b = 0; b < v.nb; ++b) {
        const float a = dq_scale(src, v, b);
        const uint8_t* qs = src + v.off_qs + static_cast<size_t>(b) * (QK_NF4 / 2);
        float* yb = y + b * QK_NF4;
        for (int j = 0; j < QK_NF4 / 2; ++j) {
            yb[2 * j] = kNF4Codes[qs[j] >> 4] * a;
            yb[2 * j + 1] = kNF4Codes[qs[j] & 0x0f] * a;
        }
    }
}

void nf4_dq_to_nf4(const uint8_t* src, block_nf4* dst, int64_t n) {
    DqView v(n);
    for (int64_t b = 0; b < v.nb; ++b) {
        dst[b].absmax = dq_scale(src, v, b);
        std::memcpy(dst[b].qs, src + v.off_qs + static_cast<size_t>(b) * (QK_NF4 / 2), QK_NF4 / 2);
    }
}

}  // namespace lowbit
