#include "tokenizer/tokenizer.h"

#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/utf8.h"
#include "gtest/gtest.h"
#include "tokenizer/llama2_style.h"

namespace strata {
namespace {

// GPT-2's byte-to-character map, written out independently of the implementation.
std::string ByteChar(int b) {
  static std::vector<std::string> map = [] {
    std::vector<std::string> m(256);
    int n = 0;
    for (int i = 0; i < 256; ++i) {
      const bool keep = (i >= '!' && i <= '~') || (i >= 0xA1 && i <= 0xAC) || i >= 0xAE;
      AppendUtf8(keep ? i : 256 + n++, &m[i]);
    }
    return m;
  }();
  return map[b];
}

std::string JsonStr(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// A byte-level BPE (GPT-2 style) with merges for " the" and "he", and one special token.
std::string ByteLevelJson(bool ignore_merges = false) {
  std::vector<std::string> vocab;
  for (int b = 0; b < 256; ++b) vocab.push_back(JsonStr(ByteChar(b)) + ": " + std::to_string(b));
  const std::string G = ByteChar(' ');
  vocab.push_back(JsonStr(G + "t") + ": 256");
  vocab.push_back(JsonStr("he") + ": 257");
  vocab.push_back(JsonStr(G + "the") + ": 258");
  vocab.push_back(JsonStr("the") + ": 259");
  return absl::StrCat(R"({"version": "1.0", "added_tokens": [
      {"id": 260, "content": "<|end|>", "special": true, "lstrip": false, "rstrip": false,
       "single_word": false, "normalized": false}],
    "normalizer": null,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                      "use_regex": true},
    "post_processor": {"type": "ByteLevel"},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "dropout": null, "unk_token": null, "ignore_merges": )",
                      ignore_merges ? "true" : "false", R"(, "vocab": {)",
                      absl::StrJoin(vocab, ","), R"(}, "merges": [)", JsonStr(G + " t"), ",",
                      JsonStr("h e"), ",", R"([")", G, R"(t", "he"]]}})");
}

// A Llama-2-style tokenizer: Metaspace via normalizer, BPE over characters with byte fallback.
std::string Llama2Json() {
  return Llama2StyleTokenizerJson(
      R"("<unk>": 0, "<s>": 1, "</s>": 2, "<0xC3>": 3, "<0xA9>": 4, "<0x21>": 5, "▁": 6, "h": 7,)"
      R"( "e": 8, "l": 9, "o": 10, "▁h": 11, "ll": 12, "▁he": 13, "llo": 14, "▁hello": 15, "w": 16)",
      R"("▁ h", "l l", "▁h e", "ll o", "▁he llo")", 0, 1, 2);
}

std::unique_ptr<Tokenizer> Load(const std::string& json, const std::string& config = "") {
  auto t = Tokenizer::FromJson(json, config, "test/tokenizer.json");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

TEST(ByteLevelBpeTest, MergesByRankWithinRegexPieces) {
  auto t = Load(ByteLevelJson());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->vocab_size(), 261);
  // " the" is one piece: Ġ t -> Ġt, h e -> he, Ġt he -> Ġthe.
  EXPECT_EQ(*t->Encode(" the"), (std::vector<int32_t>{258}));
  // "the" has no Ġ: t, he. (Merges only, so "the" in the vocabulary is not used.)
  EXPECT_EQ(*t->Encode("the"), (std::vector<int32_t>{'t', 257}));
  // Regex pieces: "the", " the", "!".
  EXPECT_EQ(*t->Encode("the the!"), (std::vector<int32_t>{'t', 257, 258, '!'}));
  // The special token is matched inside text.
  EXPECT_EQ(*t->Encode("he<|end|>"), (std::vector<int32_t>{257, 260}));
  EXPECT_TRUE(t->IsSpecial(260));
  EXPECT_EQ(*t->Decode({257, 260}), "he<|end|>");
  EXPECT_EQ(*t->Decode({257, 260}, /*skip_special_tokens=*/true), "he");
}

TEST(ByteLevelBpeTest, IgnoreMergesUsesWholeWordsInTheVocabulary) {
  auto t = Load(ByteLevelJson(/*ignore_merges=*/true));
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(*t->Encode("the"), (std::vector<int32_t>{259}));
}

TEST(ByteLevelBpeTest, RoundTripsArbitraryUtf8) {
  auto t = Load(ByteLevelJson());
  ASSERT_NE(t, nullptr);
  std::mt19937 rng(std::random_device{}());
  const std::vector<char32_t> alphabet = {'a', ' ',  '\n',   '\t',    't',    'h',   'e', '!',
                                          '7', 0xE9, 0x4E2D, 0x1F600, 0x200D, 0x301, '<', '|'};
  for (int trial = 0; trial < 200; ++trial) {
    std::string text;
    const int len = std::uniform_int_distribution<int>(0, 30)(rng);
    for (int i = 0; i < len; ++i) {
      AppendUtf8(alphabet[std::uniform_int_distribution<size_t>(0, alphabet.size() - 1)(rng)],
                 &text);
    }
    auto ids = t->Encode(text);
    ASSERT_TRUE(ids.ok());
    EXPECT_EQ(*t->Decode(*ids), text);
  }
}

TEST(ByteLevelBpeTest, InvalidInputIsRefused) {
  auto t = Load(ByteLevelJson());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->Encode("bad \xff").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t->Decode({5, 9999}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t->Decode({-1}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Llama2StyleBpeTest, MetaspaceByteFallbackAndTemplate) {
  auto t = Load(Llama2Json());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(*t->Encode("hello"), (std::vector<int32_t>{15}));
  EXPECT_EQ(*t->Encode("hello", /*add_special_tokens=*/true), (std::vector<int32_t>{1, 15}));
  // "é" is not in the vocabulary: its two bytes. "w" is; "!" only as a byte token.
  EXPECT_EQ(*t->Encode("hello w\xc3\xa9!"), (std::vector<int32_t>{15, 6, 16, 3, 4, 5}));
  // A character with neither a token nor byte tokens becomes <unk>, consecutive ones fused.
  EXPECT_EQ(*t->Encode("hxx"), (std::vector<int32_t>{11, 0}));
  // Decoding: bytes are reassembled, the leading space of the first token is stripped.
  EXPECT_EQ(*t->Decode({15, 6, 16, 3, 4, 5}), "hello w\xc3\xa9!");
  EXPECT_EQ(*t->Decode({1, 15}), "<s> hello");
  EXPECT_EQ(*t->Decode({1, 15}, /*skip_special_tokens=*/true), "hello");
  EXPECT_EQ(*t->Decode({3}), "\xef\xbf\xbd");  // a lone lead byte
}

TEST(IncrementalDecoderTest, NeverSplitsACharacter) {
  auto t = Load(Llama2Json());
  ASSERT_NE(t, nullptr);
  IncrementalDecoder d(t.get(), /*skip_special_tokens=*/true);
  EXPECT_EQ(d.Add(1), "");  // <s> skipped
  EXPECT_EQ(d.Add(15), "hello");
  EXPECT_EQ(d.Add(6), " ");
  EXPECT_EQ(d.Add(3), "");  // first byte of é held back
  EXPECT_EQ(d.Add(4), "\xc3\xa9");
  EXPECT_EQ(d.Add(3), "");
  EXPECT_EQ(d.Flush(), "\xef\xbf\xbd");  // the stream ended mid-character
}

// A completion continues its prompt's text: its first word keeps the leading space that decoding
// prompt and completion at once gives it, unless the prompt decodes to nothing.
TEST(IncrementalDecoderTest, ACompletionContinuesItsPromptsText) {
  auto t = Load(Llama2Json());
  ASSERT_NE(t, nullptr);
  const std::vector<int32_t> prompt = {1, 15};  // <s> ▁hello
  IncrementalDecoder after(t.get(), /*skip_special_tokens=*/true, prompt);
  EXPECT_EQ(after.Add(15), " hello");
  std::vector<int32_t> all = prompt;
  all.push_back(15);
  EXPECT_EQ(*t->Decode(all, true), *t->Decode(prompt, true) + " hello");
  // <s> alone, skipped: nothing before, so the space goes as at a text's start.
  IncrementalDecoder after_bos(t.get(), /*skip_special_tokens=*/true, std::vector<int32_t>{1});
  EXPECT_EQ(after_bos.Add(15), "hello");
  // <s> kept: "<s> hello".
  IncrementalDecoder after_kept_bos(t.get(), /*skip_special_tokens=*/false,
                                    std::vector<int32_t>{1});
  EXPECT_EQ(after_kept_bos.Add(15), " hello");
  IncrementalDecoder no_prompt(t.get(), /*skip_special_tokens=*/true, {});
  EXPECT_EQ(no_prompt.Add(15), "hello");
}

TEST(TokenizerLoadTest, UnsupportedPartsNameTheField) {
  struct Case {
    std::string json;
    std::string message;
  };
  const std::vector<Case> cases = {
      {R"({"model": {"type": "WordPiece", "vocab": {}}})",
       "test/tokenizer.json: field \"model.type\" is \"WordPiece\"; only BPE"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})",
       "field \"model.merges[0]\" merges tokens that are not in the vocabulary"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"}})",
       "field \"pre_tokenizer.pattern.Regex\" bad regex"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "normalizer": {"type": "BertNormalizer"}})",
       "field \"normalizer.type\" names unsupported normalizer \"BertNormalizer\""},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "decoder": {"type": "CTC"}})",
       "names unsupported decoder \"CTC\""},
      {R"({"model": )", "invalid JSON"},
  };
  for (const Case& c : cases) {
    auto t = Tokenizer::FromJson(c.json, "", "test/tokenizer.json");
    ASSERT_FALSE(t.ok()) << c.json;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(t.status().message().find(c.message), absl::string_view::npos) << t.status();
  }
}

TEST(TokenizerLoadTest, ConfigNamesBosAndEos) {
  auto t = Load(Llama2Json(), R"({"bos_token": "<s>", "eos_token": {"content": "</s>"}})");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->bos_token_id(), 1);
  EXPECT_EQ(t->eos_token_id(), 2);
  auto bad = Tokenizer::FromJson(Llama2Json(), R"({"eos_token": "<nope>"})", "t");
  EXPECT_NE(bad.status().message().find("names \"<nope>\", which is not a token"),
            absl::string_view::npos);
}

}  // namespace
}  // namespace strata
