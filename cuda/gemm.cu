// Prompt path: Y (n_tok, n_rows) = X (n_tok, n_cols) @ W^T on tensor cores (WMMA, fp16 in, fp32 accumulate);
// weight tiles are dequantized straight into shared memory, so no full-precision copy of W ever exists.
#include <mma.h>

#include "common.cuh"

namespace lowbit {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kTileM = 64;            // weight rows per block
constexpr int kTileN = 64;            // tokens per block
constexpr int kTileK = 32;            // k per step: a block of 32, half an NF4/FP4 block, 1/8 of a K-quant one
constexpr int kLdS = kTileK + 8;      // smem row stride in halves: a multiple of 8 (WMMA) that staggers banks
constexpr int kLdC = kTileM + 4;      // output tile stride in floats: a multiple of 4 (WMMA)
constexpr int kGemmThreads = 128;     // 4 warps in a 2 x 2 grid, 32 x 32 outputs each
static_assert(kGemmThreads == 2 * kTileM && kGemmThreads == 2 * kTileN, "loader: two threads per tile row");

template <int T>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t n_rows, int64_t n_cols,
                const float* __restrict__ x, int64_t n_tok, float* __restrict__ y, int accumulate) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
    __shared__ __align__(32) __half s_w[kTileM * kLdS];  // (kTileM rows, kTileK) row-major
    __shared__ __align__(32) __half s_x[kTileN * kLdS];  // (kTileN tokens, kTileK): W^T's operand, col-major
    __shared__ __align__(32) float s_y[kTileN * kLdC];   // (kTileN tokens, kTileM rows)

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int wm = warp / 2;  // warp's 32-row half of the tile
    const int wn = warp % 2;  // warp's 32-token half of the tile
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileM;
    const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTileN;

    // Loader role: thread tid fills tile row (and tile token) tid / 2, k offsets (tid % 2) * 16 .. +15.
    const int lr = tid >> 1;
    const int lk = (tid & 1) * 16;
    const int64_t g_row = row0 + lr;
    const int64_t g_tok = tok0 + lr;
    const uint8_t* w_row = g_row < n_rows ? w + g_row * row_bytes : nullptr;
    const float* x_row = g_tok < n_tok ? x + g_tok * n_cols : nullptr;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int64_t k0 = 0; k0 < n_cols; k0 += kTileK) {
        const int64_t kk = k0 + lk;
        float v[16];
        if (w_row != nullptr && kk < n_cols) {
            dequant16<T>(w_row, kk, n_cols, v);
        } else {
#pragma unroll
            for (int j = 0; j < 16; ++j) v[j] = 0.0f;
        }
#pragma unroll
        for (int j = 0; j < 16; ++j) s_w[lr * kLdS + lk + j] = __float2half_rn(v[j]);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const float xv = (x_row != nullptr && kk + j < n_cols) ? x_row[kk + j] : 0.0f;
            s_x[lr * kLdS + lk + j] = __float2half_rn(xv);
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < kTileK; ks += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], s_w + (wm * 32 + i * 16) * kLdS + ks, kLdS);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], s_x + (wn * 32 + j * 16) * kLdS + ks, kLdS);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

    // acc[i][j] holds C(row, token) for rows wm*32+i*16.., tokens wn*32+j*16..; stored column-major so
    // s_y is (token, row) and the global write below is contiguous along rows.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(s_y + (wn * 32 + j * 16) * kLdC + wm * 32 + i * 16, acc[i][j], kLdC,
                                    wmma::mem_col_major);
    __syncthreads();
    for (int idx = tid; idx < kTileM * kTileN; idx += kGemmThreads) {
        const int t = idx / kTileM;
        const int r = idx % kTileM;
        const int64_t gt = tok0 + t;
        const int64_t gr = row0 + r;
        if (gt < n_tok && gr < n_rows) {
            float* p = y + gt * n_rows + gr;
            const float c = s_y[t * kLdC + r];
            *p = accumulate ? *p + c : c;
        }
    }
#else
    __trap();  // tensor cores need sm_70+; the build targets sm_80+
#endif
}

}  // namespace

void launch_gemm(const DevMatrix& w, const float* x, int64_t n_tok, float* y, bool accumulate, cudaStream_t stream) {
    if (n_tok <= 0 || w.n_rows <= 0) return;
    if (n_tok > 65535LL * kTileN) throw Error("CUDA GEMM: too many tokens in one call; split the batch");
    const dim3 grid(ceil_div_u(w.n_rows, kTileM), ceil_div_u(n_tok, kTileN));
    const int acc = accumulate ? 1 : 0;
    const bool known = with_device_type(w.type, [&](auto type) {
        gemm_kernel<decltype(type)::value><<<grid, kGemmThreads, 0, stream>>>(w.data, w.row_bytes, w.n_rows, w.n_cols,
                                                                              x, n_tok, y, acc);
    });
    if (!known) throw Error("CUDA GEMM: unsupported weight type (use one of " + device_type_names() + ")");
    LB_CUDA_LAUNCHED();
}

}  // namespace cuda
}  // namespace lowbit
