// AVX2 kernels of the Q5_0 / Q4_K / Q5_K / Q6_K load-time panels (layouts in cpu/panels_kquants.h).
//
// One 32-byte load of a panel vector gives 8 rows x 4 elements. Per 32-element sub-block, rows 8h .. 8h+7 and
// one activation column, the eight vpmaddubsw (unsigned weight bytes times the column's broadcast int8
// activations) add up in int16 lanes; vpmaddwd then multiplies each row's lane pair by the row's integer
// scale (the per-32 Q4_K/Q5_K scale, the per-16 Q6_K scales on the two halves, 1 for Q5_0) and widens it to
// int32; one convert and one multiply-add by d_row * x.d per 8 rows; Q4_K/Q5_K's minima then subtract
// dmin mn x.s from the same accumulator. Offset types (Q5_0: q - 16, Q6_K: q - 32) keep their int16 sums in
// range by starting them at -offset * (pair sums of x), shared by all rows; the sums wrap modulo 2^16 on
// the way, but their final values, |q - offset| * 127 * 8 <= 32512 per lane, are exact. Q5_K's unsigned
// values (up to 31) keep the two halves of a sub-block in two int16 sums, each scaled by the same scale.
//
// Every (row, column) output goes through the same instruction sequence whatever the group of rows and
// columns computed together, so thread counts and token counts give bit-identical results.
#ifdef LOWBIT_HAVE_AVX2

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/kernels_internal.h"
#include "cpu/panels_kquants.h"

namespace lowbit {
namespace cpu {
namespace {

inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i bytes(int v) { return _mm256_set1_epi8(static_cast<char>(v)); }
inline __m256 half8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256i bcast32(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// 16-bit lane shift that brings bit `from` of every byte to bit `to` (bits crossing a byte border only land
// where the caller's mask drops them).
template <int kFrom, int kTo>
inline __m256i move_bits(__m256i v) {
    if constexpr (kFrom > kTo) return _mm256_srli_epi16(v, kFrom - kTo);
    if constexpr (kFrom < kTo) return _mm256_slli_epi16(v, kTo - kFrom);
    return v;
}

// vpshufb controls over a 16-byte row vector broadcast to both lanes: dword i of half h gets row 8h + i's
// byte as two zero-extended int16 (kPairU8) or four copies (kQuadI8, then an arithmetic shift by 8 gives two
// sign-extended int16).
struct ScaleControls {
    alignas(32) int8_t pair_u8[2][32];
    alignas(32) int8_t quad_i8[2][32];
};
constexpr ScaleControls make_scale_controls() {
    ScaleControls t{};
    for (int h = 0; h < 2; ++h) {
        for (int i = 0; i < 32; ++i) {
            const int row = 8 * h + i / 4;
            t.pair_u8[h][i] = static_cast<int8_t>(i % 2 == 0 ? row : -128);
            t.quad_i8[h][i] = static_cast<int8_t>(row);
        }
    }
    return t;
}
constexpr ScaleControls kScaleCtl = make_scale_controls();

inline __m256i rows16(const uint8_t* p) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i scale_pairs_u8(const uint8_t* p, int h) {
    return _mm256_shuffle_epi8(rows16(p), load256(reinterpret_cast<const uint8_t*>(kScaleCtl.pair_u8[h])));
}
inline __m256i scale_pairs_i8(const uint8_t* p, int h) {
    const __m256i ctl = load256(reinterpret_cast<const uint8_t*>(kScaleCtl.quad_i8[h]));
    const __m256i quad = _mm256_shuffle_epi8(rows16(p), ctl);
    return _mm256_srai_epi16(quad, 8);
}
// Eight rows' bytes (rows 8h ..) as floats.
inline __m256 rows8_f32(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// -offset * the pair sums of an activation block's 32 bytes, in the int16 lane pattern of the weight vectors:
// every dword of 128-bit lane L holds (sum over elements 16L + 4i + {0, 1}, over 16L + 4i + {2, 3}), i = 0..3.
template <int kOffset>
inline __m256i neg_pair_sums(__m256i x) {
    __m256i t = _mm256_maddubs_epi16(bytes(kOffset), x);
    t = _mm256_add_epi16(t, _mm256_shuffle_epi32(t, 0x4e));
    t = _mm256_add_epi16(t, _mm256_shuffle_epi32(t, 0xb1));
    return _mm256_sub_epi16(_mm256_setzero_si256(), t);
}

// ---- formats ------------------------------------------------------------------------------------------
// kSubs: 32-element sub-blocks per panel block; kSums: int16 sums per sub-block (2: elements 0..15 and
// 16..31 apart); kOffset: q - kOffset is the value; kMin: Q4_K/Q5_K minima. scales() fills the vpmaddwd
// operands of sub-block j, rows 8h..; weights<v>() the unsigned bytes of nibble vector v (lo: elements
// 4v.., hi: 16 + 4v..).

struct PanelQ4K {
    static constexpr int kH = 2, kNC = 3;  // 8-row halves x columns per pass (see panel_kernel)
    static constexpr int kSubs = 8, kSums = 1, kOffset = 0;
    static constexpr bool kMin = true;
    static constexpr size_t kBlockBytes = kPanelQ4_KBytes;
    static inline void scales(const uint8_t* pb, int j, int h, __m256i* sc) {
        sc[0] = scale_pairs_u8(pb + 64 + 16 * j, h);
    }
    static inline __m256 mins(const uint8_t* pb, int j, int h) { return rows8_f32(pb + 192 + 16 * j + 8 * h); }
    template <int v>
    static inline void weights(const uint8_t* pb, int j, int h, __m256i& lo, __m256i& hi) {
        const __m256i n = load256(pb + 320 + 256 * j + 64 * v + 32 * h);
        lo = _mm256_and_si256(n, bytes(0x0f));
        hi = _mm256_and_si256(_mm256_srli_epi16(n, 4), bytes(0x0f));
    }
};

// Nibble vector v plus the fifth bits (layout in cpu/panels_kquants.h) of a 5-bit sub-block at sub.
template <int v>
inline void weights5(const uint8_t* sub, int h, __m256i& lo, __m256i& hi) {
    const __m256i n = load256(sub + 64 * v + 32 * h);
    const __m256i hb = load256(sub + 256 + 32 * h);
    lo = _mm256_or_si256(_mm256_and_si256(n, bytes(0x0f)), _mm256_and_si256(move_bits<v, 4>(hb), bytes(0x10)));
    hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(n, 4), bytes(0x0f)),
                         _mm256_and_si256(move_bits<4 + v, 4>(hb), bytes(0x10)));
}

struct PanelQ5K {
    static constexpr int kH = 1, kNC = 4;  // 8-row halves x columns per pass (see panel_kernel)
    static constexpr int kSubs = 8, kSums = 2, kOffset = 0;
    static constexpr bool kMin = true;
    static constexpr size_t kBlockBytes = kPanelQ5_KBytes;
    static inline void scales(const uint8_t* pb, int j, int h, __m256i* sc) {
        sc[0] = sc[1] = scale_pairs_u8(pb + 64 + 16 * j, h);
    }
    static inline __m256 mins(const uint8_t* pb, int j, int h) { return rows8_f32(pb + 192 + 16 * j + 8 * h); }
    template <int v>
    static inline void weights(const uint8_t* pb, int j, int h, __m256i& lo, __m256i& hi) {
        weights5<v>(pb + 320 + 320 * j, h, lo, hi);
    }
};

struct PanelQ5_0 {
    static constexpr int kH = 2, kNC = 3;  // 8-row halves x columns per pass (see panel_kernel)
    static constexpr int kSubs = 1, kSums = 1, kOffset = 16;
    static constexpr bool kMin = false;
    static constexpr size_t kBlockBytes = kPanelQ5_0Bytes;
    static inline void scales(const uint8_t*, int, int, __m256i* sc) { sc[0] = _mm256_set1_epi16(1); }
    static inline __m256 mins(const uint8_t*, int, int) { return _mm256_setzero_ps(); }
    template <int v>
    static inline void weights(const uint8_t* pb, int, int h, __m256i& lo, __m256i& hi) {
        weights5<v>(pb + 32, h, lo, hi);
    }
};

struct PanelQ6K {
    static constexpr int kH = 1, kNC = 4;  // 8-row halves x columns per pass (see panel_kernel)
    static constexpr int kSubs = 8, kSums = 2, kOffset = 32;
    static constexpr bool kMin = false;
    static constexpr size_t kBlockBytes = kPanelQ6_KBytes;
    static inline void scales(const uint8_t* pb, int j, int h, __m256i* sc) {
        sc[0] = scale_pairs_i8(pb + 32 + 16 * (2 * j), h);
        sc[1] = scale_pairs_i8(pb + 32 + 16 * (2 * j + 1), h);
    }
    static inline __m256 mins(const uint8_t*, int, int) { return _mm256_setzero_ps(); }
    template <int v>
    static inline void weights(const uint8_t* pb, int j, int h, __m256i& lo, __m256i& hi) {
        const uint8_t* sub = pb + 288 + 384 * j;
        const __m256i n = load256(sub + 64 * v + 32 * h);
        const __m256i h0 = load256(sub + 256 + 32 * h), h1 = load256(sub + 320 + 32 * h);
        lo = _mm256_or_si256(_mm256_and_si256(n, bytes(0x0f)), _mm256_and_si256(move_bits<2 * v, 4>(h0), bytes(0x30)));
        hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(n, 4), bytes(0x0f)),
                             _mm256_and_si256(move_bits<2 * v, 4>(h1), bytes(0x30)));
    }
};

// ---- the kernel: rows 8 h0 .. 8 (h0 + H) - 1 of one panel against NC columns -------------------------------

// s += p, kept as a chain. Without the empty asm GCC reassociates the int16 sums of a sub-block into a tree
// that holds every vpmaddubsw product at once, spills most of them to the stack and runs at a third of the
// speed (Q4_K, 120 tokens, one Zen 4 core: 55 GMAC/s as a tree).
inline void add_chain(__m256i& s, __m256i p) {
    s = _mm256_add_epi16(s, p);
#if defined(__GNUC__)
    __asm__("" : "+x"(s));
#endif
}

template <class F, int H, int NC, int v>
__attribute__((always_inline)) inline void sub_vector(const uint8_t* pb, int j, int h0, const block_q8_act* const* xb,
                                                      __m256i (&s16)[H][NC][F::kSums]) {
    for (int h = 0; h < H; ++h) {
        __m256i lo, hi;
        F::template weights<v>(pb, j, h0 + h, lo, hi);
        for (int c = 0; c < NC; ++c) {
            add_chain(s16[h][c][0], _mm256_maddubs_epi16(lo, bcast32(xb[c]->qs + 4 * v)));
            add_chain(s16[h][c][F::kSums - 1], _mm256_maddubs_epi16(hi, bcast32(xb[c]->qs + 16 + 4 * v)));
        }
    }
}

template <class F, int H, int NC>
void panel_rows_cols(const uint8_t* panel, int64_t n_blocks, int h0, const uint8_t* x, size_t xs, float* y, size_t ys) {
    const block_q8_act* xc[NC];
    for (int c = 0; c < NC; ++c) xc[c] = reinterpret_cast<const block_q8_act*>(x + c * xs);
    __m256 acc[H][NC];
    for (int h = 0; h < H; ++h) {
        for (int c = 0; c < NC; ++c) acc[h][c] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t* pb = panel + b * F::kBlockBytes;
        prefetch_panel_ahead(pb, F::kBlockBytes);
        __m256 d[H], dmin[H];
        for (int h = 0; h < H; ++h) {
            d[h] = half8(pb + 16 * (h0 + h));
            if constexpr (F::kMin) dmin[h] = half8(pb + 32 + 16 * (h0 + h));
        }
        for (int j = 0; j < F::kSubs; ++j) {
            const block_q8_act* xb[NC];
            for (int c = 0; c < NC; ++c) xb[c] = xc[c] + b * F::kSubs + j;
            __m256i s16[H][NC][F::kSums];
            for (int c = 0; c < NC; ++c) {
                __m256i init[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
                if constexpr (F::kOffset != 0) {
                    const __m256i t = neg_pair_sums<F::kOffset>(load256(reinterpret_cast<const uint8_t*>(xb[c]->qs)));
                    if constexpr (F::kSums == 1) {
                        init[0] = _mm256_add_epi16(t, _mm256_permute2x128_si256(t, t, 0x01));
                    } else {
                        init[0] = _mm256_permute2x128_si256(t, t, 0x00);
                        init[1] = _mm256_permute2x128_si256(t, t, 0x11);
                    }
                }
                for (int h = 0; h < H; ++h) {
                    for (int s = 0; s < F::kSums; ++s) s16[h][c][s] = init[s];
                }
            }
            sub_vector<F, H, NC, 0>(pb, j, h0, xb, s16);
            sub_vector<F, H, NC, 1>(pb, j, h0, xb, s16);
            sub_vector<F, H, NC, 2>(pb, j, h0, xb, s16);
            sub_vector<F, H, NC, 3>(pb, j, h0, xb, s16);
            for (int h = 0; h < H; ++h) {
                __m256i sc[F::kSums];
                F::scales(pb, j, h0 + h, sc);
                __m256 mn = _mm256_setzero_ps();
                if constexpr (F::kMin) mn = _mm256_mul_ps(F::mins(pb, j, h0 + h), dmin[h]);
                for (int c = 0; c < NC; ++c) {
                    __m256i i32 = _mm256_madd_epi16(s16[h][c][0], sc[0]);
                    if constexpr (F::kSums == 2) i32 = _mm256_add_epi32(i32, _mm256_madd_epi16(s16[h][c][1], sc[1]));
                    const __m256 dd = _mm256_mul_ps(d[h], _mm256_set1_ps(xb[c]->d));
                    acc[h][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), dd, acc[h][c]);
                    if constexpr (F::kMin) acc[h][c] = _mm256_fnmadd_ps(mn, _mm256_set1_ps(xb[c]->s), acc[h][c]);
                }
            }
        }
    }
    for (int h = 0; h < H; ++h) {
        for (int c = 0; c < NC; ++c) {
            _mm256_storeu_ps(y + c * ys + 8 * (h0 + h), acc[h][c]);
        }
    }
}

// Each format's pass is kH 8-row halves (1: rows 0..7, then 8..15; 2: all 16 rows, so an activation broadcast
// serves both) by kNC columns, chosen by measurement on one Zen 4 core (2048 x 2048 x 120 tokens; the formats
// with two int16 sums per sub-block spill at 16 rows x 3 columns); the panel's columns in groups of 24 so its
// weights stay in L1/L2 across them. Every output lane sees the same instruction sequence in any pass shape.
template <class F>
void panel_kernel(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t xs, int64_t n_tok, float* y,
                  size_t ys) {
    const int64_t n_blocks = k / (32 * F::kSubs);
    const size_t panel_bytes = static_cast<size_t>(n_blocks) * F::kBlockBytes;
    const uint8_t* xb = static_cast<const uint8_t*>(x);
    for (int64_t p = 0; p < n_panels; ++p) {
        const uint8_t* panel = static_cast<const uint8_t*>(panels) + p * panel_bytes;
        float* yp = y + p * kPanelRows;
        for (int64_t g0 = 0; g0 < n_tok; g0 += 24) {
            const int64_t g1 = std::min(n_tok, g0 + 24);
            if (g1 - g0 < F::kNC) {  // decode and short tails: all 16 rows per pass, one panel read
                int64_t c = g0;
                if (g1 - c >= 2) {
                    panel_rows_cols<F, 2, 2>(panel, n_blocks, 0, xb + c * xs, xs, yp + c * ys, ys);
                    c += 2;
                }
                if (g1 - c == 1) panel_rows_cols<F, 2, 1>(panel, n_blocks, 0, xb + c * xs, xs, yp + c * ys, ys);
                continue;
            }
            for (int h0 = 0; h0 < 2; h0 += F::kH) {
                int64_t c = g0;
                for (; c + F::kNC <= g1; c += F::kNC) {
                    panel_rows_cols<F, F::kH, F::kNC>(panel, n_blocks, h0, xb + c * xs, xs, yp + c * ys, ys);
                }
                if (g1 - c >= 2) {
                    panel_rows_cols<F, F::kH, 2>(panel, n_blocks, h0, xb + c * xs, xs, yp + c * ys, ys);
                    c += 2;
                }
                if (g1 - c == 1) panel_rows_cols<F, F::kH, 1>(panel, n_blocks, h0, xb + c * xs, xs, yp + c * ys, ys);
            }
        }
    }
}

}  // namespace

void panel_q5_0_avx2(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t xs, int64_t n_tok, float* y,
                     size_t ys) {
    panel_kernel<PanelQ5_0>(k, panels, n_panels, x, xs, n_tok, y, ys);
}
void panel_q4_K_avx2(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t xs, int64_t n_tok, float* y,
                     size_t ys) {
    panel_kernel<PanelQ4K>(k, panels, n_panels, x, xs, n_tok, y, ys);
}
void panel_q5_K_avx2(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t xs, int64_t n_tok, float* y,
                     size_t ys) {
    panel_kernel<PanelQ5K>(k, panels, n_panels, x, xs, n_tok, y, ys);
}
void panel_q6_K_avx2(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t xs, int64_t n_tok, float* y,
                     size_t ys) {
    panel_kernel<PanelQ6K>(k, panels, n_panels, x, xs, n_tok, y, ys);
}

}  // namespace cpu
}  // namespace lowbit

#endif  // LOWBIT_HAVE_AVX2
