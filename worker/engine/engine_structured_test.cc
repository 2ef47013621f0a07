// Structured output in the engine, on the bundled strata-tiny model and its tokenizer: whatever the
// seed, the text generated under a JSON schema, a regular expression or a choice list follows it
// (complete when the generation ends on its own, a valid prefix when max_tokens cuts it), the
// grammar's end finishes a generation, a resumed sequence replays the grammar, and requests the
// engine cannot constrain are refused.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/json.h"
#include "grammar/json_schema.h"
#include "grammar/regex_grammar.h"
#include "grammar/vocabulary.h"
#include "gtest/gtest.h"
#include "tokenizer/tokenizer.h"
#include "worker/comm/shm_collectives.h"
#include "worker/engine/engine.h"
#include "worker/engine/tiny_model_testutil.h"
#include "worker/model/config.h"

namespace strata {
namespace {

class EngineStructuredTest : public ::testing::Test {
 protected:
  void SetUp() override {
    TinyModel tiny;
    ASSERT_NO_FATAL_FAILURE(LoadTinyModel(&tiny));
    weights_ = std::move(tiny.weights);
    tokenizer_ = std::move(tiny.tokenizer);
    vocabulary_ = TokenTrieOf(*tokenizer_);
  }

  std::unique_ptr<Engine> MakeEngine(bool with_vocabulary = true, int warm_walks = -1) {
    EngineConfig ec;
    ec.num_kv_blocks = 512;
    ec.compute_threads = 2;
    ec.grammar_warm_walks = warm_walks;
    if (with_vocabulary) ec.vocabulary = vocabulary_;
    auto e = Engine::Create(weights_.get(), &comm_, ec);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }

  std::vector<int32_t> Prompt(absl::string_view text) { return EncodePrompt(*tokenizer_, text); }

  struct Result {
    std::vector<int32_t> tokens;
    FinishReason finish = FinishReason::kNone;
  };
  std::map<std::string, Result> RunAll(Engine& e) {
    std::map<std::string, Result> out;
    for (int steps = 0; e.HasWork() && steps < 10000; ++steps) {
      auto step = e.Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) break;
      for (const RequestOutput& o : *step) {
        EXPECT_EQ(o.finish == FinishReason::kError, false) << o.error;
        for (const SampledToken& t : o.tokens) out[o.request_id].tokens.push_back(t.token);
        if (o.finish != FinishReason::kNone) out[o.request_id].finish = o.finish;
      }
    }
    EXPECT_FALSE(e.HasWork());
    return out;
  }

  // The text of `tokens` as the grammar saw it (an ending EOS contributes nothing).
  std::string Text(const std::vector<int32_t>& tokens) {
    std::string text;
    for (int32_t t : tokens) text += vocabulary_->bytes(t);
    return text;
  }

  SingleRankCollectives comm_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::shared_ptr<const TokenTrie> vocabulary_;
};

TEST_F(EngineStructuredTest, SampledJsonFollowsTheSchemaWhateverTheSeed) {
  auto grammar = JsonSchemaGrammar(R"({"type": "object", "properties": {
      "name": {"type": "string", "maxLength": 12},
      "kind": {"enum": ["module", "function", "class"]},
      "lines": {"type": "integer"},
      "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
      "required": ["name", "kind"]})",
                                   "schema");
  ASSERT_TRUE(grammar.ok()) << grammar.status();
  auto engine = MakeEngine();
  constexpr int kRequests = 12;
  for (int i = 0; i < kRequests; ++i) {
    RequestOptions o;
    o.max_tokens = 160;
    o.sampling.temperature = i == 0 ? 0.0f : 1.0f;
    o.sampling.seed = 1000 + i;
    o.grammar = *grammar;
    ASSERT_TRUE(engine->AddRequest(absl::StrCat("r", i), Prompt("import json\n\nDATA = "), o).ok());
  }
  const auto results = RunAll(*engine);
  ASSERT_EQ(results.size(), static_cast<size_t>(kRequests));
  int complete = 0;
  for (const auto& [id, r] : results) {
    const std::string text = Text(r.tokens);
    GrammarMatcher m(*grammar);
    ASSERT_TRUE(m.Advance(text)) << id << ": " << text;
    if (r.finish == FinishReason::kLength) continue;
    // Ended on its own: by the grammar's end (an object closes with nothing allowed after it).
    EXPECT_EQ(r.finish, FinishReason::kGrammarEnd) << id << ": " << text;
    EXPECT_TRUE(m.IsComplete()) << id << ": " << text;
    ++complete;
    // It is JSON, and the decoded text is the grammar's text.
    auto decoded = tokenizer_->Decode(r.tokens, /*skip_special_tokens=*/true);
    ASSERT_TRUE(decoded.ok());
    EXPECT_EQ(*decoded, text);
    auto doc = JsonDocument::Parse(text, id);
    ASSERT_TRUE(doc.ok()) << doc.status();
    auto name = doc->root().StringField("name");
    ASSERT_TRUE(name.ok()) << text;
    auto kind = doc->root().StringField("kind");
    ASSERT_TRUE(kind.ok()) << text;
    EXPECT_TRUE(*kind == "module" || *kind == "function" || *kind == "class") << text;
  }
  EXPECT_GE(complete, kRequests / 2);
  // Every token was sampled under the grammar; its masks were mostly kept results.
  const EngineStats st = engine->Stats();
  int64_t tokens = 0;
  for (const auto& [id, r] : results) tokens += static_cast<int64_t>(r.tokens.size());
  EXPECT_EQ(st.num_structured_tokens, tokens);
  EXPECT_GT(st.grammar_mask_seconds, 0);
  EXPECT_GT(st.grammar_masks.hits, st.grammar_masks.misses);
  EXPECT_GT(st.grammar_masks.bytes, 0);
}

TEST_F(EngineStructuredTest, ChoicesAndPatternsEndWithTheGrammar) {
  auto engine = MakeEngine();
  GrammarBuilder b;
  const int32_t root = b.NewRule("choice");
  const std::vector<std::string> choices = {"import os", "def main():", "class Parser:"};
  for (const std::string& c : choices) b.AddAlternative(root, b.Literal(c));
  auto choice = std::move(b).Build(root);
  ASSERT_TRUE(choice.ok());
  auto pattern = RegexGrammar(R"([a-z]+(_[a-z]+){1,2}\(\))");
  ASSERT_TRUE(pattern.ok());
  for (int i = 0; i < 6; ++i) {
    RequestOptions o;
    o.max_tokens = 64;
    o.sampling.temperature = i == 0 ? 0.0f : 0.8f;
    o.sampling.seed = i;
    o.grammar = i % 2 == 0 ? *choice : *pattern;
    // min_tokens past the grammar's end: the grammar's end still finishes it.
    o.min_tokens = i == 2 ? 40 : 0;
    ASSERT_TRUE(
        engine->AddRequest(absl::StrCat("r", i), Prompt("#!/usr/bin/env python3\n"), o).ok());
  }
  const auto results = RunAll(*engine);
  for (const auto& [id, r] : results) {
    const std::string text = Text(r.tokens);
    const bool is_choice = (id.back() - '0') % 2 == 0;
    if (is_choice) {
      EXPECT_NE(std::find(choices.begin(), choices.end(), text), choices.end())
          << id << ": " << text;
      EXPECT_EQ(r.finish, FinishReason::kGrammarEnd) << id;
    } else if (r.finish != FinishReason::kLength) {
      EXPECT_TRUE(GrammarAccepts(*pattern, text)) << id << ": " << text;
      EXPECT_TRUE(r.finish == FinishReason::kGrammarEnd || r.finish == FinishReason::kEos) << id;
    }
  }
}

TEST_F(EngineStructuredTest, AResumedSequenceReplaysTheGrammar) {
  auto grammar = AnyJsonGrammar(/*object_only=*/true);
  ASSERT_TRUE(grammar.ok());
  RequestOptions o;
  o.max_tokens = 48;
  o.sampling.temperature = 1.0f;
  o.sampling.seed = 77;
  o.grammar = *grammar;
  const std::vector<int32_t> prompt = Prompt("config = ");
  auto first = MakeEngine();
  ASSERT_TRUE(first->AddRequest("a", prompt, o).ok());
  const Result whole = RunAll(*first)["a"];
  ASSERT_GT(whole.tokens.size(), 6u);
  // Failover after 5 tokens: the rest is the same.
  auto second = MakeEngine();
  RequestOptions resumed = o;
  resumed.resume_tokens.assign(whole.tokens.begin(), whole.tokens.begin() + 5);
  ASSERT_TRUE(second->AddRequest("a", prompt, resumed).ok());
  const Result rest = RunAll(*second)["a"];
  EXPECT_EQ(rest.tokens, std::vector<int32_t>(whole.tokens.begin() + 5, whole.tokens.end()));
  EXPECT_EQ(rest.finish, whole.finish);
  // Resume tokens the grammar does not allow are refused, naming them.
  RequestOptions bad = o;
  bad.resume_tokens = Prompt("x");
  bad.resume_tokens.erase(bad.resume_tokens.begin());  // the BOS
  absl::Status s = second->AddRequest("b", prompt, bad);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("resume_tokens"), std::string::npos) << s;
}

// Masks worked out ahead on the warming thread (racing the steps) are the same masks: every token
// is what an engine without warming draws.
TEST_F(EngineStructuredTest, WarmingMasksAheadChangesNoToken) {
  auto grammar = JsonSchemaGrammar(
      R"({"type": "object", "properties": {"id": {"type": "integer", "minimum": 1},
          "name": {"type": "string", "maxLength": 10}}, "required": ["id", "name"]})",
      "schema");
  ASSERT_TRUE(grammar.ok());
  auto run = [&](int warm_walks) {
    auto engine = MakeEngine(true, warm_walks);
    for (int i = 0; i < 4; ++i) {
      RequestOptions o;
      o.max_tokens = 80;
      o.sampling.temperature = 1.0f;
      o.sampling.seed = 500 + i;
      o.grammar = *grammar;
      EXPECT_TRUE(engine->AddRequest(absl::StrCat("r", i), Prompt("row = "), o).ok());
    }
    std::map<std::string, std::vector<int32_t>> tokens;
    for (const auto& [id, r] : RunAll(*engine)) tokens[id] = r.tokens;
    return tokens;
  };
  const auto plain = run(0);
  EXPECT_EQ(run(8), plain);
  EXPECT_EQ(plain.size(), 4u);
}

TEST_F(EngineStructuredTest, WithoutAVocabularyGrammarsAreRefused) {
  auto engine = MakeEngine(/*with_vocabulary=*/false);
  RequestOptions o;
  o.grammar = *AnyJsonGrammar(true);
  absl::Status s = engine->AddRequest("a", Prompt("x"), o);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  // And the engine goes on serving others.
  RequestOptions plain;
  plain.max_tokens = 3;
  ASSERT_TRUE(engine->AddRequest("b", Prompt("x"), plain).ok());
  EXPECT_EQ(RunAll(*engine)["b"].tokens.size(), 3u);
}

}  // namespace
}  // namespace strata
