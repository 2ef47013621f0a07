#include "grammar/regex_grammar.h"

#include <random>
#include <regex>
#include <string>
#include <tuple>

#include "gtest/gtest.h"

namespace strata {
namespace {

std::shared_ptr<const Grammar> Must(absl::string_view pattern) {
  absl::StatusOr<std::shared_ptr<const Grammar>> g = RegexGrammar(pattern);
  EXPECT_TRUE(g.ok()) << pattern << ": " << g.status();
  return g.ok() ? *g : nullptr;
}

// Every string over a small alphabet up to a length, and random longer ones, matched by the
// grammar exactly when std::regex_match (ECMAScript) matches the whole string.
TEST(RegexGrammarTest, AgreesWithStdRegex) {
  const std::string alphabet = "ab1_ -.\n";
  const char* patterns[] = {
      "a",           "a|b",          "ab*",    "(ab)+",     "a?b?1?",
      "[ab]{2,3}",   "[^a]*",        "\\d+",   "\\w\\s\\W", "[a-b1]{0,2}_",
      "(a|ab)(b|_)", "(?:a|1)*b{2}", ".{3}",   "a.b",       "[\\-.]+",
      "^a+$",        "(a*)*",        "(a|)+b", "\\D\\S*",   "a{2}|b{1,}|_{0,1}",
      "((a|b)1)*",   "[-a]b",        "a{3,}",  "\\.\\-",    "[^\\d\\s]+",
  };
  std::mt19937 rng(7);
  for (const char* p : patterns) {
    auto g = Must(p);
    ASSERT_NE(g, nullptr);
    const std::regex re(p, std::regex::ECMAScript);
    std::vector<std::string> texts = {""};
    for (size_t i = 0; i < texts.size() && texts[i].size() < 4; ++i) {
      for (char c : alphabet) texts.push_back(texts[i] + c);
    }
    for (int k = 0; k < 300; ++k) {
      std::string s;
      const int n = static_cast<int>(rng() % 9);
      for (int j = 0; j < n; ++j) s += alphabet[rng() % alphabet.size()];
      texts.push_back(s);
    }
    for (const std::string& t : texts) {
      ASSERT_EQ(GrammarAccepts(g, t), std::regex_match(t, re))
          << "pattern " << p << " text '" << t << "'";
    }
  }
}

TEST(RegexGrammarTest, UnicodeAndEscapes) {
  auto g = Must("caf\xC3\xA9 [\xCE\xB1-\xCF\x89]+ \\u00e9\\x41");
  EXPECT_TRUE(GrammarAccepts(g,
                             "caf\xC3\xA9 \xCE\xB1\xCE\xB2 \xC3\xA9"
                             "A"));
  EXPECT_FALSE(GrammarAccepts(g,
                              "cafe \xCE\xB1 \xC3\xA9"
                              "A"));
  // '.' is any character but a newline, however many bytes it takes.
  auto dot = Must("<.>");
  EXPECT_TRUE(GrammarAccepts(dot, "<\xF0\x9F\x98\x80>"));
  EXPECT_FALSE(GrammarAccepts(dot, "<\n>"));
  EXPECT_FALSE(GrammarAccepts(dot, "<\xF0\x9F>"));
}

TEST(RegexGrammarTest, AnchorsSearchAndSurrogatePairs) {
  // A surrogate pair's escape is the one character it spells.
  EXPECT_TRUE(GrammarAccepts(Must("\\ud83d\\ude00+"), "\xF0\x9F\x98\x80\xF0\x9F\x98\x80"));
  // '$' before closing groups only, '^' opening a top-level alternative.
  EXPECT_TRUE(GrammarAccepts(Must("(a|b$)"), "b"));
  EXPECT_TRUE(GrammarAccepts(Must("^a|^b$"), "b"));
  // Search: unanchored ends take any text.
  for (const auto& [pattern, text, match] :
       std::vector<std::tuple<std::string, std::string, bool>>{{"\\d", "x1y", true},
                                                               {"^\\d", "1y", true},
                                                               {"^\\d", "x1", false},
                                                               {"\\d$", "x1", true},
                                                               {"\\d$", "1x", false},
                                                               {"^a|b$", "ax", true},
                                                               {"^a|b$", "xb", true},
                                                               {"^a|b$", "xa", false}}) {
    GrammarBuilder b;
    const int32_t root = b.NewRule("root");
    absl::StatusOr<GrammarBuilder::Seq> s =
        AddRegex(&b, pattern, RegexText::kRaw, RegexMatch::kSearch);
    ASSERT_TRUE(s.ok()) << s.status();
    b.AddAlternative(root, *s);
    EXPECT_EQ(GrammarAccepts(*std::move(b).Build(root), text), match) << pattern << " " << text;
  }
  // \s takes Unicode spaces (ECMA-262), so \S leaves them out.
  EXPECT_TRUE(GrammarAccepts(Must("a\\sb"),
                             "a\xC2\xA0"
                             "b"));
  EXPECT_FALSE(GrammarAccepts(Must("a\\Sb"),
                              "a\xC2\xA0"
                              "b"));
}

TEST(RegexGrammarTest, GrammarsTooLargeOrTooAmbiguousAreRefused) {
  std::string many;
  for (int i = 0; i < 60; ++i) many += "a{0,4000}";
  absl::StatusOr<std::shared_ptr<const Grammar>> big = RegexGrammar(many);
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("too large"), std::string::npos) << big.status();
  // Every copy may take the next character: hundreds of readings at once.
  GrammarMatcher m(Must("(.?){300}"));
  EXPECT_TRUE(m.Overloaded());
  GrammarMatcher later(Must("a(.?){300}"));
  EXPECT_FALSE(later.Overloaded());
  ASSERT_TRUE(later.Advance("a"));
  EXPECT_TRUE(later.Overloaded());
  GrammarMatcher fine(Must("(ab|a)(bc|c)*"));
  ASSERT_TRUE(fine.Advance("abcbc"));
  EXPECT_FALSE(fine.Overloaded());
}

TEST(RegexGrammarTest, JsonStringTextEscapes) {
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  absl::StatusOr<GrammarBuilder::Seq> s = AddRegex(&b, "a\"[\\n\\\\x]\\.", RegexText::kJsonString);
  ASSERT_TRUE(s.ok()) << s.status();
  b.AddAlternative(root, *s);
  auto g = *std::move(b).Build(root);
  EXPECT_TRUE(GrammarAccepts(g, "a\\\"\\n."));
  EXPECT_TRUE(GrammarAccepts(g, "a\\\"\\\\."));
  EXPECT_TRUE(GrammarAccepts(g, "a\\\"x."));
  EXPECT_FALSE(GrammarAccepts(g, "a\"x."));
  EXPECT_FALSE(GrammarAccepts(g, "a\\\"\n."));
}

TEST(RegexGrammarTest, UnsupportedFeaturesAreRefusedWithTheOffset) {
  struct Case {
    std::string pattern;
    const char* message;
  };
  for (const Case& c :
       {Case{"(a)\\1", "backreferences are not supported at offset 4"},
        Case{"a(?=b)", "lookaround and inline flags are not supported at offset 3"},
        Case{"\\bword", "word boundaries are not supported at offset 1"},
        Case{"(ab", "missing ')' at offset 3"}, Case{"ab)", "unbalanced ')' at offset 2"},
        Case{"[ab", "unterminated character class at offset 3"},
        Case{"*a", "nothing to repeat at offset 0"}, Case{"a{5,2}", "out of order"},
        Case{"a{1,99999}", "exceed 4096"}, Case{"[z-a]", "class range out of order"},
        Case{"(?P<n>a)(?P=n)", "backreferences are not supported"},
        Case{"(?P<a b>x)", "bad group name"}, Case{"a$b", "'$' is supported only at the end"},
        Case{"(a$)b", "'$' is supported only at the end"},
        Case{"\\ud800", "a lone surrogate is not a character"},
        Case{std::string(65, '(') + "a" + std::string(65, ')'), "groups nest deeper than 64"}}) {
    absl::StatusOr<std::shared_ptr<const Grammar>> g = RegexGrammar(c.pattern);
    ASSERT_FALSE(g.ok()) << c.pattern;
    EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(g.status().message().find(c.message), std::string::npos)
        << c.pattern << ": " << g.status();
  }
}

}  // namespace
}  // namespace strata
