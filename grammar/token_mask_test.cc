#include "grammar/token_mask.h"

#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grammar/json_schema.h"
#include "grammar/regex_grammar.h"
#include "grammar/vocabulary.h"
#include "gtest/gtest.h"
#include "tokenizer/tokenizer.h"

namespace strata {
namespace {

// The bundled model's tokenizer's tokens as bytes, special tokens left empty.
std::vector<std::string> TinyVocabulary() {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok =
      Tokenizer::FromModelDir("models/strata-tiny/base");
  EXPECT_TRUE(tok.ok()) << tok.status();
  const std::shared_ptr<const TokenTrie> trie = TokenTrieOf(**tok);
  std::vector<std::string> bytes(trie->vocab_size());
  for (int32_t id = 0; id < trie->vocab_size(); ++id) bytes[id] = trie->bytes(id);
  // The special tokens (EOS 2046, BOS 2047) are empty; the others are not.
  EXPECT_TRUE(bytes[2046].empty() && bytes[2047].empty());
  EXPECT_FALSE(bytes[300].empty());
  return bytes;
}

// At every point of a text the schema accepts, the trie walk allows exactly the tokens that a
// matcher accepts byte by byte.
TEST(TokenMaskTest, AllowsExactlyTheTokensTheMatcherAccepts) {
  const std::vector<std::string> vocab = TinyVocabulary();
  ASSERT_EQ(vocab.size(), 2048u);
  const TokenTrie trie(vocab);
  absl::StatusOr<std::shared_ptr<const Grammar>> g = JsonSchemaGrammar(
      R"({"type": "object", "properties": {"name": {"type": "string"},
          "scores": {"type": "array", "items": {"type": "number"}},
          "kind": {"enum": ["import", "def"]}}, "required": ["name", "kind"]})",
      "schema");
  ASSERT_TRUE(g.ok()) << g.status();
  const std::string text =
      R"({"name": "def main():\n\tpass", "scores": [1, -2.5e3], "kind": "def"})";
  GrammarMatcher m(*g);
  std::vector<uint8_t> allowed(vocab.size());
  int64_t total = 0;
  for (size_t i = 0; i <= text.size(); ++i) {
    const int64_t n = trie.Allowed(m.grammar(), m.state(), absl::MakeSpan(allowed));
    int64_t expected = 0;
    for (int32_t t = 0; t < static_cast<int32_t>(vocab.size()); ++t) {
      GrammarMatcher copy = m;
      const bool ok = !vocab[t].empty() && copy.Advance(vocab[t]);
      ASSERT_EQ(allowed[t] != 0, ok)
          << "after '" << text.substr(0, i) << "' token " << t << " '" << vocab[t] << "'";
      expected += ok;
    }
    EXPECT_EQ(n, expected);
    // Until the object closes something fits; after it only the end (EOS, the caller's) does.
    EXPECT_EQ(n > 0, i < text.size()) << "after '" << text.substr(0, i) << "'";
    total += n;
    if (i < text.size()) {
      ASSERT_TRUE(m.Advance(text.substr(i, 1)));
    }
  }
  EXPECT_TRUE(m.IsComplete());
  // Inside the string most of the vocabulary fits; at the start only '{' and whitespace do.
  EXPECT_GT(total, 1000);
}

// The masker's per-top results give the trie walk's masks exactly, on a schema and on any JSON,
// and the second generation under the same grammar finds them all kept.
TEST(TokenMaskTest, TheMaskerAllowsWhatTheWalkAllows) {
  const std::vector<std::string> vocab = TinyVocabulary();
  auto trie = std::make_shared<const TokenTrie>(vocab);
  TokenMasker masker(trie, int64_t{64} << 20);
  auto schema = JsonSchemaGrammar(
      R"({"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
          "tags": {"type": "array", "items": {"type": "string"}},
          "n": {"type": "number"}}, "required": ["tags"]})",
      "schema");
  ASSERT_TRUE(schema.ok()) << schema.status();
  auto any = AnyJsonGrammar(false);
  ASSERT_TRUE(any.ok());
  const std::pair<std::shared_ptr<const Grammar>, std::string> cases[] = {
      {*schema, R"({"name": "a\"é", "tags": ["x y", "", "\n{"], "n": -1.5e2})"},
      {*any, "[{\"k\": [true, null, \"\u00e9\\\"\"]}, -0, \"\", {}]"},
  };
  std::vector<uint8_t> want(vocab.size()), got(vocab.size());
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t misses = masker.stats().misses;
    for (const auto& [grammar, text] : cases) {
      GrammarMatcher m(grammar);
      for (size_t i = 0; i <= text.size(); ++i) {
        const int64_t n = trie->Allowed(*grammar, m.state(), absl::MakeSpan(want));
        ASSERT_EQ(masker.Allowed(m, absl::MakeSpan(got)), n) << text.substr(0, i);
        ASSERT_EQ(got, want) << "after '" << text.substr(0, i) << "'";
        if (i < text.size()) {
          ASSERT_TRUE(m.Advance(text.substr(i, 1))) << text.substr(0, i + 1);
        }
      }
    }
    if (pass == 1) {
      EXPECT_EQ(masker.stats().misses, misses);  // everything kept
    }
  }
  EXPECT_GT(masker.stats().hits, masker.stats().misses);
  // A cache too small to keep anything still gives exact masks.
  TokenMasker tiny(trie, 1);
  GrammarMatcher m(*schema);
  ASSERT_TRUE(m.Advance(R"({"name": "ab)"));
  EXPECT_EQ(tiny.Allowed(m, absl::MakeSpan(got)),
            trie->Allowed(*m.shared_grammar(), m.state(), absl::MakeSpan(want)));
  EXPECT_EQ(got, want);
}

// Warmed by random sentences, a masker meets few stack tops for the first time in a generation.
TEST(TokenMaskTest, WarmingWorksOutMostTopsAhead) {
  auto trie = std::make_shared<const TokenTrie>(TinyVocabulary());
  auto grammar = JsonSchemaGrammar(
      R"({"type": "object", "properties": {"title": {"type": "string"}, "year": {"type":
          "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["title", "year", "tags"]})",
      "schema");
  ASSERT_TRUE(grammar.ok());
  const std::string text = R"({"title": "On the Origin", "year": 1859, "tags": ["a", "bc"]})";
  std::vector<uint8_t> allowed(trie->vocab_size());
  auto misses_in_generation = [&](TokenMasker& masker) {
    const int64_t before = masker.stats().misses;
    GrammarMatcher m(*grammar);
    for (size_t i = 0; i <= text.size(); ++i) {
      masker.Allowed(m, absl::MakeSpan(allowed));
      if (i < text.size()) {
        EXPECT_TRUE(m.Advance(text.substr(i, 1)));
      }
    }
    return masker.stats().misses - before;
  };
  TokenMasker cold(trie, int64_t{64} << 20);
  TokenMasker warm(trie, int64_t{64} << 20);
  warm.Warm(*grammar, 8, 1);
  const int64_t cold_misses = misses_in_generation(cold);
  const int64_t warm_misses = misses_in_generation(warm);
  EXPECT_GT(cold_misses, 20);
  EXPECT_LT(warm_misses * 4, cold_misses) << warm_misses << " of " << cold_misses;
}

// Bounded repetitions (strings of at most n characters, regex counts, arrays of at most n items)
// whose copies share their results once more copies are left than a token has bytes: the masks
// stay exactly the walk's, at every position of random sentences and of runs far longer than a
// token, and a longer run through the same bounds meets no top a shorter one did not.
TEST(TokenMaskTest, LongBoundedRepetitionsShareTheirTopsAndStayExact) {
  // The bundled vocabulary cut to its tokens of at most 3 bytes (the others left empty, never
  // allowed), so that bounds of 20 to 60 are long against a token.
  std::vector<std::string> vocab = TinyVocabulary();
  for (std::string& t : vocab) {
    if (t.size() > 3) t.clear();
  }
  auto trie = std::make_shared<const TokenTrie>(vocab);
  ASSERT_EQ(trie->max_token_bytes(), 3);
  auto schema = JsonSchemaGrammar(
      R"({"type": "object", "properties": {
          "name": {"type": "string", "minLength": 25, "maxLength": 60},
          "tags": {"type": "array", "minItems": 2, "maxItems": 40,
                   "items": {"type": "string", "maxLength": 4}}},
          "required": ["name", "tags"]})",
      "schema");
  ASSERT_TRUE(schema.ok()) << schema.status();
  auto regex = RegexGrammar("(ab|c){20,50}x[0-9]{3,40}");
  ASSERT_TRUE(regex.ok()) << regex.status();
  // Runs inside runs, both long: an array of at least 12 strings of up to 20 characters (a copy
  // of several elements: the separator, then the string).
  auto lists = JsonSchemaGrammar(
      R"({"type": "array", "minItems": 12, "maxItems": 40,
          "items": {"type": "string", "maxLength": 20}})",
      "lists");
  ASSERT_TRUE(lists.ok()) << lists.status();
  auto list = [](int items, int chars) {
    std::string out = "[";
    for (int i = 0; i < items; ++i) {
      out += absl::StrCat(i == 0 ? "" : ", ", "\"", std::string(chars, 'a' + i % 3), "\"");
    }
    return out + "]";
  };
  auto record = [](int name_chars, int tags) {
    std::string list;
    for (int i = 0; i < tags; ++i) list += absl::StrCat(i == 0 ? "" : ", ", "\"t", i % 10, "\"");
    return absl::StrCat(R"({"name": ")", std::string(name_chars, 'q'), R"(", "tags": [)", list,
                        "]}");
  };
  auto pattern = [](int copies, int digits) {
    return absl::StrCat(std::string(copies - 1, 'c'), "ab", "x", std::string(digits, '7'));
  };
  struct Case {
    std::shared_ptr<const Grammar> grammar;
    std::string shorter, longer;  // the longer one's runs go on where the shorter one's stop
  };
  const Case cases[] = {
      {*schema, record(32, 12), record(52, 30)},
      {*regex, pattern(30, 10), pattern(45, 30)},
      {*lists, list(14, 8), list(30, 15)},
  };
  std::vector<uint8_t> want(vocab.size()), got(vocab.size());
  for (const Case& c : cases) {
    SCOPED_TRACE(c.longer);
    TokenMasker masker(trie, int64_t{64} << 20);
    auto check = [&](const std::string& sentence) {
      GrammarMatcher m(c.grammar);
      for (size_t i = 0; i <= sentence.size(); ++i) {
        const int64_t n = trie->Allowed(*c.grammar, m.state(), absl::MakeSpan(want));
        ASSERT_EQ(masker.Allowed(m, absl::MakeSpan(got)), n) << sentence.substr(0, i);
        ASSERT_EQ(got, want) << "after '" << sentence.substr(0, i) << "'";
        if (i < sentence.size()) {
          ASSERT_TRUE(m.Advance(sentence.substr(i, 1))) << sentence.substr(0, i + 1);
        }
      }
      EXPECT_TRUE(m.IsComplete());
    };
    check(c.shorter);
    const int64_t misses = masker.stats().misses;
    check(c.longer);
    EXPECT_EQ(masker.stats().misses, misses) << "the longer runs met tops of their own";
    std::mt19937_64 rng(3);
    for (int i = 0; i < 6; ++i) {
      const std::optional<std::string> s = RandomSentence(c.grammar, rng, 4096);
      if (s.has_value() && GrammarAccepts(c.grammar, *s)) check(*s);
    }
  }
}

TEST(TokenMaskTest, ClassifySplitsAtTheEndOfTheStack) {
  // "ab" then the end: "a" and "ab" fit within, "abc" runs past the end, "b" never fits.
  const TokenTrie trie({"a", "ab", "abc", "b", "abx"});
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  b.AddAlternative(root, b.Literal("ab"));
  auto g = *std::move(b).Build(root);
  GrammarMatcher m(g);
  std::vector<int32_t> accepted, uncertain;
  trie.Classify(*g, m.state(), &accepted, &uncertain);
  EXPECT_EQ(accepted, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(uncertain, (std::vector<int32_t>{2, 4}));
}

TEST(TokenMaskTest, EmptyTokensAreNeverAllowed) {
  const TokenTrie trie({"a", "", "ab", "b", "abc", "a"});
  GrammarBuilder b;
  const int32_t root = b.NewRule("root");
  b.AddAlternative(root, {b.Star("x", {b.Bytes(ByteSet::Range('a', 'b'))})});
  auto g = *std::move(b).Build(root);
  GrammarMatcher m(g);
  std::vector<uint8_t> allowed(6);
  EXPECT_EQ(trie.Allowed(*g, m.state(), absl::MakeSpan(allowed)), 4);
  EXPECT_EQ(allowed, (std::vector<uint8_t>{1, 0, 1, 1, 0, 1}));
}

TEST(TokenMaskTest, LongestPrefixIsTheLongestTokenStartingTheText) {
  // Ids 0..5; "ab" twice (the lower id wins), an empty special token.
  TokenTrie trie({"a", "ab", "abc", "b", "", "ab"});
  size_t len = 0;
  EXPECT_EQ(trie.LongestPrefix("abcd", &len), 2);
  EXPECT_EQ(len, 3u);
  EXPECT_EQ(trie.LongestPrefix("abd", &len), 1);
  EXPECT_EQ(len, 2u);
  EXPECT_EQ(trie.LongestPrefix("a", &len), 0);
  EXPECT_EQ(len, 1u);
  EXPECT_EQ(trie.LongestPrefix("ba", &len), 3);
  EXPECT_EQ(trie.LongestPrefix("c", &len), -1);
  EXPECT_EQ(len, 0u);
  EXPECT_EQ(trie.LongestPrefix("", &len), -1);
}

}  // namespace
}  // namespace strata
