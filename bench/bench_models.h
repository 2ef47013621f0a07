// Model shapes the CPU benchmarks share.
#ifndef STRATA_BENCH_BENCH_MODELS_H_
#define STRATA_BENCH_BENCH_MODELS_H_

#include "worker/model/config.h"

namespace strata {

// A Llama of about 100M parameters (hidden 768, 12 layers, 12 heads / 4 KV heads, vocabulary
// 32000, tied embeddings): big enough that projections dominate a step, small enough for random
// weights on a CPU.
inline ModelConfig Llama100mConfig() {
  ModelConfig c;
  c.architecture = Architecture::kLlama;
  c.architecture_name = "LlamaForCausalLM";
  c.hidden_size = 768;
  c.intermediate_size = 2048;
  c.num_layers = 12;
  c.num_heads = 12;
  c.num_kv_heads = 4;
  c.head_dim = 64;
  c.vocab_size = 32000;
  c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000;
  c.tie_word_embeddings = true;
  return c;
}

}  // namespace strata

#endif  // STRATA_BENCH_BENCH_MODELS_H_
