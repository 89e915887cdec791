// C++ test of the model forward pass: a tiny random llama written here with every weight type, loaded and
// evaluated (finite, deterministic, batch = token by token, 1 thread = 2 threads, errors leave it usable); and,
// when LOWBIT_TEST_MODEL / LOWBIT_TEST_LOGITS are set (tools/sanitize.sh does), logits of an F32 model against
// transformers' logits saved by tests/cpp/make_forward_reference.py. Exit status 0 = all passed.
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "test_util.h"
#include "lowbit/gguf.h"
#include "lowbit/model.h"
#include "lowbit/types.h"

using lowbit::QType;

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
    ++g_checks;
    if (!ok && ++g_failures <= 30) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

lowbit::GGUFValue u32(uint64_t v) {
    lowbit::GGUFValue x;
    x.type = lowbit::GGUFType::UINT32;
    x.u = v;
    return x;
}
lowbit::GGUFValue f32(double v) {
    lowbit::GGUFValue x;
    x.type = lowbit::GGUFType::FLOAT32;
    x.f = v;
    return x;
}
lowbit::GGUFValue str(const std::string& v) {
    lowbit::GGUFValue x;
    x.type = lowbit::GGUFType::STRING;
    x.s = v;
    return x;
}

constexpr int kEmbd = 128, kFF = 192, kHead = 4, kHeadKV = 2, kLayer = 2, kVocab = 96, kCtx = 64;

struct Tensor {
    std::string name;
    QType type;
    std::vector<int64_t> ne;  // ggml order
    std::vector<uint8_t> bytes;
};

// A random llama with each weight matrix in a different type, so every kernel runs under the sanitizers.
void write_tiny_model(const std::string& path) {
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<Tensor> ts;
    auto add = [&](const std::string& name, QType t, int64_t n_in, int64_t n_out, float scale) {
        std::vector<float> x(static_cast<size_t>(n_in * n_out));  // (n_out, n_in)
        for (float& f : x) f = nd(rng) * scale;
        Tensor tt{name, t, n_out == 1 ? std::vector<int64_t>{n_in} : std::vector<int64_t>{n_in, n_out}, {}};
        const lowbit::TypeTraits& tr = lowbit::supported_traits(t);
        tt.bytes.resize(tr.tensor_level ? lowbit::nf4_dq_nbytes(n_in * n_out) : lowbit::row_size(t, n_in) * n_out);
        lowbit::quantize(t, x.data(), tt.bytes.data(), n_out, n_in, 1);
        ts.push_back(std::move(tt));
    };
    auto norm = [&](const std::string& name) {
        std::vector<float> x(kEmbd);
        for (float& f : x) f = 1.0f + 0.1f * nd(rng);
        Tensor tt{name, QType::F32, {kEmbd}, std::vector<uint8_t>(kEmbd * 4)};
        std::memcpy(tt.bytes.data(), x.data(), kEmbd * 4);
        ts.push_back(std::move(tt));
    };
    const int hd = kEmbd / kHead;
    add("token_embd.weight", QType::Q8_0, kEmbd, kVocab, 1.0f);
    norm("output_norm.weight");
    add("output.weight", QType::Q4_1, kEmbd, kVocab, 0.2f);
    const QType mats[kLayer][7] = {
        {QType::F32, QType::F16, QType::BF16, QType::Q8_0, QType::Q4_0, QType::Q4_1, QType::NF4},
        {QType::NF4_DQ, QType::Q4_0, QType::Q8_0, QType::F16, QType::NF4, QType::BF16, QType::F32}};
    for (int l = 0; l < kLayer; ++l) {
        const std::string p = "blk." + std::to_string(l) + ".";
        const float s = 1.0f / std::sqrt(static_cast<float>(kEmbd));
        norm(p + "attn_norm.weight");
        add(p + "attn_q.weight", mats[l][0], kEmbd, kHead * hd, s);
        add(p + "attn_k.weight", mats[l][1], kEmbd, kHeadKV * hd, s);
        add(p + "attn_v.weight", mats[l][2], kEmbd, kHeadKV * hd, s);
        add(p + "attn_output.weight", mats[l][3], kHead * hd, kEmbd, s);
        norm(p + "ffn_norm.weight");
        add(p + "ffn_gate.weight", mats[l][4], kEmbd, kFF, s);
        add(p + "ffn_up.weight", mats[l][5], kEmbd, kFF, s);
        add(p + "ffn_down.weight", mats[l][6], kFF, kEmbd, 1.0f / std::sqrt(static_cast<float>(kFF)));
    }
    lowbit::GGUFWriter w(path);
    w.add_kv("general.architecture", str("llama"));
    w.add_kv("llama.context_length", u32(kCtx));
    w.add_kv("llama.embedding_length", u32(kEmbd));
    w.add_kv("llama.block_count", u32(kLayer));
    w.add_kv("llama.feed_forward_length", u32(kFF));
    w.add_kv("llama.attention.head_count", u32(kHead));
    w.add_kv("llama.attention.head_count_kv", u32(kHeadKV));
    w.add_kv("llama.attention.layer_norm_rms_epsilon", f32(1e-5));
    w.add_kv("llama.rope.freq_base", f32(10000.0));
    for (const Tensor& t : ts) w.add_tensor_info(t.name, static_cast<uint32_t>(t.type), t.ne);
    w.write_header();
    for (const Tensor& t : ts) w.write_tensor_data(t.bytes.data(), t.bytes.size());
    w.finish();
}

std::vector<float> eval_all(lowbit::Model& m, const std::vector<int32_t>& toks) {
    std::vector<float> out(toks.size() * static_cast<size_t>(m.config().n_vocab));  // (n, n_vocab)
    m.eval(toks.data(), static_cast<int>(toks.size()), out.data(), true);
    return out;
}

double max_abs(const std::vector<float>& a) {
    double m = 0;
    for (float x : a) m = std::max(m, std::fabs(static_cast<double>(x)));
    return m;
}
double max_diff(const float* a, const float* b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
    return m;
}

void self_checks(const std::string& dir) {
    const std::string path = dir + "/tiny-mixed.gguf";
    write_tiny_model(path);
    const std::vector<int32_t> toks = {1, 17, 42, 5, 95, 0, 63, 8, 30, 77};
    lowbit::ModelParams p;
    p.n_threads = 1;
    p.n_batch = 4;  // the 10-token prompt runs in chunks of 4, 4, 2
    auto m1 = lowbit::Model::load(path, p);
    check(m1->config().n_vocab == kVocab && m1->n_ctx() == kCtx, "config read from the file");
    std::vector<float> a = eval_all(*m1, toks);
    bool finite = true;
    for (float x : a) finite = finite && std::isfinite(x);
    check(finite, "logits are finite");
    check(max_abs(a) > 1e-3, "logits are not all zero");
    const size_t V = kVocab;

    // Deterministic: the same tokens after truncate(0) give bit-identical logits.
    m1->truncate(0);
    std::vector<float> b = eval_all(*m1, toks);
    check(a == b, "re-evaluation after truncate(0) is bit-identical");

    // Token by token through the KV cache = the batched prompt (same math, different tiling).
    m1->truncate(0);
    const double tol = 1e-3 * std::max(1.0, max_abs(a));
    std::vector<float> last(V);
    for (size_t i = 0; i < toks.size(); ++i) {
        m1->eval(&toks[i], 1, last.data(), false);
        double d = max_diff(last.data(), a.data() + i * V, V);
        check(d <= tol, "token " + std::to_string(i) + " one at a time vs batched: max diff " + std::to_string(d));
    }

    // Prefix reuse: truncate to 6 and re-evaluate the tail.
    m1->truncate(6);
    std::vector<float> tail((toks.size() - 6) * V);
    m1->eval(toks.data() + 6, static_cast<int>(toks.size() - 6), tail.data(), true);
    check(max_diff(tail.data(), a.data() + 6 * V, tail.size()) <= tol, "truncate(6) + tail equals the full prompt");

    // Two threads: the same logits (work is split by rows; reductions are per row).
    lowbit::ModelParams p2 = p;
    p2.n_threads = 2;
    auto m2 = lowbit::Model::load(path, p2);
    std::vector<float> c = eval_all(*m2, toks);
    check(max_diff(a.data(), c.data(), a.size()) <= tol, "2 threads agree with 1 thread");

    // Errors leave the model usable and its cache unchanged.
    m1->truncate(0);
    const int32_t bad[2] = {3, kVocab};
    std::vector<float> junk(2 * V);
    bool threw = false;
    try {
        m1->eval(bad, 2, junk.data(), true);
    } catch (const lowbit::Error&) {
        threw = true;
    }
    check(threw && m1->n_past() == 0, "an out-of-range token id is refused before any state changes");
    std::vector<int32_t> too_long(kCtx + 1, 1);
    std::vector<float> big(too_long.size() * V);
    threw = false;
    try {
        m1->eval(too_long.data(), static_cast<int>(too_long.size()), big.data(), true);
    } catch (const lowbit::Error&) {
        threw = true;
    }
    check(threw && m1->n_past() == 0, "a prompt longer than n_ctx is refused");
    threw = false;
    try {
        m1->truncate(5);
    } catch (const lowbit::Error&) {
        threw = true;
    }
    check(threw, "truncate past n_past is refused");
    std::vector<float> again = eval_all(*m1, toks);
    check(again == a, "after the errors the model gives the same logits");
    ::unlink(path.c_str());
    std::printf("  tiny mixed-type model: %zu tokens, |logit| max %.3f, all checks run\n", toks.size(), max_abs(a));
}

// Reference file (tests/cpp/make_forward_reference.py): "LBFWD001", int32 n_tokens, int32 n_vocab,
// int32 tokens[n_tokens], float32 logits[n_tokens * n_vocab] (row-major), little-endian.
void reference_check(const std::string& model_path, const std::string& ref_path) {
    std::ifstream f(ref_path, std::ios::binary);
    char magic[8] = {};
    int32_t n = 0, V = 0;
    f.read(magic, 8);
    f.read(reinterpret_cast<char*>(&n), 4);
    f.read(reinterpret_cast<char*>(&V), 4);
    if (!f || std::memcmp(magic, "LBFWD001", 8) != 0 || n <= 0 || n > 4096 || V <= 0 || V > (1 << 20)) {
        check(false, "reference file '" + ref_path + "' is unreadable or not a forward reference");
        return;
    }
    std::vector<int32_t> toks(n);
    std::vector<float> ref(static_cast<size_t>(n) * V);  // (n, V)
    f.read(reinterpret_cast<char*>(toks.data()), 4 * n);
    f.read(reinterpret_cast<char*>(ref.data()), static_cast<std::streamsize>(4 * ref.size()));
    if (!f) {
        check(false, "reference file '" + ref_path + "' is truncated");
        return;
    }
    lowbit::ModelParams p;
    p.n_threads = 2;
    auto m = lowbit::Model::load(model_path, p);
    check(m->config().n_vocab == V, "reference model's vocabulary matches the reference logits");
    if (m->config().n_vocab != V) return;
    std::vector<float> ours = eval_all(*m, toks);
    const double d = max_diff(ours.data(), ref.data(), ref.size());
    // F32 weights: the design's bound for lowbit vs transformers fp32 (design.md, "How we test" 5).
    check(d <= 1e-4, "logits vs transformers: max abs diff " + std::to_string(d) + " > 1e-4");
    std::printf("  reference model: %d tokens x %d vocab, max |ours - transformers| = %.2e (bound 1e-4)\n", n, V, d);
}

}  // namespace

int main() {
    const std::string dir = make_temp_dir("lowbit-test-model");
    if (dir.empty()) return 2;
    std::printf("test_model_forward\n");
    try {
        self_checks(dir);
        const char* model = std::getenv("LOWBIT_TEST_MODEL");
        const char* logits = std::getenv("LOWBIT_TEST_LOGITS");
        if (model && *model && logits && *logits) {
            reference_check(model, logits);
        } else {
            std::printf("  reference comparison not configured (tools/sanitize.sh sets LOWBIT_TEST_MODEL and "
                        "LOWBIT_TEST_LOGITS)\n");
        }
    } catch (const std::exception& e) {
        check(false, std::string("unexpected exception: ") + e.what());
    }
    ::rmdir(dir.c_str());
    std::printf("test_model_forward: %d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
