#include "worker/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

SampledToken Draw(std::vector<float> logits, const SamplingOptions& o, int64_t position,
                  const PenaltyState& pen = {}, std::vector<int32_t> banned = {}) {
  std::vector<std::pair<float, int32_t>> scratch;
  return Sample(absl::MakeSpan(logits), o, pen, position, banned, &scratch);
}

TEST(SamplerTest, GreedyTakesArgmaxLowestIdOnTies) {
  SamplingOptions o;
  o.temperature = 0;
  EXPECT_EQ(Draw({0.1f, 3.0f, 3.0f, -1.0f}, o, 0).token, 1);
}

TEST(SamplerTest, SamplingIsAPureFunctionOfSeedPositionAndLogits) {
  const std::vector<float> logits = {1.0f, 1.2f, 0.8f, 1.1f, 0.9f};
  SamplingOptions o;
  o.seed = 42;
  std::vector<int32_t> first;
  for (int64_t pos = 0; pos < 50; ++pos) first.push_back(Draw(logits, o, pos).token);
  for (int64_t pos = 0; pos < 50; ++pos) EXPECT_EQ(Draw(logits, o, pos).token, first[pos]);
  // Positions differ in their draws: not all the same token.
  EXPECT_NE(std::count(first.begin(), first.end(), first[0]), 50);
  o.seed = 43;
  int same = 0;
  for (int64_t pos = 0; pos < 50; ++pos) same += Draw(logits, o, pos).token == first[pos];
  EXPECT_LT(same, 50);
}

TEST(SamplerTest, FrequenciesFollowTheTemperedSoftmax) {
  const std::vector<float> logits = {2.0f, 1.0f, 0.0f, -1.0f};
  for (float temperature : {1.0f, 0.5f, 2.0f}) {
    SamplingOptions o;
    o.temperature = temperature;
    std::map<int32_t, int> counts;
    const int n = 40000;
    for (int i = 0; i < n; ++i) {
      o.seed = static_cast<uint64_t>(i);
      ++counts[Draw(logits, o, 7).token];
    }
    double z = 0;
    for (float l : logits) z += std::exp(l / temperature);
    for (int32_t t = 0; t < 4; ++t) {
      const double p = std::exp(logits[t] / temperature) / z;
      EXPECT_NEAR(counts[t] / double(n), p, 4 * std::sqrt(p * (1 - p) / n) + 1e-3)
          << "T " << temperature << " token " << t;
    }
  }
}

// The walk in probability order (top-k below the vocabulary) draws from the renormalized softmax of
// what it keeps.
TEST(SamplerTest, TruncatedDrawsFollowTheRenormalizedSoftmax) {
  const std::vector<float> logits = {2.0f, 1.0f, 0.0f, -1.0f};
  SamplingOptions o;
  o.top_k = 3;
  std::map<int32_t, int> counts;
  const int n = 40000;
  for (int i = 0; i < n; ++i) {
    o.seed = static_cast<uint64_t>(i);
    ++counts[Draw(logits, o, 7).token];
  }
  const double z = std::exp(2.0) + std::exp(1.0) + 1.0;
  for (int32_t t = 0; t < 3; ++t) {
    const double p = std::exp(logits[t]) / z;
    EXPECT_NEAR(counts[t] / double(n), p, 4 * std::sqrt(p * (1 - p) / n) + 1e-3) << t;
  }
  EXPECT_EQ(counts[3], 0);
}

TEST(SamplerTest, TruncationsKeepOnlyTheirCandidates) {
  const std::vector<float> logits = {0.0f, 3.0f, 2.9f, 1.0f, -5.0f};
  for (int i = 0; i < 300; ++i) {
    SamplingOptions o;
    o.seed = static_cast<uint64_t>(i);
    o.top_k = 2;
    const int32_t k = Draw(logits, o, 0).token;
    EXPECT_TRUE(k == 1 || k == 2) << k;
    o.top_k = 0;
    o.top_p = 0.3f;  // the top token alone holds ~47%
    EXPECT_EQ(Draw(logits, o, 0).token, 1);
    o.top_p = 1.0f;
    o.min_p = 0.5f;  // keeps tokens with p >= 0.5 p_max: 1 and 2
    const int32_t m = Draw(logits, o, 0).token;
    EXPECT_TRUE(m == 1 || m == 2) << m;
  }
}

// Without a truncation that depends on rank (top-p 1, top-k 0 or the whole vocabulary), a draw is
// an exponential race: argmax over the candidates of p_i / E_i, E_i = -log(RaceUniform(key, i)).
TEST(SamplerTest, UntruncatedDrawsAreAnExponentialRace) {
  auto race = [](const std::vector<float>& logits, uint64_t key, double min_p) {
    const float top = *std::max_element(logits.begin(), logits.end());
    int32_t best = 0;
    double best_ratio = -1;
    for (int32_t t = 0; t < static_cast<int32_t>(logits.size()); ++t) {
      if (logits[t] == -std::numeric_limits<float>::infinity()) continue;
      const double e = std::exp(static_cast<double>(logits[t]) - top);
      if (e < min_p) continue;
      const double r = e / -std::log(gpu::RaceUniform(key, t));
      if (r > best_ratio) best_ratio = r, best = t;
    }
    return best;
  };
  const float inf = std::numeric_limits<float>::infinity();
  int differs_from_walk = 0;
  for (int i = 0; i < 200; ++i) {
    SamplingOptions o;
    o.seed = static_cast<uint64_t>(i) * 7919;
    const int64_t pos = i % 13;
    const uint64_t key = SampleRaceKey(o.seed, pos);
    const std::vector<float> logits = {0.0f, -1.0f, 1.0f, 0.5f, -inf, 0.7f};
    const int32_t want = race(logits, key, 0);
    EXPECT_EQ(Draw(logits, o, pos).token, want);
    EXPECT_NE(want, 4);  // -inf never wins
    o.top_k = 6;         // the whole vocabulary: the same race
    EXPECT_EQ(Draw(logits, o, pos).token, want);
    o.top_k = 0;
    o.min_p = 0.5f;  // keeps p >= 0.5 p_max: tokens 2, 3 and 5
    EXPECT_EQ(Draw(logits, o, pos).token, race(logits, key, 0.5));
    // Top-k below the vocabulary walks the candidates in probability order with SampleUniform's
    // draw instead: often another token for the same seed.
    SamplingOptions walk;
    walk.seed = o.seed;
    walk.top_k = 5;
    differs_from_walk += Draw(logits, walk, pos).token != want;
  }
  EXPECT_GT(differs_from_walk, 20);
}

// A race's pick moves only when the two best ratios swap, so logits that differ in their last bits
// (another batch's GEMM, a prefill in place of a decode step after a fail-over) keep their tokens,
// where a walk over the candidates in probability order moves whenever the draw lies near one of
// the many boundaries between unlikely tokens.
TEST(SamplerTest, RacesKeepTheirTokensWhenLogitsMoveInTheLastBits) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  std::normal_distribution<float> noise(0.0f, 1e-5f);
  int race_moved = 0, walk_moved = 0;
  for (int i = 0; i < 500; ++i) {
    std::vector<float> a(8192), b(8192);
    for (size_t t = 0; t < a.size(); ++t) {
      a[t] = normal(rng);
      b[t] = a[t] + noise(rng);
    }
    SamplingOptions o;
    o.seed = static_cast<uint64_t>(i);
    o.temperature = 0.8f;
    race_moved += Draw(a, o, 3).token != Draw(b, o, 3).token;
    o.top_k = 8191;  // below the vocabulary: a walk in probability order
    walk_moved += Draw(a, o, 3).token != Draw(b, o, 3).token;
  }
  EXPECT_EQ(race_moved, 0);
  EXPECT_GE(walk_moved, 2);  // 6 of 500 when written: the noise is large enough to matter
}

TEST(SamplerTest, BannedTokensAreNeverSampled) {
  SamplingOptions o;
  o.temperature = 0;
  EXPECT_EQ(Draw({0.0f, 5.0f, 1.0f}, o, 0, {}, {1}).token, 2);
  o.temperature = 1;
  for (int i = 0; i < 200; ++i) {
    o.seed = static_cast<uint64_t>(i);
    EXPECT_NE(Draw({0.0f, 5.0f, 1.0f}, o, 0, {}, {1}).token, 1);
  }
}

// logit_bias adds to the logits before temperature: +100 all but forces a token, -100 takes the
// argmax away, and a banned token stays banned; log-probabilities are of the biased logits.
TEST(SamplerTest, LogitBiasShiftsTheLogits) {
  SamplingOptions o;
  o.temperature = 0;
  o.logit_bias = {{1, -100.0f}};
  EXPECT_EQ(Draw({0.0f, 5.0f, 1.0f}, o, 0).token, 2);
  o.temperature = 1;
  o.logit_bias = {{0, 100.0f}};
  for (int i = 0; i < 100; ++i) {
    o.seed = static_cast<uint64_t>(i);
    EXPECT_EQ(Draw({0.0f, 5.0f, 1.0f}, o, i).token, 0);
  }
  o.logprobs = 0;
  o.logit_bias = {{2, 2.0f}};
  const SampledToken t = Draw({0.0f, 0.0f, 1.0f}, o, 0);
  const double z = std::log(1.0 + 1.0 + std::exp(3.0));
  EXPECT_NEAR(t.logprob, (t.token == 2 ? 3.0 : 0.0) - z, 1e-5);
  o.logit_bias = {{1, 100.0f}};
  EXPECT_NE(Draw({0.0f, 5.0f, 1.0f}, o, 0, {}, {1}).token, 1);
}

TEST(SamplerTest, PenaltiesFollowTheirDefinitions) {
  PenaltyState pen;
  pen.AddPrompt(std::vector<int32_t>{0});
  pen.AddOutput(1);
  pen.AddOutput(1);
  SamplingOptions o;
  o.temperature = 0;
  o.repetition_penalty = 4.0f;
  // Token 0 (prompt, positive logit) 4 -> 1; token 1 (output) 3 -> 0.75; token 2 unseen stays 2.
  EXPECT_EQ(Draw({4.0f, 3.0f, 2.0f}, o, 0, pen).token, 2);
  o.repetition_penalty = 1.0f;
  o.frequency_penalty = 1.0f;  // token 1: 3 - 2 = 1
  EXPECT_EQ(Draw({0.0f, 3.0f, 2.0f}, o, 0, pen).token, 2);
  o.frequency_penalty = 0.0f;
  o.presence_penalty = 0.5f;  // token 1: 3 - 0.5 = 2.5 still wins
  EXPECT_EQ(Draw({0.0f, 3.0f, 2.0f}, o, 0, pen).token, 1);
}

TEST(SamplerTest, LogprobsAreLogSoftmaxWithRanks) {
  SamplingOptions o;
  o.temperature = 0;
  o.logprobs = 2;
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f};
  const SampledToken s = Draw(logits, o, 0);
  const double z = std::exp(1.0) + std::exp(3.0) + std::exp(2.0);
  EXPECT_EQ(s.token, 1);
  EXPECT_NEAR(s.logprob, 3.0 - std::log(z), 1e-6);
  EXPECT_EQ(s.rank, 1);
  ASSERT_EQ(s.top.size(), 2u);
  EXPECT_EQ(s.top[0].first, 1);
  EXPECT_EQ(s.top[1].first, 2);
  EXPECT_NEAR(s.top[1].second, 2.0 - std::log(z), 1e-6);
  const SampledToken p = LogprobsOf(logits, 0, 1);
  EXPECT_EQ(p.rank, 3);
  EXPECT_NEAR(p.logprob, 1.0 - std::log(z), 1e-6);
}

// The GPU sampler's lists, kept current token by token, hold exactly what rebuilding them from the
// counts would: every prompt or output token once with its output count, and the output's tokens.
// LogprobsOf against the definitions computed the slow way (log-sum-exp in double, rank by
// counting, the top list by a full sort), over vocabularies up to Llama 3's with many exact ties
// and banned (-inf) entries: the same ranks and top tokens in the same order, log-probabilities
// within 1e-6.
TEST(SamplerTest, LogprobsOfMatchesTheDefinitions) {
  std::mt19937 rng(11);
  const float inf = std::numeric_limits<float>::infinity();
  for (const int vocab : {1, 2, 7, 1000, 128256}) {
    for (int trial = 0; trial < 3; ++trial) {
      SCOPED_TRACE(::testing::Message() << "vocab " << vocab << " trial " << trial);
      std::vector<float> logits(vocab);
      std::normal_distribution<float> normal(0.0f, 4.0f);
      // Trial 0: continuous values; 1: values on a coarse grid (many ties); 2: that, with a
      // quarter of the entries banned and one very negative value.
      for (float& v : logits) v = trial == 0 ? normal(rng) : std::round(normal(rng) * 2) / 2;
      if (trial == 2) {
        for (int i = 0; i < vocab; i += 4) logits[i] = -inf;
        if (vocab > 1) logits[1] = -200.0f;
      }
      if (std::all_of(logits.begin(), logits.end(), [&](float v) { return v == -inf; })) {
        logits[0] = 0.0f;
      }
      double mx = -inf;
      for (float v : logits) mx = std::max<double>(mx, v);
      double sum = 0;
      for (float v : logits) sum += std::exp(double(v) - mx);
      const double lse = mx + std::log(sum);
      std::vector<int32_t> order(vocab);
      for (int i = 0; i < vocab; ++i) order[i] = i;
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
      });
      for (const int top_n : {0, 1, 5, 20}) {
        for (int probe = 0; probe < 4; ++probe) {
          int32_t token = static_cast<int32_t>(rng() % vocab);
          if (probe == 0) token = order[0];
          if (logits[token] == -inf) continue;
          const SampledToken got = LogprobsOf(logits, token, top_n);
          // 1e-6, plus the float result's own rounding; banned entries exactly -inf.
          auto near = [](float got_value, double want) {
            return std::isinf(want) ? got_value == want
                                    : std::fabs(got_value - want) <= 1e-6 + 1e-7 * std::fabs(want);
          };
          EXPECT_TRUE(near(got.logprob, logits[token] - lse))
              << "token " << token << ": " << got.logprob << " against " << logits[token] - lse;
          int32_t rank = 1;
          for (int i = 0; i < vocab; ++i) {
            rank += logits[i] > logits[token] || (logits[i] == logits[token] && i < token);
          }
          EXPECT_EQ(got.rank, rank) << "token " << token;
          ASSERT_EQ(got.top.size(), std::min<size_t>(top_n, vocab));
          for (size_t i = 0; i < got.top.size(); ++i) {
            EXPECT_EQ(got.top[i].first, order[i]) << "top " << i;
            EXPECT_TRUE(near(got.top[i].second, logits[order[i]] - lse))
                << "top " << i << ": " << got.top[i].second << " against "
                << logits[order[i]] - lse;
          }
        }
      }
    }
  }
}

// SortByProbability gives std::sort's order under Sample's comparison (logit descending, token
// ascending), on small and vocabulary-sized inputs with ties, zeros of both signs, infinities and
// values spanning every exponent byte.
TEST(SamplerTest, SortByProbabilityIsTheComparisonSortsOrder) {
  std::mt19937 rng(3);
  const float inf = std::numeric_limits<float>::infinity();
  for (const size_t n : {size_t{0}, size_t{1}, size_t{5}, size_t{1023}, size_t{1024}, size_t{5000},
                         size_t{128256}}) {
    for (int trial = 0; trial < 3; ++trial) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " trial " << trial);
      std::vector<std::pair<float, int32_t>> cand(n);
      std::normal_distribution<float> normal(0.0f, 5.0f);
      std::uniform_int_distribution<int> pick(0, 9);
      for (size_t i = 0; i < n; ++i) {
        float v = normal(rng);
        if (trial == 1) v = std::round(v);                       // many ties
        if (trial == 2) v = std::ldexp(v, pick(rng) * 12 - 60);  // tiny to huge
        switch (pick(rng)) {
          case 0:
            v = 0.0f;
            break;
          case 1:
            v = -0.0f;
            break;
          case 2:
            if (trial == 2) v = i % 2 == 0 ? inf : -inf;
            break;
          default:
            break;
        }
        cand[i] = {v, static_cast<int32_t>(i)};
      }
      std::vector<std::pair<float, int32_t>> want = cand;
      std::sort(want.begin(), want.end(), [](const auto& a, const auto& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
      });
      SortByProbability(&cand);
      ASSERT_EQ(cand.size(), n);
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(cand[i].second, want[i].second) << "position " << i;
        ASSERT_EQ(cand[i].first, want[i].first) << "position " << i;  // 0 == -0
      }
    }
  }
}

TEST(SamplerTest, PenaltyListsTrackPromptAndOutput) {
  std::mt19937 rng(3);
  PenaltyState ps;
  std::vector<int32_t> prompt(300);
  for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % 200);
  std::map<int32_t, int32_t> output_counts;  // the reference, counted here
  ps.AddOutput(7);                           // output before the prompt arrives (a resumed request)
  ++output_counts[7];
  ps.AddPrompt(prompt);
  for (int i = 0; i < 500; ++i) {
    const int32_t t = static_cast<int32_t>(rng() % 260);
    ps.AddOutput(t);
    ++output_counts[t];
    if (i % 50 != 49) continue;
    std::map<int32_t, int32_t> want_seen, want_out, got_seen, got_out;
    for (int32_t p : prompt) want_seen[p] = 0;
    for (const auto& [tok, c] : output_counts) want_seen[tok] = want_out[tok] = c;
    ASSERT_EQ(ps.seen_tokens().size(), ps.seen_counts().size());
    ASSERT_EQ(ps.output_tokens().size(), ps.output_token_counts().size());
    for (size_t j = 0; j < ps.seen_tokens().size(); ++j) {
      EXPECT_TRUE(got_seen.emplace(ps.seen_tokens()[j], ps.seen_counts()[j]).second)
          << "token " << ps.seen_tokens()[j] << " listed twice";
    }
    for (size_t j = 0; j < ps.output_tokens().size(); ++j) {
      EXPECT_TRUE(got_out.emplace(ps.output_tokens()[j], ps.output_token_counts()[j]).second);
    }
    EXPECT_EQ(got_seen, want_seen);
    EXPECT_EQ(got_out, want_out);
  }
}

TEST(SamplerTest, ValidationNamesTheField) {
  SamplingOptions o;
  o.top_p = 0;
  EXPECT_EQ(ValidateSamplingKnobs(o, 100).message(), "sampling.top_p must be in (0, 1]");
  o = {};
  o.top_k = 101;
  EXPECT_EQ(ValidateSamplingKnobs(o, 100).message(), "sampling.top_k must be in [0, vocab_size]");
  o = {};
  o.temperature = -1;
  EXPECT_FALSE(ValidateSamplingKnobs(o, 100).ok());
  // The engine checks a logit bias as the API layer does (one rule, in SamplingKnobs).
  o = {};
  o.logit_bias = {{7, 1.0f}, {100, 1.0f}};
  EXPECT_EQ(ValidateSamplingKnobs(o, 100).message(),
            "sampling.logit_bias[1] token 100 is outside the vocabulary [0, 100)");
  o.logit_bias = {{7, 1.0f}, {7, 2.0f}};
  EXPECT_EQ(ValidateSamplingKnobs(o, 100).message(), "sampling.logit_bias[1] repeats token 7");
  o.logit_bias = {{7, 100.5f}};
  EXPECT_EQ(ValidateSamplingKnobs(o, 100).message(),
            "sampling.logit_bias[0] bias must be in [-100, 100]");
  EXPECT_TRUE(ValidateSamplingKnobs({}, 100).ok());
}

}  // namespace
}  // namespace strata
