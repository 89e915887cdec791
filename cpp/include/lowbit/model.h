// The LLaMA-family runtime: load a GGUF file (weights used in place from the mapping) and evaluate tokens.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "lowbit/gguf.h"
#include "lowbit/threads.h"
#include "lowbit/types.h"

namespace lowbit {

// End-of-turn markers of common chat formats: a CONTROL token spelled like one of these ends a generation as
// EOS does (ModelConfig::eog_ids; lowbit.tokenizer uses the same list).
inline constexpr const char* kEndOfTurnTexts[] = {"<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>",
                                                  "<|endoftext|>", "<|end_of_text|>"};

// Hyper-parameters read from the file's llama.* keys (see spec/container.md).
struct ModelConfig {
    std::string architecture;    // "llama" or "mistral"
    std::string name;            // general.name, or ""
    int n_vocab = 0;             // rows of token_embd
    int n_ctx_train = 0;         // llama.context_length
    int n_embd = 0;              // llama.embedding_length
    int n_layer = 0;             // llama.block_count
    int n_ff = 0;                // llama.feed_forward_length
    int n_head = 0;              // llama.attention.head_count
    int n_head_kv = 0;           // llama.attention.head_count_kv (default n_head)
    int head_dim = 0;            // llama.attention.key_length (default n_embd / n_head)
    int n_rot = 0;               // llama.rope.dimension_count (default head_dim)
    float rope_freq_base = 10000.0f;
    float rope_freq_scale = 1.0f;  // 1 / llama.rope.scaling.factor for "linear" scaling
    float rms_eps = 1e-5f;       // llama.attention.layer_norm_rms_epsilon
    bool tied_embeddings = false;  // output.weight absent: the head reuses token_embd
    // Tokens that end a generation: tokenizer.ggml.eos/eot/eom_token_id, and control tokens whose text is an
    // end-of-turn marker of a known chat format ("<|im_end|>", "<|eot_id|>", ...). Sorted, unique.
    std::vector<int32_t> eog_ids;
};

struct ModelParams {
    int n_ctx = 0;          // 0: min(file's context_length, 4096)
    int n_threads = 0;      // 0: all hardware threads
    int n_batch = 512;      // tokens evaluated together per chunk of a prompt
    int n_gpu_layers = 0;   // the last N blocks on the GPU (CUDA builds); N > n_layer or < 0 also the head
    bool kv_f16 = false;    // store the KV cache as fp16 instead of fp32
};

// Bytes held by the model, per device.
struct MemoryFootprint {
    uint64_t weights_mapped = 0;  // tensor bytes used in place from the file mapping (CPU)
    uint64_t weights_owned = 0;   // bytes copied at load (NF4_DQ expanded to NF4, non-f32 norms)
    uint64_t kv_cpu = 0;
    uint64_t scratch_cpu = 0;
    uint64_t weights_gpu = 0;
    uint64_t kv_gpu = 0;
    uint64_t scratch_gpu = 0;
};

// A 2-D weight: n_out rows of n_in elements of one type, rows row_bytes apart.
struct WeightView {
    QType type = QType::F32;
    const uint8_t* data = nullptr;
    int64_t n_in = 0;   // ggml ne[0]
    int64_t n_out = 0;  // ggml ne[1]
    size_t row_bytes = 0;
    const uint8_t* panels = nullptr;  // load-time repacked copy (cpu::repack_panels), CPU layers only
};

class Model {
public:
    static std::unique_ptr<Model> load(const std::string& path, const ModelParams& params);
    ~Model();
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    const ModelConfig& config() const { return config_; }
    const ModelParams& params() const { return params_; }
    int n_ctx() const { return n_ctx_; }
    int n_past() const { return static_cast<int>(tokens_.size()); }
    // The tokens whose keys and values are in the cache, in position order.
    const std::vector<int32_t>& tokens() const { return tokens_; }
    const std::string& path() const { return reader_->path(); }
    const GGUFReader& reader() const { return *reader_; }
    // GGUFReader::take_metadata on the model's file (the tokenizer takes its keys once, so the vocabulary is
    // not held both here and in the tokenizer).
    std::vector<std::pair<std::string, GGUFValue>> take_metadata(const std::string& prefix) {
        std::lock_guard<std::mutex> lock(mutex_);
        return reader_->take_metadata(prefix);
    }

    // Evaluate n tokens at positions n_past .. n_past+n-1 (appending them to the KV cache), in chunks of
    // n_batch. logits: (n_vocab) for the last token, or (n, n_vocab) when all_logits. Bad input throws
    // Error before any state changes; the cache only ever holds fully evaluated chunks.
    void eval(const int32_t* tokens, int n, float* logits, bool all_logits);
    // Drop cache entries at positions >= n_keep (prefix reuse). n_keep > n_past is an error.
    void truncate(int n_keep);

    MemoryFootprint memory_footprint() const;

private:
    Model() = default;

    struct Layer {
        const float* attn_norm = nullptr;  // (n_embd)
        WeightView wq;                     // (n_head * head_dim, n_embd)
        WeightView wk;                     // (n_head_kv * head_dim, n_embd)
        WeightView wv;                     // (n_head_kv * head_dim, n_embd)
        WeightView wo;                     // (n_embd, n_head * head_dim)
        const float* ffn_norm = nullptr;   // (n_embd)
        WeightView w_gate;                 // (n_ff, n_embd)
        WeightView w_up;                   // (n_ff, n_embd)
        WeightView w_down;                 // (n_embd, n_ff)
    };

    void load_tensors();
    void setup_gpu();
    void repack_cpu_weights();
    void allocate_state();
    // One chunk of n <= n_batch tokens at positions pos0.. : hidden state x (n, n_embd) in and out.
    void embed(const int32_t* tokens, int n, float* x);
    void forward_layers_cpu(int layer_begin, int layer_end, float* x, int n, int pos0);
    void forward_layers_gpu(float* x, int n, int pos0);  // blocks [gpu_begin_, n_layer)
    void output_head_gpu(const float* x, int n, float* logits);
    void truncate_gpu(int n_keep);
    uint64_t gpu_bytes() const;
    void attention(int layer, int n, int pos0);
    void output_head(const float* x, int n, float* logits);
    void apply_rope(float* vec, int n_heads, int n, int pos0);

    ModelParams params_;
    ModelConfig config_;
    std::unique_ptr<GGUFReader> reader_;
    std::unique_ptr<ThreadPool> pool_;
    int n_ctx_ = 0;

    // ---- layer offload: blocks [gpu_begin_, n_layer) (and the head when gpu_output_) run on the GPU ----
    struct Gpu;                   // the CUDA backend, in builds that have it
    std::unique_ptr<Gpu> gpu_;
    int gpu_begin_ = 0;           // first block on the GPU; == n_layer when none is
    bool gpu_output_ = false;

    // ---- weights (views into the mapping, or into owned_ for converted tensors) ----
    WeightView token_embd;          // (n_vocab, n_embd)
    const float* output_norm = nullptr;  // (n_embd)
    bool embed_from_panels_ = false;     // embed() reads token rows from output.panels (tied head)
    WeightView output;              // (n_vocab, n_embd); == token_embd when tied
    std::vector<Layer> layers_;
    std::vector<float> rope_inv_freq_;  // (n_rot / 2) per-pair angular frequency
    bool has_rope_freq_factors_ = false;  // rope_freqs.weight present
    // Zeroed storage. kWeights (tensors converted or repacked at load): from 4 MiB on a 2 MiB-aligned anonymous
    // mapping with transparent huge pages (a 1 GB repack then costs ~500 page faults instead of ~250,000),
    // smaller ones on the heap. kCache (the KV cache): a mapping of 4 KiB pages that become resident only as
    // the cache fills, so RSS follows the context in use, not n_ctx.
    class OwnedBuffer {
    public:
        enum Kind { kWeights, kCache };
        OwnedBuffer() = default;
        explicit OwnedBuffer(size_t n, Kind kind = kWeights);
        OwnedBuffer(const uint8_t* begin, const uint8_t* end);
        OwnedBuffer(OwnedBuffer&& o) noexcept : p_(o.p_), n_(o.n_), mapped_(o.mapped_) { o.p_ = nullptr; o.n_ = 0; }
        OwnedBuffer& operator=(OwnedBuffer&& o) noexcept {
            std::swap(p_, o.p_);
            std::swap(n_, o.n_);
            std::swap(mapped_, o.mapped_);
            return *this;
        }
        OwnedBuffer(const OwnedBuffer&) = delete;
        ~OwnedBuffer();
        uint8_t* data() const { return p_; }
        size_t size() const { return n_; }

    private:
        uint8_t* p_ = nullptr;
        size_t n_ = 0;
        bool mapped_ = false;
    };
    std::vector<OwnedBuffer> owned_;
    size_t owned_padding_ = 0;  // bytes of owned_ between repacked matrices (alignment), not weights
    uint64_t weights_mapped_ = 0;

    // ---- KV cache of the CPU blocks: (gpu_begin_, n_ctx, n_head_kv * head_dim), f32 or f16 ----
    OwnedBuffer k_cache_;
    OwnedBuffer v_cache_;
    size_t kv_elem_bytes_ = 4;
    std::vector<int32_t> tokens_;   // (n_past) the tokens in the cache

    // ---- scratch, sized for n_batch tokens ----
    std::vector<float> x_;       // (n_batch, n_embd) residual stream
    std::vector<float> xb_;      // (n_batch, n_embd) normed input of a sub-block
    std::vector<float> q_;       // (n_batch, n_head * head_dim)
    std::vector<float> k_;       // (n_batch, n_head_kv * head_dim)
    std::vector<float> v_;       // (n_batch, n_head_kv * head_dim)
    std::vector<float> att_out_; // (n_batch, n_head * head_dim)
    std::vector<float> hb_;      // (n_batch, n_ff) gate, then silu(gate) * up
    std::vector<float> hb2_;     // (n_batch, n_ff) up
    std::vector<float> att_;     // (n_threads, n_ctx + head_dim) scores and a converted value row
    std::vector<float> rope_cs_; // (n_batch, n_rot) cos, sin pairs per position
    std::vector<uint8_t> act_scratch_;  // quantized activations for matmul

    std::mutex mutex_;  // one eval at a time per model
};

}  // namespace lowbit
