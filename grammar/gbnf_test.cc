#include "grammar/gbnf.h"

#include <string>

#include "gtest/gtest.h"

namespace strata {
namespace {

std::shared_ptr<const Grammar> Must(absl::string_view text) {
  absl::StatusOr<std::shared_ptr<const Grammar>> g = GbnfGrammar(text);
  EXPECT_TRUE(g.ok()) << g.status() << "\n" << text;
  return g.ok() ? *g : nullptr;
}

TEST(GbnfTest, RulesAlternativesClassesAndRepetition) {
  auto g = Must(R"(
    root   ::= answer ("," ws answer)*
    answer ::= "yes" | "no" | [0-9]+   # a comment
    ws     ::= [ \t\n]*
  )");
  ASSERT_NE(g, nullptr);
  for (const char* ok : {"yes", "no,yes", "yes, no,\t42", "7"}) EXPECT_TRUE(GrammarAccepts(g, ok));
  for (const char* bad : {"", "maybe", "yes,", "yes ,no", "-1"}) {
    EXPECT_FALSE(GrammarAccepts(g, bad)) << bad;
  }
}

TEST(GbnfTest, BodiesSpanLinesAndEscapesRead) {
  auto g = Must(
      "root ::= greeting\n"
      "  \" \"\n"
      "  name{1,2} \"!\"?\n"
      "greeting ::= (\"hi\" |\n"
      "              \"caf\\u00e9\")\n"
      "name ::= [A-Z] [^ !\\n\\x00]*\n");
  ASSERT_NE(g, nullptr);
  EXPECT_TRUE(GrammarAccepts(g, "hi Ada"));
  EXPECT_TRUE(GrammarAccepts(g, "caf\xC3\xA9 AdaLovelace!"));
  EXPECT_TRUE(GrammarAccepts(g, "hi AbC\xCE\xB1"));
  EXPECT_FALSE(GrammarAccepts(g, "hi ada"));
  EXPECT_FALSE(GrammarAccepts(g, "hi Ada!!"));
  // Quantifiers may stand apart from their items; groups nest only so deep.
  auto spaced = Must("root ::= \"a\" * \"b\" {2}");
  EXPECT_TRUE(GrammarAccepts(spaced, "aabb"));
  EXPECT_FALSE(GrammarAccepts(spaced, "ab"));
  absl::StatusOr<std::shared_ptr<const Grammar>> deep =
      GbnfGrammar("root ::= " + std::string(30000, '('));
  ASSERT_FALSE(deep.ok());
  EXPECT_NE(deep.status().message().find("nest deeper than 64"), std::string::npos);
  auto any = Must(R"(root ::= "<" . ">")");
  EXPECT_TRUE(GrammarAccepts(any, "<\n>"));
  EXPECT_TRUE(GrammarAccepts(any, "<\xF0\x9F\x98\x80>"));
}

// A JSON grammar in GBNF (recursive through value) accepts JSON and nothing else.
TEST(GbnfTest, ARecursiveJsonGrammar) {
  auto g = Must(R"(
root   ::= value
value  ::= object | array | string | number | ("true" | "false" | "null")
object ::= "{" ws ( string ws ":" ws value ( ws "," ws string ws ":" ws value )* )? ws "}"
array  ::= "[" ws ( value ( ws "," ws value )* )? ws "]"
string ::= "\"" ( [^"\\\x00-\x1f] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\""
number ::= "-"? ("0" | [1-9] [0-9]*) ("." [0-9]+)? ([eE] [-+]? [0-9]+)?
ws     ::= [ \t\n\r]*
)");
  ASSERT_NE(g, nullptr);
  for (const char* ok :
       {R"({"a": [1, -2.5e3, {"b": null}], "c": "\u00e9\n"})", "[]", "true", R"("x\"y")"}) {
    EXPECT_TRUE(GrammarAccepts(g, ok)) << ok;
  }
  for (const char* bad : {R"({"a" 1})", "[1,]", "01", R"("\x")", "nul"}) {
    EXPECT_FALSE(GrammarAccepts(g, bad)) << bad;
  }
}

TEST(GbnfTest, ErrorsSayWhere) {
  struct Case {
    const char* text;
    const char* message;
  };
  for (const Case& c : {
           Case{"root ::= item\n", "rule item is used but not defined at line 1, column 10"},
           Case{"item ::= \"x\"\n", "the grammar has no rule named root"},
           Case{"root ::= \"a\"\nroot ::= \"b\"", "rule root is defined twice at line 2"},
           Case{"root ::= expr\nexpr ::= expr \"+\" \"x\" | \"x\"", "left-recursive at expr"},
           Case{"root ::= \"abc", "unterminated literal at line 1, column 14"},
           Case{"root ::= \"\\q\"", "unknown escape \\q at line 1, column 12"},
           Case{"root ::= [z-a]", "class range out of order"},
           Case{"root = \"a\"", "expected ::= after the rule name at line 1, column 6"},
           Case{"root ::= \"a\"{3,1}", "out of order"},
           Case{"root ::= (\"a\"", "expected ) at line 1, column 14"},
           Case{"root ::= [\\uD800-\\uDFFF]", "the class matches no character"},
       }) {
    absl::StatusOr<std::shared_ptr<const Grammar>> g = GbnfGrammar(c.text);
    ASSERT_FALSE(g.ok()) << c.text;
    EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(g.status().message().find(c.message), std::string::npos)
        << c.text << ": " << g.status();
  }
}

}  // namespace
}  // namespace strata
