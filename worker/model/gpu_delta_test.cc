// Fine-tunes on the GPU runner against the CPU runner (which delta_test checks against the
// materialized fine-tunes): mixed batches of base and fine-tune sequences on the bundled
// strata-tiny fine-tunes and on stand-in fine-tunes of every testdata variant (Qwen2's biases,
// Qwen3's per-head norms, Llama 2's untied LM head), fed in small chunks (the delta GEMV) and
// whole (delta panels through cuBLASLt), in f32 (tolerance 1e-4) and bf16 (3e-2), LoRA adapters
// likewise; greedy decoding picks the CPU's tokens; the device region evicts and re-uploads deltas
// as they come and go; a region too small or absent is refused and the runner keeps serving. Needs
// a GPU: tagged "gpu"; skipped where there is none.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "worker/comm/collectives.h"
#include "worker/model/delta.h"
#include "worker/model/delta_test_util.h"
#include "worker/model/gpu_model_runner.h"
#include "worker/model/lora.h"
#include "worker/model/model_runner.h"
#include "worker/model/test_util.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

using delta_test::Base;
using delta_test::kBase;
using delta_test::kCHeaders;
using delta_test::kMan;
using delta_test::LoadBase;
using delta_test::TempPath;
using delta_test::WritePerturbedCopy;

constexpr int64_t kBlockTokens = 4;
constexpr int64_t kMaxBlocks = 64;

std::unique_ptr<DeltaWeights> Compress(const std::string& base_dir, const Base& base,
                                       const std::string& ft_dir, const std::string& name, int bits,
                                       bool sparse) {
  DeltaCompressOptions o;
  o.bits = bits;
  o.sparse_2_4 = sparse;
  const std::string path = TempPath(name + ".delta.safetensors");
  absl::StatusOr<DeltaCompressReport> report = CompressDelta(base_dir, ft_dir, path, o);
  EXPECT_TRUE(report.ok()) << report.status();
  absl::StatusOr<std::unique_ptr<DeltaWeights>> d =
      LoadDelta(path, *base.weights, base.fingerprint);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *std::move(d) : nullptr;
}

GpuRunnerOptions Options(DType act, int64_t num_seqs, int64_t delta_bytes) {
  GpuRunnerOptions o;
  o.num_blocks = num_seqs * kMaxBlocks;
  o.block_tokens = kBlockTokens;
  o.act = act;
  o.max_batch_tokens = 1024;
  o.max_seqs = 16;
  o.max_blocks_per_seq = kMaxBlocks;
  o.delta_bytes = delta_bytes;
  return o;
}

// Every position's logits of `seqs` fed in steps of `chunk` tokens each, sequence i on
// seq_deltas[i].
std::vector<std::vector<float>> FeedGpu(GpuModelRunner* g,
                                        const std::vector<std::vector<int32_t>>& seqs,
                                        int64_t chunk,
                                        const std::vector<const DeltaWeights*>& seq_deltas) {
  const int64_t V = g->config().vocab_size;
  return FeedInChunks(
      [&](const ForwardBatch& batch, std::vector<float>* logits) {
        ForwardBatch b = batch;
        b.seq_deltas = seq_deltas;
        logits->assign(b.logit_tokens.size() * V, 0.0f);
        return g->Forward(b, absl::MakeSpan(*logits));
      },
      V, seqs, chunk, kBlockTokens, kMaxBlocks);
}

std::vector<std::vector<int32_t>> RandomSeqs(int64_t vocab, const std::vector<int64_t>& lengths,
                                             std::mt19937* rng) {
  std::vector<std::vector<int32_t>> seqs;
  for (int64_t len : lengths) {
    std::vector<int32_t> s(len);
    for (int32_t& t : s) t = static_cast<int32_t>((*rng)() % vocab);
    seqs.push_back(std::move(s));
  }
  return seqs;
}

class GpuDeltaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
  }
};

// Checks one base with two fine-tunes: sequences 0 and 3 on `a`, 2 on `b`, 1 on the base; fed in
// chunks of 5 (a few rows per fine-tune: the GEMV) and whole (40 rows of `a`: panels).
void ExpectMixedBatchesMatchCpu(const Base& base, const DeltaWeights* a, const DeltaWeights* b,
                                uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t V = base.weights->config.vocab_size;
  const auto seqs = RandomSeqs(V, {9, 17, 12, 40}, &rng);
  const std::vector<const DeltaWeights*> deltas = {a, nullptr, b, a};
  SingleRankCollectives comm;
  ModelRunner cpu(base.weights.get(), &comm, 2);
  for (int64_t chunk : {int64_t{5}, int64_t{1} << 20}) {
    const auto want = FeedSequences(cpu, seqs, chunk, kBlockTokens, deltas);
    struct Run {
      DType act;
      double tol;
    };
    for (const Run& r : {Run{DType::kF32, 1e-4}, Run{DType::kBF16, 3e-2}}) {
      SCOPED_TRACE(::testing::Message() << "chunk " << chunk << " act " << DTypeName(r.act));
      absl::StatusOr<std::unique_ptr<GpuModelRunner>> g =
          GpuModelRunner::Create(*base.weights, Options(r.act, 4, 64 << 20));
      ASSERT_TRUE(g.ok()) << g.status();
      const auto got = FeedGpu(g->get(), seqs, chunk, deltas);
      ASSERT_EQ(got.size(), want.size());
      for (size_t s = 0; s < seqs.size(); ++s) {
        EXPECT_LT(RelativeError(got[s], want[s]), r.tol) << "sequence " << s;
      }
      EXPECT_EQ((*g)->delta_stats().capacity_bytes, 64 << 20);
      EXPECT_EQ((*g)->delta_stats().resident, 2);
      EXPECT_EQ((*g)->delta_stats().uploads, 2);  // once each, then kept
    }
  }
  // The fine-tune really changes the logits of its sequences.
  const auto base_only = FeedSequences(cpu, {seqs[0]}, 1 << 20, kBlockTokens);
  const auto tuned = FeedSequences(cpu, {seqs[0]}, 1 << 20, kBlockTokens, {a});
  EXPECT_GT(RelativeError(tuned[0], base_only[0]), 1e-3);
}

TEST_F(GpuDeltaTest, BundledFineTunesMatchCpu) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Base base = LoadBase(kBase);
  // 4-bit dense (the default) and 2-bit 2:4: two formats of the kernels in one batch.
  std::unique_ptr<DeltaWeights> c = Compress(kBase, base, kCHeaders, "c-headers", 4, false);
  std::unique_ptr<DeltaWeights> man = Compress(kBase, base, kMan, "man", 2, true);
  ASSERT_TRUE(c && man);
  ExpectMixedBatchesMatchCpu(base, c.get(), man.get(), seed);
}

TEST_F(GpuDeltaTest, EveryVariantMatchesCpu) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  for (const char* variant : {"qwen2_bf16", "qwen3_f32", "llama2_f32"}) {
    SCOPED_TRACE(variant);
    const std::string dir = std::string("worker/model/testdata/") + variant;
    const std::string ft = TempPath(std::string(variant) + "-gpu-ft");
    WritePerturbedCopy(dir, ft);
    Base base = LoadBase(dir);
    std::unique_ptr<DeltaWeights> d8 =
        Compress(dir, base, ft, std::string(variant) + "-8", 8, false);
    std::unique_ptr<DeltaWeights> d4 =
        Compress(dir, base, ft, std::string(variant) + "-4s", 4, true);
    ASSERT_TRUE(d8 && d4);
    ExpectMixedBatchesMatchCpu(base, d8.get(), d4.get(), seed);
  }
}

// LoRA adapters on the GPU (their factors converted to the activations' type, x · Aᵀ then · Bᵀ
// through cuBLASLt) against the CPU's low-rank path: the bundled adapters beside a compressed
// delta and each other (one adapts the embedding and LM head too), and random rank-8 adapters on
// every variant.
TEST_F(GpuDeltaTest, LoraAdaptersMatchCpu) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Base base = LoadBase(kBase);
  absl::StatusOr<std::unique_ptr<DeltaWeights>> lora =
      LoadLoraAdapter("models/strata-tiny/lora-c-headers", *base.weights);
  ASSERT_TRUE(lora.ok()) << lora.status();
  std::unique_ptr<DeltaWeights> man = Compress(kBase, base, kMan, "man-lora", 4, false);
  ASSERT_TRUE(man);
  ExpectMixedBatchesMatchCpu(base, lora->get(), man.get(), seed);
  // The second bundled adapter adapts the embedding and the LM head too: beside the first.
  absl::StatusOr<std::unique_ptr<DeltaWeights>> embed =
      LoadLoraAdapter("models/strata-tiny/lora-c-headers-embed", *base.weights);
  ASSERT_TRUE(embed.ok()) << embed.status();
  ExpectMixedBatchesMatchCpu(base, embed->get(), lora->get(), seed);
  for (const char* variant : {"qwen2_bf16", "qwen3_f32", "llama2_f32"}) {
    SCOPED_TRACE(variant);
    Base vb = LoadBase(std::string("worker/model/testdata/") + variant);
    const DType type = LoraFactorType(*vb.weights);
    std::unique_ptr<DeltaWeights> a = RandomLoraWeights(vb.weights->config, 8, 1, type);
    std::unique_ptr<DeltaWeights> b = RandomLoraWeights(vb.weights->config, 4, 2, type);
    // Random adapters of RandomLoraWeights' size barely move the logits: scale them up.
    for (DeltaWeights* d : {a.get(), b.get()}) {
      for (LayerDelta& L : d->layers) {
        for (LowRankDelta* lr :
             {&L.lora_q, &L.lora_k, &L.lora_v, &L.lora_o, &L.lora_gate, &L.lora_up, &L.lora_down}) {
          lr->scale *= 50.0f;
        }
      }
    }
    ExpectMixedBatchesMatchCpu(vb, a.get(), b.get(), seed);
  }
}

TEST_F(GpuDeltaTest, GreedyDecodingPicksTheCpuTokens) {
  Base base = LoadBase(kBase);
  std::unique_ptr<DeltaWeights> c = Compress(kBase, base, kCHeaders, "c-headers-g", 4, false);
  ASSERT_TRUE(c);
  const int64_t V = base.weights->config.vocab_size;
  std::mt19937 rng(3);
  const auto prompts = RandomSeqs(V, {7, 11, 5}, &rng);
  const std::vector<const DeltaWeights*> deltas = {c.get(), nullptr, c.get()};
  SingleRankCollectives comm;
  ModelRunner cpu(base.weights.get(), &comm, 2);
  absl::StatusOr<std::unique_ptr<GpuModelRunner>> g =
      GpuModelRunner::Create(*base.weights, Options(DType::kF32, 3, 64 << 20));
  ASSERT_TRUE(g.ok()) << g.status();
  // Greedy continuations, 12 tokens each: the CPU by argmax over its logits of the whole
  // sequence so far, the GPU by ForwardGreedy through prefill and decode steps.
  std::vector<std::vector<int32_t>> cpu_seqs = prompts, gpu_seqs = prompts;
  for (int step = 0; step < 12; ++step) {
    const auto logits = FeedSequences(cpu, cpu_seqs, 1 << 20, kBlockTokens, deltas);
    for (size_t s = 0; s < cpu_seqs.size(); ++s) {
      const float* last = logits[s].data() + (cpu_seqs[s].size() - 1) * V;
      cpu_seqs[s].push_back(static_cast<int32_t>(std::max_element(last, last + V) - last));
    }
  }
  std::vector<int64_t> done(3, 0);
  for (int step = 0; step < 12; ++step) {
    TestBatch b;
    b.block_tables = ReversedBlockTables(3, kMaxBlocks);
    b.num_seqs = 3;
    b.max_blocks_per_seq = kMaxBlocks;
    b.seq_deltas = deltas;
    for (int32_t s = 0; s < 3; ++s) {
      const int64_t len = static_cast<int64_t>(gpu_seqs[s].size());
      for (int64_t p = done[s]; p < len; ++p) {
        b.Add(gpu_seqs[s][p], s, static_cast<int32_t>(p), kBlockTokens, p == len - 1);
      }
      done[s] = len;
    }
    std::vector<int32_t> next(3);
    ASSERT_TRUE((*g)->ForwardGreedy(b.View(), absl::MakeSpan(next), {}).ok());
    for (int s = 0; s < 3; ++s) gpu_seqs[s].push_back(next[s]);
  }
  EXPECT_EQ(gpu_seqs, cpu_seqs);
  EXPECT_EQ((*g)->graphs_captured(), 0);  // steps with fine-tunes run eagerly
}

TEST_F(GpuDeltaTest, RegionEvictsAndRefusesWhatCannotFit) {
  Base base = LoadBase(kBase);
  std::unique_ptr<DeltaWeights> c = Compress(kBase, base, kCHeaders, "c-headers-r", 4, false);
  std::unique_ptr<DeltaWeights> man = Compress(kBase, base, kMan, "man-r", 4, false);
  ASSERT_TRUE(c && man);
  const int64_t one = c->resident_bytes + (64 << 10);
  const int64_t V = base.weights->config.vocab_size;
  std::mt19937 rng(11);
  const auto seqs = RandomSeqs(V, {6, 9}, &rng);
  SingleRankCollectives comm;
  ModelRunner cpu(base.weights.get(), &comm, 2);

  // Room for one delta at a time: steps alternate between them, each upload evicting the other.
  absl::StatusOr<std::unique_ptr<GpuModelRunner>> g =
      GpuModelRunner::Create(*base.weights, Options(DType::kF32, 2, one));
  ASSERT_TRUE(g.ok()) << g.status();
  for (int round = 0; round < 2; ++round) {
    for (const DeltaWeights* d : {c.get(), man.get()}) {
      const auto want = FeedSequences(cpu, {seqs[0]}, 1 << 20, kBlockTokens, {d});
      const auto got = FeedGpu(g->get(), {seqs[0]}, 1 << 20, {d});
      EXPECT_LT(RelativeError(got[0], want[0]), 1e-4);
    }
  }
  EXPECT_EQ((*g)->delta_stats().uploads, 4);
  EXPECT_EQ((*g)->delta_stats().evictions, 3);
  EXPECT_EQ((*g)->delta_stats().resident, 1);

  // Both in one step do not fit: RESOURCE_EXHAUSTED, and the runner goes on serving.
  // One token of each sequence, at position 0; seq_deltas as given.
  const auto first_tokens = [&](int64_t seqs, std::vector<const DeltaWeights*> deltas) {
    TestBatch b;
    b.block_tables = ReversedBlockTables(seqs, kMaxBlocks);
    b.num_seqs = seqs;
    b.max_blocks_per_seq = kMaxBlocks;
    b.seq_deltas = std::move(deltas);
    for (int32_t s = 0; s < seqs; ++s) b.Add(1 + s, s, 0, kBlockTokens, true);
    return b;
  };
  auto both = [&]() {
    std::vector<float> logits(2 * V);
    return (*g)->Forward(first_tokens(2, {c.get(), man.get()}).View(), absl::MakeSpan(logits));
  };
  absl::Status s = both();
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  const auto want = FeedSequences(cpu, {seqs[1]}, 1 << 20, kBlockTokens, {man.get()});
  const auto got = FeedGpu(g->get(), {seqs[1]}, 1 << 20, {man.get()});
  EXPECT_LT(RelativeError(got[0], want[0]), 1e-4);

  // Without a region, fine-tunes are refused (base sequences still run).
  absl::StatusOr<std::unique_ptr<GpuModelRunner>> plain =
      GpuModelRunner::Create(*base.weights, Options(DType::kF32, 2, 0));
  ASSERT_TRUE(plain.ok()) << plain.status();
  std::vector<float> logits(V);
  const TestBatch tuned = first_tokens(1, {c.get()});
  s = (*plain)->Forward(tuned.View(), absl::MakeSpan(logits));
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  EXPECT_TRUE((*plain)->Forward(first_tokens(1, {}).View(), absl::MakeSpan(logits)).ok());
}

#else

TEST(GpuDeltaTest, NeedsCudaBuild) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
