// Tensor types: the traits table for every ggml/lowbit id, fp16/bf16 conversion, and the threaded
// quantize()/dequantize() entry points that pick the scalar or SIMD row quantizers.
#include "lowbit/types.h"

#include "lowbit/kernels.h"
#include "lowbit/threads.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <vector>

namespace lowbit {

// Element converters of the float types and the tensor-level NF4_DQ, named like the block types' so the
// registry rows (lowbit/qtypes.def) can name every converter the same way.
typedef float block_f32;
typedef uint16_t block_f16;
typedef uint16_t block_bf16;
typedef uint8_t block_nf4_dq;

namespace {

void quantize_row_f32_ref(const float* x, block_f32* y, int64_t k) { std::memcpy(y, x, static_cast<size_t>(k) * 4); }
void dequantize_row_f32(const block_f32* x, float* y, int64_t k) { std::memcpy(y, x, static_cast<size_t>(k) * 4); }
void quantize_row_f16_ref(const float* x, block_f16* y, int64_t k) {
    for (int64_t i = 0; i < k; ++i) y[i] = fp32_to_fp16(x[i]);
}
void dequantize_row_f16(const block_f16* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k; ++i) y[i] = fp16_to_fp32(x[i]);
}
void quantize_row_bf16_ref(const float* x, block_bf16* y, int64_t k) {
    for (int64_t i = 0; i < k; ++i) y[i] = fp32_to_bf16(x[i]);
}
void dequantize_row_bf16(const block_bf16* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k; ++i) y[i] = bf16_to_fp32(x[i]);
}
void quantize_row_nf4_dq_ref(const float* x, block_nf4_dq* y, int64_t k) { quantize_nf4_dq_ref(x, y, k); }
void dequantize_row_nf4_dq(const block_nf4_dq* x, float* y, int64_t k) { dequantize_nf4_dq(x, y, k); }

template <class Block, void (*F)(const Block*, float*, int64_t)>
void to_float_as(const void* src, float* dst, int64_t n) {
    F(static_cast<const Block*>(src), dst, n);
}
template <class Block, void (*F)(const float*, Block*, int64_t)>
void from_float_as(const float* src, void* dst, int64_t n) {
    F(src, static_cast<Block*>(dst), n);
}

#define LOWBIT_X(NAME, lc, id, bs, ts, kind)                                                          \
    static_assert(TypeKind::kind != TypeKind::BLOCK || sizeof(block_##lc) == ts,                      \
                  "block_" #lc " does not match its registry row (lowbit/qtypes.def)");               \
    static_assert(TypeKind::kind != TypeKind::FLOAT || (bs == 1 && sizeof(block_##lc) == ts),         \
                  #NAME " does not match its registry row (lowbit/qtypes.def)");
LOWBIT_QTYPES(LOWBIT_X)
#undef LOWBIT_X

// The registry (lowbit/qtypes.def): computable types first, then ggml types known by size only. Block sizes
// and bytes per block as llama.cpp's gguf-py GGML_QUANT_SIZES (spec/quant-types.md#type-table).
constexpr TypeTraits kTypes[] = {
#define LOWBIT_X(NAME, lc, id, bs, ts, kind)                                                                 \
    {id, #NAME, bs, ts, TypeKind::kind != TypeKind::FLOAT, true, TypeKind::kind == TypeKind::TENSOR,       \
     &to_float_as<block_##lc, dequantize_row_##lc>, &from_float_as<block_##lc, quantize_row_##lc##_ref>},
    LOWBIT_QTYPES(LOWBIT_X)
#undef LOWBIT_X
#define LOWBIT_Y(NAME, id, bs, ts) {id, #NAME, bs, ts, bs > 1, false, false, nullptr, nullptr},
    LOWBIT_PARSED_TYPES(LOWBIT_Y)
#undef LOWBIT_Y
};

std::string supported_names() {
    std::string out;
#define LOWBIT_X(NAME, lc, id, bs, ts, kind) out += std::string(out.empty() ? "" : ", ") + #NAME;
    LOWBIT_QTYPES(LOWBIT_X)
#undef LOWBIT_X
    return out;
}

// Inputs below this many elements are converted on the calling thread: waking the pool would cost more.
constexpr int64_t kParallelMinElements = 256 * 1024;

// Split [0, n_units) into one contiguous chunk per thread of the shared pool and run fn(begin, end) on each.
// Results do not depend on the split because every unit is independent.
template <typename Fn>
void parallel_units(int64_t n_units, int64_t elems_per_unit, int n_threads, Fn fn) {
    if (n_units <= 0) return;
    if (n_units * elems_per_unit < kParallelMinElements || n_threads == 1) {
        fn(int64_t{0}, n_units);
        return;
    }
    ThreadPool& pool = shared_thread_pool(n_threads);
    pool.run([&](int ith, int nth) {
        const int64_t b = n_units * ith / nth, e = n_units * (ith + 1) / nth;
        if (b < e) fn(b, e);
    });
}

}  // namespace

// ---- traits -------------------------------------------------------------------------------------

const TypeTraits* type_traits(uint32_t id) {
    for (const auto& t : kTypes)
        if (t.id == id) return &t;
    return nullptr;
}

const TypeTraits& supported_traits(uint32_t id) {
    const TypeTraits* t = type_traits(id);
    if (t == nullptr)
        throw Error("unknown tensor type id " + std::to_string(id) + "; lowbit supports " + supported_names());
    if (!t->supported)
        throw Error(std::string("tensor type ") + t->name + " (id " + std::to_string(id) +
                    ") is a ggml type lowbit does not run; lowbit runs " + supported_names() +
                    ". Requantize the original F16/F32 file to one of those (lowbit quantize IN OUT TYPE)");
    return *t;
}

size_t row_size(QType t, int64_t n) {
    const TypeTraits& tt = supported_traits(t);
    if (tt.tensor_level)
        throw Error(std::string(tt.name) + " has a tensor-level layout with no fixed row size; use tensor_nbytes");
    if (n < 0 || n % tt.block_size != 0)
        throw Error(std::string("row of ") + std::to_string(n) + " elements is not a multiple of " + tt.name +
                    "'s block size " + std::to_string(tt.block_size));
    uint64_t nbytes = 0;
    if (!tensor_nbytes(tt.id, static_cast<uint64_t>(n), &nbytes))
        throw Error("row of " + std::to_string(n) + " elements is too large");
    return static_cast<size_t>(nbytes);
}

bool tensor_nbytes(uint32_t type_id, uint64_t n_elements, uint64_t* nbytes) {
    const TypeTraits* t = type_traits(type_id);
    if (t == nullptr || nbytes == nullptr) return false;
    const uint64_t limit = (uint64_t{1} << 63) - 1;
    const uint64_t bs = static_cast<uint64_t>(t->block_size);
    if (n_elements % bs != 0) return false;
    const uint64_t nb = n_elements / bs;
    if (t->type_size != 0 && nb > limit / t->type_size) return false;
    uint64_t total = nb * t->type_size;
    if (t->tensor_level) {
        // NF4_DQ: + float offset + one float nested absmax per 256 blocks.
        const uint64_t ng = nb / 256 + (nb % 256 != 0);
        const uint64_t extra = 4 + 4 * ng;
        if (total > limit - extra) return false;
        total += extra;
    }
    *nbytes = total;
    return true;
}

// ---- fp16 / bf16 ----------------------------------------------------------------------------------

float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f;
    const uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        // zero or subnormal: mant * 2^-24, exact in fp32
        float f = std::ldexp(static_cast<float>(mant), -24);
        std::memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

uint16_t fp32_to_fp16(float f) {
    // IEEE round to nearest even, as F16C (ggml) and numpy's float16 cast; see spec/quant-types.md#fp16.
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00 | static_cast<uint16_t>((ax >> 13) & 0x3ff);  // quiet NaN
    if (ax >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to infinity (65504 is odd)
    if (ax < 0x38800000u) {
        // Below 2^-14: a half subnormal. Adding 0.5 puts the fp32 ulp (2^-24) on the half subnormal unit,
        // so the FPU's own round-to-nearest-even does the rounding.
        float a;
        std::memcpy(&a, &ax, 4);
        float s = a + 0.5f;
        uint32_t sb;
        std::memcpy(&sb, &s, 4);
        return sign | static_cast<uint16_t>(sb - 0x3f000000u);
    }
    const uint32_t odd = (ax >> 13) & 1;
    ax += 0xc8000fffu + odd;  // rebias the exponent (-112 << 23) and round half to even
    return sign | static_cast<uint16_t>(ax >> 13);
}

uint16_t fp32_to_bf16(float f) {
    // gguf-py / ggml: NaN forced quiet (keeping its top bits), then round to nearest even.
    uint32_t n;
    std::memcpy(&n, &f, 4);
    if ((n & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(((n & 0xffff0000u) | (64u << 16)) >> 16);
    return static_cast<uint16_t>((n + 0x7fffu + ((n >> 16) & 1)) >> 16);
}

// ---- quantize / dequantize -------------------------------------------------------------------------

void quantize(QType t, const float* src, void* dst, int64_t n_rows, int64_t n_per_row, int n_threads) {
    const TypeTraits& tt = supported_traits(t);
    if (n_rows < 0 || n_per_row < 0) throw Error("quantize: negative shape");
    if (n_per_row % tt.block_size != 0)
        throw Error("quantize: row length " + std::to_string(n_per_row) + " is not a multiple of " + tt.name +
                    "'s block size " + std::to_string(tt.block_size) + "; pad the last axis");
    if (n_rows != 0 && n_per_row > INT64_MAX / n_rows) throw Error("quantize: tensor too large");
    const int64_t n = n_rows * n_per_row;
    if (tt.tensor_level) {  // one layout for the whole tensor (NF4_DQ): not split
        tt.from_float_ref(src, dst, n);
        return;
    }
    // Rows are contiguous and whole blocks, so the tensor is one flat run of n / block_size blocks; the active
    // kernel table's row quantizer (bit-exact with the reference) where it has one.
    const cpu::TypeOps& ops = cpu::type_ops(t);
    void (*row)(const float*, void*, int64_t) = ops.quantize_row ? ops.quantize_row : tt.from_float_ref;
    const int64_t bs = tt.block_size;
    auto* out = static_cast<uint8_t*>(dst);
    parallel_units(n / bs, bs, n_threads, [&](int64_t b, int64_t e) {
        row(src + b * bs, out + b * tt.type_size, (e - b) * bs);
    });
}

void dequantize(QType t, const void* src, float* dst, int64_t n_elements, int n_threads) {
    const TypeTraits& tt = supported_traits(t);
    if (n_elements < 0 || n_elements % tt.block_size != 0)
        throw Error("dequantize: " + std::to_string(n_elements) + " elements is not a multiple of " + tt.name +
                    "'s block size " + std::to_string(tt.block_size));
    if (reinterpret_cast<uintptr_t>(src) % kDataAlignment != 0) {
        // A file with general.alignment 1 or 2 can place data at an odd address; the typed loads below
        // need natural alignment, so work on an aligned copy (rare: every real file aligns to 32).
        uint64_t nbytes = 0;  // NF4_DQ's tensor-level layout is more than blocks x type_size
        if (!tensor_nbytes(static_cast<uint32_t>(t), static_cast<uint64_t>(n_elements), &nbytes))
            throw Error("dequantize: byte size of " + std::to_string(n_elements) + " " + tt.name + " elements overflows");
        std::vector<uint32_t> copy((nbytes + 3) / 4);
        std::memcpy(copy.data(), src, nbytes);
        dequantize(t, copy.data(), dst, n_elements, n_threads);
        return;
    }
    if (tt.tensor_level) {
        tt.to_float(src, dst, n_elements);
        return;
    }
    const int64_t bs = tt.block_size;
    auto* in = static_cast<const uint8_t*>(src);
    parallel_units(n_elements / bs, bs, n_threads, [&](int64_t b, int64_t e) {
        tt.to_float(in + b * tt.type_size, dst + b * bs, (e - b) * bs);
    });
}

}  // namespace lowbit
