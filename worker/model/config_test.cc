#include "worker/model/config.h"

#include <cstdio>
#include <filesystem>
#include <string>

#include "gtest/gtest.h"

namespace strata {
namespace {

absl::StatusOr<ModelConfig> Parse(const std::string& json) {
  auto doc = JsonDocument::Parse(json, "m/config.json");
  if (!doc.ok()) return doc.status();
  return ParseModelConfig(doc->root());
}

// Shapes of Llama 3.1 8B.
constexpr char kLlama3[] = R"({
  "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
  "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
  "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": false,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}})";

TEST(ModelConfigTest, Llama3) {
  auto c = Parse(kLlama3);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, Architecture::kLlama);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->group_size(), 4);
  EXPECT_EQ(c->kv_dim(), 1024);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_FALSE(c->qkv_bias);
  EXPECT_FALSE(c->qk_norm);
  // Llama 3.1 8B has 8.03e9 parameters.
  EXPECT_NEAR(static_cast<double>(c->NumParameters()), 8.03e9, 0.01e9);
}

TEST(ModelConfigTest, Qwen2HasQkvBiasAndQwen3HasQkNormAndOwnHeadDim) {
  auto q2 = Parse(R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
      "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
      "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": true,
      "use_sliding_window": false, "sliding_window": 32768, "eos_token_id": 151643})");
  ASSERT_TRUE(q2.ok()) << q2.status();
  EXPECT_TRUE(q2->qkv_bias);
  EXPECT_FALSE(q2->o_bias);
  EXPECT_EQ(q2->sliding_window, 0);  // use_sliding_window is false
  EXPECT_EQ(q2->head_dim, 64);
  EXPECT_TRUE(q2->tie_word_embeddings);

  auto q3 = Parse(R"({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
      "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
      "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rope_theta": 1000000,
      "attention_bias": false, "tie_word_embeddings": true})");
  ASSERT_TRUE(q3.ok()) << q3.status();
  EXPECT_TRUE(q3->qk_norm);
  EXPECT_EQ(q3->head_dim, 128);
  EXPECT_EQ(q3->q_dim(), 2048);  // larger than hidden_size
  EXPECT_FALSE(q3->qkv_bias);
}

TEST(ModelConfigTest, MistralSlidingWindow) {
  auto m = Parse(R"({"architectures": ["MistralForCausalLM"], "hidden_size": 4096,
      "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
      "num_key_value_heads": 8, "vocab_size": 32000, "sliding_window": 4096})");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->sliding_window, 4096);
  auto none = Parse(R"({"architectures": ["MistralForCausalLM"], "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
      "vocab_size": 100, "sliding_window": null})");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->sliding_window, 0);
  EXPECT_EQ(none->num_kv_heads, 4);  // defaults to num_attention_heads
}

struct BadConfig {
  std::string json;
  std::string message;
};

TEST(ModelConfigTest, BadConfigsNameFileAndField) {
  const std::string base = R"("hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "vocab_size": 100)";
  const std::vector<BadConfig> cases = {
      {R"({"architectures": ["GPT2LMHeadModel"], )" + base + R"(, "num_attention_heads": 4})",
       "m/config.json: field \"architectures[0]\" names unsupported architecture "
       "\"GPT2LMHeadModel\""},
      {R"({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "intermediate_size": 1,
           "num_hidden_layers": 1, "vocab_size": 10})",
       "m/config.json: missing field \"hidden_size\""},
      {R"({"architectures": ["LlamaForCausalLM"], )" + base +
           R"(, "num_attention_heads": 4, "num_key_value_heads": 3})",
       "field \"num_key_value_heads\" (3) must divide num_attention_heads (4)"},
      {R"({"architectures": ["LlamaForCausalLM"], )" + base + R"(, "num_attention_heads": 5})",
       "field \"num_attention_heads\" (5) must divide hidden_size (64)"},
      {R"({"architectures": ["LlamaForCausalLM"], )" + base +
           R"(, "num_attention_heads": 4, "hidden_act": "gelu"})",
       "field \"hidden_act\" is \"gelu\"; only \"silu\" is supported"},
      {R"({"architectures": ["LlamaForCausalLM"], )" + base +
           R"(, "num_attention_heads": 4, "rope_scaling": {"type": "yarn", "factor": 4}})",
       "field \"rope_scaling\" has unsupported type \"yarn\""},
      {R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 0, "vocab_size": 100, "num_attention_heads": 4})",
       "m/config.json: field \"num_hidden_layers\" must be positive"},
      {R"({"architectures": ["LlamaForCausalLM"], )" + base +
           R"(, "num_attention_heads": 4, "eos_token_id": 100})",
       "field \"eos_token_id\" is outside the vocabulary"},
      {R"({"architectures": ["LlamaForCausalLM"], )" + base + R"(, "num_attention_heads": "4"})",
       "field \"num_attention_heads\" must be an integer, not a string"},
  };
  for (const BadConfig& c : cases) {
    auto parsed = Parse(c.json);
    ASSERT_FALSE(parsed.ok()) << c.json;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(parsed.status().message().find(c.message), absl::string_view::npos)
        << parsed.status();
  }
}

TEST(ModelConfigTest, LoadMergesGenerationConfigEos) {
  const std::string dir = std::string(getenv("TEST_TMPDIR")) + "/model";
  std::filesystem::create_directories(dir);
  FILE* f = fopen((dir + "/config.json").c_str(), "w");
  fputs(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "eos_token_id": 2})",
        f);
  fclose(f);
  f = fopen((dir + "/generation_config.json").c_str(), "w");
  fputs(R"({"eos_token_id": [2, 7], "bos_token_id": 1})", f);
  fclose(f);
  auto c = LoadModelConfig(dir);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->eos_token_ids, (std::vector<int32_t>{2, 7}));
  EXPECT_EQ(LoadModelConfig(dir + "/nope").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace strata
