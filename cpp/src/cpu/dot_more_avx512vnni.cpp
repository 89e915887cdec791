// AVX-512 VNNI dot tiles of the K-quants, Q5_0/Q5_1, IQ4_NL/IQ4_XS and FP4 (declared in cpu/kernels_more.h).
#ifdef LOWBIT_HAVE_AVX512

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"
#include "lowbit/blocks.h"
#include "lowbit/types.h"

// GCC 12's AVX-512 intrinsic headers trip -W(maybe-)uninitialized inside themselves (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// How the kernels work. Every type is read 32 elements at a time, in the element order of one activation
// block, as unsigned bytes u = w_int + B (B a per-type constant, often 0), and vpdpbusd (256-bit) gives
// eight int32 partial dots of 4 elements each. B * (sum of each 4 activations) is removed in integer by
// starting the accumulator at -vpdpbusd(B, x), so the partial dots are exact. The eight lanes are then
// converted to float once and multiplied by the weight scale times the activation scale: a broadcast
// (one scale per 32) or, for the 16-element sub-blocks of Q2_K/Q3_K/Q6_K, a vector holding sub-block 2g's
// factor in lanes 0..3 and 2g+1's in lanes 4..7 (lane l covers elements 4l..4l+3). Per-32 minimums
// (Q4_K, Q5_K, Q5_1) use block_q8_act.s; Q2_K's per-16 minimums use vpdpbusd of the minimum bytes with x.
//
// 256-bit vectors: on the 512-bit-double-pumped cores this runs on, a zmm body pays a lane-joining insert
// and a scale-spreading permute per 64 elements that the ymm body does not need, for the same dot work.
// Within one step (a K super-block, or four 32-blocks) the per-group products are summed in two
// independent chains and added to the accumulator once, so decode (one row, one column) is not held up
// by the FMA latency; every output gets the same sequence whatever the tile shape.

namespace lowbit {
namespace cpu {
namespace {

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline float half_scalar(uint16_t h) { return _cvtsh_ss(h); }
inline uint32_t load_u32(const void* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}
inline uint64_t load_u64(const void* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}

inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Byte j & 15 = element j, byte j >> 4 = element j + 16 (ggml's 32-block nibble order).
inline __m256i nibbles_32(const uint8_t* qs) {
    const __m128i v = load128(qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0f));
}

// Bytes of u >> shift (shift < 8), masked: the bits of each byte, never its neighbour's.
template <int kShift>
inline __m256i bits_at(__m256i v, int mask) {
    return _mm256_and_si256(kShift ? _mm256_srli_epi16(v, kShift) : v, _mm256_set1_epi8(static_cast<char>(mask)));
}

// A signed 16-entry table stored +128 (vpdpbusd's unsigned operand), in both 128-bit lanes.
inline __m256i lut_plus128(const int8_t* t) {
    return _mm256_xor_si256(_mm256_broadcastsi128_si256(load128(t)), _mm256_set1_epi8(static_cast<char>(0x80)));
}

// Per-block weight factors: f[i] = weight scale of 32-group i (or 16-sub-block i when kSub16) times the
// super scale (Q4_K/Q5_K: f[8 + i] = -dmin * minimum of group i; IQ4_XS: 0); m[i] the 32-group's additive term per unit of act.s (kMin == 1: +m for Q5_1, -dmin * min
// for Q4_K/Q5_K); Q2_K keeps its minimum nibbles.
struct Factors {
    alignas(64) float f[16];
    alignas(32) float m[8];
    __m256i mb;  // Q2_K: minimum of sub-block i in bytes i and 16 + i
    float dmin;  // Q2_K
};

// ---- formats: kGroups 32-element groups per block, unpack<G>() gives group G's unsigned bytes ----------
// kBias: u = w_int + kBias. kSub16: per-16 factors. kMin: 0 none, 1 per-32 minimum times act.s, 2 Q2_K,
// 3 per-32 minimum with the factors of a super-block in f[0..7] and its minimum terms in f[8..15].

struct FmtQ4K {
    using Block = block_q4_K;
    static constexpr int kGroups = 8, kBias = 0, kMin = 3;
    static constexpr bool kSub16 = false;
    static inline void factors(const Block* b, Factors* f) {
        // 6-bit scales and minimums (kernels_more.h, detail::scale_min_k4), two words at a time.
        const uint64_t a = load_u64(b->scales);
        const uint64_t c = load_u32(b->scales + 8);
        const uint64_t c2 = c | (c >> 4) << 32;
        const uint64_t lo = a & 0x3f3f3f3f3f3f3f3full;                                  // sc0..3, mn0..3
        const uint64_t hi = (c2 & 0x0f0f0f0f0f0f0f0full) | ((a >> 2) & 0x3030303030303030ull);  // sc4..7, mn4..7
        const __m128i v = _mm_shuffle_epi8(_mm_set_epi64x(static_cast<long long>(hi), static_cast<long long>(lo)),
                                           _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15));
        const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
        const __m512 dd = _mm512_insertf32x8(_mm512_set1_ps(half_scalar(b->d)), _mm256_set1_ps(-half_scalar(b->dmin)), 1);
        const __m512 r = _mm512_mul_ps(s, dd);
        _mm512_store_ps(f->f, r);
    }
    template <int G>
    static inline __m256i unpack(const Block* b, const Factors&) {
        return bits_at<4 * (G & 1)>(load256(b->qs + 32 * (G / 2)), 0x0f);
    }
};

struct FmtQ5K {
    using Block = block_q5_K;
    static constexpr int kGroups = 8, kBias = 0, kMin = 3;
    static constexpr bool kSub16 = false;
    static inline void factors(const Block* b, Factors* f) {
        FmtQ4K::factors(reinterpret_cast<const block_q4_K*>(b), f);  // same d, dmin, scales prefix
    }
    template <int G>
    static inline __m256i unpack(const Block* b, const Factors&) {
        // Fifth bit of element 32G + l: bit G of qh[l].
        const __m256i lo = bits_at<4 * (G & 1)>(load256(b->qs + 32 * (G / 2)), 0x0f);
        const __mmask32 hb = _mm256_test_epi8_mask(load256(b->qh), _mm256_set1_epi8(static_cast<char>(1 << G)));
        return _mm256_mask_add_epi8(lo, hb, lo, _mm256_set1_epi8(16));
    }
};
static_assert(offsetof(block_q5_K, scales) == offsetof(block_q4_K, scales), "Q5_K shares Q4_K's scale header");

struct FmtQ6K {
    using Block = block_q6_K;
    static constexpr int kGroups = 8, kBias = 32, kMin = 0;
    static constexpr bool kSub16 = true;
    static inline void factors(const Block* b, Factors* f) {
        const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load128(b->scales)));
        _mm512_store_ps(f->f, _mm512_mul_ps(s, _mm512_set1_ps(half_scalar(b->d))));
    }
    template <int G>
    static inline __m256i unpack(const Block* b, const Factors&) {
        // Element 128n + 32j + l: low 4 bits from ql[64n + 32(j & 1) + l] (nibble j >> 1), high 2 bits
        // from bits 2j, 2j + 1 of qh[32n + l].
        constexpr int n = G / 4, j = G % 4;
        const __m256i lo = bits_at<4 * (j >> 1)>(load256(b->ql + 64 * n + 32 * (j & 1)), 0x0f);
        const __m256i h = load256(b->qh + 32 * n);
        __m256i hs;
        if constexpr (j <= 2) {
            hs = _mm256_slli_epi16(h, 4 - 2 * j);
        } else {
            hs = _mm256_srli_epi16(h, 2 * j - 4);
        }
        return _mm256_or_si256(lo, _mm256_and_si256(hs, _mm256_set1_epi8(0x30)));
    }
};

struct FmtQ3K {
    using Block = block_q3_K;
    static constexpr int kGroups = 8, kBias = 4, kMin = 0;
    static constexpr bool kSub16 = true;
    static inline void factors(const Block* b, Factors* f) {
        // Scale i (stored + 32): low 4 bits in nibble i / 8 of byte i % 8, high 2 bits at bits
        // 2 * (i / 4) of byte 8 + i % 4 (kernels_more.h, detail::scales_q3_K).
        const __m128i l8 = _mm_cvtsi64_si128(static_cast<long long>(load_u64(b->scales)));
        const __m128i m4 = _mm_set1_epi8(0x0f);
        const __m128i low = _mm_and_si128(_mm_unpacklo_epi64(l8, _mm_srli_epi16(l8, 4)), m4);
        const __m128i h4 = _mm_set1_epi32(static_cast<int>(load_u32(b->scales + 8)));
        const __m128i high = _mm_and_si128(_mm_srlv_epi32(h4, _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
        const __m128i sc = _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(high, 4)), _mm_set1_epi8(32));
        const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc));
        _mm512_store_ps(f->f, _mm512_mul_ps(s, _mm512_set1_ps(half_scalar(b->d))));
    }
    template <int G>
    static inline __m256i unpack(const Block* b, const Factors&) {
        // Element 128n + 32j + l: low 2 bits at bits 2j of qs[32n + l], high bit = bit 4n + j of
        // hmask[l] (set: no -4). u = low | high << 2 = w + 4.
        constexpr int n = G / 4, j = G % 4;
        const __m256i lo = bits_at<2 * j>(load256(b->qs + 32 * n), 3);
        const __mmask32 hb = _mm256_test_epi8_mask(load256(b->hmask), _mm256_set1_epi8(static_cast<char>(1 << G)));
        return _mm256_mask_add_epi8(lo, hb, lo, _mm256_set1_epi8(4));
    }
};

struct FmtQ2K {
    using Block = block_q2_K;
    static constexpr int kGroups = 8, kBias = 0, kMin = 2;
    static constexpr bool kSub16 = true;
    static inline void factors(const Block* b, Factors* f) {
        const __m128i v = load128(b->scales);
        const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, _mm_set1_epi8(0x0f))));
        _mm512_store_ps(f->f, _mm512_mul_ps(s, _mm512_set1_ps(half_scalar(b->d))));
        f->mb = _mm256_broadcastsi128_si256(_mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0f)));
        f->dmin = half_scalar(b->dmin);
    }
    template <int G>
    static inline __m256i unpack(const Block* b, const Factors&) {
        // Element 128n + 32j + l: bits 2j of qs[32n + l].
        return bits_at<2 * (G % 4)>(load256(b->qs + 32 * (G / 4)), 3);
    }
    // Minimum bytes of group G: sub-block 2G's minimum in bytes 0..15, 2G + 1's in 16..31.
    template <int G>
    static inline __m256i mins(const Factors& f) {
        return _mm256_shuffle_epi8(f.mb, _mm256_set_m128i(_mm_set1_epi8(2 * G + 1), _mm_set1_epi8(2 * G)));
    }
};

struct FmtIQ4XS {
    using Block = block_iq4_xs;
    static constexpr int kGroups = 8, kBias = 128, kMin = 3;
    static constexpr bool kSub16 = false;
    static inline void factors(const Block* b, Factors* f) {
        // Scale of group g (stored + 32): nibble g of scales_l (low 4 bits), bits 2g of scales_h (high 2).
        const uint64_t ls = _pdep_u64(load_u32(b->scales_l), 0x0f0f0f0f0f0f0f0full) |
                            _pdep_u64(b->scales_h, 0x3030303030303030ull);
        const __m256i s = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(ls))),
                                           _mm256_set1_epi32(32));
        _mm512_store_ps(f->f, _mm512_zextps256_ps512(_mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(half_scalar(b->d)))));
    }
    template <int G>
    static inline __m256i unpack(const Block* b, const Factors&) {
        return _mm256_shuffle_epi8(lut_plus128(kIQ4NLValues), nibbles_32(b->qs + 16 * G));
    }
};

struct FmtQ5_0 {
    using Block = block_q5_0;
    static constexpr int kGroups = 1, kBias = 16, kMin = 0;
    static constexpr bool kSub16 = false;
    static inline void factors(const Block* b, Factors* f) { f->f[0] = half_scalar(b->d); }
    template <int G>
    static inline __m256i unpack(const Block* b, const Factors&) {
        const __m256i lo = nibbles_32(b->qs);  // bit j of qh: fifth bit of element j
        return _mm256_mask_add_epi8(lo, _cvtu32_mask32(load_u32(b->qh)), lo, _mm256_set1_epi8(16));
    }
};

struct FmtQ5_1 {
    using Block = block_q5_1;
    static constexpr int kGroups = 1, kBias = 0, kMin = 1;
    static constexpr bool kSub16 = false;
    static inline void factors(const Block* b, Factors* f) {
        f->f[0] = half_scalar(b->d);
        f->m[0] = half_scalar(b->m);
    }
    template <int G>
    static inline __m256i unpack(const Block* b, const Factors&) {
        const __m256i lo = nibbles_32(b->qs);
        return _mm256_mask_add_epi8(lo, _cvtu32_mask32(load_u32(b->qh)), lo, _mm256_set1_epi8(16));
    }
};

struct FmtIQ4NL {
    using Block = block_iq4_nl;
    static constexpr int kGroups = 1, kBias = 128, kMin = 0;
    static constexpr bool kSub16 = false;
    static inline void factors(const Block* b, Factors* f) { f->f[0] = half_scalar(b->d); }
    template <int G>
    static inline __m256i unpack(const Block* b, const Factors&) {
        return _mm256_shuffle_epi8(lut_plus128(kIQ4NLValues), nibbles_32(b->qs));
    }
};

struct FmtFP4 {
    using Block = block_fp4;
    static constexpr int kGroups = 2, kBias = 128, kMin = 0;
    static constexpr bool kSub16 = false;
    static inline void factors(const Block* b, Factors* f) { f->f[0] = f->f[1] = b->absmax * (1.0f / 127.0f); }
    template <int G>
    static inline __m256i unpack(const Block* b, const Factors&) {
        // Element 2j in the HIGH nibble of qs[j], 2j + 1 in the low one: widen each byte to 16 bits,
        // then put the high nibble in the low byte and the low nibble in the high byte.
        const __m256i t = _mm256_cvtepu8_epi16(load128(b->qs + 16 * G));
        const __m256i e = _mm256_and_si256(_mm256_or_si256(_mm256_srli_epi16(t, 4), _mm256_slli_epi16(t, 8)),
                                           _mm256_set1_epi8(0x0f));
        return _mm256_shuffle_epi8(lut_plus128(kFP4Int8), e);
    }
};

// ---- the tile driver -----------------------------------------------------------------------------------

template <class Fn, std::size_t... I>
inline void unrolled(Fn&& fn, std::index_sequence<I...>) {
    (fn(std::integral_constant<int, static_cast<int>(I)>{}), ...);
}

// Lanes 0..3 = f[2m], lanes 4..7 = f[2m + 1] of the eight factors at p.
template <int M>
inline __m256 pair_spread(const float* p) {
    return _mm256_permutexvar_ps(_mm256_setr_epi32(2 * M, 2 * M, 2 * M, 2 * M, 2 * M + 1, 2 * M + 1, 2 * M + 1, 2 * M + 1),
                                 _mm256_load_ps(p));
}

template <class F, int NR, int NC>
struct Tile {
    using Block = typename F::Block;
    const Block* wr[NR];
    const block_q8_act* xc[NC];
    __m256 acc[NR][NC];
    float accm[NR][NC];
    __m512 accmv[NR][NC];  // kMin == 3: minimum terms in lanes 8..15

    // Weight blocks i .. i + U - 1 of every row (activation blocks from (i * kGroups)).
    template <int U>
    inline void step(int64_t i) {
        constexpr int kG = F::kGroups;
        constexpr int kN = U * kG;  // 32-element groups in this step
        Factors fac[NR][U];
        for (int r = 0; r < NR; ++r) {
            for (int u = 0; u < U; ++u) F::factors(wr[r] + i + u, &fac[r][u]);
        }
        __m256 part[NR][NC][2];
        __m256 partm[NR][NC];  // Q2_K: minimum dots times the activation scale
        const int64_t a0 = i * kG;
        // kMin == 3: one gather per column brings the eight activation scales (lanes 0..7) and sums
        // (8..15); times the factors that gives every group's scale product and minimum term at once.
        alignas(64) float coef8[NR][NC][16];
        if constexpr (F::kMin == 3) {
            const __m512i idx = _mm512_setr_epi32(0, 10, 20, 30, 40, 50, 60, 70, 1, 11, 21, 31, 41, 51, 61, 71);
            static_assert(sizeof(block_q8_act) == 40 && offsetof(block_q8_act, s) == 4, "gather indices");
            for (int c = 0; c < NC; ++c) {
                const __m512 ds = _mm512_i32gather_ps(idx, &xc[c][a0].d, 4);
                for (int r = 0; r < NR; ++r) {
                    const __m512 p = _mm512_mul_ps(_mm512_load_ps(fac[r][0].f), ds);
                    _mm512_store_ps(coef8[r][c], p);
                    accmv[r][c] = _mm512_mask_add_ps(accmv[r][c], 0xff00, accmv[r][c], p);
                }
            }
        }
        unrolled(
            [&](auto gi) {
                constexpr int kI = decltype(gi)::value;
                constexpr int u = kI / kG, g = kI % kG;
                __m256i xv[NC], init[NC];
                float dx[NC];
                for (int c = 0; c < NC; ++c) {
                    const block_q8_act& xb = xc[c][a0 + kI];
                    xv[c] = load256(xb.qs);
                    dx[c] = xb.d;
                    init[c] = F::kBias == 0 ? _mm256_setzero_si256()
                                            : _mm256_sub_epi32(_mm256_setzero_si256(),
                                                               _mm256_dpbusd_epi32(_mm256_setzero_si256(),
                                                                                   _mm256_set1_epi8(static_cast<char>(F::kBias)),
                                                                                   xv[c]));
                }
                for (int r = 0; r < NR; ++r) {
                    const Factors& fr = fac[r][u];
                    const __m256i uw = F::template unpack<g>(wr[r] + i + u, fr);
                    __m256 coef_w;
                    if constexpr (F::kSub16) coef_w = pair_spread<g % 4>(fr.f + 8 * (g / 4));
                    for (int c = 0; c < NC; ++c) {
                        const __m256 isum = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(init[c], uw, xv[c]));
                        __m256 coef;
                        if constexpr (F::kSub16) {
                            coef = _mm256_mul_ps(coef_w, _mm256_set1_ps(dx[c]));
                        } else if constexpr (F::kMin == 3) {
                            coef = _mm256_set1_ps(coef8[r][c][g]);
                        } else {
                            coef = _mm256_set1_ps(fr.f[g] * dx[c]);
                        }
                        if constexpr (kI < 2) {
                            part[r][c][kI] = _mm256_mul_ps(isum, coef);
                        } else {
                            part[r][c][kI & 1] = _mm256_fmadd_ps(isum, coef, part[r][c][kI & 1]);
                        }
                        if constexpr (F::kMin == 2) {
                            const __m256 ms = _mm256_cvtepi32_ps(
                                _mm256_dpbusd_epi32(_mm256_setzero_si256(), FmtQ2K::mins<g>(fr), xv[c]));
                            if constexpr (kI == 0) {
                                partm[r][c] = _mm256_mul_ps(ms, _mm256_set1_ps(dx[c]));
                            } else {
                                partm[r][c] = _mm256_fmadd_ps(ms, _mm256_set1_ps(dx[c]), partm[r][c]);
                            }
                        }
                    }
                }
            },
            std::make_index_sequence<kN>{});
        for (int r = 0; r < NR; ++r) {
            for (int c = 0; c < NC; ++c) {
                __m256 p = kN > 1 ? _mm256_add_ps(part[r][c][0], part[r][c][1]) : part[r][c][0];
                if constexpr (F::kMin == 2) p = _mm256_fnmadd_ps(partm[r][c], _mm256_set1_ps(fac[r][0].dmin), p);
                acc[r][c] = _mm256_add_ps(acc[r][c], p);
                if constexpr (F::kMin == 1) {
                    // Minimum times the activation block sum, in two chains as above.
                    float m0 = 0.0f, m1 = 0.0f;
                    for (int gi = 0; gi < kN; gi += 2) {
                        m0 += fac[r][gi / kG].m[gi % kG] * xc[c][a0 + gi].s;
                        if (gi + 1 < kN) m1 += fac[r][(gi + 1) / kG].m[(gi + 1) % kG] * xc[c][a0 + gi + 1].s;
                    }
                    accm[r][c] += m0 + m1;
                }
            }
        }
    }

    void run(int64_t k, const void* w, size_t ws, const void* x, size_t xs, float* y, size_t ys) {
        for (int r = 0; r < NR; ++r) wr[r] = reinterpret_cast<const Block*>(static_cast<const uint8_t*>(w) + r * ws);
        for (int c = 0; c < NC; ++c) {
            xc[c] = reinterpret_cast<const block_q8_act*>(static_cast<const uint8_t*>(x) + c * xs);
        }
        for (int r = 0; r < NR; ++r) {
            for (int c = 0; c < NC; ++c) {
                acc[r][c] = _mm256_setzero_ps();
                accm[r][c] = 0.0f;
                accmv[r][c] = _mm512_setzero_ps();
            }
        }
        const int64_t nb = k / (32 * F::kGroups);
        // Four groups or more per step: the 32-element types take blocks four (FP4: two) at a time.
        constexpr int U = F::kGroups >= 4 ? 1 : 4 / F::kGroups;
        int64_t i = 0;
        for (; i + U <= nb; i += U) step<U>(i);
        for (; i < nb; ++i) step<1>(i);
        for (int r = 0; r < NR; ++r) {
            for (int c = 0; c < NC; ++c) {
                const __m256 mv = _mm512_extractf32x8_ps(accmv[r][c], 1);
                y[c * ys + r] = hsum256(F::kMin == 3 ? _mm256_add_ps(acc[r][c], mv) : acc[r][c]) + accm[r][c];
            }
        }
    }
};

template <class F, int NR, int NC>
void tile(int64_t k, const void* w, size_t ws, const void* x, size_t xs, float* y, size_t ys) {
    Tile<F, NR, NC> t;
    t.run(k, w, ws, x, xs, y, ys);
}

using TileImpl = void (*)(int64_t, const void*, size_t, const void*, size_t, float*, size_t);

template <class F>
void dot(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    static const TileImpl table[4][4] = {
        {&tile<F, 1, 1>, &tile<F, 1, 2>, &tile<F, 1, 3>, &tile<F, 1, 4>},
        {&tile<F, 2, 1>, &tile<F, 2, 2>, &tile<F, 2, 3>, &tile<F, 2, 4>},
        {&tile<F, 3, 1>, &tile<F, 3, 2>, &tile<F, 3, 3>, &tile<F, 3, 4>},
        {&tile<F, 4, 1>, &tile<F, 4, 2>, &tile<F, 4, 3>, &tile<F, 4, 4>}};
    table[nr - 1][nc - 1](k, w, ws, x, xs, y, ys);
}

}  // namespace

#define LOWBIT_DOT_MORE(name, fmt)                                                                        \
    void dot_##name##_avx512vnni(int64_t k, const void* w, size_t w_stride, int nrows, const void* x,     \
                                 size_t x_stride, int ncols, float* y, size_t y_stride) {                 \
        dot<fmt>(k, w, w_stride, nrows, x, x_stride, ncols, y, y_stride);                                 \
    }
LOWBIT_DOT_MORE(q4_K, FmtQ4K)
LOWBIT_DOT_MORE(q6_K, FmtQ6K)
LOWBIT_DOT_MORE(q5_0, FmtQ5_0)
LOWBIT_DOT_MORE(q5_K, FmtQ5K)
LOWBIT_DOT_MORE(iq4_xs, FmtIQ4XS)
LOWBIT_DOT_MORE(iq4_nl, FmtIQ4NL)
LOWBIT_DOT_MORE(q3_K, FmtQ3K)
LOWBIT_DOT_MORE(q2_K, FmtQ2K)
LOWBIT_DOT_MORE(q5_1, FmtQ5_1)
LOWBIT_DOT_MORE(fp4, FmtFP4)
#undef LOWBIT_DOT_MORE

}  // namespace cpu
}  // namespace lowbit

#endif  // LOWBIT_HAVE_AVX512
