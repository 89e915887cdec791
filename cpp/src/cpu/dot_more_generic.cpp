// Portable C++ dot-tile kernels of Q5_0, Q5_1, IQ4_NL, IQ4_XS, FP4 and the K-quants: the reference the SIMD kernels are tested against.
//
// Each weight block is unpacked into its integer values q (int8), an integer scale per 16 elements and,
// for the types with minima, the minimum terms. Per 32-element activation block x (block_q8_act) the kernel
// then forms in integers isum = sum over its two 16-element halves h of sc_h * sum(q * x.qs), and
// (Q2_K, whose minima are per 16) imin = sum_h mn_h * sum(x.qs); one float multiply-add by x.d per
// activation block, and the weight block's float scales once per weight block:
//   dot += d * sum_b x_b.d * isum_b - dmin * sum_b x_b.d * imin_b + sum_b m_b * x_b.s
// where m_b is a float minimum per 32 elements (Q5_1's m, Q4_K/Q5_K's -dmin * mn) and x_b.s = x_b.d * sum(x_b.qs).
// Value formulas: cpp/include/lowbit/blocks.h and spec/quant-types.md.
#include <cstring>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"

namespace lowbit {
namespace cpu {
namespace {

using detail::half_to_float;

// One weight block (up to a K-quant super-block of 256 elements) in integer form.
struct Unpacked {
    int8_t q[QK_K];       // integer weight values
    int16_t sc[QK_K / 16];  // integer scale of each 16 elements
    int16_t mn[QK_K / 16];  // integer minimum of each 16 elements (Q2_K), times -dmin
    float m32[QK_K / 32];   // float minimum of each 32 elements, times the activation block's s
    float d = 0.0f;
    float dmin = 0.0f;
};

// The 4-bit nibbles of a 32-element block in ggml's order: qs[j] low nibble = element j, high = j + 16.
inline void nibbles_lo_hi(const uint8_t* qs, uint8_t* u) {
    for (int j = 0; j < 16; ++j) {
        u[j] = qs[j] & 0x0f;
        u[j + 16] = qs[j] >> 4;
    }
}

// Fifth bits of Q5_0 / Q5_1: bit j of the little-endian 32-bit qh belongs to element j.
inline void add_fifth_bits(const uint8_t* qh_bytes, uint8_t* u) {
    uint32_t qh;
    std::memcpy(&qh, qh_bytes, 4);
    for (int j = 0; j < 32; ++j) u[j] |= static_cast<uint8_t>(((qh >> j) & 1u) << 4);
}

inline void set_scale_per_32(Unpacked& u, int b, int sc) { u.sc[2 * b] = u.sc[2 * b + 1] = static_cast<int16_t>(sc); }

// ---- per-type unpacking ------------------------------------------------------------------------------
// kElems: elements per weight block; kMin16 / kMin32: which minimum terms the type has.

struct GenQ5_0 {  // w = (q - 16) * d
    using Block = block_q5_0;
    static constexpr int kElems = 32;
    static constexpr bool kMin16 = false, kMin32 = false;
    static void unpack(const Block& b, Unpacked& u) {
        uint8_t v[32];
        nibbles_lo_hi(b.qs, v);
        add_fifth_bits(b.qh, v);
        for (int j = 0; j < 32; ++j) u.q[j] = static_cast<int8_t>(v[j] - 16);
        set_scale_per_32(u, 0, 1);
        u.d = half_to_float(b.d);
    }
};

struct GenQ5_1 {  // w = q * d + m
    using Block = block_q5_1;
    static constexpr int kElems = 32;
    static constexpr bool kMin16 = false, kMin32 = true;
    static void unpack(const Block& b, Unpacked& u) {
        uint8_t v[32];
        nibbles_lo_hi(b.qs, v);
        add_fifth_bits(b.qh, v);
        for (int j = 0; j < 32; ++j) u.q[j] = static_cast<int8_t>(v[j]);
        set_scale_per_32(u, 0, 1);
        u.d = half_to_float(b.d);
        u.m32[0] = half_to_float(b.m);
    }
};

struct GenIQ4_NL {  // w = d * kIQ4NLValues[q]
    using Block = block_iq4_nl;
    static constexpr int kElems = 32;
    static constexpr bool kMin16 = false, kMin32 = false;
    static void unpack(const Block& b, Unpacked& u) {
        uint8_t v[32];
        nibbles_lo_hi(b.qs, v);
        for (int j = 0; j < 32; ++j) u.q[j] = kIQ4NLValues[v[j]];
        set_scale_per_32(u, 0, 1);
        u.d = half_to_float(b.d);
    }
};

struct GenIQ4_XS {  // w = d * (ls - 32) * kIQ4NLValues[q], ls 6 bits per 32 elements
    using Block = block_iq4_xs;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin16 = false, kMin32 = false;
    static void unpack(const Block& b, Unpacked& u) {
        for (int ib = 0; ib < 8; ++ib) {
            uint8_t v[32];
            nibbles_lo_hi(b.qs + 16 * ib, v);
            for (int j = 0; j < 32; ++j) u.q[32 * ib + j] = kIQ4NLValues[v[j]];
            const int ls = ((b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0f) | (((b.scales_h >> (2 * ib)) & 3) << 4);
            set_scale_per_32(u, ib, ls - 32);
        }
        u.d = half_to_float(b.d);
    }
};

struct GenFP4 {  // kFP4Int8[q] * absmax / 127 (kernels_more.h); element 2j in the HIGH nibble of qs[j]
    using Block = block_fp4;
    static constexpr int kElems = QK_FP4;
    static constexpr bool kMin16 = false, kMin32 = false;
    static void unpack(const Block& b, Unpacked& u) {
        for (int j = 0; j < 32; ++j) {
            u.q[2 * j] = kFP4Int8[b.qs[j] >> 4];
            u.q[2 * j + 1] = kFP4Int8[b.qs[j] & 0x0f];
        }
        set_scale_per_32(u, 0, 1);
        set_scale_per_32(u, 1, 1);
        u.d = b.absmax * (1.0f / 127.0f);
    }
};

struct GenQ2_K {  // w = d * sc * q - dmin * mn, per 16 elements; 2-bit q
    using Block = block_q2_K;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin16 = true, kMin32 = false;
    static void unpack(const Block& b, Unpacked& u) {
        // Element 128n + 32s + l (l < 32) sits in bits 2s..2s+1 of qs[32n + l]; sub-block i = element / 16.
        for (int n = 0; n < 2; ++n) {
            for (int s = 0; s < 4; ++s) {
                for (int l = 0; l < 32; ++l) u.q[128 * n + 32 * s + l] = static_cast<int8_t>((b.qs[32 * n + l] >> (2 * s)) & 3);
            }
        }
        for (int i = 0; i < 16; ++i) {
            u.sc[i] = static_cast<int16_t>(b.scales[i] & 0x0f);
            u.mn[i] = static_cast<int16_t>(b.scales[i] >> 4);
        }
        u.d = half_to_float(b.d);
        u.dmin = half_to_float(b.dmin);
    }
};

struct GenQ3_K {  // w = d * (sc - 32) * (q - 4 * !hbit), per 16 elements
    using Block = block_q3_K;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin16 = false, kMin32 = false;
    static void unpack(const Block& b, Unpacked& u) {
        // Low 2 bits as Q2_K; the high bit of element 128n + 32s + l is bit 4n + s of hmask[l].
        for (int n = 0; n < 2; ++n) {
            for (int s = 0; s < 4; ++s) {
                for (int l = 0; l < 32; ++l) {
                    const int low = (b.qs[32 * n + l] >> (2 * s)) & 3;
                    const int high = (b.hmask[l] >> (4 * n + s)) & 1;
                    u.q[128 * n + 32 * s + l] = static_cast<int8_t>(low - (high ? 0 : 4));
                }
            }
        }
        uint8_t stored[16];
        detail::scales_q3_K(b.scales, stored);
        for (int i = 0; i < 16; ++i) u.sc[i] = static_cast<int16_t>(stored[i] - 32);
        u.d = half_to_float(b.d);
    }
};

struct GenQ4_K {  // w = d * sc * q - dmin * mn, per 32 elements; 4-bit q
    using Block = block_q4_K;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin16 = false, kMin32 = true;
    static void unpack(const Block& b, Unpacked& u) {
        // 32-byte chunk c of qs: low nibbles = elements 64c + l, high nibbles = 64c + 32 + l.
        for (int c = 0; c < 4; ++c) {
            for (int l = 0; l < 32; ++l) {
                u.q[64 * c + l] = static_cast<int8_t>(b.qs[32 * c + l] & 0x0f);
                u.q[64 * c + 32 + l] = static_cast<int8_t>(b.qs[32 * c + l] >> 4);
            }
        }
        uint8_t sc[8], mn[8];
        detail::scale_min_k4(b.scales, sc, mn);
        const float dmin = half_to_float(b.dmin);
        for (int i = 0; i < 8; ++i) {
            set_scale_per_32(u, i, sc[i]);
            u.m32[i] = -dmin * static_cast<float>(mn[i]);
        }
        u.d = half_to_float(b.d);
    }
};

struct GenQ5_K {  // as Q4_K with a fifth bit: bit 2c + h of qh[l] for element 64c + 32h + l
    using Block = block_q5_K;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin16 = false, kMin32 = true;
    static void unpack(const Block& b, Unpacked& u) {
        for (int c = 0; c < 4; ++c) {
            for (int l = 0; l < 32; ++l) {
                const int h0 = (b.qh[l] >> (2 * c)) & 1, h1 = (b.qh[l] >> (2 * c + 1)) & 1;
                u.q[64 * c + l] = static_cast<int8_t>((b.qs[32 * c + l] & 0x0f) | h0 << 4);
                u.q[64 * c + 32 + l] = static_cast<int8_t>((b.qs[32 * c + l] >> 4) | h1 << 4);
            }
        }
        uint8_t sc[8], mn[8];
        detail::scale_min_k4(b.scales, sc, mn);
        const float dmin = half_to_float(b.dmin);
        for (int i = 0; i < 8; ++i) {
            set_scale_per_32(u, i, sc[i]);
            u.m32[i] = -dmin * static_cast<float>(mn[i]);
        }
        u.d = half_to_float(b.d);
    }
};

struct GenQ6_K {  // w = d * sc * (q - 32), int8 sc per 16 elements; 6-bit q
    using Block = block_q6_K;
    static constexpr int kElems = QK_K;
    static constexpr bool kMin16 = false, kMin32 = false;
    static void unpack(const Block& b, Unpacked& u) {
        // Per half n of 128 elements, with ql = b.ql + 64n and qh = b.qh + 32n, element 128n + 32s + l:
        // low 4 bits from ql[l + 32 (s & 1)] (low nibble for s < 2, high nibble for s >= 2),
        // high 2 bits from bits 2s..2s+1 of qh[l].
        for (int n = 0; n < 2; ++n) {
            const uint8_t* ql = b.ql + 64 * n;
            const uint8_t* qh = b.qh + 32 * n;
            for (int s = 0; s < 4; ++s) {
                for (int l = 0; l < 32; ++l) {
                    const int low = (ql[l + 32 * (s & 1)] >> (4 * (s >> 1))) & 0x0f;
                    const int high = (qh[l] >> (2 * s)) & 3;
                    u.q[128 * n + 32 * s + l] = static_cast<int8_t>((low | high << 4) - 32);
                }
            }
        }
        for (int i = 0; i < 16; ++i) u.sc[i] = b.scales[i];
        u.d = half_to_float(b.d);
    }
};

// Integer dot of 16 int8 pairs, and the sum of 16 int8; plain loops the compiler vectorizes.
inline int dot16_i8(const int8_t* a, const int8_t* b) {
    int sum = 0;
    for (int j = 0; j < 16; ++j) sum += a[j] * b[j];
    return sum;
}
inline int sum16_i8(const int8_t* a) {
    int sum = 0;
    for (int j = 0; j < 16; ++j) sum += a[j];
    return sum;
}

template <class F>
void dot_more_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y,
                      size_t ys) {
    using Block = typename F::Block;
    constexpr int kSub = F::kElems / 32;  // activation blocks per weight block
    const int64_t nbw = k / F::kElems;
    for (int r = 0; r < nr; ++r) {
        const Block* wr = reinterpret_cast<const Block*>(static_cast<const uint8_t*>(w) + r * ws);
        float acc[kTileCols] = {};
        for (int64_t b = 0; b < nbw; ++b) {
            Unpacked u;
            F::unpack(wr[b], u);
            for (int c = 0; c < nc; ++c) {
                const block_q8_act* xb =
                    reinterpret_cast<const block_q8_act*>(static_cast<const uint8_t*>(x) + c * xs) + b * kSub;
                float sum_d = 0.0f, sum_dmin = 0.0f, sum_m = 0.0f;
                for (int s = 0; s < kSub; ++s) {
                    const int8_t* q = u.q + 32 * s;
                    const int isum = u.sc[2 * s] * dot16_i8(q, xb[s].qs) + u.sc[2 * s + 1] * dot16_i8(q + 16, xb[s].qs + 16);
                    sum_d += xb[s].d * static_cast<float>(isum);
                    if (F::kMin16) {
                        const int imin = u.mn[2 * s] * sum16_i8(xb[s].qs) + u.mn[2 * s + 1] * sum16_i8(xb[s].qs + 16);
                        sum_dmin += xb[s].d * static_cast<float>(imin);
                    }
                    if (F::kMin32) sum_m += u.m32[s] * xb[s].s;
                }
                acc[c] += u.d * sum_d;
                if (F::kMin16) acc[c] -= u.dmin * sum_dmin;
                if (F::kMin32) acc[c] += sum_m;
            }
        }
        for (int c = 0; c < nc; ++c) y[c * ys + r] = acc[c];
    }
}

}  // namespace

void dot_q5_0_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_generic<GenQ5_0>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q5_1_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_generic<GenQ5_1>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_iq4_nl_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_generic<GenIQ4_NL>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_iq4_xs_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_generic<GenIQ4_XS>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_fp4_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_generic<GenFP4>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q2_K_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_generic<GenQ2_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q3_K_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_generic<GenQ3_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q4_K_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_generic<GenQ4_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q5_K_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_generic<GenQ5_K>(k, w, ws, nr, x, xs, nc, y, ys);
}
void dot_q6_K_generic(int64_t k, const void* w, size_t ws, int nr, const void* x, size_t xs, int nc, float* y, size_t ys) {
    dot_more_generic<GenQ6_K>(k, w, ws, nr, x, xs, nc, y, ys);
}

}  // namespace cpu
}  // namespace lowbit
