// AVX2 dot-tile kernels of Q5_0, Q5_1, IQ4_NL, IQ4_XS, FP4 and the K-quants (vpmaddubsw integer dots, as cpu/kernels_x86.inc).
//
// Per 32-element activation block x (block_q8_act) the weights come out as one 32-byte vector, are
// multiplied by x.qs with vpmaddubsw (unsigned weight bytes times signed activations, int16 pair sums)
// and widened with vpmaddwd, whose second operand carries the integer scales: an int16 vector with the
// scale of elements 0..15 in the low 128-bit lane and that of 16..31 in the high lane, so the per-16 scales
// of Q2_K/Q3_K/Q6_K cost nothing extra. Weights with an offset (Q5_0: q - 16, Q3_K: q - 4, Q6_K: q - 32)
// are fed unsigned and vpmaddubsw(offset, x) is subtracted in int16; table types (IQ4_NL, IQ4_XS, FP4) are
// signed and use the sign trick |w| * sign(x, w). The int32 lanes go to float once per activation block
// (times x.d) and the super-block scales are applied once per super-block, as in dot_more_generic.cpp,
// whose sums these kernels reproduce up to float rounding; the 32-element types take d * x.d in one
// multiply-add.
//
// Decode calls these with one row and one column, so the float sums are split into two independent
// chains (within a super-block, and across weight blocks) to keep the FMA latency off the critical path.
#ifdef LOWBIT_HAVE_AVX2

#include <immintrin.h>

#include <cstring>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"

namespace lowbit {
namespace cpu {
namespace {

inline float half_f32(uint16_t h) { return _cvtsh_ss(h); }

inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m256i bytes(int v) { return _mm256_set1_epi8(static_cast<char>(v)); }

// 16 bytes of nibbles -> 32 bytes in ggml's order: qs[j] low nibble = element j, high nibble = j + 16.
inline __m256i nibbles_lo_hi(const uint8_t* qs) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), bytes(0x0f));
}

// Q5_0 / Q5_1 fifth bits: 0x10 in byte j when bit j of the little-endian 32-bit qh is set.
inline __m256i fifth_bits(const uint8_t* qh_bytes) {
    int32_t qh;
    std::memcpy(&qh, qh_bytes, 4);
    // Byte j gets qh's byte j / 8 (vpshufb indexes within each 128-bit lane, and every dword holds qh).
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(qh),
                                               _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                                                2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));  // bit j % 8 of byte j
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), bytes(0x10));
}

// Every byte's bits shifted so that bit `from` lands on bit `to` (the caller masks the bits it keeps).
// The 16-bit shifts carry bits across byte borders only into positions the masks drop.
inline __m256i move_bit(__m256i v, int from, int to) {
    if (from > to) return _mm256_srli_epi16(v, from - to);
    if (from < to) return _mm256_slli_epi16(v, to - from);
    return v;
}

// vpshufb controls that spread one int16 word over each 128-bit lane: per32[j] picks word j in both lanes
// (a scale per 32 elements), per16[i] word 2i in the low lane and 2i + 1 in the high lane (per 16).
struct PickTables {
    alignas(32) int8_t per32[8][32];
    alignas(32) int8_t per16[4][32];
};
constexpr PickTables make_pick_tables() {
    PickTables t{};
    for (int i = 0; i < 32; ++i) {
        const int lane = i / 16, byte = i % 2;
        for (int j = 0; j < 8; ++j) t.per32[j][i] = static_cast<int8_t>(2 * j + byte);
        for (int j = 0; j < 4; ++j) t.per16[j][i] = static_cast<int8_t>(2 * (2 * j + lane) + byte);
    }
    return t;
}
constexpr PickTables kPick = make_pick_tables();

// The vpmaddwd scale operand of one activation block: int16 scales spread over the two lanes.
inline __m256i scale_per32(__m256i words, int j) { return _mm256_shuffle_epi8(words, load256(kPick.per32[j])); }
inline __m256i both_lanes(__m128i v) { return _mm256_broadcastsi128_si256(v); }

// int16 pair sums of u * x (u unsigned bytes), minus those of offset * x: (u - offset) * x.
inline __m256i pairs_offset(__m256i u, __m256i x, int offset) {
    return _mm256_sub_epi16(_mm256_maddubs_epi16(u, x), _mm256_maddubs_epi16(bytes(offset), x));
}
// int16 pair sums of w * x for signed w (|w| <= 127): |w| * sign(x, w).
inline __m256i pairs_signed(__m256i w, __m256i x) {
    return _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
}
inline __m256i widen(__m256i pairs, __m256i scales16) { return _mm256_madd_epi16(pairs, scales16); }
inline __m256i ones16() { return _mm256_set1_epi16(1); }

// ---- weight formats ------------------------------------------------------------------------------------
// kElems: elements per weight block. prepare() reads the block's scales into State (d: float factor of
// the integer sums; m[j]: float minimum per 32 times x.s, kMin32; dmin: factor of imin, kMin16);
// weights(j) gives activation block j's 32 weight bytes; idot(j) the int32 lanes of its scaled dot.

struct AvxQ5_0 {  // (q - 16) * d
    using Block = block_q5_0;
    static constexpr int kElems = 32;
    static constexpr bool kMin32 = false, kMin16 = false;
    struct State {
        float d;
    };
    static inline void prepare(const Block& b, State& st) { st.d = half_f32(b.d); }
    static inline __m256i weights(const Block& b, const State&, int) {
        return _mm256_or_si256(nibbles_lo_hi(b.qs), fifth_bits(b.qh));
    }
    static inline __m256i idot(const State&, int, __m256i w, __m256i x) { return widen(pairs_offset(w, x, 16), ones16()); }
};

struct AvxQ5_1 {  // q * d + m
    using Block = block_q5_1;
    static constexpr int kElems = 32;
    static constexpr bool kMin32 = true, kMin16 = false;
    struct State {
        float d, m[1];
    };
    static inline void prepare(const Block& b, State& st) {
        st.d = half_f32(b.d);
        st.m[0] = half_f32(b.m);
    }
    static inline __m256i weights(const Block& b, const State&, int) {
        return _mm256_or_si256(nibbles_lo_hi(b.qs), fifth_bits(b.qh));
    }
    static inline __m256i idot(const State&, int, __m256i w, __m256i x) {
        return widen(_mm256_maddubs_epi16(w, x), ones16());
    }
};

inline __m256i iq4nl_lut() {
    return both_lanes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NLValues)));
}

struct AvxIQ4_NL {  // d * kIQ4NLValues[q]
    using Block = block_iq4_nl;
    static constexpr int kElems = 32;
    static constexpr bool kMin32 = false, kMin16 = false;
    struct State {
        float d;
    };
    static inline void prepare(const Block& b, State& st) { st.d = half_f32(b.d); }
    static inline __m256i weights(const Block& b, const State&, int) {
        return _mm256_shuffle_epi8(iq4nl_lut(), nibbles_lo_hi(b.qs));
    }
    static inline __m256i idot(const State&, int, __m256i w, __m256i x) { return widen(pairs_signed(w, x), ones16()); }
};

struct AvxFP4 {  // kFP4Int8[q] * absmax / 127; element 2j in the HIGH nibble of qs[j]
    using Block = block_fp4;
    static constexpr int kElems = QK_FP4;
    static constexpr bool kMin32 = false, kMin16 = false;
    struct State {
        float d;
        __m256i w[2];
    };
    static inline void prepare(const Block& b, State& st) {
        const __m256i lut = both_lanes(_mm_load_si128(reinterpret_cast<const __m128i*>(kFP4Int8)));
        const __m256i v = load256(b.qs);
        const __m256i first = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), bytes(0x0f)));
        const __m256i second = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, bytes(0x0f)));
        const __m256i e0 = _mm256_unpacklo_epi8(first, second);  // lanes: elements 0..15 | 32..47
        const __m256i e1 = _mm256_unpackhi_epi8(first, second);  // lanes: elements 16..31 | 48..63
        st.w[0] = _mm256_permute2x128_si256(e0, e1, 0x20);
        st.w[1] = _mm256_permute2x128_si256(e0, e1, 0x31);
        st.d = b.absmax * (1.0f / 127.0f);
    }
    static inline __m256i weights(const Block&, const State& st, int j) { return st.w[j]; }
    static inline __m256i idot(const State&, int, __m256i w, __m256i x) { return widen(pairs_signed(w, x), ones16()); }
};

struct AvxIQ4_XS {  // d * (ls - 32) * kIQ4NLValues[q], ls per 32
    using Block = block_iq4_xs;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin32 = false, kMin16 = false;
    struct State {
        float d;
        __m256i sc;  // the 8 scales ls - 32 as int16, in both lanes
    };
    static inline void prepare(const Block& b, State& st) {
        // Byte i of the 8 scales: nibble i of scales_l, bits 4..5 from bit pair i of scales_h.
        uint32_t lo32;
        std::memcpy(&lo32, b.scales_l, 4);
        uint64_t lo = lo32;
        lo = (lo | lo << 16) & 0x0000ffff0000ffffull;
        lo = (lo | lo << 8) & 0x00ff00ff00ff00ffull;
        lo = (lo | lo << 4) & 0x0f0f0f0f0f0f0f0full;
        uint64_t hi = b.scales_h;
        hi = (hi | hi << 24) & 0x000000ff000000ffull;
        hi = (hi | hi << 12) & 0x000f000f000f000full;
        hi = (hi | hi << 6) & 0x0303030303030303ull;
        const __m128i ls = _mm_cvtsi64_si128(static_cast<long long>(lo | hi << 4));
        st.sc = both_lanes(_mm_sub_epi16(_mm_cvtepu8_epi16(ls), _mm_set1_epi16(32)));
        st.d = half_f32(b.d);
    }
    static inline __m256i weights(const Block& b, const State&, int j) {
        return _mm256_shuffle_epi8(iq4nl_lut(), nibbles_lo_hi(b.qs + 16 * j));
    }
    static inline __m256i idot(const State& st, int j, __m256i w, __m256i x) {
        return widen(pairs_signed(w, x), scale_per32(st.sc, j));
    }
};

// Q4_K / Q5_K scales (int16, both lanes) and minima (float, times -dmin) per 32.
template <class Block>
inline void prepare_k4(const Block& b, __m256i* sc, float* m) {
    uint8_t s8[8], m8[8];
    detail::scale_min_k4(b.scales, s8, m8);
    int64_t s64, m64;
    std::memcpy(&s64, s8, 8);
    std::memcpy(&m64, m8, 8);
    *sc = both_lanes(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(s64)));
    const __m256 mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(m64)));
    _mm256_storeu_ps(m, _mm256_mul_ps(mins, _mm256_set1_ps(-half_f32(b.dmin))));
}

struct AvxQ4_K {  // d * sc * q - dmin * mn per 32; 32-byte chunk c: low nibbles block 2c, high 2c + 1
    using Block = block_q4_K;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin32 = true, kMin16 = false;
    struct State {
        float d;
        float m[8];
        __m256i sc;
    };
    static inline void prepare(const Block& b, State& st) {
        prepare_k4(b, &st.sc, st.m);
        st.d = half_f32(b.d);
    }
    static inline __m256i weights(const Block& b, const State&, int j) {
        const __m256i v = load256(b.qs + 32 * (j / 2));
        return _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, bytes(0x0f));
    }
    static inline __m256i idot(const State& st, int j, __m256i w, __m256i x) {
        return widen(_mm256_maddubs_epi16(w, x), scale_per32(st.sc, j));
    }
};

struct AvxQ5_K {  // as Q4_K; fifth bit of block j's element l is bit j of qh[l]
    using Block = block_q5_K;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin32 = true, kMin16 = false;
    struct State {
        float d;
        float m[8];
        __m256i sc, qh;
    };
    static inline void prepare(const Block& b, State& st) {
        prepare_k4(b, &st.sc, st.m);
        st.qh = load256(b.qh);
        st.d = half_f32(b.d);
    }
    static inline __m256i weights(const Block& b, const State& st, int j) {
        const __m256i v = load256(b.qs + 32 * (j / 2));
        const __m256i low = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, bytes(0x0f));
        return _mm256_or_si256(low, _mm256_and_si256(move_bit(st.qh, j, 4), bytes(0x10)));
    }
    static inline __m256i idot(const State& st, int j, __m256i w, __m256i x) {
        return widen(_mm256_maddubs_epi16(w, x), scale_per32(st.sc, j));
    }
};

// Per-16 scale operand of activation block j from sixteen int16 scales split over two vectors (scales
// 0..7 and 8..15, each in both lanes): scale 2j for the low lane, 2j + 1 for the high lane.
inline __m256i scale_per16(const __m256i* sc, int j) { return _mm256_shuffle_epi8(sc[j / 4], load256(kPick.per16[j % 4])); }
inline void split_scales16(__m128i s8, __m256i* sc, bool is_signed) {
    sc[0] = both_lanes(is_signed ? _mm_cvtepi8_epi16(s8) : _mm_cvtepu8_epi16(s8));
    const __m128i upper = _mm_srli_si128(s8, 8);
    sc[1] = both_lanes(is_signed ? _mm_cvtepi8_epi16(upper) : _mm_cvtepu8_epi16(upper));
}

struct AvxQ6_K {  // d * sc * (q - 32), int8 sc per 16
    using Block = block_q6_K;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin32 = false, kMin16 = false;
    struct State {
        float d;
        __m256i sc[2];
    };
    static inline void prepare(const Block& b, State& st) {
        split_scales16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales)), st.sc, true);
        st.d = half_f32(b.d);
    }
    // Block j = 4n + s: low 4 bits from ql[64n + 32 (s & 1) + l] (high nibble for s >= 2), high 2 bits
    // from bits 2s..2s+1 of qh[32n + l].
    static inline __m256i weights(const Block& b, const State&, int j) {
        const int n = j / 4, s = j % 4;
        const __m256i ql = load256(b.ql + 64 * n + 32 * (s & 1));
        const __m256i low = _mm256_and_si256(s >= 2 ? _mm256_srli_epi16(ql, 4) : ql, bytes(0x0f));
        const __m256i high = _mm256_and_si256(move_bit(load256(b.qh + 32 * n), 2 * s, 4), bytes(0x30));
        return _mm256_or_si256(low, high);
    }
    static inline __m256i idot(const State& st, int j, __m256i w, __m256i x) {
        return widen(pairs_offset(w, x, 32), scale_per16(st.sc, j));
    }
};

struct AvxQ3_K {  // d * (sc - 32) * (q - 4 * !hbit), per 16
    using Block = block_q3_K;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin32 = false, kMin16 = false;
    struct State {
        float d;
        __m256i sc[2], hmask;
    };
    static inline void prepare(const Block& b, State& st) {
        alignas(16) uint8_t stored[16];
        detail::scales_q3_K(b.scales, stored);
        const __m128i s8 = _mm_sub_epi8(_mm_load_si128(reinterpret_cast<const __m128i*>(stored)), _mm_set1_epi8(32));
        split_scales16(s8, st.sc, true);
        st.hmask = load256(b.hmask);
        st.d = half_f32(b.d);
    }
    // Block j = 4n + s: low 2 bits in bits 2s..2s+1 of qs[32n + l], high bit = bit j of hmask[l]; the
    // unsigned weight is low | hbit << 2 (0..7), the value is that minus 4.
    static inline __m256i weights(const Block& b, const State& st, int j) {
        const int n = j / 4, s = j % 4;
        const __m256i low = _mm256_and_si256(_mm256_srli_epi16(load256(b.qs + 32 * n), 2 * s), bytes(0x03));
        return _mm256_or_si256(low, _mm256_and_si256(move_bit(st.hmask, j, 2), bytes(0x04)));
    }
    static inline __m256i idot(const State& st, int j, __m256i w, __m256i x) {
        return widen(pairs_offset(w, x, 4), scale_per16(st.sc, j));
    }
};

struct AvxQ2_K {  // d * sc * q - dmin * mn, per 16
    using Block = block_q2_K;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin32 = false, kMin16 = true;
    struct State {
        float d, dmin;
        __m256i sc[2], mn[2];
    };
    static inline void prepare(const Block& b, State& st) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales));
        const __m128i m4 = _mm_set1_epi8(0x0f);
        split_scales16(_mm_and_si128(v, m4), st.sc, false);
        split_scales16(_mm_and_si128(_mm_srli_epi16(v, 4), m4), st.mn, false);
        st.d = half_f32(b.d);
        st.dmin = half_f32(b.dmin);
    }
    static inline __m256i weights(const Block& b, const State&, int j) {
        const int n = j / 4, s = j % 4;
        return _mm256_and_si256(_mm256_srli_epi16(load256(b.qs + 32 * n), 2 * s), bytes(0x03));
    }
    static inline __m256i idot(const State& st, int j, __m256i w, __m256i x) {
        return widen(_mm256_maddubs_epi16(w, x), scale_per16(st.sc, j));
    }
    // sum over the two halves of mn_h * sum(x_h)
    static inline __m256i imin(const State& st, int j, __m256i x) {
        return widen(_mm256_maddubs_epi16(bytes(1), x), scale_per16(st.mn, j));
    }
};

// ---- the tile: rows one after the other, NC columns at once ---------------------------------------------
// One weight block against NC columns (x[c]: the column's first activation block of this weight block),
// added to acc[c] (vector) and accm[c] (the kMin32 terms). Always inlined, so the accumulators stay in
// registers across the pair of calls in rows_more_avx2.
template <class F, int NC>
__attribute__((always_inline)) inline void block_avx2(const typename F::Block& blk, const block_q8_act* const* x, __m256* acc, float* accm) {
    constexpr int kSub = F::kElems / 32;  // activation blocks per weight block
    typename F::State st;
    F::prepare(blk, st);
    if constexpr (kSub == 1) {  // one scale per activation block: a single multiply-add with d * x.d
        const __m256i w0 = F::weights(blk, st, 0);
        for (int c = 0; c < NC; ++c) {
            const block_q8_act& xa = x[c][0];
            const __m256 f = _mm256_cvtepi32_ps(F::idot(st, 0, w0, load256(xa.qs)));
            acc[c] = _mm256_fmadd_ps(f, _mm256_set1_ps(st.d * xa.d), acc[c]);
            if constexpr (F::kMin32) accm[c] += st.m[0] * xa.s;
        }
    } else {
        // Two chains per sum (even and odd activation blocks), started afresh in every weight block.
        __m256 part[NC][2], partm[NC][2];
        float ms[NC][2];
#pragma GCC unroll 8
        for (int j = 0; j < kSub; ++j) {
            const __m256i wj = F::weights(blk, st, j);
            for (int c = 0; c < NC; ++c) {
                const block_q8_act& xa = x[c][j];
                const __m256i xv = load256(xa.qs);
                const __m256 dx = _mm256_set1_ps(xa.d);
                const __m256 f = _mm256_cvtepi32_ps(F::idot(st, j, wj, xv));
                part[c][j & 1] = j < 2 ? _mm256_mul_ps(f, dx) : _mm256_fmadd_ps(f, dx, part[c][j & 1]);
                if constexpr (F::kMin16) {
                    const __m256 fm = _mm256_cvtepi32_ps(F::imin(st, j, xv));
                    partm[c][j & 1] = j < 2 ? _mm256_mul_ps(fm, dx) : _mm256_fmadd_ps(fm, dx, partm[c][j & 1]);
                }
                if constexpr (F::kMin32) ms[c][j & 1] = j < 2 ? st.m[j] * xa.s : ms[c][j & 1] + st.m[j] * xa.s;
            }
        }
        for (int c = 0; c < NC; ++c) {
            acc[c] = _mm256_fmadd_ps(_mm256_add_ps(part[c][0], part[c][1]), _mm256_set1_ps(st.d), acc[c]);
            if constexpr (F::kMin16) {
                acc[c] = _mm256_fnmadd_ps(_mm256_add_ps(partm[c][0], partm[c][1]), _mm256_set1_ps(st.dmin), acc[c]);
            }
            if constexpr (F::kMin32) accm[c] += ms[c][0] + ms[c][1];
        }
    }
}

// Weight blocks go in pairs onto two accumulators, so consecutive blocks do not wait on each other.
template <class F, int NC>
void rows_more_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, float* y, size_t ys) {
    using Block = typename F::Block;
    constexpr int kSub = F::kElems / 32;
    const int64_t nbw = k / F::kElems;
    const block_q8_act* xc[NC];
    for (int c = 0; c < NC; ++c) {
        xc[c] = reinterpret_cast<const block_q8_act*>(static_cast<const uint8_t*>(x) + c * xs);
    }
    for (int r = 0; r < nr; ++r) {
        const Block* wr = reinterpret_cast<const Block*>(static_cast<const uint8_t*>(w) + r * ws);
        __m256 acc0[NC], acc1[NC];
        float accm0[NC], accm1[NC];
        for (int c = 0; c < NC; ++c) {
            acc0[c] = acc1[c] = _mm256_setzero_ps();
            accm0[c] = accm1[c] = 0.0f;
        }
        const block_q8_act* xb[NC];
        int64_t b = 0;
        for (; b + 1 < nbw; b += 2) {
            for (int c = 0; c < NC; ++c) xb[c] = xc[c] + b * kSub;
            block_avx2<F, NC>(wr[b], xb, acc0, accm0);
            for (int c = 0; c < NC; ++c) xb[c] += kSub;
            block_avx2<F, NC>(wr[b + 1], xb, acc1, accm1);
        }
        if (b < nbw) {
            for (int c = 0; c < NC; ++c) xb[c] = xc[c] + b * kSub;
            block_avx2<F, NC>(wr[b], xb, acc0, accm0);
        }
        for (int c = 0; c < NC; ++c) y[c * ys + r] = hsum_ps(_mm256_add_ps(acc0[c], acc1[c])) + (accm0[c] + accm1[c]);
    }
}

template <class F>
void dot_more_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    static_assert(kTileCols == 4, "column dispatch below assumes 4");
    switch (nc) {
        case 1: rows_more_avx2<F, 1>(k, w, ws, nr, x, xs, y, ys); break;
        case 2: rows_more_avx2<F, 2>(k, w, ws, nr, x, xs, y, ys); break;
        case 3: rows_more_avx2<F, 3>(k, w, ws, nr, x, xs, y, ys); break;
        default: rows_more_avx2<F, 4>(k, w, ws, nr, x, xs, y, ys); break;
    }
}

}  // namespace

void dot_q5_0_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_avx2<AvxQ5_0>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q5_1_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_avx2<AvxQ5_1>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_iq4_nl_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_avx2<AvxIQ4_NL>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_iq4_xs_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_avx2<AvxIQ4_XS>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_fp4_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_avx2<AvxFP4>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q2_K_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_avx2<AvxQ2_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q3_K_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_avx2<AvxQ3_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q4_K_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_avx2<AvxQ4_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q5_K_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_avx2<AvxQ5_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q6_K_avx2(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_avx2<AvxQ6_K>(k, w, ws, nr, x, xs, nc, y, ys);
}

}  // namespace cpu
}  // namespace lowbit

#endif  // LOWBIT_HAVE_AVX2
