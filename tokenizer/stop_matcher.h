// StopMatcher: finds stop strings in streamed text without ever emitting text that a later match
// would have cut. Text that could be the beginning of a stop string is held back until it is
// disambiguated. Not thread-safe; one per sequence.
#ifndef STRATA_TOKENIZER_STOP_MATCHER_H_
#define STRATA_TOKENIZER_STOP_MATCHER_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace strata {

// The length of the longest end of `text` that `marker` starts with, shorter than `marker`: how
// much of a stream to hold back while `marker` may still be arriving.
size_t PartialMatchAtEnd(absl::string_view text, absl::string_view marker);

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);

  // Adds text; returns what may be emitted now. After a match, `stopped()` is true, `matched()`
  // names the stop string, the returned text ends right before it, and later calls return nothing.
  std::string Add(absl::string_view text);
  // The held-back text, at the end of the stream (no match).
  std::string Flush();

  bool stopped() const { return stopped_; }
  const std::string& matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;
  bool stopped_ = false;
  std::string matched_;
};

}  // namespace strata

#endif  // STRATA_TOKENIZER_STOP_MATCHER_H_
