// GpuRunnerOptions' checks, which come before the device is touched: they run (and this test runs)
// on machines without a GPU too.
#include <functional>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "worker/model/config.h"
#include "worker/model/gpu_model_runner.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/ops_kernel.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

GpuRunnerOptions Small() {
  GpuRunnerOptions o;
  o.num_blocks = 64;
  o.block_tokens = 4;
  o.max_batch_tokens = 256;
  o.max_seqs = 4;
  o.max_blocks_per_seq = 64;
  return o;
}

// Each bad option is INVALID_ARGUMENT naming its field.
TEST(GpuRunnerOptionsTest, BadOptionsAreRefusedByName) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig("worker/model/testdata/llama3_bf16");
  ASSERT_TRUE(config.ok()) << config.status();
  struct Case {
    const char* field;
    std::function<void(GpuRunnerOptions*)> set;
  };
  const std::vector<Case> cases = {
      {"gemv_variant", [](GpuRunnerOptions* o) { o->gemv_variant = -1; }},
      {"gemv_variant", [](GpuRunnerOptions* o) { o->gemv_variant = gpu::kGemvVariants; }},
      {"gemv_max_rows", [](GpuRunnerOptions* o) { o->gemv_max_rows = -1; }},
      {"gemv_max_rows", [](GpuRunnerOptions* o) { o->gemv_max_rows = 9; }},
      {"decode_attention_max_rows", [](GpuRunnerOptions* o) { o->decode_attention_max_rows = -2; }},
      {"num_blocks", [](GpuRunnerOptions* o) { o->num_blocks = 0; }},
      {"max_seqs", [](GpuRunnerOptions* o) { o->max_seqs = -1; }},
      {"delta_bytes", [](GpuRunnerOptions* o) { o->delta_bytes = -1; }},
  };
  for (const Case& bad : cases) {
    GpuRunnerOptions o = Small();
    bad.set(&o);
    const absl::Status s = GpuModelRunner::CreateRandom(*config, o, 1).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad.field << ": " << s;
    EXPECT_NE(s.message().find(bad.field), absl::string_view::npos) << s;
  }
}

// At the limits nothing is refused for the options: a runner with a GPU, UNAVAILABLE without.
TEST(GpuRunnerOptionsTest, LimitsAreAccepted) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig("worker/model/testdata/llama3_bf16");
  ASSERT_TRUE(config.ok()) << config.status();
  GpuRunnerOptions o = Small();
  o.gemv_variant = gpu::kGemvVariants - 1;
  o.gemv_max_rows = 8;
  o.decode_attention_max_rows = 0;
  o.delta_bytes = 0;
  const absl::Status s = GpuModelRunner::CreateRandom(*config, o, 1).status();
  EXPECT_TRUE(s.ok() || s.code() == absl::StatusCode::kUnavailable) << s;
}

#else
TEST(GpuRunnerOptionsTest, NoCudaInThisBuild) { GTEST_SKIP() << "built without CUDA"; }
#endif

}  // namespace
}  // namespace strata
