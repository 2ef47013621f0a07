// The OpenAI completions request into a GenerateRequest, and the error mapping, without a server
// (tests/openai_http_test runs the API end to end).
#include "coordinator/openai_gateway.h"

#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/json.h"
#include "gtest/gtest.h"
#include "tokenizer/llama2_style.h"
#include "tokenizer/tokenizer.h"

namespace strata {
namespace {

absl::StatusOr<CompletionCall> Parse(const std::string& body, std::string* param = nullptr) {
  std::string p;
  return CompletionFromJson(body, param != nullptr ? param : &p);
}

TEST(CompletionFromJsonTest, MapsTheOpenAiFieldsAndStratasOwn) {
  const absl::StatusOr<CompletionCall> c = Parse(R"({
    "model": "strata-tiny", "prompt": "Once upon", "max_tokens": 7, "temperature": 0.5,
    "top_p": 0.9, "top_k": 40, "min_p": 0.05, "presence_penalty": 0.1, "frequency_penalty": 0.2,
    "repetition_penalty": 1.1, "seed": 42, "stop": ["\n", "END"], "logprobs": 3, "stream": true,
    "stream_options": {"include_usage": true}, "user": "someone", "n": 1,
    "fine_tune_id": "ft-man", "cache_salt": "tenant-a", "priority": 5, "request_id": "r-1",
    "ignore_eos": true, "min_tokens": 2, "stop_token_ids": [2]})");
  ASSERT_TRUE(c.ok()) << c.status();
  const v1::GenerateRequest& r = c->request;
  EXPECT_TRUE(c->stream);
  EXPECT_TRUE(c->include_usage);
  EXPECT_EQ(r.model(), "strata-tiny");
  EXPECT_EQ(r.text(), "Once upon");
  EXPECT_EQ(r.fine_tune_id(), "ft-man");
  EXPECT_EQ(r.cache_salt(), "tenant-a");
  EXPECT_EQ(r.priority(), 5);
  EXPECT_EQ(r.request_id(), "r-1");
  const v1::SamplingParams& s = r.sampling();
  EXPECT_EQ(s.max_tokens(), 7u);
  EXPECT_EQ(s.min_tokens(), 2u);
  EXPECT_FLOAT_EQ(s.temperature(), 0.5f);
  EXPECT_FLOAT_EQ(s.top_p(), 0.9f);
  EXPECT_EQ(s.top_k(), 40u);
  EXPECT_FLOAT_EQ(s.min_p(), 0.05f);
  EXPECT_FLOAT_EQ(s.presence_penalty(), 0.1f);
  EXPECT_FLOAT_EQ(s.frequency_penalty(), 0.2f);
  EXPECT_FLOAT_EQ(s.repetition_penalty(), 1.1f);
  EXPECT_EQ(s.seed(), 42u);
  ASSERT_EQ(s.stop_size(), 2);
  EXPECT_EQ(s.stop(1), "END");
  EXPECT_EQ(s.logprobs(), 3u);
  EXPECT_TRUE(s.ignore_eos());
  EXPECT_TRUE(s.skip_special_tokens());
  ASSERT_EQ(s.stop_token_ids_size(), 1);
}

TEST(CompletionFromJsonTest, DefaultsLeaveTheServersChoices) {
  const absl::StatusOr<CompletionCall> c = Parse(R"({"model": "m", "prompt": "x"})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->stream);
  EXPECT_EQ(c->request.sampling().max_tokens(), 16u);  // OpenAI's default
  EXPECT_FALSE(c->request.sampling().has_temperature());
  EXPECT_FALSE(c->request.sampling().has_seed());
  EXPECT_FALSE(c->request.sampling().has_logprobs());
  // null is "not given"; top_k -1 is "off".
  const absl::StatusOr<CompletionCall> n =
      Parse(R"({"model": "m", "prompt": "x", "temperature": null, "top_k": -1, "seed": null})");
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_FALSE(n->request.sampling().has_temperature());
  EXPECT_EQ(n->request.sampling().top_k(), 0u);
}

TEST(CompletionFromJsonTest, PromptsAsTextOrTokenIds) {
  for (const char* prompt : {R"("hi")", R"(["hi"])"}) {
    const absl::StatusOr<CompletionCall> c =
        Parse(absl::StrCat(R"({"model": "m", "prompt": )", prompt, "}"));
    ASSERT_TRUE(c.ok()) << prompt << ": " << c.status();
    EXPECT_EQ(c->request.text(), "hi");
  }
  for (const char* prompt : {"[1, 2, 3]", "[[1, 2, 3]]"}) {
    const absl::StatusOr<CompletionCall> c =
        Parse(absl::StrCat(R"({"model": "m", "prompt": )", prompt, "}"));
    ASSERT_TRUE(c.ok()) << prompt << ": " << c.status();
    ASSERT_EQ(c->request.token_ids().ids_size(), 3);
    EXPECT_EQ(c->request.token_ids().ids(2), 3);
  }
  // Several prompts: the first in the request, the others after it, each its own kind.
  const absl::StatusOr<CompletionCall> c =
      Parse(R"({"model": "m", "prompt": ["a", [4, 5], "c"], "n": 2})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->request.text(), "a");
  ASSERT_EQ(c->more_prompts.size(), 2u);
  EXPECT_EQ(c->more_prompts[0].token_ids().ids_size(), 2);
  EXPECT_EQ(c->more_prompts[1].text(), "c");
  EXPECT_EQ(c->n, 2);
}

TEST(CompletionFromJsonTest, LogitBiasBecomesTokenBiases) {
  std::string param;
  auto c = CompletionFromJson(
      R"({"model": "m", "prompt": "x", "logit_bias": {"5": 1.5, "7": -100, "5": 2}})", &param);
  ASSERT_TRUE(c.ok()) << c.status();
  const v1::SamplingParams& s = c->request.sampling();
  ASSERT_EQ(s.logit_bias_size(), 2);
  EXPECT_EQ(s.logit_bias(0).token_id(), 5);
  EXPECT_FLOAT_EQ(s.logit_bias(0).bias(), 2.0f);  // the last value of a repeated key
  EXPECT_EQ(s.logit_bias(1).token_id(), 7);
  EXPECT_FLOAT_EQ(s.logit_bias(1).bias(), -100.0f);
}

// echo: with logprobs the prompt's too; with max_tokens 0 one token is asked for and left out.
TEST(CompletionFromJsonTest, EchoScoresThePrompt) {
  std::string param;
  auto c = CompletionFromJson(
      R"({"model": "m", "prompt": "x", "echo": true, "max_tokens": 0, "logprobs": 2})", &param);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->echo);
  EXPECT_TRUE(c->score_only);
  EXPECT_EQ(c->request.sampling().max_tokens(), 1u);
  EXPECT_EQ(c->request.sampling().prompt_logprobs(), 2u);
  c = CompletionFromJson(R"({"model": "m", "prompt": "x", "echo": true, "max_tokens": 3})", &param);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->score_only);
  EXPECT_EQ(c->request.sampling().max_tokens(), 3u);
  EXPECT_FALSE(c->request.sampling().has_prompt_logprobs());  // no logprobs asked for
}

TEST(CompletionFromJsonTest, RefusalsNameTheField) {
  struct Case {
    std::string body;
    const char* param;
    const char* says;
  };
  for (const Case& c : {
           Case{R"(not json)", "", "request body"},
           Case{R"([1])", "", "JSON object"},
           Case{R"({"prompt": "x"})", "model", "model"},
           Case{R"({"model": 3, "prompt": "x"})", "model", "model"},
           Case{R"({"model": "m"})", "prompt", "prompt"},
           Case{R"({"model": "m", "prompt": ["a", 5]})", "prompt", "prompt[1]"},
           Case{R"({"model": "m", "prompt": ["a", []]})", "prompt", "prompt[1]"},
           Case{R"({"model": "m", "prompt": ["a", "b", "c", "d", "e"], "n": 16})", "prompt",
                "80 generations"},
           // More prompts than a request may generate for, refused before any is copied.
           Case{absl::StrCat(R"({"model": "m", "prompt": [)",
                             absl::StrJoin(std::vector<std::string>(65, R"("p")"), ","), "]}"),
                "prompt", "holds 65 prompts"},
           Case{R"({"model": "m", "prompt": []})", "prompt", "empty"},
           Case{R"({"model": "m", "prompt": [1, -2]})", "prompt", "prompt[1]"},
           Case{R"({"model": "m", "prompt": {"a": 1}})", "prompt", "prompt"},
           Case{R"({"model": "m", "prompt": "x", "max_tokens": 0})", "max_tokens",
                "1 to 4294967295"},
           Case{R"({"model": "m", "prompt": "x", "max_tokens": "9"})", "max_tokens", "max_tokens"},
           Case{R"({"model": "m", "prompt": "x", "temperature": "hot"})", "temperature",
                "temperature"},
           Case{R"({"model": "m", "prompt": "x", "seed": -1})", "seed", "seed"},
           Case{R"({"model": "m", "prompt": "x", "stop": [1]})", "stop", "stop[0]"},
           Case{R"({"model": "m", "prompt": "x", "n": 17})", "n", "1 to 16"},
           Case{R"({"model": "m", "prompt": "x", "n": 0})", "n", "1 to 16"},
           Case{absl::StrCat(R"({"model": "m", "prompt": "x", "n": 2, "request_id": ")",
                             std::string(126, 'a'), R"("})"),
                "request_id", "125 bytes"},
           Case{R"({"model": "m", "prompt": "x", "best_of": 3})", "best_of", "best_of"},
           Case{R"({"model": "m", "prompt": "x", "echo": 1})", "echo", "echo"},
           Case{R"({"model": "m", "prompt": "x", "max_tokens": 0})", "max_tokens",
                "0 only with echo"},
           Case{R"({"model": "m", "prompt": "x", "suffix": "z"})", "suffix", "suffix"},
           Case{R"({"model": "m", "prompt": "x", "logit_bias": {"five": 1}})", "logit_bias",
                "not a token id"},
           Case{R"({"model": "m", "prompt": "x", "logit_bias": {"+5": 1}})", "logit_bias",
                "not a token id"},
           Case{R"({"model": "m", "prompt": "x", "logit_bias": {"5": "up"}})", "logit_bias",
                "logit_bias"},
           Case{R"({"model": "m", "prompt": "x", "logprobs": true})", "logprobs", "logprobs"},
           Case{R"({"model": "m", "prompt": "x", "logprobs": 50})", "logprobs", "0 to 20"},
           Case{R"({"model": "m", "prompt": "x", "stream": "yes"})", "stream", "stream"},
           Case{R"({"model": "m", "prompt": "x", "priority": 1e12})", "priority", "priority"},
       }) {
    std::string param;
    const absl::StatusOr<CompletionCall> r = Parse(c.body, &param);
    ASSERT_FALSE(r.ok()) << c.body;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.body;
    EXPECT_NE(r.status().message().find(c.says), std::string::npos)
        << c.body << ": " << r.status().message();
    if (*c.param != '\0') {
      EXPECT_EQ(param, c.param) << c.body;
    }
  }
}

TEST(ChatFromJsonTest, MessagesAndTheChatFields) {
  std::string param;
  const absl::StatusOr<CompletionCall> c = ChatFromJson(R"({
    "model": "m", "messages": [
      {"role": "developer", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
      {"role": "assistant", "content": "Hello."},
      {"role": "user", "content": "Again"}],
    "max_completion_tokens": 9, "temperature": 0, "stream": true, "logprobs": false, "tools": []})",
                                                        &param);
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->messages.size(), 4u);
  EXPECT_EQ(c->messages[0].role, "system");
  EXPECT_EQ(c->messages[0].content, "Be brief.");
  EXPECT_EQ(c->messages[1].content, "Hi \nthere");  // parts a line apart
  EXPECT_TRUE(c->tools.empty());
  EXPECT_EQ(c->tool_choice, ToolChoice::kNone);
  EXPECT_EQ(c->request.sampling().max_tokens(), 9u);
  EXPECT_FALSE(c->default_max_tokens);
  EXPECT_TRUE(c->stream);
  EXPECT_FALSE(c->request.has_text());  // rendered later, by the model's format
  // No max_tokens: until the turn ends or the context is full.
  const absl::StatusOr<CompletionCall> d =
      ChatFromJson(R"({"model": "m", "messages": [{"role": "user", "content": "x"}]})", &param);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->default_max_tokens);
  EXPECT_FALSE(d->request.sampling().has_logprobs());
  // The chat API's log-probabilities: logprobs true, top_logprobs alternatives.
  const absl::StatusOr<CompletionCall> lp = ChatFromJson(
      R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true,
          "top_logprobs": 2})",
      &param);
  ASSERT_TRUE(lp.ok()) << lp.status();
  EXPECT_EQ(lp->request.sampling().logprobs(), 2u);
}

TEST(ChatFromJsonTest, ToolsToolChoiceAndToolTurns) {
  std::string param;
  const absl::StatusOr<CompletionCall> c = ChatFromJson(R"({
    "model": "m", "messages": [
      {"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Now.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
              {"type": "function", "function": {"name": "ns.time-now"}}],
    "tool_choice": {"type": "function", "function": {"name": "ns.time-now"}},
    "parallel_tool_calls": false})",
                                                        &param);
  ASSERT_TRUE(c.ok()) << c.status() << " " << param;
  ASSERT_EQ(c->messages.size(), 3u);
  EXPECT_FALSE(c->messages[1].content.has_value());
  ASSERT_EQ(c->messages[1].tool_calls.size(), 1u);
  EXPECT_EQ(c->messages[1].tool_calls[0],
            (ToolCall{"call_1", "get_weather", "{\"city\": \"Paris\"}"}));
  EXPECT_EQ(c->messages[2].role, "tool");
  EXPECT_EQ(c->messages[2].tool_call_id, "call_1");
  EXPECT_EQ(c->messages[2].content, "18 C");
  ASSERT_EQ(c->tools.size(), 2u);
  EXPECT_EQ(c->tools[0].Get("function").Get("description").s(), "Now.");
  EXPECT_EQ(c->tool_names, (std::vector<std::string>{"get_weather", "ns.time-now"}));
  EXPECT_EQ(c->tool_choice, ToolChoice::kNamed);
  EXPECT_EQ(c->tool_choice_name, "ns.time-now");
  // Tools without a tool_choice: auto; "none" keeps them for the prompt.
  for (const auto& [choice, want] : {std::pair<std::string, ToolChoice>{"", ToolChoice::kAuto},
                                     {R"(, "tool_choice": "none")", ToolChoice::kNone},
                                     {R"(, "tool_choice": "required")", ToolChoice::kRequired}}) {
    const absl::StatusOr<CompletionCall> d =
        ChatFromJson(absl::StrCat(R"({"model": "m", "messages": [{"role": "user", "content": "x"}],
                        "tools": [{"type": "function", "function": {"name": "f"}}])",
                                  choice, "}"),
                     &param);
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->tool_choice, want) << choice;
    EXPECT_EQ(d->tools.size(), 1u);
  }
}

TEST(ChatFromJsonTest, ToolParameterTypesComeFromTheSchemas) {
  std::string param;
  const absl::StatusOr<CompletionCall> c = ChatFromJson(R"({
    "model": "m", "messages": [{"role": "user", "content": "x"}],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"a": {"type": "integer"}, "b": {"type": ["string", "null"]},
                     "c": {"anyOf": [{"type": "number"}, {"type": "null"}]},
                     "d": {"enum": ["x", "y"]}}}}},
              {"type": "function", "function": {"name": "g"}}]})",
                                                        &param);
  ASSERT_TRUE(c.ok()) << c.status();
  const ToolParamTypes types = ParamTypesOf(c->tools);
  EXPECT_EQ(
      types,
      (ToolParamTypes{
          {"f",
           {{"a", {"integer"}}, {"b", {"string", "null"}}, {"c", {"number", "null"}}, {"d", {}}}},
          {"g", {}}}));
}

TEST(ChatFromJsonTest, RefusalsNameTheField) {
  struct Case {
    const char* body;
    const char* param;
    const char* says;
  };
  for (
      const Case& c : {
          Case{R"({"model": "m"})", "messages", "messages"},
          Case{R"({"model": "m", "messages": []})", "messages", "empty"},
          Case{R"({"model": "m", "messages": [{"role": "robot", "content": "x"}]})", "messages",
               "messages[0].role"},
          Case{R"({"model": "m", "messages": [{"role": "user"}]})", "messages", "content"},
          Case{
              R"({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
              "messages", "only text"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}],
                    "top_logprobs": 2})",
               "top_logprobs", "needs"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true,
                    "top_logprobs": 99})",
               "top_logprobs", "0 to 20"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]})",
               "tools", "tools[0].type"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools":
                    [{"type": "function", "function": {"name": "a b"}}]})",
               "tools", "tools[0].function.name\" must be 1 to 64 letters"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools":
                    [{"type": "function", "function": {"name": "f"}},
                     {"type": "function", "function": {"name": "f"}}]})",
               "tools", "names \"f\" twice"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools":
                    [{"type": "function", "function": {"name": "f", "parameters": []}}]})",
               "tools", "JSON Schema object"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools":
                    [{"type": "function", "function": {"name": "f",
                      "parameters": {"type": "string"}}}]})",
               "tools", "tools[0].function.parameters.type\" must be \"object\""},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools":
                    [{"type": "function", "function": {"name": "f"}}],
                    "tool_choice": {"type": "function", "function": {"name": "g"}}})",
               "tool_choice", "not one of the tools"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}],
                    "tool_choice": "required"})",
               "tool_choice", "no tools"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools":
                    [{"type": "function", "function": {"name": "f"}}], "tool_choice": "any"})",
               "tool_choice", "must be none, auto, required"},
          Case{R"({"model": "m", "messages": [{"role": "tool", "content": "x"}]})", "messages",
               "messages[0].tool_call_id"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}],
                    "chat_template_kwargs": [1]})",
               "chat_template_kwargs", "object"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}],
                    "chat_template_kwargs": {"messages": []}})",
               "chat_template_kwargs", "gives the template itself"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}],
                    "continue_final_message": true})",
               "messages", "must end with an assistant message"},
          Case{R"({"model": "m", "messages": [{"role": "assistant", "content": "x"}],
                    "continue_final_message": true, "add_generation_prompt": true})",
               "add_generation_prompt", "must be false"},
          Case{R"({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "1",
                    "type": "function", "function": {"name": "f", "arguments": {}}}]}]})",
               "messages", "arguments\" must be a string"},
          Case{R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 99})", "n",
               "1 to 16"},
      }) {
    std::string param;
    const absl::StatusOr<CompletionCall> r = ChatFromJson(c.body, &param);
    ASSERT_FALSE(r.ok()) << c.body;
    EXPECT_NE(r.status().message().find(c.says), std::string::npos)
        << c.body << ": " << r.status().message();
    EXPECT_EQ(param, c.param) << c.body;
  }
}

TEST(ChatFormatTest, DetectedFromTheTemplateAndRendered) {
  EXPECT_EQ(DetectChatFormat("{{ '<|start_header_id|>' + message['role'] }}"), ChatFormat::kLlama3);
  EXPECT_EQ(DetectChatFormat("{% for m in messages %}<|im_start|>{{ m.role }}"),
            ChatFormat::kChatml);
  EXPECT_EQ(DetectChatFormat("{{ messages }}"), ChatFormat::kNone);
  // The template of a tokenizer_config.json: none, one, or the default one of a list.
  EXPECT_FALSE(ChatTemplateSource(R"({"bos_token": "<s>"})").has_value());
  EXPECT_EQ(ChatTemplateSource(R"({"chat_template": "<|im_start|>"})"), "<|im_start|>");
  EXPECT_EQ(
      ChatTemplateSource(R"({"chat_template": [{"name": "tool_use", "template": "<|im_start|>"},
                                               {"name": "default", "template": "<|start_header_id|>"}]})"),
      "<|start_header_id|>");
  EXPECT_EQ(*ChatFormatFromName("chatml"), ChatFormat::kChatml);
  EXPECT_FALSE(ChatFormatFromName("jinja").ok());

  const std::vector<ChatMessage> m = {{"system", " Be brief. "}, {"user", "Hi"}};
  EXPECT_EQ(RenderChat(ChatFormat::kLlama3, m),
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(RenderChat(ChatFormat::kChatml, m),
            "<|im_start|>system\n Be brief. <|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_STREQ(ChatEndOfTurn(ChatFormat::kLlama3), "<|eot_id|>");
  EXPECT_STREQ(ChatEndOfTurn(ChatFormat::kChatml), "<|im_end|>");
}

TEST(OpenAiErrorsTest, StatusCodesAndTheErrorObject) {
  EXPECT_EQ(HttpStatusOf(grpc::StatusCode::INVALID_ARGUMENT), 400);
  EXPECT_EQ(HttpStatusOf(grpc::StatusCode::NOT_FOUND), 404);
  EXPECT_EQ(HttpStatusOf(grpc::StatusCode::RESOURCE_EXHAUSTED), 429);
  EXPECT_EQ(HttpStatusOf(grpc::StatusCode::UNAVAILABLE), 503);
  EXPECT_EQ(HttpStatusOf(grpc::StatusCode::DEADLINE_EXCEEDED), 504);
  EXPECT_EQ(HttpStatusOf(grpc::StatusCode::INTERNAL), 500);
  EXPECT_EQ(OpenAiErrorJson(400, "a \"bad\" one", "temperature"),
            R"({"error":{"message":"a \"bad\" one","type":"invalid_request_error",)"
            R"("param":"temperature","code":400}})");
  EXPECT_EQ(OpenAiErrorJson(429, "full", ""),
            R"({"error":{"message":"full","type":"rate_limit_error","param":null,"code":429}})");
  EXPECT_STREQ(OpenAiFinishReason(v1::FINISH_REASON_LENGTH), "length");
  EXPECT_STREQ(OpenAiFinishReason(v1::FINISH_REASON_STOP_STRING), "stop");
  EXPECT_STREQ(OpenAiFinishReason(v1::FINISH_REASON_EOS), "stop");
  EXPECT_EQ(OpenAiFinishReason(v1::FINISH_REASON_UNSPECIFIED), nullptr);
}

}  // namespace
}  // namespace strata

namespace strata {
namespace {

// A model directory under TEST_TMPDIR with a Llama-2-style tokenizer (<s> added as BOS; no
// <|im_end|> token) and the given tokenizer_config.json and chat_template.jinja (empty: none).
struct ModelDir {
  std::string dir;
  std::unique_ptr<Tokenizer> tokenizer;
};
ModelDir MakeModelDir(const std::string& name, const std::string& config,
                      const std::string& jinja_file = "") {
  const char* tmp = std::getenv("TEST_TMPDIR");
  ModelDir m;
  m.dir = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/", name);
  mkdir(m.dir.c_str(), 0755);
  const std::string json = Llama2StyleTokenizerJson(
      R"("<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "b": 5)", "", 0, 1, 2);
  std::ofstream(m.dir + "/tokenizer.json") << json;
  if (!config.empty()) std::ofstream(m.dir + "/tokenizer_config.json") << config;
  if (!jinja_file.empty()) std::ofstream(m.dir + "/chat_template.jinja") << jinja_file;
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromModelDir(m.dir);
  EXPECT_TRUE(t.ok()) << t.status();
  if (t.ok()) m.tokenizer = *std::move(t);
  return m;
}

std::string Config(const std::string& chat_template) {
  return absl::StrCat(R"({"bos_token": "<s>", "eos_token": {"content": "</s>"}, )",
                      R"("chat_template": )", JsonQuote(chat_template), "}");
}

constexpr char kChatmlJinja[] =
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

TEST(LoadChatTemplateTest, RunsTheModelsOwnTemplate) {
  const ModelDir m = MakeModelDir("own_template", Config(kChatmlJinja));
  ASSERT_NE(m.tokenizer, nullptr);
  std::string note;
  const ChatTemplate chat = LoadChatTemplate(m.dir, std::nullopt, *m.tokenizer, &note);
  EXPECT_EQ(chat.format, ChatFormat::kTemplate) << note;
  EXPECT_EQ(chat.bos_token, "<s>");
  EXPECT_EQ(chat.eos_token, "</s>");  // from an AddedToken object
  EXPECT_TRUE(chat.strip_bos);        // the tokenizer adds <s> itself
  EXPECT_EQ(chat.end_marker, "<|im_end|>");
  EXPECT_FALSE(chat.end_of_turn.has_value());  // not one token here: a stop string
  absl::StatusOr<std::string> text = RenderChatTemplate(chat, {{"system", "S"}, {"user", "U"}});
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
            "<|im_start|>assistant\n");
}

TEST(LoadChatTemplateTest, GivesToolsAndDocumentsAsNoneAsTransformersDoes) {
  const ModelDir m = MakeModelDir(
      "tools_none", Config("{% if tools is not none %}TOOLS{% endif %}{% if documents is defined "
                           "and documents is none %}no documents{% endif %}"));
  std::string note;
  const ChatTemplate chat = LoadChatTemplate(m.dir, std::nullopt, *m.tokenizer, &note);
  ASSERT_EQ(chat.format, ChatFormat::kTemplate) << note;
  absl::StatusOr<std::string> text = RenderChatTemplate(chat, {{"user", "U"}});
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "no documents");
}

// A template in the shape of Qwen 2.5's: tools in a system turn, calls and their answers as turns.
constexpr char kHermesJinja[] =
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}\n{{ tool | tojson }}"
    "{% endfor %}\n</tools>\nCall one with <tool_call>\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{%- for tc in m.tool_calls %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", "
    "\"arguments\": {{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

TEST(LoadChatTemplateTest, GivesToolsAndToolTurnsToTheTemplate) {
  const ModelDir m = MakeModelDir("hermes", Config(kHermesJinja));
  std::string note;
  const ChatTemplate chat = LoadChatTemplate(m.dir, std::nullopt, *m.tokenizer, &note);
  ASSERT_EQ(chat.format, ChatFormat::kTemplate) << note;
  EXPECT_TRUE(chat.takes_tools);
  EXPECT_EQ(chat.tool_format, ToolCallFormat::kHermes);
  std::string param;
  const absl::StatusOr<CompletionCall> c = ChatFromJson(R"({
    "model": "m", "messages": [
      {"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}],
    "tools": [{"type": "function", "function": {"name": "get_weather",
               "parameters": {"type": "object"}}}]})",
                                                        &param);
  ASSERT_TRUE(c.ok()) << c.status();
  absl::StatusOr<std::string> text = RenderChatTemplate(chat, c->messages, {.tools = &c->tools});
  ASSERT_TRUE(text.ok()) << text.status();
  // As jinja2 renders it (trim_blocks: no newline after a block tag).
  EXPECT_EQ(*text,
            "<|im_start|>system\n<tools>{\"type\": \"function\", \"function\": {\"name\": "
            "\"get_weather\", \"parameters\": {\"type\": \"object\"}}}</tools>\nCall one with "
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
            "</tool_call><|im_end|><|im_start|>user\nWeather in Paris?<|im_end|>"
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
            "{\"city\": \"Paris\"}}\n</tool_call><|im_end|><|im_start|>user\n<tool_response>\n"
            "18 C\n</tool_response><|im_end|><|im_start|>assistant\n");
  // Arguments that are not a JSON object reach the template as their text.
  std::vector<ChatMessage> odd = c->messages;
  odd[1].tool_calls[0].arguments = "not json";
  text = RenderChatTemplate(chat, odd);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_TRUE(absl::StrContains(*text, "\"arguments\": \"not json\"}")) << *text;
  EXPECT_FALSE(absl::StrContains(*text, "<tools>")) << *text;  // no tools: None
}

TEST(LoadChatTemplateTest, TemplateKwargsAndContinuingTheFinalMessage) {
  const ModelDir m = MakeModelDir(
      "kwargs", Config("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}"
                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant"
                       "\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n"
                       "</think>\n\n{% endif %}{% endif %}"));
  std::string note;
  const ChatTemplate chat = LoadChatTemplate(m.dir, std::nullopt, *m.tokenizer, &note);
  ASSERT_EQ(chat.format, ChatFormat::kTemplate) << note;
  std::string param;
  absl::StatusOr<CompletionCall> c = ChatFromJson(
      R"({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
          "chat_template_kwargs": {"enable_thinking": false}})",
      &param);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->add_generation_prompt);
  absl::StatusOr<std::string> text =
      RenderChatTemplate(chat, c->messages, {.template_kwargs = &c->template_kwargs});
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
  text = RenderChatTemplate(chat, c->messages, {.add_generation_prompt = false});
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "<|im_start|>user\nHi<|im_end|>\n");

  // The answer goes on from the final message's content: trimmed where the template trims it (as
  // transformers continues), whole where it does not.
  c = ChatFromJson(R"({"model": "m", "messages": [{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello, "}],
                       "continue_final_message": true})",
                   &param);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->add_generation_prompt);
  const ChatRenderOptions go_on{.continue_final_message = true};
  text = RenderChatTemplate(chat, c->messages, go_on);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello,");
  ChatTemplate chatml;
  chatml.format = ChatFormat::kChatml;
  text = RenderChatTemplate(chatml, c->messages, go_on);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello, ");
  ChatTemplate llama3;
  llama3.format = ChatFormat::kLlama3;
  text = RenderChatTemplate(llama3, c->messages, go_on);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text,
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>"
            "assistant<|end_header_id|>\n\nHello,");
  // A template that leaves the content out cannot be continued.
  const ModelDir drops =
      MakeModelDir("drops", Config("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}"
                                   "{% endif %}{% endfor %}"));
  const ChatTemplate dropping = LoadChatTemplate(drops.dir, std::nullopt, *drops.tokenizer, &note);
  ASSERT_EQ(dropping.format, ChatFormat::kTemplate) << note;
  text = RenderChatTemplate(dropping, c->messages, go_on);
  ASSERT_FALSE(text.ok());
  EXPECT_TRUE(absl::StrContains(text.status().message(), "continue_final_message"));
}

TEST(LoadChatTemplateTest, ReadsChatTemplateJinjaBesideTheConfig) {
  const ModelDir m = MakeModelDir("jinja_file", R"({"bos_token": "<s>"})", kChatmlJinja);
  std::string note;
  const ChatTemplate chat = LoadChatTemplate(m.dir, std::nullopt, *m.tokenizer, &note);
  EXPECT_EQ(chat.format, ChatFormat::kTemplate) << note;
}

TEST(LoadChatTemplateTest, FallsBackToTheFormatItsMarkersName) {
  // Beyond the subset ({% call %}): ChatML by its markers.
  {
    const ModelDir m =
        MakeModelDir("beyond", Config("{% call foo() %}{% endcall %}<|im_start|>{{ messages }}"));
    std::string note;
    const ChatTemplate chat = LoadChatTemplate(m.dir, std::nullopt, *m.tokenizer, &note);
    EXPECT_EQ(chat.format, ChatFormat::kChatml);
    EXPECT_TRUE(absl::StrContains(note, "beyond")) << note;
  }
  // Fails on a one-message conversation: Llama 3 by its markers.
  {
    const ModelDir m = MakeModelDir(
        "refuses", Config("{% if messages[0].role != 'system' %}{{ raise_exception('system "
                          "first') }}{% endif %}<|start_header_id|>"));
    std::string note;
    const ChatTemplate chat = LoadChatTemplate(m.dir, std::nullopt, *m.tokenizer, &note);
    EXPECT_EQ(chat.format, ChatFormat::kLlama3);
    EXPECT_TRUE(absl::StrContains(note, "system first")) << note;
  }
  // No template at all, and --chat_format over a template.
  {
    const ModelDir m = MakeModelDir("none", R"({"bos_token": "<s>"})");
    std::string note;
    EXPECT_EQ(LoadChatTemplate(m.dir, std::nullopt, *m.tokenizer, &note).format, ChatFormat::kNone);
    const ModelDir t = MakeModelDir("forced", Config(kChatmlJinja));
    EXPECT_EQ(LoadChatTemplate(t.dir, ChatFormat::kLlama3, *t.tokenizer, &note).format,
              ChatFormat::kLlama3);
  }
}

TEST(LoadChatTemplateTest, ARefusedConversationIsInvalidArgument) {
  const ModelDir m = MakeModelDir(
      "alternate", Config("{% for m in messages %}{% if (m.role == 'user') != loop.index0 is even "
                          "%}{{ raise_exception('roles must alternate') }}{% endif %}{{ m.content "
                          "}}{% endfor %}"));
  std::string note;
  const ChatTemplate chat = LoadChatTemplate(m.dir, std::nullopt, *m.tokenizer, &note);
  ASSERT_EQ(chat.format, ChatFormat::kTemplate) << note;
  absl::StatusOr<std::string> text = RenderChatTemplate(chat, {{"user", "a"}, {"user", "b"}});
  ASSERT_FALSE(text.ok());
  EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(text.status().message(), "roles must alternate"));
}

}  // namespace
}  // namespace strata
