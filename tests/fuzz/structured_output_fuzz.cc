// Structured output as a request sets it (CompileStructuredOutput, the path both servers take):
// a JSON schema, a regular expression, a GBNF grammar or a list of choices, from untrusted text.
// Built once per kind (STRATA_FUZZ_KIND: 0 json_schema, 1 regex, 2 grammar, 3 choice).
//
// Input: one option byte, then the spec's text (choices: one a line). The option byte's bit 0
// asks for compact JSON; bits 1-3 move that many leading bytes of the text into the prefix.
//
// Checks: a refusal is INVALID_ARGUMENT naming the field; a grammar it compiles produces only
// sentences its own matcher accepts (RandomSentence against GrammarAccepts), and a JSON schema's
// only JSON that parses; at every byte of such a sentence, and of a walk that runs on deep into
// the grammar's repetitions, a TokenMasker's mask (its per-top results, positions shared by
// Grammar::EquivalentPosition) is exactly the trie walk's, over a small vocabulary whose longest
// token is 6 bytes (so that bounds of a few dozen are long);
// following the input through the grammar byte by byte never crashes.
#include <cctype>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "common/hash.h"
#include "common/json.h"
#include "grammar/grammar.h"
#include "grammar/structured_output.h"
#include "grammar/token_mask.h"
#include "proto/strata/v1/common.pb.h"
#include "tests/fuzz/fuzz_target.h"

#ifndef STRATA_FUZZ_KIND
#error "STRATA_FUZZ_KIND must be 0 (json_schema), 1 (regex), 2 (grammar) or 3 (choice)"
#endif

namespace {

// Every printable ASCII byte, pieces of JSON and of the corpora's patterns, runs of spaces and
// digits, and UTF-8 (whole characters and a lone lead byte): at most 6 bytes each.
std::shared_ptr<const strata::TokenTrie> SmallVocabulary() {
  std::vector<std::string> tokens;
  for (int b = 0x20; b < 0x7f; ++b) tokens.push_back(std::string(1, static_cast<char>(b)));
  for (const char* t :
       {"\"",   "\":",   "\": ", "\", \"", "{\"",    "\"}",   "[\"",  "\"]", "true", "false",
        "null", "ab",    "abc",  "aaaa",   "cab",    "12",    "123",  "0.5", "e+1",  "\\n",
        "\\\"", "\\u00", "  ",   "    ",   "      ", "\n",    "\n  ", "é",   "éé",   "\xc3",
        "日本", "x\"",   "a\",", "},",     "],",     "null,", "1,"}) {
    tokens.push_back(t);
  }
  return std::make_shared<const strata::TokenTrie>(std::move(tokens));
}

// The masker against the walk at every byte of `text` (a fresh masker: its first results for each
// top, then those it kept as the text comes back to a top), as far as the grammar takes it.
void CheckMasksAlong(const std::shared_ptr<const strata::Grammar>& g, const std::string& text,
                     const char* what) {
  static const std::shared_ptr<const strata::TokenTrie> vocabulary = SmallVocabulary();
  strata::TokenMasker masker(vocabulary, int64_t{16} << 20);
  std::vector<uint8_t> want(vocabulary->vocab_size()), got(vocabulary->vocab_size());
  strata::GrammarMatcher walk(g);
  for (size_t at = 0; at <= text.size() && !walk.Overloaded(); ++at) {
    const int64_t n = vocabulary->Allowed(walk.grammar(), walk.state(), absl::MakeSpan(want));
    FUZZ_CHECK(masker.Allowed(walk, absl::MakeSpan(got)) == n && got == want,
               "the masker's mask differs from the walk's after \"%s\" (%s)",
               text.substr(0, at).c_str(), what);
    if (at < text.size()) {
      FUZZ_CHECK(walk.Advance(text.substr(at, 1)), "the %s \"%s\" left the grammar", what,
                 text.c_str());
    }
  }
}

}  // namespace

STRATA_FUZZ_TARGET(data, size) {
  strata::fuzz::FuzzInput in(data, size);
  const uint8_t options = in.Byte();
  const size_t prefix_bytes = (options >> 1) & 7;
  const std::string prefix(in.Take(prefix_bytes));
  const std::string text(in.Rest());

  strata::v1::StructuredOutput spec;
  spec.set_compact_json((options & 1) != 0);
  spec.set_prefix(prefix);
  switch (STRATA_FUZZ_KIND) {
    case 0:
      spec.set_json_schema(text);
      break;
    case 1:
      spec.set_regex(text);
      break;
    case 2:
      spec.set_grammar(text);
      break;
    default:
      for (absl::string_view line : absl::StrSplit(text, '\n')) {
        spec.mutable_choice()->add_texts(std::string(line));
      }
      break;
  }
  const absl::StatusOr<std::shared_ptr<const strata::Grammar>> g =
      strata::CompileStructuredOutput(spec, "spec");
  if (!g.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(g.status()), "%s", g.status().ToString().c_str());
    FUZZ_CHECK(absl::StartsWith(g.status().message(), "spec"), "%s", g.status().ToString().c_str());
    return 0;
  }
  FUZZ_CHECK(*g != nullptr, "a spec with a kind compiled to no grammar");

  std::mt19937_64 rng(strata::Hash64(text));
  for (int i = 0; i < 3; ++i) {
    const std::optional<std::string> sentence =
        strata::RandomSentenceFrom(*g, spec.prefix(), rng, 512);
    if (!sentence.has_value()) continue;
    FUZZ_CHECK(strata::GrammarAccepts(*g, *sentence),
               "the grammar's own sentence \"%s\" is refused", sentence->c_str());
    if (i == 0) CheckMasksAlong(*g, *sentence, "sentence");
    if (STRATA_FUZZ_KIND == 0 && !sentence->empty()) {
      const auto doc = strata::JsonDocument::Parse(*sentence, "sentence");
      FUZZ_CHECK(doc.ok(), "the schema's sentence \"%s\" is not JSON: %s", sentence->c_str(),
                 doc.status().ToString().c_str());
    }
  }
  // A walk that runs on (letters and digits first, where the grammar takes them) rather than
  // ending: deep into long bounded runs, where random sentences seldom go.
  {
    strata::GrammarMatcher m(*g);
    std::string deep;
    // (Up to 160 bytes, while the grammar is not very ambiguous there: each byte's masks walk
    // every reading.)
    while (deep.size() < 160 && m.CanContinue() && m.state().num_stacks() <= 16) {
      const strata::ByteSet next = m.NextBytes();
      std::vector<uint8_t> any, plain;
      for (int b = 0; b < 256; ++b) {
        if (!next.Has(static_cast<uint8_t>(b))) continue;
        any.push_back(static_cast<uint8_t>(b));
        if (std::isalnum(b)) plain.push_back(static_cast<uint8_t>(b));
      }
      const std::vector<uint8_t>& from = !plain.empty() && rng() % 8 != 0 ? plain : any;
      const char c = static_cast<char>(from[rng() % from.size()]);
      if (!m.Advance(absl::string_view(&c, 1))) break;
      deep.push_back(c);
    }
    CheckMasksAlong(*g, deep, "deep walk");
  }
  strata::GrammarMatcher m(*g);
  for (char c : text) {
    if (!m.Advance(absl::string_view(&c, 1)) || m.Overloaded()) break;
  }
  return 0;
}
