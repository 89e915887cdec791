// The CPU matmul driver: quantize the activations once, then hand tiles of output rows x tokens to the pool.
#include <algorithm>
#include <atomic>
#include <string>

#include "cpu/kernels_internal.h"

namespace lowbit {
namespace cpu {

namespace {

bool is_block_quantized(QType t) {
    return t == QType::Q4_0 || t == QType::Q4_1 || t == QType::Q8_0 || t == QType::NF4;
}

DotTileFn tile_fn(const Kernels& kt, QType t) {
    switch (t) {
        case QType::Q4_0: return kt.dot_q4_0;
        case QType::Q4_1: return kt.dot_q4_1;
        case QType::Q8_0: return kt.dot_q8_0;
        case QType::NF4: return kt.dot_nf4;
        case QType::F16: return kt.dot_f16;
        case QType::BF16: return kt.dot_bf16;
        case QType::F32: return kt.dot_f32;
        default: return nullptr;
    }
}

GemmPanelFn gemm_fn(const Kernels& kt, QType t) {
    switch (t) {
        case QType::Q4_0: return kt.gemm_q4_0;
        case QType::Q4_1: return kt.gemm_q4_1;
        case QType::Q8_0: return kt.gemm_q8_0;
        case QType::NF4: return kt.gemm_nf4;
        default: return nullptr;
    }
}

// From this many tokens on, the panel GEMM (repack + 16-row dots) beats the 4 x 4 dot tiles.
constexpr int64_t kGemmMinTokens = 8;

int64_t block_size(QType t) {
    switch (t) {
        case QType::Q4_0:
        case QType::Q4_1:
        case QType::Q8_0: return 32;
        case QType::NF4: return 64;
        default: return 1;
    }
}

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

}  // namespace

bool matmul_supported(QType t) { return tile_fn(*generic_kernels(), t) != nullptr; }

size_t act_scratch_bytes(QType wt, int64_t k, int64_t n_tok) {
    if (!is_block_quantized(wt)) return 0;
    return static_cast<size_t>(n_tok) * static_cast<size_t>(k / 32) * sizeof(block_q8_act);
}

void matmul(QType wt, const void* w, size_t w_row_bytes, int64_t n_out, int64_t k, const float* x,
            int64_t n_tok, float* y, void* scratch, ThreadPool& pool) {
    if (!matmul_supported(wt)) {
        throw Error("matmul: weight type id " + std::to_string(static_cast<uint32_t>(wt)) +
                    " has no CPU kernel (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0, NF4; expand NF4_DQ with "
                    "nf4_dq_to_nf4 first)");
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
    const DotTileFn fn = tile_fn(kt, wt);

    const void* xs = x;
    size_t x_stride = static_cast<size_t>(k) * sizeof(float);
    if (is_block_quantized(wt)) {
        if (scratch == nullptr) throw Error("matmul: quantized weights need act_scratch_bytes() of scratch");
        // (n_tok, k / 32) activation blocks.
        block_q8_act* act = static_cast<block_q8_act*>(scratch);
        const int64_t nb = k / 32;
        const int64_t grain = std::max<int64_t>(1, 16384 / k);  // ~16K elements per work item
        pool.parallel_for(n_tok, grain, [&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; ++t) kt.quantize_act(x + t * k, act + t * nb, k);
        });
        xs = act;
        x_stride = static_cast<size_t>(nb) * sizeof(block_q8_act);
    }

    const GemmPanelFn gemm = n_tok >= kGemmMinTokens ? gemm_fn(kt, wt) : nullptr;
    if (gemm) {
        // One work item per panel of kPanelRows rows; each repacks its panel once for all tokens.
        const int64_t n_panels = (n_out + kPanelRows - 1) / kPanelRows;
        std::atomic<int64_t> next_panel{0};
        auto panels = [&](int, int) {
            for (;;) {
                const int64_t pi = next_panel.fetch_add(1, std::memory_order_relaxed);
                if (pi >= n_panels) return;
                const int64_t r0 = pi * kPanelRows;
                const int nr = static_cast<int>(std::min<int64_t>(kPanelRows, n_out - r0));
                gemm(k, static_cast<const uint8_t*>(w) + r0 * w_row_bytes, w_row_bytes, nr, xs, x_stride, n_tok,
                     y + r0, static_cast<size_t>(n_out));
            }
        };
        if (n_panels == 1 || pool.size() == 1) {
            panels(0, 1);
        } else {
            pool.run(panels);
        }
        return;
    }

    const int64_t chunk = rows_per_chunk(n_out, n_tok, w_row_bytes);
    const int64_t n_chunks = (n_out + chunk - 1) / chunk;
    std::atomic<int64_t> next{0};
    auto work = [&](int, int) {
        for (;;) {
            const int64_t ci = next.fetch_add(1, std::memory_order_relaxed);
            if (ci >= n_chunks) return;
            const int64_t r0 = ci * chunk;
            const int64_t r1 = std::min(n_out, r0 + chunk);
            // Token tiles outside, row tiles inside: the chunk's weights stay in cache across token tiles.
            for (int64_t c0 = 0; c0 < n_tok; c0 += kTileCols) {
                const int nc = static_cast<int>(std::min<int64_t>(kTileCols, n_tok - c0));
                for (int64_t r = r0; r < r1; r += kTileRows) {
                    const int nr = static_cast<int>(std::min<int64_t>(kTileRows, r1 - r));
                    fn(k, static_cast<const uint8_t*>(w) + r * w_row_bytes, w_row_bytes, nr,
                       static_cast<const uint8_t*>(xs) + c0 * x_stride, x_stride, nc, y + c0 * n_out + r,
                       static_cast<size_t>(n_out));
                }
            }
        }
    };
    if (n_chunks == 1 || pool.size() == 1) {
        work(0, 1);
    } else {
        pool.run(work);
    }
}

}  // namespace cpu
}  // namespace lowbit
