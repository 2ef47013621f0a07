// grammar_bench: what structured output costs the host per sampled token: the token mask (which
// tokens the grammar allows next: a walk of the vocabulary's trie through the matcher's state) and
// the matcher's advance by the sampled token, on real tokenizers from 2 k to 151 k tokens.
//
//   bazel run -c opt //bench:grammar_bench
//
// For each tokenizer (the bundled strata-tiny, Mistral-7B's, Qwen3's): the trie's build time, then
// a generation replayed token by token (the text tokenized as the model would emit it) under a JSON
// schema and under json_object mode: microseconds per mask (mean, median, p99, max) by the trie
// walk alone ("walk"), by a TokenMasker the first time it meets each stack top ("cold") and
// after ("warm"), and by a fresh masker warmed first (TokenMasker::Warm along 8 random sentences,
// "warmed", with the warming's time); the mean share of the vocabulary allowed, and microseconds
// per advance. Also the schema's compile time. The same schema with bounded strings ("bounded":
// at most 64-120 characters; "bounded2k": 500-2,000), whose every position is a stack top of its
// own up to the longest token's length from the bound.
// Masks run on one thread; the engine computes each constrained row's on its own pool thread.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/stats.h"
#include "common/init.h"
#include "grammar/json_schema.h"
#include "grammar/token_mask.h"
#include "grammar/vocabulary.h"
#include "tokenizer/tokenizer.h"

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

double Us(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

// The record's schema; with `long_max` > 0 its title and affiliation strings are at most that
// many characters and its names at most `short_max`. A string of at most n characters is n
// optional copies of a character, each position a stack top of its own up to the longest token's
// length from the bound (past that they share their results: Grammar::EquivalentPosition).
std::string RecordSchema(int long_max, int short_max) {
  auto bound = [](int n) { return n > 0 ? absl::StrCat(", \"maxLength\": ", n) : std::string(); };
  return absl::StrCat(R"({"type": "object", "properties": {
  "title": {"type": "string")",
                      bound(long_max), R"(}, "year": {"type": "integer"},
  "authors": {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string")",
                      bound(short_max), R"(}, "affiliation": {"type": "string")", bound(long_max),
                      R"(}}, "required": ["name"]}},
  "score": {"type": "number"}, "open_access": {"type": "boolean"},
  "topics": {"type": "array", "items": {"enum": ["systems", "databases", "ml", "networks"]}}},
  "required": ["title", "year", "authors"]})");
}

constexpr char kText[] = R"({
  "title": "Paged attention for serving large language models with bounded memory",
  "year": 2023,
  "authors": [{"name": "Ada Lovelace", "affiliation": "Analytical Engines Ltd."},
              {"name": "Grace Hopper"}],
  "score": 4.75,
  "open_access": true,
  "topics": ["systems", "ml"]
})";

void Run(const std::string& name, const std::string& dir) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::FromModelDir(dir);
  if (!tok.ok()) {
    std::printf("%s: %s\n", name.c_str(), std::string(tok.status().message()).c_str());
    return;
  }
  const Clock::time_point t0 = Clock::now();
  const std::shared_ptr<const TokenTrie> trie = TokenTrieOf(**tok);
  const double build_ms = Us(t0, Clock::now()) / 1000;
  const Clock::time_point c0 = Clock::now();
  absl::StatusOr<std::shared_ptr<const Grammar>> schema =
      JsonSchemaGrammar(RecordSchema(0, 0), "schema");
  const double compile_us = Us(c0, Clock::now());
  absl::StatusOr<std::shared_ptr<const Grammar>> object = AnyJsonGrammar(true);
  absl::StatusOr<std::shared_ptr<const Grammar>> bounded =
      JsonSchemaGrammar(RecordSchema(120, 64), "bounded");
  absl::StatusOr<std::shared_ptr<const Grammar>> long_bounded =
      JsonSchemaGrammar(RecordSchema(2000, 500), "long_bounded");
  if (!schema.ok() || !object.ok() || !bounded.ok() || !long_bounded.ok()) {
    std::printf("grammar: %s\n", std::string(schema.status().message()).c_str());
    return;
  }
  absl::StatusOr<std::vector<int32_t>> ids = (*tok)->Encode(kText, /*add_special_tokens=*/false);
  if (!ids.ok()) return;
  std::printf("%-10s vocab %6d  trie %7.1f ms  schema compile %6.0f us  %zu tokens of JSON\n",
              name.c_str(), trie->vocab_size(), build_ms, compile_us, ids->size());
  // Masks by the walk alone, then by a TokenMasker: its first generation works out each new top
  // (cold), the second finds them kept (warm).
  TokenMasker masker(trie, int64_t{1} << 30);
  for (const auto& [mode, grammar] :
       {std::pair{"schema", *schema}, std::pair{"json_object", *object},
        std::pair{"bounded", *bounded}, std::pair{"bounded2k", *long_bounded}}) {
    // "warmed": a fresh masker after TokenMasker::Warm (8 random sentences), the first
    // generation under the grammar as a warmed GPU engine sees it.
    TokenMasker warmed(trie, int64_t{1} << 30);
    const Clock::time_point w0 = Clock::now();
    warmed.Warm(grammar, 8, 1);
    const double warm_ms = Us(w0, Clock::now()) / 1000;
    for (const char* how : {"walk", "cold", "warm", "warmed"}) {
      const bool walk = std::string(how) == "walk";
      TokenMasker& use = std::string(how) == "warmed" ? warmed : masker;
      std::vector<double> us(ids->size() + 1, 0);
      double allowed_share = 0, advance_us = 0;
      std::vector<uint8_t> allowed(trie->vocab_size());
      GrammarMatcher m(grammar);
      for (size_t i = 0; i <= ids->size(); ++i) {
        const Clock::time_point a = Clock::now();
        const int64_t n = walk ? trie->Allowed(m.grammar(), m.state(), absl::MakeSpan(allowed))
                               : use.Allowed(m, absl::MakeSpan(allowed));
        us[i] = Us(a, Clock::now());
        allowed_share += static_cast<double>(n) / trie->vocab_size();
        if (i == ids->size()) break;
        const std::string& bytes = trie->bytes((*ids)[i]);
        if (!allowed[(*ids)[i]]) {
          std::printf("  token %zu '%s' is not allowed: the text does not follow the schema\n", i,
                      bytes.c_str());
          return;
        }
        const Clock::time_point b = Clock::now();
        m.Advance(bytes);
        advance_us += Us(b, Clock::now());
      }
      double sum = 0, worst = 0;
      for (double v : us) {
        sum += v;
        worst = std::max(worst, v);
      }
      std::vector<double> sorted = us;
      std::sort(sorted.begin(), sorted.end());
      const double p99 = sorted[std::min(sorted.size() - 1, sorted.size() * 99 / 100)];
      std::printf(
          "  %-11s %-6s mask us: mean %8.1f  median %7.1f  p99 %8.1f  max %8.1f  "
          "allowed %5.1f%%  advance us %5.2f\n",
          mode, how, sum / us.size(), Median(us), p99, worst, 100 * allowed_share / us.size(),
          advance_us / std::max<size_t>(1, ids->size()));
      if (std::string(how) == "warmed")
        std::printf("  %-11s warming took %.1f ms\n", mode, warm_ms);
    }
  }
  const TokenMaskerStats st = masker.stats();
  std::printf("  masker: %lld tops kept, %.1f MB\n", static_cast<long long>(st.entries),
              st.bytes / 1e6);
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv, "What structured output costs the host per token.");
  strata::Run("strata-tiny", "models/strata-tiny/base");
  strata::Run("mistral7b", "tokenizer/testdata/mistral7b_unpacked");
  strata::Run("qwen3", "tokenizer/testdata/qwen3_unpacked");
  return 0;
}
