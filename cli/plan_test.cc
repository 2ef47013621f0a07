#include "cli/plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cli/args.h"
#include "common/json.h"
#include "gtest/gtest.h"
#include "worker/model/config.h"

namespace strata {
namespace {

// Llama-3-8B's shape (bench/configs/llama3_8b.json).
ModelConfig Llama8B() {
  ModelConfig m;
  m.architecture_name = "LlamaForCausalLM";
  m.hidden_size = 4096;
  m.intermediate_size = 14336;
  m.num_layers = 32;
  m.num_heads = 32;
  m.num_kv_heads = 8;
  m.head_dim = 128;
  m.vocab_size = 128256;
  m.max_position_embeddings = 8192;
  return m;
}

Workload Decode(int64_t prompt, int64_t output) {
  Workload w;
  w.prompt_tokens = prompt;
  w.output_tokens = output;
  return w;
}

PlanOptions Batch(int64_t max_running) {
  PlanOptions o;
  o.max_running_sequences = max_running;
  return o;
}

// The simulator's step cost is the plan's roofline: a lone sequence's decode step and an uncached
// prompt's prefill come out as MakePlan's figures.
TEST(PlanTest, StepCostAgreesWithThePlan) {
  for (const char* gpu : {"h100", "h200"}) {
    const GpuSpec g = *FindGpu(gpu);
    const PlanOptions o = Batch(1);
    auto p = MakePlan(Llama8B(), g, Decode(512, 64), o);
    ASSERT_TRUE(p.ok()) << p.status();
    const StepCost c = PlanStepCost(Llama8B(), g, o);
    const double context = 512 + 64 / 2.0;
    EXPECT_NEAR(1e3 * c.Step(1, context, context, 1), p->batch1_step_ms, 1e-9) << gpu;
    const double pairs = 512 * (512 + 1) / 2.0;
    EXPECT_NEAR(512 / c.Step(512, 512, pairs, 1), p->prefill_tokens_per_s,
                0.01 * p->prefill_tokens_per_s)
        << gpu;
    // A 16-token block (2 MiB in bf16) over PCIe at 25 GB/s.
    EXPECT_NEAR(c.host_block_s, 2.0 * 1024 * 1024 / 25e9, 1e-9);
  }
}

// Fine-tunes: a 4-bit 2:4 delta of Llama-3-8B's projections, its room on the GPU, and what each
// distinct one adds to a decode step.
TEST(PlanTest, FineTunesTakeMemoryAndStepTime) {
  const GpuSpec h100 = *FindGpu("h100");
  Workload w = Decode(512, 64);
  auto base = MakePlan(Llama8B(), h100, w, PlanOptions());
  w.fine_tunes = 100;
  w.active_fine_tunes = 8;
  auto ft = MakePlan(Llama8B(), h100, w, PlanOptions());
  ASSERT_TRUE(base.ok() && ft.ok()) << ft.status();
  // Per layer: q and o 4096 x 4096, k and v 1024 x 4096, gate, up and down 14336 x 4096; each
  // row keeps half its values at 4 bits, a 4-bit index per group of four, and a float scale.
  const double per_weight = (2048 * 0.5 + 512 + 4.0 / 4096 * 4096) / 4096;  // bytes
  const double weights = 32.0 * (2 * 4096.0 * 4096 + 2 * 1024.0 * 4096 + 3 * 14336.0 * 4096);
  EXPECT_NEAR(ft->delta_bytes, weights * per_weight, 0.01 * ft->delta_bytes);
  EXPECT_NEAR(ft->delta_bytes / (1 << 30), 2.44, 0.01);
  EXPECT_EQ(ft->active_fine_tunes, 8);
  EXPECT_NEAR(ft->delta_cache_mb, 8 * ft->delta_bytes * 1.05 / (1 << 20), 1);
  EXPECT_NEAR(base->kv_cache_mb - ft->kv_cache_mb, ft->delta_cache_mb, 1);
  // Batch 1 of the base is unchanged; a fine-tune's reads its delta too.
  EXPECT_DOUBLE_EQ(ft->batch1_step_ms, base->batch1_step_ms);
  const double bandwidth = h100.copy_bytes_per_s * h100.decode_efficiency;
  EXPECT_NEAR(ft->batch1_delta_step_ms - ft->batch1_step_ms, 1e3 * ft->delta_bytes / bandwidth,
              1e-6);
  // A full batch mixes eight: its step reads eight deltas more.
  EXPECT_NEAR(ft->step_ms - base->step_ms, 8e3 * ft->delta_bytes / bandwidth, 0.01);
  bool flag = false;
  for (const std::string& f : WorkerFlags(*ft, PlanOptions())) {
    flag |= f == absl::StrCat("--delta_cache_mb=", ft->delta_cache_mb);
  }
  EXPECT_TRUE(flag);
  EXPECT_NEAR(PlanStepCost(Llama8B(), h100, PlanOptions()).delta_s, ft->delta_bytes / bandwidth,
              1e-12);
  w.active_fine_tunes = 101;
  EXPECT_EQ(MakePlan(Llama8B(), h100, w, PlanOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// LoRA adapters: rank x (in + out) values a projection, in the model's dtype both in the delta
// cache (what the worker's DeltaCache counts, LoraFactorType) and on the GPU (what a decode step
// reads).
TEST(PlanTest, LoraAdaptersAreSizedByRank) {
  const GpuSpec h100 = *FindGpu("h100");
  Workload w = Decode(512, 64);
  w.fine_tunes = 100;
  w.active_fine_tunes = 8;
  PlanOptions o;
  o.lora_rank = 16;
  auto base = MakePlan(Llama8B(), h100, Decode(512, 64), o);
  auto lora = MakePlan(Llama8B(), h100, w, o);
  auto delta = MakePlan(Llama8B(), h100, w, PlanOptions());
  ASSERT_TRUE(base.ok() && lora.ok() && delta.ok()) << lora.status();
  // Per layer: q and o (4096 + 4096), k and v (4096 + 1024), gate, up and down (4096 + 14336).
  const double values = 16.0 * 32 * (2 * 8192 + 2 * 5120 + 3 * 18432);
  EXPECT_DOUBLE_EQ(lora->delta_bytes, 2 * values);  // bf16, in the cache as in a step's reads
  EXPECT_DOUBLE_EQ(lora->delta_read_bytes, 2 * values);
  EXPECT_NEAR(lora->delta_bytes / 1e6, 83.9, 0.1);
  EXPECT_NEAR(lora->delta_cache_mb, 8 * lora->delta_bytes * 1.05 / (1 << 20), 1);
  const double bandwidth = h100.copy_bytes_per_s * h100.decode_efficiency;
  EXPECT_NEAR(lora->batch1_delta_step_ms - lora->batch1_step_ms,
              1e3 * lora->delta_read_bytes / bandwidth, 1e-6);
  EXPECT_NEAR(PlanStepCost(Llama8B(), h100, o).delta_s, lora->delta_read_bytes / bandwidth, 1e-12);
  // A rank-16 adapter is a small fraction of a 4-bit 2:4 delta; the KV cache keeps the rest.
  EXPECT_LT(lora->delta_bytes, delta->delta_bytes / 10);
  EXPECT_GT(lora->kv_cache_mb, delta->kv_cache_mb);
  bool noted = false;
  for (const std::string& n : lora->notes) noted |= absl::StrContains(n, "rank-16 LoRA adapter");
  EXPECT_TRUE(noted);
  const std::vector<std::string> flags = WorkerFlags(*lora, o);
  EXPECT_NE(std::find(flags.begin(), flags.end(), "--gpu_lora"), flags.end());
}

TEST(PlanTest, CountsLlama3_8BAsItsFilesDo) {
  auto p = MakePlan(Llama8B(), *FindGpu("h100"), Decode(512, 64), PlanOptions());
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->parameters, 8030261248);
  EXPECT_EQ(p->weight_bytes, 2.0 * 8030261248);
  EXPECT_EQ(p->kv_bytes_per_token, 2 * 32 * 8 * 128 * 2);  // 128 KiB
  // A bf16 block of 16 tokens (2 MiB) plus the 64-byte header, to 4 KiB.
  EXPECT_EQ(p->tier_slot_bytes, 2101248);
  // The KV cache is what is left of 92% of 80 GB, in whole MiB and whole blocks.
  const double left = 80e9 * 0.92 - p->gpu_weight_bytes - p->gpu_scratch_bytes;
  EXPECT_EQ(p->kv_cache_mb, static_cast<int64_t>(left / (1 << 20)));
  EXPECT_EQ(p->kv_cache_tokens % 16, 0);
  EXPECT_LE(p->kv_cache_tokens * p->kv_bytes_per_token, p->kv_cache_mb * (int64_t{1} << 20));
  EXPECT_GT((p->kv_cache_tokens + 16) * p->kv_bytes_per_token, p->kv_cache_mb * (int64_t{1} << 20));
}

// The defaults are calibrated on bench/gpu_bench's figures (docs/PERFORMANCE.md: the H100's of
// 2026-11-26, the H200's of 2026-11-27 with the decode attention kernel up to 16 rows, the GEMV at
// batch 1 only and tensor-core prefill):
// the plan must stay within 10% of what Strata measured.
TEST(PlanTest, PredictsWhatGpuBenchMeasured) {
  struct Case {
    const char* gpu;
    int64_t batch;
    double measured_decode_tokens_per_s;
  };
  for (const Case& c : {Case{"h100", 1, 151.9}, Case{"h100", 64, 6943}, Case{"h200", 1, 207.7},
                        Case{"h200", 64, 8503}}) {
    auto p = MakePlan(Llama8B(), *FindGpu(c.gpu), Decode(512, 64), Batch(c.batch));
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->batch, c.batch);
    EXPECT_NEAR(p->decode_tokens_per_s / c.measured_decode_tokens_per_s, 1.0, 0.10)
        << c.gpu << " batch " << c.batch << ": " << p->decode_tokens_per_s;
  }
  for (const auto& [gpu, measured] : {std::pair{"h100", 16650.0}, std::pair{"h200", 28864.0}}) {
    auto prefill = MakePlan(Llama8B(), *FindGpu(gpu), Decode(2048, 1), PlanOptions());
    ASSERT_TRUE(prefill.ok());
    EXPECT_NEAR(prefill->prefill_tokens_per_s / measured, 1.0, 0.10) << gpu;
  }
}

// The KV cache's own efficiency scales only the KV term of a decode step.
TEST(PlanTest, KvEfficiencyScalesOnlyTheCacheReads) {
  const GpuSpec h100 = *FindGpu("h100");
  EXPECT_EQ(h100.kv_efficiency, 0);  // as the weights
  PlanOptions half;
  half.kv_efficiency = h100.decode_efficiency / 2;
  for (int64_t b : {1, 64}) {
    auto base = MakePlan(Llama8B(), h100, Decode(512, 64), Batch(b));
    auto slow = MakePlan(Llama8B(), h100, Decode(512, 64), [&] {
      PlanOptions o = Batch(b);
      o.kv_efficiency = half.kv_efficiency;
      return o;
    }());
    ASSERT_TRUE(base.ok() && slow.ok());
    // Twice the KV time: the difference is the KV term once, b sequences at the mean context.
    const double kv_s =
        b * 544.0 * base->kv_bytes_per_token / (h100.copy_bytes_per_s * h100.decode_efficiency);
    EXPECT_NEAR(slow->step_ms - base->step_ms, 1e3 * kv_s, 1e-3) << "batch " << b;
    EXPECT_EQ(slow->prefill_tokens_per_s, base->prefill_tokens_per_s);
  }
  // The simulator's step cost takes it too.
  EXPECT_NEAR(PlanStepCost(Llama8B(), h100, half).kv_token_s,
              2 * PlanStepCost(Llama8B(), h100, PlanOptions()).kv_token_s, 1e-15);
}

TEST(PlanTest, TheBatchIsLimitedByMemoryTpotOrTheCap) {
  // 7 000-token sequences on a 48 GB card: the KV cache holds only a few.
  auto mem = MakePlan(Llama8B(), *FindGpu("l40s"), Decode(6000, 1000), PlanOptions());
  ASSERT_TRUE(mem.ok()) << mem.status();
  EXPECT_EQ(mem->batch_limit, "memory");
  EXPECT_EQ(mem->batch, mem->kv_cache_tokens / 7008);  // whole blocks per sequence
  EXPECT_LT(mem->batch, 64);

  Workload fast = Decode(1024, 256);
  fast.tpot_ms = 8;
  auto tpot = MakePlan(Llama8B(), *FindGpu("h100"), fast, PlanOptions());
  ASSERT_TRUE(tpot.ok()) << tpot.status();
  EXPECT_EQ(tpot->batch_limit, "tpot");
  EXPECT_LE(tpot->step_ms, 8.0);
  // One more sequence would miss the target.
  auto over = MakePlan(Llama8B(), *FindGpu("h100"), Decode(1024, 256), Batch(tpot->batch + 1));
  ASSERT_TRUE(over.ok());
  EXPECT_GT(over->step_ms, 8.0);

  auto cap = MakePlan(Llama8B(), *FindGpu("h100"), Decode(1024, 256), Batch(16));
  ASSERT_TRUE(cap.ok());
  EXPECT_EQ(cap->batch_limit, "max_running_sequences");
  EXPECT_EQ(cap->batch, 16);
  EXPECT_EQ(cap->max_running_sequences, 16);
  ASSERT_EQ(cap->notes.size(), 1u);
  EXPECT_NE(cap->notes[0].find("caps the batch"), std::string::npos) << cap->notes[0];
}

TEST(PlanTest, WorkersCoverTheRateAtTheTargetUtilization) {
  Workload w = Decode(1024, 256);
  w.rate_rps = 50;
  auto p = MakePlan(Llama8B(), *FindGpu("h100"), w, PlanOptions());
  ASSERT_TRUE(p.ok());
  EXPECT_LE(p->utilization, 0.8);
  EXPECT_GT(p->workers * p->requests_per_s_per_worker * 0.8, 50);
  EXPECT_LT((p->workers - 1) * p->requests_per_s_per_worker * 0.8, 50);  // not one more than needed
  // Split: prefill workers for the prompts, decode workers for the rest, each pool at 80%; about
  // as many workers in all (each pool rounds up), and the whole prompt's KV to copy.
  const double prefill_s = 1024 / p->prefill_tokens_per_s;
  const double decode_s = 256 * (p->step_ms / 1e3) / p->batch;
  EXPECT_EQ(p->split_prefill_workers, static_cast<int64_t>(std::ceil(50 * prefill_s / 0.8)));
  EXPECT_EQ(p->split_decode_workers, static_cast<int64_t>(std::ceil(50 * decode_s / 0.8)));
  EXPECT_LE(p->split_prefill_workers + p->split_decode_workers, p->workers + 1);
  EXPECT_EQ(p->handoff_bytes, 1024.0 * p->kv_bytes_per_token);
  EXPECT_NEAR(p->handoff_ms, 1e3 * 1024 * p->kv_bytes_per_token / kKvCopyBytesPerS, 1e-9);
  // A shared system prompt is computed once: requests get cheaper and first tokens sooner.
  w.shared_prefix_tokens = 768;
  auto shared = MakePlan(Llama8B(), *FindGpu("h100"), w, PlanOptions());
  ASSERT_TRUE(shared.ok());
  EXPECT_LT(shared->ttft_ms, p->ttft_ms / 3);
  EXPECT_GT(shared->requests_per_s_per_worker, p->requests_per_s_per_worker);
}

TEST(PlanTest, TiersHoldTheConversationsAndTheCacheAtShutdown) {
  Workload w = Decode(1024, 256);
  w.rate_rps = 5;
  w.conversations = 300;
  w.conversation_tokens = 4000;
  auto p = MakePlan(Llama8B(), *FindGpu("h100"), w, PlanOptions());
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(p->workers, 1);
  EXPECT_EQ(p->warm_set_bytes, 300.0 * 250 * 2101248);  // 4000 tokens: 250 blocks each
  EXPECT_EQ(p->host_cache_mb, static_cast<int64_t>(std::ceil(p->warm_set_bytes / (1 << 20))));
  // The disk can take the device cache and the host tier when the worker stops.
  const double device = static_cast<double>(p->kv_cache_tokens / 16) * p->tier_slot_bytes;
  EXPECT_GE(p->disk_cache_mb * double{1 << 20}, p->host_cache_mb * double{1 << 20} + device);
  EXPECT_EQ(p->pod_memory_limit_mb, p->host_cache_mb + 8192);

  // A host budget moves the rest to disk, and says so.
  PlanOptions budget;
  budget.host_cache_budget_bytes = 64.0 * (1 << 30);
  auto capped = MakePlan(Llama8B(), *FindGpu("h100"), w, budget);
  ASSERT_TRUE(capped.ok());
  EXPECT_EQ(capped->host_cache_mb, 64 * 1024);
  EXPECT_GE(capped->disk_cache_mb * double{1 << 20}, capped->warm_set_bytes);
  ASSERT_EQ(capped->notes.size(), 2u);  // the batch cap, and this
  EXPECT_NE(capped->notes[1].find("exceeds the host budget"), std::string::npos);

  // FP8 lower tiers: half the payload plus a scale per head and segment.
  PlanOptions fp8;
  fp8.lower_tier_compression = KvCompression::kFp8E4M3;
  auto small = MakePlan(Llama8B(), *FindGpu("h100"), w, fp8);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(small->tier_slot_bytes, (1048576 + 64 * 8 * 4 + 64 + 4095) / 4096 * 4096);
}

TEST(PlanTest, TheDefaultWorkloadStillGetsAHostTierUnderItsDisk) {
  auto p = MakePlan(Llama8B(), *FindGpu("h100"), Decode(1024, 256), PlanOptions());
  ASSERT_TRUE(p.ok());
  // No conversations to keep: the host tier still holds the device cache (a shutdown passes it
  // through there), and strata-worker takes no disk tier without a host tier.
  const double device = static_cast<double>(p->kv_cache_tokens / 16) * p->tier_slot_bytes;
  EXPECT_EQ(p->host_cache_mb, static_cast<int64_t>(std::ceil(device / (1 << 20))));
  const std::vector<std::string> flags = WorkerFlags(*p, PlanOptions());
  EXPECT_NE(
      std::find(flags.begin(), flags.end(), absl::StrCat("--host_cache_mb=", p->host_cache_mb)),
      flags.end());
  EXPECT_NE(
      std::find(flags.begin(), flags.end(), absl::StrCat("--disk_cache_mb=", p->disk_cache_mb)),
      flags.end());
  // One tier slot holds every tensor-parallel rank's share of a block, as the engine stores it.
  PlanOptions tp2;
  tp2.tensor_parallel = 2;
  auto split = MakePlan(Llama8B(), *FindGpu("h100"), Decode(1024, 256), tp2);
  ASSERT_TRUE(split.ok());
  EXPECT_EQ(split->tier_slot_bytes, p->tier_slot_bytes);
  for (const std::string& f : WorkerFlags(*split, tp2))
    EXPECT_EQ(f.find("--tensor_parallel"), std::string::npos);
}

TEST(PlanTest, ImpossiblePlansSayWhy) {
  ModelConfig big = Llama8B();
  big.num_layers = 320;  // about 72 B parameters
  auto no_room = MakePlan(big, *FindGpu("h100"), Decode(512, 64), PlanOptions());
  EXPECT_TRUE(absl::IsInvalidArgument(no_room.status()));
  EXPECT_NE(no_room.status().message().find("--tensor-parallel"), std::string::npos);
  PlanOptions tp2;
  tp2.tensor_parallel = 2;
  EXPECT_TRUE(MakePlan(big, *FindGpu("h200"), Decode(512, 64), tp2).ok());

  PlanOptions tp3;
  tp3.tensor_parallel = 3;
  EXPECT_TRUE(absl::IsInvalidArgument(
      MakePlan(Llama8B(), *FindGpu("h100"), Decode(512, 64), tp3).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      MakePlan(Llama8B(), *FindGpu("h100"), Decode(8000, 500), PlanOptions()).status()));
  Workload w = Decode(512, 64);
  w.tpot_ms = 2;
  auto too_fast = MakePlan(Llama8B(), *FindGpu("h100"), w, PlanOptions());
  EXPECT_TRUE(absl::IsInvalidArgument(too_fast.status()));
  EXPECT_NE(too_fast.status().message().find("--tpot-ms"), std::string::npos);
  EXPECT_TRUE(absl::IsInvalidArgument(FindGpu("h900").status()));
}

// A worker serves the model's context when its KV cache holds it, and what the cache holds when
// it does not, which the plan says.
TEST(PlanTest, TheContextServedIsTheModelsOrWhatTheCacheHolds) {
  auto p = MakePlan(Llama8B(), *FindGpu("h100"), Decode(512, 64), PlanOptions());
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->context_tokens, 8192);
  for (const std::string& n : p->notes) EXPECT_EQ(n.find("context"), std::string::npos) << n;
  ModelConfig long_context = Llama8B();
  long_context.max_position_embeddings = 1 << 20;
  auto q = MakePlan(long_context, *FindGpu("h100"), Decode(512, 64), PlanOptions());
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->context_tokens, q->kv_cache_tokens);
  EXPECT_LT(q->context_tokens, 1 << 20);
  EXPECT_GT(q->context_tokens, 100000);  // about 50 GB of 128 KiB tokens
  bool noted = false;
  for (const std::string& n : q->notes) {
    noted |=
        n.find(absl::StrCat("serve sequences of at most ", q->context_tokens)) != std::string::npos;
  }
  EXPECT_TRUE(noted);
}

// The command, on the bench's config files and the bundled model's directory.
absl::StatusOr<std::string> RunPlan(std::vector<std::string> argv) {
  absl::StatusOr<Args> args = ParsePlanArgs(argv);
  if (!args.ok()) return args.status();
  char* buf = nullptr;
  size_t len = 0;
  std::FILE* out = open_memstream(&buf, &len);
  const absl::Status s = PlanCommand(*args, out);
  std::fclose(out);
  std::string text(buf, len);
  std::free(buf);
  if (!s.ok()) return s;
  return text;
}

TEST(PlanCommandTest, PrintsATableJsonAndAKubernetesPatch) {
  auto table =
      RunPlan({"--model", "bench/configs/llama3_8b.json", "--gpu", "h100", "--rate", "20"});
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_NE(table->find("8.03 B parameters"), std::string::npos) << *table;
  EXPECT_NE(table->find("workers    "), std::string::npos) << *table;
  auto json = RunPlan({"--model", "bench/configs/llama3_8b.json", "--json"});
  ASSERT_TRUE(json.ok());
  EXPECT_EQ(json->front(), '{');
  EXPECT_NE(json->find("\"kv_bytes_per_token\":131072"), std::string::npos) << *json;
  auto k8s = RunPlan({"--model", "bench/configs/llama3_8b.json", "--gpu", "h200", "--rate", "40",
                      "--conversations", "100", "--emit", "k8s"});
  ASSERT_TRUE(k8s.ok()) << k8s.status();
  EXPECT_NE(k8s->find("kind: StatefulSet"), std::string::npos);
  EXPECT_NE(k8s->find("- --device=gpu"), std::string::npos) << *k8s;
  // (k8s/gpu's args, which the patch replaces, pass the ConfigMap's draft model on.)
  EXPECT_NE(k8s->find("- --draft_model=$(STRATA_DRAFT_MODEL_DIR)"), std::string::npos) << *k8s;
  EXPECT_NE(k8s->find("nvidia.com/gpu: 1"), std::string::npos) << *k8s;
  EXPECT_EQ(k8s->find("--tensor_parallel"), std::string::npos) << *k8s;
  EXPECT_EQ(k8s->find("--role"), std::string::npos) << *k8s;
  // Split: the decode and prefill StatefulSets of k8s/gpu-disaggregated, sized apart.
  auto plan = RunPlan({"--model", "bench/configs/llama3_8b.json", "--gpu", "h200", "--rate", "40",
                       "--conversations", "100", "--json"});
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto number = [&](const std::string& key) {
    const size_t at = plan->find("\"" + key + "\":");
    EXPECT_NE(at, std::string::npos) << key;
    return std::stoll(plan->substr(at + key.size() + 3));
  };
  auto split = RunPlan({"--model", "bench/configs/llama3_8b.json", "--gpu", "h200", "--rate", "40",
                        "--conversations", "100", "--emit", "k8s-disaggregated"});
  ASSERT_TRUE(split.ok()) << split.status();
  const size_t second = split->find("---\n");
  ASSERT_NE(second, std::string::npos) << *split;
  const std::string decode = split->substr(0, second), prefill = split->substr(second);
  EXPECT_NE(decode.find("name: strata-worker\nspec:\n  replicas: " +
                        std::to_string(number("split_decode_workers")) + "\n"),
            std::string::npos)
      << *split;
  EXPECT_NE(decode.find("- --role=decode\n"), std::string::npos) << decode;
  EXPECT_NE(prefill.find("name: strata-prefill\nspec:\n  replicas: " +
                         std::to_string(number("split_prefill_workers")) + "\n"),
            std::string::npos)
      << *split;
  EXPECT_NE(prefill.find("- --role=prefill\n"), std::string::npos) << prefill;
  EXPECT_NE(prefill.find("- --device=gpu"), std::string::npos) << prefill;
  // Across GPUs the plan is a table only: strata-worker has no GPU tensor parallelism yet.
  auto tp = RunPlan(
      {"--model", "bench/configs/llama3_70b.json", "--gpu", "h200", "--tensor-parallel", "2"});
  ASSERT_TRUE(tp.ok()) << tp.status();
  EXPECT_NE(tp->find("not built yet"), std::string::npos) << *tp;
  auto tp_k8s = RunPlan({"--model", "bench/configs/llama3_70b.json", "--gpu", "h200",
                         "--tensor-parallel", "2", "--emit", "k8s"});
  EXPECT_TRUE(absl::IsInvalidArgument(tp_k8s.status()));
  EXPECT_TRUE(
      absl::IsInvalidArgument(RunPlan({"--model", "bench/configs/llama3_70b.json", "--gpu", "h200",
                                       "--tensor-parallel", "2", "--emit", "k8s-disaggregated"})
                                  .status()));
  // A model directory works too, and a custom GPU.
  auto tiny = RunPlan({"--model", "models/strata-tiny/base", "--gpu-memory-gib", "16",
                       "--gpu-bandwidth-gbps", "300", "--gpu-tflops", "50", "--prompt-tokens",
                       "256", "--output-tokens", "64"});
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  EXPECT_NE(tiny->find("custom x 1"), std::string::npos) << *tiny;
}

// Speculative decoding with a draft model: tokens a step from the acceptance, the step's parts
// from the same roofline as the plan, and the draft's memory taken out of the KV cache.
TEST(PlanCommandTest, PlansADraftModel) {
  const std::vector<std::string> base = {"--model", "bench/configs/llama3_8b.json", "--gpu", "h200",
                                         "--json"};
  auto plain = RunPlan(base);
  ASSERT_TRUE(plain.ok()) << plain.status();
  std::vector<std::string> with = base;
  for (const char* a : {"--draft-model", "bench/configs/llama3_2_1b.json", "--draft-acceptance",
                        "0.5", "--num-speculative-tokens", "3"}) {
    with.push_back(a);
  }
  auto spec = RunPlan(with);
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto p = JsonDocument::Parse(*plain, "plain");
  auto d = JsonDocument::Parse(*spec, "spec");
  ASSERT_TRUE(p.ok() && d.ok());
  const JsonValue s = *d->root().Field("speculation");
  // (1 - 0.5^4) / (1 - 0.5) tokens a step.
  EXPECT_NEAR(*s.Field("tokens_per_step")->AsDouble(), 1.875, 1e-9);
  const double draft_ms = *s.Field("draft_step_ms")->AsDouble();
  const double verify_ms = *s.Field("verify_step_ms")->AsDouble();
  const double batch1_ms = *d->root().Field("batch1_step_ms")->AsDouble();
  EXPECT_GT(draft_ms, 0);
  EXPECT_LT(draft_ms, batch1_ms / 3);  // 1.24 B parameters against 8 B
  EXPECT_GE(verify_ms, batch1_ms);     // four rows read what one does, and compute more
  EXPECT_NEAR(*s.Field("ms_per_token")->AsDouble(), (verify_ms + 3 * draft_ms) / 1.875, 1e-2);
  EXPECT_NEAR(*s.Field("speedup")->AsDouble(), batch1_ms / *s.Field("ms_per_token")->AsDouble(),
              1e-2);
  // The draft's 2.3 GiB of weights and its cache come out of the KV cache: 16 sequences of 4096
  // tokens at 32 KiB a token (16 layers, 8 KV heads of 64, bf16), 2 GiB.
  EXPECT_DOUBLE_EQ(*s.Field("draft_kv_cache_bytes")->AsDouble(), 16.0 * 4096 * 32 * 1024);
  const double kv_plain = *p->root().Field("kv_cache_mb")->AsDouble();
  const double kv_spec = *d->root().Field("kv_cache_mb")->AsDouble();
  EXPECT_NEAR(kv_plain - kv_spec, 1235814400.0 * 2 / (1 << 20) + 2048, 2);
  // A draft accepted every time gives k + 1 tokens a step.
  with[with.size() - 3] = "1";
  auto always = RunPlan(with);
  ASSERT_TRUE(always.ok()) << always.status();
  EXPECT_NE(always->find("\"tokens_per_step\":4.000"), std::string::npos) << *always;
  EXPECT_NE(spec->find("\"speculative_max_batch\":16"), std::string::npos) << *spec;
  EXPECT_EQ(spec->find("--speculative_max_batch="), std::string::npos) << *spec;
}

// --speculative-max-batch: the draft's default cache is sized for that many sequences, and the
// worker's flags carry it.
TEST(PlanCommandTest, SpeculativeMaxBatchSizesTheDraftsCache) {
  const std::vector<std::string> base = {
      "--model",       "bench/configs/llama3_8b.json",  "--gpu", "h200", "--json",
      "--draft-model", "bench/configs/llama3_2_1b.json"};
  std::vector<std::string> four = base;
  four.insert(four.end(), {"--speculative-max-batch", "4"});
  auto sixteen = RunPlan(base);
  auto out = RunPlan(four);
  ASSERT_TRUE(sixteen.ok() && out.ok()) << sixteen.status() << out.status();
  auto a = JsonDocument::Parse(*sixteen, "sixteen");
  auto b = JsonDocument::Parse(*out, "four");
  ASSERT_TRUE(a.ok() && b.ok());
  // 4 sequences of 4096 tokens at 32 KiB a token: 512 MiB, 1.5 GiB more for the model's cache.
  EXPECT_DOUBLE_EQ(*b->root().Field("speculation")->Field("draft_kv_cache_bytes")->AsDouble(),
                   4.0 * 4096 * 32 * 1024);
  EXPECT_NEAR(
      *b->root().Field("kv_cache_mb")->AsDouble() - *a->root().Field("kv_cache_mb")->AsDouble(),
      1536, 2);
  EXPECT_NE(out->find("\"speculative_max_batch\":4"), std::string::npos) << *out;
  EXPECT_NE(out->find("\"--speculative_max_batch=4\""), std::string::npos) << *out;
}

// On a GPU whose KV cache would hold fewer tokens than the draft's default cache, the draft's
// cache is planned as strata-worker sizes it then: as many tokens as the model's cache holds, the
// two sharing the room (not 2 GiB set aside, which would leave the model's cache a fraction).
TEST(PlanCommandTest, ADraftsCacheHoldsNoMoreTokensThanTheModelsOnASmallGpu) {
  const std::vector<std::string> small = {"--model",
                                          "bench/configs/llama3_8b.json",
                                          "--gpu-memory-gib",
                                          "24",
                                          "--gpu-bandwidth-gbps",
                                          "900",
                                          "--gpu-tflops",
                                          "200",
                                          "--json",
                                          "--draft-model",
                                          "bench/configs/llama3_2_1b.json"};
  auto out = RunPlan(small);
  ASSERT_TRUE(out.ok()) << out.status();
  auto d = JsonDocument::Parse(*out, "small");
  ASSERT_TRUE(d.ok()) << d.status();
  const double tokens = *d->root().Field("kv_cache_tokens")->AsDouble();
  const double draft_bytes =
      *d->root().Field("speculation")->Field("draft_kv_cache_bytes")->AsDouble();
  EXPECT_LT(tokens, 16 * 4096);
  EXPECT_GT(tokens, 1000);
  // 32 KiB a token for the 1B draft: its cache holds the model's tokens (up to a block's rounding).
  EXPECT_NEAR(draft_bytes / (32 * 1024), tokens, 32);
}

TEST(PlanCommandTest, BadFlagsNameTheFlag) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--gpu", "h100"}, "--model"},
      {{"--model", "bench/configs/llama3_8b.json", "--gpu", "h900"}, "h900"},
      {{"--model", "bench/configs/llama3_8b.json", "--rate", "-1"}, "--rate"},
      {{"--model", "bench/configs/llama3_8b.json", "--prompt-tokens", "0"}, "--prompt-tokens"},
      {{"--model", "bench/configs/llama3_8b.json", "--dtype", "int4"}, "--dtype"},
      {{"--model", "bench/configs/llama3_8b.json", "--kv-compression", "zip"}, "--kv-compression"},
      {{"--model", "bench/configs/llama3_8b.json", "--target-utilization", "1.5"},
       "--target-utilization"},
      {{"--model", "bench/configs/llama3_8b.json", "--emit", "helm"}, "--emit"},
      {{"--model", "bench/configs/llama3_8b.json", "--gpu", "h100", "--gpu-tflops", "10"},
       "not both"},
      {{"--model", "bench/configs/llama3_8b.json", "--gpu-memory-gib", "16"},
       "--gpu-bandwidth-gbps"},
      {{"--model", "no/such/dir"}, "config.json"},
      {{"--model", "bench/configs/llama3_8b.json", "--draft-model", "models/strata-tiny/base"},
       "--draft-model"},
      {{"--model", "bench/configs/llama3_8b.json", "--draft-model", "no/such/dir"},
       "--draft-model"},
      {{"--model", "bench/configs/llama3_8b.json", "--draft-acceptance", "0.5"}, "--draft-model"},
      {{"--model", "bench/configs/llama3_8b.json", "--draft-model",
        "bench/configs/llama3_2_1b.json", "--draft-acceptance", "1.5"},
       "--draft-acceptance"},
      {{"--model", "bench/configs/llama3_8b.json", "--draft-model",
        "bench/configs/llama3_2_1b.json", "--num-speculative-tokens", "40"},
       "--num-speculative-tokens"},
      {{"--model", "bench/configs/llama3_8b.json", "--speculative-max-batch", "4"},
       "--draft-model"},
      {{"--model", "bench/configs/llama3_8b.json", "--draft-model",
        "bench/configs/llama3_2_1b.json", "--speculative-max-batch", "0"},
       "--speculative-max-batch"},
      {{"--model", "bench/configs/llama3_8b.json", "--draft-model",
        "bench/configs/llama3_2_1b.json", "--speculative-max-batch", "5000"},
       "--speculative-max-batch"},
  };
  for (const auto& [argv, want] : cases) {
    auto r = RunPlan(argv);
    ASSERT_FALSE(r.ok()) << argv[argv.size() - 1];
    EXPECT_NE(r.status().message().find(want), std::string::npos) << r.status();
  }
}

}  // namespace
}  // namespace strata
