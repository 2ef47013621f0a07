// The row-wise ops of a transformer layer on the GPU: embedding, fused residual add + RMSNorm,
// per-head RMSNorm, rotary embedding, SiLU-mul, KV cache writes, greedy argmax, conversions and
// seeded random fills. Memory-bound one-pass kernels; f32 arithmetic throughout.
#include <cstdint>

#include "kernels/cuda/cuda_types.cuh"
#include "kernels/cuda/ops_kernel.h"

namespace strata::gpu {
namespace {

template <typename T>
__global__ void EmbedKernel(EmbedArgs a) {
  PdlBegin();
  const int64_t t = blockIdx.x;
  const int32_t id = a.tokens[t];
  const T* row = static_cast<const T*>(a.table) + static_cast<int64_t>(id) * a.hidden;
  float* out = a.out + t * a.hidden;
  const bool valid = id >= 0 && id < a.vocab;
  for (int64_t i = threadIdx.x; i < a.hidden; i += blockDim.x) out[i] = valid ? ToF(row[i]) : 0.0f;
}

// One block per row. Rows of up to kNormCached elements a thread stay in registers between the
// sum and the output, and their gains (weights: no kernel writes them) are read before waiting for
// the kernel before (programmatic dependent launch), so no load follows the block's reduction.
// Longer rows read both again. The same arithmetic, in the same order, either way.
constexpr int kNormCached = 8;

template <typename T>
__global__ void AddRmsNormKernel(AddRmsNormArgs a) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const bool cached = a.dim <= kNormCached * static_cast<int64_t>(blockDim.x);
  float gain[kNormCached], kept[kNormCached];
  if (cached) {
#pragma unroll
    for (int j = 0; j < kNormCached; ++j) {
      const int64_t i = threadIdx.x + j * static_cast<int64_t>(blockDim.x);
      gain[j] = i < a.dim ? a.weight[i] : 0.0f;
    }
  }
  PdlBegin();
  float* res = a.residual + r * a.dim;
  const int64_t ds = a.delta_stride ? a.delta_stride : a.dim;
  const int64_t os = a.out_stride ? a.out_stride : a.dim;
  const T* delta = a.delta ? static_cast<const T*>(a.delta) + r * ds : nullptr;
  T* out = static_cast<T*>(a.out) + r * os;
  auto add = [&](int64_t i) {
    float v = res[i];
    if (delta) {
      v += ToF(delta[i]);
      res[i] = v;
    }
    return v;
  };
  float sum = 0.0f;
  if (cached) {
#pragma unroll
    for (int j = 0; j < kNormCached; ++j) {
      const int64_t i = threadIdx.x + j * static_cast<int64_t>(blockDim.x);
      kept[j] = i < a.dim ? add(i) : 0.0f;
      sum += kept[j] * kept[j];  // adds 0 past the row: the same sum
    }
  } else {
    for (int64_t i = threadIdx.x; i < a.dim; i += blockDim.x) {
      const float v = add(i);
      sum += v * v;
    }
  }
  sum = BlockSum(sum, scratch);
  const float inv = rsqrtf(sum / static_cast<float>(a.dim) + a.eps);
  if (cached) {
#pragma unroll
    for (int j = 0; j < kNormCached; ++j) {
      const int64_t i = threadIdx.x + j * static_cast<int64_t>(blockDim.x);
      if (i < a.dim) out[i] = FromF<T>(kept[j] * inv * gain[j]);
    }
  } else {
    for (int64_t i = threadIdx.x; i < a.dim; i += blockDim.x) {
      out[i] = FromF<T>(res[i] * inv * a.weight[i]);
    }
  }
}

// One warp per (token, head).
template <typename T>
__global__ void HeadRmsNormKernel(HeadRmsNormArgs a) {
  PdlBegin();
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= a.num_tokens * a.num_heads) return;
  const int64_t t = warp / a.num_heads, h = warp % a.num_heads;
  T* x = static_cast<T*>(a.x) + t * a.token_stride + h * a.head_dim;
  float sum = 0.0f;
  for (int64_t i = lane; i < a.head_dim; i += 32) {
    const float v = ToF(x[i]);
    sum += v * v;
  }
  sum = WarpSum(sum);
  const float inv = rsqrtf(sum / static_cast<float>(a.head_dim) + a.eps);
  for (int64_t i = lane; i < a.head_dim; i += 32) x[i] = FromF<T>(ToF(x[i]) * inv * a.weight[i]);
}

// Rotary embedding, one thread per rotated pair: grid.x over tokens, grid.y over the (head, i <
// head_dim / 2) pairs of q then k (then, with a cache write, the pairs of v to copy). Every thread
// computes its own angle and does one load and one store per element, so a single decode token
// spreads over many blocks instead of looping in one (measured: 5.4 us for Llama-3-8B's token in
// one block of 256 threads on an H200).
//
// Positions, slots and inv_freq are the step's inputs and constants (no kernel writes them): the
// slot and the angle are read and computed before waiting for the kernel before (programmatic
// dependent launch), only q, k and v after.
template <typename T, bool kWrite>
__global__ void RopeKernel(RopeArgs a, WriteKvArgs w) {
  const int64_t t = blockIdx.x;
  const int64_t half = a.head_dim / 2;
  const int64_t q_work = a.num_q_heads * half;
  const int64_t k_work = a.num_k_heads * half;
  const int64_t item = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  int64_t slot = -1;
  if constexpr (kWrite) {
    slot = w.slots[t];
    if (slot >= w.num_blocks * w.block_tokens) slot = -1;
  }
  const int64_t width = a.num_k_heads * a.head_dim;
  const bool rotates = item < q_work + k_work;
  const bool is_q = item < q_work;
  const int64_t pair = is_q ? item : item - q_work;
  const int64_t h = pair / half, i = pair - h * half;
  float c = 1.0f, s = 0.0f;
  if (rotates) RopeAngle(static_cast<double>(a.positions[t]), a.inv_freq[i], &c, &s);
  PdlBegin();
  if (rotates) {
    T* base = is_q ? static_cast<T*>(a.q) + t * a.q_stride + h * a.head_dim
                   : static_cast<T*>(a.k) + t * a.k_stride + h * a.head_dim;
    T y1, y2;
    RopeRotate(ToF(base[i]), ToF(base[i + half]), c, s, &y1, &y2);
    base[i] = y1;
    base[i + half] = y2;
    if (kWrite && !is_q && slot >= 0) {
      T* kc = static_cast<T*>(w.k_cache) + slot * width + h * a.head_dim;
      kc[i] = y1;
      kc[i + half] = y2;
    }
  } else if (kWrite && slot >= 0 && item < q_work + 2 * k_work) {
    const int64_t v_pair = item - q_work - k_work;
    const int64_t vh = v_pair / half, vi = v_pair - vh * half;
    const T* v = static_cast<const T*>(w.v) + t * w.v_stride + vh * a.head_dim;
    T* vc = static_cast<T*>(w.v_cache) + slot * width + vh * a.head_dim;
    vc[vi] = v[vi];
    vc[vi + half] = v[vi + half];
  }
}

template <typename T>
__global__ void SiluMulKernel(SiluMulArgs a) {
  PdlBegin();
  const int64_t total = a.rows * a.dim;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < total;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = w / a.dim, i = w % a.dim;
    const T* in = static_cast<const T*>(a.in) + r * 2 * a.dim;
    const float g = ToF(in[i]), u = ToF(in[a.dim + i]);
    static_cast<T*>(a.out)[w] = FromF<T>(g / (1.0f + __expf(-g)) * u);
  }
}

template <typename T>
__global__ void WriteKvKernel(WriteKvArgs a) {
  const int64_t t = blockIdx.x;
  const int64_t slot = a.slots[t];
  if (slot < 0 || slot >= a.num_blocks * a.block_tokens) return;
  const int64_t width = a.num_kv_heads * a.head_dim;
  const T* k = static_cast<const T*>(a.k) + t * a.k_stride;
  const T* v = static_cast<const T*>(a.v) + t * a.v_stride;
  T* kc = static_cast<T*>(a.k_cache) + slot * width;
  T* vc = static_cast<T*>(a.v_cache) + slot * width;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    kc[i] = k[i];
    vc[i] = v[i];
  }
}

// The warp's largest (*best, *best_i), the lowest index among equals, in every lane.
__device__ __forceinline__ void WarpArgmax(float* best, int* best_i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, *best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, *best_i, o);
    if (ov > *best || (ov == *best && oi < *best_i)) {
      *best = ov;
      *best_i = oi;
    }
  }
}

// Four consecutive elements of T at p (aligned to their size: one 16- or 8-byte load) as f32.
template <typename T>
__device__ __forceinline__ void Load4(const T* p, float* out) {
  if constexpr (sizeof(T) == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = ToF(h[e]);
  }
}

// Calls f(v, i) for each element i of `row` [0, n) that this thread takes, i rising. Where the row
// is aligned and n a multiple of 4, a thread takes groups of four and keeps four groups' loads in
// flight (the loop one load at a time waited out a memory latency per element: a batch-1 step's
// 128256 logits in one block); else elements one by one.
template <typename T, typename F>
__device__ __forceinline__ void ForEachOfRow(const T* row, int64_t n, F&& f) {
  const int64_t bd = blockDim.x;
  if (n % 4 == 0 && reinterpret_cast<uintptr_t>(row) % (4 * sizeof(T)) == 0) {
    constexpr int kGroups = 4;
    const int64_t quads = n / 4;
    int64_t q = threadIdx.x;
    for (; q + (kGroups - 1) * bd < quads; q += kGroups * bd) {
      float v[kGroups][4];
#pragma unroll
      for (int u = 0; u < kGroups; ++u) Load4(row + 4 * (q + u * bd), v[u]);
#pragma unroll
      for (int u = 0; u < kGroups; ++u) {
#pragma unroll
        for (int e = 0; e < 4; ++e) f(v[u][e], 4 * (q + u * bd) + e);
      }
    }
    for (; q < quads; q += bd) {
      float v[4];
      Load4(row + 4 * q, v);
#pragma unroll
      for (int e = 0; e < 4; ++e) f(v[e], 4 * q + e);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += bd) f(ToF(row[i]), i);
  }
}

// One block per row: the largest value with the lowest index, then log-sum-exp around it.
template <typename T>
__global__ void ArgmaxKernel(ArgmaxArgs a) {
  PdlBegin();
  __shared__ float vals[32];
  __shared__ int idxs[32];
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t ld = a.ld ? a.ld : a.vocab;
  const T* row = static_cast<const T*>(a.logits) + r * ld;
  float best = -FLT_MAX;
  int best_i = INT32_MAX;
  ForEachOfRow(row, a.vocab, [&](float v, int64_t i) {
    if (v > best) {  // i rises along a thread's walk, so the first of equals stays
      best = v;
      best_i = static_cast<int>(i);
    }
  });
  WarpArgmax(&best, &best_i);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    vals[warp] = best;
    idxs[warp] = best_i;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    best = lane < warps ? vals[lane] : -FLT_MAX;
    best_i = lane < warps ? idxs[lane] : INT32_MAX;
    WarpArgmax(&best, &best_i);
    if (lane == 0) {
      vals[0] = best;
      idxs[0] = best_i;
    }
  }
  __syncthreads();
  best = vals[0];
  best_i = idxs[0];
  if (a.logprob != nullptr) {
    float sum = 0.0f;
    ForEachOfRow(row, a.vocab, [&](float v, int64_t) { sum += __expf(v - best); });
    sum = BlockSum(sum, scratch);
    if (threadIdx.x == 0) a.logprob[r] = -logf(sum);
  }
  if (threadIdx.x == 0) a.token[r] = best_i == INT32_MAX ? 0 : best_i;
}

template <typename T>
__global__ void GatherRowsKernel(GatherRowsArgs a) {
  PdlBegin();
  const int64_t i = blockIdx.x;
  const T* src = static_cast<const T*>(a.src) + static_cast<int64_t>(a.rows[i]) * a.ld_src;
  T* dst = static_cast<T*>(a.dst) + i * a.ld_dst;
  for (int64_t j = threadIdx.x; j < a.width; j += blockDim.x) dst[j] = src[j];
}

template <typename In, typename Out>
__global__ void ConvertKernel(const In* in, Out* out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = FromF<Out>(ToF(in[i]));
  }
}

__device__ __forceinline__ uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

template <typename T>
__global__ void RandomNormalKernel(T* out, int64_t n, float mean, float stddev, uint64_t seed) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = SplitMix64(seed * 0x632be59bd9b4e019ull + static_cast<uint64_t>(i));
    // Two 24-bit uniforms in (0, 1] and [0, 1) -> Box-Muller.
    const float u1 = (static_cast<float>(h >> 40) + 1.0f) * (1.0f / 16777216.0f);
    const float u2 = static_cast<float>((h >> 8) & 0xffffffu) * (1.0f / 16777216.0f);
    const float z = sqrtf(-2.0f * logf(u1)) * __cosf(6.2831853f * u2);
    out[i] = FromF<T>(mean + stddev * z);
  }
}

}  // namespace

cudaError_t LaunchEmbed(const EmbedArgs& a, cudaStream_t stream) {
  return DispatchAct(a.table_type, [&](auto t) {
    using T = decltype(t);
    return LaunchPdl(EmbedKernel<T>, dim3(static_cast<unsigned>(a.num_tokens)), dim3(256), stream,
                     a);
  });
}

cudaError_t LaunchAddRmsNorm(const AddRmsNormArgs& a, cudaStream_t stream) {
  const int threads = a.dim >= 4096 ? 1024 : a.dim >= 1024 ? 512 : 128;
  return DispatchAct(a.act, [&](auto t) {
    using T = decltype(t);
    return LaunchPdl(AddRmsNormKernel<T>, dim3(static_cast<unsigned>(a.rows)), dim3(threads),
                     stream, a);
  });
}

cudaError_t LaunchHeadRmsNorm(const HeadRmsNormArgs& a, cudaStream_t stream) {
  const int64_t warps = a.num_tokens * a.num_heads;
  return DispatchAct(a.act, [&](auto t) {
    using T = decltype(t);
    return LaunchPdl(HeadRmsNormKernel<T>, dim3(static_cast<unsigned>((warps + 7) / 8)), dim3(256),
                     stream, a);
  });
}

cudaError_t LaunchRope(const RopeArgs& a, cudaStream_t stream) {
  const int64_t items = (a.num_q_heads + a.num_k_heads) * (a.head_dim / 2);
  const dim3 grid(static_cast<unsigned>(a.num_tokens), GridFor(items, 128));
  return DispatchAct(a.act, [&](auto t) {
    using T = decltype(t);
    return LaunchPdl(RopeKernel<T, false>, grid, dim3(128), stream, a, WriteKvArgs{});
  });
}

cudaError_t LaunchRopeWriteKv(const RopeArgs& rope, const WriteKvArgs& kv, cudaStream_t stream) {
  if (kv.k != rope.k || kv.k_stride != rope.k_stride || kv.act != rope.act ||
      kv.num_kv_heads != rope.num_k_heads || kv.head_dim != rope.head_dim) {
    return cudaErrorInvalidValue;
  }
  const int64_t items = (rope.num_q_heads + 2 * rope.num_k_heads) * (rope.head_dim / 2);
  const dim3 grid(static_cast<unsigned>(rope.num_tokens), GridFor(items, 128));
  return DispatchAct(rope.act, [&](auto t) {
    using T = decltype(t);
    return LaunchPdl(RopeKernel<T, true>, grid, dim3(128), stream, rope, kv);
  });
}

cudaError_t LaunchSiluMul(const SiluMulArgs& a, cudaStream_t stream) {
  return DispatchAct(a.act, [&](auto t) {
    using T = decltype(t);
    return LaunchPdl(SiluMulKernel<T>, dim3(GridFor(a.rows * a.dim, 256)), dim3(256), stream, a);
  });
}

cudaError_t LaunchWriteKv(const WriteKvArgs& a, cudaStream_t stream) {
  return DispatchAct(a.act, [&](auto t) {
    using T = decltype(t);
    WriteKvKernel<T><<<static_cast<unsigned>(a.num_tokens), 256, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t LaunchArgmax(const ArgmaxArgs& a, cudaStream_t stream) {
  return DispatchAct(a.type, [&](auto t) {
    using T = decltype(t);
    return LaunchPdl(ArgmaxKernel<T>, dim3(static_cast<unsigned>(a.rows)), dim3(1024), stream, a);
  });
}

cudaError_t LaunchGatherRows(const GatherRowsArgs& a, cudaStream_t stream) {
  return DispatchAct(a.type, [&](auto t) {
    using T = decltype(t);
    return LaunchPdl(GatherRowsKernel<T>, dim3(static_cast<unsigned>(a.num_rows)), dim3(256),
                     stream, a);
  });
}

cudaError_t LaunchConvert(const void* in, ActType in_type, void* out, ActType out_type, int64_t n,
                          cudaStream_t stream) {
  return DispatchAct(in_type, [&](auto i) {
    using In = decltype(i);
    return DispatchAct(out_type, [&](auto o) {
      using Out = decltype(o);
      ConvertKernel<In, Out><<<GridFor(n, 256), 256, 0, stream>>>(static_cast<const In*>(in),
                                                                  static_cast<Out*>(out), n);
      return cudaGetLastError();
    });
  });
}

cudaError_t LaunchRandomNormal(void* out, ActType type, int64_t n, float mean, float stddev,
                               uint64_t seed, cudaStream_t stream) {
  return DispatchAct(type, [&](auto t) {
    using T = decltype(t);
    RandomNormalKernel<T>
        <<<GridFor(n, 256), 256, 0, stream>>>(static_cast<T*>(out), n, mean, stddev, seed);
    return cudaGetLastError();
  });
}

}  // namespace strata::gpu
