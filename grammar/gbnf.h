// Grammars written in GBNF, llama.cpp's notation (which vLLM's `grammar` structured output also
// takes), as Grammars.
//
//   root   ::= answer ("," ws answer)*
//   answer ::= "yes" | "no" | [0-9]+
//   ws     ::= [ \t\n]*        # a comment
//
// A rule is `name ::= alternatives`; names are letters, digits, '-' and '_'; a rule's body runs to
// the next `name ::=`. Elements: "literals" (escapes \n \r \t \\ \" \[ \] \xHH \uHHHH
// \UHHHHHHHH), character classes [a-z], negated [^"\\], `.` (any character), rule names, groups
// ( ... ), each optionally followed by *, +, ? or {m}, {m,}, {m,n}. The whole output matches the
// rule `root`. Errors are INVALID_ARGUMENT naming the line and column, or the undefined rule.
#ifndef STRATA_GRAMMAR_GBNF_H_
#define STRATA_GRAMMAR_GBNF_H_

#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grammar/grammar.h"

namespace strata {

absl::StatusOr<std::shared_ptr<const Grammar>> GbnfGrammar(absl::string_view text);

}  // namespace strata

#endif  // STRATA_GRAMMAR_GBNF_H_
