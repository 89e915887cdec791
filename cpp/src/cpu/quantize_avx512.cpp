// AVX-512 row quantizers for Q4_0, Q4_1 and Q8_0, bit-exact with the scalar *_ref functions (quants_ref.cpp).
//
// Same arithmetic as the reference, lane by lane (no FMA); blocks holding inf/NaN, and Q4_1 blocks
// whose extreme is a signed zero, go to the scalar reference.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/kernels_internal.h"

// The reference rounds every product and sum on its own; a fused multiply-add would change ties.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace lowbit {

namespace {

constexpr float kFltMax = 3.4028235e38f;

inline uint16_t to_fp16(float f) {
    return static_cast<uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT), 0));
}

inline float bits_to_float(int32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

// Absolute-value bits of the two halves of a 32-element block; integer order == float order for
// finite values, and a maximum >= 0x7f800000 flags inf or NaN.
inline int32_t abs_bits(const float* x, __m512i* a0, __m512i* a1) {
    const __m512i mask = _mm512_set1_epi32(0x7fffffff);
    *a0 = _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(x)), mask);
    *a1 = _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(x + 16)), mask);
    return _mm512_reduce_max_epi32(_mm512_max_epi32(*a0, *a1));
}

// qs[j] = q[j] | q[j + 16] << 4 for 32 values given as (16,) int32 halves.
inline void pack_nibbles(__m512i lo, __m512i hi, uint8_t* qs) {
    __m512i b = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 4));
    _mm512_mask_cvtepi32_storeu_epi8(qs, 0xffff, b);
}

}  // namespace

void quantize_row_q8_0_avx512(const float* x, block_q8_0* y, int64_t k) {
    const __m512 two = _mm512_set1_ps(2.0f);
    const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
    for (int64_t i = 0; i < k / QK8_0; ++i, x += QK8_0) {
        __m512i a0, a1;
        const int32_t amax = abs_bits(x, &a0, &a1);
        if (amax >= 0x7f800000) {
            quantize_row_q8_0_ref(x, y + i, QK8_0);
            continue;
        }
        const float d = bits_to_float(amax) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        if (!(id < kFltMax)) {
            quantize_row_q8_0_ref(x, y + i, QK8_0);
            continue;
        }
        y[i].d = to_fp16(d);
        const __m512 vid = _mm512_set1_ps(id);
        for (int h = 0; h < 2; ++h) {
            // roundf: floor(a) + floor(2 * (a - floor(a))), sign put back (exact in fp32).
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * h), vid);
            __m512 av = _mm512_abs_ps(v);
            __m512 f = _mm512_roundscale_ps(av, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            __m512 r = _mm512_add_ps(
                f, _mm512_roundscale_ps(_mm512_mul_ps(two, _mm512_sub_ps(av, f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
            r = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), _mm512_and_si512(_mm512_castps_si512(v), sign)));
            _mm512_mask_cvtepi32_storeu_epi8(y[i].qs + 16 * h, 0xffff, _mm512_cvttps_epi32(r));
        }
    }
}

void quantize_row_q4_0_avx512(const float* x, block_q4_0* y, int64_t k) {
    const __m512 half8 = _mm512_set1_ps(8.5f);
    const __m512i fifteen = _mm512_set1_epi32(15);
    for (int64_t i = 0; i < k / QK4_0; ++i, x += QK4_0) {
        __m512i a0, a1;
        const int32_t amax = abs_bits(x, &a0, &a1);
        if (amax >= 0x7f800000) {
            quantize_row_q4_0_ref(x, y + i, QK4_0);
            continue;
        }
        // The first element whose |x| is the maximum keeps its sign.
        const __m512i vmax = _mm512_set1_epi32(amax);
        const uint32_t hits = static_cast<uint32_t>(_mm512_cmpeq_epi32_mask(a0, vmax)) |
                              static_cast<uint32_t>(_mm512_cmpeq_epi32_mask(a1, vmax)) << 16;
        const float mx = x[__builtin_ctz(hits)];
        const float d = mx / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        if (!(std::fabs(id) < kFltMax)) {
            quantize_row_q4_0_ref(x, y + i, QK4_0);
            continue;
        }
        y[i].d = to_fp16(d);
        const __m512 vid = _mm512_set1_ps(id);
        // x*id and +8.5 rounded separately, then truncated (spec/quant-types.md#q4_0).
        __m512i lo = _mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(x), vid), half8));
        __m512i hi = _mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(x + 16), vid), half8));
        pack_nibbles(_mm512_min_epi32(lo, fifteen), _mm512_min_epi32(hi, fifteen), y[i].qs);
    }
}

void quantize_row_q4_1_avx512(const float* x, block_q4_1* y, int64_t k) {
    const __m512 half = _mm512_set1_ps(0.5f);
    const __m512i fifteen = _mm512_set1_epi32(15);
    for (int64_t i = 0; i < k / QK4_1; ++i, x += QK4_1) {
        __m512i a0, a1;
        if (abs_bits(x, &a0, &a1) >= 0x7f800000) {
            quantize_row_q4_1_ref(x, y + i, QK4_1);
            continue;
        }
        const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
        const float mn = _mm512_reduce_min_ps(_mm512_min_ps(v0, v1));
        const float mx = _mm512_reduce_max_ps(_mm512_max_ps(v0, v1));
        const float d = (mx - mn) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        // A zero extreme may be +0 or -0 depending on which element won; overflowing d or 1/d takes the
        // reference's non-finite path. Both are rare: let the reference decide.
        if (mn == 0.0f || mx == 0.0f || !(d < kFltMax) || !(id < kFltMax)) {
            quantize_row_q4_1_ref(x, y + i, QK4_1);
            continue;
        }
        y[i].d = to_fp16(d);
        y[i].m = to_fp16(mn);
        const __m512 vid = _mm512_set1_ps(id);
        const __m512 vmin = _mm512_set1_ps(mn);
        __m512i lo = _mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(v0, vmin), vid), half));
        __m512i hi = _mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(v1, vmin), vid), half));
        pack_nibbles(_mm512_min_epi32(lo, fifteen), _mm512_min_epi32(hi, fifteen), y[i].qs);
    }
}

}  // namespace lowbit
