// Workloads and latency statistics for bench/loadgen.
//
// A workload is a list of conversations, each a sequence of turns (one request per turn), with the
// time each conversation starts (open-loop Poisson arrivals) and the think time before each later
// turn. A single-turn workload is conversations of one turn. Prompts are token ids drawn from a
// seeded generator, so a workload is reproducible and two systems can be given the same one.
#ifndef STRATA_BENCH_WORKLOAD_H_
#define STRATA_BENCH_WORKLOAD_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace strata {

// An inclusive range of lengths, drawn uniformly ("128" or "64:512").
struct LengthRange {
  int64_t min = 0;
  int64_t max = 0;
};
absl::StatusOr<LengthRange> ParseLengthRange(const std::string& spec);

struct WorkloadOptions {
  // "random": unrelated prompts. "shared-prefix": a fraction of requests start with one of a few
  // shared prefixes (a system prompt). "multi-turn": conversations whose every turn resends the
  // whole history plus new tokens (with replies_in_history, the model's replies too).
  std::string kind = "random";
  int64_t num_requests = 100;  // for multi-turn: conversations * turns
  double rate_per_s = 4;       // arrivals of requests (multi-turn: of conversations)
  LengthRange prompt_tokens = {128, 128};
  LengthRange output_tokens = {32, 32};
  // shared-prefix
  int64_t shared_prefix_tokens = 1000;
  double shared_fraction = 0.9;
  int num_shared_prefixes = 1;
  // multi-turn
  int turns = 4;
  LengthRange turn_tokens = {40, 40};
  double think_time_ms = 200;  // mean of an exponential
  // As a chat client sends a conversation: each turn's prompt is the history with the model's
  // earlier replies in it (ChatHistory). Off, the history holds the user's turns only.
  bool replies_in_history = true;
  int32_t vocab_size = 2048;
  uint64_t seed = 1;
  // Tenants: each conversation runs on one of `fine_tunes` fine-tunes, the k-th (from 0) drawn
  // with weight 1 / (k + 1)^fine_tune_zipf (0: uniformly), or on the base with probability
  // base_fraction. Drawn from their own stream, so the prompts do not change with these.
  int fine_tunes = 0;
  double fine_tune_zipf = 1.0;
  double base_fraction = 0;
};

struct Turn {
  // The whole prompt, history included: each turn's starts with the one before's. The model's
  // replies are not in it: a sender puts them in (ChatHistory).
  std::vector<int32_t> prompt;
  int64_t output_tokens = 0;
  absl::Duration think_time;  // wait after the previous turn's end (0 for the first)
};

struct Conversation {
  absl::Duration start;  // since the run's start
  std::vector<Turn> turns;
  // The fine-tune every turn runs on: an index into the workload's fine-tunes, or -1 for the base.
  int fine_tune = -1;
};

absl::StatusOr<std::vector<Conversation>> MakeWorkload(const WorkloadOptions& options);

// What a chat client sends for each turn of one conversation, in order: Prompt(turn) for the next
// turn, then Reply(tokens) with what the model answered. With replies, a turn's prompt is the
// previous prompt, its reply, then the turn's new tokens; without, the turn's prompt as made.
class ChatHistory {
 public:
  explicit ChatHistory(bool with_replies) : with_replies_(with_replies) {}
  const std::vector<int32_t>& Prompt(const Turn& turn);
  void Reply(const std::vector<int32_t>& tokens);

 private:
  bool with_replies_;
  size_t user_tokens_ = 0;  // of the turns' prompts sent so far
  std::vector<int32_t> sent_;
};

// `n` token ids drawn uniformly from [0, vocab).
std::vector<int32_t> RandomTokens(std::mt19937_64* rng, int64_t n, int32_t vocab);

// p in [0, 100]; linear interpolation between order statistics. 0 for an empty input.
double Percentile(std::vector<double> values, double p);

}  // namespace strata

#endif  // STRATA_BENCH_WORKLOAD_H_
