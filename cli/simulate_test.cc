#include "cli/simulate.h"

#include <string>
#include <vector>

#include "absl/time/time.h"
#include "bench/workload.h"
#include "cli/profile.h"
#include "cli/simulate_cmd.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

std::vector<int32_t> Tokens(int64_t n, int32_t first) {
  std::vector<int32_t> t;
  for (int64_t i = 0; i < n; ++i) t.push_back(first + static_cast<int32_t>(i));
  return t;
}

Conversation Single(double start_ms, std::vector<int32_t> prompt, int64_t output) {
  Conversation c;
  c.start = absl::Milliseconds(start_ms);
  c.turns.push_back({std::move(prompt), output, absl::ZeroDuration()});
  return c;
}

// 1 ms a step plus 0.1 ms a token: easy to add up by hand.
SimConfig Simple() {
  SimConfig c;
  c.cost.fixed_s = 1e-3;
  c.cost.token_s = 1e-4;
  c.worker.kv_blocks = 64;
  c.worker.block_tokens = 16;
  c.worker.max_batch_tokens = 64;
  c.worker.max_running_sequences = 8;
  return c;
}

SimConfig FourWorkers() {
  SimConfig c = Simple();
  c.workers = 4;
  c.worker.kv_blocks = 512;
  c.worker.max_batch_tokens = 512;
  return c;
}

TEST(SimulateTest, LoneRequestTakesItsChunksAndDecodeSteps) {
  const std::vector<Conversation> w = {Single(0, Tokens(100, 1), 10)};
  const absl::StatusOr<SimResult> r = Simulate(w, Simple());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->completed, 1);
  // Prefill in chunks of 64 and 36 tokens: 7.4 + 4.6 ms; then 9 decode steps of 1.1 ms.
  EXPECT_NEAR(r->ttft_ms.p50, 12.0, 1e-9);
  EXPECT_NEAR(r->tpot_ms.p50, 1.1, 1e-9);
  EXPECT_NEAR(r->e2e_ms.p50, 12.0 + 9 * 1.1, 1e-9);
  EXPECT_EQ(r->cache_hit_rate, 0);
  EXPECT_NEAR(r->worker_utilization[0], 1.0, 1e-9);
}

TEST(SimulateTest, ConcurrentRequestsDecodeInOneBatch) {
  std::vector<Conversation> w;
  for (int i = 0; i < 4; ++i) w.push_back(Single(0, Tokens(8, 1000 * (i + 1)), 5));
  const absl::StatusOr<SimResult> r = Simulate(w, Simple());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->completed, 4);
  // All four prompts fit the first step's budget (32 tokens: 4.2 ms); then four decode steps of
  // four tokens (1.4 ms each).
  EXPECT_NEAR(r->ttft_ms.p99, 4.2, 1e-9);
  EXPECT_NEAR(r->tpot_ms.p50, 1.4, 1e-9);
  EXPECT_NEAR(r->mean_decode_batch, 4, 1e-9);
  EXPECT_NEAR(r->output_tokens_per_s, 20 / (4.2e-3 + 4 * 1.4e-3), 1e-6);
}

TEST(SimulateTest, LaterRequestReusesCachedPrefix) {
  std::vector<int32_t> second = Tokens(64, 1);  // the first's first four blocks
  const std::vector<int32_t> own = Tokens(36, 5000);
  second.insert(second.end(), own.begin(), own.end());
  const std::vector<Conversation> w = {Single(0, Tokens(100, 1), 2), Single(1000, second, 2)};
  const absl::StatusOr<SimResult> r = Simulate(w, Simple());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->completed, 2);
  EXPECT_NEAR(r->cache_hit_rate, 64.0 / 200.0, 1e-9);
  // The second computes 36 tokens in one step: 4.6 ms against the first's 12 ms.
  EXPECT_NEAR(r->ttft_ms.p50, (4.6 + 12.0) / 2, 1e-9);
}

// Engine::Admit's wait for a prefix in flight: four requests sharing 64 tokens arrive at once.
TEST(SimulateTest, ABurstSharingAPrefixComputesItOnce) {
  std::vector<Conversation> w;
  for (int i = 0; i < 4; ++i) {
    std::vector<int32_t> p = Tokens(64, 1);
    const std::vector<int32_t> own = Tokens(8, 1000 * (i + 1));
    p.insert(p.end(), own.begin(), own.end());
    w.push_back(Single(0, p, 2));
  }
  SimConfig c = Simple();
  c.worker.max_batch_tokens = 512;
  const absl::StatusOr<SimResult> shared = Simulate(w, c);
  ASSERT_TRUE(shared.ok()) << shared.status();
  EXPECT_EQ(shared->completed, 4);
  EXPECT_EQ(shared->inflight_prefix_waits, 3);
  EXPECT_NEAR(shared->cache_hit_rate, 3 * 64.0 / (4 * 72.0), 1e-9);
  // The first computes 72 tokens (8.2 ms); the others wait, then compute 8 tokens each beside its
  // decode token (3.5 ms).
  EXPECT_NEAR(shared->ttft_ms.p50, 8.2 + 3.5, 1e-9);

  c.worker.inflight_prefill_min_tokens = 0;
  const absl::StatusOr<SimResult> again = Simulate(w, c);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->inflight_prefix_waits, 0);
  EXPECT_EQ(again->cache_hit_rate, 0);
  EXPECT_NEAR(again->ttft_ms.p50, 1 + 28.8, 1e-9);  // all 288 tokens in one step
}

// A conversation's second turn resends the first turn's reply (ChatHistory), whose blocks the
// first turn computed: 64 prompt tokens + 32 of the 33 generated (the last is never computed) are
// six full blocks the second turn finds cached. Without replies the second prompt parts from the
// cached chain after the first prompt's four blocks.
TEST(SimulateTest, RepliesInTheHistoryHitTheCacheTheyWereComputedInto) {
  Conversation chat = Single(0, Tokens(64, 1), 33);
  chat.turns.push_back({Tokens(80, 1), 4, absl::Milliseconds(10)});  // 16 new tokens
  SimConfig c = Simple();
  const absl::StatusOr<SimResult> with = Simulate({chat}, c);
  ASSERT_TRUE(with.ok()) << with.status();
  EXPECT_EQ(with->completed, 2);
  EXPECT_NEAR(with->cache_hit_rate, 96.0 / (64 + 113), 1e-9);
  c.replies_in_history = false;
  const absl::StatusOr<SimResult> without = Simulate({chat}, c);
  ASSERT_TRUE(without.ok()) << without.status();
  EXPECT_NEAR(without->cache_hit_rate, 64.0 / (64 + 80), 1e-9);
}

TEST(SimulateTest, QueueingGrowsPastCapacityAndWorkersRelieveIt) {
  WorkloadOptions o;
  o.num_requests = 400;
  o.rate_per_s = 40;
  o.prompt_tokens = {200, 200};
  o.output_tokens = {50, 50};
  SimConfig c = Simple();
  c.worker.kv_blocks = 1024;
  c.worker.max_batch_tokens = 512;
  c.worker.max_running_sequences = 16;
  const absl::StatusOr<std::vector<Conversation>> w = MakeWorkload(o);
  ASSERT_TRUE(w.ok());
  const absl::StatusOr<SimResult> one = Simulate(*w, c);
  c.workers = 4;
  const absl::StatusOr<SimResult> four = Simulate(*w, c);
  ASSERT_TRUE(one.ok() && four.ok());
  EXPECT_EQ(one->completed, 400);
  EXPECT_EQ(four->completed, 400);
  // One worker: each request needs about 20 ms of prefill share and 50 decode steps of 16; it
  // cannot keep up with 40 requests a second, so the queue (and TTFT) grows.
  EXPECT_GT(one->ttft_ms.p99, 10 * four->ttft_ms.p99);
  EXPECT_GT(one->worker_utilization[0], 0.95);
  for (int64_t n : four->worker_requests) EXPECT_GT(n, 60);  // spread over all four
  EXPECT_NEAR(four->throughput_rps, 40, 8);
  // Same inputs, same answer.
  const absl::StatusOr<SimResult> again = Simulate(*w, c);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->ttft_ms.p99, four->ttft_ms.p99);
  EXPECT_EQ(again->worker_requests, four->worker_requests);
}

TEST(SimulateTest, PrefixAwareRoutingKeepsConversationsOnTheirCaches) {
  WorkloadOptions o;
  o.kind = "multi-turn";
  o.num_requests = 160;  // 40 conversations x 4 turns
  o.turns = 4;
  o.rate_per_s = 8;
  o.prompt_tokens = {400, 400};
  o.turn_tokens = {40, 40};
  o.output_tokens = {20, 20};
  o.think_time_ms = 100;
  const absl::StatusOr<std::vector<Conversation>> w = MakeWorkload(o);
  ASSERT_TRUE(w.ok());
  SimConfig c = FourWorkers();
  const absl::StatusOr<SimResult> aware = Simulate(*w, c);
  c.router.round_robin = true;
  const absl::StatusOr<SimResult> rr = Simulate(*w, c);
  ASSERT_TRUE(aware.ok() && rr.ok());
  EXPECT_EQ(aware->completed, 160);
  // Turns 2-4 find their history (about 3/4 of their tokens): near 0.6 of all prompt tokens.
  EXPECT_GT(aware->cache_hit_rate, 0.55);
  EXPECT_LT(rr->cache_hit_rate, 0.5 * aware->cache_hit_rate);
  EXPECT_LT(aware->ttft_ms.p50, rr->ttft_ms.p50);
}

// A busy worker's prompts go to idle ones that copy the shared prefix from it (the router's
// fetch credit) instead of computing it: more of the prompts are served from cache, sooner.
TEST(SimulateTest, WorkersCopyAPrefixInsteadOfComputingIt) {
  WorkloadOptions o;
  o.kind = "shared-prefix";
  o.num_requests = 200;
  o.rate_per_s = 20;
  o.shared_prefix_tokens = 1600;
  o.shared_fraction = 1;
  o.num_shared_prefixes = 8;
  o.prompt_tokens = {1700, 1700};
  o.output_tokens = {20, 20};
  const absl::StatusOr<std::vector<Conversation>> w = MakeWorkload(o);
  ASSERT_TRUE(w.ok());
  SimConfig c = FourWorkers();
  c.worker.kv_blocks = 2048;
  const absl::StatusOr<SimResult> computed = Simulate(*w, c);
  c.worker.kv_copy_block_s = 1e-5;  // a 100-block prefix in 1 ms, against 160 ms to compute it
  const absl::StatusOr<SimResult> copied = Simulate(*w, c);
  ASSERT_TRUE(computed.ok() && copied.ok());
  EXPECT_EQ(computed->copied_blocks, 0);
  EXPECT_EQ(copied->completed, 200);
  std::printf("hit rate %.3f -> %.3f, TTFT p50 %.1f -> %.1f ms, p99 %.1f -> %.1f ms, %lld copied\n",
              computed->cache_hit_rate, copied->cache_hit_rate, computed->ttft_ms.p50,
              copied->ttft_ms.p50, computed->ttft_ms.p99, copied->ttft_ms.p99,
              static_cast<long long>(copied->copied_blocks));
  // (Measured: hit rate 0.39 -> 0.46, TTFT p50 800 -> 306 ms, p99 1295 -> 739 ms.)
  EXPECT_GT(copied->copied_blocks, 1000);
  EXPECT_GT(copied->cache_hit_rate, computed->cache_hit_rate + 0.03);
  EXPECT_LT(copied->ttft_ms.p50, 0.7 * computed->ttft_ms.p50);
  EXPECT_LT(copied->ttft_ms.p99, computed->ttft_ms.p99);
}

// Disaggregated: the prompt and its first token on the prefill worker, as alone; then the decode
// worker copies the 6 full blocks (1 ms each), computes the last 5 tokens with the first token
// (1.5 ms) and decodes the other 8 (1.1 ms each).
TEST(SimulateTest, ASplitRequestIsPrefilledThereAndDecodedHere) {
  const std::vector<Conversation> w = {Single(0, Tokens(100, 1), 10)};
  SimConfig c = Simple();
  c.workers = 2;
  c.prefill_workers = 1;
  c.disaggregate_min_uncached_tokens = 0;
  c.worker.kv_copy_block_s = 1e-3;
  const absl::StatusOr<SimResult> r = Simulate(w, c);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->completed, 1);
  EXPECT_EQ(r->prefill_handoffs, 1);
  EXPECT_EQ(r->copied_blocks, 6);
  EXPECT_EQ(r->worker_requests, (std::vector<int64_t>{1, 1}));
  EXPECT_NEAR(r->ttft_ms.p50, 12.0, 1e-9);
  EXPECT_NEAR(r->tpot_ms.p50, (6 + 1.5 + 8 * 1.1) / 9, 1e-9);
  EXPECT_EQ(r->cache_hit_rate, 0);  // the copies are not the prompt's cache hits

  // A prompt shorter than the threshold goes straight to the decode worker.
  c.disaggregate_min_uncached_tokens = 200;
  const absl::StatusOr<SimResult> whole = Simulate(w, c);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(whole->prefill_handoffs, 0);
  EXPECT_EQ(whole->worker_requests, (std::vector<int64_t>{0, 1}));
  EXPECT_NEAR(whole->tpot_ms.p50, 1.1, 1e-9);

  c.prefill_workers = 2;
  EXPECT_EQ(Simulate(w, c).status().code(), absl::StatusCode::kInvalidArgument);
}

// Under a load of long prompts, half the workers taking prompts only keeps decode steps free of
// prompt chunks (lower TPOT tail) and makes first tokens wait for fewer prompt workers.
TEST(SimulateTest, SplittingPrefillFromDecodeTradesFirstTokensForSmoothDecode) {
  WorkloadOptions o;
  o.kind = "random";
  o.num_requests = 200;
  o.rate_per_s = 10;
  o.prompt_tokens = {1000, 1500};
  o.output_tokens = {100, 100};
  const absl::StatusOr<std::vector<Conversation>> w = MakeWorkload(o);
  ASSERT_TRUE(w.ok());
  SimConfig c = FourWorkers();
  c.worker.kv_blocks = 4096;
  c.worker.kv_copy_block_s = 1e-5;
  const absl::StatusOr<SimResult> mixed = Simulate(*w, c);
  c.prefill_workers = 2;
  const absl::StatusOr<SimResult> split = Simulate(*w, c);
  ASSERT_TRUE(mixed.ok() && split.ok());
  std::printf("TTFT p50 %.1f -> %.1f ms, TPOT p99 %.2f -> %.2f ms\n", mixed->ttft_ms.p50,
              split->ttft_ms.p50, mixed->tpot_ms.p99, split->tpot_ms.p99);
  // (Measured: TTFT p50 128 -> 157 ms, TPOT p99 3.50 -> 1.21 ms.)
  EXPECT_EQ(mixed->prefill_handoffs, 0);
  EXPECT_EQ(split->completed, 200);
  EXPECT_EQ(split->prefill_handoffs, 200);
  EXPECT_LT(split->tpot_ms.p99, 0.7 * mixed->tpot_ms.p99);
  EXPECT_GT(split->ttft_ms.p50, mixed->ttft_ms.p50);
  // With the prefill workers' queue bounded, prompts spill to the decode workers under load.
  c.disaggregate_max_prefill_queue_tokens = 1500;
  const absl::StatusOr<SimResult> spill = Simulate(*w, c);
  ASSERT_TRUE(spill.ok());
  EXPECT_EQ(spill->completed, 200);
  EXPECT_GT(spill->prefill_handoffs, 0);
  EXPECT_LT(spill->prefill_handoffs, 200);
  EXPECT_LT(spill->ttft_ms.p99, split->ttft_ms.p99);
}

TEST(SimulateTest, SmallCachePreemptsAndStillFinishesEverything) {
  std::vector<Conversation> w;
  for (int i = 0; i < 8; ++i) w.push_back(Single(0, Tokens(60, 1000 * (i + 1)), 100));
  SimConfig c = Simple();
  c.worker.kv_blocks = 24;  // 384 tokens: three of the eight 160-token sequences at their end
  const absl::StatusOr<SimResult> r = Simulate(w, c);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->completed, 8);
  EXPECT_GT(r->preemptions, 0);
}

// 40 conversations of 3 turns, each ~35 blocks, that think long enough for others to push them
// off a small device cache.
WorkloadOptions LongThinkingChats() {
  WorkloadOptions o;
  o.kind = "multi-turn";
  o.num_requests = 120;
  o.turns = 3;
  o.rate_per_s = 20;
  o.prompt_tokens = {480, 480};
  o.turn_tokens = {32, 32};
  o.output_tokens = {16, 16};
  o.think_time_ms = 2000;
  return o;
}

TEST(SimulateTest, HostTierRestoresWhatTheDeviceEvicted) {
  const absl::StatusOr<std::vector<Conversation>> w = MakeWorkload(LongThinkingChats());
  ASSERT_TRUE(w.ok());
  SimConfig c = Simple();
  c.worker.kv_blocks = 160;  // five conversations' worth
  c.worker.max_batch_tokens = 512;
  const absl::StatusOr<SimResult> device_only = Simulate(*w, c);
  c.worker.host_blocks = 8192;
  c.cost.host_block_s = 1e-5;
  const absl::StatusOr<SimResult> with_host = Simulate(*w, c);
  ASSERT_TRUE(device_only.ok() && with_host.ok());
  EXPECT_EQ(with_host->completed, 120);
  EXPECT_EQ(device_only->restored_blocks, 0);
  EXPECT_GT(with_host->restored_blocks, 100);
  EXPECT_GT(with_host->cache_hit_rate, device_only->cache_hit_rate + 0.2);
  EXPECT_LT(with_host->ttft_ms.p50, device_only->ttft_ms.p50);
}

TEST(SimulateTest, DiskTierHoldsWhatTheHostTierCannot) {
  const absl::StatusOr<std::vector<Conversation>> w = MakeWorkload(LongThinkingChats());
  ASSERT_TRUE(w.ok());
  SimConfig c = Simple();
  c.worker.kv_blocks = 160;
  c.worker.max_batch_tokens = 512;
  c.worker.host_blocks = 200;  // six conversations' worth of 40
  c.cost.host_block_s = 1e-5;
  const absl::StatusOr<SimResult> host_only = Simulate(*w, c);
  c.worker.disk_blocks = 100000;
  c.worker.disk_block_s = 1e-4;  // 3.2 ms for a 32-block chain, against ~50 ms to recompute it
  const absl::StatusOr<SimResult> with_disk = Simulate(*w, c);
  ASSERT_TRUE(host_only.ok() && with_disk.ok());
  EXPECT_EQ(with_disk->completed, 120);
  EXPECT_EQ(host_only->disk_loaded_blocks, 0);
  EXPECT_GT(with_disk->disk_loaded_blocks, 500);
  EXPECT_GT(with_disk->cache_hit_rate, host_only->cache_hit_rate + 0.2);
  EXPECT_LT(with_disk->ttft_ms.p50, host_only->ttft_ms.p50);

  // A disk too slow to wait for: after max_io_wait the request computes its prefix instead.
  c.worker.disk_block_s = 1.0;
  c.worker.max_io_wait_s = 0.05;
  const absl::StatusOr<SimResult> slow = Simulate(*w, c);
  ASSERT_TRUE(slow.ok());
  EXPECT_EQ(slow->completed, 120);
  // Each waits at most 50 ms more than without a disk (and the loads it gave up on still land
  // in the host tier, pushing out others); this load queues, which stretches that, but waiting
  // for the disk itself would take 32 s for a 32-block chain.
  EXPECT_LT(slow->ttft_ms.p50, host_only->ttft_ms.p50 + 400)
      << host_only->ttft_ms.p50 << " " << with_disk->ttft_ms.p50;
}

TEST(SimulateTest, RequestLargerThanTheCacheIsRejected) {
  const std::vector<Conversation> w = {Single(0, Tokens(2000, 1), 4), Single(1, Tokens(10, 1), 4)};
  const absl::StatusOr<SimResult> r = Simulate(w, Simple());  // 1024 tokens of cache
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->rejected, 1);
  EXPECT_EQ(r->completed, 1);
}

TEST(SimulateTest, RefusesConfigsThatCannotRun) {
  const std::vector<Conversation> w = {Single(0, Tokens(10, 1), 4)};
  SimConfig c = Simple();
  c.workers = 0;
  EXPECT_EQ(Simulate(w, c).status().code(), absl::StatusCode::kInvalidArgument);
  c = Simple();
  c.worker.kv_blocks = 0;
  EXPECT_EQ(Simulate(w, c).status().code(), absl::StatusCode::kInvalidArgument);
  c = Simple();
  c.cost = StepCost{};
  EXPECT_EQ(Simulate(w, c).status().code(), absl::StatusCode::kInvalidArgument);
  c.cost.token_s = -1;
  EXPECT_EQ(Simulate(w, c).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SimulateTest, ProfileRoundTripsThroughJson) {
  EngineProfile p;
  p.model = "strata-tiny";
  p.machine = "2 cores";
  p.kv_blocks = 4096;
  p.block_tokens = 16;
  p.max_batch_tokens = 512;
  p.max_running_sequences = 64;
  p.cost.fixed_s = 1e-3;
  p.cost.weights_s = 2e-3;
  p.cost.kv_token_s = 3e-7;
  p.cost.token_s = 4e-5;
  p.cost.attention_pair_s = 5e-9;
  p.cost.sequence_s = 7e-5;
  p.cost.delta_s = 8e-4;
  p.cost.delta_compute_s = 9e-4;
  p.cost.delta_token_s = 1e-5;
  p.cost.host_block_s = 6e-6;
  p.request_overhead_s = 2e-3;
  const absl::StatusOr<EngineProfile> q = EngineProfileFromJson(EngineProfileToJson(p), "p.json");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->model, p.model);
  EXPECT_EQ(q->kv_blocks, 4096);
  EXPECT_DOUBLE_EQ(q->cost.token_s, 4e-5);
  EXPECT_DOUBLE_EQ(q->cost.host_block_s, 6e-6);
  EXPECT_DOUBLE_EQ(q->cost.sequence_s, 7e-5);
  EXPECT_DOUBLE_EQ(q->cost.delta_s, 8e-4);
  EXPECT_DOUBLE_EQ(q->cost.delta_compute_s, 9e-4);
  EXPECT_DOUBLE_EQ(q->cost.delta_token_s, 1e-5);
  EXPECT_DOUBLE_EQ(q->request_overhead_s, 2e-3);

  const absl::StatusOr<EngineProfile> bad = EngineProfileFromJson(
      "{\"kv_blocks\":1,\"block_tokens\":16,\"max_batch_tokens\":8,\"max_running_sequences\":1,"
      "\"cost\":{\"fixed_s\":0,\"weights_s\":0,\"kv_token_s\":0,\"token_s\":-1,"
      "\"attention_pair_s\":0,\"host_block_s\":0}}",
      "p.json");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("token_s"), std::string::npos) << bad.status();
  const absl::StatusOr<EngineProfile> missing = EngineProfileFromJson("{}", "p.json");
  EXPECT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("kv_blocks"), std::string::npos) << missing.status();
}

// Fine-tunes: distinct deltas in a step cost time, a cold delta delays its request, and the
// router keeps a fine-tune's requests on the workers that hold its delta.
TEST(SimulateTest, FineTunesCostPerDistinctDeltaAndLoadsWhenCold) {
  std::vector<Conversation> w;
  for (int i = 0; i < 4; ++i) {
    w.push_back(Single(0, Tokens(8, 1000 * (i + 1)), 5));
    w.back().fine_tune = i;  // four fine-tunes in one batch
  }
  SimConfig c = Simple();
  c.cost.delta_s = 2e-3;
  c.cost.weights_s = 1e-3;  // the memory side: 1 ms plus 2 ms per distinct delta
  c.cost.token_s = 0;
  c.worker.resident_deltas = 4;
  const absl::StatusOr<SimResult> warm = Simulate(w, c);  // loads take no time
  ASSERT_TRUE(warm.ok()) << warm.status();
  EXPECT_EQ(warm->delta_loads, 4);
  // Each step reads four deltas: 1 + max(1 + 4 * 2, compute 0) = 10 ms.
  EXPECT_NEAR(warm->ttft_ms.p50, 10, 1e-9);
  EXPECT_NEAR(warm->tpot_ms.p50, 10, 1e-9);
  EXPECT_NEAR(warm->mean_step_deltas, 4, 1e-9);

  // One loader, as DeltaCache has: the four loads of 10 ms end at 10, 20, 30 and 40 ms, and the
  // last request cannot start before then.
  c.worker.delta_load_s = 10e-3;
  const absl::StatusOr<SimResult> r = Simulate(w, c);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->completed, 4);
  EXPECT_EQ(r->delta_loads, 4);
  EXPECT_GE(r->ttft_ms.p99, 40);
  EXPECT_LT(r->ttft_ms.p99, 40 + 4 * 10 + 1e-9);

  // Room for two: the other two wait for a running fine-tune to finish and release its delta.
  c.worker.resident_deltas = 2;
  const absl::StatusOr<SimResult> tight = Simulate(w, c);
  ASSERT_TRUE(tight.ok()) << tight.status();
  EXPECT_EQ(tight->completed, 4);
  EXPECT_EQ(tight->delta_loads, 4);
  EXPECT_GT(tight->ttft_ms.p99, r->ttft_ms.p99 + 10);

  // On the compute side (a CPU): per distinct delta and per fine-tuned token, added to the
  // compute, which here is all there is.
  SimConfig cpu = Simple();
  cpu.cost.delta_compute_s = 2e-3;
  cpu.cost.delta_token_s = 1e-4;
  const absl::StatusOr<SimResult> on_cpu = Simulate(w, cpu);
  ASSERT_TRUE(on_cpu.ok()) << on_cpu.status();
  // Four 8-token prompts in one step: 1 + 3.2 ms, plus 4 deltas and 32 tokens of them: 8 + 3.2 ms.
  EXPECT_NEAR(on_cpu->ttft_ms.p50, 4.2 + 8 + 3.2, 1e-9);
  // Decode: 1 + 0.4 ms, plus 4 deltas and 4 tokens: 8 + 0.4 ms.
  EXPECT_NEAR(on_cpu->tpot_ms.p50, 1.4 + 8.4, 1e-9);

  // The same fine-tune for all: one load, one delta per step.
  for (Conversation& conv : w) conv.fine_tune = 0;
  const absl::StatusOr<SimResult> one = Simulate(w, c);
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(one->delta_loads, 1);
  EXPECT_NEAR(one->tpot_ms.p50, 1 + 1 + 2, 1e-9);
}

TEST(SimulateTest, RoutingByResidentDeltaAvoidsLoads) {
  WorkloadOptions o;
  o.num_requests = 400;
  o.rate_per_s = 20;
  o.prompt_tokens = {64, 64};
  o.output_tokens = {16, 16};
  o.fine_tunes = 8;
  o.fine_tune_zipf = 0;
  const absl::StatusOr<std::vector<Conversation>> w = MakeWorkload(o);
  ASSERT_TRUE(w.ok());
  SimConfig c = FourWorkers();
  c.worker.resident_deltas = 2;  // the four workers hold all eight between them
  c.worker.delta_load_s = 50e-3;
  c.router.cold_fine_tune_blocks = 0;  // residency ignored
  const absl::StatusOr<SimResult> blind = Simulate(*w, c);
  c.router.cold_fine_tune_blocks = 1000;
  const absl::StatusOr<SimResult> aware = Simulate(*w, c);
  ASSERT_TRUE(blind.ok() && aware.ok());
  EXPECT_EQ(aware->completed, 400);
  EXPECT_LT(aware->delta_loads, blind->delta_loads / 4) << blind->delta_loads;
  EXPECT_LT(aware->ttft_ms.mean, blind->ttft_ms.mean);
}

TEST(SimulateTest, RequestOverheadAddsToLatencyOnly) {
  const std::vector<Conversation> w = {Single(0, Tokens(100, 1), 10)};
  SimConfig c = Simple();
  c.request_overhead_s = 5e-3;
  const absl::StatusOr<SimResult> r = Simulate(w, c);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_NEAR(r->ttft_ms.p50, 17.0, 1e-9);
  EXPECT_NEAR(r->tpot_ms.p50, 1.1, 1e-9);
  EXPECT_NEAR(r->e2e_ms.p50, 17.0 + 9 * 1.1, 1e-9);
}

// Points from a known step cost come back as that cost: the floor (weights_s) below which small
// decode steps stay, and the compute line above it.
TEST(FitStepCostTest, RecoversTheCostThatMadeThePoints) {
  StepCost truth;
  truth.fixed_s = 0.4e-3;
  truth.weights_s = 2e-3;
  truth.token_s = 50e-6;
  truth.attention_pair_s = 0.2e-6;
  truth.sequence_s = 30e-6;
  std::vector<ProfilePoint> points;
  for (double b : {1.0, 4.0, 16.0, 64.0, 256.0}) {
    points.push_back({"decode", b, b * 129, b * 129, b, 0});
  }
  for (double l : {128.0, 256.0, 512.0}) {
    points.push_back({"prefill", l, l, l * (l + 1) / 2, 1, 0});
  }
  points.push_back({"prefill after 1024", 64, 1088, 64 * (1024 + 32.5), 1, 0});
  auto step = [](const StepCost& c, const ProfilePoint& p) {
    return c.Step(p.tokens, p.kv_tokens, p.pairs, p.sampled);
  };
  for (ProfilePoint& p : points) p.seconds = step(truth, p);
  const absl::StatusOr<StepCost> fit = FitStepCost(points);
  ASSERT_TRUE(fit.ok()) << fit.status();
  for (const ProfilePoint& p : points) {
    EXPECT_NEAR(step(*fit, p) / p.seconds, 1, 0.03) << p.what << " " << p.tokens;
  }
  EXPECT_NEAR(fit->token_s, truth.token_s, 0.05 * truth.token_s);
  EXPECT_NEAR(fit->attention_pair_s, truth.attention_pair_s, 0.05 * truth.attention_pair_s);
  EXPECT_NEAR(fit->sequence_s, truth.sequence_s, 0.1 * truth.sequence_s);

  // A purely linear cost fits with no floor.
  StepCost linear;
  linear.fixed_s = 1e-3;
  linear.token_s = 20e-6;
  linear.attention_pair_s = 0.1e-6;
  linear.sequence_s = 10e-6;
  for (ProfilePoint& p : points) p.seconds = step(linear, p);
  const absl::StatusOr<StepCost> lfit = FitStepCost(points);
  ASSERT_TRUE(lfit.ok()) << lfit.status();
  EXPECT_NEAR(lfit->fixed_s, 1e-3, 1e-6);
  EXPECT_NEAR(lfit->token_s, 20e-6, 1e-8);
  EXPECT_NEAR(lfit->weights_s, 0, 1e-6);

  EXPECT_NEAR(lfit->sequence_s, 10e-6, 1e-8);
  EXPECT_FALSE(FitStepCost({points[0], points[1], points[2]}).ok());
  std::vector<ProfilePoint> bad = points;
  bad[2].seconds = 0;
  EXPECT_EQ(FitStepCost(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CurveSvgTest, DrawsOnePointPerRateInEachPanel) {
  std::vector<CurvePoint> points;
  for (double rate : {1.0, 2.0, 4.0}) {
    CurvePoint p;
    p.rate = rate;
    p.result.ttft_ms.p99 = 10 * rate;
    p.result.tpot_ms.p99 = rate;
    points.push_back(p);
  }
  const std::string svg = CurveSvg(points, "a <title> & more");
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  size_t circles = 0;
  for (size_t at = svg.find("<circle"); at != std::string::npos; at = svg.find("<circle", at + 1)) {
    ++circles;
  }
  EXPECT_EQ(circles, 6u);
  EXPECT_NE(svg.find("a &lt;title&gt; &amp; more"), std::string::npos);
  EXPECT_NE(svg.find("p99 TTFT (ms)"), std::string::npos);
}

}  // namespace
}  // namespace strata
