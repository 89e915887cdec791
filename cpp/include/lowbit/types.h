// Tensor types: ids, the traits table, fp16/bf16 conversion and the row quantize/dequantize entry points.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "lowbit/blocks.h"
#include "lowbit/qtypes.def"

namespace lowbit {

// Every lowbit failure is one of these; the bindings turn it into lowbit.LowbitError.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// Type ids are ggml's where ggml has the type; private ids start at 1024 so llama.cpp refuses them.
// Ids are never reused. The rows are in lowbit/qtypes.def.
enum class QType : uint32_t {
#define LOWBIT_X(NAME, lc, id, bs, ts, kind) NAME = id,
    LOWBIT_QTYPES(LOWBIT_X)
#undef LOWBIT_X
};

// Dense index 0..kNumQTypes-1 of the types lowbit computes with, in registry order: the index of the
// per-type entries of the kernel tables (cpu::Kernels::ops).
enum class QTypeIndex : int {
#define LOWBIT_X(NAME, lc, id, bs, ts, kind) NAME,
    LOWBIT_QTYPES(LOWBIT_X)
#undef LOWBIT_X
    kCount
};
constexpr int kNumQTypes = static_cast<int>(QTypeIndex::kCount);
// -1 for an id that is not in LOWBIT_QTYPES.
constexpr int qtype_index(QType t) {
    switch (t) {
#define LOWBIT_X(NAME, lc, id, bs, ts, kind) \
    case QType::NAME:                        \
        return static_cast<int>(QTypeIndex::NAME);
        LOWBIT_QTYPES(LOWBIT_X)
#undef LOWBIT_X
    }
    return -1;
}

enum class TypeKind : uint8_t { FLOAT, BLOCK, TENSOR };

struct TypeTraits {
    uint32_t id;
    const char* name;
    int64_t block_size;     // elements per block
    size_t type_size;       // bytes per block (for NF4_DQ: bytes of the per-block part, see tensor_nbytes)
    bool is_quantized;
    bool supported;         // lowbit can quantize/dequantize/compute it (false: known ggml type, parsed only)
    bool tensor_level;      // layout is not a plain array of blocks (NF4_DQ)
    // Reference converters of a whole run of n elements (n a multiple of block_size); nullptr when not
    // supported. from_float_ref is the scalar oracle; quantize() may use an ISA's bit-exact row quantizer.
    void (*to_float)(const void* src, float* dst, int64_t n);
    void (*from_float_ref)(const float* src, void* dst, int64_t n);
};

// Traits for any ggml or lowbit type id, or nullptr for an unknown id.
const TypeTraits* type_traits(uint32_t id);
// Traits for a type lowbit computes with; throws Error naming the type when it is not supported.
const TypeTraits& supported_traits(uint32_t id);
inline const TypeTraits& supported_traits(QType t) { return supported_traits(static_cast<uint32_t>(t)); }

// Bytes of one row of n elements (n must be a multiple of the block size). Not for tensor-level types.
size_t row_size(QType t, int64_t n);
// Bytes of a whole tensor of n_elements (n_elements a multiple of the block size); overflow-checked:
// returns false when the byte count does not fit in 63 bits. Works for every known type id.
bool tensor_nbytes(uint32_t type_id, uint64_t n_elements, uint64_t* nbytes);

// ---- fp16 / bf16 (round to nearest even, as ggml and numpy) --------------------------------------
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);
inline float bf16_to_fp32(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
uint16_t fp32_to_bf16(float f);

// ---- NF4 code book (bitsandbytes get_4bit_type("nf4")) -------------------------------------------
extern const float kNF4Codes[16];

// ---- quantize / dequantize (reference-exact; multithreaded for large inputs) ---------------------
// Quantize n_rows rows of n_per_row floats. For block types the output is n_rows * row_size bytes;
// for tensor-level types (NF4_DQ) the rows are treated as one flat tensor. Releases nothing: callers
// in the bindings drop the GIL around it. n_threads <= 0 means all hardware threads.
void quantize(QType t, const float* src, void* dst, int64_t n_rows, int64_t n_per_row, int n_threads = 0);
// Dequantize n_elements elements (a multiple of the block size) to float.
// Tensor data must start at a multiple of this for the typed kernels (f32, fp16 and block scales);
// dequantize() copies misaligned input itself, the model loader copies misaligned weights once.
constexpr size_t kDataAlignment = 4;
void dequantize(QType t, const void* src, float* dst, int64_t n_elements, int n_threads = 0);

// Scalar reference quantizers, one row / flat run of k elements (k a multiple of the block size).
// These are the oracle for every SIMD and CUDA kernel; they are bit-exact with llama.cpp's *_ref.
void quantize_row_q4_0_ref(const float* x, block_q4_0* y, int64_t k);
void quantize_row_q4_1_ref(const float* x, block_q4_1* y, int64_t k);
void quantize_row_q8_0_ref(const float* x, block_q8_0* y, int64_t k);
void quantize_row_nf4_ref(const float* x, block_nf4* y, int64_t k);
void dequantize_row_q4_0(const block_q4_0* x, float* y, int64_t k);
void dequantize_row_q4_1(const block_q4_1* x, float* y, int64_t k);
void dequantize_row_q8_0(const block_q8_0* x, float* y, int64_t k);
void dequantize_row_nf4(const block_nf4* x, float* y, int64_t k);

// The types added with the K-quants (spec/quant-types.md). quantize_row_*_ref are bit-exact with
// llama.cpp's quantize_row_*_ref (the path llama-quantize takes without an importance matrix); IQ4_NL
// and IQ4_XS have no such reference path, their quantizers are lowbit's own (exact reading is what matters).
// k is a multiple of the block size (32 for Q5_0/Q5_1/IQ4_NL, 64 for FP4, QK_K = 256 for the K types).
void quantize_row_q5_0_ref(const float* x, block_q5_0* y, int64_t k);
void quantize_row_q5_1_ref(const float* x, block_q5_1* y, int64_t k);
void quantize_row_iq4_nl_ref(const float* x, block_iq4_nl* y, int64_t k);
void quantize_row_iq4_xs_ref(const float* x, block_iq4_xs* y, int64_t k);
void quantize_row_fp4_ref(const float* x, block_fp4* y, int64_t k);
void quantize_row_q2_K_ref(const float* x, block_q2_K* y, int64_t k);
void quantize_row_q3_K_ref(const float* x, block_q3_K* y, int64_t k);
void quantize_row_q4_K_ref(const float* x, block_q4_K* y, int64_t k);
void quantize_row_q5_K_ref(const float* x, block_q5_K* y, int64_t k);
void quantize_row_q6_K_ref(const float* x, block_q6_K* y, int64_t k);
void quantize_row_q8_K_ref(const float* x, block_q8_K* y, int64_t k);
void dequantize_row_q5_0(const block_q5_0* x, float* y, int64_t k);
void dequantize_row_q5_1(const block_q5_1* x, float* y, int64_t k);
void dequantize_row_iq4_nl(const block_iq4_nl* x, float* y, int64_t k);
void dequantize_row_iq4_xs(const block_iq4_xs* x, float* y, int64_t k);
void dequantize_row_fp4(const block_fp4* x, float* y, int64_t k);
void dequantize_row_q2_K(const block_q2_K* x, float* y, int64_t k);
void dequantize_row_q3_K(const block_q3_K* x, float* y, int64_t k);
void dequantize_row_q4_K(const block_q4_K* x, float* y, int64_t k);
void dequantize_row_q5_K(const block_q5_K* x, float* y, int64_t k);
void dequantize_row_q6_K(const block_q6_K* x, float* y, int64_t k);
void dequantize_row_q8_K(const block_q8_K* x, float* y, int64_t k);

// IQ4_NL / IQ4_XS value table (llama.cpp's kvalues_iq4nl) and bitsandbytes' FP4 code book
// (get_4bit_type("fp4"), index order as bitsandbytes stores it).
extern const int8_t kIQ4NLValues[16];
extern const float kFP4Codes[16];

// NF4_DQ, tensor-level layout for n elements (n % 64 == 0), nb = n / 64 blocks, ng = ceil(nb / 256):
//   float offset; float absmax2[ng]; uint8 qabsmax[nb]; uint8 qs[nb * 32]
size_t nf4_dq_nbytes(int64_t n);
void quantize_nf4_dq_ref(const float* x, uint8_t* dst, int64_t n);
void dequantize_nf4_dq(const uint8_t* src, float* y, int64_t n);
// Expand the double-quantized scales to plain NF4 blocks (what the matmul kernels consume).
void nf4_dq_to_nf4(const uint8_t* src, block_nf4* dst, int64_t n);

}  // namespace lowbit

namespace lowbit {

// The 8-bit signed dynamic code book of bitsandbytes (create_dynamic_map(signed=True)), used for the
// NF4_DQ nested absmax; ascending.
extern const float kDynamicCodes[256];

}  // namespace lowbit
