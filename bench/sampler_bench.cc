// sampler_bench: the host sampler's cost per row over a Llama-3-sized vocabulary (128256 logits),
// the work the CPU engine does for every sampled token and both engines do for every row that
// reports log-probabilities (prompt log-probabilities: one row per prompt token).
//
//   bazel run -c opt //bench:sampler_bench -- [--vocab=128256] [--rows=50] [--reps=5]
//
// Prints milliseconds per row (best of --reps rounds of --rows rows) for: LogprobsOf with the top
// 5 (a prompt token's log-probability, rank and alternatives), greedy Sample with logprobs 5, and
// Sample at temperature 1 with nothing truncated (the OpenAI API's defaults), and at temperature
// 0.8 with top-k 50 and with top-p 0.95 (every candidate in order).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "common/init.h"
#include "worker/engine/sampler.h"

ABSL_FLAG(int, vocab, 128256, "Logits per row.");
ABSL_FLAG(int, rows, 50, "Rows per round.");
ABSL_FLAG(int, reps, 5, "Rounds; the best is reported.");

namespace strata {
namespace {

// Best milliseconds per row of `fn(row)` over the rounds.
double BestMsPerRow(const std::function<float(int)>& fn) {
  const int rows = absl::GetFlag(FLAGS_rows);
  double best = 1e30;
  float sink = 0;
  for (int rep = 0; rep < absl::GetFlag(FLAGS_reps); ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < rows; ++r) sink += fn(r);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, ms / rows);
  }
  if (sink == 1.2345f) std::printf(" ");  // keep the work
  return best;
}

int Main() {
  const int vocab = absl::GetFlag(FLAGS_vocab);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(vocab), work(vocab);
  for (float& v : logits) v = normal(rng);
  std::vector<std::pair<float, int32_t>> scratch;
  const PenaltyState no_penalties;
  auto sample = [&](const SamplingOptions& o, int r) {
    work = logits;  // Sample processes the logits in place
    return Sample(absl::MakeSpan(work), o, no_penalties, r, {}, &scratch).logprob;
  };
  SamplingOptions greedy;
  greedy.temperature = 0;
  greedy.logprobs = 5;
  SamplingOptions tempered;
  tempered.temperature = 0.8f;
  tempered.top_k = 50;
  tempered.seed = 7;
  SamplingOptions plain;  // temperature 1, nothing truncated: the OpenAI API's defaults
  plain.seed = 7;
  SamplingOptions nucleus;  // temperature and top-p: every candidate in order
  nucleus.temperature = 0.8f;
  nucleus.top_p = 0.95f;
  nucleus.seed = 7;
  const double copy_ms = BestMsPerRow([&](int) {
    work = logits;
    return work[0];
  });
  std::printf("vocab %d, ms per row (the logits copy each Sample needs here: %.3f ms, included)\n",
              vocab, copy_ms);
  std::printf("LogprobsOf, top 5:                %.3f\n", BestMsPerRow([&](int r) {
                return LogprobsOf(logits, (r * 7919) % vocab, 5).logprob;
              }));
  std::printf("Sample greedy, logprobs 5:        %.3f\n",
              BestMsPerRow([&](int r) { return sample(greedy, r); }));
  std::printf("Sample temperature 0.8, top-k 50: %.3f\n",
              BestMsPerRow([&](int r) { return sample(tempered, r); }));
  std::printf("Sample temperature 1, untruncated: %.3f\n",
              BestMsPerRow([&](int r) { return sample(plain, r); }));
  std::printf("Sample temperature 0.8, top-p 0.95: %.3f\n",
              BestMsPerRow([&](int r) { return sample(nucleus, r); }));
  return 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv, "The host sampler's cost per row.");
  return strata::Main();
}
