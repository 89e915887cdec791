// Layer offload: Backend keeps transformer blocks (weights + fp16 KV cache) on one GPU and runs them on
// hidden states that cross the bus once per direction per chunk of tokens. The block reads top to bottom
// in Backend::Impl::run_layer.
#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "common.cuh"

namespace lowbit {
namespace cuda {

const void* device_layout(const Matrix& m, std::vector<block_nf4>& scratch, QType* type) {
    if (m.data == nullptr) throw Error("CUDA backend: a weight matrix has no data pointer");
    if (m.n_rows <= 0) throw Error("CUDA backend: a weight matrix has " + std::to_string(m.n_rows) + " rows");
    device_row_bytes(m.type, m.n_cols);  // validates type and row length
    if (m.type != QType::NF4_DQ) {
        *type = m.type;
        return m.data;
    }
    const int64_t n = m.n_rows * m.n_cols;
    scratch.resize(static_cast<size_t>(n / QK_NF4));
    nf4_dq_to_nf4(static_cast<const uint8_t*>(m.data), scratch.data(), n);
    *type = QType::NF4;
    return scratch.data();
}

namespace {

// One block on the device; the optional vectors (as in LayerWeights) are null where the block has none.
struct DeviceLayer {
    const float* attn_norm = nullptr;  // (n_embd)
    DevMatrix wq, wk, wv;
    const float* bq = nullptr;         // (n_head * head_dim)
    const float* bk = nullptr;         // (n_head_kv * head_dim)
    const float* bv = nullptr;         // (n_head_kv * head_dim)
    const float* q_norm = nullptr;     // (head_dim)
    const float* k_norm = nullptr;     // (head_dim)
    DevMatrix wo;
    const float* attn_post_norm = nullptr;  // (n_embd)
    const float* ffn_norm = nullptr;   // (n_embd)
    DevMatrix w_gate, w_up, w_down;
    const float* ffn_post_norm = nullptr;   // (n_embd)
    // K and V hold all n_ctx positions even for a sliding-window block (row = position, no ring): the
    // window is a mask in attention, so truncate() can go back anywhere. The CPU keeps a ring of
    // window + n_batch - 1 rows instead; on the GPU the simpler layout costs memory, not speed.
    __half* k_cache = nullptr;         // (n_ctx, n_head_kv * head_dim)
    __half* v_cache = nullptr;         // (n_ctx, n_head_kv * head_dim)
    int window = 0;                    // attends to the last `window` positions (its own included); 0: all
    int rope_table = 0;                // which of the backend's RoPE tables turns q and k
    int n_cached = 0;                  // positions 0 .. n_cached - 1 are valid
};

// Hands out 256-byte aligned pieces of one device allocation.
struct Carver {
    uint8_t* base;
    size_t used = 0;
    size_t size;
    template <typename P>
    P* take(size_t bytes) {
        const size_t n = detail::round256(bytes);
        if (used + n > size) throw Error("CUDA backend: internal error, allocation estimate too small");
        P* p = reinterpret_cast<P*>(base + used);
        used += n;
        return p;
    }
};

}  // namespace

struct Backend::Impl {
    BackendConfig cfg;
    int n_batch = 0;
    int rope_dim = 0;
    cudaStream_t stream = nullptr;
    std::vector<void*> allocations;
    size_t bytes = 0;

    // Scratch for one chunk of up to n_batch tokens.
    float* x = nullptr;      // (n_batch, n_embd) hidden state
    float* h = nullptr;      // (n_batch, n_embd) normed
    float* q = nullptr;      // (n_batch, n_head * head_dim)
    float* k = nullptr;      // (n_batch, n_head_kv * head_dim)
    float* v = nullptr;      // (n_batch, n_head_kv * head_dim)
    float* att = nullptr;    // (n_batch, n_head * head_dim)
    float* gate = nullptr;   // (n_batch, n_ff)
    float* up = nullptr;     // (n_batch, n_ff)
    block_q8_act* act = nullptr;  // (n_batch, max_k / 32) quantized activations
    float* inv_freq[2] = {};      // (rope_dim / 2) per RoPE table; table 1 null when the config has none
    float* rope_cs[2] = {};       // (n_batch, rope_dim) cos, sin of the chunk's positions, per table

    std::vector<DeviceLayer> layers;

    bool has_output = false;
    const float* out_norm = nullptr;  // (n_embd)
    DevMatrix out_w;                  // (n_vocab, n_embd)
    float* logits = nullptr;          // (kOutputChunk, n_vocab)

    void* allocate(size_t n, const std::string& what) {
        void* p = nullptr;
        cudaError_t err = cudaMalloc(&p, n);
        if (err != cudaSuccess) {
            cudaGetLastError();
            size_t free_b = 0, total_b = 0;
            cudaMemGetInfo(&free_b, &total_b);
            cudaGetLastError();
            throw Error("CUDA: cannot allocate " + std::to_string(n >> 20) + " MiB for " + what + " on GPU " +
                        std::to_string(cfg.device) + " (" + cudaGetErrorString(err) + "; free " +
                        std::to_string(free_b >> 20) + " of " + std::to_string(total_b >> 20) +
                        " MiB): offload fewer layers (n_gpu_layers), or use a smaller n_ctx or n_batch");
        }
        allocations.push_back(p);
        bytes += n;
        return p;
    }

    ~Impl() {
        cudaSetDevice(cfg.device);
        if (stream) cudaStreamSynchronize(stream);
        for (void* p : allocations) cudaFree(p);
        if (stream) cudaStreamDestroy(stream);
        cudaGetLastError();
    }

    void use_device() const { LB_CUDA(cudaSetDevice(cfg.device)); }

    static void check_shape(const Matrix& m, int64_t want_rows, int64_t want_cols, const char* name) {
        if (m.n_rows != want_rows || m.n_cols != want_cols) {
            throw Error(std::string("CUDA backend: ") + name + " has shape (" + std::to_string(m.n_rows) + ", " +
                        std::to_string(m.n_cols) + "), the config expects (" + std::to_string(want_rows) + ", " +
                        std::to_string(want_cols) + ")");
        }
    }

    DevMatrix upload(Carver& mem, const Matrix& m, int64_t want_rows, int64_t want_cols, const char* name) {
        check_shape(m, want_rows, want_cols, name);
        std::vector<block_nf4> expanded;
        QType type;
        const void* src = device_layout(m, expanded, &type);
        DevMatrix d;
        d.type = type;
        d.n_rows = m.n_rows;
        d.n_cols = m.n_cols;
        d.row_bytes = device_row_bytes(type, m.n_cols);
        const size_t n = static_cast<size_t>(m.n_rows) * d.row_bytes;
        uint8_t* dst = mem.take<uint8_t>(n);
        // On our stream and waited for: the stream does not synchronize with the legacy default stream.
        LB_CUDA(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream));
        LB_CUDA(cudaStreamSynchronize(stream));
        d.data = dst;
        return d;
    }

    const float* upload_vec(Carver& mem, const float* src, int64_t n, const char* name) {
        if (src == nullptr) throw Error(std::string("CUDA backend: ") + name + " has no data pointer");
        return upload_optional(mem, src, n);
    }

    // A vector the block may lack: null stays null (and takes no device memory, as vector_bytes counts).
    const float* upload_optional(Carver& mem, const float* src, int64_t n) {
        if (src == nullptr) return nullptr;
        float* dst = mem.take<float>(static_cast<size_t>(n) * 4);
        LB_CUDA(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, stream));
        LB_CUDA(cudaStreamSynchronize(stream));
        return dst;
    }

    // ---- the layer ops, on the chunk's nt tokens; buffers (nt, width) ----

    // out (nt, n_embd) = rmsnorm(in) * weight, row by row.
    void norm(const float* in, const float* weight, int nt, float* out) {
        launch_rmsnorm(in, weight, nt, cfg.n_embd, cfg.rms_eps, out, stream);
    }

    struct Projection {
        const DevMatrix* w;
        const float* bias;  // (w->n_rows) or null
        float* out;         // (nt, w->n_rows)
    };
    // Several matrices of one input, each out = in @ w^T (+ bias); with int8 activations in is quantized once.
    void project(std::initializer_list<Projection> ps, const float* in, int nt) {
        const DevMatrix& first = *ps.begin()->w;
        bool shared_act = nt < kGemmMinTokens && cfg.matvec == MatvecMode::Int8Act;
        for (const Projection& p : ps) shared_act = shared_act && matvec_int8_supported(p.w->type);
        if (shared_act) {
            launch_quantize_act(in, nt, first.n_cols, act, stream);
            const int64_t nb = first.n_cols / 32;
            for (const Projection& p : ps) {
                for (int t = 0; t < nt; ++t) {
                    launch_matvec_int8(*p.w, act + t * nb, p.out + t * p.w->n_rows, false, stream);
                }
            }
        } else {
            for (const Projection& p : ps) matmul(*p.w, in, nt, p.out, false, cfg.matvec, act, stream);
        }
        for (const Projection& p : ps) {
            if (p.bias) launch_add_bias(p.out, p.bias, nt, p.w->n_rows, stream);
        }
    }

    // Every head of v (nt, n_heads * head_dim) = rmsnorm(head) * weight (head_dim); nothing when weight is null.
    void head_norm(float* v, const float* weight, int n_heads, int nt) {
        if (!weight) return;
        launch_head_norm(v, weight, static_cast<int64_t>(nt) * n_heads, cfg.head_dim, cfg.rms_eps, stream);
    }

    // cos/sin of the chunk's positions for every table, shared by all heads and blocks of the chunk.
    void rope_tables(int nt, int pos) {
        for (int table = 0; table < 2; ++table) {
            if (!inv_freq[table]) continue;
            launch_rope_table(inv_freq[table], nt, rope_dim, pos, cfg.rope_mscale[table], rope_cs[table], stream);
        }
    }

    // Rotate the first rope_dim dims of every head of v (nt, n_heads * head_dim) by its position.
    void rope(float* v, int n_heads, int table, int nt) {
        launch_rope(v, nt, n_heads, cfg.head_dim, rope_dim, cfg.rope_mode, rope_cs[table], stream);
    }

    // The chunk's k, v into the block's cache at positions pos .. pos + nt - 1.
    void store_kv(DeviceLayer& L, int nt, int pos) {
        launch_store_kv(k, v, nt, cfg.n_head_kv * cfg.head_dim, pos, L.k_cache, L.v_cache, stream);
    }

    // Causal GQA attention of the chunk's queries q over the block's cache (windowed where the block says)
    // into att (nt, n_head * head_dim).
    void attention(const DeviceLayer& L, int nt, int pos) {
        launch_attention(q, L.k_cache, L.v_cache, nt, pos, cfg.n_head, cfg.n_head_kv, cfg.head_dim, L.window,
                         cfg.attn_scale, att, stream);
    }

    // x (nt, n_embd) += in @ w^T, through post_norm first where the block has one (the residual add is fused
    // into the matmul otherwise).
    void matmul_add(const DevMatrix& w, const float* in, const float* post_norm, int nt) {
        if (!post_norm) {
            matmul(w, in, nt, x, /*accumulate=*/true, cfg.matvec, act, stream);
            return;
        }
        matmul(w, in, nt, h, /*accumulate=*/false, cfg.matvec, act, stream);
        launch_rmsnorm_add(h, post_norm, nt, cfg.n_embd, cfg.rms_eps, x, stream);
    }

    // gate = act(gate) * up over count elements.
    void gated_activation(float* g, const float* u, int64_t count) {
        launch_gated_act(cfg.act, g, u, count, g, stream);
    }

    // One transformer block on the chunk in `x`: nt tokens at positions pos .. pos + nt - 1, op for op as
    // the CPU's Model::run_layer_cpu (cpp/src/model.cpp). The RoPE tables of the chunk are already made.
    void run_layer(DeviceLayer& L, int nt, int pos) {
        const BackendConfig& c = cfg;
        // Attention: x += attention(rope(norm(x) @ Wq, Wk, Wv)) @ Wo.
        norm(x, L.attn_norm, nt, h);
        project({{&L.wq, L.bq, q}, {&L.wk, L.bk, k}, {&L.wv, L.bv, v}}, h, nt);
        head_norm(q, L.q_norm, c.n_head, nt);
        head_norm(k, L.k_norm, c.n_head_kv, nt);
        rope(q, c.n_head, L.rope_table, nt);
        rope(k, c.n_head_kv, L.rope_table, nt);
        store_kv(L, nt, pos);
        attention(L, nt, pos);
        matmul_add(L.wo, att, L.attn_post_norm, nt);
        // Feed-forward: x += (act(norm(x) @ Wgate) * (norm(x) @ Wup)) @ Wdown.
        norm(x, L.ffn_norm, nt, h);
        project({{&L.w_gate, nullptr, gate}, {&L.w_up, nullptr, up}}, h, nt);
        gated_activation(gate, up, static_cast<int64_t>(nt) * c.n_ff);
        matmul_add(L.w_down, gate, L.ffn_post_norm, nt);
    }
};

Backend::Backend(const BackendConfig& cfg, int n_batch) : impl_(new Impl) {
    Impl& I = *impl_;
    I.cfg = cfg;
    I.n_batch = n_batch;
    auto bad = [](const std::string& what) { throw Error("CUDA backend: " + what); };
    if (cfg.n_embd <= 0 || cfg.n_head <= 0 || cfg.n_head_kv <= 0 || cfg.n_ff <= 0 || cfg.n_ctx <= 0) {
        bad("n_embd, n_head, n_head_kv, n_ff and n_ctx must all be positive");
    }
    if (cfg.n_head % cfg.n_head_kv != 0) {
        bad("n_head " + std::to_string(cfg.n_head) + " is not a multiple of n_head_kv " + std::to_string(cfg.n_head_kv));
    }
    if (cfg.head_dim <= 0 || cfg.head_dim > 256) {
        bad("head_dim " + std::to_string(cfg.head_dim) + " is outside 1..256; run this model with n_gpu_layers=0");
    }
    I.rope_dim = cfg.rope_dim == 0 ? cfg.head_dim : cfg.rope_dim;
    if (I.rope_dim % 2 != 0 || I.rope_dim < 2 || I.rope_dim > cfg.head_dim) {
        bad("rope_dim " + std::to_string(I.rope_dim) + " must be even and at most head_dim " +
            std::to_string(cfg.head_dim));
    }
    if (cfg.rope_mode != RopeMode::Normal && cfg.rope_mode != RopeMode::Neox) {
        bad("rope_mode " + std::to_string(static_cast<int>(cfg.rope_mode)) + " is neither Normal (0) nor Neox (2)");
    }
    if (cfg.act != GatedAct::Silu && cfg.act != GatedAct::GeluTanh) {
        bad("act " + std::to_string(static_cast<int>(cfg.act)) + " is neither Silu (0) nor GeluTanh (1)");
    }
    if (!(cfg.attn_scale >= 0.0f) || !std::isfinite(cfg.attn_scale)) {
        bad("attn_scale must be finite and >= 0 (0: 1/sqrt(head_dim))");
    }
    if (!(cfg.logit_softcap >= 0.0f) || !std::isfinite(cfg.logit_softcap)) {
        bad("logit_softcap must be finite and >= 0 (0: none)");
    }
    if (cfg.rope_inv_freq[0].empty()) {
        I.cfg.rope_inv_freq[0] = rope_inv_freq(I.rope_dim, cfg.rope_freq_base, cfg.rope_freq_scale);
    }
    for (int table = 0; table < 2; ++table) {
        const std::vector<float>& f = I.cfg.rope_inv_freq[table];
        if (!f.empty() && f.size() != static_cast<size_t>(I.rope_dim / 2)) {
            bad("rope_inv_freq[" + std::to_string(table) + "] has " + std::to_string(f.size()) +
                " frequencies, rope_dim / 2 = " + std::to_string(I.rope_dim / 2) + " expected");
        }
        if (!(cfg.rope_mscale[table] > 0.0f) || !std::isfinite(cfg.rope_mscale[table])) {
            bad("rope_mscale[" + std::to_string(table) + "] must be finite and > 0 (1: no scaling)");
        }
    }
    if (n_batch <= 0 || n_batch > 65535) bad("n_batch " + std::to_string(n_batch) + " must be in 1..65535");
    std::string why;
    const int count = device_count(&why);
    if (count == 0) {
        bad("no usable GPU (" + (why.empty() ? std::string("no device found") : why) +
            "); run with n_gpu_layers=0 or check the NVIDIA driver");
    }
    if (cfg.device < 0 || cfg.device >= count) {
        bad("device " + std::to_string(cfg.device) + " does not exist (" + std::to_string(count) + " visible)");
    }
    I.use_device();
    LB_CUDA(cudaStreamCreateWithFlags(&I.stream, cudaStreamNonBlocking));

    const size_t total = estimate_scratch_bytes(cfg, n_batch);
    Carver mem{static_cast<uint8_t*>(I.allocate(total, "activation scratch")), 0, total};
    const size_t nb = static_cast<size_t>(n_batch);
    const size_t q_dim = static_cast<size_t>(cfg.n_head) * cfg.head_dim;
    const size_t kv_dim = static_cast<size_t>(cfg.n_head_kv) * cfg.head_dim;
    const size_t max_k = std::max({static_cast<size_t>(cfg.n_embd), q_dim, static_cast<size_t>(cfg.n_ff)});
    I.x = mem.take<float>(nb * cfg.n_embd * 4);
    I.h = mem.take<float>(nb * cfg.n_embd * 4);
    I.q = mem.take<float>(nb * q_dim * 4);
    I.att = mem.take<float>(nb * q_dim * 4);
    I.k = mem.take<float>(nb * kv_dim * 4);
    I.v = mem.take<float>(nb * kv_dim * 4);
    I.gate = mem.take<float>(nb * cfg.n_ff * 4);
    I.up = mem.take<float>(nb * cfg.n_ff * 4);
    I.act = mem.take<block_q8_act>(nb * (max_k / 32 + 1) * sizeof(block_q8_act));
    for (int table = 0; table < 2; ++table) {
        const std::vector<float>& f = I.cfg.rope_inv_freq[table];
        if (f.empty()) continue;
        I.inv_freq[table] = mem.take<float>(f.size() * 4);
        I.rope_cs[table] = mem.take<float>(nb * I.rope_dim * 4);
        LB_CUDA(cudaMemcpyAsync(I.inv_freq[table], f.data(), f.size() * 4, cudaMemcpyHostToDevice, I.stream));
    }
    LB_CUDA(cudaStreamSynchronize(I.stream));
}

Backend::~Backend() = default;

int Backend::add_layer(const LayerWeights& w, int window, int rope_table) {
    Impl& I = *impl_;
    const BackendConfig& c = I.cfg;
    I.use_device();
    const int64_t q_dim = static_cast<int64_t>(c.n_head) * c.head_dim;
    const int64_t kv_dim = static_cast<int64_t>(c.n_head_kv) * c.head_dim;
    // Every shape is checked before anything is allocated, so a bad block leaves the backend unchanged.
    Impl::check_shape(w.wq, q_dim, c.n_embd, "attn_q");
    Impl::check_shape(w.wk, kv_dim, c.n_embd, "attn_k");
    Impl::check_shape(w.wv, kv_dim, c.n_embd, "attn_v");
    Impl::check_shape(w.wo, c.n_embd, q_dim, "attn_output");
    Impl::check_shape(w.w_gate, c.n_ff, c.n_embd, "ffn_gate");
    Impl::check_shape(w.w_up, c.n_ff, c.n_embd, "ffn_up");
    Impl::check_shape(w.w_down, c.n_embd, c.n_ff, "ffn_down");
    if (w.attn_norm == nullptr || w.ffn_norm == nullptr) throw Error("CUDA backend: a block has no norm weights");
    if (window < 0) throw Error("CUDA backend: window " + std::to_string(window) + " must be >= 0 (0: all positions)");
    if (rope_table < 0 || rope_table > 1 || I.inv_freq[rope_table] == nullptr) {
        throw Error("CUDA backend: rope_table " + std::to_string(rope_table) + " is not one of the config's RoPE " +
                    "tables (0, or 1 when BackendConfig::rope_inv_freq[1] is set)");
    }
    const size_t total = estimate_layer_bytes(c, w);
    const std::string what = "block " + std::to_string(I.layers.size()) + " (weights + KV cache)";
    Carver mem{static_cast<uint8_t*>(I.allocate(total, what)), 0, total};
    DeviceLayer L;
    L.attn_norm = I.upload_vec(mem, w.attn_norm, c.n_embd, "attn_norm");
    L.ffn_norm = I.upload_vec(mem, w.ffn_norm, c.n_embd, "ffn_norm");
    L.bq = I.upload_optional(mem, w.bq, q_dim);
    L.bk = I.upload_optional(mem, w.bk, kv_dim);
    L.bv = I.upload_optional(mem, w.bv, kv_dim);
    L.q_norm = I.upload_optional(mem, w.q_norm, c.head_dim);
    L.k_norm = I.upload_optional(mem, w.k_norm, c.head_dim);
    L.attn_post_norm = I.upload_optional(mem, w.attn_post_norm, c.n_embd);
    L.ffn_post_norm = I.upload_optional(mem, w.ffn_post_norm, c.n_embd);
    L.wq = I.upload(mem, w.wq, q_dim, c.n_embd, "attn_q");
    L.wk = I.upload(mem, w.wk, kv_dim, c.n_embd, "attn_k");
    L.wv = I.upload(mem, w.wv, kv_dim, c.n_embd, "attn_v");
    L.wo = I.upload(mem, w.wo, c.n_embd, q_dim, "attn_output");
    L.w_gate = I.upload(mem, w.w_gate, c.n_ff, c.n_embd, "ffn_gate");
    L.w_up = I.upload(mem, w.w_up, c.n_ff, c.n_embd, "ffn_up");
    L.w_down = I.upload(mem, w.w_down, c.n_embd, c.n_ff, "ffn_down");
    const size_t kv_bytes = static_cast<size_t>(c.n_ctx) * kv_dim * sizeof(__half);
    L.k_cache = mem.take<__half>(kv_bytes);
    L.v_cache = mem.take<__half>(kv_bytes);
    L.window = window;
    L.rope_table = rope_table;
    I.layers.push_back(L);
    return static_cast<int>(I.layers.size()) - 1;
}

int Backend::n_layers() const { return static_cast<int>(impl_->layers.size()); }

void Backend::forward(int first, int last, float* x, int n_tok, int n_past) {
    Impl& I = *impl_;
    const BackendConfig& c = I.cfg;
    if (first < 0 || last < first || last > n_layers()) {
        throw Error("CUDA backend: block range [" + std::to_string(first) + ", " + std::to_string(last) +
                    ") is outside the " + std::to_string(n_layers()) + " uploaded blocks");
    }
    if (n_tok < 0 || n_past < 0) throw Error("CUDA backend: n_tok and n_past must not be negative");
    if (static_cast<int64_t>(n_past) + n_tok > c.n_ctx) {
        throw Error("CUDA backend: positions up to " + std::to_string(static_cast<int64_t>(n_past) + n_tok) +
                    " exceed the KV cache of " + std::to_string(c.n_ctx) + " (n_ctx); start a new sequence or "
                    "create the model with a larger n_ctx");
    }
    if (n_tok == 0 || first == last) return;
    if (x == nullptr) throw Error("CUDA backend: forward got no hidden states");
    for (int l = first; l < last; ++l) {
        if (I.layers[l].n_cached < n_past) {
            throw Error("CUDA backend: block " + std::to_string(l) + " caches " +
                        std::to_string(I.layers[l].n_cached) + " positions but n_past is " + std::to_string(n_past) +
                        "; run the earlier tokens first");
        }
    }
    I.use_device();
    // Positions from n_past on are rewritten below; mark them invalid until the run succeeds.
    for (int l = first; l < last; ++l) I.layers[l].n_cached = n_past;
    const size_t row = static_cast<size_t>(c.n_embd);
    for (int c0 = 0; c0 < n_tok; c0 += I.n_batch) {
        const int nt = std::min(I.n_batch, n_tok - c0);
        float* xc = x + static_cast<size_t>(c0) * row;
        LB_CUDA(cudaMemcpyAsync(I.x, xc, nt * row * 4, cudaMemcpyHostToDevice, I.stream));
        I.rope_tables(nt, n_past + c0);
        for (int l = first; l < last; ++l) I.run_layer(I.layers[l], nt, n_past + c0);
        LB_CUDA(cudaMemcpyAsync(xc, I.x, nt * row * 4, cudaMemcpyDeviceToHost, I.stream));
        LB_CUDA(cudaStreamSynchronize(I.stream));
    }
    for (int l = first; l < last; ++l) I.layers[l].n_cached = n_past + n_tok;
}

void Backend::set_output(const float* output_norm, const Matrix& output) {
    Impl& I = *impl_;
    if (I.has_output) throw Error("CUDA backend: the output head is already on the GPU");
    if (output.n_cols != I.cfg.n_embd) {
        throw Error("CUDA backend: output.weight has " + std::to_string(output.n_cols) + " columns, expected n_embd " +
                    std::to_string(I.cfg.n_embd));
    }
    I.use_device();
    const size_t total = estimate_output_bytes(I.cfg, output);
    Carver mem{static_cast<uint8_t*>(I.allocate(total, "the output layer")), 0, total};
    I.out_norm = I.upload_vec(mem, output_norm, I.cfg.n_embd, "output_norm");
    I.out_w = I.upload(mem, output, output.n_rows, I.cfg.n_embd, "output");
    I.logits = mem.take<float>(static_cast<size_t>(kOutputChunk) * output.n_rows * 4);
    I.has_output = true;
}

bool Backend::has_output() const { return impl_->has_output; }
int64_t Backend::n_vocab() const { return impl_->has_output ? impl_->out_w.n_rows : 0; }

void Backend::output(const float* x, int n_tok, float* logits) {
    Impl& I = *impl_;
    if (!I.has_output) throw Error("CUDA backend: output() needs set_output() first");
    if (n_tok <= 0) return;
    I.use_device();
    const size_t row = static_cast<size_t>(I.cfg.n_embd);
    const size_t n_vocab = static_cast<size_t>(I.out_w.n_rows);
    const int chunk = std::min(kOutputChunk, I.n_batch);
    for (int c0 = 0; c0 < n_tok; c0 += chunk) {
        const int nt = std::min(chunk, n_tok - c0);
        LB_CUDA(cudaMemcpyAsync(I.x, x + static_cast<size_t>(c0) * row, nt * row * 4, cudaMemcpyHostToDevice,
                                I.stream));
        launch_rmsnorm(I.x, I.out_norm, nt, I.cfg.n_embd, I.cfg.rms_eps, I.h, I.stream);
        matmul(I.out_w, I.h, nt, I.logits, false, I.cfg.matvec, I.act, I.stream);
        if (I.cfg.logit_softcap > 0.0f) {
            launch_softcap(I.logits, static_cast<int64_t>(nt) * I.out_w.n_rows, I.cfg.logit_softcap, I.stream);
        }
        LB_CUDA(cudaMemcpyAsync(logits + static_cast<size_t>(c0) * n_vocab, I.logits, nt * n_vocab * 4,
                                cudaMemcpyDeviceToHost, I.stream));
        LB_CUDA(cudaStreamSynchronize(I.stream));
    }
}

void Backend::truncate(int n_keep) {
    if (n_keep < 0) n_keep = 0;
    for (auto& L : impl_->layers) L.n_cached = std::min(L.n_cached, n_keep);
}

int Backend::n_cached(int layer) const {
    if (layer < 0 || layer >= n_layers()) throw Error("CUDA backend: no block " + std::to_string(layer));
    return impl_->layers[layer].n_cached;
}

size_t Backend::device_bytes() const { return impl_->bytes; }
DeviceInfo Backend::info() const { return device_info(impl_->cfg.device); }
const BackendConfig& Backend::config() const { return impl_->cfg; }

}  // namespace cuda
}  // namespace lowbit
