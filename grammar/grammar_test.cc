#include "grammar/grammar.h"

#include <algorithm>
#include <optional>
#include <random>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

using Seq = GrammarBuilder::Seq;

std::shared_ptr<const Grammar> MustBuild(GrammarBuilder b, int32_t root) {
  absl::StatusOr<std::shared_ptr<const Grammar>> g = std::move(b).Build(root);
  EXPECT_TRUE(g.ok()) << g.status();
  return *g;
}

TEST(GrammarTest, LiteralsChoicesAndRepetition) {
  // root ::= "ab" ("c" | "de")* "!"?
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  Seq s = b.Literal("ab");
  const int32_t cd = b.Choice("cd", {b.Literal("c"), b.Literal("de")});
  s.push_back(b.Star("rep", {cd}));
  s.push_back(b.Optional("bang", b.Literal("!")));
  b.AddAlternative(root, s);
  auto g = MustBuild(std::move(b), root);
  for (const char* ok : {"ab", "abc", "abdec!", "abccccdede", "ab!"}) {
    EXPECT_TRUE(GrammarAccepts(g, ok)) << ok;
  }
  for (const char* bad : {"", "a", "abd", "abx", "ab!!", "ab!c", "b"}) {
    EXPECT_FALSE(GrammarAccepts(g, bad)) << bad;
  }
  GrammarMatcher m(g);
  EXPECT_FALSE(m.IsComplete());
  EXPECT_TRUE(m.Advance("ab"));
  EXPECT_TRUE(m.IsComplete());
  EXPECT_TRUE(m.CanContinue());
  ByteSet next = m.NextBytes();
  EXPECT_TRUE(next.Has('c') && next.Has('d') && next.Has('!'));
  EXPECT_FALSE(next.Has('e'));
  // A failed advance changes nothing, even when its first bytes fit.
  EXPECT_FALSE(m.Advance("dx"));
  EXPECT_TRUE(m.IsComplete());
  EXPECT_TRUE(m.Advance("de!"));
  EXPECT_TRUE(m.IsComplete());
  EXPECT_FALSE(m.CanContinue());
}

// Random sentences from the start and from a prefix are the grammar's, and the latter begin with
// the prefix; a prefix the grammar does not take gives none.
TEST(GrammarTest, RandomSentencesFromTheStartAndFromAPrefix) {
  // root ::= "ab" ("c" | "de")* "!"?
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  Seq s = b.Literal("ab");
  s.push_back(b.Star("rep", {b.Choice("cd", {b.Literal("c"), b.Literal("de")})}));
  s.push_back(b.Optional("bang", b.Literal("!")));
  b.AddAlternative(root, s);
  auto g = MustBuild(std::move(b), root);
  std::mt19937_64 rng(5);
  int from_prefix = 0;
  for (int i = 0; i < 50; ++i) {
    const std::optional<std::string> any = RandomSentence(g, rng, 64);
    if (any.has_value()) {
      EXPECT_TRUE(GrammarAccepts(g, *any)) << *any;
    }
    const std::optional<std::string> more = RandomSentenceFrom(g, "abde", rng, 64);
    if (!more.has_value()) continue;
    ++from_prefix;
    EXPECT_EQ(more->substr(0, 4), "abde");
    EXPECT_TRUE(GrammarAccepts(g, *more)) << *more;
  }
  EXPECT_GT(from_prefix, 25);
  EXPECT_FALSE(RandomSentenceFrom(g, "abx", rng, 64).has_value());
}

TEST(GrammarTest, BoundedRepetition) {
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  absl::StatusOr<int32_t> rep = b.BoundedRepeat("x", b.Literal("x"), 2, 4);
  ASSERT_TRUE(rep.ok());
  b.AddAlternative(root, {*rep});
  auto g = MustBuild(std::move(b), root);
  EXPECT_FALSE(GrammarAccepts(g, "x"));
  EXPECT_TRUE(GrammarAccepts(g, "xx"));
  EXPECT_TRUE(GrammarAccepts(g, "xxxx"));
  EXPECT_FALSE(GrammarAccepts(g, "xxxxx"));
  GrammarBuilder big;
  EXPECT_FALSE(big.BoundedRepeat("x", big.Literal("x"), 0, GrammarBuilder::kMaxRepeat + 1).ok());
  EXPECT_FALSE(big.BoundedRepeat("x", big.Literal("x"), 3, 2).ok());
}

TEST(GrammarTest, Utf8ClassesMatchExactlyTheirCodePoints) {
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  // Two ranges spanning every encoded length, and the surrogates (which no UTF-8 text holds).
  b.AddAlternative(root, {b.Utf8Class("c", {{0x41, 0x5A}, {0x7E, 0x10FFFF}})});
  auto g = MustBuild(std::move(b), root);
  auto utf8 = [](char32_t cp) {
    std::string s;
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else if (cp < 0x800) {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      s += static_cast<char>(0xE0 | (cp >> 12));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      s += static_cast<char>(0xF0 | (cp >> 18));
      s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    return s;
  };
  int checked = 0;
  for (char32_t cp = 0; cp <= 0x10FFFF; cp += (cp < 0x1000 ? 1 : 97)) {
    const bool in = (cp >= 0x41 && cp <= 0x5A) || (cp >= 0x7E && !(cp >= 0xD800 && cp <= 0xDFFF));
    ASSERT_EQ(GrammarAccepts(g, utf8(cp)), in) << std::hex << static_cast<uint32_t>(cp);
    ++checked;
  }
  for (char32_t cp :
       {0x7Fu, 0x80u, 0x7FFu, 0x800u, 0xD7FFu, 0xE000u, 0xFFFFu, 0x10000u, 0x10FFFFu}) {
    EXPECT_TRUE(GrammarAccepts(g, utf8(cp))) << std::hex << static_cast<uint32_t>(cp);
  }
  EXPECT_GT(checked, 10000);
  // Overlong forms and a lone continuation byte are not UTF-8.
  EXPECT_FALSE(GrammarAccepts(g, "\xC1\xBF"));
  EXPECT_FALSE(GrammarAccepts(g, "\xE0\x81\xBF"));
  EXPECT_FALSE(GrammarAccepts(g, "\x80"));
  EXPECT_FALSE(GrammarAccepts(g, "\xED\xA0\x80"));  // U+D800
}

TEST(GrammarTest, RightRecursionRunsInConstantDepth) {
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  b.AddAlternative(root, {b.Star("as", b.Literal("a")), b.Byte('!')});
  auto g = MustBuild(std::move(b), root);
  GrammarMatcher m(g);
  size_t max_size = 0;
  for (int i = 0; i < 100000; ++i) {
    ASSERT_TRUE(m.Advance("a"));
    max_size = std::max(max_size, m.state().data.size());
  }
  EXPECT_LT(max_size, 16u);
  EXPECT_FALSE(m.IsComplete());
  EXPECT_TRUE(m.Advance("!"));
  EXPECT_TRUE(m.IsComplete());
}

TEST(GrammarTest, NestingDeepensTheStackAndUnwinds) {
  // v ::= "[" v "]" | "x"
  GrammarBuilder b;
  const int32_t v = b.NewRule("v");
  b.AddAlternative(v, {b.Byte('['), b.Ref(v), b.Byte(']')});
  b.AddAlternative(v, b.Literal("x"));
  auto g = MustBuild(std::move(b), v);
  const std::string deep = std::string(200, '[') + "x" + std::string(200, ']');
  EXPECT_TRUE(GrammarAccepts(g, deep));
  EXPECT_FALSE(GrammarAccepts(g, deep + "]"));
  EXPECT_FALSE(GrammarAccepts(g, deep.substr(1)));
}

TEST(GrammarTest, AmbiguityKeepsEveryReading) {
  // root ::= ("a" | "ab") "bc"
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  const int32_t first = b.Choice("first", {b.Literal("a"), b.Literal("ab")});
  Seq s = {first};
  for (int32_t e : b.Literal("bc")) s.push_back(e);
  b.AddAlternative(root, s);
  auto g = MustBuild(std::move(b), root);
  GrammarMatcher m(g);
  ASSERT_TRUE(m.Advance("ab"));
  EXPECT_EQ(m.state().num_stacks(), 2);
  EXPECT_TRUE(GrammarAccepts(g, "abc"));
  EXPECT_TRUE(GrammarAccepts(g, "abbc"));
  EXPECT_FALSE(GrammarAccepts(g, "abbbc"));
}

TEST(GrammarTest, LoopsThatConsumeNothingEnd) {
  // (a*)*b: a rule that can repeat without consuming anything.
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  const int32_t inner = b.Star("inner", b.Literal("a"));
  b.AddAlternative(root, {b.Star("outer", {inner}), b.Byte('b')});
  auto g = MustBuild(std::move(b), root);
  EXPECT_TRUE(GrammarAccepts(g, "b"));
  EXPECT_TRUE(GrammarAccepts(g, "aaab"));
  EXPECT_FALSE(GrammarAccepts(g, "aaa"));
}

TEST(GrammarTest, LeftRecursionIsRefused) {
  // e ::= e "+" "x" | "x"
  GrammarBuilder b;
  const int32_t e = b.NewRule("expr");
  b.AddAlternative(e, {b.Ref(e), b.Byte('+'), b.Byte('x')});
  b.AddAlternative(e, b.Literal("x"));
  absl::StatusOr<std::shared_ptr<const Grammar>> g = std::move(b).Build(e);
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("left-recursive at expr"), std::string::npos) << g.status();
}

TEST(GrammarTest, AlternativesThatNeverFinishArePruned) {
  // root ::= "a" loop | "ab";  loop ::= "b" loop (no way out)
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  const int32_t loop = b.NewRule("loop");
  b.AddAlternative(loop, {b.Byte('b'), b.Ref(loop)});
  b.AddAlternative(root, {b.Byte('a'), b.Ref(loop)});
  b.AddAlternative(root, b.Literal("ab"));
  auto g = MustBuild(std::move(b), root);
  GrammarMatcher m(g);
  ASSERT_TRUE(m.Advance("ab"));
  EXPECT_TRUE(m.IsComplete());
  EXPECT_FALSE(m.CanContinue());  // "abb..." would have been a dead end

  GrammarBuilder never;
  const int32_t r = never.NewRule("r");
  never.AddAlternative(r, {never.Byte('x'), never.Ref(r)});
  EXPECT_FALSE(std::move(never).Build(r).ok());
}

TEST(GrammarTest, ToStringShowsTheRules) {
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  b.AddAlternative(root, {b.Bytes(ByteSet::Range('a', 'c')), b.Byte('"')});
  b.AddAlternative(root, {});
  auto g = MustBuild(std::move(b), root);
  EXPECT_EQ(g->ToString(), "root#0 ::= [a-c] [\"] | \"\"\n");
}

// The frames a long run of a bounded repetition passes through come down to a handful once
// positions are taken as Grammar::EquivalentPosition for 3-byte texts: those with more than 3
// copies left are one; a repetition whose copy may be empty keeps all of its own.
TEST(GrammarTest, EquivalentPositionsOfALongRunAreFew) {
  // The elements from a position to the end of its alternative: what a frame there goes on to
  // match. A position and the one it is taken as must agree on them.
  auto rest = [](const Grammar& g, int32_t p) {
    std::vector<int32_t> out;
    for (; g.elements()[p] != Grammar::kEnd; ++p) out.push_back(g.elements()[p]);
    return out;
  };
  auto frames = [&](const std::shared_ptr<const Grammar>& g, int64_t max_bytes,
                    const std::string& text) {
    const int n = static_cast<int>(text.size());
    std::set<int32_t> raw, equivalent;
    GrammarMatcher m(g);
    for (int i = 0; i <= n; ++i) {
      const GrammarState& st = m.state();
      for (int32_t s = 0; s < st.num_stacks(); ++s) {
        for (int32_t p : st.stack(s)) {
          raw.insert(p);
          const int32_t q = g->EquivalentPosition(p, max_bytes);
          equivalent.insert(q);
          // The same element in another copy: the rest of its alternative is the same up to the
          // copy it goes on to (another copy of the run, or the rule after it).
          const std::vector<int32_t> from = rest(*g, p), to = rest(*g, q);
          EXPECT_LE(to.size(), from.size()) << p << " -> " << q;
          for (size_t k = 0; k + 1 < std::min(to.size(), from.size()); ++k) {
            if (to[k] != from[k]) {
              ADD_FAILURE() << p << " -> " << q << " differs at " << k;
              break;
            }
          }
        }
      }
      if (i < n) {
        EXPECT_TRUE(m.Advance(text.substr(i, 1)));
      }
    }
    return std::pair{raw.size(), equivalent.size()};
  };
  // Copies of one byte, and of three (a copy of several elements), with and without a head of
  // required copies, and all required (no optional copies after them).
  struct Case {
    int64_t min_count, max_count;
    std::string copy;
  };
  for (const Case& c : {Case{0, 60, "a"}, Case{30, 60, "a"}, Case{60, 60, "a"}, Case{0, 20, "abc"},
                        Case{12, 20, "abc"}}) {
    SCOPED_TRACE(absl::StrCat(c.copy, "{", c.min_count, ",", c.max_count, "}"));
    GrammarBuilder b;
    const int32_t root = b.NewRule("root");
    GrammarBuilder::Seq copy;
    for (char ch : c.copy) copy.push_back(b.Byte(static_cast<uint8_t>(ch)));
    auto run = b.BoundedRepeat("x", copy, c.min_count, c.max_count);
    ASSERT_TRUE(run.ok());
    b.AddAlternative(root, {*run, b.Byte('.')});
    auto g = *std::move(b).Build(root);
    std::string text;  // whole copies: at least 55 bytes, and past the required ones
    while (static_cast<int64_t>(text.size()) <
           std::max<int64_t>(55, c.min_count * static_cast<int64_t>(c.copy.size()))) {
      text += c.copy;
    }
    const auto [raw, equivalent] = frames(g, 3, text);
    EXPECT_GE(raw, 50u);
    EXPECT_LE(equivalent, 8 * c.copy.size());
    EXPECT_EQ(frames(g, 1000, text).second, raw);  // texts longer than the run tell all apart
    EXPECT_EQ(frames(g, 0, text).second, raw);     // and with no text at all nothing is shared
  }
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  const int32_t maybe = b.Optional("maybe", {b.Byte('a')});
  auto run = b.BoundedRepeat("x", {maybe}, 0, 60);
  ASSERT_TRUE(run.ok());
  b.AddAlternative(root, {*run, b.Byte('.')});
  auto g = *std::move(b).Build(root);
  const auto [raw, equivalent] = frames(g, 3, std::string(55, 'a'));
  EXPECT_EQ(equivalent, raw);
}

}  // namespace
}  // namespace strata
