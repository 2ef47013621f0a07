// Paged attention on the GPU (see PagedAttentionArgs in ops_kernel.h).
//
// One block of four warps serves one tile (consecutive query tokens of one sequence) for one KV
// head: the tile's query rows (tokens x the heads of the KV head's group) sit in shared memory,
// pre-scaled, and every key the block reads is used by all of them. The warps take turns over
// chunks of 32 keys (lane = key for Q.K, lane = output dims for P.V), each keeping an online
// softmax per row in the log2 domain; at the end the four warps' states merge in shared memory.
// With several partitions, each block covers one range of keys and writes its unnormalized state,
// and a second kernel merges the partitions.
#include <cstdint>

#include "kernels/cuda/cuda_types.cuh"
#include "kernels/cuda/ops_kernel.h"

namespace strata::gpu {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

// N consecutive elements of T at p as f32, in one 8- or 16-byte load where the size allows (p is
// aligned to the load: rows are head_dim elements and lanes take equal slices).
template <typename T, int N>
__device__ __forceinline__ void LoadDims(const T* p, float* out) {
  if constexpr (N * sizeof(T) == 16) {
    float tmp[kVec16<T>];
    Load16(p, tmp);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = tmp[i];
  } else if constexpr (N * sizeof(T) == 8 && sizeof(T) == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = ToF(h[i]);
  } else if constexpr (N * sizeof(T) == 32) {
    LoadDims<T, N / 2>(p, out);
    LoadDims<T, N / 2>(p + N / 2, out + N / 2);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = ToF(p[i]);
  }
}

struct Tile {
  int64_t begin;
  int64_t count;
};

// How a tile's key range [k_begin, k_end) is split: into `used` partitions of `keys` keys (the
// last one shorter), as few multiples of partition_keys each as let num_partitions cover the range.
// Computed on the device from the actual range, so that a graph captured for the longest context
// splits a short one into few full partitions instead of many empty ones.
struct Split {
  int64_t keys;
  int64_t used;
};

__device__ __forceinline__ Split SplitKeys(int64_t k_begin, int64_t k_end,
                                           const PagedAttentionArgs& a) {
  const int64_t total = k_end > k_begin ? k_end - k_begin : 0;
  const int64_t units = (total + a.partition_keys - 1) / a.partition_keys;
  const int64_t per = units > 0 ? (units + a.num_partitions - 1) / a.num_partitions : 1;
  return {per * a.partition_keys, (units + per - 1) / per};
}

__device__ __forceinline__ Tile TileOf(const PagedAttentionArgs& a, int64_t t) {
  if (a.tiles == nullptr) return {t, 1};
  return {a.tiles[2 * t], a.tiles[2 * t + 1]};
}

// Address of key `key`'s row for KV head `kvh` in `cache`, or null when the block table does not
// reach it.
template <typename T, int D>
__device__ __forceinline__ const T* KeyRow(const PagedAttentionArgs& a, const T* cache,
                                           const int32_t* table, int64_t key, int64_t kvh) {
  const int64_t bi = key / a.block_tokens;
  if (bi >= a.max_blocks_per_seq) return nullptr;
  const int64_t block = table[bi];
  if (block < 0 || block >= a.num_blocks) return nullptr;
  return cache + ((block * a.block_tokens + key % a.block_tokens) * a.num_kv_heads + kvh) * D;
}

template <typename T, int D, int R>
__global__ void __launch_bounds__(kThreads) PagedAttentionKernel(PagedAttentionArgs a) {
  PdlBegin();
  constexpr int kDpl = D >= 32 ? D / 32 : 1;  // output dims per lane
  constexpr int kVec = kVec16<T>;
  __shared__ float q_s[R][D];
  __shared__ int pos_s[R], lo_s[R];
  __shared__ float m_s[kWarps][R], l_s[kWarps][R];
  __shared__ float acc_s[kWarps][R][D];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const Tile tile = TileOf(a, blockIdx.x);
  const int64_t kvh = blockIdx.y;
  const int64_t part = blockIdx.z;
  const int64_t group = a.num_heads / a.num_kv_heads;
  // A tile never holds more rows than R (the host plans tiles so); clamp rather than overrun.
  const int rows = static_cast<int>(tile.count * group < R ? tile.count * group : R);
  const int64_t seq = a.token_seq[tile.begin];
  const int32_t* table = a.block_tables + seq * a.max_blocks_per_seq;

  // Query rows, scaled into the log2 domain.
  const float qscale = a.scale * kLog2e;
  for (int i = threadIdx.x; i < R * D; i += kThreads) {
    const int r = i / D, d = i % D;
    float v = 0.0f;
    if (r < rows) {
      const int64_t t = tile.begin + r / group;
      const int64_t h = kvh * group + r % group;
      v = ToF(static_cast<const T*>(a.q)[t * a.q_stride + h * D + d]) * qscale;
    }
    q_s[r][d] = v;
  }
  int64_t k_begin = INT64_MAX, k_end = 0;
  for (int r = 0; r < rows; ++r) {
    const int64_t pos = a.token_pos[tile.begin + r / group];
    const int64_t lo =
        a.sliding_window > 0 && pos - a.sliding_window + 1 > 0 ? pos - a.sliding_window + 1 : 0;
    if (threadIdx.x == 0) {
      pos_s[r] = static_cast<int>(pos);
      lo_s[r] = static_cast<int>(lo);
    }
    k_begin = min(k_begin, lo);
    k_end = max(k_end, pos + 1);
  }
  if (a.num_partitions > 1) {
    const Split sp = SplitKeys(k_begin, k_end, a);
    if (part >= sp.used) return;  // nothing here; the merge reads only the used partitions
    k_begin += part * sp.keys;
    k_end = min(k_end, k_begin + sp.keys);
  }
  __syncthreads();

  float m[R], l[R], acc[R][kDpl];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int j = 0; j < kDpl; ++j) acc[r][j] = 0.0f;
  }

  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  for (int64_t chunk = k_begin + 32 * warp; chunk < k_end; chunk += 32 * kWarps) {
    const int64_t key = chunk + lane;
    const T* krow = key < k_end ? KeyRow<T, D>(a, kc, table, key, kvh) : nullptr;
    float s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = 0.0f;
    if (krow != nullptr) {
      // Decode-sized tiles load the whole key row at once (more loads in flight); larger tiles
      // keep registers for their rows.
#pragma unroll(R <= 4 ? D / kVec : 4)
      for (int d = 0; d < D; d += kVec) {
        float kv[kVec];
        Load16(krow + d, kv);
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) s[r] = fmaf(q_s[r][d + e], kv[e], s[r]);
        }
      }
    }
    float p[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const bool ok = krow != nullptr && r < rows && key <= pos_s[r] && key >= lo_s[r];
      const float sr = ok ? s[r] : -INFINITY;
      const float mc = WarpMax(sr);
      const float mn = fmaxf(m[r], mc);
      const float alpha = mn == -INFINITY ? 1.0f : exp2f(m[r] - mn);
      p[r] = ok ? exp2f(sr - mn) : 0.0f;
      l[r] = l[r] * alpha + p[r];
#pragma unroll
      for (int j = 0; j < kDpl; ++j) acc[r][j] *= alpha;
      m[r] = mn;
    }
    // P.V: every lane holds output dims [lane * kDpl, +kDpl) of each row. V rows are loaded a group
    // of keys at a time (16 for decode-sized tiles, else 8), so that many loads are in flight.
    const int valid = static_cast<int>(k_end - chunk < 32 ? k_end - chunk : 32);
    const uint64_t vrow_mine =
        reinterpret_cast<uint64_t>(krow != nullptr ? vc + (krow - kc) : nullptr);
    constexpr int kGroup = R <= 4 ? 16 : 8;
    for (int j0 = 0; j0 < valid; j0 += kGroup) {
      float vv[kGroup][kDpl];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const T* vrow = reinterpret_cast<const T*>(__shfl_sync(0xffffffffu, vrow_mine, j0 + g));
        if (j0 + g < valid && vrow != nullptr && lane * kDpl < D) {
          LoadDims<T, kDpl>(vrow + lane * kDpl, vv[g]);
        } else {
#pragma unroll
          for (int e = 0; e < kDpl; ++e) vv[g][e] = 0.0f;
        }
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float pj = __shfl_sync(0xffffffffu, p[r], j0 + g);
#pragma unroll
          for (int e = 0; e < kDpl; ++e) acc[r][e] = fmaf(pj, vv[g][e], acc[r][e]);
        }
      }
    }
  }

  // Merge the four warps.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float lsum = WarpSum(l[r]);
    if (lane == 0) {
      m_s[warp][r] = m[r];
      l_s[warp][r] = lsum;
    }
    if (lane * kDpl < D) {
#pragma unroll
      for (int e = 0; e < kDpl; ++e) acc_s[warp][r][lane * kDpl + e] = acc[r][e];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w][r]);
    float lt = 0.0f, o = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(m_s[w][r] - mx);
        lt += l_s[w][r] * f;
        o += acc_s[w][r][d] * f;
      }
    }
    if (a.num_partitions > 1) {
      // [tile, kvh, part, R, D + 2]: o..., then m and l after the D values.
      float* ws =
          a.workspace +
          ((static_cast<int64_t>(blockIdx.x) * a.num_kv_heads + kvh) * a.num_partitions + part) *
              R * (D + 2) +
          r * (D + 2);
      ws[d] = o;
      if (d == 0) {
        ws[D] = mx;
        ws[D + 1] = lt;
      }
    } else {
      const int64_t t = tile.begin + r / group;
      const int64_t h = kvh * group + r % group;
      static_cast<T*>(a.out)[t * a.out_stride + h * D + d] = FromF<T>(lt > 0 ? o / lt : 0.0f);
    }
  }
}

template <typename T, int D, int R>
__global__ void __launch_bounds__(kThreads) MergePartitionsKernel(PagedAttentionArgs a) {
  PdlBegin();
  const Tile tile = TileOf(a, blockIdx.x);
  const int64_t kvh = blockIdx.y;
  const int64_t group = a.num_heads / a.num_kv_heads;
  const int rows = static_cast<int>(tile.count * group < R ? tile.count * group : R);
  const float* base = a.workspace + (static_cast<int64_t>(blockIdx.x) * a.num_kv_heads + kvh) *
                                        a.num_partitions * R * (D + 2);
  // The same key range and split as the partitions' blocks computed.
  int64_t k_begin = INT64_MAX, k_end = 0;
  for (int r = 0; r < rows; ++r) {
    const int64_t pos = a.token_pos[tile.begin + r / group];
    const int64_t lo =
        a.sliding_window > 0 && pos - a.sliding_window + 1 > 0 ? pos - a.sliding_window + 1 : 0;
    k_begin = min(k_begin, lo);
    k_end = max(k_end, pos + 1);
  }
  const int64_t used = SplitKeys(k_begin, k_end, a).used;
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    float mx = -INFINITY;
    for (int64_t p = 0; p < used; ++p) mx = fmaxf(mx, base[(p * R + r) * (D + 2) + D]);
    float lt = 0.0f, o = 0.0f;
    if (mx != -INFINITY) {
      for (int64_t p = 0; p < used; ++p) {
        const float* e = base + (p * R + r) * (D + 2);
        const float f = exp2f(e[D] - mx);
        lt += e[D + 1] * f;
        o += e[d] * f;
      }
    }
    const int64_t t = tile.begin + r / group;
    const int64_t h = kvh * group + r % group;
    static_cast<T*>(a.out)[t * a.out_stride + h * D + d] = FromF<T>(lt > 0 ? o / lt : 0.0f);
  }
}

int RowsBucket(int64_t rows) { return rows <= 4 ? 4 : rows <= 8 ? 8 : 16; }

template <typename T, int D, int R>
cudaError_t LaunchWith(const PagedAttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.num_tiles), static_cast<unsigned>(a.num_kv_heads),
                  static_cast<unsigned>(a.num_partitions));
  if (cudaError_t e = LaunchPdl(PagedAttentionKernel<T, D, R>, grid, dim3(kThreads), stream, a);
      e != cudaSuccess) {
    return e;
  }
  if (a.num_partitions > 1) {
    const dim3 mgrid(static_cast<unsigned>(a.num_tiles), static_cast<unsigned>(a.num_kv_heads));
    return LaunchPdl(MergePartitionsKernel<T, D, R>, mgrid, dim3(kThreads), stream, a);
  }
  return cudaSuccess;
}

template <typename T, int D>
cudaError_t LaunchForRows(const PagedAttentionArgs& a, int64_t rows, cudaStream_t stream) {
  if constexpr (D * 16 <= 2048) {
    switch (RowsBucket(rows)) {
      case 4:
        return LaunchWith<T, D, 4>(a, stream);
      case 8:
        return LaunchWith<T, D, 8>(a, stream);
      default:
        return LaunchWith<T, D, 16>(a, stream);
    }
  } else {
    if (rows <= 4) return LaunchWith<T, D, 4>(a, stream);
    return LaunchWith<T, D, 8>(a, stream);
  }
}

}  // namespace

int64_t PagedAttentionMaxRows(int64_t head_dim) { return head_dim * 16 <= 2048 ? 16 : 8; }

int64_t PagedAttentionWorkspaceFloats(const PagedAttentionArgs& a) {
  if (a.num_partitions <= 1) return 0;
  const int64_t rows = a.tile_tokens * (a.num_heads / a.num_kv_heads);
  const int64_t r = RowsBucket(rows);
  return a.num_tiles * a.num_kv_heads * a.num_partitions * r * (a.head_dim + 2);
}

cudaError_t LaunchPagedAttention(const PagedAttentionArgs& a, cudaStream_t stream) {
  const int64_t rows = a.tile_tokens * (a.num_heads / a.num_kv_heads);
  return DispatchAct(a.act, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    switch (a.head_dim) {
      case 16:
        return LaunchForRows<T, 16>(a, rows, stream);
      case 32:
        return LaunchForRows<T, 32>(a, rows, stream);
      case 64:
        return LaunchForRows<T, 64>(a, rows, stream);
      case 128:
        return LaunchForRows<T, 128>(a, rows, stream);
      case 256:
        return LaunchForRows<T, 256>(a, rows, stream);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace strata::gpu
