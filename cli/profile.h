// `stratactl profile`: measures a real engine (the one strata-worker runs; --device cpu or gpu) on
// a model and fits the simulator's step cost (cli/simulate.h, StepCost) to it, so that `stratactl
// simulate --profile FILE` predicts what a cluster of such workers would do. With
// --random-weights, --model may be a config.json alone: a large model's shape without its files.
//
// It times single engine steps: decode at several batch sizes over a fixed context, and whole
// prompts prefilled in one step at three lengths (distinct random tokens, so no prefix-cache
// hits), the median of --reps each. A fit weighted by relative error gives
//   step = fixed_s + max(weights_s, token_s * tokens + attention_pair_s * (query, key) pairs
//                                   + sequence_s * sequences sampled)
// (a floor for small steps, which read every weight, and compute above it; kv_token_s stays 0);
// a host-tier block's restore is a block's bytes at the machine's measured memcpy rate. Each
// measurement is printed beside the fit's prediction.
//
// With --coordinator ADDR (a cluster of workers started with the same flags, idle), it also
// times requests at batch 1 through the real serving path: the worker's step loop and the token
// stream through the coordinator cost each step more than the engine alone (added to fixed_s),
// and a request pays a round trip outside any step (request_overhead_s).
#ifndef STRATA_CLI_PROFILE_H_
#define STRATA_CLI_PROFILE_H_

#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cli/args.h"
#include "cli/simulate.h"

namespace strata {

// One timed step shape.
struct ProfilePoint {
  std::string what;
  double tokens = 0, kv_tokens = 0, pairs = 0, sampled = 0;  // StepCost::Step's arguments
  double seconds = 0;                                        // median measured
};

// The step cost above, fitted to the points by least squares of relative error with
// non-negative coefficients. INVALID_ARGUMENT for fewer than four points or a time <= 0.
absl::StatusOr<StepCost> FitStepCost(const std::vector<ProfilePoint>& points);

absl::StatusOr<Args> ParseProfileArgs(const std::vector<std::string>& argv);
absl::Status ProfileCommand(const Args& args, std::FILE* out);

}  // namespace strata

#endif  // STRATA_CLI_PROFILE_H_
