// Checks the tokenizer against Hugging Face's own tokenizer (the Rust `tokenizers` library, run by
// tools/tokenizer_oracle) on a corpus of code, CJK, emoji, numbers, whitespace runs, contractions,
// NFC-sensitive text and special tokens: Qwen3's real tokenizer.json (byte-level BPE with a
// Llama-3-style regex and NFC), Mistral 7B's (Llama-2-style BPE with byte fallback), the bundled
// model's (GPT-2 regex), and that vocabulary behind Llama 3's regex with ignore_merges.
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "common/json.h"
#include "gtest/gtest.h"
#include "tokenizer/tokenizer.h"

namespace strata {
namespace {

struct GoldenLine {
  std::string text;
  std::vector<int32_t> ids, ids_special;
  std::string decoded, decoded_skip_special;
};

std::vector<GoldenLine> ReadGolden(const std::string& path) {
  std::vector<GoldenLine> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto doc = JsonDocument::Parse(line, path);
    EXPECT_TRUE(doc.ok()) << doc.status();
    if (!doc.ok()) continue;
    GoldenLine g;
    const JsonValue root = doc->root();
    g.text = std::string(*root.StringField("text"));
    for (const char* field : {"ids", "ids_special"}) {
      const std::vector<JsonValue> values = *root.Field(field)->AsArray();
      for (const JsonValue& v : values) {
        (std::string(field) == "ids" ? g.ids : g.ids_special)
            .push_back(static_cast<int32_t>(*v.AsInt()));
      }
    }
    g.decoded = std::string(*root.StringField("decoded"));
    g.decoded_skip_special = std::string(*root.StringField("decoded_skip_special"));
    out.push_back(std::move(g));
  }
  return out;
}

void CheckGolden(const std::string& dir) {
  auto tokenizer = Tokenizer::FromModelDir(dir);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const std::vector<GoldenLine> lines = ReadGolden(dir + "/golden.jsonl");
  ASSERT_GE(lines.size(), 200u);
  int encode_mismatches = 0;
  for (const GoldenLine& g : lines) {
    auto ids = (*tokenizer)->Encode(g.text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    if (*ids != g.ids) {
      ++encode_mismatches;
      ADD_FAILURE() << "encode mismatch for " << ::testing::PrintToString(g.text) << "\n  got  "
                    << absl::StrJoin(*ids, ",") << "\n  want " << absl::StrJoin(g.ids, ",");
      continue;
    }
    EXPECT_EQ(*(*tokenizer)->Encode(g.text, /*add_special_tokens=*/true), g.ids_special)
        << ::testing::PrintToString(g.text);
    EXPECT_EQ(*(*tokenizer)->Decode(g.ids), g.decoded) << ::testing::PrintToString(g.text);
    EXPECT_EQ(*(*tokenizer)->Decode(g.ids, /*skip_special_tokens=*/true), g.decoded_skip_special)
        << ::testing::PrintToString(g.text);
    // Streaming gives the same text as decoding at once.
    IncrementalDecoder stream(tokenizer->get(), /*skip_special_tokens=*/false);
    std::string streamed;
    for (int32_t id : g.ids) streamed += stream.Add(id);
    streamed += stream.Flush();
    EXPECT_EQ(streamed, g.decoded) << ::testing::PrintToString(g.text);
  }
  EXPECT_EQ(encode_mismatches, 0);
}

TEST(TokenizerGoldenTest, Qwen3) { CheckGolden("tokenizer/testdata/qwen3_unpacked"); }

TEST(TokenizerGoldenTest, Mistral7b) { CheckGolden("tokenizer/testdata/mistral7b_unpacked"); }

// The bundled model's byte-level BPE with GPT-2's regex, and BOS added by a template.
TEST(TokenizerGoldenTest, StrataTinyGpt2Regex) { CheckGolden("tokenizer/testdata/strata_tiny"); }

// The same vocabulary behind Llama 3's pre-tokenizer regex (digits in runs of up to 3) and
// ignore_merges, as Llama 3 tokenizers set it.
TEST(TokenizerGoldenTest, Llama3StyleRegexAndIgnoreMerges) {
  CheckGolden("tokenizer/testdata/llama3_style");
}

}  // namespace
}  // namespace strata
