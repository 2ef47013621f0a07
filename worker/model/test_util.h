// Helpers shared by the model runners' tests (testonly): feeding sequences in chunks and comparing
// logits.
#ifndef STRATA_WORKER_MODEL_TEST_UTIL_H_
#define STRATA_WORKER_MODEL_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "worker/model/model_runner.h"

namespace strata {

// A batch that owns its arrays (ForwardBatch only points at them).
struct TestBatch {
  std::vector<int32_t> tokens, positions, token_seq, block_tables, logit_tokens;
  std::vector<int64_t> slots;
  std::vector<const DeltaWeights*> seq_deltas;
  int64_t num_seqs = 0;
  int64_t max_blocks_per_seq = 0;

  // Appends token `id` of sequence `seq` at `position`, its cache slot from the block table.
  void Add(int32_t id, int32_t seq, int32_t position, int64_t block_tokens, bool logits) {
    if (logits) logit_tokens.push_back(static_cast<int32_t>(tokens.size()));
    tokens.push_back(id);
    positions.push_back(position);
    token_seq.push_back(seq);
    slots.push_back(int64_t{block_tables[seq * max_blocks_per_seq + position / block_tokens]} *
                        block_tokens +
                    position % block_tokens);
  }
  ForwardBatch View() const {
    ForwardBatch b;
    b.tokens = tokens;
    b.positions = positions;
    b.token_seq = token_seq;
    b.slots = slots;
    b.block_tables = block_tables;
    b.num_seqs = num_seqs;
    b.max_blocks_per_seq = max_blocks_per_seq;
    b.logit_tokens = logit_tokens;
    b.seq_deltas = seq_deltas;
    return b;
  }
};

// One step's logits ([logit tokens, vocab] f32), given a batch.
using ForwardFn = std::function<absl::Status(const ForwardBatch&, std::vector<float>*)>;

// Block tables of num_seqs x max_blocks in which sequence s owns blocks in reverse order, so that
// a table is not the identity.
inline std::vector<int32_t> ReversedBlockTables(int64_t num_seqs, int64_t max_blocks) {
  std::vector<int32_t> t(num_seqs * max_blocks);
  for (int64_t i = 0; i < num_seqs * max_blocks; ++i) {
    t[i] = static_cast<int32_t>(num_seqs * max_blocks - 1 - i);
  }
  return t;
}

// Feeds sequences through `forward` in steps; each step takes up to `chunk` tokens from every
// unfinished sequence, over ReversedBlockTables(seqs.size(), max_blocks). Returns the logits of
// every position of every sequence, concatenated per sequence.
inline std::vector<std::vector<float>> FeedInChunks(const ForwardFn& forward, int64_t vocab,
                                                    const std::vector<std::vector<int32_t>>& seqs,
                                                    int64_t chunk, int64_t block_tokens,
                                                    int64_t max_blocks) {
  const int64_t num_seqs = static_cast<int64_t>(seqs.size());
  const std::vector<int32_t> tables = ReversedBlockTables(num_seqs, max_blocks);
  std::vector<std::vector<float>> out(seqs.size());
  std::vector<int64_t> done(seqs.size(), 0);
  while (true) {
    std::vector<int32_t> tokens, positions, token_seq, logit_tokens;
    std::vector<int64_t> slots;
    std::vector<size_t> owner;
    for (size_t s = 0; s < seqs.size(); ++s) {
      const int64_t end = std::min<int64_t>(seqs[s].size(), done[s] + chunk);
      for (int64_t p = done[s]; p < end; ++p) {
        logit_tokens.push_back(static_cast<int32_t>(tokens.size()));
        owner.push_back(s);
        tokens.push_back(seqs[s][p]);
        positions.push_back(static_cast<int32_t>(p));
        token_seq.push_back(static_cast<int32_t>(s));
        slots.push_back(int64_t{tables[s * max_blocks + p / block_tokens]} * block_tokens +
                        p % block_tokens);
      }
      done[s] = end;
    }
    if (tokens.empty()) break;
    ForwardBatch b;
    b.tokens = tokens;
    b.positions = positions;
    b.token_seq = token_seq;
    b.slots = slots;
    b.block_tables = tables;
    b.num_seqs = num_seqs;
    b.max_blocks_per_seq = max_blocks;
    b.logit_tokens = logit_tokens;
    std::vector<float> logits;
    const absl::Status st = forward(b, &logits);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return out;
    for (size_t i = 0; i < owner.size(); ++i) {
      out[owner[i]].insert(out[owner[i]].end(), logits.begin() + i * vocab,
                           logits.begin() + (i + 1) * vocab);
    }
  }
  return out;
}

// ||got - want|| / ||want|| in double; infinity when the sizes differ or got holds a NaN or an
// infinity (an unwritten or poisoned output).
inline double RelativeError(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / den);
}

// Feeds sequences through the runner in steps over a fresh KV cache poisoned with NaN (reading a
// slot nothing wrote turns the logits to NaN); each step takes up to `chunk` tokens from every
// unfinished sequence, sequence i running fine-tune seq_deltas[i] (empty: all on the base).
// Returns the logits of every position of every sequence.
inline std::vector<std::vector<float>> FeedSequences(
    ModelRunner& runner, const std::vector<std::vector<int32_t>>& seqs, int64_t chunk,
    int64_t block_tokens, const std::vector<const DeltaWeights*>& seq_deltas = {}) {
  const ModelWeights& w = runner.weights();
  const int64_t V = w.config.vocab_size;
  int64_t max_len = 0;
  for (const auto& s : seqs) max_len = std::max<int64_t>(max_len, s.size());
  const int64_t max_blocks = (max_len + block_tokens - 1) / block_tokens;
  const int64_t num_blocks = max_blocks * static_cast<int64_t>(seqs.size());
  KvCacheStorage cache(w, num_blocks, block_tokens);
  // Poison the cache: reading a slot nothing wrote turns the logits to NaN.
  const int64_t per_layer = num_blocks * block_tokens * w.num_kv_heads * w.config.head_dim;
  for (int64_t l = 0; l < w.config.num_layers; ++l) {
    std::fill(cache.layers().k[l], cache.layers().k[l] + per_layer, std::nanf(""));
    std::fill(cache.layers().v[l], cache.layers().v[l] + per_layer, std::nanf(""));
  }
  return FeedInChunks(
      [&](const ForwardBatch& batch, std::vector<float>* logits) {
        ForwardBatch b = batch;
        b.seq_deltas = seq_deltas;
        logits->assign(b.logit_tokens.size() * V, 0.0f);
        return runner.Forward(b, cache.layers(), absl::MakeSpan(*logits));
      },
      V, seqs, chunk, block_tokens, max_blocks);
}

}  // namespace strata

#endif  // STRATA_WORKER_MODEL_TEST_UTIL_H_
