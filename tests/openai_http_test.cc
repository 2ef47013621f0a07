// End-to-end: the OpenAI-compatible HTTP API of a real coordinator (--http_listen) over a real
// worker on the bundled model. Completions, streamed or not, carry the tokens the gRPC API gives
// for the same request; errors come as OpenAI error objects with the right HTTP status naming the
// field; a client that goes away mid-stream frees its sequence on the worker.
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/json.h"
#include "coordinator/openai_gateway.h"
#include "coordinator/tool_calls.h"
#include "gtest/gtest.h"
#include "tests/cluster_client.h"
#include "tests/http_client.h"
#include "tests/local_cluster.h"
#include "tests/process.h"
#include "tokenizer/llama2_style.h"

namespace strata {
namespace {

class OpenAiHttpTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    port_ = FreePort();
    LocalClusterOptions o;
    o.num_workers = 1;
    o.name = "openai";
    // The bundled model has no chat template: ChatML for the chat completions.
    o.coordinator_flags = {absl::StrCat("--http_listen=127.0.0.1:", port_), "--chat_format=chatml"};
    auto c = LocalCluster::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = c->release();
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }

  // The body parsed; fails the test when it is not JSON.
  static JsonDocument Json(const std::string& body) {
    absl::StatusOr<JsonDocument> d = JsonDocument::Parse(body, "response");
    EXPECT_TRUE(d.ok()) << d.status() << "\n" << body;
    if (!d.ok()) return *JsonDocument::Parse("{}", "empty");
    return std::move(*d);
  }

  static std::string Str(const JsonValue& v, absl::string_view key) {
    absl::StatusOr<absl::string_view> s = v.StringField(key);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::string(*s) : "";
  }

  // choices[0] of a completion; a failure (and an empty object) when there is none.
  // The response's "choices" (a failure, and none, when it has no such array).
  static std::vector<JsonValue> Choices(const JsonDocument& d) {
    const absl::StatusOr<JsonValue> choices = d.root().Field("choices");
    absl::StatusOr<std::vector<JsonValue>> list =
        choices.ok() ? choices->AsArray() : choices.status();
    if (!list.ok()) {
      ADD_FAILURE() << "no \"choices\" array in the response: " << list.status();
      return {};
    }
    return *std::move(list);
  }

  static JsonValue Choice(const JsonDocument& d) {
    static const JsonDocument* const kEmpty = new JsonDocument(*JsonDocument::Parse("{}", "none"));
    const std::vector<JsonValue> list = Choices(d);
    if (list.empty()) {
      ADD_FAILURE() << "no choices in the response";
      return kEmpty->root();
    }
    return list[0];
  }

  // A second coordinator over the cluster's workers, its HTTP API on the returned port, serving
  // the bundled model with `chat_template` (and the bundled tokenizer) from a directory `name`.
  static int StartTemplatedCoordinator(const std::string& name, const std::string& chat_template) {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const std::string dir = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/", name);
    mkdir(dir.c_str(), 0755);
    {
      std::ifstream in(absl::StrCat(kTinyModelDir, "/tokenizer.json"));
      std::ofstream(dir + "/tokenizer.json") << in.rdbuf();
    }
    std::ofstream(dir + "/tokenizer_config.json")
        << R"({"add_bos_token": true, "bos_token": "<|bos|>", "eos_token": "<|endoftext|>", )"
        << R"("chat_template": )" << JsonQuote(chat_template) << "}";
    const int port = FreePort();
    auto address = cluster_->StartExtraCoordinator({absl::StrCat("--model=", kTinyModel, "=", dir),
                                                    absl::StrCat("--http_listen=127.0.0.1:", port)},
                                                   name + "-coordinator");
    EXPECT_TRUE(address.ok()) << address.status();
    if (!address.ok()) return 0;
    auto admin =
        v1::Admin::NewStub(grpc::CreateChannel(*address, grpc::InsecureChannelCredentials()));
    EXPECT_TRUE(cluster_->WaitForServingWorkers(admin.get(), 1, absl::Seconds(30)).ok());
    return port;
  }

  // The prompt's tokens as Generate takes a text prompt (BOS first), through gRPC.
  static v1::TokenizeResponse PromptTokens(const std::string& text) {
    v1::TokenizeRequest tr;
    tr.set_model(kTinyModel);
    tr.set_text(text);
    tr.set_add_special_tokens(true);
    v1::TokenizeResponse out;
    grpc::ClientContext ctx;
    const grpc::Status s = cluster_->serving()->Tokenize(&ctx, tr, &out);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return out;
  }

  static inline LocalCluster* cluster_ = nullptr;
  static inline int port_ = 0;
};

constexpr char kPrompt[] = "The quick brown fox jumps over the lazy dog, and then";

// The same request through the gRPC API: its text.
std::string GrpcText(LocalCluster* cluster, int max_tokens, uint64_t seed, float temperature,
                     const std::string& prompt = kPrompt) {
  v1::GenerateRequest r = TextRequest(prompt, max_tokens, seed);
  r.mutable_sampling()->set_temperature(temperature);
  r.mutable_sampling()->set_skip_special_tokens(true);
  const Generated g = Generate(cluster->serving(), r);
  EXPECT_TRUE(g.status.ok()) << g.status.error_message();
  return g.text;
}

// kPrompt's log-probabilities (top 1) through the gRPC API, as a prompt_logprobs request gives
// them (every token's but the first).
void ScorePrompt(LocalCluster* cluster,
                 google::protobuf::RepeatedPtrField<v1::PositionLogprobs>* out) {
  v1::GenerateRequest g = TextRequest(kPrompt, 1, 5);
  g.mutable_sampling()->set_prompt_logprobs(1);
  const Generated scored = Generate(cluster->serving(), g);
  ASSERT_TRUE(scored.status.ok()) << scored.status.error_message();
  ASSERT_FALSE(scored.chunks.empty());
  *out = scored.chunks[0].prompt_logprobs();
}

std::string CompletionBody(int max_tokens, uint64_t seed, const std::string& extra = "") {
  return absl::StrCat(R"({"model": "strata-tiny", "prompt": ")", kPrompt, R"(", "max_tokens": )",
                      max_tokens, R"(, "seed": )", seed,
                      R"(, "temperature": 0.8, "ignore_eos": true)", extra, "}");
}

TEST_F(OpenAiHttpTest, ModelsListsTheServedModel) {
  const HttpReply r = Http(port_, "GET", "/v1/models");
  ASSERT_EQ(r.status, 200) << r.head << r.body;
  EXPECT_NE(r.head.find("Content-Type: application/json"), std::string::npos);
  const JsonDocument d = Json(r.body);
  EXPECT_EQ(Str(d.root(), "object"), "list");
  const std::vector<JsonValue> data = *d.root().Field("data")->AsArray();
  ASSERT_EQ(data.size(), 1u);
  EXPECT_EQ(Str(data[0], "id"), kTinyModel);
  EXPECT_EQ(*data[0].IntField("max_model_len"), 2048);
  EXPECT_EQ(Http(port_, "GET", "/health").status, 200);
  // GET /v1/models/{model} (the OpenAI client's models.retrieve): that model's entry alone.
  const HttpReply one = Http(port_, "GET", absl::StrCat("/v1/models/", kTinyModel));
  ASSERT_EQ(one.status, 200) << one.body;
  const JsonDocument m = Json(one.body);
  EXPECT_EQ(Str(m.root(), "id"), kTinyModel);
  EXPECT_EQ(Str(m.root(), "object"), "model");
  const HttpReply missing = Http(port_, "GET", "/v1/models/no%2Fsuch-model");
  EXPECT_EQ(missing.status, 404) << missing.body;
  EXPECT_NE(missing.body.find("`no/such-model` does not exist"), std::string::npos) << missing.body;
  EXPECT_EQ(Http(port_, "GET", "/v1/models/").status, 404);
  EXPECT_EQ(Http(port_, "POST", absl::StrCat("/v1/models/", kTinyModel)).status, 405);
}

TEST_F(OpenAiHttpTest, ACompletionIsWhatTheGrpcApiGenerates) {
  const std::string want = GrpcText(cluster_, 12, 7, 0.8f);
  ASSERT_FALSE(want.empty());
  const HttpReply r = Http(port_, "POST", "/v1/completions", CompletionBody(12, 7));
  ASSERT_EQ(r.status, 200) << r.body;
  const JsonDocument d = Json(r.body);
  EXPECT_EQ(Str(d.root(), "object"), "text_completion");
  EXPECT_EQ(Str(d.root(), "model"), kTinyModel);
  EXPECT_EQ(Str(d.root(), "id").rfind("cmpl-", 0), 0u);
  const JsonValue choice = Choice(d);
  EXPECT_EQ(Str(choice, "text"), want);
  EXPECT_EQ(Str(choice, "finish_reason"), "length");
  EXPECT_TRUE(choice.Field("logprobs")->IsNull());
  const JsonValue usage = *d.root().Field("usage");
  EXPECT_EQ(*usage.IntField("completion_tokens"), 12);
  EXPECT_GT(*usage.IntField("prompt_tokens"), 5);
  EXPECT_EQ(*usage.IntField("total_tokens"),
            *usage.IntField("prompt_tokens") + *usage.IntField("completion_tokens"));
}

TEST_F(OpenAiHttpTest, AStreamCarriesTheSameTextThenDone) {
  const std::string want = GrpcText(cluster_, 16, 11, 0.8f);
  const HttpReply r = Http(port_, "POST", "/v1/completions",
                           CompletionBody(16, 11,
                                          R"(, "stream": true, "stream_options": )"
                                          R"({"include_usage": true})"));
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_NE(r.head.find("Content-Type: text/event-stream"), std::string::npos);
  const std::vector<std::string> events = SseData(r.body);
  ASSERT_GE(events.size(), 3u) << r.body;
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text, finish;
  int64_t completion_tokens = -1;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const JsonDocument d = Json(events[i]);
    const std::vector<JsonValue> choices = Choices(d);
    if (choices.empty()) {  // the usage event, last
      EXPECT_EQ(i + 2, events.size());
      completion_tokens = *d.root().Field("usage")->IntField("completion_tokens");
      continue;
    }
    text += Str(choices[0], "text");
    if (!choices[0].Field("finish_reason")->IsNull()) finish = Str(choices[0], "finish_reason");
  }
  EXPECT_EQ(text, want);
  EXPECT_EQ(finish, "length");
  EXPECT_EQ(completion_tokens, 16);
}

// "n": several choices, each a generation of its own: choice i is what the gRPC API gives with seed
// seed + i, answered together (index i) or streamed interleaved, each choice's events adding up to
// its text; usage counts the prompt once and every choice's tokens.
TEST_F(OpenAiHttpTest, SeveralChoicesAreSeveralSeededGenerations) {
  std::vector<std::string> want;
  for (uint64_t i = 0; i < 3; ++i) want.push_back(GrpcText(cluster_, 12, 7 + i, 0.8f));
  ASSERT_NE(want[0], want[1]);
  const HttpReply r = Http(port_, "POST", "/v1/completions", CompletionBody(12, 7, R"(, "n": 3)"));
  ASSERT_EQ(r.status, 200) << r.body;
  const JsonDocument d = Json(r.body);
  const std::vector<JsonValue> choices = Choices(d);
  ASSERT_EQ(choices.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(*choices[i].IntField("index"), i);
    EXPECT_EQ(Str(choices[i], "text"), want[i]) << "choice " << i;
    EXPECT_EQ(Str(choices[i], "finish_reason"), "length");
  }
  const JsonValue usage = *d.root().Field("usage");
  EXPECT_EQ(*usage.IntField("completion_tokens"), 36);
  EXPECT_EQ(*usage.IntField("total_tokens"), *usage.IntField("prompt_tokens") + 36);

  const HttpReply s = Http(port_, "POST", "/v1/completions",
                           CompletionBody(12, 7,
                                          R"(, "n": 3, "stream": true, "stream_options": )"
                                          R"({"include_usage": true})"));
  ASSERT_EQ(s.status, 200) << s.body;
  const std::vector<std::string> events = SseData(s.body);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back(), "[DONE]");
  std::vector<std::string> texts(3);
  std::vector<int> finished(3, 0);
  int64_t completion_tokens = -1;
  std::string id;
  for (size_t e = 0; e + 1 < events.size(); ++e) {
    const JsonDocument ev = Json(events[e]);
    if (id.empty()) id = Str(ev.root(), "id");
    EXPECT_EQ(Str(ev.root(), "id"), id) << "one id for every choice's events";
    const std::vector<JsonValue> cs = Choices(ev);
    if (cs.empty()) {
      completion_tokens = *ev.root().Field("usage")->IntField("completion_tokens");
      continue;
    }
    ASSERT_EQ(cs.size(), 1u);
    const int64_t i = *cs[0].IntField("index");
    ASSERT_TRUE(i >= 0 && i < 3) << events[e];
    texts[i] += Str(cs[0], "text");
    if (!cs[0].Field("finish_reason")->IsNull()) ++finished[i];
  }
  EXPECT_EQ(texts, want);
  EXPECT_EQ(finished, std::vector<int>({1, 1, 1}));
  EXPECT_EQ(completion_tokens, 36);
}

// /tokenize and /detokenize in vLLM's shape: the gRPC API's tokens, and back to the text.
TEST_F(OpenAiHttpTest, TokenizeAndDetokenizeRoundTrip) {
  const v1::TokenizeResponse want = PromptTokens(kPrompt);
  auto tokenize = [](const char* more) {
    return Http(
        port_, "POST", "/tokenize",
        absl::StrCat(R"({"model": "strata-tiny", "prompt": ")", kPrompt, R"(", )", more, "}"));
  };
  const HttpReply t = tokenize(R"("return_token_strs": true)");
  ASSERT_EQ(t.status, 200) << t.body;
  const JsonDocument d = Json(t.body);
  const std::vector<JsonValue> tokens = *d.root().Field("tokens")->AsArray();
  ASSERT_EQ(static_cast<int>(tokens.size()), want.token_ids_size());
  for (int i = 0; i < want.token_ids_size(); ++i) EXPECT_EQ(*tokens[i].AsInt(), want.token_ids(i));
  EXPECT_EQ(*d.root().IntField("count"), want.token_ids_size());
  EXPECT_EQ(*d.root().IntField("max_model_len"), 2048);
  EXPECT_EQ(d.root().Field("token_strs")->AsArray()->size(), tokens.size());

  const HttpReply plain = tokenize(R"("add_special_tokens": false)");
  ASSERT_EQ(plain.status, 200) << plain.body;
  const JsonDocument p = Json(plain.body);
  const std::vector<JsonValue> plain_tokens = *p.root().Field("tokens")->AsArray();
  std::string ids;
  for (const JsonValue& v : plain_tokens) absl::StrAppend(&ids, ids.empty() ? "" : ",", *v.AsInt());
  const HttpReply back = Http(port_, "POST", "/detokenize",
                              absl::StrCat(R"({"model": "strata-tiny", "tokens": [)", ids, "]}"));
  ASSERT_EQ(back.status, 200) << back.body;
  EXPECT_EQ(Str(Json(back.body).root(), "prompt"), kPrompt);

  const HttpReply no_prompt = Http(port_, "POST", "/tokenize", R"({"model": "strata-tiny"})");
  EXPECT_EQ(no_prompt.status, 400);
  EXPECT_NE(no_prompt.body.find("prompt"), std::string::npos) << no_prompt.body;
  const HttpReply bad_id =
      Http(port_, "POST", "/detokenize", R"({"model": "strata-tiny", "tokens": [99999999]})");
  EXPECT_EQ(bad_id.status, 400) << bad_id.body;
  EXPECT_EQ(Http(port_, "GET", "/tokenize").status, 405);
}

// logit_bias: +100 on one token makes it every token generated (sampled on the worker's host).
TEST_F(OpenAiHttpTest, LogitBiasForcesAToken) {
  const v1::TokenizeResponse the = PromptTokens(" the");
  ASSERT_GT(the.token_ids_size(), 0);
  const int32_t id = the.token_ids(the.token_ids_size() - 1);
  const HttpReply r = Http(
      port_, "POST", "/v1/completions",
      CompletionBody(4, 9, absl::StrCat(R"(, "logprobs": 0, "logit_bias": {")", id, R"(": 100})")));
  ASSERT_EQ(r.status, 200) << r.body;
  const JsonDocument d = Json(r.body);
  const std::vector<JsonValue> tokens = *Choice(d).Field("logprobs")->Field("tokens")->AsArray();
  ASSERT_EQ(tokens.size(), 4u);
  const std::string first = std::string(*tokens[0].AsString());
  for (const JsonValue& t : tokens) EXPECT_EQ(*t.AsString(), first);
  EXPECT_EQ(Str(Choice(d), "text"), first + first + first + first);
  // A token outside the vocabulary is the coordinator's to refuse, naming the field.
  const HttpReply bad = Http(port_, "POST", "/v1/completions",
                             CompletionBody(4, 9, R"(, "logit_bias": {"99999999": 5})"));
  EXPECT_EQ(bad.status, 400) << bad.body;
  EXPECT_NE(bad.body.find("logit_bias"), std::string::npos) << bad.body;
}

// Several prompts in one request: n choices each, prompt p's at p * n + i, each what the gRPC API
// gives for its prompt with seed + i; usage counts every prompt.
TEST_F(OpenAiHttpTest, SeveralPromptsGetTheirChoicesInOrder) {
  const std::vector<std::string> prompts = {kPrompt, "Once upon a time"};
  const HttpReply r =
      Http(port_, "POST", "/v1/completions",
           absl::StrCat(R"({"model": "strata-tiny", "prompt": [")", prompts[0], R"(", ")",
                        prompts[1], R"("], "n": 2, "max_tokens": 5, "seed": 3,)",
                        R"( "temperature": 0.8, "ignore_eos": true})"));
  ASSERT_EQ(r.status, 200) << r.body;
  const JsonDocument d = Json(r.body);
  const std::vector<JsonValue> choices = Choices(d);
  ASSERT_EQ(choices.size(), 4u);
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(*choices[k].IntField("index"), k);
    EXPECT_EQ(Str(choices[k], "text"), GrpcText(cluster_, 5, 3 + k % 2, 0.8f, prompts[k / 2]))
        << "choice " << k;
  }
  const JsonValue usage = *d.root().Field("usage");
  EXPECT_EQ(*usage.IntField("completion_tokens"), 20);
  EXPECT_EQ(*usage.IntField("prompt_tokens"),
            PromptTokens(prompts[0]).token_ids_size() + PromptTokens(prompts[1]).token_ids_size());
}

// echo: the prompt's text before the completion's; with max_tokens 0 and logprobs (how evaluation
// harnesses score a text), only the prompt, every token of it with its log-probability as the gRPC
// API's prompt_logprobs give it (the first null), and no completion tokens.
TEST_F(OpenAiHttpTest, EchoPutsThePromptFirstAndScoresIt) {
  const std::string want = GrpcText(cluster_, 6, 5, 0.8f);
  const HttpReply r =
      Http(port_, "POST", "/v1/completions", CompletionBody(6, 5, R"(, "echo": true)"));
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(Str(Choice(Json(r.body)), "text"), std::string(kPrompt) + want);

  // The prompt's tokens and their log-probabilities through gRPC.
  const v1::TokenizeResponse tokens = PromptTokens(kPrompt);
  google::protobuf::RepeatedPtrField<v1::PositionLogprobs> prompt_lp;
  ASSERT_NO_FATAL_FAILURE(ScorePrompt(cluster_, &prompt_lp));
  ASSERT_EQ(prompt_lp.size() + 1, tokens.token_ids_size());

  const HttpReply s = Http(port_, "POST", "/v1/completions",
                           CompletionBody(0, 5, R"(, "echo": true, "logprobs": 1)"));
  ASSERT_EQ(s.status, 200) << s.body;
  const JsonDocument d = Json(s.body);
  const JsonValue choice = Choice(d);
  EXPECT_EQ(Str(choice, "text"), kPrompt);
  EXPECT_EQ(Str(choice, "finish_reason"), "length");
  EXPECT_EQ(*d.root().Field("usage")->IntField("completion_tokens"), 0);
  const JsonValue lp = *choice.Field("logprobs");
  const std::vector<JsonValue> values = *lp.Field("token_logprobs")->AsArray();
  const std::vector<JsonValue> offsets = *lp.Field("text_offset")->AsArray();
  const std::vector<JsonValue> top = *lp.Field("top_logprobs")->AsArray();
  ASSERT_EQ(static_cast<int>(values.size()), tokens.token_ids_size());
  ASSERT_EQ(offsets.size(), values.size());
  EXPECT_TRUE(values[0].IsNull());
  EXPECT_TRUE(top[0].IsNull());
  for (size_t i = 1; i < values.size(); ++i) {
    EXPECT_NEAR(*values[i].AsDouble(), prompt_lp[static_cast<int>(i) - 1].token().logprob(), 1e-5)
        << "prompt token " << i;
    EXPECT_GE(*offsets[i].AsInt(), *offsets[i - 1].AsInt());
    EXPECT_LT(*offsets[i].AsInt(), static_cast<int64_t>(std::string(kPrompt).size()));
  }

  // Token ids (as evaluation harnesses send them): one entry per id, the first null.
  std::string ids;
  for (int i = 0; i < tokens.token_ids_size(); ++i) {
    absl::StrAppend(&ids, i == 0 ? "" : ",", tokens.token_ids(i));
  }
  const HttpReply t = Http(port_, "POST", "/v1/completions",
                           absl::StrCat(R"({"model": "strata-tiny", "prompt": [)", ids,
                                        R"(], "max_tokens": 0, "echo": true, "logprobs": 0})"));
  ASSERT_EQ(t.status, 200) << t.body;
  const JsonDocument td = Json(t.body);
  const JsonValue by_ids = *Choice(td).Field("logprobs");
  const std::vector<JsonValue> id_values = *by_ids.Field("token_logprobs")->AsArray();
  ASSERT_EQ(static_cast<int>(id_values.size()), tokens.token_ids_size()) << t.body;
  EXPECT_TRUE(id_values[0].IsNull());
  EXPECT_NEAR(*id_values.back().AsDouble(), prompt_lp[prompt_lp.size() - 1].token().logprob(),
              1e-5);

  // Streamed: the prompt in the first event.
  const HttpReply e = Http(port_, "POST", "/v1/completions",
                           CompletionBody(3, 5, R"(, "echo": true, "stream": true)"));
  ASSERT_EQ(e.status, 200) << e.body;
  const std::vector<std::string> events = SseData(e.body);
  ASSERT_GE(events.size(), 2u);
  std::string text;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const JsonDocument ev = Json(events[i]);
    const std::string piece = Str(Choice(ev), "text");
    if (i == 0) {
      EXPECT_EQ(piece, kPrompt);
    }
    text += piece;
  }
  EXPECT_EQ(text, std::string(kPrompt) + GrpcText(cluster_, 3, 5, 0.8f));
}

// echo + logprobs with n = 3: only the first choice asks the worker for the prompt's
// log-probabilities (the others reuse its cached prompt); every choice still reports all of them,
// whole and streamed, and each its own completion.
TEST_F(OpenAiHttpTest, EchoScoresEveryChoiceFromTheFirstChoicesPrefill) {
  const v1::TokenizeResponse tokens = PromptTokens(kPrompt);
  google::protobuf::RepeatedPtrField<v1::PositionLogprobs> prompt_lp;
  ASSERT_NO_FATAL_FAILURE(ScorePrompt(cluster_, &prompt_lp));
  ASSERT_EQ(prompt_lp.size() + 1, tokens.token_ids_size());
  const int prompt_len = tokens.token_ids_size();
  // The prompt's entries of a choice's token_logprobs: null, then the gRPC API's.
  auto expect_prompt_scores = [&](const JsonValue& logprobs, const std::string& where) {
    const std::vector<JsonValue> values = *logprobs.Field("token_logprobs")->AsArray();
    ASSERT_GE(static_cast<int>(values.size()), prompt_len) << where;
    EXPECT_TRUE(values[0].IsNull()) << where;
    for (int i = 1; i < prompt_len; ++i) {
      ASSERT_TRUE(values[i].AsDouble().ok()) << where << " prompt token " << i;
      EXPECT_NEAR(*values[i].AsDouble(), prompt_lp[i - 1].token().logprob(), 1e-5)
          << where << " prompt token " << i;
    }
  };

  const HttpReply r = Http(port_, "POST", "/v1/completions",
                           CompletionBody(4, 5, R"(, "echo": true, "logprobs": 1, "n": 3)"));
  ASSERT_EQ(r.status, 200) << r.body;
  const JsonDocument d = Json(r.body);
  const std::vector<JsonValue> choices = Choices(d);
  ASSERT_EQ(choices.size(), 3u);
  for (int k = 0; k < 3; ++k) {
    const std::string where = absl::StrCat("choice ", k);
    EXPECT_EQ(Str(choices[k], "text"), std::string(kPrompt) + GrpcText(cluster_, 4, 5 + k, 0.8f))
        << where;
    const JsonValue lp = *choices[k].Field("logprobs");
    expect_prompt_scores(lp, where);
    // The prompt's tokens, then the completion's 4.
    EXPECT_EQ(static_cast<int>(lp.Field("token_logprobs")->AsArray()->size()), prompt_len + 4)
        << where;
  }

  const HttpReply s =
      Http(port_, "POST", "/v1/completions",
           CompletionBody(4, 5, R"(, "echo": true, "logprobs": 1, "n": 3, "stream": true)"));
  ASSERT_EQ(s.status, 200) << s.body;
  std::vector<bool> echoed(3, false);
  for (const std::string& event : SseData(s.body)) {
    if (event == "[DONE]") continue;
    const JsonDocument ev = Json(event);
    const JsonValue choice = Choice(ev);
    const int64_t k = *choice.IntField("index");
    ASSERT_TRUE(k >= 0 && k < 3) << event;
    if (echoed[k]) continue;
    // Each choice's first event: the prompt with all its scores.
    echoed[k] = true;
    EXPECT_EQ(Str(choice, "text"), kPrompt) << "choice " << k;
    expect_prompt_scores(*choice.Field("logprobs"), absl::StrCat("streamed choice ", k));
  }
  EXPECT_EQ(echoed, std::vector<bool>(3, true));
}

// A Llama-2-style (SentencePiece, Metaspace) tokenizer.json over strata-tiny's 2048 ids, in a
// directory of its own: "The cat sat" is <s> ▁The ▁cat ▁sat; the ids the three words and their
// letters do not take are filler words, so every id the model draws has a text.
std::string WriteSentencePieceTokenizer() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/sentencepiece_tokenizer");
  mkdir(dir.c_str(), 0755);
  std::vector<std::string> vocab = {"\"<unk>\": 0"};
  int id = 1;
  for (int b = 0; b < 256; ++b) vocab.push_back(absl::StrFormat("\"<0x%02X>\": %d", b, id++));
  const std::vector<std::string> pieces = {"▁",  "T",  "h",    "e",  "c",  "a",    "t",  "s",
                                           "▁T", "he", "▁The", "at", "▁c", "▁cat", "▁s", "▁sat"};
  for (const std::string& p : pieces) vocab.push_back(absl::StrCat("\"", p, "\": ", id++));
  for (; id < 2046; ++id) vocab.push_back(absl::StrCat("\"w", id, "\": ", id));
  vocab.push_back("\"</s>\": 2046");
  vocab.push_back("\"<s>\": 2047");
  const std::string json = Llama2StyleTokenizerJson(
      absl::StrJoin(vocab, ", "), R"("▁ T", "h e", "▁T he", "a t", "▁ c", "▁c at", "▁ s", "▁s at")",
      0, 2047, 2046);
  std::ofstream(dir + "/tokenizer.json") << json;
  return dir;
}

// A SentencePiece tokenizer writes the first word's dummy-prefix space into its token's text
// (" The" for a prompt "The ..."), which the echoed prompt does not have: the prompt's text
// offsets count from the echoed text (each token after the first where the text has it), and the
// completion's start at the prompt's length. A coordinator of its own with such a tokenizer, over
// the same worker (which sees token ids only).
TEST_F(OpenAiHttpTest, SentencePieceCompletionsContinueThePromptsText) {
  const int port = FreePort();
  auto address = cluster_->StartExtraCoordinator(
      {absl::StrCat("--model=", kTinyModel, "=", WriteSentencePieceTokenizer()),
       absl::StrCat("--http_listen=127.0.0.1:", port)},
      "sentencepiece-coordinator");
  ASSERT_TRUE(address.ok()) << address.status();
  auto admin =
      v1::Admin::NewStub(grpc::CreateChannel(*address, grpc::InsecureChannelCredentials()));
  ASSERT_TRUE(cluster_->WaitForServingWorkers(admin.get(), 1, absl::Seconds(30)).ok());

  const std::string prompt = "The cat sat";
  std::vector<std::string> want_tokens = {"<s>", " The", " cat", " sat"};
  std::vector<int64_t> want_offsets = {0, 0, 3, 7};
  std::string want_text = prompt;
  // `first_word`: the token whose text carries the dummy prefix; each one after it is in the
  // text where its offset says.
  size_t first_word = 1;
  auto check = [&](const JsonValue& choice, int completion_tokens, const std::string& where) {
    SCOPED_TRACE(where);
    const std::string text = Str(choice, "text");
    EXPECT_TRUE(absl::StartsWith(text, want_text)) << text;
    const JsonValue lp = *choice.Field("logprobs");
    const std::vector<JsonValue> tokens = *lp.Field("tokens")->AsArray();
    const std::vector<JsonValue> offsets = *lp.Field("text_offset")->AsArray();
    ASSERT_EQ(tokens.size(), want_tokens.size() + completion_tokens);
    ASSERT_EQ(offsets.size(), tokens.size());
    for (size_t i = 0; i < want_tokens.size(); ++i) {
      if (i > 0) {  // the first is the BOS's text, empty where the echo skips it
        EXPECT_EQ(*tokens[i].AsString(), want_tokens[i]) << "token " << i;
      }
      EXPECT_EQ(*offsets[i].AsInt(), want_offsets[i]) << "token " << i;
    }
    for (size_t i = first_word + 1; i < want_tokens.size(); ++i) {
      EXPECT_EQ(text.substr(*offsets[i].AsInt(), want_tokens[i].size()), want_tokens[i]);
    }
    if (completion_tokens > 0) {
      EXPECT_EQ(*offsets[want_tokens.size()].AsInt(), static_cast<int64_t>(want_text.size()));
    }
  };
  for (int max_tokens : {0, 2}) {
    const std::string body =
        absl::StrCat(R"({"model": "strata-tiny", "prompt": ")", prompt, R"(", "max_tokens": )",
                     max_tokens, R"(, "echo": true, "logprobs": 1, "ignore_eos": true})");
    const HttpReply r = Http(port, "POST", "/v1/completions", body);
    ASSERT_EQ(r.status, 200) << r.body;
    check(Choice(Json(r.body)), max_tokens, absl::StrCat("max_tokens ", max_tokens));
  }
  // The same prompt as token ids (<s> ▁The ▁cat ▁sat): the first token's text is the BOS's
  // (skipped in the echo), the same offsets.
  {
    const HttpReply r = Http(port, "POST", "/v1/completions",
                             R"({"model": "strata-tiny", "prompt": [2047, 267, 270, 272], )"
                             R"("max_tokens": 0, "echo": true, "logprobs": 1})");
    ASSERT_EQ(r.status, 200) << r.body;
    check(Choice(Json(r.body)), 0, "token ids");
  }
  // A prompt that starts with a space: <s> ▁ ▁The ▁cat ▁sat, the lone ▁ carrying the prefix.
  {
    want_text = " The cat sat";
    want_tokens = {"<s>", " ", " The", " cat", " sat"};
    want_offsets = {0, 0, 0, 4, 8};
    first_word = 1;
    const HttpReply r = Http(port, "POST", "/v1/completions",
                             R"({"model": "strata-tiny", "prompt": " The cat sat", )"
                             R"("max_tokens": 0, "echo": true, "logprobs": 1})");
    ASSERT_EQ(r.status, 200) << r.body;
    check(Choice(Json(r.body)), 0, "leading space");
    want_text = prompt;
    want_tokens = {"<s>", " The", " cat", " sat"};
    want_offsets = {0, 0, 3, 7};
  }
  // Streamed: the first event carries the prompt and its scores, offsets as above.
  const HttpReply s =
      Http(port, "POST", "/v1/completions",
           absl::StrCat(R"({"model": "strata-tiny", "prompt": ")", prompt,
                        R"(", "max_tokens": 2, "echo": true, "logprobs": 1, "stream": true})"));
  ASSERT_EQ(s.status, 200) << s.body;
  const std::vector<std::string> events = SseData(s.body);
  ASSERT_FALSE(events.empty());
  check(Choice(Json(events[0])), 0, "streamed");

  // A completion continues its prompt: its first word keeps the space that decoding prompt and
  // completion at once gives it (" sat", id 272, forced by logit_bias), echoed or not, and its
  // offset is the prompt's length.
  for (const bool echo : {false, true}) {
    SCOPED_TRACE(echo ? "echo" : "no echo");
    const HttpReply c =
        Http(port, "POST", "/v1/completions",
             absl::StrCat(R"({"model": "strata-tiny", "prompt": "The cat", "max_tokens": 1, )",
                          R"("logit_bias": {"272": 100}, "logprobs": 1, "echo": )",
                          echo ? "true" : "false", "}"));
    ASSERT_EQ(c.status, 200) << c.body;
    const JsonValue choice = Choice(Json(c.body));
    EXPECT_EQ(Str(choice, "text"), echo ? "The cat sat" : " sat");
    const JsonValue lp = *choice.Field("logprobs");
    const std::vector<JsonValue> tokens = *lp.Field("tokens")->AsArray();
    const std::vector<JsonValue> offsets = *lp.Field("text_offset")->AsArray();
    ASSERT_EQ(tokens.size(), echo ? 4u : 1u);
    ASSERT_EQ(offsets.size(), tokens.size());
    EXPECT_EQ(*tokens.back().AsString(), " sat");
    EXPECT_EQ(*offsets.back().AsInt(), echo ? 7 : 0);
  }
}

// Chat completions: the conversation written out in the model's chat format, then the same
// generation as the gRPC API gives for that text; streamed, the deltas add up to it.
TEST_F(OpenAiHttpTest, AChatCompletionIsTheRenderedConversationsCompletion) {
  const std::vector<ChatMessage> messages = {{"system", "You write Python."},
                                             {"user", "A function that parses a config file"}};
  v1::GenerateRequest r = TextRequest(RenderChat(ChatFormat::kChatml, messages), 10, 5);
  r.mutable_sampling()->set_temperature(0.8f);
  r.mutable_sampling()->set_skip_special_tokens(true);
  const Generated want = Generate(cluster_->serving(), r);
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  const std::string body =
      R"({"model": "strata-tiny", "messages": [{"role": "system", "content": "You write Python."},)"
      R"( {"role": "user", "content": "A function that parses a config file"}],)"
      R"( "max_tokens": 10, "seed": 5, "temperature": 0.8, "ignore_eos": true)";
  const HttpReply plain = Http(port_, "POST", "/v1/chat/completions", body + "}");
  ASSERT_EQ(plain.status, 200) << plain.body;
  const JsonDocument d = Json(plain.body);
  EXPECT_EQ(Str(d.root(), "object"), "chat.completion");
  EXPECT_EQ(Str(d.root(), "id").rfind("chatcmpl-", 0), 0u);
  const JsonValue message = *Choice(d).Field("message");
  EXPECT_EQ(Str(message, "role"), "assistant");
  EXPECT_EQ(Str(message, "content"), want.text);
  EXPECT_EQ(Str(Choice(d), "finish_reason"), "length");
  EXPECT_EQ(*d.root().Field("usage")->IntField("completion_tokens"), 10);

  const HttpReply streamed =
      Http(port_, "POST", "/v1/chat/completions", body + R"(, "stream": true})");
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  const std::vector<std::string> events = SseData(streamed.body);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const JsonDocument e = Json(events[i]);
    EXPECT_EQ(Str(e.root(), "object"), "chat.completion.chunk");
    const JsonValue delta = *Choice(e).Field("delta");
    if (i == 0) {
      EXPECT_EQ(Str(delta, "role"), "assistant");
    }
    text += Str(delta, "content");
  }
  EXPECT_EQ(text, want.text);

  // Log-probabilities in the chat API's shape: one entry per token, with its alternatives.
  const HttpReply lp = Http(port_, "POST", "/v1/chat/completions",
                            body + R"(, "logprobs": true, "top_logprobs": 2})");
  ASSERT_EQ(lp.status, 200) << lp.body;
  const JsonDocument l = Json(lp.body);
  const std::vector<JsonValue> entries = *Choice(l).Field("logprobs")->Field("content")->AsArray();
  ASSERT_EQ(entries.size(), 10u);
  std::string joined;
  for (const JsonValue& e : entries) {
    absl::StrAppend(&joined, Str(e, "token"));
    EXPECT_LE(*e.Field("logprob")->AsDouble(), 0);
    EXPECT_EQ(e.Field("top_logprobs")->AsArray()->size(), 2u);
    EXPECT_EQ(static_cast<size_t>(e.Field("bytes")->AsArray()->size()), Str(e, "token").size());
  }
  EXPECT_EQ(joined, want.text);

  // n = 2: choice 0 is the same text, choice 1 seed 6's; streamed, each choice's first delta names
  // the role.
  const HttpReply two = Http(port_, "POST", "/v1/chat/completions", body + R"(, "n": 2})");
  ASSERT_EQ(two.status, 200) << two.body;
  const JsonDocument t = Json(two.body);
  const std::vector<JsonValue> choices = Choices(t);
  ASSERT_EQ(choices.size(), 2u);
  EXPECT_EQ(Str(*choices[0].Field("message"), "content"), want.text);
  r.mutable_sampling()->set_seed(6);
  const Generated second = Generate(cluster_->serving(), r);
  EXPECT_EQ(Str(*choices[1].Field("message"), "content"), second.text);
  const HttpReply two_streamed =
      Http(port_, "POST", "/v1/chat/completions", body + R"(, "n": 2, "stream": true})");
  ASSERT_EQ(two_streamed.status, 200) << two_streamed.body;
  std::vector<std::string> texts(2);
  std::vector<int> roles(2, 0), deltas(2, 0);
  for (const std::string& event : SseData(two_streamed.body)) {
    if (event == "[DONE]") continue;
    const JsonDocument e = Json(event);
    const JsonValue c = Choice(e);
    const int64_t i = *c.IntField("index");
    ASSERT_TRUE(i == 0 || i == 1) << event;
    const JsonValue delta = *c.Field("delta");
    if (delta.FindField("role").has_value()) {
      EXPECT_EQ(deltas[i], 0) << "the role comes in choice " << i << "'s first delta";
      ++roles[i];
    }
    ++deltas[i];
    texts[i] += Str(delta, "content");
  }
  EXPECT_EQ(roles, std::vector<int>({1, 1}));
  EXPECT_EQ(texts, std::vector<std::string>({want.text, second.text}));

  // No max_tokens: the turn runs until the model ends it or the context (2,048 tokens) is full.
  const HttpReply open = Http(
      port_, "POST", "/v1/chat/completions",
      R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "Hi"}], "seed": 1})");
  ASSERT_EQ(open.status, 200) << open.body;
  const JsonDocument o = Json(open.body);
  const int64_t n = *o.root().Field("usage")->IntField("completion_tokens");
  const std::string finish = Str(Choice(o), "finish_reason");
  EXPECT_TRUE(
      (finish == "stop" && n >= 1) ||
      (finish == "length" && n + *o.root().Field("usage")->IntField("prompt_tokens") == 2048))
      << open.body.substr(0, 300);
}

// A model whose tokenizer_config.json carries a Jinja chat template (an [INST]-style one that
// folds the system message into the last user turn, writes the BOS and refuses turns that do not
// alternate): a coordinator of its own in auto mode runs it. The answer is the completion of the
// text the template renders, the template's BOS cut (the tokenizer adds one); a conversation the
// template refuses is a 400 naming "messages", and the server goes on.
TEST_F(OpenAiHttpTest, AModelsOwnJinjaChatTemplateRendersTheConversation) {
  const std::string chat_template =
      "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
      "{%- set rest = messages[1:] %}{%- else %}{%- set rest = messages %}{%- endif %}"
      "{{- bos_token }}{%- for m in rest %}"
      "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
      "{{- raise_exception('Conversation roles must alternate user/assistant') }}{%- endif %}"
      "{%- if m['role'] == 'user' %}{{- '[INST] ' }}{%- if loop.last and sys is defined %}"
      "{{- sys ~ '\\n\\n' }}{%- endif %}{{- m['content'] | trim ~ ' [/INST]' }}"
      "{%- else %}{{- ' ' ~ m['content'] ~ eos_token }}{%- endif %}{%- endfor %}";
  const int port = StartTemplatedCoordinator("templated_model", chat_template);
  ASSERT_NE(port, 0);

  // What the template renders for these messages, written out by hand.
  const std::string want_prompt =
      "[INST] Hi there [/INST] Hello!<|endoftext|>[INST] Be brief.\n\nName a colour. [/INST]";
  v1::GenerateRequest r = TextRequest(want_prompt, 8, 3);
  r.mutable_sampling()->set_temperature(0.8f);
  r.mutable_sampling()->set_skip_special_tokens(true);
  const Generated want = Generate(cluster_->serving(), r);
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  const std::string body =
      R"({"model": "strata-tiny", "messages": [{"role": "system", "content": "Be brief."},)"
      R"( {"role": "user", "content": "  Hi there "}, {"role": "assistant", "content": "Hello!"},)"
      R"( {"role": "user", "content": "Name a colour."}],)"
      R"( "max_tokens": 8, "seed": 3, "temperature": 0.8, "ignore_eos": true, "logprobs": true})";
  const HttpReply ok = Http(port, "POST", "/v1/chat/completions", body);
  ASSERT_EQ(ok.status, 200) << ok.body;
  const JsonDocument d = Json(ok.body);
  EXPECT_EQ(Str(*Choice(d).Field("message"), "content"), want.text);
  // The prompt's tokens are the rendered text's, one BOS first.
  EXPECT_EQ(*d.root().Field("usage")->IntField("prompt_tokens"),
            PromptTokens(want_prompt).token_ids_size());

  const HttpReply refused =
      Http(port, "POST", "/v1/chat/completions",
           R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "a"},)"
           R"( {"role": "user", "content": "b"}], "max_tokens": 2})");
  EXPECT_EQ(refused.status, 400) << refused.body;
  const JsonDocument e = Json(refused.body);
  EXPECT_EQ(Str(*e.root().Field("error"), "param"), "messages");
  EXPECT_TRUE(absl::StrContains(Str(*e.root().Field("error"), "message"),
                                "Conversation roles must alternate"))
      << refused.body;
  const HttpReply again = Http(port, "POST", "/v1/chat/completions", body);
  EXPECT_EQ(again.status, 200) << again.body;
}

// continue_final_message: the answer goes on from the final assistant message's text (a prefill).
TEST_F(OpenAiHttpTest, AChatCanContinueTheFinalMessage) {
  const std::string prompt =
      "<|im_start|>user\nWrite a parser<|im_end|>\n<|im_start|>assistant\ndef parse(";
  v1::GenerateRequest g = TextRequest(prompt, 8, 5);
  g.mutable_sampling()->set_temperature(0.8f);
  g.mutable_sampling()->set_ignore_eos(true);
  g.mutable_sampling()->set_skip_special_tokens(true);
  const Generated want = Generate(cluster_->serving(), g);
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  const HttpReply r =
      Http(port_, "POST", "/v1/chat/completions",
           R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "Write a parser"},)"
           R"( {"role": "assistant", "content": "def parse("}], "continue_final_message": true,)"
           R"( "max_tokens": 8, "seed": 5, "temperature": 0.8, "ignore_eos": true})");
  ASSERT_EQ(r.status, 200) << r.body;
  const JsonDocument d = Json(r.body);
  EXPECT_EQ(Str(*Choice(d).Field("message"), "content"), want.text);
  EXPECT_EQ(*d.root().Field("usage")->IntField("prompt_tokens"),
            PromptTokens(prompt).token_ids_size());
}

// A model that thinks (its template opens <think> and knows </think>): the reasoning comes back as
// reasoning_content, apart from the answer, whole or streamed, and not at all when not asked for.
TEST_F(OpenAiHttpTest, ReasoningComesApartFromTheAnswer) {
  const int port = StartTemplatedCoordinator(
      "thinking_model",
      "{# The reasoning ends with </think>. #}{% for m in messages %}<|im_start|>{{ m.role }}\n"
      "{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n<think>\n");
  ASSERT_NE(port, 0);
  const std::string prompt = "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n<think>";
  v1::GenerateRequest g = TextRequest(prompt, 10, 7);
  g.mutable_sampling()->set_temperature(0.8f);
  g.mutable_sampling()->set_ignore_eos(true);
  g.mutable_sampling()->set_skip_special_tokens(false);  // as the gateway asks, for the markers
  const Generated want = Generate(cluster_->serving(), g);
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  ReasoningSplitter splitter(ReasoningFormat::kThink, ReasoningStartOf(prompt, ""));
  ReasoningSplitter::Output expected = splitter.Add(want.text);
  const ReasoningSplitter::Output rest = splitter.Finish();
  expected.reasoning += rest.reasoning;
  expected.content += rest.content;
  ASSERT_FALSE(expected.reasoning.empty()) << want.text;
  const std::string body =
      R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "Why?"}],)"
      R"( "max_tokens": 10, "seed": 7, "temperature": 0.8, "ignore_eos": true)";
  {
    const HttpReply r = Http(port, "POST", "/v1/chat/completions", body + "}");
    ASSERT_EQ(r.status, 200) << r.body;
    const JsonDocument d = Json(r.body);
    const JsonValue message = *Choice(d).Field("message");
    EXPECT_EQ(Str(message, "reasoning_content"), expected.reasoning);
    EXPECT_EQ(Str(message, "content"), expected.content);
    EXPECT_EQ(*d.root().Field("usage")->IntField("prompt_tokens"),
              PromptTokens(prompt).token_ids_size());
  }
  {
    const HttpReply r = Http(port, "POST", "/v1/chat/completions", body + R"(, "stream": true})");
    ASSERT_EQ(r.status, 200) << r.body;
    const std::vector<std::string> events = SseData(r.body);
    ASSERT_GE(events.size(), 2u) << r.body;
    std::string reasoning, content;
    for (size_t i = 0; i + 1 < events.size(); ++i) {
      const JsonDocument d = Json(events[i]);
      const JsonValue delta = *Choice(d).Field("delta");
      if (std::optional<JsonValue> v = delta.FindField("reasoning_content")) {
        reasoning += std::string(*v->AsString());
      }
      if (std::optional<JsonValue> v = delta.FindField("content")) {
        content += std::string(*v->AsString());
      }
    }
    EXPECT_EQ(reasoning, expected.reasoning);
    EXPECT_EQ(content, expected.content);
  }
  const HttpReply r =
      Http(port, "POST", "/v1/chat/completions", body + R"(, "include_reasoning": false})");
  ASSERT_EQ(r.status, 200) << r.body;
  const JsonDocument d = Json(r.body);
  const JsonValue message = *Choice(d).Field("message");
  EXPECT_FALSE(message.FindField("reasoning_content").has_value()) << r.body;
  EXPECT_EQ(Str(message, "content"), expected.content);

  // A structured answer closes the reasoning the template opened (the grammar would not let the
  // model close it): all of the output is the answer.
  const HttpReply structured =
      Http(port, "POST", "/v1/chat/completions",
           R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "Why?"}],)"
           R"( "max_tokens": 30, "seed": 7, "response_format": {"type": "json_object"}})");
  ASSERT_EQ(structured.status, 200) << structured.body;
  const JsonDocument sd = Json(structured.body);
  const JsonValue answer = *Choice(sd).Field("message");
  EXPECT_FALSE(answer.FindField("reasoning_content").has_value()) << structured.body;
  const std::string json = Str(answer, "content");
  ASSERT_NE(json.find_first_not_of(" \t\n\r"), std::string::npos) << structured.body;
  EXPECT_EQ(json[json.find_first_not_of(" \t\n\r")], '{') << json;
  EXPECT_EQ(*sd.root().Field("usage")->IntField("prompt_tokens"),
            PromptTokens(prompt + "</think>\n\n").token_ids_size());
}

// A template that shows the tools and writes calls and their results as Hermes-style turns.
constexpr char kToolsTemplate[] =
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}\n{%- for m in messages %}\n{%- if m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}\n{%- endfor %}<|im_start|>assistant\n";
constexpr char kTools[] =
    R"("tools": [{"type": "function", "function": {"name": "get_time"}},)"
    R"( {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",)"
    R"( "properties": {"city": {"type": "string"}}}}}])";

// Tools reach the model's template, a forced call comes back as tool_calls (whole or streamed),
// and an answer after a tool's result is what the gRPC API generates for the rendered
// conversation.
TEST_F(OpenAiHttpTest, ToolsReachTheTemplateAndCallsComeBackAsToolCalls) {
  const int port = StartTemplatedCoordinator("tools_model", kToolsTemplate);
  ASSERT_NE(port, 0);
  v1::TokenizeRequest tr;
  tr.set_model(kTinyModel);
  tr.set_text("}");
  v1::TokenizeResponse brace;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(cluster_->serving()->Tokenize(&ctx, tr, &brace).ok());
    ASSERT_EQ(brace.token_ids_size(), 1);
  }
  // tool_choice names get_time: the prompt ends with the call opened up to its arguments' "{",
  // and two "}" (forced by logit_bias) close it.
  const std::string forced_body = absl::StrCat(
      R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "What time is it?"}], )",
      kTools, R"(, "tool_choice": {"type": "function", "function": {"name": "get_time"}},)",
      R"( "max_tokens": 2, "temperature": 0, "logit_bias": {")", brace.token_ids(0), R"(": 100})");
  const std::string rendered =
      "<|im_start|>system\nTools: get_time get_weather<|im_end|>\n<|im_start|>user\nWhat time is "
      "it?<|im_end|>\n<|im_start|>assistant";
  {
    const HttpReply r = Http(port, "POST", "/v1/chat/completions", forced_body + "}");
    ASSERT_EQ(r.status, 200) << r.body;
    const JsonDocument d = Json(r.body);
    const JsonValue message = *Choice(d).Field("message");
    EXPECT_TRUE(message.Field("content")->IsNull()) << r.body;
    const std::vector<JsonValue> calls = *message.Field("tool_calls")->AsArray();
    ASSERT_EQ(calls.size(), 1u) << r.body;
    EXPECT_TRUE(absl::StartsWith(Str(calls[0], "id"), "call_")) << r.body;
    EXPECT_EQ(Str(calls[0], "type"), "function");
    EXPECT_EQ(Str(*calls[0].Field("function"), "name"), "get_time");
    EXPECT_EQ(Str(*calls[0].Field("function"), "arguments"), "{}");
    EXPECT_EQ(Str(Choice(d), "finish_reason"), "length");
    EXPECT_EQ(*d.root().Field("usage")->IntField("prompt_tokens"),
              PromptTokens(rendered + "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {")
                  .token_ids_size());
  }
  {
    const HttpReply r =
        Http(port, "POST", "/v1/chat/completions", forced_body + R"(, "stream": true})");
    ASSERT_EQ(r.status, 200) << r.body;
    const std::vector<std::string> events = SseData(r.body);
    ASSERT_GE(events.size(), 2u) << r.body;
    EXPECT_EQ(events.back(), "[DONE]");
    std::string content, name, arguments, finish;
    int calls = 0;
    for (size_t i = 0; i + 1 < events.size(); ++i) {
      const JsonDocument d = Json(events[i]);
      const JsonValue delta = *Choice(d).Field("delta");
      if (std::optional<JsonValue> c = delta.FindField("content")) {
        content += std::string(*c->AsString());
      }
      if (std::optional<JsonValue> list = delta.FindField("tool_calls")) {
        const absl::StatusOr<std::vector<JsonValue>> items = list->AsArray();
        ASSERT_TRUE(items.ok()) << items.status();
        for (const JsonValue& call : *items) {
          EXPECT_EQ(*call.IntField("index"), calls);
          ++calls;
          name = Str(*call.Field("function"), "name");
          arguments = Str(*call.Field("function"), "arguments");
        }
      }
      if (!Choice(d).Field("finish_reason")->IsNull()) finish = Str(Choice(d), "finish_reason");
    }
    EXPECT_EQ(content, "");
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(name, "get_time");
    EXPECT_EQ(arguments, "{}");
    EXPECT_EQ(finish, "length");
  }
  // Left to the model (sampled, no bias), a forced call still comes back well formed: its
  // arguments follow the tool's parameters (a grammar keeps them to it), and the call is read
  // where the grammar ends.
  for (const char* choice :
       {R"({"type": "function", "function": {"name": "convert"}})", R"("required")"}) {
    SCOPED_TRACE(choice);
    const HttpReply r = Http(
        port, "POST", "/v1/chat/completions",
        absl::StrCat(
            R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "Convert it"}],)",
            R"( "tools": [{"type": "function", "function": {"name": "convert", "parameters":)",
            R"( {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},)",
            R"( "round": {"type": "boolean"}}, "required": ["unit"]}}}], "tool_choice": )", choice,
            R"(, "max_tokens": 400, "temperature": 1, "seed": 3})"));
    ASSERT_EQ(r.status, 200) << r.body;
    const JsonDocument d = Json(r.body);
    const std::vector<JsonValue> calls =
        *Choice(d).Field("message")->Field("tool_calls")->AsArray();
    ASSERT_EQ(calls.size(), 1u) << r.body;
    EXPECT_EQ(Str(*calls[0].Field("function"), "name"), "convert");
    const JsonDocument arguments = Json(Str(*calls[0].Field("function"), "arguments"));
    const std::string unit = Str(arguments.root(), "unit");
    EXPECT_TRUE(unit == "c" || unit == "f") << r.body;
    EXPECT_EQ(Str(Choice(d), "finish_reason"), choice[0] == '"' ? "tool_calls" : "stop");
  }

  // Qwen3-Coder's XML calls, forced: the parameters the schema names, an integer as one.
  {
    const int xml_port = StartTemplatedCoordinator(
        "xml_tools_model",
        "{%- if tools %}<|im_start|>system\n# Tools: call one as <tool_call>\n<function=NAME>\n"
        "<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>{% endif %}"
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}<|im_start|>assistant\n");
    ASSERT_NE(xml_port, 0);
    const HttpReply r = Http(
        xml_port, "POST", "/v1/chat/completions",
        R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "Book it"}],)"
        R"( "tools": [{"type": "function", "function": {"name": "book", "parameters": {"type":)"
        R"( "object", "properties": {"nights": {"type": "integer"}, "late": {"type": "boolean"}},)"
        R"( "required": ["nights", "late"]}}}], "tool_choice": {"type": "function", "function":)"
        R"( {"name": "book"}}, "max_tokens": 200, "temperature": 1, "seed": 5})");
    ASSERT_EQ(r.status, 200) << r.body;
    const JsonDocument d = Json(r.body);
    const std::vector<JsonValue> calls =
        *Choice(d).Field("message")->Field("tool_calls")->AsArray();
    ASSERT_EQ(calls.size(), 1u) << r.body;
    EXPECT_EQ(Str(*calls[0].Field("function"), "name"), "book");
    const JsonDocument arguments = Json(Str(*calls[0].Field("function"), "arguments"));
    EXPECT_TRUE(arguments.root().IntField("nights").ok()) << r.body;
    EXPECT_TRUE(arguments.root().Field("late")->IsBool()) << r.body;
  }

  // After the tool's result: the assistant's call and the result rendered by the template, the
  // answer what the model generates for that text, with its calls (if any) found in it.
  const std::string after =
      "<|im_start|>system\nTools: get_time get_weather<|im_end|>\n<|im_start|>user\nWeather in "
      "Oslo?<|im_end|>\n<|im_start|>assistant\n<tool_call>{\"name\": \"get_weather\", "
      "\"arguments\": {\"city\": \"Oslo\"}}</tool_call><|im_end|>\n<|im_start|>user\n"
      "<tool_response>-3 C</tool_response><|im_end|>\n<|im_start|>assistant";
  v1::GenerateRequest g = TextRequest(after, 12, 3);
  g.mutable_sampling()->set_temperature(0.8f);
  g.mutable_sampling()->set_ignore_eos(true);
  g.mutable_sampling()->set_skip_special_tokens(false);  // as the gateway asks with tools
  const Generated want = Generate(cluster_->serving(), g);
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  ToolCallParser parser(ToolCallFormat::kHermes);
  ToolCallParser::Output expected = parser.Add(want.text);
  ToolCallParser::Output rest = parser.Finish();
  expected.content += rest.content;
  for (ToolCall& t : rest.calls) expected.calls.push_back(std::move(t));
  const HttpReply r = Http(
      port, "POST", "/v1/chat/completions",
      absl::StrCat(
          R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "Weather in Oslo?"},)",
          R"( {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type":)",
          R"( "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},)",
          R"( {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}], )", kTools,
          R"(, "max_tokens": 12, "seed": 3, "temperature": 0.8, "ignore_eos": true})"));
  ASSERT_EQ(r.status, 200) << r.body;
  const JsonDocument d = Json(r.body);
  EXPECT_EQ(*d.root().Field("usage")->IntField("prompt_tokens"),
            PromptTokens(after).token_ids_size());
  const JsonValue message = *Choice(d).Field("message");
  if (expected.content.empty() && !expected.calls.empty()) {
    EXPECT_TRUE(message.Field("content")->IsNull()) << r.body;
  } else {
    EXPECT_EQ(Str(message, "content"), expected.content);
  }
  std::vector<std::pair<std::string, std::string>> calls, want_calls;
  if (std::optional<JsonValue> list = message.FindField("tool_calls")) {
    const absl::StatusOr<std::vector<JsonValue>> items = list->AsArray();
    ASSERT_TRUE(items.ok()) << items.status();
    for (const JsonValue& call : *items) {
      calls.emplace_back(Str(*call.Field("function"), "name"),
                         Str(*call.Field("function"), "arguments"));
    }
  }
  for (const ToolCall& t : expected.calls) want_calls.emplace_back(t.name, t.arguments);
  EXPECT_EQ(calls, want_calls) << r.body;

  // Refusals name the field, and the gateway goes on.
  const HttpReply unknown = Http(
      port, "POST", "/v1/chat/completions",
      absl::StrCat(R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "x"}], )",
                   kTools, R"(, "tool_choice": {"type": "function", "function": {"name": "f"}}})"));
  EXPECT_EQ(unknown.status, 400) << unknown.body;
  EXPECT_EQ(Str(*Json(unknown.body).root().Field("error"), "param"), "tool_choice");
  EXPECT_EQ(Http(port, "POST", "/v1/chat/completions", forced_body + "}").status, 200);
}

// Structured output through the HTTP API: OpenAI's response_format and vLLM's spellings reach the
// workers' grammar, the text follows it, and a schema the server cannot enforce is refused naming
// what it uses.
TEST_F(OpenAiHttpTest, StructuredOutputFollowsTheRequestedShape) {
  // Every field an enum or a boolean: the grammar bounds the text (whitespace included), so 400
  // tokens always reach its end.
  const std::string schema =
      R"({"type": "object", "properties": {"kind": {"enum": ["module", "function", "class"]},)"
      R"( "public": {"type": "boolean"}, "size": {"enum": ["small", "large"]}},)"
      R"( "required": ["kind", "public"]})";
  for (uint64_t seed : {1, 2, 3}) {
    SCOPED_TRACE(seed);
    const HttpReply r = Http(
        port_, "POST", "/v1/chat/completions",
        absl::StrCat(R"({"model": "strata-tiny", "messages": [{"role": "user", "content":)"
                     R"( "Describe parser.py"}], "max_tokens": 400, "temperature": 1, "seed": )",
                     seed,
                     R"(, "response_format": {"type": "json_schema", "json_schema":)"
                     R"( {"name": "entity", "strict": true, "schema": )",
                     schema, "}}}"));
    ASSERT_EQ(r.status, 200) << r.body;
    const JsonDocument d = Json(r.body);
    EXPECT_EQ(Str(Choice(d), "finish_reason"), "stop");
    const std::string content = Str(*Choice(d).Field("message"), "content");
    const JsonDocument value = Json(content);
    const std::string kind = Str(value.root(), "kind");
    EXPECT_TRUE(kind == "module" || kind == "function" || kind == "class") << content;
    EXPECT_TRUE(value.root().Field("public")->IsBool()) << content;
    const auto members = value.root().AsObject();
    ASSERT_TRUE(members.ok());
    for (const auto& [key, v] : members.value()) {
      EXPECT_TRUE(key == "kind" || key == "public" || key == "size") << content;
    }
  }
  // A choice (vLLM's structured_outputs) and a pattern (its older guided_regex) on completions.
  const HttpReply choice = Http(
      port_, "POST", "/v1/completions",
      CompletionBody(30, 4, R"(, "structured_outputs": {"choice": ["yes", "no", "not sure"]})"));
  ASSERT_EQ(choice.status, 200) << choice.body;
  const std::string picked = Str(Choice(Json(choice.body)), "text");
  EXPECT_TRUE(picked == "yes" || picked == "no" || picked == "not sure") << picked;
  EXPECT_EQ(Str(Choice(Json(choice.body)), "finish_reason"), "stop");
  const HttpReply phone = Http(port_, "POST", "/v1/completions",
                               CompletionBody(30, 5, R"(, "guided_regex": "\\d{3}-\\d{4}")"));
  ASSERT_EQ(phone.status, 200) << phone.body;
  const std::string number = Str(Choice(Json(phone.body)), "text");
  ASSERT_EQ(number.size(), 8u) << number;
  for (size_t i = 0; i < number.size(); ++i) {
    EXPECT_TRUE(i == 3 ? number[i] == '-' : absl::ascii_isdigit(number[i])) << number;
  }
  // Compact JSON on request (vLLM's disable_any_whitespace): no whitespace anywhere.
  const HttpReply compact = Http(
      port_, "POST", "/v1/completions",
      CompletionBody(200, 8,
                     R"(, "structured_outputs": {"json": {"type": "object", "properties": {"k":)"
                     R"( {"enum": ["a", "b"]}, "n": {"type": "boolean"}}, "required": ["k", "n"]},)"
                     R"( "disable_any_whitespace": true})"));
  ASSERT_EQ(compact.status, 200) << compact.body;
  const std::string tight = Str(Choice(Json(compact.body)), "text");
  EXPECT_TRUE(tight == R"({"k":"a","n":true})" || tight == R"({"k":"a","n":false})" ||
              tight == R"({"k":"b","n":true})" || tight == R"({"k":"b","n":false})")
      << tight;

  // A GBNF grammar (vLLM's structured_outputs.grammar).
  const HttpReply gbnf = Http(
      port_, "POST", "/v1/completions",
      CompletionBody(
          40, 7,
          R"(, "structured_outputs": {"grammar": "root ::= item (\", \" item){2}\nitem ::= [a-z]{1,6}"})"));
  ASSERT_EQ(gbnf.status, 200) << gbnf.body;
  const std::string items = Str(Choice(Json(gbnf.body)), "text");
  EXPECT_EQ(std::count(items.begin(), items.end(), ','), 2) << items;
  EXPECT_EQ(Str(Choice(Json(gbnf.body)), "finish_reason"), "stop") << items;

  // json_object streams a JSON object.
  const HttpReply object = Http(
      port_, "POST", "/v1/completions",
      CompletionBody(60, 6, R"(, "stream": true, "response_format": {"type": "json_object"})"));
  ASSERT_EQ(object.status, 200) << object.body;
  std::string text;
  for (const std::string& event : SseData(object.body)) {
    if (event == "[DONE]") break;
    text += Str(Choice(Json(event)), "text");
  }
  // Whitespace may lead; then an object.
  const size_t first = text.find_first_not_of(" \t\n\r");
  ASSERT_NE(first, std::string::npos) << text;
  EXPECT_EQ(text[first], '{') << text;

  // Tools the model may call leave no room for a grammar.
  const HttpReply both =
      Http(port_, "POST", "/v1/chat/completions",
           R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "x"}], "tools":)"
           R"( [{"type": "function", "function": {"name": "f"}}], "response_format": {"type":)"
           R"( "json_object"}})");
  EXPECT_EQ(both.status, 400) << both.body;
  EXPECT_NE(both.body.find("cannot be combined with tools"), std::string::npos) << both.body;
  EXPECT_EQ(Str(*Json(both.body).root().Field("error"), "param"), "response_format");

  struct Bad {
    std::string extra;
    std::string param;  // "" : null (the coordinator's check)
    std::string says;
  };
  for (const Bad& b : std::vector<Bad>{
           {R"(, "response_format": {"type": "json_schema", "json_schema": {"name": "n",)"
            R"( "schema": {"not": {"type": "integer"}}}})",
            "", R"(uses \"not\", which is not supported)"},
           {R"(, "response_format": {"type": "yaml"})", "response_format",
            "must be text, json_object or json_schema"},
           {R"(, "response_format": {"type": "json_object"}, "guided_regex": "a+")", "guided_regex",
            R"(conflicts with \"response_format\")"},
           {R"(, "structured_outputs": {"regex": "a(b"})", "", "structured_output.regex"},
       }) {
    SCOPED_TRACE(b.extra);
    const HttpReply r = Http(port_, "POST", "/v1/completions", CompletionBody(5, 1, b.extra));
    EXPECT_EQ(r.status, 400) << r.body;
    EXPECT_NE(r.body.find(b.says), std::string::npos) << r.body;
    const JsonDocument d = Json(r.body);
    if (b.param.empty()) {
      EXPECT_TRUE(d.root().Field("error")->Field("param")->IsNull()) << r.body;
    } else {
      EXPECT_EQ(Str(*d.root().Field("error"), "param"), b.param);
    }
  }
}

TEST_F(OpenAiHttpTest, LogprobsComeInOpenAisShape) {
  const HttpReply r =
      Http(port_, "POST", "/v1/completions", CompletionBody(6, 3, R"(, "logprobs": 2)"));
  ASSERT_EQ(r.status, 200) << r.body;
  const JsonDocument d = Json(r.body);
  const JsonValue lp = *Choice(d).Field("logprobs");
  const std::vector<JsonValue> tokens = *lp.Field("tokens")->AsArray();
  const std::vector<JsonValue> values = *lp.Field("token_logprobs")->AsArray();
  const std::vector<JsonValue> top = *lp.Field("top_logprobs")->AsArray();
  ASSERT_EQ(tokens.size(), 6u);
  ASSERT_EQ(values.size(), 6u);
  ASSERT_EQ(top.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_LE(*values[i].AsDouble(), 0);
    EXPECT_EQ(top[i].AsObject()->size(), 2u);
  }
  std::string joined;
  for (const JsonValue& t : tokens) absl::StrAppend(&joined, *t.AsString());
  EXPECT_EQ(joined, Str(Choice(d), "text"));
}

TEST_F(OpenAiHttpTest, ErrorsAreOpenAiErrorObjectsAndTheServerGoesOn) {
  struct Case {
    std::string method, path, body;
    int status;
    std::string param;  // "" : null
    std::string says;
  };
  const std::vector<Case> cases = {
      {"POST", "/v1/completions",
       R"({"model": "strata-tiny", "prompt": "x", "temperature": "hot"})", 400, "temperature",
       "temperature"},
      {"POST", "/v1/completions", "{not json", 400, "", "request body"},
      {"POST", "/v1/completions", R"({"model": "strata-tiny", "prompt": "x", "n": 30})", 400, "n",
       "1 to 16"},
      // The coordinator's own checks come through with their field names, as the request's.
      {"POST", "/v1/completions", R"({"model": "strata-tiny", "prompt": "x", "top_p": 7})", 400,
       "top_p", "top_p"},
      {"POST", "/v1/completions", R"({"model": "gpt-17", "prompt": "x"})", 404, "model", "gpt-17"},
      {"POST", "/v1/completions", R"({"model": "strata-tiny", "prompt": [99999]})", 400, "prompt",
       "token_ids"},
      {"POST", "/v1/completions", R"({"model": "strata-tiny", "prompt": "x", "max_tokens": 0})",
       400, "max_tokens", "max_tokens"},
      {"GET", "/v1/completions", "", 405, "", "POST"},
      {"POST", "/v1/chat/completions", R"({"model": "strata-tiny", "messages": []})", 400,
       "messages", "empty"},
      {"GET", "/v1/chat/completions", "", 405, "", "POST"},
      // The built-in ChatML format has no way to show tools, nor a tool's result.
      {"POST", "/v1/chat/completions",
       R"({"model": "strata-tiny", "messages": [{"role": "user", "content": "x"}], "tools":)"
       R"( [{"type": "function", "function": {"name": "f"}}]})",
       400, "tools", "built-in chatml"},
      {"POST", "/v1/chat/completions",
       R"({"model": "strata-tiny", "messages": [{"role": "tool", "tool_call_id": "1",)"
       R"( "content": "x"}]})",
       400, "messages", "built-in chatml"},
      {"POST", "/v1/chat/completions",
       R"({"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]})", 404, "model",
       "gpt-17"},
      {"GET", "/v2/anything", "", 404, "", "/v2/anything"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.method + " " + c.path + " " + c.body);
    const HttpReply r = Http(port_, c.method, c.path, c.body);
    EXPECT_EQ(r.status, c.status) << r.body;
    const JsonDocument d = Json(r.body);
    const absl::StatusOr<JsonValue> e = d.root().Field("error");
    ASSERT_TRUE(e.ok()) << r.body;
    EXPECT_NE(Str(*e, "message").find(c.says), std::string::npos) << r.body;
    EXPECT_EQ(*e->IntField("code"), c.status);
    if (c.param.empty()) {
      EXPECT_TRUE(e->Field("param")->IsNull()) << r.body;
    } else {
      EXPECT_EQ(Str(*e, "param"), c.param);
    }
  }
  // A POST without a length, and one announcing too large a body.
  EXPECT_EQ(HttpRaw(port_, "POST /v1/completions HTTP/1.1\r\nHost: t\r\n\r\n").status, 411);
  EXPECT_EQ(
      HttpRaw(port_, "POST /v1/completions HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n").status,
      413);
  // The same with a megabyte of the body already sent: the answer still arrives (the server
  // drains what it does not read instead of resetting the connection).
  EXPECT_EQ(HttpRaw(port_, "POST /v1/completions HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n" +
                               std::string(1 << 20, 'x'))
                .status,
            413);
  EXPECT_EQ(HttpRaw(port_, "garbage\r\n\r\n").status, 400);
  // Still serving.
  EXPECT_EQ(Http(port_, "POST", "/v1/completions", CompletionBody(2, 1)).status, 200);
}

// Reads one response with a Content-Length from `fd` (`buffer`: what arrived past the one before,
// kept for the next); status 0 when the connection ends first.
HttpReply ReadOneReply(int fd, std::string* buffer) {
  size_t end;
  while ((end = buffer->find("\r\n\r\n")) == std::string::npos) {
    char buf[4096];
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return {};
    buffer->append(buf, static_cast<size_t>(n));
  }
  HttpReply r = ParseHttpReply(buffer->substr(0, end + 4));
  const size_t at = r.head.find("Content-Length: ");
  size_t length = 0;
  if (at == std::string::npos ||
      !absl::SimpleAtoi(r.head.substr(at + 16, r.head.find("\r\n", at) - at - 16), &length)) {
    return {};
  }
  while (buffer->size() < end + 4 + length) {
    char buf[4096];
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return {};
    buffer->append(buf, static_cast<size_t>(n));
  }
  r.body = buffer->substr(end + 4, length);
  buffer->erase(0, end + 4 + length);
  return r;
}

// Clients that keep a connection open (HTTP/1.1's default: the OpenAI SDKs, most HTTP libraries)
// send request after request on it, pipelined too; "Connection: close", a stream, or HTTP/1.0
// without "keep-alive" end it after the answer.
TEST_F(OpenAiHttpTest, AKeptAliveConnectionServesRequestAfterRequest) {
  const int fd = ConnectLoopback(port_);
  ASSERT_GE(fd, 0);
  std::string buffer;
  auto send_text = [&](const std::string& text) {
    ASSERT_EQ(send(fd, text.data(), text.size(), MSG_NOSIGNAL), static_cast<ssize_t>(text.size()));
  };
  send_text(HttpRequestText("GET", "/v1/models", "", /*close=*/false));
  HttpReply models = ReadOneReply(fd, &buffer);
  ASSERT_EQ(models.status, 200) << models.head;
  EXPECT_TRUE(absl::StrContains(models.head, "Connection: keep-alive")) << models.head;
  EXPECT_TRUE(absl::StrContains(models.body, "strata-tiny"));
  // Two completions in one write, answered in order, the same as one-shot requests.
  const std::string a = CompletionBody(3, 11), b = CompletionBody(4, 12);
  send_text(HttpRequestText("POST", "/v1/completions", a, false) +
            HttpRequestText("POST", "/v1/completions", b, false));
  const HttpReply ra = ReadOneReply(fd, &buffer), rb = ReadOneReply(fd, &buffer);
  ASSERT_EQ(ra.status, 200) << ra.head;
  ASSERT_EQ(rb.status, 200) << rb.head;
  EXPECT_EQ(Str(Choice(Json(ra.body)), "text"),
            Str(Choice(Json(Http(port_, "POST", "/v1/completions", a).body)), "text"));
  EXPECT_EQ(*Json(rb.body).root().Field("usage")->IntField("completion_tokens"), 4);
  // An error keeps the connection too; then "Connection: close" ends it after the answer.
  send_text(HttpRequestText("POST", "/v1/completions", "{", false));
  EXPECT_EQ(ReadOneReply(fd, &buffer).status, 400);
  send_text(HttpRequestText("GET", "/health", "", /*close=*/true));
  const HttpReply last = ReadOneReply(fd, &buffer);
  EXPECT_EQ(last.status, 200);
  EXPECT_TRUE(absl::StrContains(last.head, "Connection: close")) << last.head;
  std::string rest;
  ReadToClose(fd, &rest);  // returns: the server closed
  EXPECT_EQ(rest, "");
  close(fd);

  // A streamed answer ends the connection; so does HTTP/1.0 without keep-alive.
  const HttpReply streamed =
      HttpRaw(port_, HttpRequestText("POST", "/v1/completions",
                                     CompletionBody(2, 5, R"(, "stream": true)"), false));
  EXPECT_EQ(streamed.status, 200);
  EXPECT_EQ(SseData(streamed.body).back(), "[DONE]");
  const HttpReply old = HttpRaw(port_, "GET /health HTTP/1.0\r\n\r\n");
  EXPECT_EQ(old.status, 200);
  EXPECT_TRUE(absl::StrContains(old.head, "Connection: close")) << old.head;
  // So do a HEAD, a body on another method than POST (never read as a request), and "close"
  // beside "keep-alive" in one header.
  for (const std::string& raw :
       {std::string("HEAD /health HTTP/1.1\r\nHost: t\r\n\r\n"),
        std::string("GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nGET "),
        std::string("GET /health HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, close\r\n\r\n")}) {
    const HttpReply r = HttpRaw(port_, raw);  // returns only once the server closes
    EXPECT_TRUE(absl::StrContains(r.head, "Connection: close")) << raw << "\n" << r.head;
  }
  // Two Content-Length values that differ are refused.
  EXPECT_EQ(HttpRaw(port_,
                    "POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n"
                    "Content-Length: 3\r\n\r\n{}")
                .status,
            400);
}

// A full gateway closes a connection that only waits for a next request to take a new one.
TEST_F(OpenAiHttpTest, AFullGatewayMakesRoomByClosingAnIdleConnection) {
  const int port = FreePort();
  auto address = cluster_->StartExtraCoordinator(
      {absl::StrCat("--model=", kTinyModel, "=", kTinyModelDir),
       absl::StrCat("--http_listen=127.0.0.1:", port), "--http_max_connections=2"},
      "two-connections-coordinator");
  ASSERT_TRUE(address.ok()) << address.status();
  std::vector<int> idle;
  for (int i = 0; i < 2; ++i) {
    const int fd = ConnectLoopback(port);
    ASSERT_GE(fd, 0);
    const std::string health = HttpRequestText("GET", "/health", "", /*close=*/false);
    ASSERT_EQ(send(fd, health.data(), health.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(health.size()));
    std::string buffer;
    ASSERT_EQ(ReadOneReply(fd, &buffer).status, 200);
    idle.push_back(fd);
  }
  // Both slots hold idle connections: a third client is served, not refused. (A connection counts
  // as idle once its thread waits for a next request, a moment after its answer went out: a
  // 503 before both do is retried.)
  HttpReply third = Http(port, "GET", "/health");
  for (int i = 0; i < 40 && third.status == 503; ++i) {
    absl::SleepFor(absl::Milliseconds(50));
    third = Http(port, "GET", "/health");
  }
  EXPECT_EQ(third.status, 200) << third.head;
  // One of the idle connections was closed for it.
  int closed = 0;
  for (const int fd : idle) {
    pollfd p = {fd, POLLIN, 0};
    char c;
    if (::poll(&p, 1, 1000) == 1 && ::recv(fd, &c, 1, MSG_DONTWAIT) == 0) ++closed;
    close(fd);
  }
  EXPECT_GE(closed, 1);
}

// A request the client sends while the one before still generates waits in the socket (the
// gateway watches a non-streamed completion's connection for a close without reading it) and is
// answered next.
TEST_F(OpenAiHttpTest, ARequestPipelinedDuringAGenerationIsAnsweredNext) {
  const int fd = ConnectLoopback(port_);
  ASSERT_GE(fd, 0);
  const std::string first =
      HttpRequestText("POST", "/v1/completions", CompletionBody(60, 3), false);
  const std::string second = HttpRequestText("GET", "/v1/models", "", false);
  ASSERT_EQ(send(fd, first.data(), first.size(), MSG_NOSIGNAL), static_cast<ssize_t>(first.size()));
  absl::SleepFor(absl::Milliseconds(30));  // the first is generating by now
  ASSERT_EQ(send(fd, second.data(), second.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(second.size()));
  std::string buffer;
  const HttpReply a = ReadOneReply(fd, &buffer);
  EXPECT_EQ(a.status, 200) << a.head;
  EXPECT_EQ(*Json(a.body).root().Field("usage")->IntField("completion_tokens"), 60);
  const HttpReply b = ReadOneReply(fd, &buffer);
  EXPECT_EQ(b.status, 200) << b.head;
  EXPECT_TRUE(absl::StrContains(b.body, "strata-tiny"));
  close(fd);
}

// curl sends "Expect: 100-continue" before a body over 1 KiB and waits for the go-ahead.
TEST_F(OpenAiHttpTest, ExpectContinueGetsTheGoAhead) {
  const std::string body =
      CompletionBody(2, 5, absl::StrCat(R"(, "user": ")", std::string(2000, 'u'), "\""));
  const int fd = ConnectLoopback(port_);
  ASSERT_GE(fd, 0);
  const std::string head =
      absl::StrCat("POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: ", body.size(),
                   "\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n");
  ASSERT_EQ(send(fd, head.data(), head.size(), MSG_NOSIGNAL), static_cast<ssize_t>(head.size()));
  char buf[256];
  const ssize_t n = recv(fd, buf, sizeof(buf), 0);
  ASSERT_GT(n, 0);
  EXPECT_EQ(std::string(buf, static_cast<size_t>(n)), "HTTP/1.1 100 Continue\r\n\r\n");
  ASSERT_EQ(send(fd, body.data(), body.size(), MSG_NOSIGNAL), static_cast<ssize_t>(body.size()));
  std::string text;
  ReadToClose(fd, &text);
  close(fd);
  EXPECT_EQ(ParseHttpReply(text).status, 200) << text;
}

// Live sequences on the workers (running or waiting).
int64_t LiveSequences(LocalCluster* cluster) {
  const v1::ClusterStatus status = Status(cluster->admin());
  int64_t live = 0;
  for (const auto& w : status.workers()) {
    live += w.load().num_running_sequences() + w.load().num_waiting_sequences();
  }
  return live;
}

// Waits until the workers report `n` live sequences (or 20 s pass); the last count.
int64_t WaitForLive(LocalCluster* cluster, int64_t n) {
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  int64_t live = LiveSequences(cluster);
  while (live != n && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(50));
    live = LiveSequences(cluster);
  }
  return live;
}

// Without streaming nothing is written until the end, so the gateway watches the socket: a client
// that gives up on a long completion cancels it.
TEST_F(OpenAiHttpTest, AClientThatGivesUpOnACompletionFreesItsSequence) {
  const int fd = ConnectLoopback(port_);
  ASSERT_GE(fd, 0);
  const std::string req = HttpRequestText("POST", "/v1/completions", CompletionBody(1500, 4));
  ASSERT_EQ(send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  ASSERT_EQ(WaitForLive(cluster_, 1), 1) << "the completion never started";
  close(fd);
  EXPECT_EQ(WaitForLive(cluster_, 0), 0) << "the generation went on after its client left";
}

// Sends a streamed completion of `max_tokens` on a new connection to `port` and reads until its
// first event (the sequence is running on the worker). The socket, and what was read, in `got`;
// -1 when that failed.
int StartStream(int port, int max_tokens, std::string* got) {
  const int fd = ConnectLoopback(port);
  if (fd < 0) return -1;
  const std::string req = HttpRequestText("POST", "/v1/completions",
                                          CompletionBody(max_tokens, 9, R"(, "stream": true)"));
  if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return -1;
  }
  char buf[4096];
  while (got->find("data: ") == std::string::npos) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) {
      close(fd);
      return -1;
    }
    got->append(buf, static_cast<size_t>(n));
  }
  return fd;
}

TEST_F(OpenAiHttpTest, AClientThatLeavesMidStreamFreesItsSequence) {
  std::string got;
  const int fd = StartStream(port_, 1500, &got);
  ASSERT_GE(fd, 0) << got;
  close(fd);
  EXPECT_EQ(WaitForLive(cluster_, 0), 0) << "the generation went on after its client left";
}

// SIGTERM while a completion streams: the coordinator stops taking connections, lets the stream
// finish within its grace period (the in-process channel would cut it at once if the gRPC server
// shut down first), and exits 0.
TEST(OpenAiHttpShutdownTest, AStreamInFlightFinishesWithinTheGracePeriod) {
  const int port = FreePort();
  LocalClusterOptions o;
  o.num_workers = 1;
  o.name = "openai-shutdown";
  o.coordinator_flags = {absl::StrCat("--http_listen=127.0.0.1:", port), "--shutdown_grace_s=60"};
  auto cluster = LocalCluster::Start(o);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  std::string got;
  const int fd = StartStream(port, 400, &got);
  ASSERT_GE(fd, 0) << got;
  // And a kept-alive connection waiting between requests: closed as the gateway stops accepting,
  // not held for its idle timeout.
  const int idle = ConnectLoopback(port);
  ASSERT_GE(idle, 0);
  const std::string health = HttpRequestText("GET", "/health", "", /*close=*/false);
  ASSERT_EQ(send(idle, health.data(), health.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(health.size()));
  std::string idle_buffer;
  ASSERT_EQ(ReadOneReply(idle, &idle_buffer).status, 200);
  ChildProcess& coordinator = (*cluster)->coordinator_process();
  ASSERT_EQ(kill(coordinator.pid(), SIGTERM), 0);
  const absl::Time stopped = absl::Now();
  ReadToClose(idle, &idle_buffer);
  EXPECT_LT(absl::Now() - stopped, absl::Seconds(3));  // the idle timeout is 5 s
  close(idle);
  ReadToClose(fd, &got);
  close(fd);
  const std::vector<std::string> events = SseData(ParseHttpReply(got).body);
  ASSERT_GE(events.size(), 2u) << got;
  EXPECT_EQ(events.back(), "[DONE]");
  EXPECT_NE(events[events.size() - 2].find(R"("finish_reason":"length")"), std::string::npos)
      << events[events.size() - 2];
  const int status = coordinator.Wait(absl::Seconds(30));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  // Refused now.
  EXPECT_EQ(Http(port, "GET", "/health").status, 0);
}

}  // namespace
}  // namespace strata
