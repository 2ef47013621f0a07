#include "bench/workload.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace strata {
namespace {

int64_t Draw(std::mt19937_64* rng, LengthRange r) {
  return std::uniform_int_distribution<int64_t>(r.min, r.max)(*rng);
}

}  // namespace

std::vector<int32_t> RandomTokens(std::mt19937_64* rng, int64_t n, int32_t vocab) {
  std::uniform_int_distribution<int32_t> d(0, vocab - 1);
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (int32_t& t : out) t = d(*rng);
  return out;
}

absl::StatusOr<LengthRange> ParseLengthRange(const std::string& spec) {
  std::vector<std::string> parts = absl::StrSplit(spec, ':');
  LengthRange r;
  if (parts.size() == 1 && absl::SimpleAtoi(parts[0], &r.min)) {
    r.max = r.min;
  } else if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &r.min) ||
             !absl::SimpleAtoi(parts[1], &r.max)) {
    return absl::InvalidArgumentError(absl::StrCat("\"", spec, "\" is not N or MIN:MAX"));
  }
  if (r.min < 1 || r.max < r.min) {
    return absl::InvalidArgumentError(absl::StrCat("\"", spec, "\": need 1 <= MIN <= MAX"));
  }
  return r;
}

namespace {

absl::StatusOr<std::vector<Conversation>> MakeConversations(const WorkloadOptions& o) {
  if (o.rate_per_s <= 0) return absl::InvalidArgumentError("rate must be positive");
  if (o.num_requests < 1) return absl::InvalidArgumentError("num_requests must be positive");
  if (o.vocab_size < 1) return absl::InvalidArgumentError("vocab_size must be positive");
  std::mt19937_64 rng(o.seed);
  std::exponential_distribution<double> gap(o.rate_per_s);
  std::vector<Conversation> out;
  double t = 0;
  if (o.kind == "random" || o.kind == "shared-prefix") {
    std::vector<std::vector<int32_t>> prefixes;
    if (o.kind == "shared-prefix") {
      if (o.num_shared_prefixes < 1 || o.shared_fraction < 0 || o.shared_fraction > 1) {
        return absl::InvalidArgumentError(
            "shared-prefix needs >= 1 prefix and a fraction in [0, 1]");
      }
      for (int i = 0; i < o.num_shared_prefixes; ++i) {
        prefixes.push_back(RandomTokens(&rng, o.shared_prefix_tokens, o.vocab_size));
      }
    }
    std::bernoulli_distribution shared(o.shared_fraction);
    for (int64_t i = 0; i < o.num_requests; ++i) {
      Conversation c;
      c.start = absl::Seconds(t);
      t += gap(rng);
      Turn turn;
      if (!prefixes.empty() && shared(rng)) {
        turn.prompt = prefixes[std::uniform_int_distribution<size_t>(0, prefixes.size() - 1)(rng)];
      }
      const std::vector<int32_t> own =
          RandomTokens(&rng, Draw(&rng, o.prompt_tokens), o.vocab_size);
      turn.prompt.insert(turn.prompt.end(), own.begin(), own.end());
      turn.output_tokens = Draw(&rng, o.output_tokens);
      c.turns.push_back(std::move(turn));
      out.push_back(std::move(c));
    }
    return out;
  }
  if (o.kind == "multi-turn") {
    if (o.turns < 1) return absl::InvalidArgumentError("turns must be positive");
    std::exponential_distribution<double> think(1000.0 / std::max(1e-3, o.think_time_ms));
    const int64_t conversations = (o.num_requests + o.turns - 1) / o.turns;
    for (int64_t i = 0; i < conversations; ++i) {
      Conversation c;
      c.start = absl::Seconds(t);
      t += gap(rng);
      std::vector<int32_t> history = RandomTokens(&rng, Draw(&rng, o.prompt_tokens), o.vocab_size);
      for (int k = 0; k < o.turns; ++k) {
        Turn turn;
        if (k > 0) {
          const std::vector<int32_t> more =
              RandomTokens(&rng, Draw(&rng, o.turn_tokens), o.vocab_size);
          history.insert(history.end(), more.begin(), more.end());
          turn.think_time = absl::Milliseconds(think(rng));
        }
        turn.prompt = history;
        turn.output_tokens = Draw(&rng, o.output_tokens);
        c.turns.push_back(std::move(turn));
      }
      out.push_back(std::move(c));
    }
    return out;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("workload \"", o.kind, "\" is not random, shared-prefix or multi-turn"));
}

}  // namespace

absl::StatusOr<std::vector<Conversation>> MakeWorkload(const WorkloadOptions& o) {
  if (o.fine_tunes < 0 || !(o.fine_tune_zipf >= 0) || !(o.base_fraction >= 0) ||
      !(o.base_fraction <= 1)) {
    return absl::InvalidArgumentError(
        "fine_tunes must be >= 0, fine_tune_zipf >= 0 and base_fraction in [0, 1]");
  }
  absl::StatusOr<std::vector<Conversation>> out = MakeConversations(o);
  if (!out.ok() || o.fine_tunes == 0) return out;
  std::mt19937_64 rng(o.seed ^ 0x9e3779b97f4a7c15ULL);
  std::vector<double> weights;
  for (int k = 0; k < o.fine_tunes; ++k) weights.push_back(std::pow(k + 1.0, -o.fine_tune_zipf));
  std::discrete_distribution<int> tenant(weights.begin(), weights.end());
  std::bernoulli_distribution base(o.base_fraction);
  for (Conversation& c : *out) c.fine_tune = base(rng) ? -1 : tenant(rng);
  return out;
}

const std::vector<int32_t>& ChatHistory::Prompt(const Turn& turn) {
  if (!with_replies_ || turn.prompt.size() < user_tokens_) {
    // Without replies (or a turn that does not continue the one before): as made.
    sent_ = turn.prompt;
  } else {
    sent_.insert(sent_.end(), turn.prompt.begin() + static_cast<ptrdiff_t>(user_tokens_),
                 turn.prompt.end());
  }
  user_tokens_ = turn.prompt.size();
  return sent_;
}

void ChatHistory::Reply(const std::vector<int32_t>& tokens) {
  if (with_replies_) sent_.insert(sent_.end(), tokens.begin(), tokens.end());
}

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = p / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(values.size() - 1, lo + 1);
  return values[lo] + (values[hi] - values[lo]) * (rank - static_cast<double>(lo));
}

}  // namespace strata
