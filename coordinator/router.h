// Router: picks the worker that serves a request cheapest. A pure function of the request's block
// hashes, the block index and the workers' loads, so that it is tested against tables and replayed
// by capacity planning without a network.
//
// Cost model (docs/ARCHITECTURE.md, "Routing"). For each candidate worker w:
//   credit(w) = w_device * overlap_device + w_host * overlap_host + w_disk * overlap_disk (blocks)
//   cost(w)   = max(0, prompt_blocks + queued_prefill_blocks(w) - credit(w))
//               + decode_weight * decode_sequences(w)
// where overlap_t counts the blocks of the longest cached prefix of the prompt on w whose fastest
// copy is in tier t. Lower cost wins.
//
// Balance. Cost alone pins a hot shared prefix to the worker that cached it first. So a worker
// whose in-flight request count would exceed the balance limit, max(mean * (1 + balance_tolerance),
// mean + balance_slack) over all candidates, is passed over while any other candidate is under the
// limit; the request goes to a less loaded worker, which then caches the prefix too. Within the
// limit, hot prefixes replicate on purpose: when the cheapest worker is serving at least
// `hot_prefix_requests` in-flight requests that share this prompt's first block, and a worker that
// lacks the prefix has at least two fewer requests in flight, the least loaded such worker gets the
// request (and so a copy of the prefix). A conversation's own history is never hot in this sense
// (its turns do not overlap), so it stays where its cache is. Ties go to fewer in-flight requests,
// then to an order rotated by `tie_break`, so idle workers share cold traffic evenly.
#ifndef STRATA_COORDINATOR_ROUTER_H_
#define STRATA_COORDINATOR_ROUTER_H_

#include <array>
#include <cstdint>
#include <vector>

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
  double balance_tolerance = 0.25;
  double balance_slack = 2.0;
  // 0 disables replication of hot prefixes.
  int hot_prefix_requests = 2;
  // Round-robin instead of cost (a baseline for benchmarks): the candidate at tie_break modulo the
  // number of candidates.
  bool round_robin = false;
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
};

struct WorkerScore {
  WorkerSlot slot = 0;
  std::array<int64_t, kNumTiers> overlap_blocks = {0, 0, 0};
  double credit = 0;
  double cost = 0;
  bool over_balance_limit = false;
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

}  // namespace strata

#endif  // STRATA_COORDINATOR_ROUTER_H_
