// Generated text as the chat API reads it: tool calls (ToolCallParser) in every format, and
// reasoning (ReasoningSplitter), from untrusted bytes (a model writes whatever it writes).
//
// Input: one option byte, four bytes seeding where the text is split, then the text. Bits 0-3 of
// the option byte pick the format (ToolCallFormat 0 to 11), bit 4 a forced call's prefix (of any
// function) before it, bits 5-6 the reasoning's start (ReasoningStart).
//
// Checks the parsers' promise: the same text gives the same content and calls however it arrives
// (whole, a byte at a time, or in random pieces); every call has a name and a JSON object for its
// arguments; the content is never longer than the text given (with the forced prefix), nor the
// reasoning and the answer together.
#include <random>
#include <string>
#include <vector>

#include "common/json.h"
#include "coordinator/tool_calls.h"
#include "tests/fuzz/fuzz_target.h"

namespace {

// The text in pieces: whole (mode 0), a byte at a time (1), or random pieces of up to 16 bytes.
std::vector<absl::string_view> Pieces(absl::string_view text, int mode, std::mt19937& rng) {
  std::vector<absl::string_view> out;
  size_t at = 0;
  while (at < text.size()) {
    const size_t n = mode == 0 ? text.size() : mode == 1 ? 1 : 1 + rng() % 16;
    out.push_back(text.substr(at, n));
    at += out.back().size();
  }
  return out;
}

struct Calls {
  std::string content;
  std::vector<strata::ToolCall> calls;
};

Calls ParseCalls(strata::ToolCallFormat format, absl::string_view forced,
                 const std::vector<absl::string_view>& pieces) {
  strata::ToolCallParser parser(format, forced);
  Calls out;
  auto take = [&out](strata::ToolCallParser::Output o) {
    out.content += o.content;
    for (strata::ToolCall& c : o.calls) {
      c.id.clear();  // random
      out.calls.push_back(std::move(c));
    }
  };
  for (absl::string_view p : pieces) take(parser.Add(p));
  take(parser.Finish());
  return out;
}

std::pair<std::string, std::string> Split(strata::ReasoningStart start,
                                          const std::vector<absl::string_view>& pieces) {
  strata::ReasoningSplitter splitter(strata::ReasoningFormat::kThink, start);
  std::string reasoning, content;
  for (absl::string_view p : pieces) {
    strata::ReasoningSplitter::Output o = splitter.Add(p);
    reasoning += o.reasoning;
    content += o.content;
  }
  strata::ReasoningSplitter::Output o = splitter.Finish();
  return {reasoning + o.reasoning, content + o.content};
}

}  // namespace

STRATA_FUZZ_TARGET(data, size) {
  strata::fuzz::FuzzInput in(data, size);
  const uint8_t options = in.Byte();
  std::mt19937 rng(in.Uint32());
  const auto format = static_cast<strata::ToolCallFormat>((options & 15) % 12);
  const std::string forced =
      (options & 16) != 0 ? strata::ForcedToolCallPrefix(format, "") : std::string();
  const auto start = static_cast<strata::ReasoningStart>((options >> 5) & 3);
  const absl::string_view text = in.Rest();

  const Calls whole = ParseCalls(format, forced, Pieces(text, 0, rng));
  for (int mode : {1, 2}) {
    const Calls split = ParseCalls(format, forced, Pieces(text, mode, rng));
    FUZZ_CHECK(split.content == whole.content, "format %s: content \"%s\" in pieces, \"%s\" whole",
               strata::ToolCallFormatName(format), split.content.c_str(), whole.content.c_str());
    FUZZ_CHECK(split.calls == whole.calls, "format %s: %zu calls in pieces, %zu whole",
               strata::ToolCallFormatName(format), split.calls.size(), whole.calls.size());
  }
  FUZZ_CHECK(whole.content.size() <= forced.size() + text.size(), "content of %zu bytes from %zu",
             whole.content.size(), forced.size() + text.size());
  for (const strata::ToolCall& c : whole.calls) {
    FUZZ_CHECK(!c.name.empty(), "format %s: a call with no name",
               strata::ToolCallFormatName(format));
    const auto args = strata::JsonDocument::Parse(c.arguments, "arguments");
    FUZZ_CHECK(args.ok() && args->root().IsObject(), "format %s: arguments \"%s\" not an object",
               strata::ToolCallFormatName(format), c.arguments.c_str());
  }

  const auto [reasoning, answer] = Split(start, Pieces(text, 0, rng));
  for (int mode : {1, 2}) {
    const auto [r, a] = Split(start, Pieces(text, mode, rng));
    FUZZ_CHECK(r == reasoning && a == answer,
               "reasoning \"%s\" / answer \"%s\" in pieces, \"%s\" / \"%s\" whole", r.c_str(),
               a.c_str(), reasoning.c_str(), answer.c_str());
  }
  FUZZ_CHECK(reasoning.size() + answer.size() <= text.size(),
             "reasoning and answer of %zu bytes from %zu", reasoning.size() + answer.size(),
             text.size());
  return 0;
}
