// AVX-512 kernels with VNNI: vpdpbusd integer dots, per-call prompt GEMM and load-time panel kernels;
// compiled with -mavx512vnni (CMake: *_avx512vnni.cpp), chosen only on CPUs that have it. Shared x86 bodies
// in kernels_x86.inc.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"
#include "cpu/panels_kquants.h"

// GCC 12's AVX-512 intrinsic headers build results on _mm512_undefined_*(), which trips
// -W(maybe-)uninitialized inside the headers themselves (GCC bug 105593); the code here reads no
// uninitialized value.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lowbit {
namespace cpu {
namespace avx512_vnni {
namespace {

#define LOWBIT_X86_VNNI 1
#include "cpu/kernels_x86.inc"
#undef LOWBIT_X86_VNNI

// 512-bit tiles: two activation blocks per zmm register, so the per-block float work (convert, scale,
// FMA) and the vpdpbusd count are halved against the 256-bit bodies. Each weight format provides the
// pair of 32-element groups p (blocks 2p, 2p+1; for NF4 the two halves of block p) as unsigned bytes,
// the scale vector, and (Q4_1) the two minimums. kSplit layouts keep the nibble expansion cheap: the
// 128-bit lanes hold [block0 0..15, block1 0..15, block0 16..31, block1 16..31] and the activations are
// permuted to match once per column. An odd last activation block uses the 256-bit body's load.
inline __m512i join256(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_zextsi256_si512(lo), hi, 1); }
inline float hsum512(__m512 v) {
    return hsum256(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
// Spread f = [a, b, ...] over the 16 lanes: a where the lane belongs to the first block, else b.
template <bool kSplit>
inline __m512 spread2(__m128 f) {
    const __m512i idx = kSplit ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1)
                               : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(f));
}
template <bool kSplit>
inline __m512 half_pair(uint16_t a, uint16_t b) {
    return spread2<kSplit>(_mm_cvtph_ps(_mm_insert_epi16(_mm_cvtsi32_si128(a), b, 1)));
}
// Two 16-byte nibble arrays -> [lo(q0), lo(q1), hi(q0), hi(q1)] (the kSplit layout).
inline __m512i nibbles_pair(const uint8_t* q0, const uint8_t* q1) {
    const __m256i t = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q0))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(q1)), 1);
    const __m512i z = _mm512_broadcast_i64x4(t);
    return _mm512_and_si512(_mm512_mask_srli_epi16(z, 0xffff0000u, z, 4), _mm512_set1_epi8(0x0f));
}

template <class F>
struct Pair;

template <>
struct Pair<FmtQ4_0> {
    static constexpr int kPerPair = 2;  // weight blocks per pair
    static constexpr bool kSplit = true;
    static inline void load(const block_q4_0* b, __m512i* u, __m512* dw, float*) {
        *u = nibbles_pair(b[0].qs, b[1].qs);
        *dw = half_pair<true>(b[0].d, b[1].d);
    }
};
template <>
struct Pair<FmtQ4_1> {
    static constexpr int kPerPair = 2;
    static constexpr bool kSplit = true;
    static inline void load(const block_q4_1* b, __m512i* u, __m512* dw, float* m) {
        *u = nibbles_pair(b[0].qs, b[1].qs);
        *dw = half_pair<true>(b[0].d, b[1].d);
        m[0] = half_scalar(b[0].m);
        m[1] = half_scalar(b[1].m);
    }
};
template <>
struct Pair<FmtQ8_0> {
    static constexpr int kPerPair = 2;
    static constexpr bool kSplit = false;
    static inline void load(const block_q8_0* b, __m512i* u, __m512* dw, float*) {
        const __m512i w = join256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[0].qs)),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[1].qs)));
        *u = _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));  // w + 128 for vpdpbusd
        *dw = half_pair<false>(b[0].d, b[1].d);
    }
};
template <>
struct Pair<FmtNF4> {
    static constexpr int kPerPair = 1;
    static constexpr bool kSplit = false;
    static inline void load(const block_nf4* b, __m512i* u, __m512* dw, float*) {
        __m256i h[2];
        float scale, unused;
        FmtNF4::load(b, h, &scale, &unused);
        *u = join256(h[0], h[1]);
        *dw = _mm512_set1_ps(scale);
    }
};

template <class F, int NR, int NC>
void tile_quant512(int64_t k, const void* w, size_t ws, const void* x, size_t xs, float* y, size_t ys) {
    using Block = typename F::Block;
    using P = Pair<F>;
    const int64_t nx = k / 32;        // activation blocks
    const int64_t n_pairs = nx / 2;
    const Block* wr[NR];
    for (int r = 0; r < NR; ++r) wr[r] = reinterpret_cast<const Block*>(static_cast<const uint8_t*>(w) + r * ws);
    const block_q8_act* xc[NC];
    for (int c = 0; c < NC; ++c) {
        xc[c] = reinterpret_cast<const block_q8_act*>(static_cast<const uint8_t*>(x) + c * xs);
    }
    __m512 acc[NR][NC];
    float accm[NR][NC];
    for (int r = 0; r < NR; ++r) {
        for (int c = 0; c < NC; ++c) {
            acc[r][c] = _mm512_setzero_ps();
            accm[r][c] = 0.0f;
        }
    }
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t p = 0; p < n_pairs; ++p) {
        __m512i xv[NC], init[NC];
        __m512 dx[NC];
        for (int c = 0; c < NC; ++c) {
            const block_q8_act* xb = xc[c] + 2 * p;
            xv[c] = join256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb[0].qs)),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb[1].qs)));
            if (P::kSplit) xv[c] = _mm512_shuffle_i64x2(xv[c], xv[c], _MM_SHUFFLE(3, 1, 2, 0));
            dx[c] = spread2<P::kSplit>(_mm_insert_ps(_mm_load_ss(&xb[0].d), _mm_load_ss(&xb[1].d), 0x10));
            if (F::kBias != 0) {
                const __m512i sx = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, xv[c]);
                init[c] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sx, F::kBias == 8 ? 3 : 7));
            } else {
                init[c] = _mm512_setzero_si512();
            }
        }
        for (int r = 0; r < NR; ++r) {
            __m512i u;
            __m512 dwv;
            float m[2];
            // Each row of a tile is a short stream (k = 2048: 18 lines of Q4_0) that the hardware prefetcher
            // barely gets going on before the tile ends, so decode sat at a fraction of the memory bandwidth.
            // Ask for the same spot NR rows further down: the next tile's rows (contiguous with this tile's,
            // whatever the chunking) arrive while this tile computes. A prefetch past the buffer never faults.
            _mm_prefetch(reinterpret_cast<const char*>(wr[r] + p * P::kPerPair) + NR * ws, _MM_HINT_T0);
            P::load(wr[r] + p * P::kPerPair, &u, &dwv, m);
            for (int c = 0; c < NC; ++c) {
                const __m512i isum = _mm512_dpbusd_epi32(init[c], u, xv[c]);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dwv, dx[c]), acc[r][c]);
                if (F::kMin) accm[r][c] += m[0] * xc[c][2 * p].s + m[1] * xc[c][2 * p + 1].s;
            }
        }
    }
    for (int r = 0; r < NR; ++r) {
        for (int c = 0; c < NC; ++c) {
            float tail = 0.0f;
            if (nx % 2 != 0) {
                // Odd activation-block count (32-element formats only): the last block on 256 bits.
                __m256i u[2];
                float d, m;
                F::load(wr[r] + (nx - 1), u, &d, &m);
                const block_q8_act& xb = xc[c][nx - 1];
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.qs));
                const __m256i isum = dot_u8_s8(bias_init<F::kBias>(xv), u[0], xv);
                tail = hsum256(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * xb.d)));
                if (F::kMin) tail += m * xb.s;
            }
            y[c * ys + r] = hsum512(acc[r][c]) + accm[r][c] + tail;
        }
    }
}

template <class F>
void dot_quant512(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y,
                  size_t ys) {
    static const TileImpl table[4][4] = {
        {&tile_quant512<F, 1, 1>, &tile_quant512<F, 1, 2>, &tile_quant512<F, 1, 3>, &tile_quant512<F, 1, 4>},
        {&tile_quant512<F, 2, 1>, &tile_quant512<F, 2, 2>, &tile_quant512<F, 2, 3>, &tile_quant512<F, 2, 4>},
        {&tile_quant512<F, 3, 1>, &tile_quant512<F, 3, 2>, &tile_quant512<F, 3, 3>, &tile_quant512<F, 3, 4>},
        {&tile_quant512<F, 4, 1>, &tile_quant512<F, 4, 2>, &tile_quant512<F, 4, 3>, &tile_quant512<F, 4, 4>}};
    table[nr - 1][nc - 1](k, w, ws, x, xs, y, ys);
}

// ---- prompt GEMM: 16-row panels repacked so one vpdpbusd serves 16 rows ------------------------------
// The dot tiles above pay a convert, a scale multiply and an FMA on 16 partial sums for every 64 MACs of a
// (row, column) pair; in a prompt that float work, not memory, is the limit. Here a panel of 16 weight rows
// is repacked (per thread, per call) so that dword lane r of register j holds row r's elements 4j..4j+3 of
// one 32-element block. Eight vpdpbusd against the broadcast activation dwords then leave the complete
// integer block dot of all 16 rows in one register, and the float work (convert, scale, FMA, plus the
// bias/min term) is paid once per block for 16 rows. The weight panel stays in L1/L2 while every column
// passes over it.
struct alignas(64) PanelBlock {
    uint32_t u[8][kPanelRows];  // unsigned weight bytes (w + kBias), dword lane = row
    float dw[kPanelRows];       // weight scale per row
    float coef[kPanelRows];     // times the activation's s: -kBias * d (bias) or the minimum (Q4_1)
};
static_assert(sizeof(PanelBlock) == 640, "PanelBlock layout");

// 4 rows x 8 dwords -> for each dword j the 4 rows' values, stored at p.u[j][r0..r0+3].
inline void store_transposed4(const __m256i v[4], PanelBlock& p, int r0) {
    const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    const __m256i q[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                          _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
    for (int j = 0; j < 4; ++j) {  // q[j] = [dword j of rows 0..3 | dword j + 4 of rows 0..3]
        _mm_store_si128(reinterpret_cast<__m128i*>(&p.u[j][r0]), _mm256_castsi256_si128(q[j]));
        _mm_store_si128(reinterpret_cast<__m128i*>(&p.u[j + 4][r0]), _mm256_extracti128_si256(q[j], 1));
    }
}

template <class F>
void repack_panel(int64_t k, const uint8_t* w, size_t ws, int nr, PanelBlock* pk) {
    using Block = typename F::Block;
    const int64_t nb = k / (32 * F::S);
    for (int r0 = 0; r0 < kPanelRows; r0 += 4) {
        const Block* rows[4];
        for (int i = 0; i < 4; ++i) {
            rows[i] = r0 + i < nr ? reinterpret_cast<const Block*>(w + static_cast<size_t>(r0 + i) * ws) : nullptr;
        }
        if (!rows[0]) {  // padding rows: zero weights and scales contribute nothing
            for (int64_t a = 0; a < nb * F::S; ++a) {
                for (int j = 0; j < 8; ++j) std::memset(&pk[a].u[j][r0], 0, 16);
                std::memset(&pk[a].dw[r0], 0, 16);
                std::memset(&pk[a].coef[r0], 0, 16);
            }
            continue;
        }
        for (int64_t b = 0; b < nb; ++b) {
            __m256i u[4][F::S];
            float d[4], m[4];
            for (int i = 0; i < 4; ++i) {
                m[i] = 0.0f;
                if (rows[i]) {
                    F::load(rows[i] + b, u[i], &d[i], &m[i]);
                } else {
                    for (int g = 0; g < F::S; ++g) u[i][g] = _mm256_setzero_si256();
                    d[i] = 0.0f;
                }
            }
            for (int g = 0; g < F::S; ++g) {
                PanelBlock& p = pk[b * F::S + g];
                const __m256i v[4] = {u[0][g], u[1][g], u[2][g], u[3][g]};
                store_transposed4(v, p, r0);
                for (int i = 0; i < 4; ++i) {
                    p.dw[r0 + i] = d[i];
                    p.coef[r0 + i] = F::kMin ? m[i] : -static_cast<float>(F::kBias) * d[i];
                }
            }
        }
    }
}

inline __m512i bcast_dword(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// Integer dots of one 32-element activation block with 16 rows: u[j] holds the rows' weight bytes for
// activation dword j (elements 4j..4j+3). Two chains so the eight dependent vpdpbusd do not serialise on
// their latency.
inline __m512i block_dot16(const __m512i u[8], const int8_t* qs) {
    __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[0], bcast_dword(qs + 0));
    __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[1], bcast_dword(qs + 4));
    s0 = _mm512_dpbusd_epi32(s0, u[2], bcast_dword(qs + 8));
    s1 = _mm512_dpbusd_epi32(s1, u[3], bcast_dword(qs + 12));
    s0 = _mm512_dpbusd_epi32(s0, u[4], bcast_dword(qs + 16));
    s1 = _mm512_dpbusd_epi32(s1, u[5], bcast_dword(qs + 20));
    s0 = _mm512_dpbusd_epi32(s0, u[6], bcast_dword(qs + 24));
    s1 = _mm512_dpbusd_epi32(s1, u[7], bcast_dword(qs + 28));
    return _mm512_add_epi32(s0, s1);
}

template <int NC>
void panel_columns(const PanelBlock* pk, int64_t nx, const uint8_t* x, size_t xs, float* y, size_t ys,
                   __mmask16 mask) {
    const block_q8_act* xc[NC];
    for (int c = 0; c < NC; ++c) xc[c] = reinterpret_cast<const block_q8_act*>(x + c * xs);
    __m512 acc[NC], acc2[NC];
    for (int c = 0; c < NC; ++c) acc[c] = acc2[c] = _mm512_setzero_ps();
    for (int64_t a = 0; a < nx; ++a) {
        const PanelBlock& p = pk[a];
        __m512i u[8];
        for (int j = 0; j < 8; ++j) u[j] = _mm512_load_si512(p.u[j]);
        const __m512 dw = _mm512_load_ps(p.dw);
        const __m512 coef = _mm512_load_ps(p.coef);
        for (int c = 0; c < NC; ++c) {
            const block_q8_act& xb = xc[c][a];
            const __m512 isum = _mm512_cvtepi32_ps(block_dot16(u, xb.qs));
            acc[c] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dw, _mm512_set1_ps(xb.d)), acc[c]);
            acc2[c] = _mm512_fmadd_ps(coef, _mm512_set1_ps(xb.s), acc2[c]);
        }
    }
    for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(y + c * ys, mask, _mm512_add_ps(acc[c], acc2[c]));
}

constexpr int kPanelCols = 8;

// Load-time panels (kernels.h, repack_panels): per scale block the 16 rows' scales, then per 32-element
// sub-block the vpdpbusd operands of 16 rows (nibble types: low/high nibbles of four 64-byte vectors).
struct PanelQ4_0 {
    static constexpr int kSub = 1, kScaleBytes = 32, kSubBytes = 256;
    static constexpr float kCoef = -8.0f;  // y = acc + kCoef * sum(d_w * s_x): the -8 offset
    static inline __m512 scale(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
    static inline __m512 coef(const uint8_t* p) { return scale(p); }
    static inline void unpack(const uint8_t* p, __m512i* u) {
        const __m512i m4 = _mm512_set1_epi8(0x0f);
        for (int j = 0; j < 4; ++j) {
            const __m512i v = _mm512_loadu_si512(p + 64 * j);
            u[j] = _mm512_and_si512(v, m4);
            u[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        }
    }
};
struct PanelQ4_1 {
    static constexpr int kSub = 1, kScaleBytes = 64, kSubBytes = 256;
    static constexpr float kCoef = 1.0f;  // y = acc + sum(m_w * s_x)
    static inline __m512 scale(const uint8_t* p) { return PanelQ4_0::scale(p); }
    static inline __m512 coef(const uint8_t* p) { return PanelQ4_0::scale(p + 32); }
    static inline void unpack(const uint8_t* p, __m512i* u) { PanelQ4_0::unpack(p, u); }
};
struct PanelQ8_0 {
    static constexpr int kSub = 1, kScaleBytes = 32, kSubBytes = 512;
    static constexpr float kCoef = -128.0f;  // bytes are w + 128
    static inline __m512 scale(const uint8_t* p) { return PanelQ4_0::scale(p); }
    static inline __m512 coef(const uint8_t* p) { return scale(p); }
    static inline void unpack(const uint8_t* p, __m512i* u) {
        for (int j = 0; j < 8; ++j) u[j] = _mm512_loadu_si512(p + 64 * j);
    }
};
struct PanelNF4 {
    static constexpr int kSub = 2, kScaleBytes = 64, kSubBytes = 256;
    static constexpr float kCoef = -128.0f;  // codes map to kNF4Int8 + 128
    static inline __m512 scale(const uint8_t* p) { return _mm512_loadu_ps(p); }
    static inline __m512 coef(const uint8_t* p) { return scale(p); }
    static inline void unpack(const uint8_t* p, __m512i* u) {
        const __m512i lut = _mm512_xor_si512(
            _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lowbit::cpu::detail::kNF4Int8))),
            _mm512_set1_epi8(static_cast<char>(0x80)));
        const __m512i m4 = _mm512_set1_epi8(0x0f);
        for (int j = 0; j < 4; ++j) {
            const __m512i v = _mm512_loadu_si512(p + 64 * j);
            u[j] = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, m4));
            u[j + 4] = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
        }
    }
};

template <class P, int NC>
void panel_columns_fmt(const uint8_t* panel, int64_t n_sb, const uint8_t* x, size_t xs, float* y, size_t ys) {
    const block_q8_act* xc[NC];
    for (int c = 0; c < NC; ++c) xc[c] = reinterpret_cast<const block_q8_act*>(x + c * xs);
    __m512 acc[NC], acc2[NC];
    for (int c = 0; c < NC; ++c) acc[c] = acc2[c] = _mm512_setzero_ps();
    constexpr int64_t kBlockBytes = P::kScaleBytes + P::kSub * P::kSubBytes;
    for (int64_t sb = 0; sb < n_sb; ++sb) {
        const uint8_t* pb = panel + sb * kBlockBytes;
        prefetch_panel_ahead(pb, kBlockBytes);
        const __m512 dw = P::scale(pb);
        const __m512 cw = P::coef(pb);
        for (int g = 0; g < P::kSub; ++g) {
            __m512i u[8];
            P::unpack(pb + P::kScaleBytes + g * P::kSubBytes, u);
            for (int c = 0; c < NC; ++c) {
                const block_q8_act& xb = xc[c][sb * P::kSub + g];
                const __m512 isum = _mm512_cvtepi32_ps(block_dot16(u, xb.qs));
                acc[c] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dw, _mm512_set1_ps(xb.d)), acc[c]);
                acc2[c] = _mm512_fmadd_ps(cw, _mm512_set1_ps(xb.s), acc2[c]);
            }
        }
    }
    const __m512 k = _mm512_set1_ps(P::kCoef);
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(y + c * ys, _mm512_fmadd_ps(acc2[c], k, acc[c]));
}

// Q4_K load-time panels (cpu/panels_kquants.h): each 32-element sub-block is laid out as a Q4_0 panel's, so
// one vpdpbusd chain (block_dot16) gives the 16 rows' integer dots; per sub-block the rows' d * sc and
// dmin * mn (16 floats each) are formed once and serve every column:
//   y += float(dot) * (d sc) * x.d - (dmin mn) * x.s.
inline __m512 rows16_u8_f32(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <int NC>
void panel_columns_q4_K(const uint8_t* panel, int64_t n_blocks, const uint8_t* x, size_t xs, float* y, size_t ys) {
    const block_q8_act* xc[NC];
    for (int c = 0; c < NC; ++c) xc[c] = reinterpret_cast<const block_q8_act*>(x + c * xs);
    __m512 acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t* pb = panel + b * kPanelQ4_KBytes;
        prefetch_panel_ahead(pb, kPanelQ4_KBytes);
        const __m512 d = PanelQ4_0::scale(pb);
        const __m512 dmin = PanelQ4_0::scale(pb + 32);
        for (int j = 0; j < 8; ++j) {
            __m512i u[8];
            PanelQ4_0::unpack(pb + 320 + 256 * j, u);
            const __m512 dsc = _mm512_mul_ps(d, rows16_u8_f32(pb + 64 + 16 * j));
            const __m512 dmn = _mm512_mul_ps(dmin, rows16_u8_f32(pb + 192 + 16 * j));
            for (int c = 0; c < NC; ++c) {
                const block_q8_act& xb = xc[c][b * 8 + j];
                const __m512 isum = _mm512_cvtepi32_ps(block_dot16(u, xb.qs));
                acc[c] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dsc, _mm512_set1_ps(xb.d)), acc[c]);
                acc[c] = _mm512_fnmadd_ps(dmn, _mm512_set1_ps(xb.s), acc[c]);
            }
        }
    }
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(y + c * ys, acc[c]);
}

using PanelColumnsFn = void (*)(const uint8_t* panel, int64_t n_blocks, const uint8_t* x, size_t xs, float* y,
                                size_t ys);

// Panels p of n_panels (n_blocks blocks of block_bytes each) against n_tok columns, kPanelCols at a time:
// cols[NC - 1] computes one group of NC columns.
void panel_groups(const PanelColumnsFn* cols, int64_t n_blocks, size_t block_bytes, const void* panels,
                  int64_t n_panels, const void* x, size_t xs, int64_t n_tok, float* y, size_t ys) {
    const size_t panel_bytes = static_cast<size_t>(n_blocks) * block_bytes;
    const uint8_t* xb = static_cast<const uint8_t*>(x);
    for (int64_t p = 0; p < n_panels; ++p) {
        const uint8_t* panel = static_cast<const uint8_t*>(panels) + p * panel_bytes;
        for (int64_t c0 = 0; c0 < n_tok; c0 += kPanelCols) {
            const int nc = static_cast<int>(std::min<int64_t>(kPanelCols, n_tok - c0));
            cols[nc - 1](panel, n_blocks, xb + c0 * xs, xs, y + c0 * ys + p * kPanelRows, ys);
        }
    }
}

template <class P>
void panel_fmt(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t xs, int64_t n_tok, float* y,
               size_t ys) {
    static const PanelColumnsFn cols[kPanelCols] = {
        &panel_columns_fmt<P, 1>, &panel_columns_fmt<P, 2>, &panel_columns_fmt<P, 3>, &panel_columns_fmt<P, 4>,
        &panel_columns_fmt<P, 5>, &panel_columns_fmt<P, 6>, &panel_columns_fmt<P, 7>, &panel_columns_fmt<P, 8>};
    panel_groups(cols, k / (32 * P::kSub), P::kScaleBytes + P::kSub * P::kSubBytes, panels, n_panels, x, xs, n_tok,
                 y, ys);
}

void panel_q4_K_avx512vnni(int64_t k, const void* panels, int64_t n_panels, const void* x, size_t xs, int64_t n_tok,
                           float* y, size_t ys) {
    static const PanelColumnsFn cols[kPanelCols] = {
        &panel_columns_q4_K<1>, &panel_columns_q4_K<2>, &panel_columns_q4_K<3>, &panel_columns_q4_K<4>,
        &panel_columns_q4_K<5>, &panel_columns_q4_K<6>, &panel_columns_q4_K<7>, &panel_columns_q4_K<8>};
    panel_groups(cols, k / 256, kPanelQ4_KBytes, panels, n_panels, x, xs, n_tok, y, ys);
}

template <class F>
void gemm_panel512(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int64_t n_tok, float* y,
                   size_t ys) {
    const int64_t nx = k / 32;
    thread_local std::vector<PanelBlock> scratch;
    if (static_cast<int64_t>(scratch.size()) < nx) scratch.resize(static_cast<size_t>(nx));
    PanelBlock* pk = scratch.data();
    repack_panel<F>(k, static_cast<const uint8_t*>(w), ws, nr, pk);
    const __mmask16 mask = static_cast<__mmask16>((1u << nr) - 1u);
    static void (*const cols[kPanelCols])(const PanelBlock*, int64_t, const uint8_t*, size_t, float*, size_t,
                                          __mmask16) = {&panel_columns<1>, &panel_columns<2>, &panel_columns<3>,
                                                        &panel_columns<4>, &panel_columns<5>, &panel_columns<6>,
                                                        &panel_columns<7>, &panel_columns<8>};
    const uint8_t* xb = static_cast<const uint8_t*>(x);
    for (int64_t c0 = 0; c0 < n_tok; c0 += kPanelCols) {
        const int nc = static_cast<int>(std::min<int64_t>(kPanelCols, n_tok - c0));
        cols[nc - 1](pk, nx, xb + c0 * xs, xs, y + c0 * ys, ys, mask);
    }
}

constexpr Kernels make_avx512vnni_table() {
    Kernels t{Isa::AVX512, "avx512", quantize_act_x86, rmsnorm_x86, silu_mul_x86, dot_f32_f32_x86, axpy_f32_x86,
              exp_sub_sum_x86, axpy_f16_x86, gelu_mul_x86};
    t.weighted_rows = weighted_rows_x86;
    t.attn_scores = attn_scores_x86;
    t.at(QType::Q4_0) = {dot_quant512<FmtQ4_0>, gemm_panel512<FmtQ4_0>, panel_fmt<PanelQ4_0>,
                         quantize_row_as<block_q4_0, quantize_row_q4_0_avx512>};
    t.at(QType::Q4_1) = {dot_quant512<FmtQ4_1>, gemm_panel512<FmtQ4_1>, panel_fmt<PanelQ4_1>,
                         quantize_row_as<block_q4_1, quantize_row_q4_1_avx512>};
    t.at(QType::Q8_0) = {dot_quant512<FmtQ8_0>, gemm_panel512<FmtQ8_0>, panel_fmt<PanelQ8_0>,
                         quantize_row_as<block_q8_0, quantize_row_q8_0_avx512>};
    t.at(QType::NF4) = {dot_quant512<FmtNF4>, gemm_panel512<FmtNF4>, panel_fmt<PanelNF4>, nullptr};
    t.at(QType::F16).dot = dot_float<LoadF16>;
    t.at(QType::BF16).dot = dot_float<LoadBF16>;
    t.at(QType::F32).dot = dot_float<LoadF32>;
    // The types added with the K-quants (cpu/kernels_more.h)
    t.at(QType::Q5_0).dot = dot_q5_0_avx512vnni;
    t.at(QType::Q5_1).dot = dot_q5_1_avx512vnni;
    t.at(QType::IQ4_NL).dot = dot_iq4_nl_avx512vnni;
    t.at(QType::IQ4_XS).dot = dot_iq4_xs_avx512vnni;
    t.at(QType::FP4).dot = dot_fp4_avx512vnni;
    t.at(QType::Q2_K).dot = dot_q2_K_avx512vnni;
    t.at(QType::Q3_K).dot = dot_q3_K_avx512vnni;
    t.at(QType::Q4_K).dot = dot_q4_K_avx512vnni;
    t.at(QType::Q5_K).dot = dot_q5_K_avx512vnni;
    t.at(QType::Q6_K).dot = dot_q6_K_avx512vnni;
    // Load-time panels of Q5_0 and the K-quants: Q4_K's own vpdpbusd kernel (above); the others keep the AVX2
    // panel kernels (cpu/panels_kquants.h) until AVX-512 ones exist; they beat the row kernels at prompt and
    // decode alike.
    t.at(QType::Q5_0).panel = panel_q5_0_avx2;
    t.at(QType::Q4_K).panel = panel_q4_K_avx512vnni;
    t.at(QType::Q5_K).panel = panel_q5_K_avx2;
    t.at(QType::Q6_K).panel = panel_q6_K_avx2;
    return t;
}

const Kernels kTable = make_avx512vnni_table();

}  // namespace
}  // namespace avx512_vnni


const Kernels* avx512vnni_kernels() { return &avx512_vnni::kTable; }

}  // namespace cpu
}  // namespace lowbit
