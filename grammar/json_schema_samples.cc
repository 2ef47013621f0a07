// json_schema_samples: random texts of JSON schemas' grammars, for checking them against an
// independent validator (schema_soundness_test.sh runs Python's jsonschema over them).
//
//   json_schema_samples SCHEMAS.jsonl N SEED
//
// SCHEMAS.jsonl holds one JSON schema a line. For each, prints up to N lines
// {"schema": <index>, "text": <a complete sentence of its grammar>}: random walks through the
// matcher that take a random allowed byte at each step (JSON's structural bytes more often than
// the rest, so that walks end) and stop at a complete sentence half of the time; walks that pass
// 2 KB are dropped. A schema that does not compile prints {"schema": i, "error": ...}.
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "common/json.h"
#include "grammar/json_schema.h"

namespace strata {
namespace {

std::optional<std::string> Walk(const std::shared_ptr<const Grammar>& g, std::mt19937_64& rng) {
  GrammarMatcher m(g);
  std::string text;
  static const std::string kStructural = "\"}],:0123456789tfn";
  while (text.size() < 2048) {
    if (m.IsComplete() && (!m.CanContinue() || rng() % 2 == 0)) return text;
    const ByteSet next = m.NextBytes();
    std::vector<uint8_t> all, preferred, ascii;
    for (int b = 0; b < 256; ++b) {
      if (!next.Has(static_cast<uint8_t>(b))) continue;
      all.push_back(static_cast<uint8_t>(b));
      if (b < 0x80) ascii.push_back(static_cast<uint8_t>(b));
      if (kStructural.find(static_cast<char>(b)) != std::string::npos) {
        preferred.push_back(static_cast<uint8_t>(b));
      }
    }
    if (all.empty()) return std::nullopt;
    const std::vector<uint8_t>& from = !preferred.empty() && rng() % 3 == 0 ? preferred
                                       : !ascii.empty() && rng() % 8 != 0   ? ascii
                                                                            : all;
    const char c = static_cast<char>(from[rng() % from.size()]);
    if (!m.Advance(absl::string_view(&c, 1))) return std::nullopt;
    text += c;
  }
  return std::nullopt;
}

int Main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: json_schema_samples SCHEMAS.jsonl N SEED\n");
    return 2;
  }
  std::ifstream in(argv[1]);
  const int n = std::stoi(argv[2]);
  std::mt19937_64 rng(std::stoull(argv[3]));
  std::string line;
  for (int index = 0; std::getline(in, line); ++index) {
    absl::StatusOr<std::shared_ptr<const Grammar>> g = JsonSchemaGrammar(line, "schema");
    if (!g.ok()) {
      std::printf("{\"schema\": %d, \"error\": %s}\n", index,
                  JsonQuote(g.status().message()).c_str());
      continue;
    }
    for (int k = 0, tries = 0; k < n && tries < 50 * n; ++tries) {
      if (std::optional<std::string> text = Walk(*g, rng)) {
        std::printf("{\"schema\": %d, \"text\": %s}\n", index, JsonQuote(*text).c_str());
        ++k;
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) { return strata::Main(argc, argv); }
