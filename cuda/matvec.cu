// Decode path: activation quantization to block_q8_act and matrix-vector kernels (int8 dp4a or fp32
// on-the-fly dequantization), plus the matmul dispatcher that picks matvec or the tensor-core GEMM.
#include "common.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kQuantThreads = 256;
constexpr int kMatvecWarps = 4;  // one output row per warp

// x: n floats (n % 32 == 0) -> n / 32 blocks; one warp per block, one lane per element.
// Same formula as the CPU's quantize_act (q8_0 reference with an fp32 scale, kernels.h):
// d = amax / 127, q = roundf(x * (1 / d)), s = d * sum(q).
__global__ void __launch_bounds__(kQuantThreads) quantize_act_kernel(const float* __restrict__ x, int64_t n,
                                                                     block_q8_act* __restrict__ y) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kQuantThreads + threadIdx.x;
    if (i >= n) return;  // n % 32 == 0 and warps are 32-aligned, so whole warps leave together
    const int lane = threadIdx.x & 31;
    const float v = x[i];
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    // roundf: half away from zero, as the q8_0 reference quantizer (spec/quant-types.md#q8_0).
    const int q = static_cast<int>(roundf(v * id));
    const int sum = warp_sum_int(q);
    block_q8_act* b = y + i / 32;
    b->qs[lane] = static_cast<int8_t>(q);
    if (lane == 0) {
        b->d = d;
        b->s = d * static_cast<float>(sum);
    }
}

// y (n_rows) (+)= W (n_rows, n_cols) . activations; one warp per row, lanes stride over 32-element
// sub-blocks (quantized types) or elements (float types).
template <int T, bool kInt8>
__global__ void __launch_bounds__(kMatvecWarps * 32)
    matvec_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t n_rows, int64_t n_cols,
                  const float* __restrict__ x, const block_q8_act* __restrict__ xa, float* __restrict__ y,
                  int accumulate) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kMatvecWarps + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;  // whole warp
    const uint8_t* wr = w + row * row_bytes;
    float sum = 0.0f;
    if constexpr (kInt8) {
        const int64_t nb = n_cols / 32;
        for (int64_t ib = lane; ib < nb; ib += 32) sum += dot32_q8<T>(wr, ib, xa + ib);
    } else if constexpr (is_float_type(T)) {
        for (int64_t i = lane; i < n_cols; i += 32) {
            float wv;
            if constexpr (T == kF32) wv = __ldg(reinterpret_cast<const float*>(wr) + i);
            else if constexpr (T == kF16) wv = h2f(reinterpret_cast<const uint16_t*>(wr)[i]);
            else wv = bf2f(reinterpret_cast<const uint16_t*>(wr)[i]);
            sum += wv * __ldg(x + i);
        }
    } else {
        const int64_t nb = n_cols / 32;
        for (int64_t ib = lane; ib < nb; ib += 32) sum += dot32_f32<T>(wr, ib, x + ib * 32);
    }
    sum = warp_sum(sum);
    if (lane == 0) y[row] = accumulate ? y[row] + sum : sum;
}

template <bool kInt8>
void launch_matvec(const DevMatrix& w, const float* x, const block_q8_act* xa, float* y, bool accumulate,
                   cudaStream_t stream) {
    if (w.n_rows <= 0) return;
    const unsigned int grid = ceil_div_u(w.n_rows, kMatvecWarps);
    const int threads = kMatvecWarps * 32;
    const int acc = accumulate ? 1 : 0;
    const bool known = with_device_type(w.type, [&](auto type) {
        constexpr int T = decltype(type)::value;
        if constexpr (kInt8 && !has_int8_dot(T)) {
            throw Error("CUDA matvec: no int8-activation kernel for float weights (use FloatAct)");
        } else {
            matvec_kernel<T, kInt8><<<grid, threads, 0, stream>>>(w.data, w.row_bytes, w.n_rows, w.n_cols, x, xa, y,
                                                                  acc);
        }
    });
    if (!known) throw Error("CUDA matvec: unsupported weight type (use one of " + device_type_names() + ")");
    LB_CUDA_LAUNCHED();
}

}  // namespace

void launch_quantize_act(const float* x, int64_t n_tok, int64_t k, block_q8_act* dst, cudaStream_t stream) {
    if (k % 32 != 0) throw Error("CUDA quantize_act: row length " + std::to_string(k) + " is not a multiple of 32");
    const int64_t n = n_tok * k;
    if (n <= 0) return;
    quantize_act_kernel<<<ceil_div_u(n, kQuantThreads), kQuantThreads, 0, stream>>>(x, n, dst);
    LB_CUDA_LAUNCHED();
}

bool matvec_int8_supported(QType t) {
    bool supported = false;
    with_device_type(t, [&](auto type) { supported = has_int8_dot(decltype(type)::value); });
    return supported;
}

void launch_matvec_int8(const DevMatrix& w, const block_q8_act* xa, float* y, bool accumulate, cudaStream_t stream) {
    launch_matvec<true>(w, nullptr, xa, y, accumulate, stream);
}

void launch_matvec_f32(const DevMatrix& w, const float* x, float* y, bool accumulate, cudaStream_t stream) {
    launch_matvec<false>(w, x, nullptr, y, accumulate, stream);
}

void matmul(const DevMatrix& w, const float* x, int64_t n_tok, float* y, bool accumulate, MatvecMode mode,
            block_q8_act* act, cudaStream_t stream) {
    if (n_tok <= 0) return;
    if (n_tok >= kGemmMinTokens) {
        launch_gemm(w, x, n_tok, y, accumulate, stream);
        return;
    }
    if (mode == MatvecMode::Int8Act && matvec_int8_supported(w.type)) {
        launch_quantize_act(x, n_tok, w.n_cols, act, stream);
        const int64_t nb = w.n_cols / 32;
        for (int64_t t = 0; t < n_tok; ++t) launch_matvec_int8(w, act + t * nb, y + t * w.n_rows, accumulate, stream);
    } else {
        for (int64_t t = 0; t < n_tok; ++t) {
            launch_matvec_f32(w, x + t * w.n_cols, y + t * w.n_rows, accumulate, stream);
        }
    }
}

}  // namespace cuda
}  // namespace lowbit
