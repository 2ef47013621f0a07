// JSON reading for configuration and model metadata (config.json, tokenizer.json, safetensors
// headers), on simdjson. Every accessor returns a status whose message names the source and the
// field path, so a malformed file is refused with `config.json: field "rope_scaling.factor" must be
// a number, not a string`.
#ifndef STRATA_COMMON_JSON_H_
#define STRATA_COMMON_JSON_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "simdjson.h"

namespace strata {

// A value inside a JsonDocument, with its path for error messages. Cheap to copy; valid while its
// document lives.
class JsonValue {
 public:
  JsonValue(simdjson::dom::element element, std::string path, const std::string* source)
      : element_(element), path_(std::move(path)), source_(source) {}

  // "a.b[3].c", or "(root)".
  const std::string& path() const { return path_; }

  bool IsNull() const;
  bool IsObject() const;
  bool IsArray() const;
  bool IsString() const;
  bool IsNumber() const;
  bool IsBool() const;

  // The field `key` of an object: INVALID_ARGUMENT when this is not an object or the field is
  // missing.
  absl::StatusOr<JsonValue> Field(absl::string_view key) const;
  // The field, or nullopt when missing or null. (Not an object: nullopt as well.)
  std::optional<JsonValue> FindField(absl::string_view key) const;

  // Integers: a JSON integer, or a number with an integral value within int64.
  absl::StatusOr<int64_t> AsInt() const;
  absl::StatusOr<double> AsDouble() const;
  absl::StatusOr<bool> AsBool() const;
  // Valid while the document lives.
  absl::StatusOr<absl::string_view> AsString() const;
  absl::StatusOr<std::vector<JsonValue>> AsArray() const;
  // Members in document order.
  absl::StatusOr<std::vector<std::pair<absl::string_view, JsonValue>>> AsObject() const;

  // Field helpers: the typed value of `key`; `fallback` when the field is missing or null.
  absl::StatusOr<int64_t> IntField(absl::string_view key) const;
  absl::StatusOr<int64_t> IntFieldOr(absl::string_view key, int64_t fallback) const;
  absl::StatusOr<double> DoubleField(absl::string_view key) const;
  absl::StatusOr<double> DoubleFieldOr(absl::string_view key, double fallback) const;
  absl::StatusOr<bool> BoolFieldOr(absl::string_view key, bool fallback) const;
  absl::StatusOr<absl::string_view> StringField(absl::string_view key) const;
  absl::StatusOr<std::string> StringFieldOr(absl::string_view key,
                                            absl::string_view fallback) const;

  // INVALID_ARGUMENT "<source>: field "<path>" <what>". For callers' own semantic checks.
  absl::Status Error(absl::string_view what) const;

  const simdjson::dom::element& raw() const { return element_; }

 private:
  absl::Status TypeError(absl::string_view want) const;
  std::string Child(absl::string_view key) const;

  simdjson::dom::element element_;
  std::string path_;
  const std::string* source_;
};

// A parsed JSON document. Move-only; values point into it.
class JsonDocument {
 public:
  // `source` names the text in error messages (usually the file path). Numbers of any size are
  // taken, as JSON allows: an integer past 64 bits reads as the nearest double, a number past a
  // double's range as the largest double of its sign.
  static absl::StatusOr<JsonDocument> Parse(absl::string_view text, std::string source);

  JsonValue root() const { return JsonValue(root_, "(root)", source_.get()); }
  const std::string& source() const { return *source_; }
  // Whether a number of the text was past 64-bit integers or a double's range (and so reads as a
  // double near it, not as written).
  bool widened() const { return widened_; }

 private:
  JsonDocument() = default;
  std::unique_ptr<simdjson::dom::parser> parser_;
  std::unique_ptr<std::string> source_;
  simdjson::dom::element root_;
  bool widened_ = false;
};

// `s` as a JSON string literal, quotes included (control characters, quotes and backslashes
// escaped; UTF-8 passed through; a byte that is not part of a well-formed UTF-8 sequence becomes
// U+FFFD, so the output is valid JSON whatever `s` holds).
std::string JsonQuote(absl::string_view s);

}  // namespace strata

#endif  // STRATA_COMMON_JSON_H_
