#include "worker/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/hash.h"

namespace strata {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Four floats, and four int32s: GCC's vector extensions, which compile to SSE2 here (and wider
// where the target allows), so that the log-sum-exp below runs four lanes per instruction.
typedef float V4F __attribute__((vector_size(16)));
typedef int32_t V4I __attribute__((vector_size(16)));

// exp(d) for d <= 0, per lane: Cephes' range reduction and polynomial (within 2 ulp of expf), 0
// below -87 (where float's normal range ends, and for -inf).
inline V4F ExpNonPositive(V4F d) {
  const V4F floor = d < -87.0f ? V4F{} - 87.0f : d;
  // d = n ln2 + r with |r| <= ln2 / 2; n by the round-to-nearest trick (|d log2 e| < 2^22).
  const V4F n = (floor * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V4F r = (floor - n * 0.693359375f) - n * -2.12194440e-4f;
  V4F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V4F e = p * r * r + r + 1.0f;
  const V4I bits = (__builtin_convertvector(n, V4I) + 127) << 23;
  const V4F scaled = e * (V4F)bits;  // same-size vector cast: the bits as floats
  return d < -87.0f ? V4F{} : scaled;
}

inline V4F Load4(const float* p) {
  V4F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// log(sum(exp(x))) over finite entries: the largest, then the sum of exp(x - max), four lanes at a
// time in float for 32 steps, then in double (about 1e-7 relative, far below the logits' own
// rounding). The largest goes to *max_out when given.
double LogSumExp(absl::Span<const float> x, float* max_out = nullptr) {
  const size_t n = x.size(), whole = n - n % 4;
  V4F m4 = V4F{} + kNegInf;
  for (size_t i = 0; i < whole; i += 4) {
    const V4F v = Load4(&x[i]);
    m4 = v > m4 ? v : m4;
  }
  float mx = std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
  for (size_t i = whole; i < n; ++i) mx = std::max(mx, x[i]);
  if (max_out != nullptr) *max_out = mx;
  if (mx == kNegInf) return kNegInf;
  double s = 0;
  for (size_t i = 0; i < whole;) {
    V4F part{};
    for (const size_t stop = std::min(whole, i + 4 * 32); i < stop; i += 4) {
      part += ExpNonPositive(Load4(&x[i]) - mx);
    }
    s += (static_cast<double>(part[0]) + part[1]) + (static_cast<double>(part[2]) + part[3]);
  }
  for (size_t i = whole; i < n; ++i) s += ExpNonPositive(V4F{} + (x[i] - mx))[0];
  return mx + std::log(s);
}

// Whether (value a, token i) comes before (value b, token j): value descending, token ascending.
inline bool Before(float a, int32_t i, float b, int32_t j) { return a != b ? a > b : i < j; }
inline bool PairBefore(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
  return Before(a.first, a.second, b.first, b.second);
}

// Top-n (value, token) pairs by value descending, token ascending.
std::vector<std::pair<int32_t, float>> TopN(absl::Span<const float> logits, int32_t n, double lse) {
  std::vector<std::pair<int32_t, float>> out;
  if (n <= 0) return out;
  const size_t k = std::min<size_t>(n, logits.size());
  std::vector<int32_t> best;  // tokens, in order
  best.reserve(k + 1);
  if (k <= 64) {
    // One pass keeping the k best so far: a token past them all is skipped with one comparison
    // (tokens come in ascending order, so an equal value never displaces an earlier token).
    for (size_t i = 0; i < logits.size(); ++i) {
      const float v = logits[i];
      if (best.size() == k && !(v > logits[best.back()])) continue;
      size_t at = best.size();
      while (at > 0 && Before(v, static_cast<int32_t>(i), logits[best[at - 1]], best[at - 1])) --at;
      best.insert(best.begin() + at, static_cast<int32_t>(i));
      if (best.size() > k) best.pop_back();
    }
  } else {
    std::vector<int32_t> idx(logits.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int32_t>(i);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [&](int32_t a, int32_t b) { return Before(logits[a], a, logits[b], b); });
    best.assign(idx.begin(), idx.begin() + k);
  }
  for (int32_t t : best) out.emplace_back(t, static_cast<float>(logits[t] - lse));
  return out;
}

int32_t RankOf(absl::Span<const float> logits, int32_t token) {
  const float v = logits[token];
  // Entries above v anywhere, and equal to v before `token`: two branch-free counts.
  int32_t above = 0, tied_before = 0;
  for (size_t i = 0; i < logits.size(); ++i) above += logits[i] > v;
  for (int32_t i = 0; i < token; ++i) tied_before += logits[i] == v;
  return 1 + above + tied_before;
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

namespace {

// XXH3 of (seed, position) under `salt`: each kind of draw its own stream.
uint64_t HashSeedPosition(uint64_t seed, int64_t position, uint64_t salt) {
  uint64_t buf[2] = {seed, static_cast<uint64_t>(position)};
  return Hash64(absl::string_view(reinterpret_cast<const char*>(buf), sizeof(buf)), salt);
}

}  // namespace

double SampleUniform(uint64_t seed, int64_t position) {
  const uint64_t h = HashSeedPosition(seed, position, 0x5eedull);
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
  for (const auto& [t, bias] : o.logit_bias) {
    if (t >= 0 && t < vocab && logits[t] != kNegInf) logits[t] += bias;
  }
  if (o.temperature > 0 && o.temperature != 1.0f) {
    const float inv = 1.0f / o.temperature;
    for (float& v : logits) v *= inv;
  }
  float top = kNegInf;  // the largest logit
  const double lse = LogSumExp(logits, &top);

  SampledToken out;
  if (o.temperature == 0) {
    int32_t best = 0;
    for (int32_t t = 1; t < vocab; ++t) {
      if (logits[t] > logits[best]) best = t;
    }
    out.token = best;
  } else if (gpu::DrawsByRace(o.top_p, o.top_k, vocab)) {
    // Nothing truncated by rank: an exponential race over the finite candidates (those min-p
    // keeps), argmax p_i / E_i with the lowest id on ties; in double, as the GPU computes it.
    out.token = 0;
    if (top != kNegInf) {
      const uint64_t key = SampleRaceKey(o.seed, position);
      const double min_p_bound = o.min_p;  // of p_max = 1
      const double top_d = top;
      double best = -1, log_best = -std::numeric_limits<double>::infinity();
      for (int32_t t = 0; t < vocab; ++t) {
        const float v = logits[t];
        if (v == kNegInf) continue;
        const double u = gpu::RaceUniform(key, t);
        const double d = static_cast<double>(v) - top_d;
        // A sure loser skips the exp and the log: log(p_i / E_i) = d - log(E_i), and
        // log(E_i) = log(-log u) >= log(1 - u) >= -u / (1 - u), so d < log(best) - u / (1 - u)
        // (less a margin for rounding) cannot win; multiplied through by 1 - u > 0, no division.
        if ((log_best - d - 1e-9) * (1.0 - u) > u) continue;
        const double e = std::exp(d);
        if (!(e >= min_p_bound)) continue;
        const double r = e / -std::log(u);
        if (r > best) {
          best = r;
          log_best = std::log(r);
          out.token = t;
        }
      }
    }
  } else {
    // Candidates by probability descending (token ascending on ties), then truncated.
    std::vector<std::pair<float, int32_t>>& cand = *scratch;
    cand.clear();
    for (int32_t t = 0; t < vocab; ++t) {
      if (logits[t] != kNegInf) cand.emplace_back(logits[t], t);
    }
    size_t keep = cand.size();
    if (o.top_k > 0 && static_cast<size_t>(o.top_k) < keep) {
      keep = static_cast<size_t>(o.top_k);
      std::partial_sort(cand.begin(), cand.begin() + keep, cand.end(), PairBefore);
    } else {
      SortByProbability(&cand);
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

uint64_t SampleRaceKey(uint64_t seed, int64_t position) {
  return HashSeedPosition(seed, position, 0x7ace);
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
  r.race_key = SampleRaceKey(o.seed, position);
  return r;
}

void SortByProbability(std::vector<std::pair<float, int32_t>>* candidates) {
  std::vector<std::pair<float, int32_t>>& c = *candidates;
  const size_t n = c.size();
  if (n < 1024) {
    std::sort(c.begin(), c.end(), PairBefore);
    return;
  }
  // Keys that order as the logits descending: the float's bits made monotonic (negatives
  // flipped, positives' sign bit set), then complemented; -0 taken as 0. They replace the logits'
  // bits in place for the sort and turn back into them after (0 for -0). LSD radix, 8 bits a pass,
  // stable, so equal logits keep their (ascending) token order. The second half of the vector is
  // the passes' other buffer (its capacity stays for the next call).
  auto key_of = [](const std::pair<float, int32_t>& item) {
    uint32_t k;
    std::memcpy(&k, &item.first, sizeof(k));
    return k;
  };
  c.resize(2 * n);
  std::pair<float, int32_t>* from = c.data();
  std::pair<float, int32_t>* to = from + n;
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits = from[i].first == 0.0f ? 0 : key_of(from[i]);
    bits = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
    bits = ~bits;
    std::memcpy(&from[i].first, &bits, sizeof(bits));
  }
  for (int shift = 0; shift < 32; shift += 8) {
    size_t count[257] = {};
    for (size_t i = 0; i < n; ++i) ++count[((key_of(from[i]) >> shift) & 0xff) + 1];
    if (count[((key_of(from[0]) >> shift) & 0xff) + 1] == n) continue;  // one bucket: no-op
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (size_t i = 0; i < n; ++i) to[count[(key_of(from[i]) >> shift) & 0xff]++] = from[i];
    std::swap(from, to);
  }
  for (size_t i = 0; i < n; ++i) {
    const uint32_t monotonic = ~key_of(from[i]);
    const uint32_t bits = (monotonic & 0x80000000u) != 0 ? monotonic & 0x7fffffffu : ~monotonic;
    c[i].second = from[i].second;  // from[i] is c[i] itself, or lies in the other half
    std::memcpy(&c[i].first, &bits, sizeof(bits));
  }
  c.resize(n);
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
