// speculative_bench: what speculative decoding (EngineConfig::num_speculative_tokens) buys on the
// CPU engine, with drafts by n-gram lookup and from the bundled draft model
// (EngineConfig::draft_weights), and what a step with a draft costs.
//
//   bazel run -c opt //bench:speculative_bench -- [--drafts=0,2,4,7] [--batches=1,2]
//       [--methods=ngram,draft_model] [--new_tokens=128] [--reps=3] [--threads=0]
//       [--json_out=FILE]
//
// Part 1, the bundled strata-tiny model and its tokenizer on its held-out files (text it never
// saw in training), three workloads:
//   quote:  a passage, a blank line, then the passage's first line again: the model goes on
//           quoting (what retrieval answers, code edits and summaries with citations do);
//   code:   a passage of Python cut mid-way, continued (drafts only from repeats in the text);
//   prose:  the same from a man page.
// Each with greedy decoding and with seeded sampling at temperature 0.7, over 8 passages at spread
// offsets, one at a time (batch 1) and two at a time (batch 2; on the CPU a step's drafts stop at
// 8 tokens in all, so batch 2 drafts 3 tokens a sequence at most, and batch 8 would draft none).
// For each draft length: decode tokens/s
// (from the first output token to the last, median of reps), steps per output token, and the share
// of draft tokens kept. The output is checked to be the same with and without drafts. Part 2, a
// ~100M-parameter Llama with random bf16 weights (bench_models.h): the time of one step that
// computes a sequence's last token plus k draft tokens, against k = 0, at context 512: the cost
// side of the trade on a model whose projections dominate. Part 3 (--chat): the second turns of
// conversations with the draft model, its own prefix cache on and off.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_models.h"
#include "bench/stats.h"
#include "common/init.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "tokenizer/tokenizer.h"
#include "worker/comm/collectives.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"
#include "worker/model/model_runner.h"
#include "worker/model/weights.h"

ABSL_FLAG(std::string, model_dir, "models/strata-tiny/base", "The bundled model.");
ABSL_FLAG(std::string, heldout_dir, "models/strata-tiny/heldout", "Its held-out texts.");
ABSL_FLAG(std::string, drafts, "0,2,4,7", "Draft lengths (num_speculative_tokens); 0: off.");
ABSL_FLAG(std::string, batches, "1,2", "Batch sizes.");
ABSL_FLAG(std::string, workloads, "quote,code,prose", "Part 1's workloads.");
ABSL_FLAG(
    std::string, methods, "ngram,draft_model",
    "Where drafts come from: ngram (lookup in the context), draft_model (--draft_model_dir).");
ABSL_FLAG(std::string, draft_model_dir, "models/strata-tiny/draft", "The bundled draft model.");
ABSL_FLAG(int, draft_threads, 0, "Compute threads of the draft model (0: --threads).");
ABSL_FLAG(bool, chat, true,
          "Part 3: second turns of conversations, the draft's prefix cache on and off.");
ABSL_FLAG(int, new_tokens, 128, "Tokens generated per sequence.");
ABSL_FLAG(int, reps, 3, "Repetitions; the median is reported.");
ABSL_FLAG(int, threads, 0, "Compute threads (0: all cores).");
ABSL_FLAG(bool, step_cost, true, "Part 2: the step cost on the ~100M random-weight model.");
ABSL_FLAG(std::string, json_out, "", "Also write the results as JSON lines here.");

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

std::string ReadFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  CHECK_OK(text.status());
  return *std::move(text);
}

std::vector<int> ParseInts(const std::string& s) {
  std::vector<int> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int v = 0;
    CHECK(absl::SimpleAtoi(p, &v)) << "bad number " << p;
    out.push_back(v);
  }
  return out;
}

struct Workload {
  std::string name;
  std::vector<std::string> prompts;  // kPassages of them
};

// `n` passages of `text` of about `chars` characters, starting at a line start near offsets spread
// through the file.
std::vector<std::string> Passages(const std::string& text, int n, size_t chars) {
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) {
    size_t at = text.size() * (2 * i + 1) / (2 * n + 2);
    at = text.find('\n', at);
    at = at == std::string::npos ? 0 : at + 1;
    out.push_back(text.substr(at, chars));
  }
  return out;
}

// Passages per workload: every batch size runs all of them, `batch` at a time.
constexpr int kPassages = 8;

struct Run {
  double decode_tokens = 0, decode_seconds = 0;
  int64_t steps = 0, tokens = 0, drafted = 0, kept = 0;
  double draft_seconds = 0;  // the draft model's, proposing
  std::map<std::string, std::vector<int32_t>> outputs;
};

// One engine serving prompts[first, first + batch) together; outputs keyed by prompt index.
Run Generate(const ModelWeights& w, Collectives* comm, const Tokenizer& tok,
             const std::vector<std::string>& prompts, int first, int batch, int draft,
             float temperature, const ModelWeights* draft_weights) {
  EngineConfig ec;
  ec.num_kv_blocks = 2048;
  ec.compute_threads = absl::GetFlag(FLAGS_threads);
  ec.num_speculative_tokens = draft;
  ec.draft_weights = draft > 0 ? draft_weights : nullptr;
  ec.draft_compute_threads = absl::GetFlag(FLAGS_draft_threads);
  ec.speculative_max_batch = 64;
  auto engine = Engine::Create(&w, comm, ec);
  CHECK_OK(engine.status());
  Engine& e = **engine;
  for (int i = first; i < first + batch; ++i) {
    auto ids = tok.Encode(prompts[i], /*add_special_tokens=*/true);
    CHECK_OK(ids.status());
    RequestOptions o;
    o.max_tokens = absl::GetFlag(FLAGS_new_tokens);
    o.ignore_eos = true;
    o.sampling.temperature = temperature;
    o.sampling.seed = 100 + static_cast<uint64_t>(i);
    CHECK_OK(e.AddRequest(absl::StrCat("s", i), *ids, o));
  }
  Run run;
  Clock::time_point start;
  int64_t first_tokens = 0;
  bool started = false;
  while (e.HasWork()) {
    auto step = e.Step();
    CHECK_OK(step.status());
    ++run.steps;
    for (const RequestOutput& o : *step) {
      for (const SampledToken& t : o.tokens) run.outputs[o.request_id].push_back(t.token);
      run.tokens += static_cast<int64_t>(o.tokens.size());
    }
    // Decoding starts once every sequence has its first token.
    if (!started && static_cast<int64_t>(run.outputs.size()) == batch) {
      started = true;
      start = Clock::now();
      first_tokens = run.tokens;
    }
  }
  const double s = std::chrono::duration<double>(Clock::now() - start).count();
  run.decode_tokens = static_cast<double>(run.tokens - first_tokens);
  run.decode_seconds = s;
  const EngineStats st = e.Stats();
  run.drafted = st.num_draft_tokens;
  run.kept = st.num_accepted_draft_tokens;
  run.draft_seconds = st.draft_model.seconds;
  return run;
}

// Every passage, `batch` at a time: the totals.
Run GenerateAll(const ModelWeights& w, Collectives* comm, const Tokenizer& tok,
                const std::vector<std::string>& prompts, int batch, int draft, float temperature,
                const ModelWeights* draft_weights) {
  Run all;
  for (int first = 0; first + batch <= static_cast<int>(prompts.size()); first += batch) {
    Run r = Generate(w, comm, tok, prompts, first, batch, draft, temperature, draft_weights);
    all.decode_tokens += r.decode_tokens;
    all.decode_seconds += r.decode_seconds;
    all.steps += r.steps;
    all.tokens += r.tokens;
    all.drafted += r.drafted;
    all.kept += r.kept;
    all.draft_seconds += r.draft_seconds;
    for (auto& [id, out] : r.outputs) all.outputs[absl::StrCat(first, "/", id)] = std::move(out);
  }
  return all;
}

void PartChat(const ModelWeights& w, const ModelWeights& draft, const Tokenizer& tok,
              const std::vector<std::string>& passages, FILE* json);

void PartOne(FILE* json) {
  const std::string dir = absl::GetFlag(FLAGS_model_dir);
  auto config = LoadModelConfig(dir);
  CHECK_OK(config.status());
  auto weights = LoadModelWeights(dir, *config, 0, 1);
  CHECK_OK(weights.status());
  auto tok = Tokenizer::FromModelDir(dir);
  CHECK_OK(tok.status());
  SingleRankCollectives comm;
  const std::vector<std::string> methods = absl::StrSplit(absl::GetFlag(FLAGS_methods), ',');
  std::unique_ptr<ModelWeights> draft_model;
  if (std::find(methods.begin(), methods.end(), "draft_model") != methods.end()) {
    const std::string ddir = absl::GetFlag(FLAGS_draft_model_dir);
    auto dconfig = LoadModelConfig(ddir);
    CHECK_OK(dconfig.status());
    auto dw = LoadModelWeights(ddir, *dconfig, 0, 1);
    CHECK_OK(dw.status());
    draft_model = *std::move(dw);
  }
  const std::vector<int> batches = ParseInts(absl::GetFlag(FLAGS_batches));
  for (int b : batches) CHECK(b >= 1 && kPassages % b == 0) << "batch sizes divide " << kPassages;
  const int max_batch = kPassages;
  const std::string held = absl::GetFlag(FLAGS_heldout_dir);
  std::vector<Workload> workloads;
  {
    Workload quote{"quote", {}};
    for (const std::string& p : Passages(ReadFile(held + "/python.txt"), max_batch, 700)) {
      quote.prompts.push_back(p + "\n\n" + p.substr(0, p.find('\n') + 1));
    }
    workloads.push_back(std::move(quote));
    workloads.push_back({"code", Passages(ReadFile(held + "/python.txt"), max_batch, 700)});
    workloads.push_back({"prose", Passages(ReadFile(held + "/man.txt"), max_batch, 700)});
  }
  std::printf("%-6s %-8s %5s %-11s %5s %12s %8s %12s %10s %14s\n", "work", "sampling", "batch",
              "method", "draft", "decode tok/s", "speedup", "steps/token", "kept", "draft ms/step");
  const std::vector<std::string> wanted = absl::StrSplit(absl::GetFlag(FLAGS_workloads), ',');
  for (const Workload& wl : workloads) {
    if (std::find(wanted.begin(), wanted.end(), wl.name) == wanted.end()) continue;
    for (const float temperature : {0.0f, 0.7f}) {
      for (int batch : batches) {
        double base_tps = 0;
        std::map<std::string, std::vector<int32_t>> base_out;
        std::vector<std::pair<int, std::string>> runs;
        for (int draft : ParseInts(absl::GetFlag(FLAGS_drafts))) {
          if (draft == 0) {
            runs.push_back({0, "-"});
            continue;
          }
          for (const std::string& m : methods) runs.push_back({draft, m});
        }
        for (const auto& [draft, method] : runs) {
          const ModelWeights* dw = method == "draft_model" ? draft_model.get() : nullptr;
          std::vector<double> tps;
          Run run;
          for (int rep = 0; rep < absl::GetFlag(FLAGS_reps); ++rep) {
            run = GenerateAll(**weights, &comm, **tok, wl.prompts, batch, draft, temperature, dw);
            tps.push_back(run.decode_tokens / run.decode_seconds);
          }
          const double med = Median(tps);
          if (draft == 0) {
            base_tps = med;
            base_out = run.outputs;
          } else if (!base_out.empty()) {
            CHECK(run.outputs == base_out) << "drafts changed the output of " << wl.name;
          }
          const double kept = run.drafted > 0
                                  ? static_cast<double>(run.kept) / static_cast<double>(run.drafted)
                                  : 0.0;
          const char* sampling = temperature == 0 ? "greedy" : "t=0.7";
          // The draft model's time per engine step (its share of a step's wall time).
          const double draft_ms = 1e3 * run.draft_seconds / static_cast<double>(run.steps);
          std::printf("%-6s %-8s %5d %-11s %5d %12.1f %7.2fx %12.3f %9.0f%% %14.3f\n",
                      wl.name.c_str(), sampling, batch, method.c_str(), draft, med,
                      base_tps > 0 ? med / base_tps : 0.0,
                      static_cast<double>(run.steps) / static_cast<double>(run.tokens), 100 * kept,
                      draft_ms);
          std::fflush(stdout);
          if (json != nullptr) {
            std::fprintf(json,
                         "{\"part\": \"tiny\", \"workload\": \"%s\", \"sampling\": \"%s\", "
                         "\"batch\": %d, \"method\": \"%s\", \"draft\": %d, \"decode_tps\": %.2f, "
                         "\"steps\": %lld, \"tokens\": %lld, \"drafted\": %lld, \"kept\": %lld}\n",
                         wl.name.c_str(), sampling, batch, method.c_str(), draft, med,
                         static_cast<long long>(run.steps), static_cast<long long>(run.tokens),
                         static_cast<long long>(run.drafted), static_cast<long long>(run.kept));
          }
        }
      }
    }
  }
  if (absl::GetFlag(FLAGS_chat) && draft_model != nullptr) {
    PartChat(**weights, *draft_model, **tok,
             Passages(ReadFile(held + "/python.txt"), max_batch, 700), json);
  }
}

// Part 3, conversations with the draft model: one engine serves each passage's first turn, then a
// second turn whose prompt is the first turn's prompt, its answer and a follow-up line. The
// target takes the first turn's blocks from its prefix cache; the draft takes its own with its
// prefix caching on, and computes the whole context again on the second turn's first draft with
// it off. Reported: the draft's catch-up tokens and the second turns' decode tokens/s.
void PartChat(const ModelWeights& w, const ModelWeights& draft, const Tokenizer& tok,
              const std::vector<std::string>& passages, FILE* json) {
  std::printf("\nconversations (draft model, k=4, greedy, batch 1): second turns\n");
  std::printf("%-20s %16s %14s %16s\n", "draft prefix cache", "catch-up tokens", "prefix hits",
              "decode tok/s");
  SingleRankCollectives comm;
  for (const bool cache : {true, false}) {
    std::vector<double> tps;
    int64_t catch_up = 0, hits = 0;
    for (int rep = 0; rep < absl::GetFlag(FLAGS_reps); ++rep) {
      EngineConfig ec;
      ec.num_kv_blocks = 2048;
      ec.compute_threads = absl::GetFlag(FLAGS_threads);
      ec.num_speculative_tokens = 4;
      ec.speculative_max_batch = 64;
      ec.draft_weights = &draft;
      ec.draft_prefix_caching = cache;
      auto engine = Engine::Create(&w, &comm, ec);
      CHECK_OK(engine.status());
      Engine& e = **engine;
      // Runs one request to its end; the seconds from its first token to its last.
      const auto run = [&](const std::string& id, const std::vector<int32_t>& prompt,
                           std::vector<int32_t>* out) {
        RequestOptions o;
        o.max_tokens = absl::GetFlag(FLAGS_new_tokens);
        o.ignore_eos = true;
        o.sampling.temperature = 0;
        CHECK_OK(e.AddRequest(id, prompt, o));
        Clock::time_point first;
        bool started = false;
        while (e.HasWork()) {
          auto step = e.Step();
          CHECK_OK(step.status());
          for (const RequestOutput& r : *step) {
            for (const SampledToken& t : r.tokens) out->push_back(t.token);
          }
          if (!started && !out->empty()) {
            started = true;
            first = Clock::now();
          }
        }
        return std::chrono::duration<double>(Clock::now() - first).count();
      };
      double seconds = 0, tokens = 0;
      int64_t catch_up_before = 0, hits_before = 0;
      for (size_t i = 0; i < passages.size(); ++i) {
        auto ids = tok.Encode(passages[i], /*add_special_tokens=*/true);
        CHECK_OK(ids.status());
        std::vector<int32_t> answer;
        run(absl::StrCat("t1-", i), *ids, &answer);
        std::vector<int32_t> second = *ids;
        second.insert(second.end(), answer.begin(), answer.end());
        auto follow = tok.Encode("\n\n# And then:\n", /*add_special_tokens=*/false);
        CHECK_OK(follow.status());
        second.insert(second.end(), follow->begin(), follow->end());
        const EngineStats before = e.Stats();
        catch_up_before = before.draft_model.catch_up_tokens;
        hits_before = before.draft_model.prefix_hit_tokens;
        std::vector<int32_t> answer2;
        seconds += run(absl::StrCat("t2-", i), second, &answer2);
        tokens += static_cast<double>(answer2.size() - 1);
        const EngineStats after = e.Stats();
        if (rep == 0) {
          catch_up += after.draft_model.catch_up_tokens - catch_up_before;
          hits += after.draft_model.prefix_hit_tokens - hits_before;
        }
      }
      tps.push_back(tokens / seconds);
    }
    std::printf("%-20s %16lld %14lld %16.1f\n", cache ? "on" : "off",
                static_cast<long long>(catch_up), static_cast<long long>(hits), Median(tps));
    if (json != nullptr) {
      std::fprintf(json,
                   "{\"part\": \"chat\", \"draft_prefix_cache\": %s, \"catch_up_tokens\": %lld, "
                   "\"prefix_hit_tokens\": %lld, \"decode_tps\": %.2f}\n",
                   cache ? "true" : "false", static_cast<long long>(catch_up),
                   static_cast<long long>(hits), Median(tps));
    }
  }
}

// One forward of a sequence's last token plus k more at context `context`, on the runner
// directly: median seconds.
double StepSeconds(ModelRunner& runner, const ModelWeights& w, const KvCacheLayers& cache,
                   int64_t context, int64_t k) {
  const int64_t bt = cache.block_tokens;
  const int64_t n = 1 + k;
  const int64_t nb = (context + n + bt - 1) / bt;
  std::vector<int32_t> tokens(n, 7), pos(n), tseq(n, 0), table(nb), logit(n);
  std::vector<int64_t> slots(n);
  for (int64_t i = 0; i < n; ++i) {
    pos[i] = static_cast<int32_t>(context + i);
    slots[i] = context + i;
    logit[i] = static_cast<int32_t>(i);
  }
  for (int64_t b = 0; b < nb; ++b) table[b] = static_cast<int32_t>(b);
  std::vector<float> logits(n * w.config.vocab_size);
  ForwardBatch batch{tokens, pos, tseq, slots, table, 1, nb, logit, {}};
  std::vector<double> times;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = Clock::now();
    CHECK_OK(runner.Forward(batch, cache, absl::MakeSpan(logits)));
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return Median(times);
}

void PartTwo(FILE* json) {
  const ModelConfig c = Llama100mConfig();
  std::unique_ptr<ModelWeights> w = RandomModelWeights(c, DType::kBF16, 7, 0, 1);
  SingleRankCollectives comm;
  ModelRunner runner(w.get(), &comm, absl::GetFlag(FLAGS_threads));
  const int64_t context = 512;
  KvCacheStorage kv(*w, (context + 64) / 16 + 1, 16);
  std::printf("\nstep cost, ~100M-parameter Llama (random bf16 weights), context %lld\n",
              static_cast<long long>(context));
  std::printf("%6s %10s %8s\n", "draft", "step ms", "vs k=0");
  const double base = StepSeconds(runner, *w, kv.layers(), context, 0);
  for (int64_t k : {0, 1, 2, 4, 7, 8, 12, 16}) {
    const double s = k == 0 ? base : StepSeconds(runner, *w, kv.layers(), context, k);
    std::printf("%6lld %10.2f %7.2fx\n", static_cast<long long>(k), 1e3 * s, s / base);
    if (json != nullptr) {
      std::fprintf(json, "{\"part\": \"step_cost\", \"draft\": %lld, \"step_ms\": %.3f}\n",
                   static_cast<long long>(k), 1e3 * s);
    }
  }
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv, "speculative_bench: speculative decoding on the CPU engine");
  FILE* json = nullptr;
  if (!absl::GetFlag(FLAGS_json_out).empty()) {
    json = std::fopen(absl::GetFlag(FLAGS_json_out).c_str(), "w");
    CHECK(json != nullptr) << "cannot write " << absl::GetFlag(FLAGS_json_out);
  }
  strata::PartOne(json);
  if (absl::GetFlag(FLAGS_step_cost)) strata::PartTwo(json);
  if (json != nullptr) std::fclose(json);
  return 0;
}
