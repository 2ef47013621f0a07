// Small-m GEMM (decode) as a bandwidth-bound GEMV: see GemvArgs in ops_kernel.h. Each warp owns
// kRows weight rows and walks k in 16-byte vectors, kUnroll vectors per row in flight per step
// (two steps' worth in the two-stage shapes), with every row of x applied to each weight vector it
// loads; a warp reduction finishes each output. Optionally x is the f32 residual stream,
// RMS-normalized by the kernel (each block reduces the rows first, then, where the rows fit, writes
// them normalized and rounded to T into shared memory once, by the norm kernel's expression; else
// it scales each x load by the gain and the sums by 1/RMS), and y accumulates into the residual; or
// each warp takes a gate row and its up row and writes silu(gate) * up (SiLU-mul folded into the
// gate/up projection); or, in the q/k/v projection, a q or k head's rows i and i + head_dim / 2,
// rotated (RoPE) and written to y and, for k and v, the KV cache. The epilogues round explicitly
// (__fmul_rn, __fadd_rn), so every mode writes the same bits for a row as the plain GEMV and the
// kernels it replaces.
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/cuda_types.cuh"
#include "kernels/cuda/ops_kernel.h"

namespace strata::gpu {
namespace {

// Shapes (weight rows per warp, warps per block, vectors per row in flight per lane), by variant:
// 0 (GemvArgs' default) 2/8/2; 1: 1/4/4; 2: 4/4/2; 3: 2/4/4; 4: 1/8/4; 5: 1/8/8; 6: 2/8/4; 7:
// 1/4/8. Variant 0 was the fastest of the first two on an H200 for four of Llama-3-8B's five decode
// projections timed alone, but inside a decode step 1 and 4 (a row a warp, 4 vectors in flight)
// were 3% faster, so GpuModelRunner takes 1 (GpuRunnerOptions::gemv_variant; docs/PERFORMANCE.md).
// Variants 8 (1/4/4), 9 (1/4/2) and 10 (2/8/2) are two-stage: a warp issues the next round's
// loads before it uses the round it holds, so its loads are never all drained between rounds
// (the one-stage shapes wait out a full memory latency each round; in a decode step's GEMVs,
// where every block is resident at once and all warps start together, the rounds run in lock
// step). Not yet measured. The fused forms (norm, SiLU pairs, RoPE) keep 0's shape.

// The input norm (GemvArgs::norm_weight): none, applied to each load of x, or staged in shared
// memory (a.m rows of k in T: dynamic shared memory of that size).
enum NormMode : int { kNoNorm = 0, kNormOnLoad = 1, kNormStaged = 2 };
// Most bytes of staged rows a block takes: the default 48 KiB of shared memory (no opt-in) less
// 1 KiB for the kernel's own arrays (inv_s, part_s: under 300 bytes).
constexpr size_t kMaxStagedBytes = 47 << 10;

// What a warp does with its rows' sums: write them (plain), SiLU-mul a gate row and its up row
// (GemvArgs::silu_pairs), or rotate a q or k row pair and write the KV cache too (rope_heads).
enum OutMode : int { kPlainOut = 0, kSiluPairs = 1, kRopeQkv = 2 };

template <typename T, typename O, int M, int kRows, int kWarps, int kUnroll, int kNorm, int kOut,
          int kStages>
__global__ void __launch_bounds__(kWarps * 32) GemvKernel(GemvArgs a) {
  static_assert(kStages == 1 || kStages == 2, "one round of loads in flight, or two");
  constexpr bool kPairs = kOut == kSiluPairs;
  static_assert(kOut == kPlainOut || kRows == 2, "two rows a warp: gate and up, or a rotated pair");
  constexpr int kN = kVec16<T>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  // The warp's weight rows: row0 + j * row_step for j < rows_here. Pairs: gate row `unit` and up
  // row n / 2 + unit. RoPE: units below rot_units are a q or k head's rows i and i + head_dim / 2
  // (head unit / rot_half, i = unit % rot_half); the rest take the v rows two at a time.
  const int64_t half = a.n / 2;
  const int64_t rot_half = kOut == kRopeQkv ? a.head_dim / 2 : 1;
  const int64_t rot_units = kOut == kRopeQkv ? (a.rope_heads + a.kv_heads) * rot_half : 0;
  int64_t row0 = unit * kRows, row_step = 1;
  if constexpr (kPairs) {
    row0 = unit;
    row_step = half;
  } else if constexpr (kOut == kRopeQkv) {
    if (unit < rot_units) {
      row0 = unit / rot_half * a.head_dim + unit % rot_half;
      row_step = rot_half;
    } else {
      row0 = 2 * rot_units + 2 * (unit - rot_units);
    }
  }
  // Warps past the last row stay for the block-wide norm reduction, with no rows of their own.
  const int64_t rows_here = kOut != kPlainOut
                                ? (unit < half ? kRows : 0)
                                : (a.n - row0 < kRows ? (a.n > row0 ? a.n - row0 : 0) : kRows);
  if (kNorm == kNoNorm && rows_here == 0) return;
  const int64_t vecs = a.k / kN;  // 16-byte vectors per row
  const uint4* w = reinterpret_cast<const uint4*>(a.w);
  const uint4* x = reinterpret_cast<const uint4*>(a.x);
  const int64_t ldx_v = a.ldx / kN;

  // A round: kUnroll vectors of each of the warp's rows, 32 vectors apart (lane-interleaved).
  using Round = uint4[kUnroll][kRows];
  constexpr int64_t kRoundVecs = 32 * kUnroll;
  Round wv;
  auto load_weights = [&](Round& buf, int64_t v0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * 32;
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        buf[u][j] = v < vecs && j < rows_here ? __ldg(w + (row0 + j * row_step) * vecs + v)
                                              : make_uint4(0, 0, 0, 0);
      }
    }
  };
  // No kernel writes the weights: the first round's loads (and, with l2_prefetch, a request to
  // L2 for the rest of the warp's rows) go out before waiting for the kernel before
  // (programmatic dependent launch), overlapping its tail.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (a.l2_prefetch) {
    // Lanes take 1 KiB pieces of each row (rows are a multiple of 16 bytes, 16-byte aligned).
    constexpr int64_t kPiece = 1024;
    const int64_t row_bytes = a.k * static_cast<int64_t>(sizeof(T));
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      if (j >= rows_here) break;
      const size_t base = __cvta_generic_to_global(w + (row0 + j * row_step) * vecs);
      for (int64_t off = lane * kPiece; off < row_bytes; off += 32 * kPiece) {
        const uint32_t bytes = static_cast<uint32_t>(min(kPiece, row_bytes - off));
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + off), "r"(bytes)
                     : "memory");
      }
    }
  }
#endif
  load_weights(wv, lane);
  PdlBegin();

  // Input norm: every block computes each row's inverse RMS over the whole residual row.
  __shared__ float inv_s[kNorm != kNoNorm ? M : 1];
  extern __shared__ __align__(16) unsigned char staged_s[];
  if constexpr (kNorm != kNoNorm) {
    __shared__ float part_s[kWarps][M];
    const float* res = static_cast<const float*>(a.x);
    float sq[M];
#pragma unroll
    for (int r = 0; r < M; ++r) {
      sq[r] = 0.0f;
      if (r < a.m) {
        const float4* row = reinterpret_cast<const float4*>(res + r * a.ldx);
        for (int64_t i = threadIdx.x; i < a.k / 4; i += kWarps * 32) {
          const float4 v = row[i];
          sq[r] += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
      }
      sq[r] = WarpSum(sq[r]);
      if (lane == 0) part_s[warp][r] = sq[r];
    }
    __syncthreads();
    if (threadIdx.x < M) {
      float total = 0.0f;
#pragma unroll
      for (int wi = 0; wi < kWarps; ++wi) total += part_s[wi][threadIdx.x];
      inv_s[threadIdx.x] = rsqrtf(total / static_cast<float>(a.k) + a.norm_eps);
    }
    __syncthreads();
    if constexpr (kNorm == kNormStaged) {
      // The normalized rows, rounded to T by AddRmsNormKernel's expression (its 1/RMS may differ
      // in the last bit: another summation order), for every warp's loads.
      T* xs = reinterpret_cast<T*>(staged_s);
      for (int r = 0; r < M; ++r) {
        if (r >= a.m) break;
        const float4* row = reinterpret_cast<const float4*>(res + r * a.ldx);
        const float4* gain = reinterpret_cast<const float4*>(a.norm_weight);
        const float inv = inv_s[r];
        for (int64_t i = threadIdx.x; i < a.k / 4; i += kWarps * 32) {
          const float4 v = row[i];
          const float4 g = __ldg(gain + i);
          // One 8- or 16-byte store of the four (no bank conflicts between neighbours).
          T four[4] = {FromF<T>(v.x * inv * g.x), FromF<T>(v.y * inv * g.y),
                       FromF<T>(v.z * inv * g.z), FromF<T>(v.w * inv * g.w)};
          T* o = xs + r * a.k + 4 * i;
          if constexpr (sizeof(T) == 2) {
            *reinterpret_cast<uint2*>(o) = *reinterpret_cast<const uint2*>(four);
          } else {
            *reinterpret_cast<float4*>(o) = *reinterpret_cast<const float4*>(four);
          }
        }
      }
      __syncthreads();
    }
    if (rows_here == 0) return;
  }

  float acc[M][kRows];
#pragma unroll
  for (int r = 0; r < M; ++r) {
#pragma unroll
    for (int j = 0; j < kRows; ++j) acc[r][j] = 0.0f;
  }
  // Applies the round of weights in `buf` (starting at vector v0 of this lane) to every row of x.
  auto apply_round = [&](const Round& buf, int64_t v0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * 32;
      if (v >= vecs) break;
      float wf[kRows][kN];
#pragma unroll
      for (int j = 0; j < kRows; ++j) Unpack16<T>(buf[u][j], wf[j]);
      // The norm's gain, once per vector for every row (its 1/RMS scales the sums at the end).
      float gain[kNorm == kNormOnLoad ? kN : 1];
      if constexpr (kNorm == kNormOnLoad) {
#pragma unroll
        for (int i = 0; i < kN; i += 4) {
          const float4 g = __ldg(reinterpret_cast<const float4*>(a.norm_weight + v * kN + i));
          gain[i] = g.x;
          gain[i + 1] = g.y;
          gain[i + 2] = g.z;
          gain[i + 3] = g.w;
        }
      }
#pragma unroll
      for (int r = 0; r < M; ++r) {
        if (r >= a.m) break;
        float xf[kN];
        if constexpr (kNorm == kNormStaged) {
          // A local copy: a reference into shared memory may be read two bytes at a time (see
          // Load16 in cuda_types.cuh).
          const uint4 xv = reinterpret_cast<const uint4*>(staged_s)[r * vecs + v];
          Unpack16<T>(xv, xf);
        } else if constexpr (kNorm == kNormOnLoad) {
          const float* xr = static_cast<const float*>(a.x) + r * a.ldx + v * kN;
#pragma unroll
          for (int i = 0; i < kN; i += 4) {
            const float4 xv = *reinterpret_cast<const float4*>(xr + i);
            xf[i] = xv.x * gain[i];
            xf[i + 1] = xv.y * gain[i + 1];
            xf[i + 2] = xv.z * gain[i + 2];
            xf[i + 3] = xv.w * gain[i + 3];
          }
        } else {
          Unpack16<T>(__ldg(x + r * ldx_v + v), xf);
        }
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
#pragma unroll
          for (int e = 0; e < kN; ++e) acc[r][j] = fmaf(xf[e], wf[j][e], acc[r][j]);
        }
      }
    }
  };
  if constexpr (kStages == 1) {
    for (int64_t v0 = lane; v0 < vecs; v0 += kRoundVecs) {
      if (v0 != lane) load_weights(wv, v0);
      apply_round(wv, v0);
    }
  } else {
    // Two buffers, two rounds an iteration: the loads of the round after next go out before the
    // next round is applied. Loads past the row are skipped (zeros), so are their rounds.
    Round wv2;
    for (int64_t v0 = lane; v0 < vecs; v0 += 2 * kRoundVecs) {
      load_weights(wv2, v0 + kRoundVecs);
      apply_round(wv, v0);
      if (v0 + 2 * kRoundVecs < vecs) load_weights(wv, v0 + 2 * kRoundVecs);
      apply_round(wv2, v0 + kRoundVecs);
    }
  }
#pragma unroll
  for (int r = 0; r < M; ++r) {
#pragma unroll
    for (int j = 0; j < kRows; ++j) acc[r][j] = WarpSum(acc[r][j]);
  }
  // Row j's sum for input row r as every epilogue starts from: 1/RMS (the on-load norm) and the
  // bias applied, explicitly rounded.
  const O* bias = static_cast<const O*>(a.bias);
  auto sum = [&](int r, int j) {
    float v = acc[r][j];
    if constexpr (kNorm == kNormOnLoad) v = __fmul_rn(v, inv_s[r]);
    if (bias != nullptr) v = __fadd_rn(v, ToF(bias[row0 + j * row_step]));
    return v;
  };
  O* y = static_cast<O*>(a.y);
  if constexpr (kPairs) {
    if (lane != 0) return;
      // Gate and up rounded to the output type, as the unfused SiLU-mul reads them.
#pragma unroll
    for (int r = 0; r < M; ++r) {
      if (r >= a.m) break;
      float gu[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) gu[j] = ToF(FromF<O>(sum(r, j)));
      y[r * a.ldy + row0] = FromF<O>(gu[0] / (1.0f + __expf(-gu[0])) * gu[1]);
    }
  } else if constexpr (kOut == kRopeQkv) {
    if (lane != 0) return;  // warps without rows left before the main loop
    // Each sum (with its bias) rounded to T, as the RoPE kernel reads the plain output; a q or k
    // pair rotated; then y, and the k and v heads' rows into the token's cache slot.
    const bool rotated = unit < rot_units;
    const int64_t head = unit / rot_half, i = unit % rot_half;
    const int64_t width = a.kv_heads * a.head_dim;  // a cache slot's elements
    O* cache = nullptr;                             // this unit's first element in slot 0
    if (rotated && head >= a.rope_heads) {
      cache = static_cast<O*>(a.k_cache) + (head - a.rope_heads) * a.head_dim + i;
    } else if (!rotated) {
      cache = static_cast<O*>(a.v_cache) + (row0 - 2 * rot_units);
    }
    float c = 1.0f, s = 0.0f;
#pragma unroll
    for (int r = 0; r < M; ++r) {
      if (r >= a.m) break;
      float x[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) x[j] = ToF(FromF<O>(sum(r, j)));
      O y0, y1;
      if (rotated) {
        RopeAngle(static_cast<double>(a.positions[r]), a.inv_freq[i], &c, &s);
        RopeRotate(x[0], x[1], c, s, &y0, &y1);
      } else {
        y0 = FromF<O>(x[0]);
        y1 = FromF<O>(x[1]);
      }
      y[r * a.ldy + row0] = y0;
      y[r * a.ldy + row0 + row_step] = y1;
      const int64_t slot = a.slots[r];
      if (cache != nullptr && slot >= 0 && slot < a.cache_slots) {
        cache[slot * width] = y0;
        cache[slot * width + row_step] = y1;
      }
    }
  } else if (lane == 0) {
#pragma unroll
    for (int r = 0; r < M; ++r) {
      if (r >= a.m) break;
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        if (j < rows_here) {
          float v = sum(r, j);  // row_step is 1 here
          O* out = y + r * a.ldy + row0 + j;
          if (a.accumulate) v += ToF(*out);
          *out = FromF<O>(v);
        }
      }
    }
  }
}

// With a norm, its rows staged in shared memory where they fit in kMaxStagedBytes.
template <typename T, typename O, int M, int kRows, int kWarps, int kUnroll, bool kNorm, int kOut,
          int kStages>
cudaError_t LaunchM(const GemvArgs& a, dim3 grid, dim3 block, cudaStream_t stream) {
  if constexpr (kNorm) {
    const size_t staged = static_cast<size_t>(a.m) * a.k * sizeof(T);
    if (staged <= kMaxStagedBytes) {
      return LaunchPdlSmem(GemvKernel<T, O, M, kRows, kWarps, kUnroll, kNormStaged, kOut, kStages>,
                           grid, block, staged, stream, a);
    }
    return LaunchPdl(GemvKernel<T, O, M, kRows, kWarps, kUnroll, kNormOnLoad, kOut, kStages>, grid,
                     block, stream, a);
  } else {
    return LaunchPdl(GemvKernel<T, O, M, kRows, kWarps, kUnroll, kNoNorm, kOut, kStages>, grid,
                     block, stream, a);
  }
}

template <typename T, typename O, int kRows, int kWarps, int kUnroll, bool kNorm,
          int kOut = kPlainOut, int kStages = 1>
cudaError_t LaunchShape(const GemvArgs& a, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((a.n + kWarps * kRows - 1) / (kWarps * kRows));
  const dim3 grid(blocks), block(kWarps * 32);
  if (a.m <= 1) {
    return LaunchM<T, O, 1, kRows, kWarps, kUnroll, kNorm, kOut, kStages>(a, grid, block, stream);
  }
  if (a.m <= 2) {
    return LaunchM<T, O, 2, kRows, kWarps, kUnroll, kNorm, kOut, kStages>(a, grid, block, stream);
  }
  if (a.m <= 4) {
    return LaunchM<T, O, 4, kRows, kWarps, kUnroll, kNorm, kOut, kStages>(a, grid, block, stream);
  }
  return LaunchM<T, O, 8, kRows, kWarps, kUnroll, kNorm, kOut, kStages>(a, grid, block, stream);
}

template <typename T, typename O>
cudaError_t LaunchFor(const GemvArgs& a, cudaStream_t stream) {
  if (a.silu_pairs || a.rope_heads > 0) {
    if constexpr (std::is_same_v<T, O>) {
      if (a.silu_pairs) {
        return a.norm_weight != nullptr ? LaunchShape<T, O, 2, 8, 2, true, kSiluPairs>(a, stream)
                                        : LaunchShape<T, O, 2, 8, 2, false, kSiluPairs>(a, stream);
      }
      return a.norm_weight != nullptr ? LaunchShape<T, O, 2, 8, 2, true, kRopeQkv>(a, stream)
                                      : LaunchShape<T, O, 2, 8, 2, false, kRopeQkv>(a, stream);
    } else {
      return cudaErrorInvalidValue;  // refused by GemvSupported (out_type must be act)
    }
  }
  if (a.norm_weight != nullptr) return LaunchShape<T, O, 2, 8, 2, true>(a, stream);
  switch (a.variant) {
    case 1:
      return LaunchShape<T, O, 1, 4, 4, false>(a, stream);
    case 2:
      return LaunchShape<T, O, 4, 4, 2, false>(a, stream);
    case 3:
      return LaunchShape<T, O, 2, 4, 4, false>(a, stream);
    case 4:
      return LaunchShape<T, O, 1, 8, 4, false>(a, stream);
    case 5:
      return LaunchShape<T, O, 1, 8, 8, false>(a, stream);
    case 6:
      return LaunchShape<T, O, 2, 8, 4, false>(a, stream);
    case 7:
      return LaunchShape<T, O, 1, 4, 8, false>(a, stream);
    case 8:
      return LaunchShape<T, O, 1, 4, 4, false, kPlainOut, 2>(a, stream);
    case 9:
      return LaunchShape<T, O, 1, 4, 2, false, kPlainOut, 2>(a, stream);
    case 10:
      return LaunchShape<T, O, 2, 8, 2, false, kPlainOut, 2>(a, stream);
    case 0:
      return LaunchShape<T, O, 2, 8, 2, false>(a, stream);
  }
  return cudaErrorInvalidValue;  // refused by GemvSupported (variant out of range)
}

}  // namespace

bool GemvSupported(const GemvArgs& a) {
  const int64_t vec = 16 / ActBytes(a.act);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool out_ok = a.out_type == a.act || a.out_type == ActType::kF32;
  const bool norm_ok = a.norm_weight == nullptr ||
                       (a.k % 4 == 0 && a.ldx % 4 == 0 && aligned(a.norm_weight) && a.x != a.y);
  const bool accumulate_ok = !a.accumulate || (a.out_type == ActType::kF32 && a.x != a.y);
  const bool pairs_ok = !a.silu_pairs || (a.n % 2 == 0 && a.out_type == a.act &&
                                          a.bias == nullptr && !a.accumulate && a.x != a.y);
  const bool rope_ok =
      a.rope_heads == 0 ||
      (a.rope_heads > 0 && a.kv_heads > 0 && a.head_dim > 0 && a.head_dim % 2 == 0 &&
       a.n == (a.rope_heads + 2 * a.kv_heads) * a.head_dim && !a.silu_pairs &&
       a.out_type == a.act && !a.accumulate && a.x != a.y && a.positions != nullptr &&
       a.inv_freq != nullptr && a.slots != nullptr && a.k_cache != nullptr &&
       a.v_cache != nullptr && a.cache_slots >= 0);
  return a.m >= 1 && a.m <= 8 && a.n > 0 && a.k > 0 && a.variant >= 0 &&
         a.variant < kGemvVariants && a.k % vec == 0 && a.ldx % vec == 0 && aligned(a.x) &&
         aligned(a.w) && out_ok && norm_ok && accumulate_ok && pairs_ok && rope_ok;
}

cudaError_t LaunchGemv(const GemvArgs& a, cudaStream_t stream) {
  if (!GemvSupported(a)) return cudaErrorInvalidValue;
  switch (a.act) {
    case ActType::kF32:
      return LaunchFor<float, float>(a, stream);
    case ActType::kF16:
      return a.out_type == ActType::kF32 ? LaunchFor<__half, float>(a, stream)
                                         : LaunchFor<__half, __half>(a, stream);
    case ActType::kBF16:
      return a.out_type == ActType::kF32 ? LaunchFor<__nv_bfloat16, float>(a, stream)
                                         : LaunchFor<__nv_bfloat16, __nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace strata::gpu
