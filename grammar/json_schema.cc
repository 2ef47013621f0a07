#include "grammar/json_schema.h"

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "grammar/regex_grammar.h"

namespace strata {
namespace {

using Seq = GrammarBuilder::Seq;

// A JSON string's escape (a regular expression): \uXXXX only of a code point, a surrogate only as
// the high half of a pair (most JSON parsers, simdjson among them, refuse a lone one).
constexpr char kEscape[] =
    R"(\\(["\\/bfnrt]|u([0-9a-cA-Ce-fE-F][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2}))"
    R"(|u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}))";

constexpr const char* kUnsupported[] = {
    "contains",
    "minContains",
    "maxContains",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "not",
    "if",
    "then",
    "else",
    "unevaluatedItems",
    "unevaluatedProperties",
    "$dynamicRef",
    "$recursiveRef",
};

// Keywords that describe a schema without constraining it (where a schema may hold only some
// keywords, these are always allowed besides).
bool IsAnnotation(absl::string_view keyword) {
  for (absl::string_view a : {"title", "description", "$comment", "examples", "default", "$schema",
                              "deprecated", "readOnly", "writeOnly"}) {
    if (keyword == a) return true;
  }
  return false;
}

// The formats enforced, as patterns over the string's characters.
std::optional<std::string> FormatPattern(absl::string_view format) {
  const std::string date = R"(\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01]))";
  const std::string time =
      R"(([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d))";
  const std::string octet = R"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d))";
  const std::string label = R"([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)";
  if (format == "date") return date;
  if (format == "time") return time;
  if (format == "date-time") return absl::StrCat(date, "[Tt]", time);
  if (format == "uuid") {
    return R"([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})";
  }
  if (format == "ipv4") return absl::StrCat("(", octet, R"(\.){3})", octet);
  if (format == "email") {
    return absl::StrCat(R"([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@)", label, R"((\.)", label, ")+");
  }
  return std::nullopt;
}

class SchemaCompiler {
 public:
  SchemaCompiler(JsonValue root, int max_whitespace)
      : root_(std::move(root)), max_whitespace_(max_whitespace) {}

  GrammarBuilder& builder() { return b_; }

  int32_t Ws() {
    if (!ws_.has_value()) {
      ByteSet s;
      for (char c : {' ', '\t', '\n', '\r'}) s.Add(static_cast<uint8_t>(c));
      ws_ = b_.Repeat("ws", {b_.Bytes(s)}, 0, max_whitespace_);
    }
    return *ws_;
  }

  // One rule per fixed pattern, made once.
  int32_t Pattern(absl::string_view name, absl::string_view pattern) {
    auto it = patterns_.find(pattern);
    if (it != patterns_.end()) return it->second;
    absl::StatusOr<Seq> s = AddRegex(&b_, pattern);
    // Our own patterns: always valid.
    const int32_t r = b_.NewRule(name);
    b_.AddAlternative(r, *std::move(s));
    patterns_.emplace(std::string(pattern), b_.Ref(r));
    return b_.Ref(r);
  }

  int32_t StringChar() { return Pattern("char", absl::StrCat(R"([^"\\\x00-\x1f]|)", kEscape)); }
  int32_t AnyString() {
    if (!string_.has_value()) {
      string_ = b_.Choice("string", {{Quote(), b_.Star("chars", {StringChar()}), Quote()}});
    }
    return *string_;
  }
  int32_t Quote() { return b_.Byte('"'); }
  int32_t Integer() { return Pattern("integer", "-?(0|[1-9][0-9]*)"); }
  int32_t Number() {
    return Pattern("number", R"(-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?)");
  }
  Seq Sep() { return {Ws(), b_.Byte(','), Ws()}; }
  Seq Colon() { return {Ws(), b_.Byte(':'), Ws()}; }

  // Any JSON value, and any object (value ::= object | array | ..., made once).
  int32_t AnyValue() {
    if (!any_.has_value()) MakeAny();
    return *any_;
  }
  int32_t AnyObject() {
    if (!any_.has_value()) MakeAny();
    return *any_object_;
  }

  // A comma-separated list of `item` between `open` and `close`, with min..max items.
  // A comma-separated list of any number of `item` between `open` and `close` (nothing to
  // expand, so it cannot fail).
  int32_t OpenList(absl::string_view name, char open, char close, Seq item) {
    Seq more = Sep();
    more.insert(more.end(), item.begin(), item.end());
    Seq body = std::move(item);
    body.push_back(b_.Star(absl::StrCat(name, ","), std::move(more)));
    return b_.Choice(
        name, {{b_.Byte(static_cast<uint8_t>(open)), Ws(), b_.Optional(name, std::move(body)), Ws(),
                b_.Byte(static_cast<uint8_t>(close))}});
  }

  absl::StatusOr<int32_t> List(absl::string_view name, char open, char close, Seq item,
                               int64_t min_items, int64_t max_items) {
    if (min_items == 0 && max_items < 0) return OpenList(name, open, close, std::move(item));
    Seq seq = {b_.Byte(static_cast<uint8_t>(open)), Ws()};
    if (max_items != 0) {
      Seq more = Sep();
      more.insert(more.end(), item.begin(), item.end());
      ASSIGN_OR_RETURN(const int32_t rest,
                       b_.BoundedRepeat(absl::StrCat(name, ","), std::move(more),
                                        std::max<int64_t>(min_items - 1, 0),
                                        max_items < 0 ? -1 : max_items - 1));
      Seq body = std::move(item);
      body.push_back(rest);
      if (min_items == 0) {
        seq.push_back(b_.Optional(name, std::move(body)));
      } else {
        seq.insert(seq.end(), body.begin(), body.end());
      }
      seq.push_back(Ws());
    }
    seq.push_back(b_.Byte(static_cast<uint8_t>(close)));
    return b_.Choice(name, {std::move(seq)});
  }

  absl::StatusOr<int32_t> Value(const JsonValue& s) {
    // Schemas nested (or references chained) past kMaxDepth would only run the stack down.
    if (depth_ >= kMaxDepth) return s.Error(absl::StrCat("nests schemas deeper than ", kMaxDepth));
    ++depth_;
    absl::StatusOr<int32_t> v = ValueIn(s);
    --depth_;
    return v;
  }

  absl::StatusOr<int32_t> ValueIn(const JsonValue& s) {
    // A schema with an "$id" is a resource of its own: references inside it resolve against it.
    if (s.IsObject() && s.FindField("$id").has_value()) {
      resources_.push_back(s);
      absl::StatusOr<int32_t> v = ValueOf(s);
      resources_.pop_back();
      return v;
    }
    return ValueOf(s);
  }

  absl::StatusOr<int32_t> ValueOf(const JsonValue& s) {
    if (b_.over_budget()) return s.Error("makes the schema's grammar too large");
    if (s.IsBool()) {
      ASSIGN_OR_RETURN(bool b, s.AsBool());
      if (!b) return s.Error("is the schema false, which no value satisfies");
      return AnyValue();
    }
    if (!s.IsObject()) return s.Error("must be a schema (an object or a boolean)");
    ASSIGN_OR_RETURN(auto members, s.AsObject());
    for (const auto& [key, value] : members) {
      for (const char* k : kUnsupported) {
        if (key == k) {
          return s.Error(absl::StrCat("uses \"", key, "\", which is not supported"));
        }
      }
    }
    // A reference or a combination stands for the whole schema: keywords beside it that would
    // constrain the value too are refused rather than ignored (a `type` beside them is the
    // branches' to state; `enum` and `const` list the values themselves).
    for (const char* k : {"$ref", "anyOf", "oneOf", "allOf"}) {
      if (!s.FindField(k).has_value()) continue;
      for (const auto& [key, value] : members) {
        for (const char* c : {"properties",        "required",      "additionalProperties",
                              "minProperties",     "maxProperties", "propertyNames",
                              "patternProperties", "items",         "prefixItems",
                              "minItems",          "maxItems",      "minLength",
                              "maxLength",         "pattern",       "format",
                              "minimum",           "maximum",       "exclusiveMinimum",
                              "exclusiveMaximum",  "multipleOf",    "uniqueItems"}) {
          if (key == c) {
            return s.Error(absl::StrCat("combines \"", k, "\" with \"", key,
                                        "\", which is not supported: state it in each branch"));
          }
        }
      }
    }
    if (std::optional<JsonValue> ref = s.FindField("$ref")) {
      ASSIGN_OR_RETURN(absl::string_view target, ref->AsString());
      return Ref(*ref, target);
    }
    if (std::optional<JsonValue> c = s.FindField("const")) return Literal(*c);
    // `const: null` reads as missing: look at the member itself.
    for (const auto& [key, value] : members) {
      if (key == "const") return Literal(value);
    }
    if (std::optional<JsonValue> e = s.FindField("enum")) {
      ASSIGN_OR_RETURN(std::vector<JsonValue> items, e->AsArray());
      if (items.empty()) return e->Error("must list at least one value");
      std::vector<Seq> alts;
      for (const JsonValue& v : items) {
        ASSIGN_OR_RETURN(int32_t lit, Literal(v));
        alts.push_back({lit});
      }
      return b_.Choice("enum", std::move(alts));
    }
    for (const char* k : {"anyOf", "oneOf"}) {
      if (std::optional<JsonValue> any = s.FindField(k)) {
        ASSIGN_OR_RETURN(std::vector<JsonValue> items, any->AsArray());
        if (items.empty()) return any->Error("must list at least one schema");
        std::vector<Seq> alts;
        for (const JsonValue& v : items) {
          ASSIGN_OR_RETURN(int32_t e, Value(v));
          alts.push_back({e});
        }
        return b_.Choice(k, std::move(alts));
      }
    }
    if (std::optional<JsonValue> all = s.FindField("allOf")) {
      ASSIGN_OR_RETURN(std::vector<JsonValue> items, all->AsArray());
      if (items.size() != 1) return all->Error("with more than one schema is not supported");
      return Value(items[0]);
    }
    std::vector<std::string> types;
    if (std::optional<JsonValue> t = s.FindField("type")) {
      if (t->IsArray()) {
        ASSIGN_OR_RETURN(std::vector<JsonValue> items, t->AsArray());
        for (const JsonValue& v : items) {
          ASSIGN_OR_RETURN(absl::string_view name, v.AsString());
          types.emplace_back(name);
        }
        if (types.empty()) return t->Error("must name at least one type");
      } else {
        ASSIGN_OR_RETURN(absl::string_view name, t->AsString());
        types.emplace_back(name);
      }
    } else {
      auto has = [&](std::initializer_list<const char*> keys) {
        for (const char* k : keys) {
          if (s.FindField(k).has_value()) return true;
        }
        return false;
      };
      if (has({"properties", "required", "additionalProperties", "minProperties", "maxProperties",
               "propertyNames", "patternProperties"})) {
        types = {"object"};
      } else if (has({"items", "prefixItems", "minItems", "maxItems", "uniqueItems"})) {
        types = {"array"};
      } else if (has({"minLength", "maxLength", "pattern", "format"})) {
        types = {"string"};
      } else if (has({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                      "multipleOf"})) {
        types = {"number"};
      } else {
        return AnyValue();
      }
    }
    std::vector<Seq> alts;
    for (const std::string& type : types) {
      ASSIGN_OR_RETURN(int32_t e, Typed(s, type));
      alts.push_back({e});
    }
    if (alts.size() == 1) return alts[0][0];
    return b_.Choice("types", std::move(alts));
  }

 private:
  void MakeAny() {
    const int32_t value = b_.NewRule("value");
    const int32_t any = b_.Ref(value);
    any_ = any;
    Seq member = {AnyString()};
    for (int32_t e : Colon()) member.push_back(e);
    member.push_back(any);
    const int32_t object = OpenList("object", '{', '}', member);
    any_object_ = object;
    const int32_t array = OpenList("array", '[', ']', {any});
    for (Seq alt : std::vector<Seq>{{object},
                                    {array},
                                    {AnyString()},
                                    {Number()},
                                    b_.Literal("true"),
                                    b_.Literal("false"),
                                    b_.Literal("null")}) {
      b_.AddAlternative(value, std::move(alt));
    }
  }

  // A JSON string that is not one of `names`: a trie over their characters, leaving it at the
  // first character that differs (or ending where no name ends).
  int32_t KeyNotIn(const std::vector<std::string>& names) {
    struct Node {
      std::map<char32_t, int> kids;
      bool end = false;
    };
    std::vector<Node> trie(1);
    for (const std::string& name : names) {
      int at = 0;
      for (size_t i = 0; i < name.size();) {
        char32_t cp = 0xFFFD;
        const size_t len = DecodeUtf8(absl::string_view(name).substr(i), &cp);
        i += std::max<size_t>(len, 1);
        auto it = trie[at].kids.find(cp);
        if (it == trie[at].kids.end()) {
          trie.emplace_back();
          it = trie[at].kids.emplace(cp, static_cast<int>(trie.size()) - 1).first;
        }
        at = it->second;
      }
      trie[at].end = true;
    }
    const int32_t tail = b_.Star("chars", {StringChar()});
    const int32_t escape = Pattern("escape", kEscape);
    std::function<int32_t(int)> build = [&](int n) -> int32_t {
      const int32_t r = b_.NewRule("key");
      if (!trie[n].end) b_.AddAlternative(r, {});
      // Characters written plainly that leave the trie here: all but its children's (and those
      // a JSON string escapes).
      CodePointRanges taken = {{0, 0x1F}, {'"', '"'}, {'\\', '\\'}};
      for (const auto& [cp, kid] : trie[n].kids) {
        std::string bytes;
        AppendUtf8(cp, &bytes);
        const std::string quoted = JsonQuote(bytes);
        Seq seq = b_.Literal(absl::string_view(quoted).substr(1, quoted.size() - 2));
        seq.push_back(build(kid));
        b_.AddAlternative(r, std::move(seq));
        taken.push_back({cp, cp});
      }
      const CodePointRanges others = ComplementCodePoints(std::move(taken));
      b_.AddAlternative(r, {b_.Utf8Class("other", others), tail});
      b_.AddAlternative(r, {escape, tail});
      return b_.Ref(r);
    };
    return b_.Choice("key", {{Quote(), build(0), Quote()}});
  }

  absl::StatusOr<int32_t> Literal(const JsonValue& v) {
    const std::string text = simdjson::minify(v.raw());
    return b_.Choice("const", {b_.Literal(text)});
  }

  // Resolves "#..." against the innermost schema with an "$id" (the document's root otherwise), as
  // JSON Schema's base URIs do: a schema embedded in another keeps its own references.
  absl::StatusOr<int32_t> Ref(const JsonValue& at, absl::string_view target) {
    const JsonValue& base = resources_.empty() ? root_ : resources_.back();
    const std::string memo = absl::StrCat(base.path(), " ", target);
    auto it = refs_.find(memo);
    if (it != refs_.end()) return it->second;
    ASSIGN_OR_RETURN(const JsonValue node, Resolve(at, target));
    const int32_t rule = b_.NewRule(absl::StrCat("ref ", target));
    refs_.emplace(memo, b_.Ref(rule));
    ASSIGN_OR_RETURN(int32_t e, Value(node));
    b_.AddAlternative(rule, {e});
    return b_.Ref(rule);
  }

  // The schema a reference at `at` names.
  absl::StatusOr<JsonValue> Resolve(const JsonValue& at, absl::string_view target) {
    const JsonValue& base = resources_.empty() ? root_ : resources_.back();
    if (target.empty() || target[0] != '#') {
      return at.Error(absl::StrCat(
          "is \"", target, "\": only references inside the schema (\"#...\") are supported"));
    }
    JsonValue node = base;
    absl::string_view pointer = target.substr(1);
    if (!pointer.empty()) {
      if (pointer[0] != '/') return at.Error("must be a JSON pointer (\"#/$defs/name\")");
      for (absl::string_view part : absl::StrSplit(pointer.substr(1), '/')) {
        const std::string key = absl::StrReplaceAll(part, {{"~1", "/"}, {"~0", "~"}});
        std::optional<JsonValue> next = node.FindField(key);
        if (!next.has_value()) {
          return at.Error(absl::StrCat("is \"", target, "\", which names nothing in the schema"));
        }
        node = *next;
      }
    }
    return node;
  }

  // What `s` stands for once its references (and an allOf of one schema, as pydantic wraps them)
  // are followed, for keywords that read a schema's contents instead of compiling it. A schema
  // with an "$id" on the way (its references would resolve against it) or a loop of references
  // comes back as it is, for the caller to refuse.
  absl::StatusOr<JsonValue> Dereferenced(JsonValue s) {
    for (int hops = 0; hops < 16 && s.IsObject() && !s.FindField("$id").has_value(); ++hops) {
      if (std::optional<JsonValue> ref = s.FindField("$ref")) {
        ASSIGN_OR_RETURN(absl::string_view target, ref->AsString());
        ASSIGN_OR_RETURN(s, Resolve(*ref, target));
        continue;
      }
      std::optional<JsonValue> all = s.FindField("allOf");
      if (!all.has_value()) break;
      ASSIGN_OR_RETURN(std::vector<JsonValue> list, all->AsArray());
      if (list.size() != 1) break;
      s = list[0];
    }
    return s;
  }

  absl::StatusOr<int32_t> Typed(const JsonValue& s, absl::string_view type) {
    if (type == "null") return b_.Choice("null", {b_.Literal("null")});
    if (type == "boolean") return b_.Choice("boolean", {b_.Literal("true"), b_.Literal("false")});
    if (type == "integer") return BoundedInteger(s);
    if (type == "number") {
      // A whole multipleOf: its multiples, written as integers.
      if (s.FindField("multipleOf").has_value()) return BoundedInteger(s);
      return BoundedNumber(s);
    }
    if (type == "string") return String(s);
    if (type == "array") return Array(s);
    if (type == "object") return Object(s);
    return s.Error(absl::StrCat("has unknown type \"", type, "\""));
  }

  // The bounds of a number: minimum / maximum, and exclusiveMinimum / exclusiveMaximum as numbers
  // (draft 6 on) or as flags on the others (draft 4).
  struct Bounds {
    std::optional<double> lo, hi;
    bool lo_exclusive = false, hi_exclusive = false;
  };
  absl::StatusOr<Bounds> BoundsOf(const JsonValue& s) {
    Bounds b;
    for (const bool upper : {false, true}) {
      const char* inclusive = upper ? "maximum" : "minimum";
      const char* exclusive = upper ? "exclusiveMaximum" : "exclusiveMinimum";
      std::optional<double>& bound = upper ? b.hi : b.lo;
      bool& is_exclusive = upper ? b.hi_exclusive : b.lo_exclusive;
      if (std::optional<JsonValue> v = s.FindField(inclusive)) {
        ASSIGN_OR_RETURN(bound, v->AsDouble());
      }
      if (std::optional<JsonValue> v = s.FindField(exclusive)) {
        if (v->IsBool()) {
          is_exclusive = *v->AsBool() && bound.has_value();
        } else {
          ASSIGN_OR_RETURN(const double x, v->AsDouble());
          // With both, the stricter one.
          if (!bound.has_value() || (upper ? x <= *bound : x >= *bound)) {
            bound = x;
            is_exclusive = true;
          }
        }
      }
      if (bound.has_value() && std::fabs(*bound) > 1e15) {
        return s.Error(absl::StrCat("has \"", inclusive, "\" beyond 1e15, which is not supported"));
      }
    }
    return b;
  }

  // Digit strings of one length between x and y (x <= y, same length) as elements.
  Seq DigitRange(const std::string& x, const std::string& y) {
    if (x == y) return b_.Literal(x);
    const size_t n = x.size();
    const int32_t any = b_.Bytes(ByteSet::Range('0', '9'));
    if (n == 1) return {b_.Bytes(ByteSet::Range(x[0], y[0]))};
    if (x[0] == y[0]) {
      Seq s = b_.Literal(x.substr(0, 1));
      for (int32_t e : DigitRange(x.substr(1), y.substr(1))) s.push_back(e);
      return s;
    }
    const std::string zeros(n - 1, '0'), nines(n - 1, '9');
    if (x.substr(1) == zeros && y.substr(1) == nines) {
      Seq s = {b_.Bytes(ByteSet::Range(x[0], y[0]))};
      s.insert(s.end(), n - 1, any);
      return s;
    }
    std::vector<Seq> alts;
    Seq low = b_.Literal(x.substr(0, 1));
    for (int32_t e : DigitRange(x.substr(1), nines)) low.push_back(e);
    alts.push_back(std::move(low));
    if (x[0] + 1 <= y[0] - 1) {
      Seq mid = {b_.Bytes(ByteSet::Range(x[0] + 1, y[0] - 1))};
      mid.insert(mid.end(), n - 1, any);
      alts.push_back(std::move(mid));
    }
    Seq high = b_.Literal(y.substr(0, 1));
    for (int32_t e : DigitRange(zeros, y.substr(1))) high.push_back(e);
    alts.push_back(std::move(high));
    return {b_.Choice("digits", std::move(alts))};
  }

  // The decimal numerals (no sign, no leading zeros) of the integers in [lo, hi] (no hi: no
  // upper bound); lo <= hi.
  int32_t Naturals(uint64_t lo, std::optional<uint64_t> hi) {
    const std::string a = std::to_string(lo);
    const size_t hi_len = hi.has_value() ? std::to_string(*hi).size() : a.size();
    std::vector<Seq> alts;
    for (size_t len = a.size(); len <= hi_len; ++len) {
      const std::string from = len == a.size() ? a : "1" + std::string(len - 1, '0');
      const std::string to =
          hi.has_value() && len == hi_len ? std::to_string(*hi) : std::string(len, '9');
      alts.push_back(DigitRange(from, to));
    }
    if (!hi.has_value()) {
      // Every longer numeral.
      Seq longer = {b_.Bytes(ByteSet::Range('1', '9'))};
      longer.insert(longer.end(), a.size(), b_.Bytes(ByteSet::Range('0', '9')));
      longer.push_back(b_.Star("digits", {b_.Bytes(ByteSet::Range('0', '9'))}));
      alts.push_back(std::move(longer));
    }
    return b_.Choice("naturals", std::move(alts));
  }

  // Integers in [lo, hi] (either may be open).
  int32_t IntegersIn(std::optional<int64_t> lo, std::optional<int64_t> hi) {
    std::vector<Seq> alts;
    if (!hi.has_value() || *hi >= 0) {
      alts.push_back({Naturals(static_cast<uint64_t>(std::max<int64_t>(lo.value_or(0), 0)),
                               hi.has_value() ? std::optional<uint64_t>(*hi) : std::nullopt)});
    }
    if (!lo.has_value() || *lo < 0) {
      // -m for m in [max(1, -hi), -lo].
      const uint64_t from = hi.has_value() && *hi < 0 ? static_cast<uint64_t>(-*hi) : 1;
      Seq neg = {b_.Byte('-'),
                 Naturals(from, lo.has_value() ? std::optional<uint64_t>(-*lo) : std::nullopt)};
      alts.push_back(std::move(neg));
    }
    return b_.Choice("integer", std::move(alts));
  }

  // multipleOf: a whole number from 1 to 1e9 (1 when absent).
  absl::StatusOr<uint64_t> MultipleOf(const JsonValue& s) {
    std::optional<JsonValue> m = s.FindField("multipleOf");
    if (!m.has_value()) return 1;
    ASSIGN_OR_RETURN(const double k, m->AsDouble());
    if (!(k > 0)) return m->Error("must be greater than 0");
    // Written as 3.0 or 3e0 it is a float to Python's jsonschema, which then divides integers past
    // 2^53 inexactly: refused rather than followed differently.
    if (simdjson::minify(m->raw()).find_first_of(".eE") != std::string::npos &&
        k == std::floor(k)) {
      return s.Error(
          "has \"multipleOf\" written with a point or an exponent; write it as an integer");
    }
    if (k != std::floor(k) || k > 1e9) {
      return s.Error(
          "has \"multipleOf\" that is not a whole number up to 1e9, which is not supported");
    }
    return static_cast<uint64_t>(k);
  }

  // Positive multiples of k (k <= kMaxMultipleStates), digit by digit: a rule per remainder mod k,
  // the numeral ending where the remainder is 0.
  static constexpr uint64_t kMaxMultipleStates = 10000;
  // The strings words[begin, end) (sorted, distinct, sharing their first `depth` bytes) from byte
  // `depth` on, as a deterministic rule: a branch per next byte, and the end where a string ends.
  int32_t TrieOf(const std::vector<std::string>& words, size_t begin, size_t end, size_t depth) {
    std::vector<Seq> alts;
    size_t i = begin;
    if (i < end && words[i].size() == depth) {
      alts.push_back({});
      ++i;
    }
    while (i < end) {
      const char c = words[i][depth];
      size_t j = i;
      while (j < end && words[j][depth] == c) ++j;
      alts.push_back({b_.Byte(static_cast<uint8_t>(c)), TrieOf(words, i, j, depth + 1)});
      i = j;
    }
    return b_.Choice("numerals", std::move(alts));
  }

  int32_t PositiveMultiples(uint64_t k) {
    if (auto it = multiples_.find(k); it != multiples_.end()) return it->second;
    std::vector<int32_t> rules(k);
    for (uint64_t r = 0; r < k; ++r) rules[r] = b_.NewRule(absl::StrCat("mod ", k, " = ", r));
    for (uint64_t r = 0; r < k; ++r) {
      if (r == 0) b_.AddAlternative(rules[r], {});
      for (uint64_t d = 0; d < 10; ++d) {
        b_.AddAlternative(
            rules[r], {b_.Byte(static_cast<uint8_t>('0' + d)), b_.Ref(rules[(10 * r + d) % k])});
      }
    }
    std::vector<Seq> first;
    for (uint64_t d = 1; d < 10; ++d) {
      first.push_back({b_.Byte(static_cast<uint8_t>('0' + d)), b_.Ref(rules[d % k])});
    }
    const int32_t multiples = b_.Choice(absl::StrCat("multiple of ", k), std::move(first));
    multiples_[k] = multiples;
    return multiples;
  }

  // The multiples of k whose magnitudes lie in [a, b] (no b: no upper bound), as numerals after
  // `prefix`, appended to `alts`: listed when there are at most kMaxListedMultiples; digit by
  // digit when there is no upper bound and a is at most k.
  static constexpr int64_t kMaxListedMultiples = 4096;
  absl::Status MultiplesIn(const JsonValue& s, uint64_t k, uint64_t a, std::optional<uint64_t> b,
                           const Seq& prefix, std::vector<Seq>* alts) {
    const uint64_t first = (a + k - 1) / k;  // quotients
    if (b.has_value()) {
      const uint64_t last = *b / k;
      if (first > last) return absl::OkStatus();
      if (last - first >= static_cast<uint64_t>(kMaxListedMultiples)) {
        return s.Error(absl::StrCat("has \"multipleOf\" with bounds that take in more than ",
                                    kMaxListedMultiples, " multiples, which is not supported"));
      }
      // As a trie of their numerals: one reading at a time, however many there are.
      std::vector<std::string> numerals;
      for (uint64_t q = first; q <= last; ++q) numerals.push_back(std::to_string(q * k));
      std::sort(numerals.begin(), numerals.end());
      Seq alt = prefix;
      alt.push_back(TrieOf(numerals, 0, numerals.size(), 0));
      alts->push_back(std::move(alt));
      return absl::OkStatus();
    }
    if (first > 1) {
      return s.Error(
          "has \"multipleOf\" with a bound away from zero and none on the other side, "
          "which is not supported");
    }
    if (k > kMaxMultipleStates) {
      return s.Error(absl::StrCat("has \"multipleOf\" above ", kMaxMultipleStates,
                                  " without bounds on both sides, which is not supported"));
    }
    if (b_.num_rules() + static_cast<int64_t>(k) > GrammarBuilder::kMaxRules) {
      return s.Error("makes the schema's grammar too large");  // a rule per remainder mod k
    }
    if (first == 0) {  // zero too
      Seq zero = prefix;
      zero.push_back(b_.Byte('0'));
      alts->push_back(std::move(zero));
    }
    Seq alt = prefix;
    alt.push_back(PositiveMultiples(k));
    alts->push_back(std::move(alt));
    return absl::OkStatus();
  }

  absl::StatusOr<int32_t> BoundedInteger(const JsonValue& s) {
    ASSIGN_OR_RETURN(const Bounds b, BoundsOf(s));
    ASSIGN_OR_RETURN(const uint64_t k, MultipleOf(s));
    if (!b.lo.has_value() && !b.hi.has_value() && k == 1) return Integer();
    std::optional<int64_t> lo, hi;
    if (b.lo.has_value()) {
      lo = static_cast<int64_t>(b.lo_exclusive ? std::floor(*b.lo) + 1 : std::ceil(*b.lo));
    }
    if (b.hi.has_value()) {
      hi = static_cast<int64_t>(b.hi_exclusive ? std::ceil(*b.hi) - 1 : std::floor(*b.hi));
    }
    if (lo.has_value() && hi.has_value() && *lo > *hi) {
      return s.Error("has no integer between its bounds");
    }
    if (k == 1) return IntegersIn(lo, hi);
    // Non-negative multiples with magnitudes [max(lo, 0), hi]; negative ones (written "-" and the
    // magnitude) with magnitudes [max(-hi, 1), -lo].
    std::vector<Seq> alts;
    if (!hi.has_value() || *hi >= 0) {
      RETURN_IF_ERROR(MultiplesIn(s, k, static_cast<uint64_t>(std::max<int64_t>(lo.value_or(0), 0)),
                                  hi.has_value() ? std::optional<uint64_t>(*hi) : std::nullopt, {},
                                  &alts));
    }
    if (!lo.has_value() || *lo < 0) {
      const uint64_t from = hi.has_value() && *hi < 0 ? static_cast<uint64_t>(-*hi) : 1;
      RETURN_IF_ERROR(MultiplesIn(s, k, from,
                                  lo.has_value() ? std::optional<uint64_t>(-*lo) : std::nullopt,
                                  {b_.Byte('-')}, &alts));
    }
    if (alts.empty()) return s.Error("has no multiple of its \"multipleOf\" between its bounds");
    return b_.Choice("multiples", std::move(alts));
  }

  // A bound as a decimal: the shortest digits that read back as the same double (what the schema
  // most likely wrote), split at the point; the fraction without trailing zeros.
  struct Decimal {
    uint64_t whole = 0;
    std::string fraction;
    bool closed = true;  // the bound itself is allowed
  };
  // For 0 <= magnitude <= 1e15 (BoundsOf checks); nullopt when it has more than 20 digits after
  // the point.
  static std::optional<Decimal> DecimalOf(double magnitude, bool closed) {
    // (Under 1e-20 but not zero: more than 20 such digits, which could take hundreds of
    // characters to write out.)
    if (magnitude != 0 && magnitude < 1e-20) return std::nullopt;
    char buf[64];
    const std::to_chars_result r =
        std::to_chars(buf, buf + sizeof(buf), magnitude, std::chars_format::fixed);
    if (r.ec != std::errc()) return std::nullopt;
    const std::string text(buf, r.ptr);
    Decimal d;
    d.closed = closed;
    const size_t dot = text.find('.');
    d.whole = std::stoull(text.substr(0, dot));
    if (dot != std::string::npos) d.fraction = text.substr(dot + 1);
    while (!d.fraction.empty() && d.fraction.back() == '0') d.fraction.pop_back();
    if (d.fraction.size() > 20) return std::nullopt;
    return d;
  }
  static bool Less(const Decimal& a, const Decimal& b) {
    if (a.whole != b.whole) return a.whole < b.whole;
    const size_t n = std::max(a.fraction.size(), b.fraction.size());
    std::string x = a.fraction, y = b.fraction;
    x.resize(n, '0');
    y.resize(n, '0');
    return x < y;
  }

  // A set of digit strings (a number's digits after the point; the empty string: none written),
  // as whether it holds the empty string and a regular expression of its other strings (nullopt:
  // none).
  struct DigitSet {
    bool empty_string = false;
    std::optional<std::string> others;
  };
  // Every string of at most `cap` digits (cap < 0: any number).
  static DigitSet AnyDigits(int cap) {
    if (cap == 0) return {true, std::nullopt};
    return {true, cap < 0 ? "[0-9]+" : absl::StrCat("[0-9]{1,", cap, "}")};
  }
  // The digit strings F of at most `cap` digits (cap < 0: any number) whose value 0.F lies
  // between 0.lo and 0.hi from digit `i` on, the digits before it having been equal to lo's
  // (tight_lo) and hi's (tight_hi): strings at or above lo (or above, when lo is not closed),
  // at or below hi (or below).
  static DigitSet DigitsBetween(const Decimal& lo, const Decimal& hi, size_t i, bool tight_lo,
                                bool tight_hi, int cap) {
    if (!tight_lo && !tight_hi) return AnyDigits(cap);
    const absl::string_view f = lo.fraction, g = hi.fraction;
    const bool lo_rest = tight_lo && i < f.size();  // lo has digits left (their value > 0)
    const bool hi_rest = tight_hi && i < g.size();
    // Up to a bound with no digits left (its rest is zero): zeros only, or nothing.
    if (tight_hi && !hi_rest) {
      if (!hi.closed || (tight_lo && (lo_rest || !lo.closed))) return {};
      return {true, cap < 0    ? std::optional<std::string>("0+")
                    : cap == 0 ? std::nullopt
                               : std::optional<std::string>(absl::StrCat("0{1,", cap, "}"))};
    }
    // Above a bound with no digits left: anything, or (open) anything not all zeros.
    if (tight_lo && !lo_rest && !tight_hi) {
      if (lo.closed) return AnyDigits(cap);
      if (cap < 0) return {false, "0*[1-9][0-9]*"};  // (a capped set is built digit by digit)
    }
    DigitSet set;
    // Ending here: the rest is zeros.
    set.empty_string =
        (!tight_lo || (!lo_rest && lo.closed)) && (!tight_hi || hi_rest || hi.closed);
    if (cap == 0) return set;
    const int next_cap = cap < 0 ? -1 : cap - 1;
    const char low = lo_rest ? f[i] : '0';
    const char high = tight_hi ? (hi_rest ? g[i] : '0') : '9';
    std::vector<std::string> alts;
    auto digit_then = [&](char d, const DigitSet& rest) {
      if (!rest.empty_string && !rest.others.has_value()) return;
      std::string a(1, d);
      if (rest.others.has_value()) {
        absl::StrAppend(&a, "(?:", *rest.others, ")", rest.empty_string ? "?" : "");
      }
      alts.push_back(std::move(a));
    };
    auto range_then_any = [&](char from, char to) {
      if (from > to) return;
      const DigitSet rest = AnyDigits(next_cap);
      std::string a = from == to
                          ? std::string(1, from)
                          : absl::StrCat("[", std::string(1, from), "-", std::string(1, to), "]");
      if (rest.others.has_value()) absl::StrAppend(&a, "(?:", *rest.others, ")?");
      alts.push_back(std::move(a));
    };
    if (!tight_lo) {
      // At or below hi only: digits under hi's, then anything; or hi's digit, still tight.
      range_then_any('0', static_cast<char>(high - 1));
      if (hi_rest || hi.closed)
        digit_then(high, DigitsBetween(lo, hi, i + 1, false, true, next_cap));
    } else if (!tight_hi) {
      digit_then(low, DigitsBetween(lo, hi, i + 1, true, false, next_cap));
      range_then_any(static_cast<char>(low + 1), '9');
    } else if (low == high) {
      digit_then(low, DigitsBetween(lo, hi, i + 1, true, true, next_cap));
    } else {
      digit_then(low, DigitsBetween(lo, hi, i + 1, true, false, next_cap));
      range_then_any(static_cast<char>(low + 1), static_cast<char>(high - 1));
      digit_then(high, DigitsBetween(lo, hi, i + 1, false, true, next_cap));
    }
    if (!alts.empty()) set.others = absl::StrCat("(?:", absl::StrJoin(alts, "|"), ")");
    return set;
  }

  // The written fraction for a set of digit strings: none, or '.' and at least one digit.
  absl::StatusOr<std::optional<Seq>> FractionOf(const DigitSet& set) {
    std::string regex;
    if (set.others.has_value()) {
      regex = absl::StrCat("\\.(?:", *set.others, ")");
      if (set.empty_string) regex = absl::StrCat("(?:", regex, ")?");
    } else if (!set.empty_string) {
      return std::nullopt;
    }
    if (regex.empty()) return Seq{};
    ASSIGN_OR_RETURN(Seq seq, AddRegex(&b_, regex));
    return seq;
  }

  // Unsigned numerals (no exponent) whose values lie from `lo` to `hi` (no hi: no upper bound),
  // each end closed or not, with at most `cap` fraction digits (cap < 0: any number): the whole
  // parts strictly between the bounds' with any fraction, and each bound's whole part with the
  // fractions on its side. Appended to `alts`, each after `prefix`; nothing when the range is
  // empty.
  absl::Status UnsignedIn(const Decimal& lo, const std::optional<Decimal>& hi, int cap,
                          const Seq& prefix, std::vector<Seq>* alts) {
    if (hi.has_value() && !Less(lo, *hi) && !(!Less(*hi, lo) && lo.closed && hi->closed)) {
      return absl::OkStatus();
    }
    auto add = [&](Seq whole, const DigitSet& digits) -> absl::Status {
      ASSIGN_OR_RETURN(std::optional<Seq> fraction, FractionOf(digits));
      if (!fraction.has_value()) return absl::OkStatus();
      Seq alt = prefix;
      alt.insert(alt.end(), whole.begin(), whole.end());
      alt.insert(alt.end(), fraction->begin(), fraction->end());
      alts->push_back(std::move(alt));
      return absl::OkStatus();
    };
    const Decimal open_top{0, "", false};  // an upper bound that never binds
    if (hi.has_value() && lo.whole == hi->whole) {
      return add(b_.Literal(std::to_string(lo.whole)), DigitsBetween(lo, *hi, 0, true, true, cap));
    }
    RETURN_IF_ERROR(add(b_.Literal(std::to_string(lo.whole)),
                        DigitsBetween(lo, open_top, 0, true, false, cap)));
    if (!hi.has_value() || lo.whole + 1 <= hi->whole - 1) {
      RETURN_IF_ERROR(
          add({Naturals(lo.whole + 1,
                        hi.has_value() ? std::optional<uint64_t>(hi->whole - 1) : std::nullopt)},
              AnyDigits(cap)));
    }
    if (hi.has_value()) {
      RETURN_IF_ERROR(add(b_.Literal(std::to_string(hi->whole)),
                          DigitsBetween(open_top, *hi, 0, false, true, cap)));
    }
    return absl::OkStatus();
  }

  // Numbers under bounds, written without an exponent: a non-negative part and a negative part
  // ('-' and a magnitude above zero), each the unsigned numerals of its range. Values compare
  // as the bounds' shortest decimals. Rounding to a double keeps x >= b for an inclusive bound
  // (it is monotonic), but can make a numeral just past an exclusive bound equal to it: with an
  // exclusive bound, fractions stop where the numbers' significant digits would pass 15 (which
  // doubles tell apart), counting the larger bound's whole digits.
  absl::StatusOr<int32_t> BoundedNumber(const JsonValue& s) {
    ASSIGN_OR_RETURN(const Bounds b, BoundsOf(s));
    if (!b.lo.has_value() && !b.hi.has_value()) return Number();
    // A numeral within a rounding of an exclusive bound has at most the bound's whole digits
    // (one more where it crosses a power of ten): fraction digits past 15 less those could reach
    // the bound's double. (Inclusive bounds need no cap; numerals far from a bound do not either.)
    int cap = -1;
    for (const auto& [x, exclusive] :
         {std::pair(b.lo, b.lo_exclusive), std::pair(b.hi, b.hi_exclusive)}) {
      if (!x.has_value() || !exclusive) continue;
      const int whole = static_cast<int>(
          std::to_string(static_cast<uint64_t>(std::floor(std::fabs(*x))) + 1).size());
      const int c = std::max(0, 15 - whole);
      cap = cap < 0 ? c : std::min(cap, c);
    }
    // The bounds' magnitudes as decimals.
    std::optional<Decimal> lo, hi;
    if ((b.lo.has_value() && !(lo = DecimalOf(std::fabs(*b.lo), !b.lo_exclusive))) ||
        (b.hi.has_value() && !(hi = DecimalOf(std::fabs(*b.hi), !b.hi_exclusive)))) {
      return s.Error(
          "has a bound with more than 20 digits after the point, which is not supported");
    }
    std::vector<Seq> alts;
    // Non-negative values: from max(lo, 0) up to hi.
    if (!b.hi.has_value() || *b.hi > 0 || (*b.hi == 0 && !b.hi_exclusive)) {
      const Decimal zero_closed{0, "", true};
      RETURN_IF_ERROR(
          UnsignedIn(b.lo.has_value() && *b.lo >= 0 ? *lo : zero_closed, hi, cap, {}, &alts));
    }
    // Negative values: magnitudes above max(-hi, 0) (or at -hi) up to -lo.
    if (!b.lo.has_value() || *b.lo < 0) {
      const Decimal zero_open{0, "", false};
      RETURN_IF_ERROR(UnsignedIn(b.hi.has_value() && *b.hi < 0 ? *hi : zero_open, lo, cap,
                                 {b_.Byte('-')}, &alts));
    }
    if (alts.empty()) {
      const bool apart = b.lo.has_value() && b.hi.has_value() && *b.lo < *b.hi;
      return s.Error(apart && cap >= 0
                         ? "has bounds too close together for a number between them of at most "
                           "15 significant digits (which a double tells apart from the bounds)"
                         : "has no number between its bounds");
    }
    return b_.Choice("number", std::move(alts));
  }

  // A JSON string matching `pattern` (errors named at `where`).
  absl::StatusOr<int32_t> PatternString(const std::string& pattern, const JsonValue& where,
                                        RegexMatch match = RegexMatch::kSearch) {
    absl::StatusOr<Seq> inner = AddRegex(&b_, pattern, RegexText::kJsonString, match);
    if (!inner.ok()) {
      return where.Error(absl::StrCat("has pattern \"", pattern, "\": ", inner.status().message()));
    }
    Seq seq = {Quote()};
    seq.insert(seq.end(), inner->begin(), inner->end());
    seq.push_back(Quote());
    return b_.Choice("pattern", {std::move(seq)});
  }

  absl::StatusOr<int32_t> String(const JsonValue& s) {
    ASSIGN_OR_RETURN(const int64_t min_length, s.IntFieldOr("minLength", 0));
    ASSIGN_OR_RETURN(const int64_t max_length, s.IntFieldOr("maxLength", -1));
    std::optional<std::string> pattern;
    if (std::optional<JsonValue> p = s.FindField("pattern")) {
      ASSIGN_OR_RETURN(absl::string_view text, p->AsString());
      pattern = std::string(text);
    } else if (std::optional<JsonValue> f = s.FindField("format")) {
      ASSIGN_OR_RETURN(absl::string_view name, f->AsString());
      pattern = FormatPattern(name);  // other formats are annotations
    }
    if (pattern.has_value()) {
      if (min_length != 0 || max_length >= 0) {
        return s.Error(
            "combines pattern or format with minLength/maxLength, which is not supported");
      }
      // A pattern matches anywhere in the string unless anchored; a format is the whole string.
      return PatternString(
          *pattern, s,
          s.FindField("pattern").has_value() ? RegexMatch::kSearch : RegexMatch::kFull);
    }
    if (min_length == 0 && max_length < 0) return AnyString();
    absl::StatusOr<int32_t> chars =
        b_.BoundedRepeat("chars", {StringChar()}, min_length, max_length);
    if (!chars.ok())
      return s.Error(absl::StrCat("has length bounds that ", chars.status().message()));
    return b_.Choice("string", {{Quote(), *chars, Quote()}});
  }

  absl::StatusOr<int32_t> Items(const JsonValue& s, const char* key) {
    std::optional<JsonValue> items = s.FindField(key);
    if (!items.has_value()) return AnyValue();
    return Value(*items);
  }

  absl::StatusOr<int32_t> Array(const JsonValue& s) {
    ASSIGN_OR_RETURN(const int64_t min_items, s.IntFieldOr("minItems", 0));
    ASSIGN_OR_RETURN(const int64_t max_items, s.IntFieldOr("maxItems", -1));
    if (min_items < 0 || (max_items >= 0 && max_items < min_items)) {
      return s.Error("has minItems/maxItems out of order");
    }
    std::optional<JsonValue> items = s.FindField("items");
    const bool no_more = items.has_value() && items->IsBool() && !*items->AsBool();
    if (std::optional<JsonValue> u = s.FindField("uniqueItems")) {
      ASSIGN_OR_RETURN(const bool unique, u->AsBool());
      if (unique && !no_more) return UniqueItems(s, items, min_items, max_items);
    }
    if (std::optional<JsonValue> prefix = s.FindField("prefixItems")) {
      if (min_items != 0 || max_items >= 0) {
        return s.Error("combines prefixItems with minItems/maxItems, which is not supported");
      }
      ASSIGN_OR_RETURN(std::vector<JsonValue> list, prefix->AsArray());
      Seq seq = {b_.Byte('['), Ws()};
      for (size_t i = 0; i < list.size(); ++i) {
        if (i > 0) {
          for (int32_t e : Sep()) seq.push_back(e);
        }
        ASSIGN_OR_RETURN(int32_t e, Value(list[i]));
        seq.push_back(e);
      }
      if (!no_more) {
        ASSIGN_OR_RETURN(int32_t item, Items(s, "items"));
        Seq more = Sep();
        more.push_back(item);
        if (list.empty()) {
          // No prefix after all: an ordinary list.
          return List("array", '[', ']', {item}, 0, -1);
        }
        seq.push_back(b_.Star("items", std::move(more)));
      }
      seq.push_back(Ws());
      seq.push_back(b_.Byte(']'));
      return b_.Choice("array", {std::move(seq)});
    }
    if (no_more) {
      if (min_items > 0) return s.Error("has minItems above 0 with items false");
      return List("array", '[', ']', {}, 0, 0);
    }
    ASSIGN_OR_RETURN(int32_t item, Items(s, "items"));
    absl::StatusOr<int32_t> list = List("array", '[', ']', {item}, min_items, max_items);
    if (!list.ok()) return s.Error(absl::StrCat("has item bounds that ", list.status().message()));
    return list;
  }

  // uniqueItems over items that are one of a few values (an enum of strings, integers, booleans or
  // null; or booleans): a rule per set of values used so far, each going on with a value not in
  // it, closing once minItems are there. Up to kMaxUniqueValues values (2^n rules).
  static constexpr int kMaxUniqueValues = 10;
  absl::StatusOr<int32_t> UniqueItems(const JsonValue& s, std::optional<JsonValue> items,
                                      int64_t min_items, int64_t max_items) {
    const std::string refused = absl::StrCat(
        "has \"uniqueItems\" with items other than an enum of at most ", kMaxUniqueValues,
        " strings, integers, booleans or null (or booleans), which is not supported");
    if (s.FindField("prefixItems").has_value() || !items.has_value()) return s.Error(refused);
    // Items given by reference (pydantic writes a set of an Enum as {"$ref": "#/$defs/Color"}).
    ASSIGN_OR_RETURN(items, Dereferenced(*items));
    if (!items->IsObject()) return s.Error(refused);
    std::vector<std::string> texts;         // each value as JSON text
    absl::flat_hash_set<std::string> seen;  // by value
    ASSIGN_OR_RETURN(auto members, items->AsObject());
    std::optional<std::string> type;
    for (const auto& [key, value] : members) {
      if (key == "type") {
        ASSIGN_OR_RETURN(absl::string_view t, value.AsString());
        type = std::string(t);
      } else if (key != "enum" && !IsAnnotation(key)) {
        return s.Error(refused);
      }
    }
    std::optional<JsonValue> e = items->FindField("enum");
    std::vector<JsonValue> values;
    if (e.has_value()) {
      ASSIGN_OR_RETURN(values, e->AsArray());
    } else if (type == "boolean") {
      texts = {"true", "false"};
    } else {
      return s.Error(refused);
    }
    for (const JsonValue& v : values) {
      std::string key, kind;
      if (v.IsString()) {
        ASSIGN_OR_RETURN(absl::string_view str, v.AsString());
        key = absl::StrCat("s", str);
        kind = "string";
      } else if (v.IsBool()) {
        key = *v.AsBool() ? "true" : "false";
        kind = "boolean";
      } else if (v.IsNull()) {
        key = "null";
        kind = "null";
      } else if (v.IsNumber()) {
        ASSIGN_OR_RETURN(const double d, v.AsDouble());
        if (d != std::floor(d) || std::fabs(d) > 1e15) return s.Error(refused);
        key = absl::StrCat("n", static_cast<int64_t>(d));
        kind = "integer";
      } else {
        return s.Error(refused);
      }
      if (type.has_value() && *type != kind && !(*type == "number" && kind == "integer")) {
        return s.Error(absl::StrCat("has items whose enum holds a value that is not a ", *type));
      }
      if (!seen.insert(key).second) continue;
      texts.push_back(kind == "integer" ? key.substr(1) : simdjson::minify(v.raw()));
    }
    const int n = static_cast<int>(texts.size());
    if (n > kMaxUniqueValues) return s.Error(refused);
    if (min_items > n) {
      return s.Error(absl::StrCat("has minItems ", min_items, " above the ", n,
                                  " distinct values its uniqueItems allow"));
    }
    const int64_t most = max_items < 0 ? n : std::min<int64_t>(max_items, n);
    std::vector<int32_t> values_elements;
    for (const std::string& t : texts)
      values_elements.push_back(b_.Choice("value", {b_.Literal(t)}));
    // rest[mask]: after the values in mask, ", value" for a value not in it, or the end.
    std::vector<int32_t> rest(size_t{1} << n, -1);
    for (uint32_t mask = (1u << n) - 1;; --mask) {
      const int64_t count = std::popcount(mask);
      if (count > 0 && count <= most) {
        rest[mask] = b_.NewRule("unique items");
        if (count >= min_items) b_.AddAlternative(rest[mask], {Ws(), b_.Byte(']')});
        for (int i = 0; i < n && count < most; ++i) {
          if (mask & (1u << i)) continue;
          Seq alt = Sep();
          alt.push_back(values_elements[i]);
          alt.push_back(b_.Ref(rest[mask | (1u << i)]));
          b_.AddAlternative(rest[mask], std::move(alt));
        }
      }
      if (mask == 0) break;
    }
    std::vector<Seq> alts;
    if (min_items == 0) alts.push_back({b_.Byte('['), Ws(), b_.Byte(']')});
    for (int i = 0; i < n && most > 0; ++i) {
      alts.push_back({b_.Byte('['), Ws(), values_elements[i], b_.Ref(rest[1u << i])});
    }
    return b_.Choice("unique array", std::move(alts));
  }

  absl::StatusOr<int32_t> Object(const JsonValue& s) {
    std::vector<std::pair<std::string, std::optional<JsonValue>>> props;
    if (std::optional<JsonValue> p = s.FindField("properties")) {
      ASSIGN_OR_RETURN(auto members, p->AsObject());
      for (auto& [name, schema] : members) props.emplace_back(std::string(name), schema);
    }
    absl::flat_hash_set<std::string> required;
    if (std::optional<JsonValue> r = s.FindField("required")) {
      ASSIGN_OR_RETURN(std::vector<JsonValue> names, r->AsArray());
      for (const JsonValue& v : names) {
        ASSIGN_OR_RETURN(absl::string_view name, v.AsString());
        if (!required.insert(std::string(name)).second) continue;
        bool listed = false;
        for (const auto& [n, schema] : props) listed = listed || n == name;
        if (!listed) props.emplace_back(std::string(name), std::nullopt);  // any value
      }
    }
    // Properties beyond the listed ones: none when properties are given (unless
    // additionalProperties says otherwise), any when nothing is.
    std::optional<int32_t> extra;
    std::optional<JsonValue> additional = s.FindField("additionalProperties");
    if (additional.has_value()) {
      if (!additional->IsBool() || *additional->AsBool()) {
        ASSIGN_OR_RETURN(int32_t v, Value(*additional));
        extra = v;
      }
    } else if (props.empty()) {
      extra = AnyValue();
    }
    // minProperties / maxProperties: counted as the members are written. (A key written twice
    // is one property to a JSON parser; the grammar cannot see repeats among free-form keys.)
    ASSIGN_OR_RETURN(const int64_t min_props, s.IntFieldOr("minProperties", 0));
    ASSIGN_OR_RETURN(const int64_t max_props, s.IntFieldOr("maxProperties", -1));
    if (min_props < 0 || (max_props >= 0 && max_props < min_props)) {
      return s.Error("has minProperties/maxProperties out of order");
    }
    const bool counted = min_props > 0 || max_props >= 0;
    // propertyNames: the keys of a map (pydantic's dict with Literal or constrained-string keys).
    std::optional<int32_t> key;
    if (std::optional<JsonValue> names = s.FindField("propertyNames")) {
      if (!props.empty()) {
        return s.Error(
            "combines propertyNames with properties or required, which is not supported");
      }
      ASSIGN_OR_RETURN(std::optional<int32_t> k, PropertyNames(*names));
      if (!k.has_value()) extra.reset();  // propertyNames false: no key at all
      key = k;
    }
    // patternProperties: a map whose keys match a pattern (pydantic's dict with constrained
    // string keys, as its earlier versions write it). One pattern, without listed properties or
    // propertyNames: keys it matches (anywhere, as a pattern does), each with a value of its
    // schema. Keys it does not match are never written, whatever additionalProperties allows
    // them (the model keeps to the pattern's keys; every such object is valid).
    if (std::optional<JsonValue> pp = s.FindField("patternProperties")) {
      ASSIGN_OR_RETURN(auto patterns, pp->AsObject());
      if (!patterns.empty()) {
        if (!props.empty()) {
          return s.Error(
              "combines patternProperties with properties or required, which is not supported");
        }
        if (s.FindField("propertyNames").has_value()) {
          return s.Error("combines patternProperties with propertyNames, which is not supported");
        }
        if (patterns.size() > 1) {
          return pp->Error(
              "has more than one pattern, which is not supported (a key two patterns match "
              "must match both schemas)");
        }
        const auto& [pattern, value_schema] = patterns.front();
        ASSIGN_OR_RETURN(const int32_t k, PatternString(std::string(pattern), *pp));
        key = k;
        extra.reset();
        if (!value_schema.IsBool() || *value_schema.AsBool()) {
          ASSIGN_OR_RETURN(int32_t v, Value(value_schema));
          extra = v;
        }  // else false: no key may match it, and no other is written
      }
    }
    if (props.empty()) {
      if (!extra.has_value()) {
        if (min_props > 0) return s.Error("has minProperties above 0 but allows no property");
        return List("object", '{', '}', {}, 0, 0);
      }
      if (*extra == AnyValue() && !counted && !key.has_value()) return AnyObject();
      Seq member = {key.has_value() ? *key : AnyString()};
      for (int32_t e : Colon()) member.push_back(e);
      member.push_back(*extra);
      absl::StatusOr<int32_t> map =
          List("object", '{', '}', std::move(member), min_props, max_props);
      if (!map.ok()) {
        return s.Error(
            absl::StrCat("has minProperties/maxProperties that ", map.status().message()));
      }
      return *map;
    }
    if (counted) {
      if (extra.has_value()) {
        return s.Error(
            "has minProperties/maxProperties with properties beyond the listed ones "
            "(additionalProperties), which is not supported");
      }
      return CountedObject(s, props, required, min_props, max_props);
    }
    const int n = static_cast<int>(props.size());
    // rest[i][c]: the members from property i on; c: whether one has been written (a comma
    // comes first).
    std::vector<std::array<int32_t, 2>> rest(n + 1);
    for (int c = 0; c < 2; ++c) {
      const int32_t r = b_.NewRule("members");
      if (extra.has_value()) {
        // extra1 ::= "," member extra1 | "";  extra0 ::= member extra1 | ""
        // An extra property's name is none of the listed ones (written plainly; a name spelled
        // with escapes is not checked).
        std::vector<std::string> names;
        for (const auto& [name, schema] : props) names.push_back(name);
        Seq member = {KeyNotIn(names)};
        for (int32_t e : Colon()) member.push_back(e);
        member.push_back(*extra);
        Seq more = Sep();
        more.insert(more.end(), member.begin(), member.end());
        const int32_t extra1 = b_.Star("more", std::move(more));
        if (c == 1) {
          b_.AddAlternative(r, {extra1});
        } else {
          member.push_back(extra1);
          b_.AddAlternative(r, std::move(member));
          b_.AddAlternative(r, {});
        }
      } else {
        b_.AddAlternative(r, {});
      }
      rest[n][c] = b_.Ref(r);
    }
    for (int i = n - 1; i >= 0; --i) {
      const std::string& name = props[i].first;
      ASSIGN_OR_RETURN(const Seq member, Member(name, props[i].second));
      for (int c = 0; c < 2; ++c) {
        const int32_t r = b_.NewRule(absl::StrCat("member ", name));
        Seq with = c == 1 ? Sep() : Seq{};
        with.insert(with.end(), member.begin(), member.end());
        with.push_back(rest[i + 1][1]);
        b_.AddAlternative(r, std::move(with));
        if (!required.contains(name)) b_.AddAlternative(r, {rest[i + 1][c]});
        rest[i][c] = b_.Ref(r);
      }
    }
    return b_.Choice("object", {{b_.Byte('{'), Ws(), rest[0][0], Ws(), b_.Byte('}')}});
  }

  // The keys propertyNames allows, as JSON strings: a schema of strings (type "string", an enum
  // or const of strings, string keywords; through references), or true (any key); nullopt for
  // false (none).
  absl::StatusOr<std::optional<int32_t>> PropertyNames(const JsonValue& names) {
    ASSIGN_OR_RETURN(const JsonValue d, Dereferenced(names));
    if (d.IsBool()) {
      if (*d.AsBool()) return AnyString();
      return std::nullopt;
    }
    ASSIGN_OR_RETURN(auto members, d.AsObject());
    const auto not_strings = [&] {
      return d.Error(
          "is a propertyNames schema that does not describe strings only (keys are "
          "strings), which is not supported");
    };
    bool constrained = false;
    for (const auto& [k, v] : members) {
      if (k == "type") {
        std::vector<JsonValue> types = {v};
        if (v.IsArray()) {
          ASSIGN_OR_RETURN(types, v.AsArray());
        }
        for (const JsonValue& t : types) {
          if (t.AsString().value_or("") != "string") return not_strings();
        }
      } else if (k == "enum" || k == "const") {
        std::vector<JsonValue> values;
        if (k == "enum") {
          ASSIGN_OR_RETURN(values, v.AsArray());
        } else {
          values.push_back(v);
        }
        for (const JsonValue& x : values) {
          if (!x.AsString().ok()) return not_strings();
        }
        constrained = true;
      } else if (k == "minLength" || k == "maxLength" || k == "pattern" || k == "format") {
        constrained = true;
      } else if (!IsAnnotation(k)) {
        return not_strings();
      }
    }
    if (!constrained) return AnyString();
    ASSIGN_OR_RETURN(const int32_t keys, Value(d));
    return keys;
  }

  // A listed property's member: its quoted name, the colon, its value (any, without a schema).
  absl::StatusOr<Seq> Member(const std::string& name, const std::optional<JsonValue>& schema) {
    int32_t value;
    if (schema.has_value()) {
      ASSIGN_OR_RETURN(value, Value(*schema));
    } else {
      value = AnyValue();
    }
    Seq member = b_.Literal(JsonQuote(name));
    for (int32_t e : Colon()) member.push_back(e);
    member.push_back(value);
    return member;
  }

  // An object of the listed properties only, in their order, required ones always, with
  // min_props to max_props (-1: any number) of them: a rule per (property, members written so
  // far) from which the bounds can still be met. Each member is a rule of its own that those
  // states reference, so a long name is stored once, not once per state (and states are
  // labelled by index: a hostile schema's names do not make the rule names quadratic).
  absl::StatusOr<int32_t> CountedObject(
      const JsonValue& s,
      const std::vector<std::pair<std::string, std::optional<JsonValue>>>& props,
      const absl::flat_hash_set<std::string>& required, int64_t min_props, int64_t max_props) {
    const int n = static_cast<int>(props.size());
    std::vector<int> required_from(n + 1, 0);  // required properties among props[i..]
    for (int i = n - 1; i >= 0; --i) {
      required_from[i] = required_from[i + 1] + (required.contains(props[i].first) ? 1 : 0);
    }
    const int64_t most = max_props < 0 ? n : std::min<int64_t>(max_props, n);
    if (min_props > n) {
      return s.Error(
          absl::StrCat("has minProperties ", min_props, " above the ", n, " properties it allows"));
    }
    if (required_from[0] > most) {
      return s.Error(absl::StrCat("requires ", required_from[0],
                                  " properties but has maxProperties ", max_props));
    }
    // The states (at most one per (i, k), k <= i, and the ends), one rule per member, the object.
    const int64_t states = static_cast<int64_t>(n + 1) * (n + 2) / 2 + (n + 1);
    if (b_.num_rules() + states + n + 1 > GrammarBuilder::kMaxRules) {
      return s.Error("makes the schema's grammar too large");
    }
    std::vector<int32_t> members(n);
    for (int i = 0; i < n; ++i) {
      ASSIGN_OR_RETURN(const Seq member, Member(props[i].first, props[i].second));
      members[i] = b_.Choice(absl::StrCat("member ", i), {member});
      if (b_.over_budget()) return s.Error("makes the schema's grammar too large");
    }
    // From property i on, k written: the bounds can still be met.
    auto viable = [&](int i, int64_t k) {
      return k + (n - i) >= min_props && k + required_from[i] <= most;
    };
    // rest[i][k]: the members from property i on, k written before it (none: not viable).
    std::vector<std::vector<std::optional<int32_t>>> rest(
        n + 1, std::vector<std::optional<int32_t>>(n + 1));
    for (int64_t k = 0; k <= n; ++k) {
      if (viable(n, k)) rest[n][k] = b_.Choice("members", std::vector<Seq>(1));  // the end
    }
    for (int i = n - 1; i >= 0; --i) {
      for (int64_t k = 0; k <= i; ++k) {
        if (!viable(i, k)) continue;
        std::vector<Seq> alts;
        if (rest[i + 1][k + 1].has_value()) {
          Seq with = k > 0 ? Sep() : Seq{};
          with.push_back(members[i]);
          with.push_back(*rest[i + 1][k + 1]);
          alts.push_back(std::move(with));
        }
        if (!required.contains(props[i].first) && rest[i + 1][k].has_value()) {
          alts.push_back({*rest[i + 1][k]});
        }
        rest[i][k] = b_.Choice(absl::StrCat("members from ", i, " after ", k), std::move(alts));
      }
      if (b_.over_budget()) return s.Error("makes the schema's grammar too large");
    }
    return b_.Choice("object", {{b_.Byte('{'), Ws(), *rest[0][0], Ws(), b_.Byte('}')}});
  }

  static constexpr int kMaxDepth = 128;
  int depth_ = 0;  // Value calls in progress
  JsonValue root_;
  std::vector<JsonValue> resources_;  // the schemas with an "$id" being compiled, innermost last
  GrammarBuilder b_;
  absl::flat_hash_map<uint64_t, int32_t> multiples_;  // PositiveMultiples by k
  const int max_whitespace_;
  // Made once, when first needed.
  std::optional<int32_t> ws_;
  std::optional<int32_t> string_;
  std::optional<int32_t> any_;
  std::optional<int32_t> any_object_;
  absl::flat_hash_map<std::string, int32_t> patterns_;
  absl::flat_hash_map<std::string, int32_t> refs_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<const Grammar>> AnyJsonGrammar(bool object_only,
                                                              int max_whitespace) {
  ASSIGN_OR_RETURN(JsonDocument doc, JsonDocument::Parse("true", "any"));
  SchemaCompiler c(doc.root(), max_whitespace);
  const int32_t root = c.builder().NewRule("root");
  c.builder().AddAlternative(root, {c.Ws(), object_only ? c.AnyObject() : c.AnyValue()});
  return std::move(c.builder()).Build(root);
}

absl::StatusOr<std::shared_ptr<const Grammar>> JsonSchemaGrammar(absl::string_view schema,
                                                                 absl::string_view source,
                                                                 int max_whitespace) {
  ASSIGN_OR_RETURN(JsonDocument doc, JsonDocument::Parse(schema, std::string(source)));
  if (doc.widened()) {
    // A const, an enum value or a bound would be kept only as the double nearest it.
    return absl::InvalidArgumentError(
        absl::StrCat(source,
                     ": holds a number past 64-bit integers or a double's range, which a "
                     "schema cannot keep exactly"));
  }
  SchemaCompiler c(doc.root(), max_whitespace);
  const int32_t root = c.builder().NewRule("root");
  ASSIGN_OR_RETURN(int32_t value, c.Value(doc.root()));
  // Whitespace may lead (a SentencePiece model's first token often starts with a space).
  c.builder().AddAlternative(root, {c.Ws(), value});
  absl::StatusOr<std::shared_ptr<const Grammar>> g = std::move(c.builder()).Build(root);
  if (!g.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", g.status().message()));
  }
  return g;
}

}  // namespace strata
