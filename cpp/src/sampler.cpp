// Token sampler with llama.cpp's semantics and order: penalties -> top_k -> top_p -> min_p -> temperature -> draw.
#include "lowbit/sampler.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "lowbit/types.h"

namespace lowbit {

namespace {

// Higher logit first; equal logits by lower id, so every truncation is deterministic.
bool by_logit_desc(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
}

}  // namespace

Sampler::Sampler(const SamplerParams& p) : params_(p), rng_(p.seed) {
    if (!std::isfinite(p.temperature) || p.temperature < 0.0f) {
        throw Error("temperature must be a finite number >= 0 (0 means greedy); got " + std::to_string(p.temperature));
    }
    if (!(p.top_p >= 0.0f && p.top_p <= 1.0f)) {
        throw Error("top_p must be in [0, 1] (1 turns it off); got " + std::to_string(p.top_p));
    }
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) {
        throw Error("min_p must be in [0, 1] (0 turns it off); got " + std::to_string(p.min_p));
    }
    if (!(std::isfinite(p.repeat_penalty) && p.repeat_penalty > 0.0f)) {
        throw Error("repeat_penalty must be a finite number > 0 (1 turns it off); got " +
                    std::to_string(p.repeat_penalty));
    }
    if (p.top_k < 0) throw Error("top_k must be >= 0 (0 turns it off); got " + std::to_string(p.top_k));
    if (p.repeat_last_n < -1) {
        throw Error("repeat_last_n must be >= -1 (-1: the whole history); got " + std::to_string(p.repeat_last_n));
    }
}

void Sampler::prepare(const float* logits, int n_vocab, const int32_t* history, int n_history) {
    if (n_vocab <= 0) throw Error("sample needs at least one logit");
    cand_.resize(n_vocab);
    for (int i = 0; i < n_vocab; ++i) cand_[i] = {logits[i], i};

    // Repeat penalty over the distinct tokens of the last N: positive logits are divided by the penalty,
    // negative ones multiplied, so both move towards "less likely" (llama.cpp's llama_sampler_penalties).
    if (params_.repeat_penalty != 1.0f && n_history > 0 && params_.repeat_last_n != 0) {
        const int n = params_.repeat_last_n < 0 ? n_history : std::min(n_history, params_.repeat_last_n);
        seen_.assign(history + n_history - n, history + n_history);
        std::sort(seen_.begin(), seen_.end());
        seen_.erase(std::unique(seen_.begin(), seen_.end()), seen_.end());
        for (int32_t t : seen_) {
            if (t < 0 || t >= n_vocab) continue;
            float& l = cand_[t].first;
            l = l <= 0.0f ? l * params_.repeat_penalty : l / params_.repeat_penalty;
        }
    }

    if (params_.temperature <= 0.0f) {  // greedy: the first maximum, as torch.argmax
        auto best = std::max_element(cand_.begin(), cand_.end(),
                                     [](const auto& a, const auto& b) { return a.first < b.first; });
        std::pair<float, int32_t> keep = *best;
        cand_.assign(1, keep);
        return;
    }

    bool sorted = false;
    if (params_.top_k > 0 && params_.top_k < n_vocab) {
        std::partial_sort(cand_.begin(), cand_.begin() + params_.top_k, cand_.end(), by_logit_desc);
        cand_.resize(params_.top_k);
        sorted = true;
    }

    if (params_.top_p < 1.0f) {
        if (!sorted) std::sort(cand_.begin(), cand_.end(), by_logit_desc);
        sorted = true;
        // Softmax of the survivors (at temperature 1: temperature comes later), then the shortest prefix
        // whose mass reaches top_p, keeping at least one token.
        const float max_l = cand_[0].first;
        double sum = 0.0;
        probs_.resize(cand_.size());
        for (size_t i = 0; i < cand_.size(); ++i) sum += probs_[i] = std::exp(cand_[i].first - max_l);
        double cum = 0.0;
        size_t keep = cand_.size();
        for (size_t i = 0; i < cand_.size(); ++i) {
            cum += probs_[i] / sum;
            if (cum >= params_.top_p) {
                keep = i + 1;
                break;
            }
        }
        cand_.resize(keep);
    }

    if (params_.min_p > 0.0f) {
        // p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p); at least one token stays.
        float max_l = -INFINITY;
        for (const auto& c : cand_) max_l = std::max(max_l, c.first);
        const float min_logit = max_l + std::log(params_.min_p);
        auto end = std::remove_if(cand_.begin(), cand_.end(), [&](const auto& c) { return c.first < min_logit; });
        cand_.erase(end, cand_.end());
    }

    for (auto& c : cand_) c.first /= params_.temperature;
}

int32_t Sampler::sample(const float* logits, int n_vocab, const int32_t* history, int n_history) {
    const bool penalty = params_.repeat_penalty != 1.0f && n_history > 0 && params_.repeat_last_n != 0;
    if (params_.temperature <= 0.0f && !penalty && n_vocab > 0) {
        // Greedy without penalties: the first maximum, read straight from the logits (what prepare() would
        // leave as its single candidate, without building the candidate list).
        int32_t best = 0;
        for (int i = 1; i < n_vocab; ++i) {
            if (logits[i] > logits[best]) best = i;
        }
        return best;
    }
    prepare(logits, n_vocab, history, n_history);
    if (cand_.size() == 1) return cand_[0].second;
    float max_l = -INFINITY;
    for (const auto& c : cand_) max_l = std::max(max_l, c.first);
    double sum = 0.0;
    probs_.resize(cand_.size());
    for (size_t i = 0; i < cand_.size(); ++i) sum += probs_[i] = std::exp(cand_[i].first - max_l);
    // A uniform double in [0, 1) from the top 53 bits: the same stream on every platform
    // (std::uniform_real_distribution is implementation-defined).
    const double u = static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0) * sum;
    double cum = 0.0;
    for (size_t i = 0; i < cand_.size(); ++i) {
        cum += probs_[i];
        if (u < cum) return cand_[i].second;
    }
    return cand_.back().second;
}

}  // namespace lowbit
