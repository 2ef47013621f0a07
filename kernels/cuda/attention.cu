// Paged attention on the GPU (see PagedAttentionArgs in ops_kernel.h).
//
// One block of four warps serves one tile (consecutive query tokens of one sequence) for one KV
// head: the tile's query rows (tokens x the heads of the KV head's group) sit in shared memory,
// pre-scaled, and every key the block reads is used by all of them. The warps take turns over
// chunks of 32 keys (lane = key for Q.K, lane = output dims for P.V), each keeping an online
// softmax per row in the log2 domain; at the end the four warps' states merge in shared memory.
// With several partitions, each block covers one range of keys and writes its unnormalized state,
// and a second kernel merges the partitions.
//
// Decode steps (one query token per tile, a GQA group of at most 8) may instead take the decode
// kernel (PagedAttentionArgs::decode_kernel): lanes share each key, query and output slices stay
// in registers, a lane group loads several keys' rows before using any, and the partitions merge
// in the kernel itself.
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

// Row r's online-softmax states of the kWarps warps, merged at dim d: returns the unnormalized
// output and sets *lt to the row's sum of weights and *mx to its largest score (log2 domain).
template <int R, int D>
__device__ __forceinline__ float MergeWarps(const float (&m_s)[kWarps][R],
                                            const float (&l_s)[kWarps][R],
                                            const float (&acc_s)[kWarps][R][D], int r, int d,
                                            float* lt, float* mx) {
  float m = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m = fmaxf(m, m_s[w][r]);
  float l = 0.0f, o = 0.0f;
  if (m != -INFINITY) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(m_s[w][r] - m);
      l += l_s[w][r] * f;
      o += acc_s[w][r][d] * f;
    }
  }
  *lt = l;
  *mx = m;
  return o;
}

// Row r's states of `used` partitions, [used, R, D + 2] at `base` (D outputs, then m and l), merged
// at dim d into the normalized output. Reads through L2 (other blocks wrote them).
template <int R, int D>
__device__ __forceinline__ float MergePartitionStates(const float* base, int64_t used, int r,
                                                      int d) {
  float mx = -INFINITY;
  for (int64_t p = 0; p < used; ++p) mx = fmaxf(mx, __ldcg(base + (p * R + r) * (D + 2) + D));
  float lt = 0.0f, o = 0.0f;
  if (mx != -INFINITY) {
    for (int64_t p = 0; p < used; ++p) {
      const float* e = base + (p * R + r) * (D + 2);
      const float f = exp2f(__ldcg(e + D) - mx);
      lt += __ldcg(e + D + 1) * f;
      o += __ldcg(e + d) * f;
    }
  }
  return lt > 0 ? o / lt : 0.0f;
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
    float lt, mx;
    const float o = MergeWarps<R, D>(m_s, l_s, acc_s, r, d, &lt, &mx);
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
    const int64_t t = tile.begin + r / group;
    const int64_t h = kvh * group + r % group;
    static_cast<T*>(a.out)[t * a.out_stride + h * D + d] =
        FromF<T>(MergePartitionStates<R, D>(base, used, r, d));
  }
}

// The decode kernel's shape for T and D: each key's row is split over kLpk lanes, kEpl elements
// (whole 16-byte loads) each, so a warp takes kKpw keys at a time; every lane group loads kUnroll
// keys' K and V rows before using any.
template <typename T, int D, int R>
struct DecodeShape {
  static constexpr int kVec = kVec16<T>;
  static constexpr int kLpk = D / kVec < 32 ? D / kVec : 32;
  static constexpr int kEpl = D / kLpk;
  static constexpr int kLoads = kEpl / kVec;  // 16-byte loads per lane per row
  static constexpr int kKpw = 32 / kLpk;
  static constexpr int kUnroll = R <= 4 && sizeof(T) == 2 ? 8 : 4;
  static constexpr int kKeysPerRound = kWarps * kKpw * kUnroll;
};

// Block-table entries a decode block stages in shared memory at a time.
constexpr int kTableEntries = 256;

// Decode attention: one query token per block row (tiles null), R >= the GQA group. Lane
// (grp, sub) takes keys grp, grp + kKpw, ... of its warp's rounds and dims [sub * kEpl, +kEpl);
// every lane group keeps an online softmax per query row over its keys. The lane groups then merge
// by shuffles, the warps in shared memory, and with several partitions the last partition block
// of a (token, KV head) to finish merges all of them from the workspace (a counter per pair,
// reset by that block).
template <typename T, int D, int R>
__global__ void __launch_bounds__(kThreads) DecodeAttentionKernel(PagedAttentionArgs a) {
  PdlBegin();
  using S = DecodeShape<T, D, R>;
  __shared__ int32_t table_s[kTableEntries];
  __shared__ float m_s[kWarps][R], l_s[kWarps][R];
  __shared__ float acc_s[kWarps][R][D];
  __shared__ int last_s;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int grp = lane / S::kLpk, sub = lane % S::kLpk;
  const int64_t t = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z;
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);  // <= R
  const int64_t seq = a.token_seq[t];
  const int64_t pos = a.token_pos[t];
  const int64_t lo =
      a.sliding_window > 0 && pos - a.sliding_window + 1 > 0 ? pos - a.sliding_window + 1 : 0;
  int64_t k_begin = lo, k_end = pos + 1;
  int64_t used = 1;
  if (a.num_partitions > 1) {
    const Split sp = SplitKeys(k_begin, k_end, a);
    // A token with no keys (a negative position) still gets its zero output from partition 0.
    used = sp.used > 1 ? sp.used : 1;
    if (part >= used) return;  // no keys here; the merge counts only the used partitions
    k_begin += part * sp.keys;
    k_end = min(k_end, k_begin + sp.keys);
  }
  const int32_t* table = a.block_tables + seq * a.max_blocks_per_seq;

  // This lane's slice of the query rows, scaled into the log2 domain; rows past the group are 0.
  const float qscale = a.scale * kLog2e;
  float q[R][S::kEpl];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < group) {
      const T* qrow =
          static_cast<const T*>(a.q) + t * a.q_stride + (kvh * group + r) * D + sub * S::kEpl;
#pragma unroll
      for (int i = 0; i < S::kLoads; ++i) Load16(qrow + i * S::kVec, &q[r][i * S::kVec]);
#pragma unroll
      for (int e = 0; e < S::kEpl; ++e) q[r][e] *= qscale;
    } else {
#pragma unroll
      for (int e = 0; e < S::kEpl; ++e) q[r][e] = 0.0f;
    }
  }

  float m[R], l[R], acc[R][S::kEpl];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < S::kEpl; ++e) acc[r][e] = 0.0f;
  }

  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const int64_t bt = a.block_tokens;
  // Key ranges of at most (kTableEntries - 2) blocks, whose table entries are staged first.
  const int64_t span = (kTableEntries - 2) * bt;
  for (int64_t cb = k_begin; cb < k_end; cb += span) {
    const int64_t ce = min(k_end, cb + span);
    const int64_t first = cb / bt;
    const int64_t entries = (ce - 1) / bt - first + 1;
    __syncthreads();  // the previous range's entries are no longer read
    for (int64_t i = threadIdx.x; i < entries; i += kThreads) {
      const int64_t bi = first + i;
      int32_t block = bi < a.max_blocks_per_seq ? table[bi] : -1;
      if (block < 0 || block >= a.num_blocks) block = -1;
      table_s[i] = block;
    }
    __syncthreads();
    for (int64_t r0 = cb + warp * S::kKpw * S::kUnroll; r0 < ce; r0 += S::kKeysPerRound) {
      uint4 kr[S::kUnroll][S::kLoads], vr[S::kUnroll][S::kLoads];
      bool ok[S::kUnroll];
#pragma unroll
      for (int u = 0; u < S::kUnroll; ++u) {
        const int64_t key = r0 + u * S::kKpw + grp;
        const int32_t block = key < ce ? table_s[key / bt - first] : -1;
        ok[u] = block >= 0;
        if (ok[u]) {
          const int64_t off = ((block * bt + key % bt) * a.num_kv_heads + kvh) * D + sub * S::kEpl;
#pragma unroll
          for (int i = 0; i < S::kLoads; ++i) {
            kr[u][i] = *reinterpret_cast<const uint4*>(kc + off + i * S::kVec);
            vr[u][i] = *reinterpret_cast<const uint4*>(vc + off + i * S::kVec);
          }
        } else {
#pragma unroll
          for (int i = 0; i < S::kLoads; ++i) kr[u][i] = vr[u][i] = make_uint4(0, 0, 0, 0);
        }
      }
      // Scores of the round's keys (every lane of a group ends with the full dot products).
      float sc[S::kUnroll][R];
#pragma unroll
      for (int u = 0; u < S::kUnroll; ++u) {
        float kf[S::kEpl];
#pragma unroll
        for (int i = 0; i < S::kLoads; ++i) Unpack16<T>(kr[u][i], &kf[i * S::kVec]);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float d = 0.0f;
#pragma unroll
          for (int e = 0; e < S::kEpl; ++e) d = fmaf(q[r][e], kf[e], d);
#pragma unroll
          for (int o = S::kLpk / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
          sc[u][r] = ok[u] ? d : -INFINITY;
        }
      }
      // One rescale per round, then the round's keys' weights.
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float mx = m[r];
#pragma unroll
        for (int u = 0; u < S::kUnroll; ++u) mx = fmaxf(mx, sc[u][r]);
        const float alpha = mx == -INFINITY ? 1.0f : exp2f(m[r] - mx);
        l[r] *= alpha;
#pragma unroll
        for (int e = 0; e < S::kEpl; ++e) acc[r][e] *= alpha;
        m[r] = mx;
      }
#pragma unroll
      for (int u = 0; u < S::kUnroll; ++u) {
        float vf[S::kEpl];
#pragma unroll
        for (int i = 0; i < S::kLoads; ++i) Unpack16<T>(vr[u][i], &vf[i * S::kVec]);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float p = ok[u] ? exp2f(sc[u][r] - m[r]) : 0.0f;
          l[r] += p;
#pragma unroll
          for (int e = 0; e < S::kEpl; ++e) acc[r][e] = fmaf(p, vf[e], acc[r][e]);
        }
      }
    }
  }

  // Lane groups of a warp hold the same dims for different keys: merge them by shuffles.
#pragma unroll
  for (int o = S::kLpk; o < 32; o <<= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[r], o);
      const float lo_other = __shfl_xor_sync(0xffffffffu, l[r], o);
      const float mx = fmaxf(m[r], mo);
      const float fa = m[r] == -INFINITY ? 0.0f : exp2f(m[r] - mx);
      const float fb = mo == -INFINITY ? 0.0f : exp2f(mo - mx);
      l[r] = l[r] * fa + lo_other * fb;
#pragma unroll
      for (int e = 0; e < S::kEpl; ++e) {
        acc[r][e] = acc[r][e] * fa + __shfl_xor_sync(0xffffffffu, acc[r][e], o) * fb;
      }
      m[r] = mx;
    }
  }
  if (grp == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (sub == 0) {
        m_s[warp][r] = m[r];
        l_s[warp][r] = l[r];
      }
#pragma unroll
      for (int e = 0; e < S::kEpl; ++e) acc_s[warp][r][sub * S::kEpl + e] = acc[r][e];
    }
  }
  __syncthreads();

  // The warps merged: the output (one partition) or this partition's unnormalized state,
  // [token, kvh, part, R, D + 2] as the tiled kernel writes it.
  float* const ws_pair = a.workspace + (t * a.num_kv_heads + kvh) * a.num_partitions * R * (D + 2);
  for (int i = threadIdx.x; i < group * D; i += kThreads) {
    const int r = i / D, d = i % D;
    float lt, mx;
    const float o = MergeWarps<R, D>(m_s, l_s, acc_s, r, d, &lt, &mx);
    if (used > 1) {
      float* ws = ws_pair + (part * R + r) * (D + 2);
      ws[d] = o;
      if (d == 0) {
        ws[D] = mx;
        ws[D + 1] = lt;
      }
    } else {
      static_cast<T*>(a.out)[t * a.out_stride + (kvh * group + r) * D + d] =
          FromF<T>(lt > 0 ? o / lt : 0.0f);
    }
  }
  if (used <= 1) return;

  // Count this partition done; the last of the pair's `used` partitions merges them.
  __threadfence();  // this thread's workspace writes, before the count
  __syncthreads();
  uint32_t* counter = a.counters + t * a.num_kv_heads + kvh;
  if (threadIdx.x == 0) {
    __threadfence();  // release: the block's writes (ordered by the barrier) before the count
    const uint32_t done = atomicAdd(counter, 1u) + 1;
    __threadfence();  // acquire: the other partitions' writes after it
    last_s = done == static_cast<uint32_t>(used);
  }
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  for (int i = threadIdx.x; i < group * D; i += kThreads) {
    const int r = i / D, d = i % D;
    static_cast<T*>(a.out)[t * a.out_stride + (kvh * group + r) * D + d] =
        FromF<T>(MergePartitionStates<R, D>(ws_pair, used, r, d));
  }
  if (threadIdx.x == 0) *counter = 0;  // ready for the next launch
}

template <typename T, int D, int R>
cudaError_t LaunchDecode(const PagedAttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.num_tiles), static_cast<unsigned>(a.num_kv_heads),
                  static_cast<unsigned>(a.num_partitions));
  return LaunchPdl(DecodeAttentionKernel<T, D, R>, grid, dim3(kThreads), stream, a);
}

template <typename T, int D>
cudaError_t LaunchDecodeForGroup(const PagedAttentionArgs& a, int64_t group, cudaStream_t stream) {
  if (group <= 1) return LaunchDecode<T, D, 1>(a, stream);
  if (group <= 2) return LaunchDecode<T, D, 2>(a, stream);
  if (group <= 4) return LaunchDecode<T, D, 4>(a, stream);
  return LaunchDecode<T, D, 8>(a, stream);
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

// The decode kernel where the arguments allow it, else the tiled one.
template <typename T, int D>
cudaError_t LaunchForHeadDim(const PagedAttentionArgs& a, cudaStream_t stream) {
  const int64_t group = a.num_heads / a.num_kv_heads;
  if (PagedAttentionUsesDecodeKernel(a)) return LaunchDecodeForGroup<T, D>(a, group, stream);
  return LaunchForRows<T, D>(a, a.tile_tokens * group, stream);
}

}  // namespace

int64_t PagedAttentionMaxRows(int64_t head_dim) { return head_dim * 16 <= 2048 ? 16 : 8; }

int64_t PagedAttentionWorkspaceFloats(const PagedAttentionArgs& a) {
  if (a.num_partitions <= 1) return 0;
  const int64_t rows = a.tile_tokens * (a.num_heads / a.num_kv_heads);
  const int64_t r = RowsBucket(rows);
  return a.num_tiles * a.num_kv_heads * a.num_partitions * r * (a.head_dim + 2);
}

bool PagedAttentionUsesDecodeKernel(const PagedAttentionArgs& a) {
  return a.decode_kernel && a.tiles == nullptr && a.num_kv_heads > 0 &&
         a.num_heads / a.num_kv_heads <= 8;
}

cudaError_t LaunchPagedAttention(const PagedAttentionArgs& a, cudaStream_t stream) {
  return DispatchAct(a.act, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    switch (a.head_dim) {
      case 16:
        return LaunchForHeadDim<T, 16>(a, stream);
      case 32:
        return LaunchForHeadDim<T, 32>(a, stream);
      case 64:
        return LaunchForHeadDim<T, 64>(a, stream);
      case 128:
        return LaunchForHeadDim<T, 128>(a, stream);
      case 256:
        return LaunchForHeadDim<T, 256>(a, stream);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace strata::gpu
