// The engine on the GPU (EngineConfig::device = "gpu") against the engine on the CPU: for the
// bundled strata-tiny model and every testdata architecture, a batch of mixed-length greedy
// requests, with chunked prefill, produces the same tokens with f32 activations; with bf16 it runs
// and agrees on nearly all of them (rounding can flip a near tie, so only the rate is bounded).
// Seeded sampling with penalties, truncation and banned tokens (on the GPU, through
// GpuModelRunner::ForwardSample) draws the CPU engine's tokens too, and host and disk tiers under
// the GPU cache bring evicted prefixes back.
// Needs a GPU: tagged "gpu"; skipped where there is none.
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "grammar/json_schema.h"
#include "grammar/vocabulary.h"
#include "gtest/gtest.h"
#include "memtier/kv_codec.h"
#include "tests/test_dir.h"
#include "tokenizer/tokenizer.h"
#include "worker/engine/engine.h"
#include "worker/engine/tiny_model_testutil.h"
#include "worker/model/config.h"
#include "worker/model/delta.h"

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
  // `experimental`: the decode attention kernel, fused residual norms (the GEMV up to 8 rows)
  // and tensor-core prefill attention (which takes bf16 and f16 only); else the tiled kernels.
  std::map<std::string, std::vector<int32_t>> Generate(const std::string& device, DType dtype,
                                                       bool sampled = false,
                                                       bool experimental = false) {
    EngineConfig ec;
    ec.device = device;
    ec.gpu.act = dtype;
    ec.gpu.decode_attention_kernel = experimental;
    ec.gpu.fused_residual_norm = experimental;
    if (experimental) ec.gpu.gemv_max_rows = 8;  // the GEMV (and the fused forms) up to 8 rows
    ec.gpu.prefill_mma_attention = experimental;
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
  EXPECT_EQ(Generate("gpu", DType::kF32, false, /*experimental=*/true), cpu)
      << "with the decode attention kernel and fused residual norms";
  // bf16: at least half of the tokens agree before each request's first divergence, by default
  // and with the experimental paths (tensor-core prefill attention included).
  for (const bool experimental : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "experimental paths " << experimental);
    const auto bf16 = Generate("gpu", DType::kBF16, false, experimental);
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
    RecordProperty(experimental ? "bf16_experimental_agreement" : "bf16_agreement",
                   std::to_string(same) + "/" + std::to_string(total));
    EXPECT_GE(same, total / 2) << same << " of " << total << " bf16 tokens before a divergence";
  }
}

// Seeded sampling runs on the GPU (the logits stay there) and draws the CPU engine's tokens.
TEST_P(EngineGpuTest, SampledTokensEqualTheCpuEngine) {
  const auto cpu = Generate("cpu", DType::kF32, /*sampled=*/true);
  const auto gpu = Generate("gpu", DType::kF32, /*sampled=*/true);
  ASSERT_EQ(cpu.size(), 8u);
  EXPECT_EQ(gpu, cpu);
}

// A batch where some requests report log-probabilities (with their top alternatives) or carry logit
// biases: the GPU samples the others and sends only those rows' logits to the host, and every
// request gets the CPU engine's tokens and, where asked, its log-probabilities and alternatives.
TEST_P(EngineGpuTest, LogprobRequestsShareAStepWithGpuSampledOnes) {
  auto run = [&](const std::string& device) {
    EngineConfig ec;
    ec.device = device;
    ec.gpu.act = DType::kF32;
    ec.max_running_sequences = 8;
    ec.compute_threads = 2;
    auto e = Engine::Create(weights_.get(), &comm_, ec);
    EXPECT_TRUE(e.ok()) << e.status();
    std::map<std::string, std::vector<SampledToken>> out;
    if (!e.ok()) return out;
    std::mt19937 rng(5);
    const int64_t vocab = weights_->config.vocab_size;
    for (int i = 0; i < 6; ++i) {
      std::vector<int32_t> prompt(5 + rng() % 30);
      for (int32_t& t : prompt) t = static_cast<int32_t>(3 + rng() % (vocab - 3));
      RequestOptions o;
      o.max_tokens = 12;
      o.ignore_eos = true;
      o.sampling.temperature = i % 2 == 0 ? 0.0f : 0.8f;
      o.sampling.seed = 77 + i;
      o.sampling.logprobs = i % 3 == 0 ? 3 : -1;  // requests 0 and 3 report them
      // Request 5 carries logit biases, which send its rows to the host sampler too.
      if (i == 5) o.sampling.logit_bias = {{7, 4.0f}, {11, -100.0f}};
      EXPECT_TRUE((*e)->AddRequest("r" + std::to_string(i), prompt, o).ok());
    }
    for (int steps = 0; (*e)->HasWork() && steps < 1000; ++steps) {
      auto step = (*e)->Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) break;
      for (const RequestOutput& o : *step) {
        for (const SampledToken& t : o.tokens) out[o.request_id].push_back(t);
      }
    }
    return out;
  };
  const auto cpu = run("cpu");
  const auto gpu = run("gpu");
  ASSERT_EQ(cpu.size(), 6u);
  ASSERT_EQ(gpu.size(), cpu.size());
  for (const auto& [id, want] : cpu) {
    SCOPED_TRACE(id);
    const std::vector<SampledToken>& got = gpu.at(id);
    ASSERT_EQ(got.size(), want.size());
    const bool reports = id == "r0" || id == "r3";
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i].token, want[i].token) << "token " << i;
      if (id == "r5") {
        EXPECT_NE(got[i].token, 11) << "biased away, token " << i;
      }
      EXPECT_NEAR(got[i].logprob, want[i].logprob, 1e-3) << "token " << i;
      if (!reports) continue;
      EXPECT_EQ(got[i].rank, want[i].rank) << "token " << i;
      ASSERT_EQ(got[i].top.size(), 3u) << "token " << i;
      for (size_t k = 0; k < 3; ++k) {
        EXPECT_EQ(got[i].top[k].first, want[i].top[k].first) << "token " << i << " top " << k;
        EXPECT_NEAR(got[i].top[k].second, want[i].top[k].second, 1e-3);
      }
    }
  }
}

// Host and disk tiers under the GPU's KV cache: a prefix evicted from the device cache comes back
// from host memory or disk (through the device tier's packed GPU copies) and the greedy tokens are
// the ones computed without tiers; on the CPU engine in f32, and on the GPU's own untiered run in
// bf16. Quantized tiers (INT8 here) decode into the bf16 cache and keep the first token.
TEST_P(EngineGpuTest, EvictedPrefixesComeBackFromHostAndDiskWithTheSameTokens) {
  const std::string dir = FreshTestDir();
  std::mt19937 rng(7);
  const int64_t vocab = weights_->config.vocab_size;
  auto prompt = [&] {
    std::vector<int32_t> p(100);
    for (int32_t& t : p) t = static_cast<int32_t>(3 + rng() % (vocab - 3));
    return p;
  };
  const std::vector<int32_t> a = prompt(), b = prompt(), c = prompt();
  RequestOptions o;
  o.sampling.temperature = 0;
  o.max_tokens = 4;
  o.ignore_eos = true;
  auto make = [&](const std::string& device, DType dtype, int64_t host_blocks, int64_t disk_blocks,
                  KvCompression comp) {
    EngineConfig ec;
    ec.device = device;
    ec.gpu.act = dtype;
    ec.num_kv_blocks = 16;
    ec.compute_threads = 2;
    int64_t slot_bytes = 0;  // a raw block and its slot header, in whole pages
    {
      auto probe = Engine::Create(weights_.get(), &comm_, ec);
      EXPECT_TRUE(probe.ok()) << probe.status();
      if (!probe.ok()) return std::unique_ptr<Engine>();
      slot_bytes = ((*probe)->kv_block_bytes() + 64 + 4095) / 4096 * 4096;
    }
    ec.tiers.host_bytes = host_blocks * slot_bytes;
    ec.tiers.disk_bytes = disk_blocks * slot_bytes;
    ec.tiers.disk_path = dir + "/kv_" + device + "_" + std::string(DTypeName(dtype)) + "_" +
                         std::string(KvCompressionName(comp));
    ec.tiers.disk_queue_depth = 4;
    ec.tiers.compression = comp;
    auto e = Engine::Create(weights_.get(), &comm_, ec);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? *std::move(e) : nullptr;
  };
  auto run = [&](Engine& e, const std::string& id, const std::vector<int32_t>& p,
                 RequestOutput* last) {
    EXPECT_TRUE(e.AddRequest(id, p, o).ok());
    std::vector<int32_t> tokens;
    for (int steps = 0; e.HasWork() && steps < 100000; ++steps) {
      if (e.WaitingForIo()) absl::SleepFor(absl::Microseconds(200));
      auto step = e.Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) break;
      for (const RequestOutput& out : *step) {
        for (const SampledToken& t : out.tokens) tokens.push_back(t.token);
        *last = out;  // every output carries the cache counts
      }
    }
    return tokens;
  };
  auto cached = [](const RequestOutput& out, Tier t) {
    return out.num_cached_prompt_tokens_by_tier[static_cast<int>(t)];
  };
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    RequestOutput out;
    // The untiered reference: the CPU engine for f32, the GPU engine itself for bf16.
    std::unique_ptr<Engine> ref =
        make(dtype == DType::kF32 ? "cpu" : "gpu", dtype, 0, 0, KvCompression::kNone);
    ASSERT_NE(ref, nullptr);
    const std::vector<int32_t> want = run(*ref, "ref", a, &out);
    ref.reset();
    std::unique_ptr<Engine> e =
        make("gpu", dtype, /*host_blocks=*/8, /*disk_blocks=*/64, KvCompression::kNone);
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(run(*e, "a1", a, &out), want);
    // b and c push a's six full blocks out of the 16-block device cache and the 8-block host tier.
    run(*e, "b", b, &out);
    run(*e, "c", c, &out);
    run(*e, "b2", b, &out);
    EXPECT_EQ(run(*e, "a2", a, &out), want);
    EXPECT_EQ(out.num_cached_prompt_tokens, 96);  // (100 - 1) / 16 full blocks
    EXPECT_GT(cached(out, Tier::kHost) + cached(out, Tier::kDisk), 0);
    const KvStoreStats st = e->Stats().tiers;
    EXPECT_GT(st.write_backs, 0);
    EXPECT_EQ(st.corrupt_blocks, 0);
    EXPECT_EQ(st.io_errors, 0);
  }
  // INT8 host tier under a bf16 cache.
  std::unique_ptr<Engine> e = make("gpu", DType::kBF16, 16, 0, KvCompression::kInt8);
  ASSERT_NE(e, nullptr);
  RequestOutput out;
  const std::vector<int32_t> want = run(*e, "a1", a, &out);
  run(*e, "b", b, &out);
  run(*e, "c", c, &out);
  const std::vector<int32_t> got = run(*e, "a2", a, &out);
  EXPECT_GT(cached(out, Tier::kHost), 0);
  ASSERT_FALSE(got.empty());
  ASSERT_FALSE(want.empty());
  EXPECT_EQ(got[0], want[0]);
}

// KV copies between GPU engines (worker/server's FetchKvBlocks): blocks copied out of one engine's
// GPU cache (device, and host tier) into another's serve the prompt with the tokens computing it
// gives, in f32 and bf16; a CPU engine's f32 blocks have another layout than a bf16 GPU's.
TEST_P(EngineGpuTest, KvBlocksCopiedBetweenGpuEnginesServeThePrompt) {
  std::mt19937 rng(11);
  const int64_t vocab = weights_->config.vocab_size;
  std::vector<int32_t> prompt(100);
  for (int32_t& t : prompt) t = static_cast<int32_t>(3 + rng() % (vocab - 3));
  RequestOptions o;
  o.sampling.temperature = 0;
  o.max_tokens = 4;
  o.ignore_eos = true;
  auto make = [&](const std::string& device, DType dtype) {
    EngineConfig ec;
    ec.device = device;
    ec.gpu.act = dtype;
    ec.num_kv_blocks = 32;
    ec.compute_threads = 2;
    auto e = Engine::Create(weights_.get(), &comm_, ec);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? *std::move(e) : nullptr;
  };
  auto run = [&](Engine& e, const std::string& id, RequestOutput* last) {
    EXPECT_TRUE(e.AddRequest(id, prompt, o).ok());
    std::vector<int32_t> tokens;
    for (int steps = 0; e.HasWork() && steps < 1000; ++steps) {
      auto step = e.Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) break;
      for (const RequestOutput& out : *step) {
        for (const SampledToken& t : out.tokens) tokens.push_back(t.token);
        *last = out;
      }
    }
    return tokens;
  };
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    std::unique_ptr<Engine> source = make("gpu", dtype), dest = make("gpu", dtype);
    ASSERT_NE(source, nullptr);
    ASSERT_NE(dest, nullptr);
    EXPECT_EQ(source->kv_transfer_layout().dtype, dtype);
    RequestOutput out;
    const std::vector<int32_t> want = run(*source, "a", &out);
    const Engine::PromptBlocks wanted = dest->LookUpPrompt(prompt, o);
    ASSERT_EQ(wanted.hashes.size(), 6u);
    const std::vector<Engine::KvBlockCopy> copies = source->ExportKvBlocks(wanted.hashes, 1 << 30);
    ASSERT_EQ(copies.size(), 6u);
    EXPECT_EQ(dest->ImportKvBlocks(wanted, "", copies), 6);
    EXPECT_EQ(run(*dest, "b", &out), want);
    EXPECT_EQ(out.num_cached_prompt_tokens, 96);
  }
  std::unique_ptr<Engine> cpu = make("cpu", DType::kF32), gpu = make("gpu", DType::kBF16);
  ASSERT_NE(cpu, nullptr);
  ASSERT_NE(gpu, nullptr);
  EXPECT_NE(cpu->kv_transfer_layout().block_bytes(), gpu->kv_transfer_layout().block_bytes());
}

INSTANTIATE_TEST_SUITE_P(Models, EngineGpuTest,
                         ::testing::Values(std::string("models/strata-tiny/base"),
                                           std::string("worker/model/testdata/llama3_bf16"),
                                           std::string("worker/model/testdata/qwen2_bf16"),
                                           std::string("worker/model/testdata/mistral_f16")));

// Fine-tunes on the GPU: an engine over the bundled base with both bundled fine-tunes registered
// as deltas (4-bit, the default) generates, for a batch mixing base and fine-tune requests with
// chunked prefill, the tokens the CPU engine generates with the same deltas (f32 activations).
TEST(EngineGpuFineTuneTest, MixedTenantsGenerateTheCpuEngineTokens) {
  absl::StatusOr<int> devices = CudaDeviceCount();
  if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
  const std::string base_dir = "models/strata-tiny/base";
  auto config = LoadModelConfig(base_dir);
  ASSERT_TRUE(config.ok()) << config.status();
  auto weights = LoadModelWeights(base_dir, *config, 0, 1);
  ASSERT_TRUE(weights.ok()) << weights.status();
  const std::string dir = FreshTestDir();
  const std::string c_path = dir + "/c.delta.safetensors",
                    man_path = dir + "/man.delta.safetensors";
  ASSERT_TRUE(CompressDelta(base_dir, "models/strata-tiny/ft-c-headers", c_path, {}).ok());
  ASSERT_TRUE(CompressDelta(base_dir, "models/strata-tiny/ft-man", man_path, {}).ok());
  const auto generate = [&](const std::string& device) {
    EngineConfig ec;
    ec.device = device;
    ec.gpu.act = DType::kF32;
    ec.max_batch_tokens = 48;
    ec.max_running_sequences = 8;
    ec.compute_threads = 2;
    ec.fine_tunes = {{"c-headers", c_path}, {"man", man_path}};
    SingleRankCollectives comm;
    auto e = Engine::Create(weights->get(), &comm, ec);
    EXPECT_TRUE(e.ok()) << e.status();
    if (!e.ok()) return std::map<std::string, std::vector<int32_t>>{};
    std::mt19937 rng(5);
    const char* tenants[] = {"", "c-headers", "man", "c-headers", "", "man"};
    for (int i = 0; i < 6; ++i) {
      std::vector<int32_t> prompt(2 + rng() % 50);
      for (int32_t& t : prompt) t = static_cast<int32_t>(3 + rng() % 2000);
      RequestOptions o;
      o.sampling.temperature = 0;
      o.max_tokens = 16;
      o.ignore_eos = true;
      o.fine_tune_id = tenants[i];
      EXPECT_TRUE((*e)->AddRequest("r" + std::to_string(i), prompt, o).ok());
    }
    // Deltas load on the delta cache's thread: wait for them as the worker does.
    std::map<std::string, std::vector<int32_t>> out;
    const absl::Time deadline = absl::Now() + absl::Minutes(2);
    while ((*e)->HasWork() && absl::Now() < deadline) {
      if ((*e)->WaitingForIo()) absl::SleepFor(absl::Milliseconds(1));
      auto step = (*e)->Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) break;
      for (const RequestOutput& r : *step) {
        EXPECT_TRUE(r.error.ok()) << r.error;
        for (const SampledToken& t : r.tokens) out[r.request_id].push_back(t.token);
      }
    }
    return out;
  };
  const auto cpu = generate("cpu");
  ASSERT_EQ(cpu.size(), 6u);
  EXPECT_EQ(generate("gpu"), cpu);
}

// Structured output on the GPU: rows with a grammar come to the host and are masked and sampled
// there, beside rows sampled on the GPU in the same steps; every token equals the CPU engine's, and
// the JSON texts follow the grammar.
TEST(EngineGpuStructuredTest, ConstrainedRowsDrawTheCpuEngineTokens) {
  absl::StatusOr<int> devices = CudaDeviceCount();
  if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
  TinyModel tiny;
  ASSERT_NO_FATAL_FAILURE(LoadTinyModel(&tiny));
  const std::shared_ptr<const TokenTrie> vocabulary = TokenTrieOf(*tiny.tokenizer);
  auto grammar = AnyJsonGrammar(/*object_only=*/true);
  ASSERT_TRUE(grammar.ok());
  const auto generate = [&](const std::string& device) {
    EngineConfig ec;
    ec.device = device;
    ec.gpu.act = DType::kF32;
    ec.compute_threads = 2;
    ec.vocabulary = vocabulary;
    SingleRankCollectives comm;
    auto e = Engine::Create(tiny.weights.get(), &comm, ec);
    EXPECT_TRUE(e.ok()) << e.status();
    if (!e.ok()) return std::map<std::string, std::vector<int32_t>>{};
    for (int i = 0; i < 6; ++i) {
      RequestOptions o;
      o.sampling.temperature = 0.9f;
      o.sampling.seed = 40 + i;
      o.max_tokens = 48;
      if (i % 2 == 0) o.grammar = *grammar;  // the odd ones sample on the GPU
      auto prompt = tiny.tokenizer->Encode("settings = ", true);
      EXPECT_TRUE((*e)->AddRequest("r" + std::to_string(i), *prompt, o).ok());
    }
    return RunAll(**e);
  };
  const auto cpu = generate("cpu");
  ASSERT_EQ(cpu.size(), 6u);
  EXPECT_EQ(generate("gpu"), cpu);
  for (int i = 0; i < 6; i += 2) {
    std::string text;
    for (int32_t t : cpu.at("r" + std::to_string(i))) text += vocabulary->bytes(t);
    GrammarMatcher m(*grammar);
    EXPECT_TRUE(m.Advance(text)) << text;
  }
}

// Speculative decoding on the GPU: a step computes a sequence's last token with its draft, and the
// drafts' rows are sampled on the GPU (or on the host past max_seqs rows); the tokens are the CPU
// engine's without drafts, and drafts are kept.
TEST(EngineGpuSpeculativeTest, DraftsKeepTheCpuEngineTokens) {
  absl::StatusOr<int> devices = CudaDeviceCount();
  if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
  TinyModel tiny;
  ASSERT_NO_FATAL_FAILURE(LoadTinyModel(&tiny));
  const auto prompt = tiny.tokenizer->Encode(
      "def add_one(x):\n    return x + 1\n\n\ndef add_two(x):\n    return "
      "x + 2\n\n\ndef add_",
      true);
  ASSERT_TRUE(prompt.ok());
  int64_t accepted = 0;
  const auto generate = [&](const std::string& device, int speculative, int max_seqs) {
    EngineConfig ec;
    ec.device = device;
    ec.gpu.act = DType::kF32;
    ec.compute_threads = 2;
    ec.max_running_sequences = max_seqs;
    ec.num_speculative_tokens = speculative;
    SingleRankCollectives comm;
    auto e = Engine::Create(tiny.weights.get(), &comm, ec);
    EXPECT_TRUE(e.ok()) << e.status();
    if (!e.ok()) return std::map<std::string, std::vector<int32_t>>{};
    for (int i = 0; i < 4; ++i) {
      RequestOptions o;
      o.sampling.temperature = i == 0 ? 0.0f : 0.7f;
      o.sampling.repetition_penalty = i == 2 ? 1.1f : 1.0f;
      o.sampling.seed = 60 + i;
      o.max_tokens = 64;
      EXPECT_TRUE((*e)->AddRequest("r" + std::to_string(i), *prompt, o).ok());
    }
    auto out = RunAll(**e);
    accepted = (*e)->Stats().num_accepted_draft_tokens;
    return out;
  };
  const auto cpu = generate("cpu", 0, 8);
  ASSERT_EQ(cpu.size(), 4u);
  EXPECT_EQ(generate("gpu", 4, 64), cpu) << "drafts' rows sampled on the GPU";
  EXPECT_GT(accepted, 0);
  EXPECT_EQ(generate("gpu", 4, 4), cpu) << "more rows than max_seqs: sampled on the host";
  EXPECT_GT(accepted, 0);
}

// A draft model on the GPU (EngineConfig::draft_weights; its own GpuModelRunner and cache, argmax
// on the device): the tokens are still the CPU engine's without drafts, and its drafts are kept.
TEST(EngineGpuSpeculativeTest, ADraftModelKeepsTheCpuEngineTokens) {
  absl::StatusOr<int> devices = CudaDeviceCount();
  if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
  TinyModel tiny;
  ASSERT_NO_FATAL_FAILURE(LoadTinyModel(&tiny));
  auto draft_config = LoadModelConfig("models/strata-tiny/draft");
  ASSERT_TRUE(draft_config.ok()) << draft_config.status();
  auto draft = LoadModelWeights("models/strata-tiny/draft", *draft_config, 0, 1);
  ASSERT_TRUE(draft.ok()) << draft.status();
  const auto prompt =
      tiny.tokenizer->Encode("import os\nimport sys\n\n\ndef main(argv):\n    ", true);
  ASSERT_TRUE(prompt.ok());
  EngineStats stats;
  const auto generate = [&](const std::string& device, const ModelWeights* draft_weights) {
    EngineConfig ec;
    ec.device = device;
    ec.gpu.act = DType::kF32;
    ec.compute_threads = 2;
    ec.num_speculative_tokens = draft_weights != nullptr ? 4 : 0;
    ec.draft_weights = draft_weights;
    SingleRankCollectives comm;
    auto e = Engine::Create(tiny.weights.get(), &comm, ec);
    EXPECT_TRUE(e.ok()) << e.status();
    if (!e.ok()) return std::map<std::string, std::vector<int32_t>>{};
    for (int i = 0; i < 3; ++i) {
      RequestOptions o;
      o.sampling.temperature = i == 0 ? 0.0f : 0.7f;
      o.sampling.seed = 90 + i;
      o.max_tokens = 64;
      EXPECT_TRUE((*e)->AddRequest("r" + std::to_string(i), *prompt, o).ok());
    }
    auto out = RunAll(**e);
    stats = (*e)->Stats();
    return out;
  };
  const auto cpu = generate("cpu", nullptr);
  ASSERT_EQ(cpu.size(), 3u);
  EXPECT_EQ(generate("gpu", draft->get()), cpu);
  EXPECT_TRUE(stats.has_draft_model);
  EXPECT_GT(stats.num_accepted_draft_tokens, 0);
  EXPECT_GT(stats.draft_model.draft_forward_tokens, 0);
  EXPECT_EQ(stats.draft_model.num_free_blocks, stats.draft_model.num_blocks);
}

// gpu_random_weights_seed: an engine over a model's shape alone (no tensors on the host) draws its
// weights on the GPU and serves requests: every request finishes with its tokens in the
// vocabulary, and the same seed gives the same tokens.
TEST(EngineGpuRandomWeightsTest, ServesAShapeWithoutFiles) {
  absl::StatusOr<int> devices = CudaDeviceCount();
  if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
  auto config = LoadModelConfig("models/strata-tiny/base");
  ASSERT_TRUE(config.ok()) << config.status();
  ModelWeights shape;
  shape.config = *config;
  shape.num_heads = config->num_heads;
  shape.num_kv_heads = config->num_kv_heads;
  shape.intermediate_size = config->intermediate_size;
  const auto generate = [&]() {
    EngineConfig ec;
    ec.device = "gpu";
    ec.gpu_random_weights_seed = 7;
    ec.max_batch_tokens = 64;
    SingleRankCollectives comm;
    auto e = Engine::Create(&shape, &comm, ec);
    EXPECT_TRUE(e.ok()) << e.status();
    std::map<std::string, std::vector<int32_t>> out;
    if (!e.ok()) return out;
    for (int i = 0; i < 3; ++i) {
      RequestOptions o;
      o.sampling.temperature = 0;
      o.max_tokens = 8;
      o.ignore_eos = true;
      EXPECT_TRUE(
          (*e)->AddRequest("r" + std::to_string(i), std::vector<int32_t>(20 + i, 5 + i), o).ok());
    }
    while ((*e)->HasWork()) {
      auto step = (*e)->Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) break;
      for (const RequestOutput& r : *step) {
        for (const SampledToken& t : r.tokens) {
          EXPECT_GE(t.token, 0);
          EXPECT_LT(t.token, config->vocab_size);
          out[r.request_id].push_back(t.token);
        }
      }
    }
    return out;
  };
  const auto a = generate();
  ASSERT_EQ(a.size(), 3u);
  for (const auto& [id, tokens] : a) EXPECT_EQ(tokens.size(), 8u) << id;
  EXPECT_EQ(generate(), a);
}

#else

TEST(EngineGpuTest, NeedsCudaBuild) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
