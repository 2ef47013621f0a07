#include "kernels/elementwise.h"

#include <cmath>
#include <numbers>

namespace strata {

absl::Status RmsNormCpu(const RmsNormParams& p) {
  if (p.rows < 0 || p.dim <= 0) return absl::InvalidArgumentError("rms_norm: bad shape");
  if (p.rows == 0) return absl::OkStatus();
  if (p.x == nullptr || p.weight == nullptr || p.out == nullptr) {
    return absl::InvalidArgumentError("rms_norm: null pointer");
  }
  const int64_t xs = p.x_stride ? p.x_stride : p.dim;
  const int64_t os = p.out_stride ? p.out_stride : p.dim;
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* x = p.x + r * xs;
    float* out = p.out + r * os;
    double sum = 0;
    for (int64_t i = 0; i < p.dim; ++i) sum += static_cast<double>(x[i]) * x[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(sum / p.dim + p.eps));
    for (int64_t i = 0; i < p.dim; ++i) out[i] = x[i] * inv * p.weight[i];
  }
  return absl::OkStatus();
}

absl::Status SiluMulCpu(const SiluMulParams& p) {
  if (p.rows < 0 || p.dim <= 0) return absl::InvalidArgumentError("silu_mul: bad shape");
  if (p.rows == 0) return absl::OkStatus();
  if (p.in == nullptr || p.out == nullptr)
    return absl::InvalidArgumentError("silu_mul: null pointer");
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* gate = p.in + r * 2 * p.dim;
    const float* up = gate + p.dim;
    float* out = p.out + r * p.dim;
    for (int64_t i = 0; i < p.dim; ++i) {
      const float g = gate[i];
      out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  }
  return absl::OkStatus();
}

absl::Status RopeCpu(const RopeParams& p) {
  if (p.num_tokens < 0 || p.head_dim <= 0 || p.head_dim % 2 != 0 || p.num_q_heads < 0 ||
      p.num_k_heads < 0) {
    return absl::InvalidArgumentError("rope: bad shape (head_dim must be positive and even)");
  }
  if (p.num_tokens == 0) return absl::OkStatus();
  if (p.positions == nullptr || p.inv_freq == nullptr || (p.num_q_heads && p.q == nullptr) ||
      (p.num_k_heads && p.k == nullptr)) {
    return absl::InvalidArgumentError("rope: null pointer");
  }
  const int64_t half = p.head_dim / 2;
  const int64_t qs = p.q_stride ? p.q_stride : p.num_q_heads * p.head_dim;
  const int64_t ks = p.k_stride ? p.k_stride : p.num_k_heads * p.head_dim;
  float cos_buf[512], sin_buf[512];
  if (half > 512) return absl::InvalidArgumentError("rope: head_dim above 1024");
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const double pos = p.positions[t];
    for (int64_t i = 0; i < half; ++i) {
      // The angle in double: positions reach 10^5 and more, where float loses the phase.
      const double a = pos * static_cast<double>(p.inv_freq[i]);
      cos_buf[i] = static_cast<float>(std::cos(a));
      sin_buf[i] = static_cast<float>(std::sin(a));
    }
    auto rotate = [&](float* x) {
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos_buf[i] - x2 * sin_buf[i];
        x[i + half] = x2 * cos_buf[i] + x1 * sin_buf[i];
      }
    };
    for (int64_t h = 0; h < p.num_q_heads; ++h) rotate(p.q + t * qs + h * p.head_dim);
    for (int64_t h = 0; h < p.num_k_heads; ++h) rotate(p.k + t * ks + h * p.head_dim);
  }
  return absl::OkStatus();
}

void ComputeRopeInvFreq(int64_t head_dim, double theta, const RopeScalingParams& s,
                        float* inv_freq) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    double f = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    switch (s.type) {
      case RopeScalingParams::Type::kNone:
        break;
      case RopeScalingParams::Type::kLinear:
        f /= s.factor;
        break;
      case RopeScalingParams::Type::kLlama3: {
        // Long wavelengths are slowed by `factor`, short ones kept, and the band between blended.
        const double low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        const double high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        const double wavelen = 2 * std::numbers::pi / f;
        if (wavelen > low_wavelen) {
          f /= s.factor;
        } else if (wavelen >= high_wavelen) {
          const double smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) /
                                (s.high_freq_factor - s.low_freq_factor);
          f = (1 - smooth) * f / s.factor + smooth * f;
        }
        break;
      }
    }
    inv_freq[i] = static_cast<float>(f);
  }
}

}  // namespace strata
