// The CUDA backend's host-side interface: device queries, layer offload (Backend) and kernel test hooks.
//
// Present in every build. The plain structs and the memory estimates below work everywhere; the device
// functions and Backend exist only when LOWBIT_HAVE_CUDA is defined (compiled() says which).
//
// Runtime semantics (match the CPU path within float tolerance, see kernels.h):
//   * decode (a few tokens): quantized weights are dotted with activations quantized to block_q8_act
//     (int8, fp32 scale, block 32), the CPU's scheme: dp4a on the integer weight values of every ggml
//     type (sub-block scales and minima applied per 16 or 32 elements, as the CPU kernels do). NF4 and FP4
//     use their exact fp32 code books against the int8 activations (the CPU rounds the codes to int8).
//     MatvecMode::FloatAct instead dequantizes weights on the fly against fp32 activations (for benchmarks).
//     F32/F16/BF16 weights always use fp32 activations.
//   * prompt (n_tok >= kGemmMinTokens): weight tiles are dequantized to fp16 in shared memory and multiplied
//     with fp16 activations on tensor cores (WMMA), fp32 accumulation.
//   * the KV cache is fp16 (llama.cpp's default -ctk/-ctv f16); attention math is fp32. Sliding-window
//     blocks keep a cache of all n_ctx positions too; their attention only reads the last `window` of them.
//   * RoPE pairs (x[2i], x[2i+1]) (ggml "normal" mode, RopeMode::Normal) or (x[i], x[i + rope_dim/2]) (ggml
//     "neox", RopeMode::Neox), i < rope_dim/2, rotated by pos * inv_freq[i] with the angle formed in double,
//     as the CPU does; dims past rope_dim pass through. inv_freq is one of the model's two tables (global
//     blocks, sliding-window blocks), linear or YaRN scaling and Llama 3's per-pair factors already in; each
//     table's cos and sin carry its magnitude (YaRN's attn_factor).
//   * a block is the CPU's (cpp/src/model.cpp run_layer_cpu) op for op: optional q/k/v biases, per-head q/k
//     RMSNorm, post-norms of the attention and feed-forward outputs before the residual add (Gemma 3's
//     sandwich), SiLU or GELU-tanh gating, a query scale of the model's choosing; the head soft-caps logits
//     where the model says so.
//
// Placement (the model's n_gpu_layers, cpp/src/weights.cpp GpuLayers::place): the LAST N blocks, and for
// N > n_layer or N < 0 the output head (output_norm + output.weight) too; the token embedding (and Gemma's
// sqrt(n_embd) scaling of it) stays on the CPU. The backend only provides the ops; the model decides the
// placement.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/types.h"

namespace lowbit {
namespace cuda {

constexpr bool compiled() {
#ifdef LOWBIT_HAVE_CUDA
    return true;
#else
    return false;
#endif
}

struct DeviceInfo {
    std::string name;
    size_t total_memory = 0;
    size_t free_memory = 0;
    int compute_major = 0;
    int compute_minor = 0;
};

// A weight matrix in host memory (usually a pointer into the mmap): n_rows rows of n_cols elements of
// `type`, rows contiguous (row r at data + r * row_bytes(type, n_cols)). y = W x maps n_cols -> n_rows.
// Supported types: the rows of LOWBIT_CUDA_TYPES below, and NF4_DQ (expanded to NF4 blocks on upload).
struct Matrix {
    QType type = QType::F32;
    const void* data = nullptr;
    int64_t n_rows = 0;  // output features
    int64_t n_cols = 0;  // input features (a multiple of the block size for quantized types)
};

// One transformer block's weights, host pointers; vectors are fp32. The optional ones are null where the
// architecture has no such tensor, and the block then skips that op.
struct LayerWeights {
    const float* attn_norm = nullptr;  // (n_embd)
    Matrix wq;                         // (n_head * head_dim, n_embd)
    Matrix wk;                         // (n_head_kv * head_dim, n_embd)
    Matrix wv;                         // (n_head_kv * head_dim, n_embd)
    const float* bq = nullptr;         // (n_head * head_dim)     optional: added after the projection
    const float* bk = nullptr;         // (n_head_kv * head_dim)  optional
    const float* bv = nullptr;         // (n_head_kv * head_dim)  optional
    const float* q_norm = nullptr;     // (head_dim)  optional: RMSNorm of every query head before RoPE
    const float* k_norm = nullptr;     // (head_dim)  optional: same for every key head
    Matrix wo;                         // (n_embd, n_head * head_dim)
    const float* attn_post_norm = nullptr;  // (n_embd)  optional: RMSNorm of the attention output before the add
    const float* ffn_norm = nullptr;   // (n_embd)
    Matrix w_gate;                     // (n_ff, n_embd)
    Matrix w_up;                       // (n_ff, n_embd)
    Matrix w_down;                     // (n_embd, n_ff)
    const float* ffn_post_norm = nullptr;   // (n_embd)  optional: RMSNorm of the feed-forward output before the add
};

enum class MatvecMode : int {
    Int8Act = 0,   // activations -> block_q8_act, integer dot products (the CPU's semantics; default)
    FloatAct = 1,  // weights dequantized on the fly, fp32 activations and accumulation
};

// Which dims of a head RoPE rotates together (ggml's rope modes, named as ggml names them).
enum class RopeMode : int {
    Normal = 0,  // (x[2i], x[2i+1]): llama, whose q/k rows are permuted at conversion
    Neox = 2,    // (x[i], x[i + rope_dim/2]): HF's rotate_half (qwen2, qwen3, gemma3)
};

// The feed-forward's gate: act(x @ Wgate) * (x @ Wup).
enum class GatedAct : int {
    Silu = 0,      // SwiGLU
    GeluTanh = 1,  // GEGLU with GELU's tanh approximation (gemma3)
};

struct BackendConfig {
    int device = 0;
    int n_embd = 0;
    int n_head = 0;
    int n_head_kv = 0;
    int head_dim = 0;   // <= 256
    int n_ff = 0;
    int n_ctx = 0;      // KV cache positions per layer
    float rms_eps = 1e-5f;       // of every RMSNorm: pre-norms, q/k head norms, post-norms, the head's norm
    float attn_scale = 0.0f;     // queries' scale before q.k; 0: 1/sqrt(head_dim)
    RopeMode rope_mode = RopeMode::Normal;
    int rope_dim = 0;   // 0: head_dim
    // RoPE turns pair i of a head at position p by p * rope_inv_freq[table][i] (rope_dim / 2 each), freq_scale
    // and per-pair factors (Llama 3's rope_freqs.weight) already in. Table 0 serves the blocks added with
    // rope_table 0, table 1 those with rope_table 1 (the sliding-window blocks, whose base differs). An empty
    // table 0 is freq_scale * base^(-2i/rope_dim) of the two fields below; an empty table 1 is absent.
    std::vector<float> rope_inv_freq[2];
    // Magnitude of each table's cos and sin (YaRN's attn_factor, 1 + 0.1 ln factor on the global table); 1:
    // a plain rotation.
    float rope_mscale[2] = {1.0f, 1.0f};
    float rope_freq_base = 10000.0f;
    float rope_freq_scale = 1.0f;
    GatedAct act = GatedAct::Silu;
    float logit_softcap = 0.0f;  // > 0: the head's logits = c * tanh(logits / c)
    MatvecMode matvec = MatvecMode::Int8Act;
};

// RoPE's per-pair angular frequencies freq_scale * base^(-2i/rope_dim), i < rope_dim / 2, formed in double
// (as cpp/src/model.cpp forms the model's tables), for configs that give base and scale instead of a table.
inline std::vector<float> rope_inv_freq(int rope_dim, double freq_base, double freq_scale) {
    std::vector<float> f(static_cast<size_t>(rope_dim > 0 ? rope_dim / 2 : 0));
    for (size_t i = 0; i < f.size(); ++i) {
        f[i] = static_cast<float>(freq_scale * std::pow(freq_base, -2.0 * static_cast<double>(i) / rope_dim));
    }
    return f;
}

// Prompt chunks of at least this many tokens use the tensor-core GEMM; fewer use the matvec kernels.
constexpr int kGemmMinTokens = 4;

// The weight types the CUDA backend computes with, one registry name (lowbit/qtypes.def) per row. Every
// per-type switch of the backend is generated from these rows; adding a type is a row here plus its
// dequant16 and dot32_q8 in cuda/common.cuh.
#define LOWBIT_CUDA_TYPES(X) \
    X(F32)                   \
    X(F16)                   \
    X(BF16)                  \
    X(Q4_0)                  \
    X(Q4_1)                  \
    X(Q5_0)                  \
    X(Q5_1)                  \
    X(Q8_0)                  \
    X(Q2_K)                  \
    X(Q3_K)                  \
    X(Q4_K)                  \
    X(Q5_K)                  \
    X(Q6_K)                  \
    X(IQ4_NL)                \
    X(IQ4_XS)                \
    X(NF4)                   \
    X(FP4)

// True for the types of LOWBIT_CUDA_TYPES (NF4_DQ is not one: it is expanded to NF4 on the host).
inline bool is_device_type(QType type) {
    switch (type) {
#define LOWBIT_X(NAME) case QType::NAME:
        LOWBIT_CUDA_TYPES(LOWBIT_X)
#undef LOWBIT_X
        return true;
        default:
            return false;
    }
}

// "F32, F16, ...": the names of LOWBIT_CUDA_TYPES, for error messages.
inline std::string device_type_names() {
#define LOWBIT_X(NAME) #NAME ", "
    std::string names = LOWBIT_CUDA_TYPES(LOWBIT_X);
#undef LOWBIT_X
    names.resize(names.size() - 2);
    return names;
}

// Bytes one row of n_cols elements occupies on the device (NF4_DQ counts as plain NF4 blocks).
// Throws Error for unsupported types or n_cols that is not a multiple of the block size.
inline size_t device_row_bytes(QType type, int64_t n_cols) {
    const QType layout = type == QType::NF4_DQ ? QType::NF4 : type;
    if (!is_device_type(layout)) {
        throw Error("CUDA backend: weight type id " + std::to_string(static_cast<uint32_t>(type)) +
                    " is not supported on the GPU (use one of " + device_type_names() + ")");
    }
    const TypeTraits& t = *type_traits(static_cast<uint32_t>(layout));
    if (n_cols <= 0 || n_cols % t.block_size != 0) {
        throw Error("CUDA backend: a row of " + std::to_string(n_cols) + " elements is not a positive multiple of " +
                    "the block size " + std::to_string(t.block_size) + " of weight type id " +
                    std::to_string(static_cast<uint32_t>(type)));
    }
    return static_cast<size_t>(n_cols / t.block_size) * t.type_size;
}

namespace detail {
inline size_t round256(size_t n) { return (n + 255) / 256 * 256; }
}  // namespace detail

// Device bytes of one matrix as uploaded (each allocation piece is rounded up to 256 bytes).
inline size_t matrix_bytes(const Matrix& m) {
    return detail::round256(static_cast<size_t>(m.n_rows) * device_row_bytes(m.type, m.n_cols));
}

// Device bytes of an fp32 vector of n elements, 0 where it is absent (null).
inline size_t vector_bytes(const float* v, int64_t n) {
    return v ? detail::round256(static_cast<size_t>(n) * sizeof(float)) : 0;
}

// Weights + fp16 KV cache (n_ctx positions, sliding-window blocks included) of one block on the device.
inline size_t estimate_layer_bytes(const BackendConfig& cfg, const LayerWeights& w) {
    const int64_t q_dim = static_cast<int64_t>(cfg.n_head) * cfg.head_dim;
    const int64_t kv_dim = static_cast<int64_t>(cfg.n_head_kv) * cfg.head_dim;
    size_t vectors = vector_bytes(w.attn_norm, cfg.n_embd) + vector_bytes(w.ffn_norm, cfg.n_embd) +
                     vector_bytes(w.bq, q_dim) + vector_bytes(w.bk, kv_dim) + vector_bytes(w.bv, kv_dim) +
                     vector_bytes(w.q_norm, cfg.head_dim) + vector_bytes(w.k_norm, cfg.head_dim) +
                     vector_bytes(w.attn_post_norm, cfg.n_embd) + vector_bytes(w.ffn_post_norm, cfg.n_embd);
    size_t mats = matrix_bytes(w.wq) + matrix_bytes(w.wk) + matrix_bytes(w.wv) + matrix_bytes(w.wo) +
                  matrix_bytes(w.w_gate) + matrix_bytes(w.w_up) + matrix_bytes(w.w_down);
    // K and V: (n_ctx, n_head_kv * head_dim) fp16 each.
    size_t kv = 2 * detail::round256(static_cast<size_t>(cfg.n_ctx) * kv_dim * 2);
    return vectors + mats + kv;
}

// Activation buffers for chunks of n_batch tokens (independent of the number of layers).
inline size_t estimate_scratch_bytes(const BackendConfig& cfg, int n_batch) {
    const size_t nb = static_cast<size_t>(n_batch);
    const size_t q_dim = static_cast<size_t>(cfg.n_head) * cfg.head_dim;
    const size_t kv_dim = static_cast<size_t>(cfg.n_head_kv) * cfg.head_dim;
    size_t max_k = static_cast<size_t>(cfg.n_embd);
    if (q_dim > max_k) max_k = q_dim;
    if (static_cast<size_t>(cfg.n_ff) > max_k) max_k = static_cast<size_t>(cfg.n_ff);
    using detail::round256;
    return 2 * round256(nb * cfg.n_embd * 4)            // x, normed x
           + 2 * round256(nb * q_dim * 4)               // q, attention output
           + 2 * round256(nb * kv_dim * 4)              // k, v
           + 2 * round256(nb * cfg.n_ff * 4)            // gate, up
           + round256(nb * (max_k / 32 + 1) * sizeof(block_q8_act))  // quantized activations
           + 2 * round256(static_cast<size_t>(cfg.head_dim) / 2 * 4)  // RoPE inverse frequencies, per table
           + 2 * round256(nb * cfg.head_dim * 4);                     // cos, sin per position, per table
}

// The output head: norm + matrix, plus logits for chunks of up to kOutputChunk tokens.
constexpr int kOutputChunk = 64;
inline size_t estimate_output_bytes(const BackendConfig& cfg, const Matrix& output) {
    return detail::round256(static_cast<size_t>(cfg.n_embd) * 4) + matrix_bytes(output) +
           detail::round256(static_cast<size_t>(kOutputChunk) * output.n_rows * 4);
}

#ifdef LOWBIT_HAVE_CUDA
// Number of usable devices; 0 (and the driver's reason in *error) when there is no driver or GPU.
int device_count(std::string* error);
DeviceInfo device_info(int device);

// Transformer blocks resident on one GPU, with their KV cache. Not thread-safe: one caller at a time.
class Backend {
public:
    // Allocates the activation scratch for chunks of n_batch tokens. Throws Error with a clear message
    // when there is no usable device, the config is inconsistent, or the GPU is out of memory.
    Backend(const BackendConfig& cfg, int n_batch);
    ~Backend();
    Backend(const Backend&) = delete;
    Backend& operator=(const Backend&) = delete;

    // Uploads one block's weights (once) and allocates its KV cache; returns its index (0, 1, ...).
    // Shapes are checked against the config. The host memory may be released afterwards. window > 0: the
    // block attends only to the last `window` positions, its own included. rope_table: which of
    // BackendConfig::rope_inv_freq turns its queries and keys.
    int add_layer(const LayerWeights& w, int window = 0, int rope_table = 0);
    int n_layers() const;

    // Runs blocks [first, last) on hidden states x, host (n_tok, n_embd) fp32, in place, for positions
    // n_past .. n_past + n_tok - 1: one host->device copy in, one device->host copy out per chunk of
    // n_batch tokens. Each block must already hold positions 0 .. n_past - 1 in its cache.
    void forward(int first, int last, float* x, int n_tok, int n_past);

    // Output head on the GPU: uploads output_norm (n_embd fp32) and the output matrix (n_vocab, n_embd).
    void set_output(const float* output_norm, const Matrix& output);
    bool has_output() const;
    int64_t n_vocab() const;  // rows of the output matrix; 0 before set_output
    // logits (n_tok, n_vocab) = output(rmsnorm(x) * output_norm) for host x (n_tok, n_embd), soft-capped
    // where BackendConfig::logit_softcap > 0.
    void output(const float* x, int n_tok, float* logits);

    // Forget cached positions >= n_keep in every block (positions are recomputed by the next forward).
    void truncate(int n_keep);
    // Positions currently cached in block `layer`.
    int n_cached(int layer) const;

    size_t device_bytes() const;  // everything this backend allocated on the device
    DeviceInfo info() const;
    const BackendConfig& config() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Kernel-level entry points for tests and benchmarks: host buffers in and out, one device round trip
// each. Not for the hot path.
namespace testing {
// n elements of type t (n a multiple of the block size) -> fp32 / fp16 bits.
void dequantize(QType t, const void* src, int64_t n, float* dst);
void dequantize_f16(QType t, const void* src, int64_t n, uint16_t* dst);
// x (n_tok, k) -> n_tok * k / 32 activation blocks (k % 32 == 0).
void quantize_act(const float* x, int64_t n_tok, int64_t k, block_q8_act* dst);
enum class MatmulPath : int { MatvecInt8 = 0, MatvecFloat = 1, Gemm = 2 };
// y (n_tok, w.n_rows) = x (n_tok, w.n_cols) @ W^T through one explicit kernel path.
void matmul(const Matrix& w, const float* x, int64_t n_tok, float* y, MatmulPath path);
// y (n_rows, n) = x / sqrt(mean(x^2) + eps) * weight.
void rmsnorm(const float* x, const float* weight, int64_t n_rows, int64_t n, float eps, float* y);
// Every row of x (n_rows, n) = x / sqrt(mean(x^2) + eps) * weight (n), in place (the per-head q/k norm).
void head_norm(float* x, const float* weight, int64_t n_rows, int n, float eps);
// x (n_tok, n_heads, head_dim), in place, token t at position pos0 + t; inv_freq (rope_dim / 2); cos and sin
// scaled by mscale.
void rope(float* x, int n_tok, int n_heads, int head_dim, int rope_dim, int pos0, const float* inv_freq,
          RopeMode mode, float mscale);
// q (n_tok, n_head, head_dim) at positions n_past + t; k, v (n_past + n_tok, n_head_kv, head_dim) are
// stored into an fp16 cache first; out (n_tok, n_head, head_dim). Causal, GQA; window > 0: each query sees
// only the last `window` positions up to its own; scale 0: 1/sqrt(head_dim).
void attention(const float* q, const float* k, const float* v, int n_tok, int n_past, int n_head, int n_head_kv,
               int head_dim, int window, float scale, float* out);
// out = act(gate) * up, n elements.
void gated_act(GatedAct act, const float* gate, const float* up, int64_t n, float* out);
// Device-to-device copy bandwidth in bytes/s (cudaMemcpy of `bytes`, median of `reps`).
double copy_bandwidth(size_t bytes, int reps);
}  // namespace testing
#endif

}  // namespace cuda
}  // namespace lowbit
