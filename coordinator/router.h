// Router: picks the worker that serves a request cheapest. A pure function of the request's block
// hashes, the block index and the workers' loads, so that it is tested against tables and replayed
// by capacity planning without a network.
//
// Cost model (docs/ARCHITECTURE.md, "Routing"). For each candidate worker w:
//   credit(w) = w_device * overlap_device + w_host * overlap_host + w_disk * overlap_disk (blocks)
//   cost(w)   = max(0, prompt_blocks + queued_prefill_blocks(w) - credit(w))
//               + decode_weight * decode_sequences(w)
//               + cold_fine_tune_blocks   (a fine-tune request, when w does not hold its delta)
// where overlap_t counts the blocks of the longest cached prefix of the prompt on w whose fastest
// copy is in tier t. Lower cost wins.
//
// Copies between workers (RouteRequest::fetch_sources). A worker may copy the prompt's blocks it
// lacks from another worker that holds them on the device or in host memory (Worker.FetchKvBlocks)
// instead of computing them, so its credit also counts
//   fetch_weight * (source_blocks - own_blocks)     (when that is at least fetch_min_blocks)
// where own_blocks is the length of its own cached prefix and source_blocks the longest device
// and host prefix among the other sources, as their events reported it (a block of a request
// just routed there, still being computed, cannot be copied yet). The decision names that source
// for the chosen worker. A worker whose queue is long thus hands a prompt it holds to an idle one
// at the cost of a copy rather than of a recomputation, and a drained worker's cache still serves
// its prompts.
//
// Balance. The load terms move a request off the worker that holds its prefix only when that
// worker's queue costs more than recomputing the prefix elsewhere, so a busy worker never sheds
// work into expensive misses (which under load would cascade into cache thrash). Two rules keep
// workers balanced beyond that:
// - Hot prefixes replicate: a prefix that starts a share s of recent requests (`prefix_share`,
//   measured by the caller over a window of requests) needs about ceil(s * n) of the n workers.
//   While fewer hold it, the request goes to the least loaded worker that lacks it, if that one has
//   fewer requests in flight than the cheapest; once enough hold it, cost and load decide. A
//   conversation's history or one tenant's prompt among many has a small share, so it stays where
//   its cache is; queueing alone never triggers replication (which under load would cascade).
// - A guard against gross imbalance: a worker whose in-flight count would exceed
//   max(mean * (1 + balance_tolerance), mean + balance_slack) is passed over while another is under
//   that limit.
// Ties go to fewer in-flight requests, then to an order rotated by `tie_break`, so idle workers
// share cold traffic evenly.
#ifndef STRATA_COORDINATOR_ROUTER_H_
#define STRATA_COORDINATOR_ROUTER_H_

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/hash.h"
#include "common/tier.h"
#include "coordinator/block_index.h"

namespace strata {

struct RouterConfig {
  // Credit per cached block, by tier (a block on a slower tier saves less work).
  std::array<double, kNumTiers> tier_weights = {1.0, 0.75, 0.25};
  // Cost of one sequence in decode, in prefill blocks.
  double decode_weight = 1.0;
  // Cost, in prefill blocks, of sending a fine-tune's request to a worker whose memory does not
  // hold the fine-tune's delta (it loads it first, and may evict another tenant's).
  double cold_fine_tune_blocks = 4.0;
  double balance_tolerance = 1.0;
  double balance_slack = 4.0;
  bool replicate_hot_prefixes = true;
  // Round-robin instead of cost (a baseline for benchmarks): the candidate at tie_break modulo the
  // number of candidates.
  bool round_robin = false;
  // Credit per block a worker can copy from another (above); 0: no copies.
  double fetch_weight = 0.9;
  int64_t fetch_min_blocks = 2;
};

struct WorkerLoadView {
  WorkerSlot slot = 0;
  // Requests routed to it and not finished (this coordinator's count, or the worker's own report
  // of running plus waiting sequences, whichever is larger).
  int64_t inflight_requests = 0;
  // Prompt blocks still to prefill on it.
  int64_t queued_prefill_blocks = 0;
  int64_t decode_sequences = 0;
};

struct RouteRequest {
  // Chain hashes of the prompt's full blocks.
  absl::Span<const BlockHash> prefix_hashes;
  // Blocks of the whole prompt (counting a trailing partial block).
  int64_t prompt_blocks = 0;
  // Rotates the order among equally good candidates.
  uint64_t tie_break = 0;
  // Fraction of recent requests whose prompt starts with the same first block, in [0, 1].
  double prefix_share = 0;
  // A fine-tune's request: the candidates whose load reports say its delta is resident. The
  // others cost cold_fine_tune_blocks more.
  bool fine_tune = false;
  absl::Span<const WorkerSlot> fine_tune_resident;
  // Workers a candidate may copy the prompt's KV blocks from (candidates or not: a draining
  // worker's cache still serves copies), and whether a candidate (first) can copy a source's
  // blocks (null: every one can); a candidate is credited copies only from a source it can copy.
  absl::Span<const WorkerSlot> fetch_sources;
  std::function<bool(WorkerSlot, WorkerSlot)> can_copy;
};

struct WorkerScore {
  WorkerSlot slot = 0;
  std::array<int64_t, kNumTiers> overlap_blocks = {0, 0, 0};
  double credit = 0;
  double cost = 0;
  bool over_balance_limit = false;
  // The worker it would copy fetch_blocks blocks from (credited above), or -1; the last
  // fetch_disk_blocks of them are on that worker's disk tier (it loads them before sending).
  int64_t fetch_source = -1;
  int64_t fetch_blocks = 0;
  int64_t fetch_disk_blocks = 0;
};

struct RouteDecision {
  // Index into the candidates; -1 when there were none.
  int chosen = -1;
  // The choice replicates a hot prefix (it was not the cheapest).
  bool replicated = false;
  // One per candidate, in candidate order.
  std::vector<WorkerScore> scores;
};

RouteDecision Route(const RouteRequest& request, absl::Span<const WorkerLoadView> candidates,
                    const BlockIndex& index, const RouterConfig& config);

// Disaggregated serving's choice for a new request (WorkerPool::Leg::kAuto), shared with the
// simulator: route among the decode and mixed workers (`others`); if the prompt would leave at
// least min_uncached_tokens to compute there (counting what the chosen one holds and what it would
// copy), and the prefill worker chosen among `prefill` has at most max_prefill_queue_tokens queued
// (0: no limit), route there instead.
struct LegChoice {
  // Over `prefill` when prefill_leg, else over `others` (or `prefill` when there are no others).
  RouteDecision decision;
  bool prefill_leg = false;
};
struct DisaggregationConfig {
  int64_t min_uncached_tokens = 512;
  int64_t max_prefill_queue_tokens = 0;
};
LegChoice RouteNewRequest(const RouteRequest& request, absl::Span<const WorkerLoadView> prefill,
                          absl::Span<const WorkerLoadView> others, const BlockIndex& index,
                          const RouterConfig& config, const DisaggregationConfig& split,
                          int64_t block_tokens);

// Where the coordinator sent each fine-tune's requests lately. A worker that was sent one within
// `window` has its delta loaded or loading, though its load reports list a delta only once it is
// loaded; counting it as resident (RouteRequest::fine_tune_resident) keeps a burst for a cold
// fine-tune on the worker already loading it instead of starting loads everywhere. Not
// thread-safe.
class RecentFineTuneRoutes {
 public:
  explicit RecentFineTuneRoutes(absl::Duration window = absl::Seconds(30)) : window_(window) {}
  void Routed(WorkerSlot worker, absl::string_view fine_tune_id, absl::Time now);
  // Looks the fine-tune up by view (no copy of the id) on the router's path.
  bool Recent(WorkerSlot worker, absl::string_view fine_tune_id, absl::Time now) const;
  void Forget(WorkerSlot worker, absl::string_view fine_tune_id);

 private:
  using Routes = absl::InlinedVector<std::pair<WorkerSlot, absl::Time>, 4>;
  const absl::Duration window_;
  absl::flat_hash_map<std::string, Routes> last_;  // by fine-tune: workers, last sent
  uint64_t routed_ = 0;
};

// The share of recent traffic each prefix has (RouteRequest::prefix_share): the first block hash
// of the last `window` routed prompts, and how often each occurs. Not thread-safe.
class PrefixShareWindow {
 public:
  explicit PrefixShareWindow(size_t window = 256) : window_(window) {}
  // Counts a prompt starting with block `first` among the recent ones and returns its share, in
  // (0, 1], counting this one.
  double Add(BlockHash first);

 private:
  const size_t window_;
  std::vector<BlockHash> recent_;
  size_t next_ = 0;
  absl::flat_hash_map<BlockHash, int> counts_;
};

}  // namespace strata

#endif  // STRATA_COORDINATOR_ROUTER_H_
