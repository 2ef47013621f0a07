#include "coordinator/tool_calls.h"

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/json.h"
#include "common/utf8.h"
#include "tokenizer/stop_matcher.h"

namespace strata {
namespace {

constexpr absl::string_view kHermesOpen = "<tool_call>";
constexpr absl::string_view kHermesClose = "</tool_call>";
constexpr absl::string_view kMistralOpen = "[TOOL_CALLS]";
constexpr absl::string_view kMistralArgs = "[ARGS]";
constexpr absl::string_view kMistralCallId = "[CALL_ID]";
constexpr absl::string_view kPythonTag = "<|python_tag|>";
constexpr absl::string_view kPythonStart = "<|python_start|>";
constexpr absl::string_view kPythonEnd = "<|python_end|>";
constexpr absl::string_view kDsCallsBegin = "<｜tool▁calls▁begin｜>";
constexpr absl::string_view kDsCallsEnd = "<｜tool▁calls▁end｜>";
constexpr absl::string_view kDsCallBegin = "<｜tool▁call▁begin｜>";
constexpr absl::string_view kDsCallEnd = "<｜tool▁call▁end｜>";
constexpr absl::string_view kDsSep = "<｜tool▁sep｜>";
constexpr absl::string_view kMiniMaxOpen = "<tool_calls>";
constexpr absl::string_view kMiniMaxClose = "</tool_calls>";
constexpr absl::string_view kPhiOpen = "functools[";
constexpr absl::string_view kInternOpen = "<|action_start|><|plugin|>";
constexpr absl::string_view kInternClose = "<|action_end|>";
constexpr absl::string_view kFunctionOpen = "<function=";
constexpr absl::string_view kFunctionClose = "</function>";
constexpr absl::string_view kParameterOpen = "<parameter=";
constexpr absl::string_view kParameterClose = "</parameter>";
constexpr absl::string_view kThinkOpen = "<think>";
constexpr absl::string_view kThinkClose = "</think>";
// A run of whitespace longer than this is content even next to a call (and is not held back:
// a model repeating newlines must not make each piece cost the whole run).
constexpr size_t kMaxSpaceHeld = 256;

bool IsSpace(char c) { return absl::ascii_isspace(static_cast<unsigned char>(c)); }

size_t SkipSpace(absl::string_view s, size_t i) {
  while (i < s.size() && IsSpace(s[i])) ++i;
  return i;
}

// One past the end of the JSON string whose opening quote is at s[i]; npos when it does not end.
size_t StringEnd(absl::string_view s, size_t i) {
  for (++i; i < s.size(); ++i) {
    if (s[i] == '\\') {
      ++i;
    } else if (s[i] == '"') {
      return i + 1;
    }
  }
  return absl::string_view::npos;
}

// One past the end of the JSON value starting at s[i] (strings, nesting and scalars; whether it is
// well formed is the JSON parser's to say); npos when it does not end within `s`.
size_t ValueEnd(absl::string_view s, size_t i) {
  if (i >= s.size()) return absl::string_view::npos;
  if (s[i] == '"') return StringEnd(s, i);
  if (s[i] == '{' || s[i] == '[') {
    int depth = 0;
    while (i < s.size()) {
      const char c = s[i];
      if (c == '"') {
        i = StringEnd(s, i);
        if (i == absl::string_view::npos) return i;
        continue;
      }
      if (c == '{' || c == '[') ++depth;
      if (c == '}' || c == ']') {
        if (--depth == 0) return i + 1;
      }
      ++i;
    }
    return absl::string_view::npos;
  }
  // A number or a literal: up to the next delimiter.
  const size_t start = i;
  while (i < s.size() && !IsSpace(s[i]) && s[i] != ',' && s[i] != '}' && s[i] != ']') ++i;
  return i > start ? i : absl::string_view::npos;
}

// The text of the value of the top-level member `key` of the JSON object `obj` (already checked
// to be well formed), as written.
std::optional<absl::string_view> MemberText(absl::string_view obj, absl::string_view key) {
  size_t i = SkipSpace(obj, 0);
  if (i >= obj.size() || obj[i] != '{') return std::nullopt;
  i = SkipSpace(obj, i + 1);
  while (i < obj.size() && obj[i] == '"') {
    const size_t key_end = StringEnd(obj, i);
    if (key_end == absl::string_view::npos) return std::nullopt;
    const absl::string_view k = obj.substr(i + 1, key_end - i - 2);
    i = SkipSpace(obj, key_end);
    if (i >= obj.size() || obj[i] != ':') return std::nullopt;
    i = SkipSpace(obj, i + 1);
    const size_t value_end = ValueEnd(obj, i);
    if (value_end == absl::string_view::npos) return std::nullopt;
    if (k == key) return obj.substr(i, value_end - i);
    i = SkipSpace(obj, value_end);
    if (i < obj.size() && obj[i] == ',') i = SkipSpace(obj, i + 1);
  }
  return std::nullopt;
}

// A call's arguments from their JSON text: an object as written, or a string holding one (some
// models quote them), or {} when absent or null. nullopt for anything else.
std::optional<std::string> Arguments(std::optional<absl::string_view> text) {
  if (!text.has_value() || *text == "null") return std::string("{}");
  absl::StatusOr<JsonDocument> d = JsonDocument::Parse(*text, "arguments");
  if (!d.ok()) return std::nullopt;
  if (d->root().IsObject()) return std::string(*text);
  if (!d->root().IsString()) return std::nullopt;
  const absl::string_view inner = *d->root().AsString();
  absl::StatusOr<JsonDocument> nested = JsonDocument::Parse(inner, "arguments");
  if (!nested.ok() || !nested->root().IsObject()) return std::nullopt;
  return std::string(absl::StripAsciiWhitespace(inner));
}

// {"name": ..., "arguments" (or "parameters"): {...}} as a call; nullopt when it is not one.
std::optional<ToolCall> CallOfObject(absl::string_view text, ToolCallFormat format) {
  text = absl::StripAsciiWhitespace(text);
  absl::StatusOr<JsonDocument> d = JsonDocument::Parse(text, "tool call");
  if (!d.ok() || !d->root().IsObject()) return std::nullopt;
  absl::StatusOr<absl::string_view> name = d->root().StringField("name");
  if (!name.ok() || name->empty()) return std::nullopt;
  std::optional<absl::string_view> args = MemberText(text, "arguments");
  if (!args.has_value()) args = MemberText(text, "parameters");
  std::optional<std::string> arguments = Arguments(args);
  if (!arguments.has_value()) return std::nullopt;
  return ToolCall{NewToolCallId(format), std::string(*name), *std::move(arguments)};
}

// JSON values one after another, each followed by `separator` or the end; nullopt when `text` is
// not exactly that.
std::optional<std::vector<absl::string_view>> Values(absl::string_view text, char separator) {
  std::vector<absl::string_view> out;
  size_t i = SkipSpace(text, 0);
  while (i < text.size()) {
    const size_t end = ValueEnd(text, i);
    if (end == absl::string_view::npos) return std::nullopt;
    out.push_back(text.substr(i, end - i));
    i = SkipSpace(text, end);
    if (i < text.size()) {
      if (text[i] != separator) return std::nullopt;
      i = SkipSpace(text, i + 1);
    }
  }
  return out;
}

// A JSON list of {"name", "arguments"} calls, exactly: appended to *calls; false (and perhaps some
// appended) when `text` is not one.
bool CallList(absl::string_view text, ToolCallFormat format, std::vector<ToolCall>* calls) {
  text = absl::StripAsciiWhitespace(text);
  std::optional<std::vector<absl::string_view>> list = Values(text, ',');
  if (!list.has_value() || list->size() != 1 || !absl::StartsWith(text, "[") ||
      !absl::EndsWith(text, "]")) {
    return false;
  }
  std::optional<std::vector<absl::string_view>> objects =
      Values(text.substr(1, text.size() - 2), ',');
  if (!objects.has_value() || objects->empty()) return false;
  for (absl::string_view object : *objects) {
    std::optional<ToolCall> call = CallOfObject(object, format);
    if (!call.has_value()) return false;
    calls->push_back(*std::move(call));
  }
  return true;
}

// What `held` starts with after its leading whitespace: `marker` (*end: the offset just past it),
// perhaps `marker` still arriving (or only whitespace so far), or something else (more than
// kMaxSpaceHeld bytes of whitespace count as something else).
enum class Lead { kMarker, kArriving, kOther };
Lead LeadOf(absl::string_view held, absl::string_view marker, size_t* end) {
  const size_t i = SkipSpace(held, 0);
  if (i > kMaxSpaceHeld) return Lead::kOther;
  if (i == held.size()) return Lead::kArriving;
  const absl::string_view rest = held.substr(i);
  if (absl::StartsWith(rest, marker)) {
    *end = i + marker.size();
    return Lead::kMarker;
  }
  return absl::StartsWith(marker, rest) ? Lead::kArriving : Lead::kOther;
}

// Where trailing whitespace starts in `s`.
size_t TrailingSpace(absl::string_view s) {
  size_t n = s.size();
  while (n > 0 && IsSpace(s[n - 1])) --n;
  return n;
}

// Python (or JSON) literals and keyword calls, read into JSON: [f(a=1, b='x'), g()].
class PythonCalls {
 public:
  explicit PythonCalls(absl::string_view text) : s_(text) {}

  // The list of calls, each as (name, arguments as a JSON object); nullopt unless `text` is
  // exactly such a list.
  std::optional<std::vector<std::pair<std::string, std::string>>> Parse() {
    std::vector<std::pair<std::string, std::string>> calls;
    Space();
    if (!Eat('[')) return std::nullopt;
    Space();
    while (!Eat(']')) {
      if (!calls.empty() && !(Eat(',') && (Space(), true))) return std::nullopt;
      std::string name;
      if (!Name(&name, /*dotted=*/true) || (Space(), !Eat('('))) return std::nullopt;
      std::string args(1, '{');
      Space();
      while (!Eat(')')) {
        if (args.size() > 1) {
          if (!Eat(',')) return std::nullopt;
          Space();
          if (Eat(')')) break;  // a trailing comma
        }
        std::string key;
        if (!Name(&key, /*dotted=*/false) || (Space(), !Eat('='))) return std::nullopt;
        Space();
        absl::StrAppend(&args, args.size() > 1 ? ", " : "", JsonQuote(key), ": ");
        if (!Value(&args, 0)) return std::nullopt;
        Space();
      }
      args += "}";
      calls.emplace_back(std::move(name), std::move(args));
      Space();
    }
    Space();
    if (i_ != s_.size() || calls.empty()) return std::nullopt;
    return calls;
  }

 private:
  static constexpr int kMaxDepth = 64;

  bool Eat(char c) {
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  void Space() { i_ = SkipSpace(s_, i_); }

  static bool NameChar(char c, bool first) {
    return absl::ascii_isalpha(static_cast<unsigned char>(c)) || c == '_' ||
           (!first && absl::ascii_isdigit(static_cast<unsigned char>(c)));
  }
  // An identifier (with `dotted`, a.b.c, and dashes: tool names may have them).
  bool Name(std::string* out, bool dotted) {
    const size_t start = i_;
    while (i_ < s_.size() && (NameChar(s_[i_], i_ == start) ||
                              (dotted && i_ > start && (s_[i_] == '.' || s_[i_] == '-')))) {
      ++i_;
    }
    *out = std::string(s_.substr(start, i_ - start));
    return i_ > start;
  }

  // A literal appended to `out` as JSON.
  bool Value(std::string* out, int depth) {
    if (depth > kMaxDepth || i_ >= s_.size()) return false;
    const char c = s_[i_];
    if (c == '"' || c == '\'') return String(out);
    if (c == '[' || c == '(') return Sequence(out, c == '[' ? ']' : ')', depth);
    if (c == '{') return Mapping(out, depth);
    if (c == '-' || c == '+' || c == '.' || absl::ascii_isdigit(static_cast<unsigned char>(c))) {
      return Number(out);
    }
    std::string word;
    if (!Name(&word, false)) return false;
    if (word == "True" || word == "true") {
      *out += "true";
    } else if (word == "False" || word == "false") {
      *out += "false";
    } else if (word == "None" || word == "null") {
      *out += "null";
    } else {
      return false;
    }
    return true;
  }

  bool Sequence(std::string* out, char close, int depth) {
    ++i_;
    *out += "[";
    Space();
    for (bool first = true; !Eat(close); first = false) {
      if (!first) {
        if (!Eat(',')) return false;
        Space();
        if (Eat(close)) break;
        *out += ", ";
      }
      if (!Value(out, depth + 1)) return false;
      Space();
    }
    *out += "]";
    return true;
  }

  bool Mapping(std::string* out, int depth) {
    ++i_;
    *out += "{";
    Space();
    for (bool first = true; !Eat('}'); first = false) {
      if (!first) {
        if (!Eat(',')) return false;
        Space();
        if (Eat('}')) break;
        *out += ", ";
      }
      if (i_ >= s_.size() || (s_[i_] != '"' && s_[i_] != '\'')) return false;  // string keys
      if (!String(out)) return false;
      Space();
      if (!Eat(':')) return false;
      *out += ": ";
      Space();
      if (!Value(out, depth + 1)) return false;
      Space();
    }
    *out += "}";
    return true;
  }

  // [-+]digits[.digits][e[-+]digits] (and 5. or .5), written as JSON writes it.
  bool Number(std::string* out) {
    std::string n;
    if (s_[i_] == '-' || s_[i_] == '+') {
      if (s_[i_] == '-') n += '-';
      ++i_;
    }
    auto digits = [&] {
      const size_t start = i_;
      while (i_ < s_.size() && absl::ascii_isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
      return s_.substr(start, i_ - start);
    };
    absl::string_view whole = digits();
    absl::string_view frac;
    const bool dot = Eat('.');
    if (dot) frac = digits();
    if (whole.empty() && frac.empty()) return false;
    // JSON has no leading zeros: 007 is not a number there (nor in Python 3).
    if (whole.size() > 1 && whole[0] == '0') return false;
    absl::StrAppend(&n, whole.empty() ? "0" : whole);
    if (dot) absl::StrAppend(&n, ".", frac.empty() ? "0" : frac);
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      n += 'e';
      if (i_ < s_.size() && (s_[i_] == '-' || s_[i_] == '+')) n += s_[i_++];
      const absl::string_view exp = digits();
      if (exp.empty()) return false;
      absl::StrAppend(&n, exp);
    }
    *out += n;
    return true;
  }

  // A quoted string ('...' or "...", Python's escapes), as a JSON string.
  bool String(std::string* out) {
    const char quote = s_[i_++];
    std::string text;
    while (i_ < s_.size() && s_[i_] != quote) {
      if (s_[i_] == '\n') return false;  // not in a one-line string
      if (s_[i_] != '\\') {
        text += s_[i_++];
        continue;
      }
      if (++i_ >= s_.size()) return false;
      const char e = s_[i_++];
      int hex = 0;
      switch (e) {
        case 'n':
          text += '\n';
          break;
        case 't':
          text += '\t';
          break;
        case 'r':
          text += '\r';
          break;
        case 'b':
          text += '\b';
          break;
        case 'f':
          text += '\f';
          break;
        case '0':
          text += '\0';
          break;
        case 'x':
          hex = 2;
          break;
        case 'u':
          hex = 4;
          break;
        case 'U':
          hex = 8;
          break;
        case '\\':
        case '\'':
        case '"':
        case '/':
          text += e;
          break;
        default:  // Python keeps an unknown escape as written
          text += '\\';
          text += e;
      }
      if (hex > 0) {
        if (i_ + hex > s_.size()) return false;
        uint32_t cp = 0;
        for (int k = 0; k < hex; ++k) {
          const char h = s_[i_++];
          if (!absl::ascii_isxdigit(static_cast<unsigned char>(h))) return false;
          cp = cp * 16 + static_cast<uint32_t>(absl::ascii_isdigit(static_cast<unsigned char>(h))
                                                   ? h - '0'
                                                   : absl::ascii_tolower(h) - 'a' + 10);
        }
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        AppendUtf8(cp, &text);
      }
    }
    if (!Eat(quote)) return false;
    *out += JsonQuote(text);
    return true;
  }

  absl::string_view s_;
  size_t i_ = 0;
};

// A qwen3_coder parameter's raw text as JSON, as its schema's types say (as vLLM reads them): null
// for "null"; otherwise valid JSON of one of its non-string types (an integer a JSON integer: a
// "007" or "1.5" for one is not) as written, else a string. `types` null (no schema given for
// the call at all): JSON when it parses as JSON, else a string. A parameter the schema has but
// types nowhere, or does not have, is a string.
std::string ParameterJson(absl::string_view raw, const std::vector<std::string>* types,
                          bool have_schema) {
  const absl::string_view text = absl::StripAsciiWhitespace(raw);
  if (text == "null") return "null";
  const std::string quoted = JsonQuote(raw);
  if (have_schema && types == nullptr) return quoted;
  absl::StatusOr<JsonDocument> d = JsonDocument::Parse(text, "parameter");
  if (!d.ok()) return quoted;
  const JsonValue v = d->root();
  if (types == nullptr) return std::string(text);
  const bool integral =
      v.IsNumber() && std::all_of(text.begin() + (text[0] == '-' ? 1 : 0), text.end(), [](char c) {
        return absl::ascii_isdigit(static_cast<unsigned char>(c));
      });
  for (const std::string& type : *types) {
    if ((type == "integer" && integral) || (type == "number" && v.IsNumber()) ||
        (type == "boolean" && v.IsBool()) || (type == "object" && v.IsObject()) ||
        (type == "array" && v.IsArray())) {
      return std::string(text);
    }
  }
  return quoted;
}

// <function=f>\n<parameter=a>\nvalue\n</parameter>\n...</function> (the </function> may be
// missing at the end): the call's name and its arguments as a JSON object.
std::optional<std::pair<std::string, std::string>> XmlCall(absl::string_view body,
                                                           const ToolParamTypes* types) {
  body = absl::StripAsciiWhitespace(body);
  if (!absl::ConsumePrefix(&body, kFunctionOpen)) return std::nullopt;
  const size_t name_end = body.find('>');
  if (name_end == absl::string_view::npos) return std::nullopt;
  const std::string name(absl::StripAsciiWhitespace(body.substr(0, name_end)));
  if (!IsToolName(name)) return std::nullopt;
  body.remove_prefix(name_end + 1);
  const std::map<std::string, std::vector<std::string>>* params = nullptr;
  if (types != nullptr) {
    if (auto it = types->find(name); it != types->end()) params = &it->second;
  }
  std::string args = "{";
  for (;;) {
    body = absl::StripLeadingAsciiWhitespace(body);
    if (body.empty() || absl::ConsumePrefix(&body, kFunctionClose)) break;
    if (!absl::ConsumePrefix(&body, kParameterOpen)) return std::nullopt;
    const size_t key_end = body.find('>');
    if (key_end == absl::string_view::npos) return std::nullopt;
    const std::string key(absl::StripAsciiWhitespace(body.substr(0, key_end)));
    body.remove_prefix(key_end + 1);
    const size_t value_end = body.find(kParameterClose);
    if (key.empty() ||
        std::any_of(key.begin(), key.end(), [](char c) { return IsSpace(c) || c == '<'; }) ||
        value_end == absl::string_view::npos) {
      return std::nullopt;
    }
    // The value between the newlines the format puts around it.
    absl::string_view value = body.substr(0, value_end);
    absl::ConsumePrefix(&value, "\n");
    absl::ConsumeSuffix(&value, "\n");
    const std::vector<std::string>* param_types = nullptr;
    if (params != nullptr) {
      if (auto it = params->find(key); it != params->end()) param_types = &it->second;
    }
    absl::StrAppend(&args, args.size() > 1 ? ", " : "", JsonQuote(key), ": ",
                    ParameterJson(value, param_types, /*have_schema=*/params != nullptr));
    body.remove_prefix(value_end + kParameterClose.size());
  }
  if (!absl::StripAsciiWhitespace(body).empty()) return std::nullopt;
  args += "}";
  return std::make_pair(name, std::move(args));
}

// One DeepSeek call (between its begin and end markers): "function<｜tool▁sep｜>f\n```json\n{...}
// \n```" (V3, R1) or "f<｜tool▁sep｜>{...}" (V3.1); the arguments' fence is optional either way.
std::optional<std::pair<std::string, std::string>> DeepSeekCall(absl::string_view call) {
  const size_t sep = call.find(kDsSep);
  if (sep == absl::string_view::npos) return std::nullopt;
  absl::string_view name = absl::StripAsciiWhitespace(call.substr(0, sep));
  absl::string_view args = call.substr(sep + kDsSep.size());
  // V3's "function<sep>name\n```json...", unless what follows the separator is arguments
  // (V3.1 calling a tool that is named "function").
  const absl::string_view after = absl::StripLeadingAsciiWhitespace(args);
  if (name == "function" && !absl::StartsWith(after, "{") && !absl::StartsWith(after, "`")) {
    const size_t line = args.find('\n');
    name = absl::StripAsciiWhitespace(args.substr(0, line));
    args = line == absl::string_view::npos ? "" : args.substr(line + 1);
  }
  args = absl::StripAsciiWhitespace(args);
  if (absl::ConsumePrefix(&args, "```")) {  // a fence, perhaps never closed
    absl::ConsumePrefix(&args, "json");
    absl::ConsumeSuffix(&args, "```");
    args = absl::StripAsciiWhitespace(args);
  }
  if (!IsToolName(name)) return std::nullopt;
  if (args.empty()) return std::make_pair(std::string(name), std::string("{}"));
  absl::StatusOr<JsonDocument> d = JsonDocument::Parse(args, "arguments");
  if (!d.ok() || !d->root().IsObject()) return std::nullopt;
  return std::make_pair(std::string(name), std::string(args));
}

// The markers around a format's calls: open and close (close empty: the calls run to the end).
std::pair<absl::string_view, absl::string_view> CallMarkers(ToolCallFormat format) {
  switch (format) {
    case ToolCallFormat::kHermes:
    case ToolCallFormat::kQwen3Coder:
      return {kHermesOpen, kHermesClose};
    case ToolCallFormat::kDeepSeek:
    case ToolCallFormat::kDeepSeekV31:
      return {kDsCallsBegin, kDsCallsEnd};
    case ToolCallFormat::kMiniMax:
      return {kMiniMaxOpen, kMiniMaxClose};
    case ToolCallFormat::kPhi4Mini:
      return {kPhiOpen, ""};
    case ToolCallFormat::kInternLm2:
      return {kInternOpen, kInternClose};
    default:
      return {kMistralOpen, ""};
  }
}

}  // namespace

const char* ToolCallFormatName(ToolCallFormat format) {
  switch (format) {
    case ToolCallFormat::kHermes:
      return "hermes";
    case ToolCallFormat::kLlama3Json:
      return "llama3_json";
    case ToolCallFormat::kMistral:
      return "mistral";
    case ToolCallFormat::kMistralArgs:
      return "mistral_args";
    case ToolCallFormat::kPythonic:
      return "pythonic";
    case ToolCallFormat::kQwen3Coder:
      return "qwen3_coder";
    case ToolCallFormat::kDeepSeek:
      return "deepseek";
    case ToolCallFormat::kDeepSeekV31:
      return "deepseek_v31";
    case ToolCallFormat::kMiniMax:
      return "minimax";
    case ToolCallFormat::kPhi4Mini:
      return "phi4_mini";
    case ToolCallFormat::kInternLm2:
      return "internlm2";
    case ToolCallFormat::kNone:
      break;
  }
  return "none";
}

absl::StatusOr<ToolCallFormat> ToolCallFormatFromName(absl::string_view name) {
  for (ToolCallFormat f :
       {ToolCallFormat::kNone, ToolCallFormat::kHermes, ToolCallFormat::kLlama3Json,
        ToolCallFormat::kMistral, ToolCallFormat::kMistralArgs, ToolCallFormat::kPythonic,
        ToolCallFormat::kQwen3Coder, ToolCallFormat::kDeepSeek, ToolCallFormat::kDeepSeekV31,
        ToolCallFormat::kMiniMax, ToolCallFormat::kPhi4Mini, ToolCallFormat::kInternLm2}) {
    if (name == ToolCallFormatName(f)) return f;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "no tool-call format \"", name,
      "\": hermes, llama3_json, mistral, mistral_args, pythonic, qwen3_coder, deepseek, "
      "deepseek_v31, minimax, phi4_mini, internlm2 or none"));
}

ToolCallFormat DetectToolCallFormat(absl::string_view chat_template) {
  if (!absl::StrContains(chat_template, "tools")) return ToolCallFormat::kNone;
  if (absl::StrContains(chat_template, kMiniMaxOpen)) return ToolCallFormat::kMiniMax;
  if (absl::StrContains(chat_template, kPhiOpen)) return ToolCallFormat::kPhi4Mini;
  if (absl::StrContains(chat_template, kInternOpen)) return ToolCallFormat::kInternLm2;
  if (absl::StrContains(chat_template, kDsCallsBegin)) {
    // V3 and R1 write "function<｜tool▁sep｜>name" and a fenced JSON block; V3.1 neither.
    return absl::StrContains(chat_template, absl::StrCat("function", kDsSep))
               ? ToolCallFormat::kDeepSeek
               : ToolCallFormat::kDeepSeekV31;
  }
  if (absl::StrContains(chat_template, kHermesOpen)) {
    // Qwen3-Coder's <tool_call><function=name><parameter=...> is XML, not Hermes' JSON.
    return absl::StrContains(chat_template, kFunctionOpen) ? ToolCallFormat::kQwen3Coder
                                                           : ToolCallFormat::kHermes;
  }
  if (absl::StrContains(chat_template, kMistralOpen)) {
    return absl::StrContains(chat_template, kMistralArgs) ? ToolCallFormat::kMistralArgs
                                                          : ToolCallFormat::kMistral;
  }
  // The instruction pythonic templates give: [func_name1(params_name1=params_value1, ...)].
  if (absl::StrContains(chat_template, "func_name1(")) return ToolCallFormat::kPythonic;
  if (absl::StrContains(chat_template, kPythonTag) ||
      absl::StrContains(chat_template, "\"parameters\": dictionary")) {
    return ToolCallFormat::kLlama3Json;
  }
  return ToolCallFormat::kNone;
}

bool IsToolName(absl::string_view name) {
  return !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-';
  });
}

bool operator==(const ToolCall& a, const ToolCall& b) {
  return a.id == b.id && a.name == b.name && a.arguments == b.arguments;
}

std::string NewToolCallId(ToolCallFormat format) {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  thread_local absl::BitGen gen;
  const bool mistral = format == ToolCallFormat::kMistral || format == ToolCallFormat::kMistralArgs;
  std::string id = mistral ? "" : "call_";
  for (int i = 0; i < (mistral ? 9 : 24); ++i) {
    id += kAlphabet[absl::Uniform<size_t>(gen, 0, sizeof(kAlphabet) - 1)];
  }
  return id;
}

std::string ForcedToolCallPrefix(ToolCallFormat format, absl::string_view name) {
  const std::string quoted = JsonQuote(name);
  switch (format) {
    // A named call opens its arguments' object too: they must be one.
    case ToolCallFormat::kHermes:
      return name.empty() ? "<tool_call>\n{\"name\": \""
                          : absl::StrCat("<tool_call>\n{\"name\": ", quoted, ", \"arguments\": {");
    case ToolCallFormat::kLlama3Json:
      return name.empty() ? "{\"name\": \""
                          : absl::StrCat("{\"name\": ", quoted, ", \"parameters\": {");
    case ToolCallFormat::kMistral:
      return name.empty() ? "[TOOL_CALLS][{\"name\": \""
                          : absl::StrCat("[TOOL_CALLS][{\"name\": ", quoted, ", \"arguments\": {");
    case ToolCallFormat::kMistralArgs:
      return name.empty() ? std::string(kMistralOpen)
                          : absl::StrCat(kMistralOpen, name, kMistralArgs, "{");
    case ToolCallFormat::kPythonic:
      return name.empty() ? "[" : absl::StrCat("[", name, "(");
    case ToolCallFormat::kQwen3Coder:
      return absl::StrCat(kHermesOpen, "\n", kFunctionOpen, name, name.empty() ? "" : ">\n");
    case ToolCallFormat::kDeepSeek:
      return absl::StrCat(kDsCallsBegin, kDsCallBegin, "function", kDsSep, name,
                          name.empty() ? "" : "\n```json\n{");
    case ToolCallFormat::kDeepSeekV31:
      return name.empty() ? absl::StrCat(kDsCallsBegin, kDsCallBegin)
                          : absl::StrCat(kDsCallsBegin, kDsCallBegin, name, kDsSep, "{");
    case ToolCallFormat::kMiniMax:
    case ToolCallFormat::kPhi4Mini:
    case ToolCallFormat::kInternLm2:
      return absl::StrCat(format == ToolCallFormat::kMiniMax    ? absl::StrCat(kMiniMaxOpen, "\n")
                          : format == ToolCallFormat::kPhi4Mini ? std::string(kPhiOpen)
                                                                : absl::StrCat(kInternOpen, "\n"),
                          name.empty() ? "{\"name\": \""
                                       : absl::StrCat("{\"name\": ", quoted, ", \"arguments\": {"));
    case ToolCallFormat::kNone:
      break;
  }
  return "";
}

namespace {

// `text` as a GBNF literal.
std::string GbnfQuote(absl::string_view text) {
  std::string out = "\"";
  for (char c : text) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      absl::StrAppend(&out, "\\", std::string(1, c));
    } else if (u < 0x20) {
      absl::StrAppend(&out, absl::StrFormat("\\x%02x", u));
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// A tool's parameters as its schema lists them: name, whether required, and the type it gives
// ("" when none, or several).
struct ToolParam {
  std::string key;
  bool required = false;
  std::string type;
};
std::vector<ToolParam> ParamsOf(const ToolSchema& t) {
  std::vector<ToolParam> out;
  absl::StatusOr<JsonDocument> d =
      JsonDocument::Parse(t.parameters.empty() ? "{}" : t.parameters, "parameters");
  if (!d.ok()) return out;
  std::vector<std::string> required;
  if (std::optional<JsonValue> r = d->root().FindField("required")) {
    if (absl::StatusOr<std::vector<JsonValue>> names = r->AsArray(); names.ok()) {
      for (const JsonValue& n : *names) {
        if (absl::StatusOr<absl::string_view> s = n.AsString(); s.ok()) required.emplace_back(*s);
      }
    }
  }
  if (std::optional<JsonValue> props = d->root().FindField("properties")) {
    if (auto members = props->AsObject(); members.ok()) {
      for (const auto& [key, schema] : *members) {
        ToolParam p;
        p.key = std::string(key);
        p.required = std::find(required.begin(), required.end(), key) != required.end();
        if (absl::StatusOr<absl::string_view> type = schema.StringField("type"); type.ok()) {
          p.type = std::string(*type);
        }
        out.push_back(std::move(p));
      }
    }
  }
  return out;
}

// Numbers as both JSON and Python write them, and as their parsers read them (no leading zeros).
constexpr absl::string_view kGbnfNumbers =
    "integer ::= \"-\"? (\"0\" | [1-9] [0-9]*)\n"
    "number ::= integer (\".\" [0-9]+)? ([eE] [-+]? [0-9]+)?\n";

// A Python identifier (ASCII): what the pythonic parser reads as a function or keyword name.
bool IsPythonName(absl::string_view s) {
  return !s.empty() && (absl::ascii_isalpha(s[0]) || s[0] == '_') &&
         std::all_of(s.begin(), s.end(), [](char c) { return absl::ascii_isalnum(c) || c == '_'; });
}

// The rest of a forced pythonic call after ForcedToolCallPrefix ("[name(" or "["): keyword
// arguments in the schema's order (required ones present), Python literals typed where the schema
// types them, then ")]".
std::string PythonicGrammar(absl::string_view name, const std::vector<ToolSchema>& tools) {
  std::string g =
      "py ::= pstr | number | \"True\" | \"False\" | \"None\" | plist | pdict\n"
      // Escapes the parser reads; no \x, \u or \N, which need more.
      "pstr ::= \"\\\"\" ([^\"\\\\\\n] | \"\\\\\" [\"'\\\\nrt])* \"\\\"\" | \"'\" ([^'\\\\\\n] | "
      "\"\\\\\" [\"'\\\\nrt])* \"'\"\n"
      "plist ::= \"[\" pws (py (pws \",\" pws py)*)? pws \"]\"\n"
      "pdict ::= \"{\" pws (pstr pws \":\" pws py (pws \",\" pws pstr pws \":\" pws py)*)? pws "
      "\"}\"\n"
      "pws ::= [ ]{0,4}\n"
      "boolean ::= \"True\" | \"False\"\n";
  absl::StrAppend(&g, kGbnfNumbers);
  std::vector<std::string> calls;
  int index = 0;
  for (const ToolSchema& t : tools) {
    if (!name.empty() && t.name != name) continue;
    if (!IsPythonName(t.name)) continue;  // a call the parser could not read back
    std::vector<ToolParam> params = ParamsOf(t);
    params.erase(std::remove_if(params.begin(), params.end(),
                                [](const ToolParam& p) { return !IsPythonName(p.key); }),
                 params.end());
    const int n = static_cast<int>(params.size());
    // m<tool>_<i>_<c>: the arguments from parameter i on; c: one was written (a comma first).
    auto m = [&](int i, int c) { return absl::StrCat("m", index, "_", i, "_", c); };
    for (int c = 0; c < 2; ++c) absl::StrAppend(&g, m(n, c), " ::= \"\"\n");
    for (int i = n - 1; i >= 0; --i) {
      const ToolParam& p = params[i];
      const std::string value = p.type == "integer" || p.type == "number" || p.type == "boolean"
                                    ? p.type
                                : p.type == "string" ? "pstr"
                                : p.type == "null"   ? "\"None\""
                                : p.type == "object" ? "pdict"
                                : p.type == "array"  ? "plist"
                                                     : "py";
      for (int c = 0; c < 2; ++c) {
        absl::StrAppend(&g, m(i, c), " ::= ", c == 1 ? "\",\" pws " : "",
                        GbnfQuote(absl::StrCat(p.key, "=")), " ", value, " ", m(i + 1, 1));
        if (!p.required) absl::StrAppend(&g, " | ", m(i + 1, c));
        absl::StrAppend(&g, "\n");
      }
    }
    calls.push_back(absl::StrCat(name.empty() ? GbnfQuote(absl::StrCat(t.name, "(")) : "", " ",
                                 m(0, 0), " \")]\""));
    ++index;
  }
  if (calls.empty()) return "";
  return absl::StrCat("root ::= ", absl::StrJoin(calls, " | "), "\n", g);
}

// The rest of a forced Qwen3-Coder call after ForcedToolCallPrefix: for a named call its
// parameters and </function>; for any call, the name and '>' first. A parameter's value is typed
// where the tool's schema types it (integer, number, boolean, null; object and array as any JSON)
// and otherwise any text without "</parameter>" (which would end it early).
std::string Qwen3CoderGrammar(absl::string_view name, const std::vector<ToolSchema>& tools) {
  std::string g;
  // Text without "</parameter>": state k has matched its first k characters.
  constexpr absl::string_view kClose = "</parameter>";
  for (size_t k = 0; k < kClose.size(); ++k) {
    absl::StrAppend(&g, "text", k, " ::= \"\"");
    if (k + 1 < kClose.size()) {
      absl::StrAppend(&g, " | ", GbnfQuote(kClose.substr(k, 1)), " text", k + 1);
    }
    if (k > 0) absl::StrAppend(&g, " | \"<\" text1");
    const std::string other = k == 0 ? "<" : absl::StrCat("<", kClose.substr(k, 1));
    absl::StrAppend(&g, " | [^", other, "] text0\n");
  }
  absl::StrAppend(&g, kGbnfNumbers,
                  "boolean ::= \"true\" | \"false\"\n"
                  "null ::= \"null\"\n"
                  "json ::= jobject | jarray | jstring | number | boolean | null\n"
                  "jobject ::= \"{\" ws (jstring ws \":\" ws json (ws \",\" ws jstring ws \":\" ws "
                  "json)*)? ws \"}\"\n"
                  "jarray ::= \"[\" ws (json (ws \",\" ws json)*)? ws \"]\"\n"
                  // No '<' in a JSON string (a "</parameter>" there would end the value early;
                  // the model can write \u003c).
                  "jstring ::= \"\\\"\" ([^\"\\\\\\x00-\\x1f<] | \"\\\\\" ([\"\\\\/bfnrt] | \"u\" "
                  "[0-9a-fA-F]{4}))* \"\\\"\"\n"
                  "ws ::= [ \\t\\n]{0,32}\n");
  std::vector<std::string> calls;
  int index = 0;
  for (const ToolSchema& t : tools) {
    if (!name.empty() && t.name != name) continue;
    const std::string rule = absl::StrCat("call", index++);
    std::string body;
    for (const ToolParam& p : ParamsOf(t)) {
      // A name the parser cannot read back (empty, with spaces, '<' or '>') is left out.
      if (p.key.empty() || std::any_of(p.key.begin(), p.key.end(),
                                       [](char c) { return IsSpace(c) || c == '<' || c == '>'; })) {
        continue;
      }
      std::string value = "text0";
      if (p.type == "integer" || p.type == "number" || p.type == "boolean" || p.type == "null") {
        value = p.type;
      } else if (p.type == "object" || p.type == "array") {
        value = "json";
      }
      const std::string param = absl::StrCat(GbnfQuote(absl::StrCat("<parameter=", p.key, ">\n")),
                                             " ", value, " ", GbnfQuote("\n</parameter>\n"));
      absl::StrAppend(&body, p.required ? param : absl::StrCat("(", param, ")?"), " ");
    }
    absl::StrAppend(&g, rule, " ::= ", name.empty() ? GbnfQuote(absl::StrCat(t.name, ">\n")) : "",
                    " ", body, GbnfQuote("</function>"), "\n");
    calls.push_back(rule);
  }
  if (calls.empty()) return "";
  return absl::StrCat("root ::= ", absl::StrJoin(calls, " | "), "\n", g);
}

// Whether every value `s` (a schema inside `root`) allows is a JSON object, as far as a look at
// its top shows: "type": "object"; or no type, where `top` (the call adds "type": "object" there)
// and nothing else decides; or a local "$ref" to such a schema, or "anyOf" / "oneOf" of them, or
// "allOf" with one of them. False for anything else (another type, enum, const, not, ...): the
// caller then takes any object.
bool OnlyObjects(const JsonValue& root, const JsonValue& s, int depth) {
  if (depth > 8 || !s.IsObject()) return false;
  for (const char* key : {"enum", "const", "not"}) {
    if (s.FindField(key).has_value()) return false;
  }
  const std::optional<JsonValue> type = s.FindField("type");
  if (type.has_value() && !(type->IsString() && *type->AsString() == "object")) return false;
  // The compiler leaves "type" beside these to their branches: each must be an object's.
  for (const char* key : {"anyOf", "oneOf"}) {
    if (std::optional<JsonValue> branches = s.FindField(key)) {
      absl::StatusOr<std::vector<JsonValue>> list = branches->AsArray();
      if (!list.ok() || list->empty()) return false;
      for (const JsonValue& b : *list) {
        if (!OnlyObjects(root, b, depth + 1)) return false;
      }
      return true;
    }
  }
  if (std::optional<JsonValue> all = s.FindField("allOf")) {
    absl::StatusOr<std::vector<JsonValue>> list = all->AsArray();
    if (!list.ok()) return false;
    for (const JsonValue& b : *list) {
      if (OnlyObjects(root, b, depth + 1)) return true;
    }
    return type.has_value();
  }
  if (std::optional<JsonValue> ref = s.FindField("$ref")) {
    absl::StatusOr<absl::string_view> target = ref->AsString();
    if (!target.ok() || !absl::StartsWith(*target, "#/")) return false;
    JsonValue node = root;
    for (absl::string_view part : absl::StrSplit(target->substr(2), '/')) {
      std::optional<JsonValue> next =
          node.FindField(absl::StrReplaceAll(part, {{"~1", "/"}, {"~0", "~"}}));
      if (!next.has_value()) return false;
      node = *next;
    }
    return OnlyObjects(root, node, depth + 1);
  }
  return type.has_value() || depth == 0;
}

}  // namespace

std::optional<ForcedCallGrammar> ForcedToolCallGrammar(ToolCallFormat format,
                                                       absl::string_view name,
                                                       const std::vector<ToolSchema>& tools,
                                                       bool parallel) {
  // A tool's parameters as a schema of their own inside the call's: with an "$id" (so that their
  // "#..." references resolve against them, not the call's schema) and an object whatever they say
  // (arguments that are not one would not be read as a call).
  auto parameters = [](const ToolSchema& t) -> std::string {
    absl::StatusOr<JsonDocument> d =
        JsonDocument::Parse(t.parameters.empty() ? "{}" : t.parameters, "parameters");
    if (!d.ok() || !d->root().IsObject()) return R"({"type": "object"})";
    // A schema that might let the arguments be something other than an object: any object.
    if (!OnlyObjects(d->root(), d->root(), 0)) return R"({"type": "object"})";
    std::string extra;
    if (!d->root().FindField("$id").has_value()) {
      extra = absl::StrCat(R"("$id": )", JsonQuote(absl::StrCat("urn:strata:tool:", t.name)));
    }
    if (!d->root().FindField("type").has_value()) {
      absl::StrAppend(&extra, extra.empty() ? "" : ", ", R"("type": "object")");
    }
    if (extra.empty()) return t.parameters;
    const std::string& p = t.parameters.empty() ? std::string("{}") : t.parameters;
    const size_t open = p.find('{');
    const size_t next = p.find_first_not_of(" \t\r\n", open + 1);
    const bool members = next != std::string::npos && p[next] != '}';
    return absl::StrCat(p.substr(0, open + 1), extra, members ? ", " : "", p.substr(open + 1));
  };
  const ToolSchema* named = nullptr;
  for (const ToolSchema& t : tools) {
    if (t.name == name) named = &t;
  }
  if (!name.empty() && named == nullptr) return std::nullopt;
  // {"name": <const>, <key>: <parameters>}, for the named tool or any of them.
  auto calls = [&](absl::string_view key) {
    auto one = [&](const ToolSchema& t) {
      return absl::StrCat(R"({"type": "object", "properties": {"name": {"const": )",
                          JsonQuote(t.name), "}, ", JsonQuote(key), ": ", parameters(t),
                          R"(}, "required": ["name", )", JsonQuote(key), "]}");
    };
    if (named != nullptr) return one(*named);
    std::vector<std::string> each;
    for (const ToolSchema& t : tools) each.push_back(one(t));
    return absl::StrCat(R"({"anyOf": [)", absl::StrJoin(each, ", "), "]}");
  };
  const std::string forced = ForcedToolCallPrefix(format, name);
  const size_t brace = forced.find('{');
  switch (format) {
    case ToolCallFormat::kHermes:
    case ToolCallFormat::kMiniMax:
    case ToolCallFormat::kInternLm2:
    case ToolCallFormat::kLlama3Json: {
      if (brace == std::string::npos) return std::nullopt;
      const char* key = format == ToolCallFormat::kLlama3Json ? "parameters" : "arguments";
      return ForcedCallGrammar{calls(key), forced.substr(brace), ""};
    }
    case ToolCallFormat::kMistral:
    case ToolCallFormat::kPhi4Mini: {
      const size_t list = brace == std::string::npos ? brace : forced.rfind('[', brace);
      if (list == std::string::npos) return std::nullopt;
      return ForcedCallGrammar{
          absl::StrCat(R"({"type": "array", "items": )", calls("arguments"), R"(, "minItems": 1)",
                       parallel ? "" : R"(, "maxItems": 1)", "}"),
          forced.substr(list), ""};
    }
    case ToolCallFormat::kMistralArgs:
    case ToolCallFormat::kDeepSeek:
    case ToolCallFormat::kDeepSeekV31:
      if (named == nullptr) return std::nullopt;
      return ForcedCallGrammar{parameters(*named), "{", ""};
    case ToolCallFormat::kQwen3Coder: {
      std::string gbnf = Qwen3CoderGrammar(name, tools);
      if (gbnf.empty()) return std::nullopt;
      return ForcedCallGrammar{"", "", std::move(gbnf)};
    }
    case ToolCallFormat::kPythonic: {
      std::string gbnf = PythonicGrammar(name, tools);
      if (gbnf.empty()) return std::nullopt;
      return ForcedCallGrammar{"", "", std::move(gbnf)};
    }
    case ToolCallFormat::kNone:
      break;
  }
  return std::nullopt;
}

ToolCallParser::ToolCallParser(ToolCallFormat format, absl::string_view forced,
                               const ToolParamTypes* types)
    : format_(format),
      types_(types),
      mode_(format == ToolCallFormat::kLlama3Json || format == ToolCallFormat::kPythonic
                ? Mode::kStart
            : format == ToolCallFormat::kNone ? Mode::kText
                                              : Mode::kContent) {
  if (!forced.empty()) Add(forced);  // opens a call: nothing comes out
}

ToolCallParser::Output ToolCallParser::Add(absl::string_view text) {
  Output out;
  held_.append(text.data(), text.size());
  Scan(&out);
  return out;
}

void ToolCallParser::Scan(Output* out) {
  // Qwen3-Coder's calls sit between Hermes' markers.
  const auto [open, close_marker] = CallMarkers(format_);
  for (;;) {
    switch (mode_) {
      case Mode::kText:
        Say(held_, out);
        held_.clear();
        return;
      case Mode::kStart: {
        // An answer that is a call starts with one: llama3_json's object (or the python tag),
        // pythonic's list (or the python block's start).
        const bool pythonic = format_ == ToolCallFormat::kPythonic;
        const size_t i = SkipSpace(held_, 0);
        size_t end = 0;
        if (i <= kMaxSpaceHeld && i < held_.size() && held_[i] == (pythonic ? '[' : '{')) {
          mode_ = Mode::kCall;
          return;
        }
        switch (LeadOf(held_, pythonic ? kPythonStart : kPythonTag, &end)) {
          case Lead::kMarker:
            mode_ = Mode::kCall;
            return;
          case Lead::kArriving:
            return;
          case Lead::kOther:
            mode_ = Mode::kText;
            continue;
        }
        continue;
      }
      case Mode::kContent: {
        const size_t at = absl::string_view(held_).find(open);
        // Text waits for the rest of a marker that may be arriving and for what follows its
        // trailing whitespace: whitespace before a call that parses is not content, nor is
        // whitespace after one before any content.
        const size_t before =
            at != std::string::npos ? at : held_.size() - PartialMatchAtEnd(held_, open);
        size_t end = TrailingSpace(absl::string_view(held_).substr(0, before));
        if (before - end + space_sent_ > kMaxSpaceHeld) end = before;
        const size_t start = !said_ && num_calls_ > 0 ? std::min(SkipSpace(held_, 0), end) : 0;
        Say(absl::string_view(held_).substr(start, end - start), out);
        if (at == std::string::npos) {
          held_.erase(0, end);
          return;
        }
        space_before_call_ = held_.substr(end, at - end);
        held_.erase(0, at + open.size());
        mode_ = Mode::kCall;
        continue;
      }
      case Mode::kCall: {
        if (close_marker.empty()) return;  // the calls run to the end of the answer
        const size_t close = absl::string_view(held_).find(close_marker, searched_);
        if (close == std::string::npos) {
          searched_ = held_.size() - PartialMatchAtEnd(held_, close_marker);
          return;
        }
        // A close marker inside a Hermes call's JSON (in a string of its arguments) does not
        // end it.
        const absl::string_view body = absl::string_view(held_).substr(0, close);
        const size_t first = SkipSpace(body, 0);
        if ((format_ == ToolCallFormat::kHermes || format_ == ToolCallFormat::kInternLm2) &&
            first < body.size() && body[first] == '{' &&
            ValueEnd(body, first) == absl::string_view::npos) {
          searched_ = close + 1;
          continue;
        }
        // Nor one inside a Qwen3-Coder parameter's value (its </parameter> yet to come).
        if (format_ == ToolCallFormat::kQwen3Coder) {
          const size_t param = body.rfind(kParameterOpen);
          if (param != absl::string_view::npos &&
              body.find(kParameterClose, param) == absl::string_view::npos) {
            searched_ = close + 1;
            continue;
          }
        }
        searched_ = 0;
        Parse(body, absl::StrCat(open, body, close_marker), out);
        held_.erase(0, close + close_marker.size());
        mode_ = Mode::kContent;
        continue;
      }
    }
  }
}

void ToolCallParser::Parse(absl::string_view call_text, absl::string_view raw, Output* out) {
  std::vector<ToolCall> calls;
  bool ok = true;
  switch (format_) {
    case ToolCallFormat::kHermes:
    case ToolCallFormat::kInternLm2: {
      std::optional<ToolCall> call = CallOfObject(call_text, format_);
      if (call.has_value()) calls.push_back(*std::move(call));
      ok = call.has_value();
      break;
    }
    case ToolCallFormat::kLlama3Json: {
      call_text = absl::StripLeadingAsciiWhitespace(call_text);
      absl::ConsumePrefix(&call_text, kPythonTag);
      std::optional<std::vector<absl::string_view>> objects = Values(call_text, ';');
      ok = objects.has_value() && !objects->empty();
      for (size_t i = 0; ok && i < objects->size(); ++i) {
        std::optional<ToolCall> call = CallOfObject((*objects)[i], format_);
        if (call.has_value()) calls.push_back(*std::move(call));
        ok = call.has_value();
      }
      break;
    }
    case ToolCallFormat::kDeepSeek:
    case ToolCallFormat::kDeepSeekV31: {
      // Calls one after another, each between its markers (the last one's end may be missing).
      absl::string_view rest = call_text;
      for (;;) {
        rest = absl::StripLeadingAsciiWhitespace(rest);
        if (rest.empty()) break;
        ok = absl::ConsumePrefix(&rest, kDsCallBegin);
        if (!ok) break;
        const size_t end = rest.find(kDsCallEnd);
        std::optional<std::pair<std::string, std::string>> call = DeepSeekCall(rest.substr(0, end));
        ok = call.has_value();
        if (!ok) break;
        calls.push_back({NewToolCallId(format_), call->first, call->second});
        rest = end == absl::string_view::npos ? "" : rest.substr(end + kDsCallEnd.size());
      }
      ok = ok && !calls.empty();
      break;
    }
    case ToolCallFormat::kQwen3Coder: {
      std::optional<std::pair<std::string, std::string>> call = XmlCall(call_text, types_);
      ok = call.has_value();
      if (ok) calls.push_back({NewToolCallId(format_), call->first, call->second});
      break;
    }
    case ToolCallFormat::kPythonic: {
      absl::string_view body = absl::StripAsciiWhitespace(call_text);
      if (absl::ConsumePrefix(&body, kPythonStart)) {
        absl::ConsumeSuffix(&body, kPythonEnd);
      }
      std::optional<std::vector<std::pair<std::string, std::string>>> list =
          PythonCalls(body).Parse();
      ok = list.has_value();
      for (size_t i = 0; ok && i < list->size(); ++i) {
        calls.push_back({NewToolCallId(format_), (*list)[i].first, (*list)[i].second});
      }
      break;
    }
    case ToolCallFormat::kMiniMax: {
      // JSON calls one per line (any whitespace between them).
      absl::string_view rest = call_text;
      for (size_t i = SkipSpace(rest, 0); ok && i < rest.size(); i = SkipSpace(rest, i)) {
        const size_t end = ValueEnd(rest, i);
        std::optional<ToolCall> call;
        if (end != absl::string_view::npos && (end == rest.size() || IsSpace(rest[end]))) {
          call = CallOfObject(rest.substr(i, end - i), format_);
        }
        ok = call.has_value();
        if (ok) calls.push_back(*std::move(call));
        i = end;
      }
      ok = ok && !calls.empty();
      break;
    }
    case ToolCallFormat::kPhi4Mini:
      // The marker ends with the list's "[".
      ok = CallList(absl::StrCat("[", call_text), format_, &calls);
      break;
    case ToolCallFormat::kMistral:
    case ToolCallFormat::kMistralArgs: {
      const absl::string_view body = absl::StripAsciiWhitespace(call_text);
      if (absl::StartsWith(body, "[")) {
        ok = CallList(body, format_, &calls);  // [{"name": ..., "arguments": ...}, ...]
      } else {
        // name[ARGS]{...}, the name perhaps followed by [CALL_ID]id.
        const size_t args = body.find(kMistralArgs);
        ok = args != absl::string_view::npos;
        if (ok) {
          absl::string_view name = body.substr(0, args);
          if (const size_t id = name.find(kMistralCallId); id != absl::string_view::npos) {
            name = name.substr(0, id);
          }
          name = absl::StripAsciiWhitespace(name);
          const absl::string_view arg_text =
              absl::StripAsciiWhitespace(body.substr(args + kMistralArgs.size()));
          absl::StatusOr<JsonDocument> d = JsonDocument::Parse(arg_text, "arguments");
          ok = !name.empty() && d.ok() && d->root().IsObject() &&
               std::none_of(name.begin(), name.end(), IsSpace);
          if (ok)
            calls.push_back({NewToolCallId(format_), std::string(name), std::string(arg_text)});
        }
      }
      break;
    }
    case ToolCallFormat::kNone:
      ok = false;
      break;
  }
  if (!ok) {
    if (said_ || num_calls_ == 0) Say(space_before_call_, out);
    Say(raw, out);
    space_before_call_.clear();
    return;
  }
  space_before_call_.clear();
  num_calls_ += static_cast<int>(calls.size());
  for (ToolCall& c : calls) out->calls.push_back(std::move(c));
}

void ToolCallParser::Say(absl::string_view text, Output* out) {
  if (text.empty()) return;
  out->content.append(text.data(), text.size());
  said_ = true;
  const size_t end = TrailingSpace(text);
  space_sent_ = end == 0 ? space_sent_ + text.size() : text.size() - end;
}

ToolCallParser::Output ToolCallParser::Finish() {
  Output out;
  switch (mode_) {
    case Mode::kStart:
    case Mode::kText:
      Say(held_, &out);
      break;
    case Mode::kContent:
      // Without calls the text is whole; with them, whitespace around the last is not content.
      if (num_calls_ == 0) {
        Say(held_, &out);
      } else {
        const size_t end = TrailingSpace(held_);
        const size_t start = said_ ? 0 : std::min(SkipSpace(held_, 0), end);
        Say(absl::string_view(held_).substr(start, end - start), &out);
      }
      break;
    case Mode::kCall:
      if (const auto [open, close] = CallMarkers(format_); !close.empty()) {
        Parse(held_, absl::StrCat(open, held_), &out);  // the close never came
      } else if (format_ == ToolCallFormat::kLlama3Json || format_ == ToolCallFormat::kPythonic) {
        Parse(held_, held_, &out);
      } else if (format_ == ToolCallFormat::kPhi4Mini) {
        Parse(held_, absl::StrCat(kPhiOpen, held_), &out);
      } else {
        // Each [TOOL_CALLS] opens calls of its own.
        for (absl::string_view part : absl::StrSplit(held_, kMistralOpen)) {
          Parse(part, absl::StrCat(kMistralOpen, part), &out);
        }
      }
      break;
  }
  held_.clear();
  mode_ = Mode::kText;
  return out;
}

const char* ReasoningFormatName(ReasoningFormat format) {
  return format == ReasoningFormat::kThink ? "think" : "none";
}

absl::StatusOr<ReasoningFormat> ReasoningFormatFromName(absl::string_view name) {
  if (name == "think") return ReasoningFormat::kThink;
  if (name == "none") return ReasoningFormat::kNone;
  return absl::InvalidArgumentError(
      absl::StrCat("no reasoning format \"", name, "\": think or none"));
}

ReasoningFormat DetectReasoningFormat(absl::string_view chat_template) {
  return absl::StrContains(chat_template, kThinkClose) ? ReasoningFormat::kThink
                                                       : ReasoningFormat::kNone;
}

ReasoningStart ReasoningStartOf(absl::string_view prompt, absl::string_view continued) {
  if (!absl::StripAsciiWhitespace(continued).empty()) {
    const size_t open = continued.rfind(kThinkOpen);
    const size_t close = continued.rfind(kThinkClose);
    if (open != absl::string_view::npos && (close == absl::string_view::npos || open > close)) {
      return absl::StripAsciiWhitespace(continued.substr(open + kThinkOpen.size())).empty()
                 ? ReasoningStart::kThinking
                 : ReasoningStart::kGoingOn;
    }
    return ReasoningStart::kAnswer;
  }
  return absl::EndsWith(absl::StripTrailingAsciiWhitespace(prompt), kThinkOpen)
             ? ReasoningStart::kThinking
             : ReasoningStart::kOpen;
}

ReasoningSplitter::ReasoningSplitter(ReasoningFormat format, ReasoningStart start)
    : mode_(Mode::kAnswer) {
  if (format != ReasoningFormat::kThink) return;
  switch (start) {
    case ReasoningStart::kOpen:
      mode_ = Mode::kStart;
      break;
    case ReasoningStart::kThinking:
      mode_ = Mode::kThinking;
      skip_open_ = true;
      break;
    case ReasoningStart::kGoingOn:
      mode_ = Mode::kThinking;
      reasoning_started_ = true;
      break;
    case ReasoningStart::kAnswer:
      break;
  }
}

ReasoningSplitter::Output ReasoningSplitter::Add(absl::string_view text) {
  Output out;
  held_.append(text.data(), text.size());
  Scan(&out);
  return out;
}

namespace {

// Appends `text` to `out`, its leading whitespace left out until `*started`.
void GiveOut(absl::string_view text, std::string* out, bool* started) {
  if (!*started) {
    text = text.substr(std::min(SkipSpace(text, 0), text.size()));
    if (text.empty()) return;
    *started = true;
  }
  out->append(text.data(), text.size());
}

}  // namespace

void ReasoningSplitter::Scan(Output* out) {
  for (;;) {
    switch (mode_) {
      case Mode::kStart: {
        size_t end = 0;
        switch (LeadOf(held_, kThinkOpen, &end)) {
          case Lead::kMarker:
            held_.erase(0, end);
            mode_ = Mode::kThinking;
            continue;
          case Lead::kArriving:
            return;
          case Lead::kOther:
            mode_ = Mode::kAnswer;
            continue;
        }
        continue;
      }
      case Mode::kThinking: {
        if (skip_open_) {
          // Opened by the prompt: a <think> the model writes first anyway is not reasoning.
          size_t end = 0;
          const Lead lead = LeadOf(held_, kThinkOpen, &end);
          if (lead == Lead::kArriving) return;
          if (lead == Lead::kMarker) held_.erase(0, end);
          skip_open_ = false;
          continue;
        }
        const size_t close = absl::string_view(held_).find(kThinkClose);
        const size_t end = close != std::string::npos
                               ? close
                               : held_.size() - PartialMatchAtEnd(held_, kThinkClose);
        GiveOut(absl::string_view(held_).substr(0, end), &out->reasoning, &reasoning_started_);
        if (close == std::string::npos) {
          held_.erase(0, end);
          return;
        }
        held_.erase(0, close + kThinkClose.size());
        had_reasoning_ = true;
        mode_ = Mode::kAnswer;
        continue;
      }
      case Mode::kAnswer:
        if (had_reasoning_) {
          GiveOut(held_, &out->content, &answer_started_);
        } else {
          out->content += held_;
        }
        held_.clear();
        return;
    }
  }
}

ReasoningSplitter::Output ReasoningSplitter::Finish() {
  Output out;
  if (mode_ == Mode::kThinking) {
    GiveOut(held_, &out.reasoning, &reasoning_started_);  // cut short inside the reasoning
  } else {
    out.content = std::move(held_);  // kStart: whitespace, or a marker's start that was not one
  }
  held_.clear();
  mode_ = Mode::kAnswer;
  return out;
}

}  // namespace strata
