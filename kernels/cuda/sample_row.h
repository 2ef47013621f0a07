// One row's options for seeded sampling on the GPU (gpu::SampleArgs in kernels/cuda/ops_kernel.h),
// in a header free of CUDA so that CPU-only code can fill it.
#ifndef STRATA_KERNELS_CUDA_SAMPLE_ROW_H_
#define STRATA_KERNELS_CUDA_SAMPLE_ROW_H_

#include <cstdint>

#if defined(__CUDACC__)
#define STRATA_HOST_DEVICE __host__ __device__
#else
#define STRATA_HOST_DEVICE
#endif

namespace strata::gpu {

// The knobs of worker/engine/sampler.h's SamplingOptions, and the draw.
struct SampleRow {
  float temperature = 1.0f;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t top_k = 0;  // 0: all
  int32_t pad = 0;
  double u = 0.0;         // the draw in [0, 1): SampleUniform(seed, position)
  uint64_t race_key = 0;  // the exponential race's key: SampleRaceKey(seed, position)
};

// Whether a row that samples (temperature above 0) draws by an exponential race instead of a walk
// over its candidates in probability order: when no truncation depends on that order, that is
// top-p is 1 and top-k keeps the whole vocabulary (min-p keeps a set fixed by a threshold). The
// race picks argmax p_i / E_i over the candidates, E_i = -log(RaceUniform(race_key, i)) drawn
// independently per token, which is token i with probability p_i / sum(p): the same distribution,
// in one pass with no sort, and a pick that moves only when the two best ratios swap, so logits
// that differ in their last bits (another batch, a prefill in place of a decode step after a
// fail-over) almost never change the token, where the walk's boundaries move with every
// candidate's probability. The CPU and GPU samplers both follow this rule with the same arithmetic
// (double exp and log, whose library implementations may differ in the last bit).
inline STRATA_HOST_DEVICE bool DrawsByRace(float top_p, int32_t top_k, int64_t vocab) {
  return !(top_p < 1.0f) && (top_k <= 0 || top_k >= vocab);
}

// Whether row `r` draws from its candidates sorted by probability: it samples (temperature above
// 0) and does not race. The GPU sampler sorts exactly these rows.
inline STRATA_HOST_DEVICE bool DrawsSorted(const SampleRow& r, int64_t vocab) {
  return r.temperature > 0 && !DrawsByRace(r.top_p, r.top_k, vocab);
}

// The race's uniform for token `id` under `key`, in (0, 1): a splitmix64 output of the id's place
// in the key's stream, 52 bits, odd multiples of 2^-53 (never 0 or 1).
inline STRATA_HOST_DEVICE double RaceUniform(uint64_t key, int64_t id) {
  uint64_t z = key + static_cast<uint64_t>(id + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>((z >> 12) * 2 + 1) * (1.0 / 9007199254740992.0);
}

}  // namespace strata::gpu

#endif  // STRATA_KERNELS_CUDA_SAMPLE_ROW_H_
