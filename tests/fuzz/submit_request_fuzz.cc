// A worker's requests from untrusted input, end to end: a SubmitRequest validated as strata-worker
// validates it (ParseSubmitRequest), and each one accepted run to its end on the bundled model's
// engine (CPU): sampling options, penalties, logit biases, stop tokens, structured output,
// log-probabilities, resumed tokens, priorities and tenants.
//
// Input: either "#" and a SubmitRequest in protobuf text format (readable seeds), or bytes that
// build one field by field (FuzzInput: flags choose the fields, each value drawn from a table of
// ordinary and extreme ones, ids from two bytes each, a structured output's text from the rest), so
// that almost every input is a request.
//
// Checks: a refusal is INVALID_ARGUMENT, or NOT_FOUND for a model or fine-tune not served, with a
// message (the engine's own, after ParseSubmitRequest's, INVALID_ARGUMENT); an accepted request
// finishes without an error, with
// at most max_tokens tokens (resumed ones counted), each within the vocabulary and with a
// log-probability that is not NaN; afterwards every KV block is free again. Outputs are capped at
// 12 tokens and KV blocks kept few, so that runs stay short and preemption happens.
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "grammar/structured_output.h"
#include "grammar/vocabulary.h"
#include "proto/strata/v1/worker.pb.h"
#include "tests/fuzz/fuzz_target.h"
#include "tokenizer/tokenizer.h"
#include "worker/comm/collectives.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"
#include "worker/model/weights.h"
#include "worker/server/submit_request.h"

namespace {

constexpr char kModelDir[] = "models/strata-tiny/base";
constexpr int64_t kMaxOutputTokens = 12;

struct World {
  std::unique_ptr<strata::ModelWeights> weights;
  std::unique_ptr<strata::Tokenizer> tokenizer;
  strata::SingleRankCollectives comm;
  std::unique_ptr<strata::Engine> engine;
  strata::GrammarCache grammars{16};
  strata::SubmitLimits limits;
};

// How many inputs were SubmitRequests, and how many of those were accepted and run (said at exit,
// to show how far the inputs reach).
struct Counts {
  int64_t parsed = 0, accepted = 0;
  ~Counts() {
    std::fprintf(stderr, "submit_request_fuzz: %lld requests, %lld accepted and run\n",
                 static_cast<long long>(parsed), static_cast<long long>(accepted));
  }
} counts;

World& TheWorld() {
  static World* const w = [] {
    auto* world = new World;
    auto config = strata::LoadModelConfig(kModelDir);
    FUZZ_CHECK(config.ok(), "%s", config.status().ToString().c_str());
    auto weights = strata::LoadModelWeights(kModelDir, *config, 0, 1);
    FUZZ_CHECK(weights.ok(), "%s", weights.status().ToString().c_str());
    world->weights = *std::move(weights);
    auto tokenizer = strata::Tokenizer::FromModelDir(kModelDir);
    FUZZ_CHECK(tokenizer.ok(), "%s", tokenizer.status().ToString().c_str());
    world->tokenizer = *std::move(tokenizer);
    strata::EngineConfig ec;
    ec.num_kv_blocks = 48;  // 768 tokens: long prompts beside others preempt
    ec.block_tokens = 16;
    ec.max_batch_tokens = 256;
    ec.compute_threads = 1;
    ec.vocabulary = strata::TokenTrieOf(*world->tokenizer);
    auto engine = strata::Engine::Create(world->weights.get(), &world->comm, ec);
    FUZZ_CHECK(engine.ok(), "%s", engine.status().ToString().c_str());
    world->engine = *std::move(engine);
    world->limits.model_name = "strata-tiny";
    world->limits.vocab_size = world->weights->config.vocab_size;
    // As strata-worker sets it: the model's context, or what the cache holds (768 tokens here).
    world->limits.max_context_tokens = world->engine->MaxContextTokens();
    world->limits.grammars = &world->grammars;
    return world;
  }();
  return *w;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Requests with strings that are not UTF-8 are dropped (as gRPC drops them); quietly.
  google::protobuf::SetLogHandler(nullptr);
  TheWorld();
  return 0;
}

bool ParseText(absl::string_view text, strata::v1::SubmitRequest* request) {
  google::protobuf::TextFormat::Parser parser;
  parser.AllowPartialMessage(true);
  // (Text that is not a SubmitRequest is not what this target tests; the parser stays quiet.)
  class Quiet : public google::protobuf::io::ErrorCollector {
    void AddError(int, int, const std::string&) override {}
  } quiet;
  parser.RecordErrorsTo(&quiet);
  return parser.ParseFromString(std::string(text), request);
}

// One of `table`'s first `ordinary` values, or with `wild` any of them (the rest are extreme or
// invalid).
template <typename T, size_t N>
T Pick(strata::fuzz::FuzzInput& in, bool wild, size_t ordinary, const T (&table)[N]) {
  return table[in.Byte() % (wild ? N : ordinary)];
}

// A request built field by field from `in`.
strata::v1::SubmitRequest Build(strata::fuzz::FuzzInput& in, int64_t vocab_size) {
  constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
  constexpr float kInf = std::numeric_limits<float>::infinity();
  strata::v1::SubmitRequest r;
  const uint32_t flags = in.Uint32();
  auto on = [flags](int bit) { return (flags >> bit & 1) != 0; };
  // Half the requests are built of ordinary values only (and are mostly accepted), half may take
  // any value of each table.
  const bool wild = on(31);
  r.set_request_id(wild && on(0) ? "" : wild && on(1) ? std::string(200, 'x') : "r");
  r.set_model(wild && on(2) ? "other" : "strata-tiny");
  if (wild && on(3)) r.set_fine_tune_id("c-headers");
  auto id = [&] {
    const int32_t v = static_cast<int32_t>(in.Byte()) << 8 | in.Byte();
    return wild ? v % static_cast<int32_t>(vocab_size + 8) - 4  // a few outside the vocabulary
                : v % static_cast<int32_t>(vocab_size);
  };
  const int prompt = in.Byte() * (on(4) ? 8 : 1);
  for (int i = 0; i < prompt; ++i) r.add_prompt_token_ids(id());
  if (on(5)) {
    for (int i = in.Byte() % 8; i > 0; --i) r.add_resume_token_ids(id());
  }
  strata::v1::SamplingParams& s = *r.mutable_sampling();
  static constexpr uint32_t kCounts[] = {0, 1, 2, 5, 12, 100, 1023, 1024, 5000, 0xffffffffu};
  s.set_max_tokens(Pick(in, wild, 6, kCounts));
  if (on(6)) s.set_min_tokens(Pick(in, wild, 6, kCounts));
  static constexpr float kTemperatures[] = {0, 1e-30f, 0.1f, 0.7f, 1, 2, 5, -1, kNan, kInf};
  if (on(7)) s.set_temperature(Pick(in, wild, 7, kTemperatures));
  static constexpr uint32_t kTopK[] = {0, 1, 2, 40, 100000, 0xffffffffu};
  if (on(8)) s.set_top_k(Pick(in, wild, 5, kTopK));
  static constexpr float kFractions[] = {0, 1e-6f, 0.05f, 0.5f, 0.9f, 1, 1.5f, -0.1f, kNan, kInf};
  if (on(9)) s.set_top_p(Pick(in, wild, 6, kFractions));
  if (on(10)) s.set_min_p(Pick(in, wild, 6, kFractions));
  static constexpr float kPenalties[] = {0.5f, 1, 1.3f, 2, 0, -1, -2, 3, kNan, kInf};
  if (on(11)) s.set_repetition_penalty(Pick(in, wild, 5, kPenalties));
  if (on(12)) s.set_presence_penalty(Pick(in, wild, 5, kPenalties));
  if (on(13)) s.set_frequency_penalty(Pick(in, wild, 5, kPenalties));
  if (on(14)) s.set_seed(in.Uint32());
  for (int i = on(15) ? in.Byte() % 4 : 0; i > 0; --i) s.add_stop_token_ids(id());
  s.set_ignore_eos(on(16));
  static constexpr uint32_t kLogprobs[] = {0, 1, 5, 20, 21, 1000};
  if (on(17)) s.set_logprobs(Pick(in, wild, 4, kLogprobs));
  if (on(18)) s.set_prompt_logprobs(Pick(in, wild, 4, kLogprobs));
  s.set_skip_special_tokens(on(19));
  static constexpr float kBiases[] = {-100, -1, 0, 1, 100, 101, -101, kNan, kInf, -kInf};
  for (int i = on(20) ? in.Byte() % 4 : 0; i > 0; --i) {
    strata::v1::TokenBias& b = *s.add_logit_bias();
    b.set_token_id(id());
    b.set_bias(Pick(in, wild, 5, kBiases));
  }
  static constexpr int32_t kPriorities[] = {0, -1, 5, -100, 100, 101, -101};
  if (on(21)) r.set_priority(Pick(in, wild, 5, kPriorities));
  if (on(22)) r.set_tenant(wild && on(23) ? std::string(129, 't') : "acme");
  static constexpr double kWeights[] = {
      0, 0.5, 1, 1000, 1001, -1, std::numeric_limits<double>::quiet_NaN()};
  if (on(24)) r.set_tenant_weight(Pick(in, wild, 4, kWeights));
  if (on(25)) r.set_cache_salt("salt");
  if (on(26)) {
    for (int i = in.Byte() % 4; i > 0; --i) r.add_prefix_block_hashes(in.Uint32());
  }
  if (on(27)) {
    strata::v1::StructuredOutput& so = *s.mutable_structured_output();
    const uint8_t kind = in.Byte();
    so.set_compact_json(on(28));
    if (on(29)) so.set_prefix(std::string(in.Take(in.Byte() % 8)));
    const std::string text(in.Rest());
    switch (kind % 5) {
      case 0:
        so.set_json_schema(text);
        break;
      case 1:
        so.set_json_object(true);
        break;
      case 2:
        so.set_regex(text);
        break;
      case 3:
        for (absl::string_view line : absl::StrSplit(text, '\n')) {
          so.mutable_choice()->add_texts(std::string(line));
        }
        break;
      default:
        so.set_grammar(text);
        break;
    }
  }
  return r;
}

STRATA_FUZZ_TARGET(data, size) {
  World& w = TheWorld();
  strata::v1::SubmitRequest request;
  if (size == 0 || data[0] != '#') {
    strata::fuzz::FuzzInput in(data, size);
    request = Build(in, w.limits.vocab_size);
  } else if (!ParseText(absl::string_view(reinterpret_cast<const char*>(data) + 1, size - 1),
                        &request)) {
    return 0;
  }
  // What gRPC would deliver: a string field must be UTF-8 on the wire.
  std::string wire;
  if (!request.SerializeToString(&wire) || !request.ParseFromString(wire)) return 0;
  ++counts.parsed;
  // (To see what a saved input asks: STRATA_FUZZ_VERBOSE=1 NAME_fuzz_test INPUT.)
  static const bool verbose = std::getenv("STRATA_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "request: %s\n", request.ShortDebugString().c_str());
  absl::StatusOr<strata::ParsedSubmit> parsed = strata::ParseSubmitRequest(request, w.limits);
  if (!parsed.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(parsed.status()) || absl::IsNotFound(parsed.status()), "%s",
               parsed.status().ToString().c_str());
    FUZZ_CHECK(!parsed.status().message().empty(), "a refusal without a message");
    return 0;
  }
  ++counts.accepted;
  strata::RequestOptions options = parsed->options;
  const int64_t resumed = static_cast<int64_t>(request.resume_token_ids_size());
  options.max_tokens = std::min<int64_t>(options.max_tokens, resumed + kMaxOutputTokens);
  options.min_tokens = std::min(options.min_tokens, options.max_tokens);
  const absl::Status added =
      w.engine->AddRequest(parsed->request_id, std::move(parsed->prompt), options);
  if (!added.ok()) {
    // What only the engine checks (resume tokens against a structured output), refused as the
    // worker passes it on.
    FUZZ_CHECK(absl::IsInvalidArgument(added), "the engine refused a request with %s",
               added.ToString().c_str());
    return 0;
  }
  int64_t tokens = 0;
  int steps = 0;
  while (w.engine->HasWork()) {
    FUZZ_CHECK(++steps < 10000, "the request does not finish");
    absl::StatusOr<std::vector<strata::RequestOutput>> outputs = w.engine->Step();
    if (verbose && outputs.ok()) {
      for (const strata::RequestOutput& o : *outputs) {
        std::fprintf(stderr, "step %d: %zu tokens, finish %d\n", steps, o.tokens.size(),
                     static_cast<int>(o.finish));
      }
    }
    FUZZ_CHECK(outputs.ok(), "a step failed: %s", outputs.status().ToString().c_str());
    for (const strata::RequestOutput& o : *outputs) {
      FUZZ_CHECK(o.finish != strata::FinishReason::kError, "the request failed: %s",
                 o.error.ToString().c_str());
      for (const strata::SampledToken& t : o.tokens) {
        FUZZ_CHECK(t.token >= 0 && t.token < w.limits.vocab_size, "token %d", t.token);
        FUZZ_CHECK(!std::isnan(t.logprob), "a NaN log-probability");
        ++tokens;
      }
    }
  }
  FUZZ_CHECK(resumed + tokens <= options.max_tokens, "%lld tokens past max_tokens %lld",
             static_cast<long long>(resumed + tokens), static_cast<long long>(options.max_tokens));
  const strata::EngineStats stats = w.engine->Stats(/*with_tenants=*/false);
  FUZZ_CHECK(stats.num_free_blocks == stats.num_total_blocks, "%lld of %lld KV blocks left taken",
             static_cast<long long>(stats.num_total_blocks - stats.num_free_blocks),
             static_cast<long long>(stats.num_total_blocks));
  return 0;
}
