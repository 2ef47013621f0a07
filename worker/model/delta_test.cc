// The delta file format on the bundled strata-tiny models: compressing a real fine-tune, reading
// it back over its base, and every way a delta file can be refused.
#include "worker/model/delta.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "common/hash.h"
#include "common/mapped_file.h"
#include "gtest/gtest.h"
#include "worker/comm/collectives.h"
#include "worker/model/config.h"
#include "worker/model/delta_test_util.h"
#include "worker/model/model_runner.h"
#include "worker/model/test_util.h"
#include "worker/model/weights.h"

namespace strata {
namespace {

using delta_test::Base;
using delta_test::kBase;
using delta_test::kCHeaders;
using delta_test::kMan;
using delta_test::LoadBase;
using delta_test::TempPath;
using delta_test::WritePerturbedCopy;

// Compresses ft-c-headers once per test binary.
const std::string& CHeadersDelta() {
  static const std::string* path = [] {
    auto* p = new std::string(TempPath("c-headers.delta.safetensors"));
    DeltaCompressOptions options;
    options.base_model_name = "strata-tiny";
    options.sparse_2_4 = true;
    absl::StatusOr<DeltaCompressReport> report = CompressDelta(kBase, kCHeaders, *p, options);
    EXPECT_TRUE(report.ok()) << report.status();
    return p;
  }();
  return *path;
}

TEST(DeltaCompressTest, RealFineTuneCompressesAndLoads) {
  const std::string out = TempPath("report.delta.safetensors");
  DeltaCompressOptions options;
  options.base_model_name = "strata-tiny";
  options.sparse_2_4 = true;
  absl::StatusOr<DeltaCompressReport> report = CompressDelta(kBase, kCHeaders, out, options);
  ASSERT_TRUE(report.ok()) << report.status();
  // 4 layers x (7 matrices + 2 norms) + embedding + final norm: a full fine-tune changes all.
  EXPECT_EQ(report->tensors.size(), 4u * 9 + 2);
  EXPECT_EQ(report->num_unchanged, 0);
  // 2:4 at 4 bits: 3 bits a weight plus a scale a row, against 16 bits of bf16.
  EXPECT_LT(report->delta_bytes * 5, report->fine_tune_bytes);
  for (const DeltaCompressReport::Tensor& t : report->tensors) {
    if (t.cols == 0) continue;
    // 2:4 pruning drops the smaller half of each group: a relative error near 0.5, never near 1.
    EXPECT_GT(t.relative_error, 0.05) << t.name;
    EXPECT_LT(t.relative_error, 0.75) << t.name;
  }

  absl::StatusOr<DeltaFileInfo> info = ReadDeltaFileInfo(out);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->base_model, "strata-tiny");
  EXPECT_EQ(info->bits, 4);
  EXPECT_TRUE(info->sparse_2_4);
  EXPECT_EQ(info->data_bytes, report->delta_bytes);

  Base base = LoadBase(kBase);
  EXPECT_EQ(info->base_fingerprint, base.fingerprint);
  absl::StatusOr<std::unique_ptr<DeltaWeights>> d = LoadDelta(out, *base.weights, base.fingerprint);
  ASSERT_TRUE(d.ok()) << d.status();
  const ModelConfig& c = base.weights->config;
  EXPECT_EQ((*d)->embed.rows, c.vocab_size);
  EXPECT_EQ((*d)->lm_head.rows, 0);  // tied
  EXPECT_EQ((*d)->final_norm.size(), static_cast<size_t>(c.hidden_size));
  ASSERT_EQ((*d)->layers.size(), static_cast<size_t>(c.num_layers));
  for (const LayerDelta& L : (*d)->layers) {
    EXPECT_EQ(L.q.rows, c.q_dim());
    EXPECT_EQ(L.down.cols, c.intermediate_size);
    EXPECT_EQ(L.input_norm.size(), static_cast<size_t>(c.hidden_size));
    EXPECT_TRUE(L.q_norm.empty());
  }
  EXPECT_GT((*d)->resident_bytes, report->delta_bytes * 9 / 10);
  // Plus at most one 64-byte alignment pad per tensor.
  EXPECT_LE((*d)->resident_bytes, report->delta_bytes + 64 * (info->num_tensors + 1));

  // The fine-tune's own norm weights come back exactly.
  absl::StatusOr<ModelConfig> ft_config = LoadModelConfig(kCHeaders);
  ASSERT_TRUE(ft_config.ok());
  absl::StatusOr<std::unique_ptr<ModelWeights>> ft = LoadModelWeights(kCHeaders, *ft_config, 0, 1);
  ASSERT_TRUE(ft.ok());
  EXPECT_EQ((*d)->final_norm, (*ft)->final_norm);
  EXPECT_EQ((*d)->layers[2].post_attention_norm, (*ft)->layers[2].post_attention_norm);
}

TEST(DeltaCompressTest, OptionsChangeTheFormat) {
  const std::string out = TempPath("dense8.delta.safetensors");
  DeltaCompressOptions options;
  options.bits = 8;
  options.sparse_2_4 = false;
  absl::StatusOr<DeltaCompressReport> report = CompressDelta(kBase, kMan, out, options);
  ASSERT_TRUE(report.ok()) << report.status();
  for (const DeltaCompressReport::Tensor& t : report->tensors) {
    if (t.cols > 0) {
      EXPECT_LT(t.relative_error, 0.02) << t.name;
    }
  }
  absl::StatusOr<DeltaFileInfo> info = ReadDeltaFileInfo(out);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->bits, 8);
  EXPECT_FALSE(info->sparse_2_4);

  options.bits = 3;
  EXPECT_NE(CompressDelta(kBase, kMan, out, options).status().message().find("bits must be"),
            absl::string_view::npos);
}

TEST(DeltaCompressTest, AModelAgainstItselfHasAnEmptyDelta) {
  const std::string out = TempPath("empty.delta.safetensors");
  absl::StatusOr<DeltaCompressReport> report = CompressDelta(kBase, kBase, out, {});
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->tensors.empty());
  EXPECT_EQ(report->num_unchanged, 4 * 9 + 2);
  Base base = LoadBase(kBase);
  absl::StatusOr<std::unique_ptr<DeltaWeights>> d = LoadDelta(out, *base.weights, base.fingerprint);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ((*d)->resident_bytes, 0);
  EXPECT_EQ((*d)->embed.rows, 0);
}

TEST(DeltaLoadTest, RefusesADeltaOfAnotherBase) {
  Base other = LoadBase(kMan);
  absl::StatusOr<std::unique_ptr<DeltaWeights>> d =
      LoadDelta(CHeadersDelta(), *other.weights, other.fingerprint);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(d.status().message(), "different base model")) << d.status();
}

TEST(DeltaLoadTest, CorruptDataIsDataLoss) {
  absl::StatusOr<std::string> bytes = ReadFileToString(CHeadersDelta());
  ASSERT_TRUE(bytes.ok());
  std::string corrupt = *bytes;
  corrupt[corrupt.size() - 100] ^= 0x10;  // inside the last tensor's data
  const std::string path = TempPath("corrupt.delta.safetensors");
  std::ofstream(path, std::ios::binary) << corrupt;
  Base base = LoadBase(kBase);
  absl::StatusOr<std::unique_ptr<DeltaWeights>> d =
      LoadDelta(path, *base.weights, base.fingerprint);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kDataLoss) << d.status();
}

TEST(DeltaLoadTest, RefusesMalformedFiles) {
  Base base = LoadBase(kBase);
  const std::string path = TempPath("bad.delta.safetensors");
  const std::vector<float> values(256, 1.0f);
  const absl::Span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(values.data()), 1024);
  const auto meta = [&](const std::string& key, const std::string& value) {
    std::map<std::string, std::string> m = {{"format", "strata-delta"},
                                            {"format_version", "1"},
                                            {"base_fingerprint", base.fingerprint},
                                            {"bits", "4"},
                                            {"sparsity", "2:4"},
                                            {"data_xxh3", "0000000000000000"}};
    m[key] = value;
    return m;
  };
  const auto load_error = [&](const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
    EXPECT_TRUE(WriteSafetensors(path, tensors, metadata).ok());
    return LoadDelta(path, *base.weights, base.fingerprint).status();
  };
  const std::vector<TensorToWrite> norm = {{"model.norm.weight", DType::kF32, {256}, bytes}};
  EXPECT_TRUE(absl::StrContains(load_error(norm, meta("format", "gguf")).message(),
                                "metadata field format"));
  EXPECT_TRUE(
      absl::StrContains(load_error(norm, meta("format_version", "2")).message(), "format_version"));
  EXPECT_TRUE(absl::StrContains(load_error(norm, meta("bits", "3")).message(), "bits"));
  EXPECT_TRUE(absl::StrContains(load_error(norm, meta("sparsity", "1:2")).message(), "sparsity"));
  // The checksum is checked before the tensors.
  EXPECT_EQ(load_error(norm, meta("bits", "4")).code(), absl::StatusCode::kDataLoss);

  // With a right checksum: unknown names and wrong shapes are named.
  const auto with_checksum = [&](const std::vector<TensorToWrite>& tensors) {
    std::string sums;
    for (const TensorToWrite& t : tensors) {
      const uint64_t h =
          Hash64(absl::string_view(reinterpret_cast<const char*>(t.data.data()), t.data.size()));
      sums.append(reinterpret_cast<const char*>(&h), 8);
    }
    char hex[17];
    std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(Hash64(sums)));
    EXPECT_TRUE(WriteSafetensors(path, tensors, meta("data_xxh3", hex)).ok());
    return LoadDelta(path, *base.weights, base.fingerprint).status();
  };
  EXPECT_TRUE(with_checksum(norm).ok());
  absl::Status s = with_checksum(
      {{"model.layers.9.mlp.up_proj.weight.q", DType::kU8, {4}, bytes.subspan(0, 4)}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "model.layers.9.mlp.up_proj.weight")) << s;
  s = with_checksum({{"model.norm.weight", DType::kF32, {128}, bytes.subspan(0, 512)}});
  EXPECT_TRUE(absl::StrContains(s.message(), "should be F32 [256]")) << s;
  // Names that would alias a real slot, or change what the base does not have, are refused.
  s = with_checksum({{"model.layers.01.input_layernorm.weight", DType::kF32, {256}, bytes}});
  EXPECT_TRUE(absl::StrContains(s.message(), "model.layers.01.input_layernorm.weight")) << s;
  s = with_checksum(
      {{"model.layers.0.self_attn.q_norm.weight", DType::kF32, {64}, bytes.subspan(0, 256)}});
  EXPECT_TRUE(absl::StrContains(s.message(), "q_norm.weight is not a weight")) << s;
  // A scale beyond any real delta (a hostile file could otherwise make logits infinite).
  const std::vector<uint8_t> codes(2048 * 64, 0x88), index(2048 * 32, 0x44);
  const std::vector<float> huge(2048, 1e30f);
  s = with_checksum({{"model.embed_tokens.weight.q", DType::kU8, {2048, 64}, codes},
                     {"model.embed_tokens.weight.index", DType::kU8, {2048, 32}, index},
                     {"model.embed_tokens.weight.scale",
                      DType::kF32,
                      {2048},
                      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(huge.data()),
                                                huge.size() * 4)}});
  EXPECT_TRUE(absl::StrContains(s.message(), "embed_tokens.weight.scale[0] is not in")) << s;
  const std::vector<uint8_t> zeros(512 * 64);
  s = with_checksum({{"model.layers.0.mlp.up_proj.weight.q", DType::kU8, {512, 64}, zeros}});
  EXPECT_TRUE(absl::StrContains(s.message(), "up_proj.weight.scale is missing")) << s;
}

// A batch that mixes the base and two fine-tunes computes each sequence as the fine-tune's own
// weights would (base + unpacked delta, materialized in f32), and the base's as the base alone.
TEST(DeltaForwardTest, MixedBatchMatchesMaterializedFineTunes) {
  Base base = LoadBase(kBase);
  const std::string man_path = TempPath("man8.delta.safetensors");
  DeltaCompressOptions dense8;
  dense8.bits = 8;
  dense8.sparse_2_4 = false;
  ASSERT_TRUE(CompressDelta(kBase, kMan, man_path, dense8).ok());
  auto c_delta = LoadDelta(CHeadersDelta(), *base.weights, base.fingerprint);
  auto man_delta = LoadDelta(man_path, *base.weights, base.fingerprint);
  ASSERT_TRUE(c_delta.ok() && man_delta.ok());
  auto c_weights = MaterializeDelta(*base.weights, **c_delta);
  auto man_weights = MaterializeDelta(*base.weights, **man_delta);
  ASSERT_TRUE(c_weights.ok() && man_weights.ok());

  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> id(
      0, static_cast<int32_t>(base.weights->config.vocab_size) - 1);
  std::vector<std::vector<int32_t>> seqs(4);
  for (auto& s : seqs) {
    s.resize(23 + seqs.size());
    for (int32_t& t : s) t = id(rng);
  }
  SingleRankCollectives comm;
  // Three threads: the chunks' small segments are shared out among them whole (ForEachSegment).
  ModelRunner runner(base.weights.get(), &comm, 3);
  ModelRunner c_runner(c_weights->get(), &comm);
  ModelRunner man_runner(man_weights->get(), &comm);
  const auto mixed = FeedSequences(runner, seqs, 5, /*block_tokens=*/4,
                                   {nullptr, c_delta->get(), man_delta->get(), c_delta->get()});
  const auto base_alone = FeedSequences(runner, {seqs[0]}, 64, /*block_tokens=*/4);
  const auto c_alone = FeedSequences(c_runner, {seqs[1], seqs[3]}, 64, /*block_tokens=*/4);
  const auto man_alone = FeedSequences(man_runner, {seqs[2]}, 64, /*block_tokens=*/4);
  EXPECT_LT(RelativeError(mixed[0], base_alone[0]), 1e-5);
  EXPECT_LT(RelativeError(mixed[1], c_alone[0]), 1e-4);
  EXPECT_LT(RelativeError(mixed[3], c_alone[1]), 1e-4);
  EXPECT_LT(RelativeError(mixed[2], man_alone[0]), 1e-4);
  // The fine-tunes really differ from the base on these sequences.
  const auto base_on_c = FeedSequences(runner, {seqs[1]}, 64, /*block_tokens=*/4);
  EXPECT_GT(RelativeError(mixed[1], base_on_c[0]), 0.02);
}

// A prefill of 160 tokens of one fine-tune takes the runner's panel path (delta panels unpacked to
// f32 and multiplied with the BLAS); it must agree with the materialized fine-tune too.
TEST(DeltaForwardTest, LongPrefillMatchesMaterializedFineTune) {
  Base base = LoadBase(kBase);
  auto c_delta = LoadDelta(CHeadersDelta(), *base.weights, base.fingerprint);
  ASSERT_TRUE(c_delta.ok());
  auto c_weights = MaterializeDelta(*base.weights, **c_delta);
  ASSERT_TRUE(c_weights.ok());
  std::mt19937 rng(9);
  std::uniform_int_distribution<int32_t> id(0, 2000);
  std::vector<std::vector<int32_t>> seqs(2, std::vector<int32_t>(40));
  seqs[0].resize(160);
  for (auto& s : seqs) {
    for (int32_t& t : s) t = id(rng);
  }
  SingleRankCollectives comm;
  ModelRunner runner(base.weights.get(), &comm);
  ModelRunner c_runner(c_weights->get(), &comm);
  // One step for everything: 160 rows of the fine-tune, 40 of the base.
  const auto mixed =
      FeedSequences(runner, seqs, 1 << 20, /*block_tokens=*/4, {c_delta->get(), nullptr});
  const auto c_alone = FeedSequences(c_runner, {seqs[0]}, 1 << 20, /*block_tokens=*/4);
  const auto base_alone = FeedSequences(runner, {seqs[1]}, 1 << 20, /*block_tokens=*/4);
  EXPECT_LT(RelativeError(mixed[0], c_alone[0]), 1e-4);
  EXPECT_LT(RelativeError(mixed[1], base_alone[0]), 1e-5);
}

// Every architecture variant's extra weights go through the delta path: Qwen2's q/k/v biases,
// Qwen3's per-head q/k norms, Llama 2's untied LM head. A mixed batch matches the materialized
// fine-tune, at 8-bit dense and at 4-bit 2:4.
TEST(DeltaForwardTest, EveryVariantMatchesItsMaterializedFineTune) {
  for (const char* variant : {"qwen2_bf16", "qwen3_f32", "llama2_f32"}) {
    for (const auto& [bits, sparse] : {std::pair{8, false}, std::pair{4, true}}) {
      SCOPED_TRACE(testing::Message() << variant << " bits " << bits << (sparse ? " 2:4" : ""));
      const std::string dir = std::string("worker/model/testdata/") + variant;
      const std::string ft = TempPath(std::string(variant) + "-ft");
      WritePerturbedCopy(dir, ft);
      DeltaCompressOptions o;
      o.bits = bits;
      o.sparse_2_4 = sparse;
      const std::string path = TempPath(std::string(variant) + ".delta.safetensors");
      absl::StatusOr<DeltaCompressReport> report = CompressDelta(dir, ft, path, o);
      ASSERT_TRUE(report.ok()) << report.status();
      EXPECT_EQ(report->num_unchanged, 0);
      Base base = LoadBase(dir);
      absl::StatusOr<std::unique_ptr<DeltaWeights>> d =
          LoadDelta(path, *base.weights, base.fingerprint);
      ASSERT_TRUE(d.ok()) << d.status();
      absl::StatusOr<std::unique_ptr<ModelWeights>> tuned = MaterializeDelta(*base.weights, **d);
      ASSERT_TRUE(tuned.ok()) << tuned.status();
      const ModelConfig& c = base.weights->config;
      EXPECT_EQ((*d)->layers[0].q_bias.empty(), !c.qkv_bias);
      EXPECT_EQ((*d)->layers[0].k_norm.empty(), !c.qk_norm);
      EXPECT_EQ((*d)->lm_head.rows > 0, !c.tie_word_embeddings);
      std::mt19937 rng(21);
      std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(c.vocab_size) - 1);
      std::vector<std::vector<int32_t>> seqs(2, std::vector<int32_t>(30));
      for (auto& sq : seqs) {
        for (int32_t& t : sq) t = id(rng);
      }
      SingleRankCollectives comm;
      ModelRunner runner(base.weights.get(), &comm);
      ModelRunner tuned_runner(tuned->get(), &comm);
      const auto mixed = FeedSequences(runner, seqs, 7, /*block_tokens=*/4, {d->get(), nullptr});
      const auto tuned_alone = FeedSequences(tuned_runner, {seqs[0]}, 64, /*block_tokens=*/4);
      const auto base_alone = FeedSequences(runner, {seqs[1]}, 64, /*block_tokens=*/4);
      EXPECT_LT(RelativeError(mixed[0], tuned_alone[0]), 1e-4);
      EXPECT_LT(RelativeError(mixed[1], base_alone[0]), 1e-5);
      EXPECT_GT(
          RelativeError(mixed[0], FeedSequences(runner, {seqs[0]}, 64, /*block_tokens=*/4)[0]),
          1e-3);
    }
  }
}

TEST(RandomDeltaTest, PacksValidDeltasInItsArena) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig("worker/model/testdata/llama2_f32");
  ASSERT_TRUE(c.ok()) << c.status();
  for (const auto& [bits, sparse] : {std::pair{4, false}, std::pair{2, true}}) {
    std::unique_ptr<DeltaWeights> d = RandomDeltaWeights(*c, bits, sparse, 7);
    std::unique_ptr<DeltaWeights> again = RandomDeltaWeights(*c, bits, sparse, 7);
    // Deterministic in the seed (the arenas may start at different offsets from their 64-byte
    // alignment).
    const int64_t q_bytes = d->layers[1].up.rows * d->layers[1].up.QBytesPerRow();
    EXPECT_EQ(std::vector<uint8_t>(d->layers[1].up.q, d->layers[1].up.q + q_bytes),
              std::vector<uint8_t>(again->layers[1].up.q, again->layers[1].up.q + q_bytes));
    EXPECT_NE(d->serial, again->serial);
    ASSERT_EQ(static_cast<int64_t>(d->layers.size()), c->num_layers);
    EXPECT_EQ(d->lm_head.rows, c->vocab_size);  // llama2 is untied
    const uint8_t* begin = d->arena.data();
    const uint8_t* end = begin + d->arena.size();
    auto check = [&](const PackedDelta& p, int64_t rows, int64_t cols) {
      EXPECT_TRUE(ValidatePackedDelta(p).ok());
      EXPECT_EQ(p.rows, rows);
      EXPECT_EQ(p.cols, cols);
      EXPECT_TRUE(p.q >= begin && p.q + p.rows * p.QBytesPerRow() <= end);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(p.q) % 64, 0u);
      if (sparse) {
        for (int64_t i = 0; i < p.rows * p.IndexBytesPerRow(); ++i) {
          for (int shift : {0, 4}) {
            const int nib = (p.index[i] >> shift) & 0xf;
            ASSERT_LT(nib & 3, nib >> 2) << "a 2:4 group's offsets must be distinct, ascending";
          }
        }
      }
    };
    check(d->embed, c->vocab_size, c->hidden_size);
    check(d->layers[0].q, c->q_dim(), c->hidden_size);
    check(d->layers[1].down, c->hidden_size, c->intermediate_size);
    // The CPU runner serves it.
    absl::StatusOr<std::unique_ptr<ModelWeights>> w =
        LoadModelWeights("worker/model/testdata/llama2_f32", *c, 0, 1);
    ASSERT_TRUE(w.ok());
    SingleRankCollectives comm;
    ModelRunner runner(w->get(), &comm);
    const auto logits = FeedSequences(runner, {{1, 2, 3, 4, 5}}, 64, 4, {d.get()});
    ASSERT_EQ(logits.size(), 1u);
    for (float v : logits[0]) ASSERT_TRUE(std::isfinite(v));
  }
}

TEST(DeltaForwardTest, SeqDeltasMustCoverEverySequence) {
  Base base = LoadBase(kBase);
  SingleRankCollectives comm;
  ModelRunner runner(base.weights.get(), &comm);
  KvCacheStorage cache(*base.weights, 4, 4);
  const std::vector<int32_t> tokens = {1, 2}, positions = {0, 0}, seq = {0, 1}, tables = {0, 1},
                             logit_tokens = {0, 1};
  const std::vector<int64_t> slots = {0, 4};
  const std::vector<const DeltaWeights*> one = {nullptr};
  ForwardBatch b;
  b.tokens = tokens;
  b.positions = positions;
  b.token_seq = seq;
  b.slots = slots;
  b.block_tables = tables;
  b.num_seqs = 2;
  b.max_blocks_per_seq = 1;
  b.logit_tokens = logit_tokens;
  b.seq_deltas = one;
  std::vector<float> logits(2 * base.weights->config.vocab_size);
  const absl::Status s = runner.Forward(b, cache.layers(), absl::MakeSpan(logits));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "seq_deltas")) << s;
}

}  // namespace
}  // namespace strata
