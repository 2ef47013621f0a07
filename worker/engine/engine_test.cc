// The engine on a small random Llama 3 model (worker/model/testdata/llama3_bf16): greedy output
// equals a from-scratch recomputation at every step, and a sequence's output does not change when
// it runs in a batch of 16 mixed-length sequences, with chunked prefill on or off, with
// prefix-cache hits, or under preemption. Seeded sampling resumes exactly from a given position
// (failover).
#include "worker/engine/engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/test_dir.h"
#include "worker/comm/shm_collectives.h"
#include "worker/model/config.h"

namespace strata {
namespace {

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = "worker/model/testdata/llama3_bf16";
    auto config = LoadModelConfig(dir);
    ASSERT_TRUE(config.ok()) << config.status();
    auto weights = LoadModelWeights(dir, *config, 0, 1);
    ASSERT_TRUE(weights.ok()) << weights.status();
    weights_ = std::move(*weights);
  }

  std::unique_ptr<Engine> MakeEngine(EngineConfig config) {
    auto e = Engine::Create(weights_.get(), &comm_, std::move(config));
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }

  // Runs until idle; returns each request's tokens and its final output.
  std::map<std::string, std::vector<int32_t>> RunAll(
      Engine& e, std::map<std::string, RequestOutput>* last = nullptr) {
    std::map<std::string, std::vector<int32_t>> out;
    for (int steps = 0; e.HasWork() && steps < 10000; ++steps) {
      if (e.WaitingForIo()) absl::SleepFor(absl::Microseconds(200));
      auto step = e.Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) break;
      for (const RequestOutput& o : *step) {
        for (const SampledToken& t : o.tokens) out[o.request_id].push_back(t.token);
        if (last != nullptr) (*last)[o.request_id] = o;
      }
    }
    EXPECT_FALSE(e.HasWork());
    return out;
  }

  std::vector<int32_t> RandomPrompt(std::mt19937& rng, int len) {
    std::vector<int32_t> p(len);
    for (int32_t& t : p) t = std::uniform_int_distribution<int32_t>(3, 255)(rng);
    return p;
  }

  RequestOptions Greedy(int64_t max_tokens) {
    RequestOptions o;
    o.sampling.temperature = 0;
    o.max_tokens = max_tokens;
    o.ignore_eos = true;
    return o;
  }

  SingleRankCollectives comm_;
  std::unique_ptr<ModelWeights> weights_;
};

TEST_F(EngineTest, GreedyMatchesRecomputingFromScratchEachStep) {
  std::mt19937 rng(1);
  const std::vector<int32_t> prompt = RandomPrompt(rng, 23);
  auto e = MakeEngine({});
  ASSERT_TRUE(e->AddRequest("a", prompt, Greedy(12)).ok());
  const auto got = RunAll(*e)["a"];
  ASSERT_EQ(got.size(), 12u);

  ModelRunner runner(weights_.get(), &comm_);
  std::vector<int32_t> seq = prompt;
  const int64_t V = weights_->config.vocab_size;
  for (int i = 0; i < 12; ++i) {
    const int64_t n = static_cast<int64_t>(seq.size());
    const int64_t bt = 16, nb = (n + bt - 1) / bt;
    KvCacheStorage kv(*weights_, nb, bt);
    const KvCacheLayers& cache = kv.layers();
    std::vector<int32_t> pos(n), tseq(n, 0), table(nb), last = {static_cast<int32_t>(n - 1)};
    std::vector<int64_t> slots(n);
    for (int64_t p = 0; p < n; ++p) pos[p] = static_cast<int32_t>(p), slots[p] = p;
    for (int64_t b = 0; b < nb; ++b) table[b] = static_cast<int32_t>(b);
    std::vector<float> logits(V);
    ForwardBatch batch{seq, pos, tseq, slots, table, 1, nb, last, {}};
    ASSERT_TRUE(runner.Forward(batch, cache, absl::MakeSpan(logits)).ok());
    const int32_t want =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    EXPECT_EQ(got[i], want) << "step " << i;
    seq.push_back(want);
  }
}

TEST_F(EngineTest, OutputIndependentOfBatchingChunkingCachingAndPreemption) {
  std::mt19937 rng(2);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 16; ++i) prompts.push_back(RandomPrompt(rng, 1 + (i * 7) % 60));
  // Half the prompts share a 40-token prefix, so the prefix cache has something to find.
  for (int i = 8; i < 16; ++i) {
    std::copy(prompts[0].begin(), prompts[0].begin() + std::min<size_t>(40, prompts[0].size()),
              prompts[i].begin());
  }
  prompts[0] = RandomPrompt(rng, 50);
  for (int i = 8; i < 16; ++i) {
    prompts[i] = prompts[0];
    prompts[i].resize(41 + i);
    for (size_t j = 50; j < prompts[i].size(); ++j) prompts[i][j] = static_cast<int32_t>(10 + j);
  }

  // Reference: each sequence alone, one big prefill, no prefix caching.
  std::map<std::string, std::vector<int32_t>> alone;
  for (int i = 0; i < 16; ++i) {
    EngineConfig c;
    c.enable_prefix_caching = false;
    auto e = MakeEngine(c);
    ASSERT_TRUE(e->AddRequest("r" + std::to_string(i), prompts[i], Greedy(10)).ok());
    for (auto& [k, v] : RunAll(*e)) alone[k] = v;
  }

  struct Setup {
    const char* name;
    int64_t max_batch_tokens;
    int64_t num_kv_blocks;
    bool prefix_caching;
  };
  for (const Setup s : {Setup{"batched", 4096, 0, false}, Setup{"chunked", 7, 0, false},
                        Setup{"prefix cache", 64, 0, true}, Setup{"preemption", 32, 12, true}}) {
    SCOPED_TRACE(s.name);
    EngineConfig c;
    c.max_batch_tokens = s.max_batch_tokens;
    c.num_kv_blocks = s.num_kv_blocks;
    c.block_tokens = 8;
    c.enable_prefix_caching = s.prefix_caching;
    auto e = MakeEngine(c);
    const absl::Time start = absl::Now();
    for (int i = 0; i < 16; ++i) {
      ASSERT_TRUE(e->AddRequest("r" + std::to_string(i), prompts[i], Greedy(10)).ok());
    }
    std::map<std::string, RequestOutput> last;
    const auto got = RunAll(*e, &last);
    const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);
    for (int i = 0; i < 16; ++i) {
      const std::string id = "r" + std::to_string(i);
      EXPECT_EQ(got.at(id), alone.at(id)) << id;
      EXPECT_EQ(last.at(id).finish, FinishReason::kLength);
    }
    if (s.prefix_caching) {
      int64_t cached = 0;
      for (const auto& [id, o] : last) cached += o.num_cached_prompt_tokens;
      EXPECT_GT(cached, 0);
    }
    if (s.num_kv_blocks > 0) {
      EXPECT_GT(e->Stats().num_preemptions, 0);
    }
    EXPECT_EQ(e->Stats().num_free_blocks, e->Stats().num_total_blocks);
    // One queue wait a request, its first admission's: those preempted and admitted again too.
    const std::vector<double> waits = e->DrainQueueWaits();
    EXPECT_EQ(waits.size(), 16u);
    for (double w : waits) {
      EXPECT_GE(w, 0);
      EXPECT_LE(w, elapsed);
    }
    // A step prefills at most 7 tokens: the later requests wait through the earlier ones' steps.
    if (s.max_batch_tokens == 7) {
      EXPECT_GT(*std::max_element(waits.begin(), waits.end()), 0);
    }
    EXPECT_TRUE(e->DrainQueueWaits().empty());
  }
}

TEST_F(EngineTest, SecondIdenticalPromptHitsThePrefixCache) {
  std::mt19937 rng(3);
  const std::vector<int32_t> prompt = RandomPrompt(rng, 40);
  EngineConfig c;
  c.block_tokens = 8;
  auto e = MakeEngine(c);
  ASSERT_TRUE(e->AddRequest("first", prompt, Greedy(5)).ok());
  std::map<std::string, RequestOutput> last;
  const auto first = RunAll(*e, &last)["first"];
  EXPECT_EQ(last["first"].num_cached_prompt_tokens, 0);
  ASSERT_TRUE(e->AddRequest("second", prompt, Greedy(5)).ok());
  const auto second = RunAll(*e, &last)["second"];
  EXPECT_EQ(second, first);
  EXPECT_EQ(last["second"].num_cached_prompt_tokens,
            32);  // 4 full blocks; the last token recomputed
  // A different cache salt shares nothing.
  RequestOptions salted = Greedy(5);
  salted.cache_salt = "tenant-b";
  ASSERT_TRUE(e->AddRequest("third", prompt, salted).ok());
  EXPECT_EQ(RunAll(*e, &last)["third"], first);
  EXPECT_EQ(last["third"].num_cached_prompt_tokens, 0);
  EXPECT_FALSE(e->DrainBlockEvents().empty());
}

// A conversation's next turn resends the reply: the blocks the reply's tokens filled while they
// were generated are published, and the next turn takes them from the cache (all but the last
// generated token, whose K/V was never computed).
TEST_F(EngineTest, TheNextTurnFindsTheReplyInTheCache) {
  std::mt19937 rng(14);
  const std::vector<int32_t> first = RandomPrompt(rng, 40);
  EngineConfig c;
  c.block_tokens = 8;
  auto e = MakeEngine(c);
  ASSERT_TRUE(e->AddRequest("turn1", first, Greedy(17)).ok());
  const std::vector<int32_t> reply = RunAll(*e)["turn1"];
  ASSERT_EQ(reply.size(), 17u);
  std::vector<int32_t> second = first;
  second.insert(second.end(), reply.begin(), reply.end());
  const std::vector<int32_t> more = RandomPrompt(rng, 5);
  second.insert(second.end(), more.begin(), more.end());
  ASSERT_TRUE(e->AddRequest("turn2", second, Greedy(4)).ok());
  std::map<std::string, RequestOutput> last;
  const std::vector<int32_t> got = RunAll(*e, &last)["turn2"];
  EXPECT_EQ(last["turn2"].num_cached_prompt_tokens, 56);  // 40 + 16 computed: 7 blocks

  EngineConfig cold = c;
  cold.enable_prefix_caching = false;
  auto fresh = MakeEngine(cold);
  ASSERT_TRUE(fresh->AddRequest("turn2", second, Greedy(4)).ok());
  EXPECT_EQ(RunAll(*fresh)["turn2"], got);
}

// Another worker's cached blocks, copied out of its engine and into this one's, serve a prompt as
// this engine's own would: the same tokens, the copied blocks counted as cached.
TEST_F(EngineTest, KvBlocksCopiedFromAnotherEngineServeThePromptWithTheSameOutput) {
  std::mt19937 rng(21);
  const std::vector<int32_t> prompt = RandomPrompt(rng, 40);
  EngineConfig c;
  c.block_tokens = 8;
  auto source = MakeEngine(c);
  auto dest = MakeEngine(c);
  ASSERT_TRUE(source->AddRequest("a", prompt, Greedy(5)).ok());
  const std::vector<int32_t> want = RunAll(*source)["a"];
  ASSERT_EQ(source->kv_transfer_layout().block_bytes(), dest->kv_transfer_layout().block_bytes());
  EXPECT_EQ(source->kv_transfer_layout().block_bytes(), source->kv_block_bytes());
  EXPECT_FALSE(source->model_fingerprint().empty());
  EXPECT_EQ(source->model_fingerprint(), dest->model_fingerprint());

  const Engine::PromptBlocks wanted = dest->LookUpPrompt(prompt, Greedy(5));
  ASSERT_EQ(wanted.hashes.size(), 4u);  // (40 - 1) / 8: the last token's block is computed
  EXPECT_EQ(wanted.held, 0);
  const int64_t block_bytes = source->kv_transfer_layout().block_bytes();
  // At least one block, then no more than max_bytes.
  EXPECT_EQ(source->ExportKvBlocks(wanted.hashes, 1).size(), 1u);
  EXPECT_EQ(source->ExportKvBlocks(wanted.hashes, 3 * block_bytes).size(), 3u);
  std::vector<Engine::KvBlockCopy> copies = source->ExportKvBlocks(wanted.hashes, 1 << 30);
  ASSERT_EQ(copies.size(), 4u);
  for (size_t i = 0; i < copies.size(); ++i) {
    EXPECT_EQ(copies[i].key.hash, wanted.hashes[i]);
    EXPECT_EQ(copies[i].key.cache_namespace, wanted.cache_namespace);
  }
  // Blocks of another namespace (a cache salt), or cut short, are not this prompt's.
  RequestOptions salted = Greedy(5);
  salted.cache_salt = "tenant-b";
  EXPECT_EQ(dest->ImportKvBlocks(dest->LookUpPrompt(prompt, salted), "", copies), 0);
  std::vector<Engine::KvBlockCopy> short_copy = {copies[0]};
  short_copy[0].payload.pop_back();
  EXPECT_EQ(dest->ImportKvBlocks(wanted, "", short_copy), 0);
  // Out of order: the first fits, the second ends the import.
  EXPECT_EQ(dest->ImportKvBlocks(wanted, "", {copies[0], copies[2]}), 1);
  EXPECT_EQ(dest->LookUpPrompt(prompt, Greedy(5)).held, 1);
  EXPECT_EQ(dest->ImportKvBlocks(wanted, "t", copies), 3);  // the first is there already
  EXPECT_EQ(dest->LookUpPrompt(prompt, Greedy(5)).held, 4);
  EXPECT_EQ(dest->Stats().num_imported_kv_blocks, 4);
  EXPECT_EQ(source->Stats().num_exported_kv_blocks, 1 + 3 + 4);
  std::map<std::string, RequestOutput> last;
  EXPECT_EQ(RunAll(*dest, &last), (std::map<std::string, std::vector<int32_t>>{}));
  ASSERT_TRUE(dest->AddRequest("b", prompt, Greedy(5)).ok());
  EXPECT_EQ(RunAll(*dest, &last)["b"], want);
  EXPECT_EQ(last["b"].num_cached_prompt_tokens, 32);
  // Nothing held, nothing sent; without prefix caching nothing at all.
  std::vector<int32_t> other = RandomPrompt(rng, 40);
  EXPECT_TRUE(
      source->ExportKvBlocks(source->LookUpPrompt(other, Greedy(5)).hashes, 1 << 30).empty());
  EngineConfig uncached = c;
  uncached.enable_prefix_caching = false;
  auto plain = MakeEngine(uncached);
  EXPECT_FALSE(plain->kv_transfer_layout().valid());
  EXPECT_TRUE(plain->LookUpPrompt(prompt, Greedy(5)).hashes.empty());
  EXPECT_TRUE(plain->ExportKvBlocks(wanted.hashes, 1 << 30).empty());
  // A request for prompt log-probabilities computes its whole prompt.
  RequestOptions scored = Greedy(5);
  scored.prompt_logprobs = 1;
  EXPECT_TRUE(dest->LookUpPrompt(prompt, scored).hashes.empty());
}

TEST_F(EngineTest, PendingPrefillLeavesOutCachedBlocks) {
  std::mt19937 rng(9);
  const std::vector<int32_t> prompt = RandomPrompt(rng, 70);  // 4 full blocks of 16, then 6
  auto e = MakeEngine({});
  ASSERT_TRUE(e->AddRequest("a", prompt, Greedy(1)).ok());
  EXPECT_EQ(e->Stats().num_pending_prefill_tokens, 70);
  RunAll(*e);
  // Same prompt again: its 4 full blocks are cached, so only 6 tokens are still to compute.
  ASSERT_TRUE(e->AddRequest("b", prompt, Greedy(1)).ok());
  EXPECT_EQ(e->Stats().num_waiting, 1);
  EXPECT_EQ(e->Stats().num_pending_prefill_tokens, 6);
  std::map<std::string, RequestOutput> last;
  RunAll(*e, &last);
  EXPECT_EQ(last["b"].num_cached_prompt_tokens, 64);

  // Queued before the prompt it shares was computed, and not tried since (one runs at a time):
  // its estimate is made again within a step or two all the same.
  EngineConfig one;
  one.max_running_sequences = 1;
  auto e1 = MakeEngine(one);
  ASSERT_TRUE(e1->AddRequest("a", prompt, Greedy(8)).ok());
  ASSERT_TRUE(e1->AddRequest("b", prompt, Greedy(1)).ok());
  EXPECT_EQ(e1->Stats().num_pending_prefill_tokens, 140);
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(e1->Step().ok());
  EXPECT_EQ(e1->Stats().num_running, 1);
  EXPECT_EQ(e1->Stats().num_pending_prefill_tokens, 6);
}

// Four requests sharing a 64-token prefix arrive together: the first computes the prefix, and the
// other three wait one step for its blocks instead of computing them alongside (the same tokens as
// with the waiting off, where all four compute the prefix in one batch).
TEST_F(EngineTest, ABurstSharingAPrefixComputesItOnce) {
  std::mt19937 rng(12);
  const std::vector<int32_t> prefix = RandomPrompt(rng, 64);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 4; ++i) {
    prompts.push_back(prefix);
    const std::vector<int32_t> tail = RandomPrompt(rng, 6 + i);
    prompts.back().insert(prompts.back().end(), tail.begin(), tail.end());
  }
  std::map<bool, std::map<std::string, std::vector<int32_t>>> got;
  for (const bool dedupe : {false, true}) {
    SCOPED_TRACE(dedupe ? "waiting for the prefix in flight" : "computing it again");
    EngineConfig c;
    c.block_tokens = 8;
    c.inflight_prefill_min_tokens = dedupe ? 32 : 0;
    auto e = MakeEngine(c);
    for (int i = 0; i < 4; ++i) {
      ASSERT_TRUE(e->AddRequest("r" + std::to_string(i), prompts[i], Greedy(6)).ok());
    }
    auto first = e->Step();
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(e->Stats().num_running, dedupe ? 1 : 4);
    EXPECT_EQ(e->Stats().num_waiting, dedupe ? 3 : 0);
    std::map<std::string, RequestOutput> last;
    for (const RequestOutput& o : *first) {
      for (const SampledToken& t : o.tokens) got[dedupe][o.request_id].push_back(t.token);
    }
    for (auto& [id, tokens] : RunAll(*e, &last)) {
      got[dedupe][id].insert(got[dedupe][id].end(), tokens.begin(), tokens.end());
    }
    for (int i = 0; i < 4; ++i) {
      const std::string id = "r" + std::to_string(i);
      EXPECT_EQ(got[dedupe][id].size(), 6u);
      EXPECT_EQ(last[id].num_cached_prompt_tokens, dedupe && i > 0 ? 64 : 0) << id;
    }
    EXPECT_EQ(e->Stats().num_inflight_prefix_waits, dedupe ? 3 : 0);
    EXPECT_EQ(e->Stats().num_inflight_prefix_tokens, dedupe ? 3 * 64 : 0);
    EXPECT_EQ(e->Stats().num_free_blocks, e->Stats().num_total_blocks);
  }
  EXPECT_EQ(got[true], got[false]);

  // Sharing one block (8 tokens) is not worth a step's wait: both run at once.
  EngineConfig c;
  c.block_tokens = 8;
  auto e = MakeEngine(c);
  for (int i = 0; i < 2; ++i) {
    std::vector<int32_t> p(prefix.begin(), prefix.begin() + 8);
    const std::vector<int32_t> tail = RandomPrompt(rng, 40);
    p.insert(p.end(), tail.begin(), tail.end());
    ASSERT_TRUE(e->AddRequest("s" + std::to_string(i), p, Greedy(2)).ok());
  }
  ASSERT_TRUE(e->Step().ok());
  EXPECT_EQ(e->Stats().num_running, 2);
  EXPECT_EQ(e->Stats().num_inflight_prefix_waits, 0);
}

// A request that waited for a prefix, ran, and was preempted for blocks counts what the wait
// saved once: its re-admission takes its own blocks back from the cache, which is no saving of
// the wait's.
TEST_F(EngineTest, APreemptedWaiterCountsItsSavingOnce) {
  std::mt19937 rng(15);
  const std::vector<int32_t> prefix = RandomPrompt(rng, 64);
  EngineConfig c;
  c.block_tokens = 8;
  c.num_kv_blocks = 16;
  auto e = MakeEngine(c);
  for (const char* id : {"a", "b"}) {
    std::vector<int32_t> p = prefix;
    const std::vector<int32_t> tail = RandomPrompt(rng, 6);
    p.insert(p.end(), tail.begin(), tail.end());
    ASSERT_TRUE(e->AddRequest(id, p, Greedy(40)).ok());
  }
  std::map<std::string, RequestOutput> last;
  const auto got = RunAll(*e, &last);
  EXPECT_EQ(got.at("a").size(), 40u);
  EXPECT_EQ(got.at("b").size(), 40u);
  EXPECT_GT(e->Stats().num_preemptions, 0);
  EXPECT_EQ(e->Stats().num_inflight_prefix_waits, 1);
  EXPECT_EQ(e->Stats().num_inflight_prefix_tokens, 64);
}

// The request computing a prefix is cancelled while another waits for it. Its whole prompt was
// computed and published in the step the other began waiting in (a sequence whose blocks are in
// flight always publishes them in that step), so the cancel frees nothing the waiter needs: it is
// admitted in the next step, takes the published blocks from the cache, and generates what it
// generates alone.
TEST_F(EngineTest, CancellingTheRequestComputingAPrefixReleasesTheOneWaitingForIt) {
  std::mt19937 rng(13);
  const std::vector<int32_t> prompt = RandomPrompt(rng, 45);
  EngineConfig c;
  c.block_tokens = 8;
  auto alone = MakeEngine(c);
  ASSERT_TRUE(alone->AddRequest("b", prompt, Greedy(5)).ok());
  const std::vector<int32_t> want = RunAll(*alone)["b"];

  auto e = MakeEngine(c);
  ASSERT_TRUE(e->AddRequest("a", prompt, Greedy(50)).ok());
  ASSERT_TRUE(e->AddRequest("b", prompt, Greedy(5)).ok());
  ASSERT_TRUE(e->Step().ok());
  EXPECT_EQ(e->Stats().num_waiting, 1);
  EXPECT_TRUE(e->Cancel("a"));
  std::map<std::string, RequestOutput> last;
  EXPECT_EQ(RunAll(*e, &last)["b"], want);
  EXPECT_EQ(last["b"].num_cached_prompt_tokens, 40);
  EXPECT_EQ(last["a"].finish, FinishReason::kCancelled);
}

TEST_F(EngineTest, HigherPriorityIsAdmittedFirst) {
  std::mt19937 rng(4);
  EngineConfig c;
  c.max_running_sequences = 1;
  auto e = MakeEngine(c);
  RequestOptions low = Greedy(3), high = Greedy(3), mid = Greedy(3);
  high.priority = 10;
  mid.priority = 5;
  ASSERT_TRUE(e->AddRequest("low", RandomPrompt(rng, 8), low).ok());
  ASSERT_TRUE(e->AddRequest("high", RandomPrompt(rng, 8), high).ok());
  ASSERT_TRUE(e->AddRequest("mid", RandomPrompt(rng, 8), mid).ok());
  std::vector<std::string> finished;
  for (int steps = 0; e->HasWork() && steps < 100; ++steps) {
    auto step = e->Step();
    ASSERT_TRUE(step.ok());
    for (const RequestOutput& o : *step) {
      if (o.finish != FinishReason::kNone) finished.push_back(o.request_id);
    }
  }
  EXPECT_EQ(finished, (std::vector<std::string>{"high", "mid", "low"}));
}

// One sequence at a time, each request 8 prompt tokens and 3 generated: every request costs its
// tenant 8 + 2 + 3 = 13 (prompt, the two decode steps' inputs, the tokens generated).
class FairShareTest : public EngineTest {
 protected:
  void Add(Engine& e, const std::string& id, const std::string& tenant, double weight = 1) {
    RequestOptions o = Greedy(3);
    o.tenant = tenant;
    o.tenant_weight = weight;
    ASSERT_TRUE(e.AddRequest(id, RandomPrompt(rng_, 8), o).ok());
  }
  // The order requests finish in, running `e` until idle or `count` have finished.
  std::vector<std::string> Finishes(Engine& e, size_t count = SIZE_MAX) {
    std::vector<std::string> finished;
    for (int steps = 0; e.HasWork() && finished.size() < count && steps < 1000; ++steps) {
      auto step = e.Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) break;
      for (const RequestOutput& o : *step) {
        if (o.finish != FinishReason::kNone) finished.push_back(o.request_id);
      }
    }
    return finished;
  }
  EngineConfig OneAtATime(bool fair) {
    EngineConfig c;
    c.max_running_sequences = 1;
    c.fair_share = fair;
    return c;
  }
  std::mt19937 rng_{11};
};

TEST_F(FairShareTest, AQuietTenantIsNotQueuedBehindAFloodingOnesBacklog) {
  for (bool fair : {true, false}) {
    SCOPED_TRACE(fair ? "fair share" : "arrival order");
    auto e = MakeEngine(OneAtATime(fair));
    for (int i = 0; i < 5; ++i) Add(*e, absl::StrCat("f", i), "flood");
    Add(*e, "q0", "quiet");
    Add(*e, "q1", "quiet");
    const std::vector<std::string> order = Finishes(*e);
    if (fair) {
      // Level at first, the earlier goes; then whoever was served less.
      EXPECT_EQ(order, (std::vector<std::string>{"f0", "q0", "f1", "q1", "f2", "f3", "f4"}));
    } else {
      EXPECT_EQ(order, (std::vector<std::string>{"f0", "f1", "f2", "f3", "f4", "q0", "q1"}));
    }
    const EngineStats st = e->Stats();
    ASSERT_EQ(st.tenants.size(), 2u);
    EXPECT_EQ(st.tenants[0].name, "flood");
    EXPECT_EQ(st.tenants[0].admissions, 5);
    EXPECT_EQ(st.tenants[1].admissions, 2);
    EXPECT_GT(st.tenants[0].queue_wait_seconds, 0);
    EXPECT_EQ(st.tenants[0].computed_tokens, 5 * 10);
    EXPECT_EQ(st.tenants[0].generated_tokens, 5 * 3);
    EXPECT_DOUBLE_EQ(st.tenants[0].service, 5 * 13);
    EXPECT_EQ(st.tenants[1].name, "quiet");
    EXPECT_EQ(st.tenants[1].generated_tokens, 2 * 3);
    EXPECT_EQ(st.tenants[1].running + st.tenants[1].waiting, 0);
  }
}

TEST_F(FairShareTest, TenantsAreServedInProportionToTheirWeights) {
  auto e = MakeEngine(OneAtATime(true));
  for (int i = 0; i < 8; ++i) Add(*e, absl::StrCat("a", i), "a", /*weight=*/2);
  for (int i = 0; i < 8; ++i) Add(*e, absl::StrCat("b", i), "b", /*weight=*/1);
  // a's requests cost it 13 / 2 each, b's 13: two of a's to one of b's (ties to the earlier).
  const std::vector<std::string> order = Finishes(*e, 12);
  EXPECT_EQ(order, (std::vector<std::string>{"a0", "b0", "a1", "a2", "b1", "a3", "a4", "b2", "a5",
                                             "a6", "b3", "a7"}));
  const EngineStats st = e->Stats();
  ASSERT_EQ(st.tenants.size(), 2u);
  EXPECT_DOUBLE_EQ(st.tenants[0].weight, 2);
  EXPECT_DOUBLE_EQ(st.tenants[0].service, 8 * 6.5);
  EXPECT_EQ(st.tenants[1].running + st.tenants[1].waiting, 4);
}

TEST_F(FairShareTest, ATenantBanksNoCreditWhileIdle) {
  auto e = MakeEngine(OneAtATime(true));
  for (int i = 0; i < 4; ++i) Add(*e, absl::StrCat("a", i), "a");
  EXPECT_EQ(Finishes(*e).size(), 4u);
  // b arrives after a's 52 tokens of service: it starts level with a (the least served tenant at
  // work), not 52 behind, so the two take turns instead of b taking the next four places.
  for (int i = 4; i < 8; ++i) Add(*e, absl::StrCat("a", i), "a");
  for (int i = 0; i < 4; ++i) Add(*e, absl::StrCat("b", i), "b");
  EXPECT_EQ(Finishes(*e, 4), (std::vector<std::string>{"a4", "b0", "a5", "b1"}));
  // Alone, a tenant's next request starts at once whatever its count.
  EXPECT_EQ(Finishes(*e).size(), 4u);
  Add(*e, "c0", "c");
  EXPECT_EQ(Finishes(*e), (std::vector<std::string>{"c0"}));
}

// Priorities come first, fair sharing within each: the higher priority's two tenants take turns,
// then the lower's, whose less served tenant goes first. By arrival: priority, then arrival.
TEST_F(FairShareTest, EachPriorityIsSharedBetweenItsTenants) {
  for (bool fair : {true, false}) {
    SCOPED_TRACE(fair ? "fair share" : "arrival order");
    auto e = MakeEngine(OneAtATime(fair));
    const auto add = [&](const std::string& id, const std::string& tenant, int32_t priority) {
      RequestOptions o = Greedy(3);
      o.tenant = tenant;
      o.priority = priority;
      ASSERT_TRUE(e->AddRequest(id, RandomPrompt(rng_, 8), o).ok());
    };
    add("a0", "a", 0);
    add("a1", "a", 0);
    add("b0", "b", 0);
    add("c0", "c", 5);
    add("a2", "a", 5);
    add("c1", "c", 5);
    if (fair) {
      // At 5: c0 (level, earlier), a2 (a served less), c1. At 0: b0 (b served least), a0, a1.
      EXPECT_EQ(Finishes(*e), (std::vector<std::string>{"c0", "a2", "c1", "b0", "a0", "a1"}));
    } else {
      EXPECT_EQ(Finishes(*e), (std::vector<std::string>{"c0", "a2", "c1", "a0", "a1", "b0"}));
    }
  }
}

// Many tenants, each with a queue of its own: the least served tenant's oldest goes next, every
// step, whatever the queue's length.
TEST_F(FairShareTest, ManyTenantsTakeTurnsInArrivalOrderOfTheirQueues) {
  auto e = MakeEngine(OneAtATime(true));
  for (int i = 0; i < 3; ++i) {
    for (int t = 0; t < 40; ++t) Add(*e, absl::StrCat("t", t, "-", i), absl::StrCat("t", t));
  }
  const std::vector<std::string> order = Finishes(*e);
  ASSERT_EQ(order.size(), 120u);
  // Three rounds, each taking every tenant once in the order they arrived.
  for (int i = 0; i < 3; ++i) {
    for (int t = 0; t < 40; ++t) EXPECT_EQ(order[i * 40 + t], absl::StrCat("t", t, "-", i));
  }
}

// A tenant's next request that waits a step (for a prefix another of its requests is computing)
// lets the rest of that tenant's queue go first, in its turn, and is admitted itself the step
// after, taking the prefix from the cache.
TEST_F(FairShareTest, AHeadLeftWaitingLetsItsTenantsNextGoInItsTurn) {
  EngineConfig c;
  c.block_tokens = 8;
  c.max_running_sequences = 4;
  auto e = MakeEngine(c);
  const std::vector<int32_t> prefix = RandomPrompt(rng_, 64);
  const auto add = [&](const std::string& id, const std::string& tenant, bool shared) {
    RequestOptions o = Greedy(3);
    o.tenant = tenant;
    std::vector<int32_t> prompt = shared ? prefix : std::vector<int32_t>{};
    const std::vector<int32_t> tail = RandomPrompt(rng_, 8);
    prompt.insert(prompt.end(), tail.begin(), tail.end());
    ASSERT_TRUE(e->AddRequest(id, prompt, o).ok());
  };
  add("a0", "a", true);
  add("a1", "a", true);  // waits for a0's prefix
  add("a2", "a", false);
  add("b0", "b", false);
  add("b1", "b", false);
  // a0 (level, oldest); b0 (b served least); a1 waits, so a's next is a2, after b's next, b1.
  auto first = e->Step();
  ASSERT_TRUE(first.ok()) << first.status();
  std::vector<std::string> started;
  for (const RequestOutput& o : *first) started.push_back(o.request_id);
  std::sort(started.begin(), started.end());
  EXPECT_EQ(started, (std::vector<std::string>{"a0", "a2", "b0", "b1"}));
  EXPECT_EQ(e->Stats().num_waiting, 1);
  std::map<std::string, RequestOutput> last;
  RunAll(*e, &last);
  EXPECT_EQ(last["a1"].num_cached_prompt_tokens, 64);
  EXPECT_EQ(e->Stats().num_inflight_prefix_waits, 1);
}

// The admission order against the policy written out plainly, over random queues: one sequence
// at a time, so that each admission follows the last one's end; priorities first, then the tenant
// with the least service over its weight (a request of p prompt tokens and g generated costs its
// tenant p + 2g - 1 over its weight: prompt, decode inputs, tokens), then queue order.
TEST_F(FairShareTest, TheAdmissionOrderIsThePolicysOverRandomQueues) {
  std::mt19937 rng(21);
  for (int round = 0; round < 8; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    struct Request {
      std::string id, tenant;
      int priority;
      int prompt, generate;
    };
    const int num_tenants = 2 + round % 4;
    std::vector<double> weight(num_tenants);
    for (double& w : weight) w = std::uniform_int_distribution<int>(1, 3)(rng);
    std::vector<Request> requests;
    for (int i = 0; i < 24; ++i) {
      const int t = std::uniform_int_distribution<int>(0, num_tenants - 1)(rng);
      requests.push_back({absl::StrCat("r", i), absl::StrCat("t", t),
                          std::uniform_int_distribution<int>(0, round % 3)(rng),
                          std::uniform_int_distribution<int>(4, 20)(rng),
                          std::uniform_int_distribution<int>(1, 5)(rng)});
    }
    auto e = MakeEngine(OneAtATime(true));
    for (const Request& r : requests) {
      RequestOptions o = Greedy(r.generate);
      o.tenant = r.tenant;
      o.tenant_weight = weight[r.tenant[1] - '0'];
      o.priority = r.priority;
      ASSERT_TRUE(e->AddRequest(r.id, RandomPrompt(rng_, r.prompt), o).ok());
    }
    // The policy.
    std::vector<std::string> want;
    std::vector<double> service(num_tenants, 0);
    std::vector<bool> done(requests.size(), false);
    for (size_t n = 0; n < requests.size(); ++n) {
      int best = -1;
      for (int i = 0; i < static_cast<int>(requests.size()); ++i) {
        if (done[i]) continue;
        const int t = requests[i].tenant[1] - '0';
        if (best < 0) {
          best = i;
          continue;
        }
        const Request& b = requests[best];
        const int bt = b.tenant[1] - '0';
        if (requests[i].priority != b.priority) {
          if (requests[i].priority > b.priority) best = i;
        } else if (service[t] < service[bt]) {
          best = i;  // (equal service: the earlier, already best)
        }
      }
      done[best] = true;
      const Request& r = requests[best];
      service[r.tenant[1] - '0'] += (r.prompt + 2.0 * r.generate - 1) / weight[r.tenant[1] - '0'];
      want.push_back(r.id);
    }
    EXPECT_EQ(Finishes(*e), want);
  }
}

// Work done alone is not held against a tenant later: after an idle spell everyone starts level.
TEST_F(FairShareTest, AfterAnIdleSpellTenantsStartLevel) {
  auto e = MakeEngine(OneAtATime(true));
  Add(*e, "a0", "a");
  for (int i = 0; i < 4; ++i) Add(*e, absl::StrCat("b", i), "b");
  EXPECT_EQ(Finishes(*e).size(), 5u);  // a 13, b 52: b ran its last three alone
  for (int i = 1; i < 4; ++i) Add(*e, absl::StrCat("a", i), "a");
  for (int i = 4; i < 7; ++i) Add(*e, absl::StrCat("b", i), "b");
  EXPECT_EQ(Finishes(*e), (std::vector<std::string>{"a1", "b4", "a2", "b5", "a3", "b6"}));
}

TEST_F(FairShareTest, UnderKvPressureTheMostServedTenantIsPreempted) {
  // Five 16-token blocks: heavy's 40-token prompt takes 3, light's 20-token one 2, and both grow
  // out of them. heavy needs a block first. By arrival the victim is the most recently admitted,
  // light; with fair sharing it is the tenant served more, heavy itself, and light finishes first.
  for (bool fair : {true, false}) {
    SCOPED_TRACE(fair ? "fair share" : "arrival order");
    EngineConfig c;
    c.num_kv_blocks = 5;
    c.block_tokens = 16;
    c.enable_prefix_caching = false;
    c.fair_share = fair;
    auto e = MakeEngine(c);
    RequestOptions heavy = Greedy(20), light = Greedy(20);
    heavy.tenant = "heavy";
    light.tenant = "light";
    ASSERT_TRUE(e->AddRequest("h", RandomPrompt(rng_, 40), heavy).ok());
    ASSERT_TRUE(e->AddRequest("l", RandomPrompt(rng_, 20), light).ok());
    EXPECT_EQ(Finishes(*e),
              fair ? (std::vector<std::string>{"l", "h"}) : (std::vector<std::string>{"h", "l"}));
    EXPECT_GT(e->Stats().num_preemptions, 0);
  }
}

// A prompt larger than the whole cache is refused when it arrives (it could never run: it would
// prefill until the cache filled, preempt itself and start over, for ever), and the requests
// around it run; a sequence that grows to fill the cache ends there.
TEST_F(FairShareTest, APromptLargerThanTheCacheIsRefusedAndASequenceEndsWhereTheCacheDoes) {
  EngineConfig c;
  c.num_kv_blocks = 4;  // 64 tokens
  c.block_tokens = 16;
  c.max_batch_tokens = 16;  // chunked prefill: the first chunks of a long prompt would fit
  auto e = MakeEngine(c);
  RequestOptions a = Greedy(20);
  a.tenant = "a";
  ASSERT_TRUE(e->AddRequest("a-long", RandomPrompt(rng_, 8), a).ok());
  ASSERT_TRUE(e->Step().ok());
  a.max_tokens = 3;
  ASSERT_TRUE(e->AddRequest("a-short", RandomPrompt(rng_, 8), a).ok());
  RequestOptions b = Greedy(3);
  b.tenant = "b";
  const absl::Status huge = e->AddRequest("b-huge", RandomPrompt(rng_, 100), b);
  EXPECT_TRUE(absl::IsInvalidArgument(huge)) << huge;
  EXPECT_NE(huge.message().find("KV cache holds 64"), std::string::npos) << huge;
  // As long as the cache, and asking for more: the prompt is computed, the generation ends at 64.
  b.max_tokens = 40;
  ASSERT_TRUE(e->AddRequest("b-full", RandomPrompt(rng_, 60), b).ok());
  std::map<std::string, RequestOutput> last;
  const auto tokens = RunAll(*e, &last);
  EXPECT_EQ(last["a-short"].finish, FinishReason::kLength);
  EXPECT_EQ(last["a-long"].finish, FinishReason::kLength);
  EXPECT_EQ(last["b-full"].finish, FinishReason::kContextLength);
  EXPECT_EQ(tokens.at("b-full").size(), 4u);
  EXPECT_FALSE(last.contains("b-huge"));
  EXPECT_EQ(e->Stats().num_free_blocks, 4);
}

// --max_context_tokens: a worker serves shorter sequences than its model and cache allow. A
// prompt as long as the cap is refused naming it, a sequence ends at the cap however many tokens
// it asked for, and a cap the model or the cache cannot give stops the engine at creation.
TEST_F(EngineTest, AContextCapEndsSequencesThereAndRefusesPromptsAsLong) {
  std::mt19937 rng{5};
  EngineConfig c;
  c.num_kv_blocks = 16;  // 256 tokens
  c.block_tokens = 16;
  c.max_context_tokens = 40;
  auto e = MakeEngine(c);
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->MaxContextTokens(), 40);
  const absl::Status refused = e->AddRequest("long", RandomPrompt(rng, 40), Greedy(3));
  EXPECT_TRUE(absl::IsInvalidArgument(refused)) << refused;
  EXPECT_NE(refused.message().find("context of 40 (--max_context_tokens)"), std::string::npos)
      << refused;
  ASSERT_TRUE(e->AddRequest("capped", RandomPrompt(rng, 30), Greedy(50)).ok());
  ASSERT_TRUE(e->AddRequest("short", RandomPrompt(rng, 30), Greedy(5)).ok());
  std::map<std::string, RequestOutput> last;
  const auto tokens = RunAll(*e, &last);
  EXPECT_EQ(last["capped"].finish, FinishReason::kContextLength);
  EXPECT_EQ(tokens.at("capped").size(), 10u);  // 30 + 10 = 40
  EXPECT_EQ(last["short"].finish, FinishReason::kLength);
  EXPECT_FALSE(last.contains("long"));

  // Unset, the model's context or the cache's, whichever is less.
  c.max_context_tokens = 0;
  auto whole = MakeEngine(c);
  ASSERT_NE(whole, nullptr);
  EXPECT_EQ(whole->MaxContextTokens(),
            std::min<int64_t>(256, weights_->config.max_position_embeddings));

  for (int64_t bad : {int64_t{-1}, int64_t{257}, weights_->config.max_position_embeddings + 1}) {
    SCOPED_TRACE(bad);
    c.max_context_tokens = bad;
    auto e2 = Engine::Create(weights_.get(), &comm_, c);
    ASSERT_FALSE(e2.ok());
    EXPECT_TRUE(absl::IsInvalidArgument(e2.status())) << e2.status();
    EXPECT_NE(e2.status().message().find("max_context_tokens"), std::string::npos) << e2.status();
  }
}

// A tenant's stream of new prompts evicts its own cached blocks before another tenant's prefix.
TEST_F(FairShareTest, ATenantsCachedPrefixOutlastsAnothersStreamOfNewPrompts) {
  for (bool fair : {true, false}) {
    SCOPED_TRACE(fair ? "fair eviction" : "one LRU");
    EngineConfig c;
    c.num_kv_blocks = 16;
    c.block_tokens = 16;
    c.fair_cache_eviction = fair;
    auto e = MakeEngine(c);
    RequestOptions steady = Greedy(2), flood = Greedy(2);
    steady.tenant = "steady";
    flood.tenant = "flood";
    const std::vector<int32_t> system = RandomPrompt(rng_, 64);
    ASSERT_TRUE(e->AddRequest("s0", system, steady).ok());
    RunAll(*e);
    for (int i = 0; i < 6; ++i) {  // 30 blocks of new prompts through a 16-block cache
      ASSERT_TRUE(e->AddRequest(absl::StrCat("f", i), RandomPrompt(rng_, 70), flood).ok());
      RunAll(*e);
    }
    ASSERT_TRUE(e->AddRequest("s1", system, steady).ok());
    std::map<std::string, RequestOutput> last;
    RunAll(*e, &last);
    // The prompt's first three blocks (the last token is always computed).
    EXPECT_EQ(last["s1"].num_cached_prompt_tokens, fair ? 48 : 0);
  }
}

// Past 4096 tenants an engine forgets the idle ones' service counts, but a tenant keeps its
// owner id: back again, the blocks it published are still counted as its own (fair eviction).
TEST_F(FairShareTest, ATenantForgottenWhileIdleKeepsItsBlocks) {
  EngineConfig c;
  c.num_kv_blocks = 64;
  auto e = MakeEngine(c);
  RequestOptions steady = Greedy(2);
  steady.tenant = "steady";
  const std::vector<int32_t> system = RandomPrompt(rng_, 64);
  ASSERT_TRUE(e->AddRequest("s0", system, steady).ok());
  RunAll(*e);
  auto blocks_of = [&](const std::string& name) -> int64_t {
    for (const EngineStats::Tenant& t : e->Stats().tenants) {
      if (t.name == name) return t.kv_blocks[static_cast<int>(Tier::kDevice)];
    }
    return -1;  // not among the tenants it remembers
  };
  const int64_t held = blocks_of("steady");
  ASSERT_GT(held, 0);
  // 4096 tenants more, each arriving and leaving: "steady", idle, is forgotten.
  for (int i = 0; i <= 4096; ++i) {
    RequestOptions o = Greedy(2);
    o.tenant = absl::StrCat("t", i);
    const std::string id = absl::StrCat("r", i);
    ASSERT_TRUE(e->AddRequest(id, RandomPrompt(rng_, 4), o).ok());
    ASSERT_TRUE(e->Cancel(id));
  }
  RunAll(*e);
  EXPECT_EQ(blocks_of("steady"), -1);
  ASSERT_TRUE(e->AddRequest("s1", system, steady).ok());
  EXPECT_EQ(blocks_of("steady"), held);
  std::map<std::string, RequestOutput> last;
  RunAll(*e, &last);
  EXPECT_EQ(last["s1"].num_cached_prompt_tokens, 48);
}

TEST_F(FairShareTest, BadTenantFieldsAreRefused) {
  auto e = MakeEngine(EngineConfig{});
  RequestOptions o = Greedy(2);
  o.tenant = std::string(129, 't');
  absl::Status s = e->AddRequest("long", RandomPrompt(rng_, 4), o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("tenant must be"), std::string::npos) << s;
  for (double w : {0.0, -1.0, 1001.0, std::nan("")}) {
    o = Greedy(2);
    o.tenant_weight = w;
    s = e->AddRequest("weight", RandomPrompt(rng_, 4), o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << w;
    EXPECT_NE(s.message().find("tenant_weight"), std::string::npos) << s;
  }
  EXPECT_TRUE(e->AddRequest("ok", RandomPrompt(rng_, 4), Greedy(2)).ok());
  EXPECT_EQ(Finishes(*e), (std::vector<std::string>{"ok"}));
}

TEST_F(EngineTest, SeededSamplingResumesExactlyAtAPosition) {
  std::mt19937 rng(4);
  const std::vector<int32_t> prompt = RandomPrompt(rng, 9);
  RequestOptions o;
  o.sampling.temperature = 1.0f;
  o.sampling.top_p = 0.9f;
  o.sampling.seed = 1234;
  o.max_tokens = 10;
  o.ignore_eos = true;
  auto e = MakeEngine({});
  ASSERT_TRUE(e->AddRequest("full", prompt, o).ok());
  const auto full = RunAll(*e)["full"];
  ASSERT_EQ(full.size(), 10u);
  RequestOptions resumed = o;
  resumed.resume_tokens.assign(full.begin(), full.begin() + 4);
  ASSERT_TRUE(e->AddRequest("resumed", prompt, resumed).ok());
  const auto rest = RunAll(*e)["resumed"];
  EXPECT_EQ(rest, std::vector<int32_t>(full.begin() + 4, full.end()));
}

// Prompt log-probabilities score each prompt token as generation would: a greedy request's
// tokens, appended to its prompt, come back from a second request's prompt log-probabilities with
// the log-probabilities they were generated with, at rank 1. Every entry names the next prompt
// token, with its top alternatives in order, whether the prompt is prefilled whole on two threads
// or in chunks of 16 on one (the rows are scored across the host threads).
TEST_F(EngineTest, PromptLogprobsScoreEachPromptTokenAsGenerationWould) {
  std::mt19937 rng(5);
  const std::vector<int32_t> prompt = RandomPrompt(rng, 40);
  auto outputs_of = [](Engine& e) {
    std::vector<RequestOutput> all;
    for (int steps = 0; e.HasWork() && steps < 10000; ++steps) {
      auto step = e.Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) break;
      for (RequestOutput& o : *step) all.push_back(std::move(o));
    }
    return all;
  };
  RequestOptions gen = Greedy(6);
  gen.sampling.logprobs = 3;
  auto e = MakeEngine({});
  ASSERT_TRUE(e->AddRequest("gen", prompt, gen).ok());
  std::vector<SampledToken> generated;
  for (RequestOutput& o : outputs_of(*e)) {
    for (SampledToken& t : o.tokens) generated.push_back(std::move(t));
  }
  ASSERT_EQ(generated.size(), 6u);

  std::vector<int32_t> scored = prompt;
  for (const SampledToken& t : generated) scored.push_back(t.token);
  std::vector<std::vector<SampledToken>> runs;
  for (const auto& [max_batch_tokens, threads] : {std::pair{512, 2}, std::pair{16, 1}}) {
    SCOPED_TRACE(::testing::Message()
                 << "max_batch_tokens " << max_batch_tokens << " threads " << threads);
    EngineConfig c;
    c.max_batch_tokens = max_batch_tokens;
    c.compute_threads = threads;
    auto engine = MakeEngine(c);
    RequestOptions score = Greedy(1);
    score.prompt_logprobs = 4;
    ASSERT_TRUE(engine->AddRequest("score", scored, score).ok());
    std::vector<SampledToken> lp;
    for (RequestOutput& o : outputs_of(*engine)) {
      for (SampledToken& t : o.prompt_logprobs) lp.push_back(std::move(t));
    }
    ASSERT_EQ(lp.size(), scored.size() - 1);
    for (size_t k = 0; k < lp.size(); ++k) {
      SCOPED_TRACE(::testing::Message() << "prompt position " << k + 1);
      EXPECT_EQ(lp[k].token, scored[k + 1]);
      EXPECT_LE(lp[k].logprob, 0.0f);
      EXPECT_GE(lp[k].rank, 1);
      ASSERT_EQ(lp[k].top.size(), 4u);
      for (size_t i = 0; i + 1 < lp[k].top.size(); ++i) {
        EXPECT_GE(lp[k].top[i].second, lp[k].top[i + 1].second);
      }
      if (lp[k].rank == 1) {
        EXPECT_EQ(lp[k].top[0].first, lp[k].token);
        EXPECT_EQ(lp[k].top[0].second, lp[k].logprob);
      } else {
        EXPECT_GE(lp[k].top[0].second, lp[k].logprob);
      }
    }
    // The generated tokens: greedy's choices, so rank 1, at the log-probability they had.
    for (size_t j = 0; j < generated.size(); ++j) {
      const SampledToken& t = lp[prompt.size() - 1 + j];
      EXPECT_EQ(t.rank, 1) << "generated token " << j;
      EXPECT_NEAR(t.logprob, generated[j].logprob, 1e-4) << "generated token " << j;
    }
    runs.push_back(std::move(lp));
  }
  for (size_t k = 0; k < runs[0].size(); ++k) {
    EXPECT_NEAR(runs[0][k].logprob, runs[1][k].logprob, 1e-4) << "prompt position " << k + 1;
  }
}

TEST_F(EngineTest, StopConditions) {
  std::mt19937 rng(5);
  const std::vector<int32_t> prompt = RandomPrompt(rng, 5);
  auto e = MakeEngine({});
  ASSERT_TRUE(e->AddRequest("ref", prompt, Greedy(6)).ok());
  const auto ref = RunAll(*e)["ref"];
  // Stop at the third generated token by naming it a stop token.
  RequestOptions stop = Greedy(6);
  stop.stop_token_ids = {ref[2]};
  ASSERT_TRUE(e->AddRequest("stop", prompt, stop).ok());
  std::map<std::string, RequestOutput> last;
  const auto got = RunAll(*e, &last)["stop"];
  const size_t first_hit = std::find(ref.begin(), ref.end(), ref[2]) - ref.begin();
  EXPECT_EQ(got.size(), first_hit + 1);
  EXPECT_EQ(last["stop"].finish, FinishReason::kStopToken);
  // min_tokens holds the stop token back.
  stop.min_tokens = 6;
  ASSERT_TRUE(e->AddRequest("min", prompt, stop).ok());
  const auto held = RunAll(*e, &last)["min"];
  EXPECT_EQ(held.size(), 6u);
  EXPECT_EQ(std::count(held.begin(), held.end(), ref[2]), 0);
  EXPECT_EQ(last["min"].finish, FinishReason::kLength);
}

TEST_F(EngineTest, CancelFreesBlocksAtOnce) {
  std::mt19937 rng(6);
  EngineConfig c;
  c.block_tokens = 4;
  c.enable_prefix_caching = false;
  auto e = MakeEngine(c);
  const int64_t total = e->Stats().num_total_blocks;
  ASSERT_TRUE(e->AddRequest("x", RandomPrompt(rng, 30), Greedy(100)).ok());
  ASSERT_TRUE(e->Step().ok());
  EXPECT_LT(e->Stats().num_free_blocks, total);
  EXPECT_TRUE(e->Cancel("x"));
  EXPECT_EQ(e->Stats().num_free_blocks, total);
  EXPECT_FALSE(e->Cancel("x"));
  auto step = e->Step();
  ASSERT_TRUE(step.ok());
  ASSERT_EQ(step->size(), 1u);
  EXPECT_EQ((*step)[0].finish, FinishReason::kCancelled);
  EXPECT_FALSE(e->HasWork());
}

// A request id names one live request: refused while it waits or runs, free again as soon as it
// is cancelled (the cancelled one still reports) or has finished.
TEST_F(EngineTest, ARequestIdIsFreeAgainOnceCancelledOrFinished) {
  std::mt19937 rng(8);
  EngineConfig c;
  c.max_running_sequences = 1;
  auto e = MakeEngine(c);
  ASSERT_TRUE(e->AddRequest("x", RandomPrompt(rng, 8), Greedy(4)).ok());
  ASSERT_TRUE(e->AddRequest("y", RandomPrompt(rng, 8), Greedy(2)).ok());
  EXPECT_EQ(e->AddRequest("y", RandomPrompt(rng, 8), Greedy(2)).code(),
            absl::StatusCode::kAlreadyExists);  // waiting
  ASSERT_TRUE(e->Step().ok());
  EXPECT_EQ(e->AddRequest("x", RandomPrompt(rng, 8), Greedy(2)).code(),
            absl::StatusCode::kAlreadyExists);  // running
  // Cancelled while waiting, and added again before the step that reports the cancellation.
  EXPECT_TRUE(e->Cancel("y"));
  EXPECT_FALSE(e->Cancel("y"));
  ASSERT_TRUE(e->AddRequest("y", RandomPrompt(rng, 8), Greedy(2)).ok());
  std::vector<std::pair<std::string, FinishReason>> ends;
  for (int steps = 0; e->HasWork() && steps < 100; ++steps) {
    auto step = e->Step();
    ASSERT_TRUE(step.ok());
    for (const RequestOutput& o : *step) {
      if (o.finish != FinishReason::kNone) ends.push_back({o.request_id, o.finish});
    }
  }
  EXPECT_EQ(ends,
            (std::vector<std::pair<std::string, FinishReason>>{{"y", FinishReason::kCancelled},
                                                               {"x", FinishReason::kLength},
                                                               {"y", FinishReason::kLength}}));
  ASSERT_TRUE(e->AddRequest("x", RandomPrompt(rng, 8), Greedy(1)).ok());
  EXPECT_TRUE(e->Cancel("x"));
  EXPECT_EQ(e->Stats().num_waiting, 0);
}

TEST_F(EngineTest, BadRequestsAreRefusedAndTheEngineKeepsServing) {
  auto e = MakeEngine({});
  EXPECT_EQ(e->AddRequest("a", {}, Greedy(4)).message(), "prompt must not be empty");
  EXPECT_EQ(e->AddRequest("a", {1, 999}, Greedy(4)).message(),
            "prompt holds token id 999 outside the vocabulary [0, 256)");
  RequestOptions bad = Greedy(4);
  bad.sampling.top_p = 2;
  EXPECT_EQ(e->AddRequest("a", {1, 2}, bad).code(), absl::StatusCode::kInvalidArgument);
  bad = Greedy(0);
  EXPECT_NE(e->AddRequest("a", {1, 2}, bad).message().find("max_tokens"), std::string::npos);
  ASSERT_TRUE(e->AddRequest("a", {1, 2}, Greedy(2)).ok());
  EXPECT_EQ(e->AddRequest("a", {1, 2}, Greedy(2)).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(RunAll(*e)["a"].size(), 2u);
}

// Lower KV tiers: a prefix evicted from the device cache comes back from host memory or disk, after
// a restart too, and the output is the same as computing it.
class EngineTiersTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    dir_ = FreshTestDir();
  }
  struct CopiedPrompt;
  CopiedPrompt CopyPromptAfterAHead(std::mt19937& rng);
  EngineConfig TieredConfig(int64_t host_blocks, int64_t disk_blocks) {
    EngineConfig c;
    c.num_kv_blocks = 16;
    // One compute thread: the disk tier's I/O thread is then the only other one, and TSAN (which
    // cannot see the thread pool's uninstrumented absl::Mutex) checks the store's synchronization.
    c.compute_threads = 1;
    auto probe = MakeEngine({});
    const int64_t slot = (probe->kv_block_bytes() + 64 + 4095) / 4096 * 4096;
    c.tiers.host_bytes = host_blocks * slot;
    c.tiers.disk_bytes = disk_blocks * slot;
    c.tiers.disk_path = dir_ + "/kv";
    c.tiers.disk_queue_depth = 4;
    return c;
  }
  // Runs one greedy request alone; its tokens and final output.
  std::vector<int32_t> Run(Engine& e, const std::string& id, const std::vector<int32_t>& prompt,
                           RequestOutput* last) {
    EXPECT_TRUE(e.AddRequest(id, prompt, Greedy(4)).ok());
    std::map<std::string, RequestOutput> outs;
    auto tokens = RunAll(e, &outs)[id];
    *last = outs[id];
    return tokens;
  }
  static int64_t Cached(const RequestOutput& o, Tier t) {
    return o.num_cached_prompt_tokens_by_tier[static_cast<int>(t)];
  }

  std::string dir_;
};

TEST_F(EngineTiersTest, EvictedPrefixesComeBackFromHostAndDiskWithTheSameOutput) {
  std::mt19937 rng(7);
  const std::vector<int32_t> a = RandomPrompt(rng, 100), b = RandomPrompt(rng, 100),
                             c = RandomPrompt(rng, 100);
  // Reference: no tiers, nothing cached.
  RequestOutput out;
  std::vector<int32_t> want;
  {
    EngineConfig one_thread;
    one_thread.compute_threads = 1;  // see TieredConfig
    auto ref = MakeEngine(one_thread);
    want = Run(*ref, "ref", a, &out);
  }
  auto e = MakeEngine(TieredConfig(/*host_blocks=*/8, /*disk_blocks=*/64));
  ASSERT_NE(e->kv_store(), nullptr);
  EXPECT_EQ(Run(*e, "a1", a, &out), want);
  EXPECT_EQ(out.num_cached_prompt_tokens, 0);
  // b and c push a's six full blocks out of the 16-block device cache and the 8-block host tier.
  Run(*e, "b", b, &out);
  Run(*e, "c", c, &out);
  Run(*e, "b2", b, &out);
  EXPECT_EQ(Run(*e, "a2", a, &out), want);
  EXPECT_EQ(out.num_cached_prompt_tokens, 96);  // (100 - 1) / 16 full blocks
  EXPECT_EQ(Cached(out, Tier::kDevice) + Cached(out, Tier::kHost) + Cached(out, Tier::kDisk), 96);
  EXPECT_GT(Cached(out, Tier::kDisk), 0);
  const KvStoreStats st = e->Stats().tiers;
  EXPECT_GT(st.write_backs, 0);
  EXPECT_GT(st.loads, 0);
  EXPECT_EQ(st.corrupt_blocks, 0);
  // Events name the tiers.
  bool host_event = false, disk_event = false;
  for (const BlockEvent& ev : e->DrainBlockEvents()) {
    host_event |= ev.tier == Tier::kHost;
    disk_event |= ev.tier == Tier::kDisk;
  }
  EXPECT_TRUE(host_event);
  EXPECT_TRUE(disk_event);

  // A new engine on the same disk file (a worker restart) finds a's blocks there.
  Run(*e, "c2", c, &out);  // a2's blocks written back (kept warm, then evicted) as well
  e->Step().IgnoreError();
  e.reset();
  auto restarted = MakeEngine(TieredConfig(8, 64));
  EXPECT_GT(restarted->Stats().tiers.disk_recovered, 0);
  EXPECT_EQ(Run(*restarted, "a3", a, &out), want);
  EXPECT_GT(Cached(out, Tier::kDisk), 0);
  EXPECT_EQ(out.num_cached_prompt_tokens, Cached(out, Tier::kDisk) + Cached(out, Tier::kHost));
}

// With fair eviction a tenant's prefix larger than its share of the device cache keeps its
// overflow in the host tier while another tenant streams new prompts through both: the host
// tier, too, evicts from the tenant holding the most blocks there (the owners reach it through
// the device cache's eviction and kept-warm turns).
TEST_F(EngineTiersTest, FairEvictionKeepsATenantsOverflowInHostThroughAnothersStream) {
  std::map<bool, int64_t> cached;
  for (bool fair : {true, false}) {
    SCOPED_TRACE(fair ? "fair eviction" : "one LRU");
    std::mt19937 rng(11);
    EngineConfig c = TieredConfig(/*host_blocks=*/12, /*disk_blocks=*/0);
    c.block_tokens = 16;
    c.fair_cache_eviction = fair;
    auto e = MakeEngine(c);
    RequestOptions steady = Greedy(2), flood = Greedy(2);
    steady.tenant = "steady";
    flood.tenant = "flood";
    const std::vector<int32_t> system = RandomPrompt(rng, 160);  // 10 blocks of 16
    ASSERT_TRUE(e->AddRequest("s0", system, steady).ok());
    RunAll(*e);
    for (int i = 0; i < 8; ++i) {  // 40 blocks of new prompts
      ASSERT_TRUE(e->AddRequest(absl::StrCat("f", i), RandomPrompt(rng, 70), flood).ok());
      RunAll(*e);
    }
    ASSERT_TRUE(e->AddRequest("s1", system, steady).ok());
    std::map<std::string, RequestOutput> last;
    RunAll(*e, &last);
    cached[fair] = last["s1"].num_cached_prompt_tokens;
    if (fair) {
      EXPECT_GT(Cached(last["s1"], Tier::kHost), 0);
    }
    // Each tenant's blocks by tier, as the worker's metrics show them: every host block is
    // someone's, and both tenants hold some there.
    const EngineStats st = e->Stats();
    int64_t host = 0;
    for (const EngineStats::Tenant& t : st.tenants) {
      EXPECT_GT(t.kv_blocks[static_cast<int>(Tier::kDevice)], 0) << t.name;
      EXPECT_GT(t.kv_blocks[static_cast<int>(Tier::kHost)], 0) << t.name;
      EXPECT_EQ(t.kv_blocks[static_cast<int>(Tier::kDisk)], 0) << t.name;  // none configured
      host += t.kv_blocks[static_cast<int>(Tier::kHost)];
    }
    EXPECT_EQ(st.tenants.size(), 2u);
    EXPECT_EQ(host, st.tiers.host.num_used);
  }
  // The whole prefix but the last token's block (159 / 16 = 9 blocks), against a part of it.
  EXPECT_EQ(cached[true], 144);
  EXPECT_LT(cached[false], 144);
}

TEST_F(EngineTiersTest, PersistKvHandsTheWholeCacheToTheNextEngine) {
  std::mt19937 rng(11);
  const std::vector<int32_t> a = RandomPrompt(rng, 100);
  RequestOutput out;
  std::vector<int32_t> want;
  {
    // A host tier smaller than what comes down, and nothing kept warm: a's six blocks are on the
    // device only, and reach the disk through the host tier four at a time.
    EngineConfig c = TieredConfig(/*host_blocks=*/4, /*disk_blocks=*/64);
    c.keep_finished_warm = false;
    auto e = MakeEngine(c);
    want = Run(*e, "a1", a, &out);
    EXPECT_EQ(e->Stats().tiers.host.stores, 0);
    std::atomic<bool> cancelled{true};
    EXPECT_EQ(e->PersistKv(absl::InfiniteFuture(), &cancelled), 0);  // a second signal
    EXPECT_EQ(e->PersistKv(absl::InfiniteFuture()), 6);              // (100 - 1) / 16 full blocks
    EXPECT_EQ(e->Stats().tiers.lost_evictions, 0);
    EXPECT_EQ(e->PersistKv(absl::InfiniteFuture()), 0);  // all of them on disk already
  }
  auto restarted = MakeEngine(TieredConfig(32, 64));
  EXPECT_EQ(restarted->Stats().tiers.disk_recovered, 6);
  EXPECT_EQ(Run(*restarted, "a2", a, &out), want);
  EXPECT_EQ(Cached(out, Tier::kDisk), 96);
  // Without a disk tier there is nothing to persist to.
  auto host_only = MakeEngine(TieredConfig(32, 0));
  Run(*host_only, "a3", a, &out);
  EXPECT_EQ(host_only->PersistKv(absl::InfiniteFuture()), 0);
}

TEST_F(EngineTiersTest, HostBlocksArePromotedToFreeDeviceBlocksOnArrival) {
  std::mt19937 rng(9);
  const std::vector<int32_t> a = RandomPrompt(rng, 80), b = RandomPrompt(rng, 200);
  auto e = MakeEngine(TieredConfig(/*host_blocks=*/32, /*disk_blocks=*/0));
  RequestOutput out;
  // a: 5 full blocks cached on the device (and kept warm in host); its partial block is freed.
  const std::vector<int32_t> want = Run(*e, "a1", a, &out);
  // b takes 13 of the 16 device blocks: the 11 free ones and a's last two, tail first. Finished,
  // it leaves one free block (its partial one).
  Run(*e, "b", b, &out);
  EXPECT_EQ(e->Stats().tiers.lower_tier_hits, 0);
  // a again: its first 4 blocks are usable ((80 - 1) / 16); blocks 0-2 are on the device, block 3
  // in host, and on arrival it is copied into the free device block.
  const std::vector<int32_t> got = Run(*e, "a2", a, &out);
  EXPECT_EQ(got, want);
  EXPECT_EQ(out.num_cached_prompt_tokens, 64);
  EXPECT_EQ(Cached(out, Tier::kDevice), 48);
  EXPECT_EQ(Cached(out, Tier::kHost), 16);  // counted by where it was when a2 arrived
  const KvStoreStats st = e->Stats().tiers;
  EXPECT_EQ(st.lower_tier_hits, 1);
  EXPECT_EQ(st.lower_tier_hits_covered, 1);
  EXPECT_EQ(st.prefetch_promoted, 1);
  EXPECT_EQ(st.prefetch_used, 1);
}

// Blocks evicted to the host tier are copied out from there, after those still on the device.
TEST_F(EngineTiersTest, KvBlocksAreCopiedOutOfTheHostTierToo) {
  std::mt19937 rng(10);
  const std::vector<int32_t> a = RandomPrompt(rng, 100), b = RandomPrompt(rng, 200);
  auto source = MakeEngine(TieredConfig(/*host_blocks=*/32, /*disk_blocks=*/0));
  RequestOutput out;
  const std::vector<int32_t> want = Run(*source, "a", a, &out);
  Run(*source, "b", b, &out);  // pushes some of a's blocks down to the host tier
  EngineConfig one_thread;
  one_thread.compute_threads = 1;
  auto dest = MakeEngine(one_thread);
  const Engine::PromptBlocks wanted = dest->LookUpPrompt(a, Greedy(4));
  ASSERT_EQ(wanted.hashes.size(), 6u);
  const Engine::PromptBlocks at_source = source->LookUpPrompt(a, Greedy(4));
  EXPECT_EQ(at_source.held, 6);
  const int64_t host_hits = source->Stats().tiers.host.hits;
  const std::vector<Engine::KvBlockCopy> copies = source->ExportKvBlocks(wanted.hashes, 1 << 30);
  ASSERT_EQ(copies.size(), 6u);
  EXPECT_GT(source->Stats().tiers.host.hits, host_hits);
  EXPECT_EQ(dest->ImportKvBlocks(wanted, "", copies), 6);
  EXPECT_EQ(Run(*dest, "a2", a, &out), want);
  EXPECT_EQ(out.num_cached_prompt_tokens, 96);
}

// Blocks that went down to the disk tier are copied out too, once an export has them loaded back
// into the host tier (PrefetchForExport, then PollIo as the loads land).
TEST_F(EngineTiersTest, KvBlocksAreCopiedOutOfTheDiskTierOnceLoaded) {
  std::mt19937 rng(12);
  const std::vector<int32_t> a = RandomPrompt(rng, 100), b = RandomPrompt(rng, 100),
                             c = RandomPrompt(rng, 100);
  auto source = MakeEngine(TieredConfig(/*host_blocks=*/8, /*disk_blocks=*/64));
  RequestOutput out;
  const std::vector<int32_t> want = Run(*source, "a", a, &out);
  // b and c push a's blocks out of the device cache and the host tier, onto the disk.
  Run(*source, "b", b, &out);
  Run(*source, "c", c, &out);
  Run(*source, "b2", b, &out);
  EngineConfig one_thread;
  one_thread.compute_threads = 1;
  auto dest = MakeEngine(one_thread);
  const Engine::PromptBlocks wanted = dest->LookUpPrompt(a, Greedy(4));
  ASSERT_EQ(wanted.hashes.size(), 6u);
  std::vector<Engine::KvBlockCopy> copies = source->ExportKvBlocks(wanted.hashes, 1 << 30);
  ASSERT_LT(copies.size(), 6u);  // some are on disk only (or still being written there)
  // As an export does: load the rest, send what landed, until the chain is sent or ends. A block
  // still being written to disk counts as coming: it loads on a later call.
  for (int i = 0; i < 2000 && copies.size() < 6; ++i) {
    const auto rest = absl::MakeConstSpan(wanted.hashes).subspan(copies.size());
    ASSERT_GT(source->PrefetchForExport(rest), 0) << copies.size() << " sent";
    absl::SleepFor(absl::Milliseconds(1));
    source->PollIo();
    for (auto& m : source->ExportKvBlocks(rest, 1 << 30)) copies.push_back(std::move(m));
  }
  ASSERT_EQ(copies.size(), 6u);
  EXPECT_EQ(dest->ImportKvBlocks(wanted, "", copies), 6);
  EXPECT_EQ(Run(*dest, "a2", a, &out), want);
  EXPECT_EQ(out.num_cached_prompt_tokens, 96);
  EXPECT_EQ(source->PrefetchForExport({}), 0);
}

// Copies stored after a prefix this engine holds in host memory are used too: admission restores
// the host blocks and goes on into the copied device blocks.
TEST_F(EngineTiersTest, CopiedBlocksAfterAHostPrefixAreUsed) {
  std::mt19937 rng(12);
  const std::vector<int32_t> p = RandomPrompt(rng, 100), filler = RandomPrompt(rng, 240);
  auto source = MakeEngine(TieredConfig(/*host_blocks=*/32, /*disk_blocks=*/0));
  RequestOutput out;
  const std::vector<int32_t> want = Run(*source, "p", p, &out);
  auto dest = MakeEngine(TieredConfig(/*host_blocks=*/32, /*disk_blocks=*/0));
  // p's first two blocks, then a filler that takes all 16 device blocks: those two go to host.
  Run(*dest, "head", std::vector<int32_t>(p.begin(), p.begin() + 33), &out);
  Run(*dest, "filler", filler, &out);
  const Engine::PromptBlocks wanted = dest->LookUpPrompt(p, Greedy(4));
  ASSERT_EQ(wanted.hashes.size(), 6u);
  ASSERT_EQ(wanted.held, 2);
  EXPECT_EQ(dest->kv_store()->Find(wanted.hashes[0]), KvStore::Where::kHost);
  const std::vector<Engine::KvBlockCopy> copies = source->ExportKvBlocks(
      absl::MakeConstSpan(wanted.hashes).subspan(static_cast<size_t>(wanted.held)), 1 << 30);
  ASSERT_EQ(copies.size(), 4u);
  EXPECT_EQ(dest->ImportKvBlocks(wanted, "", copies), 4);
  // This engine copies the whole chain out in turn, block by block from where each is: the first
  // two from host memory, the rest from the device.
  EXPECT_EQ(dest->HeldPrefix(wanted.hashes), 6);
  const std::vector<Engine::KvBlockCopy> again = dest->ExportKvBlocks(wanted.hashes, 1 << 30);
  ASSERT_EQ(again.size(), 6u);
  for (size_t i = 0; i < again.size(); ++i) {
    EXPECT_EQ(again[i].key.hash, wanted.hashes[i]) << i;
    if (i >= 2) {
      EXPECT_EQ(again[i].payload, copies[i - 2].payload) << i;
    }
  }
  EXPECT_EQ(Run(*dest, "p2", p, &out), want);
  EXPECT_EQ(out.num_cached_prompt_tokens, 96);
}

// A prompt's blocks written through to disk as it finishes, more of them than the host tier has
// slots (each pinned while its write is in flight): the engine waits for the disk rather than drop
// the rest, so the whole chain is on disk, and other prompts pushing it out of memory lose none of
// it.
TEST_F(EngineTiersTest, ABurstLargerThanTheHostTierReachesTheDiskWhole) {
  std::mt19937 rng(77);
  const std::vector<int32_t> a = RandomPrompt(rng, 240);
  EngineConfig c = TieredConfig(/*host_blocks=*/8, /*disk_blocks=*/256);
  c.write_through_hot_blocks = true;
  auto e = MakeEngine(c);
  RequestOutput out;
  const std::vector<int32_t> want = Run(*e, "a", a, &out);
  for (int i = 0; i < 4; ++i) Run(*e, "f" + std::to_string(i), RandomPrompt(rng, 240), &out);
  const Engine::PromptBlocks held = e->LookUpPrompt(a, Greedy(4));
  ASSERT_EQ(held.hashes.size(), 14u);
  EXPECT_EQ(held.held, 14);
  const KvStoreStats st = e->Stats().tiers;
  EXPECT_EQ(st.dropped_puts, 0);
  EXPECT_EQ(st.lost_evictions, 0);
  EXPECT_GT(st.disk_waits, 0);
  EXPECT_EQ(Run(*e, "a2", a, &out), want);
  EXPECT_EQ(out.num_cached_prompt_tokens, 14 * 16);
}

// Copies that arrive after the prompt's own cached head left every tier here are of no use (a
// prompt's cache is a prefix): they are not stored, and the prompt computes as it would have.
// A 100-token prompt computed on a source engine, and a destination that holds its first two
// blocks (the rest copied out of the source), both with 16 device blocks and 32 in host memory.
struct EngineTiersTest::CopiedPrompt {
  std::vector<int32_t> prompt, want;
  std::unique_ptr<Engine> source, dest;
  Engine::PromptBlocks wanted;
  std::vector<Engine::KvBlockCopy> copies;
};

EngineTiersTest::CopiedPrompt EngineTiersTest::CopyPromptAfterAHead(std::mt19937& rng) {
  CopiedPrompt c;
  c.prompt = RandomPrompt(rng, 100);
  c.source = MakeEngine(TieredConfig(/*host_blocks=*/32, /*disk_blocks=*/0));
  RequestOutput out;
  c.want = Run(*c.source, "p", c.prompt, &out);
  c.dest = MakeEngine(TieredConfig(/*host_blocks=*/32, /*disk_blocks=*/0));
  Run(*c.dest, "head", std::vector<int32_t>(c.prompt.begin(), c.prompt.begin() + 33), &out);
  c.wanted = c.dest->LookUpPrompt(c.prompt, Greedy(4));
  EXPECT_EQ(c.wanted.held, 2);
  c.copies = c.source->ExportKvBlocks(
      absl::MakeConstSpan(c.wanted.hashes).subspan(static_cast<size_t>(c.wanted.held)), 1 << 30);
  return c;
}

TEST_F(EngineTiersTest, CopiesAfterAHeadThatLeftTheCacheAreDropped) {
  std::mt19937 rng(13);
  CopiedPrompt c = CopyPromptAfterAHead(rng);
  ASSERT_EQ(c.copies.size(), 4u);
  auto& [p, want, source, dest, wanted, copies] = c;
  RequestOutput out;
  // While they were on their way, other prompts pushed the head out of the device and host tiers.
  for (int i = 0; i < 8 && dest->HeldPrefix(wanted.hashes) > 0; ++i) {
    Run(*dest, "filler" + std::to_string(i), RandomPrompt(rng, 240), &out);
  }
  ASSERT_EQ(dest->HeldPrefix(wanted.hashes), 0);
  EXPECT_EQ(dest->ImportKvBlocks(wanted, "", copies), 0);
  EXPECT_EQ(dest->Stats().num_imported_kv_blocks, 0);
  EXPECT_EQ(Run(*dest, "p2", p, &out), want);
  EXPECT_EQ(out.num_cached_prompt_tokens, 0);
}

// An import in several calls under one lease (copies stored as they arrive): what the lease holds
// (the prompt's head here and the blocks stored so far) stays while other prompts run between the
// calls, however much they need, and the prompt is served from all of it afterwards.
TEST_F(EngineTiersTest, AnImportLeaseKeepsTheHeadAndStoredBlocksBetweenCalls) {
  std::mt19937 rng(14);
  CopiedPrompt c = CopyPromptAfterAHead(rng);
  ASSERT_EQ(c.copies.size(), 4u);
  auto& [p, want, source, dest, wanted, copies] = c;
  RequestOutput out;
  Engine::ImportLease lease;
  EXPECT_EQ(dest->ImportKvBlocks(wanted, "", absl::MakeConstSpan(copies).subspan(0, 2), &lease), 2);
  EXPECT_EQ(lease.covered, 4);
  // More prompts than the device and host tiers hold together (8 x 7 blocks against 48).
  for (int i = 0; i < 8; ++i) {
    Run(*dest, "filler" + std::to_string(i), RandomPrompt(rng, 100), &out);
  }
  EXPECT_GE(dest->HeldPrefix(wanted.hashes), 4);
  Engine::PromptBlocks rest = wanted;
  rest.held = 4;
  EXPECT_EQ(dest->ImportKvBlocks(rest, "", absl::MakeConstSpan(copies).subspan(2), &lease), 2);
  EXPECT_EQ(lease.covered, 6);
  // A call that does not continue where the lease stopped stores nothing.
  EXPECT_EQ(dest->ImportKvBlocks(wanted, "", copies, &lease), 0);
  dest->EndImport(&lease);
  EXPECT_EQ(dest->Stats().num_imported_kv_blocks, 4);
  EXPECT_EQ(Run(*dest, "p2", p, &out), want);
  EXPECT_EQ(out.num_cached_prompt_tokens, 96);
}

TEST_F(EngineTiersTest, QuantizedTiersServeCloseOutput) {
  std::mt19937 rng(11);
  const std::vector<int32_t> a = RandomPrompt(rng, 100), b = RandomPrompt(rng, 200);
  for (KvCompression comp : {KvCompression::kInt8, KvCompression::kFp8E4M3}) {
    EngineConfig c = TieredConfig(/*host_blocks=*/16, /*disk_blocks=*/0);
    c.tiers.compression = comp;
    auto e = MakeEngine(c);
    RequestOutput out;
    const std::vector<int32_t> want = Run(*e, "a1", a, &out);
    Run(*e, "b", b, &out);
    const std::vector<int32_t> got = Run(*e, "a2", a, &out);
    EXPECT_GT(Cached(out, Tier::kHost), 0) << KvCompressionName(comp);
    // The first token follows the last prompt position, computed fresh over dequantized keys and
    // values: on this model the greedy choice survives 8-bit KV.
    ASSERT_FALSE(got.empty());
    EXPECT_EQ(got[0], want[0]) << KvCompressionName(comp);
  }
}

TEST_F(EngineTiersTest, BadTierSettingsAreRefused) {
  EngineConfig c = TieredConfig(0, 8);
  EXPECT_TRUE(absl::IsInvalidArgument(Engine::Create(weights_.get(), &comm_, c).status()));
  c = TieredConfig(8, 0);
  c.enable_prefix_caching = false;
  EXPECT_TRUE(absl::IsInvalidArgument(Engine::Create(weights_.get(), &comm_, c).status()));
}

// Tensor parallelism on the CPU: rank 0's engine drives a second rank (a thread of this process,
// as a worker's follower process would) through a shared-memory group.
class TensorParallelGroup {
 public:
  // Starts ranks 1 .. world-1 in ServeFollower on their shards of `dir`'s model.
  TensorParallelGroup(const std::string& dir, int world) {
    auto config = LoadModelConfig(dir);
    EXPECT_TRUE(config.ok());
    auto group = ShmGroup::Create(world, 64 << 10);
    EXPECT_TRUE(group.ok()) << group.status();
    group_ = std::make_unique<ShmGroup>(*std::move(group));
    for (int r = 0; r < world; ++r) {
      auto w = LoadModelWeights(dir, *config, r, world);
      EXPECT_TRUE(w.ok()) << w.status();
      shards_.push_back(*std::move(w));
      auto c = ShmCollectives::Join(group_->control_fd(), group_->memory_fd(), r, world);
      EXPECT_TRUE(c.ok()) << c.status();
      comms_.push_back(*std::move(c));
    }
    statuses_.resize(world);
    for (int r = 1; r < world; ++r) {
      followers_.emplace_back([this, r] {
        ModelRunner runner(shards_[r].get(), comms_[r].get(), /*num_threads=*/1);
        statuses_[r] = runner.ServeFollower();
      });
    }
  }
  // Waits for the followers, which return once rank 0's engine is gone (or, after a failed test
  // that left them waiting, once the group is aborted).
  ~TensorParallelGroup() {
    if (::testing::Test::HasFailure()) comms_[0]->Abort("the test failed");
    for (std::thread& t : followers_) t.join();
    for (size_t r = 1; r < statuses_.size() && !::testing::Test::HasFailure(); ++r) {
      EXPECT_TRUE(statuses_[r].ok()) << "rank " << r << ": " << statuses_[r];
    }
  }
  const ModelWeights* weights() const { return shards_[0].get(); }
  Collectives* comm() const { return comms_[0].get(); }

 private:
  std::unique_ptr<ShmGroup> group_;
  std::vector<std::unique_ptr<ModelWeights>> shards_;
  std::vector<std::unique_ptr<ShmCollectives>> comms_;
  std::vector<absl::Status> statuses_;
  std::vector<std::thread> followers_;
};

TEST_F(EngineTest, TwoTensorParallelRanksGenerateTheSingleRanksTokens) {
  std::mt19937 rng(5);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 10; ++i) prompts.push_back(RandomPrompt(rng, 3 + (i * 11) % 50));
  prompts[9] = prompts[8];  // a prefix-cache hit
  prompts[9].push_back(7);
  EngineConfig c;
  c.max_batch_tokens = 24;  // chunked prefill mixed with decode
  c.num_kv_blocks = 20;     // and preemption
  c.block_tokens = 8;
  c.compute_threads = 1;
  const auto submit = [&](Engine& e) {
    for (int i = 0; i < 10; ++i) {
      ASSERT_TRUE(e.AddRequest("r" + std::to_string(i), prompts[i], Greedy(8)).ok());
    }
  };
  auto single = MakeEngine(c);
  submit(*single);
  const auto want = RunAll(*single);

  TensorParallelGroup group("worker/model/testdata/llama3_bf16", 2);
  auto e = Engine::Create(group.weights(), group.comm(), c);
  ASSERT_TRUE(e.ok()) << e.status();
  // A block is both ranks' halves of the KV heads.
  EXPECT_EQ((*e)->kv_block_bytes(), single->kv_block_bytes());
  submit(**e);
  EXPECT_EQ(RunAll(**e), want);
  EXPECT_GT((*e)->Stats().num_preemptions, 0);

  // With speculative decoding's drafts (steps of one sequence's several tokens) too, on a group
  // of its own (an engine's end stops its group's other ranks).
  c.num_speculative_tokens = 4;
  c.speculative_max_batch = 64;
  c.prompt_lookup_min = 1;  // random prompts repeat single tokens, seldom pairs
  TensorParallelGroup group2("worker/model/testdata/llama3_bf16", 2);
  auto drafting = Engine::Create(group2.weights(), group2.comm(), c);
  ASSERT_TRUE(drafting.ok()) << drafting.status();
  submit(**drafting);
  EXPECT_EQ(RunAll(**drafting), want);
  EXPECT_GT((*drafting)->Stats().num_draft_tokens, 0);
}

TEST_F(EngineTiersTest, TensorParallelBlocksMoveThroughHostAndDiskWithEveryRanksShare) {
  std::mt19937 rng(9);
  const std::vector<int32_t> a = RandomPrompt(rng, 100), b = RandomPrompt(rng, 100),
                             c = RandomPrompt(rng, 100);
  RequestOutput out;
  std::vector<int32_t> want;
  {
    EngineConfig one_thread;
    one_thread.compute_threads = 1;
    auto ref = MakeEngine(one_thread);
    want = Run(*ref, "ref", a, &out);
  }
  {
    TensorParallelGroup group("worker/model/testdata/llama3_bf16", 2);
    auto e = Engine::Create(group.weights(), group.comm(), TieredConfig(8, 64));
    ASSERT_TRUE(e.ok()) << e.status();
    EXPECT_EQ(Run(**e, "a1", a, &out), want);
    Run(**e, "b", b, &out);
    Run(**e, "c", c, &out);
    Run(**e, "b2", b, &out);
    // a's blocks come back from host and disk into both ranks' caches: any half missing or
    // misplaced changes the tokens.
    EXPECT_EQ(Run(**e, "a2", a, &out), want);
    EXPECT_EQ(out.num_cached_prompt_tokens, 96);
    EXPECT_GT(Cached(out, Tier::kDisk), 0);
    EXPECT_EQ((*e)->Stats().tiers.corrupt_blocks, 0);
  }
  // A single-rank worker on the same disk file does not take the two-rank blocks for its own.
  auto restarted = MakeEngine(TieredConfig(8, 64));
  EXPECT_EQ(restarted->Stats().tiers.disk_recovered, 0);
  EXPECT_EQ(Run(*restarted, "a3", a, &out), want);
}

TEST_F(EngineTest, OnlyRankZeroOfAMatchingGroupDrivesAnEngine) {
  auto group = ShmGroup::Create(2, 64 << 10);
  ASSERT_TRUE(group.ok());
  auto rank1 = ShmCollectives::Join(group->control_fd(), group->memory_fd(), 1, 2);
  ASSERT_TRUE(rank1.ok());
  auto config = LoadModelConfig("worker/model/testdata/llama3_bf16");
  ASSERT_TRUE(config.ok());
  auto shard = LoadModelWeights("worker/model/testdata/llama3_bf16", *config, 1, 2);
  ASSERT_TRUE(shard.ok());
  auto e = Engine::Create(shard->get(), rank1->get(), {});
  EXPECT_EQ(e.status().code(), absl::StatusCode::kFailedPrecondition) << e.status();
  // Whole weights in a group of two.
  auto rank0 = ShmCollectives::Join(group->control_fd(), group->memory_fd(), 0, 2);
  ASSERT_TRUE(rank0.ok());
  e = Engine::Create(weights_.get(), rank0->get(), {});
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << e.status();
}

}  // namespace
}  // namespace strata
