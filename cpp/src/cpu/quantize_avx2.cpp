// AVX2 row quantizers for Q4_0, Q4_1 and Q8_0, bit-exact with the scalar *_ref functions (quants_ref.cpp).
//
// Every lane does the same IEEE fp32 operations, in the same order, as the reference (no FMA), so the
// bytes are identical. Blocks holding inf/NaN (or Q4_1 blocks whose extreme is a signed zero) go to
// the scalar reference: they are rare and their handling is spelled out there.
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

// (32,) floats -> absolute-value bit patterns; for finite values integer order == float order.
struct AbsBits {
    __m256i v[4];
    int32_t max;  // bits of the largest |x|; >= 0x7f800000 when the block holds inf or NaN
};

inline AbsBits abs_bits(const float* x) {
    const __m256i mask = _mm256_set1_epi32(0x7fffffff);
    AbsBits a;
    for (int i = 0; i < 4; ++i) a.v[i] = _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(x + 8 * i)), mask);
    __m256i m = _mm256_max_epi32(_mm256_max_epi32(a.v[0], a.v[1]), _mm256_max_epi32(a.v[2], a.v[3]));
    __m128i h = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    h = _mm_max_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
    h = _mm_max_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 3, 0, 1)));
    a.max = _mm_cvtsi128_si32(h);
    return a;
}

inline float bits_to_float(int32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

inline uint16_t to_fp16(float f) {
    return static_cast<uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT), 0));
}

// Pack 32 nibble values (four vectors of 8 int32: elements 0-7, 8-15, 16-23, 24-31) into
// qs[j] = q[j] | q[j + 16] << 4.
inline void pack_nibbles(__m256i q0, __m256i q1, __m256i q2, __m256i q3, uint8_t* qs) {
    // packs works per 128-bit lane; permute restores element order.
    __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), _MM_SHUFFLE(3, 1, 2, 0));  // (16,) i16
    __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q2, q3), _MM_SHUFFLE(3, 1, 2, 0));  // (16,) i16
    __m256i b = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
    __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs), bytes);
}

}  // namespace

void quantize_row_q8_0_avx2(const float* x, block_q8_0* y, int64_t k) {
    const __m256 two = _mm256_set1_ps(2.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t i = 0; i < k / QK8_0; ++i, x += QK8_0) {
        AbsBits a = abs_bits(x);
        if (a.max >= 0x7f800000) {
            quantize_row_q8_0_ref(x, y + i, QK8_0);
            continue;
        }
        const float d = bits_to_float(a.max) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        if (!(id < 3.4028235e38f)) {  // 1/d overflowed (subnormal d): the reference's path
            quantize_row_q8_0_ref(x, y + i, QK8_0);
            continue;
        }
        y[i].d = to_fp16(d);
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int j = 0; j < 4; ++j) {
            // roundf: floor(a) + floor(2 * (a - floor(a))) with the sign put back (exact in fp32).
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), vid);
            __m256 av = _mm256_andnot_ps(sign, v);
            __m256 f = _mm256_floor_ps(av);
            __m256 r = _mm256_add_ps(f, _mm256_floor_ps(_mm256_mul_ps(two, _mm256_sub_ps(av, f))));
            r = _mm256_or_ps(r, _mm256_and_ps(sign, v));
            q[j] = _mm256_cvttps_epi32(r);
        }
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        p = _mm256_permutevar8x32_epi32(p, perm);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[i].qs), p);
    }
}

void quantize_row_q4_0_avx2(const float* x, block_q4_0* y, int64_t k) {
    const __m256 half8 = _mm256_set1_ps(8.5f);
    const __m256i fifteen = _mm256_set1_epi32(15);
    for (int64_t i = 0; i < k / QK4_0; ++i, x += QK4_0) {
        AbsBits a = abs_bits(x);
        if (a.max >= 0x7f800000) {
            quantize_row_q4_0_ref(x, y + i, QK4_0);
            continue;
        }
        // The first element whose |x| is the maximum keeps its sign.
        const __m256i vmax = _mm256_set1_epi32(a.max);
        uint32_t hits = 0;
        for (int j = 0; j < 4; ++j)
            hits |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(a.v[j], vmax))))
                    << (8 * j);
        const float mx = x[__builtin_ctz(hits)];
        const float d = mx / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        if (!(std::fabs(id) < 3.4028235e38f)) {
            quantize_row_q4_0_ref(x, y + i, QK4_0);
            continue;
        }
        y[i].d = to_fp16(d);
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int j = 0; j < 4; ++j) {
            // x*id and +8.5 rounded separately, then truncated (spec/quant-types.md#q4_0).
            __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), vid), half8);
            q[j] = _mm256_min_epi32(_mm256_cvttps_epi32(v), fifteen);
        }
        pack_nibbles(q[0], q[1], q[2], q[3], y[i].qs);
    }
}

void quantize_row_q4_1_avx2(const float* x, block_q4_1* y, int64_t k) {
    const __m256 half = _mm256_set1_ps(0.5f);
    const __m256i fifteen = _mm256_set1_epi32(15);
    for (int64_t i = 0; i < k / QK4_1; ++i, x += QK4_1) {
        AbsBits a = abs_bits(x);
        if (a.max >= 0x7f800000) {
            quantize_row_q4_1_ref(x, y + i, QK4_1);
            continue;
        }
        __m256 v[4];
        for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(x + 8 * j);
        __m256 vmn = _mm256_min_ps(_mm256_min_ps(v[0], v[1]), _mm256_min_ps(v[2], v[3]));
        __m256 vmx = _mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3]));
        __m128 m4 = _mm_min_ps(_mm256_castps256_ps128(vmn), _mm256_extractf128_ps(vmn, 1));
        m4 = _mm_min_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_min_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        __m128 x4 = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
        x4 = _mm_max_ps(x4, _mm_movehl_ps(x4, x4));
        x4 = _mm_max_ss(x4, _mm_shuffle_ps(x4, x4, 1));
        const float mn = _mm_cvtss_f32(m4), mx = _mm_cvtss_f32(x4);
        const float d = (mx - mn) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        // A zero extreme may be +0 or -0 depending on which element won; an overflowing d or 1/d takes
        // the reference's non-finite path. Both are rare: let the reference decide.
        if (mn == 0.0f || mx == 0.0f || !(d < 3.4028235e38f) || !(id < 3.4028235e38f)) {
            quantize_row_q4_1_ref(x, y + i, QK4_1);
            continue;
        }
        y[i].d = to_fp16(d);
        y[i].m = to_fp16(mn);
        const __m256 vid = _mm256_set1_ps(id);
        const __m256 vmin = _mm256_set1_ps(mn);
        __m256i q[4];
        for (int j = 0; j < 4; ++j) {
            __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v[j], vmin), vid), half);
            q[j] = _mm256_min_epi32(_mm256_cvttps_epi32(t), fifteen);
        }
        pack_nibbles(q[0], q[1], q[2], q[3], y[i].qs);
    }
}

}  // namespace lowbit
