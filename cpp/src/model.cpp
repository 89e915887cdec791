// The forward pass of decoder-only transformers (llama, qwen2, qwen3, gemma3): embed -> blocks [norm,
// attention, norm, gated feed-forward] -> norm -> output head, each architecture one row of ArchSpec. Reads top to
// bottom, then the loading; where the bytes live is cpp/src/weights.cpp, the heavy lifting cpu::matmul.
#include "lowbit/model.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>

#include "lowbit/cuda.h"
#include "lowbit/kernels.h"
#include "kv_cache.h"
#include "weights.h"

namespace lowbit {

// ----------------------------------------------------------------------------------------------------
// the architectures, one row each (the GGUF names and keys are llama.cpp's: src/llama-arch.cpp)

namespace {
using NP = NormPlacement;
using Act = Activation;
using Rope = RopeStyle;
const std::vector<ArchSpec> kArchitectures = {
    // name      norm           qkv_bias qk_norm act            rope                embed_scale swa rope_base_swa
    //                                                                                   tied   softcap 27B-query-scale
    {"llama",   NP::kPre,      false,   false,  Act::kSilu,     Rope::kInterleaved, false,  0,  0.0f,
                                                                                        false, false,  0},
    {"mistral", NP::kPre,      false,   false,  Act::kSilu,     Rope::kInterleaved, false,  0,  0.0f,
                                                                                        false, false,  0},
    {"qwen2",   NP::kPre,      true,    false,  Act::kSilu,     Rope::kNeox,        false,  0,  0.0f,
                                                                                        false, false,  0},
    {"qwen3",   NP::kPre,      false,   true,   Act::kSilu,     Rope::kNeox,        false,  0,  0.0f,
                                                                                        false, false,  0},
    // Gemma 3: norms stored as 1 + w (the converter adds HF's 1), five sliding blocks to a global one, the
    // sliding blocks' RoPE base 10000, the head tied where output.weight is absent (llama.cpp's gemma3).
    {"gemma3",  NP::kSandwich, false,   true,   Act::kGeluTanh, Rope::kNeox,        true,   6,  10000.0f,
                                                                                        false, true,   62},
};
}  // namespace

const std::vector<ArchSpec>& Model::architectures() { return kArchitectures; }

Model::Model() = default;
Model::~Model() = default;

// ----------------------------------------------------------------------------------------------------
// the forward pass

void Model::eval(const int32_t* tokens, int n, float* logits, bool all_logits) {
    eval_rows(tokens, n, logits, all_logits ? EvalOut::kAllLogits : EvalOut::kLastLogits, 0);
}

void Model::eval_hidden(const int32_t* tokens, int n, float* hidden, int seq) {
    eval_rows(tokens, n, hidden, EvalOut::kHidden, seq);
}

// Every check of one sequence's input, before any state changes (so a failed call leaves the model as it was):
// the sequence exists, there are tokens, each is in the vocabulary, and they fit in its context.
void Model::check_input(int seq, const int32_t* tokens, int n) const {
    const int past = n_past(seq);  // throws for a sequence that does not exist
    const std::string of_seq = n_seq() > 1 ? " of sequence " + std::to_string(seq) : "";
    if (n <= 0 || tokens == nullptr) throw Error("eval needs at least one token" + of_seq);
    for (int i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= config_.n_vocab) {
            throw Error("token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) + of_seq +
                        " is out of range for a vocabulary of " + std::to_string(config_.n_vocab));
        }
    }
    if (static_cast<int64_t>(past) + n > n_ctx_) {
        throw Error("the context" + of_seq + " is full: " + std::to_string(past) + " cached + " + std::to_string(n) +
                    " new tokens > n_ctx " + std::to_string(n_ctx_) +
                    "; reset the model, shorten the prompt, or load with a larger n_ctx");
    }
}

void Model::eval_rows(const int32_t* tokens, int n, float* out, EvalOut what, int seq) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (out == nullptr) throw Error("eval needs an output buffer");
    check_input(seq, tokens, n);
    if (reader_->file_changed_on_disk()) {
        throw Error("'" + reader_->path() + "' was replaced or truncated on disk after it was loaded; load it again");
    }

    const ModelConfig& c = config_;
    std::vector<int32_t>& cached = seqs_[seq].tokens;
    for (int done = 0; done < n;) {
        const int nc = std::min(params_.n_batch, n - done);
        for (int i = 0; i < nc; ++i) {
            row_seq_[i] = seq;
            row_pos_[i] = static_cast<int>(cached.size()) + i;
        }
        forward(tokens + done, nc);
        if (what == EvalOut::kHidden) {
            norm(x_.data(), output_norm, nc, out + static_cast<int64_t>(done) * c.n_embd);
        } else if (what == EvalOut::kAllLogits) {
            head(x_.data(), nc, out + static_cast<int64_t>(done) * c.n_vocab);
        } else if (done + nc == n) {
            head(x_.data() + static_cast<int64_t>(nc - 1) * c.n_embd, 1, out);
        }
        // Only now is the chunk part of the cache.
        cached.insert(cached.end(), tokens + done, tokens + done + nc);
        seqs_[seq].written = std::max(seqs_[seq].written, static_cast<int>(cached.size()));
        done += nc;
    }
}

void Model::eval_batch(const std::vector<SeqTokens>& inputs, float* logits) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (inputs.empty()) throw Error("eval_batch needs at least one input");
    if (logits == nullptr) throw Error("eval_batch needs an output buffer for the logits");
    std::vector<bool> seen(seqs_.size(), false);
    for (const SeqTokens& in : inputs) {
        check_input(in.seq, in.tokens, in.n);
        if (seen[in.seq]) throw Error("sequence " + std::to_string(in.seq) + " appears twice in one eval_batch");
        seen[in.seq] = true;
    }
    if (reader_->file_changed_on_disk()) {
        throw Error("'" + reader_->path() + "' was replaced or truncated on disk after it was loaded; load it again");
    }

    // The inputs' rows in order, n_batch at a time; an input may straddle two chunks.
    const ModelConfig& c = config_;
    std::vector<int32_t> chunk(params_.n_batch);
    size_t in_i = 0;
    int in_done = 0;  // tokens of inputs[in_i] already in an earlier chunk
    while (in_i < inputs.size()) {
        int rows = 0, heads = 0;
        const size_t first_input = in_i;
        const int first_done = in_done;
        std::vector<int> last_rows;  // rows of this chunk that end an input, in input order
        while (rows < params_.n_batch && in_i < inputs.size()) {
            const SeqTokens& in = inputs[in_i];
            const int take = std::min(params_.n_batch - rows, in.n - in_done);
            for (int i = 0; i < take; ++i) {
                chunk[rows + i] = in.tokens[in_done + i];
                row_seq_[rows + i] = in.seq;
                row_pos_[rows + i] = n_past(in.seq) + i;  // its earlier chunks are committed already
            }
            rows += take;
            in_done += take;
            if (in_done == in.n) {
                last_rows.push_back(rows - 1);
                ++in_i;
                in_done = 0;
            }
        }
        forward(chunk.data(), rows);
        // The rows that end an input, gathered to the front of x_ (in increasing order, so no row is overwritten
        // before it is moved), through the head in one matmul.
        for (int r : last_rows) {
            if (r != heads) std::memcpy(x_.data() + static_cast<int64_t>(heads) * c.n_embd,
                                        x_.data() + static_cast<int64_t>(r) * c.n_embd, c.n_embd * sizeof(float));
            ++heads;
        }
        const size_t first_logit = first_input;  // inputs ending here are first_input, first_input + 1, ...
        if (heads > 0) head(x_.data(), heads, logits + static_cast<int64_t>(first_logit) * c.n_vocab);
        // Only now are the chunk's rows part of their sequences' caches.
        for (size_t k = first_input, done = first_done; k < inputs.size() && k <= in_i; ++k, done = 0) {
            const SeqTokens& in = inputs[k];
            const int end = k < in_i ? in.n : in_done;
            std::vector<int32_t>& cached = seqs_[in.seq].tokens;
            cached.insert(cached.end(), in.tokens + done, in.tokens + end);
            seqs_[in.seq].written = std::max(seqs_[in.seq].written, static_cast<int>(cached.size()));
        }
    }
}

void Model::set_activation_tap(ActivationTap tap) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (tap) {
        for (const Layer& L : layers_) {
            if (L.backend != Backend::kCpu) {
                throw Error("activation taps need every block on the CPU; load the model with n_gpu_layers=0");
            }
        }
    }
    tap_ = std::move(tap);
}

const Model::Sequence& Model::seq_at(int seq) const {
    if (seq < 0 || seq >= n_seq()) {
        throw Error("sequence " + std::to_string(seq) + " does not exist (the model holds " +
                    std::to_string(n_seq()) + "; load with a larger n_seq)");
    }
    return seqs_[seq];
}

// x_ (n, n_embd) = the rows (tokens, row_seq_, row_pos_) through every block.
void Model::forward(const int32_t* tokens, int n) {
    const ModelConfig& c = config_;
    float* x = x_.data();
    embed(tokens, n, x);
    rope_tables(n);
    for (int l = 0; l < c.n_layer;) {
        if (layers_[l].backend == Backend::kCpu) {
            run_layer_cpu(layers_[l], x, n);
            ++l;
            continue;
        }
        // A run of GPU blocks goes in one call: the hidden state crosses the bus once each way. (GPU blocks
        // hold one sequence: n_seq is 1 whenever there are any.)
        int end = l;
        while (end < c.n_layer && layers_[end].backend == Backend::kCuda) ++end;
        gpu_->forward(layers_[l].slot, layers_[end - 1].slot + 1, x, n, row_pos_[0]);
        l = end;
    }
}

void Model::head(const float* x, int n, float* logits) {
    if (head_on_gpu_) gpu_->output(x, n, logits);
    else output_head(x, n, logits);
}

// x (n, n_embd) = rows of token_embd (times sqrt(n_embd) where the row says so).
void Model::embed(const int32_t* tokens, int n, float* x) {
    const int n_embd = config_.n_embd;
    // A tied head repacked into panels also serves the embedding (its rows come back exactly), so the
    // file's copy of token_embd is never read again and does not take memory twice.
    const bool from_panels = embed_from_panels_;
    std::vector<uint8_t> tmp(from_panels ? token_embd.row_bytes : 0);
    for (int i = 0; i < n; ++i) {
        const uint8_t* row = token_embd.data + static_cast<size_t>(tokens[i]) * token_embd.row_bytes;
        if (from_panels) {
            cpu::panel_row(output.type, output.panels, output.n_out, output.n_in, tokens[i], tmp.data());
            row = tmp.data();
        }
        row_to_f32(token_embd.type, row, x + static_cast<int64_t>(i) * n_embd, n_embd);
    }
    if (config_.arch.embed_scale) {
        const float s = std::sqrt(static_cast<float>(n_embd));
        for (int64_t e = 0; e < static_cast<int64_t>(n) * n_embd; ++e) x[e] *= s;
    }
}

// cos/sin of every row's position per rope table, shared by all heads and layers: (n, n_rot/2 pairs).
// Angles are formed in double: transformers builds them in fp32 and llama.cpp by repeated fp32
// multiplication, so neither is bit-exact to follow; double keeps us within fp32 rounding of both (HF's
// LlamaRotaryEmbedding; ggml rope "normal" mode, reference gguf-and-quants.md section 1.6).
void Model::rope_tables(int n) {
    const int n_rot = config_.n_rot;
    for (int table = 0; table < 2; ++table) {
        const std::vector<float>& inv_freq = rope_inv_freq_[table];
        if (inv_freq.empty()) continue;
        const double mscale = rope_mscale_[table];
        for (int i = 0; i < n; ++i) {
            float* cs = rope_cs_[table].data() + static_cast<int64_t>(i) * n_rot;
            for (int j = 0; j < n_rot / 2; ++j) {
                const double theta = static_cast<double>(row_pos_[i]) * inv_freq[j];
                cs[2 * j] = static_cast<float>(std::cos(theta) * mscale);
                cs[2 * j + 1] = static_cast<float>(std::sin(theta) * mscale);
            }
        }
    }
}

// One transformer block on the CPU, op for op as cuda/backend.cu's run_layer: x (n, n_embd) in and out.
// What an architecture adds (biases, head norms, post-norms) is in the Layer; the ops skip what is null.
void Model::run_layer_cpu(const Layer& L, float* x, int n) {
    const ModelConfig& c = config_;
    // Attention: x += attention(rope(norm(x) @ Wq, Wk, Wv)) @ Wo.
    const int layer = static_cast<int>(&L - layers_.data());
    norm(x, L.attn_norm, n, xb_.data());
    if (tap_) tap_(layer, kTapAttnIn, xb_.data(), n, c.n_embd);
    project({{&L.wq, L.bq, q_.data()}, {&L.wk, L.bk, k_.data()}, {&L.wv, L.bv, v_.data()}}, xb_.data(), n);
    head_norm(q_.data(), L.q_norm, c.n_head, n);
    head_norm(k_.data(), L.k_norm, c.n_head_kv, n);
    rope(q_.data(), c.n_head, L.rope, n);
    rope(k_.data(), c.n_head_kv, L.rope, n);
    store_kv(L.slot, n);
    attention(L.slot, L.window, n);
    if (tap_) tap_(layer, kTapAttnOut, att_out_.data(), n, L.wo.n_in);
    matmul_add(L.wo, att_out_.data(), L.attn_post_norm, n, x);
    // Feed-forward: x += (act(norm(x) @ Wgate) * (norm(x) @ Wup)) @ Wdown.
    norm(x, L.ffn_norm, n, xb_.data());
    if (tap_) tap_(layer, kTapFfnIn, xb_.data(), n, c.n_embd);
    project({{&L.w_gate, nullptr, hb_.data()}, {&L.w_up, nullptr, hb2_.data()}}, xb_.data(), n);
    gated_activation(hb_.data(), hb2_.data(), static_cast<int64_t>(n) * c.n_ff);
    if (tap_) tap_(layer, kTapFfnDownIn, hb_.data(), n, c.n_ff);
    matmul_add(L.w_down, hb_.data(), L.ffn_post_norm, n, x);
}

// logits (n, n_vocab) = norm(x) @ output^T for the n rows of x (soft-capped where the row says so).
void Model::output_head(const float* x, int n, float* logits) {
    norm(x, output_norm, n, xb_.data());
    matmul(output, xb_.data(), n, logits);
    if (config_.logit_softcap > 0.0f) {
        const float cap = config_.logit_softcap;
        for (int64_t e = 0; e < static_cast<int64_t>(n) * config_.n_vocab; ++e) logits[e] = cap * std::tanh(logits[e] / cap);
    }
}

// ----------------------------------------------------------------------------------------------------
// the layer ops

// out (n, n_embd) = rmsnorm(x) * weight, row by row.
void Model::norm(const float* x, const float* weight, int n, float* out) {
    const cpu::Kernels& kr = cpu::kernels();
    const int64_t d = config_.n_embd;
    for (int i = 0; i < n; ++i) kr.rmsnorm(out + i * d, x + i * d, weight, d, config_.rms_eps);
}

// out (n, w.n_out) = in (n, w.n_in) @ w^T: the repacked panels where the kernel table takes them, else rows.
void Model::matmul(const WeightView& w, const float* in, int n, float* out) {
    void* scratch = act_scratch_.data();
    if (w.panels && cpu::matmul_panels(w.type, w.panels, w.n_out, w.n_in, in, n, out, scratch, *pool_)) return;
    cpu::matmul(w.type, w.data, w.row_bytes, w.n_out, w.n_in, in, n, out, scratch, *pool_);
}

// Several matrices of one input, each out = in @ w^T (+ bias). When all have panels they run as one pool
// job (the activations quantized once); otherwise one matmul each.
void Model::project(std::initializer_list<Projection> ps, const float* in, int n) {
    cpu::PanelJob jobs[cpu::kMaxPanelJobs];
    int nj = 0;
    bool grouped = ps.size() <= static_cast<size_t>(cpu::kMaxPanelJobs);
    for (const Projection& p : ps) {
        if (!grouped || !p.w->panels || p.w->n_in != ps.begin()->w->n_in) {
            grouped = false;
            break;
        }
        jobs[nj++] = {p.w->type, p.w->panels, p.w->n_out, p.out};
    }
    if (!grouped || !cpu::matmul_panels_group(jobs, nj, ps.begin()->w->n_in, in, n, act_scratch_.data(), *pool_)) {
        for (const Projection& p : ps) matmul(*p.w, in, n, p.out);
    }
    for (const Projection& p : ps) {
        if (!p.bias) continue;
        const int64_t d = p.w->n_out;
        for (int i = 0; i < n; ++i) {
            float* row = p.out + i * d;
            for (int64_t e = 0; e < d; ++e) row[e] += p.bias[e];
        }
    }
}

// Every head of v (n, n_heads * head_dim) = rmsnorm(head) * weight (head_dim); nothing when weight is null.
void Model::head_norm(float* v, const float* weight, int n_heads, int n) {
    if (!weight) return;
    const cpu::Kernels& kr = cpu::kernels();
    const int hd = config_.head_dim;
    for (int64_t h = 0; h < static_cast<int64_t>(n) * n_heads; ++h) kr.rmsnorm(v + h * hd, v + h * hd, weight, hd, config_.rms_eps);
}

// Rotate the first n_rot dims of every head of v (n, n_heads * head_dim) by its position, pairing dims as
// the row's rope style says: (2j, 2j+1) interleaved, or (j, j + n_rot/2) neox.
void Model::rope(float* v, int n_heads, int table, int n) {
    const ModelConfig& c = config_;
    const int half = c.n_rot / 2;
    const bool neox = c.arch.rope == RopeStyle::kNeox;
    const int stride = neox ? 1 : 2;     // distance between the first dims of two pairs
    const int partner = neox ? half : 1; // distance from a pair's first dim to its second
    for (int i = 0; i < n; ++i) {
        const float* cs = rope_cs_[table].data() + static_cast<int64_t>(i) * c.n_rot;
        for (int h = 0; h < n_heads; ++h) {
            float* vh = v + (static_cast<int64_t>(i) * n_heads + h) * c.head_dim;
            for (int j = 0; j < half; ++j) {
                float* p0 = vh + j * stride;
                float* p1 = p0 + partner;
                const float x0 = *p0, x1 = *p1;
                const float cos_t = cs[2 * j], sin_t = cs[2 * j + 1];
                *p0 = x0 * cos_t - x1 * sin_t;
                *p1 = x0 * sin_t + x1 * cos_t;
            }
        }
    }
}

// The chunk's keys and values (k_, v_) into the cache of CPU block `slot`, each row at its sequence's position
// (a sequence's rows are consecutive positions: one store per sequence).
void Model::store_kv(int slot, int n) {
    const int64_t kv_dim = static_cast<int64_t>(config_.n_head_kv) * config_.head_dim;
    for (int i = 0; i < n;) {
        int j = i + 1;
        while (j < n && row_seq_[j] == row_seq_[i]) ++j;
        seqs_[row_seq_[i]].kv->store(slot, row_pos_[i], j - i, k_.data() + i * kv_dim, v_.data() + i * kv_dim);
        i = j;
    }
}

// Causal grouped-query attention for the chunk's n rows (queries q_, keys and values already in the cache
// of CPU block `slot` of each row's sequence, up to the row's position) into att_out_ (n, n_head * head_dim).
// window > 0: each row sees only the last `window` positions up to its own.
void Model::attention(int slot, int window, int n) {
    const ModelConfig& c = config_;
    const cpu::Kernels& kr = cpu::kernels();
    const int hd = c.head_dim;
    const int64_t q_dim = static_cast<int64_t>(c.n_head) * hd;
    const int group = c.n_head / c.n_head_kv;
    const float scale = c.attn_scale;
    const KvCache& kv0 = *seqs_[0].kv;  // every sequence's cache has the same layout
    const size_t row_bytes = kv0.row_bytes();
    const int cap = kv0.capacity(slot);  // position t is in row t % cap (a sliding block's ring)
    const bool f16 = kv0.f16();
    // One item = one query token x one KV head: the `group` query heads that share those keys and values
    // go through the kernels together (Kernels::attn_scores, ::weighted_rows), so each key and value row is
    // read once per group instead of once per head.
    const int64_t n_items = static_cast<int64_t>(n) * c.n_head_kv;

    pool_->run([&](int ith, int nth) {
        float* scores = att_.data() + static_cast<size_t>(ith) * static_cast<size_t>(group) * n_ctx_;
        // Items interleave over the threads: with a causal mask later tokens cost more, so contiguous
        // ranges would leave the last thread with most of the work.
        for (int64_t item = ith; item < n_items; item += nth) {
            const int i = static_cast<int>(item / c.n_head_kv), g = static_cast<int>(item % c.n_head_kv);
            const int n_kv = row_pos_[i] + 1;  // causal: this row sees positions t0 .. its own
            const int t0 = window > 0 ? std::max(0, n_kv - window) : 0;
            const KvCache& kv = *seqs_[row_seq_[i]].kv;
            const uint8_t* kc = kv.k(slot);
            const uint8_t* vc = kv.v(slot);
            const size_t off = static_cast<size_t>(g) * hd * kv.elem_bytes();
            const float* q = q_.data() + i * q_dim + static_cast<int64_t>(g) * group * hd;  // (group, hd)

            // scores[c * n_ctx + t] = scale * q_c . k_t, over runs of positions whose rows are contiguous in the ring
            for (int run = t0; run < n_kv;) {
                const int row0 = run % cap;
                const int run_end = std::min(n_kv, run + (cap - row0));
                kr.attn_scores(q, group, hd, kc + static_cast<size_t>(row0) * row_bytes + off, row_bytes, run_end - run,
                               f16, scale, scores + run, static_cast<size_t>(n_ctx_));
                run = run_end;
            }
            for (int cg = 0; cg < group; ++cg) {
                float* sc = scores + static_cast<size_t>(cg) * n_ctx_;
                float max_score = -INFINITY;
                for (int t = t0; t < n_kv; ++t) max_score = std::max(max_score, sc[t]);
                float sum = 0.0f;
                if (kr.exp_sub_sum) {
                    sum = kr.exp_sub_sum(sc + t0, n_kv - t0, max_score);
                } else {
                    for (int t = t0; t < n_kv; ++t) {
                        sc[t] = std::exp(sc[t] - max_score);
                        sum += sc[t];
                    }
                }
                const float inv_sum = 1.0f / sum;
                for (int t = t0; t < n_kv; ++t) sc[t] *= inv_sum;  // probabilities
                float* out = att_out_.data() + i * q_dim + static_cast<int64_t>(g * group + cg) * hd;
                std::fill(out, out + hd, 0.0f);
            }
            // out (group, hd) = probabilities @ values, over the same contiguous runs of ring rows.
            float* out0 = att_out_.data() + i * q_dim + static_cast<int64_t>(g) * group * hd;
            for (int run = t0; run < n_kv;) {
                const int row0 = run % cap;
                const int run_end = std::min(n_kv, run + (cap - row0));
                kr.weighted_rows(out0, group, hd, scores + run, static_cast<size_t>(n_ctx_),
                                 vc + static_cast<size_t>(row0) * row_bytes + off, row_bytes, run_end - run, f16);
                run = run_end;
            }
        }
    });
}

// x (n, n_embd) += in @ w^T, through post_norm first where the block has one (NormPlacement::kSandwich).
void Model::matmul_add(const WeightView& w, const float* in, const float* post_norm, int n, float* x) {
    float* out = xb_.data();
    matmul(w, in, n, out);
    if (post_norm) norm(out, post_norm, n, out);
    for (int64_t e = 0; e < static_cast<int64_t>(n) * config_.n_embd; ++e) x[e] += out[e];
}

// gate = act(gate) * up over count elements, act from the row (SiLU, or GELU with the tanh approximation).
void Model::gated_activation(float* gate, const float* up, int64_t count) {
    const cpu::Kernels& kr = cpu::kernels();
    (config_.arch.act == Activation::kSilu ? kr.silu_mul : kr.gelu_mul)(gate, gate, up, count);
}

// ----------------------------------------------------------------------------------------------------
// the cache interface

namespace {

// Saved state layout (little-endian): u32 magic, u32 n_slots, u32 elem_bytes, u32 reserved, u64 row_bytes,
// i32 n_past, i32 reserved; per slot i32 first_pos, i32 n_rows; then per slot n_rows K rows and n_rows V rows.
constexpr uint32_t kStateMagic = 0x5453424cu;  // "LBST"

template <class T>
void put(std::vector<uint8_t>& out, T v) {
    const size_t at = out.size();
    out.resize(at + sizeof(T));
    std::memcpy(out.data() + at, &v, sizeof(T));
}

template <class T>
T take(const uint8_t* data, size_t size, size_t& at) {
    if (at > size || size - at < sizeof(T)) throw Error("saved state: the data is truncated");
    T v;
    std::memcpy(&v, data + at, sizeof(T));
    at += sizeof(T);
    return v;
}

}  // namespace

std::vector<uint8_t> Model::state(int seq) const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (gpu_) throw Error("saving the state of a model with blocks on the GPU is not supported yet; load it with n_gpu_layers=0");
    const Sequence& s = seq_at(seq);
    const KvCache& kv = *s.kv;
    const int n_past = static_cast<int>(s.tokens.size());
    std::vector<uint8_t> out;
    put<uint32_t>(out, kStateMagic);
    put<uint32_t>(out, static_cast<uint32_t>(kv.n_slots()));
    put<uint32_t>(out, static_cast<uint32_t>(kv.elem_bytes()));
    put<uint32_t>(out, 0);
    put<uint64_t>(out, kv.row_bytes());
    put<int32_t>(out, n_past);
    put<int32_t>(out, 0);
    std::vector<std::pair<int, int>> spans;  // per slot: first position held, rows
    const int written = std::max(n_past, s.written);
    for (int slot = 0; slot < kv.n_slots(); ++slot) {
        // The positions this slot's ring still holds (see Sequence::written).
        const int first = std::min(n_past, std::max(0, written - kv.capacity(slot)));
        spans.emplace_back(first, n_past - first);
        put<int32_t>(out, first);
        put<int32_t>(out, n_past - first);
    }
    for (int slot = 0; slot < kv.n_slots(); ++slot) {
        const size_t at = out.size();
        const size_t bytes = static_cast<size_t>(spans[slot].second) * kv.row_bytes();
        out.resize(at + 2 * bytes);
        kv.copy_out(slot, spans[slot].first, spans[slot].second, out.data() + at, out.data() + at + bytes);
    }
    return out;
}

void Model::set_state(int seq, const std::vector<int32_t>& tokens, const uint8_t* data, size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (gpu_) throw Error("loading a saved state into a model with blocks on the GPU is not supported yet; load it with n_gpu_layers=0");
    Sequence& s = const_cast<Sequence&>(seq_at(seq));
    KvCache& kv = *s.kv;
    size_t at = 0;
    if (take<uint32_t>(data, size, at) != kStateMagic) throw Error("saved state: not lowbit state data");
    const uint32_t n_slots = take<uint32_t>(data, size, at);
    const uint32_t elem = take<uint32_t>(data, size, at);
    take<uint32_t>(data, size, at);
    const uint64_t row_bytes = take<uint64_t>(data, size, at);
    const int32_t n_past = take<int32_t>(data, size, at);
    take<int32_t>(data, size, at);
    if (n_slots != static_cast<uint32_t>(kv.n_slots()) || row_bytes / std::max<uint32_t>(elem, 1) !=
        kv.row_bytes() / kv.elem_bytes()) {
        throw Error("saved state: it was saved from a model with a different layout (" + std::to_string(n_slots) +
                    " CPU blocks) than this one (" + std::to_string(kv.n_slots()) + ")");
    }
    if (elem != kv.elem_bytes()) {
        throw Error(std::string("saved state: its KV cache is ") + (elem == 2 ? "f16" : "f32") + ", this model's is " +
                    (kv.f16() ? "f16" : "f32") + "; load the model with the same kv type");
    }
    if (n_past < 0 || static_cast<size_t>(n_past) != tokens.size()) throw Error("saved state: token count does not match");
    if (n_past > n_ctx_) {
        throw Error("saved state: it holds " + std::to_string(n_past) + " tokens, more than this model's context of " +
                    std::to_string(n_ctx_) + "; load the model with a larger n_ctx");
    }
    for (int32_t t : tokens) {
        if (t < 0 || t >= config_.n_vocab) throw Error("saved state: a token id is outside the vocabulary");
    }
    std::vector<int> window(kv.n_slots(), 0);
    for (const Layer& L : layers_) {
        if (L.backend == Backend::kCpu) window[L.slot] = L.window;
    }
    std::vector<std::pair<int, int>> spans;
    size_t need = at + static_cast<size_t>(n_slots) * 8;
    for (uint32_t slot = 0; slot < n_slots; ++slot) {
        const int32_t first = take<int32_t>(data, size, at), rows = take<int32_t>(data, size, at);
        if (first < 0 || rows < 0 || first + rows != n_past) throw Error("saved state: a block's rows do not end at its last token");
        // The positions the next token reads: all of them, or its window.
        const int needed_from = window[slot] > 0 ? std::max(0, n_past - window[slot] + 1) : 0;
        const int keep_from = std::max(first, n_past - kv.capacity(static_cast<int>(slot)));
        if (first > needed_from || keep_from > needed_from) {
            throw Error("saved state: this model's cache cannot hold the positions its block " + std::to_string(slot) +
                        " needs (load it with a larger n_ctx, or the n_batch it was saved with)");
        }
        spans.emplace_back(first, rows);
        need += 2 * static_cast<size_t>(rows) * row_bytes;
    }
    if (need != size) throw Error("saved state: the data has " + std::to_string(size) + " bytes, its header says " + std::to_string(need));
    int written = n_past;  // such that written - capacity is where each sliding ring's restored rows begin
    for (uint32_t slot = 0; slot < n_slots; ++slot) {
        const auto [first, rows] = spans[slot];
        const int cap = kv.capacity(static_cast<int>(slot));
        const int keep_from = std::max(first, n_past - cap);
        const size_t skip = static_cast<size_t>(keep_from - first) * row_bytes;
        const size_t bytes = static_cast<size_t>(rows) * row_bytes;
        kv.copy_in(static_cast<int>(slot), keep_from, n_past - keep_from, data + at + skip, data + at + bytes + skip);
        at += 2 * bytes;
        if (window[slot] > 0) written = std::max(written, keep_from + cap);
    }
    s.tokens = tokens;
    s.written = written;
}

int Model::reusable_prefix(int n_keep, int seq) const {
    const Sequence& s = seq_at(seq);
    const int past = static_cast<int>(s.tokens.size());
    if (n_keep <= 0 || n_keep > past) return 0;
    // The next token (position n_keep) of a sliding block reads positions from n_keep - window + 1 on; the
    // ring still holds them if no later position has taken their rows, truncated ones included.
    const int written = std::max(past, s.written);
    for (const Layer& L : layers_) {
        if (L.backend != Backend::kCpu || L.window == 0) continue;
        const int first_needed = std::max(0, n_keep - L.window + 1);
        if (written - first_needed > s.kv->capacity(L.slot)) return 0;
    }
    return n_keep;
}

void Model::truncate(int n_keep, int seq) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (n_keep < 0 || n_keep > n_past(seq)) {
        throw Error("truncate(" + std::to_string(n_keep) + "): n_keep must be between 0 and n_past (" +
                    std::to_string(n_past(seq)) + ")");
    }
    if (n_keep > 0 && reusable_prefix(n_keep, seq) != n_keep) {
        throw Error("truncate(" + std::to_string(n_keep) + "): the sliding-window blocks no longer hold the " +
                    "window before position " + std::to_string(n_keep) + " (they keep their last window + n_batch - 1 " +
                    "positions); truncate to 0 and evaluate again");
    }
    if (gpu_) gpu_->truncate(n_keep);  // (n_seq is 1 with GPU blocks)
    seqs_[seq].tokens.resize(n_keep);  // entries past n_keep are simply overwritten by later evals
    if (n_keep == 0) seqs_[seq].written = 0;  // nothing left to protect
}

// ----------------------------------------------------------------------------------------------------
// loading: config, then every tensor checked for presence, shape and type

namespace {

// ModelConfig::eog_ids from the tokenizer.ggml.* keys (the same rule as lowbit.tokenizer.Tokenizer.eot_ids):
// the file's eos/eot/eom ids, plus control tokens spelled like a known chat format's end of turn.
std::vector<int32_t> end_of_generation_ids(const GGUFReader& r) {
    constexpr int64_t kControl = 3;  // tokenizer.ggml.token_type CONTROL
    std::vector<int32_t> ids;
    for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"}) {
        const GGUFValue* v = r.find(key);
        if (v && v->is_integer() && v->as_int() >= 0 && v->as_int() <= INT32_MAX) ids.push_back(static_cast<int32_t>(v->as_int()));
    }
    const GGUFValue* tokens = r.find("tokenizer.ggml.tokens");
    const GGUFValue* types = r.find("tokenizer.ggml.token_type");
    if (tokens && types && tokens->type == GGUFType::ARRAY && types->type == GGUFType::ARRAY &&
        tokens->elem_type == GGUFType::STRING && tokens->arr.size() == types->arr.size()) {
        for (size_t i = 0; i < tokens->arr.size() && i <= INT32_MAX; ++i) {
            const GGUFValue& ty = types->arr[i];
            if (!ty.is_integer() || ty.as_int() != kControl) continue;
            for (const char* text : kEndOfTurnTexts) {
                if (tokens->arr[i].s == text) ids.push_back(static_cast<int32_t>(i));
            }
        }
    }
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    return ids;
}

// Every tensor's type, checked before anything is allocated: the first tensor of a type lowbit cannot run
// (IQ2_XXS, TQ1_0, MXFP4, ...) is named with its type and the list of types lowbit runs.
void check_tensor_types(const GGUFReader& r) {
    for (const GGUFTensorInfo& t : r.tensors()) {
        const TypeTraits* tt = type_traits(t.type_id);
        const bool matrix_ok = tt && tt->supported && cpu::matmul_supported(static_cast<QType>(t.type_id));
        const bool nf4_dq = t.type_id == static_cast<uint32_t>(QType::NF4_DQ);  // expanded to NF4 at load
        if (matrix_ok || nf4_dq) continue;
        std::string runs;
        // Only the types a matrix can have (Q8_K, an activation type, and the internal NF4_DQ are left out).
#define LOWBIT_X(NAME, lc, id, bs, ts, kind) \
    if (cpu::matmul_supported(QType::NAME)) runs += std::string(runs.empty() ? "" : ", ") + #NAME;
        LOWBIT_QTYPES(LOWBIT_X)
#undef LOWBIT_X
        throw Error("tensor '" + t.name + "' has type " + type_name(t.type_id) +
                    ", which lowbit cannot run. lowbit runs " + runs +
                    ". Use a file of one of those types (for example the same model's Q4_K_M or Q8_0 GGUF), or "
                    "requantize an F16/F32 file with `lowbit quantize IN OUT q4_k_m`");
    }
}

std::string supported_architectures() {
    std::string s;
    for (const ArchSpec& a : kArchitectures) s += std::string(s.empty() ? "'" : ", '") + a.name + "'";
    return s;
}

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& path, const ModelParams& params) {
    if (params.n_batch < 1) throw Error("n_batch must be >= 1 (got " + std::to_string(params.n_batch) + ")");
    if (params.n_ctx < 0) throw Error("n_ctx must be >= 0 (0: the file's context length, at most 4096)");
    if (params.n_seq < 1 || params.n_seq > 256) throw Error("n_seq must be between 1 and 256 (got " + std::to_string(params.n_seq) + ")");
    if (params.n_seq > 1 && params.n_gpu_layers != 0) {
        throw Error("several sequences (n_seq=" + std::to_string(params.n_seq) + ") run on the CPU only; pass "
                    "n_gpu_layers=0 or n_seq=1");
    }
    if (params.n_gpu_layers != 0 && !cuda::compiled()) {
        throw Error("n_gpu_layers=" + std::to_string(params.n_gpu_layers) +
                    " needs a GPU, but this build has no CUDA backend; rebuild with LOWBIT_CUDA=ON "
                    "(nvcc on PATH) or pass n_gpu_layers=0");
    }

    std::unique_ptr<Model> m(new Model());
    m->params_ = params;
    m->reader_ = std::make_unique<GGUFReader>(path);
    m->read_config(path);
    m->n_ctx_ = params.n_ctx > 0 ? params.n_ctx : std::min(m->config_.n_ctx_train, 4096);
    m->store_ = std::make_unique<WeightStore>(*m->reader_);
    m->load_tensors();
    if (m->reader_->file_changed_on_disk()) {
        throw Error("'" + path + "' was replaced or truncated on disk while it was being loaded; load it again");
    }
    m->pool_ = std::make_unique<ThreadPool>(params.n_threads);
    m->gpu_ = GpuLayers::place(m->config_, params, m->n_ctx_, m->rope_inv_freq_, m->rope_mscale_, m->layers_,
                               m->output_norm, m->output, &m->head_on_gpu_);
    std::vector<WeightView*> cpu_matrices;  // in the order decode reads them
    for (Layer& L : m->layers_) {
        if (L.backend != Backend::kCpu) continue;
        for (WeightView* w : L.matrices()) cpu_matrices.push_back(w);
    }
    m->embed_from_panels_ = m->store_->repack_for_cpu(cpu_matrices, m->head_on_gpu_ ? nullptr : &m->output,
                                                      m->token_embd, *m->pool_);
    m->allocate_state();
    return m;
}

void Model::read_config(const std::string& path) {
    const GGUFReader& r = *reader_;
    ModelConfig& c = config_;
    c.architecture = r.get_string("general.architecture", "");
    const auto row = std::find_if(kArchitectures.begin(), kArchitectures.end(),
                                  [&](const ArchSpec& a) { return c.architecture == a.name; });
    if (row == kArchitectures.end()) {
        throw Error("'" + path + "' has architecture '" + c.architecture + "', which lowbit does not run; it runs " +
                    "general.architecture " + supported_architectures());
    }
    c.arch = *row;
    c.name = r.get_string("general.name", "");
    const std::string a = c.architecture + ".";
    auto require_int = [&](const std::string& key) -> int {
        const GGUFValue* v = r.find(key);
        if (!v) throw Error("'" + path + "' lacks the metadata key '" + key + "'; the file is not a complete " +
                            c.architecture + " model (re-convert it)");
        int64_t x = v->as_int();
        if (x <= 0 || x > (1 << 30)) throw Error("metadata key '" + key + "' has the invalid value " + std::to_string(x));
        return static_cast<int>(x);
    };
    c.n_ctx_train = require_int(a + "context_length");
    c.n_embd = require_int(a + "embedding_length");
    c.n_layer = require_int(a + "block_count");
    c.n_ff = require_int(a + "feed_forward_length");
    c.n_head = require_int(a + "attention.head_count");
    c.n_head_kv = r.has(a + "attention.head_count_kv") ? require_int(a + "attention.head_count_kv") : c.n_head;
    if (c.n_head % c.n_head_kv != 0) {
        throw Error("head_count (" + std::to_string(c.n_head) + ") is not a multiple of head_count_kv (" +
                    std::to_string(c.n_head_kv) + ")");
    }
    if (c.n_head / c.n_head_kv > 64) {
        throw Error("more than 64 query heads per KV head (" + std::to_string(c.n_head) + " / " +
                    std::to_string(c.n_head_kv) + ") is not supported");
    }
    if (r.has(a + "attention.key_length")) {
        c.head_dim = require_int(a + "attention.key_length");
    } else {
        if (c.n_embd % c.n_head != 0) {
            throw Error("embedding_length (" + std::to_string(c.n_embd) + ") is not a multiple of head_count (" +
                        std::to_string(c.n_head) + ") and attention.key_length is absent");
        }
        c.head_dim = c.n_embd / c.n_head;
    }
    if (r.has(a + "attention.value_length") && require_int(a + "attention.value_length") != c.head_dim) {
        throw Error("attention.value_length differs from attention.key_length; lowbit needs equal key and value head sizes");
    }
    c.n_rot = r.has(a + "rope.dimension_count") ? require_int(a + "rope.dimension_count") : c.head_dim;
    if (c.n_rot > c.head_dim || c.n_rot % 2 != 0) {
        throw Error("rope.dimension_count (" + std::to_string(c.n_rot) + ") must be even and <= the head size (" +
                    std::to_string(c.head_dim) + ")");
    }
    c.rope_freq_base = static_cast<float>(r.get_float(a + "rope.freq_base", 10000.0));
    c.rms_eps = static_cast<float>(r.get_float(a + "attention.layer_norm_rms_epsilon", 1e-5));
    const std::string scaling = r.get_string(a + "rope.scaling.type", "none");
    if (scaling == "linear") {
        double factor = r.get_float(a + "rope.scaling.factor", 1.0);
        if (!(factor > 0.0)) throw Error("rope.scaling.factor must be > 0 (got " + std::to_string(factor) + ")");
        c.rope_freq_scale = static_cast<float>(1.0 / factor);
    } else if (scaling == "yarn") {
        double factor = r.get_float(a + "rope.scaling.factor", 1.0);
        if (!(factor >= 1.0)) throw Error("rope.scaling.factor must be >= 1 for YaRN (got " + std::to_string(factor) + ")");
        c.rope_freq_scale = static_cast<float>(1.0 / factor);
        c.rope_yarn = true;
        c.rope_yarn_orig_ctx = r.has(a + "rope.scaling.original_context_length")
            ? require_int(a + "rope.scaling.original_context_length") : c.n_ctx_train;
        c.rope_yarn_beta_fast = static_cast<float>(r.get_float(a + "rope.scaling.yarn_beta_fast", 32.0));
        c.rope_yarn_beta_slow = static_cast<float>(r.get_float(a + "rope.scaling.yarn_beta_slow", 1.0));
        c.rope_mscale = static_cast<float>(1.0 + 0.1 * std::log(factor));
    } else if (scaling != "none" && !scaling.empty()) {
        throw Error("rope.scaling.type '" + scaling + "' is not supported (lowbit supports 'none', 'linear' and "
                    "'yarn'; Llama 3's scaling comes as rope_freqs.weight)");
    }
    c.rope_mscale *= static_cast<float>(r.get_float(a + "rope.scaling.attn_factor", 1.0));
    if (!(c.rope_freq_base > 0.0f)) throw Error("rope.freq_base must be > 0");
    if (!(c.rms_eps >= 0.0f)) throw Error("attention.layer_norm_rms_epsilon must be >= 0");
    if (c.arch.logit_softcap) c.logit_softcap = static_cast<float>(r.get_float(a + "final_logit_softcapping", 0.0));
    if (!(c.logit_softcap >= 0.0f)) throw Error("final_logit_softcapping must be >= 0");

    // Query scale: HF's query_pre_attn_scalar^-0.5, which is head_dim^-0.5 but for Gemma 3 27B.
    c.attn_scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    if (c.arch.query_scale_embd_blocks > 0 && c.n_layer == c.arch.query_scale_embd_blocks) {
        c.attn_scale = 1.0f / std::sqrt(static_cast<float>(c.n_embd / c.n_head));
    }
    c.attn_scale = static_cast<float>(r.get_float(a + "attention.scale", c.attn_scale));
    if (!(c.attn_scale > 0.0f)) throw Error("attention.scale must be > 0");

    // Which blocks slide (ArchSpec::swa_pattern): none unless the row has a pattern and the file a window.
    c.sliding.assign(c.n_layer, false);
    const GGUFValue* window = c.arch.swa_pattern > 0 ? r.find(a + "attention.sliding_window") : nullptr;
    if (window && window->as_int() > 0) {
        c.sliding_window = static_cast<int>(std::min<int64_t>(window->as_int(), INT32_MAX));
        int pattern = c.arch.swa_pattern;
        const GGUFValue* p = r.find(a + "attention.sliding_window_pattern");
        if (p && p->type == GGUFType::ARRAY) {
            if (p->arr.size() != static_cast<size_t>(c.n_layer)) {
                throw Error("attention.sliding_window_pattern has " + std::to_string(p->arr.size()) +
                            " entries for " + std::to_string(c.n_layer) + " blocks");
            }
            for (int l = 0; l < c.n_layer; ++l) c.sliding[l] = p->arr[l].as_int() != 0;
        } else {
            if (p) pattern = static_cast<int>(p->as_int());
            if (pattern < 0) throw Error("attention.sliding_window_pattern must be >= 0");
            // Blocks P-1, 2P-1, ... are global, the others slide (as llama.cpp: P = 0 slides every block).
            for (int l = 0; l < c.n_layer; ++l) c.sliding[l] = pattern == 0 || (l % pattern) < pattern - 1;
        }
    }

    c.eog_ids = end_of_generation_ids(r);
}

void Model::load_tensors() {
    const GGUFReader& r = *reader_;
    ModelConfig& c = config_;
    const ArchSpec& arch = c.arch;
    WeightStore& s = *store_;
    check_tensor_types(r);

    auto find = [&](const std::string& name) -> const GGUFTensorInfo& {
        const GGUFTensorInfo* t = r.find_tensor(name);
        if (!t) throw Error("'" + r.path() + "' lacks the tensor '" + name + "'; the file is not a complete " +
                            c.architecture + " model");
        return *t;
    };

    const GGUFTensorInfo& embd = find("token_embd.weight");
    if (embd.n_dims != 2 || embd.ne[0] != c.n_embd) {
        throw Error("tensor 'token_embd.weight' has shape " + shape_str(embd) + ", expected [" +
                    std::to_string(c.n_embd) + ", n_vocab]");
    }
    c.n_vocab = static_cast<int>(embd.ne[1]);
    token_embd = s.matrix(embd, c.n_embd, c.n_vocab);
    output_norm = s.vector(find("output_norm.weight"), c.n_embd);
    if (!arch.tied_output && r.find_tensor("output.weight")) {
        output = s.matrix(find("output.weight"), c.n_embd, c.n_vocab);
    } else {
        c.tied_embeddings = true;
        output = token_embd;
    }

    const int64_t q_dim = static_cast<int64_t>(c.n_head) * c.head_dim;
    const int64_t kv_dim = static_cast<int64_t>(c.n_head_kv) * c.head_dim;
    layers_.resize(c.n_layer);
    int n_cpu = 0;
    for (int l = 0; l < c.n_layer; ++l) {
        const std::string p = "blk." + std::to_string(l) + ".";
        Layer& L = layers_[l];
        L.attn_norm = s.vector(find(p + "attn_norm.weight"), c.n_embd);
        L.wq = s.matrix(find(p + "attn_q.weight"), c.n_embd, q_dim);
        L.wk = s.matrix(find(p + "attn_k.weight"), c.n_embd, kv_dim);
        L.wv = s.matrix(find(p + "attn_v.weight"), c.n_embd, kv_dim);
        if (arch.qkv_bias) {
            L.bq = s.vector(find(p + "attn_q.bias"), q_dim);
            L.bk = s.vector(find(p + "attn_k.bias"), kv_dim);
            L.bv = s.vector(find(p + "attn_v.bias"), kv_dim);
        }
        if (arch.qk_norm) {
            L.q_norm = s.vector(find(p + "attn_q_norm.weight"), c.head_dim);
            L.k_norm = s.vector(find(p + "attn_k_norm.weight"), c.head_dim);
        }
        L.wo = s.matrix(find(p + "attn_output.weight"), q_dim, c.n_embd);
        L.ffn_norm = s.vector(find(p + "ffn_norm.weight"), c.n_embd);
        L.w_gate = s.matrix(find(p + "ffn_gate.weight"), c.n_embd, c.n_ff);
        L.w_up = s.matrix(find(p + "ffn_up.weight"), c.n_embd, c.n_ff);
        L.w_down = s.matrix(find(p + "ffn_down.weight"), c.n_ff, c.n_embd);
        if (arch.norm == NormPlacement::kSandwich) {
            L.attn_post_norm = s.vector(find(p + "post_attention_norm.weight"), c.n_embd);
            L.ffn_post_norm = s.vector(find(p + "post_ffw_norm.weight"), c.n_embd);
        }
        L.rope = c.sliding[l] ? 1 : 0;
        L.window = c.sliding[l] ? c.sliding_window : 0;
        L.backend = Backend::kCpu;  // until GpuLayers::place takes it
        L.slot = n_cpu++;
    }

    // RoPE frequencies: pair j turns by pos * freq_scale * base^(-2j / n_rot) / factor[j];
    // rope_freqs.weight (optional, Llama 3's scaling) holds factor[j]. With YaRN, pair j's frequency blends
    // the unscaled (extrapolated) and the scaled (interpolated) one by a ramp over the pairs between the
    // correction dims of beta_fast and beta_slow rotations in the original context (ggml's rope_yarn, HF's
    // _compute_yarn_parameters). Sliding blocks use their own base and no scaling.
    const float* freq_factors = nullptr;
    if (const GGUFTensorInfo* rf = r.find_tensor("rope_freqs.weight")) {
        freq_factors = s.vector(*rf, c.n_rot / 2);
    }
    auto inv_freq = [&](double base, double scale, const float* factors, bool yarn) {
        // The pair index whose wavelength fits `rotations` times into the original context.
        auto corr_dim = [&](double rotations) {
            constexpr double kPi = 3.14159265358979323846;
            return c.n_rot * std::log(c.rope_yarn_orig_ctx / (rotations * 2.0 * kPi)) / (2.0 * std::log(base));
        };
        const double low = yarn ? std::max(0.0, std::floor(corr_dim(c.rope_yarn_beta_fast))) : 0.0;
        const double high = yarn ? std::min(c.n_rot - 1.0, std::ceil(corr_dim(c.rope_yarn_beta_slow))) : 0.0;
        std::vector<float> f(c.n_rot / 2);
        for (int j = 0; j < c.n_rot / 2; ++j) {
            const double extrap = std::pow(base, -2.0 * j / c.n_rot);
            double x = scale * extrap;
            if (yarn) {
                const double keep = 1.0 - std::min(1.0, std::max(0.0, (j - low) / std::max(0.001, high - low)));
                x = x * (1.0 - keep) + extrap * keep;
            }
            if (factors) x /= factors[j];
            f[j] = static_cast<float>(x);
        }
        return f;
    };
    rope_inv_freq_[0] = inv_freq(c.rope_freq_base, c.rope_freq_scale, freq_factors, c.rope_yarn);
    rope_mscale_[0] = c.rope_mscale;
    if (c.sliding_window > 0) {
        const double base_swa = r.get_float(c.architecture + ".rope.freq_base_swa",
                                            arch.rope_base_swa > 0.0f ? arch.rope_base_swa : c.rope_freq_base);
        if (!(base_swa > 0.0)) throw Error("rope.freq_base_swa must be > 0");
        rope_inv_freq_[1] = inv_freq(base_swa, 1.0, nullptr, false);
    }
}

void Model::allocate_state() {
    const ModelConfig& c = config_;
    const int64_t nb = params_.n_batch;
    const int64_t q_dim = static_cast<int64_t>(c.n_head) * c.head_dim;
    const int64_t kv_dim = static_cast<int64_t>(c.n_head_kv) * c.head_dim;

    // The CPU blocks' caches: n_ctx rows, or for a sliding block what a chunk of n_batch tokens can reach.
    std::vector<int> capacity;
    for (const Layer& L : layers_) {
        if (L.backend != Backend::kCpu) continue;
        const int64_t rows = L.window > 0 ? static_cast<int64_t>(L.window) + nb - 1 : n_ctx_;
        capacity.push_back(static_cast<int>(std::min<int64_t>(rows, n_ctx_)));
    }
    seqs_.resize(params_.n_seq);
    for (Sequence& s : seqs_) s.kv = std::make_unique<KvCache>(capacity, kv_dim, params_.kv_f16);
    seqs_[0].tokens.reserve(n_ctx_);
    row_seq_.assign(nb, 0);
    row_pos_.assign(nb, 0);

    x_.assign(nb * c.n_embd, 0.0f);
    xb_.assign(nb * c.n_embd, 0.0f);
    q_.assign(nb * q_dim, 0.0f);
    k_.assign(nb * kv_dim, 0.0f);
    v_.assign(nb * kv_dim, 0.0f);
    att_out_.assign(nb * q_dim, 0.0f);
    hb_.assign(nb * c.n_ff, 0.0f);
    hb2_.assign(nb * c.n_ff, 0.0f);
    // Per thread: the scores of one query token's heads that share a KV head.
    att_.assign(static_cast<size_t>(pool_->size()) * static_cast<size_t>(c.n_head / c.n_head_kv) * n_ctx_, 0.0f);
    for (int table = 0; table < 2; ++table) {
        if (!rope_inv_freq_[table].empty()) rope_cs_[table].assign(nb * c.n_rot, 0.0f);
    }

    size_t act = cpu::act_scratch_bytes(output.type, c.n_embd, nb);
    for (const Layer& L : layers_) {
        for (const WeightView* w : L.matrices()) act = std::max(act, cpu::act_scratch_bytes(w->type, w->n_in, nb));
    }
    act_scratch_.assign(act, 0);
}

MemoryFootprint Model::memory_footprint() const {
    MemoryFootprint f;
    f.weights_mapped = store_->mapped_bytes();
    f.weights_owned = store_->owned_bytes();
    for (const Sequence& s : seqs_) f.kv_cpu += s.kv->bytes();
    size_t floats = x_.size() + xb_.size() + q_.size() + k_.size() + v_.size() + att_out_.size() + hb_.size() +
                    hb2_.size() + att_.size() + rope_cs_[0].size() + rope_cs_[1].size();
    f.scratch_cpu = floats * sizeof(float) + act_scratch_.size();
    if (gpu_) gpu_->footprint(layers_, output, n_ctx_, static_cast<int64_t>(config_.n_head_kv) * config_.head_dim, &f);
    return f;
}

}  // namespace lowbit
