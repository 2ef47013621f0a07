#include "worker/engine/ngram_draft.h"

#include <algorithm>

namespace strata {

namespace {

// The draft once the best earlier occurrence is known: what followed it (reading on through the
// draft itself).
int64_t Continue(absl::Span<const int32_t> tokens, int64_t best_end, int64_t max_draft,
                 std::vector<int32_t>* draft) {
  const int64_t len = static_cast<int64_t>(tokens.size());
  const size_t first = draft->size();
  // The continuation reads `tokens` followed by the draft itself: position best_end + 1 + i is
  // always before len + i, so each token read is already known.
  for (int64_t i = 0; i < max_draft; ++i) {
    const int64_t at = best_end + 1 + i;
    draft->push_back(at < len ? tokens[at] : (*draft)[first + (at - len)]);
  }
  return max_draft;
}

// How many tokens before and at `e` match the suffix of `tokens` (at most max_n; tokens[e] is
// the last token's equal).
int MatchLength(absl::Span<const int32_t> tokens, int64_t e, int max_n) {
  const int64_t len = static_cast<int64_t>(tokens.size());
  int n = 1;
  while (n < max_n && e - n >= 0 && tokens[e - n] == tokens[len - 1 - n]) ++n;
  return n;
}

}  // namespace

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
    const int n = MatchLength(tokens, e, max_n);
    if (n > best_n) {
      best_n = n;
      best_end = e;
      if (n == max_n) break;
    }
  }
  if (best_n < min_n) return 0;
  return Continue(tokens, best_end, max_draft, draft);
}

int64_t NgramIndex::Draft(absl::Span<const int32_t> tokens, int min_n, int max_n, int64_t max_draft,
                          std::vector<int32_t>* draft) {
  const int64_t len = static_cast<int64_t>(tokens.size());
  // Every token but the last is indexed: the last one's earlier positions are the candidates.
  while (static_cast<int64_t>(previous_.size()) + 1 < len) {
    const int32_t at = static_cast<int32_t>(previous_.size());
    auto [it, fresh] = latest_.try_emplace(tokens[at], at);
    previous_.push_back(fresh ? -1 : it->second);
    it->second = at;
  }
  if (min_n < 1 || max_n < min_n || max_draft < 1 || len < int64_t{min_n} + 1) return 0;
  const auto it = latest_.find(tokens[len - 1]);
  if (it == latest_.end()) return 0;
  int64_t best_end = -1;
  int best_n = 0;
  for (int32_t p = it->second; p >= 0; p = previous_[p]) {
    const int n = MatchLength(tokens, p, max_n);
    if (n > best_n) {
      best_n = n;
      best_end = p;
      if (n == max_n) break;
    }
  }
  if (best_n < min_n) return 0;
  return Continue(tokens, best_end, max_draft, draft);
}

}  // namespace strata
