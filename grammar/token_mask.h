// Which tokens a grammar allows next.
//
// TokenTrie holds a vocabulary's tokens as bytes in a trie, and walks it through a matcher's state:
// tokens sharing a prefix share its steps, a subtree is left as soon as its prefix leaves the
// grammar, and the matcher states a walk reaches are interned so that each (state, byte) step is
// worked out once. That walk is exact but visits most of the vocabulary wherever most tokens fit
// (inside a JSON string: hundreds of thousands of trie nodes for a 150 k vocabulary).
//
// TokenMasker makes the common case cheap by splitting each stack of the state at its top frames
// (kMaskKeyFrames of them: inside a string, up to the string's own frame). What a token does
// within those frames does not depend on the frames below, so for each distinct top it is worked
// out once, on the first request that reaches it, and kept: the tokens consumed entirely within
// the top frames are allowed whatever lies below; the tokens that would run past the top frames
// (a `"` that closes the string and goes on) are the only ones then checked against the whole
// stack, through a small trie of their own. The results are exact: the same allowed set as
// TokenTrie::Allowed. A top's frames are keyed by their Grammar::EquivalentPosition for the
// longest token, so the positions of a long bounded repetition (a string of at most n characters)
// share results past as many copies as a token has bytes.
#ifndef STRATA_GRAMMAR_TOKEN_MASK_H_
#define STRATA_GRAMMAR_TOKEN_MASK_H_

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/types/span.h"
#include "grammar/grammar.h"

namespace strata {

// A vocabulary's tokens as bytes. Immutable once built; shared between threads.
class TokenTrie {
 public:
  // token_bytes[id] is token id's text as bytes; an empty one is never allowed by a grammar (the
  // special tokens: EOS and the like are the caller's to allow when the grammar is complete).
  explicit TokenTrie(std::vector<std::string> token_bytes);
  // A trie of only the tokens `ids` of `full` (ids and bytes as in `full`).
  TokenTrie(const TokenTrie& full, absl::Span<const int32_t> ids);

  int32_t vocab_size() const { return static_cast<int32_t>(token_bytes_->size()); }
  // The longest token's length in bytes.
  int64_t max_token_bytes() const { return max_token_bytes_; }
  const std::string& bytes(int32_t token) const { return (*token_bytes_)[token]; }
  // Bytes of its own (the token bytes are shared with the trie it was cut from).
  int64_t memory_bytes() const {
    return static_cast<int64_t>(nodes_.size() * sizeof(Node) + tokens_.size() * sizeof(int32_t));
  }

  // Sets allowed[t] to 1 for each token whose bytes the grammar accepts from `state` and to 0 for
  // the others; returns how many are allowed. `allowed` has vocab_size() entries. Thread-safe.
  int64_t Allowed(const Grammar& grammar, const GrammarState& state,
                  absl::Span<uint8_t> allowed) const;
  // The same without clearing `allowed` first: sets the allowed tokens to 1 and leaves the rest.
  int64_t AddAllowed(const Grammar& grammar, const GrammarState& state,
                     absl::Span<uint8_t> allowed) const;

  // The longest token whose bytes begin `text` (the lowest id among tokens of the same bytes), its
  // length in *length; -1 when no token of at least one byte does. (A greedy tokenization of a
  // text the grammar forces, for speculative decoding's drafts.)
  int32_t LongestPrefix(absl::string_view text, size_t* length) const;

  // From `state`, which should hold one stack: the tokens consumed entirely within it (the end of
  // the stack may come at the token's last byte) as `accepted`, and the ones that get past its end
  // with bytes left (so the frames below it decide) as `uncertain`. Sorted ascending.
  void Classify(const Grammar& grammar, const GrammarState& state, std::vector<int32_t>* accepted,
                std::vector<int32_t>* uncertain) const;

 private:
  struct Node {
    int32_t first_child = 0;  // children are nodes [first_child, first_child + num_children)
    int32_t num_children = 0;
    int32_t first_token = 0;  // tokens ending here: tokens_[first_token, first_token + num_tokens)
    int32_t num_tokens = 0;
    int32_t subtree_end = 0;  // tokens ending in this node's subtree: tokens_[first_token, ...)
    uint8_t byte = 0;
  };
  class StepCache;
  void Build(std::vector<int32_t> ids);
  int64_t Walk(StepCache& cache, int32_t node, int32_t state, absl::Span<uint8_t> allowed) const;
  void ClassifyWalk(StepCache& cache, int32_t node, int32_t state, bool past_end,
                    std::vector<int32_t>* accepted, std::vector<int32_t>* uncertain) const;

  std::shared_ptr<const std::vector<std::string>> token_bytes_;
  std::vector<Node> nodes_;      // nodes_[0] is the root (the empty prefix), children after parents
  std::vector<int32_t> tokens_;  // in depth-first order, so each subtree's tokens are a range
  int64_t max_token_bytes_ = 0;
};

// Frames of a stack's top that TokenMasker keys its results by.
inline constexpr int kMaskKeyFrames = 3;

struct TokenMaskerStats {
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t entries = 0;
  int64_t bytes = 0;
};

// Token masks for many grammars over one vocabulary, with the per-top results described above
// kept (least recently used dropped past `max_cached_bytes`). Thread-safe: rows are masked in
// parallel.
class TokenMasker {
 public:
  TokenMasker(std::shared_ptr<const TokenTrie> vocabulary, int64_t max_cached_bytes);

  const TokenTrie& vocabulary() const { return *vocabulary_; }

  // As TokenTrie::Allowed for the matcher's state (allowed has vocabulary().vocab_size()
  // entries).
  int64_t Allowed(const GrammarMatcher& matcher, absl::Span<uint8_t> allowed);

  TokenMaskerStats stats() const;

  // Works out ahead the results for the stack tops that `walks` random sentences of `grammar`
  // pass through (RandomSentence, from `seed`), so that the first requests under a new grammar
  // seldom meet a top for the first time. Thread-safe; for a background thread, which `cancel`
  // (may be null) stops between walks.
  void Warm(const std::shared_ptr<const Grammar>& grammar, int walks, uint64_t seed,
            const std::atomic<bool>* cancel = nullptr);

 private:
  struct Entry {
    std::shared_ptr<const Grammar> grammar;  // keeps the key's grammar pointer unique
    // The tokens allowed whatever lies below: as a list when few, else as a bitset over the
    // vocabulary (inside a string most of a 150 k vocabulary: 19 KB instead of 560 KB).
    std::vector<int32_t> accepted;
    std::vector<uint64_t> accepted_bits;
    std::unique_ptr<TokenTrie> uncertain;
    int64_t bytes = 0;
  };
  using Lru = std::list<std::pair<std::string, std::shared_ptr<const Entry>>>;

  // `count`: in stats() (requests' lookups; warming's are not).
  std::shared_ptr<const Entry> Lookup(const GrammarMatcher& matcher, absl::Span<const int32_t> top,
                                      bool count = true);

  const std::shared_ptr<const TokenTrie> vocabulary_;
  const int64_t max_cached_bytes_;
  // A std::mutex, which TSAN sees (Debian's absl::Mutex is uninstrumented): rows are masked on
  // several threads, and warmed on another.
  mutable std::mutex mu_;
  Lru lru_;  // most recently used first; lru_, index_ and stats_ guarded by mu_
  absl::flat_hash_map<std::string, Lru::iterator> index_;
  TokenMaskerStats stats_;
};

}  // namespace strata

#endif  // STRATA_GRAMMAR_TOKEN_MASK_H_
