#include "worker/engine/draft_model.h"

#include <algorithm>
#include <limits>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "kernels/dtype.h"

namespace strata {

absl::StatusOr<std::unique_ptr<DraftModel>> DraftModel::Create(const ModelWeights* weights,
                                                               int64_t target_vocab_size,
                                                               DraftModelConfig config) {
  if (weights->world_size != 1) {
    return absl::InvalidArgumentError("draft model: needs the whole model (one rank)");
  }
  if (weights->config.vocab_size != target_vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("draft model: its vocabulary has ", weights->config.vocab_size,
                     " tokens and the served model's ", target_vocab_size,
                     "; a draft must share the served model's tokenizer"));
  }
  if (config.block_tokens <= 0 || config.max_catch_up_tokens <= 0) {
    return absl::InvalidArgumentError(
        "draft model: block_tokens and max_catch_up_tokens must be > 0");
  }
  const bool on_gpu = config.device == "gpu";
  if (!on_gpu && config.device != "cpu") {
    return absl::InvalidArgumentError(
        absl::StrCat("draft model: device must be cpu or gpu, not '", config.device, "'"));
  }
  const int64_t block_bytes = KvCacheStorage::BlockBytes(
      *weights, config.block_tokens, on_gpu ? DTypeBytes(config.gpu.act) : int64_t{sizeof(float)});
  const int64_t num_blocks = config.kv_cache_bytes / block_bytes;
  if (num_blocks < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("draft model: a KV cache of ", config.kv_cache_bytes,
                     " bytes holds no block (one is ", block_bytes, " bytes)"));
  }
  if (num_blocks > std::numeric_limits<int32_t>::max() / config.block_tokens) {
    return absl::InvalidArgumentError("draft model: KV cache too large");
  }
  auto m = std::unique_ptr<DraftModel>(new DraftModel(weights, config, num_blocks));
  if (on_gpu) {
    GpuRunnerOptions o = config.gpu;
    o.num_blocks = num_blocks;
    o.block_tokens = config.block_tokens;
    o.max_batch_tokens = std::max(config.max_catch_up_tokens, config.max_seqs);
    o.max_seqs = config.max_seqs;
    o.max_blocks_per_seq =
        (weights->config.max_position_embeddings + config.block_tokens - 1) / config.block_tokens +
        1;
    o.delta_bytes = 0;
    ASSIGN_OR_RETURN(m->gpu_, GpuModelRunner::Create(*weights, o));
  } else {
    m->runner_ = std::make_unique<ModelRunner>(weights, &m->comm_, config.compute_threads);
    m->cache_ = std::make_unique<KvCacheStorage>(*weights, num_blocks, config.block_tokens);
  }
  return m;
}

DraftModel::DraftModel(const ModelWeights* weights, DraftModelConfig config, int64_t num_blocks)
    : w_(weights), config_(std::move(config)), info_(static_cast<size_t>(num_blocks)) {
  free_.reserve(static_cast<size_t>(num_blocks));
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
  stats_.num_blocks = num_blocks;
}

int32_t DraftModel::TakeBlock() {
  int32_t b = -1;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    b = lru_.front();
    lru_.pop_front();
    BlockInfo& bi = info_[static_cast<size_t>(b)];
    cached_.erase(bi.hash);
    bi.published = false;
  }
  if (b >= 0) {
    info_[static_cast<size_t>(b)].refs = 1;
    info_[static_cast<size_t>(b)].hashed = false;
  }
  return b;
}

void DraftModel::ReleaseBlock(int32_t block) {
  BlockInfo& bi = info_[static_cast<size_t>(block)];
  if (--bi.refs > 0) return;
  // A private copy of a full block whose published one has been reused since: offered instead.
  if (!bi.published && bi.hashed && config_.prefix_caching &&
      cached_.emplace(bi.hash, block).second) {
    bi.published = true;
  }
  if (bi.published) {
    bi.lru = lru_.insert(lru_.end(), block);
  } else {
    free_.push_back(block);
  }
}

void DraftModel::Truncate(SeqState& st, int64_t num_tokens) {
  const int64_t bt = config_.block_tokens;
  const size_t partial = static_cast<size_t>(num_tokens / bt);
  if (num_tokens % bt != 0 && partial < st.blocks.size() &&
      info_[static_cast<size_t>(st.blocks[partial])].published) {
    num_tokens = static_cast<int64_t>(partial) * bt;  // computed afresh in a block of its own
  }
  st.tokens.resize(static_cast<size_t>(num_tokens));
  st.verified = std::min(st.verified, num_tokens);
  st.hashes.resize(std::min(st.hashes.size(), static_cast<size_t>(num_tokens / bt)));
  const size_t keep = static_cast<size_t>((num_tokens + bt - 1) / bt);
  while (st.blocks.size() > keep) {
    ReleaseBlock(st.blocks.back());
    st.blocks.pop_back();
  }
}

void DraftModel::Publish(SeqState& st, uint64_t cache_namespace, int64_t verified) {
  const int64_t bt = config_.block_tokens;
  for (size_t b = st.hashes.size();
       static_cast<int64_t>(b + 1) * bt <= verified && b < st.blocks.size(); ++b) {
    const BlockHash parent = b == 0 ? kRootBlockHash : st.hashes[b - 1];
    const BlockHash h = ChainBlockHash(parent, cache_namespace,
                                       absl::MakeConstSpan(st.tokens).subspan(
                                           b * static_cast<size_t>(bt), static_cast<size_t>(bt)));
    st.hashes.push_back(h);
    BlockInfo& bi = info_[static_cast<size_t>(st.blocks[b])];
    if (bi.published) continue;  // (taken from the cache)
    bi.hashed = true;
    bi.hash = h;
    // (Another sequence may have published the same prefix first: this copy stays private, and is
    // offered again when it is let go.)
    if (config_.prefix_caching && cached_.emplace(h, st.blocks[b]).second) bi.published = true;
  }
}

void DraftModel::TakeCachedPrefix(SeqState& st, uint64_t cache_namespace,
                                  absl::Span<const int32_t> tokens) {
  const int64_t bt = config_.block_tokens;
  if (st.tokens.size() != st.blocks.size() * static_cast<size_t>(bt)) return;  // not aligned
  // The hashes of what it holds first (all of it is the sequence's own).
  Publish(st, cache_namespace, static_cast<int64_t>(st.tokens.size()));
  const int64_t len = static_cast<int64_t>(tokens.size());
  for (size_t b = st.blocks.size(); static_cast<int64_t>(b + 1) * bt <= len - 1; ++b) {
    const BlockHash parent = b == 0 ? kRootBlockHash : st.hashes[b - 1];
    const auto block_tokens = tokens.subspan(b * static_cast<size_t>(bt), static_cast<size_t>(bt));
    const BlockHash h = ChainBlockHash(parent, cache_namespace, block_tokens);
    auto it = cached_.find(h);
    if (it == cached_.end()) return;
    BlockInfo& bi = info_[static_cast<size_t>(it->second)];
    if (bi.refs++ == 0) lru_.erase(bi.lru);
    st.blocks.push_back(it->second);
    st.tokens.insert(st.tokens.end(), block_tokens.begin(), block_tokens.end());
    st.hashes.push_back(h);
    stats_.prefix_hit_tokens += bt;
  }
}

bool DraftModel::Reserve(SeqState& st, int64_t num_tokens) {
  const size_t want =
      static_cast<size_t>((num_tokens + config_.block_tokens - 1) / config_.block_tokens);
  if (st.blocks.size() >= want) return true;
  const int64_t need = static_cast<int64_t>(want - st.blocks.size());
  if (Reusable() < need) {
    // What evicting every sequence it may take from would give back: the blocks that only such
    // sequences hold (a system prompt's cached blocks, say, held by several of them).
    absl::flat_hash_map<int32_t, int32_t> holders;
    for (const auto& [id, other] : seqs_) {
      if (&other == &st || other.last_use == use_) continue;
      for (int32_t b : other.blocks) ++holders[b];
    }
    int64_t could_free = Reusable();
    for (const auto& [b, n] : holders) could_free += n == info_[static_cast<size_t>(b)].refs;
    if (could_free < need) return false;  // evict nothing in vain
  }
  while (Reusable() < need) {
    // Outside this proposal first, then one that frees a block by itself, then the least
    // recently computed for.
    auto victim = seqs_.end();
    const auto rank = [this](const SeqState& s) {
      bool frees = false;
      for (int32_t b : s.blocks) frees = frees || info_[static_cast<size_t>(b)].refs == 1;
      return std::make_tuple(s.requested == use_, !frees, s.last_use);
    };
    for (auto it = seqs_.begin(); it != seqs_.end(); ++it) {
      const SeqState& o = it->second;
      if (&o == &st || o.last_use == use_ || o.blocks.empty()) continue;
      if (victim == seqs_.end() || rank(o) < rank(victim->second)) victim = it;
    }
    if (victim == seqs_.end()) return false;
    Truncate(victim->second, 0);
    seqs_.erase(victim);
    ++stats_.evictions;
  }
  for (int64_t i = 0; i < need; ++i) st.blocks.push_back(TakeBlock());
  return true;
}

void DraftModel::Forget(uint64_t sequence) {
  auto it = seqs_.find(sequence);
  if (it == seqs_.end()) return;
  Truncate(it->second, 0);
  seqs_.erase(it);
}

absl::Status DraftModel::RunBatch(const std::vector<SeqState*>& seqs,
                                  std::vector<int32_t>* argmax) {
  size_t width = 1;
  for (const SeqState* st : seqs) width = std::max(width, st->blocks.size());
  tables_.assign(seqs.size() * width, 0);
  for (size_t i = 0; i < seqs.size(); ++i) {
    std::copy(seqs[i]->blocks.begin(), seqs[i]->blocks.end(), tables_.begin() + i * width);
  }
  ForwardBatch batch;
  batch.tokens = tokens_;
  batch.positions = positions_;
  batch.token_seq = token_seq_;
  batch.slots = slots_;
  batch.block_tables = tables_;
  batch.num_seqs = static_cast<int64_t>(seqs.size());
  batch.max_blocks_per_seq = static_cast<int64_t>(width);
  batch.logit_tokens = logit_rows_;
  argmax->resize(logit_rows_.size());
  if (gpu_ != nullptr) {
    // (A round of catch-up alone asks for no logits.)
    return logit_rows_.empty() ? gpu_->Forward(batch, {})
                               : gpu_->ForwardGreedy(batch, absl::MakeSpan(*argmax), {});
  }
  const int64_t vocab = w_->config.vocab_size;
  logits_.resize(logit_rows_.size() * static_cast<size_t>(vocab));
  RETURN_IF_ERROR(runner_->Forward(batch, cache_->layers(), absl::MakeSpan(logits_)));
  // The lowest id among equals, as the sampler's greedy draw and the GPU's.
  for (size_t r = 0; r < logit_rows_.size(); ++r) {
    const float* row = logits_.data() + r * static_cast<size_t>(vocab);
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i) {
      if (row[i] > row[best]) best = i;
    }
    (*argmax)[r] = static_cast<int32_t>(best);
  }
  return absl::OkStatus();
}

absl::Status DraftModel::Propose(absl::Span<const Request> requests) {
  const absl::Time start = absl::Now();
  ++use_;
  const int64_t bt = config_.block_tokens;
  const int64_t max_positions = w_->config.max_position_embeddings;
  const int64_t capacity = stats_.num_blocks * bt;
  // Every requested sequence's state, its K/V kept as far as its tokens agree with the request's.
  // The last token is always computed again: its row gives the first draft token.
  std::vector<std::pair<int64_t, size_t>> order;  // (tokens to catch up, request)
  for (size_t ri = 0; ri < requests.size(); ++ri) {
    const Request& r = requests[ri];
    if (r.tokens.empty()) continue;
    SeqState& st = seqs_[r.sequence];
    st.requested = use_;
    const int64_t len = static_cast<int64_t>(r.tokens.size());
    const int64_t common = std::min<int64_t>(static_cast<int64_t>(st.tokens.size()), len);
    int64_t held = std::min(st.verified, common);
    while (held < common && st.tokens[static_cast<size_t>(held)] == r.tokens[held]) ++held;
    Truncate(st, std::min(held, len - 1));
    // (Not for one that cannot draft here: it would only pin the blocks.)
    if (len <= max_positions && r.limit > 0 && len <= capacity) {
      TakeCachedPrefix(st, r.cache_namespace, r.tokens);
    }
    st.verified = static_cast<int64_t>(st.tokens.size());
    order.push_back({len - static_cast<int64_t>(st.tokens.size()), ri});
  }
  // The least to catch up first (ties in request order).
  std::stable_sort(order.begin(), order.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });

  struct Work {
    size_t request;
    SeqState* st;
    int64_t limit;             // tokens to propose
    int64_t len;               // the sequence's tokens
    std::vector<int32_t> out;  // the proposal so far
  };
  std::vector<Work> work;
  std::vector<SeqState*> batch_seqs;
  tokens_.clear();
  positions_.clear();
  token_seq_.clear();
  slots_.clear();
  logit_rows_.clear();
  auto add_row = [&](SeqState* st, int32_t token, int64_t pos, bool logits) {
    if (batch_seqs.empty() || batch_seqs.back() != st) batch_seqs.push_back(st);
    if (logits) logit_rows_.push_back(static_cast<int32_t>(tokens_.size()));
    tokens_.push_back(token);
    positions_.push_back(static_cast<int32_t>(pos));
    token_seq_.push_back(static_cast<int32_t>(batch_seqs.size() - 1));
    slots_.push_back(int64_t{st->blocks[static_cast<size_t>(pos / bt)]} * bt + pos % bt);
    st->tokens.push_back(token);
  };

  // Round 0: each sequence's draft cache brought up to its tokens; the last one's logits give the
  // first draft token.
  int64_t budget = config_.max_catch_up_tokens;
  std::vector<std::pair<size_t, int64_t>> computed;  // (request, its tokens computed through)
  for (const auto& [first_estimate, ri] : order) {
    const Request& r = requests[ri];
    const int64_t len = static_cast<int64_t>(r.tokens.size());
    if (len > max_positions || r.limit <= 0 || budget <= 0) continue;
    if (len > capacity) {
      Forget(r.sequence);  // it can never draft here: hold nothing
      continue;
    }
    // (An earlier request may have taken its blocks since the estimate: it starts over, from
    // what the cache still holds.)
    SeqState& st = seqs_[r.sequence];
    st.requested = use_;
    if (st.tokens.empty()) {
      TakeCachedPrefix(st, r.cache_namespace, r.tokens);
      st.verified = static_cast<int64_t>(st.tokens.size());
    }
    const int64_t held = static_cast<int64_t>(st.tokens.size());
    const int64_t catch_up = len - held;
    if (catch_up > budget) {
      // A long context: computed over several proposals, drafting once it is complete.
      if (!Reserve(st, held + budget)) continue;
      st.last_use = use_;
      computed.push_back({ri, held + budget});
      for (int64_t p = held; p < held + budget; ++p) add_row(&st, r.tokens[p], p, false);
      stats_.catch_up_tokens += budget;
      budget = 0;
      continue;
    }
    // K/V for the catch-up and for the draft tokens fed back: positions up to len + limit - 2.
    int64_t limit = std::min({r.limit, max_positions - len + 1, capacity - len + 1});
    // (A Reserve that fails takes nothing, and its answer changes only with the block count: each
    // retry asks for one block fewer.)
    while (limit > 0 && !Reserve(st, len + limit - 1)) {
      const int64_t blocks = (len + limit - 2) / bt + 1;  // those len + limit - 1 tokens need
      limit = (blocks - 1) * bt - len + 1;
    }
    if (limit <= 0) continue;
    st.last_use = use_;
    computed.push_back({ri, len});
    for (int64_t p = held; p < len; ++p) add_row(&st, r.tokens[p], p, p == len - 1);
    stats_.catch_up_tokens += catch_up;
    budget -= catch_up;
    work.push_back({ri, &st, limit, len, {}});
  }
  absl::Status status;
  std::vector<int32_t> next;
  if (!tokens_.empty()) status = RunBatch(batch_seqs, &next);
  for (size_t i = 0; status.ok() && i < work.size(); ++i) work[i].out.push_back(next[i]);
  // The full blocks of the sequences' own tokens now computed are there for others to take.
  for (size_t i = 0; status.ok() && i < computed.size(); ++i) {
    const Request& r = requests[computed[i].first];
    SeqState& st = seqs_.at(r.sequence);
    st.verified = computed[i].second;
    Publish(st, r.cache_namespace, st.verified);
  }
  // Rounds 1..: each draft token fed back for the next.
  for (int64_t j = 1; status.ok(); ++j) {
    tokens_.clear();
    positions_.clear();
    token_seq_.clear();
    slots_.clear();
    logit_rows_.clear();
    batch_seqs.clear();
    std::vector<Work*> rows;
    for (Work& w : work) {
      if (w.limit <= j) continue;
      add_row(w.st, w.out.back(), w.len + j - 1, true);
      rows.push_back(&w);
    }
    if (rows.empty()) break;
    stats_.draft_forward_tokens += static_cast<int64_t>(rows.size());
    status = RunBatch(batch_seqs, &next);
    for (size_t i = 0; status.ok() && i < rows.size(); ++i) rows[i]->out.push_back(next[i]);
  }
  if (!status.ok()) {
    // What the caches hold is unknown now: every requested sequence starts over.
    for (const Request& r : requests) Forget(r.sequence);
    stats_.seconds += absl::ToDoubleSeconds(absl::Now() - start);
    return status;
  }
  for (const Work& w : work) {
    std::vector<int32_t>* draft = requests[w.request].draft;
    draft->insert(draft->end(), w.out.begin(), w.out.end());
  }
  stats_.seconds += absl::ToDoubleSeconds(absl::Now() - start);
  return absl::OkStatus();
}

DraftModelStats DraftModel::Stats() const {
  DraftModelStats s = stats_;
  s.num_free_blocks = Reusable();
  s.num_cached_blocks = static_cast<int64_t>(cached_.size());
  s.num_sequences = static_cast<int64_t>(seqs_.size());
  return s;
}

}  // namespace strata
