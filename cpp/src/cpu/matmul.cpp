// The CPU matmul driver: quantize the activations once, then hand tiles of output rows x tokens to the pool.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/kernels_internal.h"
#include "cpu/kernels_more.h"
#include "cpu/panels_kquants.h"

namespace lowbit {
namespace cpu {

namespace {

// Weights whose rows are dotted against quantized activations (block_q8_act), i.e. every block type.
bool is_block_quantized(QType t) {
    const TypeTraits* tt = type_traits(static_cast<uint32_t>(t));
    return tt != nullptr && tt->supported && tt->is_quantized && !tt->tensor_level;
}

int64_t block_size(QType t) { return supported_traits(t).block_size; }

// From this many tokens on, the panel GEMM (repack + 16-row dots) beats the 4 x 4 dot tiles.
constexpr int64_t kGemmMinTokens = 8;

// Output rows per work item. It depends on the shape only (never on the thread count), so every thread
// count decomposes the output into the same tiles and produces bit-identical results.
int64_t rows_per_chunk(int64_t n_out, int64_t n_tok, size_t w_row_bytes) {
    const auto round4 = [](int64_t v) { return (v + kTileRows - 1) / kTileRows * kTileRows; };
    if (n_tok > 1) {
        // Prompt: 16 rows keep a weight chunk in L1/L2 while every token tile passes over it.
        return std::min<int64_t>(16, round4(n_out));
    }
    // Decode: ~64 KB of contiguous weights per item, so each thread streams long runs the hardware
    // prefetcher can follow, while at least ~16 items remain to balance the threads.
    int64_t rows = round4(std::max<int64_t>(1, static_cast<int64_t>(65536 / std::max<size_t>(w_row_bytes, 1))));
    rows = std::min(rows, std::max<int64_t>(kTileRows, round4(n_out / 16)));
    return std::max<int64_t>(kTileRows, rows);
}

// x (n_tok, k) floats -> (n_tok, k / 32) activation blocks in scratch, rows split over the pool.
block_q8_act* quantize_activations(const Kernels& kt, const float* x, int64_t n_tok, int64_t k, void* scratch,
                                   ThreadPool& pool) {
    if (scratch == nullptr) throw Error("matmul: quantized weights need act_scratch_bytes() of scratch");
    block_q8_act* act = static_cast<block_q8_act*>(scratch);
    const int64_t nb = k / 32;
    const int64_t grain = std::max<int64_t>(1, 16384 / k);  // ~16K elements per work item
    pool.parallel_for(n_tok, grain, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) kt.quantize_act(x + t * k, act + t * nb, k);
    });
    return act;
}

// item(i) for i in [0, n_items). Each thread starts on its own contiguous share, in order (one sequential
// stream of weights per thread, which the hardware prefetcher follows across items), and then takes items
// left in the other threads' shares, so a thread that is slowed down (a noisy neighbour, a preemption) does
// not hold up the job.
template <class Fn>
void run_items(ThreadPool& pool, int64_t n_items, Fn item) {
    const int nth = pool.size();
    if (n_items == 1 || nth == 1) {
        for (int64_t i = 0; i < n_items; ++i) item(i);
        return;
    }
    struct alignas(64) Share {
        std::atomic<int64_t> next;
        int64_t end;
    };
    Share stack_shares[16];
    std::vector<Share> heap_shares(nth > 16 ? nth : 0);
    Share* shares = nth > 16 ? heap_shares.data() : stack_shares;
    for (int t = 0; t < nth; ++t) {
        shares[t].next.store(n_items * t / nth, std::memory_order_relaxed);
        shares[t].end = n_items * (t + 1) / nth;
    }
    pool.run([&](int ith, int) {
        for (int k = 0; k < nth; ++k) {
            Share& sh = shares[(ith + k) % nth];
            for (int64_t i; (i = sh.next.fetch_add(1, std::memory_order_relaxed)) < sh.end;) item(i);
        }
    });
}

}  // namespace

bool matmul_supported(QType t) { return qtype_index(t) >= 0 && generic_kernels()->at(t).dot != nullptr; }

size_t act_scratch_bytes(QType wt, int64_t k, int64_t n_tok) {
    if (!is_block_quantized(wt)) return 0;
    return static_cast<size_t>(n_tok) * static_cast<size_t>(k / 32) * sizeof(block_q8_act);
}

void matmul(QType wt, const void* w, size_t w_row_bytes, int64_t n_out, int64_t k, const float* x,
            int64_t n_tok, float* y, void* scratch, ThreadPool& pool) {
    if (!matmul_supported(wt)) {
        const TypeTraits* tt = type_traits(static_cast<uint32_t>(wt));
        throw Error(std::string("matmul: weight type ") +
                    (tt ? tt->name : "id " + std::to_string(static_cast<uint32_t>(wt))) +
                    " has no CPU kernel (NF4_DQ: expand it with nf4_dq_to_nf4 first)");
    }
    if (n_out <= 0 || n_tok <= 0 || k <= 0) {
        if (n_out < 0 || n_tok < 0 || k < 0) throw Error("matmul: negative dimension");
        return;
    }
    if (k % block_size(wt) != 0) {
        throw Error("matmul: k = " + std::to_string(k) + " is not a multiple of the weight block size " +
                    std::to_string(block_size(wt)));
    }
    const Kernels& kt = kernels();
    const DotTileFn fn = kt.at(wt).dot;

    const void* xs = x;
    size_t x_stride = static_cast<size_t>(k) * sizeof(float);
    if (is_block_quantized(wt)) {
        xs = quantize_activations(kt, x, n_tok, k, scratch, pool);
        x_stride = static_cast<size_t>(k / 32) * sizeof(block_q8_act);
    }

    const GemmPanelFn gemm = n_tok >= kGemmMinTokens ? kt.at(wt).gemm : nullptr;
    if (gemm) {
        // One work item per panel of kPanelRows rows; each repacks its panel once for all tokens.
        run_items(pool, (n_out + kPanelRows - 1) / kPanelRows, [&](int64_t pi) {
            const int64_t r0 = pi * kPanelRows;
            const int nr = static_cast<int>(std::min<int64_t>(kPanelRows, n_out - r0));
            gemm(k, static_cast<const uint8_t*>(w) + r0 * w_row_bytes, w_row_bytes, nr, xs, x_stride, n_tok, y + r0,
                 static_cast<size_t>(n_out));
        });
        return;
    }

    const int64_t chunk = rows_per_chunk(n_out, n_tok, w_row_bytes);
    // Decode: one row at a time, so each thread reads its chunk as one sequential stream the hardware
    // prefetcher follows (4-row tiles read four short streams: Q8_0 matvec 13 -> 23 GB/s on one core).
    const int64_t tile_rows = n_tok == 1 ? 1 : kTileRows;
    run_items(pool, (n_out + chunk - 1) / chunk, [&](int64_t ci) {
        const int64_t r0 = ci * chunk;
        const int64_t r1 = std::min(n_out, r0 + chunk);
        // Token tiles outside, row tiles inside: the chunk's weights stay in cache across token tiles.
        for (int64_t c0 = 0; c0 < n_tok; c0 += kTileCols) {
            const int nc = static_cast<int>(std::min<int64_t>(kTileCols, n_tok - c0));
            for (int64_t r = r0; r < r1; r += tile_rows) {
                const int nr = static_cast<int>(std::min<int64_t>(tile_rows, r1 - r));
                fn(k, static_cast<const uint8_t*>(w) + r * w_row_bytes, w_row_bytes, nr,
                   static_cast<const uint8_t*>(xs) + c0 * x_stride, x_stride, nc, y + c0 * n_out + r,
                   static_cast<size_t>(n_out));
            }
        }
    });
}

// Panel layout per type (kernels.h; Q5_0 and the K-quants in cpu/panels_kquants.h): per scale block of 16
// rows, the scales, then for every 32-element sub-block four (nibble types) or eight (Q8_0) 64-byte vectors of
// 16 row dwords, and for 5- and 6-bit values one or two vectors of their upper bits.
struct PanelFormat {
    int64_t block;       // elements per scale block
    size_t block_bytes;  // bytes per scale block of 16 rows
};

bool panel_format(QType t, PanelFormat* f) {
    switch (t) {
        case QType::Q4_0: *f = {32, 32 + 256}; return true;           // fp16 d; nibbles
        case QType::Q4_1: *f = {32, 32 + 32 + 256}; return true;      // fp16 d, fp16 m; nibbles
        case QType::Q8_0: *f = {32, 32 + 512}; return true;           // fp16 d; bytes w + 128
        case QType::NF4: *f = {64, 64 + 2 * 256}; return true;        // fp32 absmax / 127; 2 x nibbles
        case QType::Q5_0: *f = {32, kPanelQ5_0Bytes}; return true;
        case QType::Q4_K: *f = {QK_K, kPanelQ4_KBytes}; return true;
        case QType::Q5_K: *f = {QK_K, kPanelQ5_KBytes}; return true;
        case QType::Q6_K: *f = {QK_K, kPanelQ6_KBytes}; return true;
        default: return false;
    }
}

bool panels_supported(QType t, int64_t n_out, int64_t k) {
    PanelFormat f;
    return panel_format(t, &f) && n_out > 0 && n_out % kPanelRows == 0 && k > 0 && k % f.block == 0;
}

size_t panels_bytes(QType t, int64_t n_out, int64_t k) {
    PanelFormat f;
    if (!panels_supported(t, n_out, k) || !panel_format(t, &f)) throw Error("panels: unsupported type or shape");
    return static_cast<size_t>(n_out / kPanelRows) * static_cast<size_t>(k / f.block) * f.block_bytes;
}

namespace {

// One row's scale block b -> its lane r of the panel block pb (layouts in kernels.h).
inline void put_dword(uint8_t* dst, const uint8_t* src) { std::memcpy(dst, src, 4); }

void repack_row_q4_0(const uint8_t* row, int64_t nb, int r, uint8_t* dst, size_t bb) {
    const auto* x = reinterpret_cast<const block_q4_0*>(row);
    for (int64_t b = 0; b < nb; ++b, dst += bb) {
        std::memcpy(dst + 2 * r, &x[b].d, 2);
        for (int j = 0; j < 4; ++j) put_dword(dst + 32 + 64 * j + 4 * r, x[b].qs + 4 * j);
    }
}
void repack_row_q4_1(const uint8_t* row, int64_t nb, int r, uint8_t* dst, size_t bb) {
    const auto* x = reinterpret_cast<const block_q4_1*>(row);
    for (int64_t b = 0; b < nb; ++b, dst += bb) {
        std::memcpy(dst + 2 * r, &x[b].d, 2);
        std::memcpy(dst + 32 + 2 * r, &x[b].m, 2);
        for (int j = 0; j < 4; ++j) put_dword(dst + 64 + 64 * j + 4 * r, x[b].qs + 4 * j);
    }
}
void repack_row_q8_0(const uint8_t* row, int64_t nb, int r, uint8_t* dst, size_t bb) {
    const auto* x = reinterpret_cast<const block_q8_0*>(row);
    for (int64_t b = 0; b < nb; ++b, dst += bb) {
        std::memcpy(dst + 2 * r, &x[b].d, 2);
        for (int j = 0; j < 8; ++j) {
            uint32_t v;
            std::memcpy(&v, x[b].qs + 4 * j, 4);
            v ^= 0x80808080u;  // w + 128 in every byte
            std::memcpy(dst + 32 + 64 * j + 4 * r, &v, 4);
        }
    }
}
void repack_row_nf4(const uint8_t* row, int64_t nb, int r, uint8_t* dst, size_t bb) {
    const auto* x = reinterpret_cast<const block_nf4*>(row);
    for (int64_t b = 0; b < nb; ++b, dst += bb) {
        const float d = x[b].absmax * (1.0f / 127.0f);  // as the row kernels scale kNF4Int8
        std::memcpy(dst + 4 * r, &d, 4);
        uint8_t code[64];
        for (int i = 0; i < 32; ++i) {  // bitsandbytes: element 2i in the high nibble of qs[i]
            code[2 * i] = static_cast<uint8_t>(x[b].qs[i] >> 4);
            code[2 * i + 1] = static_cast<uint8_t>(x[b].qs[i] & 0x0f);
        }
        for (int g = 0; g < 2; ++g) {
            for (int j = 0; j < 4; ++j) {
                uint8_t* o = dst + 64 + 256 * g + 64 * j + 4 * r;
                for (int i = 0; i < 4; ++i) {
                    const int e = 32 * g + 4 * j + i;
                    o[i] = static_cast<uint8_t>(code[e] | code[e + 16] << 4);
                }
            }
        }
    }
}


// ---- Q5_0 and the K-quants (layouts in cpu/panels_kquants.h) --------------------------------------
// A row's scale block is first spelled out as its quant values q (0 .. 2^bits - 1, one byte per element)
// and scales, which are then scattered into lane r of the panel block; panel_row gathers and packs them back.

// 32 values of one row's sub-block <-> lane r of the sub-block's vectors at dst (kPanelSubBytes(bits) bytes).
void put_sub(const uint8_t* q, int bits, int r, uint8_t* dst) {
    for (int v = 0; v < 4; ++v) {
        for (int b = 0; b < 4; ++b) {
            dst[64 * v + 4 * r + b] = static_cast<uint8_t>((q[4 * v + b] & 15) | (q[16 + 4 * v + b] & 15) << 4);
        }
    }
    for (int b = 0; b < 4 && bits == 5; ++b) {
        int byte = 0;
        for (int v = 0; v < 4; ++v) byte |= (q[4 * v + b] >> 4 & 1) << v | (q[16 + 4 * v + b] >> 4 & 1) << (4 + v);
        dst[256 + 4 * r + b] = static_cast<uint8_t>(byte);
    }
    for (int g = 0; g < 2 && bits == 6; ++g) {
        for (int b = 0; b < 4; ++b) {
            int byte = 0;
            for (int v = 0; v < 4; ++v) byte |= (q[16 * g + 4 * v + b] >> 4 & 3) << (2 * v);
            dst[256 + 64 * g + 4 * r + b] = static_cast<uint8_t>(byte);
        }
    }
}
void get_sub(const uint8_t* src, int bits, int r, uint8_t* q) {
    for (int v = 0; v < 4; ++v) {
        for (int b = 0; b < 4; ++b) {
            const uint8_t n = src[64 * v + 4 * r + b];
            q[4 * v + b] = n & 15;
            q[16 + 4 * v + b] = n >> 4;
        }
    }
    for (int b = 0; b < 4 && bits == 5; ++b) {
        const int byte = src[256 + 4 * r + b];
        for (int v = 0; v < 4; ++v) {
            q[4 * v + b] |= static_cast<uint8_t>((byte >> v & 1) << 4);
            q[16 + 4 * v + b] |= static_cast<uint8_t>((byte >> (4 + v) & 1) << 4);
        }
    }
    for (int g = 0; g < 2 && bits == 6; ++g) {
        for (int b = 0; b < 4; ++b) {
            const int byte = src[256 + 64 * g + 4 * r + b];
            for (int v = 0; v < 4; ++v) q[16 * g + 4 * v + b] |= static_cast<uint8_t>((byte >> (2 * v) & 3) << 4);
        }
    }
}

// A row's scale block spelled out: fp16 d (and dmin), per-32 scales/minima (Q4_K, Q5_K) or per-16 int8
// scales (Q6_K), and the quant values of its elements.
struct Spelled {
    uint16_t d, dmin;
    uint8_t sc[16], mn[8];
    uint8_t q[QK_K];
};

// Q4_K / Q5_K: element 32j + l sits in nibble j % 2 of qs[32 (j / 2) + l]; Q5_K's fifth bit is bit j of qh[l].
template <class Block>
void spell_k4(const Block& x, Spelled& s) {
    std::memcpy(&s.d, &x.d, 2);
    std::memcpy(&s.dmin, &x.dmin, 2);
    detail::scale_min_k4(x.scales, s.sc, s.mn);
    for (int j = 0; j < 8; ++j) {
        for (int l = 0; l < 32; ++l) {
            int q = x.qs[32 * (j / 2) + l] >> (4 * (j % 2)) & 15;
            if constexpr (sizeof(Block) == sizeof(block_q5_K)) q |= (x.qh[l] >> j & 1) << 4;
            s.q[32 * j + l] = static_cast<uint8_t>(q);
        }
    }
}
template <class Block>
void pack_k4(const Spelled& s, Block& x) {
    std::memcpy(&x.d, &s.d, 2);
    std::memcpy(&x.dmin, &s.dmin, 2);
    for (int i = 0; i < 4; ++i) {  // the inverse of detail::scale_min_k4
        x.scales[i] = static_cast<uint8_t>((s.sc[i] & 63) | (s.sc[4 + i] >> 4) << 6);
        x.scales[4 + i] = static_cast<uint8_t>((s.mn[i] & 63) | (s.mn[4 + i] >> 4) << 6);
        x.scales[8 + i] = static_cast<uint8_t>((s.sc[4 + i] & 15) | (s.mn[4 + i] & 15) << 4);
    }
    std::memset(x.qs, 0, sizeof(x.qs));
    if constexpr (sizeof(Block) == sizeof(block_q5_K)) std::memset(x.qh, 0, sizeof(x.qh));
    for (int j = 0; j < 8; ++j) {
        for (int l = 0; l < 32; ++l) {
            const int q = s.q[32 * j + l];
            x.qs[32 * (j / 2) + l] |= static_cast<uint8_t>((q & 15) << (4 * (j % 2)));
            if constexpr (sizeof(Block) == sizeof(block_q5_K)) x.qh[l] |= static_cast<uint8_t>((q >> 4 & 1) << j);
        }
    }
}

// Q6_K: element 32j + l, j = 4n + s: low 4 bits in nibble s / 2 of ql[64n + 32 (s % 2) + l], high 2 bits in
// bits 2s .. 2s+1 of qh[32n + l]; int8 scale sc[2j + l / 16].
void spell_q6_K(const block_q6_K& x, Spelled& s) {
    std::memcpy(&s.d, &x.d, 2);
    std::memcpy(s.sc, x.scales, 16);
    for (int j = 0; j < 8; ++j) {
        const int n = j / 4, sub = j % 4;
        for (int l = 0; l < 32; ++l) {
            const int low = x.ql[64 * n + 32 * (sub % 2) + l] >> (4 * (sub / 2)) & 15;
            const int high = x.qh[32 * n + l] >> (2 * sub) & 3;
            s.q[32 * j + l] = static_cast<uint8_t>(low | high << 4);
        }
    }
}
void pack_q6_K(const Spelled& s, block_q6_K& x) {
    std::memcpy(&x.d, &s.d, 2);
    std::memcpy(x.scales, s.sc, 16);
    std::memset(x.ql, 0, sizeof(x.ql));
    std::memset(x.qh, 0, sizeof(x.qh));
    for (int j = 0; j < 8; ++j) {
        const int n = j / 4, sub = j % 4;
        for (int l = 0; l < 32; ++l) {
            const int q = s.q[32 * j + l];
            x.ql[64 * n + 32 * (sub % 2) + l] |= static_cast<uint8_t>((q & 15) << (4 * (sub / 2)));
            x.qh[32 * n + l] |= static_cast<uint8_t>((q >> 4) << (2 * sub));
        }
    }
}

// Q5_0: element l < 16 in the low nibble of qs[l], l >= 16 in the high nibble of qs[l - 16]; bit l of qh.
void spell_q5_0(const block_q5_0& x, Spelled& s) {
    std::memcpy(&s.d, &x.d, 2);
    uint32_t qh;
    std::memcpy(&qh, x.qh, 4);
    for (int l = 0; l < 32; ++l) {
        s.q[l] = static_cast<uint8_t>((x.qs[l % 16] >> (4 * (l / 16)) & 15) | (qh >> l & 1) << 4);
    }
}
void pack_q5_0(const Spelled& s, block_q5_0& x) {
    std::memcpy(&x.d, &s.d, 2);
    uint32_t qh = 0;
    std::memset(x.qs, 0, sizeof(x.qs));
    for (int l = 0; l < 32; ++l) {
        x.qs[l % 16] |= static_cast<uint8_t>((s.q[l] & 15) << (4 * (l / 16)));
        qh |= static_cast<uint32_t>(s.q[l] >> 4 & 1) << l;
    }
    std::memcpy(x.qh, &qh, 4);
}

// Spelled block <-> lane r of a panel block of type t.
void put_spelled(QType t, const Spelled& s, int r, uint8_t* dst) {
    std::memcpy(dst + 2 * r, &s.d, 2);
    if (t == QType::Q5_0) {
        put_sub(s.q, 5, r, dst + 32);
    } else if (t == QType::Q6_K) {
        for (int i = 0; i < 16; ++i) dst[32 + 16 * i + r] = s.sc[i];
        for (int j = 0; j < 8; ++j) put_sub(s.q + 32 * j, 6, r, dst + 288 + 384 * j);
    } else {  // Q4_K, Q5_K
        const int bits = t == QType::Q5_K ? 5 : 4;
        std::memcpy(dst + 32 + 2 * r, &s.dmin, 2);
        for (int j = 0; j < 8; ++j) {
            dst[64 + 16 * j + r] = s.sc[j];
            dst[192 + 16 * j + r] = s.mn[j];
            put_sub(s.q + 32 * j, bits, r, dst + 320 + (bits == 5 ? 320 : 256) * j);
        }
    }
}
void get_spelled(QType t, const uint8_t* src, int r, Spelled& s) {
    std::memcpy(&s.d, src + 2 * r, 2);
    if (t == QType::Q5_0) {
        get_sub(src + 32, 5, r, s.q);
    } else if (t == QType::Q6_K) {
        for (int i = 0; i < 16; ++i) s.sc[i] = src[32 + 16 * i + r];
        for (int j = 0; j < 8; ++j) get_sub(src + 288 + 384 * j, 6, r, s.q + 32 * j);
    } else {
        const int bits = t == QType::Q5_K ? 5 : 4;
        std::memcpy(&s.dmin, src + 32 + 2 * r, 2);
        for (int j = 0; j < 8; ++j) {
            s.sc[j] = src[64 + 16 * j + r];
            s.mn[j] = src[192 + 16 * j + r];
            get_sub(src + 320 + (bits == 5 ? 320 : 256) * j, bits, r, s.q + 32 * j);
        }
    }
}

template <QType T>
void repack_row_spelled(const uint8_t* row, int64_t nb, int r, uint8_t* dst, size_t bb) {
    Spelled s;
    for (int64_t b = 0; b < nb; ++b, dst += bb) {
        if constexpr (T == QType::Q5_0) spell_q5_0(reinterpret_cast<const block_q5_0*>(row)[b], s);
        if constexpr (T == QType::Q4_K) spell_k4(reinterpret_cast<const block_q4_K*>(row)[b], s);
        if constexpr (T == QType::Q5_K) spell_k4(reinterpret_cast<const block_q5_K*>(row)[b], s);
        if constexpr (T == QType::Q6_K) spell_q6_K(reinterpret_cast<const block_q6_K*>(row)[b], s);
        put_spelled(T, s, r, dst);
    }
}

}  // namespace

void repack_panels(QType t, const void* w, size_t w_row_bytes, int64_t n_out, int64_t k, void* out, int64_t p0,
                   int64_t p1) {
    PanelFormat f;
    if (!panels_supported(t, n_out, k) || !panel_format(t, &f)) throw Error("panels: unsupported type or shape");
    const int64_t nb = k / f.block;
    void (*row_fn)(const uint8_t*, int64_t, int, uint8_t*, size_t) = nullptr;
    switch (t) {
        case QType::Q4_0: row_fn = repack_row_q4_0; break;
        case QType::Q4_1: row_fn = repack_row_q4_1; break;
        case QType::Q8_0: row_fn = repack_row_q8_0; break;
        case QType::NF4: row_fn = repack_row_nf4; break;
        case QType::Q5_0: row_fn = repack_row_spelled<QType::Q5_0>; break;
        case QType::Q4_K: row_fn = repack_row_spelled<QType::Q4_K>; break;
        case QType::Q5_K: row_fn = repack_row_spelled<QType::Q5_K>; break;
        default: row_fn = repack_row_spelled<QType::Q6_K>; break;
    }
    for (int64_t p = p0; p < p1; ++p) {
        uint8_t* dst = static_cast<uint8_t*>(out) + static_cast<size_t>(p) * nb * f.block_bytes;
        for (int r = 0; r < kPanelRows; ++r) {
            row_fn(static_cast<const uint8_t*>(w) + (p * kPanelRows + r) * w_row_bytes, nb, r, dst, f.block_bytes);
        }
    }
}

// Every panel but NF4's keeps the file's bytes, only moved (scales unpacked to a byte each, bits regrouped).
bool panel_row_exact(QType t) {
    PanelFormat f;
    return t != QType::NF4 && panel_format(t, &f);
}

void panel_row(QType t, const void* panels, int64_t n_out, int64_t k, int64_t row, void* out) {
    PanelFormat f;
    if (!panel_row_exact(t) || !panels_supported(t, n_out, k) || !panel_format(t, &f) || row < 0 || row >= n_out) {
        throw Error("panel_row: unsupported type, shape or row");
    }
    const int64_t nb = k / f.block;
    const int r = static_cast<int>(row % kPanelRows);
    const uint8_t* src = static_cast<const uint8_t*>(panels) + static_cast<size_t>(row / kPanelRows) * nb * f.block_bytes;
    for (int64_t b = 0; b < nb; ++b, src += f.block_bytes) {
        switch (t) {
            case QType::Q4_0: {
                auto& o = static_cast<block_q4_0*>(out)[b];
                std::memcpy(&o.d, src + 2 * r, 2);
                for (int j = 0; j < 4; ++j) std::memcpy(o.qs + 4 * j, src + 32 + 64 * j + 4 * r, 4);
                break;
            }
            case QType::Q4_1: {
                auto& o = static_cast<block_q4_1*>(out)[b];
                std::memcpy(&o.d, src + 2 * r, 2);
                std::memcpy(&o.m, src + 32 + 2 * r, 2);
                for (int j = 0; j < 4; ++j) std::memcpy(o.qs + 4 * j, src + 64 + 64 * j + 4 * r, 4);
                break;
            }
            case QType::Q5_0:
            case QType::Q4_K:
            case QType::Q5_K:
            case QType::Q6_K: {
                Spelled s;
                get_spelled(t, src, r, s);
                if (t == QType::Q5_0) pack_q5_0(s, static_cast<block_q5_0*>(out)[b]);
                if (t == QType::Q4_K) pack_k4(s, static_cast<block_q4_K*>(out)[b]);
                if (t == QType::Q5_K) pack_k4(s, static_cast<block_q5_K*>(out)[b]);
                if (t == QType::Q6_K) pack_q6_K(s, static_cast<block_q6_K*>(out)[b]);
                break;
            }
            default: {  // Q8_0
                auto& o = static_cast<block_q8_0*>(out)[b];
                std::memcpy(&o.d, src + 2 * r, 2);
                for (int j = 0; j < 8; ++j) {
                    uint32_t v;
                    std::memcpy(&v, src + 32 + 64 * j + 4 * r, 4);
                    v ^= 0x80808080u;
                    std::memcpy(o.qs + 4 * j, &v, 4);
                }
            }
        }
    }
}

namespace {

PanelFn panel_fn(const Kernels& kt, QType t) { return qtype_index(t) >= 0 ? kt.at(t).panel : nullptr; }

}  // namespace

bool matmul_panels_group(const PanelJob* jobs, int n_jobs, int64_t k, const float* x, int64_t n_tok, void* scratch,
                         ThreadPool& pool) {
    const Kernels& kt = kernels();
    if (n_jobs < 1 || n_jobs > kMaxPanelJobs || n_tok <= 0) return false;
    struct Item {
        PanelFn fn;
        const uint8_t* panels;
        size_t panel_bytes;
        int64_t n_panels, per_item, first_item;
        float* y;
        int64_t n_out;
    } items[kMaxPanelJobs];
    int64_t n_items = 0;
    for (int j = 0; j < n_jobs; ++j) {
        const PanelJob& pj = jobs[j];
        PanelFormat f;
        const PanelFn fn = panel_fn(kt, pj.type);
        if (!fn || !pj.panels || !panels_supported(pj.type, pj.n_out, k) || !panel_format(pj.type, &f)) return false;
        Item& it = items[j];
        it.fn = fn;
        it.panels = static_cast<const uint8_t*>(pj.panels);
        it.panel_bytes = static_cast<size_t>(k / f.block) * f.block_bytes;
        it.n_panels = pj.n_out / kPanelRows;
        // Decode: ~64 KB of weights per work item (one sequential stream), at least ~16 items per matrix to
        // balance threads. Prompt: one panel per item; the kernel passes all columns over it in L1/L2.
        it.per_item = 1;
        if (n_tok < 8) {
            it.per_item = std::max<int64_t>(1, static_cast<int64_t>(65536 / it.panel_bytes));
            it.per_item = std::min(it.per_item, std::max<int64_t>(1, it.n_panels / 16));
        }
        it.first_item = n_items;
        n_items += (it.n_panels + it.per_item - 1) / it.per_item;
        it.y = pj.y;
        it.n_out = pj.n_out;
    }
    const block_q8_act* act = quantize_activations(kt, x, n_tok, k, scratch, pool);
    const size_t xs = static_cast<size_t>(k / 32) * sizeof(block_q8_act);
    run_items(pool, n_items, [&](int64_t i) {
        int j = 0;
        while (j + 1 < n_jobs && i >= items[j + 1].first_item) ++j;
        const Item& it = items[j];
        const int64_t p0 = (i - it.first_item) * it.per_item, p1 = std::min(it.n_panels, p0 + it.per_item);
        it.fn(k, it.panels + p0 * it.panel_bytes, p1 - p0, act, xs, n_tok, it.y + p0 * kPanelRows,
              static_cast<size_t>(it.n_out));
    });
    return true;
}

bool matmul_panels(QType t, const void* panels, int64_t n_out, int64_t k, const float* x, int64_t n_tok, float* y,
                   void* scratch, ThreadPool& pool) {
    const PanelJob job{t, panels, n_out, y};
    return matmul_panels_group(&job, 1, k, x, n_tok, scratch, pool);
}

}  // namespace cpu
}  // namespace lowbit
