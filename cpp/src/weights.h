// Private to the core: where a model's bytes live (file mapping, owned copies, the repacked arena, the KV
// cache) and which blocks the CUDA backend holds. The forward pass (model.cpp) only reads the views.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lowbit/gguf.h"
#include "lowbit/model.h"
#include "lowbit/threads.h"
#include "lowbit/types.h"

namespace lowbit {

// A tensor type's name ("Q4_K"), or "unknown type id N"; a tensor's shape as "[ne0, ne1]".
std::string type_name(uint32_t id);
std::string shape_str(const GGUFTensorInfo& t);
// Dequantize one row of n elements of any supported type into out (n floats); rows may be unaligned.
void row_to_f32(QType t, const uint8_t* row, float* out, int64_t n);

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

// The weights of one file: views into its mapping where the bytes can be used in place, owned copies where
// they cannot (NF4_DQ expanded to NF4, misaligned tensors, norm vectors), and the arena of repacked panels.
class WeightStore {
public:
    explicit WeightStore(const GGUFReader& reader) : reader_(reader) {}

    // A matrix with ggml shape [n_in, n_out] that the matmul driver can multiply; throws on a wrong shape/type.
    WeightView matrix(const GGUFTensorInfo& t, int64_t n_in, int64_t n_out);
    // A 1-D vector of n elements as fp32 (always an owned copy).
    const float* vector(const GGUFTensorInfo& t, int64_t n);

    // Regroup the CPU blocks' matrices (and the head when the CPU computes it) into 16-row panels where the
    // kernel table has a panel kernel for their type, releasing the file pages they came from. Returns
    // whether embed() can read token_embd's rows back from head->panels (a tied head, exact rows).
    bool repack_for_cpu(const std::vector<WeightView*>& matrices, WeightView* head, const WeightView& token_embd,
                        ThreadPool& pool);

    uint64_t mapped_bytes() const { return mapped_; }
    uint64_t owned_bytes() const;

private:
    const GGUFReader& reader_;
    std::vector<OwnedBuffer> owned_;
    size_t padding_ = 0;     // bytes of owned_ between repacked matrices (alignment), not weights
    uint64_t mapped_ = 0;    // tensor bytes used in place from the mapping
};

// The blocks the CUDA backend holds. Placement follows llama.cpp's n_gpu_layers: the LAST N blocks (with
// their KV cache), and N > n_layer (or N < 0: everything) the output head too; the token embedding always
// stays on the CPU.
class GpuLayers {
public:
    // Null when n_gpu_layers is 0. Otherwise uploads the chosen blocks, sets their backend and slot, and
    // the head when *head_on_gpu comes back true; throws when a block needs what the backend lacks or the
    // GPU has too little memory. rope_inv_freq, rope_mscale: the model's two RoPE tables and their cos/sin
    // magnitudes (Model::rope_inv_freq_, rope_mscale_: global blocks, sliding-window blocks; (n_rot / 2)
    // frequencies each, the second table empty without sliding blocks).
    static std::unique_ptr<GpuLayers> place(const ModelConfig& c, const ModelParams& params, int n_ctx,
                                            const std::vector<float> (&rope_inv_freq)[2],
                                            const float (&rope_mscale)[2], std::vector<Layer>& layers,
                                            const float* output_norm, const WeightView& output, bool* head_on_gpu);
    ~GpuLayers();
    // Blocks with GPU slots [first, last) on host x (n, n_embd), in place.
    void forward(int first, int last, float* x, int n, int pos0);
    void output(const float* x, int n, float* logits);
    void truncate(int n_keep);
    // The device bytes, split as the backend allocates them: weights, fp16 KV cache, scratch.
    void footprint(const std::vector<Layer>& layers, const WeightView& output, int n_ctx, int64_t kv_dim,
                   MemoryFootprint* f) const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace lowbit
