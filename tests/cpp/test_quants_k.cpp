// C++ test of the K-quant reference quantizers: llama.cpp's bytes (spec/golden/kquants/*.json) and round-trip error.
// Exit status 0 = all passed. The golden files come from spec/golden/make_golden_kquants.py.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/types.h"

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
    ++g_checks;
    if (!ok && ++g_failures <= 20) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

// One K type: its name in the golden files, bytes per super-block, the row functions, and the round-trip
// bounds on normal data: relative RMS error and the largest |x - y| as a fraction of max |x|.
struct KType {
    const char* name;
    size_t block_bytes;
    void (*quantize)(const float*, void*, int64_t);
    void (*dequantize)(const void*, float*, int64_t);
    double max_rel_rms;
    double max_abs_frac;
};

template <typename B, void (*Q)(const float*, B*, int64_t)>
void quantize_as(const float* x, void* y, int64_t k) {
    Q(x, static_cast<B*>(y), k);
}
template <typename B, void (*D)(const B*, float*, int64_t)>
void dequantize_as(const void* x, float* y, int64_t k) {
    D(static_cast<const B*>(x), y, k);
}

// Bounds about 1.3x the worst seen on 300 normal super-blocks (spec/quant-types.md#k-quants).
const KType kTypes[] = {
    {"Q2_K", sizeof(block_q2_K), quantize_as<block_q2_K, lowbit::quantize_row_q2_K_ref>,
     dequantize_as<block_q2_K, lowbit::dequantize_row_q2_K>, 0.45, 0.48},
    {"Q3_K", sizeof(block_q3_K), quantize_as<block_q3_K, lowbit::quantize_row_q3_K_ref>,
     dequantize_as<block_q3_K, lowbit::dequantize_row_q3_K>, 0.23, 0.30},
    {"Q4_K", sizeof(block_q4_K), quantize_as<block_q4_K, lowbit::quantize_row_q4_K_ref>,
     dequantize_as<block_q4_K, lowbit::dequantize_row_q4_K>, 0.11, 0.12},
    {"Q5_K", sizeof(block_q5_K), quantize_as<block_q5_K, lowbit::quantize_row_q5_K_ref>,
     dequantize_as<block_q5_K, lowbit::dequantize_row_q5_K>, 0.055, 0.06},
    {"Q6_K", sizeof(block_q6_K), quantize_as<block_q6_K, lowbit::quantize_row_q6_K_ref>,
     dequantize_as<block_q6_K, lowbit::dequantize_row_q6_K>, 0.028, 0.022},
    // Q8_K: |x - y| <= d / 2 with d = max|x| / 127, plus fp32 rounding.
    {"Q8_K", sizeof(block_q8_K), quantize_as<block_q8_K, lowbit::quantize_row_q8_K_ref>,
     dequantize_as<block_q8_K, lowbit::dequantize_row_q8_K>, 0.013, 0.5 / 127 * 1.001},
};

// spec/golden/kquants/ relative to this source file (CMake compiles it by absolute path).
std::string golden_dir() {
    std::string here = __FILE__;
    const size_t slash = here.find_last_of('/');
    here = slash == std::string::npos ? std::string(".") : here.substr(0, slash);
    return here + "/../../spec/golden/kquants/";
}

// The string value of "key" in a flat JSON object of strings (all the golden files hold), or "" when absent.
std::string json_string(const std::string& text, const std::string& key) {
    const std::string pat = "\"" + key + "\"";
    size_t p = text.find(pat);
    if (p == std::string::npos) return "";
    p = text.find('"', text.find(':', p + pat.size()));
    if (p == std::string::npos) return "";
    const size_t e = text.find('"', p + 1);
    return e == std::string::npos ? "" : text.substr(p + 1, e - p - 1);
}

std::vector<uint8_t> from_hex(const std::string& hex) {
    std::vector<uint8_t> out;
    auto nib = [](char c) { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; };
    for (size_t i = 0; i + 1 < hex.size(); i += 2)
        out.push_back(static_cast<uint8_t>(nib(hex[i]) << 4 | nib(hex[i + 1])));
    return out;
}

void check_golden(const char* name) {
    const std::string path = golden_dir() + name + ".json";
    std::ifstream f(path);
    std::stringstream ss;
    ss << f.rdbuf();
    const std::string text = ss.str();
    const std::vector<uint8_t> in = from_hex(json_string(text, "input_f32_hex"));
    check(!in.empty() && in.size() % (4 * QK_K) == 0, "golden file " + path + " is missing or has no input");
    if (in.empty() || in.size() % (4 * QK_K) != 0) return;
    std::vector<float> x(in.size() / 4);
    std::memcpy(x.data(), in.data(), in.size());
    const int64_t n = static_cast<int64_t>(x.size());
    for (const KType& t : kTypes) {
        const std::vector<uint8_t> want = from_hex(json_string(text, t.name));
        std::vector<uint8_t> got(static_cast<size_t>(n / QK_K) * t.block_bytes);
        t.quantize(x.data(), got.data(), n);
        size_t first_diff = 0;
        while (first_diff < got.size() && first_diff < want.size() && got[first_diff] == want[first_diff])
            ++first_diff;
        check(want.size() == got.size() && first_diff == got.size(),
              std::string(name) + " " + t.name + ": bytes differ from llama.cpp's at byte " + std::to_string(first_diff));
    }
}

// dequantize(quantize(x)) stays within the type's error; also checks a zero block and a multi-block row.
void check_round_trip() {
    std::mt19937 rng(20240611);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int64_t n = 8 * QK_K;
    std::vector<float> x(n), y(n);
    for (float& v : x) v = nd(rng);
    for (int i = 0; i < QK_K; ++i) x[3 * QK_K + i] = 0.0f;  // one all-zero super-block
    for (const KType& t : kTypes) {
        std::vector<uint8_t> q(static_cast<size_t>(n / QK_K) * t.block_bytes);
        t.quantize(x.data(), q.data(), n);
        t.dequantize(q.data(), y.data(), n);
        for (int64_t b = 0; b < n / QK_K; ++b) {
            double se = 0, sx = 0, amax = 0, emax = 0;
            for (int64_t i = b * QK_K; i < (b + 1) * QK_K; ++i) {
                const double e = static_cast<double>(x[i]) - y[i];
                se += e * e;
                sx += static_cast<double>(x[i]) * x[i];
                amax = std::fmax(amax, std::fabs(x[i]));
                emax = std::fmax(emax, std::fabs(e));
            }
            const std::string where = std::string(t.name) + " super-block " + std::to_string(b);
            if (sx == 0) {
                check(emax == 0, where + ": an all-zero block does not dequantize to zeros");
                continue;
            }
            const double rel = std::sqrt(se / sx);
            check(rel <= t.max_rel_rms, where + ": relative RMS error " + std::to_string(rel));
            check(emax <= t.max_abs_frac * amax, where + ": max error " + std::to_string(emax / amax) + " of max|x|");
        }
    }
}

}  // namespace

int main() {
    for (const char* name : {"normal", "ramp", "outlier"}) check_golden(name);
    check_round_trip();
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
