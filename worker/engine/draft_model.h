// DraftModel: a small model that proposes the tokens a larger one is likely to draw next, for
// speculative decoding (EngineConfig::draft_weights).
//
// It runs on the CPU kernels (ModelRunner, f32) or on the GPU (GpuModelRunner, whose argmax stays
// on the device: only token ids come back), one rank, with a paged KV cache of its own. Each
// sequence that drafts has its own blocks there and the tokens whose K/V they hold. A proposal
// first brings the sequence's draft cache up to its tokens (the prompt on its first draft, later
// the tokens the target kept or drew since), then feeds the draft's own greedy tokens back one at a
// time. Every sequence drafting in a step shares each of those forward passes. The draft cache
// knows nothing of what the target kept: each proposal compares the tokens it holds with the
// sequence's, and keeps the K/V of the common prefix only. A rejected draft token's K/V is
// simply overwritten later.
//
// Prefix caching: a full block of a sequence's own tokens (never one holding draft tokens) is
// published under its chain hash (common/hash.h, in the sequence's cache namespace), and stays
// cached after the sequence ends, until its block is needed: a new sequence whose prompt starts
// with cached blocks (the next turn of a conversation, a shared system prompt) takes them instead
// of computing them. A published block is never written again (a sequence that must compute a
// token inside one computes that block afresh in a block of its own).
//
// Memory: `kv_cache_bytes` of blocks. Free blocks go first, then cached blocks no sequence holds
// (least recently released first). A proposal serves the sequences with the least to catch up
// first (those that drafted last step: one or two tokens each), so a long prompt catching up
// never starves them. A sequence that needs blocks when none are free takes those of sequences
// outside the proposal, least recently drafting first, then of those in it not yet served (each
// catches up again when it next drafts); one that still cannot have them drafts fewer tokens, or
// none, and holds on to nothing another could use. A sequence longer than the whole cache never
// drafts. Forget frees a sequence's blocks when it ends.
//
// Output never depends on the draft: the engine keeps a draft token only where the target's own
// sampler draws it, so a poor draft costs time, never different text.
//
// Thread contract: one thread (the engine's step loop) calls every method.
#ifndef STRATA_WORKER_ENGINE_DRAFT_MODEL_H_
#define STRATA_WORKER_ENGINE_DRAFT_MODEL_H_

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/hash.h"
#include "worker/comm/collectives.h"
#include "worker/model/gpu_model_runner.h"
#include "worker/model/model_runner.h"
#include "worker/model/weights.h"

namespace strata {

struct DraftModelConfig {
  // The draft's KV cache (at least one block per drafting sequence, of block_tokens tokens).
  int64_t kv_cache_bytes = int64_t{64} << 20;
  int64_t block_tokens = 16;
  // Compute threads of the draft's runner (0: one per core; the cpu device).
  int compute_threads = 0;
  // "cpu" or "gpu" (the current CUDA device, in gpu.act with gpu's kernel choices; the geometry,
  // num_blocks to max_blocks_per_seq, is set from the fields here).
  std::string device = "cpu";
  GpuRunnerOptions gpu;
  // Most sequences in one proposal (the gpu device sizes its batches by it).
  int64_t max_seqs = 64;
  // Publish full blocks of sequences' own tokens for others to take (above); false: none shared.
  bool prefix_caching = true;
  // Most tokens one proposal computes to bring sequences' draft caches up to date (a long prompt
  // is caught up over several steps, and drafts nothing until it is).
  int64_t max_catch_up_tokens = 2048;
};

struct DraftModelStats {
  int64_t num_blocks = 0;
  int64_t num_free_blocks = 0;
  int64_t num_sequences = 0;         // sequences holding draft blocks
  int64_t catch_up_tokens = 0;       // tokens computed to bring draft caches up to date
  int64_t draft_forward_tokens = 0;  // tokens computed feeding drafts back
  int64_t evictions = 0;             // sequences whose draft blocks another took
  int64_t num_cached_blocks = 0;     // published blocks (held by sequences or not)
  int64_t prefix_hit_tokens = 0;     // tokens taken from cached blocks instead of computed
  double seconds = 0;                // time spent proposing
};

class DraftModel {
 public:
  // `weights`: one rank of the draft (it must outlive the model). INVALID_ARGUMENT when its
  // vocabulary is not `target_vocab_size` tokens (the two must share a tokenizer), a sharded
  // weights object, a cache smaller than one block, or another device; on the gpu, what
  // GpuModelRunner::Create returns (UNAVAILABLE without a GPU).
  static absl::StatusOr<std::unique_ptr<DraftModel>> Create(const ModelWeights* weights,
                                                            int64_t target_vocab_size,
                                                            DraftModelConfig config);

  struct Request {
    uint64_t sequence = 0;  // the caller's id for the sequence, stable while it lives
    // Its tokens so far (at least one), extending those of its earlier requests.
    absl::Span<const int32_t> tokens;
    int64_t limit = 0;                      // most tokens to propose
    std::vector<int32_t>* draft = nullptr;  // out: the proposal is appended
    // Its cache namespace (Engine's): prefix caching shares blocks within one only.
    uint64_t cache_namespace = 0;
  };
  // Proposes up to `limit` greedy tokens for each request (fewer where the draft's context or
  // cache runs out, none while a long context catches up). Requests name distinct sequences. An
  // error is the runner's: the requests' draft state is dropped and nothing is appended.
  absl::Status Propose(absl::Span<const Request> requests);
  // Frees what `sequence` holds (a no-op for one it does not know).
  void Forget(uint64_t sequence);

  DraftModelStats Stats() const;
  const ModelWeights& weights() const { return *w_; }

 private:
  struct SeqState {
    std::vector<int32_t> blocks;  // each holds a reference
    std::vector<int32_t> tokens;  // the tokens whose K/V the blocks hold, from position 0
    // Leading tokens known to be the sequence's own (a sequence's tokens only grow): a proposal
    // compares the rest only, not its whole context every step.
    int64_t verified = 0;
    // Chain hashes of its leading full blocks of verified tokens (each published, or found
    // published under another block).
    std::vector<BlockHash> hashes;
    uint64_t last_use = 0;   // the last proposal that computed for it
    uint64_t requested = 0;  // the last proposal that named it
  };
  DraftModel(const ModelWeights* weights, DraftModelConfig config, int64_t num_blocks);
  // One forward pass over the batch built in tokens_ ... tables_: the argmax of each logit row.
  absl::Status RunBatch(const std::vector<SeqState*>& seqs, std::vector<int32_t>* argmax);
  // Gives `st` blocks for `num_tokens` tokens, taking them from other sequences when none are
  // free: first those outside this proposal, least recently computed for first, then those of
  // this proposal not yet computed for; never one this proposal computes for (last_use == use_).
  // False, taking nothing, when even that would not be enough.
  bool Reserve(SeqState& st, int64_t num_tokens);
  // Keeps the K/V of the first `num_tokens` tokens, or fewer: never part of a published block.
  void Truncate(SeqState& st, int64_t num_tokens);
  // A free block, else the least recently released cached one (unpublished); -1 when neither.
  int32_t TakeBlock();
  void ReleaseBlock(int32_t block);
  int64_t Reusable() const { return static_cast<int64_t>(free_.size() + lru_.size()); }
  // Publishes st's full blocks of its first `verified` tokens (the sequence's own) not yet hashed.
  void Publish(SeqState& st, uint64_t cache_namespace, int64_t verified);
  // Extends st (block-aligned) with cached blocks of `tokens`, stopping before the block of the
  // last token (whose row must be computed).
  void TakeCachedPrefix(SeqState& st, uint64_t cache_namespace, absl::Span<const int32_t> tokens);

  const ModelWeights* w_;
  DraftModelConfig config_;
  SingleRankCollectives comm_;
  // The cpu device's runner and cache, or the gpu's runner (which holds its cache).
  std::unique_ptr<ModelRunner> runner_;
  std::unique_ptr<KvCacheStorage> cache_;
  std::unique_ptr<GpuModelRunner> gpu_;
  std::vector<int32_t> free_;
  struct BlockInfo {
    int32_t refs = 0;
    bool published = false;
    // A full block of a sequence's own tokens: `hash` names it, published or not (a private
    // duplicate of a published block is offered again when its holders let it go).
    bool hashed = false;
    BlockHash hash = 0;
    std::list<int32_t>::iterator lru;  // while published with no reference
  };
  std::vector<BlockInfo> info_;
  absl::flat_hash_map<BlockHash, int32_t> cached_;
  std::list<int32_t> lru_;  // published blocks no sequence holds, least recently released first
  absl::node_hash_map<uint64_t, SeqState> seqs_;  // stable addresses
  uint64_t use_ = 0;
  // The batch being built.
  std::vector<int32_t> tokens_, positions_, token_seq_, logit_rows_;
  std::vector<int64_t> slots_;
  std::vector<int32_t> tables_;
  std::vector<float> logits_;
  DraftModelStats stats_;
};

}  // namespace strata

#endif  // STRATA_WORKER_ENGINE_DRAFT_MODEL_H_
