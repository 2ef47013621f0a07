// A tokenizer's vocabulary as the TokenTrie that structured output masks tokens with.
#ifndef STRATA_GRAMMAR_VOCABULARY_H_
#define STRATA_GRAMMAR_VOCABULARY_H_

#include <memory>

#include "grammar/token_mask.h"
#include "tokenizer/tokenizer.h"

namespace strata {

// Each token's bytes as it decodes in the middle of a text (a byte-fallback token is its byte, a
// SentencePiece word start its space); special tokens are left empty, so no grammar allows them.
std::shared_ptr<const TokenTrie> TokenTrieOf(const Tokenizer& tokenizer);

}  // namespace strata

#endif  // STRATA_GRAMMAR_VOCABULARY_H_
