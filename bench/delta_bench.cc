// delta_bench: what serving many fine-tunes in one batch costs on the CPU, against the base alone.
//
//   bazel run -c opt //bench:delta_bench -- [--models=bundled,llama-100m] [--tenants=0,1,4,16,32]
//       [--batch=32] [--prompt_tokens=128] [--decode_steps=16] [--reps=3] [--threads=0]
//       [--bits=4] [--sparsity=none] [--kind=delta|lora] [--lora_rank=16] [--json_out=FILE]
//
// For each model and tenant count T, a batch of `batch` sequences, sequence i running fine-tune
// i mod T (T = 0: every sequence on the base), is prefilled (prompt_tokens each, one step) and then
// decoded for decode_steps steps through ModelRunner::Forward. Each figure is the median over reps;
// the ratio is against T = 0 in the same process.
//   bundled:    the committed strata-tiny base with T deltas loaded from files made of its two real
//               fine-tunes (alternating), each a separate copy in memory.
//   llama-100m: random bf16 weights with one random delta (RandomDeltaWeights: random codes in
//               the --bits/--sparsity format) that T tenants share as separate DeltaWeights views:
//               the compute is the same as T distinct deltas, the cache footprint smaller.
// Also reported: the delta's bytes against the fine-tune's, and the time to load a delta file.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_models.h"
#include "bench/stats.h"
#include "common/init.h"
#include "common/log.h"
#include "kernels/delta.h"
#include "worker/comm/collectives.h"
#include "worker/model/config.h"
#include "worker/model/delta.h"
#include "worker/model/lora.h"
#include "worker/model/model_runner.h"
#include "worker/model/weights.h"

ABSL_FLAG(std::string, models, "bundled,llama-100m", "bundled and/or llama-100m.");
ABSL_FLAG(std::string, bundled_dir, "models/strata-tiny", "The strata-tiny directory.");
ABSL_FLAG(std::string, tenants, "0,1,4,16,32", "Distinct fine-tunes per batch (0: base only).");
ABSL_FLAG(int, batch, 32, "Sequences per batch.");
ABSL_FLAG(int, prompt_tokens, 128, "Prompt tokens per sequence.");
ABSL_FLAG(int, decode_steps, 16, "Decode steps measured.");
ABSL_FLAG(int, reps, 3, "Repetitions; the median is reported.");
ABSL_FLAG(int, threads, 0, "Compute threads (0: all cores).");
ABSL_FLAG(int, bits, 4, "Delta bits (2, 4, 8).");
ABSL_FLAG(std::string, sparsity, "none", "Delta sparsity: none or 2:4.");
ABSL_FLAG(std::string, json_out, "", "Also write the results as JSON lines here.");
ABSL_FLAG(std::string, kind, "delta",
          "delta: compressed deltas; lora: LoRA adapters (bundled: the committed "
          "lora-c-headers, rank 16; llama-100m: random ones of --lora_rank on every projection).");
ABSL_FLAG(int, lora_rank, 16, "The random LoRA adapters' rank (--kind=lora, llama-100m).");

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct Result {
  double prefill_tps = 0;
  double decode_tps = 0;
};

// Prefill then decode a batch whose sequence i runs tenants[i % tenants.size()] (empty: base).
Result RunBatch(ModelRunner& runner, const std::vector<const DeltaWeights*>& tenants) {
  const ModelWeights& w = runner.weights();
  const int64_t B = absl::GetFlag(FLAGS_batch), P = absl::GetFlag(FLAGS_prompt_tokens);
  const int64_t S = absl::GetFlag(FLAGS_decode_steps), bt = 16;
  const int64_t max_blocks = (P + S + bt - 1) / bt;
  KvCacheStorage cache(w, B * max_blocks, bt);
  std::vector<int32_t> tables(B * max_blocks);
  for (int64_t i = 0; i < B * max_blocks; ++i) tables[i] = static_cast<int32_t>(i);
  std::vector<const DeltaWeights*> seq_deltas;
  for (int64_t i = 0; i < B && !tenants.empty(); ++i) {
    seq_deltas.push_back(tenants[i % tenants.size()]);
  }
  std::mt19937 rng(11);
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(w.config.vocab_size) - 1);
  const auto step = [&](int64_t start, int64_t count) {
    std::vector<int32_t> tokens, positions, token_seq, logit_tokens;
    std::vector<int64_t> slots;
    for (int64_t s = 0; s < B; ++s) {
      for (int64_t p = start; p < start + count; ++p) {
        tokens.push_back(id(rng));
        positions.push_back(static_cast<int32_t>(p));
        token_seq.push_back(static_cast<int32_t>(s));
        slots.push_back(int64_t{tables[s * max_blocks + p / bt]} * bt + p % bt);
      }
      logit_tokens.push_back(static_cast<int32_t>(tokens.size() - 1));
    }
    ForwardBatch b{tokens, positions,  token_seq,    slots,     tables,
                   B,      max_blocks, logit_tokens, seq_deltas};
    std::vector<float> logits(B * w.config.vocab_size);
    CHECK_OK(runner.Forward(b, cache.layers(), absl::MakeSpan(logits)));
  };
  Result r;
  const auto t0 = Clock::now();
  step(0, P);
  const auto t1 = Clock::now();
  for (int64_t s = 0; s < S; ++s) step(P + s, 1);
  const auto t2 = Clock::now();
  r.prefill_tps = B * P / Seconds(t0, t1);
  r.decode_tps = B * S / Seconds(t1, t2);
  return r;
}

void Report(std::FILE* json, const std::string& model, int tenants, const Result& r,
            const Result& base) {
  std::printf("%-12s %8d %14.0f %8.3f %14.1f %8.3f\n", model.c_str(), tenants, r.prefill_tps,
              r.prefill_tps / base.prefill_tps, r.decode_tps, r.decode_tps / base.decode_tps);
  if (json != nullptr) {
    std::fprintf(json,
                 "{\"bench\":\"delta\",\"model\":\"%s\",\"tenants\":%d,\"batch\":%d,"
                 "\"prefill_tokens_per_s\":%.1f,\"prefill_vs_base\":%.4f,"
                 "\"decode_tokens_per_s\":%.2f,\"decode_vs_base\":%.4f,\"bits\":%d,"
                 "\"sparsity\":\"%s\",\"kind\":\"%s\"}\n",
                 model.c_str(), tenants, absl::GetFlag(FLAGS_batch), r.prefill_tps,
                 r.prefill_tps / base.prefill_tps, r.decode_tps, r.decode_tps / base.decode_tps,
                 absl::GetFlag(FLAGS_bits), absl::GetFlag(FLAGS_sparsity).c_str(),
                 absl::GetFlag(FLAGS_kind).c_str());
  }
}

int Main() {
  std::vector<int> tenant_counts;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_tenants), ',')) {
    int t = 0;
    CHECK(absl::SimpleAtoi(s, &t) && t >= 0) << "--tenants: " << s;
    tenant_counts.push_back(t);
  }
  const int bits = absl::GetFlag(FLAGS_bits);
  const bool sparse = absl::GetFlag(FLAGS_sparsity) == "2:4";
  const bool lora = absl::GetFlag(FLAGS_kind) == "lora";
  CHECK(lora || absl::GetFlag(FLAGS_kind) == "delta") << "--kind must be delta or lora";
  std::FILE* json = nullptr;
  if (!absl::GetFlag(FLAGS_json_out).empty()) {
    json = std::fopen(absl::GetFlag(FLAGS_json_out).c_str(), "a");
    CHECK(json != nullptr) << "cannot open --json_out";
  }
  std::printf("batch %d, prompt %d tokens, %d decode steps, %s, median of %d\n",
              absl::GetFlag(FLAGS_batch), absl::GetFlag(FLAGS_prompt_tokens),
              absl::GetFlag(FLAGS_decode_steps),
              lora ? "LoRA adapters"
                   : absl::StrFormat("delta %d-bit %s", bits, sparse ? "2:4" : "dense").c_str(),
              absl::GetFlag(FLAGS_reps));
  std::printf("%-12s %8s %14s %8s %14s %8s\n", "model", "tenants", "prefill tok/s", "vs base",
              "decode tok/s", "vs base");
  for (absl::string_view model : absl::StrSplit(absl::GetFlag(FLAGS_models), ',')) {
    std::unique_ptr<ModelWeights> weights;
    std::vector<std::unique_ptr<DeltaWeights>> owned;
    std::vector<const DeltaWeights*> pool;  // one per tenant, up to the largest count
    const int most = *std::max_element(tenant_counts.begin(), tenant_counts.end());
    if (model == "bundled") {
      const std::string dir = absl::GetFlag(FLAGS_bundled_dir);
      absl::StatusOr<ModelConfig> config = LoadModelConfig(dir + "/base");
      CHECK_OK(config.status());
      absl::StatusOr<std::unique_ptr<ModelWeights>> w =
          LoadModelWeights(dir + "/base", *config, 0, 1);
      CHECK_OK(w.status());
      weights = *std::move(w);
      const std::string fingerprint = BaseFingerprint(*weights->files);
      std::vector<std::string> files;
      if (lora) files = {dir + "/lora-c-headers"};
      for (const char* ft : {"ft-c-headers", "ft-man"}) {
        if (lora) break;
        const std::string out =
            absl::StrFormat("/tmp/delta_bench_%s_%d%s.safetensors", ft, bits, sparse ? "_24" : "");
        DeltaCompressOptions o;
        o.bits = bits;
        o.sparse_2_4 = sparse;
        absl::StatusOr<DeltaCompressReport> rep =
            CompressDelta(dir + "/base", dir + "/" + ft, out, o);
        CHECK_OK(rep.status());
        std::printf("%s: %.2f MB delta for %.2f MB of fine-tune weights (%.2fx)\n", ft,
                    rep->delta_bytes / 1e6, rep->fine_tune_bytes / 1e6,
                    static_cast<double>(rep->fine_tune_bytes) / rep->delta_bytes);
        files.push_back(out);
      }
      std::vector<double> load_ms;
      for (int t = 0; t < most; ++t) {
        const auto a = Clock::now();
        absl::StatusOr<std::unique_ptr<DeltaWeights>> d =
            LoadFineTune(files[t % files.size()], *weights, fingerprint);
        load_ms.push_back(Seconds(a, Clock::now()) * 1e3);
        CHECK_OK(d.status());
        owned.push_back(*std::move(d));
        pool.push_back(owned.back().get());
      }
      if (!load_ms.empty()) {
        std::printf("loading a %s (read, check, copy): median %.2f ms, %.2f MB in memory\n",
                    lora ? "LoRA adapter" : "delta file", Median(load_ms),
                    owned[0]->resident_bytes / 1e6);
      }
    } else if (model == "llama-100m") {
      weights = RandomModelWeights(Llama100mConfig(), DType::kBF16, 7);
      owned.push_back(lora ? RandomLoraWeights(weights->config, absl::GetFlag(FLAGS_lora_rank), 3,
                                               LoraFactorType(*weights))
                           : RandomDeltaWeights(weights->config, bits, sparse, 3));
      std::printf("llama-100m: %.1f MB synthesized %s\n", owned[0]->resident_bytes / 1e6,
                  lora ? "LoRA adapter" : "delta");
      for (int t = 0; t < most; ++t) {
        // A shallow copy: its own object (its own segment in a batch), the same packed bytes.
        auto view = std::make_unique<DeltaWeights>();
        view->lora = owned[0]->lora;
        view->bits = owned[0]->bits;
        view->sparse_2_4 = owned[0]->sparse_2_4;
        view->embed = owned[0]->embed;
        view->layers = owned[0]->layers;
        pool.push_back(view.get());
        owned.push_back(std::move(view));
      }
    } else {
      LOG(FATAL) << "unknown model " << model;
    }
    SingleRankCollectives comm;
    ModelRunner runner(weights.get(), &comm, absl::GetFlag(FLAGS_threads));
    RunBatch(runner, {});  // warm up
    Result base;
    for (int tenants : tenant_counts) {
      std::vector<double> prefill, decode;
      const std::vector<const DeltaWeights*> use(pool.begin(), pool.begin() + tenants);
      for (int rep = 0; rep < absl::GetFlag(FLAGS_reps); ++rep) {
        const Result r = RunBatch(runner, use);
        prefill.push_back(r.prefill_tps);
        decode.push_back(r.decode_tps);
      }
      const Result r{Median(prefill), Median(decode)};
      if (tenants == 0) base = r;
      Report(json, std::string(model), tenants, r, base.prefill_tps > 0 ? base : r);
    }
  }
  if (json != nullptr) std::fclose(json);
  return 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv, "CPU cost of serving many fine-tunes in one batch");
  return strata::Main();
}
