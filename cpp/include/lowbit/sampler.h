// Token sampler: repeat penalty -> top-k -> top-p -> min-p -> temperature -> draw (llama.cpp's order), seedable.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace lowbit {

struct SamplerParams {
    float temperature = 0.8f;   // <= 0: greedy (argmax after the penalty)
    int top_k = 40;             // <= 0: off
    float top_p = 0.95f;        // >= 1: off
    float min_p = 0.05f;        // <= 0: off
    float repeat_penalty = 1.0f;  // 1: off
    int repeat_last_n = 64;     // penalize tokens among the last N of the history; -1: the whole history
    uint64_t seed = 0;
};

class Sampler {
public:
    // Throws Error naming the bad value (negative temperature, top_p outside [0, 1], ...).
    explicit Sampler(const SamplerParams& params);

    const SamplerParams& params() const { return params_; }
    void reseed(uint64_t seed) { rng_.seed(seed); }

    // Pick the next token from logits (n_vocab). history: the tokens so far (prompt and generated), of
    // which the last repeat_last_n are penalized. Does not modify logits.
    int32_t sample(const float* logits, int n_vocab, const int32_t* history, int n_history);

    // The candidate list after penalties, top-k, top-p, min-p and temperature: (logit, id) pairs,
    // sorted by logit descending whenever a truncation ran. For tests of each stage.
    const std::vector<std::pair<float, int32_t>>& candidates() const { return cand_; }
    void prepare(const float* logits, int n_vocab, const int32_t* history, int n_history);

private:
    SamplerParams params_;
    std::mt19937_64 rng_;  // explicit state: one stream per sampler, nothing global
    std::vector<std::pair<float, int32_t>> cand_;
    std::vector<float> probs_;
    std::vector<int32_t> seen_;
};

}  // namespace lowbit
