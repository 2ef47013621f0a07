// Regular expressions as grammars: the text must match the whole pattern (as if it were anchored
// at both ends). For structured output's `regex` and JSON schema's `pattern`.
//
// Supported: literals (UTF-8), `.` (any character but a newline), classes `[...]` with ranges and
// negation, the escapes \d \w \s \D \W \S \n \r \t \f \v \xHH \uHHHH and escaped punctuation,
// groups `(...)`, `(?:...)` and named groups, alternation, and the quantifiers * + ? {m} {m,}
// {m,n} (lazy and possessive forms match the same texts). `^` at the start and `$` at the end of
// a top-level alternative anchor it. \s is ECMA-262's white space (Unicode spaces included); \d
// and \w are ASCII. Refused with INVALID_ARGUMENT naming the offset: backreferences, lookaround,
// word boundaries, inline flags, lone surrogates, groups nested deeper than 64.
#ifndef STRATA_GRAMMAR_REGEX_GRAMMAR_H_
#define STRATA_GRAMMAR_REGEX_GRAMMAR_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grammar/grammar.h"

namespace strata {

// kJsonString: the texts as the inside of a JSON string literal, so that a `"`, a backslash or a
// control character the pattern matches is written as its JSON escape (for JSON schema's
// `pattern`).
enum class RegexText { kRaw, kJsonString };

// kFull: the text matches the whole pattern (anchors or not), as structured output's regex.
// kSearch: the pattern matches somewhere in the text unless '^' / '$' anchor it, as JSON Schema's
// `pattern`.
enum class RegexMatch { kFull, kSearch };

// Adds the pattern to `b` as a sequence of elements matching exactly its texts.
absl::StatusOr<GrammarBuilder::Seq> AddRegex(GrammarBuilder* b, absl::string_view pattern,
                                             RegexText text = RegexText::kRaw,
                                             RegexMatch match = RegexMatch::kFull);

// A grammar of the texts that match `pattern` in full.
absl::StatusOr<std::shared_ptr<const Grammar>> RegexGrammar(absl::string_view pattern);

}  // namespace strata

#endif  // STRATA_GRAMMAR_REGEX_GRAMMAR_H_
