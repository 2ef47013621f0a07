#include "grammar/token_mask.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <deque>
#include <random>
#include <utility>

#include "common/hash.h"

namespace strata {
namespace {

// The bytes any stack of `s` can take next.
ByteSet NextBytes(const Grammar& g, const GrammarState& s) {
  ByteSet next;
  const absl::Span<const int32_t> el = g.elements();
  for (int32_t i = 0; i < s.num_stacks(); ++i) next.AddAll(g.byte_set(el[s.stack(i).back()]));
  return next;
}

uint64_t HashState(const GrammarState& s) {
  auto bytes = [](const std::vector<int32_t>& v) {
    return absl::string_view(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(int32_t));
  };
  const uint64_t flags = (s.complete ? 1 : 0) | (s.truncated ? 2 : 0);
  return Hash64(bytes(s.starts), Hash64(bytes(s.data), flags));
}

bool SameState(const GrammarState& a, const GrammarState& b) {
  return a.complete == b.complete && a.truncated == b.truncated && a.data == b.data &&
         a.starts == b.starts;
}

}  // namespace

// The states one walk reaches, each kept once, and the steps between them: within a walk many
// trie paths lead to the same state (inside a string, every whole character returns to it), so a
// step is worked out once per (state, byte) and then looked up.
class TokenTrie::StepCache {
 public:
  explicit StepCache(const Grammar& g) : g_(g) {}

  int32_t Intern(GrammarState s) {
    const uint64_t h = HashState(s);
    auto [it, added] = by_hash_.try_emplace(h);
    for (int32_t id : it->second) {
      if (SameState(states_[id], s)) return id;
    }
    states_.push_back(std::move(s));
    next_bytes_.push_back(NextBytes(g_, states_.back()));
    const int32_t id = static_cast<int32_t>(states_.size()) - 1;
    it->second.push_back(id);
    return id;
  }

  // The state after byte `b`, or -1 when `b` is not allowed.
  int32_t Step(int32_t id, uint8_t b) {
    if (!next_bytes_[id].Has(b)) return -1;
    const uint64_t key = (static_cast<uint64_t>(id) << 8) | b;
    auto it = steps_.find(key);
    if (it != steps_.end()) return it->second;
    int32_t to = -1;
    if (GrammarMatcher::Step(g_, states_[id], b, &scratch_)) to = Intern(std::move(scratch_));
    scratch_.Clear();
    steps_.emplace(key, to);
    return to;
  }

  const GrammarState& state(int32_t id) const { return states_[id]; }

 private:
  const Grammar& g_;
  std::vector<GrammarState> states_;
  std::vector<ByteSet> next_bytes_;
  absl::flat_hash_map<uint64_t, std::vector<int32_t>> by_hash_;
  absl::flat_hash_map<uint64_t, int32_t> steps_;
  GrammarState scratch_;
};

TokenTrie::TokenTrie(std::vector<std::string> token_bytes)
    : token_bytes_(std::make_shared<const std::vector<std::string>>(std::move(token_bytes))) {
  std::vector<int32_t> ids;
  for (int32_t t = 0; t < vocab_size(); ++t) {
    if (!bytes(t).empty()) ids.push_back(t);
  }
  Build(std::move(ids));
}

TokenTrie::TokenTrie(const TokenTrie& full, absl::Span<const int32_t> ids)
    : token_bytes_(full.token_bytes_) {
  std::vector<int32_t> some;
  for (int32_t t : ids) {
    if (t >= 0 && t < vocab_size() && !bytes(t).empty()) some.push_back(t);
  }
  Build(std::move(some));
}

void TokenTrie::Build(std::vector<int32_t> ids) {
  std::sort(ids.begin(), ids.end(), [this](int32_t a, int32_t b) {
    return bytes(a) != bytes(b) ? bytes(a) < bytes(b) : a < b;
  });
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  // Sorted by bytes is depth-first order: each node's subtree is a range of tokens_, the tokens
  // ending at the node first. Nodes are allocated breadth first, so siblings are adjacent.
  tokens_ = std::move(ids);
  for (int32_t t : tokens_) {
    max_token_bytes_ = std::max<int64_t>(max_token_bytes_, static_cast<int64_t>(bytes(t).size()));
  }
  struct Todo {
    int32_t node;
    size_t begin, end;
    int depth;
  };
  nodes_.assign(1, Node());
  std::deque<Todo> todo = {{0, 0, tokens_.size(), 0}};
  while (!todo.empty()) {
    const Todo t = todo.front();
    todo.pop_front();
    size_t i = t.begin;
    while (i < t.end && static_cast<int>(bytes(tokens_[i]).size()) == t.depth) ++i;
    Node& n = nodes_[t.node];
    n.first_token = static_cast<int32_t>(t.begin);
    n.num_tokens = static_cast<int32_t>(i - t.begin);
    n.subtree_end = static_cast<int32_t>(t.end);
    n.first_child = static_cast<int32_t>(nodes_.size());
    while (i < t.end) {
      const uint8_t b = static_cast<uint8_t>(bytes(tokens_[i])[t.depth]);
      size_t j = i;
      while (j < t.end && static_cast<uint8_t>(bytes(tokens_[j])[t.depth]) == b) ++j;
      Node child;
      child.byte = b;
      nodes_.push_back(child);
      ++nodes_[t.node].num_children;
      todo.push_back({static_cast<int32_t>(nodes_.size()) - 1, i, j, t.depth + 1});
      i = j;
    }
  }
}

int32_t TokenTrie::LongestPrefix(absl::string_view text, size_t* length) const {
  int32_t best = -1;
  *length = 0;
  int32_t node = 0;
  for (size_t depth = 0; depth < text.size(); ++depth) {
    const Node& n = nodes_[node];
    const uint8_t b = static_cast<uint8_t>(text[depth]);
    int32_t next = -1;
    for (int32_t c = n.first_child; c < n.first_child + n.num_children; ++c) {
      if (nodes_[c].byte == b) {
        next = c;
        break;
      }
    }
    if (next < 0) break;
    node = next;
    const Node& m = nodes_[node];
    if (m.num_tokens > 0) {
      best = tokens_[m.first_token];  // sorted by bytes, then id
      *length = depth + 1;
    }
  }
  return best;
}

int64_t TokenTrie::Walk(StepCache& cache, int32_t node, int32_t state,
                        absl::Span<uint8_t> allowed) const {
  int64_t count = 0;
  const Node& n = nodes_[node];
  for (int32_t c = n.first_child; c < n.first_child + n.num_children; ++c) {
    const Node& child = nodes_[c];
    const int32_t to = cache.Step(state, child.byte);
    if (to < 0) continue;
    for (int32_t k = child.first_token; k < child.first_token + child.num_tokens; ++k) {
      count += allowed[tokens_[k]] == 0;
      allowed[tokens_[k]] = 1;
    }
    if (child.num_children > 0 && cache.state(to).num_stacks() > 0) {
      count += Walk(cache, c, to, allowed);
    }
  }
  return count;
}

int64_t TokenTrie::AddAllowed(const Grammar& grammar, const GrammarState& state,
                              absl::Span<uint8_t> allowed) const {
  StepCache cache(grammar);
  return Walk(cache, 0, cache.Intern(state), allowed);
}

int64_t TokenTrie::Allowed(const Grammar& grammar, const GrammarState& state,
                           absl::Span<uint8_t> allowed) const {
  std::fill(allowed.begin(), allowed.end(), 0);
  return AddAllowed(grammar, state, allowed);
}

void TokenTrie::ClassifyWalk(StepCache& cache, int32_t node, int32_t state, bool past_end,
                             std::vector<int32_t>* accepted,
                             std::vector<int32_t>* uncertain) const {
  const Node& n = nodes_[node];
  auto range = [&](int32_t begin, int32_t end) {
    uncertain->insert(uncertain->end(), tokens_.begin() + begin, tokens_.begin() + end);
  };
  for (int32_t c = n.first_child; c < n.first_child + n.num_children; ++c) {
    const Node& child = nodes_[c];
    const int32_t to = cache.Step(state, child.byte);
    if (to < 0) {
      // The stack ended before this byte: what follows is for the frames below to decide.
      if (past_end) range(child.first_token, child.subtree_end);
      continue;
    }
    accepted->insert(accepted->end(), tokens_.begin() + child.first_token,
                     tokens_.begin() + child.first_token + child.num_tokens);
    if (child.num_children == 0) continue;
    const GrammarState& s = cache.state(to);
    const bool child_past = past_end || s.complete;
    if (s.num_stacks() > 0) {
      ClassifyWalk(cache, c, to, child_past, accepted, uncertain);
    } else if (child_past) {
      range(child.first_token + child.num_tokens, child.subtree_end);
    }
  }
}

void TokenTrie::Classify(const Grammar& grammar, const GrammarState& state,
                         std::vector<int32_t>* accepted, std::vector<int32_t>* uncertain) const {
  accepted->clear();
  uncertain->clear();
  StepCache cache(grammar);
  ClassifyWalk(cache, 0, cache.Intern(state), state.complete, accepted, uncertain);
  std::sort(accepted->begin(), accepted->end());
  std::sort(uncertain->begin(), uncertain->end());
}

TokenMasker::TokenMasker(std::shared_ptr<const TokenTrie> vocabulary, int64_t max_cached_bytes)
    : vocabulary_(std::move(vocabulary)), max_cached_bytes_(max_cached_bytes) {}

std::shared_ptr<const TokenMasker::Entry> TokenMasker::Lookup(const GrammarMatcher& matcher,
                                                              absl::Span<const int32_t> top,
                                                              bool count) {
  const Grammar* g = &matcher.grammar();
  // Frames that let the same tokens through share one result.
  std::array<int32_t, kMaskKeyFrames> frames;
  for (size_t i = 0; i < top.size(); ++i) {
    frames[i] = g->EquivalentPosition(top[i], vocabulary_->max_token_bytes());
  }
  top = absl::MakeConstSpan(frames.data(), top.size());
  std::string key(sizeof(g) + top.size() * sizeof(int32_t), '\0');
  std::memcpy(key.data(), &g, sizeof(g));
  std::memcpy(key.data() + sizeof(g), top.data(), top.size() * sizeof(int32_t));
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(key);
    if (it != index_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      if (count) ++stats_.hits;
      return it->second->second;
    }
    if (count) ++stats_.misses;
  }
  // Worked out outside the lock (a walk of the whole vocabulary, for a string's top).
  auto entry = std::make_shared<Entry>();
  entry->grammar = matcher.shared_grammar();
  GrammarState state;
  state.starts = {0};
  state.data.assign(top.begin(), top.end());
  std::vector<int32_t> uncertain;
  vocabulary_->Classify(*g, state, &entry->accepted, &uncertain);
  const size_t words = (static_cast<size_t>(vocabulary_->vocab_size()) + 63) / 64;
  if (entry->accepted.size() * 2 > words) {
    entry->accepted_bits.assign(words, 0);
    for (int32_t t : entry->accepted) entry->accepted_bits[t >> 6] |= uint64_t{1} << (t & 63);
    entry->accepted = {};
  }
  if (!uncertain.empty()) entry->uncertain = std::make_unique<TokenTrie>(*vocabulary_, uncertain);
  entry->bytes = static_cast<int64_t>(sizeof(Entry) + 2 * key.size() +
                                      entry->accepted.size() * sizeof(int32_t) +
                                      entry->accepted_bits.size() * sizeof(uint64_t)) +
                 (entry->uncertain != nullptr ? entry->uncertain->memory_bytes() : 0);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = index_.find(key);
  if (it != index_.end()) return it->second->second;  // worked out meanwhile by another row
  lru_.emplace_front(key, entry);
  index_.emplace(std::move(key), lru_.begin());
  stats_.bytes += entry->bytes;
  ++stats_.entries;
  while (stats_.bytes > max_cached_bytes_ && lru_.size() > 1) {
    stats_.bytes -= lru_.back().second->bytes;
    --stats_.entries;
    index_.erase(lru_.back().first);
    lru_.pop_back();
  }
  return entry;
}

int64_t TokenMasker::Allowed(const GrammarMatcher& matcher, absl::Span<uint8_t> allowed) {
  std::fill(allowed.begin(), allowed.end(), 0);
  const GrammarState& state = matcher.state();
  GrammarState single;
  for (int32_t i = 0; i < state.num_stacks(); ++i) {
    const absl::Span<const int32_t> stack = state.stack(i);
    const size_t k = std::min<size_t>(kMaskKeyFrames, stack.size());
    const std::shared_ptr<const Entry> e = Lookup(matcher, stack.subspan(stack.size() - k));
    for (int32_t t : e->accepted) allowed[t] = 1;
    for (size_t w = 0; w < e->accepted_bits.size(); ++w) {
      for (uint64_t bits = e->accepted_bits[w]; bits != 0; bits &= bits - 1) {
        allowed[w * 64 + static_cast<size_t>(__builtin_ctzll(bits))] = 1;
      }
    }
    // Past the top frames only where there are frames below them.
    if (e->uncertain != nullptr && stack.size() > k) {
      single.Clear();
      single.starts = {0};
      single.data.assign(stack.begin(), stack.end());
      e->uncertain->AddAllowed(matcher.grammar(), single, allowed);
    }
  }
  int64_t count = 0;
  for (uint8_t a : allowed) count += a;
  return count;
}

void TokenMasker::Warm(const std::shared_ptr<const Grammar>& grammar, int walks, uint64_t seed,
                       const std::atomic<bool>* cancel) {
  std::mt19937_64 rng(seed);
  for (int w = 0; w < walks && (cancel == nullptr || !cancel->load()); ++w) {
    RandomSentence(grammar, rng, 4096, [this](const GrammarMatcher& m) {
      const GrammarState& state = m.state();
      for (int32_t i = 0; i < state.num_stacks(); ++i) {
        const absl::Span<const int32_t> stack = state.stack(i);
        const size_t k = std::min<size_t>(kMaskKeyFrames, stack.size());
        Lookup(m, stack.subspan(stack.size() - k), /*count=*/false);
      }
    });
  }
}

TokenMaskerStats TokenMasker::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace strata
