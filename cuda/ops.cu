// Layer ops on the GPU: RMSNorm (pre-norm, post-norm added to the residual, per-head q/k norm), bias add,
// RoPE tables and rotation (ggml "normal" and "neox" pairs), KV-cache store, causal (optionally windowed)
// GQA attention over the fp16 cache, the gated activations (SiLU, GELU-tanh) and logit soft-capping.
#include <cmath>

#include "common.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kNormThreads = 256;
constexpr int kEltThreads = 256;
constexpr int kHeadNormWarps = 4;  // rows (heads) per block of the per-head norm, one warp each
constexpr int kAttnWarps = 8;
constexpr int kMaxHeadDim = 256;
constexpr int kHeadChunks = kMaxHeadDim / 32;  // head dims per lane

// One block per row: y = x * (1 / sqrt(mean(x^2) + eps)) * weight, or y += that (kAddToY: a post-norm
// whose output goes straight into the residual stream y).
template <bool kAddToY>
__global__ void __launch_bounds__(kNormThreads) rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                                               int64_t n, float eps, float* __restrict__ y) {
    __shared__ float s_part[kNormThreads / 32];
    const float* xr = x + static_cast<int64_t>(blockIdx.x) * n;
    float* yr = y + static_cast<int64_t>(blockIdx.x) * n;
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += kNormThreads) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) s_part[threadIdx.x / 32] = ss;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < kNormThreads / 32; ++i) total += s_part[i];
    const float scale = 1.0f / sqrtf(total / static_cast<float>(n) + eps);
    for (int64_t i = threadIdx.x; i < n; i += kNormThreads) {
        if constexpr (kAddToY) {
            yr[i] += xr[i] * scale * w[i];
        } else {
            yr[i] = xr[i] * scale * w[i];
        }
    }
}

// One warp per row of n <= a few hundred elements (a head), in place: x = x / sqrt(mean(x^2) + eps) * w.
__global__ void __launch_bounds__(kHeadNormWarps * 32) head_norm_kernel(float* x, const float* __restrict__ w,
                                                                        int64_t n_rows, int n, float eps) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kHeadNormWarps + threadIdx.x / 32;
    if (row >= n_rows) return;  // whole warps leave together, so the shuffles below see full warps
    const int lane = threadIdx.x & 31;
    float* xr = x + row * n;
    float ss = 0.0f;
    for (int i = lane; i < n; i += 32) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    const float scale = 1.0f / sqrtf(ss / static_cast<float>(n) + eps);
    for (int i = lane; i < n; i += 32) xr[i] = xr[i] * scale * w[i];
}

// y (n_rows, n) += bias (n), row by row.
__global__ void __launch_bounds__(kEltThreads) add_bias_kernel(float* __restrict__ y, const float* __restrict__ bias,
                                                               int64_t total, int64_t n) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kEltThreads + threadIdx.x;
    if (i >= total) return;
    y[i] += bias[i % n];
}

// cs (n_tok, rope_dim): mscale * cos, sin of (pos0 + t) * inv_freq[i] for every pair i of every token, the
// angle, its cos/sin and the scaling in double, then rounded to fp32, as the CPU's Model::rope_tables. One
// table serves every head of q and k in every block of a chunk.
__global__ void __launch_bounds__(kEltThreads) rope_table_kernel(const float* __restrict__ inv_freq, int64_t n,
                                                                 int half_rot, int pos0, float mscale,
                                                                 float* __restrict__ cs) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kEltThreads + threadIdx.x;
    if (idx >= n) return;
    const int i = static_cast<int>(idx % half_rot);
    const int64_t t = idx / half_rot;
    const double theta = static_cast<double>(pos0 + t) * static_cast<double>(inv_freq[i]);
    double s, c;
    sincos(theta, &s, &c);
    cs[2 * idx] = static_cast<float>(c * static_cast<double>(mscale));
    cs[2 * idx + 1] = static_cast<float>(s * static_cast<double>(mscale));
}

// One thread per rotated pair of x (n_tok, n_heads, head_dim): dims (i * stride, i * stride + partner) of
// each head, i < rope_dim / 2; "normal": stride 2, partner 1; "neox": stride 1, partner rope_dim / 2.
__global__ void __launch_bounds__(kEltThreads) rope_kernel(float* __restrict__ x, int64_t n_pairs, int n_heads,
                                                           int head_dim, int half_rot, int stride, int partner,
                                                           const float* __restrict__ cs) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kEltThreads + threadIdx.x;
    if (idx >= n_pairs) return;
    const int i = static_cast<int>(idx % half_rot);
    const int64_t rest = idx / half_rot;
    const int head = static_cast<int>(rest % n_heads);
    const int64_t t = rest / n_heads;
    float* p0 = x + (t * n_heads + head) * head_dim + static_cast<int64_t>(i) * stride;
    float* p1 = p0 + partner;
    const float c = cs[(t * half_rot + i) * 2];
    const float s = cs[(t * half_rot + i) * 2 + 1];
    const float x0 = *p0;
    const float x1 = *p1;
    *p0 = x0 * c - x1 * s;
    *p1 = x0 * s + x1 * c;
}

// k, v (n_tok, kv_dim) fp32 -> cache rows pos0 + t, fp16 (round to nearest even).
__global__ void __launch_bounds__(kEltThreads) store_kv_kernel(const float* __restrict__ k, const float* __restrict__ v,
                                                               int64_t n, int kv_dim, int pos0,
                                                               __half* __restrict__ k_cache,
                                                               __half* __restrict__ v_cache) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kEltThreads + threadIdx.x;
    if (idx >= n) return;
    const int64_t dst = static_cast<int64_t>(pos0) * kv_dim + idx;  // rows are contiguous: (t, j) -> (pos0 + t, j)
    k_cache[dst] = __float2half_rn(k[idx]);
    v_cache[dst] = __float2half_rn(v[idx]);
}

// One block per (head, token). Each warp walks key positions t0 + warp, t0 + warp + kAttnWarps, ... with an
// online softmax (running max m, sum l, weighted values acc); the partial states are merged at the end.
// Query t sits at position n_past + t and sees keys t0 .. n_past + t (causal), t0 = 0, or with a sliding
// window the first of the last `window` positions.
__global__ void __launch_bounds__(kAttnWarps * 32)
    attention_kernel(const float* __restrict__ q, const __half* __restrict__ k_cache,
                     const __half* __restrict__ v_cache, int n_past, int n_head, int n_head_kv, int head_dim,
                     int window, float scale, float* __restrict__ out) {
    __shared__ float s_m[kAttnWarps];
    __shared__ float s_l[kAttnWarps];
    __shared__ float s_acc[kAttnWarps][kMaxHeadDim];

    const int h = blockIdx.x;
    const int t = blockIdx.y;
    const int kv_h = h / (n_head / n_head_kv);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    const int64_t q_dim = static_cast<int64_t>(n_head) * head_dim;
    const int64_t kv_dim = static_cast<int64_t>(n_head_kv) * head_dim;
    const float* qp = q + t * q_dim + static_cast<int64_t>(h) * head_dim;

    float qr[kHeadChunks];
    float acc[kHeadChunks];
#pragma unroll
    for (int c = 0; c < kHeadChunks; ++c) {
        const int d = lane + 32 * c;
        qr[c] = d < head_dim ? qp[d] * scale : 0.0f;
        acc[c] = 0.0f;
    }
    float m = -INFINITY;
    float l = 0.0f;
    const int n_kv = n_past + t + 1;
    const int t0 = window > 0 && n_kv > window ? n_kv - window : 0;
    for (int p = t0 + warp; p < n_kv; p += kAttnWarps) {
        const __half* kp = k_cache + p * kv_dim + static_cast<int64_t>(kv_h) * head_dim;
        const __half* vp = v_cache + p * kv_dim + static_cast<int64_t>(kv_h) * head_dim;
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < kHeadChunks; ++c) {
            const int d = lane + 32 * c;
            if (d < head_dim) s += qr[c] * __half2float(kp[d]);
        }
        s = warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);  // 0 on the first position (m = -inf)
        const float e = expf(s - m_new);
        l = l * corr + e;
#pragma unroll
        for (int c = 0; c < kHeadChunks; ++c) {
            const int d = lane + 32 * c;
            if (d < head_dim) acc[c] = acc[c] * corr + e * __half2float(vp[d]);
        }
        m = m_new;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < kHeadChunks; ++c) {
        const int d = lane + 32 * c;
        if (d < head_dim) s_acc[warp][d] = acc[c];
    }
    __syncthreads();
    // Warp 0 always saw position t0, so M is finite; warps that saw nothing have m = -inf and weigh 0.
    float big = s_m[0];
#pragma unroll
    for (int w = 1; w < kAttnWarps; ++w) big = fmaxf(big, s_m[w]);
    float wgt[kAttnWarps];
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
        wgt[w] = expf(s_m[w] - big);
        total += s_l[w] * wgt[w];
    }
    const float inv_total = 1.0f / total;
    float* op = out + t * q_dim + static_cast<int64_t>(h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += kAttnWarps * 32) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < kAttnWarps; ++w) o += s_acc[w][d] * wgt[w];
        op[d] = o * inv_total;
    }
}

// out = act(gate) * up. out may alias gate or up (the forward pass writes in place), so no __restrict__.
// GELU-tanh: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), the formula of the CPU's gated_activation
// (HF's gelu_pytorch_tanh, ggml's gelu).
template <GatedAct kAct>
__global__ void __launch_bounds__(kEltThreads) gated_act_kernel(const float* gate, const float* up, int64_t n,
                                                                float* out) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kEltThreads + threadIdx.x;
    if (i >= n) return;
    const float g = gate[i];
    if constexpr (kAct == GatedAct::Silu) {
        out[i] = g / (1.0f + expf(-g)) * up[i];
    } else {
        constexpr float kSqrt2OverPi = 0.7978845608028654f;
        out[i] = 0.5f * g * (1.0f + tanhf(kSqrt2OverPi * (g + 0.044715f * g * g * g))) * up[i];
    }
}

// x = cap * tanh(x / cap), n elements.
__global__ void __launch_bounds__(kEltThreads) softcap_kernel(float* __restrict__ x, int64_t n, float cap) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kEltThreads + threadIdx.x;
    if (i >= n) return;
    x[i] = cap * tanhf(x[i] / cap);
}

}  // namespace

namespace {

template <bool kAdd>
void launch_rmsnorm_rows(const float* x, const float* weight, int64_t n_rows, int64_t n, float eps, float* y,
                         cudaStream_t stream) {
    if (n_rows <= 0) return;
    if (n_rows > 0x7fffffffLL) throw Error("CUDA rmsnorm: too many rows");
    rmsnorm_kernel<kAdd><<<static_cast<unsigned int>(n_rows), kNormThreads, 0, stream>>>(x, weight, n, eps, y);
    LB_CUDA_LAUNCHED();
}

}  // namespace

void launch_rmsnorm(const float* x, const float* weight, int64_t n_rows, int64_t n, float eps, float* y,
                    cudaStream_t stream) {
    launch_rmsnorm_rows<false>(x, weight, n_rows, n, eps, y, stream);
}

void launch_rmsnorm_add(const float* x, const float* weight, int64_t n_rows, int64_t n, float eps, float* y,
                        cudaStream_t stream) {
    launch_rmsnorm_rows<true>(x, weight, n_rows, n, eps, y, stream);
}

void launch_head_norm(float* x, const float* weight, int64_t n_rows, int n, float eps, cudaStream_t stream) {
    if (n_rows <= 0) return;
    head_norm_kernel<<<ceil_div_u(n_rows, kHeadNormWarps), kHeadNormWarps * 32, 0, stream>>>(x, weight, n_rows, n,
                                                                                            eps);
    LB_CUDA_LAUNCHED();
}

void launch_add_bias(float* y, const float* bias, int64_t n_rows, int64_t n, cudaStream_t stream) {
    const int64_t total = n_rows * n;
    if (total <= 0) return;
    add_bias_kernel<<<ceil_div_u(total, kEltThreads), kEltThreads, 0, stream>>>(y, bias, total, n);
    LB_CUDA_LAUNCHED();
}

void launch_rope_table(const float* inv_freq, int n_tok, int rope_dim, int pos0, float mscale, float* cs,
                       cudaStream_t stream) {
    const int64_t n = static_cast<int64_t>(n_tok) * (rope_dim / 2);
    if (n <= 0) return;
    rope_table_kernel<<<ceil_div_u(n, kEltThreads), kEltThreads, 0, stream>>>(inv_freq, n, rope_dim / 2, pos0, mscale,
                                                                              cs);
    LB_CUDA_LAUNCHED();
}

void launch_rope(float* x, int n_tok, int n_heads, int head_dim, int rope_dim, RopeMode mode, const float* cs,
                 cudaStream_t stream) {
    if (rope_dim <= 0 || rope_dim % 2 != 0 || rope_dim > head_dim) {
        throw Error("CUDA rope: rope_dim " + std::to_string(rope_dim) + " must be even and in 2.." +
                    std::to_string(head_dim) + " (head_dim)");
    }
    int stride = 2, partner = 1;
    switch (mode) {
        case RopeMode::Normal:
            break;
        case RopeMode::Neox:
            stride = 1;
            partner = rope_dim / 2;
            break;
        default:
            throw Error("CUDA rope: unknown mode " + std::to_string(static_cast<int>(mode)));
    }
    const int64_t n_pairs = static_cast<int64_t>(n_tok) * n_heads * (rope_dim / 2);
    if (n_pairs <= 0) return;
    rope_kernel<<<ceil_div_u(n_pairs, kEltThreads), kEltThreads, 0, stream>>>(x, n_pairs, n_heads, head_dim,
                                                                              rope_dim / 2, stride, partner, cs);
    LB_CUDA_LAUNCHED();
}

void launch_store_kv(const float* k, const float* v, int n_tok, int kv_dim, int pos0, __half* k_cache,
                     __half* v_cache, cudaStream_t stream) {
    const int64_t n = static_cast<int64_t>(n_tok) * kv_dim;
    if (n <= 0) return;
    store_kv_kernel<<<ceil_div_u(n, kEltThreads), kEltThreads, 0, stream>>>(k, v, n, kv_dim, pos0, k_cache, v_cache);
    LB_CUDA_LAUNCHED();
}

void launch_attention(const float* q, const __half* k_cache, const __half* v_cache, int n_tok, int n_past, int n_head,
                      int n_head_kv, int head_dim, int window, float scale, float* out, cudaStream_t stream) {
    if (head_dim <= 0 || head_dim > kMaxHeadDim) {
        throw Error("CUDA attention: head_dim " + std::to_string(head_dim) + " is not in 1.." +
                    std::to_string(kMaxHeadDim) + "; run such models with n_gpu_layers=0");
    }
    if (n_head_kv <= 0 || n_head % n_head_kv != 0) {
        throw Error("CUDA attention: n_head " + std::to_string(n_head) + " is not a multiple of n_head_kv " +
                    std::to_string(n_head_kv));
    }
    if (window < 0) throw Error("CUDA attention: window " + std::to_string(window) + " must be >= 0 (0: all)");
    if (n_tok <= 0) return;
    if (n_tok > 65535) throw Error("CUDA attention: more than 65535 query tokens in one call; split the batch");
    const dim3 grid(static_cast<unsigned int>(n_head), static_cast<unsigned int>(n_tok));
    if (scale == 0.0f) scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    attention_kernel<<<grid, kAttnWarps * 32, 0, stream>>>(q, k_cache, v_cache, n_past, n_head, n_head_kv, head_dim,
                                                           window, scale, out);
    LB_CUDA_LAUNCHED();
}

void launch_gated_act(GatedAct act, const float* gate, const float* up, int64_t n, float* out, cudaStream_t stream) {
    if (n <= 0) return;
    const unsigned int blocks = ceil_div_u(n, kEltThreads);
    switch (act) {
        case GatedAct::Silu:
            gated_act_kernel<GatedAct::Silu><<<blocks, kEltThreads, 0, stream>>>(gate, up, n, out);
            break;
        case GatedAct::GeluTanh:
            gated_act_kernel<GatedAct::GeluTanh><<<blocks, kEltThreads, 0, stream>>>(gate, up, n, out);
            break;
        default:
            throw Error("CUDA gated activation: unknown activation " + std::to_string(static_cast<int>(act)));
    }
    LB_CUDA_LAUNCHED();
}

void launch_softcap(float* x, int64_t n, float cap, cudaStream_t stream) {
    if (n <= 0) return;
    softcap_kernel<<<ceil_div_u(n, kEltThreads), kEltThreads, 0, stream>>>(x, n, cap);
    LB_CUDA_LAUNCHED();
}

}  // namespace cuda
}  // namespace lowbit
