// Where a model's bytes live: owned buffers and the huge-page arena, load-time repacking into panels with the
// file pages released, and the CUDA placement of the last blocks.
#include "weights.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include <sys/mman.h>
#include <unistd.h>

#include "lowbit/cuda.h"
#include "lowbit/kernels.h"

namespace lowbit {

std::string type_name(uint32_t id) {
    const TypeTraits* tt = type_traits(id);
    return tt ? std::string(tt->name) : "unknown type id " + std::to_string(id);
}

std::string shape_str(const GGUFTensorInfo& t) {
    std::string s = "[";
    for (int i = 0; i < t.n_dims; ++i) s += (i ? ", " : "") + std::to_string(t.ne[i]);
    return s + "]";
}

void row_to_f32(QType t, const uint8_t* row, float* out, int64_t n) {
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
// owned storage

OwnedBuffer::OwnedBuffer(size_t n, Kind kind) : n_(n) {
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

OwnedBuffer::OwnedBuffer(const uint8_t* begin, const uint8_t* end) : OwnedBuffer(static_cast<size_t>(end - begin)) {
    std::memcpy(p_, begin, n_);
}

OwnedBuffer::~OwnedBuffer() {
    if (!p_) return;
    if (mapped_) {
        ::munmap(p_, n_);
    } else {
        delete[] p_;
    }
}

// ----------------------------------------------------------------------------------------------------
// the weights of a file

WeightView WeightStore::matrix(const GGUFTensorInfo& t, int64_t n_in, int64_t n_out) {
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
    const uint8_t* data = reader_.tensor_data(t);
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
        mapped_ += t.nbytes;
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
}

const float* WeightStore::vector(const GGUFTensorInfo& t, int64_t n) {
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
    row_to_f32(type, reader_.tensor_data(t), out, n);
    return out;
}

uint64_t WeightStore::owned_bytes() const {
    uint64_t n = 0;
    for (const auto& o : owned_) n += o.size();
    return n - padding_;  // alignment gaps between repacked matrices (< 64 bytes each)
}

// Block-quantized matrices of the blocks that run on the CPU are regrouped once into 16-row panels
// (kernels.h) where the active kernel table has a panel kernel for their type (Q4_0, Q4_1, Q8_0 and NF4 on
// AVX2, AVX-512 and NEON with dotprod; Q5_0, Q4_K, Q5_K and Q6_K on AVX2 and AVX-512). Those kernels need about a quarter of the instructions per weight
// byte, so decode runs at memory speed and prompts skip the per-call repack. The panels are a private copy
// of the same bytes; the file pages they came from are released from this process (MADV_DONTNEED: RSS stays
// about the file size, and the mapping stays valid, so a kernel table without panel kernels can still read
// the original rows). LOWBIT_REPACK=0 turns it off.
bool WeightStore::repack_for_cpu(const std::vector<WeightView*>& matrices, WeightView* head,
                                 const WeightView& token_embd, ThreadPool& pool) {
    const char* env = std::getenv("LOWBIT_REPACK");
    if (env && std::string(env) == "0") return false;
    const cpu::Kernels& kt = cpu::kernels();
    auto has_kernel = [&](QType t) { return qtype_index(t) >= 0 && kt.at(t).panel != nullptr; };
    const uint8_t* map_begin = reader_.base();
    const uint8_t* map_end = map_begin + reader_.file_size();
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
    for (WeightView* w : matrices) {
        if (eligible(*w)) add(w, false);
    }
    // The output head when the CPU computes it, tied or not. A tied head's panels serve embed() too where
    // its rows come back exactly (panel_row_exact: every panel type but NF4); otherwise embed() keeps reading the
    // file's rows.
    bool tied_from_panels = false;
    if (head && eligible(*head)) {
        const bool tied = head->data == token_embd.data;
        tied_from_panels = tied && cpu::panel_row_exact(head->type);
        add(head, tied && !tied_from_panels);
    }
    if (todo.empty()) return false;
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
    padding_ = total - weights;
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
            pool.parallel_for(s1 - s0, 1, [&](int64_t p0, int64_t p1) {
                cpu::repack_panels(w.type, w.data, w.row_bytes, w.n_out, w.n_in, dst, s0 + p0, s0 + p1);
            });
            release(w.data + s0 * panel_src, w.data + s1 * panel_src);
        }
        w.panels = dst;
        dst += aligned(t.panel_bytes);
        // A tied head shares its rows with the token embedding, which embed() still reads (only the pages
        // of the rows it gathers come back), so those bytes stay counted as mapped.
        if (!t.shared_with_embedding) mapped_ -= bytes;
        release(w.data, w.data + bytes);  // the pages that straddled two slices
    }
    return tied_from_panels;
}

// ----------------------------------------------------------------------------------------------------
// the blocks on the GPU. The hidden state crosses the bus once per direction per chunk.

#ifdef LOWBIT_HAVE_CUDA
struct GpuLayers::Impl {
    std::unique_ptr<cuda::Backend> backend;
    int n_blocks = 0;
    bool head = false;
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

// The block's weights as the backend takes them; what the architecture lacks stays null on both sides.
cuda::LayerWeights layer_weights(const Layer& L) {
    cuda::LayerWeights w;
    w.attn_norm = L.attn_norm;
    w.wq = to_matrix(L.wq);
    w.wk = to_matrix(L.wk);
    w.wv = to_matrix(L.wv);
    w.bq = L.bq;
    w.bk = L.bk;
    w.bv = L.bv;
    w.q_norm = L.q_norm;
    w.k_norm = L.k_norm;
    w.wo = to_matrix(L.wo);
    w.attn_post_norm = L.attn_post_norm;
    w.ffn_norm = L.ffn_norm;
    w.w_gate = to_matrix(L.w_gate);
    w.w_up = to_matrix(L.w_up);
    w.w_down = to_matrix(L.w_down);
    w.ffn_post_norm = L.ffn_post_norm;
    return w;
}

std::string mib(size_t bytes) { return std::to_string((bytes + (1u << 20) - 1) >> 20) + " MiB"; }

// Device memory the CUDA context, the allocator's rounding and cuBLAS-free workspaces may take beyond our
// own estimate; kept free so an estimate that just fits does not fail half-way through the uploads.
constexpr size_t kGpuReserveBytes = size_t(256) << 20;

[[noreturn]] void refuse(const ModelConfig& c, const std::string& need) {
    throw Error("the CUDA backend does not run " + c.architecture + " blocks yet (they need " + need +
                "); pass n_gpu_layers=0");
}

// The backend's block (cuda/backend.cu run_layer) is the CPU's run_layer_cpu op for op; these map the row's
// choices to its kernels. The switches name every value, so a new one added to ArchSpec is a compiler
// warning here and a clear refusal at load until the backend has a kernel for it.
cuda::RopeMode rope_mode(const ModelConfig& c) {
    switch (c.arch.rope) {
        case RopeStyle::kInterleaved:
            return cuda::RopeMode::Normal;
        case RopeStyle::kNeox:
            return cuda::RopeMode::Neox;
    }
    refuse(c, "RoPE style " + std::to_string(static_cast<int>(c.arch.rope)));
}

cuda::GatedAct gated_act(const ModelConfig& c) {
    switch (c.arch.act) {
        case Activation::kSilu:
            return cuda::GatedAct::Silu;
        case Activation::kGeluTanh:
            return cuda::GatedAct::GeluTanh;
    }
    refuse(c, "activation " + std::to_string(static_cast<int>(c.arch.act)));
}

// What else the model asks of a GPU block, refused before anything is allocated. Biases, head norms and
// post-norms come with the Layer (null where absent), sliding windows with Layer::window and Layer::rope, the
// embedding scale stays on the CPU with the embedding.
void check_cuda_block(const ModelConfig& c) {
    bool known_norm = false;
    switch (c.arch.norm) {
        case NormPlacement::kPre:
        case NormPlacement::kSandwich:  // the post-norms come with the Layer
            known_norm = true;
            break;
    }
    if (!known_norm) refuse(c, "norm placement " + std::to_string(static_cast<int>(c.arch.norm)));
    if (c.head_dim > 256) {
        refuse(c, "a head size of " + std::to_string(c.head_dim) + "; the GPU attention takes at most 256");
    }
    rope_mode(c);
    gated_act(c);
}
}  // namespace

std::unique_ptr<GpuLayers> GpuLayers::place(const ModelConfig& c, const ModelParams& params, int n_ctx,
                                            const std::vector<float> (&rope_inv_freq)[2],
                                            const float (&rope_mscale)[2], std::vector<Layer>& layers,
                                            const float* output_norm, const WeightView& output, bool* head_on_gpu) {
    *head_on_gpu = false;
    const int n = params.n_gpu_layers;
    const int n_blocks = n < 0 ? c.n_layer : std::min(n, c.n_layer);
    const int gpu_begin = c.n_layer - n_blocks;
    const bool head = n < 0 || n > c.n_layer;
    if (n_blocks == 0 && !head) return nullptr;
    check_cuda_block(c);
    cuda::BackendConfig bc;
    bc.n_embd = c.n_embd;
    bc.n_head = c.n_head;
    bc.n_head_kv = c.n_head_kv;
    bc.head_dim = c.head_dim;
    bc.n_ff = c.n_ff;
    bc.n_ctx = n_ctx;
    bc.rms_eps = c.rms_eps;
    bc.attn_scale = c.attn_scale;
    bc.rope_mode = rope_mode(c);
    bc.rope_dim = c.n_rot;
    for (int table = 0; table < 2; ++table) {
        bc.rope_inv_freq[table] = rope_inv_freq[table];
        bc.rope_mscale[table] = rope_mscale[table];
    }
    bc.rope_freq_base = c.rope_freq_base;
    bc.rope_freq_scale = c.rope_freq_scale;
    bc.act = gated_act(c);
    bc.logit_softcap = c.logit_softcap;

    // Estimate before allocating anything: weights + KV cache (n_ctx, sliding blocks too) per block, the
    // head, the scratch.
    std::string why;
    if (cuda::device_count(&why) == 0) {
        throw Error("CUDA backend: no usable GPU (" + why + "); run with n_gpu_layers=0 or check the NVIDIA driver");
    }
    const cuda::DeviceInfo dev = cuda::device_info(bc.device);
    std::vector<size_t> block_bytes(c.n_layer);  // (n_layer)
    for (int l = 0; l < c.n_layer; ++l) block_bytes[l] = cuda::estimate_layer_bytes(bc, layer_weights(layers[l]));
    const size_t fixed = cuda::estimate_scratch_bytes(bc, params.n_batch) + kGpuReserveBytes;
    const size_t head_bytes = head ? cuda::estimate_output_bytes(bc, to_matrix(output)) : 0;
    size_t need = fixed + head_bytes;
    for (int l = gpu_begin; l < c.n_layer; ++l) need += block_bytes[l];
    if (need > dev.free_memory) {
        // Largest n_gpu_layers that fits: the last blocks first, as placement takes them, without the head.
        size_t acc = fixed;
        int fit = 0;
        for (int l = c.n_layer - 1; l >= 0 && acc + block_bytes[l] <= dev.free_memory; --l, ++fit) acc += block_bytes[l];
        throw Error("n_gpu_layers=" + std::to_string(n) + " needs about " + mib(need) + " on GPU " +
                    std::to_string(bc.device) + " (" + dev.name + ": " + mib(need - fixed - head_bytes) + " for " +
                    std::to_string(n_blocks) + " blocks with their KV cache of " + std::to_string(n_ctx) +
                    " positions" + (head ? ", " + mib(head_bytes) + " for the output head" : std::string()) +
                    ", " + mib(fixed) + " scratch and reserve), but only " + mib(dev.free_memory) +
                    " are free; the largest that fits is n_gpu_layers=" + std::to_string(fit) +
                    " (or lower n_ctx to shrink the KV cache)");
    }

    std::unique_ptr<GpuLayers> g(new GpuLayers());
    g->impl_ = std::make_unique<Impl>();
    g->impl_->backend = std::make_unique<cuda::Backend>(bc, params.n_batch);
    g->impl_->n_blocks = n_blocks;
    for (int l = gpu_begin; l < c.n_layer; ++l) {
        Layer& L = layers[l];
        L.backend = Backend::kCuda;
        L.slot = g->impl_->backend->add_layer(layer_weights(L), L.window, L.rope);
    }
    if (head) g->impl_->backend->set_output(output_norm, to_matrix(output));
    g->impl_->head = head;
    *head_on_gpu = head;
    return g;
}

void GpuLayers::forward(int first, int last, float* x, int n, int pos0) { impl_->backend->forward(first, last, x, n, pos0); }
void GpuLayers::output(const float* x, int n, float* logits) { impl_->backend->output(x, n, logits); }
void GpuLayers::truncate(int n_keep) { impl_->backend->truncate(n_keep); }

void GpuLayers::footprint(const std::vector<Layer>& layers, const WeightView& output, int n_ctx, int64_t kv_dim,
                          MemoryFootprint* f) const {
    // The backend reports one total; split it with the same per-part sizes it allocates.
    const uint64_t total = impl_->backend->device_bytes();
    f->kv_gpu = static_cast<uint64_t>(impl_->n_blocks) * 2 * n_ctx * kv_dim * 2;  // fp16 K and V
    for (const Layer& L : layers) {
        if (L.backend != Backend::kCuda) continue;
        for (const WeightView* w : L.matrices()) f->weights_gpu += w->n_out * w->row_bytes;
    }
    if (impl_->head) f->weights_gpu += output.n_out * output.row_bytes;
    f->scratch_gpu = total > f->kv_gpu + f->weights_gpu ? total - f->kv_gpu - f->weights_gpu : 0;
}
#else
struct GpuLayers::Impl {};
std::unique_ptr<GpuLayers> GpuLayers::place(const ModelConfig&, const ModelParams&, int,
                                            const std::vector<float> (&)[2], const float (&)[2], std::vector<Layer>&,
                                            const float*, const WeightView&, bool* head_on_gpu) {
    *head_on_gpu = false;  // Model::load rejects n_gpu_layers != 0 in builds without CUDA
    return nullptr;
}
void GpuLayers::forward(int, int, float*, int, int) {}
void GpuLayers::output(const float*, int, float*) {}
void GpuLayers::truncate(int) {}
void GpuLayers::footprint(const std::vector<Layer>&, const WeightView&, int, int64_t, MemoryFootprint*) const {}
#endif

GpuLayers::~GpuLayers() = default;

}  // namespace lowbit
