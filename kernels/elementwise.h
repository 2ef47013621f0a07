// Row-wise ops of a transformer layer: RMSNorm, SiLU-and-multiply, and the rotary position
// embedding.
#ifndef STRATA_KERNELS_ELEMENTWISE_H_
#define STRATA_KERNELS_ELEMENTWISE_H_

#include <cstdint>

#include "absl/status/status.h"

namespace strata {

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight, for each of `rows` rows of `dim`.
struct RmsNormParams {
  int64_t rows = 0;
  int64_t dim = 0;
  float eps = 1e-6f;
  // [rows, dim] with row stride x_stride (0 means dim), host, f32.
  const float* x = nullptr;
  int64_t x_stride = 0;
  // [dim], host, f32.
  const float* weight = nullptr;
  // [rows, dim] with row stride out_stride (0 means dim), host, f32. May equal x (in place).
  float* out = nullptr;
  int64_t out_stride = 0;
};
absl::Status RmsNormCpu(const RmsNormParams& p);

// out[r, i] = silu(in[r, i]) * in[r, dim + i], where in holds the gate and up projections side by
// side.
struct SiluMulParams {
  int64_t rows = 0;
  int64_t dim = 0;
  // [rows, 2 * dim], host, f32.
  const float* in = nullptr;
  // [rows, dim], host, f32.
  float* out = nullptr;
};
absl::Status SiluMulCpu(const SiluMulParams& p);

// Rotary embedding in the Hugging Face (rotate-half) convention, in place on q and k:
//   for i < head_dim / 2, with a = position * inv_freq[i]:
//     x[i]            <- x[i] cos a - x[i + head_dim/2] sin a
//     x[i + head_dim/2] <- x[i + head_dim/2] cos a + x[i] sin a
struct RopeParams {
  int64_t num_tokens = 0;
  int64_t num_q_heads = 0;
  int64_t num_k_heads = 0;
  int64_t head_dim = 0;  // even
  // [num_tokens], host, int32: each token's position in its sequence.
  const int32_t* positions = nullptr;
  // [head_dim / 2], host, f32 (see ComputeRopeInvFreq).
  const float* inv_freq = nullptr;
  // [num_tokens, num_q_heads, head_dim] with token stride q_stride (0: dense), host, f32.
  float* q = nullptr;
  int64_t q_stride = 0;
  // [num_tokens, num_k_heads, head_dim] with token stride k_stride (0: dense), host, f32.
  float* k = nullptr;
  int64_t k_stride = 0;
};
absl::Status RopeCpu(const RopeParams& p);

// Rotary frequencies: inv_freq[i] = theta^(-2i / head_dim), adjusted for rope scaling.
struct RopeScalingParams {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_max_position_embeddings = 8192;
};
// Writes head_dim / 2 values to inv_freq (host, f32).
void ComputeRopeInvFreq(int64_t head_dim, double theta, const RopeScalingParams& scaling,
                        float* inv_freq);

}  // namespace strata

#endif  // STRATA_KERNELS_ELEMENTWISE_H_
