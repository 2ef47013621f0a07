// engine_bench: CPU prefill and decode throughput of the engine, beside the machine's measured
// memory bandwidth and the batch-1 decode roofline it implies.
//
//   bazel run -c opt //bench:engine_bench -- [--models=bundled,llama-100m] [--dtypes=f32,bf16]
//       [--batches=1,8,32] [--prompt_tokens=128] [--decode_steps=32] [--reps=3] [--threads=0]
//       [--json_out=FILE] [--tensor_parallel=1]
//
// For each model, weight dtype and batch size: B sequences of prompt_tokens random tokens are
// prefilled in one step (prefill tokens/s), then decoded for decode_steps steps (decode tokens/s).
// Each figure is the median over reps. The roofline for batch-1 decode is bandwidth / bytes of
// weights read per token.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/bench_models.h"
#include "bench/stats.h"
#include "common/init.h"
#include "common/log.h"
#include "worker/comm/collectives.h"
#include "worker/comm/shm_collectives.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"
#include "worker/model/model_runner.h"
#include "worker/model/weights.h"

ABSL_FLAG(std::string, models, "bundled,llama-100m",
          "Models: bundled (the committed tiny model) and/or llama-100m (random weights).");
ABSL_FLAG(std::string, bundled_dir, "models/strata-tiny/base", "Directory of the bundled model.");
ABSL_FLAG(std::string, dtypes, "f32,bf16", "Weight dtypes for random-weight models.");
ABSL_FLAG(std::string, batches, "1,8,32", "Batch sizes.");
ABSL_FLAG(int, prompt_tokens, 128, "Prompt tokens per sequence.");
ABSL_FLAG(int, decode_steps, 32, "Decode steps measured.");
ABSL_FLAG(int, reps, 3, "Repetitions; the median is reported.");
ABSL_FLAG(int, threads, 0, "Compute threads (0: all cores).");
ABSL_FLAG(std::string, json_out, "", "Also write the results as JSON lines here.");
ABSL_FLAG(int, tensor_parallel, 1,
          "Ranks the model is split across: rank 0 here, the others forked processes over a "
          "shared-memory group, as strata-worker --tensor_parallel runs them; --threads is shared "
          "out among them.");

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

// Read bandwidth of main memory with `threads` threads summing a 1 GiB buffer, bytes/s (median of
// 5).
double MeasureBandwidth(int threads) {
  const size_t n = (size_t{1} << 30) / sizeof(float);
  std::vector<float> buf(n, 1.0f);
  std::vector<double> rates;
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<double> sums(threads);
    const auto t0 = Clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        const size_t b = n * t / threads, e = n * (t + 1) / threads;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (size_t i = b; i + 8 <= e; i += 8) {
          for (int j = 0; j < 8; ++j) acc[j] += buf[i + j];
        }
        sums[t] = acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
      });
    }
    for (auto& th : pool) th.join();
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (std::accumulate(sums.begin(), sums.end(), 0.0) != static_cast<double>(n))
      LOG(FATAL) << "bad sum";
    rates.push_back(static_cast<double>(n * sizeof(float)) / s);
  }
  return Median(rates);
}

// Bytes of weights one decode step reads per sequence batch (every projection and the lm_head).
double WeightBytes(const ModelWeights& w) {
  auto bytes = [](const Matrix& m) {
    return static_cast<double>(m.rows * m.cols * DTypeBytes(m.dtype));
  };
  double total = bytes(w.lm_head);
  for (const LayerWeights& l : w.layers) {
    total += bytes(l.q) + bytes(l.k) + bytes(l.v) + bytes(l.o) + bytes(l.gate) + bytes(l.up) +
             bytes(l.down);
  }
  return total;
}

struct Result {
  std::string model, dtype;
  int batch;
  double prefill_tps, decode_tps;
};

// Ranks 1 .. N-1 of a group for one engine's lifetime: forked processes serving their shards.
class Followers {
 public:
  Followers(const std::vector<std::unique_ptr<ModelWeights>>& shards, int threads_per_rank) {
    const int world = static_cast<int>(shards.size());
    if (world == 1) return;
    auto group = ShmGroup::Create(world);
    CHECK_OK(group.status());
    group_ = std::make_unique<ShmGroup>(*std::move(group));
    for (int r = 1; r < world; ++r) {
      const pid_t pid = fork();
      CHECK(pid >= 0);
      if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);  // a CHECK failing in rank 0 takes the ranks along
        auto comm = ShmCollectives::Join(group_->control_fd(), group_->memory_fd(), r, world);
        if (!comm.ok()) _exit(2);
        ModelRunner runner(shards[r].get(), comm->get(), threads_per_rank);
        _exit(runner.ServeFollower().ok() ? 0 : 1);
      }
      pids_.push_back(pid);
    }
    auto comm = ShmCollectives::Join(group_->control_fd(), group_->memory_fd(), 0, world);
    CHECK_OK(comm.status());
    comm_ = *std::move(comm);
  }
  // After rank 0's engine is gone (which stops the others).
  ~Followers() {
    for (pid_t pid : pids_) {
      int status = 0;
      waitpid(pid, &status, 0);
      CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "a rank failed: " << status;
    }
  }
  Collectives* comm() {
    if (comm_ != nullptr) return comm_.get();
    return &single_;
  }

 private:
  std::unique_ptr<ShmGroup> group_;
  std::unique_ptr<ShmCollectives> comm_;
  SingleRankCollectives single_;
  std::vector<pid_t> pids_;
};

Result RunOne(const std::string& name, const std::vector<std::unique_ptr<ModelWeights>>& shards,
              const std::string& dtype, int batch, int threads_per_rank) {
  const ModelWeights& w = *shards[0];
  const int prompt = absl::GetFlag(FLAGS_prompt_tokens);
  const int steps = absl::GetFlag(FLAGS_decode_steps);
  EngineConfig ec;
  ec.max_batch_tokens = static_cast<int64_t>(batch) * prompt;
  ec.max_running_sequences = batch;
  ec.enable_prefix_caching = false;
  ec.num_kv_blocks = batch * ((prompt + steps + 32) / 16 + 1);
  ec.compute_threads = threads_per_rank;
  std::vector<double> prefill, decode;
  std::mt19937 rng(1);
  for (int rep = 0; rep < absl::GetFlag(FLAGS_reps); ++rep) {
    Followers followers(shards, threads_per_rank);
    auto engine = Engine::Create(&w, followers.comm(), ec);
    CHECK_OK(engine.status());
    for (int b = 0; b < batch; ++b) {
      std::vector<int32_t> ids(prompt);
      for (int32_t& t : ids)
        t = std::uniform_int_distribution<int32_t>(
            0, static_cast<int32_t>(w.config.vocab_size - 1))(rng);
      RequestOptions o;
      o.sampling.temperature = 0;
      o.ignore_eos = true;
      o.max_tokens = steps + 2;
      CHECK_OK((*engine)->AddRequest(absl::StrFormat("r%d", b), ids, o));
    }
    auto t0 = Clock::now();
    CHECK_OK((*engine)->Step().status());  // the whole prefill, and each sequence's first token
    prefill.push_back(batch * prompt / std::chrono::duration<double>(Clock::now() - t0).count());
    t0 = Clock::now();
    for (int s = 0; s < steps; ++s) CHECK_OK((*engine)->Step().status());
    decode.push_back(batch * steps / std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return {name, dtype, batch, Median(prefill), Median(decode)};
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  using namespace strata;
  InitProgram(argc, argv, "CPU engine throughput benchmark");
  const int threads = absl::GetFlag(FLAGS_threads) > 0
                          ? absl::GetFlag(FLAGS_threads)
                          : static_cast<int>(std::thread::hardware_concurrency());
  const int world = absl::GetFlag(FLAGS_tensor_parallel);
  CHECK(world >= 1 && world <= 64) << "--tensor_parallel must be 1 to 64";
  const int threads_per_rank = std::max(1, threads / world);
  const double bw = MeasureBandwidth(threads);
  std::printf("memory read bandwidth (%d threads): %.2f GB/s; %d rank(s), %d threads each\n\n",
              threads, bw / 1e9, world, threads_per_rank);
  std::vector<int> batches;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_batches), ','))
    batches.push_back(std::stoi(std::string(b)));
  FILE* json = absl::GetFlag(FLAGS_json_out).empty()
                   ? nullptr
                   : std::fopen(absl::GetFlag(FLAGS_json_out).c_str(), "w");
  std::printf("%-12s %-5s %6s %14s %14s %16s %10s\n", "model", "dtype", "batch", "prefill tok/s",
              "decode tok/s", "b1 roofline tok/s", "of roofline");
  for (absl::string_view model : absl::StrSplit(absl::GetFlag(FLAGS_models), ',')) {
    // Each variant: a dtype and every rank's shard.
    std::vector<std::pair<std::string, std::vector<std::unique_ptr<ModelWeights>>>> variants;
    if (model == "bundled") {
      auto config = LoadModelConfig(absl::GetFlag(FLAGS_bundled_dir));
      CHECK_OK(config.status());
      std::vector<std::unique_ptr<ModelWeights>> shards;
      for (int r = 0; r < world; ++r) {
        auto w = LoadModelWeights(absl::GetFlag(FLAGS_bundled_dir), *config, r, world);
        CHECK_OK(w.status());
        shards.push_back(*std::move(w));
      }
      variants.emplace_back(config->torch_dtype.empty() ? "file" : config->torch_dtype,
                            std::move(shards));
    } else if (model == "llama-100m") {
      CHECK_OK(CheckTensorParallelSplit(Llama100mConfig(), world));
      for (absl::string_view d : absl::StrSplit(absl::GetFlag(FLAGS_dtypes), ',')) {
        const DType dt = d == "bf16" ? DType::kBF16 : d == "f16" ? DType::kF16 : DType::kF32;
        std::vector<std::unique_ptr<ModelWeights>> shards;
        for (int r = 0; r < world; ++r)
          shards.push_back(RandomModelWeights(Llama100mConfig(), dt, 7, r, world));
        variants.emplace_back(std::string(d), std::move(shards));
      }
    } else {
      LOG(FATAL) << "unknown model " << model;
    }
    for (auto& [dtype, shards] : variants) {
      double weight_bytes = 0;
      for (const auto& shard : shards) weight_bytes += WeightBytes(*shard);
      const double roofline = bw / weight_bytes;
      const std::unique_ptr<ModelWeights>& w = shards[0];
      for (int b : batches) {
        const Result r = RunOne(std::string(model), shards, dtype, b, threads_per_rank);
        std::printf(
            "%-12s %-5s %6d %14.1f %14.1f %16.1f %10s\n", r.model.c_str(), r.dtype.c_str(), r.batch,
            r.prefill_tps, r.decode_tps, roofline,
            b == 1 ? absl::StrFormat("%.0f%%", 100.0 * r.decode_tps / roofline).c_str() : "-");
        std::fflush(stdout);
        if (json) {
          std::fprintf(
              json,
              "{\"model\":\"%s\",\"dtype\":\"%s\",\"batch\":%d,\"prefill_tokens_per_s\":%.2f,"
              "\"decode_tokens_per_s\":%.2f,\"batch1_roofline_tokens_per_s\":%.2f,"
              "\"bandwidth_bytes_per_s\":%.0f,\"params\":%lld,\"tensor_parallel\":%d}\n",
              r.model.c_str(), r.dtype.c_str(), r.batch, r.prefill_tps, r.decode_tps, roofline, bw,
              static_cast<long long>(w->config.NumParameters()), world);
        }
      }
    }
  }
  if (json) std::fclose(json);
  return 0;
}
