// GGUF v3 container: a validating, zero-copy (mmap) reader and a streaming, atomic writer.
// Exactly what is accepted and written: spec/container.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/types.h"

namespace lowbit {

enum class GGUFType : uint32_t {
    UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
    STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char* gguf_type_name(GGUFType t);

// Limits the reader and writer enforce (spec/container.md, "Limits"). Every one of them is far above
// what real models need; they exist so a hostile file cannot make the reader allocate without bound.
constexpr uint32_t kGGUFMaxDims = 4;                          // ggml's GGML_MAX_DIMS
constexpr uint64_t kGGUFMaxKeyBytes = 65535;                  // spec: keys are at most 2^16 - 1 bytes
constexpr uint64_t kGGUFMaxTensorNameBytes = 63;              // ggml: GGML_MAX_NAME (64) including the NUL
constexpr uint64_t kGGUFMaxStringBytes = 256ull << 20;        // one string value (a tokenizer.json is ~10 MiB)
constexpr uint64_t kGGUFMaxArrayItems = 1ull << 23;           // one array (vocabularies are ~10^5..10^6)
constexpr uint64_t kGGUFMaxTotalValues = 1ull << 23;          // all metadata values together (~100 B each in memory)
constexpr uint64_t kGGUFMaxTensors = 1ull << 20;              // tensor infos (large MoE files have ~10^4)
constexpr int kGGUFMaxArrayDepth = 8;                         // arrays nested inside arrays
constexpr uint64_t kGGUFMaxAlignment = 1ull << 20;            // general.alignment upper bound
constexpr uint32_t kGGUFDefaultAlignment = 32;                // GGUF_DEFAULT_ALIGNMENT

// Bytes of a tensor of type type_id with dims ne (ggml order). Throws Error when the type is unknown,
// a dim is < 1, there are not 1..4 dims, ne[0] is not a multiple of the block size, or the count
// overflows.
uint64_t gguf_tensor_nbytes(uint32_t type_id, const std::vector<int64_t>& ne);

// One metadata value. Scalars use the field matching their type family; arrays keep their element
// type and items (items may themselves be arrays).
struct GGUFValue {
    GGUFType type = GGUFType::UINT8;
    uint64_t u = 0;         // UINT8/16/32/64, BOOL (0/1)
    int64_t i = 0;          // INT8/16/32/64
    double f = 0.0;         // FLOAT32/64
    std::string s;          // STRING
    GGUFType elem_type = GGUFType::UINT8;  // ARRAY
    std::vector<GGUFValue> arr;             // ARRAY

    bool is_integer() const;
    int64_t as_int() const;      // any integer or bool; throws Error otherwise
    double as_float() const;     // any integer or float; throws Error otherwise
    const std::string& as_string() const;  // throws Error unless STRING
};

struct GGUFTensorInfo {
    std::string name;
    uint32_t type_id = 0;
    int n_dims = 0;
    int64_t ne[4] = {1, 1, 1, 1};  // ggml order: ne[0] is the contiguous (row) dimension
    uint64_t offset = 0;           // relative to the start of the data section
    uint64_t nbytes = 0;
    int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
};

class GGUFReader {
public:
    // Maps the file read-only and validates every field before use. Throws Error naming the field and
    // byte offset of the first problem.
    explicit GGUFReader(const std::string& path);
    ~GGUFReader();
    GGUFReader(const GGUFReader&) = delete;
    GGUFReader& operator=(const GGUFReader&) = delete;

    const std::string& path() const { return path_; }
    uint32_t version() const { return version_; }
    uint64_t file_size() const { return file_size_; }
    uint64_t alignment() const { return alignment_; }
    uint64_t data_offset() const { return data_offset_; }  // absolute offset of the data section

    const std::vector<std::pair<std::string, GGUFValue>>& metadata() const { return kv_; }
    // Moves the entries whose key starts with prefix out of the reader (they are gone from metadata() and
    // find() afterwards), in file order: for a consumer that needs them once, so they are not held twice.
    std::vector<std::pair<std::string, GGUFValue>> take_metadata(const std::string& prefix);
    const GGUFValue* find(const std::string& key) const;  // nullptr when absent
    int64_t get_int(const std::string& key, int64_t def) const;
    double get_float(const std::string& key, double def) const;
    std::string get_string(const std::string& key, const std::string& def) const;
    bool has(const std::string& key) const { return find(key) != nullptr; }

    const std::vector<GGUFTensorInfo>& tensors() const { return tensors_; }
    const GGUFTensorInfo* find_tensor(const std::string& name) const;  // nullptr when absent
    // Pointer into the mapping at the tensor's data (valid while the reader lives).
    const uint8_t* tensor_data(const GGUFTensorInfo& t) const { return base_ + data_offset_ + t.offset; }
    const uint8_t* base() const { return base_; }

    // Identity of the file at open time (size, mtime, inode), to detect replacement/truncation later.
    bool file_changed_on_disk() const;

private:
    void parse();  // validates the mapped bytes and fills kv_, tensors_, alignment_, data_offset_

    std::string path_;
    const uint8_t* base_ = nullptr;
    uint64_t file_size_ = 0;
    uint32_t version_ = 0;
    uint64_t alignment_ = 32;
    uint64_t data_offset_ = 0;
    std::vector<std::pair<std::string, GGUFValue>> kv_;
    std::vector<GGUFTensorInfo> tensors_;
    int fd_ = -1;
    uint64_t st_ino_ = 0, st_dev_ = 0;
    int64_t st_mtime_ns_ = 0;
    struct Index;
    std::unique_ptr<Index> index_;
};

// Streaming writer: metadata and tensor infos first (shapes and types declared up front), then tensor
// data one tensor at a time, in declaration order. Writes to "<path>.tmp-<pid>" and renames onto path in
// finish(); destroying an unfinished writer removes the temporary file.
class GGUFWriter {
public:
    explicit GGUFWriter(const std::string& path, uint32_t alignment = 32);
    ~GGUFWriter();
    GGUFWriter(const GGUFWriter&) = delete;
    GGUFWriter& operator=(const GGUFWriter&) = delete;

    void add_kv(const std::string& key, const GGUFValue& value);
    // shape in ggml order (ne[0] first). nbytes is derived from the type and shape.
    void add_tensor_info(const std::string& name, uint32_t type_id, const std::vector<int64_t>& ne);
    // Writes header, metadata and tensor infos; after this only write_tensor_data/finish.
    void write_header();
    // Next tensor's bytes, in add_tensor_info order; size must equal the declared nbytes. May be called
    // several times per tensor with consecutive pieces (streaming a large tensor).
    void write_tensor_data(const void* data, size_t size);
    // All data written: flush, fsync, rename onto the target path.
    void finish();
    void abort();  // remove the temporary file

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace lowbit
