// The CPU matmul driver: quantize the activations once, then hand tiles of output rows x tokens to the pool.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/kernels_internal.h"

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

// Panel layout per type (kernels.h): per scale block of 16 rows, the scales, then for every 32-element
// sub-block four (nibble types) or eight (Q8_0) 64-byte vectors of 16 row dwords. Same size as the rows.
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

}  // namespace

void repack_panels(QType t, const void* w, size_t w_row_bytes, int64_t n_out, int64_t k, void* out, int64_t p0,
                   int64_t p1) {
    PanelFormat f;
    if (!panels_supported(t, n_out, k) || !panel_format(t, &f)) throw Error("panels: unsupported type or shape");
    const int64_t nb = k / f.block;
    void (*row_fn)(const uint8_t*, int64_t, int, uint8_t*, size_t) =
        t == QType::Q4_0 ? repack_row_q4_0 : t == QType::Q4_1 ? repack_row_q4_1
        : t == QType::Q8_0 ? repack_row_q8_0 : repack_row_nf4;
    for (int64_t p = p0; p < p1; ++p) {
        uint8_t* dst = static_cast<uint8_t*>(out) + static_cast<size_t>(p) * nb * f.block_bytes;
        for (int r = 0; r < kPanelRows; ++r) {
            row_fn(static_cast<const uint8_t*>(w) + (p * kPanelRows + r) * w_row_bytes, nb, r, dst, f.block_bytes);
        }
    }
}

bool panel_row_exact(QType t) { return t == QType::Q4_0 || t == QType::Q4_1 || t == QType::Q8_0; }

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
