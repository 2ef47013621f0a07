// The OpenAI-compatible API's request bodies, from untrusted bytes: /v1/completions and
// /v1/chat/completions parsed (CompletionFromJson, ChatFromJson), a chat rendered by the built-in
// formats and by Qwen3's own Jinja chat template (tools included), and a forced tool call kept to
// its grammar (ConstrainForcedCall) in every tool-call format.
//
// Input: one option byte, then the body. Bit 0: a chat (else a completion); bits 1-4: the
// tool-call format (ToolCallFormat, 1 to 11) of a forced call.
//
// Checks: a refusal is INVALID_ARGUMENT (the HTTP 400 the client reads); a chat that parses renders
// or is refused with INVALID_ARGUMENT; a forced call's grammar compiles, and every call text it
// allows is read back by the format's parser as one call (or, where the tools allow several,
// calls) of a requested tool, with JSON-object arguments and nothing left over as content.
#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "common/hash.h"
#include "common/json.h"
#include "coordinator/openai_gateway.h"
#include "coordinator/tool_calls.h"
#include "grammar/grammar.h"
#include "grammar/structured_output.h"
#include "tests/fuzz/fuzz_target.h"
#include "tokenizer/tokenizer.h"

namespace {

// Qwen3's chat template (it takes tools and thinks), loaded once.
const strata::ChatTemplate& Qwen3Template() {
  static const strata::ChatTemplate* const chat = [] {
    const std::string dir = "tokenizer/testdata/qwen3_unpacked";
    auto tokenizer = strata::Tokenizer::FromModelDir(dir);
    FUZZ_CHECK(tokenizer.ok(), "%s", tokenizer.status().ToString().c_str());
    std::string note;
    auto* t =
        new strata::ChatTemplate(strata::LoadChatTemplate(dir, std::nullopt, **tokenizer, &note));
    FUZZ_CHECK(t->format == strata::ChatFormat::kTemplate, "qwen3's template: %s", note.c_str());
    return t;
  }();
  return *chat;
}

void CheckForcedCall(strata::ToolCallFormat format, strata::CompletionCall call) {
  if (call.tool_choice != strata::ToolChoice::kRequired &&
      call.tool_choice != strata::ToolChoice::kNamed) {
    return;
  }
  strata::ConstrainForcedCall(format, &call);
  const strata::v1::StructuredOutput& so = call.request.sampling().structured_output();
  if (so.kind_case() == strata::v1::StructuredOutput::KIND_NOT_SET) return;
  const auto g = strata::CompileStructuredOutput(so, "forced call");
  FUZZ_CHECK(g.ok() && *g != nullptr, "a forced call's grammar that was kept does not compile: %s",
             g.status().ToString().c_str());
  const std::string forced = strata::ForcedToolCallPrefix(format, call.tool_choice_name);
  const strata::ToolParamTypes types = strata::ParamTypesOf(call.tools);
  std::mt19937_64 rng(strata::Hash64(call.request.SerializeAsString()));
  for (int i = 0; i < 2; ++i) {
    const std::optional<std::string> sentence =
        strata::RandomSentenceFrom(*g, so.prefix(), rng, 4096);
    if (!sentence.has_value()) continue;
    FUZZ_CHECK(absl::StartsWith(*sentence, so.prefix()), "sentence \"%s\" misses prefix \"%s\"",
               sentence->c_str(), so.prefix().c_str());
    // The prompt ends with the forced prefix; the model writes the rest of the sentence.
    strata::ToolCallParser parser(format, forced, &types);
    strata::ToolCallParser::Output out = parser.Add(sentence->substr(so.prefix().size()));
    strata::ToolCallParser::Output end = parser.Finish();
    out.content += end.content;
    out.calls.insert(out.calls.end(), end.calls.begin(), end.calls.end());
    FUZZ_CHECK(!out.calls.empty(), "format %s: forced call \"%s%s\" gives no call (content \"%s\")",
               strata::ToolCallFormatName(format), forced.c_str(),
               sentence->substr(so.prefix().size()).c_str(), out.content.c_str());
    FUZZ_CHECK(out.content.find_first_not_of(" \t\r\n") == std::string::npos,
               "format %s: forced call \"%s%s\" leaves content \"%s\"",
               strata::ToolCallFormatName(format), forced.c_str(),
               sentence->substr(so.prefix().size()).c_str(), out.content.c_str());
    for (const strata::ToolCall& c : out.calls) {
      const bool known = call.tool_choice == strata::ToolChoice::kNamed
                             ? c.name == call.tool_choice_name
                             : std::find(call.tool_names.begin(), call.tool_names.end(), c.name) !=
                                   call.tool_names.end();
      FUZZ_CHECK(known, "format %s: a forced call names \"%s\", not a requested tool (\"%s\")",
                 strata::ToolCallFormatName(format), c.name.c_str(), sentence->c_str());
      const auto args = strata::JsonDocument::Parse(c.arguments, "arguments");
      FUZZ_CHECK(args.ok() && args->root().IsObject(),
                 "format %s: a forced call's arguments \"%s\" are not a JSON object",
                 strata::ToolCallFormatName(format), c.arguments.c_str());
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  Qwen3Template();
  return 0;
}

STRATA_FUZZ_TARGET(data, size) {
  strata::fuzz::FuzzInput in(data, size);
  const uint8_t options = in.Byte();
  const bool chat = (options & 1) != 0;
  const auto format = static_cast<strata::ToolCallFormat>(1 + (options >> 1) % 11);
  const absl::string_view body = in.Rest();
  std::string param;
  const absl::StatusOr<strata::CompletionCall> call =
      chat ? strata::ChatFromJson(body, &param) : strata::CompletionFromJson(body, &param);
  if (!call.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(call.status()), "%s", call.status().ToString().c_str());
    return 0;
  }
  if (!chat) return 0;
  for (strata::ChatFormat f : {strata::ChatFormat::kLlama3, strata::ChatFormat::kChatml}) {
    strata::RenderChat(f, call->messages, call->add_generation_prompt);
  }
  strata::ChatRenderOptions render;
  render.tools = &call->tools;
  render.template_kwargs = &call->template_kwargs;
  render.add_generation_prompt = call->add_generation_prompt;
  render.continue_final_message = call->continue_final_message;
  const absl::StatusOr<std::string> prompt =
      strata::RenderChatTemplate(Qwen3Template(), call->messages, render);
  if (!prompt.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(prompt.status()), "%s", prompt.status().ToString().c_str());
  }
  CheckForcedCall(format, *call);
  return 0;
}
