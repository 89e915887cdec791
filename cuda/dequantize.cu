// Dequantize kernels: every supported weight type to fp32 or fp16, bit-exact with the CPU dequantize.
#include "common.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// One thread per 16 consecutive elements. src: n elements of type T; dst: (n) fp32 or fp16.
template <int T, typename Out>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(const uint8_t* __restrict__ src, int64_t n,
                                                              Out* __restrict__ dst) {
    const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    const int64_t i0 = g * 16;
    if (i0 >= n) return;
    float v[16];
    dequant16<T>(src, i0, n, v);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        if (i0 + j < n) {
            if constexpr (sizeof(Out) == 4) dst[i0 + j] = v[j];
            else dst[i0 + j] = __float2half_rn(v[j]);  // round to nearest even, as numpy's float16
        }
    }
}

template <typename Out>
void dequantize_any(QType t, const void* src, int64_t n, Out* dst, cudaStream_t stream) {
    if (n <= 0) return;
    device_row_bytes(t, n);  // validates the type and that n is a whole number of blocks
    const int64_t groups = (n + 15) / 16;
    const unsigned int grid = ceil_div_u(groups, kThreads);
    const uint8_t* s = static_cast<const uint8_t*>(src);
    const bool known = with_device_type(t, [&](auto type) {
        dequantize_kernel<decltype(type)::value, Out><<<grid, kThreads, 0, stream>>>(s, n, dst);
    });
    if (!known) {
        throw Error("CUDA dequantize: type id " + std::to_string(static_cast<uint32_t>(t)) +
                    " has no device layout (NF4_DQ is expanded to NF4 on the host first)");
    }
    LB_CUDA_LAUNCHED();
}

}  // namespace

void launch_dequantize(QType t, const void* src, int64_t n, float* dst, cudaStream_t stream) {
    dequantize_any<float>(t, src, n, dst, stream);
}

void launch_dequantize_f16(QType t, const void* src, int64_t n, __half* dst, cudaStream_t stream) {
    dequantize_any<__half>(t, src, n, dst, stream);
}

}  // namespace cuda
}  // namespace lowbit
