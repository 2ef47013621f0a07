#include "worker/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/hash.h"

namespace strata {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// log(sum(exp(x))) over finite entries.
double LogSumExp(absl::Span<const float> x) {
  float mx = kNegInf;
  for (float v : x) mx = std::max(mx, v);
  if (mx == kNegInf) return kNegInf;
  double s = 0;
  for (float v : x) s += std::exp(static_cast<double>(v) - mx);
  return mx + std::log(s);
}

// Top-n (value, token) pairs by value descending, token ascending.
std::vector<std::pair<int32_t, float>> TopN(absl::Span<const float> logits, int32_t n, double lse) {
  std::vector<std::pair<int32_t, float>> out;
  if (n <= 0) return out;
  std::vector<int32_t> idx(logits.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int32_t>(i);
  const size_t k = std::min<size_t>(n, idx.size());
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
  });
  for (size_t i = 0; i < k; ++i) out.emplace_back(idx[i], static_cast<float>(logits[idx[i]] - lse));
  return out;
}

int32_t RankOf(absl::Span<const float> logits, int32_t token) {
  int32_t rank = 1;
  const float v = logits[token];
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] > v || (logits[i] == v && static_cast<int32_t>(i) < token)) ++rank;
  }
  return rank;
}

}  // namespace

void PenaltyState::AddPrompt(absl::Span<const int32_t> tokens) {
  for (int32_t t : tokens) {
    if (seen_index_.try_emplace(t, static_cast<int32_t>(seen_tokens_.size())).second) {
      seen_tokens_.push_back(t);
      auto it = output_index_.find(t);
      seen_counts_.push_back(it == output_index_.end() ? 0 : output_token_counts_[it->second]);
    }
  }
}

void PenaltyState::AddOutput(int32_t token) {
  auto [seen, new_seen] = seen_index_.try_emplace(token, static_cast<int32_t>(seen_tokens_.size()));
  if (new_seen) {
    seen_tokens_.push_back(token);
    seen_counts_.push_back(1);
  } else {
    ++seen_counts_[seen->second];
  }
  auto [out, new_out] =
      output_index_.try_emplace(token, static_cast<int32_t>(output_tokens_.size()));
  if (new_out) {
    output_tokens_.push_back(token);
    output_token_counts_.push_back(1);
  } else {
    ++output_token_counts_[out->second];
  }
}

double SampleUniform(uint64_t seed, int64_t position) {
  uint64_t buf[2] = {seed, static_cast<uint64_t>(position)};
  const uint64_t h =
      Hash64(absl::string_view(reinterpret_cast<const char*>(buf), sizeof(buf)), 0x5eedull);
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);  // 53 bits
}

SampledToken Sample(absl::Span<float> logits, const SamplingOptions& o,
                    const PenaltyState& penalties, int64_t position,
                    absl::Span<const int32_t> banned,
                    std::vector<std::pair<float, int32_t>>* scratch) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  // Penalties.
  if (o.repetition_penalty != 1.0f) {
    auto apply = [&](int32_t t) {
      float& v = logits[t];
      v = v > 0 ? v / o.repetition_penalty : v * o.repetition_penalty;
    };
    // Each token seen once: the distinct tokens, not a lookup per vocabulary entry.
    for (int32_t t : penalties.seen_tokens()) {
      if (t >= 0 && t < vocab) apply(t);
    }
  }
  if (o.presence_penalty != 0.0f || o.frequency_penalty != 0.0f) {
    const std::vector<int32_t>& tokens = penalties.output_tokens();
    const std::vector<int32_t>& counts = penalties.output_token_counts();
    for (size_t i = 0; i < tokens.size(); ++i) {
      const int32_t t = tokens[i];
      if (t >= 0 && t < vocab) logits[t] -= o.presence_penalty + o.frequency_penalty * counts[i];
    }
  }
  for (int32_t t : banned) {
    if (t >= 0 && t < vocab) logits[t] = kNegInf;
  }
  if (o.temperature > 0 && o.temperature != 1.0f) {
    const float inv = 1.0f / o.temperature;
    for (float& v : logits) v *= inv;
  }
  const double lse = LogSumExp(logits);

  SampledToken out;
  if (o.temperature == 0) {
    int32_t best = 0;
    for (int32_t t = 1; t < vocab; ++t) {
      if (logits[t] > logits[best]) best = t;
    }
    out.token = best;
  } else {
    // Candidates by probability descending (token ascending on ties), then truncated.
    std::vector<std::pair<float, int32_t>>& cand = *scratch;
    cand.clear();
    for (int32_t t = 0; t < vocab; ++t) {
      if (logits[t] != kNegInf) cand.emplace_back(logits[t], t);
    }
    auto by_prob = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    };
    size_t keep = cand.size();
    if (o.top_k > 0 && static_cast<size_t>(o.top_k) < keep) {
      keep = static_cast<size_t>(o.top_k);
      std::partial_sort(cand.begin(), cand.begin() + keep, cand.end(), by_prob);
    } else {
      std::sort(cand.begin(), cand.end(), by_prob);
    }
    cand.resize(keep);
    if (cand.empty()) {
      out.token = 0;
    } else {
      // Probabilities relative to the most likely candidate.
      const double top = cand[0].first;
      std::vector<double> p(cand.size());
      for (size_t i = 0; i < cand.size(); ++i) p[i] = std::exp(cand[i].first - top);
      size_t n = cand.size();
      if (o.min_p > 0) {
        while (n > 1 && p[n - 1] < o.min_p * p[0]) --n;  // p[0] is the largest
      }
      if (o.top_p < 1.0f) {
        double cum = 0, full = 0;
        for (size_t i = 0; i < n; ++i) full += p[i];
        for (size_t i = 0; i < n; ++i) {
          cum += p[i];
          if (cum >= o.top_p * full) {
            n = i + 1;
            break;
          }
        }
      }
      double kept = 0;
      for (size_t i = 0; i < n; ++i) kept += p[i];
      const double u = SampleUniform(o.seed, position) * kept;
      double acc = 0;
      out.token = cand[n - 1].second;
      for (size_t i = 0; i < n; ++i) {
        acc += p[i];
        if (u < acc) {
          out.token = cand[i].second;
          break;
        }
      }
    }
  }
  out.logprob = static_cast<float>(logits[out.token] - lse);
  if (o.logprobs >= 0) {
    out.rank = RankOf(logits, out.token);
    out.top = TopN(logits, o.logprobs, lse);
  }
  return out;
}

gpu::SampleRow SampleRowOf(const SamplingOptions& o, int64_t position) {
  gpu::SampleRow r;
  r.temperature = o.temperature;
  r.top_k = o.top_k;
  r.top_p = o.top_p;
  r.min_p = o.min_p;
  r.repetition_penalty = o.repetition_penalty;
  r.presence_penalty = o.presence_penalty;
  r.frequency_penalty = o.frequency_penalty;
  r.u = SampleUniform(o.seed, position);
  return r;
}

SampledToken LogprobsOf(absl::Span<const float> logits, int32_t token, int32_t top_n) {
  const double lse = LogSumExp(logits);
  SampledToken out;
  out.token = token;
  out.logprob = static_cast<float>(logits[token] - lse);
  out.rank = RankOf(logits, token);
  out.top = TopN(logits, top_n, lse);
  return out;
}

}  // namespace strata
