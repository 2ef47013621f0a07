#include "cli/offline.h"

#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/json.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "tokenizer/stop_matcher.h"
#include "tokenizer/tokenizer.h"
#include "worker/comm/collectives.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"
#include "worker/model/delta.h"
#include "worker/model/lora.h"
#include "worker/model/model_runner.h"
#include "worker/model/weights.h"

namespace strata {
namespace {

struct LoadedModel {
  ModelConfig config;
  std::unique_ptr<ModelWeights> weights;
  std::unique_ptr<Tokenizer> tokenizer;  // null when the directory has no tokenizer.json
  int threads = 0;                       // --threads: the runner's compute threads (0: all cores)
};

absl::StatusOr<LoadedModel> Load(const Args& args, bool need_weights, bool need_tokenizer) {
  ASSIGN_OR_RETURN(std::string dir, args.GetRequired("model"));
  ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  if (threads < 0 || threads > 1024) {
    return absl::InvalidArgumentError("--threads must be 0 (all cores) to 1024");
  }
  LoadedModel m;
  m.threads = static_cast<int>(threads);
  if (need_weights) {
    ASSIGN_OR_RETURN(m.config, LoadModelConfig(dir));
    ASSIGN_OR_RETURN(m.weights, LoadModelWeights(dir, m.config, 0, 1));
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromModelDir(dir);
  if (t.ok()) {
    m.tokenizer = std::move(*t);
  } else if (need_tokenizer || t.status().code() != absl::StatusCode::kNotFound) {
    return t.status();
  }
  return m;
}

const char* FinishName(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kStopToken:
      return "stop_token";
    case FinishReason::kContextLength:
      return "context_length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kGrammarEnd:
      return "grammar_end";
    case FinishReason::kError:
      return "error";
    case FinishReason::kNone:
      break;
  }
  return "none";
}

// The text of one token for display (invalid UTF-8 replaced), as inside a text (a SentencePiece
// word keeps its leading space), as the coordinator gives it in logprobs.
std::string Utf8LossyToken(const Tokenizer& tok, int32_t id) {
  return Utf8Lossy(tok.TokenBytes(id, /*first=*/false, /*skip_special_tokens=*/false));
}

std::string LogprobJson(const SampledToken& t, const Tokenizer* tok) {
  std::vector<std::string> top;
  for (const auto& [id, lp] : t.top) {
    top.push_back(absl::StrFormat("{\"token_id\":%d,\"logprob\":%.6g}", id, lp));
  }
  std::string text;
  if (tok != nullptr) text = absl::StrCat(",\"text\":", JsonQuote(Utf8LossyToken(*tok, t.token)));
  return absl::StrFormat("{\"token_id\":%d,\"logprob\":%.6g,\"rank\":%d%s,\"top\":[%s]}", t.token,
                         t.logprob, t.rank, text, absl::StrJoin(top, ","));
}

}  // namespace

absl::Status RunCommand(const Args& args, std::FILE* out) {
  const bool json = args.Has("json");
  std::optional<std::string> text = args.Get("prompt");
  ASSIGN_OR_RETURN(std::vector<int32_t> prompt_ids, args.GetIntList("prompt-ids"));
  if (text.has_value() == !prompt_ids.empty()) {
    return absl::InvalidArgumentError("give exactly one of --prompt and --prompt-ids");
  }
  ASSIGN_OR_RETURN(LoadedModel m,
                   Load(args, /*need_weights=*/true, /*need_tokenizer=*/text.has_value()));
  if (text) {
    ASSIGN_OR_RETURN(prompt_ids, m.tokenizer->Encode(*text, /*add_special_tokens=*/true));
    if (prompt_ids.empty()) return absl::InvalidArgumentError("--prompt encodes to no tokens");
  }
  RequestOptions o;
  ASSIGN_OR_RETURN(o.max_tokens, args.GetInt("max-tokens", 16));
  ASSIGN_OR_RETURN(double temperature, args.GetDouble("temperature", 1.0));
  ASSIGN_OR_RETURN(double top_p, args.GetDouble("top-p", 1.0));
  ASSIGN_OR_RETURN(int64_t top_k, args.GetInt("top-k", 0));
  ASSIGN_OR_RETURN(double min_p, args.GetDouble("min-p", 0.0));
  ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 0));
  ASSIGN_OR_RETURN(int64_t logprobs, args.GetInt("logprobs", -1));
  ASSIGN_OR_RETURN(int64_t prompt_logprobs, args.GetInt("prompt-logprobs", -1));
  o.sampling.temperature = static_cast<float>(temperature);
  o.sampling.top_p = static_cast<float>(top_p);
  o.sampling.top_k = static_cast<int32_t>(top_k);
  o.sampling.min_p = static_cast<float>(min_p);
  o.sampling.seed = static_cast<uint64_t>(seed);
  o.sampling.logprobs = static_cast<int32_t>(logprobs);
  o.prompt_logprobs = static_cast<int32_t>(prompt_logprobs);
  o.ignore_eos = args.Has("ignore-eos");
  const std::vector<std::string> stops = args.GetAll("stop");
  if (!stops.empty() && m.tokenizer == nullptr) {
    return absl::InvalidArgumentError("--stop needs a tokenizer.json in the model directory");
  }

  SingleRankCollectives comm;
  EngineConfig ec;
  ec.model_name = m.config.architecture_name;
  ec.compute_threads = m.threads;
  if (std::optional<std::string> delta = args.Get("delta")) {
    // The fine-tune in this delta file (or LoRA adapter directory), served over the base as a
    // worker serves it.
    ec.fine_tunes = {{"local", *delta}};
    o.fine_tune_id = "local";
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Create(m.weights.get(), &comm, ec));
  RETURN_IF_ERROR(engine->AddRequest("run", prompt_ids, o));

  std::vector<int32_t> generated;
  std::vector<SampledToken> token_lps, prompt_lps;
  std::string generated_text;
  std::unique_ptr<IncrementalDecoder> decoder;
  if (m.tokenizer) {
    decoder = std::make_unique<IncrementalDecoder>(m.tokenizer.get(), true, prompt_ids);
  }
  StopMatcher stop(stops);
  RequestOutput final_out;
  const auto start = std::chrono::steady_clock::now();
  double first_token_ms = 0;
  while (engine->HasWork()) {
    if (engine->WaitingForIo()) absl::SleepFor(absl::Milliseconds(1));  // the delta is loading
    ASSIGN_OR_RETURN(std::vector<RequestOutput> step, engine->Step());
    for (RequestOutput& r : step) {
      if (r.finish == FinishReason::kError) return r.error;
      if (!r.prompt_logprobs.empty()) prompt_lps = std::move(r.prompt_logprobs);
      for (SampledToken& t : r.tokens) {
        if (generated.empty()) {
          first_token_ms =
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                  .count();
        }
        generated.push_back(t.token);
        std::string delta;
        if (decoder) delta = stop.Add(decoder->Add(t.token));
        if (!json) {
          if (decoder) {
            std::fputs(delta.c_str(), out);
          } else {
            std::fprintf(out, "%s%d", generated.size() > 1 ? " " : "", t.token);
          }
          std::fflush(out);
        }
        generated_text += delta;
        token_lps.push_back(std::move(t));
        if (stop.stopped()) {
          engine->Cancel("run");
          break;
        }
      }
      if (r.finish != FinishReason::kNone) final_out = r;
    }
  }
  if (decoder && !stop.stopped()) {
    const std::string rest = stop.Add(decoder->Flush()) + stop.Flush();
    generated_text += rest;
    if (!json) std::fputs(rest.c_str(), out);
  }
  const std::string finish = stop.stopped() ? "stop_string" : FinishName(final_out.finish);
  const double total_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (!json) {
    std::fputs("\n", out);
    return absl::OkStatus();
  }
  std::vector<std::string> lp, plp;
  if (o.sampling.logprobs >= 0) {
    for (const SampledToken& t : token_lps) lp.push_back(LogprobJson(t, m.tokenizer.get()));
  }
  for (const SampledToken& t : prompt_lps) plp.push_back(LogprobJson(t, m.tokenizer.get()));
  std::fprintf(
      out,
      "{\"prompt_token_ids\":[%s],\"token_ids\":[%s],\"text\":%s,\"finish_reason\":\"%s\","
      "\"matched_stop\":%s,\"usage\":{\"prompt_tokens\":%zu,\"completion_tokens\":%zu,"
      "\"cached_prompt_tokens\":%lld,\"time_to_first_token_ms\":%.3f,\"total_time_ms\":%.3f},"
      "\"logprobs\":[%s],\"prompt_logprobs\":[%s]}\n",
      absl::StrJoin(prompt_ids, ",").c_str(), absl::StrJoin(generated, ",").c_str(),
      JsonQuote(generated_text).c_str(), finish.c_str(), JsonQuote(stop.matched()).c_str(),
      prompt_ids.size(), generated.size(),
      static_cast<long long>(final_out.num_cached_prompt_tokens), first_token_ms, total_ms,
      absl::StrJoin(lp, ",").c_str(), absl::StrJoin(plp, ",").c_str());
  return absl::OkStatus();
}

absl::Status TokenizeCommand(const Args& args, std::FILE* out) {
  std::optional<std::string> text = args.Get("text");
  std::optional<std::string> file = args.Get("file");
  if (text.has_value() == file.has_value()) {
    return absl::InvalidArgumentError("give exactly one of --text and --file");
  }
  if (file) {
    ASSIGN_OR_RETURN(text, ReadFileToString(*file));
  }
  ASSIGN_OR_RETURN(LoadedModel m, Load(args, /*need_weights=*/false, /*need_tokenizer=*/true));
  ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                   m.tokenizer->Encode(*text, args.Has("add-special-tokens")));
  if (args.Has("json")) {
    std::vector<std::string> texts;
    for (int32_t id : ids) texts.push_back(JsonQuote(m.tokenizer->TokenString(id)));
    std::fprintf(out, "{\"token_ids\":[%s],\"tokens\":[%s]}\n", absl::StrJoin(ids, ",").c_str(),
                 absl::StrJoin(texts, ",").c_str());
  } else {
    std::fprintf(out, "%s\n", absl::StrJoin(ids, " ").c_str());
  }
  return absl::OkStatus();
}

absl::Status EvalPplCommand(const Args& args, std::FILE* out) {
  ASSIGN_OR_RETURN(std::string path, args.GetRequired("text"));
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  ASSIGN_OR_RETURN(LoadedModel m, Load(args, /*need_weights=*/true, /*need_tokenizer=*/true));
  ASSIGN_OR_RETURN(
      int64_t context,
      args.GetInt("context", std::min<int64_t>(1024, m.config.max_position_embeddings)));
  if (context < 2 || context > m.config.max_position_embeddings) {
    return absl::InvalidArgumentError(
        absl::StrCat("--context must be in [2, ", m.config.max_position_embeddings, "]"));
  }
  ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                   m.tokenizer->Encode(text, /*add_special_tokens=*/true));
  if (ids.size() < 2)
    return absl::InvalidArgumentError(absl::StrCat(path, " has fewer than 2 tokens"));

  std::unique_ptr<DeltaWeights> delta;
  if (std::optional<std::string> delta_path = args.Get("delta")) {
    ASSIGN_OR_RETURN(delta,
                     LoadFineTune(*delta_path, *m.weights, BaseFingerprint(*m.weights->files)));
  }
  const DeltaWeights* seq_deltas[] = {delta.get()};
  SingleRankCollectives comm;
  ModelRunner runner(m.weights.get(), &comm, m.threads);
  const ModelConfig& c = m.config;
  const int64_t bt = 16, chunk = 128, V = c.vocab_size;
  const int64_t nb = (context + bt - 1) / bt;
  KvCacheStorage kv(*m.weights, nb, bt);
  const KvCacheLayers& cache = kv.layers();
  std::vector<int32_t> table(nb);
  for (int64_t b = 0; b < nb; ++b) table[b] = static_cast<int32_t>(b);
  std::vector<float> logits(chunk * V);
  double nll = 0;
  int64_t count = 0, windows = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t w0 = 0; w0 + 1 < static_cast<int64_t>(ids.size()); w0 += context) {
    const int64_t wlen = std::min<int64_t>(context, static_cast<int64_t>(ids.size()) - w0);
    ++windows;
    for (int64_t c0 = 0; c0 < wlen; c0 += chunk) {
      const int64_t n = std::min(chunk, wlen - c0);
      std::vector<int32_t> tokens(ids.begin() + w0 + c0, ids.begin() + w0 + c0 + n);
      std::vector<int32_t> pos(n), seq(n, 0), logit_rows(n);
      std::vector<int64_t> slots(n);
      for (int64_t i = 0; i < n; ++i) {
        pos[i] = static_cast<int32_t>(c0 + i);
        slots[i] = c0 + i;
        logit_rows[i] = static_cast<int32_t>(i);
      }
      ForwardBatch batch{tokens, pos, seq, slots, table, 1, nb, logit_rows, seq_deltas};
      RETURN_IF_ERROR(runner.Forward(batch, cache, absl::MakeSpan(logits.data(), n * V)));
      for (int64_t i = 0; i < n; ++i) {
        const int64_t target = c0 + i + 1;
        if (target >= wlen) break;
        const float* row = logits.data() + i * V;
        double mx = row[0];
        for (int64_t v = 1; v < V; ++v) mx = std::max<double>(mx, row[v]);
        double z = 0;
        for (int64_t v = 0; v < V; ++v) z += std::exp(row[v] - mx);
        nll += -(row[ids[w0 + target]] - mx - std::log(z));
        ++count;
      }
    }
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double ppl = std::exp(nll / static_cast<double>(count));
  if (args.Has("json")) {
    std::fprintf(out,
                 "{\"perplexity\":%.6f,\"mean_nll\":%.6f,\"tokens\":%lld,\"windows\":%lld,"
                 "\"context\":%lld,\"seconds\":%.3f}\n",
                 ppl, nll / count, static_cast<long long>(count), static_cast<long long>(windows),
                 static_cast<long long>(context), secs);
  } else {
    std::fprintf(out, "perplexity %.4f over %lld predicted tokens (%lld windows of up to %lld)\n",
                 ppl, static_cast<long long>(count), static_cast<long long>(windows),
                 static_cast<long long>(context));
  }
  return absl::OkStatus();
}

}  // namespace strata
