// C++ test of the GGUF reader on hostile input (crafted cases, every truncation, deterministic corruptions)
// and of the quant types' round trip; built with -DLOWBIT_TESTS=ON, run under ASan/UBSan by tools/sanitize.sh.
// Files are built byte by byte here, independently of lowbit's writer. Exit status 0 = all passed.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../fuzz/gguf_walk.h"
#include "test_util.h"
#include "lowbit/gguf.h"
#include "lowbit/kernels.h"
#include "lowbit/types.h"

using lowbit::GGUFType;
using Bytes = std::vector<uint8_t>;

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
    ++g_checks;
    if (!ok && ++g_failures <= 30) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

std::string g_dir;

std::string write_tmp(const Bytes& b, const std::string& name = "case.gguf") {
    std::string p = g_dir + "/" + name;
    FILE* f = std::fopen(p.c_str(), "wb");
    if (!f) {
        std::perror("fopen");
        std::exit(2);
    }
    if (!b.empty()) std::fwrite(b.data(), 1, b.size(), f);
    std::fclose(f);
    return p;
}

// ---- little-endian byte builder -----------------------------------------------------------------

template <typename T>
void put(Bytes& b, T v) {
    uint8_t tmp[sizeof(T)];
    std::memcpy(tmp, &v, sizeof(T));
    b.insert(b.end(), tmp, tmp + sizeof(T));
}
void put_str(Bytes& b, const std::string& s) {
    put<uint64_t>(b, s.size());
    b.insert(b.end(), s.begin(), s.end());
}
void append(Bytes& b, const Bytes& x) { b.insert(b.end(), x.begin(), x.end()); }

Bytes header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    Bytes b = {'G', 'G', 'U', 'F'};
    put<uint32_t>(b, version);
    put<uint64_t>(b, n_tensors);
    put<uint64_t>(b, n_kv);
    return b;
}
Bytes kv_head(const std::string& key, uint32_t type) {
    Bytes b;
    put_str(b, key);
    put<uint32_t>(b, type);
    return b;
}
Bytes kv_u32(const std::string& key, uint32_t v) {
    Bytes b = kv_head(key, 4);
    put<uint32_t>(b, v);
    return b;
}
Bytes tinfo(const std::string& name, const std::vector<uint64_t>& ne, uint32_t type, uint64_t offset) {
    Bytes b;
    put_str(b, name);
    put<uint32_t>(b, static_cast<uint32_t>(ne.size()));
    for (uint64_t d : ne) put<uint64_t>(b, d);
    put<uint32_t>(b, type);
    put<uint64_t>(b, offset);
    return b;
}
void pad_to(Bytes& b, size_t a) {
    while (b.size() % a) b.push_back(0);
}

// A file with every metadata value type (nested arrays too) and one tensor of every type lowbit computes with.
struct ValidFile {
    Bytes bytes;
    std::vector<std::pair<std::string, uint32_t>> tensors;  // name, type
    std::vector<Bytes> data;                                // each tensor's bytes
};

ValidFile make_valid_file() {
    std::mt19937 rng(11);
    ValidFile v;
    Bytes kvs;
    int n_kv = 0;
    auto add = [&](const Bytes& x) { append(kvs, x); ++n_kv; };
    { Bytes x = kv_head("u8", 0); put<uint8_t>(x, 200); add(x); }
    { Bytes x = kv_head("i8", 1); put<int8_t>(x, -7); add(x); }
    { Bytes x = kv_head("u16", 2); put<uint16_t>(x, 60000); add(x); }
    { Bytes x = kv_head("i16", 3); put<int16_t>(x, -300); add(x); }
    add(kv_u32("u32", 4000000000u));
    { Bytes x = kv_head("i32", 5); put<int32_t>(x, -123456); add(x); }
    { Bytes x = kv_head("f32", 6); put<float>(x, 0.5f); add(x); }
    { Bytes x = kv_head("bool", 7); put<uint8_t>(x, 1); add(x); }
    { Bytes x = kv_head("general.architecture", 8); put_str(x, "llama"); add(x); }
    { Bytes x = kv_head("u64", 10); put<uint64_t>(x, (1ull << 63) + 5); add(x); }
    { Bytes x = kv_head("i64", 11); put<int64_t>(x, -(1ll << 40)); add(x); }
    { Bytes x = kv_head("f64", 12); put<double>(x, -1.25e300); add(x); }
    {   // ["a", "bc", ""]
        Bytes x = kv_head("strings", 9);
        put<uint32_t>(x, 8);
        put<uint64_t>(x, 3);
        put_str(x, "a");
        put_str(x, "bc");
        put_str(x, "");
        add(x);
    }
    {   // [[1, 2] INT32, ["x"] STRING, [] UINT8]
        Bytes x = kv_head("nest", 9);
        put<uint32_t>(x, 9);
        put<uint64_t>(x, 3);
        put<uint32_t>(x, 5); put<uint64_t>(x, 2); put<int32_t>(x, 1); put<int32_t>(x, 2);
        put<uint32_t>(x, 8); put<uint64_t>(x, 1); put_str(x, "x");
        put<uint32_t>(x, 0); put<uint64_t>(x, 0);
        add(x);
    }
    const std::vector<std::pair<std::string, uint32_t>> types = {
        {"f32", 0}, {"f16", 1}, {"bf16", 30}, {"q8_0", 8}, {"q4_0", 2}, {"q4_1", 3}, {"nf4", 1024}, {"nf4_dq", 1025}};
    Bytes infos;
    uint64_t off = 0;
    for (const auto& [name, type] : types) {
        const std::vector<int64_t> ne = {128, 2};
        uint64_t nb = lowbit::gguf_tensor_nbytes(type, ne);
        Bytes d(nb);
        // Half-precision scales (and NF4 absmax) must be finite for the dequantize check; a small random byte
        // pattern in every other byte keeps them so.
        for (size_t i = 0; i < d.size(); ++i) d[i] = static_cast<uint8_t>(i % 2 ? rng() % 0x30 : rng());
        if (type == 1024 || type == 1025)
            for (size_t i = 0; i < d.size(); ++i) d[i] = static_cast<uint8_t>(rng() % 0x3c);
        append(infos, tinfo(name + ".weight", {128, 2}, type, off));
        v.tensors.emplace_back(name + ".weight", type);
        v.data.push_back(d);
        off += nb + (32 - nb % 32) % 32;
    }
    v.bytes = header(types.size(), n_kv);
    append(v.bytes, kvs);
    append(v.bytes, infos);
    pad_to(v.bytes, 32);
    for (const Bytes& d : v.data) {
        append(v.bytes, d);
        pad_to(v.bytes, 32);
    }
    return v;
}

// ---- the cases ------------------------------------------------------------------------------------

void expect_refused(const std::string& name, const Bytes& b, const std::string& fragment) {
    std::string p = write_tmp(b);
    try {
        lowbit::GGUFReader r(p);
        check(false, name + ": accepted, expected a refusal containing '" + fragment + "'");
    } catch (const lowbit::Error& e) {
        std::string msg = e.what();
        check(msg.find(fragment) != std::string::npos, name + ": message '" + msg + "' lacks '" + fragment + "'");
        check(msg.find("[at byte ") != std::string::npos, name + ": message '" + msg + "' lacks the byte offset");
    }
}

void crafted_cases() {
    expect_refused("empty", {}, "is 0 bytes");
    expect_refused("magic", [] { Bytes b = header(0, 0); b[3] = 'L'; return b; }(), "not a GGUF file");
    expect_refused("version 1", header(0, 0, 1), "version 1 is not supported");
    expect_refused("big-endian", header(0, 0, 0x03000000u), "big-endian");
    expect_refused("tensor count", header(1ull << 40, 0), "exceeds the limit");
    expect_refused("tensor count vs size", header(1000, 0), "larger than the file can hold");
    expect_refused("kv count", header(0, 1ull << 63), "exceeds the limit");
    expect_refused("kv count vs entries", [] { Bytes b = header(0, 3); append(b, kv_u32("a", 1)); return b; }(),
                   "metadata kv count 3");
    expect_refused("string length", [] {
        Bytes b = header(0, 1); append(b, kv_head("s", 8)); put<uint64_t>(b, 1ull << 63); return b; }(),
        "exceeds the limit");
    expect_refused("string past end", [] {
        Bytes b = header(0, 1); append(b, kv_head("s", 8)); put<uint64_t>(b, 1000); b.push_back('a'); return b; }(),
        "needs 1000 bytes");
    expect_refused("key utf8", [] {
        Bytes b = header(0, 1); Bytes k = kv_head(std::string("\xc0\xaf", 2), 0); append(b, k); b.push_back(1);
        return b; }(), "not valid UTF-8");
    expect_refused("key surrogate", [] {
        Bytes b = header(0, 1); append(b, kv_head(std::string("\xed\xa0\x80", 3), 0)); b.push_back(1); return b; }(),
        "not valid UTF-8");
    expect_refused("empty key", [] {
        Bytes b = header(0, 2); append(b, kv_head("", 0)); b.push_back(1); append(b, kv_u32("p", 1)); return b; }(),
        "is empty");
    expect_refused("duplicate key", [] {
        Bytes b = header(0, 2); append(b, kv_u32("k", 1)); append(b, kv_u32("k", 2)); return b; }(),
        "duplicate metadata key");
    expect_refused("value type", [] {
        Bytes b = header(0, 1); append(b, kv_head("v", 13)); put<uint64_t>(b, 0); return b; }(),
        "value type 13");
    expect_refused("bool", [] { Bytes b = header(0, 1); append(b, kv_head("b", 7)); b.push_back(2); return b; }(),
                   "BOOL value is 2");
    expect_refused("array count", [] {
        Bytes b = header(0, 1); append(b, kv_head("a", 9)); put<uint32_t>(b, 0); put<uint64_t>(b, 1ull << 63);
        return b; }(), "exceeds the limit");
    expect_refused("array vs size", [] {
        Bytes b = header(0, 1); append(b, kv_head("a", 9)); put<uint32_t>(b, 4); put<uint64_t>(b, 1000);
        b.resize(b.size() + 40); return b; }(), "needs at least 4000 bytes");
    expect_refused("array item type", [] {
        Bytes b = header(0, 1); append(b, kv_head("a", 9)); put<uint32_t>(b, 99); put<uint64_t>(b, 1);
        put<uint64_t>(b, 0); return b; }(), "array item type 99");
    expect_refused("array nesting", [] {
        Bytes b = header(0, 1); append(b, kv_head("deep", 9));
        for (int i = 0; i < 8; ++i) { put<uint32_t>(b, 9); put<uint64_t>(b, 1); }
        put<uint32_t>(b, 0); put<uint64_t>(b, 1); b.push_back(7); return b; }(), "nested more than 8 deep");
    auto one_tensor = [](const Bytes& info, size_t data_bytes, const Bytes& kvs = {}, uint64_t n_kv = 0) {
        Bytes b = header(1, n_kv);
        append(b, kvs);
        append(b, info);
        pad_to(b, 32);
        b.resize(b.size() + data_bytes);
        return b;
    };
    expect_refused("n_dims 0", one_tensor(tinfo("t", {}, 0, 0), 64), "n_dims is 0");
    expect_refused("n_dims 5", one_tensor(tinfo("t", {1, 1, 1, 1, 1}, 0, 0), 64), "n_dims is 5");
    expect_refused("dim 0", one_tensor(tinfo("t", {4, 0}, 0, 0), 64), "dim 1 is 0");
    expect_refused("dim 2^63", one_tensor(tinfo("t", {1ull << 63}, 0, 0), 64), "dim 0 is 9223372036854775808");
    expect_refused("element overflow", one_tensor(tinfo("t", {1ull << 32, 1ull << 32}, 0, 0), 64), "overflows");
    expect_refused("byte overflow", one_tensor(tinfo("t", {1ull << 31, 1ull << 31}, 0, 0), 64), "overflows");
    expect_refused("block size", one_tensor(tinfo("t", {33}, 2, 0), 64), "not a multiple of");
    expect_refused("nf4 block size", one_tensor(tinfo("t", {32}, 1024, 0), 64), "not a multiple of");
    expect_refused("unknown type", one_tensor(tinfo("t", {8}, 99, 0), 64), "unknown tensor type id 99");
    expect_refused("name 64", one_tensor(tinfo(std::string(64, 'n'), {8}, 0, 0), 64), "exceeds the limit of 63");
    expect_refused("name utf8", one_tensor(tinfo("\xff", {8}, 0, 0), 64), "not valid UTF-8");
    expect_refused("misaligned offset", one_tensor(tinfo("t", {8}, 0, 4), 64), "not a multiple of the alignment");
    expect_refused("data short", one_tensor(tinfo("t", {8}, 0, 0), 31), "is past the end");
    expect_refused("offset wraps", one_tensor(tinfo("t", {8}, 0, ~0ull - 31), 32), "is past the end");
    expect_refused("data section past end", [] { Bytes b = header(1, 0); append(b, tinfo("t", {8}, 0, 0)); return b; }(),
                   "data section would start");
    expect_refused("alignment 3", one_tensor(tinfo("t", {8}, 0, 0), 64, kv_u32("general.alignment", 3), 1),
                   "must be a power of two");
    expect_refused("alignment 2^31", one_tensor(tinfo("t", {8}, 0, 0), 64, kv_u32("general.alignment", 1u << 31), 1),
                   "must be a power of two");
    expect_refused("alignment type", [&] {
        Bytes k = kv_head("general.alignment", 10); put<uint64_t>(k, 32);
        return one_tensor(tinfo("t", {8}, 0, 0), 64, k, 1); }(), "must be UINT32");
    expect_refused("overlap", [] {
        Bytes b = header(2, 0); append(b, tinfo("a", {16}, 0, 0)); append(b, tinfo("b", {8}, 0, 32));
        pad_to(b, 32); b.resize(b.size() + 96); return b; }(), "overlaps");
    expect_refused("duplicate tensor", [] {
        Bytes b = header(2, 0); append(b, tinfo("t", {8}, 0, 0)); append(b, tinfo("t", {8}, 0, 32));
        pad_to(b, 32); b.resize(b.size() + 64); return b; }(), "duplicate tensor name");
}

void valid_file_is_read_exactly(const ValidFile& v) {
    std::string p = write_tmp(v.bytes, "valid.gguf");
    try {
        lowbit::GGUFReader r(p);
        gguf_walk::walk(r, v.bytes.data(), v.bytes.size());
        check(r.metadata().size() == 14, "valid: 14 metadata keys");
        check(r.get_int("u8", 0) == 200 && r.get_int("i8", 0) == -7 && r.get_int("u16", 0) == 60000 &&
                  r.get_int("i16", 0) == -300 && r.get_int("u32", 0) == 4000000000ll && r.get_int("i32", 0) == -123456 &&
                  r.get_int("i64", 0) == -(1ll << 40),
              "valid: integer values");
        check(r.find("u64") && r.find("u64")->u == (1ull << 63) + 5, "valid: UINT64 value");
        check(r.get_float("f32", 0) == 0.5 && r.get_float("f64", 0) == -1.25e300, "valid: float values");
        check(r.find("bool") && r.find("bool")->u == 1, "valid: bool");
        check(r.get_string("general.architecture", "") == "llama", "valid: string");
        const lowbit::GGUFValue* s = r.find("strings");
        check(s && s->arr.size() == 3 && s->arr[1].s == "bc" && s->arr[2].s.empty(), "valid: string array");
        const lowbit::GGUFValue* n = r.find("nest");
        check(n && n->arr.size() == 3 && n->arr[0].elem_type == GGUFType::INT32 && n->arr[0].arr[1].i == 2 &&
                  n->arr[1].arr[0].s == "x" && n->arr[2].arr.empty(),
              "valid: nested arrays");
        check(r.tensors().size() == v.tensors.size(), "valid: tensor count");
        for (size_t k = 0; k < v.tensors.size() && k < r.tensors().size(); ++k) {
            const lowbit::GGUFTensorInfo& t = r.tensors()[k];
            check(t.name == v.tensors[k].first && t.type_id == v.tensors[k].second && t.nbytes == v.data[k].size() &&
                      std::memcmp(r.tensor_data(t), v.data[k].data(), t.nbytes) == 0,
                  "valid: tensor " + v.tensors[k].first);
        }
        gguf_walk::round_trip(r, g_dir + "/copy.gguf");
    } catch (const lowbit::Error& e) {
        check(false, std::string("valid file refused: ") + e.what());
    } catch (const gguf_walk::Violation& e) {
        check(false, "valid file: " + e.what);
    }
}

// Opens b; a refusal is fine, acceptance must keep every promise. Anything else is a failure.
void open_hostile(const std::string& name, const Bytes& b, int* accepted) {
    std::string p = write_tmp(b);
    try {
        lowbit::GGUFReader r(p);
        gguf_walk::walk(r, b.data(), b.size());
        ++*accepted;
        ++g_checks;
    } catch (const lowbit::Error& e) {
        check(std::string(e.what()).find("[at byte ") != std::string::npos,
              name + ": message without a byte offset: " + e.what());
    } catch (const gguf_walk::Violation& e) {
        check(false, name + ": " + e.what);
    } catch (const std::exception& e) {
        check(false, name + ": threw something other than lowbit::Error: " + e.what());
    }
}

void truncations(const ValidFile& v) {
    // Every prefix up to the end of the last tensor's bytes is refused.
    size_t end = v.bytes.size();
    size_t refused = 0;
    for (size_t n = 0; n < end; ++n) {
        Bytes b(v.bytes.begin(), v.bytes.begin() + n);
        int accepted = 0;
        open_hostile("truncated to " + std::to_string(n), b, &accepted);
        // The last tensor ends exactly at the end of the file (its padding is already there only when
        // its size is a multiple of 32), so every shorter prefix loses tensor bytes.
        if (accepted == 0) ++refused;
        else check(n >= end - ((32 - v.data.back().size() % 32) % 32), "truncated to " + std::to_string(n) + " accepted");
    }
    std::printf("  truncations: %zu prefixes, %zu refused\n", end, refused);
}

void corruptions(const ValidFile& v, int n_cases) {
    // Most corruptions hit the header, metadata and tensor infos, where they change how the file parses.
    size_t data_bytes = 0;
    for (const Bytes& d : v.data) data_bytes += d.size() + (32 - d.size() % 32) % 32;
    const size_t data_start = v.bytes.size() - data_bytes;
    std::mt19937_64 rng(20240607);
    const uint64_t hostile[] = {0, 1, 0xFF, 0xFFFF, 0xFFFFFFFFull, 1ull << 31, 1ull << 32, 1ull << 63, ~0ull, 1024,
                                1025, 33, 9, 13, 64};
    int accepted = 0;
    for (int c = 0; c < n_cases; ++c) {
        Bytes b = v.bytes;
        const int kind = static_cast<int>(rng() % 5);
        const size_t pos = rng() % 8 ? rng() % data_start : rng() % b.size();
        switch (kind) {
            case 0: b[pos] ^= static_cast<uint8_t>(1u << (rng() % 8)); break;           // flip a bit
            case 1: b[pos] = static_cast<uint8_t>(rng()); break;                         // random byte
            case 2: {                                                                    // hostile 8-byte field
                uint64_t x = hostile[rng() % (sizeof hostile / sizeof hostile[0])];
                for (int k = 0; k < 8 && pos + k < b.size(); ++k) b[pos + k] = static_cast<uint8_t>(x >> (8 * k));
                break;
            }
            case 3: {                                                                    // hostile 4-byte field
                uint32_t x = static_cast<uint32_t>(hostile[rng() % (sizeof hostile / sizeof hostile[0])]);
                for (int k = 0; k < 4 && pos + k < b.size(); ++k) b[pos + k] = static_cast<uint8_t>(x >> (8 * k));
                break;
            }
            default: {                                                                   // insert or delete bytes
                size_t n = 1 + rng() % 16;
                if (rng() % 2) b.insert(b.begin() + pos, n, static_cast<uint8_t>(rng()));
                else b.erase(b.begin() + pos, b.begin() + std::min(b.size(), pos + n));
            }
        }
        open_hostile("corruption #" + std::to_string(c), b, &accepted);
    }
    std::printf("  corruptions: %d cases, %d still valid files (walked), none crashed\n", n_cases, accepted);
}

// Finding F1 of the fuzz run (RELIABILITY.md, fixed): general.alignment 1 or 2 puts tensor data at addresses that
// are not multiples of 2 or 4. The reader accepts such files (llama.cpp does too) and dequantize() must read
// them correctly instead of loading through misaligned uint16_t/float/block pointers (undefined behaviour that
// UBSan stops). Runs in a child so a sanitizer abort is one failed check, not the whole test.
void misaligned_tensor_data() {
    struct Case {
        const char* name;
        uint32_t alignment, type;
        Bytes data;       // the tensor's bytes
        float expected[2];  // the first two values
        int64_t n = 2;      // elements
    };
    Bytes q8{0x00, 0x38, 2, 0xfc};  // Q8_0: d = 0.5 (fp16 0x3800), qs = 2, -4, then zeros
    q8.resize(34, 0);
    Bytes nf4{0, 0, 0, 0x40, 0xf0};  // NF4: absmax = 2.0f, byte 0 = code 15 (1.0) high, code 0 (-1.0) low
    nf4.resize(36, 0);
    // NF4_DQ (tensor-level layout, more bytes than blocks x block size: fuzz finding F2): 256 elements whose
    // aligned dequantization gives the expected values.
    std::vector<float> src(256);
    for (int i = 0; i < 256; ++i) src[i] = std::sin(0.37f * static_cast<float>(i)) * (1.0f + static_cast<float>(i % 7));
    Bytes dq(lowbit::nf4_dq_nbytes(256));
    lowbit::quantize(lowbit::QType::NF4_DQ, src.data(), dq.data(), 1, 256, 1);
    std::vector<float> dq_ref(256);
    lowbit::dequantize(lowbit::QType::NF4_DQ, dq.data(), dq_ref.data(), 256, 1);
    const Case cases[] = {
        {"NF4_DQ at an odd address (alignment 1)", 1, 1025, dq, {dq_ref[0], dq_ref[1]}, 256},
        {"F16 at an odd address (alignment 1)", 1, 1, {0x00, 0x3c, 0x00, 0xc0}, {1.0f, -2.0f}},
        {"BF16 at an odd address (alignment 1)", 1, 30, {0x80, 0x3f, 0x40, 0xc0}, {1.0f, -3.0f}},
        {"F32 at address 2 mod 4 (alignment 2)", 2, 0, {0, 0, 0x80, 0x3f, 0, 0, 0, 0x40}, {1.0f, 2.0f}},
        {"Q8_0 at an odd address (alignment 1)", 1, 8, q8, {1.0f, -2.0f}, 32},
        {"NF4 at address 2 mod 4 (alignment 2)", 2, 1024, nf4, {2.0f, -2.0f}, 64},
    };
    for (const Case& c : cases) {
        // A tensor name of 1..4 bytes moves the end of the infos (= the data section) to the wanted residue.
        Bytes b;
        for (std::string name = "t"; name.size() <= 4; name += "t") {
            b = header(1, 1);
            append(b, kv_u32("general.alignment", c.alignment));
            append(b, tinfo(name, {static_cast<uint64_t>(c.n)}, c.type, 0));
            if (c.alignment == 1 ? b.size() % 2 == 1 : b.size() % 4 == 2) break;
        }
        append(b, c.data);
        const std::string p = write_tmp(b, "misaligned.gguf");
        std::fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            try {
                lowbit::GGUFReader r(p);
                const lowbit::GGUFTensorInfo& t = r.tensors().at(0);
                std::vector<float> y(static_cast<size_t>(c.n));
                lowbit::dequantize(static_cast<lowbit::QType>(t.type_id), r.tensor_data(t), y.data(), c.n, 1);
                _exit(y[0] == c.expected[0] && y[1] == c.expected[1] ? 0 : 3);
            } catch (const lowbit::Error&) {
                _exit(4);  // the file is valid: refusing it is a bug
            }
        }
        int st = 0;
        waitpid(pid, &st, 0);
        const bool ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
        check(ok, std::string("misaligned tensor data, ") + c.name + ": " +
                      (WIFEXITED(st) ? (WEXITSTATUS(st) == 3 ? "wrong values" : WEXITSTATUS(st) == 4 ? "refused a valid file" : "child exit " + std::to_string(WEXITSTATUS(st)))
                                     : "child killed by signal " + std::to_string(WTERMSIG(st))) +
                      " (RELIABILITY.md finding F1)");
    }
}

// ---- quant types: quantize -> dequantize round trip within each format's bound -------------------

float randn(std::mt19937& rng) {
    static std::normal_distribution<float> nd(0.0f, 1.0f);
    return nd(rng);
}

void quant_round_trip() {
    using lowbit::QType;
    namespace cpu = lowbit::cpu;
    std::mt19937 rng(5);
    const int64_t rows = 3, k = 256;  // (rows, k); k covers 8 Q blocks and 4 NF4 blocks per row
    std::vector<float> x(rows * k);
    for (float& f : x) f = randn(rng) * 3.0f;
    x[5] = 40.0f;  // an outlier in the first block
    const QType types[] = {QType::F32, QType::F16, QType::BF16, QType::Q8_0,
                           QType::Q4_0, QType::Q4_1, QType::NF4, QType::NF4_DQ};
    for (QType t : types) {
        const lowbit::TypeTraits& tr = lowbit::supported_traits(t);
        const size_t nbytes = tr.tensor_level ? lowbit::nf4_dq_nbytes(rows * k) : lowbit::row_size(t, k) * rows;
        uint64_t nb_check = 0;
        check(lowbit::tensor_nbytes(static_cast<uint32_t>(t), rows * k, &nb_check) && nb_check == nbytes,
              std::string(tr.name) + ": tensor_nbytes agrees with row_size");
        Bytes q1(nbytes), q2(nbytes);
        lowbit::quantize(t, x.data(), q1.data(), rows, k, 1);
        lowbit::quantize(t, x.data(), q2.data(), rows, k, 2);
        check(q1 == q2, std::string(tr.name) + ": 1 and 2 threads quantize identically");
        std::vector<float> y(rows * k);
        lowbit::dequantize(t, q1.data(), y.data(), rows * k, 2);
        // Per-block error bound from each format's definition (spec/quant-types.md): half a step for
        // rounding formats, a full step for Q4_0 (its top code is clamped), plus the scale's fp16 rounding.
        const int64_t bs = (t == QType::F32 || t == QType::F16 || t == QType::BF16) ? 1 : tr.block_size;
        double worst = 0;
        for (int64_t b0 = 0; b0 < rows * k; b0 += bs) {
            double amax = 0, mn = 1e30, mx = -1e30;
            for (int64_t i = b0; i < b0 + bs; ++i) {
                amax = std::max(amax, std::fabs(static_cast<double>(x[i])));
                mn = std::min(mn, static_cast<double>(x[i]));
                mx = std::max(mx, static_cast<double>(x[i]));
            }
            double bound;
            switch (t) {
                case QType::F32: bound = 0; break;
                case QType::F16: bound = amax * std::ldexp(1.0, -11); break;
                case QType::BF16: bound = amax * std::ldexp(1.0, -8); break;
                case QType::Q8_0: bound = amax / 127 * (0.5 + 127 * std::ldexp(1.0, -11)) + 1e-6; break;
                case QType::Q4_0: bound = amax / 8 * (1.0 + 8 * std::ldexp(1.0, -11)) + 1e-6; break;
                case QType::Q4_1: bound = (mx - mn) / 15 * (0.5 + 15 * std::ldexp(1.0, -11)) + std::fabs(mn) * 1e-3 + 1e-6; break;
                // Nearest code: at most half the widest gap of the code book, (-0.6962 - -1) / 2.
                case QType::NF4: bound = amax * 0.15191 + 1e-6; break;
                default: bound = amax * 0.15191 * 1.05 + amax * 0.02; break;  // NF4_DQ: absmax itself 8-bit coded
            }
            for (int64_t i = b0; i < b0 + bs; ++i) {
                double err = std::fabs(static_cast<double>(y[i]) - x[i]);
                worst = std::max(worst, err / (bound + 1e-12));
                if (err > bound) {
                    check(false, std::string(tr.name) + ": element " + std::to_string(i) + " error " +
                                     std::to_string(err) + " > bound " + std::to_string(bound));
                    break;
                }
            }
        }
        ++g_checks;
        // Every ISA's quantizer is bit-exact with the generic reference.
        if (tr.is_quantized && !tr.tensor_level) {
            for (cpu::Isa isa : {cpu::Isa::AVX2, cpu::Isa::AVX512, cpu::Isa::NEON}) {
                if (cpu::kernels_for(isa) == nullptr) continue;  // this CPU or build cannot run that ISA
                cpu::set_isa(cpu::Isa::Generic);
                lowbit::quantize(t, x.data(), q1.data(), rows, k, 1);
                cpu::set_isa(isa);
                lowbit::quantize(t, x.data(), q2.data(), rows, k, 1);
                check(q1 == q2, std::string(tr.name) + ": " + cpu::isa_name(isa) + " quantizer equals the reference");
                cpu::reset_isa();
            }
        }
        // Dequantizing arbitrary bytes never reads or writes out of bounds (ASan checks).
        Bytes junk(nbytes);
        for (uint8_t& c : junk) c = static_cast<uint8_t>(rng());
        lowbit::dequantize(t, junk.data(), y.data(), rows * k, 2);
        std::printf("  %-6s round trip: worst error %.2f of its bound\n", tr.name, worst);
    }
}

}  // namespace

int main() {
    g_dir = make_temp_dir("lowbit-test-gguf");
    if (g_dir.empty()) return 2;

    const int n_corruptions = std::getenv("LOWBIT_TEST_CORRUPTIONS") ? std::atoi(std::getenv("LOWBIT_TEST_CORRUPTIONS")) : 500;
    std::printf("test_gguf_reader\n");
    crafted_cases();
    std::printf("  crafted cases: done\n");
    ValidFile v = make_valid_file();
    valid_file_is_read_exactly(v);
    truncations(v);
    corruptions(v, n_corruptions);
    misaligned_tensor_data();
    quant_round_trip();

    for (const char* f : {"case.gguf", "valid.gguf", "copy.gguf", "misaligned.gguf"}) ::unlink((g_dir + "/" + f).c_str());
    ::rmdir(g_dir.c_str());
    std::printf("test_gguf_reader: %d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
