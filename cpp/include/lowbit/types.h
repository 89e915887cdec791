// Tensor types: ids, the traits table, fp16/bf16 conversion and the row quantize/dequantize entry points.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "lowbit/blocks.h"

namespace lowbit {

// Every lowbit failure is one of these; the bindings turn it into lowbit.LowbitError.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// Type ids are ggml's where ggml has the type; private ids start at 1024 so llama.cpp refuses them.
// Ids are never reused.
enum class QType : uint32_t {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q8_0 = 8,
    BF16 = 30,
    NF4 = 1024,     // bitsandbytes NF4, block 64, fp32 absmax per block
    NF4_DQ = 1025,  // NF4 with double-quantized absmax (bitsandbytes compress_statistics); tensor-level layout
};

struct TypeTraits {
    uint32_t id;
    const char* name;
    int64_t block_size;     // elements per block
    size_t type_size;       // bytes per block (for NF4_DQ: bytes of the per-block part, see tensor_nbytes)
    bool is_quantized;
    bool supported;         // lowbit can quantize/dequantize/compute it (false: known ggml type, parsed only)
    bool tensor_level;      // layout is not a plain array of blocks (NF4_DQ)
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

// NF4_DQ, tensor-level layout for n elements (n % 64 == 0), nb = n / 64 blocks, ng = ceil(nb / 256):
//   float offset; float absmax2[ng]; uint8 qabsmax[nb]; uint8 qs[nb * 32]
size_t nf4_dq_nbytes(int64_t n);
void quantize_nf4_dq_ref(const float* x, uint8_t* dst, int64_t n);
void dequantize_nf4_dq(const uint8_t* src, float* y, int64_t n);
// Expand the double-quantized scales to plain NF4 blocks (what the matmul kernels consume).
void nf4_dq_to_nf4(const uint8_t* src, block_nf4* dst, int64_t n);

}  // namespace lowbit

// ---- quants owner additions
namespace lowbit {

// Which quantizer implementation quantize() uses for Q4_0/Q4_1/Q8_0/NF4 rows. All are bit-exact with
// the *_ref functions; the choice exists so tests and benchmarks can compare them.
// Auto: LOWBIT_QUANT_ISA (generic|avx2|avx512) if set, else the best this CPU runs.
enum class QuantIsa : int { Auto = -1, Generic = 0, AVX2 = 1, AVX512 = 2 };
// Force an implementation (throws Error when this CPU or build cannot run it); Auto restores the default.
void set_quantize_isa(QuantIsa isa);
// The implementation quantize() uses now.
QuantIsa active_quantize_isa();
const char* quantize_isa_name(QuantIsa isa);

// Bit-exact fast row quantizers (k a multiple of 32), compiled with their ISA's flags; call only
// after checking that the CPU supports the ISA (set_quantize_isa / active_quantize_isa do that).
void quantize_row_q4_0_avx2(const float* x, block_q4_0* y, int64_t k);
void quantize_row_q4_1_avx2(const float* x, block_q4_1* y, int64_t k);
void quantize_row_q8_0_avx2(const float* x, block_q8_0* y, int64_t k);
void quantize_row_q4_0_avx512(const float* x, block_q4_0* y, int64_t k);
void quantize_row_q4_1_avx512(const float* x, block_q4_1* y, int64_t k);
void quantize_row_q8_0_avx512(const float* x, block_q8_0* y, int64_t k);

// The 8-bit signed dynamic code book of bitsandbytes (create_dynamic_map(signed=True)), used for the
// NF4_DQ nested absmax; ascending.
extern const float kDynamicCodes[256];

}  // namespace lowbit
