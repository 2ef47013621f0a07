// json_schema_samples: random texts of JSON schemas' grammars, for checking them against an
// independent validator (schema_soundness_test.sh runs Python's jsonschema over them).
//
//   json_schema_samples SCHEMAS.jsonl N SEED
//
// SCHEMAS.jsonl holds one JSON schema a line. For each, prints up to N lines
// {"schema": <index>, "text": <a complete sentence of its grammar>} (RandomSentence; walks that
// pass 2 KB are dropped). A schema that does not compile prints {"schema": i, "error": ...}.
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "common/json.h"
#include "grammar/json_schema.h"

namespace strata {
namespace {

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
      if (std::optional<std::string> text = RandomSentence(*g, rng, 2048)) {
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
