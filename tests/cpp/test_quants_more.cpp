// C++ test of the Q5_0, Q5_1, IQ4_NL, IQ4_XS and FP4 reference code: hand-made blocks, golden bytes, round trips.
// Exit status 0 = all passed. Golden bytes: spec/golden/{ramp,ties,normal}.json (spec/golden/make_golden.py);
// formulas: spec/quant-types.md.
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

void expect(bool ok, const std::string& what) {
    ++g_checks;
    if (!ok && ++g_failures <= 25) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

// The IQ4_NL table and the FP4 code book written out here from spec/quant-types.md, as doubles.
const double kNL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
const double kFP4[16] = {0, 1.0 / 192, 2.0 / 3, 1, 1.0 / 3, 0.5, 1.0 / 6, 0.25,
                         -0.0, -1.0 / 192, -2.0 / 3, -1, -1.0 / 3, -0.5, -1.0 / 6, -0.25};

bool near_rel(double got, double want, double rel = 1e-6) {
    return std::fabs(got - want) <= rel * std::fabs(want) + 1e-30;
}

// ---- dequantize: hand-made blocks ----------------------------------------------------------------

void check_dequant_by_hand() {
    {  // Q5_0: d = 0.5, element j holds q = j, so y = (j - 16) * 0.5
        block_q5_0 b;
        b.d = 0x3800;
        for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(j | j << 4);  // low: q=j, high: q=j+16 (mod 16)
        const uint8_t qh[4] = {0x00, 0x00, 0xff, 0xff};  // elements 16..31 have the fifth bit
        std::memcpy(b.qh, qh, 4);
        float y[32];
        lowbit::dequantize_row_q5_0(&b, y, 32);
        for (int j = 0; j < 32; ++j) expect(y[j] == (j - 16) * 0.5, "Q5_0 hand block element " + std::to_string(j));
    }
    {  // Q5_1: d = 0.25, m = -2, element j holds q = 31 - j, so y = (31 - j) * 0.25 - 2
        block_q5_1 b;
        b.d = 0x3400;
        b.m = 0xc000;
        uint32_t h = 0;
        for (int j = 0; j < 32; ++j) h |= static_cast<uint32_t>(((31 - j) >> 4) & 1) << j;
        std::memcpy(b.qh, &h, 4);  // little-endian host
        for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(((31 - j) & 15) | ((15 - j) & 15) << 4);
        float y[32];
        lowbit::dequantize_row_q5_1(&b, y, 32);
        for (int j = 0; j < 32; ++j)
            expect(y[j] == (31 - j) * 0.25 - 2, "Q5_1 hand block element " + std::to_string(j));
    }
    {  // IQ4_NL: d = -0.5, low nibble j, high nibble 15 - j
        block_iq4_nl b;
        b.d = 0xb800;
        for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(j | (15 - j) << 4);
        float y[32];
        lowbit::dequantize_row_iq4_nl(&b, y, 32);
        for (int j = 0; j < 16; ++j) {
            expect(y[j] == -0.5 * kNL[j], "IQ4_NL hand block element " + std::to_string(j));
            expect(y[j + 16] == -0.5 * kNL[15 - j], "IQ4_NL hand block element " + std::to_string(j + 16));
        }
    }
    {  // IQ4_XS: d = 0.25, sub-block s stores 9s (scale 9s - 32), nibbles (j + s) % 16 and (3j + s) % 16
        block_iq4_xs b;
        b.d = 0x3400;
        b.scales_h = 0;
        std::memset(b.scales_l, 0, sizeof(b.scales_l));
        for (int s = 0; s < 8; ++s) {
            const int ls = 9 * s;
            b.scales_l[s / 2] |= static_cast<uint8_t>((ls & 15) << (4 * (s % 2)));
            b.scales_h |= static_cast<uint16_t>((ls >> 4) << (2 * s));
            for (int j = 0; j < 16; ++j)
                b.qs[16 * s + j] = static_cast<uint8_t>((j + s) % 16 | ((3 * j + s) % 16) << 4);
        }
        float y[QK_K];
        lowbit::dequantize_row_iq4_xs(&b, y, QK_K);
        for (int s = 0; s < 8; ++s)
            for (int j = 0; j < 16; ++j) {
                const double dl = 0.25 * (9 * s - 32);
                expect(y[32 * s + j] == dl * kNL[(j + s) % 16],
                       "IQ4_XS hand block element " + std::to_string(32 * s + j));
                expect(y[32 * s + j + 16] == dl * kNL[(3 * j + s) % 16],
                       "IQ4_XS hand block element " + std::to_string(32 * s + j + 16));
            }
    }
    {  // FP4: absmax 3, codes 0..15 then 15..0; the first element of a pair in the HIGH nibble
        block_fp4 b;
        b.absmax = 3.0f;
        for (int j = 0; j < 32; ++j) {
            const int c0 = (2 * j) % 16, c1 = (2 * j + 1) % 16;
            const int hi = j < 8 ? c0 : 15 - c0, lo = j < 8 ? c1 : 15 - c1;
            b.qs[j] = static_cast<uint8_t>(hi << 4 | lo);
        }
        float y[64];
        lowbit::dequantize_row_fp4(&b, y, 64);
        for (int i = 0; i < 64; ++i) {
            const int c = i < 16 ? i : 15 - i % 16;
            expect(near_rel(y[i], 3.0 * kFP4[c]), "FP4 hand block element " + std::to_string(i));
            if (c == 0 || c == 8)
                expect(std::signbit(y[i]) == (c == 8), "FP4 code " + std::to_string(c) + " zero sign");
        }
    }
}

// ---- golden bytes --------------------------------------------------------------------------------

std::string golden_path(const char* name) {
    std::string dir = __FILE__;  // CMake compiles tests/cpp/*.cpp by absolute path
    const size_t slash = dir.find_last_of('/');
    dir = slash == std::string::npos ? std::string(".") : dir.substr(0, slash);
    return dir + "/../../spec/golden/" + name + ".json";
}

// "key": "value" in the flat object of hex strings the golden files hold; "" when the key is absent.
std::string json_value(const std::string& text, const std::string& key) {
    const size_t k = text.find("\"" + key + "\":");
    if (k == std::string::npos) return "";
    const size_t open = text.find('"', k + key.size() + 3);
    const size_t close_q = open == std::string::npos ? open : text.find('"', open + 1);
    return close_q == std::string::npos ? "" : text.substr(open + 1, close_q - open - 1);
}

std::vector<uint8_t> hex_bytes(const std::string& hex) {
    std::vector<uint8_t> out(hex.size() / 2);
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<uint8_t>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
    return out;
}

template <typename Block>
void expect_golden(const std::string& text, const char* file, const char* key, const std::vector<float>& x,
                   int block_elems, void (*quantize)(const float*, Block*, int64_t), bool required) {
    const std::string hex = json_value(text, key);
    if (hex.empty() && !required) return;
    const std::vector<uint8_t> want = hex_bytes(hex);
    const int64_t n = static_cast<int64_t>(x.size());
    const bool sized = want.size() == static_cast<size_t>(n / block_elems) * sizeof(Block);
    expect(sized, std::string(file) + " " + key + ": missing or wrong size");
    if (!sized) return;
    std::vector<uint8_t> got(want.size());
    quantize(x.data(), reinterpret_cast<Block*>(got.data()), n);
    size_t at = 0;
    while (at < got.size() && got[at] == want[at]) ++at;
    expect(at == got.size(),
           std::string(file) + " " + key + ": bytes differ from the oracle's at byte " + std::to_string(at));
}

void check_golden(const char* file) {
    std::ifstream f(golden_path(file));
    std::stringstream ss;
    ss << f.rdbuf();
    const std::string text = ss.str();
    const std::vector<uint8_t> in = hex_bytes(json_value(text, "input_f32_hex"));
    expect(in.size() == 64 * sizeof(float), golden_path(file) + ": cannot read its 64 inputs");
    if (in.size() != 64 * sizeof(float)) return;
    std::vector<float> x(64);
    std::memcpy(x.data(), in.data(), in.size());
    expect_golden<block_q5_0>(text, file, "Q5_0", x, QK5_0, lowbit::quantize_row_q5_0_ref, true);
    expect_golden<block_q5_1>(text, file, "Q5_1", x, QK5_1, lowbit::quantize_row_q5_1_ref, true);
    expect_golden<block_fp4>(text, file, "FP4", x, QK_FP4, lowbit::quantize_row_fp4_ref, true);
    expect_golden<block_iq4_nl>(text, file, "IQ4_NL", x, QK4_NL, lowbit::quantize_row_iq4_nl_ref, false);
}

// Blocks where rounding x*id to fp32 before adding the offset changes a value, with their bytes from
// gguf.quants.quantize (spec/quant-types.md#q5_0). First Q5_0 block: element 10 (x*id rounds to -8.5)
// gets another q under an fp32 fused multiply-add or float64 arithmetic; second Q5_0 block (element 19)
// and the Q5_1 block (element 12): another q when x*id + offset is evaluated and truncated in float64.
struct QuirkBlock {
    bool q5_1;
    uint32_t x[32];
    const char* bytes;
};
const QuirkBlock kQuirkBlocks[] = {
    {false,
     {0xc0400000, 0x40234a20, 0xc02e2722, 0xbfb390f1, 0xbefbf58c, 0xbf44eab0, 0xc0254bfa, 0x3ff3e566,
      0xbf0a6d7e, 0xbfb52634, 0xbfcc0000, 0xbf8270d1, 0x3e00a1ec, 0xc008de6f, 0xbff5620e, 0xbdedc5a5,
      0x403c6e61, 0x3f75d792, 0x3fb84d24, 0x3ff2f70a, 0xbfd6b98a, 0x3f1c80c8, 0xbfd87994, 0xc021038e,
      0x3fc10acb, 0x402c8ae0, 0x3fe7372a, 0x403233f0, 0x40268ec3, 0xbefc0a52, 0x3fe0a282, 0x3f5140dd},
     "003282102fdff05e81a97d3c723a8de8a8fbe1d5964f"},
    {false,
     {0xc0400000, 0xbf8777db, 0x400f054a, 0x4003ebf1, 0xc01c76f9, 0x3fde3cbe, 0x3f01b5c7, 0x3efda335,
      0x3f8560e7, 0x4017d3de, 0x3f5d2ae3, 0xbdf62fd7, 0xc009a24d, 0xbf865616, 0xbf6b613e, 0x3f774f2d,
      0xc0261a28, 0xbf09be9b, 0xbff33a76, 0x3ffbffff, 0xbf4bd7f8, 0xc0210751, 0x3fe435b9, 0x403ca9ff,
      0xc0339762, 0x4035a3d2, 0x401b74bd, 0xbe6fb50c, 0xbef77e04, 0xbf802048, 0x3fd418c3, 0x3e9714aa},
     "0032ec87c8c620da6cbbc339a3f316fdd5ffd5ba9b25"},
    {true,
     {0xc0400000, 0x40400000, 0xbd0f2285, 0x40124ef2, 0xbf962559, 0x3ff73268, 0x3f46689a, 0x3faa6bf3,
      0xbdccbd87, 0x3fa72dba, 0xc01b3e35, 0xc006c5fa, 0x3f14a524, 0xbf4dd79d, 0x40192a73, 0xbf9a300c,
      0xc024a4fe, 0x4021bb2f, 0x4017b137, 0x4038f3d9, 0xc000269d, 0xbdaf11f7, 0xc02f90d8, 0x40157aab,
      0xbfb7f3b8, 0x3e03e15d, 0x3f1c7566, 0x400b08ef, 0xbfad6f47, 0x3d01fded, 0x3f5b5e0b, 0x3fb76d92},
     "323200c2ea528eee20dfcfeb59f914c68f0633b5830b4c79"},
};

void check_rounding_quirk() {
    for (const QuirkBlock& qb : kQuirkBlocks) {
        float x[32];
        std::memcpy(x, qb.x, sizeof(x));
        const std::vector<uint8_t> want = hex_bytes(qb.bytes);
        std::vector<uint8_t> got(want.size());
        if (qb.q5_1) lowbit::quantize_row_q5_1_ref(x, reinterpret_cast<block_q5_1*>(got.data()), 32);
        else lowbit::quantize_row_q5_0_ref(x, reinterpret_cast<block_q5_0*>(got.data()), 32);
        expect(got == want, std::string(qb.q5_1 ? "Q5_1" : "Q5_0") + " rounding-quirk block " + qb.bytes + " differs");
    }
}

// ---- round trips ---------------------------------------------------------------------------------

double half(uint16_t h) { return lowbit::fp16_to_fp32(h); }

// Test data: 64 blocks of 256 normal values, where block b is scaled by 2^(b % 9 - 4); block 5 holds
// one outlier per 32, block 6 is all zero and block 7 constant.
std::vector<float> test_data() {
    std::mt19937 rng(777);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> x(64 * QK_K);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::ldexp(nd(rng), static_cast<int>(i / QK_K) % 9 - 4);
    for (int i = 5 * QK_K; i < 6 * QK_K; i += 32) x[i + (i / 32) % 32] = (i % 64 ? 30.0f : -30.0f);
    for (int i = 6 * QK_K; i < 7 * QK_K; ++i) x[i] = 0.0f;
    for (int i = 7 * QK_K; i < 8 * QK_K; ++i) x[i] = -1.75f;
    return x;
}

void check_q5_round_trip(const std::vector<float>& x) {
    const int64_t n = static_cast<int64_t>(x.size());
    std::vector<block_q5_0> q0(n / 32);
    std::vector<block_q5_1> q1(n / 32);
    std::vector<float> y0(n), y1(n);
    lowbit::quantize_row_q5_0_ref(x.data(), q0.data(), n);
    lowbit::quantize_row_q5_1_ref(x.data(), q1.data(), n);
    lowbit::dequantize_row_q5_0(q0.data(), y0.data(), n);
    lowbit::dequantize_row_q5_1(q1.data(), y1.data(), n);
    for (int64_t b = 0; b < n / 32; ++b) {
        const float* xb = &x[32 * b];
        double amax = 0, mx = xb[0], mn = xb[0], max_signed = 0;
        for (int j = 0; j < 32; ++j) {
            if (std::fabs(xb[j]) > amax) {
                amax = std::fabs(xb[j]);
                max_signed = xb[j];
            }
            mx = std::fmax(mx, xb[j]);
            mn = std::fmin(mn, xb[j]);
        }
        // Q5_0: d = max / -16; half a step, except up to a whole step at the clamped end (q = 32 -> 31);
        // plus the fp16 rounding of d times |q - 16| <= 16.
        const double d0 = max_signed / -16, d0h = half(q0[b].d);
        // Q5_1: d = (max - min) / 31, half a step, plus the fp16 rounding of d (times q <= 31) and of min.
        const double d1 = (mx - mn) / 31, d1h = half(q1[b].d), m1h = half(q1[b].m);
        for (int j = 0; j < 32; ++j) {
            const double t = d0 != 0 ? xb[j] / d0 : 0;
            const double bound0 =
                (t > 15.5 ? t - 15 : 0.5) * std::fabs(d0) * (1 + 1e-5) + 16 * std::fabs(d0 - d0h) + 1e-30;
            const double e0 = std::fabs(xb[j] - static_cast<double>(y0[32 * b + j]));
            expect(e0 <= bound0, "Q5_0 block " + std::to_string(b) + " element " + std::to_string(j) + " error " +
                                     std::to_string(e0) + " > " + std::to_string(bound0));
            const double bound1 = 0.5 * d1 * (1 + 1e-5) + 31 * std::fabs(d1 - d1h) + std::fabs(mn - m1h) +
                                  1e-6 * std::fabs(mn) + 1e-30;
            const double e1 = std::fabs(xb[j] - static_cast<double>(y1[32 * b + j]));
            expect(e1 <= bound1, "Q5_1 block " + std::to_string(b) + " element " + std::to_string(j) + " error " +
                                     std::to_string(e1) + " > " + std::to_string(bound1));
        }
    }
}

// Relative RMS error of each group of `group` values, and the largest |x - y| as a fraction of its max |x|.
void expect_group_errors(const char* type, const std::vector<float>& x, const std::vector<float>& y, int group,
                         double max_rel_rms, double max_abs_frac) {
    for (size_t g = 0; g < x.size() / group; ++g) {
        double se = 0, sx = 0, amax = 0, emax = 0;
        for (size_t i = g * group; i < (g + 1) * group; ++i) {
            const double e = static_cast<double>(x[i]) - y[i];
            se += e * e;
            sx += static_cast<double>(x[i]) * x[i];
            amax = std::fmax(amax, std::fabs(x[i]));
            emax = std::fmax(emax, std::fabs(e));
        }
        const std::string where = std::string(type) + " group " + std::to_string(g);
        if (sx == 0) {
            expect(emax == 0, where + ": an all-zero group does not come back as zeros");
            continue;
        }
        expect(std::sqrt(se / sx) <= max_rel_rms, where + ": relative RMS error " + std::to_string(std::sqrt(se / sx)));
        expect(emax <= max_abs_frac * amax, where + ": max error " + std::to_string(emax / amax) + " of max|x|");
    }
}

void check_iq4_round_trip(const std::vector<float>& x) {
    const int64_t n = static_cast<int64_t>(x.size());
    std::vector<block_iq4_nl> nl(n / 32);
    std::vector<block_iq4_xs> xs(n / QK_K);
    std::vector<float> y(n);
    // Bounds about 1.3x the worst seen over 2048 groups of normal, t(3) and one-outlier-per-32 data.
    lowbit::quantize_row_iq4_nl_ref(x.data(), nl.data(), n);
    lowbit::dequantize_row_iq4_nl(nl.data(), y.data(), n);
    expect_group_errors("IQ4_NL", x, y, 32, 0.24, 0.14);
    lowbit::quantize_row_iq4_xs_ref(x.data(), xs.data(), n);
    lowbit::dequantize_row_iq4_xs(xs.data(), y.data(), n);
    expect_group_errors("IQ4_XS", x, y, QK_K, 0.2, 0.12);

    // The all-zero super-block (block 6): d = -0 (scale -max_scale/32 of 0), every scale stored as 32, index 8.
    const block_iq4_xs& z = xs[6];
    expect(z.d == 0x8000 && z.scales_h == 0xaaaa && z.scales_l[0] == 0 && z.qs[0] == 0x88 && z.qs[127] == 0x88,
           "IQ4_XS all-zero super-block layout");
    expect(nl[6 * 8].d == 0 && nl[6 * 8].qs[5] == 0x88, "IQ4_NL all-zero block layout");

    // Values on the grid: x = 0.5 * table value in one block (scale found exactly, so y == x), and in
    // IQ4_XS sub-block s scaled by m_s / 64 with 6-bit multipliers m_s, the largest 32.
    std::vector<float> g(QK_K), gy(QK_K);
    const int m[8] = {32, 16, 8, 24, 31, 1, 20, 32};
    for (int i = 0; i < QK_K; ++i) g[i] = static_cast<float>(m[i / 32] / 64.0 * kNL[(7 * i + i / 32) % 16]);
    block_iq4_nl gb[QK_K / 32];
    lowbit::quantize_row_iq4_nl_ref(g.data(), gb, 32);
    lowbit::dequantize_row_iq4_nl(gb, gy.data(), 32);
    bool exact = true;
    for (int i = 0; i < 32; ++i) exact = exact && gy[i] == g[i];
    expect(exact, "IQ4_NL: a block of 0.5 * table values does not come back exactly");
    block_iq4_xs gx;
    lowbit::quantize_row_iq4_xs_ref(g.data(), &gx, QK_K);
    lowbit::dequantize_row_iq4_xs(&gx, gy.data(), QK_K);
    exact = true;
    for (int i = 0; i < QK_K; ++i) exact = exact && gy[i] == g[i];
    expect(exact, "IQ4_XS: sub-blocks of table values times m/64 do not come back exactly");
}

void check_fp4_round_trip(const std::vector<float>& x) {
    const int64_t n = static_cast<int64_t>(x.size());
    std::vector<block_fp4> q(n / 64);
    std::vector<float> y(n);
    lowbit::quantize_row_fp4_ref(x.data(), q.data(), n);
    lowbit::dequantize_row_fp4(q.data(), y.data(), n);
    for (int64_t b = 0; b < n / 64; ++b) {
        double amax = 0;
        for (int j = 0; j < 64; ++j) amax = std::fmax(amax, std::fabs(x[64 * b + j]));
        expect(q[b].absmax == static_cast<float>(amax), "FP4 block " + std::to_string(b) + " absmax");
        for (int j = 0; j < 64; ++j) {
            const int c = j % 2 ? q[b].qs[j / 2] & 15 : q[b].qs[j / 2] >> 4;
            // The code is the nearest one to x / absmax (up to fp32 rounding of the scaled value).
            const double s = amax > 0 ? x[64 * b + j] / amax : 0;
            double best = 2;
            for (double v : kFP4) best = std::fmin(best, std::fabs(s - v));
            const std::string where = "FP4 block " + std::to_string(b) + " element " + std::to_string(j);
            expect(std::fabs(s - kFP4[c]) <= best + 1e-6, where + ": code " + std::to_string(c) + " is not nearest");
            expect(near_rel(y[64 * b + j], kFP4[c] * amax), where + " value");
        }
    }
    // Zero and small values: 0 and tiny negatives get code 0, tiny positives code 8 (bitsandbytes' order).
    std::vector<float> t(64, 0.0f);
    t[0] = 1.0f;
    t[1] = 0.0f;
    t[2] = -1e-4f;
    t[3] = 1e-4f;
    block_fp4 tb;
    lowbit::quantize_row_fp4_ref(t.data(), &tb, 64);
    expect(tb.qs[0] == 0x30 && tb.qs[1] == 0x08, "FP4: codes of 1, 0, -1e-4, 1e-4");
    std::vector<float> zero(64, 0.0f);
    lowbit::quantize_row_fp4_ref(zero.data(), &tb, 64);
    expect(tb.absmax == 0.0f && tb.qs[0] == 0 && tb.qs[31] == 0, "FP4: an all-zero block");
}

}  // namespace

int main() {
    check_dequant_by_hand();
    for (const char* file : {"ramp", "ties", "normal"}) check_golden(file);
    check_rounding_quirk();
    const std::vector<float> x = test_data();
    check_q5_round_trip(x);
    check_iq4_round_trip(x);
    check_fp4_round_trip(x);
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
