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
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/json.h"

namespace strata {
namespace {

constexpr absl::string_view kHermesOpen = "<tool_call>";
constexpr absl::string_view kHermesClose = "</tool_call>";
constexpr absl::string_view kMistralOpen = "[TOOL_CALLS]";
constexpr absl::string_view kMistralArgs = "[ARGS]";
constexpr absl::string_view kMistralCallId = "[CALL_ID]";
constexpr absl::string_view kPythonTag = "<|python_tag|>";
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

// The longest end of `s` that `marker` starts with (a marker that may be arriving), shorter than
// the marker.
size_t PartialMarker(absl::string_view s, absl::string_view marker) {
  for (size_t n = std::min(s.size(), marker.size() - 1); n > 0; --n) {
    if (absl::StartsWith(marker, s.substr(s.size() - n))) return n;
  }
  return 0;
}

// Where trailing whitespace starts in `s`.
size_t TrailingSpace(absl::string_view s) {
  size_t n = s.size();
  while (n > 0 && IsSpace(s[n - 1])) --n;
  return n;
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
    case ToolCallFormat::kNone:
      break;
  }
  return "none";
}

absl::StatusOr<ToolCallFormat> ToolCallFormatFromName(absl::string_view name) {
  for (ToolCallFormat f :
       {ToolCallFormat::kNone, ToolCallFormat::kHermes, ToolCallFormat::kLlama3Json,
        ToolCallFormat::kMistral, ToolCallFormat::kMistralArgs}) {
    if (name == ToolCallFormatName(f)) return f;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "no tool-call format \"", name, "\": hermes, llama3_json, mistral, mistral_args or none"));
}

ToolCallFormat DetectToolCallFormat(absl::string_view chat_template) {
  if (!absl::StrContains(chat_template, "tools")) return ToolCallFormat::kNone;
  if (absl::StrContains(chat_template, kHermesOpen)) {
    // Qwen3-Coder's <tool_call><function=name><parameter=...> is XML, not Hermes' JSON.
    return absl::StrContains(chat_template, "<function=") ? ToolCallFormat::kNone
                                                          : ToolCallFormat::kHermes;
  }
  if (absl::StrContains(chat_template, kMistralOpen)) {
    return absl::StrContains(chat_template, kMistralArgs) ? ToolCallFormat::kMistralArgs
                                                          : ToolCallFormat::kMistral;
  }
  if (absl::StrContains(chat_template, kPythonTag) ||
      absl::StrContains(chat_template, "\"parameters\": dictionary")) {
    return ToolCallFormat::kLlama3Json;
  }
  return ToolCallFormat::kNone;
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
    case ToolCallFormat::kNone:
      break;
  }
  return "";
}

ToolCallParser::ToolCallParser(ToolCallFormat format, absl::string_view forced)
    : format_(format),
      mode_(format == ToolCallFormat::kLlama3Json ? Mode::kStart
            : format == ToolCallFormat::kNone     ? Mode::kText
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
  const bool hermes = format_ == ToolCallFormat::kHermes;
  const absl::string_view open = hermes ? kHermesOpen : kMistralOpen;
  for (;;) {
    switch (mode_) {
      case Mode::kText:
        Say(held_, out);
        held_.clear();
        return;
      case Mode::kStart: {
        // llama3_json: an answer that is a call starts with one (or the python tag).
        const size_t i = SkipSpace(held_, 0);
        if (i > kMaxSpaceHeld) {
          mode_ = Mode::kText;
          continue;
        }
        if (i == held_.size()) return;
        const absl::string_view rest = absl::string_view(held_).substr(i);
        if (rest[0] == '{' || absl::StartsWith(rest, kPythonTag)) {
          mode_ = Mode::kCall;
          return;
        }
        if (absl::StartsWith(kPythonTag, rest)) return;  // the tag may be arriving
        mode_ = Mode::kText;
        continue;
      }
      case Mode::kContent: {
        const size_t at = absl::string_view(held_).find(open);
        // Text waits for the rest of a marker that may be arriving and for what follows its
        // trailing whitespace: whitespace before a call that parses is not content, nor is
        // whitespace after one before any content.
        const size_t before =
            at != std::string::npos ? at : held_.size() - PartialMarker(held_, open);
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
        if (!hermes) return;  // the others' calls run to the end of the answer
        const size_t close = absl::string_view(held_).find(kHermesClose, searched_);
        if (close == std::string::npos) {
          searched_ = held_.size() - PartialMarker(held_, kHermesClose);
          return;
        }
        // A close marker inside the call's JSON (in a string of its arguments) does not end it.
        const absl::string_view body = absl::string_view(held_).substr(0, close);
        const size_t first = SkipSpace(body, 0);
        if (first < body.size() && body[first] == '{' &&
            ValueEnd(body, first) == absl::string_view::npos) {
          searched_ = close + 1;
          continue;
        }
        searched_ = 0;
        Parse(absl::string_view(held_).substr(0, close),
              absl::StrCat(kHermesOpen, absl::string_view(held_).substr(0, close), kHermesClose),
              out);
        held_.erase(0, close + kHermesClose.size());
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
    case ToolCallFormat::kHermes: {
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
    case ToolCallFormat::kMistral:
    case ToolCallFormat::kMistralArgs: {
      const absl::string_view body = absl::StripAsciiWhitespace(call_text);
      if (absl::StartsWith(body, "[")) {
        // [{"name": ..., "arguments": ...}, ...]
        std::optional<std::vector<absl::string_view>> list = Values(body, ',');
        ok = list.has_value() && list->size() == 1 && absl::EndsWith(body, "]");
        std::optional<std::vector<absl::string_view>> objects;
        if (ok) objects = Values(body.substr(1, body.size() - 2), ',');
        ok = ok && objects.has_value() && !objects->empty();
        for (size_t i = 0; ok && i < objects->size(); ++i) {
          std::optional<ToolCall> call = CallOfObject((*objects)[i], format_);
          if (call.has_value()) calls.push_back(*std::move(call));
          ok = call.has_value();
        }
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
      if (format_ == ToolCallFormat::kHermes) {
        Parse(held_, absl::StrCat(kHermesOpen, held_), &out);  // the close never came
      } else if (format_ == ToolCallFormat::kLlama3Json) {
        Parse(held_, held_, &out);
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

}  // namespace strata
