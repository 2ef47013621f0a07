// Engine: continuous batching of many sequences through one model on one worker.
//
// Each Step plans one batch under a token budget: every running sequence in the decode phase gets
// one token, sequences still prefilling get the next chunk of their prompt, and waiting sequences
// are admitted while budget and KV blocks allow (chunked prefill), highest priority first; within a
// priority, fair sharing between tenants (below), and each tenant's in arrival order. On admission
// a sequence takes the longest cached prefix of its full blocks from the BlockManager (prefix
// caching, namespaced by model, fine-tune and cache salt). A sequence whose prefix goes on in
// blocks that another sequence in the step is computing right now waits for them to be published
// instead of computing them a second time (inflight_prefill_min_tokens). When blocks run out, a
// sequence not yet planned in this step is preempted, the lowest priority first (then the most
// served tenant's, below; then the most recently admitted): its blocks are released and it waits to
// be recomputed (its published blocks usually remain cached). Cancelling a sequence frees its
// blocks at once.
//
// Fair sharing (EngineConfig::fair_share): every request names its tenant (empty: one tenant for
// all). The engine counts each tenant's service, the tokens computed for it plus the tokens it
// generated (so an output token counts about twice a prompt token, whose KV a cache hit spares
// altogether), divided by its weight. Among waiting sequences of one priority the next admitted is
// the oldest of the tenant served least so far; a tenant that floods the engine with requests
// then takes no more than its share of the places that open, instead of making everyone queue
// behind its backlog. A tenant with nothing waiting or running banks no credit: when its next
// request arrives its count is raised to the least of those of the tenants with work here, or,
// when none has work, to the greatest of all (work a tenant did alone took nothing from anyone,
// so after an idle spell everyone starts level). Under
// KV pressure the victim is the lowest priority, then the most served tenant, then the most
// recently admitted sequence. (Virtual token counters, after Sheng et al., "Fairness in Serving
// Large Language Models", OSDI 2024.)
//
// Below the device cache, an optional KvStore (memtier) keeps blocks in host RAM and on disk. A
// cached block evicted from the device is copied to the host tier first (and from there written
// back to disk). When a request arrives, its prefix chain is looked up in every tier: blocks on
// disk start loading into host memory at once, and host blocks are copied into free device blocks
// while the request waits (speculative prefetch). On admission the chain continues past the
// device blocks into host blocks, which are restored instead of recomputed; a request whose next
// blocks are still loading from disk waits for them (up to max_io_wait) while others go ahead, and
// the blocks that have arrived move on into the device meanwhile, so a chain longer than the host
// tier streams through it.
// Blocks reused twice (write_through_hot_blocks) and a finished request's blocks
// (keep_finished_warm) are copied down ahead of eviction.
//
// Thread contract: a single thread (the worker's step loop) calls every method.
#ifndef STRATA_WORKER_ENGINE_ENGINE_H_
#define STRATA_WORKER_ENGINE_ENGINE_H_

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/thread_pool.h"
#include "common/tier.h"
#include "grammar/grammar.h"
#include "grammar/token_mask.h"
#include "memtier/device_tier.h"
#include "memtier/kv_store.h"
#include "worker/comm/collectives.h"
#include "worker/engine/block_manager.h"
#include "worker/engine/delta_cache.h"
#include "worker/engine/draft_model.h"
#include "worker/engine/ngram_draft.h"
#include "worker/engine/sampler.h"
#include "worker/model/gpu_model_runner.h"
#include "worker/model/model_runner.h"
#include "worker/model/weights.h"

namespace strata {

struct EngineConfig {
  // KV cache size: `num_kv_blocks` blocks, or (when 0) as many as fit in kv_cache_bytes.
  int64_t num_kv_blocks = 0;
  int64_t kv_cache_bytes = int64_t{256} << 20;
  int64_t block_tokens = 16;
  // The longest sequence served (prompt plus output), when less than the model's context and what
  // the KV cache holds (the two it is otherwise); 0: no cap. A cap leaves the cache to
  // more sequences at once, and tells the coordinator which prompts to send elsewhere.
  int64_t max_context_tokens = 0;
  // Most tokens computed in one step (prefill chunks plus decode tokens).
  int64_t max_batch_tokens = 512;
  int64_t max_running_sequences = 64;
  bool enable_prefix_caching = true;
  // With prefix caching: a waiting sequence whose next uncached blocks are being computed by a
  // sequence in this step (a burst of requests sharing a system prompt) waits a step for them to
  // be published and takes them from the cache, rather than computing the same prefix again
  // alongside. Only for at least inflight_prefill_min_tokens of them (or all it has left to
  // compute), counted in whole blocks: waiting delays its first token by a step, and sharing a
  // few tokens (a chat template's opening) does not pay for that. The ones behind it are admitted
  // meanwhile. 0: never waits.
  int64_t inflight_prefill_min_tokens = 32;
  // Names the model in the cache namespace.
  std::string model_name = "model";
  // Threads the model runner splits a step's work across (0: one per core).
  int compute_threads = 0;
  // Host and disk tiers under the device cache (capacities in bytes; 0 leaves a tier out).
  KvStoreConfig tiers;
  // Copy blocks reused twice or more down to host and disk before they are evicted (and, with
  // keep_finished_warm, write a finished request's blocks through to disk too).
  bool write_through_hot_blocks = false;
  // Copy a finished request's blocks to the host tier, warm for the conversation's next turn.
  bool keep_finished_warm = true;
  // Longest a request waits for its blocks to load from disk before computing them instead.
  absl::Duration max_io_wait = absl::Milliseconds(500);
  // Where the model runs: "cpu" (f32, ModelRunner) or "gpu" (GpuModelRunner on the current CUDA
  // device, weights, activations and KV cache in gpu.act; one rank only). Host and disk tiers
  // work under either. Both draw the same tokens (seeded sampling runs on the GPU when no row
  // needs log-probabilities, GpuModelRunner::ForwardSample).
  std::string device = "cpu";
  // The GPU runner's activation type and kernel choices (GpuRunnerOptions' defaults). Its KV cache
  // geometry (num_blocks, block_tokens), max_batch_tokens, max_seqs, max_blocks_per_seq and
  // delta_bytes follow from the fields above and the model: the engine sets those itself.
  GpuRunnerOptions gpu;
  // Benchmarks and profiles of models whose files are not at hand: when not 0, the GPU runner
  // draws random weights from this seed on the GPU (GpuModelRunner::CreateRandom) instead of
  // uploading the engine's weights, which then need their shape fields only (config, heads).
  uint64_t gpu_random_weights_seed = 0;
  // Fine-tunes served as compressed deltas over the base (fine-tune id, delta file), and the
  // memory their loaded deltas may take together (DeltaCache; on the gpu device, the device
  // region that holds their copies too: GpuRunnerOptions::delta_bytes). One rank.
  std::vector<std::pair<std::string, std::string>> fine_tunes;
  int64_t delta_cache_bytes = int64_t{1} << 30;
  // Fine-tunes may be registered and unregistered while serving (RegisterFineTune, a worker's
  // --fine_tune_dir rescan), so the engine serves them even when none is registered at start.
  bool fine_tunes_may_change = false;
  // The vocabulary as bytes (the model's tokenizer's, special tokens empty), for structured
  // output (RequestOptions::grammar). Null: requests with a grammar are refused.
  std::shared_ptr<const TokenTrie> vocabulary;
  // The model's tokenizer as a function (no special tokens added), for speculative decoding's
  // drafts of text a grammar forces: the tokens the model was trained to write for it. Null: the
  // text is split greedily into the vocabulary's longest tokens instead.
  std::function<std::vector<int32_t>(absl::string_view)> tokenize;
  // Memory for the token masks' per-grammar results kept between steps and requests
  // (TokenMasker).
  int64_t grammar_mask_cache_bytes = int64_t{256} << 20;
  // A grammar seen for the first time has its token masks worked out ahead along this many random
  // sentences, on a thread of its own (TokenMasker::Warm), so that its first requests seldom stall
  // a step on a mask. -1: 8 on the gpu device, 0 on the cpu (whose cores run the model).
  int grammar_warm_walks = -1;
  // Speculative decoding by n-gram lookup (NgramIndex): a decoding sequence whose last
  // prompt_lookup_min to prompt_lookup_max tokens occurred earlier in its context proposes up to
  // num_speculative_tokens tokens that followed them there. The step computes its last token and
  // the draft together; the sequence keeps each draft token that its sampler draws there anyway,
  // then the token drawn where the draft went wrong (or one past the draft's end). Each position
  // is sampled with its own draw (seed and position) from the logits it would have had, so the
  // output is what one token a step produces (the same tokens, up to the rounding differences a
  // batch's make-up brings anyway), in fewer steps when drafts are right. Drafts take only what
  // the planned step leaves: its token budget and free KV blocks (never a cached block; a draft
  // never preempts or delays another sequence), on the cpu device no more than keeps a step of up
  // to kMatMulCpuGemvMaxRows tokens one (bit for bit the same sums), on the gpu no more sampled
  // rows than its sampler takes (GpuRunnerOptions::max_seqs). Only while at most
  // speculative_max_batch sequences decode: a larger batch has less compute to spare (-1: 2 on
  // the cpu device, whose GEMV is load-bound past a few rows, 16 on the gpu). A sequence's draft
  // length adapts to how much of its last draft it kept (Sequence::draft_limit). 0: off.
  int num_speculative_tokens = 0;
  int prompt_lookup_min = 2;
  int prompt_lookup_max = 4;
  int speculative_max_batch = -1;
  // Speculative decoding with a draft model (DraftModel): a smaller model with the same tokenizer
  // proposes the drafts instead, its greedy tokens (a grammar's forced text still comes first).
  // The draft runs on the engine's device with a KV cache of draft_kv_cache_bytes (0: room for
  // kDraftKvTokensPerSequence tokens of each of speculative_max_batch sequences, or for as many
  // tokens as the engine's own cache holds where that is less). Not owned; it must outlive the
  // engine. Null: n-gram drafts.
  const ModelWeights* draft_weights = nullptr;
  int64_t draft_kv_cache_bytes = 0;
  // Compute threads of the draft's runner (0: compute_threads). A draft small enough to pay for
  // itself is often fastest on one: its products are too small to split.
  int draft_compute_threads = 0;
  // The draft's own prefix caching (DraftModelConfig::prefix_caching), where the engine's
  // enable_prefix_caching is on too.
  bool draft_prefix_caching = true;
  // Admissions share the engine between tenants (RequestOptions::tenant) as the header says;
  // false: strictly by arrival within a priority.
  bool fair_share = true;
  // The device cache evicts the least recently used cached block of the tenant holding the most
  // published blocks (BlockManager::SetFairEviction), so that one tenant's stream of new prompts
  // pushes out its own cached blocks before another tenant's few; the host and disk tiers evict
  // the same way among the blocks each holds (KvStoreConfig::fair_eviction, which this sets);
  // false: one LRU order for all, in every tier.
  bool fair_cache_eviction = true;
};

// kGrammarEnd: the output is a complete sentence of the request's grammar, which allows nothing
// more. kError: the request could not be served (RequestOutput::error says why; for example its
// fine-tune's delta failed to load).
enum class FinishReason {
  kNone,
  kLength,
  kEos,
  kStopToken,
  kContextLength,
  kCancelled,
  kGrammarEnd,
  kError
};

struct RequestOptions {
  SamplingOptions sampling;
  int64_t max_tokens = 16;
  int64_t min_tokens = 0;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;
  // Top-N log-probabilities of prompt tokens; -1: none. Disables prefix-cache reuse for the
  // request.
  int32_t prompt_logprobs = -1;
  std::string fine_tune_id;
  std::string cache_salt;
  // Tokens already generated elsewhere (failover): context, counted in max_tokens, and the
  // sampler's positions continue after them.
  std::vector<int32_t> resume_tokens;
  // Higher is admitted first; under KV pressure the lowest is preempted first. Ties go by fair
  // share between tenants, then by arrival.
  int32_t priority = 0;
  // Whose request this is, for fair sharing (at most 128 bytes; empty is a tenant too), and the
  // tenant's weight in (0, 1000]: a tenant of weight 2 is admitted as if served half what it was.
  std::string tenant;
  double tenant_weight = 1;
  // Structured output: the generated text follows this grammar. Each step, tokens whose bytes the
  // grammar does not allow next get probability zero (before penalties, temperature and
  // truncation, so log-probabilities are of the constrained distribution); EOS and stop tokens
  // are allowed only where the text so far is complete, and then even before min_tokens when
  // nothing else is. Generation finishes (kGrammarEnd) once the grammar allows nothing more.
  // Such rows are sampled on the host. Needs EngineConfig::vocabulary.
  std::shared_ptr<const Grammar> grammar;
  // Text before the output that the grammar covers (it ends the prompt): the matcher starts
  // after it.
  std::string grammar_prefix;
};

// What one step produced for one request.
struct RequestOutput {
  std::string request_id;
  std::vector<SampledToken> tokens;
  // Once, when the prompt finishes prefilling (if requested): positions 1 .. prompt_len - 1.
  std::vector<SampledToken> prompt_logprobs;
  FinishReason finish = FinishReason::kNone;
  int64_t num_prompt_tokens = 0;
  // Prompt tokens whose KV came from the prefix cache, in all and by the tier each block was in
  // when the request arrived.
  int64_t num_cached_prompt_tokens = 0;
  std::array<int64_t, kNumTiers> num_cached_prompt_tokens_by_tier{};
  // Generated so far, counting resume tokens.
  int64_t num_generated_tokens = 0;
  // With FinishReason::kError.
  absl::Status error;
};

// What an engine has done for one tenant (fair sharing): tokens computed for it (prompt tokens not
// taken from the cache, each decode step's input, draft tokens, recomputation after preemption)
// and tokens generated, since the engine started (past 4096 tenants seen, the idle ones are
// forgotten and start again from 0, keeping their owner ids), and its service: those tokens,
// each divided by
// the tenant's weight when counted (what admissions order by).
struct TenantService {
  std::string name;
  double weight = 1;
  double service = 0;
  int64_t computed_tokens = 0;
  int64_t generated_tokens = 0;
  // Its requests admitted (the first time each), and the seconds they waited in the queue before.
  int64_t admissions = 0;
  double queue_wait_seconds = 0;
};

struct EngineStats {
  int64_t num_running = 0;
  int64_t num_waiting = 0;
  int64_t num_decode = 0;
  int64_t num_pending_prefill_tokens = 0;
  int64_t num_free_blocks = 0;
  int64_t num_total_blocks = 0;
  int64_t num_preemptions = 0;
  // Sequences that waited for a prefix another sequence was computing
  // (inflight_prefill_min_tokens), counted once each, and the prompt tokens they then took from the
  // cache instead of computing.
  int64_t num_inflight_prefix_waits = 0;
  int64_t num_inflight_prefix_tokens = 0;
  // Lower tiers, when configured.
  KvStoreStats tiers;
  // Fine-tune deltas, when any is registered, and on the gpu device their copies in GPU memory.
  DeltaCacheStats deltas;
  GpuDeltaStats gpu_deltas;
  // Structured output: tokens sampled under a grammar, the host time their masks took, and the
  // masker's kept results (TokenMasker).
  int64_t num_structured_tokens = 0;
  double grammar_mask_seconds = 0;
  TokenMaskerStats grammar_masks;
  // Speculative decoding: draft tokens computed, and those accepted (each an output token that
  // took no step of its own).
  int64_t num_draft_tokens = 0;
  int64_t num_accepted_draft_tokens = 0;
  // With a draft model: its cache and the time spent proposing (DraftModel::Stats).
  bool has_draft_model = false;
  DraftModelStats draft_model;
  // KV blocks copied out to other workers, and copied in from them and stored (ExportKvBlocks,
  // ImportKvBlocks).
  int64_t num_exported_kv_blocks = 0;
  int64_t num_imported_kv_blocks = 0;
  // Each tenant seen (fair sharing), by name, with its sequences now.
  struct Tenant : TenantService {
    int64_t running = 0;
    int64_t waiting = 0;
    // KV blocks kept for it, by tier (Tier's order): published device blocks (in use or
    // cached), host and disk blocks (lower tiers, when configured).
    std::array<int64_t, kNumTiers> kv_blocks = {};
  };
  std::vector<Tenant> tenants;
};

class Engine {
 public:
  ~Engine();
  // `weights` and `comm` are not owned and must outlive the engine.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const ModelWeights* weights,
                                                        Collectives* comm, EngineConfig config);

  // Queues a request. INVALID_ARGUMENT naming the field for a bad prompt or option, or a prompt
  // (with its resume tokens) longer than the KV cache holds; ALREADY_EXISTS for a live request id;
  // NOT_FOUND for a fine_tune_id this engine does not serve. A fine-tune's delta starts loading
  // now; the request waits for it (others go ahead).
  absl::Status AddRequest(const std::string& request_id, std::vector<int32_t> prompt,
                          RequestOptions options);
  // Cancels a live request, freeing its blocks now; the next Step reports it finished with
  // kCancelled. False when no live request has this id.
  bool Cancel(const std::string& request_id);
  // Runs one batch. Outputs for every request that produced tokens or finished.
  absl::StatusOr<std::vector<RequestOutput>> Step();
  bool HasWork() const { return !running_.empty() || !waiting_.empty() || !cancelled_.empty(); }
  // True after a Step that could do nothing but wait for disk loads: the caller may sleep until
  // the SetIoNotify callback runs (or a new request arrives) instead of stepping again at once.
  bool WaitingForIo() const { return waiting_for_io_; }
  // `notify` runs on the disk tier's I/O thread when loads finish (KvStore::SetNotify); null
  // stops it. Callable from any thread; a no-op without lower tiers.
  void SetIoNotify(std::function<void()> notify) {
    if (deltas_ != nullptr) deltas_->SetNotify(notify);
    if (store_ != nullptr) store_->SetNotify(std::move(notify));
  }
  // For shutdown, once no sequence runs: writes the host tier to disk (KvStore::Persist), then the
  // device cache's blocks that no lower tier holds, least recently used first, through the host
  // tier a host tier's worth at a time, so that an engine started later on the same disk file
  // begins with this one's cache. Stops starting copies at `deadline` or once `*cancel` (if given)
  // is true. Returns the blocks written to disk; 0 without a disk tier.
  int64_t PersistKv(absl::Time deadline, const std::atomic<bool>* cancel = nullptr);
  // `with_tenants`: fill EngineStats::tenants too (a pass over every tenant; the load reports,
  // sent as often as every 5 ms, leave it out).
  EngineStats Stats(bool with_tenants = true) const;
  // Block changes in every tier since the last call, for the coordinator's routing index.
  std::vector<BlockEvent> DrainBlockEvents();
  // The time each request admitted since the last call waited in the queue, from AddRequest to
  // its first admission (a preempted sequence's later waits are not counted), in seconds.
  std::vector<double> DrainQueueWaits();
  // Every block in every tier now (as kStored events); with DrainBlockEvents called at the same
  // point, a consistent starting inventory for a new event subscriber.
  std::vector<BlockEvent> BlockInventory() const;
  // The lower tiers, or null when none is configured.
  const KvStore* kv_store() const { return store_.get(); }
  int64_t block_tokens() const { return config_.block_tokens; }
  // The longest sequence this engine runs: the model's context, or what the KV cache holds when
  // that is less (every token of a sequence must be in the cache at once), or
  // EngineConfig::max_context_tokens when that is less still. What workers report as their
  // max_context_tokens.
  int64_t MaxContextTokens() const {
    const int64_t held = std::min<int64_t>(weights_->config.max_position_embeddings, CacheTokens());
    return config_.max_context_tokens > 0 ? std::min(held, config_.max_context_tokens) : held;
  }
  const ModelConfig& model_config() const { return weights_->config; }
  // Bytes of one KV block (all layers, K and V, every tensor-parallel rank's share).
  int64_t kv_block_bytes() const {
    const int64_t f32 = KvCacheStorage::BlockBytes(*weights_, config_.block_tokens);
    return config_.device == "gpu" ? f32 / 4 * DTypeBytes(config_.gpu.act)
                                   : f32 * weights_->world_size;
  }
  int64_t num_kv_blocks() const { return blocks_.num_blocks(); }
  // The fine-tunes this engine serves, sorted, and each one's revision (DeltaCache::Revision).
  std::vector<std::string> FineTuneIds() const {
    return deltas_ != nullptr ? deltas_->Ids() : std::vector<std::string>{};
  }
  std::string FineTuneRevision(const std::string& id) const {
    return deltas_ != nullptr ? deltas_->Revision(id) : std::string();
  }
  // FineTuneIds with each one's revision, at one moment.
  std::vector<std::pair<std::string, std::string>> FineTuneRevisions() const {
    return deltas_ != nullptr ? deltas_->Revisions()
                              : std::vector<std::pair<std::string, std::string>>{};
  }
  bool ServesFineTunes() const { return deltas_ != nullptr; }
  // Changes to the registered fine-tunes since start (DeltaCache; any thread).
  int64_t FineTunesGeneration() const {
    return deltas_ != nullptr ? deltas_->GetStats().num_registry_changes : 0;
  }
  bool HasFineTune(const std::string& id) const { return deltas_ != nullptr && deltas_->Has(id); }
  // Fine-tunes registered, replaced and unregistered while serving (any thread; see DeltaCache:
  // sequences running on a delta keep it, waiting ones of a fine-tune that changed fail ABORTED,
  // which a coordinator retries). `replace`: `path` takes the place of what `id` was, and on an
  // error that stays. FAILED_PRECONDITION without fine-tunes (EngineConfig::fine_tunes_may_change).
  absl::Status RegisterFineTune(const std::string& id, const std::string& path, bool replace);
  absl::Status UnregisterFineTune(const std::string& id);
  const EngineConfig& config() const { return config_; }

  // Copies of cached KV blocks between workers (worker/server's FetchKvBlocks). The layout of one
  // block as copied, the device cache's own (f32 on the cpu device, every rank's share under
  // tensor parallelism; the GPU runner's activation type on the gpu), and the fingerprint of the
  // weights the blocks were computed with (BaseFingerprint; empty for random weights). Without
  // prefix caching the layout is invalid (num_segments 0) and nothing is copied either way.
  const KvBlockLayout& kv_transfer_layout() const { return transfer_layout_; }
  const std::string& model_fingerprint() const { return model_fingerprint_; }
  struct KvBlockCopy {
    BlockKey key;
    // kv_transfer_layout().block_bytes(), that layout. A string, so that it moves into and out of
    // a protobuf message (KvBlockData.payload) without a copy.
    std::string payload;
    absl::Span<uint8_t> bytes() {
      return {reinterpret_cast<uint8_t*>(payload.data()), payload.size()};
    }
    absl::Span<const uint8_t> bytes() const {
      return {reinterpret_cast<const uint8_t*>(payload.data()), payload.size()};
    }
  };
  // What a request would find here of its prompt's KV: the chain hashes of its full blocks before
  // its last token's (which is computed whatever is cached), in the namespace its model,
  // fine-tune and cache salt make, and how many of them, from the first, some tier here holds.
  // Nothing (no hashes) without prefix caching, for a request that wants prompt
  // log-probabilities, or for a fine-tune not served here. Queues nothing.
  struct PromptBlocks {
    uint64_t cache_namespace = 0;
    std::vector<BlockHash> hashes;
    int64_t held = 0;
  };
  PromptBlocks LookUpPrompt(absl::Span<const int32_t> prompt, const RequestOptions& options) const;
  // How many leading `hashes` a request would find here now (PromptBlocks::held, again): the
  // device's run, the host and disk tiers' run after it, and the device's run after that, as
  // admission takes them.
  int64_t HeldPrefix(absl::Span<const BlockHash> hashes) const;
  // Copies of the leading blocks of `hashes`, each from the device or else the host tier, in
  // order: stops at the first held in neither, and before the copies pass max_bytes (after one
  // at least). Each one copied becomes the most recently used in its tier.
  std::vector<KvBlockCopy> ExportKvBlocks(absl::Span<const BlockHash> hashes, int64_t max_bytes);
  // For an export that stopped short: starts loading into the host tier the leading blocks of
  // `hashes` that are on disk only (KvStore::Prefetch, some at a time), so that ExportKvBlocks
  // finds them there once they land (PollIo). Returns whether the first of `hashes` is in host
  // memory or on its way there (loading, on disk, or being written to disk, to load on a later
  // call): false when the chain ends here, and without a disk tier.
  bool PrefetchForExport(absl::Span<const BlockHash> hashes);
  // Lands finished disk loads and writes (Step does it too), for a caller with no sequences to
  // step.
  void PollIo();
  // Stores blocks copied from another worker as cached device blocks of `tenant`, which a request
  // for the prompt then takes instead of computing them: blocks[i] must be
  // expected.hashes[expected.held + i] in expected.cache_namespace with a payload of the layout's
  // size. The first that is not, or that finds no device block to take (evicting cached blocks
  // as computing it would), ends the import. Blocks on the device already are skipped. Nothing
  // is stored when the blocks before them (expected.held) are no longer all held here
  // (HeldPrefix). Returns how many were stored.
  int64_t ImportKvBlocks(const PromptBlocks& expected, const std::string& tenant,
                         absl::Span<const KvBlockCopy> blocks);
  // An import in several calls (copies stored as they arrive): the prompt's blocks before the
  // next copy, held on the device or pinned in host memory from the first call on, so that none
  // leaves between calls and later calls need not look the head up again. Each call continues
  // where the last stopped (expected.held is the blocks before its copies, as without a lease).
  // EndImport releases it; every lease must reach it.
  struct ImportLease {
    std::vector<int32_t> held;
    std::vector<BlockHash> pinned;
    // Leading blocks of the prompt it holds (0 before the first call).
    int64_t covered = 0;
    bool started = false;
  };
  int64_t ImportKvBlocks(const PromptBlocks& expected, const std::string& tenant,
                         absl::Span<const KvBlockCopy> blocks, ImportLease* lease);
  void EndImport(ImportLease* lease);

 private:
  struct TenantShare : TenantService {
    int64_t live = 0;  // its sequences waiting or running
    // Its engine, told when `live` falls to 0 (TenantIdle).
    Engine* engine = nullptr;
    int32_t id = 0;  // the owner of the blocks it publishes (BlockManager), 1 up
    // For each priority it has sequences waiting at, the queue order of its first there (its
    // entry in the engine's tenant_heads_).
    std::vector<std::pair<int32_t, int64_t>> heads;
  };
  // A waiting sequence's place: higher priorities first, then queue order (arrival; a preempted
  // sequence goes ahead of its equals, below any order given on arrival).
  struct WaitKey {
    int32_t priority = 0;
    int64_t order = 0;
    bool operator<(const WaitKey& o) const {
      return priority != o.priority ? priority > o.priority : order < o.order;
    }
  };
  // The same place within its tenant's queue: by priority, then tenant, then queue order, so that
  // each tenant's waiting sequences of one priority are one run (fair sharing takes the runs'
  // heads).
  struct TenantWaitKey {
    int32_t priority = 0;
    const TenantShare* share = nullptr;
    int64_t order = 0;
    bool operator<(const TenantWaitKey& o) const {
      if (priority != o.priority) return priority > o.priority;
      if (share != o.share) return std::less<const TenantShare*>()(share, o.share);
      return order < o.order;
    }
  };
  // A tenant's queue within a priority, by its head: least served first, then queue order.
  struct TenantHead {
    int32_t priority = 0;
    double service = 0;
    int64_t order = 0;
    TenantShare* share = nullptr;
    bool operator<(const TenantHead& o) const {
      if (priority != o.priority) return priority > o.priority;
      if (service != o.service) return service < o.service;
      if (order != o.order) return order < o.order;
      return std::less<TenantShare*>()(share, o.share);
    }
  };
  struct Sequence {
    std::string id;
    int64_t arrival = 0;
    // Its place in waiting_ (and waiting_by_tenant_), while it waits.
    WaitKey wait_key;
    // When AddRequest queued it; cleared at its first admission (DrainQueueWaits).
    std::optional<absl::Time> queued_at;
    // While it waits: the prompt tokens it would compute, less those cached when it was queued or
    // last tried (its part of waiting_prefill_tokens_).
    int64_t pending_prefill = 0;
    // The engine's live_ids_, which it leaves when destroyed (if its id still names it there).
    absl::flat_hash_map<std::string, Sequence*>* live_ids = nullptr;
    std::vector<int32_t> tokens;  // prompt, then generated (resume tokens included)
    int64_t prompt_len = 0;
    int64_t num_generated = 0;
    int64_t num_computed = 0;  // tokens whose K/V are in the cache
    int64_t num_cached_prompt = 0;
    std::vector<int32_t> block_table;
    std::vector<BlockHash> hashes;  // chain hashes of the full blocks published so far
    // With inflight_prefill_min_tokens, from admission until it is computed: the chain hashes of
    // every full block of `tokens` then (the blocks past `hashes` are in flight: waiting sequences
    // with the same prefix wait for them).
    std::vector<BlockHash> planned_hashes;
    // Set once the sequence has waited for an in-flight prefix; the cached blocks it had then;
    // set once the tokens it took from the cache after the wait are counted.
    bool waited_for_prefix = false;
    int64_t cached_before_wait = 0;
    bool prefix_wait_counted = false;
    // Chain hashes of all full blocks of `tokens` while waiting (computed once per admission
    // attempt; Stats uses them to leave cached blocks out of the pending prefill).
    mutable std::vector<BlockHash> waiting_hashes;
    // For each of the prompt's leading cached blocks, the tier it was in when the request arrived
    // (usage reports and prefetch coverage count by it).
    std::vector<Tier> arrival_tiers;
    // Set while the sequence waits for blocks loading from disk.
    absl::Time io_wait_since = absl::InfiniteFuture();
    std::array<int64_t, kNumTiers> num_cached_by_tier{};
    uint64_t cache_namespace = 0;
    RequestOptions options;
    PenaltyState penalties;
    // The fine-tune's delta, pinned in deltas_ while the sequence runs (from admission until it
    // finishes, is preempted or is cancelled), and the revision its cache namespace was made
    // with (a delta replaced before admission does not match it).
    const DeltaWeights* delta = nullptr;
    std::string fine_tune_revision;
    // Its tenant's entry in tenants_, where it counts as live while it exists.
    TenantShare* share = nullptr;
    ~Sequence() {
      if (share != nullptr && --share->live == 0) share->engine->TenantIdle(share);
      if (live_ids != nullptr) {
        auto it = live_ids->find(id);
        if (it != live_ids->end() && it->second == this) live_ids->erase(it);
      }
    }
    bool prompt_logprobs_sent = false;
    std::vector<SampledToken> prompt_logprobs;
    // Where the output is in options.grammar, when it has one.
    std::optional<GrammarMatcher> matcher;
    // Speculative decoding: the most draft tokens the next draft may have (-1 before any:
    // num_speculative_tokens): all of them after a draft that kept half its tokens or more, else
    // one more than it kept. A text the drafts keep missing costs one draft token a step.
    int64_t draft_limit = -1;
    // Where each of its tokens occurred, for its n-gram lookups (built on its first draft).
    NgramIndex ngram_index;
  };
  struct Chunk {
    Chunk(Sequence* s, int64_t begin, int64_t n) : seq(s), start(begin), count(n) {}
    Sequence* seq;
    int64_t start;
    int64_t count;  // tokens computed, the draft's included
    // Speculative decoding: the draft computed after the sequence's last token (count is then
    // 1 + its size), and for each draft token i, the sequence's penalties (when its options
    // apply any) and grammar matcher as they would stand with draft tokens 0..i taken.
    std::vector<int32_t> draft;
    std::vector<PenaltyState> draft_penalties;
    std::vector<GrammarMatcher> draft_matchers;
  };

  enum class AdmitResult { kAdmitted, kNoRoom, kWaitingForIo, kWaitingForPrefix };

  Engine(const ModelWeights* weights, Collectives* comm, EngineConfig config, int64_t num_blocks);
  // Queues `grammar` for warming if this engine has not seen it (main thread).
  void WarmGrammar(const std::shared_ptr<const Grammar>& grammar);
  void WarmLoop();
  absl::Status OpenTiers();
  // Gives `s` the blocks it needs to hold num_tokens; false, taking none, when too few are
  // available (free_only: free ones, never a cached block that could be reused).
  bool EnsureBlocks(Sequence* s, int64_t num_tokens, bool free_only = false);
  void ReleaseBlocks(Sequence* s);
  // Unpins the sequence's delta, if it holds one, as it stops running for now (preempted, or not
  // admitted): unless its fine-tune changed since it began, which it then keeps for its end.
  void PauseDelta(Sequence* s);
  // Unpins the sequence's delta, if it holds one.
  void ReleaseDelta(Sequence* s);
  void Preempt(Sequence* s);
  AdmitResult Admit(Sequence* s, int64_t budget, std::vector<Chunk>* plan);
  // Fills in ch->draft (and what goes with it) for ch's sequence, which decodes: NgramIndex's
  // tokens, at most `limit` of them and no more than the request's max_tokens and the context
  // leave room for, cut before the first token that would end the sequence or that its grammar
  // does not allow there, and to the free KV blocks (never a cached one).
  // `proposed`: with a draft model, what Step found for it (the grammar's forced text, else the
  // draft model's tokens); null: the forced text, else n-gram lookup.
  void ProposeDraft(int64_t limit, Chunk* ch, const std::vector<int32_t>* proposed = nullptr);
  // `limit` cut to the sequence's own draft length, what its max_tokens and the context leave, and
  // the room for the draft's K/V in its blocks and the free ones.
  int64_t DraftLimit(const Sequence& s, int64_t limit) const;
  // Adds the blocks `s` has yet to publish of its planned chain to inflight_.
  void AddInflight(const Sequence& s);
  // On arrival: where each leading block of the prompt is, and the speculative prefetch.
  void LookUpAndPrefetch(Sequence* s);
  // Copies the host blocks hashes[from, to) into device blocks, in order, stopping at the first
  // that is not ready in host or finds no device block (`free_only`: only blocks that hold
  // nothing). The host copies are pinned first: making room on the device puts evicted blocks into
  // the host tier, which must not push out the ones still to come. Returns the device blocks,
  // published and referenced. `speculative`: a prefetch promotion, counted for accuracy.
  std::vector<int32_t> RestoreRun(const Sequence& s, absl::Span<const BlockHash> hashes,
                                  int64_t from, int64_t to, bool free_only, bool speculative);
  // A request whose next blocks are loading from disk waits for them, up to max_io_wait; true
  // while it goes on waiting. Meanwhile what has arrived moves on up into the device (as cached
  // blocks), so that a chain longer than the host tier streams through it; the chain's device
  // blocks are held while room is made, so only other blocks are evicted.
  bool WaitForLoads(Sequence* s, absl::Span<const BlockHash> hashes, int64_t on_device,
                    int64_t in_host_end, int64_t limit);
  // Copies device block `block` (published as `key`) to the host tier; `to_disk`: on to disk now.
  // `owner`: the tenant (BlockManager owner) the block is kept for in the lower tiers.
  void PutDown(int32_t block, BlockKey key, bool to_disk, int32_t owner);
  // Copies the sequence's published blocks to the host tier (a finished turn kept warm).
  void KeepWarm(const Sequence& s);
  // The tenant entry for a new sequence of `o`'s tenant (counted live by the caller's Sequence);
  // a tenant with nothing live here is raised to the least service of those with work.
  TenantShare* ShareFor(const RequestOptions& o);
  // Counts tokens computed and generated for `s`'s tenant (its heads move with its service).
  void Charge(const Sequence& s, int64_t computed, int64_t generated);
  // Sets `t`'s head at `priority` to its first sequence waiting there now (none: no entry).
  void UpdateHead(TenantShare* t, int32_t priority);
  // Queues `s` in waiting_ behind every sequence of higher or equal priority (`ahead_of_equals`:
  // in front of equal ones, for a preempted sequence that was admitted before them).
  void Enqueue(std::unique_ptr<Sequence> s, bool ahead_of_equals);
  // Takes waiting `s` out of the queue.
  std::unique_ptr<Sequence> Dequeue(const Sequence& s);
  const std::vector<BlockHash>& WaitingHashes(const Sequence& s) const;
  // The tokens waiting `s` would compute if admitted now (the cached prefix left out), and the
  // same kept in s->pending_prefill and waiting_prefill_tokens_.
  int64_t PendingPrefill(const Sequence& s) const;
  void RefreshPendingPrefill(Sequence* s);
  void PublishFullBlocks(Sequence* s);
  // kEos, kStopToken, kLength or kContextLength when `s` ends with `token` (its last): at
  // MaxContextTokens (the model's context, what the KV cache holds, or the configured cap).
  FinishReason CheckStop(const Sequence& s, int32_t token) const;
  // The tokens the KV cache holds (every block).
  int64_t CacheTokens() const { return blocks_.num_blocks() * config_.block_tokens; }
  // kEos or kStopToken when `token` ends `s` (EOS unless ignore_eos, a stop token), else kNone.
  FinishReason EndOf(const Sequence& s, int32_t token) const;
  // Appends the tokens `s` may not sample as its output token number `num_generated` (0-based):
  // EOS and its stop tokens until min_tokens.
  void AppendBanned(const Sequence& s, int64_t num_generated, std::vector<int32_t>* out) const;
  // The tokens a grammar in state `matcher` allows next (TokenMasker::Allowed), or
  // INVALID_ARGUMENT when it has become too ambiguous to follow (GrammarMatcher::Overloaded).
  // Thread-safe.
  absl::Status ComputeMask(const GrammarMatcher& matcher, std::vector<uint8_t>* allowed) const;
  // Sets the logits of the tokens `allowed` leaves out to -inf (EOS, unless ignore_eos, and stop
  // tokens count as allowed where the text is complete) and appends to `banned` the tokens
  // AppendBanned would, unless nothing else would be left. INVALID_ARGUMENT when no token is
  // allowed at all (a vocabulary without the bytes the grammar needs).
  // (`matcher` and `num_generated`: the sequence's, or as they would stand after some draft
  // tokens.)
  absl::Status ApplyMask(const Sequence& s, const GrammarMatcher& matcher, int64_t num_generated,
                         absl::Span<const uint8_t> allowed, absl::Span<float> row,
                         std::vector<int32_t>* banned) const;

  const ModelWeights* weights_;
  EngineConfig config_;
  // One of the two: the CPU runner with its host KV cache, or the GPU runner (which owns its
  // cache).
  std::unique_ptr<ModelRunner> runner_;
  std::unique_ptr<KvCacheStorage> kv_;
  // The CPU caches of every rank, rank 0's first: kv_'s alone, or under tensor parallelism the
  // group's (GroupKvCaches).
  std::vector<KvCacheLayers> caches_;
  std::unique_ptr<GpuModelRunner> gpu_;
  // Threads for host work between steps (prompt log-probabilities, sampling on the host): the CPU
  // runner's own, or, on the GPU, compute_threads of the engine's.
  std::unique_ptr<ThreadPool> host_pool_;
  ThreadPool* HostPool() const { return runner_ != nullptr ? runner_->pool() : host_pool_.get(); }
  // The most rows the GPU runner samples in a step (GpuRunnerOptions::max_seqs as Create sets it,
  // which the runner clamps to max_batch_tokens).
  int64_t GpuSampledRows() const {
    return std::min(config_.max_running_sequences, config_.max_batch_tokens);
  }
  BlockManager blocks_;
  // The device cache as a tier (with prefix caching), and the layout its blocks are copied in.
  std::unique_ptr<DeviceTier> device_tier_;
  KvBlockLayout transfer_layout_;
  std::string model_fingerprint_;
  int64_t num_exported_kv_blocks_ = 0;
  int64_t num_imported_kv_blocks_ = 0;
  std::unique_ptr<KvStore> store_;
  std::unique_ptr<DeltaCache> deltas_;
  std::unique_ptr<DraftModel> draft_;  // EngineConfig::draft_weights
  absl::Time draft_error_logged_ = absl::InfinitePast();
  bool waiting_for_io_ = false;
  int64_t next_arrival_ = 0;
  int64_t num_preemptions_ = 0;
  int64_t num_inflight_prefix_waits_ = 0;
  int64_t num_inflight_prefix_tokens_ = 0;
  // During a step's admissions: chain hashes of the prompt blocks that the sequences planned so
  // far have yet to publish. While admissions go on, every chunk planned is its prompt's last (a
  // chunk cut short takes the rest of the budget, which ends them), so all of these are published
  // at the end of this step.
  absl::flat_hash_set<BlockHash> inflight_;
  // By tenant name; entries stay put (sequences point at theirs), and are declared before the
  // sequences, which count themselves out of theirs when destroyed.
  absl::node_hash_map<std::string, TenantShare> tenants_;
  // Each tenant name's owner id (BlockManager, KvStore), kept when tenants_ forgets an idle
  // tenant, so that a tenant that comes back finds its cached blocks still its own; past
  // kMaxTenantIds names, those holding no block are forgotten.
  static constexpr size_t kMaxTenantIds = 65536;
  static constexpr size_t kMaxTenants = 4096;  // idle ones forgotten past it (ShareFor)
  size_t tenant_ids_prune_at_ = kMaxTenantIds;
  size_t tenants_prune_at_ = kMaxTenants;
  absl::flat_hash_map<std::string, int32_t> tenant_ids_;
  int32_t TenantId(const std::string& name);
  // From 1: owner 0 is no tenant (blocks a worker's disk tier recovered at start, say).
  int32_t next_tenant_id_ = 1;
  // The tenants with sequences waiting or running by service (ShareFor starts an arriving tenant
  // level with the least of them), and the most any tenant has had.
  absl::btree_set<std::pair<double, TenantShare*>> live_by_service_;
  double most_service_ = 0;
  // `t` has no sequences left.
  void TenantIdle(TenantShare* t);
  // Waiting and running sequences by request id (declared before them: they leave it when
  // destroyed; a cancelled one leaves it at once).
  absl::flat_hash_map<std::string, Sequence*> live_ids_;
  // The waiting sequences in admission order without fair sharing, and the same by tenant (each
  // arrival, cancellation and admission costs O(log waiting), not a pass over the queue).
  absl::btree_map<WaitKey, std::unique_ptr<Sequence>> waiting_;
  absl::btree_set<TenantWaitKey> waiting_by_tenant_;
  // Each tenant's queue within each priority, by its head (fair sharing's admission order).
  absl::btree_set<TenantHead> tenant_heads_;
  // The waiting sequences' pending_prefill, summed (EngineStats::num_pending_prefill_tokens: a
  // load report costs no pass over the queue).
  int64_t waiting_prefill_tokens_ = 0;
  std::vector<double> queue_waits_;  // DrainQueueWaits
  // Each step also estimates this many waiting sequences again, in turn, from after this one.
  static constexpr size_t kRefreshPerStep = 16;
  WaitKey refresh_after_{std::numeric_limits<int32_t>::max(), std::numeric_limits<int64_t>::min()};
  int64_t next_wait_order_ = 0;                     // arrivals count up from 0,
  int64_t next_ahead_order_ = -1;                   // preempted sequences down from -1
  std::vector<std::unique_ptr<Sequence>> running_;  // in admission order
  std::vector<std::unique_ptr<Sequence>> cancelled_;
  std::vector<float> logits_;
  // Over config_.vocabulary, when there is one.
  std::unique_ptr<TokenMasker> masker_;
  int64_t num_structured_tokens_ = 0;
  int64_t num_draft_tokens_ = 0;
  int64_t num_accepted_draft_tokens_ = 0;
  // Grammars seen (their addresses, main thread only), and the warming thread's queue.
  // (std:: primitives, which TSAN sees, unlike Debian's uninstrumented absl::Mutex.)
  absl::flat_hash_set<const Grammar*> warmed_;
  std::mutex warm_mu_;
  std::condition_variable warm_cv_;
  std::deque<std::shared_ptr<const Grammar>> warm_queue_;  // guarded by warm_mu_
  bool warm_stop_ = false;                                 // guarded by warm_mu_
  std::atomic<bool> warm_cancel_{false};                   // set with warm_stop_: ends a warming
  std::thread warm_thread_;
  // Summed by the host threads that mask rows.
  mutable std::atomic<int64_t> grammar_mask_ns_{0};
};

}  // namespace strata

#endif  // STRATA_WORKER_ENGINE_ENGINE_H_
