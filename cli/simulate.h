// A Strata cluster on a simulated clock: capacity planning's replay of a workload.
//
// Simulate runs a workload (bench/workload.h: arrivals, prompts as token ids, multi-turn
// conversations with think times) through N workers and a coordinator without running a model.
// What decides where requests go and what each step computes is Strata's own code or a copy of
// its rules:
//   - routing: the coordinator's Route (coordinator/router.h) over a BlockIndex fed with every
//     worker's block events, with the load views, pending entries and prefix-share window that
//     WorkerPool keeps;
//   - each worker's device KV cache: the engine's BlockManager (prefix caching, LRU eviction);
//   - each worker's step: the engine's plan (worker/engine/engine.h): running sequences first in
//     admission order under max_batch_tokens (chunked prefill), then admissions in queue order up
//     to max_running_sequences, preempting the most recently admitted sequence when blocks run
//     out; a finished request's blocks stay cached, and blocks evicted from the device (and a
//     finished turn's, with keep_finished_warm) go to a host tier of host_blocks, from which an
//     admission restores its prefix chain instead of recomputing it.
// Only the time a step takes is modelled (StepCost): a fixed cost plus the larger of reading the
// weights and the batch's KV, and computing its tokens, its attention and its sampled rows'
// logits, plus the host blocks it restores. The coefficients come from a GPU's roofline
// (cli/plan.h, CostFromPlan) or from measurements of a real engine (`stratactl profile`).
//
// Fine-tunes: a conversation's requests run on its fine-tune (bench/workload.h), in that
// fine-tune's cache namespace; the router prefers workers holding its delta
// (RouteRequest::fine_tune_resident); a worker holds resident_deltas of them, loading a cold one
// in delta_load_s (the request waits; others go ahead), and each distinct fine-tune in a step adds
// StepCost's delta terms.
//
// The disk tier under the host tier holds every block the host tier took (written back off the
// step path); a request's chain found on disk starts loading into the host tier when the request
// arrives, one block after another per worker, and its admission waits for it up to
// max_io_wait_s while others go ahead.
//
// Copies between workers (kv_copy_block_s above 0): the router names a source as the coordinator
// does (RouteRequest::fetch_sources: every worker), the request waits kv_copy_block_s a block
// before its first admission, and the blocks the source still holds then become cached device
// blocks of the chosen worker (Engine::ImportKvBlocks).
//
// Disaggregated serving (prefill_workers above 0): the first prefill_workers workers take prompts
// only, as the coordinator sends them (WorkerPool::Leg): a request whose prompt leaves at least
// disaggregate_min_uncached_tokens uncached on the decode worker the router would pick runs on a
// prefill worker for its first token, then moves to a decode worker chosen by the router among
// the others, which copies the prompt's blocks from the prefill worker (kv_copy_block_s a block,
// 0: at once) and computes the last partial block and the token before decoding on.
//
// Not modelled: moving host blocks up into the device while a request waits (a restored block's
// copy is charged to the step that admits it), network and tokenization time beyond
// request_overhead_s.
#ifndef STRATA_CLI_SIMULATE_H_
#define STRATA_CLI_SIMULATE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/workload.h"
#include "coordinator/router.h"

namespace strata {

// Seconds one engine step takes.
struct StepCost {
  double fixed_s = 0;           // per step: host work, launches, sampling
  double weights_s = 0;         // reading the weights once
  double kv_token_s = 0;        // reading one token's K and V (all layers)
  double token_s = 0;           // the projections of one token
  double attention_pair_s = 0;  // attention of one query token over one key
  double sequence_s = 0;        // each sequence that samples a token: its logits and sampling
  double delta_s = 0;           // each distinct fine-tune in the step: reading its delta
  // The same on the compute side (a CPU decodes and applies its delta), and per token of a
  // fine-tune's sequences in the step.
  double delta_compute_s = 0;
  double delta_token_s = 0;
  double host_block_s = 0;  // restoring one block from the host tier
  // `tokens` computed in the step, `kv_tokens` context tokens read (each chunk's start plus its
  // length), `pairs` (query, key) pairs of attention, `sampled` sequences that sample a token
  // (every decode, and a prefill's last chunk), `deltas` distinct fine-tunes among its sequences,
  // `delta_tokens` the tokens of its fine-tunes' sequences.
  double Step(double tokens, double kv_tokens, double pairs, double sampled, double deltas = 0,
              double delta_tokens = 0) const;
};

struct SimWorkerConfig {
  int64_t kv_blocks = 2048;
  int64_t block_tokens = 16;
  int64_t max_batch_tokens = 2048;
  int64_t max_running_sequences = 64;
  // Host tier capacity in blocks (0: none).
  int64_t host_blocks = 0;
  bool keep_finished_warm = true;
  // Fine-tune deltas a worker holds at once (DeltaCache; on a GPU its device region), and the
  // time to load one that is not held. A delta is pinned while a sequence of its fine-tune runs;
  // the least recently used unpinned one makes room.
  int64_t resident_deltas = 8;
  double delta_load_s = 0;
  // Disk tier capacity in blocks (0: none; it needs a host tier above it), one block's read
  // into the host tier, and the longest a request waits for its blocks before computing them.
  int64_t disk_blocks = 0;
  double disk_block_s = 0;
  double max_io_wait_s = 0.5;
  // EngineConfig::inflight_prefill_min_tokens: a request whose prefix another is computing in this
  // step waits a step for it (0: never).
  int64_t inflight_prefill_min_tokens = 32;
  // The time to copy one KV block from another worker (Worker.FetchKvBlocks), when the router
  // names a source (RouterConfig::fetch_weight): the request waits that long per block before it
  // is admitted, then finds the copies cached. 0: no copies (as strata-coordinator's
  // --kv_fetch_weight=0).
  double kv_copy_block_s = 0;
};

struct SimConfig {
  int workers = 1;
  SimWorkerConfig worker;
  StepCost cost;
  RouterConfig router;
  // Added to every request's TTFT and end-to-end time: the client's round trip through the
  // coordinator to a worker, outside any step.
  double request_overhead_s = 0;
  // Multi-turn conversations resend the model's replies in each later turn's prompt (ChatHistory),
  // as loadgen does by default.
  bool replies_in_history = true;
  // Disaggregated serving: how many of the workers are prefill workers (the rest decode), and
  // the coordinator's --disaggregate_min_uncached_tokens.
  int prefill_workers = 0;
  int64_t disaggregate_min_uncached_tokens = 512;
  int64_t disaggregate_max_prefill_queue_tokens = 0;  // 0: no limit
};

struct SimPercentiles {
  double p50 = 0, p90 = 0, p99 = 0, mean = 0;
};

struct SimResult {
  int64_t requests = 0;
  int64_t completed = 0;
  // Requests no worker could hold (prompt plus output past a worker's whole KV cache).
  int64_t rejected = 0;
  // Neither completed nor rejected when the simulation ran out of events (0 unless a request
  // could never be admitted).
  int64_t unfinished = 0;
  double duration_s = 0;  // first arrival to last finish
  SimPercentiles ttft_ms, tpot_ms, e2e_ms;
  double throughput_rps = 0;
  double output_tokens_per_s = 0;
  double cache_hit_rate = 0;  // cached prompt tokens over prompt tokens
  int64_t preemptions = 0;
  // Requests that waited a step for a prefix another was computing (inflight_prefill_min_tokens).
  int64_t inflight_prefix_waits = 0;
  int64_t restored_blocks = 0;     // from host tiers
  int64_t copied_blocks = 0;       // copied from other workers (kv_copy_block_s)
  int64_t prefill_handoffs = 0;    // requests moved from a prefill worker to a decode worker
  int64_t disk_loaded_blocks = 0;  // read from disk tiers into host tiers
  int64_t delta_loads = 0;         // fine-tune deltas loaded (cold) on any worker
  double mean_step_deltas = 0;     // distinct fine-tunes per step
  double mean_decode_batch = 0;    // sequences per step that decode
  // Busy share of each worker over duration_s.
  std::vector<double> worker_utilization;
  // Requests each worker served.
  std::vector<int64_t> worker_requests;
};

// INVALID_ARGUMENT for a config that cannot run (no workers, non-positive sizes).
absl::StatusOr<SimResult> Simulate(const std::vector<Conversation>& workload,
                                   const SimConfig& config);

// A measured engine, as `stratactl profile` writes it: the step cost and the cache it ran with.
struct EngineProfile {
  std::string model;
  std::string machine;
  StepCost cost;
  double request_overhead_s = 0;
  double delta_load_s = 0;  // a cold fine-tune's delta (with --delta)
  int64_t block_bytes = 0;  // one KV block (all layers), for disk reads
  int64_t kv_blocks = 0;
  int64_t block_tokens = 16;
  int64_t max_batch_tokens = 0;
  int64_t max_running_sequences = 0;
};
std::string EngineProfileToJson(const EngineProfile& p);
absl::StatusOr<EngineProfile> EngineProfileFromJson(const std::string& text,
                                                    const std::string& origin);

}  // namespace strata

#endif  // STRATA_CLI_SIMULATE_H_
