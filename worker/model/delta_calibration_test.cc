// Calibration statistics: ModelRunner's activation observer sees each layer's projection inputs
// (the first checked against a hand-computed RMSNorm of the embeddings), and
// CalibrateColumnImportance turns them into per-matrix column importance that CompressDelta uses.
#include "worker/model/delta_calibration.h"

#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "worker/model/config.h"
#include "worker/model/delta.h"
#include "worker/model/delta_test_util.h"
#include "worker/model/model_runner.h"
#include "worker/model/test_util.h"
#include "worker/model/weights.h"

namespace strata {
namespace {

using delta_test::kBase;
using delta_test::kCHeaders;
using delta_test::LoadBase;
using delta_test::TempPath;

TEST(ActivationObserverTest, SeesEveryProjectionInput) {
  const std::string dir = "worker/model/testdata/llama2_f32";
  delta_test::Base base = LoadBase(dir);
  const ModelConfig& c = base.weights->config;
  ASSERT_EQ(base.weights->embed.dtype, DType::kF32);
  SingleRankCollectives comm;
  ModelRunner runner(base.weights.get(), &comm, 1);
  std::vector<std::tuple<int64_t, ProjectionInput, int64_t, int64_t>> calls;
  std::vector<float> first;  // layer 0's q/k/v input
  runner.set_activation_observer(
      [&](int64_t layer, ProjectionInput input, const float* x, int64_t rows, int64_t cols) {
        calls.emplace_back(layer, input, rows, cols);
        if (layer == 0 && input == ProjectionInput::kQkv) first.assign(x, x + rows * cols);
      });
  const std::vector<int32_t> tokens = {3, 17, 200, 5, 9};
  KvCacheStorage cache(*base.weights, 2, 4);
  TestBatch b;
  b.block_tables = {0, 1};
  b.num_seqs = 1;
  b.max_blocks_per_seq = 2;
  for (size_t p = 0; p < tokens.size(); ++p) {
    b.Add(tokens[p], 0, static_cast<int32_t>(p), 4, /*logits=*/false);
  }
  ASSERT_TRUE(runner.Forward(b.View(), cache.layers(), {}).ok());
  const int64_t H = c.hidden_size;
  std::vector<std::tuple<int64_t, ProjectionInput, int64_t, int64_t>> want;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    want.emplace_back(l, ProjectionInput::kQkv, 5, H);
    want.emplace_back(l, ProjectionInput::kO, 5, c.q_dim());
    want.emplace_back(l, ProjectionInput::kGateUp, 5, H);
    want.emplace_back(l, ProjectionInput::kDown, 5, c.intermediate_size);
  }
  EXPECT_EQ(calls, want);
  // Layer 0's q/k/v input is the RMSNorm of the tokens' embeddings.
  const float* embed = static_cast<const float*>(base.weights->embed.data);
  for (size_t t = 0; t < tokens.size(); ++t) {
    const float* x = embed + tokens[t] * H;
    double sq = 0;
    for (int64_t i = 0; i < H; ++i) sq += double{x[i]} * x[i];
    const double inv = 1.0 / std::sqrt(sq / H + c.rms_norm_eps);
    for (int64_t i = 0; i < H; ++i) {
      EXPECT_NEAR(first[t * H + i], x[i] * inv * base.weights->layers[0].input_norm[i], 1e-5)
          << "token " << t << " column " << i;
    }
  }
}

TEST(CalibrateTest, ImportanceOfEveryLayerMatrix) {
  delta_test::Base base = LoadBase(kBase);
  const ModelConfig& c = base.weights->config;
  std::vector<int32_t> tokens(700);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 37) % 2000);
  absl::StatusOr<std::map<std::string, std::vector<float>>> imp =
      CalibrateColumnImportance(*base.weights, tokens, {256, 2});
  ASSERT_TRUE(imp.ok()) << imp.status();
  EXPECT_EQ(static_cast<int64_t>(imp->size()), 7 * c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const std::vector<float>& q = imp->at(p + "self_attn.q_proj.weight");
    EXPECT_EQ(static_cast<int64_t>(q.size()), c.hidden_size);
    EXPECT_EQ(q, imp->at(p + "self_attn.v_proj.weight"));  // one input
    EXPECT_EQ(imp->at(p + "mlp.gate_proj.weight"), imp->at(p + "mlp.up_proj.weight"));
    EXPECT_EQ(static_cast<int64_t>(imp->at(p + "self_attn.o_proj.weight").size()), c.q_dim());
    const std::vector<float>& down = imp->at(p + "mlp.down_proj.weight");
    EXPECT_EQ(static_cast<int64_t>(down.size()), c.intermediate_size);
    float lo = down[0], hi = down[0];
    for (float v : down) {
      ASSERT_TRUE(std::isfinite(v) && v >= 0);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    EXPECT_GT(hi, 2 * lo) << "columns should differ in importance";
  }
  // Refusals.
  EXPECT_TRUE(absl::IsInvalidArgument(CalibrateColumnImportance(*base.weights, {}, {}).status()));
  const std::vector<int32_t> bad = {1, 2, static_cast<int32_t>(c.vocab_size)};
  absl::Status s = CalibrateColumnImportance(*base.weights, bad, {}).status();
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("token 2"), absl::string_view::npos) << s;
  EXPECT_TRUE(
      absl::IsInvalidArgument(CalibrateColumnImportance(*base.weights, tokens, {0, 1}).status()));
}

TEST(CalibrateTest, CompressDeltaUsesTheImportance) {
  delta_test::Base base = LoadBase(kBase);
  std::vector<int32_t> tokens(600);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 91) % 2000);
  absl::StatusOr<std::map<std::string, std::vector<float>>> imp =
      CalibrateColumnImportance(*base.weights, tokens, {});
  ASSERT_TRUE(imp.ok()) << imp.status();
  DeltaCompressOptions o;
  o.sparse_2_4 = true;
  const std::string plain = TempPath("plain24.delta.safetensors");
  const std::string calibrated = TempPath("calibrated24.delta.safetensors");
  absl::StatusOr<DeltaCompressReport> a = CompressDelta(kBase, kCHeaders, plain, o);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->num_calibrated, 0);
  o.column_importance = *imp;
  absl::StatusOr<DeltaCompressReport> b = CompressDelta(kBase, kCHeaders, calibrated, o);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->num_calibrated, 7 * base.weights->config.num_layers);
  // Other 2:4 choices: the files differ, the plain relative error (which ignores importance) is
  // no better for the calibrated one.
  absl::StatusOr<DeltaFileInfo> ia = ReadDeltaFileInfo(plain), ib = ReadDeltaFileInfo(calibrated);
  ASSERT_TRUE(ia.ok() && ib.ok());
  EXPECT_NE(ia->data_xxh3, ib->data_xxh3);
  double ea = 0, eb = 0;
  for (size_t i = 0; i < a->tensors.size(); ++i) {
    ea += a->tensors[i].relative_error;
    eb += b->tensors[i].relative_error;
  }
  EXPECT_GE(eb, ea);
  // A wrong-sized entry is refused, naming the tensor.
  o.column_importance["model.layers.0.mlp.down_proj.weight"].resize(3);
  absl::Status s = CompressDelta(kBase, kCHeaders, calibrated, o).status();
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("down_proj"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace strata
