// GGUF v3 container: the validating mmap reader and the streaming atomic writer (spec/container.md).
#include "lowbit/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <unordered_map>
#include <unordered_set>

namespace lowbit {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr uint64_t kHeaderBytes = 4 + 4 + 8 + 8;
// Smallest possible encodings, used to reject counts the rest of the file cannot hold before any
// allocation: a kv is key length (8) + 1 key byte + type (4) + a 1-byte value; a tensor info is
// name length (8) + 1 name byte + n_dims (4) + one dim (8) + type (4) + offset (8).
constexpr uint64_t kMinKVBytes = 8 + 1 + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = 8 + 1 + 4 + 8 + 4 + 8;

std::string sys_error() { return std::strerror(errno); }

bool valid_type(uint32_t t) { return t <= static_cast<uint32_t>(GGUFType::FLOAT64); }

// Bytes of a fixed-size scalar, 0 for STRING/ARRAY.
uint64_t scalar_size(GGUFType t) {
    switch (t) {
        case GGUFType::UINT8: case GGUFType::INT8: case GGUFType::BOOL: return 1;
        case GGUFType::UINT16: case GGUFType::INT16: return 2;
        case GGUFType::UINT32: case GGUFType::INT32: case GGUFType::FLOAT32: return 4;
        case GGUFType::UINT64: case GGUFType::INT64: case GGUFType::FLOAT64: return 8;
        default: return 0;
    }
}

// Smallest encoding of one array item of type t (used to bound counts by the bytes left).
uint64_t min_item_size(GGUFType t) {
    if (t == GGUFType::STRING) return 8;
    if (t == GGUFType::ARRAY) return 4 + 8;
    return scalar_size(t);
}

bool is_unsigned(GGUFType t) {
    return t == GGUFType::UINT8 || t == GGUFType::UINT16 || t == GGUFType::UINT32 || t == GGUFType::UINT64 ||
           t == GGUFType::BOOL;
}
bool is_signed(GGUFType t) {
    return t == GGUFType::INT8 || t == GGUFType::INT16 || t == GGUFType::INT32 || t == GGUFType::INT64;
}

// Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF.
bool valid_utf8(const uint8_t* p, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = p[i];
        if (c < 0x80) { ++i; continue; }
        size_t len;
        uint32_t cp;
        if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
        else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
        else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
        else return false;
        if (n - i < len) return false;
        for (size_t k = 1; k < len; ++k) {
            if ((p[i + k] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (p[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000)) return false;
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += len;
    }
    return true;
}

std::string quoted(const std::string& s) {
    // Names in messages are cut short and kept printable so a hostile name cannot flood a log.
    std::string out = "'";
    size_t n = std::min<size_t>(s.size(), 80);
    for (size_t i = 0; i < n; ++i) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        if (c >= 0x20 && c < 0x7F) out += static_cast<char>(c);
        else {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        }
    }
    if (s.size() > n) out += "...";
    return out + "'";
}


std::string ne_desc(const int64_t* ne, size_t n) {
    std::string s = "[";
    for (size_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
}

// "Q4_K with dims [256, 2]": what fixes a tensor's byte size, for messages about its data span.
std::string type_and_dims(const GGUFTensorInfo& t) {
    return std::string(type_traits(t.type_id)->name) + " with dims " + ne_desc(t.ne, static_cast<size_t>(t.n_dims));
}

// Shared by the reader (dims already known to be in range) and the writer.
void check_tensor_shape(const std::string& what, uint32_t type_id, const int64_t* ne, size_t n_dims,
                        uint64_t* n_elements, uint64_t* nbytes) {
    if (n_dims < 1 || n_dims > kGGUFMaxDims)
        throw Error(what + ": has " + std::to_string(n_dims) + " dims; GGUF tensors have 1 to 4");
    const TypeTraits* tt = type_traits(type_id);
    if (!tt)
        throw Error(what + ": unknown tensor type id " + std::to_string(type_id) +
                    " (not a ggml type and not a lowbit type; the file may need a newer reader)");
    uint64_t n = 1;
    for (size_t d = 0; d < n_dims; ++d) {
        if (ne[d] < 1)
            throw Error(what + ": dim " + std::to_string(d) + " is " + std::to_string(ne[d]) +
                        "; every dim must be >= 1 (empty tensors are not supported)");
        if (__builtin_mul_overflow(n, static_cast<uint64_t>(ne[d]), &n) ||
            n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
            throw Error(what + ": the element count of dims " + ne_desc(ne, n_dims) + " overflows 63 bits");
    }
    if (tt->block_size > 0 && ne[0] % tt->block_size != 0)
        throw Error(what + ": row length ne[0] = " + std::to_string(ne[0]) + " is not a multiple of " +
                    tt->name + "'s block size " + std::to_string(tt->block_size));
    if (!tensor_nbytes(type_id, n, nbytes))
        throw Error(what + ": the byte size of " + std::to_string(n) + " elements of " + tt->name +
                    " overflows 63 bits");
    *n_elements = n;
}

}  // namespace

const char* gguf_type_name(GGUFType t) {
    switch (t) {
        case GGUFType::UINT8: return "UINT8";
        case GGUFType::INT8: return "INT8";
        case GGUFType::UINT16: return "UINT16";
        case GGUFType::INT16: return "INT16";
        case GGUFType::UINT32: return "UINT32";
        case GGUFType::INT32: return "INT32";
        case GGUFType::FLOAT32: return "FLOAT32";
        case GGUFType::BOOL: return "BOOL";
        case GGUFType::STRING: return "STRING";
        case GGUFType::ARRAY: return "ARRAY";
        case GGUFType::UINT64: return "UINT64";
        case GGUFType::INT64: return "INT64";
        case GGUFType::FLOAT64: return "FLOAT64";
    }
    return "UNKNOWN";
}

uint64_t gguf_tensor_nbytes(uint32_t type_id, const std::vector<int64_t>& ne) {
    uint64_t n = 0, nbytes = 0;
    check_tensor_shape("tensor", type_id, ne.data(), ne.size(), &n, &nbytes);
    return nbytes;
}

// ---- GGUFValue -----------------------------------------------------------------------------------

bool GGUFValue::is_integer() const { return is_signed(type) || is_unsigned(type); }

int64_t GGUFValue::as_int() const {
    if (is_signed(type)) return i;
    if (is_unsigned(type)) {
        if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
            throw Error("metadata value " + std::to_string(u) + " does not fit in int64");
        return static_cast<int64_t>(u);
    }
    throw Error(std::string("metadata value of type ") + gguf_type_name(type) + " is not an integer");
}

double GGUFValue::as_float() const {
    if (type == GGUFType::FLOAT32 || type == GGUFType::FLOAT64) return f;
    if (is_signed(type)) return static_cast<double>(i);
    if (is_unsigned(type) && type != GGUFType::BOOL) return static_cast<double>(u);
    throw Error(std::string("metadata value of type ") + gguf_type_name(type) + " is not a number");
}

const std::string& GGUFValue::as_string() const {
    if (type != GGUFType::STRING)
        throw Error(std::string("metadata value of type ") + gguf_type_name(type) + " is not a string");
    return s;
}

// ---- reader --------------------------------------------------------------------------------------

struct GGUFReader::Index {
    std::unordered_map<std::string, size_t> kv;
    std::unordered_map<std::string, size_t> tensors;
};

namespace {

// Bounds-checked little-endian reads from the mapping. Every failure names what was being read and
// the byte offset where it starts.
class Cursor {
public:
    Cursor(const uint8_t* base, uint64_t size, const std::string& path) : base_(base), size_(size), path_(path) {}

    uint64_t pos() const { return pos_; }
    void seek(uint64_t p) { pos_ = p; }
    uint64_t remaining() const { return size_ - pos_; }

    [[noreturn]] void fail(const std::string& msg, uint64_t at) const {
        throw Error("GGUF file " + quoted(path_) + ": " + msg + " [at byte " + std::to_string(at) + "]");
    }
    [[noreturn]] void fail(const std::string& msg) const { fail(msg, pos_); }

    void need(uint64_t n, const std::string& what) const {
        if (n > remaining())
            fail(what + ": needs " + std::to_string(n) + " bytes but the file ends after " +
                 std::to_string(remaining()) + " (file size " + std::to_string(size_) + ")");
    }

    template <typename T>
    T read(const std::string& what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, base_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }

    // A gguf_string: uint64 length + bytes (no terminator).
    std::string read_string(const std::string& what, uint64_t max_len) {
        uint64_t at = pos_;
        uint64_t len = read<uint64_t>(what + " length");
        if (len > max_len)
            fail(what + ": length " + std::to_string(len) + " exceeds the limit of " + std::to_string(max_len) +
                     " bytes",
                 at);
        need(len, what);
        std::string s(reinterpret_cast<const char*>(base_ + pos_), len);
        pos_ += len;
        return s;
    }

    const uint8_t* here() const { return base_ + pos_; }
    void skip(uint64_t n) { pos_ += n; }

private:
    const uint8_t* base_;
    uint64_t size_;
    uint64_t pos_ = 0;
    const std::string& path_;
};

struct ValueParser {
    Cursor& c;
    const std::string& key;
    uint64_t total_values = 0;

    std::string where(const std::vector<uint64_t>& idx) const {
        std::string s = "key " + quoted(key);
        for (uint64_t i : idx) s += " item " + std::to_string(i);
        return s;
    }

    void scalar(GGUFType t, GGUFValue& v, std::vector<uint64_t>& idx) {
        v.type = t;
        switch (t) {
            case GGUFType::UINT8: v.u = c.read<uint8_t>(where(idx)); break;
            case GGUFType::INT8: v.i = c.read<int8_t>(where(idx)); break;
            case GGUFType::UINT16: v.u = c.read<uint16_t>(where(idx)); break;
            case GGUFType::INT16: v.i = c.read<int16_t>(where(idx)); break;
            case GGUFType::UINT32: v.u = c.read<uint32_t>(where(idx)); break;
            case GGUFType::INT32: v.i = c.read<int32_t>(where(idx)); break;
            case GGUFType::UINT64: v.u = c.read<uint64_t>(where(idx)); break;
            case GGUFType::INT64: v.i = c.read<int64_t>(where(idx)); break;
            case GGUFType::FLOAT32: v.f = c.read<float>(where(idx)); break;
            case GGUFType::FLOAT64: v.f = c.read<double>(where(idx)); break;
            case GGUFType::BOOL: {
                uint64_t at = c.pos();
                uint8_t b = c.read<uint8_t>(where(idx));
                // gguf.h: bools are one byte, 0 or 1; anything else is a corrupt file.
                if (b > 1) c.fail(where(idx) + ": BOOL value is " + std::to_string(b) + "; must be 0 or 1", at);
                v.u = b;
                break;
            }
            case GGUFType::STRING: v.s = c.read_string(where(idx), kGGUFMaxStringBytes); break;
            case GGUFType::ARRAY: break;
        }
    }

    void value(GGUFType t, GGUFValue& v, int depth, std::vector<uint64_t>& idx) {
        if (t != GGUFType::ARRAY) {
            scalar(t, v, idx);
            return;
        }
        v.type = GGUFType::ARRAY;
        if (depth > kGGUFMaxArrayDepth)
            c.fail(where(idx) + ": arrays nested more than " + std::to_string(kGGUFMaxArrayDepth) + " deep");
        uint64_t at = c.pos();
        uint32_t et = c.read<uint32_t>(where(idx) + " array item type");
        if (!valid_type(et))
            c.fail(where(idx) + ": array item type " + std::to_string(et) + " is not a GGUF value type (0..12)", at);
        v.elem_type = static_cast<GGUFType>(et);
        at = c.pos();
        uint64_t n = c.read<uint64_t>(where(idx) + " array count");
        if (n > kGGUFMaxArrayItems)
            c.fail(where(idx) + ": array count " + std::to_string(n) + " exceeds the limit of " +
                       std::to_string(kGGUFMaxArrayItems),
                   at);
        uint64_t min_size = min_item_size(v.elem_type);
        if (n > c.remaining() / min_size)
            c.fail(where(idx) + ": array of " + std::to_string(n) + " " + gguf_type_name(v.elem_type) +
                       " items needs at least " + std::to_string(n * min_size) + " bytes but only " +
                       std::to_string(c.remaining()) + " remain",
                   at);
        total_values += n;
        if (total_values > kGGUFMaxTotalValues)
            c.fail(where(idx) + ": the file holds more than " + std::to_string(kGGUFMaxTotalValues) +
                       " metadata values in all",
                   at);
        // Grown item by item: memory follows the bytes actually parsed, never the declared count alone.
        v.arr.reserve(std::min<uint64_t>(n, 1u << 16));
        idx.push_back(0);
        for (uint64_t k = 0; k < n; ++k) {
            idx.back() = k;
            v.arr.emplace_back();
            value(v.elem_type, v.arr.back(), depth + 1, idx);
        }
        idx.pop_back();
    }
};

}  // namespace

GGUFReader::GGUFReader(const std::string& path) : path_(path), index_(std::make_unique<Index>()) {
    const std::string qpath = quoted(path);
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error("cannot open GGUF file " + qpath + ": " + sys_error());
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        std::string e = sys_error();
        ::close(fd);
        throw Error("cannot stat GGUF file " + qpath + ": " + e);
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        throw Error("GGUF file " + qpath + " is not a regular file");
    }
    file_size_ = static_cast<uint64_t>(st.st_size);
    st_ino_ = st.st_ino;
    st_dev_ = st.st_dev;
    st_mtime_ns_ = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
    if (file_size_ < kHeaderBytes) {
        ::close(fd);
        throw Error("GGUF file " + qpath + " is " + std::to_string(file_size_) +
                    " bytes; a GGUF header alone is 24 bytes (truncated or not a GGUF file) [at byte 0]");
    }
    void* m = ::mmap(nullptr, file_size_, PROT_READ, MAP_PRIVATE, fd, 0);
    std::string map_err = m == MAP_FAILED ? sys_error() : std::string();
    ::close(fd);
    if (m == MAP_FAILED) throw Error("cannot map GGUF file " + qpath + ": " + map_err);
    base_ = static_cast<const uint8_t*>(m);
    try {
        parse();
    } catch (...) {
        ::munmap(const_cast<uint8_t*>(base_), file_size_);
        base_ = nullptr;
        throw;
    }
}

GGUFReader::~GGUFReader() {
    if (base_) ::munmap(const_cast<uint8_t*>(base_), file_size_);
}

void GGUFReader::parse() {
    Cursor c(base_, file_size_, path_);

    uint32_t magic = c.read<uint32_t>("magic");
    if (magic != kMagic)
        c.fail("magic is 0x" + [&] {
            char b[16];
            std::snprintf(b, sizeof b, "%08x", magic);
            return std::string(b);
        }() + ", expected 0x46554747 (\"GGUF\"); this is not a GGUF file", 0);
    version_ = c.read<uint32_t>("version");
    if (version_ == 1)
        c.fail("GGUF version 1 is not supported (it used 32-bit counts); re-convert the model to GGUF v3", 4);
    if (version_ != 2 && version_ != 3) {
        // A big-endian v2/v3 file shows its version byte-swapped; nothing else in the file marks it.
        if (version_ == 0x02000000u || version_ == 0x03000000u)
            c.fail("this is a big-endian GGUF file; only little-endian files are supported", 4);
        c.fail("GGUF version " + std::to_string(version_) + " is not supported (lowbit reads versions 2 and 3)", 4);
    }
    uint64_t n_tensors = c.read<uint64_t>("tensor count");
    uint64_t n_kv = c.read<uint64_t>("metadata kv count");
    if (n_tensors > kGGUFMaxTensors)
        c.fail("tensor count " + std::to_string(n_tensors) + " exceeds the limit of " + std::to_string(kGGUFMaxTensors),
               8);
    if (n_kv > kGGUFMaxTotalValues)
        c.fail("metadata kv count " + std::to_string(n_kv) + " exceeds the limit of " +
                   std::to_string(kGGUFMaxTotalValues),
               16);
    if (n_tensors > c.remaining() / kMinTensorInfoBytes)
        c.fail("tensor count " + std::to_string(n_tensors) + " is larger than the file can hold (" +
                   std::to_string(c.remaining()) + " bytes remain after the header)",
               8);
    if (n_kv > c.remaining() / kMinKVBytes)
        c.fail("metadata kv count " + std::to_string(n_kv) + " is larger than the file can hold (" +
                   std::to_string(c.remaining()) + " bytes remain after the header)",
               16);
    if (n_kv * kMinKVBytes + n_tensors * kMinTensorInfoBytes > c.remaining())
        c.fail("tensor count " + std::to_string(n_tensors) + " and metadata kv count " + std::to_string(n_kv) +
                   " need more bytes than the file has",
               8);

    // ---- metadata
    // Counts are untrusted until the entries are parsed: grow as they arrive rather than reserving up front.
    kv_.reserve(std::min<uint64_t>(n_kv, 4096));
    uint64_t total_values = 0;
    for (uint64_t k = 0; k < n_kv; ++k) {
        uint64_t at = c.pos();
        std::string what = "metadata key #" + std::to_string(k);
        std::string key = c.read_string(what, kGGUFMaxKeyBytes);
        if (key.empty()) c.fail(what + " is empty", at);
        if (!valid_utf8(reinterpret_cast<const uint8_t*>(key.data()), key.size()))
            c.fail(what + " " + quoted(key) + " is not valid UTF-8", at);
        if (index_->kv.count(key)) c.fail("duplicate metadata key " + quoted(key), at);
        uint64_t type_at = c.pos();
        uint32_t t = c.read<uint32_t>("key " + quoted(key) + " value type");
        if (!valid_type(t))
            c.fail("key " + quoted(key) + ": value type " + std::to_string(t) + " is not a GGUF value type (0..12)",
                   type_at);
        GGUFValue v;
        ValueParser vp{c, key, total_values};
        std::vector<uint64_t> idx;
        vp.value(static_cast<GGUFType>(t), v, 1, idx);
        total_values = vp.total_values + 1;
        if (total_values > kGGUFMaxTotalValues)
            c.fail("the file holds more than " + std::to_string(kGGUFMaxTotalValues) + " metadata values in all");
        index_->kv.emplace(key, kv_.size());
        kv_.emplace_back(std::move(key), std::move(v));
    }

    alignment_ = kGGUFDefaultAlignment;
    if (const GGUFValue* a = find("general.alignment")) {
        // ggml's reader accepts only UINT32 here (ggml/src/gguf.cpp); a power of two keeps the padding
        // arithmetic exact, and the cap keeps a hostile value from pushing the data section anywhere.
        if (a->type != GGUFType::UINT32)
            c.fail(std::string("general.alignment has type ") + gguf_type_name(a->type) + "; it must be UINT32",
                   kHeaderBytes);
        if (a->u == 0 || (a->u & (a->u - 1)) != 0 || a->u > kGGUFMaxAlignment)
            c.fail("general.alignment is " + std::to_string(a->u) + "; it must be a power of two from 1 to " +
                       std::to_string(kGGUFMaxAlignment),
                   kHeaderBytes);
        alignment_ = a->u;
    }

    // ---- tensor infos
    tensors_.reserve(std::min<uint64_t>(n_tensors, 4096));
    std::vector<uint64_t> offset_at;  // byte position of each info's offset field, for messages

    for (uint64_t k = 0; k < n_tensors; ++k) {
        uint64_t at = c.pos();
        std::string what = "tensor #" + std::to_string(k) + " name";
        GGUFTensorInfo ti;
        ti.name = c.read_string(what, kGGUFMaxTensorNameBytes);
        if (ti.name.empty()) c.fail(what + " is empty", at);
        if (!valid_utf8(reinterpret_cast<const uint8_t*>(ti.name.data()), ti.name.size()))
            c.fail(what + " " + quoted(ti.name) + " is not valid UTF-8", at);
        if (index_->tensors.count(ti.name)) c.fail("duplicate tensor name " + quoted(ti.name), at);
        const std::string tw = "tensor " + quoted(ti.name);
        at = c.pos();
        uint32_t n_dims = c.read<uint32_t>(tw + " n_dims");
        if (n_dims < 1 || n_dims > kGGUFMaxDims)
            c.fail(tw + ": n_dims is " + std::to_string(n_dims) + "; GGUF tensors have 1 to 4 dims", at);
        ti.n_dims = static_cast<int>(n_dims);
        for (uint32_t d = 0; d < n_dims; ++d) {
            at = c.pos();
            uint64_t dim = c.read<uint64_t>(tw + " dim " + std::to_string(d));
            if (dim == 0 || dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
                c.fail(tw + ": dim " + std::to_string(d) + " is " + std::to_string(dim) +
                           "; every dim must be from 1 to 2^63-1",
                       at);
            ti.ne[d] = static_cast<int64_t>(dim);
        }
        at = c.pos();
        ti.type_id = c.read<uint32_t>(tw + " type");
        uint64_t n_el = 0;
        try {
            check_tensor_shape(tw, ti.type_id, ti.ne, n_dims, &n_el, &ti.nbytes);
        } catch (const Error& e) {
            c.fail(e.what(), at);
        }
        offset_at.push_back(c.pos());
        ti.offset = c.read<uint64_t>(tw + " offset");
        if (ti.offset % alignment_ != 0)
            c.fail(tw + ": data offset " + std::to_string(ti.offset) + " is not a multiple of the alignment " +
                       std::to_string(alignment_),
                   offset_at[k]);
        index_->tensors.emplace(ti.name, tensors_.size());
        tensors_.push_back(std::move(ti));
    }

    // ---- data section: starts at the first aligned offset after the infos (spec: align_offset).
    uint64_t end_of_infos = c.pos();
    data_offset_ = end_of_infos + (alignment_ - end_of_infos % alignment_) % alignment_;
    if (n_tensors == 0) return;
    if (data_offset_ > file_size_)
        c.fail("the data section would start at byte " + std::to_string(data_offset_) +
                   ", past the end of the file (size " + std::to_string(file_size_) + ")",
               end_of_infos);
    const uint64_t data_size = file_size_ - data_offset_;
    for (uint64_t k = 0; k < n_tensors; ++k) {
        const GGUFTensorInfo& t = tensors_[k];
        if (t.offset > data_size || t.nbytes > data_size - t.offset)
            c.fail("tensor " + quoted(t.name) + ": offset " + std::to_string(t.offset) + " + size " +
                       std::to_string(t.nbytes) + " is past the end of the file (the data section starts at byte " +
                       std::to_string(data_offset_) + " and holds " + std::to_string(data_size) +
                       " bytes; file size " + std::to_string(file_size_) + "); as " + type_and_dims(t) +
                       " it is " + std::to_string(t.nbytes) +
                       " bytes, so the file is truncated or the tensor's type, dims or offset are wrong",
                   offset_at[k]);
    }
    // Offsets need not follow info order when reading, but no two tensors may share bytes.
    std::vector<size_t> order(n_tensors);
    for (size_t k = 0; k < order.size(); ++k) order[k] = k;
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tensors_[a].offset < tensors_[b].offset; });
    for (size_t k = 1; k < order.size(); ++k) {
        const GGUFTensorInfo& prev = tensors_[order[k - 1]];
        const GGUFTensorInfo& cur = tensors_[order[k]];
        if (cur.offset < prev.offset + prev.nbytes)
            c.fail("tensor " + quoted(cur.name) + " (offset " + std::to_string(cur.offset) + ") overlaps tensor " +
                       quoted(prev.name) + " (offset " + std::to_string(prev.offset) + ", " +
                       std::to_string(prev.nbytes) + " bytes); " + quoted(prev.name) + " is " + type_and_dims(prev) +
                       " and " + quoted(cur.name) + " is " + type_and_dims(cur) +
                       ": one of them has a wrong type, dims or offset",
                   offset_at[order[k]]);
    }
}

std::vector<std::pair<std::string, GGUFValue>> GGUFReader::take_metadata(const std::string& prefix) {
    std::vector<std::pair<std::string, GGUFValue>> taken, kept;
    for (auto& kv : kv_) (kv.first.compare(0, prefix.size(), prefix) == 0 ? taken : kept).push_back(std::move(kv));
    kv_ = std::move(kept);
    index_->kv.clear();
    for (size_t i = 0; i < kv_.size(); ++i) index_->kv.emplace(kv_[i].first, i);
    return taken;
}

const GGUFValue* GGUFReader::find(const std::string& key) const {
    auto it = index_->kv.find(key);
    return it == index_->kv.end() ? nullptr : &kv_[it->second].second;
}

int64_t GGUFReader::get_int(const std::string& key, int64_t def) const {
    const GGUFValue* v = find(key);
    if (!v) return def;
    if (!v->is_integer())
        throw Error("GGUF file " + quoted(path_) + ": key " + quoted(key) + " has type " + gguf_type_name(v->type) +
                    ", expected an integer");
    return v->as_int();
}

double GGUFReader::get_float(const std::string& key, double def) const {
    const GGUFValue* v = find(key);
    if (!v) return def;
    if (v->type == GGUFType::BOOL || v->type == GGUFType::STRING || v->type == GGUFType::ARRAY)
        throw Error("GGUF file " + quoted(path_) + ": key " + quoted(key) + " has type " + gguf_type_name(v->type) +
                    ", expected a number");
    return v->as_float();
}

std::string GGUFReader::get_string(const std::string& key, const std::string& def) const {
    const GGUFValue* v = find(key);
    if (!v) return def;
    if (v->type != GGUFType::STRING)
        throw Error("GGUF file " + quoted(path_) + ": key " + quoted(key) + " has type " + gguf_type_name(v->type) +
                    ", expected STRING");
    return v->s;
}

const GGUFTensorInfo* GGUFReader::find_tensor(const std::string& name) const {
    auto it = index_->tensors.find(name);
    return it == index_->tensors.end() ? nullptr : &tensors_[it->second];
}

bool GGUFReader::file_changed_on_disk() const {
    struct stat st;
    if (::stat(path_.c_str(), &st) != 0) return true;
    int64_t mtime = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
    return static_cast<uint64_t>(st.st_size) != file_size_ || st.st_ino != st_ino_ || st.st_dev != st_dev_ ||
           mtime != st_mtime_ns_;
}

// ---- writer --------------------------------------------------------------------------------------

struct GGUFWriter::Impl {
    enum class State { Collecting, Data, Done, Failed };
    struct Tensor {
        std::string name;
        uint32_t type_id;
        std::vector<int64_t> ne;
        uint64_t nbytes;
        uint64_t offset;
    };

    std::string path, tmp_path;
    uint32_t alignment = kGGUFDefaultAlignment;
    int fd = -1;
    State state = State::Collecting;
    std::vector<std::pair<std::string, GGUFValue>> kv;
    std::unordered_set<std::string> keys;
    std::vector<Tensor> tensors;
    std::unordered_set<std::string> names;
    uint64_t data_size = 0;  // running, padded
    size_t cur = 0;          // tensor whose data comes next
    uint64_t cur_written = 0;
    uint64_t total = 0;        // bytes put so far (written + buffered)
    std::vector<uint8_t> buf;  // write buffer (up to kBuf bytes)
    static constexpr size_t kBuf = 4u << 20;

    std::string who() const { return "GGUFWriter(" + quoted(path) + ")"; }
    [[noreturn]] void fail(const std::string& msg) const { throw Error(who() + ": " + msg); }

    void write_raw(const void* p, size_t n) {
        const uint8_t* b = static_cast<const uint8_t*>(p);
        while (n > 0) {
            ssize_t w = ::write(fd, b, n);
            if (w < 0) {
                if (errno == EINTR) continue;
                std::string e = sys_error();
                state = State::Failed;
                fail("writing " + quoted(tmp_path) + " failed: " + e);
            }
            b += w;
            n -= static_cast<size_t>(w);
        }
    }
    void flush() {
        if (!buf.empty()) {
            write_raw(buf.data(), buf.size());
            buf.clear();
        }
    }
    void put(const void* p, size_t n) {
        total += n;
        if (buf.size() + n > kBuf) flush();
        if (n >= kBuf) {
            write_raw(p, n);
            return;
        }
        const uint8_t* b = static_cast<const uint8_t*>(p);
        buf.insert(buf.end(), b, b + n);
    }
    template <typename T>
    void put_le(T v) { put(&v, sizeof v); }
    void put_string(const std::string& s) {
        put_le<uint64_t>(s.size());
        put(s.data(), s.size());
    }
    void put_zeros(uint64_t n) {
        static const uint8_t zeros[256] = {};
        while (n > 0) {
            size_t k = static_cast<size_t>(std::min<uint64_t>(n, sizeof zeros));
            put(zeros, k);
            n -= k;
        }
    }
    void put_value(const GGUFValue& v) {
        switch (v.type) {
            case GGUFType::UINT8: case GGUFType::BOOL: put_le<uint8_t>(static_cast<uint8_t>(v.u)); break;
            case GGUFType::INT8: put_le<int8_t>(static_cast<int8_t>(v.i)); break;
            case GGUFType::UINT16: put_le<uint16_t>(static_cast<uint16_t>(v.u)); break;
            case GGUFType::INT16: put_le<int16_t>(static_cast<int16_t>(v.i)); break;
            case GGUFType::UINT32: put_le<uint32_t>(static_cast<uint32_t>(v.u)); break;
            case GGUFType::INT32: put_le<int32_t>(static_cast<int32_t>(v.i)); break;
            case GGUFType::UINT64: put_le<uint64_t>(v.u); break;
            case GGUFType::INT64: put_le<int64_t>(v.i); break;
            case GGUFType::FLOAT32: put_le<float>(static_cast<float>(v.f)); break;
            case GGUFType::FLOAT64: put_le<double>(v.f); break;
            case GGUFType::STRING: put_string(v.s); break;
            case GGUFType::ARRAY:
                put_le<uint32_t>(static_cast<uint32_t>(v.elem_type));
                put_le<uint64_t>(v.arr.size());
                for (const GGUFValue& item : v.arr) put_value(item);
                break;
        }
    }

    // Everything a reader would reject is refused here, when the value is added.
    void check_value(const std::string& where, const GGUFValue& v, int depth) const {
        if (!valid_type(static_cast<uint32_t>(v.type)))
            fail(where + ": value type " + std::to_string(static_cast<uint32_t>(v.type)) + " is not a GGUF type");
        auto range = [&](bool ok, const std::string& val) {
            if (!ok) fail(where + ": " + val + " does not fit in " + gguf_type_name(v.type));
        };
        switch (v.type) {
            case GGUFType::UINT8: range(v.u <= 0xFF, std::to_string(v.u)); break;
            case GGUFType::UINT16: range(v.u <= 0xFFFF, std::to_string(v.u)); break;
            case GGUFType::UINT32: range(v.u <= 0xFFFFFFFFu, std::to_string(v.u)); break;
            case GGUFType::INT8: range(v.i >= -128 && v.i <= 127, std::to_string(v.i)); break;
            case GGUFType::INT16: range(v.i >= -32768 && v.i <= 32767, std::to_string(v.i)); break;
            case GGUFType::INT32:
                range(v.i >= std::numeric_limits<int32_t>::min() && v.i <= std::numeric_limits<int32_t>::max(),
                      std::to_string(v.i));
                break;
            case GGUFType::BOOL: range(v.u <= 1, std::to_string(v.u)); break;
            case GGUFType::STRING:
                if (v.s.size() > kGGUFMaxStringBytes)
                    fail(where + ": string of " + std::to_string(v.s.size()) + " bytes exceeds the limit of " +
                         std::to_string(kGGUFMaxStringBytes));
                break;
            case GGUFType::ARRAY:
                if (depth > kGGUFMaxArrayDepth)
                    fail(where + ": arrays nested more than " + std::to_string(kGGUFMaxArrayDepth) + " deep");
                if (!valid_type(static_cast<uint32_t>(v.elem_type)))
                    fail(where + ": array item type " + std::to_string(static_cast<uint32_t>(v.elem_type)) +
                         " is not a GGUF type");
                if (v.arr.size() > kGGUFMaxArrayItems)
                    fail(where + ": array of " + std::to_string(v.arr.size()) + " items exceeds the limit of " +
                         std::to_string(kGGUFMaxArrayItems));
                for (size_t k = 0; k < v.arr.size(); ++k) {
                    if (v.arr[k].type != v.elem_type)
                        fail(where + " item " + std::to_string(k) + ": has type " + gguf_type_name(v.arr[k].type) +
                             " but the array holds " + gguf_type_name(v.elem_type));
                    check_value(where + " item " + std::to_string(k), v.arr[k], depth + 1);
                }
                break;
            default: break;
        }
    }

    void require(State s, const char* call) const {
        if (state == s) return;
        if (state == State::Failed) fail(std::string(call) + ": an earlier write failed; call abort()");
        if (state == State::Done) fail(std::string(call) + ": the writer is already finished or aborted");
        if (s == State::Collecting)
            fail(std::string(call) + ": the header is already written; add all metadata and tensor infos first");
        fail(std::string(call) + ": call write_header() first");
    }

    void finish_tensor_if_complete() {
        while (cur < tensors.size() && cur_written == tensors[cur].nbytes) {
            // Each tensor's data is padded with zeros to the alignment (spec: tensor_data).
            uint64_t pad = (alignment - tensors[cur].nbytes % alignment) % alignment;
            put_zeros(pad);
            ++cur;
            cur_written = 0;
        }
    }

    void close_and_remove() {
        if (fd >= 0) {
            ::close(fd);
            fd = -1;
        }
        if (!tmp_path.empty()) ::unlink(tmp_path.c_str());
    }
};

GGUFWriter::GGUFWriter(const std::string& path, uint32_t alignment) : impl_(std::make_unique<Impl>()) {
    Impl& w = *impl_;
    w.path = path;
    if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > kGGUFMaxAlignment)
        w.fail("alignment " + std::to_string(alignment) + " must be a power of two from 1 to " +
               std::to_string(kGGUFMaxAlignment));
    w.alignment = alignment;
    w.tmp_path = path + ".tmp-" + std::to_string(::getpid());
    w.fd = ::open(w.tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (w.fd < 0) {
        std::string e = sys_error();
        w.tmp_path.clear();
        w.state = Impl::State::Done;
        w.fail("cannot create the temporary file next to the target: " + e);
    }
    w.buf.reserve(Impl::kBuf);
}

GGUFWriter::~GGUFWriter() {
    if (impl_ && impl_->state != Impl::State::Done) impl_->close_and_remove();
}

void GGUFWriter::add_kv(const std::string& key, const GGUFValue& value) {
    Impl& w = *impl_;
    w.require(Impl::State::Collecting, "add_kv");
    if (key.empty() || key.size() > kGGUFMaxKeyBytes)
        w.fail("metadata key " + quoted(key) + " must be 1 to " + std::to_string(kGGUFMaxKeyBytes) + " bytes");
    if (!valid_utf8(reinterpret_cast<const uint8_t*>(key.data()), key.size()))
        w.fail("metadata key " + quoted(key) + " is not valid UTF-8");
    if (w.keys.count(key)) w.fail("duplicate metadata key " + quoted(key));
    w.check_value("key " + quoted(key), value, 1);
    if (key == "general.alignment") {
        // The writer owns the alignment: it lays out the data with it, so the key may only repeat it.
        if (!value.is_integer() || value.type == GGUFType::BOOL || value.as_int() != w.alignment)
            w.fail("general.alignment is set by the writer's alignment argument (" + std::to_string(w.alignment) +
                   "); pass the alignment to the constructor instead");
        GGUFValue a;
        a.type = GGUFType::UINT32;
        a.u = w.alignment;
        w.keys.insert(key);
        w.kv.emplace_back(key, a);
        return;
    }
    w.keys.insert(key);
    w.kv.emplace_back(key, value);
}

void GGUFWriter::add_tensor_info(const std::string& name, uint32_t type_id, const std::vector<int64_t>& ne) {
    Impl& w = *impl_;
    w.require(Impl::State::Collecting, "add_tensor_info");
    if (name.empty() || name.size() > kGGUFMaxTensorNameBytes)
        w.fail("tensor name " + quoted(name) + " must be 1 to " + std::to_string(kGGUFMaxTensorNameBytes) +
               " bytes (llama.cpp's limit)");
    if (!valid_utf8(reinterpret_cast<const uint8_t*>(name.data()), name.size()))
        w.fail("tensor name " + quoted(name) + " is not valid UTF-8");
    if (w.names.count(name)) w.fail("duplicate tensor name " + quoted(name));
    uint64_t n_el = 0, nbytes = 0;
    try {
        check_tensor_shape("tensor " + quoted(name), type_id, ne.data(), ne.size(), &n_el, &nbytes);
    } catch (const Error& e) {
        w.fail(e.what());
    }
    uint64_t padded = nbytes + (w.alignment - nbytes % w.alignment) % w.alignment;
    if (padded > std::numeric_limits<uint64_t>::max() / 2 - w.data_size)
        w.fail("tensor " + quoted(name) + ": the data section would exceed 2^63 bytes");
    w.names.insert(name);
    w.tensors.push_back({name, type_id, ne, nbytes, w.data_size});
    w.data_size += padded;
}

void GGUFWriter::write_header() {
    Impl& w = *impl_;
    w.require(Impl::State::Collecting, "write_header");
    if (!w.keys.count("general.alignment")) {
        GGUFValue a;
        a.type = GGUFType::UINT32;
        a.u = w.alignment;
        w.keys.insert("general.alignment");
        w.kv.emplace_back("general.alignment", a);
    }
    w.state = Impl::State::Data;
    w.put_le<uint32_t>(kMagic);
    w.put_le<uint32_t>(3);
    w.put_le<uint64_t>(w.tensors.size());
    w.put_le<uint64_t>(w.kv.size());
    for (const auto& [key, value] : w.kv) {
        w.put_string(key);
        w.put_le<uint32_t>(static_cast<uint32_t>(value.type));
        w.put_value(value);
    }
    for (const auto& t : w.tensors) {
        w.put_string(t.name);
        w.put_le<uint32_t>(static_cast<uint32_t>(t.ne.size()));
        for (int64_t d : t.ne) w.put_le<uint64_t>(static_cast<uint64_t>(d));
        w.put_le<uint32_t>(t.type_id);
        w.put_le<uint64_t>(t.offset);
    }
    // Zero padding up to the aligned start of the data section (spec: align_offset).
    w.put_zeros((w.alignment - w.total % w.alignment) % w.alignment);
    w.finish_tensor_if_complete();
}

void GGUFWriter::write_tensor_data(const void* data, size_t size) {
    Impl& w = *impl_;
    w.require(Impl::State::Data, "write_tensor_data");
    if (w.cur >= w.tensors.size())
        w.fail("write_tensor_data: all " + std::to_string(w.tensors.size()) +
               " declared tensors are already written; call finish()");
    const Impl::Tensor& t = w.tensors[w.cur];
    if (size > t.nbytes - w.cur_written)
        w.fail("write_tensor_data: tensor " + quoted(t.name) + " is " + std::to_string(t.nbytes) + " bytes and " +
               std::to_string(w.cur_written) + " are written; " + std::to_string(size) +
               " more is too many (data must come in add_tensor_info order)");
    w.put(data, size);
    w.cur_written += size;
    w.finish_tensor_if_complete();
}

void GGUFWriter::finish() {
    Impl& w = *impl_;
    if (w.state == Impl::State::Collecting) write_header();
    w.require(Impl::State::Data, "finish");
    if (w.cur < w.tensors.size())
        w.fail("finish: tensor " + quoted(w.tensors[w.cur].name) + " has " + std::to_string(w.cur_written) + " of " +
               std::to_string(w.tensors[w.cur].nbytes) + " bytes, and " +
               std::to_string(w.tensors.size() - w.cur - 1) + " tensors after it have none; write all data first");
    w.flush();
    if (::fsync(w.fd) != 0) {
        std::string e = sys_error();
        w.state = Impl::State::Failed;
        w.fail("fsync of " + quoted(w.tmp_path) + " failed: " + e);
    }
    int rc = ::close(w.fd);
    w.fd = -1;
    if (rc != 0) {
        std::string e = sys_error();
        w.state = Impl::State::Failed;
        w.fail("closing " + quoted(w.tmp_path) + " failed: " + e);
    }
    if (::rename(w.tmp_path.c_str(), w.path.c_str()) != 0) {
        std::string e = sys_error();
        w.state = Impl::State::Failed;
        w.fail("cannot move the finished file onto the target: " + e);
    }
    w.state = Impl::State::Done;
    // Make the rename itself durable; a failure here leaves a complete file, so it is not an error.
    size_t slash = w.path.find_last_of('/');
    std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : w.path.substr(0, slash);
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}

void GGUFWriter::abort() {
    Impl& w = *impl_;
    if (w.state == Impl::State::Done) return;
    w.close_and_remove();
    w.state = Impl::State::Done;
}

}  // namespace lowbit
