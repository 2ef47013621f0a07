#include "worker/engine/ngram_draft.h"

#include <algorithm>

namespace strata {

int64_t NgramDraft(absl::Span<const int32_t> tokens, int min_n, int max_n, int64_t max_draft,
                   std::vector<int32_t>* draft) {
  const int64_t len = static_cast<int64_t>(tokens.size());
  if (min_n < 1 || max_n < min_n || max_draft < 1 || len < int64_t{min_n} + 1) return 0;
  const int32_t last = tokens[len - 1];
  // e: where an earlier occurrence of the suffix ends; it needs a token after it (e < len - 1).
  int64_t best_end = -1;
  int best_n = 0;
  for (int64_t e = len - 2; e >= 0; --e) {
    if (tokens[e] != last) continue;
    int n = 1;
    while (n < max_n && e - n >= 0 && tokens[e - n] == tokens[len - 1 - n]) ++n;
    if (n > best_n) {
      best_n = n;
      best_end = e;
      if (n == max_n) break;
    }
  }
  if (best_n < min_n) return 0;
  const size_t first = draft->size();
  // The continuation reads `tokens` followed by the draft itself: position best_end + 1 + i is
  // always before len + i, so each token read is already known.
  for (int64_t i = 0; i < max_draft; ++i) {
    const int64_t at = best_end + 1 + i;
    draft->push_back(at < len ? tokens[at] : (*draft)[first + (at - len)]);
  }
  return max_draft;
}

}  // namespace strata
