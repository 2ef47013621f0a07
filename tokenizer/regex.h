// Regex: a compiled PCRE2 pattern in UTF + Unicode-property mode, for tokenizer pre-tokenization.
#ifndef STRATA_TOKENIZER_REGEX_H_
#define STRATA_TOKENIZER_REGEX_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace strata {

// Immutable after Compile; FindAll may run on many threads at once.
class Regex {
 public:
  // INVALID_ARGUMENT with PCRE2's message and offset for a bad pattern.
  static absl::StatusOr<Regex> Compile(absl::string_view pattern);

  Regex(Regex&&) noexcept;
  Regex& operator=(Regex&&) noexcept;
  ~Regex();

  // Every non-overlapping match in `text` (which must be valid UTF-8), as [begin, end) byte
  // offsets, scanning left to right. An empty match advances one character.
  std::vector<std::pair<size_t, size_t>> FindAll(absl::string_view text) const;

 private:
  struct Code;
  explicit Regex(std::unique_ptr<Code> code);
  std::unique_ptr<Code> code_;
};

}  // namespace strata

#endif  // STRATA_TOKENIZER_REGEX_H_
