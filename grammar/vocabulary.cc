#include "grammar/vocabulary.h"

#include <string>
#include <vector>

namespace strata {

std::shared_ptr<const TokenTrie> TokenTrieOf(const Tokenizer& tokenizer) {
  std::vector<std::string> bytes(tokenizer.vocab_size());
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    if (!tokenizer.IsSpecial(id)) bytes[id] = tokenizer.TokenBytes(id, /*first=*/false, false);
  }
  return std::make_shared<const TokenTrie>(std::move(bytes));
}

}  // namespace strata
