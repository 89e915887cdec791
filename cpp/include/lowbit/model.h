// The decoder-only transformer runtime (llama, qwen2, qwen3, gemma3): load a GGUF file (weights used in place from the
// mapping) and evaluate tokens.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
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

// What sets one architecture's forward pass apart from LLaMA's, as data: the loader picks the row named by
// general.architecture (Model::architectures()), and the layer body reads it without asking which row it is.
enum class RopeStyle : uint8_t {
    kInterleaved,  // pairs (2j, 2j+1) of each head; ggml rope "normal" (llama: q/k rows permuted at conversion)
    kNeox,         // pairs (j, j + n_rot/2); ggml rope "neox" (HF's rotate_half, as qwen2/qwen3 store q/k)
};
enum class Activation : uint8_t { kSilu, kGeluTanh };  // of the gate in act(x @ Wgate) * (x @ Wup)
enum class NormPlacement : uint8_t {
    kPre,       // x += f(norm(x))
    kSandwich,  // x += post_norm(f(norm(x)))  (blk.N.post_attention_norm / post_ffw_norm)
};

struct ArchSpec {
    const char* name = "";                 // general.architecture, the prefix of its hyper-parameter keys
    NormPlacement norm = NormPlacement::kPre;
    bool qkv_bias = false;                 // blk.N.attn_{q,k,v}.bias added after the projections
    bool qk_norm = false;                  // blk.N.attn_{q,k}_norm: RMSNorm of each head of q and k before RoPE
    Activation act = Activation::kSilu;
    RopeStyle rope = RopeStyle::kInterleaved;
    bool embed_scale = false;              // embeddings scaled by sqrt(n_embd)
    // Sliding-window attention, where the file has {arch}.attention.sliding_window > 0: every swa_pattern-th
    // block attends to all positions and the others to the last `sliding_window` ones, unless the file's
    // {arch}.attention.sliding_window_pattern says otherwise (an int, or one bool per block: true = sliding).
    // 0: every block is global. Sliding blocks turn RoPE with {arch}.rope.freq_base_swa, default
    // rope_base_swa (0: the global base), and without rope scaling.
    int swa_pattern = 0;
    float rope_base_swa = 0.0f;
    bool tied_output = false;              // the head always reuses token_embd (output.weight never read)
    bool logit_softcap = false;            // logits = c * tanh(logits / c), c = {arch}.final_logit_softcapping
    // Queries are scaled by {arch}.attention.scale if the file has it, else by 1/sqrt(head_dim), except in
    // files of exactly this many blocks, whose query_pre_attn_scalar is n_embd / n_head (Gemma 3 27B: files
    // carry no key for it and llama.cpp knows it by the block count). 0: no such exception.
    int query_scale_embd_blocks = 0;
};

// Hyper-parameters read from the file's {arch}.* keys (see spec/container.md).
struct ModelConfig {
    std::string architecture;    // general.architecture, one of Model::architectures()
    ArchSpec arch;               // its row
    std::string name;            // general.name, or ""
    int n_vocab = 0;             // rows of token_embd
    int n_ctx_train = 0;         // {arch}.context_length
    int n_embd = 0;              // {arch}.embedding_length
    int n_layer = 0;             // {arch}.block_count
    int n_ff = 0;                // {arch}.feed_forward_length
    int n_head = 0;              // {arch}.attention.head_count
    int n_head_kv = 0;           // {arch}.attention.head_count_kv (default n_head)
    int head_dim = 0;            // {arch}.attention.key_length (default n_embd / n_head)
    int n_rot = 0;               // {arch}.rope.dimension_count (default head_dim)
    float rope_freq_base = 10000.0f;
    float rope_freq_scale = 1.0f;  // 1 / {arch}.rope.scaling.factor for "linear" and "yarn" scaling
    // YaRN ({arch}.rope.scaling.type "yarn"): pairs below rope.scaling.original_context_length's correction
    // range keep their frequency (extrapolate), those above are scaled (interpolate), a ramp between; cos and
    // sin are scaled by rope_mscale. As llama.cpp: ext_factor 1, beta_fast 32, beta_slow 1 unless the file's
    // rope.scaling.yarn_* keys say otherwise.
    bool rope_yarn = false;
    int rope_yarn_orig_ctx = 0;
    float rope_yarn_beta_fast = 32.0f;
    float rope_yarn_beta_slow = 1.0f;
    float rope_mscale = 1.0f;      // magnitude of the global blocks' cos/sin: attn_factor (1 + 0.1 ln factor)
    float rms_eps = 1e-5f;       // {arch}.attention.layer_norm_rms_epsilon
    float logit_softcap = 0.0f;  // {arch}.final_logit_softcapping where the row has it; 0: none
    float attn_scale = 0.0f;     // queries' scale before q.k (ArchSpec::query_scale_embd_blocks)
    int sliding_window = 0;      // {arch}.attention.sliding_window where the row slides; 0: none
    std::vector<bool> sliding;   // (n_layer) whether each block attends only to the last sliding_window positions
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
    int n_seq = 1;          // sequences the KV cache holds (Model::eval_batch); more than 1 runs on the CPU only
};

// One sequence's new tokens for Model::eval_batch.
struct SeqTokens {
    int seq = 0;                      // 0 .. n_seq-1
    const int32_t* tokens = nullptr;  // appended after the sequence's cached tokens
    int n = 0;
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

// Where a transformer block runs.
enum class Backend : uint8_t { kCpu, kCuda };

// One transformer block: its weights (views into the mapping or owned copies; null where the architecture
// has no such tensor) and where it runs.
struct Layer {
    const float* attn_norm = nullptr;   // (n_embd)
    WeightView wq;                      // (n_head * head_dim, n_embd)
    WeightView wk;                      // (n_head_kv * head_dim, n_embd)
    WeightView wv;                      // (n_head_kv * head_dim, n_embd)
    const float* bq = nullptr;          // (n_head * head_dim)     ArchSpec::qkv_bias
    const float* bk = nullptr;          // (n_head_kv * head_dim)
    const float* bv = nullptr;          // (n_head_kv * head_dim)
    const float* q_norm = nullptr;      // (head_dim)  ArchSpec::qk_norm
    const float* k_norm = nullptr;      // (head_dim)
    WeightView wo;                      // (n_embd, n_head * head_dim)
    const float* attn_post_norm = nullptr;  // (n_embd)  NormPlacement::kSandwich
    const float* ffn_norm = nullptr;    // (n_embd)
    WeightView w_gate;                  // (n_ff, n_embd)
    WeightView w_up;                    // (n_ff, n_embd)
    WeightView w_down;                  // (n_embd, n_ff)
    const float* ffn_post_norm = nullptr;   // (n_embd)  NormPlacement::kSandwich

    Backend backend = Backend::kCpu;
    int slot = 0;      // index among its backend's blocks (the CPU KV cache's layer, the GPU backend's layer)
    int rope = 0;      // which rope table: 0 global, 1 sliding-window blocks
    int window = 0;    // attends to the last `window` positions (itself included); 0: all

    // The matrices, in the order decode reads them.
    std::array<const WeightView*, 7> matrices() const { return {&wq, &wk, &wv, &wo, &w_gate, &w_up, &w_down}; }
    std::array<WeightView*, 7> matrices() { return {&wq, &wk, &wv, &wo, &w_gate, &w_up, &w_down}; }
};

class WeightStore;  // cpp/src/weights.h
class KvCache;
class GpuLayers;

class Model {
public:
    static std::unique_ptr<Model> load(const std::string& path, const ModelParams& params);
    ~Model();
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    const ModelConfig& config() const { return config_; }
    const ModelParams& params() const { return params_; }
    int n_ctx() const { return n_ctx_; }
    int n_seq() const { return static_cast<int>(seqs_.size()); }
    // Per sequence (default the first): the tokens whose keys and values are in the cache, in position order.
    int n_past(int seq = 0) const { return static_cast<int>(seq_at(seq).tokens.size()); }
    const std::vector<int32_t>& tokens(int seq = 0) const { return seq_at(seq).tokens; }
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
    // eval() of one sequence that returns, instead of logits, every token's final hidden state (n, n_embd):
    // the output of the last norm, what the head would read (embeddings).
    void eval_hidden(const int32_t* tokens, int n, float* hidden, int seq = 0);
    // Several sequences at once (continuous batching): each input's tokens follow its sequence's cached ones,
    // and all inputs' rows go through each matmul together (the weights are read once per n_batch rows), each
    // row attending to its own sequence. logits (inputs.size(), n_vocab): the last token of each input. A
    // sequence appears at most once per call. Bad input throws before any state changes.
    void eval_batch(const std::vector<SeqTokens>& inputs, float* logits);
    // Drop a sequence's cache entries at positions >= n_keep (prefix reuse). n_keep > n_past is an error, and
    // so is an n_keep whose window a sliding-window block no longer holds (see reusable_prefix).
    void truncate(int n_keep, int seq = 0);
    // n_keep if truncate(n_keep, seq) can keep that many cached positions, else 0: a sliding-window block
    // keeps only the last window + n_batch - 1 positions, so going back further means evaluating from the start.
    int reusable_prefix(int n_keep, int seq = 0) const;
    // A sequence's cache as bytes (its tokens travel separately): per CPU block the stored rows of the
    // positions it still holds, K then V, as they are. set_state puts them back into a model of the same
    // file and KV type whose cache can hold them; anything else throws before the sequence changes. Models
    // with blocks on the GPU refuse both for now.
    std::vector<uint8_t> state(int seq = 0) const;
    void set_state(int seq, const std::vector<int32_t>& tokens, const uint8_t* data, size_t size);

    MemoryFootprint memory_footprint() const;

    // Calibration (python/lowbit/calibrate.py): while a tap is set, every CPU block hands it the activations
    // its matrices read, before they are read: (layer, site, rows (n, dim) row-major, n, dim). Sites: the
    // normed input of wq/wk/wv, the input of wo, the normed input of w_gate/w_up, the input of w_down. The
    // tap runs on the evaluating thread between ops; an exception it throws ends the eval (the chunk is not
    // cached). Blocks on the GPU are not tapped, so a model with any refuses a tap. An empty tap removes it.
    enum TapSite : int { kTapAttnIn = 0, kTapAttnOut = 1, kTapFfnIn = 2, kTapFfnDownIn = 3 };
    using ActivationTap = std::function<void(int layer, int site, const float* rows, int n, int dim)>;
    void set_activation_tap(ActivationTap tap);

    // The architectures lowbit runs, one row each.
    static const std::vector<ArchSpec>& architectures();

private:
    Model();

    // ---- loading (cpp/src/model.cpp, after the forward pass) ----
    void read_config(const std::string& path);
    void load_tensors();
    void allocate_state();

    void check_input(int seq, const int32_t* tokens, int n) const;
    enum class EvalOut { kLastLogits, kAllLogits, kHidden };
    void eval_rows(const int32_t* tokens, int n, float* out, EvalOut what, int seq);

    // ---- the forward pass: n <= n_batch rows, row i token tokens[i] of sequence row_seq_[i] at position
    // row_pos_[i] (one sequence's rows are consecutive positions, in order) ----
    void forward(const int32_t* tokens, int n);
    void embed(const int32_t* tokens, int n, float* x);
    void rope_tables(int n);
    void run_layer_cpu(const Layer& L, float* x, int n);
    void head(const float* x, int n, float* logits);
    void output_head(const float* x, int n, float* logits);

    // ---- layer ops of the CPU blocks; n tokens, buffers (n, width) ----
    struct Projection {
        const WeightView* w;
        const float* bias;  // (n_out) or null
        float* out;         // (n, n_out)
    };
    void norm(const float* x, const float* weight, int n, float* out);
    void project(std::initializer_list<Projection> ps, const float* in, int n);
    void matmul(const WeightView& w, const float* in, int n, float* out);
    void head_norm(float* v, const float* weight, int n_heads, int n);
    void rope(float* v, int n_heads, int table, int n);
    void store_kv(int slot, int n);
    void attention(int slot, int window, int n);
    void matmul_add(const WeightView& w, const float* in, const float* post_norm, int n, float* x);
    void gated_activation(float* gate, const float* up, int64_t count);

    ModelParams params_;
    ModelConfig config_;
    std::unique_ptr<GGUFReader> reader_;
    std::unique_ptr<ThreadPool> pool_;
    int n_ctx_ = 0;

    // ---- weights ----
    std::unique_ptr<WeightStore> store_;     // owned copies and the repacked arena (cpp/src/weights.cpp)
    WeightView token_embd;                   // (n_vocab, n_embd)
    const float* output_norm = nullptr;      // (n_embd)
    bool embed_from_panels_ = false;         // embed() reads token rows from output.panels (tied head)
    WeightView output;                       // (n_vocab, n_embd); == token_embd when tied
    std::vector<Layer> layers_;
    std::vector<float> rope_inv_freq_[2];    // (n_rot / 2) per-pair angular frequency, per rope table
    float rope_mscale_[2] = {1.0f, 1.0f};    // cos/sin magnitude per rope table (YaRN)

    // ---- the blocks on the GPU and the head when head_on_gpu_ (cpp/src/weights.cpp) ----
    std::unique_ptr<GpuLayers> gpu_;
    bool head_on_gpu_ = false;

    // ---- per sequence: the KV cache of the CPU blocks and the tokens in it ----
    struct Sequence {
        std::unique_ptr<KvCache> kv;
        std::vector<int32_t> tokens;  // (n_past)
        // One past the highest position whose rows were written since the cache was last empty. A ring row
        // holds position p only if no later position with the same row was written: p >= written - capacity.
        // (A truncation does not undo what the dropped positions overwrote.)
        int written = 0;
    };
    std::vector<Sequence> seqs_;
    const Sequence& seq_at(int seq) const;
    std::vector<int> row_seq_, row_pos_;  // (n_batch) the rows of the chunk in flight

    // ---- scratch, sized for n_batch tokens ----
    std::vector<float> x_;       // (n_batch, n_embd) residual stream
    std::vector<float> xb_;      // (n_batch, n_embd) normed input of a sub-block
    std::vector<float> q_;       // (n_batch, n_head * head_dim)
    std::vector<float> k_;       // (n_batch, n_head_kv * head_dim)
    std::vector<float> v_;       // (n_batch, n_head_kv * head_dim)
    std::vector<float> att_out_; // (n_batch, n_head * head_dim)
    std::vector<float> hb_;      // (n_batch, n_ff) gate, then act(gate) * up
    std::vector<float> hb2_;     // (n_batch, n_ff) up
    std::vector<float> att_;     // (n_threads, n_ctx + head_dim) scores and a converted value row
    std::vector<float> rope_cs_[2];  // (n_batch, n_rot) cos, sin pairs per position, per rope table
    std::vector<uint8_t> act_scratch_;  // quantized activations for matmul

    ActivationTap tap_;

    mutable std::mutex mutex_;  // one eval at a time per model
};

}  // namespace lowbit
