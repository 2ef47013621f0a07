// LoRA adapters in PEFT's format: loading (PEFT's scaling, its naming, dtypes), what is refused and
// why, and the runner's low-rank path against the adapter merged into the weights.
#include "worker/model/lora.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "worker/comm/collectives.h"
#include "worker/model/config.h"
#include "worker/model/delta.h"
#include "worker/model/delta_test_util.h"
#include "worker/model/model_runner.h"
#include "worker/model/safetensors.h"
#include "worker/model/test_util.h"
#include "worker/model/weights.h"

namespace strata {
namespace {

using delta_test::Base;
using delta_test::kBase;
using delta_test::LoadBase;
using delta_test::TempPath;

constexpr char kBundledLora[] = "models/strata-tiny/lora-c-headers";

// One factor to write: its name, values (f32) and stored dtype.
struct Factor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
  DType dtype = DType::kF32;
};

std::vector<uint8_t> Encode(const std::vector<float>& v, DType dtype) {
  std::vector<uint8_t> out(v.size() * DTypeBytes(dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::kF32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t bits = dtype == DType::kBF16 ? FloatToBf16(v[i]) : FloatToF16(v[i]);
      std::memcpy(out.data() + 2 * i, &bits, 2);
    }
  }
  return out;
}

// Writes an adapter directory: `config` as adapter_config.json, `factors` as the weights.
std::string WriteAdapter(const std::string& name, const std::string& config,
                         const std::vector<Factor>& factors) {
  const std::string dir = TempPath(name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/adapter_config.json") << config;
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<TensorToWrite> tensors;
  for (const Factor& f : factors) bytes.push_back(Encode(f.values, f.dtype));
  for (size_t i = 0; i < factors.size(); ++i) {
    tensors.push_back({factors[i].name, factors[i].dtype, factors[i].shape, bytes[i]});
  }
  EXPECT_TRUE(WriteSafetensors(dir + "/adapter_model.safetensors", tensors).ok());
  return dir;
}

std::vector<float> Random(int64_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// adapter_config.json as PEFT writes it; `extra` (", \"field\": value" pairs) replaces fields.
std::string PeftConfig(double alpha, int r, const std::string& extra = "") {
  std::map<std::string, std::string> fields = {
      {"peft_type", "\"LORA\""},   {"task_type", "\"CAUSAL_LM\""},
      {"r", absl::StrCat(r)},      {"lora_alpha", absl::StrCat(alpha)},
      {"bias", "\"none\""},        {"use_rslora", "false"},
      {"use_dora", "false"},       {"fan_in_fan_out", "false"},
      {"modules_to_save", "null"}, {"target_modules", R"(["q_proj", "v_proj"])"},
      {"rank_pattern", "{}"},      {"alpha_pattern", "{}"}};
  if (!extra.empty()) {
    // Parse the pairs by their keys: `, "key": value` up to the next `, "` at depth 0.
    std::string rest = extra;
    while (!rest.empty()) {
      const size_t k0 = rest.find('"'), k1 = rest.find('"', k0 + 1);
      const size_t colon = rest.find(':', k1);
      int depth = 0;
      size_t end = colon + 1;
      for (; end < rest.size(); ++end) {
        const char ch = rest[end];
        if (ch == '[' || ch == '{') ++depth;
        if (ch == ']' || ch == '}') --depth;
        if (depth == 0 && ch == ',') break;
      }
      fields[rest.substr(k0 + 1, k1 - k0 - 1)] = rest.substr(colon + 1, end - colon - 1);
      rest = end < rest.size() ? rest.substr(end) : "";
    }
  }
  std::string out = "{";
  for (const auto& [k, v] : fields)
    absl::StrAppend(&out, out.size() > 1 ? ", " : "", "\"", k, "\": ", v);
  return out + "}";
}

// A random adapter of every projection of every layer of `c` (rank `rank`, factors of `dtype`).
std::vector<Factor> RandomFactors(const ModelConfig& c, int64_t rank, DType dtype, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const struct {
    const char* module;
    int64_t out, in;
  } projections[] = {{"self_attn.q_proj", c.q_dim(), H},
                     {"self_attn.k_proj", c.kv_dim(), H},
                     {"self_attn.v_proj", c.kv_dim(), H},
                     {"self_attn.o_proj", H, c.q_dim()},
                     {"mlp.gate_proj", I, H},
                     {"mlp.up_proj", I, H},
                     {"mlp.down_proj", H, I}};
  std::vector<Factor> out;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    for (const auto& p : projections) {
      const std::string prefix = absl::StrCat("base_model.model.model.layers.", l, ".", p.module);
      // PEFT initializes B at zero and training moves it; sizes here give a clear change.
      out.push_back({prefix + ".lora_A.weight",
                     {rank, p.in},
                     Random(rank * p.in, 1.0f / std::sqrt(float(p.in)), rng),
                     dtype});
      out.push_back(
          {prefix + ".lora_B.weight", {p.out, rank}, Random(p.out * rank, 0.01f, rng), dtype});
    }
  }
  return out;
}

TEST(LoraLoadTest, BundledAdapterLoads) {
  Base base = LoadBase(kBase);
  ASSERT_TRUE(IsLoraAdapter(kBundledLora));
  EXPECT_FALSE(IsLoraAdapter(kBase));
  absl::StatusOr<LoraAdapterInfo> info =
      ReadLoraAdapterInfo(kBundledLora, base.weights->config, LoraFactorType(*base.weights));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->num_modules, 28);  // 7 projections x 4 layers
  EXPECT_EQ(info->max_rank, 16);
  EXPECT_EQ(info->revision.size(), 16u);
  EXPECT_EQ(ReadLoraAdapterInfo(kBundledLora, base.weights->config, LoraFactorType(*base.weights))
                ->revision,
            info->revision);

  absl::StatusOr<std::unique_ptr<DeltaWeights>> d = LoadLoraAdapter(kBundledLora, *base.weights);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE((*d)->lora);
  EXPECT_EQ((*d)->lora_max_rank, 16);
  EXPECT_EQ((*d)->resident_bytes, info->resident_bytes);
  const LayerDelta& L = (*d)->layers[3];
  EXPECT_EQ(L.lora_k.rank, 16);
  EXPECT_EQ(L.lora_k.rows, base.weights->config.kv_dim());
  EXPECT_EQ(L.lora_down.cols, base.weights->config.intermediate_size);
  EXPECT_EQ(L.k.rows, 0);  // no packed parts
  EXPECT_EQ((*d)->embed.rows, 0);
  // The second bundled adapter adapts the embedding and the LM head too.
  absl::StatusOr<std::unique_ptr<DeltaWeights>> embed =
      LoadLoraAdapter("models/strata-tiny/lora-c-headers-embed", *base.weights);
  ASSERT_TRUE(embed.ok()) << embed.status();
  EXPECT_EQ((*embed)->lora_embed.rank, 16);
  EXPECT_EQ((*embed)->lora_embed.cols, base.weights->config.vocab_size);
  EXPECT_EQ((*embed)->lora_head.rows, base.weights->config.vocab_size);
  EXPECT_EQ((*d)->lora_embed.rank, 0);
  // LoadFineTune tells the two kinds apart.
  absl::StatusOr<std::unique_ptr<DeltaWeights>> again =
      LoadFineTune(kBundledLora, *base.weights, base.fingerprint);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE((*again)->lora);
}

// PEFT's scaling: alpha / r per module (r from the factors' shapes, as rank_pattern sets it),
// alpha_pattern overriding lora_alpha by module-name pattern, alpha / sqrt(r) with use_rslora;
// BF16 and F16 factors widened exactly; names with or without PEFT's prefix and ".weight".
TEST(LoraLoadTest, ScalesAsPeftDoes) {
  Base base = LoadBase(kBase);
  const ModelConfig& c = base.weights->config;
  const int64_t H = c.hidden_size;
  std::mt19937 rng(3);
  // Values that survive bf16 and f16 unchanged (multiples of 1/64 in [-2, 2]).
  const auto exact = [&](int64_t n) {
    std::vector<float> v(n);
    std::uniform_int_distribution<int> d(-128, 128);
    for (float& x : v) x = static_cast<float>(d(rng)) / 64.0f;
    return v;
  };
  std::vector<Factor> f = {
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
       {8, H},
       exact(8 * H),
       DType::kBF16},
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
       {c.q_dim(), 8},
       exact(c.q_dim() * 8),
       DType::kF16},
      {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", {8, H}, exact(8 * H)},
      {"base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
       {c.q_dim(), 8},
       exact(c.q_dim() * 8)},
      // Rank 4 here (rank_pattern's doing), without PEFT's prefix or ".weight".
      {"model.layers.2.mlp.down_proj.lora_A",
       {4, c.intermediate_size},
       exact(4 * c.intermediate_size)},
      {"model.layers.2.mlp.down_proj.lora_B", {H, 4}, exact(H * 4)},
  };
  const std::string config = PeftConfig(
      16, 8,
      R"(, "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"layers.1.self_attn.q_proj": 4})");
  absl::StatusOr<std::unique_ptr<DeltaWeights>> d =
      LoadLoraAdapter(WriteAdapter("scales", config, f), *base.weights);
  ASSERT_TRUE(d.ok()) << d.status();
  const auto check = [&](const LowRankDelta& lr, const Factor& a, const Factor& b, double scale) {
    ASSERT_EQ(lr.rank, a.shape[0]);
    ASSERT_EQ(lr.dtype, DType::kBF16);  // over a bf16 base, whatever the file's type
    for (size_t i = 0; i < a.values.size(); ++i) {
      ASSERT_EQ(ElementAsFloat(lr.a, lr.dtype, i), a.values[i]) << a.name << i;
    }
    for (size_t i = 0; i < b.values.size(); ++i) {
      ASSERT_EQ(ElementAsFloat(lr.b, lr.dtype, i), b.values[i]) << b.name << i;
    }
    EXPECT_FLOAT_EQ(lr.scale, static_cast<float>(scale)) << b.name;
  };
  check((*d)->layers[0].lora_q, f[0], f[1], 16.0 / 8);
  check((*d)->layers[1].lora_q, f[2], f[3], 4.0 / 8);  // alpha_pattern
  check((*d)->layers[2].lora_down, f[4], f[5], 16.0 / 4);
  EXPECT_EQ((*d)->layers[1].lora_k.rank, 0);
  EXPECT_EQ((*d)->lora_max_rank, 8);

  // rsLoRA: alpha / sqrt(r). PEFT's default alpha is 8.
  d = LoadLoraAdapter(WriteAdapter("rslora", R"({"peft_type": "LORA", "use_rslora": true})", f),
                      *base.weights);
  ASSERT_TRUE(d.ok()) << d.status();
  check((*d)->layers[0].lora_q, f[0], f[1], 8.0 / std::sqrt(8.0));
  check((*d)->layers[2].lora_down, f[4], f[5], 8.0 / 2);
}

TEST(LoraLoadTest, RefusesWhatItCannotServe) {
  Base base = LoadBase(kBase);
  const ModelConfig& c = base.weights->config;
  const int64_t H = c.hidden_size;
  std::mt19937 rng(4);
  const std::vector<Factor> good = {
      {"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
       {4, H},
       Random(4 * H, 0.1f, rng)},
      {"base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
       {c.kv_dim(), 4},
       Random(c.kv_dim() * 4, 0.1f, rng)},
  };
  ASSERT_TRUE(LoadLoraAdapter(WriteAdapter("good", PeftConfig(8, 4), good), *base.weights).ok());
  const auto error = [&](const std::string& config, const std::vector<Factor>& factors) {
    const std::string dir = WriteAdapter("bad", config, factors);
    absl::Status load = LoadLoraAdapter(dir, *base.weights).status();
    absl::Status info = ReadLoraAdapterInfo(dir, c, LoraFactorType(*base.weights)).status();
    // Registration (the header alone) and loading refuse alike.
    EXPECT_EQ(load.code(), info.code()) << load << " / " << info;
    return load;
  };
  const auto with = [&](Factor extra) {
    std::vector<Factor> f = good;
    f.push_back(std::move(extra));
    return f;
  };
  struct Case {
    std::string config;
    std::vector<Factor> factors;
    std::string want;
  };
  const std::vector<Case> cases = {
      {R"({"peft_type": "IA3"})", good, "peft_type"},
      {R"({"lora_alpha": 8})", good, "peft_type"},
      {PeftConfig(8, 4, R"(, "use_dora": true)"), good, "use_dora"},
      {PeftConfig(8, 4, R"(, "fan_in_fan_out": true)"), good, "fan_in_fan_out"},
      {PeftConfig(8, 4, R"(, "modules_to_save": ["lm_head"])"), good, "modules_to_save"},
      {PeftConfig(8, 4, R"(, "layer_replication": [[0, 2]])"), good, "layer_replication"},
      {PeftConfig(-1, 4), good, "lora_alpha"},
      {PeftConfig(8, 4, R"(, "alpha_pattern": {"q_proj(": 2})"), good, "alpha_pattern"},
      {R"({"peft_type": "LORA", "bias": "lora_only"})", good, "bias"},
      {"{not json", good, "adapter_config.json"},
      {PeftConfig(8, 4),
       with({"base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector",
             {64},
             std::vector<float>(64, 1.0f)}),
       "DoRA"},
      {PeftConfig(8, 4),
       with({"base_model.model.model.embed_tokens.lora_A.weight",
             {4, c.vocab_size},
             std::vector<float>(4 * c.vocab_size)}),
       "is not a LoRA factor of the embedding"},
      {PeftConfig(8, 4),
       with({"base_model.model.lm_head.weight",
             {c.vocab_size, H},
             std::vector<float>(c.vocab_size * H)}),
       "is not a LoRA factor of the embedding"},
      {PeftConfig(8, 4),
       with({"base_model.model.model.embed_tokens.lora_embedding_A",
             {4, c.vocab_size},
             std::vector<float>(4 * c.vocab_size)}),
       "has lora_A but no lora_B"},
      {PeftConfig(8, 4),
       {good[0],
        good[1],
        {"base_model.model.lm_head.lora_A.weight",
         {4, c.vocab_size},
         std::vector<float>(4 * c.vocab_size)},
        {"base_model.model.lm_head.lora_B.weight",
         {c.vocab_size, 4},
         std::vector<float>(4 * c.vocab_size)}},
       "must be [r, 256] and [2048, r]"},
      {PeftConfig(8, 4),
       with({"base_model.model.model.layers.9.mlp.up_proj.lora_A.weight",
             {4, H},
             std::vector<float>(4 * H)}),
       "layers.9.mlp.up_proj.lora_A.weight names a layer outside"},
      {PeftConfig(8, 4),
       with({"base_model.model.model.layers.01.mlp.up_proj.lora_A.weight",
             {4, H},
             std::vector<float>(4 * H)}),
       "layers.01"},
      {PeftConfig(8, 4),
       with({"base_model.model.model.layers.0.mlp.act_fn.lora_A.weight",
             {4, H},
             std::vector<float>(4 * H)}),
       "act_fn"},
      {PeftConfig(8, 4),
       with({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
             {4, H},
             std::vector<float>(4 * H)}),
       "has lora_A but no lora_B"},
      {PeftConfig(8, 4),
       {good[0], {good[1].name, {c.kv_dim(), 5}, std::vector<float>(c.kv_dim() * 5)}},
       ""},
      {PeftConfig(8, 4), {}, "holds no LoRA factors"},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.config);
    const absl::Status s = error(k.config, k.factors);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    const std::string want = k.want.empty() ? "must be [r, 256] and [128, r]" : k.want;
    EXPECT_TRUE(absl::StrContains(s.message(), want)) << s;
  }
  // Non-finite values are found at load (registration reads only the header).
  std::vector<Factor> nan = good;
  nan[1].values[7] = std::nanf("");
  const std::string nan_dir = WriteAdapter("nan", PeftConfig(8, 4), nan);
  EXPECT_TRUE(ReadLoraAdapterInfo(nan_dir, c, LoraFactorType(*base.weights)).ok());
  const absl::Status s = LoadLoraAdapter(nan_dir, *base.weights).status();
  EXPECT_TRUE(absl::StrContains(s.message(), "NaN or infinity")) << s;

  // Pickled weights are not read; a missing directory is NOT_FOUND.
  const std::string bin = TempPath("bin-only");
  std::filesystem::create_directories(bin);
  std::ofstream(bin + "/adapter_config.json") << PeftConfig(8, 4);
  std::ofstream(bin + "/adapter_model.bin") << "pickle";
  EXPECT_TRUE(absl::StrContains(LoadLoraAdapter(bin, *base.weights).status().message(),
                                "adapter_model.bin"));
  EXPECT_EQ(LoadLoraAdapter(TempPath("nowhere"), *base.weights).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(LoraLoadTest, RevisionFollowsTheAdapter) {
  Base base = LoadBase(kBase);
  const ModelConfig& c = base.weights->config;
  std::vector<Factor> f = RandomFactors(c, 4, DType::kF32, 1);
  const auto revision = [&](const std::string& config, const std::vector<Factor>& factors) {
    absl::StatusOr<LoraAdapterInfo> info =
        ReadLoraAdapterInfo(WriteAdapter("rev", config, factors), c, LoraFactorType(*base.weights));
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->revision : "";
  };
  const std::string first = revision(PeftConfig(8, 4), f);
  EXPECT_EQ(revision(PeftConfig(8, 4), f), first);
  EXPECT_NE(revision(PeftConfig(16, 4), f), first);  // another scale
  f[5].values[3] += 0.5f;                            // retrained
  EXPECT_NE(revision(PeftConfig(8, 4), f), first);
}

// The low-rank path through the runner equals the adapter merged into the weights (f32): in a
// batch mixing it with the base and a compressed delta, for decode-sized steps (the direct GEMV)
// and one long prefill (the BLAS).
TEST(LoraForwardTest, MixedBatchMatchesMergedWeights) {
  Base base = LoadBase(kBase);
  auto lora = LoadLoraAdapter(kBundledLora, *base.weights);
  ASSERT_TRUE(lora.ok()) << lora.status();
  const std::string delta_path = TempPath("man.delta.safetensors");
  ASSERT_TRUE(CompressDelta(kBase, delta_test::kMan, delta_path, {}).ok());
  auto man = LoadDelta(delta_path, *base.weights, base.fingerprint);
  ASSERT_TRUE(man.ok()) << man.status();
  auto merged = MaterializeDelta(*base.weights, **lora);
  auto man_merged = MaterializeDelta(*base.weights, **man);
  ASSERT_TRUE(merged.ok() && man_merged.ok());

  std::mt19937 rng(8);
  std::uniform_int_distribution<int32_t> id(0, 2000);
  std::vector<std::vector<int32_t>> seqs = {std::vector<int32_t>(150), std::vector<int32_t>(31),
                                            std::vector<int32_t>(27), std::vector<int32_t>(33)};
  for (auto& s : seqs) {
    for (int32_t& t : s) t = id(rng);
  }
  SingleRankCollectives comm;
  // Three threads: chunks of 3 tokens make small segments, shared out among the threads whole
  // (ForEachSegment); whole prompts make large ones, each split across them.
  ModelRunner runner(base.weights.get(), &comm, 3);
  ModelRunner merged_runner(merged->get(), &comm);
  ModelRunner man_runner(man_merged->get(), &comm);
  const std::vector<const DeltaWeights*> deltas = {lora->get(), nullptr, man->get(), lora->get()};
  for (const int64_t chunk : {int64_t{3}, int64_t{1} << 20}) {
    SCOPED_TRACE(chunk);
    const auto mixed = FeedSequences(runner, seqs, chunk, /*block_tokens=*/4, deltas);
    const auto lora_alone = FeedSequences(merged_runner, {seqs[0], seqs[3]}, 64, 4);
    const auto man_alone = FeedSequences(man_runner, {seqs[2]}, 64, 4);
    const auto base_alone = FeedSequences(runner, {seqs[1], seqs[0]}, 64, 4);
    EXPECT_LT(RelativeError(mixed[0], lora_alone[0]), 1e-4);
    EXPECT_LT(RelativeError(mixed[3], lora_alone[1]), 1e-4);
    EXPECT_LT(RelativeError(mixed[2], man_alone[0]), 1e-4);
    EXPECT_LT(RelativeError(mixed[1], base_alone[0]), 1e-5);
    // The adapter really changes the model.
    EXPECT_GT(RelativeError(mixed[0], base_alone[1]), 0.02);
  }
}

// The embedding's and the LM head's LoRA parts (PEFT's lora_embedding_A/B and lm_head's lora_A/B)
// change one side each: with tied embeddings (the bundled base) and untied (Llama 2's testdata),
// the runner equals the merged weights, whose embedding and head part ways.
TEST(LoraForwardTest, EmbeddingAndHeadPartsMatchMergedWeights) {
  for (const char* dir : {kBase, "worker/model/testdata/llama2_f32"}) {
    SCOPED_TRACE(dir);
    Base base = LoadBase(dir);
    const ModelConfig& c = base.weights->config;
    const int64_t H = c.hidden_size, V = c.vocab_size;
    std::mt19937 rng(6);
    std::vector<Factor> f = RandomFactors(c, 4, DType::kF32, 12);
    f.push_back({"base_model.model.model.embed_tokens.lora_embedding_A",
                 {8, V},
                 Random(8 * V, 1.0f, rng),
                 DType::kBF16});
    f.push_back({"base_model.model.model.embed_tokens.lora_embedding_B",
                 {H, 8},
                 Random(H * 8, 0.01f, rng),
                 DType::kBF16});
    f.push_back({"base_model.model.lm_head.lora_A.weight",
                 {8, H},
                 Random(8 * H, 1.0f / std::sqrt(float(H)), rng)});
    f.push_back({"base_model.model.lm_head.lora_B.weight", {V, 8}, Random(V * 8, 0.05f, rng)});
    auto lora = LoadLoraAdapter(WriteAdapter("embed-head", PeftConfig(16, 8), f), *base.weights);
    ASSERT_TRUE(lora.ok()) << lora.status();
    EXPECT_EQ((*lora)->lora_embed.rank, 8);
    EXPECT_EQ((*lora)->lora_embed.cols, V);
    EXPECT_EQ((*lora)->lora_head.rows, V);
    auto merged = MaterializeDelta(*base.weights, **lora);
    ASSERT_TRUE(merged.ok()) << merged.status();
    EXPECT_NE((*merged)->embed.data, (*merged)->lm_head.data);
    std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(V) - 1);
    std::vector<std::vector<int32_t>> seqs(2, std::vector<int32_t>(19));
    for (auto& s : seqs) {
      for (int32_t& t : s) t = id(rng);
    }
    SingleRankCollectives comm;
    ModelRunner runner(base.weights.get(), &comm);
    ModelRunner merged_runner(merged->get(), &comm);
    for (const int64_t chunk : {int64_t{2}, int64_t{64}}) {
      const auto mixed = FeedSequences(runner, seqs, chunk, 4, {nullptr, lora->get()});
      const auto alone = FeedSequences(merged_runner, {seqs[1]}, 64, 4);
      const auto base_alone = FeedSequences(runner, {seqs[0]}, 64, 4);
      EXPECT_LT(RelativeError(mixed[1], alone[0]), 1e-4);
      EXPECT_LT(RelativeError(mixed[0], base_alone[0]), 1e-5);
    }
    // Each part alone moves the logits.
    for (LowRankDelta DeltaWeights::*part : {&DeltaWeights::lora_embed, &DeltaWeights::lora_head}) {
      DeltaWeights only;
      only.lora = true;
      only.layers.resize(c.num_layers);
      only.*part = (*lora).get()->*part;
      const auto with = FeedSequences(runner, {seqs[1]}, 64, 4, {&only});
      EXPECT_GT(RelativeError(with[0], FeedSequences(runner, {seqs[1]}, 64, 4)[0]), 1e-3);
    }
  }
}

// Every architecture variant (Qwen2's biased q/k/v, Qwen3's q/k norms, Llama 2's untied head and
// GQA shapes), with random adapters in each dtype.
TEST(LoraForwardTest, EveryVariantMatchesItsMergedWeights) {
  for (const char* variant : {"qwen2_bf16", "qwen3_f32", "llama2_f32"}) {
    for (const DType dtype : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(testing::Message() << variant << " " << DTypeName(dtype));
      Base base = LoadBase(std::string("worker/model/testdata/") + variant);
      const ModelConfig& c = base.weights->config;
      const std::string dir = WriteAdapter(absl::StrCat(variant, "-lora"), PeftConfig(16, 8),
                                           RandomFactors(c, 8, dtype, 11));
      auto lora = LoadLoraAdapter(dir, *base.weights);
      ASSERT_TRUE(lora.ok()) << lora.status();
      auto merged = MaterializeDelta(*base.weights, **lora);
      ASSERT_TRUE(merged.ok()) << merged.status();
      std::mt19937 rng(2);
      std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(c.vocab_size) - 1);
      std::vector<std::vector<int32_t>> seqs(2, std::vector<int32_t>(20));
      for (auto& s : seqs) {
        for (int32_t& t : s) t = id(rng);
      }
      SingleRankCollectives comm;
      ModelRunner runner(base.weights.get(), &comm);
      ModelRunner merged_runner(merged->get(), &comm);
      const auto mixed = FeedSequences(runner, seqs, 6, 4, {lora->get(), nullptr});
      const auto alone = FeedSequences(merged_runner, {seqs[0]}, 64, 4);
      EXPECT_LT(RelativeError(mixed[0], alone[0]), 1e-4);
      EXPECT_GT(RelativeError(mixed[0], FeedSequences(runner, {seqs[0]}, 64, 4)[0]), 1e-3);
    }
  }
}

}  // namespace
}  // namespace strata
