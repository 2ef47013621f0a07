// ModelRunner: one forward pass of a Llama-family decoder over a batch of tokens from many
// sequences, on the CPU kernels, for one tensor-parallel rank.
//
// A batch mixes prefill chunks and decode tokens: each token carries its sequence and position, and
// each sequence its block table into the paged KV cache. The runner writes every token's K and V
// into its cache slot, attends causally over the sequence's cached keys, and returns logits for the
// tokens the caller asks for (usually the last token of each sequence). Thread contract: one thread
// calls Forward at a time (the worker's step loop); the runner owns its scratch memory.
//
// Tensor parallelism. With a group of several ranks, rank 0's runner is the one the engine drives:
// each Forward first broadcasts the step's plan (the batch and the cache's geometry) to the other
// ranks, whose runners sit in ServeFollower running the same step on their shard of the weights and
// their share of the KV heads. The row-parallel projections (o, down) are summed across ranks and
// the vocabulary shards of the logits gathered, so every rank ends a step with the same hidden
// states and rank 0 with the whole logits. Every rank's KV cache lives in the group's shared memory
// (GroupKvCaches), so rank 0 can move whole blocks, every rank's heads, between tiers. Any failure
// after a plan went out aborts the group: the ranks would no longer agree on what comes next.
#ifndef STRATA_WORKER_MODEL_MODEL_RUNNER_H_
#define STRATA_WORKER_MODEL_MODEL_RUNNER_H_

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/thread_pool.h"
#include "kernels/matmul.h"
#include "worker/comm/collectives.h"
#include "worker/model/delta.h"
#include "worker/model/weights.h"

namespace strata {

// The KV cache of one rank: per layer, K and V of [num_blocks, block_tokens, num_kv_heads,
// head_dim] f32 (num_kv_heads being this rank's share). Owned by the caller.
struct KvCacheLayers {
  int64_t num_blocks = 0;
  int64_t block_tokens = 0;
  std::vector<float*> k;  // [num_layers]
  std::vector<float*> v;  // [num_layers]
};

// The KV cache of one rank in `memory`: [num_layers][K, V][num_blocks, block_tokens, num_kv_heads,
// head_dim] f32, KvCacheStorage::BlockBytes(w, block_tokens) * num_blocks bytes.
KvCacheLayers KvCacheLayersIn(const ModelWeights& w, float* memory, int64_t num_blocks,
                              int64_t block_tokens);

// The KV caches of every rank of `comm`'s group in its shared memory, rank r's at r times one
// rank's bytes (entry r of the result). Rank 0 sizes the memory; the others map it.
absl::StatusOr<std::vector<KvCacheLayers>> GroupKvCaches(const ModelWeights& w, Collectives* comm,
                                                         int64_t num_blocks, int64_t block_tokens);

// Owns host memory for a KV cache of `num_blocks` blocks for one rank, zero-filled.
class KvCacheStorage {
 public:
  KvCacheStorage(const ModelWeights& weights, int64_t num_blocks, int64_t block_tokens);
  KvCacheStorage(const KvCacheStorage&) = delete;
  KvCacheStorage& operator=(const KvCacheStorage&) = delete;
  const KvCacheLayers& layers() const { return layers_; }
  // Bytes one block takes across all layers (K and V).
  static int64_t BlockBytes(const ModelWeights& weights, int64_t block_tokens);
  // The same for a cache of elements of `element_bytes` (a GPU cache's, in its activation type;
  // this storage's are f32).
  static int64_t BlockBytes(const ModelWeights& weights, int64_t block_tokens,
                            int64_t element_bytes) {
    return BlockBytes(weights, block_tokens) / static_cast<int64_t>(sizeof(float)) * element_bytes;
  }

 private:
  std::vector<float> storage_;
  KvCacheLayers layers_;
};

struct ForwardBatch {
  // One entry per token.
  absl::Span<const int32_t> tokens;
  absl::Span<const int32_t> positions;
  absl::Span<const int32_t> token_seq;  // index into the block tables
  absl::Span<const int64_t> slots;      // KV cache slot: block * block_tokens + row
  // [num_seqs, max_blocks_per_seq], row-major.
  absl::Span<const int32_t> block_tables;
  int64_t num_seqs = 0;
  int64_t max_blocks_per_seq = 0;
  // Token indices to compute logits for.
  absl::Span<const int32_t> logit_tokens;
  // [num_seqs], or empty when every sequence runs the base model: the fine-tune each sequence runs
  // (null for the base). The runner computes each projection for the whole batch with the base
  // weights, then adds each fine-tune's delta for its own tokens. One tensor-parallel rank only.
  absl::Span<const DeltaWeights* const> seq_deltas;
};

// The checks every runner makes of a batch before running it: INVALID_ARGUMENT when the per-token
// arrays differ in length, the block tables are not num_seqs x max_blocks_per_seq, a token id is
// outside [0, vocab_size), a logit token index outside the batch, or seq_deltas is neither empty
// nor one entry per sequence, or holds a delta of other than `num_layers` layers (loaded for
// another base).
absl::Status ValidateForwardBatch(const ForwardBatch& batch, int64_t vocab_size,
                                  int64_t num_layers);

// The inputs of a decoder layer's projections, as ModelRunner's activation observer sees them.
enum class ProjectionInput {
  kQkv,     // the input-normed hidden state, [tokens, hidden]: q, k and v read it
  kO,       // the attention output, [tokens, q_dim]: o_proj reads it
  kGateUp,  // the post-attention-normed hidden state, [tokens, hidden]: gate and up read it
  kDown,    // silu(gate) * up, [tokens, intermediate]: down_proj reads it
};
// Called during Forward with each layer's projection inputs (x: rows x cols, dense, f32, host),
// for calibration statistics (worker/model/delta_calibration.h). Single-rank runners only.
using ActivationObserver = std::function<void(int64_t layer, ProjectionInput input, const float* x,
                                              int64_t rows, int64_t cols)>;

class ModelRunner {
 public:
  // Neither is owned; both must outlive the runner. `num_threads` compute threads split
  // decode-sized projections and attention (0: one per core).
  ModelRunner(const ModelWeights* weights, Collectives* comm, int num_threads = 0);
  // Rank 0 of a group stops the other ranks (StopFollowers) if it has not yet.
  ~ModelRunner();

  // logits: [logit_tokens.size(), vocab_size] f32, host. INVALID_ARGUMENT for inconsistent batches
  // (a token id outside the vocabulary, mismatched lengths, a slot outside the cache). On rank 0 of
  // a group, `cache` is rank 0's entry of GroupKvCaches; the other ranks must be in ServeFollower.
  absl::Status Forward(const ForwardBatch& batch, const KvCacheLayers& cache,
                       absl::Span<float> logits);

  // The loop of a rank other than 0: runs every step rank 0 broadcasts, on this rank's shard and
  // its cache in the group's shared memory, until rank 0 stops it (OK) or the group fails (the
  // error; the group is aborted). Blocks the calling thread.
  absl::Status ServeFollower();
  // Rank 0: tells the other ranks' ServeFollower loops to return. Idempotent; a no-op for a single
  // rank.
  absl::Status StopFollowers();

  const ModelWeights& weights() const { return *w_; }
  // Sees every projection input of later Forward calls (null: none). One rank only.
  void set_activation_observer(ActivationObserver observer) { observer_ = std::move(observer); }
  // The runner's threads, idle between Forward calls (the engine borrows them for host work).
  ThreadPool* pool() const { return pool_.get(); }

 private:
  // y = x · mᵀ (+ bias) for one projection, or for several that share x (q/k/v, gate/up), which
  // then run as one parallel pass.
  struct Projection {
    const Matrix* m;
    float* y;
    int64_t ldy;
    const std::vector<float>* bias;  // may be null or empty
  };
  absl::Status MatMul(const Matrix& m, const float* x, int64_t rows, float* y, int64_t ldy,
                      const std::vector<float>& bias);
  absl::Status MatMulGroup(const float* x, int64_t rows,
                           std::initializer_list<Projection> projections);
  // The tokens and logit rows of one fine-tune in the current batch.
  struct DeltaSegment {
    const DeltaWeights* delta;
    std::vector<int32_t> rows;        // token indices
    std::vector<int32_t> logit_rows;  // indices into logit_tokens
  };
  // Groups the batch's tokens by fine-tune into segments_ (none when all run the base).
  void BuildSegments(const ForwardBatch& batch);
  // Where one segment's update runs: on the pool (one segment at a time, its work split across
  // the threads), or whole on one of the pool's threads, beside other segments on the others.
  // Either way with that thread's scratch.
  struct SegmentScratch {
    std::vector<float> x, t, out;
  };
  struct SegmentWork {
    bool on_pool;
    SegmentScratch* scratch;
  };
  // fn for every segment (its tokens' rows, or with `logits` its logit rows, are disjoint from
  // every other segment's). Many small segments (decode across many fine-tunes) are shared out
  // among the pool's threads, a segment whole to one thread: one hand-off for all of them instead
  // of one per segment and projection. Otherwise one at a time, each on the pool.
  absl::Status ForEachSegment(
      bool logits, absl::FunctionRef<absl::Status(const DeltaSegment&, SegmentWork&)> fn);
  // y[rows] += x[rows] · Δᵀ for one segment (on the pool: split by output columns). A no-op for
  // an unchanged matrix (d.rows == 0).
  absl::Status ApplyPackedDelta(const SegmentWork& w, const PackedDelta& d,
                                const std::vector<int32_t>& rows, const float* x, int64_t ldx,
                                float* y, int64_t ldy);
  // y[rows] += scale · (x[rows] · Aᵀ) · Bᵀ: a LoRA adapter's update (a no-op for rank 0).
  absl::Status ApplyLowRank(const SegmentWork& w, const LowRankDelta& lr,
                            const std::vector<int32_t>& rows, const float* x, int64_t ldx, float* y,
                            int64_t ldy);
  // A layer projection's fine-tune update: its packed delta, then its low-rank one.
  absl::Status ApplyDelta(const SegmentWork& w, const PackedDelta& d, const LowRankDelta& lr,
                          const std::vector<int32_t>& rows, const float* x, int64_t ldx, float* y,
                          int64_t ldy);
  // One f32 MatMulCpu: products up to kLowRankDirectMaxMacs on this thread, 8 rows at a time;
  // larger decode-sized ones across the pool by output columns; the rest through BlasMatMuls.
  absl::Status RunMatMul(const MatMulParams& p);
  // MatMulCpu of each of `params` where it takes the BLAS (more rows than the direct kernel, or a
  // 16-bit weight that needs a workspace): their output columns, all together, are split into one
  // share per pool thread, each with its own workspace. The BLAS runs one thread per call (the
  // constructor sets it process-wide), so the pool's threads are the only ones computing: the
  // BLAS's own threads, left spinning after a call, used to compete with the pool for the cores.
  absl::Status BlasMatMuls(absl::Span<const MatMulParams> params);
  // ApplyDelta for many rows: panels of the delta unpacked to f32 across the pool, each multiplied
  // with the gathered rows by BlasMatMuls.
  absl::Status ApplyDeltaPanels(const PackedDelta& d, const std::vector<int32_t>& rows,
                                const float* x, int64_t ldx, float* y, int64_t ldy);
  // out[t] = RmsNorm(x[t]) with the base's `weight`, except the tokens of segments whose fine-tune
  // replaces it (`replaced` picks the fine-tune's vector; empty: the base's).
  absl::Status NormRows(int64_t n, const float* x, const std::vector<float>& weight,
                        absl::FunctionRef<const std::vector<float>&(const DeltaWeights&)> replaced,
                        float* out);
  // The step itself, on this rank, once the batch is validated (and the plan sent).
  absl::Status ForwardLocal(const ForwardBatch& batch, const KvCacheLayers& cache,
                            absl::Span<float> logits);

  const ModelWeights* w_;
  Collectives* comm_;
  std::unique_ptr<ThreadPool> pool_;
  std::vector<float> inv_freq_;
  // Scratch, grown as needed.
  std::vector<float> hidden_, normed_, qkv_, attn_, proj_, gate_up_, act_, head_rows_, head_logits_;
  std::vector<char> workspace_;
  ActivationObserver observer_;
  std::vector<DeltaSegment> segments_;
  std::vector<float> delta_x_, delta_panel_, delta_out_;
  std::vector<SegmentScratch> segment_scratch_;   // one per pool thread
  std::vector<const DeltaWeights*> token_delta_;  // per token of the current batch
  // Rank 0: the plan of the current step, encoded; true once the followers were stopped.
  std::string plan_;
  bool followers_stopped_ = false;
};

}  // namespace strata

#endif  // STRATA_WORKER_MODEL_MODEL_RUNNER_H_
