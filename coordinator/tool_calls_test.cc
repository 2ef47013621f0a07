#include "coordinator/tool_calls.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grammar/gbnf.h"
#include "grammar/json_schema.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

// A parse's content and calls, ids left out (they are random).
struct Parsed {
  std::string content;
  std::vector<std::pair<std::string, std::string>> calls;  // name, arguments
  bool operator==(const Parsed&) const = default;
};

std::ostream& operator<<(std::ostream& os, const Parsed& p) {
  os << "content \"" << p.content << "\", calls:";
  for (const auto& [name, args] : p.calls) os << " " << name << args;
  return os;
}

void Append(const ToolCallParser::Output& o, Parsed* p) {
  p->content += o.content;
  for (const ToolCall& c : o.calls) p->calls.emplace_back(c.name, c.arguments);
}

// `text` given whole.
Parsed Whole(ToolCallFormat format, const std::string& text, const std::string& forced = "") {
  ToolCallParser parser(format, forced);
  Parsed p;
  Append(parser.Add(text), &p);
  Append(parser.Finish(), &p);
  return p;
}

// `text` cut at `cuts` (ascending offsets).
Parsed Pieces(ToolCallFormat format, const std::string& text, const std::vector<size_t>& cuts) {
  ToolCallParser parser(format);
  Parsed p;
  size_t at = 0;
  for (size_t cut : cuts) {
    Append(parser.Add(text.substr(at, cut - at)), &p);
    at = cut;
  }
  Append(parser.Add(text.substr(at)), &p);
  Append(parser.Finish(), &p);
  return p;
}

TEST(ToolCallParserTest, HermesCallsAndTheTextAroundThem) {
  const std::string text =
      "Let me check both.\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
      "{\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>\n<tool_call>\n{\"arguments\": "
      "{\"city\":\"Oslo\"}, \"name\": \"get_weather\"}\n</tool_call>\n";
  ToolCallParser parser(ToolCallFormat::kHermes);
  ToolCallParser::Output a = parser.Add(text);
  ToolCallParser::Output b = parser.Finish();
  EXPECT_EQ(a.content, "Let me check both.");
  EXPECT_EQ(b.content, "");
  ASSERT_EQ(a.calls.size(), 2u);
  EXPECT_EQ(a.calls[0].name, "get_weather");
  // The arguments as the model wrote them.
  EXPECT_EQ(a.calls[0].arguments, "{\"city\": \"Paris\", \"unit\": \"c\"}");
  EXPECT_EQ(a.calls[1].arguments, "{\"city\":\"Oslo\"}");
  EXPECT_TRUE(absl::StartsWith(a.calls[0].id, "call_"));
  EXPECT_EQ(a.calls[0].id.size(), 29u);
  EXPECT_NE(a.calls[0].id, a.calls[1].id);
  EXPECT_EQ(parser.num_calls(), 2);
}

TEST(ToolCallParserTest, TextWithoutCallsComesOutWhole) {
  for (ToolCallFormat f : {ToolCallFormat::kHermes, ToolCallFormat::kLlama3Json,
                           ToolCallFormat::kMistral, ToolCallFormat::kNone}) {
    for (const std::string text : {"  Hello, world!  \n", "a < b and {x} [y]", "", " \n "}) {
      EXPECT_EQ(Whole(f, text), (Parsed{text, {}})) << ToolCallFormatName(f) << ": " << text;
    }
  }
}

TEST(ToolCallParserTest, WhatDoesNotParseStaysInTheTextAsWritten) {
  // Not JSON, no name, arguments that are not an object: content, word for word.
  for (const std::string text :
       {"Hi <tool_call>{\"name\": \"f\", \"arguments\": {oops}}</tool_call> there",
        "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
        "x\n<tool_call>{\"name\": \"f\", \"arguments\": 3}</tool_call>\n",
        "<tool_call>{\"name\": \"\"}</tool_call>",
        "cut short <tool_call>{\"name\": \"f\", \"argu"}) {
    EXPECT_EQ(Whole(ToolCallFormat::kHermes, text), (Parsed{text, {}})) << text;
  }
  // One good call among bad ones: the bad one's text stays, with the whitespace before it.
  EXPECT_EQ(Whole(ToolCallFormat::kHermes,
                  "<tool_call>{\"name\": \"f\"}</tool_call>\n<tool_call>nope</tool_call> ok"),
            (Parsed{"<tool_call>nope</tool_call> ok", {{"f", "{}"}}}));
  for (const std::string text : {"{\"name\": \"f\", \"parameters\": {}} trailing", "{not json}",
                                 "<|python_tag|>brave_search.call(query=\"x\")",
                                 " {\"name\": \"f\", \"parameters\": {}}; {\"name\": 1}"}) {
    EXPECT_EQ(Whole(ToolCallFormat::kLlama3Json, text), (Parsed{text, {}})) << text;
  }
  for (const std::string text : {"[TOOL_CALLS] [{\"name\": \"f\"", "[TOOL_CALLS]f g[ARGS]{}",
                                 "[TOOL_CALLS]f[ARGS][1]", "[TOOL_CALLS]{\"name\": \"f\"}"}) {
    EXPECT_EQ(Whole(ToolCallFormat::kMistral, text), (Parsed{text, {}})) << text;
  }
}

TEST(ToolCallParserTest, HermesCallWithoutItsCloseStillCounts) {
  EXPECT_EQ(Whole(ToolCallFormat::kHermes,
                  "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, {\"b\": \"}\"}]}}\n"),
            (Parsed{"", {{"f", "{\"a\": [1, {\"b\": \"}\"}]}"}}}));
}

TEST(ToolCallParserTest, ArgumentsQuotedOrMissing) {
  EXPECT_EQ(Whole(ToolCallFormat::kHermes,
                  "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>"),
            (Parsed{"", {{"f", "{\"a\": 1}"}}}));
  EXPECT_EQ(Whole(ToolCallFormat::kHermes,
                  "<tool_call>{\"name\": \"f\", \"arguments\": null}</tool_call>"),
            (Parsed{"", {{"f", "{}"}}}));
  const std::string quoted_list =
      "<tool_call>{\"name\": \"f\", \"arguments\": \"[1]\"}</tool_call>";
  EXPECT_EQ(Whole(ToolCallFormat::kHermes, quoted_list), (Parsed{quoted_list, {}}));
}

TEST(ToolCallParserTest, Llama3JsonCalls) {
  EXPECT_EQ(Whole(ToolCallFormat::kLlama3Json,
                  "\n{\"name\": \"f\", \"parameters\": {\"q\": \"a;b\"}}; {\"name\": \"g\", "
                  "\"parameters\": {}}\n"),
            (Parsed{"", {{"f", "{\"q\": \"a;b\"}"}, {"g", "{}"}}}));
  EXPECT_EQ(Whole(ToolCallFormat::kLlama3Json,
                  "<|python_tag|>{\"name\": \"f\", \"arguments\": {\"x\": 1.5e3}}"),
            (Parsed{"", {{"f", "{\"x\": 1.5e3}"}}}));
  // A text answer streams as it comes.
  ToolCallParser parser(ToolCallFormat::kLlama3Json);
  EXPECT_EQ(parser.Add("  ").content, "");
  EXPECT_EQ(parser.Add("The answer").content, "  The answer");
  EXPECT_EQ(parser.Add(" {is} here").content, " {is} here");
}

TEST(ToolCallParserTest, MistralCallsInBothForms) {
  EXPECT_EQ(Whole(ToolCallFormat::kMistral,
                  "Sure. [TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"a\": 1}}, "
                  "{\"name\": \"g\", \"arguments\": {}}]"),
            (Parsed{"Sure.", {{"f", "{\"a\": 1}"}, {"g", "{}"}}}));
  EXPECT_EQ(Whole(ToolCallFormat::kMistralArgs,
                  "[TOOL_CALLS]f[ARGS]{\"a\": 1}[TOOL_CALLS]g[CALL_ID]abc123XYZ[ARGS] {}"),
            (Parsed{"", {{"f", "{\"a\": 1}"}, {"g", "{}"}}}));
  ToolCallParser again(ToolCallFormat::kMistral);
  again.Add("[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}]");
  const ToolCallParser::Output done = again.Finish();
  ASSERT_EQ(done.calls.size(), 1u);
  // Mistral's templates take only ids of 9 letters or digits.
  EXPECT_EQ(done.calls[0].id.size(), 9u);
  EXPECT_FALSE(absl::StartsWith(done.calls[0].id, "call_"));
}

TEST(ToolCallParserTest, PythonicCallsBecomeJsonArguments) {
  EXPECT_EQ(
      Whole(ToolCallFormat::kPythonic,
            " [get_weather(city='San Francisco', metric=\"celsius\"), ns.get-time(), "
            "f(a=-1.5e3, b=True, c=None, d=[1, (2, 3)], e={'k': 'v\\n\\u00e9\\'', \"x\": null}, "
            "g=.5, h=5., i=false,)]\n"),
      (Parsed{"",
              {{"get_weather", "{\"city\": \"San Francisco\", \"metric\": \"celsius\"}"},
               {"ns.get-time", "{}"},
               {"f",
                "{\"a\": -1.5e3, \"b\": true, \"c\": null, \"d\": [1, [2, 3]], \"e\": "
                "{\"k\": \"v\\n\u00e9'\", \"x\": null}, \"g\": 0.5, \"h\": 5.0, "
                "\"i\": false}"}}}));
  EXPECT_EQ(Whole(ToolCallFormat::kPythonic, "<|python_start|>[f(x=1)]<|python_end|>"),
            (Parsed{"", {{"f", "{\"x\": 1}"}}}));
  // Not a list of keyword calls: the text as written.
  for (const std::string& text :
       {std::string("[f(1)]"), std::string("[f(x=y)]"), std::string("[f(x=1)] and more"),
        std::string("[1, 2, 3]"), std::string("[f(x='a)]"), std::string("[]"),
        std::string("[f(x=007)]"), std::string("[f(x={1: 2})]"), std::string("[f(x=1) g(y=2)]"),
        std::string("Sure: [f(x=1)]"),
        "[f(x=" + std::string(200, '[') + std::string(200, ']') + ")]"}) {
    EXPECT_EQ(Whole(ToolCallFormat::kPythonic, text), (Parsed{text, {}})) << text;
  }
  EXPECT_EQ(Whole(ToolCallFormat::kPythonic, "x=1)]",
                  ForcedToolCallPrefix(ToolCallFormat::kPythonic, "f")),
            (Parsed{"", {{"f", "{\"x\": 1}"}}}));
  EXPECT_EQ(
      Whole(ToolCallFormat::kPythonic, "f()]", ForcedToolCallPrefix(ToolCallFormat::kPythonic, "")),
      (Parsed{"", {{"f", "{}"}}}));
}

TEST(ToolCallParserTest, Qwen3CoderCallsReadTheirValuesByTheSchema) {
  const ToolParamTypes types = {{"search",
                                 {{"query", {"string"}},
                                  {"limit", {"integer"}},
                                  {"exact", {"boolean"}},
                                  {"filters", {"object"}},
                                  {"zip", {"string"}},
                                  {"tags", {"array"}},
                                  {"other", {"array", "null"}}}}};
  const std::string text =
      "I'll search.\n<tool_call>\n<function=search>\n<parameter=query>\nline one\nline "
      "two\n</parameter>\n<parameter=limit>\n10\n</parameter>\n<parameter=exact>\ntrue\n"
      "</parameter>\n<parameter=filters>\n{\"lang\": \"en\"}\n</parameter>\n<parameter=zip>\n"
      "007\n</parameter>\n<parameter=tags>\nnot a list\n</parameter>\n<parameter=other>\n"
      "[1, 2]\n</parameter>\n</function>\n</tool_call>";
  ToolCallParser parser(ToolCallFormat::kQwen3Coder, "", &types);
  Parsed p;
  Append(parser.Add(text), &p);
  Append(parser.Finish(), &p);
  EXPECT_EQ(p, (Parsed{"I'll search.",
                       {{"search",
                         "{\"query\": \"line one\\nline two\", \"limit\": 10, \"exact\": true, "
                         "\"filters\": {\"lang\": \"en\"}, \"zip\": \"007\", \"tags\": \"not a "
                         "list\", \"other\": [1, 2]}"}}}));
  // Optional values (anyOf with null), null, integers that are not, names the schema lacks.
  const ToolParamTypes optional = {
      {"f", {{"name", {"string", "null"}}, {"n", {"integer"}}, {"m", {"number"}}, {"any", {}}}}};
  ToolCallParser typed(ToolCallFormat::kQwen3Coder, "", &optional);
  Parsed q;
  Append(typed.Add("<tool_call>\n<function=f>\n<parameter=name>\n123\n</parameter>\n"
                   "<parameter=n>\n1.5\n</parameter>\n<parameter=m>\n-2e3\n</parameter>\n"
                   "<parameter=any>\n[1]\n</parameter>\n<parameter=extra>\ntrue\n</parameter>\n"
                   "<parameter=name2>\nnull\n</parameter>\n</function>\n</tool_call>"),
         &q);
  Append(typed.Finish(), &q);
  EXPECT_EQ(q, (Parsed{"",
                       {{"f",
                         "{\"name\": \"123\", \"n\": \"1.5\", \"m\": -2e3, \"any\": "
                         "\"[1]\", \"extra\": \"true\", \"name2\": null}"}}}));
  // A </tool_call> inside a value does not end the call.
  EXPECT_EQ(Whole(ToolCallFormat::kQwen3Coder,
                  "<tool_call>\n<function=write>\n<parameter=text>\nend with </tool_call> "
                  "please\n</parameter>\n</function>\n</tool_call>"),
            (Parsed{"", {{"write", "{\"text\": \"end with </tool_call> please\"}"}}}));
  // Without the schema: JSON where the value is JSON, else text.
  EXPECT_EQ(Whole(ToolCallFormat::kQwen3Coder,
                  "<tool_call>\n<function=f>\n<parameter=a>\n42\n</parameter>\n<parameter=b>\n"
                  "hi\n</parameter>\n</function>\n</tool_call>"),
            (Parsed{"", {{"f", "{\"a\": 42, \"b\": \"hi\"}"}}}));
  // Forced: the opening is read as if written; a call cut before </function> still counts.
  EXPECT_EQ(Whole(ToolCallFormat::kQwen3Coder, "<parameter=a>\nx\n</parameter>\n",
                  ForcedToolCallPrefix(ToolCallFormat::kQwen3Coder, "f")),
            (Parsed{"", {{"f", "{\"a\": \"x\"}"}}}));
  EXPECT_EQ(Whole(ToolCallFormat::kQwen3Coder, "g>\n</function>\n</tool_call>",
                  ForcedToolCallPrefix(ToolCallFormat::kQwen3Coder, "")),
            (Parsed{"", {{"g", "{}"}}}));
  for (const std::string& bad :
       {std::string("<tool_call>\n{\"name\": \"f\"}\n</tool_call>"),
        std::string("<tool_call><function=f><parameter=a>x</tool_call>"),
        std::string("<tool_call><function=>\n</function></tool_call>"),
        std::string("<tool_call><function=f></function> trailing</tool_call>"),
        std::string("<tool_call><function=get weather></function></tool_call>"),
        std::string(
            "<tool_call><function=f><parameter=a b>x</parameter></function></tool_call>")}) {
    EXPECT_EQ(Whole(ToolCallFormat::kQwen3Coder, bad), (Parsed{bad, {}})) << bad;
  }
}

constexpr char kDsCalls[] = "<｜tool▁calls▁begin｜>";
constexpr char kDsCallsEnd[] = "<｜tool▁calls▁end｜>";
constexpr char kDsCall[] = "<｜tool▁call▁begin｜>";
constexpr char kDsCallEnd[] = "<｜tool▁call▁end｜>";
constexpr char kDsSep[] = "<｜tool▁sep｜>";

TEST(ToolCallParserTest, DeepSeekCallsInBothVersions) {
  const std::string v3 = absl::StrCat("Checking.\n", kDsCalls, kDsCall, "function", kDsSep,
                                      "get_weather\n```json\n{\"city\": "
                                      "\"Paris\"}\n```",
                                      kDsCallEnd, "\n", kDsCall, "function", kDsSep,
                                      "now\n```json\n{}\n```", kDsCallEnd, kDsCallsEnd, " Done.");
  EXPECT_EQ(Whole(ToolCallFormat::kDeepSeek, v3),
            (Parsed{"Checking. Done.", {{"get_weather", "{\"city\": \"Paris\"}"}, {"now", "{}"}}}));
  // V3.1: the name before the separator, the arguments bare; the end marker cut off.
  EXPECT_EQ(Whole(ToolCallFormat::kDeepSeek,
                  absl::StrCat(kDsCalls, kDsCall, "f", kDsSep, "{\"a\": [1]}", kDsCallEnd)),
            (Parsed{"", {{"f", "{\"a\": [1]}"}}}));
  EXPECT_EQ(Whole(ToolCallFormat::kDeepSeek, "\"a\": 1}\n```" + std::string(kDsCallEnd),
                  ForcedToolCallPrefix(ToolCallFormat::kDeepSeek, "f")),
            (Parsed{"", {{"f", "{\"a\": 1}"}}}));
  // V3.1: forced, a tool named "function", a fence that never closes.
  EXPECT_EQ(Whole(ToolCallFormat::kDeepSeekV31, "\"a\": 1}" + std::string(kDsCallEnd),
                  ForcedToolCallPrefix(ToolCallFormat::kDeepSeekV31, "f")),
            (Parsed{"", {{"f", "{\"a\": 1}"}}}));
  EXPECT_EQ(Whole(ToolCallFormat::kDeepSeekV31, absl::StrCat("g", kDsSep, "{}", kDsCallEnd),
                  ForcedToolCallPrefix(ToolCallFormat::kDeepSeekV31, "")),
            (Parsed{"", {{"g", "{}"}}}));
  EXPECT_EQ(Whole(ToolCallFormat::kDeepSeekV31,
                  absl::StrCat(kDsCalls, kDsCall, "function", kDsSep, "{\"x\":1}", kDsCallEnd)),
            (Parsed{"", {{"function", "{\"x\":1}"}}}));
  EXPECT_EQ(Whole(ToolCallFormat::kDeepSeek, "\"a\": 1}" + std::string(kDsCallEnd),
                  ForcedToolCallPrefix(ToolCallFormat::kDeepSeek, "f")),
            (Parsed{"", {{"f", "{\"a\": 1}"}}}));
  for (const std::string& bad :
       {absl::StrCat(kDsCalls, kDsCall, "function", kDsSep, "f\n```json\n{oops}\n```", kDsCallEnd,
                     kDsCallsEnd),
        absl::StrCat(kDsCalls, kDsCall, "a b", kDsSep, "{}", kDsCallEnd, kDsCallsEnd),
        absl::StrCat(kDsCalls, "junk", kDsCall, "f", kDsSep, "{}", kDsCallEnd, kDsCallsEnd),
        absl::StrCat(kDsCalls, kDsCall, "f", kDsCallEnd, kDsCallsEnd),
        absl::StrCat(kDsCalls, kDsCallsEnd)}) {
    EXPECT_EQ(Whole(ToolCallFormat::kDeepSeek, bad), (Parsed{bad, {}})) << bad;
  }
}

TEST(ToolCallParserTest, MiniMaxAndPhi4MiniCalls) {
  EXPECT_EQ(Whole(ToolCallFormat::kMiniMax,
                  "Two calls.\n<tool_calls>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n"
                  "{\"name\": \"g\", \"arguments\": {}}\n</tool_calls>"),
            (Parsed{"Two calls.", {{"f", "{\"a\": 1}"}, {"g", "{}"}}}));
  EXPECT_EQ(Whole(ToolCallFormat::kPhi4Mini,
                  "functools[{\"name\": \"f\", \"arguments\": {\"a\": 1}}, {\"name\": \"g\", "
                  "\"arguments\": {}}]"),
            (Parsed{"", {{"f", "{\"a\": 1}"}, {"g", "{}"}}}));
  for (ToolCallFormat f : {ToolCallFormat::kMiniMax, ToolCallFormat::kPhi4Mini}) {
    EXPECT_EQ(Whole(f, "\"x\": 1}}" + std::string(f == ToolCallFormat::kPhi4Mini ? "]" : "\n"),
                    ForcedToolCallPrefix(f, "h")),
              (Parsed{"", {{"h", "{\"x\": 1}"}}}))
        << ToolCallFormatName(f);
  }
  // Python's functools is text; so is what does not parse.
  for (const std::string& text :
       {std::string("import functools; functools.reduce(f, xs)"),
        std::string("functools[{\"name\": \"f\"}] and more"),
        std::string("<tool_calls>\n{\"name\": \"f\"}{\"name\": \"g\"}\n</tool_calls>"),
        std::string("<tool_calls>\n\n</tool_calls>")}) {
    const ToolCallFormat f =
        absl::StrContains(text, "functools") ? ToolCallFormat::kPhi4Mini : ToolCallFormat::kMiniMax;
    EXPECT_EQ(Whole(f, text), (Parsed{text, {}})) << text;
  }
}

TEST(ToolCallParserTest, InternLm2Calls) {
  EXPECT_EQ(Whole(ToolCallFormat::kInternLm2,
                  "Let me look.<|action_start|><|plugin|>\n{\"name\": \"f\", \"arguments\": "
                  "{\"q\": \"<|action_end|>\"}}<|action_end|>"),
            (Parsed{"Let me look.", {{"f", "{\"q\": \"<|action_end|>\"}"}}}));
  EXPECT_EQ(Whole(ToolCallFormat::kInternLm2, "\"x\": 1}}<|action_end|>",
                  ForcedToolCallPrefix(ToolCallFormat::kInternLm2, "h")),
            (Parsed{"", {{"h", "{\"x\": 1}"}}}));
  const std::string bad = "<|action_start|><|plugin|>\nnot json<|action_end|>";
  EXPECT_EQ(Whole(ToolCallFormat::kInternLm2, bad), (Parsed{bad, {}}));
}

TEST(ToolCallParserTest, TextIsNotHeldLongerThanAMarkerCouldNeed) {
  ToolCallParser parser(ToolCallFormat::kHermes);
  EXPECT_EQ(parser.Add("Hello world").content, "Hello world");
  EXPECT_EQ(parser.Add(", and <tool").content, ", and");
  ToolCallParser p2(ToolCallFormat::kHermes);
  EXPECT_EQ(p2.Add("a b").content, "a b");
  EXPECT_EQ(p2.Add(" <to").content, "");
  EXPECT_EQ(p2.Add("day> c").content, " <today> c");
  EXPECT_EQ(p2.Finish().content, "");
}

// However the text is cut, the same content and calls.
TEST(ToolCallParserTest, TheSameResultHoweverTheTextArrives) {
  const std::vector<std::pair<ToolCallFormat, std::string>> cases = {
      {ToolCallFormat::kHermes,
       "I'll look. \n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"s\": \"</tool_call>?\"}}\n"
       "</tool_call>\n\n<tool_call>bad</tool_call> then <tool_call>{\"name\": \"b\"}</tool_call> "
       "end <tool"},
      {ToolCallFormat::kHermes, "no calls at all, just < and > and <tool_cal"},
      {ToolCallFormat::kLlama3Json, " <|python_tag|>{\"name\": \"a\", \"parameters\": {}}"},
      {ToolCallFormat::kLlama3Json, "\n <|python_ta is not a tag"},
      {ToolCallFormat::kMistral,
       "x [TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"k\": [1, 2]}}]"},
      {ToolCallFormat::kMistralArgs, "[TOOL_CALLS]a[ARGS]{}[TOOL_CALLS]b[ARGS]{\"z\": null}"},
      // Whitespace runs longer than what is held next to a call.
      {ToolCallFormat::kHermes, "x" + std::string(300, ' ') +
                                    "\n\n<tool_call>{\"name\": \"f\"}"
                                    "</tool_call>" +
                                    std::string(280, '\n') +
                                    "<tool_call>{\"name\": "
                                    "\"g\"}</tool_call>" +
                                    std::string(270, ' ') + "y"},
      {ToolCallFormat::kLlama3Json, std::string(300, ' ') + "{\"name\": \"f\"}"},
      {ToolCallFormat::kPythonic, "\n<|python_start|>[a(x='1'), b(y=[2])]<|python_end|>"},
      {ToolCallFormat::kPythonic, " <|python_sta is text"},
      {ToolCallFormat::kQwen3Coder,
       "a <tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>"
       " b <tool_call><function=g></tool_call>"},
      {ToolCallFormat::kDeepSeek,
       absl::StrCat("x ", kDsCalls, kDsCall, "function", kDsSep, "f\n```json\n{}\n```", kDsCallEnd,
                    kDsCallsEnd, " <｜tool▁calls")},
      {ToolCallFormat::kMiniMax,
       "a <tool_calls>\n{\"name\": \"f\"}\n</tool_calls> b <tool_calls>x</tool_calls> <tool_c"},
      {ToolCallFormat::kPhi4Mini, "say functools functools[{\"name\": \"f\"}]"},
      {ToolCallFormat::kInternLm2,
       "a<|action_start|><|plugin|>{\"name\": \"f\"}<|action_end|> b <|action_start|><|plu"},
  };
  for (const auto& [format, text] : cases) {
    const Parsed whole = Whole(format, text);
    if (&text == &cases[0].second) {
      EXPECT_EQ(whole, (Parsed{"I'll look.\n\n<tool_call>bad</tool_call> then end <tool",
                               {{"a", "{\"s\": \"</tool_call>?\"}"}, {"b", "{}"}}}));
    }
    for (size_t cut = 0; cut <= text.size(); ++cut) {
      ASSERT_EQ(Pieces(format, text, {cut}), whole) << text << " cut at " << cut;
    }
    std::vector<size_t> every;
    for (size_t i = 1; i < text.size(); ++i) every.push_back(i);
    EXPECT_EQ(Pieces(format, text, every), whole) << text << " byte by byte";
  }
}

TEST(ToolCallParserTest, AForcedPrefixIsReadAsIfGenerated) {
  const struct {
    ToolCallFormat format;
    std::string rest_named, rest_any;
  } cases[] = {
      {ToolCallFormat::kHermes, "\"x\": 1}}\n</tool_call>",
       "get_weather\", \"arguments\": {\"x\": 1}}\n</tool_call>"},
      {ToolCallFormat::kLlama3Json, "\"x\": 1}}", "get_weather\", \"parameters\": {\"x\": 1}}"},
      {ToolCallFormat::kMistral, "\"x\": 1}}]", "get_weather\", \"arguments\": {\"x\": 1}}]"},
      {ToolCallFormat::kMistralArgs, "\"x\": 1}", "get_weather[ARGS]{\"x\": 1}"},
  };
  for (const auto& c : cases) {
    const Parsed want{"", {{"get_weather", "{\"x\": 1}"}}};
    EXPECT_EQ(Whole(c.format, c.rest_named, ForcedToolCallPrefix(c.format, "get_weather")), want)
        << ToolCallFormatName(c.format);
    EXPECT_EQ(Whole(c.format, c.rest_any, ForcedToolCallPrefix(c.format, "")), want)
        << ToolCallFormatName(c.format);
  }
  EXPECT_EQ(ForcedToolCallPrefix(ToolCallFormat::kHermes, "a\"b"),
            "<tool_call>\n{\"name\": \"a\\\"b\", \"arguments\": {");
  EXPECT_EQ(ForcedToolCallPrefix(ToolCallFormat::kNone, "f"), "");
}

TEST(ToolCallFormatTest, NamedAndDetectedFromTheTemplate) {
  for (ToolCallFormat f :
       {ToolCallFormat::kNone, ToolCallFormat::kHermes, ToolCallFormat::kLlama3Json,
        ToolCallFormat::kMistral, ToolCallFormat::kMistralArgs, ToolCallFormat::kPythonic,
        ToolCallFormat::kQwen3Coder, ToolCallFormat::kDeepSeek, ToolCallFormat::kDeepSeekV31,
        ToolCallFormat::kMiniMax, ToolCallFormat::kPhi4Mini, ToolCallFormat::kInternLm2}) {
    EXPECT_EQ(*ToolCallFormatFromName(ToolCallFormatName(f)), f);
  }
  EXPECT_EQ(DetectToolCallFormat("{% for t in tools %}{% endfor %}<|action_start|><|plugin|>"),
            ToolCallFormat::kInternLm2);
  EXPECT_EQ(DetectToolCallFormat("{% if tools %}respond with <tool_calls></tool_calls> XML tags"
                                 "{% endif %}"),
            ToolCallFormat::kMiniMax);
  EXPECT_EQ(DetectToolCallFormat("{% if tools %}a single JSON list formatted as functools["
                                 "{\"name\": ...}]{% endif %}"),
            ToolCallFormat::kPhi4Mini);
  EXPECT_EQ(DetectToolCallFormat("{% if tools %}{% endif %}<｜tool▁calls▁begin｜><｜tool▁call▁begin"
                                 "｜>function<｜tool▁sep｜>{{ name }}\n```json"),
            ToolCallFormat::kDeepSeek);
  EXPECT_EQ(DetectToolCallFormat("{% if tools %}{% endif %}<｜tool▁calls▁begin｜><｜tool▁call▁begin"
                                 "｜>{{ name }}<｜tool▁sep｜>{{ args }}"),
            ToolCallFormat::kDeepSeekV31);
  EXPECT_FALSE(ToolCallFormatFromName("xml").ok());
  EXPECT_EQ(DetectToolCallFormat("{% if tools %}Example Format: [func_name1(params_name1="
                                 "params_value1, params_name2=params_value2...), "
                                 "func_name2(params)]{% endif %}"),
            ToolCallFormat::kPythonic);
  EXPECT_EQ(DetectToolCallFormat("{% for tool in tools %}{{ tool | tojson }}{% endfor %}"
                                 "<tool_call>\n{\"name\": <function-name>}</tool_call>"),
            ToolCallFormat::kHermes);
  EXPECT_EQ(DetectToolCallFormat("{%- if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"),
            ToolCallFormat::kMistral);
  EXPECT_EQ(DetectToolCallFormat("{%- if tools %}{% endif %}[TOOL_CALLS]{{ n }}[ARGS]"),
            ToolCallFormat::kMistralArgs);
  EXPECT_EQ(DetectToolCallFormat("{%- if tools is not none %}Respond in the format "
                                 "{\"name\": function name, \"parameters\": dictionary of "
                                 "argument name and its value}{% endif %}"),
            ToolCallFormat::kLlama3Json);
  EXPECT_EQ(DetectToolCallFormat("<|python_tag|> but never the functions it was given"),
            ToolCallFormat::kNone);
  EXPECT_EQ(DetectToolCallFormat("{{ tools }} in some format of its own"), ToolCallFormat::kNone);
  // Qwen3-Coder's calls are XML inside <tool_call>, not Hermes' JSON.
  EXPECT_EQ(DetectToolCallFormat("{% if tools %}<tool_call>\n<function=example_function_name>"
                                 "\n<parameter=p>v</parameter></function></tool_call>{% endif %}"),
            ToolCallFormat::kQwen3Coder);
}

}  // namespace
}  // namespace strata

namespace strata {
namespace {

std::pair<std::string, std::string> Split(ReasoningFormat format, absl::string_view prompt,
                                          const std::string& text,
                                          const std::vector<size_t>& cuts = {},
                                          absl::string_view continued = "") {
  ReasoningSplitter splitter(format, ReasoningStartOf(prompt, continued));
  std::pair<std::string, std::string> out;  // reasoning, content
  auto take = [&out](const ReasoningSplitter::Output& o) {
    out.first += o.reasoning;
    out.second += o.content;
  };
  size_t at = 0;
  for (size_t cut : cuts) {
    take(splitter.Add(text.substr(at, cut - at)));
    at = cut;
  }
  take(splitter.Add(text.substr(at)));
  take(splitter.Finish());
  return out;
}

using Parts = std::pair<std::string, std::string>;

TEST(ReasoningSplitterTest, ThinkingComesApartFromTheAnswer) {
  const std::string qwen = "<|im_start|>assistant\n";
  EXPECT_EQ(Split(ReasoningFormat::kThink, qwen,
                  "<think>\nThe user greets.\n</think>\n\nHello! <think> is a tag."),
            (Parts{"The user greets.\n", "Hello! <think> is a tag."}));
  // DeepSeek-R1's template opens the reasoning itself.
  EXPECT_EQ(Split(ReasoningFormat::kThink, "<｜Assistant｜><think>\n", "Hmm.</think>42"),
            (Parts{"Hmm.", "42"}));
  // Cut short inside the reasoning: all of it is reasoning.
  EXPECT_EQ(Split(ReasoningFormat::kThink, qwen, "  <think> Still going </thi"),
            (Parts{"Still going </thi", ""}));
  // Thinking turned off by the template (Qwen3's enable_thinking false), or no <think> first:
  // the text is the answer, as written.
  EXPECT_EQ(Split(ReasoningFormat::kThink, "assistant\n<think>\n\n</think>\n\n", "  A <think>"),
            (Parts{"", "  A <think>"}));
  EXPECT_EQ(Split(ReasoningFormat::kThink, qwen, "\n <thin"), (Parts{"", "\n <thin"}));
  EXPECT_EQ(Split(ReasoningFormat::kNone, "<think>", "<think>x</think>y"),
            (Parts{"", "<think>x</think>y"}));
  // Reasoning streams as it comes, the answer too.
  ReasoningSplitter s(ReasoningFormat::kThink, ReasoningStart::kOpen);
  EXPECT_EQ(s.Add("<think>").reasoning, "");
  EXPECT_EQ(s.Add("\nStep one").reasoning, "Step one");
  EXPECT_EQ(s.Add(", two</").reasoning, ", two");
  const ReasoningSplitter::Output o = s.Add("think>\n\nDone");
  EXPECT_EQ(o.reasoning, "");
  EXPECT_EQ(o.content, "Done");
}

TEST(ReasoningSplitterTest, OnlyTheEndOfThePromptSaysWhereTheAnswerStarts) {
  EXPECT_EQ(ReasoningStartOf("user: why does <think> break?\nassistant:", ""),
            ReasoningStart::kOpen);
  EXPECT_EQ(ReasoningStartOf("assistant\n<think>\n", ""), ReasoningStart::kThinking);
  EXPECT_EQ(ReasoningStartOf("assistant\n<think>\n\n</think>\n\n", ""), ReasoningStart::kOpen);
  // Continuing the final message: where its content is.
  EXPECT_EQ(ReasoningStartOf("x", "<think>\nLet me"), ReasoningStart::kGoingOn);
  EXPECT_EQ(ReasoningStartOf("x", "<think>\n"), ReasoningStart::kThinking);
  EXPECT_EQ(ReasoningStartOf("x<think>", "The answer is"), ReasoningStart::kAnswer);
  EXPECT_EQ(ReasoningStartOf("x", "<think>a</think>b"), ReasoningStart::kAnswer);
  EXPECT_EQ(ReasoningStartOf("x<think>", " \n"), ReasoningStart::kThinking);
  // A user's <think> opens nothing: the answer is the answer.
  EXPECT_EQ(Split(ReasoningFormat::kThink, "<think> in a question\nassistant:", "It is a tag."),
            (Parts{"", "It is a tag."}));
  // Opened by the prompt, a <think> the model writes anyway is not reasoning.
  EXPECT_EQ(Split(ReasoningFormat::kThink, "assistant\n<think>\n", "\n<think>\nA</think>B"),
            (Parts{"A", "B"}));
  // Continuing reasoning text: its first characters are kept.
  EXPECT_EQ(Split(ReasoningFormat::kThink, "x", " check.</think>\nDone", {}, "<think>\nLet me"),
            (Parts{" check.", "Done"}));
  // Continuing an answer: no reasoning can come.
  EXPECT_EQ(Split(ReasoningFormat::kThink, "x", " <think>y</think>", {}, "So"),
            (Parts{"", " <think>y</think>"}));
}

TEST(ReasoningSplitterTest, TheSamePartsHoweverTheTextArrives) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", " \n<think>\n a </thinking> b</think> \n\n c </think> d"},
      {"<think>", "x</think>"},
      {"<think>", " <think> x</think> y"},
      {"<think>", " <thin"},
      {"", "<thin"},
      {"", std::string(300, ' ') + "<think>late</think>"},
      {"<think>", std::string(300, ' ') + "<think>late</think>"},
      {"<think>\n", "  \n  "},
  };
  for (const auto& [prompt, text] : cases) {
    const Parts whole = Split(ReasoningFormat::kThink, prompt, text);
    for (size_t cut = 0; cut <= text.size(); ++cut) {
      ASSERT_EQ(Split(ReasoningFormat::kThink, prompt, text, {cut}), whole)
          << text << " cut at " << cut;
    }
    std::vector<size_t> every;
    for (size_t i = 1; i < text.size(); ++i) every.push_back(i);
    EXPECT_EQ(Split(ReasoningFormat::kThink, prompt, text, every), whole) << text;
  }
  EXPECT_EQ(Split(ReasoningFormat::kThink, "", cases[0].second),
            (Parts{"a </thinking> b", "c </think> d"}));
}

TEST(ReasoningFormatTest, NamedAndDetected) {
  EXPECT_EQ(*ReasoningFormatFromName("think"), ReasoningFormat::kThink);
  EXPECT_EQ(*ReasoningFormatFromName("none"), ReasoningFormat::kNone);
  EXPECT_FALSE(ReasoningFormatFromName("r1").ok());
  EXPECT_EQ(DetectReasoningFormat("{% if '</think>' in content %}{% endif %}"),
            ReasoningFormat::kThink);
  EXPECT_EQ(DetectReasoningFormat("<|im_start|>"), ReasoningFormat::kNone);
}

}  // namespace
}  // namespace strata

namespace strata {
namespace {

// A forced call's grammar takes the forced prefix, then a well-formed call of the tool and nothing
// else; where the grammar ends, the parser reads the call (its closing marker never written).
// Qwen3-Coder's XML calls: a GBNF grammar of the parameters the schema names, typed where it types
// them; the parser reads the call where the grammar ends.
TEST(ForcedToolCallGrammarTest, Qwen3CoderCallsFollowTheParameters) {
  const std::vector<ToolSchema> tools = {
      {"book", R"({"type": "object", "properties": {"city": {"type": "string"}, "nights": {"type":)"
               R"( "integer"}, "extras": {"type": "array"}}, "required": ["city", "nights"]})"},
      {"ping", ""}};
  ToolParamTypes types = {
      {"book", {{"city", {"string"}}, {"nights", {"integer"}}, {"extras", {"array"}}}}};
  struct Case {
    std::string name, rest, bad, args;
  };
  const std::vector<Case> cases = {
      {"book",
       "<parameter=city>\nSan </param> Jose\n</parameter>\n<parameter=nights>\n3\n</parameter>\n"
       "</function>",
       "<parameter=city>\nx\n</parameter>\n<parameter=nights>\nthree\n</parameter>\n</function>",
       R"({"city": "San </param> Jose", "nights": 3})"},
      {"book",
       "<parameter=city>\nOslo\n</parameter>\n<parameter=nights>\n-1\n</parameter>\n"
       "<parameter=extras>\n[\"crib\", 2]\n</parameter>\n</function>",
       "<parameter=nights>\n1\n</parameter>\n</function>",
       R"({"city": "Oslo", "nights": -1, "extras": ["crib", 2]})"},
      {"", "ping>\n</function>", "pong>\n</function>", "{}"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.rest);
    const std::optional<ForcedCallGrammar> g =
        ForcedToolCallGrammar(ToolCallFormat::kQwen3Coder, c.name, tools, true);
    ASSERT_TRUE(g.has_value());
    ASSERT_FALSE(g->gbnf.empty());
    EXPECT_TRUE(g->prefix.empty());
    auto grammar = GbnfGrammar(g->gbnf);
    ASSERT_TRUE(grammar.ok()) << grammar.status() << "\n" << g->gbnf;
    EXPECT_TRUE(GrammarAccepts(*grammar, c.rest));
    EXPECT_FALSE(GrammarAccepts(*grammar, c.bad));
    // A value may not hold the closing tag.
    EXPECT_FALSE(
        GrammarAccepts(*grammar,
                       "<parameter=city>\na</parameter>b\n</parameter>\n<parameter=nights>\n1\n"
                       "</parameter>\n</function>"));
    ToolCallParser parser(ToolCallFormat::kQwen3Coder,
                          ForcedToolCallPrefix(ToolCallFormat::kQwen3Coder, c.name), &types);
    Parsed p;
    Append(parser.Add(c.rest), &p);
    Append(parser.Finish(), &p);
    ASSERT_EQ(p.calls.size(), 1u) << p;
    EXPECT_EQ(p.calls[0].second, c.args);
  }
}

// Pythonic calls: keyword arguments in the schema's order, Python literals typed where it types
// them, then ")]"; the parser reads the call.
TEST(ForcedToolCallGrammarTest, PythonicCallsFollowTheParameters) {
  const std::vector<ToolSchema> tools = {
      {"book", R"({"type": "object", "properties": {"city": {"type": "string"}, "nights": {"type":)"
               R"( "integer"}, "late": {"type": "boolean"}}, "required": ["city", "nights"]})"},
      {"ping", ""}};
  struct Case {
    std::string name, rest, bad, args;
  };
  const std::vector<Case> cases = {
      {"book", "city='Oslo', nights=3)]", "city='Oslo', nights='3')]",
       R"({"city": "Oslo", "nights": 3})"},
      {"book", "city=\"San Jose\",nights=-1, late=True)]", "nights=1)]",
       R"({"city": "San Jose", "nights": -1, "late": true})"},
      {"", "ping()]", "pong()]", "{}"},
      {"", "book(city='x', nights=0)]", "book(city='x')]", R"({"city": "x", "nights": 0})"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.rest);
    const std::optional<ForcedCallGrammar> g =
        ForcedToolCallGrammar(ToolCallFormat::kPythonic, c.name, tools, true);
    ASSERT_TRUE(g.has_value());
    auto grammar = GbnfGrammar(g->gbnf);
    ASSERT_TRUE(grammar.ok()) << grammar.status() << "\n" << g->gbnf;
    EXPECT_TRUE(GrammarAccepts(*grammar, c.rest));
    EXPECT_FALSE(GrammarAccepts(*grammar, c.bad));
    const Parsed p = Whole(ToolCallFormat::kPythonic, c.rest,
                           ForcedToolCallPrefix(ToolCallFormat::kPythonic, c.name));
    ASSERT_EQ(p.calls.size(), 1u) << p;
    EXPECT_EQ(p.calls[0].second, c.args);
  }
}

// What the parsers could not read back is never allowed: leading zeros, Python escapes beyond the
// simple ones, dictionary keys that are not strings, '<' in a Qwen3-Coder JSON value, names that
// are not identifiers (Python) or hold spaces (Qwen3-Coder).
TEST(ForcedToolCallGrammarTest, NothingTheParsersCannotRead) {
  const std::vector<ToolSchema> tools = {
      {"f",
       R"({"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"},)"
       R"( "d": {"type": "object"}, "first name": {"type": "string"}, "user-id": {}}})"},
      {"1x", ""}};
  auto gbnf = [&](ToolCallFormat format, const char* name) {
    const std::optional<ForcedCallGrammar> g = ForcedToolCallGrammar(format, name, tools, true);
    EXPECT_TRUE(g.has_value());
    auto grammar = GbnfGrammar(g.has_value() ? g->gbnf : "");
    EXPECT_TRUE(grammar.ok()) << grammar.status();
    return grammar.ok() ? *grammar : nullptr;
  };
  auto py = gbnf(ToolCallFormat::kPythonic, "f");
  ASSERT_NE(py, nullptr);
  EXPECT_TRUE(GrammarAccepts(py, "n=0, s='a\\'b', d={'k': [1, None]})]"));
  for (const char* bad : {"n=03)]", "s='C:\\Users')]", "d={1: 'a'})]", "user-id=1)]"}) {
    EXPECT_FALSE(GrammarAccepts(py, bad)) << bad;
  }
  EXPECT_FALSE(ForcedToolCallGrammar(ToolCallFormat::kPythonic, "1x", tools, true).has_value());
  auto xml = gbnf(ToolCallFormat::kQwen3Coder, "f");
  ASSERT_NE(xml, nullptr);
  EXPECT_TRUE(
      GrammarAccepts(xml, "<parameter=d>\n{\"a\": \"\\u003c\"}\n</parameter>\n</function>"));
  EXPECT_FALSE(
      GrammarAccepts(xml, "<parameter=d>\n{\"a\": \"</parameter>\"}\n</parameter>\n</function>"));
  EXPECT_FALSE(GrammarAccepts(xml, "<parameter=first name>\nx\n</parameter>\n</function>"));
  EXPECT_FALSE(GrammarAccepts(xml, "<parameter=n>\n007\n</parameter>\n</function>"));
}

// Parameters whose top level is not plainly an object's could let the arguments be something
// else, which would not be read as a call: any object instead.
TEST(ForcedToolCallGrammarTest, ArgumentsAreAnObjectWhateverTheParametersSay) {
  for (const char* parameters :
       {R"({"type": "string"})", R"({"anyOf": [{"type": "string"}, {"type": "object"}]})",
        R"({"$ref": "#/$defs/a", "$defs": {"a": {"type": "integer"}}})", R"({"enum": [1, 2]})"}) {
    SCOPED_TRACE(parameters);
    const std::optional<ForcedCallGrammar> g =
        ForcedToolCallGrammar(ToolCallFormat::kMistralArgs, "f", {{"f", parameters}}, true);
    ASSERT_TRUE(g.has_value());
    EXPECT_EQ(g->json_schema, R"({"type": "object"})");
  }
  // Object schemas are kept (their $id added): plain, behind a local $ref (pydantic's recursive
  // models, zod-to-json-schema's named ones), a union of objects, an allOf with one.
  for (const char* parameters :
       {R"({"type": "object", "properties": {"a": {"type": "integer"}}})",
        R"({"$ref": "#/$defs/a", "$defs": {"a": {"type": "object", "properties":)"
        R"( {"a": {"type": "integer"}}}}})",
        R"({"anyOf": [{"$ref": "#/definitions/x"}, {"type": "object"}], "definitions":)"
        R"( {"x": {"type": "object", "properties": {"a": {"type": "integer"}}}}})",
        R"({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}]})"}) {
    SCOPED_TRACE(parameters);
    const std::optional<ForcedCallGrammar> kept =
        ForcedToolCallGrammar(ToolCallFormat::kMistralArgs, "f", {{"f", parameters}}, true);
    ASSERT_TRUE(kept.has_value());
    EXPECT_NE(kept->json_schema.find(R"("a": {"type": "integer"})"), std::string::npos);
    EXPECT_TRUE(JsonSchemaGrammar(kept->json_schema, "parameters").ok());
  }
}

TEST(ForcedToolCallGrammarTest, KeepsTheCallWellFormedAndParseable) {
  const std::vector<ToolSchema> tools = {
      {"get_weather",
       R"({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})"},
      {"get_time", ""}};
  struct Case {
    ToolCallFormat format;
    std::string name;
    std::string rest;  // what the model writes after the forced prefix
    std::string bad;   // a continuation the grammar refuses
  };
  const std::string args = R"("city": "Oslo"})";
  const std::vector<Case> cases = {
      {ToolCallFormat::kHermes, "get_weather", args + "}", R"("city": 5}})"},
      {ToolCallFormat::kLlama3Json, "get_weather", args + "}", R"("town": "Oslo"}})"},
      {ToolCallFormat::kMiniMax, "get_weather", args + "}", R"("city": "Oslo"})"},
      {ToolCallFormat::kInternLm2, "get_weather", args + "}", R"(})"},
      {ToolCallFormat::kMistral, "get_weather", args + "}]", R"("city": "Oslo"}}, 1])"},
      {ToolCallFormat::kPhi4Mini, "get_weather", args + "}]", R"("city": ["Oslo"]}}])"},
      {ToolCallFormat::kMistralArgs, "get_weather", args, R"("city": null})"},
      {ToolCallFormat::kDeepSeek, "get_weather", args, R"("city": "Oslo", "x": 1})"},
      {ToolCallFormat::kDeepSeekV31, "get_weather", args, R"("city": "Oslo"}})"},
      // Any tool: the name too comes under the grammar.
      {ToolCallFormat::kHermes, "", R"(get_weather", "arguments": {"city": "Oslo"}})",
       R"(get_wether", "arguments": {"city": "Oslo"}})"},
      {ToolCallFormat::kMistral, "", R"(get_weather", "arguments": {"city": "Oslo"}}])",
       R"(get_time", "arguments": 1}])"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(absl::StrCat(ToolCallFormatName(c.format), " ", c.name));
    const std::optional<ForcedCallGrammar> g =
        ForcedToolCallGrammar(c.format, c.name, tools, /*parallel=*/true);
    ASSERT_TRUE(g.has_value());
    const std::string forced = ForcedToolCallPrefix(c.format, c.name);
    EXPECT_TRUE(absl::EndsWith(forced, g->prefix)) << forced << " / " << g->prefix;
    auto grammar = JsonSchemaGrammar(g->json_schema, "schema");
    ASSERT_TRUE(grammar.ok()) << grammar.status() << "\n" << g->json_schema;
    GrammarMatcher m(*grammar);
    ASSERT_TRUE(m.Advance(g->prefix));
    GrammarMatcher bad = m;
    EXPECT_FALSE(bad.Advance(c.bad) && bad.IsComplete()) << c.bad;
    ASSERT_TRUE(m.Advance(c.rest)) << c.rest;
    EXPECT_TRUE(m.IsComplete());
    EXPECT_FALSE(m.CanContinue());
    const Parsed p = Whole(c.format, c.rest, forced);
    ASSERT_EQ(p.calls.size(), 1u) << p;
    EXPECT_EQ(p.calls[0].first, "get_weather");
    EXPECT_EQ(p.calls[0].second, R"({"city": "Oslo"})");
    EXPECT_EQ(p.content, "");
  }
  // The parameters' own references stay theirs inside the call's schema, and arguments are an
  // object whatever the parameters say.
  const std::vector<ToolSchema> referring = {
      {"tree", R"({"$defs": {"leaf": {"type": "integer"}}, "type": "object", "properties": {)"
               R"("leaf": {"$ref": "#/$defs/leaf"}, "child": {"$ref": "#"}}})"},
      {"anything", "{}"}};
  for (const char* name : {"tree", ""}) {
    auto tree = JsonSchemaGrammar(
        ForcedToolCallGrammar(ToolCallFormat::kHermes, name, referring, true)->json_schema, "s");
    ASSERT_TRUE(tree.ok()) << tree.status();
    EXPECT_TRUE(GrammarAccepts(
        *tree, R"({"name": "tree", "arguments": {"leaf": 1, "child": {"child": {"leaf": 2}}}})"));
    EXPECT_FALSE(GrammarAccepts(*tree, R"({"name": "tree", "arguments": {"leaf": "x"}})"));
    EXPECT_FALSE(GrammarAccepts(
        *tree, R"({"name": "tree", "arguments": {"child": {"name": "tree", "arguments": {}}}})"));
    EXPECT_EQ(GrammarAccepts(*tree, R"({"name": "anything", "arguments": {"x": [1]}})"),
              std::string(name).empty());
    EXPECT_FALSE(GrammarAccepts(*tree, R"({"name": "anything", "arguments": 5})"));
  }

  // One call only unless parallel calls are allowed (a list format can hold several).
  auto one = JsonSchemaGrammar(
      ForcedToolCallGrammar(ToolCallFormat::kMistral, "get_time", tools, false)->json_schema, "s");
  ASSERT_TRUE(one.ok());
  EXPECT_TRUE(GrammarAccepts(*one, R"([{"name": "get_time", "arguments": {}}])"));
  EXPECT_FALSE(GrammarAccepts(
      *one, R"([{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}])"));
  // No grammar for formats that name the function outside the JSON when unnamed.
  EXPECT_FALSE(ForcedToolCallGrammar(ToolCallFormat::kDeepSeek, "", tools, true));
  EXPECT_FALSE(ForcedToolCallGrammar(ToolCallFormat::kHermes, "unknown", tools, true));
}

}  // namespace
}  // namespace strata
