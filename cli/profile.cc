#include "cli/profile.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "bench/stats.h"
#include "bench/workload.h"
#include "cli/cluster.h"
#include "common/grpc_status.h"
#include "common/json.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"
#include "grpcpp/grpcpp.h"
#include "proto/strata/v1/serving.grpc.pb.h"
#include "worker/comm/collectives.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"
#include "worker/model/model_runner.h"
#include "worker/model/weights.h"

namespace strata {
namespace {

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Solves the n x n system (n <= 3) in place by Gaussian elimination with partial pivoting; false
// when singular.
bool Solve(std::vector<std::vector<double>> a, std::vector<double> b, std::vector<double>* x) {
  const size_t n = b.size();
  double scale = 0;
  for (size_t i = 0; i < n; ++i) scale = std::max(scale, std::abs(a[i][i]));
  for (size_t c = 0; c < n; ++c) {
    size_t p = c;
    for (size_t r = c + 1; r < n; ++r) {
      if (std::abs(a[r][c]) > std::abs(a[p][c])) p = r;
    }
    if (std::abs(a[p][c]) <= 1e-12 * scale) return false;  // (nearly) collinear columns
    std::swap(a[c], a[p]);
    std::swap(b[c], b[p]);
    for (size_t r = c + 1; r < n; ++r) {
      const double f = a[r][c] / a[c][c];
      for (size_t k = c; k < n; ++k) a[r][k] -= f * a[c][k];
      b[r] -= f * b[c];
    }
  }
  x->assign(n, 0);
  for (size_t c = n; c-- > 0;) {
    double s = b[c];
    for (size_t k = c + 1; k < n; ++k) s -= a[c][k] * (*x)[k];
    (*x)[c] = s / a[c][c];
  }
  return true;
}

std::string MachineName() {
  std::ifstream f("/proc/cpuinfo");
  std::string line, model;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      model = std::string(absl::StripAsciiWhitespace(line.substr(line.find(':') + 1)));
      break;
    }
  }
  return absl::StrCat(std::thread::hardware_concurrency(), " cores", model.empty() ? "" : ", ",
                      model);
}

}  // namespace

namespace {

double Predict(const StepCost& c, const ProfilePoint& p) {
  return c.Step(p.tokens, p.kv_tokens, p.pairs, p.sampled);
}

// Non-negative least squares of fixed_s, token_s, attention_pair_s and sequence_s alone.
absl::StatusOr<StepCost> FitLinear(const std::vector<ProfilePoint>& points) {
  constexpr int kCols = 4;
  if (points.size() < kCols) return absl::InvalidArgumentError("too few points");
  // Columns: fixed, tokens, pairs, sampled. Drop any coefficient that comes out negative and
  // refit.
  std::vector<bool> active(kCols, true);
  for (int round = 0; round < kCols; ++round) {
    std::vector<int> cols;
    for (int c = 0; c < kCols; ++c) {
      if (active[c]) cols.push_back(c);
    }
    const size_t n = cols.size();
    std::vector<std::vector<double>> ata(n, std::vector<double>(n, 0));
    std::vector<double> atb(n, 0);
    for (const ProfilePoint& p : points) {
      if (!(p.seconds > 0)) {
        return absl::InvalidArgumentError(absl::StrCat("measurement \"", p.what, "\" is not > 0"));
      }
      const double w = 1 / p.seconds;  // relative error
      const double row[kCols] = {w, w * p.tokens, w * p.pairs, w * p.sampled};
      for (size_t i = 0; i < n; ++i) {
        for (size_t j = 0; j < n; ++j) ata[i][j] += row[cols[i]] * row[cols[j]];
        atb[i] += row[cols[i]] * w * p.seconds;
      }
    }
    if (n == 0) break;
    std::vector<double> x;
    if (!Solve(ata, atb, &x)) {
      return absl::InvalidArgumentError("the measurements do not determine a step cost");
    }
    // Drop the most negative coefficient, if any, and refit.
    size_t worst = n;
    for (size_t i = 0; i < n; ++i) {
      if (x[i] < 0 && (worst == n || x[i] < x[worst])) worst = i;
    }
    if (worst < n) {
      active[cols[worst]] = false;
      continue;
    }
    StepCost c;
    for (size_t i = 0; i < n; ++i) {
      double* coefficient[kCols] = {&c.fixed_s, &c.token_s, &c.attention_pair_s, &c.sequence_s};
      *coefficient[cols[i]] = x[i];
    }
    return c;
  }
  return absl::InvalidArgumentError("no non-negative step cost fits the measurements");
}

double WeightedError(const StepCost& c, const std::vector<ProfilePoint>& points) {
  double e = 0;
  for (const ProfilePoint& p : points) {
    const double r = Predict(c, p) / p.seconds - 1;
    e += r * r;
  }
  return e;
}

// Through a running coordinator: `n` requests one after another (batch 1 on an idle cluster),
// each `context` random prompt tokens and `tokens` generated; the medians of the time to the
// first token and between later tokens, as a client sees them.
struct ServingTimes {
  double ttft_s = 0;
  double tpot_s = 0;
};
absl::StatusOr<ServingTimes> MeasureServing(const Args& args, const std::string& target,
                                            int32_t vocab, int64_t context, int64_t tokens, int n,
                                            std::mt19937_64* rng) {
  ASSIGN_OR_RETURN(const std::shared_ptr<grpc::Channel> channel, CoordinatorChannel(args, target));
  auto serving = v1::Serving::NewStub(channel);
  v1::ListModelsResponse models;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    AddApiKey(&ctx);
    if (grpc::Status s = serving->ListModels(&ctx, v1::ListModelsRequest(), &models); !s.ok()) {
      return absl::UnavailableError(
          absl::StrCat("--coordinator ", target, ": ", s.error_message()));
    }
  }
  if (models.models_size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--coordinator ", target, " serves ", models.models_size(), " models; profile needs one"));
  }
  std::vector<double> ttft, tpot;
  for (int i = 0; i < n; ++i) {
    v1::GenerateRequest req;
    req.set_model(models.models(0).name());
    const std::vector<int32_t> prompt = RandomTokens(rng, context, vocab);
    req.mutable_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
    req.mutable_sampling()->set_max_tokens(static_cast<uint32_t>(tokens));
    req.mutable_sampling()->set_ignore_eos(true);
    req.set_cache_salt(absl::StrCat("stratactl-profile-", (*rng)()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    AddApiKey(&ctx);
    const auto start = std::chrono::steady_clock::now();
    auto reader = serving->Generate(&ctx, req);
    v1::GenerateResponse chunk;
    std::vector<double> arrivals;  // one per token
    while (reader->Read(&chunk)) {
      const double t = Seconds(start, std::chrono::steady_clock::now());
      for (int k = 0; k < chunk.token_ids_size(); ++k) arrivals.push_back(t);
    }
    if (grpc::Status s = reader->Finish(); !s.ok()) {
      return absl::UnavailableError(
          absl::StrCat("--coordinator ", target, ": Generate: ", s.error_message()));
    }
    if (arrivals.size() < 2) continue;
    ttft.push_back(arrivals[0]);
    tpot.push_back((arrivals.back() - arrivals[0]) / static_cast<double>(arrivals.size() - 1));
  }
  if (ttft.empty()) return absl::UnavailableError("--coordinator: no request generated tokens");
  return ServingTimes{Median(ttft), Median(tpot)};
}

}  // namespace

absl::StatusOr<StepCost> FitStepCost(const std::vector<ProfilePoint>& points) {
  if (points.size() < 4) {
    return absl::InvalidArgumentError("fitting a step cost takes at least four measurements");
  }
  for (const ProfilePoint& p : points) {
    if (!(p.seconds > 0) || !std::isfinite(p.seconds)) {
      return absl::InvalidArgumentError(absl::StrCat("measurement \"", p.what, "\" is not > 0"));
    }
  }
  // step = max(W, f + a * tokens + b * pairs) = f + max(W - f, a * tokens + b * pairs): small
  // steps cost a floor W (reading the weights) and larger ones their compute. Try each floor
  // below the measurements (W = 0 is the purely linear fit), fit the compute part to the points
  // above it, and keep the floor with the least relative error over all points.
  ASSIGN_OR_RETURN(StepCost best, FitLinear(points));
  double best_error = WeightedError(best, points);
  // Candidate floors: each measured time (a set of small steps all at the floor) and a grid.
  double top = 0;
  std::vector<double> floors;
  for (const ProfilePoint& p : points) {
    top = std::max(top, p.seconds);
    floors.push_back(p.seconds);
  }
  for (int i = 1; i < 400; ++i) floors.push_back(top * i / 400);
  for (const double floor : floors) {
    std::vector<ProfilePoint> above;
    for (const ProfilePoint& p : points) {
      if (p.seconds > floor) above.push_back(p);
    }
    if (above.size() < 4) continue;
    absl::StatusOr<StepCost> c = FitLinear(above);
    if (!c.ok()) continue;
    c->weights_s = std::max(0.0, floor - c->fixed_s);
    // A floor must earn its place: ties go to the plainer fit.
    const double e = WeightedError(*c, points);
    if (e < 0.99 * best_error - 1e-12) {
      best_error = e;
      best = *c;
    }
  }
  return best;
}

absl::StatusOr<Args> ParseProfileArgs(const std::vector<std::string>& argv) {
  return Args::Parse(argv, {"json", "random-weights"},
                     {"model", "threads", "kv-cache-mb", "block-tokens", "max-batch-tokens",
                      "max-running-sequences", "context", "reps", "out", "coordinator", "delta",
                      "device", "gpu-dtype", "tls-ca", "tls-cert", "tls-key", "tls-server-name"});
}

absl::Status ProfileCommand(const Args& args, std::FILE* out) {
  ASSIGN_OR_RETURN(const std::string dir, args.GetRequired("model"));
  ASSIGN_OR_RETURN(const int64_t threads, args.GetInt("threads", 0));
  ASSIGN_OR_RETURN(const int64_t kv_mb, args.GetInt("kv-cache-mb", 256));
  ASSIGN_OR_RETURN(const int64_t block_tokens, args.GetInt("block-tokens", 16));
  ASSIGN_OR_RETURN(const int64_t max_batch_tokens, args.GetInt("max-batch-tokens", 512));
  ASSIGN_OR_RETURN(const int64_t max_running, args.GetInt("max-running-sequences", 64));
  ASSIGN_OR_RETURN(const int64_t context, args.GetInt("context", 128));
  ASSIGN_OR_RETURN(const int64_t reps, args.GetInt("reps", 7));
  if (threads < 0 || threads > 1024)
    return absl::InvalidArgumentError("--threads must be 0 to 1024");
  if (kv_mb < 1 || kv_mb > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError("--kv-cache-mb must be at least 1");
  }
  if (block_tokens < 1 || block_tokens > 1024) {
    return absl::InvalidArgumentError("--block-tokens must be 1 to 1024");
  }
  if (max_batch_tokens < 16 || max_running < 1 || max_running > 100000) {
    return absl::InvalidArgumentError(
        "--max-batch-tokens must be at least 16 and --max-running-sequences 1 to 100000");
  }
  if (context < 1 || reps < 1 || reps > 1000) {
    return absl::InvalidArgumentError("--context must be at least 1 and --reps 1 to 1000");
  }

  const std::string device = args.Get("device").value_or("cpu");
  DType gpu_dtype = DType::kBF16;
  if (device != "cpu" && device != "gpu") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device must be cpu or gpu, not \"", device, "\""));
  }
  if (const std::string g = args.Get("gpu-dtype").value_or("bf16");
      !ParseDType(absl::AsciiStrToUpper(g), &gpu_dtype) ||
      (gpu_dtype != DType::kBF16 && gpu_dtype != DType::kF16 && gpu_dtype != DType::kF32)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--gpu-dtype must be bf16, f16 or f32, not \"", g, "\""));
  }
  // A model directory, or with --random-weights a config.json (a directory or the file) alone:
  // a large model's shape without its files (RandomModelWeights).
  ModelConfig config;
  std::unique_ptr<ModelWeights> weights;
  if (args.Has("random-weights")) {
    if (args.Has("delta")) {
      return absl::InvalidArgumentError("--delta needs the base's files, not --random-weights");
    }
    struct stat st;
    if (stat(dir.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      ASSIGN_OR_RETURN(const std::string text, ReadFileToString(dir));
      ASSIGN_OR_RETURN(const JsonDocument doc, JsonDocument::Parse(text, dir));
      ASSIGN_OR_RETURN(config, ParseModelConfig(doc.root()));
    } else {
      ASSIGN_OR_RETURN(config, LoadModelConfig(dir));
    }
    if (device == "gpu") {
      // Drawn on the GPU (EngineConfig::gpu_random_weights_seed): the host holds the shape only.
      weights = std::make_unique<ModelWeights>();
      weights->config = config;
      weights->num_heads = config.num_heads;
      weights->num_kv_heads = config.num_kv_heads;
      weights->intermediate_size = config.intermediate_size;
    } else {
      weights = RandomModelWeights(config, DType::kF32, 1);  // the CPU engine computes in f32
    }
  } else {
    ASSIGN_OR_RETURN(config, LoadModelConfig(dir));
    ASSIGN_OR_RETURN(weights, LoadModelWeights(dir, config, 0, 1));
  }
  if (context + 8 + reps > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("--context ", context,
                                                   " plus the steps timed is past the model's ",
                                                   config.max_position_embeddings, " positions"));
  }
  SingleRankCollectives comm;
  EngineConfig ec;
  ec.model_name = config.architecture_name;
  ec.kv_cache_bytes = kv_mb << 20;
  ec.block_tokens = block_tokens;
  ec.max_batch_tokens = max_batch_tokens;
  ec.max_running_sequences = max_running;
  ec.compute_threads = static_cast<int>(threads);
  ec.device = device;
  ec.gpu.act = gpu_dtype;
  if (device == "gpu" && args.Has("random-weights")) ec.gpu_random_weights_seed = 1;
  if (std::optional<std::string> delta = args.Get("delta")) ec.fine_tunes = {{"profile", *delta}};
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Create(weights.get(), &comm, ec));
  std::mt19937_64 rng(1);
  int64_t next_id = 0;
  auto step = [&]() -> absl::StatusOr<double> {
    const auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(const std::vector<RequestOutput> outs, engine->Step());
    const auto t1 = std::chrono::steady_clock::now();
    for (const RequestOutput& o : outs) {
      if (o.finish == FinishReason::kError) return o.error;
    }
    return Seconds(t0, t1);
  };
  auto drain = [&]() -> absl::Status {
    while (engine->HasWork()) RETURN_IF_ERROR(step().status());
    return absl::OkStatus();
  };

  std::vector<ProfilePoint> points;
  // Decode: `b` sequences over `ctx_len` tokens each (on `fine_tune`, when not empty), every step
  // one token each: the median step.
  auto decode_median = [&](int64_t b, int64_t ctx_len,
                           const std::string& fine_tune) -> absl::StatusOr<double> {
    std::vector<std::string> ids;
    for (int64_t i = 0; i < b; ++i) {
      RequestOptions o;
      // As long as the positions allow: none may finish before the timed steps end (they are
      // cancelled after).
      o.max_tokens = config.max_position_embeddings - ctx_len;
      o.ignore_eos = true;
      o.fine_tune_id = fine_tune;
      ids.push_back(absl::StrCat("profile-", next_id++));
      RETURN_IF_ERROR(
          engine->AddRequest(ids.back(), RandomTokens(&rng, ctx_len, config.vocab_size), o));
    }
    // Until every sequence decodes (prefill, and a delta's load), then two steps to settle.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
    while (engine->Stats().num_decode < b) {
      if (std::chrono::steady_clock::now() > deadline || !engine->HasWork()) {
        return absl::InternalError(absl::StrCat("profile: ", b, " sequences of ", ctx_len,
                                                " tokens never all reached decode"));
      }
      if (engine->WaitingForIo()) absl::SleepFor(absl::Milliseconds(1));
      RETURN_IF_ERROR(step().status());
    }
    for (int i = 0; i < 2; ++i) RETURN_IF_ERROR(step().status());
    std::vector<double> times;
    for (int64_t i = 0; i < reps; ++i) {
      ASSIGN_OR_RETURN(const double t, step());
      times.push_back(t);
    }
    if (engine->Stats().num_decode != b) {
      return absl::InternalError(
          absl::StrCat("profile: the batch of ", b, " shrank while timed (preempted or finished)"));
    }
    for (const std::string& id : ids) engine->Cancel(id);
    RETURN_IF_ERROR(drain());
    return Median(times);
  };
  // A long context (eight times --context) at batches 1 and 2 weighs attention.
  struct DecodeShape {
    int64_t batch, context;
  };
  for (const DecodeShape& shape :
       {DecodeShape{1, context}, DecodeShape{4, context}, DecodeShape{16, context},
        DecodeShape{64, context}, DecodeShape{1, 8 * context}, DecodeShape{2, 8 * context}}) {
    const int64_t b = shape.batch, ctx_len = shape.context;
    if (b > max_running || b * (ctx_len + 8 + reps) > engine->num_kv_blocks() * block_tokens ||
        ctx_len + 8 + reps > config.max_position_embeddings) {
      continue;
    }
    ASSIGN_OR_RETURN(const double t, decode_median(b, ctx_len, ""));
    const double ctx = static_cast<double>(ctx_len + 3) + (reps - 1) / 2.0;  // mean position
    points.push_back({absl::StrCat("decode, batch ", b, ", context ", ctx_len),
                      static_cast<double>(b), b * (ctx + 1), b * (ctx + 1), static_cast<double>(b),
                      t});
  }
  // Prefill of a short suffix after a long cached prefix (a conversation's next turn, a shared
  // system prompt): attention over the prefix dominates.
  {
    const int64_t prefix = std::min<int64_t>(8 * context, config.max_position_embeddings - 128);
    const int64_t suffix = 64;
    if (prefix >= block_tokens && prefix + suffix < engine->num_kv_blocks() * block_tokens / 2) {
      std::vector<double> times;
      for (int64_t i = 0; i < reps; ++i) {
        std::vector<int32_t> prompt = RandomTokens(&rng, prefix, config.vocab_size);
        RequestOptions o;
        o.max_tokens = 1;
        o.ignore_eos = true;
        RETURN_IF_ERROR(engine->AddRequest(absl::StrCat("profile-", next_id++), prompt, o));
        RETURN_IF_ERROR(drain());
        const std::vector<int32_t> more = RandomTokens(&rng, suffix, config.vocab_size);
        prompt.insert(prompt.end(), more.begin(), more.end());
        RETURN_IF_ERROR(engine->AddRequest(absl::StrCat("profile-", next_id++), prompt, o));
        ASSIGN_OR_RETURN(const double t, step());
        times.push_back(t);
        RETURN_IF_ERROR(drain());
      }
      const int64_t cached = prefix / block_tokens * block_tokens;
      const double n = static_cast<double>(prefix + suffix - cached);
      points.push_back({absl::StrCat("prefill, ", suffix, " tokens after ", prefix, " cached"), n,
                        static_cast<double>(prefix + suffix),
                        n * (static_cast<double>(cached) + (n + 1) / 2), 1, Median(times)});
    }
  }
  // Prefill: one prompt of `len` tokens in one step.
  for (int64_t len : {max_batch_tokens / 4, max_batch_tokens / 2, max_batch_tokens}) {
    if (len + 1 > config.max_position_embeddings) continue;
    std::vector<double> times;
    for (int64_t i = 0; i < reps; ++i) {
      RequestOptions o;
      o.max_tokens = 1;
      o.ignore_eos = true;
      RETURN_IF_ERROR(engine->AddRequest(absl::StrCat("profile-", next_id++),
                                         RandomTokens(&rng, len, config.vocab_size), o));
      ASSIGN_OR_RETURN(const double t, step());
      times.push_back(t);
      RETURN_IF_ERROR(drain());
    }
    const double l = static_cast<double>(len);
    points.push_back(
        {absl::StrCat("prefill, ", len, " tokens"), l, l, l * (l + 1) / 2, 1, Median(times)});
  }
  ASSIGN_OR_RETURN(StepCost cost, FitStepCost(points));

  // A host-tier restore copies one block: its bytes at this machine's memcpy rate.
  const int64_t block_bytes = engine->kv_block_bytes();
  {
    const size_t n = size_t{64} << 20;
    std::vector<char> a(n, 1), b(n, 2);
    std::vector<double> times;
    for (int i = 0; i < 5; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      std::memcpy(b.data(), a.data(), n);
      times.push_back(Seconds(t0, std::chrono::steady_clock::now()));
      a[static_cast<size_t>(i)] = b[n - 1 - static_cast<size_t>(i)];
    }
    cost.host_block_s = static_cast<double>(block_bytes) / (static_cast<double>(n) / Median(times));
  }

  // A fine-tune: what a cold delta takes to load (a one-token request on it, less the same on the
  // base), and what it adds to a step: per distinct fine-tune and per token of its sequences,
  // fitted to its extra time over the base at decode batch 1 and 4 and in a 128-token prefill.
  double delta_load_s = 0;
  std::vector<ProfilePoint> delta_points;  // seconds: the fine-tune's extra time
  if (args.Has("delta")) {
    auto one_request = [&](int64_t len, const std::string& fine_tune) -> absl::StatusOr<double> {
      RequestOptions o;
      o.max_tokens = 1;
      o.ignore_eos = true;
      o.fine_tune_id = fine_tune;
      const auto t0 = std::chrono::steady_clock::now();
      RETURN_IF_ERROR(engine->AddRequest(absl::StrCat("profile-", next_id++),
                                         RandomTokens(&rng, len, config.vocab_size), o));
      while (engine->HasWork()) {
        if (engine->WaitingForIo()) absl::SleepFor(absl::Microseconds(100));
        RETURN_IF_ERROR(step().status());
      }
      return Seconds(t0, std::chrono::steady_clock::now());
    };
    ASSIGN_OR_RETURN(const double base_request, one_request(16, ""));
    ASSIGN_OR_RETURN(const double cold_request, one_request(16, "profile"));
    delta_load_s = std::max(0.0, cold_request - base_request);
    for (const int64_t b : {int64_t{1}, int64_t{4}}) {
      ASSIGN_OR_RETURN(const double base, decode_median(b, context, ""));
      ASSIGN_OR_RETURN(const double ft, decode_median(b, context, "profile"));
      delta_points.push_back(
          {absl::StrCat("decode, batch ", b), static_cast<double>(b), 0, 0, 0, ft - base});
    }
    std::vector<double> base_prefill, ft_prefill;
    for (int64_t i = 0; i < reps; ++i) {
      ASSIGN_OR_RETURN(const double base, one_request(128, ""));
      ASSIGN_OR_RETURN(const double ft, one_request(128, "profile"));
      base_prefill.push_back(base);
      ft_prefill.push_back(ft);
    }
    delta_points.push_back(
        {"prefill, 128 tokens", 128, 0, 0, 0, Median(ft_prefill) - Median(base_prefill)});
    // Least squares of extra = delta_compute_s + delta_token_s * tokens, both >= 0.
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (const ProfilePoint& d : delta_points) {
      sx += d.tokens;
      sy += d.seconds;
      sxx += d.tokens * d.tokens;
      sxy += d.tokens * d.seconds;
    }
    const double n = static_cast<double>(delta_points.size());
    double slope = std::max(0.0, (n * sxy - sx * sy) / (n * sxx - sx * sx));
    double intercept = (sy - slope * sx) / n;
    if (intercept < 0) {  // through the origin
      intercept = 0;
      slope = std::max(0.0, sxy / sxx);
    }
    cost.delta_compute_s = intercept;
    cost.delta_token_s = slope;
  }

  // The serving path's own cost per step (the worker's step loop, streaming each token through
  // the coordinator), which an in-process engine does not pay: a decode step at batch 1 as a
  // client sees it, less the fit's engine step, goes into fixed_s.
  double serving_overhead_s = 0;
  ServingTimes serving;
  if (std::optional<std::string> target = args.Get("coordinator")) {
    ASSIGN_OR_RETURN(serving,
                     MeasureServing(args, *target, config.vocab_size, context, 32, reps, &rng));
    const double ctx = static_cast<double>(context) + 16;
    serving_overhead_s = std::max(0.0, serving.tpot_s - cost.Step(1, ctx, ctx, 1));
  }
  const StepCost engine_cost = cost;  // the fit, before the serving path's share
  cost.fixed_s += serving_overhead_s;
  const double prefill_s = cost.Step(static_cast<double>(context), static_cast<double>(context),
                                     context * (context + 1) / 2.0, 1);

  EngineProfile p;
  p.model = config.architecture_name;
  p.machine = device == "gpu"
                  ? absl::StrCat("GPU (", DTypeName(gpu_dtype), "), host ", MachineName())
                  : MachineName();
  p.cost = cost;
  p.delta_load_s = delta_load_s;
  p.block_bytes = block_bytes;
  // What a request pays outside the steps: the client's round trip through the coordinator.
  if (args.Has("coordinator")) p.request_overhead_s = std::max(0.0, serving.ttft_s - prefill_s);
  p.kv_blocks = engine->num_kv_blocks();
  p.block_tokens = block_tokens;
  p.max_batch_tokens = max_batch_tokens;
  p.max_running_sequences = max_running;
  const std::string json = EngineProfileToJson(p);
  if (std::optional<std::string> path = args.Get("out")) {
    std::FILE* f = std::fopen(path->c_str(), "w");
    if (f == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("--out: cannot write ", *path));
    const bool ok = std::fwrite(json.data(), 1, json.size(), f) == json.size();
    if (std::fclose(f) != 0 || !ok)
      return absl::InternalError(absl::StrCat("--out: writing ", *path, " failed"));
  }
  if (args.Has("json")) {
    absl::FPrintF(out, "%s", json);
    return absl::OkStatus();
  }
  absl::FPrintF(out, "engine     %s on %s: KV cache %d blocks of %d tokens, %d compute threads\n",
                p.model, p.machine, p.kv_blocks, block_tokens, threads);
  absl::FPrintF(out, "%-34s %11s %11s %7s\n", "step", "measured ms", "fitted ms", "error");
  for (const ProfilePoint& pt : points) {
    const double fit = Predict(engine_cost, pt);
    absl::FPrintF(out, "%-34s %11.3f %11.3f %+6.1f%%\n", pt.what, 1e3 * pt.seconds, 1e3 * fit,
                  100 * (fit / pt.seconds - 1));
  }
  absl::FPrintF(out,
                "fit        step = %.3f ms + max(%.3f ms, %.2f us/token + %.4f us per attention "
                "pair + %.1f us per sampled sequence); host block restore %.1f us\n",
                1e3 * engine_cost.fixed_s, 1e3 * cost.weights_s, 1e6 * cost.token_s,
                1e6 * cost.attention_pair_s, 1e6 * cost.sequence_s, 1e6 * cost.host_block_s);
  if (args.Has("delta")) {
    absl::FPrintF(out,
                  "fine-tune  %s: loads in %.1f ms; adds %.3f ms a step + %.1f us a token (extra "
                  "over the base, measured / fitted:",
                  *args.Get("delta"), 1e3 * delta_load_s, 1e3 * cost.delta_compute_s,
                  1e6 * cost.delta_token_s);
    for (const ProfilePoint& d : delta_points) {
      absl::FPrintF(out, " %s %.3f / %.3f ms;", d.what, 1e3 * d.seconds,
                    1e3 * (cost.delta_compute_s + cost.delta_token_s * d.tokens));
    }
    absl::FPrintF(out, ")\n");
  }
  if (args.Has("coordinator")) {
    absl::FPrintF(out,
                  "serving    through %s at batch 1: TPOT %.3f ms (the fitted engine step %.3f ms: "
                  "%.3f ms a step added to fixed_s); TTFT %.2f ms against a %d-token prefill "
                  "step of %.2f ms (request_overhead_s %.2f ms)\n",
                  *args.Get("coordinator"), 1e3 * serving.tpot_s,
                  1e3 * engine_cost.Step(1, context + 16.0, context + 16.0, 1),
                  1e3 * serving_overhead_s, 1e3 * serving.ttft_s, context, 1e3 * prefill_s,
                  1e3 * p.request_overhead_s);
  }
  if (args.Has("out")) absl::FPrintF(out, "wrote      %s\n", *args.Get("out"));
  return absl::OkStatus();
}

}  // namespace strata
