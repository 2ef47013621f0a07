#include "common/json.h"

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/utf8.h"

namespace strata {
namespace {

using simdjson::dom::element_type;

// simdjson takes integers only within 64 bits and numbers only within a double's range; JSON sets
// no such limits (RFC 8259 leaves them to implementations; Python's json reads any), and models
// write such numbers in tool calls and structured output. `text` with every integer literal past
// 64 bits written as a decimal (it reads as the nearest double) and every number past a double's
// range as the largest double of its sign; nullopt when no literal needed it. Strings are copied
// as they are.
std::optional<std::string> WidenNumbers(absl::string_view text) {
  std::string out;
  out.reserve(text.size() + 16);
  bool changed = false;
  const size_t n = text.size();
  auto digit = [&](size_t j) { return j < n && std::isdigit(static_cast<unsigned char>(text[j])); };
  size_t i = 0;
  while (i < n) {
    const char c = text[i];
    if (c == '"') {
      size_t j = i + 1;
      while (j < n && text[j] != '"') j += text[j] == '\\' ? 2 : 1;
      j = std::min(j + 1, n);
      absl::StrAppend(&out, text.substr(i, j - i));
      i = j;
      continue;
    }
    if (c != '-' && !digit(i)) {
      out.push_back(c);
      ++i;
      continue;
    }
    size_t j = c == '-' ? i + 1 : i;
    while (digit(j)) ++j;
    bool integer = true;
    if (j < n && text[j] == '.') {
      integer = false;
      ++j;
      while (digit(j)) ++j;
    }
    if (j < n && (text[j] == 'e' || text[j] == 'E')) {
      integer = false;
      ++j;
      if (j < n && (text[j] == '+' || text[j] == '-')) ++j;
      while (digit(j)) ++j;
    }
    const absl::string_view token = text.substr(i, j - i);
    absl::StrAppend(&out, token);
    i = j;
    int64_t signed_value;
    uint64_t unsigned_value;
    if (integer && (absl::SimpleAtoi(token, &signed_value) ||
                    absl::SimpleAtoi(token, &unsigned_value) || token == "-")) {
      continue;
    }
    // (strtod: from_chars leaves the value alone out of range, overflow and underflow alike;
    // the servers never change the "C" locale.)
    if (std::isinf(std::strtod(std::string(token).c_str(), nullptr))) {
      out.resize(out.size() - token.size());
      out.append(c == '-' ? "-1.7976931348623157e308" : "1.7976931348623157e308");
      changed = true;
    } else if (integer) {
      out.append(".0");
      changed = true;
    }
  }
  if (!changed) return std::nullopt;
  return out;
}

const char* TypeName(element_type t) {
  switch (t) {
    case element_type::ARRAY:
      return "an array";
    case element_type::OBJECT:
      return "an object";
    case element_type::INT64:
    case element_type::UINT64:
      return "an integer";
    case element_type::DOUBLE:
      return "a number";
    case element_type::STRING:
      return "a string";
    case element_type::BOOL:
      return "a boolean";
    case element_type::NULL_VALUE:
      return "null";
  }
  return "unknown";
}

}  // namespace

bool JsonValue::IsNull() const { return element_.type() == element_type::NULL_VALUE; }
bool JsonValue::IsObject() const { return element_.type() == element_type::OBJECT; }
bool JsonValue::IsArray() const { return element_.type() == element_type::ARRAY; }
bool JsonValue::IsString() const { return element_.type() == element_type::STRING; }
bool JsonValue::IsBool() const { return element_.type() == element_type::BOOL; }
bool JsonValue::IsNumber() const {
  const element_type t = element_.type();
  return t == element_type::INT64 || t == element_type::UINT64 || t == element_type::DOUBLE;
}

absl::Status JsonValue::Error(absl::string_view what) const {
  if (path_ == "(root)") return absl::InvalidArgumentError(absl::StrCat(*source_, ": ", what));
  return absl::InvalidArgumentError(absl::StrCat(*source_, ": field \"", path_, "\" ", what));
}

absl::Status JsonValue::TypeError(absl::string_view want) const {
  return Error(absl::StrCat("must be ", want, ", not ", TypeName(element_.type())));
}

std::string JsonValue::Child(absl::string_view key) const {
  return path_ == "(root)" ? std::string(key) : absl::StrCat(path_, ".", key);
}

absl::StatusOr<JsonValue> JsonValue::Field(absl::string_view key) const {
  if (!IsObject()) return TypeError("an object");
  simdjson::dom::element child;
  if (element_.at_key(std::string_view(key.data(), key.size())).get(child) != simdjson::SUCCESS) {
    const std::string path = Child(key);
    return absl::InvalidArgumentError(absl::StrCat(*source_, ": missing field \"", path, "\""));
  }
  return JsonValue(child, Child(key), source_);
}

std::optional<JsonValue> JsonValue::FindField(absl::string_view key) const {
  if (!IsObject()) return std::nullopt;
  simdjson::dom::element child;
  if (element_.at_key(std::string_view(key.data(), key.size())).get(child) != simdjson::SUCCESS) {
    return std::nullopt;
  }
  if (child.type() == element_type::NULL_VALUE) return std::nullopt;
  return JsonValue(child, Child(key), source_);
}

absl::StatusOr<int64_t> JsonValue::AsInt() const {
  switch (element_.type()) {
    case element_type::INT64:
      return int64_t(element_.get_int64().value_unsafe());
    case element_type::UINT64: {
      const uint64_t v = element_.get_uint64().value_unsafe();
      if (v > static_cast<uint64_t>(INT64_MAX)) return Error("is out of range");
      return static_cast<int64_t>(v);
    }
    case element_type::DOUBLE: {
      const double d = element_.get_double().value_unsafe();
      if (std::trunc(d) != d || std::fabs(d) > 9.0e18) return Error("must be an integer");
      return static_cast<int64_t>(d);
    }
    default:
      return TypeError("an integer");
  }
}

absl::StatusOr<double> JsonValue::AsDouble() const {
  switch (element_.type()) {
    case element_type::INT64:
      return static_cast<double>(element_.get_int64().value_unsafe());
    case element_type::UINT64:
      return static_cast<double>(element_.get_uint64().value_unsafe());
    case element_type::DOUBLE:
      return element_.get_double().value_unsafe();
    default:
      return TypeError("a number");
  }
}

absl::StatusOr<bool> JsonValue::AsBool() const {
  if (!IsBool()) return TypeError("a boolean");
  return element_.get_bool().value_unsafe();
}

absl::StatusOr<absl::string_view> JsonValue::AsString() const {
  if (!IsString()) return TypeError("a string");
  const std::string_view s = element_.get_string().value_unsafe();
  return absl::string_view(s.data(), s.size());
}

absl::StatusOr<std::vector<JsonValue>> JsonValue::AsArray() const {
  if (!IsArray()) return TypeError("an array");
  std::vector<JsonValue> out;
  size_t i = 0;
  simdjson::dom::array array;
  if (element_.get_array().get(array) != simdjson::SUCCESS) return TypeError("an array");
  for (simdjson::dom::element child : array) {
    out.emplace_back(child, absl::StrCat(path_ == "(root)" ? "" : path_, "[", i++, "]"), source_);
  }
  return out;
}

absl::StatusOr<std::vector<std::pair<absl::string_view, JsonValue>>> JsonValue::AsObject() const {
  if (!IsObject()) return TypeError("an object");
  std::vector<std::pair<absl::string_view, JsonValue>> out;
  simdjson::dom::object object;
  if (element_.get_object().get(object) != simdjson::SUCCESS) return TypeError("an object");
  for (simdjson::dom::key_value_pair kv : object) {
    const absl::string_view key(kv.key.data(), kv.key.size());
    out.emplace_back(key, JsonValue(kv.value, Child(key), source_));
  }
  return out;
}

absl::StatusOr<int64_t> JsonValue::IntField(absl::string_view key) const {
  absl::StatusOr<JsonValue> v = Field(key);
  if (!v.ok()) return v.status();
  return v->AsInt();
}

absl::StatusOr<int64_t> JsonValue::IntFieldOr(absl::string_view key, int64_t fallback) const {
  std::optional<JsonValue> v = FindField(key);
  if (!v) return fallback;
  return v->AsInt();
}

absl::StatusOr<double> JsonValue::DoubleField(absl::string_view key) const {
  absl::StatusOr<JsonValue> v = Field(key);
  if (!v.ok()) return v.status();
  return v->AsDouble();
}

absl::StatusOr<double> JsonValue::DoubleFieldOr(absl::string_view key, double fallback) const {
  std::optional<JsonValue> v = FindField(key);
  if (!v) return fallback;
  return v->AsDouble();
}

absl::StatusOr<bool> JsonValue::BoolFieldOr(absl::string_view key, bool fallback) const {
  std::optional<JsonValue> v = FindField(key);
  if (!v) return fallback;
  return v->AsBool();
}

absl::StatusOr<absl::string_view> JsonValue::StringField(absl::string_view key) const {
  absl::StatusOr<JsonValue> v = Field(key);
  if (!v.ok()) return v.status();
  return v->AsString();
}

absl::StatusOr<std::string> JsonValue::StringFieldOr(absl::string_view key,
                                                     absl::string_view fallback) const {
  std::optional<JsonValue> v = FindField(key);
  if (!v) return std::string(fallback);
  absl::StatusOr<absl::string_view> s = v->AsString();
  if (!s.ok()) return s.status();
  return std::string(*s);
}

std::string JsonQuote(absl::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out += '"';
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const unsigned char u = static_cast<unsigned char>(c);
    if (u >= 0x80) {
      const size_t n = ValidUtf8SequenceLength(s.substr(i));
      if (n == 0) {
        out += "\ufffd";  // not UTF-8: the replacement character, so the output stays JSON
      } else {
        out.append(s.data() + i, n);
        i += n - 1;
      }
      continue;
    }
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (u < 0x20) {
          out += absl::StrFormat("\\u%04x", u);
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

absl::StatusOr<JsonDocument> JsonDocument::Parse(absl::string_view text, std::string source) {
  JsonDocument doc;
  doc.parser_ = std::make_unique<simdjson::dom::parser>();
  doc.source_ = std::make_unique<std::string>(std::move(source));
  simdjson::error_code error = doc.parser_->parse(text.data(), text.size()).get(doc.root_);
  if (error == simdjson::NUMBER_ERROR) {
    if (const std::optional<std::string> wide = WidenNumbers(text); wide.has_value()) {
      // (What is wrong with the text besides its numbers, if anything, is the error then.)
      error = doc.parser_->parse(wide->data(), wide->size()).get(doc.root_);
      doc.widened_ = true;
    }
  }
  if (error != simdjson::SUCCESS) {
    return absl::InvalidArgumentError(
        absl::StrCat(*doc.source_, ": invalid JSON: ", simdjson::error_message(error)));
  }
  return doc;
}

}  // namespace strata
