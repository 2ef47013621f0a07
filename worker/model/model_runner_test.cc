// The CPU forward pass against an independent float64 NumPy reference
// (tools/reference/llama_ref.py) on small random models of every supported architecture variant and
// weight dtype, and the invariance of a sequence's logits to how it is fed: all at once, in prefill
// chunks, token by token, or batched with other sequences.
#include "worker/model/model_runner.h"

#include <cmath>
#include <fstream>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "common/json.h"
#include "common/mapped_file.h"
#include "gtest/gtest.h"
#include "worker/comm/shm_collectives.h"
#include "worker/model/config.h"
#include "worker/model/test_util.h"
#include "worker/model/weights.h"

namespace strata {
namespace {

constexpr char kTestdata[] = "worker/model/testdata/";

struct Case {
  std::vector<int32_t> ids;
  std::vector<float> logits;  // [ids.size(), vocab]
};

std::vector<Case> ReadCases(const std::string& dir) {
  std::vector<Case> out;
  auto text = ReadFileToString(dir + "/reference.json");
  EXPECT_TRUE(text.ok()) << text.status();
  auto doc = JsonDocument::Parse(*text, dir + "/reference.json");
  EXPECT_TRUE(doc.ok()) << doc.status();
  const std::vector<JsonValue> cases = *doc->root().Field("cases")->AsArray();
  for (const JsonValue& c : cases) {
    Case k;
    const std::vector<JsonValue> ids = *c.Field("ids")->AsArray();
    for (const JsonValue& id : ids) k.ids.push_back(static_cast<int32_t>(*id.AsInt()));
    auto file = MappedFile::Open(dir + "/" + std::string(*c.StringField("logits_file")));
    EXPECT_TRUE(file.ok()) << file.status();
    k.logits.resize(file->size() / sizeof(float));
    std::memcpy(k.logits.data(), file->bytes().data(), file->size());
    out.push_back(std::move(k));
  }
  return out;
}

// A model directory and the directory with its reference.json and logits.
struct Variant {
  std::string model;
  std::string reference;
};

void PrintTo(const Variant& v, std::ostream* os) { *os << v.model; }

class ModelRunnerTest : public ::testing::TestWithParam<Variant> {};

TEST_P(ModelRunnerTest, MatchesFloat64Reference) {
  const std::string dir = GetParam().model;
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  auto weights = LoadModelWeights(dir, *config, 0, 1);
  ASSERT_TRUE(weights.ok()) << weights.status();
  SingleRankCollectives comm;
  const std::vector<Case> cases = ReadCases(GetParam().reference);
  ASSERT_FALSE(cases.empty());
  // One thread runs every product whole; with three, prefill products through the BLAS are split
  // into three shares of columns that fall unevenly across q/k/v and gate/up.
  for (int threads : {1, 3}) {
    ModelRunner runner(weights->get(), &comm, threads);
    for (const Case& c : cases) {
      SCOPED_TRACE(::testing::Message() << threads << " threads, " << c.ids.size() << " tokens");
      const auto got = FeedSequences(runner, {c.ids}, /*chunk=*/1 << 20, /*block_tokens=*/4);
      ASSERT_EQ(got[0].size(), c.logits.size());
      EXPECT_LT(RelativeError(got[0], c.logits), 1e-4);
    }
  }
}

TEST_P(ModelRunnerTest, LogitsDoNotDependOnChunkingOrBatching) {
  const std::string dir = GetParam().model;
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  auto weights = LoadModelWeights(dir, *config, 0, 1);
  ASSERT_TRUE(weights.ok());
  SingleRankCollectives comm;
  ModelRunner runner(weights->get(), &comm);
  const std::vector<Case> cases = ReadCases(GetParam().reference);
  std::vector<std::vector<int32_t>> seqs;
  for (const Case& c : cases) seqs.push_back(c.ids);
  const auto alone = FeedSequences(runner, {seqs.back()}, 1 << 20, 16);
  const auto chunked = FeedSequences(runner, {seqs.back()}, 3, 16);
  const auto by_token = FeedSequences(runner, {seqs.back()}, 1, 5);
  const auto batched = FeedSequences(runner, seqs, 7, 4);
  EXPECT_LT(RelativeError(chunked[0], alone[0]), 1e-5);
  EXPECT_LT(RelativeError(by_token[0], alone[0]), 1e-5);
  EXPECT_LT(RelativeError(batched.back(), alone[0]), 1e-5);
  for (size_t i = 0; i < seqs.size(); ++i)
    EXPECT_LT(RelativeError(batched[i], cases[i].logits), 1e-4);
}

// Tensor parallelism: the same cases through two ranks (threads of this process sharing a group's
// memory), each with its shard of the weights and its KV heads, rank 0 driving.
TEST_P(ModelRunnerTest, TwoTensorParallelRanksMatchTheReference) {
  const std::string dir = GetParam().model;
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  constexpr int kWorld = 2;
  absl::StatusOr<ShmGroup> group = ShmGroup::Create(kWorld, 64 << 10);
  ASSERT_TRUE(group.ok()) << group.status();
  std::vector<std::unique_ptr<ModelWeights>> shards;
  std::vector<std::unique_ptr<ShmCollectives>> comms;
  for (int r = 0; r < kWorld; ++r) {
    auto w = LoadModelWeights(dir, *config, r, kWorld);
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ((*w)->num_kv_heads * kWorld, config->num_kv_heads);
    shards.push_back(*std::move(w));
    auto c = ShmCollectives::Join(group->control_fd(), group->memory_fd(), r, kWorld);
    ASSERT_TRUE(c.ok()) << c.status();
    comms.push_back(*std::move(c));
  }
  absl::Status follower_status;
  std::thread follower([&] {
    ModelRunner runner(shards[1].get(), comms[1].get(), /*num_threads=*/1);
    follower_status = runner.ServeFollower();
  });
  {
    ModelRunner runner(shards[0].get(), comms[0].get(), /*num_threads=*/1);
    const std::vector<Case> cases = ReadCases(GetParam().reference);
    std::vector<std::vector<int32_t>> seqs;
    for (const Case& c : cases) seqs.push_back(c.ids);
    constexpr int64_t kBlockTokens = 4;
    int64_t max_len = 0;
    for (const auto& q : seqs) max_len = std::max<int64_t>(max_len, q.size());
    const int64_t max_blocks = (max_len + kBlockTokens - 1) / kBlockTokens;
    const int64_t num_blocks = max_blocks * static_cast<int64_t>(seqs.size());
    auto caches = GroupKvCaches(*shards[0], comms[0].get(), num_blocks, kBlockTokens);
    ASSERT_TRUE(caches.ok()) << caches.status();
    // Poison every rank's cache: a slot no rank wrote turns the logits to NaN.
    const int64_t per_rank = KvCacheStorage::BlockBytes(*shards[0], kBlockTokens) * num_blocks;
    std::fill_n((*caches)[0].k[0], per_rank * kWorld / sizeof(float), std::nanf(""));
    const int64_t V = config->vocab_size;
    const auto got = FeedInChunks(
        [&](const ForwardBatch& batch, std::vector<float>* logits) {
          logits->assign(batch.logit_tokens.size() * V, 0.0f);
          return runner.Forward(batch, (*caches)[0], absl::MakeSpan(*logits));
        },
        V, seqs, /*chunk=*/5, kBlockTokens, max_blocks);
    ASSERT_EQ(got.size(), cases.size());
    for (size_t i = 0; i < cases.size(); ++i) {
      EXPECT_LT(RelativeError(got[i], cases[i].logits), 1e-4) << "case " << i;
    }
    EXPECT_TRUE(runner.StopFollowers().ok());
  }
  follower.join();
  EXPECT_TRUE(follower_status.ok()) << follower_status;
}

// A follower whose step fails aborts the group: rank 0's step returns UNAVAILABLE naming the cause
// instead of waiting forever, and so does every later one.
TEST(ModelRunnerTensorParallelTest, AFailedFollowerStepAbortsTheGroup) {
  const std::string dir = std::string(kTestdata) + "llama3_bf16";
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  absl::StatusOr<ShmGroup> group = ShmGroup::Create(2, 64 << 10);
  ASSERT_TRUE(group.ok());
  auto w0 = LoadModelWeights(dir, *config, 0, 2);
  auto w1 = LoadModelWeights(dir, *config, 1, 2);
  ASSERT_TRUE(w0.ok() && w1.ok());
  auto c0 = ShmCollectives::Join(group->control_fd(), group->memory_fd(), 0, 2);
  auto c1 = ShmCollectives::Join(group->control_fd(), group->memory_fd(), 1, 2);
  ASSERT_TRUE(c0.ok() && c1.ok());
  ModelRunner runner(w0->get(), c0->get(), 1);
  // The group's memory is already mapped at 1 MiB on both ranks.
  ASSERT_TRUE((*c0)->SharedMemory(1 << 20).ok());
  ASSERT_TRUE((*c1)->SharedMemory(1 << 20).ok());
  absl::Status follower_status;
  std::thread follower([&] {
    ModelRunner r1(w1->get(), c1->get(), 1);
    follower_status = r1.ServeFollower();
  });
  // A plan for a cache of 8 blocks: the follower's cache of 8 blocks would need another size of
  // group memory than the one it mapped, so its step fails.
  KvCacheStorage own(**w0, 8, 4);
  const std::vector<int32_t> tokens = {1, 2, 3}, positions = {0, 1, 2}, seq = {0, 0, 0},
                             table = {0}, logit_tokens = {2};
  const std::vector<int64_t> slots = {0, 1, 2};
  ForwardBatch b{tokens, positions, seq, slots, table, 1, 1, logit_tokens, {}};
  std::vector<float> logits(config->vocab_size);
  absl::Status s = runner.Forward(b, own.layers(), absl::MakeSpan(logits));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank 1: step failed: SharedMemory")) << s;
  follower.join();
  EXPECT_FALSE(follower_status.ok());
  EXPECT_EQ(runner.Forward(b, own.layers(), absl::MakeSpan(logits)).code(),
            absl::StatusCode::kUnavailable);
}

// Random weights drawn for rank r of 2 are rank r's share of the one-rank random model, element for
// element, so a tensor-parallel benchmark of a model that is not on disk runs the same model.
TEST(ModelWeightsTest, RandomShardsAreSlicesOfTheWholeRandomModel) {
  auto config = LoadModelConfig(std::string(kTestdata) + "qwen2_bf16");
  ASSERT_TRUE(config.ok());
  const auto whole = RandomModelWeights(*config, DType::kBF16, 5);
  const int64_t H = config->hidden_size;
  const auto element = [](const Matrix& m, int64_t r, int64_t c) {
    uint16_t v;
    std::memcpy(&v, static_cast<const uint8_t*>(m.data) + 2 * (r * m.cols + c), 2);
    return v;
  };
  for (int rank = 0; rank < 2; ++rank) {
    const auto part = RandomModelWeights(*config, DType::kBF16, 5, rank, 2);
    EXPECT_EQ(part->num_kv_heads * 2, config->num_kv_heads);
    EXPECT_EQ(part->layers[1].q_bias.size(),
              static_cast<size_t>(part->num_heads * config->head_dim));
    const LayerWeights& w = whole->layers[1];
    const LayerWeights& p = part->layers[1];
    const int64_t q_rows = p.q.rows, inter = p.gate.rows;
    ASSERT_EQ(q_rows * 2, w.q.rows);
    for (int64_t r = 0; r < q_rows; ++r) {
      for (int64_t c = 0; c < H; c += 7) {
        ASSERT_EQ(element(p.q, r, c), element(w.q, rank * q_rows + r, c)) << r << "," << c;
      }
    }
    for (int64_t r = 0; r < H; r += 5) {
      for (int64_t c = 0; c < inter; ++c) {
        ASSERT_EQ(element(p.down, r, c), element(w.down, r, rank * inter + c)) << r << "," << c;
      }
      for (int64_t c = 0; c < q_rows; ++c) {
        ASSERT_EQ(element(p.o, r, c), element(w.o, r, rank * q_rows + c)) << r << "," << c;
      }
    }
    for (int64_t r = 0; r < part->lm_head.rows; r += 3) {
      ASSERT_EQ(element(part->lm_head, r, 1), element(whole->lm_head, part->vocab_begin + r, 1));
    }
    ASSERT_EQ(element(part->embed, 100, 3), element(whole->embed, 100, 3));
  }
  // Normal with standard deviation 0.02.
  const Matrix& g = whole->layers[0].gate;
  double sum = 0, sum2 = 0;
  for (int64_t i = 0; i < g.rows * g.cols; ++i) {
    const double v = Bf16ToFloat(element(g, 0, i));
    sum += v;
    sum2 += v * v;
  }
  const double n = static_cast<double>(g.rows * g.cols);
  EXPECT_NEAR(sum / n, 0.0, 0.002);
  EXPECT_NEAR(std::sqrt(sum2 / n), 0.02, 0.001);
  // A different seed draws different weights.
  const auto other = RandomModelWeights(*config, DType::kBF16, 6);
  EXPECT_NE(std::memcmp(other->layers[0].q.data, whole->layers[0].q.data, 64), 0);
}

Variant Testdata(const std::string& name) {
  return {std::string(kTestdata) + name, std::string(kTestdata) + name};
}

INSTANTIATE_TEST_SUITE_P(Variants, ModelRunnerTest,
                         ::testing::Values(Testdata("llama2_f32"), Testdata("llama3_bf16"),
                                           Testdata("mistral_f16"), Testdata("qwen2_bf16"),
                                           Testdata("qwen3_f32"),
                                           // The bundled trained model, on held-out text.
                                           Variant{"models/strata-tiny/base",
                                                   std::string(kTestdata) + "strata_tiny_base"}));

TEST(ModelWeightsTest, MissingTensorAndWrongShapeAreNamed) {
  auto config = LoadModelConfig(std::string(kTestdata) + "llama2_f32");
  ASSERT_TRUE(config.ok());
  ModelConfig wrong = *config;
  wrong.intermediate_size += 2;
  auto w = LoadModelWeights(std::string(kTestdata) + "llama2_f32", wrong, 0, 1);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("mlp.gate_proj.weight has shape"), absl::string_view::npos)
      << w.status();
  ModelConfig qwen = *config;
  qwen.qk_norm = true;
  w = LoadModelWeights(std::string(kTestdata) + "llama2_f32", qwen, 0, 1);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("missing tensor model.layers.0.self_attn.q_norm.weight"),
            absl::string_view::npos)
      << w.status();
  w = LoadModelWeights(std::string(kTestdata) + "llama2_f32", *config, 0, 3);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("not divisible by the tensor-parallel size 3"),
            absl::string_view::npos);
}

}  // namespace
}  // namespace strata
