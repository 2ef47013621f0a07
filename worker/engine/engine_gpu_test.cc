// The engine on the GPU (EngineConfig::device = "gpu") against the engine on the CPU: for the
// bundled strata-tiny model and every testdata architecture, a batch of mixed-length greedy
// requests, with chunked prefill, produces the same tokens with f32 activations; with bf16 it runs
// and agrees on nearly all of them (rounding can flip a near tie, so only the rate is bounded).
// Seeded sampling with penalties, truncation and banned tokens (on the GPU, through
// GpuModelRunner::ForwardSample) draws the CPU engine's tokens too.
// Needs a GPU: tagged "gpu"; skipped where there is none.
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

std::map<std::string, std::vector<int32_t>> RunAll(Engine& e) {
  std::map<std::string, std::vector<int32_t>> out;
  for (int steps = 0; e.HasWork() && steps < 10000; ++steps) {
    auto step = e.Step();
    EXPECT_TRUE(step.ok()) << step.status();
    if (!step.ok()) break;
    for (const RequestOutput& o : *step) {
      for (const SampledToken& t : o.tokens) out[o.request_id].push_back(t.token);
    }
  }
  EXPECT_FALSE(e.HasWork());
  return out;
}

class EngineGpuTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
    auto config = LoadModelConfig(GetParam());
    ASSERT_TRUE(config.ok()) << config.status();
    auto weights = LoadModelWeights(GetParam(), *config, 0, 1);
    ASSERT_TRUE(weights.ok()) << weights.status();
    weights_ = std::move(*weights);
  }

  // Eight requests with mixed prompt lengths; `sampled`: seeded sampling with every knob (and
  // min_tokens, which bans EOS for a while) instead of greedy.
  std::map<std::string, std::vector<int32_t>> Generate(const std::string& device, DType dtype,
                                                       bool sampled = false) {
    EngineConfig ec;
    ec.device = device;
    ec.gpu_dtype = dtype;
    ec.max_batch_tokens = 48;  // prompts prefill in chunks, beside other requests' decodes
    ec.max_running_sequences = 8;
    ec.compute_threads = 2;
    auto e = Engine::Create(weights_.get(), &comm_, ec);
    EXPECT_TRUE(e.ok()) << e.status();
    if (!e.ok()) return {};
    std::mt19937 rng(3);
    const int64_t vocab = weights_->config.vocab_size;
    for (int i = 0; i < 8; ++i) {
      std::vector<int32_t> prompt(1 + rng() % 60);
      for (int32_t& t : prompt) t = static_cast<int32_t>(3 + rng() % (vocab - 3));
      RequestOptions o;
      o.sampling.temperature = 0;
      o.max_tokens = 24;
      o.ignore_eos = true;
      if (sampled) {
        o.sampling.temperature = 0.6f + 0.1f * i;
        o.sampling.top_k = i % 2 == 0 ? 0 : 20;
        o.sampling.top_p = i % 3 == 0 ? 1.0f : 0.9f;
        o.sampling.min_p = i % 4 == 1 ? 0.05f : 0.0f;
        o.sampling.repetition_penalty = i % 2 == 1 ? 1.2f : 1.0f;
        o.sampling.presence_penalty = i % 3 == 2 ? 0.4f : 0.0f;
        o.sampling.frequency_penalty = i % 4 == 3 ? 0.3f : 0.0f;
        o.sampling.seed = 1000 + i;
        o.min_tokens = 4;
        o.ignore_eos = i % 2 == 0;
      }
      EXPECT_TRUE((*e)->AddRequest("r" + std::to_string(i), prompt, o).ok());
    }
    return RunAll(**e);
  }

  SingleRankCollectives comm_;
  std::unique_ptr<ModelWeights> weights_;
};

TEST_P(EngineGpuTest, GreedyTokensEqualTheCpuEngine) {
  const auto cpu = Generate("cpu", DType::kF32);
  const auto gpu = Generate("gpu", DType::kF32);
  ASSERT_EQ(cpu.size(), 8u);
  EXPECT_EQ(gpu, cpu);
  const auto bf16 = Generate("gpu", DType::kBF16);
  ASSERT_EQ(bf16.size(), cpu.size());
  int same = 0, total = 0;
  for (const auto& [id, tokens] : cpu) {
    const std::vector<int32_t>& b = bf16.at(id);
    ASSERT_EQ(b.size(), tokens.size());
    // Count up to the first difference: after it the two continue different texts.
    size_t i = 0;
    while (i < tokens.size() && b[i] == tokens[i]) ++i;
    same += static_cast<int>(i);
    total += static_cast<int>(tokens.size());
  }
  RecordProperty("bf16_agreement", std::to_string(same) + "/" + std::to_string(total));
  EXPECT_GE(same, total / 2) << same << " of " << total << " bf16 tokens before a divergence";
}

// Seeded sampling runs on the GPU (the logits stay there) and draws the CPU engine's tokens.
TEST_P(EngineGpuTest, SampledTokensEqualTheCpuEngine) {
  const auto cpu = Generate("cpu", DType::kF32, /*sampled=*/true);
  const auto gpu = Generate("gpu", DType::kF32, /*sampled=*/true);
  ASSERT_EQ(cpu.size(), 8u);
  EXPECT_EQ(gpu, cpu);
}

INSTANTIATE_TEST_SUITE_P(Models, EngineGpuTest,
                         ::testing::Values(std::string("models/strata-tiny/base"),
                                           std::string("worker/model/testdata/llama3_bf16"),
                                           std::string("worker/model/testdata/qwen2_bf16"),
                                           std::string("worker/model/testdata/mistral_f16")));

#else

TEST(EngineGpuTest, NeedsCudaBuild) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
