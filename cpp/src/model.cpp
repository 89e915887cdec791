// The LLaMA forward pass: load a GGUF file, then embed -> [RMSNorm, attention, RMSNorm, SwiGLU] x n_layer
// -> RMSNorm -> output head. Reads top to bottom; all heavy lifting is cpu::matmul and the kernel table.
#include "lowbit/model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <climits>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <string>

#include <sys/mman.h>
#include <unistd.h>

#include "lowbit/cuda.h"
#include "lowbit/kernels.h"

namespace lowbit {

// ----------------------------------------------------------------------------------------------------
// small helpers

namespace {

std::string type_name(uint32_t id) {
    const TypeTraits* tt = type_traits(id);
    return tt ? std::string(tt->name) : "unknown type id " + std::to_string(id);
}

std::string shape_str(const GGUFTensorInfo& t) {
    std::string s = "[";
    for (int i = 0; i < t.n_dims; ++i) s += (i ? ", " : "") + std::to_string(t.ne[i]);
    return s + "]";
}

// Dequantize one row of n elements of any supported type into out (n floats).
void dequantize_row(QType t, const uint8_t* row, float* out, int64_t n) {
    switch (t) {
        case QType::F32:
            std::memcpy(out, row, n * sizeof(float));
            return;
        case QType::F16:
        case QType::BF16: {
            // memcpy loads: the row may sit at an odd address in a file with general.alignment 1.
            uint16_t h;
            if (t == QType::F16) {
                for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_fp32((std::memcpy(&h, row + 2 * i, 2), h));
            } else {
                for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_fp32((std::memcpy(&h, row + 2 * i, 2), h));
            }
            return;
        }
        default:
            dequantize(t, row, out, n, 1);
    }
}

// ----------------------------------------------------------------------------------------------------
// loading: config, then every tensor checked for presence, shape and type

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

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& path, const ModelParams& params) {
    if (params.n_batch < 1) throw Error("n_batch must be >= 1 (got " + std::to_string(params.n_batch) + ")");
    if (params.n_ctx < 0) throw Error("n_ctx must be >= 0 (0: the file's context length, at most 4096)");
    if (params.n_gpu_layers != 0 && !cuda::compiled()) {
        throw Error("n_gpu_layers=" + std::to_string(params.n_gpu_layers) +
                    " needs a GPU, but this build has no CUDA backend; rebuild with LOWBIT_CUDA=ON "
                    "(nvcc on PATH) or pass n_gpu_layers=0");
    }

    std::unique_ptr<Model> m(new Model());
    m->params_ = params;
    m->reader_ = std::make_unique<GGUFReader>(path);
    const GGUFReader& r = *m->reader_;
    ModelConfig& c = m->config_;

    c.architecture = r.get_string("general.architecture", "");
    if (c.architecture != "llama" && c.architecture != "mistral") {
        throw Error("'" + path + "' has architecture '" + c.architecture +
                    "'; lowbit runs only LLaMA-family models (general.architecture 'llama' or 'mistral')");
    }
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
    } else if (scaling != "none" && !scaling.empty()) {
        throw Error("rope.scaling.type '" + scaling + "' is not supported (lowbit supports 'none' and 'linear')");
    }
    if (!(c.rope_freq_base > 0.0f)) throw Error("rope.freq_base must be > 0");
    if (!(c.rms_eps >= 0.0f)) throw Error("attention.layer_norm_rms_epsilon must be >= 0");

    c.eog_ids = end_of_generation_ids(r);

    m->n_ctx_ = params.n_ctx > 0 ? params.n_ctx : std::min(c.n_ctx_train, 4096);
    m->load_tensors();
    if (m->reader_->file_changed_on_disk()) {
        throw Error("'" + path + "' was replaced or truncated on disk while it was being loaded; load it again");
    }
    m->pool_ = std::make_unique<ThreadPool>(params.n_threads);
    m->setup_gpu();
    m->repack_cpu_weights();
    m->allocate_state();
    return m;
}

Model::OwnedBuffer::OwnedBuffer(size_t n, Kind kind) : n_(n) {
    constexpr size_t kMapFrom = size_t{4} << 20;
    constexpr size_t kHuge = size_t{2} << 20;
    if (kind == kCache && n > 0) {
        void* m = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) throw Error("out of memory: cannot allocate " + std::to_string(n >> 20) + " MiB for the KV cache");
        p_ = static_cast<uint8_t*>(m);
        mapped_ = true;
    } else if (n >= kMapFrom) {
        // Map 2 MiB more than asked and trim both ends, so the buffer starts on a huge-page boundary and every
        // whole 2 MiB of it can be a transparent huge page (an unaligned 6.5 MiB mapping gets two at most).
        const size_t span = n + kHuge;
        void* m = ::mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) throw Error("out of memory: cannot allocate " + std::to_string(n >> 20) + " MiB for weights");
        const uintptr_t base = reinterpret_cast<uintptr_t>(m);
        const uintptr_t start = (base + kHuge - 1) / kHuge * kHuge;
        if (start > base) ::munmap(m, start - base);
        const uintptr_t end = start + n, map_end = base + span;
        const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
        const uintptr_t keep_end = (end + page - 1) / page * page;
        if (map_end > keep_end) ::munmap(reinterpret_cast<void*>(keep_end), map_end - keep_end);
        p_ = reinterpret_cast<uint8_t*>(start);
#ifdef MADV_HUGEPAGE
        ::madvise(p_, n, MADV_HUGEPAGE);  // best effort
#endif
        mapped_ = true;
    } else {
        p_ = new uint8_t[n > 0 ? n : 1]();
    }
}

Model::OwnedBuffer::OwnedBuffer(const uint8_t* begin, const uint8_t* end) : OwnedBuffer(static_cast<size_t>(end - begin)) {
    std::memcpy(p_, begin, n_);
}

Model::OwnedBuffer::~OwnedBuffer() {
    if (!p_) return;
    if (mapped_) {
        ::munmap(p_, n_);
    } else {
        delete[] p_;
    }
}

// Block-quantized matrices of the blocks that run on the CPU are regrouped once into 16-row panels
// (kernels.h) where the active kernel table has a panel kernel for their type (Q4_0, Q4_1, Q8_0 and NF4 on
// AVX2, AVX-512 and NEON with dotprod). Those kernels need about a quarter of the instructions per weight
// byte, so decode runs at memory speed and prompts skip the per-call repack. The panels are a private copy
// of the same bytes; the file pages they came from are released from this process (MADV_DONTNEED: RSS stays
// about the file size, and the mapping stays valid, so a kernel table without panel kernels can still read
// the original rows). LOWBIT_REPACK=0 turns it off.
void Model::repack_cpu_weights() {
    const char* env = std::getenv("LOWBIT_REPACK");
    if (env && std::string(env) == "0") return;
    const cpu::Kernels& kt = cpu::kernels();
    auto has_kernel = [&](QType t) { return qtype_index(t) >= 0 && kt.at(t).panel != nullptr; };
    const uint8_t* map_begin = reader_->base();
    const uint8_t* map_end = map_begin + reader_->file_size();
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    auto eligible = [&](const WeightView& w) {
        if (!w.data || w.panels || !has_kernel(w.type) || !cpu::panels_supported(w.type, w.n_out, w.n_in)) return false;
        // Only weights read from the file: a converted copy (NF4_DQ expanded, misaligned data) would have to
        // stay next to its panels (the row kernels are the fallback), doubling its memory.
        const size_t bytes = w.row_bytes * static_cast<size_t>(w.n_out);
        return w.data >= map_begin && w.data + bytes <= map_end;
    };
    // Every matrix to repack, in the order decode reads them, with whether its rows also serve the embedding.
    struct Todo {
        WeightView* w;
        bool shared_with_embedding;
        size_t panel_bytes;
    };
    std::vector<Todo> todo;
    auto add = [&](WeightView* w, bool shared) { todo.push_back({w, shared, cpu::panels_bytes(w->type, w->n_out, w->n_in)}); };
    for (int l = 0; l < gpu_begin_; ++l) {
        Layer& L = layers_[l];
        for (WeightView* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) {
            if (eligible(*w)) add(w, false);
        }
    }
    // The output head when the CPU computes it, tied or not. A tied head's panels serve embed() too where
    // its rows come back exactly (Q4_0, Q4_1, Q8_0); otherwise embed() keeps reading the file's rows.
    bool tied_from_panels = false;
    if (!gpu_output_ && eligible(output)) {
        const bool tied = output.data == token_embd.data;
        tied_from_panels = tied && cpu::panel_row_exact(output.type);
        add(&output, tied && !tied_from_panels);
    }
    if (todo.empty()) return;
    // One arena for all of them: a single huge-page-aligned mapping, each matrix on a cache line, so the whole
    // stream decode reads sits on 2 MiB pages (per-matrix mappings left the smaller matrices and the unaligned
    // ends of the larger ones on 4 KiB pages: about half the weights of a 1.1B model; decode +3-7%).
    constexpr size_t kAlign = 64;
    auto aligned = [&](size_t n) { return (n + kAlign - 1) / kAlign * kAlign; };
    size_t total = 0, weights = 0;
    for (const Todo& t : todo) {
        total += aligned(t.panel_bytes);
        weights += t.panel_bytes;
    }
    owned_.emplace_back(total);
    owned_padding_ = total - weights;
    uint8_t* dst = owned_.back().data();
    // Release the file's pages wholly inside [begin, end) from this process (best effort).
    auto release = [&](const uint8_t* begin, const uint8_t* end) {
        const uintptr_t b = (reinterpret_cast<uintptr_t>(begin) + page - 1) / page * page;
        const uintptr_t e = reinterpret_cast<uintptr_t>(end) / page * page;
        if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
    };
    for (const Todo& t : todo) {
        WeightView& w = *t.w;
        const size_t bytes = w.row_bytes * static_cast<size_t>(w.n_out);
        // In slices of ~8 MiB, each slice's file pages released as soon as it is copied: a large matrix (a
        // 100 MB output head) would otherwise be resident twice, file pages and panels, and set the peak RSS.
        const size_t panel_src = w.row_bytes * cpu::kPanelRows;
        const int64_t n_panels = w.n_out / cpu::kPanelRows;
        const int64_t slice = std::max<int64_t>(1, static_cast<int64_t>((size_t{8} << 20) / panel_src));
        for (int64_t s0 = 0; s0 < n_panels; s0 += slice) {
            const int64_t s1 = std::min(n_panels, s0 + slice);
            pool_->parallel_for(s1 - s0, 1, [&](int64_t p0, int64_t p1) {
                cpu::repack_panels(w.type, w.data, w.row_bytes, w.n_out, w.n_in, dst, s0 + p0, s0 + p1);
            });
            release(w.data + s0 * panel_src, w.data + s1 * panel_src);
        }
        w.panels = dst;
        dst += aligned(t.panel_bytes);
        // A tied head shares its rows with the token embedding, which embed() still reads (only the pages
        // of the rows it gathers come back), so those bytes stay counted as mapped.
        if (!t.shared_with_embedding) weights_mapped_ -= bytes;
        release(w.data, w.data + bytes);  // the pages that straddled two slices
    }
    embed_from_panels_ = tied_from_panels;
}

// ----------------------------------------------------------------------------------------------------
// layer offload. Placement follows llama.cpp's n_gpu_layers: the LAST N blocks go to the GPU (with their KV
// cache), and N > n_layer (or N < 0: everything) puts the output head there too; the token embedding always
// stays on the CPU. The hidden state crosses the bus once per direction per chunk.

#ifdef LOWBIT_HAVE_CUDA
struct Model::Gpu {
    std::unique_ptr<cuda::Backend> backend;
};

namespace {
cuda::Matrix to_matrix(const WeightView& w) {
    cuda::Matrix m;
    m.type = w.type;
    m.data = w.data;
    m.n_rows = w.n_out;
    m.n_cols = w.n_in;
    return m;
}

// Templated because Model::Layer is private to Model.
template <class LayerT>
cuda::LayerWeights layer_weights(const LayerT& L) {
    cuda::LayerWeights w;
    w.attn_norm = L.attn_norm;
    w.wq = to_matrix(L.wq);
    w.wk = to_matrix(L.wk);
    w.wv = to_matrix(L.wv);
    w.wo = to_matrix(L.wo);
    w.ffn_norm = L.ffn_norm;
    w.w_gate = to_matrix(L.w_gate);
    w.w_up = to_matrix(L.w_up);
    w.w_down = to_matrix(L.w_down);
    return w;
}

std::string mib(size_t bytes) { return std::to_string((bytes + (1u << 20) - 1) >> 20) + " MiB"; }

// Device memory the CUDA context, the allocator's rounding and cuBLAS-free workspaces may take beyond our
// own estimate; kept free so an estimate that just fits does not fail half-way through the uploads.
constexpr size_t kGpuReserveBytes = size_t(256) << 20;
}  // namespace

void Model::setup_gpu() {
    const ModelConfig& c = config_;
    const int n = params_.n_gpu_layers;
    const int n_blocks = n < 0 ? c.n_layer : std::min(n, c.n_layer);
    gpu_begin_ = c.n_layer - n_blocks;
    gpu_output_ = n < 0 || n > c.n_layer;
    if (n_blocks == 0 && !gpu_output_) return;
    if (has_rope_freq_factors_) {
        throw Error("this model has rope_freqs.weight (per-frequency RoPE factors), which the CUDA backend does not "
                    "support; pass n_gpu_layers=0");
    }
    cuda::BackendConfig bc;
    bc.n_embd = c.n_embd;
    bc.n_head = c.n_head;
    bc.n_head_kv = c.n_head_kv;
    bc.head_dim = c.head_dim;
    bc.n_ff = c.n_ff;
    bc.n_ctx = n_ctx_;
    bc.rms_eps = c.rms_eps;
    bc.rope_freq_base = c.rope_freq_base;
    bc.rope_freq_scale = c.rope_freq_scale;
    bc.rope_dim = c.n_rot;

    // Estimate before allocating anything: weights + KV cache (n_ctx) per block, the head, the scratch.
    std::string why;
    if (cuda::device_count(&why) == 0) {
        throw Error("CUDA backend: no usable GPU (" + why + "); run with n_gpu_layers=0 or check the NVIDIA driver");
    }
    const cuda::DeviceInfo dev = cuda::device_info(bc.device);
    std::vector<size_t> block_bytes(c.n_layer);  // (n_layer)
    for (int l = 0; l < c.n_layer; ++l) block_bytes[l] = cuda::estimate_layer_bytes(bc, layer_weights(layers_[l]));
    const size_t fixed = cuda::estimate_scratch_bytes(bc, params_.n_batch) + kGpuReserveBytes;
    const size_t head = gpu_output_ ? cuda::estimate_output_bytes(bc, to_matrix(output)) : 0;
    size_t need = fixed + head;
    for (int l = gpu_begin_; l < c.n_layer; ++l) need += block_bytes[l];
    if (need > dev.free_memory) {
        // Largest n_gpu_layers that fits: the last blocks first, as placement takes them, without the head.
        size_t acc = fixed;
        int fit = 0;
        for (int l = c.n_layer - 1; l >= 0 && acc + block_bytes[l] <= dev.free_memory; --l, ++fit) acc += block_bytes[l];
        throw Error("n_gpu_layers=" + std::to_string(n) + " needs about " + mib(need) + " on GPU " +
                    std::to_string(bc.device) + " (" + dev.name + ": " + mib(need - fixed - head) + " for " +
                    std::to_string(n_blocks) + " blocks with their KV cache of " + std::to_string(n_ctx_) +
                    " positions" + (gpu_output_ ? ", " + mib(head) + " for the output head" : std::string()) +
                    ", " + mib(fixed) + " scratch and reserve), but only " + mib(dev.free_memory) +
                    " are free; the largest that fits is n_gpu_layers=" + std::to_string(fit) +
                    " (or lower n_ctx to shrink the KV cache)");
    }

    gpu_ = std::make_unique<Gpu>();
    gpu_->backend = std::make_unique<cuda::Backend>(bc, params_.n_batch);
    for (int l = gpu_begin_; l < c.n_layer; ++l) gpu_->backend->add_layer(layer_weights(layers_[l]));
    if (gpu_output_) gpu_->backend->set_output(output_norm, to_matrix(output));
}

void Model::forward_layers_gpu(float* x, int n, int pos0) {
    if (gpu_ && gpu_begin_ < config_.n_layer) gpu_->backend->forward(0, config_.n_layer - gpu_begin_, x, n, pos0);
}

void Model::output_head_gpu(const float* x, int n, float* logits) { gpu_->backend->output(x, n, logits); }

void Model::truncate_gpu(int n_keep) {
    if (gpu_) gpu_->backend->truncate(n_keep);
}

uint64_t Model::gpu_bytes() const { return gpu_ ? gpu_->backend->device_bytes() : 0; }
#else
struct Model::Gpu {};
void Model::setup_gpu() { gpu_begin_ = config_.n_layer; }
void Model::forward_layers_gpu(float*, int, int) {}
void Model::output_head_gpu(const float*, int, float*) {}
void Model::truncate_gpu(int) {}
uint64_t Model::gpu_bytes() const { return 0; }
#endif

Model::~Model() = default;

// Every tensor's type, checked before anything is allocated: the first tensor of a type lowbit cannot run
// (IQ2_XXS, TQ1_0, MXFP4, ...) is named with its type and the list of types lowbit runs.
static void check_tensor_types(const GGUFReader& r) {
    for (const GGUFTensorInfo& t : r.tensors()) {
        const TypeTraits* tt = type_traits(t.type_id);
        const bool matrix_ok = tt && tt->supported && cpu::matmul_supported(static_cast<QType>(t.type_id));
        const bool nf4_dq = t.type_id == static_cast<uint32_t>(QType::NF4_DQ);  // expanded to NF4 at load
        if (matrix_ok || nf4_dq) continue;
        std::string runs;
#define LOWBIT_X(NAME, lc, id, bs, ts, kind) runs += std::string(runs.empty() ? "" : ", ") + #NAME;
        LOWBIT_QTYPES(LOWBIT_X)
#undef LOWBIT_X
        throw Error("tensor '" + t.name + "' has type " + type_name(t.type_id) +
                    ", which lowbit cannot run. lowbit runs " + runs +
                    ". Use a file of one of those types (for example the same model's Q4_K_M or Q8_0 GGUF), or "
                    "requantize an F16/F32 file with `lowbit quantize IN OUT q4_k_m`");
    }
}

void Model::load_tensors() {
    const GGUFReader& r = *reader_;
    ModelConfig& c = config_;
    check_tensor_types(r);

    auto find = [&](const std::string& name) -> const GGUFTensorInfo& {
        const GGUFTensorInfo* t = r.find_tensor(name);
        if (!t) throw Error("'" + r.path() + "' lacks the tensor '" + name + "'; the file is not a complete model");
        return *t;
    };
    // A matrix with ggml shape [n_in, n_out] that the matmul driver can multiply.
    auto matrix = [&](const GGUFTensorInfo& t, int64_t n_in, int64_t n_out) -> WeightView {
        if (t.n_dims != 2 || t.ne[0] != n_in || t.ne[1] != n_out) {
            throw Error("tensor '" + t.name + "' has shape " + shape_str(t) + ", expected [" + std::to_string(n_in) +
                        ", " + std::to_string(n_out) + "] for this model's hyper-parameters");
        }
        const TypeTraits* tt = type_traits(t.type_id);
        if (!tt || !tt->supported) {
            throw Error("tensor '" + t.name + "' has type " + type_name(t.type_id) + ", which lowbit cannot run");
        }
        WeightView w;
        w.n_in = n_in;
        w.n_out = n_out;
        const uint8_t* data = r.tensor_data(t);
        if (t.type_id == static_cast<uint32_t>(QType::NF4_DQ)) {
            // The kernels consume plain NF4 blocks: expand the double-quantized scales once, here.
            if (n_in % QK_NF4 != 0) {
                throw Error("tensor '" + t.name + "' is NF4_DQ with rows of " + std::to_string(n_in) +
                            " elements, not a multiple of 64");
            }
            owned_.emplace_back(static_cast<size_t>(n_in / QK_NF4 * n_out) * sizeof(block_nf4));
            nf4_dq_to_nf4(data, reinterpret_cast<block_nf4*>(owned_.back().data()), n_in * n_out);
            w.type = QType::NF4;
            w.data = owned_.back().data();
        } else if (reinterpret_cast<uintptr_t>(data) % kDataAlignment != 0) {
            // general.alignment below 4 put this tensor at an odd address: keep an aligned copy.
            owned_.emplace_back(data, data + t.nbytes);
            w.type = static_cast<QType>(t.type_id);
            w.data = owned_.back().data();
        } else {
            w.type = static_cast<QType>(t.type_id);
            w.data = data;
            weights_mapped_ += t.nbytes;
        }
        if (n_in % supported_traits(w.type).block_size != 0) {
            throw Error("tensor '" + t.name + "' rows of " + std::to_string(n_in) +
                        " elements are not a multiple of its type's block size");
        }
        if (!cpu::matmul_supported(w.type)) {
            throw Error("tensor '" + t.name + "' has type " + type_name(t.type_id) +
                        ", which the CPU matmul does not support; requantize the file");
        }
        w.row_bytes = row_size(w.type, n_in);
        return w;
    };
    // A 1-D fp32 vector of n elements (F16/BF16 files are converted once into owned storage).
    auto vector = [&](const GGUFTensorInfo& t, int64_t n) -> const float* {
        if (t.n_elements() != n || t.ne[0] != n) {
            throw Error("tensor '" + t.name + "' has shape " + shape_str(t) + ", expected [" + std::to_string(n) + "]");
        }
        // Always copied (a few KB each): reading them from the mapping would keep a page-cache folio of the
        // weights around them resident (up to 2 MB each with large folios) after those weights were repacked.
        QType type = static_cast<QType>(t.type_id);
        if (type != QType::F32 && type != QType::F16 && type != QType::BF16) {
            throw Error("tensor '" + t.name + "' has type " + type_name(t.type_id) + "; norm weights must be F32, F16 or BF16");
        }
        owned_.emplace_back(static_cast<size_t>(n) * sizeof(float));
        float* out = reinterpret_cast<float*>(owned_.back().data());
        dequantize_row(type, r.tensor_data(t), out, n);
        return out;
    };

    const GGUFTensorInfo& embd = find("token_embd.weight");
    if (embd.n_dims != 2 || embd.ne[0] != c.n_embd) {
        throw Error("tensor 'token_embd.weight' has shape " + shape_str(embd) + ", expected [" +
                    std::to_string(c.n_embd) + ", n_vocab]");
    }
    c.n_vocab = static_cast<int>(embd.ne[1]);
    token_embd = matrix(embd, c.n_embd, c.n_vocab);
    output_norm = vector(find("output_norm.weight"), c.n_embd);
    if (r.find_tensor("output.weight")) {
        output = matrix(find("output.weight"), c.n_embd, c.n_vocab);
    } else {
        c.tied_embeddings = true;
        output = token_embd;
    }

    const int64_t q_dim = static_cast<int64_t>(c.n_head) * c.head_dim;
    const int64_t kv_dim = static_cast<int64_t>(c.n_head_kv) * c.head_dim;
    layers_.resize(c.n_layer);
    for (int l = 0; l < c.n_layer; ++l) {
        const std::string p = "blk." + std::to_string(l) + ".";
        Layer& L = layers_[l];
        L.attn_norm = vector(find(p + "attn_norm.weight"), c.n_embd);
        L.wq = matrix(find(p + "attn_q.weight"), c.n_embd, q_dim);
        L.wk = matrix(find(p + "attn_k.weight"), c.n_embd, kv_dim);
        L.wv = matrix(find(p + "attn_v.weight"), c.n_embd, kv_dim);
        L.wo = matrix(find(p + "attn_output.weight"), q_dim, c.n_embd);
        L.ffn_norm = vector(find(p + "ffn_norm.weight"), c.n_embd);
        L.w_gate = matrix(find(p + "ffn_gate.weight"), c.n_embd, c.n_ff);
        L.w_up = matrix(find(p + "ffn_up.weight"), c.n_embd, c.n_ff);
        L.w_down = matrix(find(p + "ffn_down.weight"), c.n_ff, c.n_embd);
    }

    // RoPE frequencies, "normal" (interleaved) convention: pair j = (x[2j], x[2j+1]) turns by
    // pos * freq_scale * base^(-2j / n_rot) / factor[j]; rope_freqs.weight (optional) holds factor[j].
    const float* freq_factors = nullptr;
    if (const GGUFTensorInfo* rf = r.find_tensor("rope_freqs.weight")) {
        freq_factors = vector(*rf, c.n_rot / 2);
        has_rope_freq_factors_ = true;
    }
    rope_inv_freq_.resize(c.n_rot / 2);
    for (int j = 0; j < c.n_rot / 2; ++j) {
        double f = c.rope_freq_scale * std::pow(static_cast<double>(c.rope_freq_base), -2.0 * j / c.n_rot);
        if (freq_factors) f /= freq_factors[j];
        rope_inv_freq_[j] = static_cast<float>(f);
    }
}

void Model::allocate_state() {
    const ModelConfig& c = config_;
    const int64_t nb = params_.n_batch;
    const int64_t q_dim = static_cast<int64_t>(c.n_head) * c.head_dim;
    const int64_t kv_dim = static_cast<int64_t>(c.n_head_kv) * c.head_dim;

    kv_elem_bytes_ = params_.kv_f16 ? 2 : 4;
    const size_t kv_bytes = static_cast<size_t>(gpu_begin_) * n_ctx_ * kv_dim * kv_elem_bytes_;  // CPU blocks only
    k_cache_ = OwnedBuffer(kv_bytes, OwnedBuffer::kCache);
    v_cache_ = OwnedBuffer(kv_bytes, OwnedBuffer::kCache);
    tokens_.reserve(n_ctx_);

    x_.assign(nb * c.n_embd, 0.0f);
    xb_.assign(nb * c.n_embd, 0.0f);
    q_.assign(nb * q_dim, 0.0f);
    k_.assign(nb * kv_dim, 0.0f);
    v_.assign(nb * kv_dim, 0.0f);
    att_out_.assign(nb * q_dim, 0.0f);
    hb_.assign(nb * c.n_ff, 0.0f);
    hb2_.assign(nb * c.n_ff, 0.0f);
    // Per thread: the scores of one query token's heads that share a KV head, and a value row.
    att_.assign(static_cast<size_t>(pool_->size()) * (static_cast<size_t>(c.n_head / c.n_head_kv) * n_ctx_ + c.head_dim),
                0.0f);
    rope_cs_.assign(nb * c.n_rot, 0.0f);

    size_t act = cpu::act_scratch_bytes(output.type, c.n_embd, nb);
    for (const Layer& L : layers_) {
        for (const WeightView* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) {
            act = std::max(act, cpu::act_scratch_bytes(w->type, w->n_in, nb));
        }
    }
    act_scratch_.assign(act, 0);
}

MemoryFootprint Model::memory_footprint() const {
    MemoryFootprint f;
    f.weights_mapped = weights_mapped_;
    for (const auto& o : owned_) f.weights_owned += o.size();
    f.weights_owned -= owned_padding_;  // alignment gaps between repacked matrices (< 64 bytes each)
    f.kv_cpu = k_cache_.size() + v_cache_.size();
    size_t floats = x_.size() + xb_.size() + q_.size() + k_.size() + v_.size() + att_out_.size() + hb_.size() +
                    hb2_.size() + att_.size() + rope_cs_.size();
    f.scratch_cpu = floats * sizeof(float) + act_scratch_.size();
    // The backend reports one total; split it with the same per-part sizes it allocates.
    const uint64_t gpu_total = gpu_bytes();
    if (gpu_total > 0) {
        const int64_t kv_dim = static_cast<int64_t>(config_.n_head_kv) * config_.head_dim;
        f.kv_gpu = static_cast<uint64_t>(config_.n_layer - gpu_begin_) * 2 * n_ctx_ * kv_dim * 2;  // fp16 K and V
        for (int l = gpu_begin_; l < config_.n_layer; ++l) {
            const Layer& L = layers_[l];
            for (const WeightView* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) {
                f.weights_gpu += w->n_out * w->row_bytes;
            }
        }
        if (gpu_output_) f.weights_gpu += output.n_out * output.row_bytes;
        f.scratch_gpu = gpu_total > f.kv_gpu + f.weights_gpu ? gpu_total - f.kv_gpu - f.weights_gpu : 0;
    }
    return f;
}

// ----------------------------------------------------------------------------------------------------
// the cache interface

void Model::truncate(int n_keep) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (n_keep < 0 || n_keep > n_past()) {
        throw Error("truncate(" + std::to_string(n_keep) + "): n_keep must be between 0 and n_past (" +
                    std::to_string(n_past()) + ")");
    }
    truncate_gpu(n_keep);
    tokens_.resize(n_keep);  // entries past n_keep are simply overwritten by later evals
}

void Model::eval(const int32_t* tokens, int n, float* logits, bool all_logits) {
    std::lock_guard<std::mutex> lock(mutex_);
    // Every check comes before any state changes, so a failed call leaves the model as it was.
    if (n <= 0 || tokens == nullptr) throw Error("eval needs at least one token");
    if (logits == nullptr) throw Error("eval needs an output buffer for the logits");
    for (int i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= config_.n_vocab) {
            throw Error("token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                        " is out of range for a vocabulary of " + std::to_string(config_.n_vocab));
        }
    }
    if (static_cast<int64_t>(n_past()) + n > n_ctx_) {
        throw Error("the context is full: " + std::to_string(n_past()) + " cached + " + std::to_string(n) +
                    " new tokens > n_ctx " + std::to_string(n_ctx_) +
                    "; reset the model, shorten the prompt, or load with a larger n_ctx");
    }
    if (reader_->file_changed_on_disk()) {
        throw Error("'" + reader_->path() + "' was replaced or truncated on disk after it was loaded; load it again");
    }

    const int n_vocab = config_.n_vocab;
    for (int done = 0; done < n;) {
        const int nc = std::min(params_.n_batch, n - done);
        const int pos0 = n_past();
        embed(tokens + done, nc, x_.data());
        forward_layers_cpu(0, gpu_begin_, x_.data(), nc, pos0);
        forward_layers_gpu(x_.data(), nc, pos0);
        auto head = [&](const float* x, int rows, float* out) {
            if (gpu_output_) output_head_gpu(x, rows, out);
            else output_head(x, rows, out);
        };
        if (all_logits) {
            head(x_.data(), nc, logits + static_cast<int64_t>(done) * n_vocab);
        } else if (done + nc == n) {
            head(x_.data() + static_cast<int64_t>(nc - 1) * config_.n_embd, 1, logits);
        }
        // Only now is the chunk part of the cache.
        tokens_.insert(tokens_.end(), tokens + done, tokens + done + nc);
        done += nc;
    }
}

// ----------------------------------------------------------------------------------------------------
// the forward pass

// x (n, n_embd) = rows of token_embd.
void Model::embed(const int32_t* tokens, int n, float* x) {
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
        dequantize_row(token_embd.type, row, x + static_cast<int64_t>(i) * config_.n_embd, config_.n_embd);
    }
}

// Rotate the first n_rot dims of every head of vec (n, n_heads * head_dim) by its position.
void Model::apply_rope(float* vec, int n_heads, int n, int pos0) {
    const ModelConfig& c = config_;
    for (int i = 0; i < n; ++i) {
        const float* cs = rope_cs_.data() + static_cast<int64_t>(i) * c.n_rot;
        for (int h = 0; h < n_heads; ++h) {
            float* v = vec + (static_cast<int64_t>(i) * n_heads + h) * c.head_dim;
            for (int j = 0; j < c.n_rot / 2; ++j) {
                const float x0 = v[2 * j], x1 = v[2 * j + 1];
                const float cos_t = cs[2 * j], sin_t = cs[2 * j + 1];
                v[2 * j] = x0 * cos_t - x1 * sin_t;
                v[2 * j + 1] = x0 * sin_t + x1 * cos_t;
            }
        }
    }
}

// Causal grouped-query attention for the chunk's n tokens (queries q_, keys and values already in the
// cache at positions 0 .. pos0+n-1) into att_out_ (n, n_head * head_dim).
void Model::attention(int layer, int n, int pos0) {
    const ModelConfig& c = config_;
    const cpu::Kernels& kr = cpu::kernels();
    const int hd = c.head_dim;
    const int64_t q_dim = static_cast<int64_t>(c.n_head) * hd;
    const int64_t kv_dim = static_cast<int64_t>(c.n_head_kv) * hd;
    const int group = c.n_head / c.n_head_kv;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const size_t row_bytes = kv_dim * kv_elem_bytes_;
    const uint8_t* kc = k_cache_.data() + static_cast<size_t>(layer) * n_ctx_ * row_bytes;
    const uint8_t* vc = v_cache_.data() + static_cast<size_t>(layer) * n_ctx_ * row_bytes;
    const bool f16 = params_.kv_f16;
    // One item = one query token x one KV head: the `group` query heads that share those keys and values
    // are scored together (dot tiles of up to 4 keys x 4 heads), so each key and value row is read once per
    // group instead of once per head.
    const int64_t n_items = static_cast<int64_t>(n) * c.n_head_kv;
    const cpu::DotTileFn score_tile = kr.at(f16 ? QType::F16 : QType::F32).dot;

    pool_->run([&](int ith, int nth) {
        float* scores = att_.data() + static_cast<size_t>(ith) * (static_cast<size_t>(group) * n_ctx_ + hd);
        float* vrow = scores + static_cast<size_t>(group) * n_ctx_;  // (head_dim)
        // Items interleave over the threads: with a causal mask later tokens cost more, so contiguous
        // ranges would leave the last thread with most of the work.
        for (int64_t item = ith; item < n_items; item += nth) {
            const int i = static_cast<int>(item / c.n_head_kv), g = static_cast<int>(item % c.n_head_kv);
            const int n_kv = pos0 + i + 1;  // causal: this token sees positions 0 .. pos0+i
            const size_t off = static_cast<size_t>(g) * hd * kv_elem_bytes_;
            const float* q = q_.data() + i * q_dim + static_cast<int64_t>(g) * group * hd;  // (group, hd)

            // scores[c * n_ctx + t] = q_c . k_t
            for (int t = 0; t < n_kv; t += cpu::kTileRows) {
                const int rows = std::min(cpu::kTileRows, n_kv - t);
                for (int c0 = 0; c0 < group; c0 += cpu::kTileCols) {
                    const int cols = std::min(cpu::kTileCols, group - c0);
                    score_tile(hd, kc + t * row_bytes + off, row_bytes, rows, q + static_cast<int64_t>(c0) * hd,
                               static_cast<size_t>(hd) * sizeof(float), cols,
                               scores + static_cast<size_t>(c0) * n_ctx_ + t, static_cast<size_t>(n_ctx_));
                }
            }
            float inv_sum[64];  // group <= 64 (checked at load)
            for (int cg = 0; cg < group; ++cg) {
                float* sc = scores + static_cast<size_t>(cg) * n_ctx_;
                float max_score = -INFINITY;
                for (int t = 0; t < n_kv; ++t) {
                    sc[t] *= scale;
                    max_score = std::max(max_score, sc[t]);
                }
                float sum = 0.0f;
                if (kr.exp_sub_sum) {
                    sum = kr.exp_sub_sum(sc, n_kv, max_score);
                } else {
                    for (int t = 0; t < n_kv; ++t) {
                        sc[t] = std::exp(sc[t] - max_score);
                        sum += sc[t];
                    }
                }
                inv_sum[cg] = 1.0f / sum;
                float* out = att_out_.data() + i * q_dim + static_cast<int64_t>(g * group + cg) * hd;
                std::fill(out, out + hd, 0.0f);
            }
            float* out0 = att_out_.data() + i * q_dim + static_cast<int64_t>(g) * group * hd;
            for (int t = 0; t < n_kv; ++t) {
                const uint8_t* vsrc = vc + t * row_bytes + off;
                const float* v = reinterpret_cast<const float*>(vsrc);
                if (f16 && !kr.axpy_f16) {
                    dequantize_row(QType::F16, vsrc, vrow, hd);
                    v = vrow;
                }
                for (int cg = 0; cg < group; ++cg) {
                    const float p = scores[static_cast<size_t>(cg) * n_ctx_ + t] * inv_sum[cg];
                    float* out = out0 + static_cast<int64_t>(cg) * hd;
                    if (f16 && kr.axpy_f16) {  // the cache rows are 2-byte aligned (owned, even offsets)
                        kr.axpy_f16(out, p, reinterpret_cast<const uint16_t*>(vsrc), hd);
                    } else {
                        kr.axpy_f32(out, p, v, hd);
                    }
                }
            }
        }
    });
}

// The transformer blocks [layer_begin, layer_end) on the CPU: x (n, n_embd) in, x out.
void Model::forward_layers_cpu(int layer_begin, int layer_end, float* x, int n, int pos0) {
    const ModelConfig& c = config_;
    const cpu::Kernels& kr = cpu::kernels();
    ThreadPool& pool = *pool_;
    void* scratch = act_scratch_.data();
    const int64_t kv_dim = static_cast<int64_t>(c.n_head_kv) * c.head_dim;
    auto mm = [&](const WeightView& w, const float* in, float* out) {
        if (w.panels && cpu::matmul_panels(w.type, w.panels, w.n_out, w.n_in, in, n, out, scratch, pool)) return;
        cpu::matmul(w.type, w.data, w.row_bytes, w.n_out, w.n_in, in, n, out, scratch, pool);
    };
    // Matrices sharing one input in one pool job (false: not all of them have panels; use mm()).
    auto mm_group = [&](std::initializer_list<std::pair<const WeightView*, float*>> ws, const float* in) {
        cpu::PanelJob jobs[cpu::kMaxPanelJobs];
        int nj = 0;
        for (const auto& [w, out] : ws) {
            if (!w->panels || w->n_in != ws.begin()->first->n_in) return false;
            jobs[nj++] = {w->type, w->panels, w->n_out, out};
        }
        return cpu::matmul_panels_group(jobs, nj, ws.begin()->first->n_in, in, n, scratch, pool);
    };

    // cos/sin of every position of the chunk, shared by all heads and layers: (n, n_rot/2 pairs). Angles are
    // formed in double: transformers builds them in fp32 and llama.cpp by repeated fp32 multiplication, so
    // neither is bit-exact to follow; double keeps us within fp32 rounding of both (HF's
    // LlamaRotaryEmbedding; ggml rope "normal" mode, reference gguf-and-quants.md section 1.6).
    for (int i = 0; i < n; ++i) {
        float* cs = rope_cs_.data() + static_cast<int64_t>(i) * c.n_rot;
        for (int j = 0; j < c.n_rot / 2; ++j) {
            const double theta = static_cast<double>(pos0 + i) * rope_inv_freq_[j];
            cs[2 * j] = static_cast<float>(std::cos(theta));
            cs[2 * j + 1] = static_cast<float>(std::sin(theta));
        }
    }

    for (int l = layer_begin; l < layer_end; ++l) {
        const Layer& L = layers_[l];

        // attention: xb = rmsnorm(x); q, k, v = xb @ Wq, Wk, Wv; rope(q, k); cache k, v; x += attn @ Wo
        for (int i = 0; i < n; ++i) {
            kr.rmsnorm(xb_.data() + i * c.n_embd, x + i * c.n_embd, L.attn_norm, c.n_embd, c.rms_eps);
        }
        if (!mm_group({{&L.wq, q_.data()}, {&L.wk, k_.data()}, {&L.wv, v_.data()}}, xb_.data())) {
            mm(L.wq, xb_.data(), q_.data());
            mm(L.wk, xb_.data(), k_.data());
            mm(L.wv, xb_.data(), v_.data());
        }
        apply_rope(q_.data(), c.n_head, n, pos0);
        apply_rope(k_.data(), c.n_head_kv, n, pos0);

        const size_t row_bytes = kv_dim * kv_elem_bytes_;
        uint8_t* kc = k_cache_.data() + (static_cast<size_t>(l) * n_ctx_ + pos0) * row_bytes;
        uint8_t* vc = v_cache_.data() + (static_cast<size_t>(l) * n_ctx_ + pos0) * row_bytes;
        if (params_.kv_f16) {
            uint16_t* kh = reinterpret_cast<uint16_t*>(kc);
            uint16_t* vh = reinterpret_cast<uint16_t*>(vc);
            for (int64_t e = 0; e < n * kv_dim; ++e) {
                kh[e] = fp32_to_fp16(k_[e]);
                vh[e] = fp32_to_fp16(v_[e]);
            }
        } else {
            std::memcpy(kc, k_.data(), n * row_bytes);
            std::memcpy(vc, v_.data(), n * row_bytes);
        }

        attention(l, n, pos0);
        mm(L.wo, att_out_.data(), xb_.data());
        for (int64_t e = 0; e < n * c.n_embd; ++e) x[e] += xb_[e];

        // feed-forward (SwiGLU): x += (silu(xb @ Wgate) * (xb @ Wup)) @ Wdown, xb = rmsnorm(x)
        for (int i = 0; i < n; ++i) {
            kr.rmsnorm(xb_.data() + i * c.n_embd, x + i * c.n_embd, L.ffn_norm, c.n_embd, c.rms_eps);
        }
        if (!mm_group({{&L.w_gate, hb_.data()}, {&L.w_up, hb2_.data()}}, xb_.data())) {
            mm(L.w_gate, xb_.data(), hb_.data());
            mm(L.w_up, xb_.data(), hb2_.data());
        }
        kr.silu_mul(hb_.data(), hb_.data(), hb2_.data(), static_cast<int64_t>(n) * c.n_ff);
        mm(L.w_down, hb_.data(), xb_.data());
        for (int64_t e = 0; e < n * c.n_embd; ++e) x[e] += xb_[e];
    }
}

// logits (n, n_vocab) = rmsnorm(x) @ output^T for the n rows of x.
void Model::output_head(const float* x, int n, float* logits) {
    const ModelConfig& c = config_;
    const cpu::Kernels& kr = cpu::kernels();
    for (int i = 0; i < n; ++i) {
        kr.rmsnorm(xb_.data() + i * c.n_embd, x + i * c.n_embd, output_norm, c.n_embd, c.rms_eps);
    }
    if (output.panels && cpu::matmul_panels(output.type, output.panels, output.n_out, output.n_in, xb_.data(), n,
                                            logits, act_scratch_.data(), *pool_)) {
        return;
    }
    cpu::matmul(output.type, output.data, output.row_bytes, output.n_out, output.n_in, xb_.data(), n, logits,
                act_scratch_.data(), *pool_);
}

}  // namespace lowbit
