#include "common/json.h"

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(JsonTest, ReadsTypedFieldsWithDefaults) {
  auto doc = JsonDocument::Parse(
      R"({"hidden_size": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie": true,
          "name": "llama", "nested": {"factor": 8}, "list": [1, 2, 3], "nothing": null})",
      "config.json");
  ASSERT_TRUE(doc.ok()) << doc.status();
  const JsonValue root = doc->root();
  EXPECT_EQ(*root.IntField("hidden_size"), 64);
  EXPECT_DOUBLE_EQ(*root.DoubleField("rms_norm_eps"), 1e-5);
  EXPECT_EQ(*root.IntField("rope_theta"), 500000);  // integral double accepted as an integer
  EXPECT_TRUE(*root.BoolFieldOr("tie", false));
  EXPECT_EQ(*root.StringField("name"), "llama");
  EXPECT_EQ(*root.IntFieldOr("missing", 7), 7);
  EXPECT_EQ(*root.IntFieldOr("nothing", 9), 9);  // null counts as missing
  EXPECT_EQ(*root.StringFieldOr("missing", "x"), "x");
  auto nested = root.Field("nested");
  ASSERT_TRUE(nested.ok());
  EXPECT_EQ(*nested->IntField("factor"), 8);
  auto list = root.Field("list")->AsArray();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 3u);
  EXPECT_EQ(*(*list)[2].AsInt(), 3);
  EXPECT_EQ((*list)[2].path(), "list[2]");
  auto members = root.AsObject();
  ASSERT_TRUE(members.ok());
  EXPECT_EQ((*members)[0].first, "hidden_size");
}

TEST(JsonTest, ErrorsNameSourceAndFieldPath) {
  auto doc = JsonDocument::Parse(R"({"a": {"b": "text", "c": 1.5}, "d": [true]})", "x/config.json");
  ASSERT_TRUE(doc.ok());
  const JsonValue root = doc->root();
  const absl::Status missing = root.IntField("hidden_size").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(missing.message(), "x/config.json: missing field \"hidden_size\"");
  const absl::Status type = root.Field("a")->IntField("b").status();
  EXPECT_EQ(type.message(), "x/config.json: field \"a.b\" must be an integer, not a string");
  EXPECT_EQ(root.Field("a")->IntField("c").status().message(),
            "x/config.json: field \"a.c\" must be an integer");
  EXPECT_EQ(root.Field("d")->AsArray()->at(0).AsInt().status().message(),
            "x/config.json: field \"d[0]\" must be an integer, not a boolean");
  EXPECT_EQ(root.Field("d")->Field("x").status().message(),
            "x/config.json: field \"d\" must be an object, not an array");
}

TEST(JsonTest, MalformedTextIsRefused) {
  auto doc = JsonDocument::Parse(R"({"a": )", "tokenizer.json");
  ASSERT_FALSE(doc.ok());
  EXPECT_EQ(doc.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(doc.status().message().find("tokenizer.json: invalid JSON"), absl::string_view::npos);
}

// JSON sets no limit on numbers; simdjson takes 64-bit integers and doubles only. Larger ones (a
// model's tool call may hold one) read as doubles, and digits inside strings are left alone.
TEST(JsonTest, NumbersOfAnySizeAreTaken) {
  auto doc = JsonDocument::Parse(
      R"({"big": 2251896668065540917442, "neg": -99999999999999999999, "huge": 1e400,
          "tiny": -2e-400, "u64": 18446744073709551615, "s": "123456789012345678901234567890",
          "list": [184467440737095516160, -1.5e999, )" +
          std::string(400, '9') + "]}",
      "big.json");
  ASSERT_TRUE(doc.ok()) << doc.status();
  EXPECT_TRUE(doc->widened());
  EXPECT_FALSE(
      JsonDocument::Parse("[18446744073709551615, -9223372036854775808, 1e308]", "x")->widened());
  const JsonValue r = doc->root();
  EXPECT_DOUBLE_EQ(*r.DoubleField("big"), 2251896668065540917442.0);
  EXPECT_DOUBLE_EQ(*r.DoubleField("neg"), -99999999999999999999.0);
  EXPECT_DOUBLE_EQ(*r.DoubleField("huge"), 1.7976931348623157e308);
  EXPECT_EQ(*r.DoubleField("tiny"), 0);
  EXPECT_EQ(*r.Field("u64")->AsDouble(), 18446744073709551615.0);
  EXPECT_EQ(*r.StringField("s"), "123456789012345678901234567890");
  const std::vector<JsonValue> list = *r.Field("list")->AsArray();
  ASSERT_EQ(list.size(), 3u);
  EXPECT_DOUBLE_EQ(*list[0].AsDouble(), 184467440737095516160.0);
  EXPECT_DOUBLE_EQ(*list[1].AsDouble(), -1.7976931348623157e308);
  EXPECT_DOUBLE_EQ(*list[2].AsDouble(), 1.7976931348623157e308);  // 400 digits
  // An integer field that is too large for one says so.
  EXPECT_FALSE(r.IntField("big").ok());
  // Malformed numbers are still refused.
  for (const char* bad : {"[1.]", "[-]", "[1e]", "[.5]", R"({"a": 1e400 x})"}) {
    EXPECT_FALSE(JsonDocument::Parse(bad, "bad").ok()) << bad;
  }
}

TEST(JsonTest, DocumentSurvivesMove) {
  auto doc = JsonDocument::Parse(R"({"k": "v"})", "s");
  ASSERT_TRUE(doc.ok());
  JsonDocument moved = std::move(*doc);
  EXPECT_EQ(*moved.root().StringField("k"), "v");
}

TEST(JsonTest, QuoteEscapesAndRoundTrips) {
  const std::string raw = std::string("a\"b\\c\n\t\x01 \xe4\xb8\xad", 12);
  const std::string quoted = JsonQuote(raw);
  EXPECT_EQ(quoted, "\"a\\\"b\\\\c\\n\\t\\u0001 \xe4\xb8\xad\"");
  auto doc = JsonDocument::Parse(quoted, "q");
  ASSERT_TRUE(doc.ok());
  EXPECT_EQ(*doc->root().AsString(), raw);
}

TEST(JsonTest, QuoteReplacesWhatIsNotUtf8) {
  // A stray continuation byte, a truncated sequence, an overlong "/", a surrogate, and valid
  // two- and four-byte characters.
  const std::string raw = std::string("a") + "\x80" + "b" + "\xe4\xb8" + "c" + "\xc0\xaf" + "d" +
                          "\xed\xa0\x80" + "e" + "\xc3\xa9" + "\xf0\x9f\x98\x80";
  const std::string quoted = JsonQuote(raw);
  const std::string r = "\xef\xbf\xbd";  // U+FFFD
  EXPECT_EQ(quoted, "\"a" + r + "b" + r + r + "c" + r + r + "d" + r + r + r +
                        "e\xc3\xa9\xf0\x9f\x98\x80\"");
  auto doc = JsonDocument::Parse(quoted, "q");
  ASSERT_TRUE(doc.ok()) << doc.status();
}

}  // namespace
}  // namespace strata
