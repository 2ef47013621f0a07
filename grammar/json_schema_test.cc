#include "grammar/json_schema.h"

#include <cmath>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

std::shared_ptr<const Grammar> Must(absl::string_view schema) {
  absl::StatusOr<std::shared_ptr<const Grammar>> g = JsonSchemaGrammar(schema, "schema");
  EXPECT_TRUE(g.ok()) << schema << ": " << g.status();
  return g.ok() ? *g : nullptr;
}

void ExpectAccepts(const std::shared_ptr<const Grammar>& g, std::initializer_list<const char*> ok,
                   std::initializer_list<const char*> bad) {
  ASSERT_NE(g, nullptr);
  for (const char* t : ok) EXPECT_TRUE(GrammarAccepts(g, t)) << t;
  for (const char* t : bad) EXPECT_FALSE(GrammarAccepts(g, t)) << t;
}

TEST(JsonSchemaTest, AnyJson) {
  auto any = *AnyJsonGrammar(false);
  ExpectAccepts(any,
                {"1", "-0.5e+3", "\"a\\u00e9\\n\"", "true", "null", "[]", "{}",
                 "{\"a\": [1, {\"b\": null}], \"c\":\"\xC3\xA9\"}", "[ 1 ,\n  2 ]"},
                {"", "01", "1.", "'a'", "{a:1}", "[1,]", "{\"a\":1,}", "\"\x01\"", "\"\\x\"", "nul",
                 "[1 2]"});
  // \u escapes write code points: a surrogate only as a pair's high half then its low half.
  ExpectAccepts(any, {R"("\u0000")", R"("\uD7FF\uE000")", R"("\ud83d\ude00")", R"("\uFFFF")"},
                {R"("\udc00")", R"("\ud83d")", R"("\ud83dx")", R"("\ud83d\u0041")",
                 R"("\ude00\ud83d")", R"("\u12")"});
  auto object = *AnyJsonGrammar(true);
  ExpectAccepts(object, {"{}", "{\"k\": {\"x\": []}}"}, {"[]", "1", "\"s\""});
  // The same in object keys.
  ExpectAccepts(Must(R"({"type": "object", "properties": {"a": {"type": "integer"}},
                          "additionalProperties": {"type": "integer"}})"),
                {R"({"\ud83d\ude00": 1})"}, {R"({"\udc00": 1})"});
  // Whitespace between tokens is bounded.
  EXPECT_TRUE(GrammarAccepts(object, "{" + std::string(kMaxJsonWhitespace, ' ') + "}"));
  EXPECT_FALSE(GrammarAccepts(object, "{" + std::string(3 * kMaxJsonWhitespace, ' ') + "}"));
}

// Numbers JSON allows but a schema could keep only approximately are refused by name.
TEST(JsonSchemaTest, NumbersPast64BitsAreRefused) {
  for (const char* schema : {R"({"const": 18446744073709551616})", R"({"maximum": 1e400})",
                             R"({"enum": [1, -99999999999999999999]})"}) {
    auto g = JsonSchemaGrammar(schema, "response_format.json_schema.schema");
    ASSERT_FALSE(g.ok()) << schema;
    EXPECT_TRUE(absl::IsInvalidArgument(g.status()));
    EXPECT_NE(g.status().message().find("response_format.json_schema.schema: holds a number"),
              std::string::npos)
        << g.status();
  }
  EXPECT_TRUE(JsonSchemaGrammar(R"({"const": 18446744073709551615})", "s").ok());
}

TEST(JsonSchemaTest, ObjectsFollowPropertiesRequiredAndAdditional) {
  auto g = Must(R"({"type": "object", "title": "Person",
      "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                     "tags": {"type": "array", "items": {"type": "string"}}},
      "required": ["name"]})");
  ExpectAccepts(
      g,
      {R"({"name":"Ada"})", R"({"name": "Ada", "age": 36})", R"({"name":"Ada","tags":["x","y"]})",
       R"({ "name" : "Ada" , "age" : -1 , "tags" : [] })"},
      {R"({})", R"({"age":36})", R"({"age":36,"name":"Ada"})", R"({"name":"Ada","age":3.5})",
       R"({"name":"Ada","extra":1})", R"({"name":1})", R"({"name":"Ada",})"});
  auto open = Must(R"({"properties": {"a": {"type": "boolean"}}, "required": ["a"],
                       "additionalProperties": {"type": "number"}})");
  ExpectAccepts(open, {R"({"a":true})", R"({"a":false,"x":1,"y":2.5})"},
                {R"({"a":true,"x":"s"})", R"({"x":1})"});
  // Extra properties never take a listed property's name (skipped or not).
  auto extra = Must(R"({"properties": {"a": {"type": "integer"}, "ab": {"type": "null"}},
                        "additionalProperties": true})");
  ExpectAccepts(extra,
                {R"({"a":1,"b":"x"})", R"({"abc":1})", R"({"ab":null,"x":[]})", R"({"":2})",
                 R"({"a":1,"a\u0062":2})"},
                {R"({"a":"x"})", R"({"a":1,"a":2})", R"({"ab":1})", R"({"x":1,"a":1})"});
  auto map = Must(R"({"type": "object", "additionalProperties": {"type": "integer"}})");
  ExpectAccepts(map, {"{}", R"({"a":1,"b":2})"}, {R"({"a":"1"})"});
  auto closed = Must(R"({"type": "object", "additionalProperties": false})");
  ExpectAccepts(closed, {"{}", "{ }"}, {R"({"a":1})"});
}

// The shared rules (whitespace, any string, any value) are made once however often they are used:
// a schema's grammar grows with its properties by a few rules each, not by a whitespace rule's 32
// copies per gap.
TEST(JsonSchemaTest, SharedRulesAreMadeOnce) {
  std::string props;
  for (int i = 0; i < 20; ++i) {
    absl::StrAppend(&props, i == 0 ? "" : ", ", "\"p", i,
                    "\": ", i % 2 ? "{}" : R"({"type": "string"})");
  }
  auto g = Must(absl::StrCat(R"({"type": "object", "properties": {)", props, "}}"));
  ASSERT_NE(g, nullptr);
  EXPECT_LT(g->num_rules(), 250);
  auto any = Must(R"({"type": "array", "items": {}})");
  ASSERT_NE(any, nullptr);
  EXPECT_LT(any->num_rules(), 110);
}

// propertyNames: a map's keys (pydantic's dict with Literal, Enum or constrained-string keys).
TEST(JsonSchemaTest, PropertyNamesConstrainAMapsKeys) {
  auto literal = Must(R"({"type": "object", "additionalProperties": {"type": "integer"},
                          "propertyNames": {"enum": ["a", "b", "c"]}})");
  ExpectAccepts(literal, {"{}", R"({"a":1})", R"({"c":2,"a":1})"},
                {R"({"d":1})", R"({"ab":1})", R"({"a":"x"})"});
  auto pattern = Must(R"({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"},
                          "additionalProperties": true})");
  ExpectAccepts(pattern, {R"({"ab":[1]})", R"({"x":null,"y":{}})"}, {R"({"A":1})", R"({"":1})"});
  auto by_ref = Must(R"({"$defs": {"Key": {"type": "string", "enum": ["x", "y"]}},
                         "type": "object", "additionalProperties": {"type": "boolean"},
                         "propertyNames": {"$ref": "#/$defs/Key"}, "maxProperties": 1})");
  ExpectAccepts(by_ref, {R"({"x":true})", "{}"}, {R"({"z":true})", R"({"x":true,"y":false})"});
  auto none = Must(R"({"type": "object", "propertyNames": false})");
  ExpectAccepts(none, {"{}"}, {R"({"a":1})"});
  auto plain = Must(R"({"type": "object", "propertyNames": {"type": "string"}})");
  ExpectAccepts(plain, {R"({"any key":1})"}, {"[]"});
  for (const char* bad : {
           R"({"type": "object", "propertyNames": {"type": "integer"}})",
           R"({"type": "object", "propertyNames": {"enum": ["a", 1]}})",
           R"({"type": "object", "propertyNames": {"minimum": 3}})",
           R"({"properties": {"a": {}}, "propertyNames": {"pattern": "^a$"}})",
       }) {
    absl::StatusOr<std::shared_ptr<const Grammar>> g = JsonSchemaGrammar(bad, "schema");
    ASSERT_FALSE(g.ok()) << bad;
    EXPECT_NE(g.status().message().find("propertyNames"), std::string::npos) << g.status();
  }
}

// patternProperties: a map whose keys match one pattern (pydantic's dict with constrained string
// keys, as its earlier versions write it).
TEST(JsonSchemaTest, PatternPropertiesConstrainAMapsKeysAndValues) {
  auto ids = Must(R"({"type": "object", "patternProperties": {"^id_[0-9]+$": {"type": "integer"}},
                      "additionalProperties": false})");
  ExpectAccepts(ids, {"{}", R"({"id_1":5})", R"({"id_1":5,"id_22":-3})"},
                {R"({"id_x":5})", R"({"id_1":"5"})", R"({"other":1})"});
  // A pattern searches: unanchored, the key only has to contain it. Keys it does not match are
  // not written even where additionalProperties would allow them.
  auto search = Must(R"({"patternProperties": {"ab": {"type": "boolean"}}, "maxProperties": 2})");
  ExpectAccepts(search, {R"({"xaby":true})", R"({"ab":false,"cab":true})"},
                {R"({"a":true})", R"({"ab":1})", R"({"ab":true,"ab2":true,"abc":true})"});
  auto by_ref = Must(R"({"$defs": {"V": {"enum": ["x", "y"]}},
                         "patternProperties": {"^[a-z]$": {"$ref": "#/$defs/V"}}})");
  ExpectAccepts(by_ref, {R"({"q":"x"})"}, {R"({"q":"z"})", R"({"qq":"x"})"});
  auto none = Must(R"({"patternProperties": {"^a$": false}})");
  ExpectAccepts(none, {"{}"}, {R"({"a":1})"});
  for (const char* bad : {
           R"({"patternProperties": {"^a": {}, "^b": {}}})",
           R"({"properties": {"a": {}}, "patternProperties": {"^a": {}}})",
           R"({"propertyNames": {"pattern": "^a"}, "patternProperties": {"^a": {}}})",
           R"({"patternProperties": {"(": {}}})",
           R"({"$ref": "#/$defs/X", "patternProperties": {"^a": {}}, "$defs": {"X": {}}})",
       }) {
    absl::StatusOr<std::shared_ptr<const Grammar>> g = JsonSchemaGrammar(bad, "schema");
    ASSERT_FALSE(g.ok()) << bad;
    EXPECT_NE(g.status().message().find("patternProperties"), std::string::npos) << g.status();
  }
}

TEST(JsonSchemaTest, MinAndMaxPropertiesCountTheMembers) {
  // Listed properties: counted as written, required ones always.
  auto some = Must(R"({"properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
                                      "c": {"type": "integer"}},
                       "additionalProperties": false, "minProperties": 1, "maxProperties": 2})");
  ExpectAccepts(some, {R"({"a":1})", R"({"c":3})", R"({"a":1,"c":3})", R"({ "b" : 2 , "c" : 3 })"},
                {"{}", R"({"a":1,"b":2,"c":3})", R"({"d":1})"});
  auto with_required = Must(R"({"properties": {"a": {}, "b": {}, "c": {}}, "required": ["b"],
                                "maxProperties": 2})");
  ExpectAccepts(with_required, {R"({"b":1})", R"({"a":1,"b":2})", R"({"b":2,"c":[]})"},
                {"{}", R"({"a":1})", R"({"a":1,"b":2,"c":3})"});
  auto at_least = Must(R"({"type": "object", "properties": {"x": {"type": "string"},
                           "y": {"type": "string"}}, "minProperties": 2})");
  ExpectAccepts(at_least, {R"({"x":"1","y":"2"})"}, {R"({"x":"1"})", "{}"});
  // A map: min..max members (pydantic's dict with min_length / max_length).
  auto map = Must(R"({"type": "object", "additionalProperties": {"type": "integer"},
                      "minProperties": 1, "maxProperties": 2})");
  ExpectAccepts(map, {R"({"k":1})", R"({"k":1,"j":2})"}, {"{}", R"({"a":1,"b":2,"c":3})"});
  auto any = Must(R"({"type": "object", "maxProperties": 1})");
  ExpectAccepts(any, {"{}", R"({"k":[1,{"x":2}]})"}, {R"({"a":1,"b":2})"});
  // Bounds no object of the schema can meet, or that it cannot count, are refused.
  for (const char* bad : {
           R"({"properties": {"a": {}}, "additionalProperties": false, "minProperties": 2})",
           R"({"properties": {"a": {}, "b": {}}, "required": ["a", "b"], "maxProperties": 1})",
           R"({"type": "object", "additionalProperties": false, "minProperties": 1})",
           R"({"type": "object", "minProperties": 3, "maxProperties": 2})",
           R"({"properties": {"a": {}}, "additionalProperties": true, "minProperties": 1})",
           R"({"type": "object", "additionalProperties": {}, "maxProperties": 100000})",
       }) {
    absl::StatusOr<std::shared_ptr<const Grammar>> g = JsonSchemaGrammar(bad, "schema");
    ASSERT_FALSE(g.ok()) << bad;
    EXPECT_NE(g.status().message().find("Properties"), std::string::npos) << g.status();
  }
}

TEST(JsonSchemaTest, EnumsConstsUnionsAndRefs) {
  ExpectAccepts(Must(R"({"enum": ["red", 2, null, {"a": [1]}]})"),
                {R"("red")", "2", "null", R"({"a":[1]})"}, {R"("blue")", "3", R"({"a": [1]})"});
  ExpectAccepts(Must(R"({"const": null})"), {"null"}, {"1"});
  ExpectAccepts(Must(R"({"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null})"),
                {"5", "null"}, {"\"5\"", "5.5"});
  ExpectAccepts(Must(R"({"type": ["string", "boolean"]})"), {"\"x\"", "true"}, {"1"});
  // A recursive type through $defs.
  auto tree = Must(R"({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object",
      "properties": {"v": {"type": "integer"}, "kids": {"type": "array",
      "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}}})");
  ExpectAccepts(tree, {R"({"v":1})", R"({"v":1,"kids":[{"v":2,"kids":[{"v":3}]}]})"},
                {R"({"v":1,"kids":[{}]})"});
  ExpectAccepts(Must(R"({"definitions": {"a/b": {"type": "null"}}, "$ref": "#/definitions/a~1b"})"),
                {"null"}, {"1"});
}

TEST(JsonSchemaTest, StringsAndArraysWithBounds) {
  ExpectAccepts(Must(R"({"type": "string", "minLength": 2, "maxLength": 3})"),
                {R"("ab")", R"("a\nb")", "\"\xC3\xA9\xC3\xA9\""}, {R"("a")", R"("abcd")"});
  ExpectAccepts(Must(R"({"type": "string", "pattern": "^[A-Z]{2}-\\d+$"})"), {R"("AB-12")"},
                {R"("ab-12")", R"("AB-")"});
  ExpectAccepts(Must(R"({"type": "string", "format": "date-time"})"),
                {R"("2026-11-27T23:30:00Z")", R"("2026-01-31T00:00:00.5+05:30")"},
                {R"("2026-13-01T00:00:00Z")", R"("2026-11-27")"});
  // A pattern matches anywhere unless anchored.
  ExpectAccepts(Must(R"({"type": "string", "pattern": "\\d"})"), {R"("a1b")", R"("1")"},
                {R"("ab")"});
  ExpectAccepts(Must(R"({"type": "string", "pattern": "^[a-z]"})"), {R"("abc1")", R"("a")"},
                {R"("1a")"});
  ExpectAccepts(Must(R"({"type": "string", "format": "uuid"})"),
                {R"("123e4567-e89b-12d3-a456-426614174000")"}, {R"("123e4567")"});
  ExpectAccepts(Must(R"({"type": "string", "format": "unknown-format"})"), {R"("anything")"},
                {"1"});
  ExpectAccepts(Must(R"({"type": "array", "items": {"type": "integer"}, "minItems": 1,
                         "maxItems": 2})"),
                {"[1]", "[1, 2]"}, {"[]", "[1,2,3]", "[\"a\"]"});
  ExpectAccepts(Must(R"({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                         "items": false})"),
                {R"(["a",1])"}, {R"(["a"])", R"(["a",1,2])", R"([1,"a"])"});
}

// Integer bounds: exactly the numerals of the range, checked against every integer near it.
TEST(JsonSchemaTest, IntegerBoundsAdmitExactlyTheRange) {
  struct Range {
    std::string keywords;
    std::optional<int64_t> lo, hi;
  };
  const std::vector<Range> ranges = {
      {R"("minimum": 1, "maximum": 12)", 1, 12},
      {R"("minimum": -5, "maximum": 5)", -5, 5},
      {R"("exclusiveMinimum": 0)", 1, std::nullopt},
      {R"("maximum": -10)", std::nullopt, -10},
      {R"("minimum": 7, "maximum": 7)", 7, 7},
      {R"("minimum": 95, "maximum": 1005)", 95, 1005},
      {R"("minimum": -1005, "exclusiveMaximum": -95)", -1005, -96},
      {R"("minimum": 0, "exclusiveMinimum": true)", 1, std::nullopt},  // draft 4
      {R"("minimum": 2.5, "maximum": 9.5)", 3, 9},
      {R"("minimum": 0)", 0, std::nullopt},
      {R"("maximum": 0)", std::nullopt, 0},
  };
  for (const Range& r : ranges) {
    auto g = Must(absl::StrCat(R"({"type": "integer", )", r.keywords, "}"));
    ASSERT_NE(g, nullptr) << r.keywords;
    for (int64_t v = -1200; v <= 1200; ++v) {
      const bool in = (!r.lo.has_value() || v >= *r.lo) && (!r.hi.has_value() || v <= *r.hi);
      ASSERT_EQ(GrammarAccepts(g, std::to_string(v)), in) << r.keywords << ": " << v;
    }
    EXPECT_FALSE(GrammarAccepts(g, "01"));
    EXPECT_FALSE(GrammarAccepts(g, "1.5"));
    // Far beyond the bounds, or within an open side.
    EXPECT_EQ(GrammarAccepts(g, "123456789012"), !r.hi.has_value());
    EXPECT_EQ(GrammarAccepts(g, "-123456789012"), !r.lo.has_value());
  }
}

// Bounds of either sign, whole or not, inclusive or exclusive, on one side or both, against exact
// comparison: every numeral of the thousandths from -3 to 3, with and without trailing zeros
// is accepted exactly when its value is within the bounds ("-0" never).
TEST(JsonSchemaTest, NumberBoundsAgreeWithExactDecimalComparison) {
  // Values in thousandths.
  std::vector<std::pair<std::string, int64_t>> numerals;
  for (int64_t v = -3000; v <= 3000; ++v) {
    const std::string sign = v < 0 ? "-" : "";
    const int64_t m = v < 0 ? -v : v;
    const std::string whole = absl::StrCat(sign, m / 1000);
    const std::string digits = absl::StrFormat("%03d", m % 1000);
    numerals.emplace_back(absl::StrCat(whole, ".", digits), v);
    std::string trimmed = digits;
    while (!trimmed.empty() && trimmed.back() == '0') trimmed.pop_back();
    numerals.emplace_back(trimmed.empty() ? whole : absl::StrCat(whole, ".", trimmed), v);
  }
  numerals.emplace_back("-0", 0);
  const std::vector<double> bounds = {-2.5, -1, -0.25, -0.001, 0, 0.125, 1, 1.75, 2.999};
  std::mt19937 rng(11);
  for (int iter = 0; iter < 60; ++iter) {
    std::optional<double> lo, hi;
    bool lo_open = false, hi_open = false;
    if (rng() % 4 != 0) lo = bounds[rng() % bounds.size()];
    if (rng() % 4 != 0 || !lo.has_value()) hi = bounds[rng() % bounds.size()];
    if (lo.has_value() && hi.has_value() && *lo > *hi) std::swap(lo, hi);
    lo_open = rng() % 2 == 0;
    hi_open = rng() % 2 == 0;
    std::string schema = R"({"type": "number")";
    if (lo.has_value()) {
      absl::StrAppend(&schema, lo_open ? R"(, "exclusiveMinimum": )" : R"(, "minimum": )", *lo);
    }
    if (hi.has_value()) {
      absl::StrAppend(&schema, hi_open ? R"(, "exclusiveMaximum": )" : R"(, "maximum": )", *hi);
    }
    schema += "}";
    SCOPED_TRACE(schema);
    // In thousandths; a missing bound never binds.
    const int64_t lo_k = lo.has_value() ? std::llround(*lo * 1000) : -1000000;
    const int64_t hi_k = hi.has_value() ? std::llround(*hi * 1000) : 1000000;
    const bool empty = lo_k > hi_k || (lo_k == hi_k && (lo_open || hi_open));
    absl::StatusOr<std::shared_ptr<const Grammar>> g = JsonSchemaGrammar(schema, "schema");
    if (empty) {
      EXPECT_FALSE(g.ok());
      continue;
    }
    ASSERT_TRUE(g.ok()) << g.status();
    for (const auto& [text, v] : numerals) {
      // (A negative zero is never written: zero is "0".)
      const bool want =
          (lo_open ? v > lo_k : v >= lo_k) && (hi_open ? v < hi_k : v <= hi_k) && text != "-0";
      ASSERT_EQ(GrammarAccepts(*g, text), want) << text;
    }
  }
}

// uniqueItems over an enum: every array of up to 5 picks of the values (repeats included) is
// accepted exactly when no value repeats and its length is within the bounds.
TEST(JsonSchemaTest, UniqueItemsOverAnEnumAdmitExactlyTheArraysWithoutRepeats) {
  const std::vector<std::string> values = {R"("red")", "3", "true", "null"};
  for (const auto& [min_items, max_items] :
       std::vector<std::pair<int, int>>{{0, -1}, {1, -1}, {2, 3}, {0, 1}, {4, 4}}) {
    std::string schema = R"({"type": "array", "uniqueItems": true,
        "items": {"enum": ["red", 3, true, null, "red"]})";
    absl::StrAppend(&schema, R"(, "minItems": )", min_items);
    if (max_items >= 0) absl::StrAppend(&schema, R"(, "maxItems": )", max_items);
    schema += "}";
    SCOPED_TRACE(schema);
    const auto g = Must(schema);
    for (int len = 0; len <= 5; ++len) {
      std::vector<int> pick(len, 0);
      while (true) {
        std::string text = "[";
        std::set<int> distinct;
        for (int i = 0; i < len; ++i) {
          absl::StrAppend(&text, i ? ", " : "", values[pick[i]]);
          distinct.insert(pick[i]);
        }
        text += "]";
        const bool want = static_cast<int>(distinct.size()) == len && len >= min_items &&
                          (max_items < 0 || len <= max_items);
        ASSERT_EQ(GrammarAccepts(g, text), want) << text;
        int i = len - 1;
        while (i >= 0 && ++pick[i] == 4) pick[i--] = 0;
        if (i < 0) break;
      }
    }
  }
  ExpectAccepts(Must(R"({"uniqueItems": true, "items": {"type": "boolean"}})"),
                {"[]", "[true]", "[false, true]"}, {"[true, true]", "[1]"});
}

// Many properties, each with its own large multipleOf (a rule per remainder): refused as too large
// before the rules that would pass the limit are made, not after.
TEST(JsonSchemaTest, ManyLargeMultiplesAreRefusedAsTooLarge) {
  std::string schema = R"({"type": "object", "properties": {)";
  for (int i = 0; i < 30; ++i) {
    absl::StrAppend(&schema, i ? ", " : "", "\"p", i, R"(": {"type": "integer", "minimum": 0, )",
                    R"("multipleOf": )", 9999 - i, "}");
  }
  schema += "}}";
  absl::StatusOr<std::shared_ptr<const Grammar>> g = JsonSchemaGrammar(schema, "schema");
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("too large"), std::string::npos) << g.status();
  // Eight of them fit (each is 10000 rules of 10 alternatives).
  schema = R"({"type": "object", "properties": {)";
  for (int i = 0; i < 8; ++i) {
    absl::StrAppend(&schema, i ? ", " : "", "\"p", i, R"(": {"type": "integer", "minimum": 0, )",
                    R"("multipleOf": )", 9999 - i, "}");
  }
  schema += "}}";
  EXPECT_TRUE(JsonSchemaGrammar(schema, "schema").ok());
}

// A counted object (minProperties) takes a rule per (property, members written so far): its
// members' names are stored once each, so long names make it refused as too large early, not
// copied into every state (400 names of 10 KB would be 800 million elements).
TEST(JsonSchemaTest, CountedObjectsWithLongNamesAreRefusedAsTooLarge) {
  const auto counted = [](int n, int name_bytes) {
    std::string schema = R"({"type": "object", "additionalProperties": false, "properties": {)";
    for (int i = 0; i < n; ++i) {
      absl::StrAppend(&schema, i ? ", " : "", "\"", i, std::string(name_bytes, 'k'), "\": {}");
    }
    return absl::StrCat(schema, R"(}, "minProperties": 1})");
  };
  absl::StatusOr<std::shared_ptr<const Grammar>> g = JsonSchemaGrammar(counted(400, 10000), "s");
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("too large"), std::string::npos) << g.status();
  // Many states are refused before they are made; a few hundred short names fit.
  g = JsonSchemaGrammar(counted(700, 1), "s");
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("too large"), std::string::npos) << g.status();
  g = JsonSchemaGrammar(counted(300, 100), "s");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_TRUE(GrammarAccepts(*g, absl::StrCat("{\"299", std::string(100, 'k'), "\": 1}")));
  EXPECT_FALSE(GrammarAccepts(*g, "{}"));
}

// Items given by reference, as pydantic writes a set of an Enum (and, in older versions, wrapped
// in an allOf of one schema), or through a chain of references.
TEST(JsonSchemaTest, UniqueItemsFollowReferencesToTheEnum) {
  for (const char* items : {R"({"$ref": "#/$defs/Color"})",
                            R"({"allOf": [{"$ref": "#/$defs/Color"}], "description": "x"})",
                            R"({"$ref": "#/$defs/Alias"})"}) {
    const std::string schema = absl::StrCat(R"({"$defs": {
        "Color": {"enum": ["red", "green", "blue"], "title": "Color", "type": "string"},
        "Alias": {"$ref": "#/$defs/Color"}},
      "type": "object", "required": ["colors"],
      "properties": {"colors": {"type": "array", "uniqueItems": true, "items": )",
                                            items, "}}}");
    SCOPED_TRACE(schema);
    ExpectAccepts(Must(schema),
                  {R"({"colors": []})", R"({"colors": ["red", "blue"]})",
                   R"({"colors": ["blue", "green", "red"]})"},
                  {R"({"colors": ["red", "red"]})", R"({"colors": ["pink"]})",
                   R"({"colors": ["green", "blue", "green"]})"});
  }
}

// multipleOf against arithmetic: with bounds on both sides (the multiples listed), with none or
// only at zero (digit by digit, a rule per remainder), for integers and numbers.
TEST(JsonSchemaTest, MultipleOfAdmitsExactlyTheMultiples) {
  std::mt19937 rng(5);
  for (int iter = 0; iter < 80; ++iter) {
    const int64_t k = 1 + static_cast<int64_t>(rng() % 30);
    std::string schema = absl::StrCat(R"({"type": ")", iter % 3 == 0 ? "number" : "integer",
                                      R"(", "multipleOf": )", k);
    int64_t lo = -100000, hi = 100000;
    switch (iter % 4) {
      case 0:  // both bounds
        lo = static_cast<int64_t>(rng() % 400) - 200;
        hi = lo + static_cast<int64_t>(rng() % 400);
        absl::StrAppend(&schema, R"(, "minimum": )", lo, R"(, "maximum": )", hi);
        break;
      case 1:  // none
        break;
      case 2:  // non-negative
        lo = 0;
        absl::StrAppend(&schema, R"(, "minimum": 0)");
        break;
      case 3:  // negative
        hi = -1;
        absl::StrAppend(&schema, R"(, "exclusiveMaximum": 0)");
        break;
    }
    schema += "}";
    SCOPED_TRACE(schema);
    absl::StatusOr<std::shared_ptr<const Grammar>> g = JsonSchemaGrammar(schema, "schema");
    bool any = false;
    for (int64_t v = std::max<int64_t>(lo, -3000); v <= std::min<int64_t>(hi, 3000); ++v) {
      any = any || v % k == 0;
    }
    if (!any) {
      EXPECT_FALSE(g.ok());
      continue;
    }
    ASSERT_TRUE(g.ok()) << g.status();
    for (int64_t v = -3000; v <= 3000; ++v) {
      const bool want = v >= lo && v <= hi && v % k == 0;
      ASSERT_EQ(GrammarAccepts(*g, std::to_string(v)), want) << v;
    }
    // One reading at a time, listed or not (a choice of hundreds of numerals would overload the
    // matcher).
    GrammarMatcher m(*g);
    EXPECT_LE(m.state().num_stacks(), 24);  // about one per first byte
    // Far past the listed range.
    EXPECT_EQ(GrammarAccepts(*g, std::to_string(987654 * k)), hi > 3000);
    EXPECT_FALSE(GrammarAccepts(*g, std::to_string(987654 * k) + ".5"));
    EXPECT_FALSE(GrammarAccepts(*g, "-0"));
    EXPECT_FALSE(GrammarAccepts(*g, "007"));
  }
}

TEST(JsonSchemaTest, NumberBoundsWithLongFractions) {
  // Latitude, and a probability strictly between 0 and 1.
  ExpectAccepts(Must(R"({"type": "number", "minimum": -90, "maximum": 90})"),
                {"-90", "-89.999999", "0", "45.5", "90", "90.000"},
                {"-90.0001", "90.1", "-91", "100"});
  ExpectAccepts(Must(R"({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1})"),
                {"0.5", "0.00000000000001", "0.99999999999999"},
                {"0", "1", "0.000", "1.0",
                 // Past 15 significant digits: a double could round it onto the bound.
                 "0.999999999999999999", "0.000000000000001"});
  ExpectAccepts(Must(R"({"type": "number", "minimum": 0.1, "maximum": 0.30000000000000004})"),
                {"0.1", "0.2", "0.3", "0.30000000000000004", "0.1000000000000000000001"},
                {"0.09", "0.3000000000000001", "0.4"});
  // The cap follows the exclusive bound: a large inclusive one beside it takes nothing away.
  ExpectAccepts(
      Must(R"({"type": "number", "exclusiveMinimum": 0.001, "maximum": 100000000000000})"),
      {"0.0011", "0.00100000000001", "99999999999999.5", "100000000000000"},
      {"0.001", "0.000999", "0.001000000000000001"});
  ExpectAccepts(Must(R"({"type": "number", "exclusiveMaximum": -0.5})"), {"-0.51", "-1", "-1000.5"},
                {"-0.5", "-0.50", "-0.4", "0", "-0"});
}

TEST(JsonSchemaTest, NumberBoundsThatAreWholeAndNotNegative) {
  ExpectAccepts(Must(R"({"type": "number", "minimum": 0, "maximum": 1})"),
                {"0", "0.5", "1", "1.0", "1.000", "0.999"}, {"1.5", "1.01", "-0.1", "2", "1e0"});
  ExpectAccepts(Must(R"({"type": "number", "exclusiveMinimum": 0})"), {"0.001", "3", "0.10"},
                {"0", "0.0", "0.000", "-1"});
  ExpectAccepts(Must(R"({"type": "number", "maximum": 100})"), {"-5.5", "100", "99.9", "-1000"},
                {"100.1", "101"});
  ExpectAccepts(Must(R"({"type": "number", "minimum": 3, "exclusiveMaximum": 5})"),
                {"3", "4.99", "3.0"}, {"5", "5.0", "2.9"});
  ExpectAccepts(Must(R"({"minimum": 1})"), {"1", "2.5"}, {"0.5", "\"a\""});
  ExpectAccepts(Must(R"({"type": "number", "exclusiveMaximum": 0})"), {"-1", "-0.5", "-0.01"},
                {"0", "-0", "-0.0", "0.5"});
}

TEST(JsonSchemaTest, ErrorsNameTheKeywordAndWhere) {
  struct Case {
    const char* schema;
    const char* message;
  };
  for (
      const Case& c : {
          Case{R"({"type": "object", "properties": {"n": {"not": {"type": "integer"}}}})",
               R"(schema: field "properties.n" uses "not", which is not supported)"},
          Case{R"({"type": "array", "uniqueItems": true, "items": {"type": "string"}})",
               "uniqueItems\" with items other than an enum"},
          Case{R"({"type": "array", "uniqueItems": true, "items": {"enum": ["a", "b"]},
                   "minItems": 3})",
               "above the 2 distinct values"},
          Case{R"({"type": "array", "uniqueItems": true,
                   "items": {"type": "string", "enum": ["a", 1]}})",
               "not a string"},
          Case{R"({"type": "number", "multipleOf": 0.01})", "not a whole number up to 1e9"},
          Case{R"({"type": "integer", "multipleOf": 3.0})", "write it as an integer"},
          Case{
              R"({"type": "number", "exclusiveMinimum": 0.1, "exclusiveMaximum": 0.100000000000001})",
              "too close together"},
          Case{R"({"type": "number", "minimum": 1e-70})", "more than 20 digits"},
          Case{R"({"type": "number", "exclusiveMaximum": 1.2345678901234567e-48})",
               "more than 20 digits"},
          Case{R"({"type": "integer", "multipleOf": 0})", "must be greater than 0"},
          Case{R"({"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100000})",
               "more than 4096 multiples"},
          Case{R"({"type": "integer", "multipleOf": 5, "minimum": 12})", "a bound away from zero"},
          Case{R"({"type": "integer", "multipleOf": 20000})", "above 10000"},
          Case{R"({"type": "integer", "multipleOf": 7, "minimum": 1, "maximum": 6})",
               "no multiple"},
          Case{R"({"type": "strng"})", R"(has unknown type "strng")"},
          Case{R"({"$ref": "#/$defs/missing"})", "names nothing in the schema"},
          // uniqueItems through a reference to something other than a small enum, or a loop.
          Case{R"({"$defs": {"Name": {"type": "string"}}, "type": "array", "uniqueItems": true,
                  "items": {"$ref": "#/$defs/Name"}})",
               "uniqueItems\" with items other than an enum"},
          Case{R"({"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}},
                  "type": "array", "uniqueItems": true, "items": {"$ref": "#/$defs/A"}})",
               "uniqueItems\" with items other than an enum"},
          Case{R"({"type": "array", "uniqueItems": true, "items": {"$ref": "#/nope"}})",
               "names nothing in the schema"},
          Case{R"({"$ref": "https://example.com/s.json"})", "only references inside the schema"},
          Case{R"({"properties": {"a": 5}})", "must be a schema (an object or a boolean)"},
          Case{R"({"type": "string", "pattern": "(a"})", "missing ')'"},
          Case{R"({"allOf": [{}, {}]})", "with more than one schema is not supported"},
          Case{R"({"enum": []})", "must list at least one value"},
          Case{"false", "no value satisfies"},
          Case{R"({"$ref": "#"})", "derives no finite text"},
          Case{"{", "schema"},
          Case{R"({"type": "object", "properties": {"a": {}}, "anyOf": [{"required": ["a"]}]})",
               R"(combines "anyOf" with "properties", which is not supported)"},
          Case{R"({"$ref": "#/$defs/a", "maxLength": 3, "$defs": {"a": {"type": "string"}}})",
               R"(combines "$ref" with "maxLength")"},
          Case{R"({"type": "array", "items": false, "minItems": 1})", "minItems above 0"},
          Case{R"({"type": "integer", "minimum": 5, "maximum": 4})", "no integer between"},
          Case{R"({"type": "number", "minimum": 1e-25})", "more than 20 digits after the point"},
          Case{R"({"type": "number", "minimum": 0.5, "exclusiveMaximum": 0.5})",
               "no number between"},
          Case{R"({"type": "integer", "maximum": 1e20})", "beyond 1e15"},
      }) {
    absl::StatusOr<std::shared_ptr<const Grammar>> g = JsonSchemaGrammar(c.schema, "schema");
    ASSERT_FALSE(g.ok()) << c.schema;
    EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument) << c.schema;
    EXPECT_NE(g.status().message().find(c.message), std::string::npos)
        << c.schema << ": " << g.status();
  }
}

}  // namespace
}  // namespace strata
