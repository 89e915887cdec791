// Walks everything a GGUFReader exposes and checks the reader's promises independently of its own code;
// shared by the libFuzzer harness (tests/fuzz/fuzz_gguf_reader.cpp) and tests/cpp/test_gguf_reader.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "lowbit/gguf.h"
#include "lowbit/types.h"

namespace gguf_walk {

// A broken promise: the reader accepted something the spec says it refuses, or exposed bytes it should not.
// Reported loudly (the fuzzer and the C++ tests turn it into a failure with the message).
struct Violation {
    std::string what;
};

[[noreturn]] inline void violated(const std::string& what) { throw Violation{what}; }

inline bool is_pow2(uint64_t x) { return x != 0 && (x & (x - 1)) == 0; }

// Sum of every byte of a string / buffer, so each byte is actually read (ASan sees out-of-bounds reads).
inline uint64_t touch(const uint8_t* p, uint64_t n) {
    uint64_t s = 0;
    for (uint64_t i = 0; i < n; ++i) s += p[i];
    return s;
}

inline uint64_t walk_value(const lowbit::GGUFValue& v, int depth) {
    using lowbit::GGUFType;
    if (static_cast<uint32_t>(v.type) > 12) violated("value type out of range");
    uint64_t sum = 0;
    switch (v.type) {
        case GGUFType::UINT8: if (v.u > 0xFF) violated("UINT8 out of range"); break;
        case GGUFType::UINT16: if (v.u > 0xFFFF) violated("UINT16 out of range"); break;
        case GGUFType::UINT32: if (v.u > 0xFFFFFFFFull) violated("UINT32 out of range"); break;
        case GGUFType::BOOL: if (v.u > 1) violated("BOOL other than 0/1 accepted"); break;
        case GGUFType::INT8: if (v.i < -128 || v.i > 127) violated("INT8 out of range"); break;
        case GGUFType::INT16: if (v.i < -32768 || v.i > 32767) violated("INT16 out of range"); break;
        case GGUFType::INT32: if (v.i < INT32_MIN || v.i > INT32_MAX) violated("INT32 out of range"); break;
        case GGUFType::STRING:
            if (v.s.size() > lowbit::kGGUFMaxStringBytes) violated("string over the limit accepted");
            sum += touch(reinterpret_cast<const uint8_t*>(v.s.data()), v.s.size());
            break;
        case GGUFType::ARRAY:
            if (depth > lowbit::kGGUFMaxArrayDepth) violated("array nested deeper than the limit accepted");
            if (v.arr.size() > lowbit::kGGUFMaxArrayItems) violated("array over the item limit accepted");
            for (const lowbit::GGUFValue& item : v.arr) {
                if (item.type != v.elem_type) violated("array item type differs from the array's item type");
                sum += walk_value(item, depth + 1);
            }
            break;
        default: break;
    }
    // The typed accessors must either answer or throw lowbit::Error, whatever the type.
    try { sum += static_cast<uint64_t>(v.as_int()); } catch (const lowbit::Error&) {}
    try { sum += static_cast<uint64_t>(std::isnan(v.as_float()) ? 1 : 0); } catch (const lowbit::Error&) {}
    try { sum += v.as_string().size(); } catch (const lowbit::Error&) {}
    return sum;
}

// Bytes of a tensor computed from the traits table, without gguf_tensor_nbytes (spec/quant-types.md).
inline uint64_t expected_nbytes(const lowbit::GGUFTensorInfo& t) {
    const lowbit::TypeTraits* tr = lowbit::type_traits(t.type_id);
    if (!tr) violated("tensor '" + t.name + "' with an unknown type id " + std::to_string(t.type_id) + " accepted");
    unsigned __int128 n = 1;
    for (int d = 0; d < t.n_dims; ++d) n *= static_cast<uint64_t>(t.ne[d]);
    if (n >> 63) violated("tensor '" + t.name + "' element count over 63 bits accepted");
    if (t.ne[0] % tr->block_size != 0) violated("tensor '" + t.name + "' ne[0] not a multiple of the block size");
    if (tr->tensor_level) return lowbit::nf4_dq_nbytes(static_cast<int64_t>(n));
    unsigned __int128 b = n / static_cast<uint64_t>(tr->block_size) * tr->type_size;
    if (b >> 63) violated("tensor '" + t.name + "' byte size over 63 bits accepted");
    return static_cast<uint64_t>(b);
}

struct WalkOptions {
    bool dequantize = true;            // run dequantize() over small supported tensors
    int64_t max_dequant_elements = 1 << 14;
};

// Walks a reader that opened `file` (the same bytes, size `size`). Returns a checksum so nothing is
// optimised away; throws Violation when a promise is broken.
inline uint64_t walk(const lowbit::GGUFReader& r, const uint8_t* file, uint64_t size, const WalkOptions& opt = {}) {
    uint64_t sum = 0;
    if (r.file_size() != size) violated("file_size() differs from the bytes written");
    if (r.version() != 2 && r.version() != 3) violated("version other than 2/3 accepted");
    if (!is_pow2(r.alignment()) || r.alignment() > lowbit::kGGUFMaxAlignment) violated("bad alignment accepted");
    if (r.data_offset() % r.alignment() != 0) violated("data section not aligned");
    if (std::memcmp(r.base(), file, 24) != 0) violated("mapping differs from the file's bytes");

    // ---- metadata: every value, every byte of every string, lookups agree with the list
    const auto& kv = r.metadata();
    if (kv.size() > lowbit::kGGUFMaxTotalValues) violated("kv count over the limit accepted");
    for (const auto& [key, value] : kv) {
        if (key.empty() || key.size() > lowbit::kGGUFMaxKeyBytes) violated("bad key length accepted");
        sum += touch(reinterpret_cast<const uint8_t*>(key.data()), key.size());
        sum += walk_value(value, 1);
        if (r.find(key) != &value) violated("find('" + key + "') does not return its entry (duplicate key?)");
        try { sum += static_cast<uint64_t>(r.get_int(key, 0)); } catch (const lowbit::Error&) {}
        try { sum += std::isnan(r.get_float(key, 0.0)) ? 1 : 0; } catch (const lowbit::Error&) {}
        try { sum += r.get_string(key, "").size(); } catch (const lowbit::Error&) {}
    }
    if (const lowbit::GGUFValue* a = r.find("general.alignment")) {
        if (a->type != lowbit::GGUFType::UINT32 || a->u != r.alignment())
            violated("general.alignment not honoured");
    } else if (r.alignment() != lowbit::kGGUFDefaultAlignment) {
        violated("alignment without general.alignment is not the default");
    }

    // ---- tensors: infos are consistent, every data byte lies inside the file and equals the file's byte
    const auto& ts = r.tensors();
    if (ts.size() > lowbit::kGGUFMaxTensors) violated("tensor count over the limit accepted");
    if (!ts.empty() && r.data_offset() > size) violated("data section past the end of the file");
    std::vector<std::pair<uint64_t, uint64_t>> spans;
    for (const lowbit::GGUFTensorInfo& t : ts) {
        if (t.name.empty() || t.name.size() > lowbit::kGGUFMaxTensorNameBytes) violated("bad tensor name accepted");
        if (t.n_dims < 1 || t.n_dims > 4) violated("tensor '" + t.name + "' n_dims out of range accepted");
        for (int d = 0; d < 4; ++d)
            if (t.ne[d] < 1) violated("tensor '" + t.name + "' dim < 1 accepted");
        for (int d = t.n_dims; d < 4; ++d)
            if (t.ne[d] != 1) violated("tensor '" + t.name + "' unused dim is not 1");
        if (t.nbytes != expected_nbytes(t)) violated("tensor '" + t.name + "' nbytes differs from the traits table");
        if (t.offset % r.alignment() != 0) violated("tensor '" + t.name + "' misaligned offset accepted");
        const uint64_t data_size = size - r.data_offset();
        if (t.offset > data_size || t.nbytes > data_size - t.offset)
            violated("tensor '" + t.name + "' extends past the end of the file");
        if (r.find_tensor(t.name) != &t) violated("find_tensor('" + t.name + "') does not return its entry");
        const uint8_t* p = r.tensor_data(t);
        if (p != r.base() + r.data_offset() + t.offset) violated("tensor_data() is not base + data + offset");
        sum += touch(p, t.nbytes);
        if (std::memcmp(p, file + r.data_offset() + t.offset, t.nbytes) != 0)
            violated("tensor '" + t.name + "' bytes differ from the file's bytes");
        spans.emplace_back(t.offset, t.nbytes);

        const lowbit::TypeTraits* tr = lowbit::type_traits(t.type_id);
        // Misaligned data (general.alignment 1 or 2) included: dequantize() must handle it (finding F1).
        if (opt.dequantize && tr->supported && t.n_elements() <= opt.max_dequant_elements) {
            std::vector<float> out(static_cast<size_t>(t.n_elements()));  // (n_elements)
            lowbit::dequantize(static_cast<lowbit::QType>(t.type_id), p, out.data(), t.n_elements(), 1);
            for (float f : out) sum += std::isfinite(f) ? 1 : 0;
        }
    }
    std::sort(spans.begin(), spans.end());
    for (size_t k = 1; k < spans.size(); ++k)
        if (spans[k].first < spans[k - 1].first + spans[k - 1].second) violated("overlapping tensors accepted");
    return sum;
}

inline bool same_value(const lowbit::GGUFValue& a, const lowbit::GGUFValue& b) {
    if (a.type != b.type) return false;
    switch (a.type) {
        case lowbit::GGUFType::FLOAT32:
        case lowbit::GGUFType::FLOAT64:
            return (std::isnan(a.f) && std::isnan(b.f)) || std::memcmp(&a.f, &b.f, sizeof a.f) == 0;
        case lowbit::GGUFType::STRING: return a.s == b.s;
        case lowbit::GGUFType::ARRAY:
            if (a.elem_type != b.elem_type || a.arr.size() != b.arr.size()) return false;
            for (size_t k = 0; k < a.arr.size(); ++k)
                if (!same_value(a.arr[k], b.arr[k])) return false;
            return true;
        default: return a.u == b.u && a.i == b.i;
    }
}

// Writes what r holds with GGUFWriter to `path` and reads it back: the writer must accept everything the
// reader accepted, and the copy must hold the same metadata, shapes, types and bytes.
inline void round_trip(const lowbit::GGUFReader& r, const std::string& path) {
    {
        lowbit::GGUFWriter w(path, static_cast<uint32_t>(r.alignment()));
        try {
            for (const auto& [key, value] : r.metadata()) w.add_kv(key, value);
            for (const lowbit::GGUFTensorInfo& t : r.tensors())
                w.add_tensor_info(t.name, t.type_id, std::vector<int64_t>(t.ne, t.ne + t.n_dims));
            w.write_header();
            for (const lowbit::GGUFTensorInfo& t : r.tensors()) w.write_tensor_data(r.tensor_data(t), t.nbytes);
            w.finish();
        } catch (const lowbit::Error& e) {
            violated(std::string("the writer refused what the reader accepted: ") + e.what());
        }
    }
    lowbit::GGUFReader c(path);
    const auto& a = r.metadata();
    const auto& b = c.metadata();
    size_t extra = r.find("general.alignment") ? 0 : 1;  // the writer always adds general.alignment
    if (b.size() != a.size() + extra) violated("round trip changed the number of metadata keys");
    for (size_t k = 0; k < a.size(); ++k)
        if (a[k].first != b[k].first || !same_value(a[k].second, b[k].second))
            violated("round trip changed metadata key '" + a[k].first + "'");
    if (c.alignment() != r.alignment()) violated("round trip changed the alignment");
    if (c.tensors().size() != r.tensors().size()) violated("round trip changed the tensor count");
    for (size_t k = 0; k < r.tensors().size(); ++k) {
        const lowbit::GGUFTensorInfo& x = r.tensors()[k];
        const lowbit::GGUFTensorInfo& y = c.tensors()[k];
        if (x.name != y.name || x.type_id != y.type_id || x.n_dims != y.n_dims || x.nbytes != y.nbytes ||
            std::memcmp(x.ne, y.ne, sizeof x.ne) != 0 ||
            std::memcmp(r.tensor_data(x), c.tensor_data(y), x.nbytes) != 0)
            violated("round trip changed tensor '" + x.name + "'");
    }
}

}  // namespace gguf_walk
