// Device-side helpers shared by Strata's .cu files: f32 <-> activation type conversions, dispatch
// on ActType, and warp / block reductions.
#ifndef STRATA_KERNELS_CUDA_CUDA_TYPES_CUH_
#define STRATA_KERNELS_CUDA_CUDA_TYPES_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "kernels/cuda/ops_kernel.h"

namespace strata::gpu {

__device__ __forceinline__ float ToF(float x) { return x; }
__device__ __forceinline__ float ToF(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToF(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T FromF(float x);
template <>
__device__ __forceinline__ float FromF<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half FromF<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromF<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in 16 bytes, the width of one vector load.
template <typename T>
inline constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

// The kVec16<T> elements of T packed in `v`, as f32.
template <typename T>
__device__ __forceinline__ void Unpack16(const uint4& v, float* out) {
  const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < kVec16<T>; ++i) out[i] = ToF(h[i]);
}

// The 16 bytes of T at p (16-byte aligned) in one load, as f32. The load goes into a local uint4
// first: handing Unpack16 a reference into global memory let the compiler read it two bytes at a
// time (eight 16-bit loads instead of one 128-bit load; the tiled attention kernel at batch 64 ran
// 3x slower for it).
template <typename T>
__device__ __forceinline__ void Load16(const T* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  Unpack16<T>(v, out);
}

// cos and sin of position * inv_freq: the angle in double (positions reach 10^5 and more, where
// float loses the phase), reduced to [-pi, pi] in double, then sincosf, which is exact to about an
// ulp there and much cheaper than a double sincos.
__device__ __forceinline__ void RopeAngle(double pos, float inv_freq, float* c, float* s) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  // Rounded explicitly, so every kernel that calls it gets the same angle.
  const double a0 = __dmul_rn(pos, static_cast<double>(inv_freq));
  const double a = __fma_rn(-kTwoPi, rint(a0 / kTwoPi), a0);
  sincosf(static_cast<float>(a), s, c);
}

// The rotate-half pair (x1, x2) at angle (c, s), rounded to T: x1 c - x2 s and x2 c + x1 s, each
// product rounded and never contracted into an FMA, so every kernel that rotates (the RoPE kernel,
// the q/k/v GEMV with RoPE folded in) writes the same bits; the arithmetic is RopeCpu's (its cos
// and sin come from another library, so not its bits).
template <typename T>
__device__ __forceinline__ void RopeRotate(float x1, float x2, float c, float s, T* y1, T* y2) {
  *y1 = FromF<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
  *y2 = FromF<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
}

// Calls fn(T{}) with T the C++ type of `t`.
template <typename Fn>
cudaError_t DispatchAct(ActType t, Fn&& fn) {
  switch (t) {
    case ActType::kF32:
      return fn(float{});
    case ActType::kF16:
      return fn(__half{});
    case ActType::kBF16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WarpSum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  v = lane < warps ? scratch[lane] : 0.0f;
  return WarpSum(v);
}

// Programmatic dependent launch (Hopper and newer). A kernel launched through LaunchPdl may begin
// while the kernel before it in the stream is still finishing, which hides the launch latency that
// otherwise separates every pair of small kernels in a decode step. Such a kernel calls PdlBegin()
// before it touches global memory that an earlier kernel may write: it waits until the previous
// kernel has completed and its writes are visible, then lets the next kernel start launching. What
// no kernel writes (weights, constants, a step's inputs, uploaded before the step's first kernel)
// may be read before. On older GPUs (and without the launch
// attribute) both are no-ops and launches serialize as usual.
__device__ __forceinline__ void PdlBegin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

inline bool PdlSupported() {
  static const bool supported = [] {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      return false;
    }
    return major >= 9;
  }();
  return supported;
}

// LaunchPdl with `smem_bytes` of dynamic shared memory (over 48 KiB needs the kernel's
// cudaFuncAttributeMaxDynamicSharedMemorySize raised first).
template <typename... KernelArgs, typename... Args>
cudaError_t LaunchPdlSmem(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  if (PdlSupported()) {
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, kernel, static_cast<KernelArgs>(args)...);
}

template <typename... KernelArgs, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, cudaStream_t stream,
                      Args... args) {
  return LaunchPdlSmem(kernel, grid, block, 0, stream, args...);
}

inline unsigned GridFor(int64_t n, int threads, int64_t cap = 65535 * 8) {
  int64_t g = (n + threads - 1) / threads;
  if (g > cap) g = cap;
  if (g < 1) g = 1;
  return static_cast<unsigned>(g);
}

}  // namespace strata::gpu

#endif  // STRATA_KERNELS_CUDA_CUDA_TYPES_CUH_
