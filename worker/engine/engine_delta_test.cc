// Serving fine-tunes through the engine on the bundled strata-tiny models: one engine over the base
// with two fine-tunes registered as deltas generates, for a batch mixing all three, the greedy
// tokens that engines over each fine-tune's own weights (base + unpacked delta) generate alone.
#include <algorithm>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "common/hash.h"
#include "gtest/gtest.h"
#include "worker/comm/collectives.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"
#include "worker/model/delta.h"
#include "worker/model/delta_test_util.h"
#include "worker/model/lora.h"
#include "worker/model/weights.h"

namespace strata {
namespace {

constexpr char kBase[] = "models/strata-tiny/base";

using delta_test::TempPath;

struct Outcome {
  std::vector<int32_t> tokens;
  FinishReason finish = FinishReason::kNone;
  absl::Status error;
  int64_t cached_prompt_tokens = 0;
};

// Runs the engine until idle (at most a minute), pausing while it can only wait for loads.
std::map<std::string, Outcome> RunAll(Engine& engine) {
  std::map<std::string, Outcome> out;
  const absl::Time deadline = absl::Now() + absl::Minutes(1);
  while (engine.HasWork() && absl::Now() < deadline) {
    if (engine.WaitingForIo()) absl::SleepFor(absl::Milliseconds(1));
    absl::StatusOr<std::vector<RequestOutput>> step = engine.Step();
    EXPECT_TRUE(step.ok()) << step.status();
    if (!step.ok()) break;
    for (const RequestOutput& r : *step) {
      Outcome& o = out[r.request_id];
      for (const SampledToken& t : r.tokens) o.tokens.push_back(t.token);
      if (r.finish != FinishReason::kNone) {
        o.finish = r.finish;
        o.error = r.error;
        o.cached_prompt_tokens = r.num_cached_prompt_tokens;
      }
    }
  }
  return out;
}

RequestOptions Greedy(const std::string& fine_tune, int64_t max_tokens = 12) {
  RequestOptions o;
  o.sampling.temperature = 0;
  o.max_tokens = max_tokens;
  o.ignore_eos = true;
  o.fine_tune_id = fine_tune;
  return o;
}

class EngineDeltaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<ModelConfig> config = LoadModelConfig(kBase);
    ASSERT_TRUE(config.ok());
    config_ = *config;
    absl::StatusOr<std::unique_ptr<ModelWeights>> w = LoadModelWeights(kBase, config_, 0, 1);
    ASSERT_TRUE(w.ok());
    base_ = *std::move(w);
    c_path_ = TempPath("c.delta.safetensors");
    man_path_ = TempPath("man.delta.safetensors");
    ASSERT_TRUE(CompressDelta(kBase, "models/strata-tiny/ft-c-headers", c_path_, {}).ok());
    ASSERT_TRUE(CompressDelta(kBase, "models/strata-tiny/ft-man", man_path_, {}).ok());
  }

  EngineConfig Config(bool with_fine_tunes) {
    EngineConfig ec;
    ec.model_name = "strata-tiny";
    ec.num_kv_blocks = 256;
    ec.max_batch_tokens = 64;  // prompts prefill in several chunks, mixed with decodes
    ec.compute_threads = 2;
    if (with_fine_tunes) ec.fine_tunes = {{"c-headers", c_path_}, {"man", man_path_}};
    return ec;
  }

  // What an engine over the fine-tune's own (materialized) weights generates alone.
  std::vector<int32_t> Alone(const std::string& delta_path, const std::vector<int32_t>& prompt) {
    std::unique_ptr<ModelWeights> weights;
    if (!delta_path.empty()) {
      absl::StatusOr<std::unique_ptr<DeltaWeights>> d =
          LoadFineTune(delta_path, *base_, BaseFingerprint(*base_->files));
      EXPECT_TRUE(d.ok()) << d.status();
      absl::StatusOr<std::unique_ptr<ModelWeights>> m = MaterializeDelta(*base_, **d);
      EXPECT_TRUE(m.ok()) << m.status();
      weights = *std::move(m);
    }
    SingleRankCollectives comm;
    absl::StatusOr<std::unique_ptr<Engine>> engine =
        Engine::Create(weights != nullptr ? weights.get() : base_.get(), &comm, Config(false));
    EXPECT_TRUE(engine.ok()) << engine.status();
    EXPECT_TRUE((*engine)->AddRequest("alone", prompt, Greedy("")).ok());
    return RunAll(**engine)["alone"].tokens;
  }

  ModelConfig config_;
  std::unique_ptr<ModelWeights> base_;
  std::string c_path_, man_path_;
};

// Prompts in the bundled tokenizer's ids (any ids do: greedy decoding is deterministic).
std::vector<int32_t> Prompt(int32_t seed, int64_t len) {
  std::vector<int32_t> p = {2047};
  for (int64_t i = 1; i < len; ++i) p.push_back((seed * 131 + static_cast<int32_t>(i) * 17) % 2000);
  return p;
}

TEST_F(EngineDeltaTest, MixedBatchGeneratesWhatEachFineTuneGeneratesAlone) {
  SingleRankCollectives comm;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(base_.get(), &comm, Config(true));
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->FineTuneIds(), (std::vector<std::string>{"c-headers", "man"}));
  const std::vector<int32_t> p1 = Prompt(1, 40), p2 = Prompt(2, 70), p3 = Prompt(3, 25);
  ASSERT_TRUE((*engine)->AddRequest("base", p1, Greedy("")).ok());
  ASSERT_TRUE((*engine)->AddRequest("c", p2, Greedy("c-headers")).ok());
  ASSERT_TRUE((*engine)->AddRequest("man", p3, Greedy("man")).ok());
  ASSERT_TRUE((*engine)->AddRequest("c-on-p1", p1, Greedy("c-headers")).ok());
  const absl::Status unknown = (*engine)->AddRequest("x", p1, Greedy("nope"));
  EXPECT_EQ(unknown.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(unknown.message(), "fine_tune_id")) << unknown;

  std::map<std::string, Outcome> got = RunAll(**engine);
  for (const auto& [id, o] : got) {
    EXPECT_EQ(o.finish, FinishReason::kLength) << id;
    EXPECT_EQ(o.tokens.size(), 12u) << id;
  }
  EXPECT_EQ(got["base"].tokens, Alone("", p1));
  EXPECT_EQ(got["c"].tokens, Alone(c_path_, p2));
  EXPECT_EQ(got["man"].tokens, Alone(man_path_, p3));
  const std::vector<int32_t> c_on_p1 = Alone(c_path_, p1);
  EXPECT_EQ(got["c-on-p1"].tokens, c_on_p1);
  // The fine-tune really changes the output, and the same prompt under the base and under the
  // fine-tune share no cache (separate namespaces).
  EXPECT_NE(c_on_p1, got["base"].tokens);
  EXPECT_EQ(got["c-on-p1"].cached_prompt_tokens, 0);

  const EngineStats st = (*engine)->Stats();
  EXPECT_EQ(st.deltas.num_registered, 2);
  EXPECT_EQ(st.deltas.num_loads, 2);
  EXPECT_EQ(st.deltas.num_pinned, 0);  // every sequence let go

  // A second turn of the same fine-tune hits the loaded delta and its own prefix cache.
  ASSERT_TRUE((*engine)->AddRequest("c-again", p2, Greedy("c-headers", 4)).ok());
  got = RunAll(**engine);
  EXPECT_EQ(got["c-again"].cached_prompt_tokens, 64);
  EXPECT_EQ((*engine)->Stats().deltas.num_loads, 2);
}

// A LoRA adapter (PEFT's format, the bundled one extracted from the c-headers fine-tune) is
// served beside compressed deltas: in one batch with them and the base, it generates what the
// adapter merged into the weights generates alone, in its own cache namespace.
TEST_F(EngineDeltaTest, LoraAdaptersServeBesideDeltas) {
  constexpr char kLora[] = "models/strata-tiny/lora-c-headers";
  EngineConfig ec = Config(true);
  ec.fine_tunes.push_back({"lora-c", kLora});
  SingleRankCollectives comm;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(base_.get(), &comm, ec);
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->FineTuneIds(), (std::vector<std::string>{"c-headers", "lora-c", "man"}));
  EXPECT_EQ((*engine)->FineTuneRevision("lora-c").size(), 16u);
  const std::vector<int32_t> p1 = Prompt(12, 45), p2 = Prompt(13, 30);
  ASSERT_TRUE((*engine)->AddRequest("lora", p1, Greedy("lora-c")).ok());
  ASSERT_TRUE((*engine)->AddRequest("delta", p1, Greedy("c-headers")).ok());
  ASSERT_TRUE((*engine)->AddRequest("base", p1, Greedy("")).ok());
  ASSERT_TRUE((*engine)->AddRequest("lora-2", p2, Greedy("lora-c")).ok());
  std::map<std::string, Outcome> got = RunAll(**engine);
  for (const auto& [id, o] : got) EXPECT_EQ(o.finish, FinishReason::kLength) << id << o.error;
  const std::vector<int32_t> lora_alone = Alone(kLora, p1);
  EXPECT_EQ(got["lora"].tokens, lora_alone);
  EXPECT_EQ(got["lora-2"].tokens, Alone(kLora, p2));
  EXPECT_EQ(got["delta"].tokens, Alone(c_path_, p1));
  EXPECT_EQ(got["base"].tokens, Alone("", p1));
  EXPECT_NE(lora_alone, got["base"].tokens);
  // Three namespaces for one prompt: nothing shared.
  EXPECT_EQ(got["lora"].cached_prompt_tokens + got["delta"].cached_prompt_tokens +
                got["base"].cached_prompt_tokens,
            0);
  EXPECT_EQ((*engine)->Stats().deltas.num_pinned, 0);
}

TEST_F(EngineDeltaTest, AFineTuneThatFailsToLoadFailsItsRequestsOnly) {
  const std::string broken = TempPath("broken.delta.safetensors");
  ASSERT_TRUE(CompressDelta(kBase, "models/strata-tiny/ft-man", broken, {}).ok());
  EngineConfig ec = Config(true);
  ec.fine_tunes.push_back({"broken", broken});
  SingleRankCollectives comm;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(base_.get(), &comm, ec);
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::remove(broken.c_str());  // registered, then gone
  ASSERT_TRUE((*engine)->AddRequest("broken", Prompt(4, 20), Greedy("broken")).ok());
  ASSERT_TRUE((*engine)->AddRequest("man", Prompt(5, 20), Greedy("man")).ok());
  std::map<std::string, Outcome> got = RunAll(**engine);
  EXPECT_EQ(got["broken"].finish, FinishReason::kError);
  EXPECT_EQ(got["broken"].error.code(), absl::StatusCode::kNotFound) << got["broken"].error;
  EXPECT_EQ(got["man"].finish, FinishReason::kLength);
  EXPECT_EQ(got["man"].tokens.size(), 12u);
}

// A request that waits for KV blocks does not hold its delta: only running sequences pin, so a
// waiting one cannot keep another fine-tune's load from getting room.
TEST_F(EngineDeltaTest, OnlyRunningSequencesPinTheirDeltas) {
  EngineConfig ec = Config(true);
  ec.num_kv_blocks = 20;  // 320 tokens: the first request leaves no room for the second
  ec.max_batch_tokens = 512;
  SingleRankCollectives comm;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(base_.get(), &comm, ec);
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_TRUE((*engine)->AddRequest("long", Prompt(6, 250), Greedy("man", 40)).ok());
  // Load man and start "long" before the second request arrives.
  while ((*engine)->Stats().num_running == 0) {
    if ((*engine)->WaitingForIo()) absl::SleepFor(absl::Milliseconds(1));
    ASSERT_TRUE((*engine)->Step().ok());
  }
  ASSERT_TRUE((*engine)->AddRequest("waits", Prompt(7, 100), Greedy("c-headers", 4)).ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while ((*engine)->Stats().deltas.num_loads < 2 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_TRUE((*engine)->Step().ok());
  EngineStats st = (*engine)->Stats();
  ASSERT_EQ(st.num_running, 1);  // "long" runs, "waits" has no blocks
  EXPECT_EQ(st.num_waiting, 1);
  EXPECT_EQ(st.deltas.num_pinned, 1);
  std::map<std::string, Outcome> got = RunAll(**engine);
  EXPECT_EQ(got["long"].finish, FinishReason::kLength);
  EXPECT_EQ(got["waits"].finish, FinishReason::kLength);
  EXPECT_EQ((*engine)->Stats().deltas.num_pinned, 0);
}

TEST_F(EngineDeltaTest, CancelAndPreemptionReleaseDeltas) {
  EngineConfig ec = Config(true);
  ec.num_kv_blocks = 12;  // two 80-token requests growing by 60 tokens cannot both stay
  SingleRankCollectives comm;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(base_.get(), &comm, ec);
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_TRUE((*engine)->AddRequest("a", Prompt(8, 80), Greedy("man", 60)).ok());
  ASSERT_TRUE((*engine)->AddRequest("b", Prompt(9, 80), Greedy("c-headers", 60)).ok());
  ASSERT_TRUE((*engine)->AddRequest("c", Prompt(10, 30), Greedy("c-headers", 60)).ok());
  for (int i = 0; i < 40; ++i) {
    if ((*engine)->WaitingForIo()) absl::SleepFor(absl::Milliseconds(1));
    ASSERT_TRUE((*engine)->Step().ok());
  }
  EXPECT_TRUE((*engine)->Cancel("c"));
  std::map<std::string, Outcome> got = RunAll(**engine);
  EXPECT_EQ(got["a"].finish, FinishReason::kLength);
  EXPECT_EQ(got["b"].finish, FinishReason::kLength);
  EXPECT_EQ(got["c"].finish, FinishReason::kCancelled);
  EXPECT_GT((*engine)->Stats().num_preemptions, 0);
  EXPECT_EQ((*engine)->Stats().deltas.num_pinned, 0);
}

// A delta file replaced under the same id is another revision, so its requests never meet the old
// one's cached KV.
TEST_F(EngineDeltaTest, ARevisedDeltaGetsItsOwnCacheNamespace) {
  SingleRankCollectives comm;
  EngineConfig a = Config(false), b = Config(false);
  a.fine_tunes = {{"tenant", c_path_}};
  b.fine_tunes = {{"tenant", man_path_}};
  absl::StatusOr<std::unique_ptr<Engine>> ea = Engine::Create(base_.get(), &comm, a);
  absl::StatusOr<std::unique_ptr<Engine>> eb = Engine::Create(base_.get(), &comm, b);
  ASSERT_TRUE(ea.ok() && eb.ok());
  const std::string ra = (*ea)->FineTuneRevision("tenant"), rb = (*eb)->FineTuneRevision("tenant");
  EXPECT_EQ(ra.size(), 16u);
  EXPECT_NE(ra, rb);
  // Both engines publish the prompt's blocks under their own revision's namespace.
  const std::vector<int32_t> p = Prompt(11, 40);
  ASSERT_TRUE((*ea)->AddRequest("r", p, Greedy("tenant", 2)).ok());
  ASSERT_TRUE((*eb)->AddRequest("r", p, Greedy("tenant", 2)).ok());
  RunAll(**ea);
  RunAll(**eb);
  std::vector<BlockHash> ha, hb;
  for (const BlockEvent& e : (*ea)->BlockInventory()) ha.push_back(e.hash);
  for (const BlockEvent& e : (*eb)->BlockInventory()) hb.push_back(e.hash);
  ASSERT_FALSE(ha.empty());
  for (BlockHash h : ha) EXPECT_EQ(std::count(hb.begin(), hb.end(), h), 0);
  // Its blocks are the ones the coordinator computes for this id and revision (in any order).
  const std::vector<BlockHash> want = PrefixBlockHashes(
      CacheNamespace("strata-tiny", FineTuneNamespaceId("tenant", ra), ""), p, 16);
  for (BlockHash h : want) EXPECT_GE(std::count(ha.begin(), ha.end(), h), 1);
}

// Fine-tunes registered, replaced and unregistered while the engine serves (a worker rescanning
// its --fine_tune_dir): a running sequence finishes on the delta it started with, a waiting one
// whose fine-tune changed under it fails ABORTED (the coordinator retries it), and later requests
// get the new delta.
TEST_F(EngineDeltaTest, FineTunesChangeWhileServing) {
  EngineConfig ec = Config(false);
  ec.fine_tunes_may_change = true;
  ec.num_kv_blocks = 20;  // 320 tokens: the first request leaves no room for the second
  ec.max_batch_tokens = 512;
  SingleRankCollectives comm;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(base_.get(), &comm, ec);
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_TRUE((*engine)->FineTuneIds().empty());
  const std::vector<int32_t> p_long = Prompt(12, 250), p_short = Prompt(13, 100);
  std::map<std::string, Outcome> got;
  // One step, its outputs added to `got` (as RunAll's are).
  auto step = [&] {
    if ((*engine)->WaitingForIo()) absl::SleepFor(absl::Milliseconds(1));
    absl::StatusOr<std::vector<RequestOutput>> outs = (*engine)->Step();
    ASSERT_TRUE(outs.ok()) << outs.status();
    for (const RequestOutput& r : *outs) {
      for (const SampledToken& t : r.tokens) got[r.request_id].tokens.push_back(t.token);
    }
  };
  auto run_all = [&] {
    for (auto& [id, o] : RunAll(**engine)) {
      Outcome& g = got[id];
      g.tokens.insert(g.tokens.end(), o.tokens.begin(), o.tokens.end());
      g.finish = o.finish;
      g.error = o.error;
    }
  };
  EXPECT_EQ((*engine)->AddRequest("early", p_short, Greedy("ft")).code(),
            absl::StatusCode::kNotFound);
  ASSERT_TRUE((*engine)->RegisterFineTune("ft", c_path_, /*replace=*/false).ok());
  EXPECT_EQ((*engine)->RegisterFineTune("ft", man_path_, false).code(),
            absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE((*engine)->AddRequest("long", p_long, Greedy("ft", 30)).ok());
  while ((*engine)->Stats().num_running == 0) ASSERT_NO_FATAL_FAILURE(step());
  ASSERT_TRUE((*engine)->AddRequest("waits", p_short, Greedy("ft", 4)).ok());
  ASSERT_NO_FATAL_FAILURE(step());
  ASSERT_EQ((*engine)->Stats().num_waiting, 1);  // no blocks for it yet
  // Replaced while "long" runs on it and "waits" waits for it.
  ASSERT_TRUE((*engine)->RegisterFineTune("ft", man_path_, /*replace=*/true).ok());
  run_all();
  EXPECT_EQ(got["long"].finish, FinishReason::kLength);
  const std::vector<int32_t> alone = Alone(c_path_, p_long);  // the delta it started with
  ASSERT_EQ(got["long"].tokens.size(), 30u);
  EXPECT_EQ(std::vector<int32_t>(got["long"].tokens.begin(), got["long"].tokens.begin() + 12),
            alone);
  EXPECT_EQ(got["waits"].finish, FinishReason::kError);
  EXPECT_EQ(got["waits"].error.code(), absl::StatusCode::kAborted) << got["waits"].error;
  EngineStats st = (*engine)->Stats();
  EXPECT_EQ(st.deltas.num_pinned, 0);
  EXPECT_EQ(st.deltas.num_resident, 0);  // the old delta went with its last sequence
  // From now on, the new delta.
  ASSERT_TRUE((*engine)->AddRequest("after", p_short, Greedy("ft")).ok());
  run_all();
  EXPECT_EQ(got["after"].tokens, Alone(man_path_, p_short));
  // Unregistered while a request waits for it: that one fails ABORTED, new ones NOT_FOUND.
  ASSERT_TRUE((*engine)->AddRequest("long2", p_long, Greedy("", 30)).ok());
  while ((*engine)->Stats().num_running == 0) ASSERT_NO_FATAL_FAILURE(step());
  ASSERT_TRUE((*engine)->AddRequest("orphan", p_short, Greedy("ft", 4)).ok());
  ASSERT_NO_FATAL_FAILURE(step());
  ASSERT_TRUE((*engine)->UnregisterFineTune("ft").ok());
  EXPECT_EQ((*engine)->UnregisterFineTune("ft").code(), absl::StatusCode::kNotFound);
  run_all();
  EXPECT_EQ(got["long2"].finish, FinishReason::kLength);
  EXPECT_EQ(got["orphan"].error.code(), absl::StatusCode::kAborted) << got["orphan"].error;
  EXPECT_TRUE(absl::StrContains(got["orphan"].error.message(), "removed")) << got["orphan"].error;
  EXPECT_EQ((*engine)->AddRequest("late", p_short, Greedy("ft")).code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE((*engine)->FineTuneIds().empty());
}

// A sequence preempted after its fine-tune was replaced keeps the delta it began with, and
// finishes on it when it runs again.
TEST_F(EngineDeltaTest, APreemptedSequenceKeepsItsReplacedDelta) {
  EngineConfig ec = Config(false);
  ec.fine_tunes_may_change = true;
  ec.num_kv_blocks = 12;  // two 80-token requests growing by 60 tokens cannot both stay
  SingleRankCollectives comm;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(base_.get(), &comm, ec);
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_TRUE((*engine)->RegisterFineTune("ft", c_path_, false).ok());
  const std::vector<int32_t> pa = Prompt(14, 80), pb = Prompt(15, 80);
  ASSERT_TRUE((*engine)->AddRequest("a", pa, Greedy("ft", 60)).ok());
  ASSERT_TRUE((*engine)->AddRequest("b", pb, Greedy("ft", 60)).ok());
  std::map<std::string, std::vector<int32_t>> tokens;
  while ((*engine)->Stats().num_running < 2) {
    if ((*engine)->WaitingForIo()) absl::SleepFor(absl::Milliseconds(1));
    absl::StatusOr<std::vector<RequestOutput>> outs = (*engine)->Step();
    ASSERT_TRUE(outs.ok());
    for (const RequestOutput& r : *outs) {
      for (const SampledToken& t : r.tokens) tokens[r.request_id].push_back(t.token);
    }
  }
  ASSERT_TRUE((*engine)->RegisterFineTune("ft", man_path_, /*replace=*/true).ok());
  for (auto& [id, o] : RunAll(**engine)) {
    EXPECT_EQ(o.finish, FinishReason::kLength) << id << ": " << o.error;
    tokens[id].insert(tokens[id].end(), o.tokens.begin(), o.tokens.end());
  }
  EXPECT_GT((*engine)->Stats().num_preemptions, 0);
  for (const auto& [id, prompt] : {std::pair{"a", pa}, std::pair{"b", pb}}) {
    ASSERT_EQ(tokens[id].size(), 60u) << id;
    EXPECT_EQ(std::vector<int32_t>(tokens[id].begin(), tokens[id].begin() + 12),
              Alone(c_path_, prompt))
        << id;
  }
  EXPECT_EQ((*engine)->Stats().deltas.num_pinned, 0);
}

TEST_F(EngineDeltaTest, ConfigurationErrorsAreNamed) {
  SingleRankCollectives comm;
  EngineConfig ec = Config(true);
  ec.fine_tunes.push_back({"man", man_path_});
  EXPECT_EQ(Engine::Create(base_.get(), &comm, ec).status().code(),
            absl::StatusCode::kAlreadyExists);
  ec = Config(true);
  ec.delta_cache_bytes = 1000;
  EXPECT_TRUE(absl::StrContains(Engine::Create(base_.get(), &comm, ec).status().message(),
                                "more than the whole delta cache"));
  std::unique_ptr<ModelWeights> random = RandomModelWeights(config_, DType::kF32, 1);
  EXPECT_TRUE(absl::StrContains(
      Engine::Create(random.get(), &comm, Config(true)).status().message(), "random weights"));
}

}  // namespace
}  // namespace strata
