#include "grammar/structured_output.h"

#include <string>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(StructuredOutputTest, EachKindCompiles) {
  v1::StructuredOutput spec;
  absl::StatusOr<std::shared_ptr<const Grammar>> none = CompileStructuredOutput(spec, "so");
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, nullptr);

  spec.set_json_object(true);
  auto object = CompileStructuredOutput(spec, "so");
  ASSERT_TRUE(object.ok()) << object.status();
  EXPECT_TRUE(GrammarAccepts(*object, R"({"a": [1, "b"]})"));
  EXPECT_FALSE(GrammarAccepts(*object, "[1]"));

  spec.set_json_schema(R"({"type": "object", "properties": {"ok": {"type": "boolean"}},
                           "required": ["ok"]})");
  auto schema = CompileStructuredOutput(spec, "so");
  ASSERT_TRUE(schema.ok()) << schema.status();
  EXPECT_TRUE(GrammarAccepts(*schema, R"({"ok": true})"));
  EXPECT_FALSE(GrammarAccepts(*schema, R"({"ok": 1})"));

  spec.set_compact_json(true);
  auto compact = CompileStructuredOutput(spec, "so");
  ASSERT_TRUE(compact.ok()) << compact.status();
  EXPECT_TRUE(GrammarAccepts(*compact, R"({"ok":true})"));
  EXPECT_FALSE(GrammarAccepts(*compact, R"({"ok": true})"));
  spec.set_compact_json(false);

  spec.set_regex(R"(\d{3}-[A-Z]+)");
  auto regex = CompileStructuredOutput(spec, "so");
  ASSERT_TRUE(regex.ok()) << regex.status();
  EXPECT_TRUE(GrammarAccepts(*regex, "123-AB"));
  EXPECT_FALSE(GrammarAccepts(*regex, "12-AB"));

  spec.set_grammar("root ::= [a-c]+ \"!\"");
  auto gbnf = CompileStructuredOutput(spec, "so");
  ASSERT_TRUE(gbnf.ok()) << gbnf.status();
  EXPECT_TRUE(GrammarAccepts(*gbnf, "abc!"));
  EXPECT_FALSE(GrammarAccepts(*gbnf, "abd!"));

  spec.mutable_choice()->add_texts("yes");
  spec.mutable_choice()->add_texts("no");
  spec.mutable_choice()->add_texts("yes, but");
  auto choice = CompileStructuredOutput(spec, "so");
  ASSERT_TRUE(choice.ok()) << choice.status();
  for (const char* t : {"yes", "no", "yes, but"}) EXPECT_TRUE(GrammarAccepts(*choice, t)) << t;
  EXPECT_FALSE(GrammarAccepts(*choice, "maybe"));
}

TEST(StructuredOutputTest, ErrorsNameTheField) {
  struct Case {
    v1::StructuredOutput spec;
    const char* message;
  };
  std::vector<Case> cases(9);
  cases[6].spec.set_json_schema(R"({"type": "object"})");
  cases[6].spec.set_prefix("[");
  cases[6].message = "sampling.structured_output.prefix does not follow the grammar";
  cases[7].spec.set_prefix("{");
  cases[7].message = "sampling.structured_output.prefix needs a grammar";
  cases[8].spec.set_regex("(.?){300}");
  cases[8].message =
      "sampling.structured_output is too ambiguous to follow (more than 256 readings at once)";
  cases[0].spec.set_json_schema(R"({"not": {"type": "integer"}})");
  cases[0].message =
      R"(sampling.structured_output.json_schema: uses "not", which is not supported)";
  cases[1].spec.set_json_schema(std::string(kMaxJsonSchemaBytes + 1, ' '));
  cases[1].message = "sampling.structured_output.json_schema must be at most 65536 bytes";
  cases[2].spec.set_regex("a(");
  cases[2].message = "sampling.structured_output.regex: missing ')' at offset 2";
  cases[3].spec.set_regex("");
  cases[3].message = "sampling.structured_output.regex must be 1 to 4096 bytes";
  cases[4].spec.mutable_choice();
  cases[4].message = "sampling.structured_output.choice.texts must hold 1 to 256 texts";
  cases[5].spec.mutable_choice()->add_texts("a");
  cases[5].spec.mutable_choice()->add_texts("");
  cases[5].message = "sampling.structured_output.choice.texts[1] must be 1 to 1024 bytes";
  for (const Case& c : cases) {
    auto g = CompileStructuredOutput(c.spec, "sampling.structured_output");
    ASSERT_FALSE(g.ok()) << c.message;
    EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(std::string(g.status().message()), std::string(c.message));
  }
}

TEST(StructuredOutputTest, CacheReturnsTheSameGrammarAndDropsTheOldest) {
  GrammarCache cache(2);
  v1::StructuredOutput a, b, c;
  a.set_regex("a+");
  b.set_regex("b+");
  c.set_regex("c+");
  auto a1 = cache.Get(a, "so");
  auto a2 = cache.Get(a, "so");
  ASSERT_TRUE(a1.ok() && a2.ok());
  EXPECT_EQ(a1->get(), a2->get());
  EXPECT_EQ(cache.hits(), 1);
  ASSERT_TRUE(cache.Get(b, "so").ok());
  ASSERT_TRUE(cache.Get(c, "so").ok());  // a is the oldest: dropped
  auto a3 = cache.Get(a, "so");
  ASSERT_TRUE(a3.ok());
  EXPECT_NE(a1->get(), a3->get());
  EXPECT_EQ(cache.misses(), 4);
  v1::StructuredOutput bad;
  bad.set_regex("(");
  EXPECT_FALSE(cache.Get(bad, "so").ok());
  EXPECT_FALSE(cache.Get(bad, "so").ok());
  EXPECT_EQ(cache.misses(), 6);
}

}  // namespace
}  // namespace strata
