// fair_share_bench: what fair sharing between tenants costs the engine's step (Engine::Step takes
// the least served tenant's next waiting sequence, from a heap of the tenants' queues' heads),
// against admission by arrival, with a long waiting queue spread over many tenants; and what
// queueing a request costs with that many waiting.
//
//   bazel run -c opt //bench:fair_share_bench -- [--waiting=4000] [--tenants=1,100,1000]
//       [--steps=300] [--reps=3] [--threads=1]
//
// The bundled strata-tiny model (its step is short, so the scheduler's share of it shows): N
// requests queued at once (16-token prompts, 1 to 15 tokens each so that they finish at different
// steps, greedy), tenant i % T, at most 8 running; the first --steps steps timed (nearly every one
// of them admits: a sequence finishes most steps). Reports the mean step time with fair sharing
// off and on (median of reps), the difference per step, and the share of steps that admitted.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/init.h"
#include "common/log.h"
#include "worker/comm/collectives.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"
#include "worker/model/weights.h"

ABSL_FLAG(std::string, model_dir, "models/strata-tiny/base", "The bundled model.");
ABSL_FLAG(int, waiting, 4000, "Requests queued at once.");
ABSL_FLAG(std::string, tenants, "1,100,1000", "Tenant counts to run.");
ABSL_FLAG(int, steps, 300, "Steps timed.");
ABSL_FLAG(int, reps, 3, "Repetitions; the median is reported.");
ABSL_FLAG(int, threads, 1, "Compute threads.");

namespace strata {
namespace {

double MeanStepMs(const ModelWeights& weights, Collectives* comm, int tenants, bool fair,
                  double* admitted_share, double* add_us) {
  EngineConfig c;
  c.max_running_sequences = 8;
  c.compute_threads = absl::GetFlag(FLAGS_threads);
  c.fair_share = fair;
  c.enable_prefix_caching = false;  // every prompt computed: the same work either way
  auto engine = Engine::Create(&weights, comm, c);
  CHECK_OK(engine.status());
  std::mt19937 rng(7);
  const auto add_start = std::chrono::steady_clock::now();
  for (int i = 0; i < absl::GetFlag(FLAGS_waiting); ++i) {
    std::vector<int32_t> prompt(16);
    for (int32_t& t : prompt) t = std::uniform_int_distribution<int32_t>(3, 1999)(rng);
    RequestOptions o;
    o.sampling.temperature = 0;
    o.max_tokens = std::uniform_int_distribution<int>(1, 15)(rng);
    o.ignore_eos = true;
    o.tenant = absl::StrCat("t", i % tenants);
    CHECK_OK((*engine)->AddRequest(absl::StrCat("r", i), std::move(prompt), o));
  }
  *add_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - add_start)
                .count() /
            absl::GetFlag(FLAGS_waiting);
  const int steps = absl::GetFlag(FLAGS_steps);
  int admitting = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) {
    absl::StatusOr<std::vector<RequestOutput>> out = (*engine)->Step();
    CHECK_OK(out.status());
    // A prompt is one chunk here: a sequence's first token comes in the step that admitted it.
    admitting += std::any_of(out->begin(), out->end(), [](const RequestOutput& o) {
      return o.num_generated_tokens == 1 && !o.tokens.empty();
    });
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  *admitted_share = static_cast<double>(admitting) / steps;
  return ms / steps;
}

// What a load report's Engine::Stats costs with the queue full (the worker asks for one at most
// every 5 ms while its counts change): --waiting requests of 512 tokens, prefix caching on, the
// first 256 tokens of each a system prompt that one finished request left cached.
double StatsUs(const ModelWeights& weights, Collectives* comm) {
  EngineConfig c;
  c.max_running_sequences = 8;
  c.compute_threads = absl::GetFlag(FLAGS_threads);
  auto engine = Engine::Create(&weights, comm, c);
  CHECK_OK(engine.status());
  std::mt19937 rng(9);
  std::vector<int32_t> system(256);
  for (int32_t& t : system) t = std::uniform_int_distribution<int32_t>(3, 1999)(rng);
  RequestOptions o;
  o.sampling.temperature = 0;
  o.max_tokens = 1;
  o.ignore_eos = true;
  CHECK_OK((*engine)->AddRequest("warm", system, o));
  while ((*engine)->HasWork()) CHECK_OK((*engine)->Step().status());
  for (int i = 0; i < absl::GetFlag(FLAGS_waiting); ++i) {
    std::vector<int32_t> prompt = system;
    for (int j = 0; j < 256; ++j)
      prompt.push_back(std::uniform_int_distribution<int32_t>(3, 1999)(rng));
    CHECK_OK((*engine)->AddRequest(absl::StrCat("r", i), std::move(prompt), o));
  }
  const int reps = 20;
  int64_t pending = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) {
    pending += (*engine)->Stats(/*with_tenants=*/false).num_pending_prefill_tokens;
  }
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() /
      reps;
  // (The cached system prompt is left out of each request's pending prefill.)
  CHECK_EQ(pending / reps, int64_t{absl::GetFlag(FLAGS_waiting)} * 256);
  return us;
}

void Run() {
  const std::string dir = absl::GetFlag(FLAGS_model_dir);
  auto config = LoadModelConfig(dir);
  CHECK_OK(config.status());
  auto weights = LoadModelWeights(dir, *config, 0, 1);
  CHECK_OK(weights.status());
  SingleRankCollectives comm;
  std::printf(
      "%d requests waiting, at most 8 running, %d steps timed; mean step ms (median of %d); "
      "admitting: the share of steps that admitted, in the last fair-share run; add: the mean "
      "cost of queueing one request (its prompt's hashes included), in the last run\n",
      absl::GetFlag(FLAGS_waiting), absl::GetFlag(FLAGS_steps), absl::GetFlag(FLAGS_reps));
  std::printf("%8s %12s %12s %12s %10s %10s\n", "tenants", "by arrival", "fair share", "difference",
              "admitting", "add (us)");
  for (absl::string_view t : absl::StrSplit(absl::GetFlag(FLAGS_tenants), ',')) {
    int tenants = 0;
    CHECK(absl::SimpleAtoi(t, &tenants) && tenants > 0) << "--tenants: " << t;
    double med[2], admitting = 0, add_us = 0;
    for (int fair = 0; fair < 2; ++fair) {
      std::vector<double> v;
      for (int r = 0; r < absl::GetFlag(FLAGS_reps); ++r) {
        v.push_back(MeanStepMs(**weights, &comm, tenants, fair == 1, &admitting, &add_us));
      }
      std::sort(v.begin(), v.end());
      med[fair] = v[v.size() / 2];
    }
    std::printf("%8d %12.3f %12.3f %+12.3f %9.0f%% %10.2f\n", tenants, med[0], med[1],
                med[1] - med[0], 100 * admitting, add_us);
  }
  std::printf(
      "Engine::Stats (a load report) with %d 512-token prompts waiting, 256 of each cached: "
      "%.1f us\n",
      absl::GetFlag(FLAGS_waiting), StatsUs(**weights, &comm));
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv,
                      "fair_share_bench: the step cost of fair sharing between tenants");
  strata::Run();
  return 0;
}
