// Chat templates (coordinator/jinja.h) from untrusted bytes: parsed, then rendered with a
// conversation that has a system prompt, tools, an assistant's tool call and a tool's answer.
// Templates come with the models an operator serves; a broken or hostile one must be refused with
// an error, never crash the coordinator or run without end.
//
// Input: the template's source.
//
// Checks: Parse and Render fail only with INVALID_ARGUMENT; rendering twice gives the same text
// (unless the template reads the clock).
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "common/json.h"
#include "coordinator/jinja.h"
#include "tests/fuzz/fuzz_target.h"

namespace {

constexpr char kContext[] = R"({
  "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the weather in Oslo? ünïcode 日本"},
    {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
      "function": {"name": "weather", "arguments": {"city": "Oslo", "days": 2}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"c\": -3}"},
    {"role": "assistant", "content": "<think>cold</think>It is -3 C."},
    {"role": "user", "content": "  And tomorrow?  "}
  ],
  "tools": [{"type": "function", "function": {"name": "weather", "description": "Forecast",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
    "days": {"type": "integer"}}, "required": ["city"]}}}],
  "add_generation_prompt": true,
  "bos_token": "<s>",
  "eos_token": "</s>",
  "enable_thinking": false
})";

// A fresh context for each render, as the gateway makes one per request (a template may change
// its lists and dicts).
strata::jinja::Value Context() {
  static const strata::JsonDocument* const doc = [] {
    auto d = strata::JsonDocument::Parse(kContext, "context");
    FUZZ_CHECK(d.ok(), "%s", d.status().ToString().c_str());
    return new strata::JsonDocument(*std::move(d));
  }();
  auto v = strata::jinja::Value::FromJson(doc->root());
  FUZZ_CHECK(v.ok(), "%s", v.status().ToString().c_str());
  return *std::move(v);
}

}  // namespace

STRATA_FUZZ_TARGET(data, size) {
  const absl::string_view source(reinterpret_cast<const char*>(data), size);
  const absl::StatusOr<strata::jinja::Template> t = strata::jinja::Template::Parse(source);
  if (!t.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(t.status()), "%s", t.status().ToString().c_str());
    return 0;
  }
  const absl::StatusOr<std::string> a = t->Render(Context());
  if (!a.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(a.status()), "%s", a.status().ToString().c_str());
    return 0;
  }
  if (absl::StrContains(source, "strftime")) return 0;
  const absl::StatusOr<std::string> b = t->Render(Context());
  FUZZ_CHECK(b.ok() && *a == *b, "a second render differs: %s",
             b.ok() ? b->c_str() : b.status().ToString().c_str());
  return 0;
}
