// One row's options for seeded sampling on the GPU (gpu::SampleArgs in kernels/cuda/ops_kernel.h),
// in a header free of CUDA so that CPU-only code can fill it.
#ifndef STRATA_KERNELS_CUDA_SAMPLE_ROW_H_
#define STRATA_KERNELS_CUDA_SAMPLE_ROW_H_

#include <cstdint>

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
  double u = 0.0;  // the draw in [0, 1): SampleUniform(seed, position)
};

}  // namespace strata::gpu

#endif  // STRATA_KERNELS_CUDA_SAMPLE_ROW_H_
