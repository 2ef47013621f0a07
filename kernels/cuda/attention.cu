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
// in the kernel itself. Planned tiles in bf16 and f16 may take the tensor-core kernel
// (PagedAttentionArgs::mma_prefill): 64 query rows a block, 64 keys a step, wmma for Q.K and P.V,
// or, with PagedAttentionArgs::mma_sync, mma.sync with the scores and probabilities in registers.
#include <mma.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

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

// What a block of the tiled kernels serves: tile blockIdx.x for KV head blockIdx.y, partition
// blockIdx.z; its query rows (tokens x the group's heads, clamped to the R a block holds: the
// host plans tiles so) and its sequence's block table.
template <int R>
struct TileBlock {
  Tile tile;
  int64_t kvh, part, group;
  int rows;
  const int32_t* table;
};
template <int R>
__device__ __forceinline__ TileBlock<R> TileBlockOf(const PagedAttentionArgs& a) {
  TileBlock<R> b;
  b.tile = TileOf(a, blockIdx.x);
  b.kvh = blockIdx.y;
  b.part = blockIdx.z;
  b.group = a.num_heads / a.num_kv_heads;
  b.rows = static_cast<int>(b.tile.count * b.group < R ? b.tile.count * b.group : R);
  b.table = a.block_tables + int64_t{a.token_seq[b.tile.begin]} * a.max_blocks_per_seq;
  return b;
}

// The first key a query at `pos` sees (its sliding window's start, else 0).
__device__ __forceinline__ int64_t WindowStart(const PagedAttentionArgs& a, int64_t pos) {
  return a.sliding_window > 0 && pos - a.sliding_window + 1 > 0 ? pos - a.sliding_window + 1 : 0;
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

// Row r's result at dim d: with partitions, its unnormalized state into the workspace
// ([tile, kvh, part, R, D + 2]: the D outputs, then m and l); else the normalized output.
template <typename T, int D, int R>
__device__ __forceinline__ void WriteRowResult(const PagedAttentionArgs& a, const Tile& tile,
                                               int64_t kvh, int64_t part, int64_t group, int r,
                                               int d, float o, float mx, float lt) {
  if (a.num_partitions > 1) {
    float* ws =
        a.workspace +
        ((static_cast<int64_t>(blockIdx.x) * a.num_kv_heads + kvh) * a.num_partitions + part) * R *
            (D + 2) +
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
  const auto [tile, kvh, part, group, rows, table] = TileBlockOf<R>(a);

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
    const int64_t lo = WindowStart(a, pos);
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
    WriteRowResult<T, D, R>(a, tile, kvh, part, group, r, d, o, mx, lt);
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
    const int64_t lo = WindowStart(a, pos);
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
// Partitions whose merge weights the decode kernel's last block keeps in shared memory; with more,
// it merges each output from the workspace alone (MergePartitionStates).
constexpr int kMergeParts = 64;

// Decode attention: one query token per block row (tiles null), R >= the GQA group. Lane
// (grp, sub) takes keys grp, grp + kKpw, ... of its warp's rounds and dims [sub * kEpl, +kEpl);
// every lane group keeps an online softmax per query row over its keys. The lane groups then merge
// by shuffles, the warps in shared memory, and with several partitions the last partition block
// of a (token, KV head) to finish merges all of them from the workspace (a counter per pair,
// reset by that block).
//
// (Staging the block table before griddepcontrol.wait, so that the table's loads overlap the kernel
// before, took 1 µs off batch 1 alone on an H200 but spilled registers in the key loop and cost
// batch 64 4%: dropped, 2026-11-27.)
template <typename T, int D, int R>
__device__ __forceinline__ void DecodeAttention(const PagedAttentionArgs& a) {
  PdlBegin();
  using S = DecodeShape<T, D, R>;
  __shared__ int32_t table_s[kTableEntries];
  __shared__ float m_s[kWarps][R], l_s[kWarps][R];
  __shared__ float acc_s[kWarps][R][D];
  // The last block's merge: partition p's row-r maximum, then weight, and its sum.
  __shared__ float weight_s[kMergeParts][R], sum_s[kMergeParts][R];
  __shared__ int last_s;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int grp = lane / S::kLpk, sub = lane % S::kLpk;
  const int64_t t = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z;
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);  // <= R
  const int64_t seq = a.token_seq[t];
  const int64_t pos = a.token_pos[t];
  const int64_t lo = WindowStart(a, pos);
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
  const int64_t bt = a.block_tokens;
  // Key ranges of at most (kTableEntries - 2) blocks, whose table entries are staged first.
  const int64_t span = (kTableEntries - 2) * bt;
  auto stage = [&](int64_t cb, int64_t ce) {
    const int64_t first = cb / bt;
    const int64_t entries = (ce - 1) / bt - first + 1;
    for (int64_t i = threadIdx.x; i < entries; i += kThreads) {
      const int64_t bi = first + i;
      int32_t block = bi < a.max_blocks_per_seq ? table[bi] : -1;
      if (block < 0 || block >= a.num_blocks) block = -1;
      table_s[i] = block;
    }
  };

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
  for (int64_t cb = k_begin; cb < k_end; cb += span) {
    const int64_t ce = min(k_end, cb + span);
    const int64_t first = cb / bt;
    __syncthreads();  // the previous range's entries are no longer read
    stage(cb, ce);
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
  if (used <= kMergeParts) {
    // Each (partition, row)'s weight once, exp2(m_p - max m) / Σ l_p exp2(m_p - max m), in
    // shared memory; then every output is one pass of independent loads over the partitions.
    for (int i = threadIdx.x; i < used * group; i += kThreads) {
      const int p = i / group, r = i % group;
      weight_s[p][r] = __ldcg(ws_pair + (p * R + r) * (D + 2) + D);
      sum_s[p][r] = __ldcg(ws_pair + (p * R + r) * (D + 2) + D + 1);
    }
    __syncthreads();
    if (threadIdx.x < group) {
      const int r = threadIdx.x;
      float mx = -INFINITY;
      for (int p = 0; p < used; ++p) mx = fmaxf(mx, weight_s[p][r]);
      float lt = 0.0f;
      for (int p = 0; p < used; ++p) {
        const float f = mx == -INFINITY ? 0.0f : exp2f(weight_s[p][r] - mx);
        lt += sum_s[p][r] * f;
        weight_s[p][r] = f;
      }
      const float inv = lt > 0 ? 1.0f / lt : 0.0f;
      for (int p = 0; p < used; ++p) weight_s[p][r] *= inv;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * D; i += kThreads) {
      const int r = i / D, d = i % D;
      float o = 0.0f;
#pragma unroll 8
      for (int p = 0; p < used; ++p)
        o += __ldcg(ws_pair + (p * R + r) * (D + 2) + d) * weight_s[p][r];
      static_cast<T*>(a.out)[t * a.out_stride + (kvh * group + r) * D + d] = FromF<T>(o);
    }
  } else {
    for (int i = threadIdx.x; i < group * D; i += kThreads) {
      const int r = i / D, d = i % D;
      static_cast<T*>(a.out)[t * a.out_stride + (kvh * group + r) * D + d] =
          FromF<T>(MergePartitionStates<R, D>(ws_pair, used, r, d));
    }
  }
  if (threadIdx.x == 0) *counter = 0;  // ready for the next launch
}

template <typename T, int D, int R>
__global__ void __launch_bounds__(kThreads) DecodeAttentionKernel(PagedAttentionArgs a) {
  DecodeAttention<T, D, R>(a);
}

// The same built for one block an SM (PagedAttentionArgs::decode_one_block), so that ptxas may
// give a thread up to 255 registers: at head_dim 128 in 16 bits the kernel above is held to 168
// and spills in its key loop (12 bytes stored, 44 reloaded, sm_90); this one takes 229 and spills
// nothing. Batch 1 runs one block an SM anyway; larger batches lose the third block an SM.
template <typename T, int D, int R>
__global__ void __launch_bounds__(kThreads, 1) DecodeAttentionOneBlockKernel(PagedAttentionArgs a) {
  DecodeAttention<T, D, R>(a);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel for planned tiles (PagedAttentionArgs::mma_prefill).
//
// A block of four warps serves up to 64 query rows (a tile's tokens x the group's heads) for one
// KV head; warp w owns rows [16w, 16w + 16). Keys go 64 at a time through two shared-memory
// buffers that cp.async fills one step ahead. Per step each warp computes its 16 x 64 scores with
// wmma (K is read as a column-major B operand), turns them into
// probabilities in shared memory (two lanes per row, online softmax in the log2 domain, rounded
// to the activation type, the row sum taken over the rounded values), rescales its output
// accumulators and adds P.V. wmma leaves the accumulator's element-to-row mapping unspecified, so
// each warp reads it once from a fragment loaded with row numbers, and rescales element by element.

constexpr int kMmaRows = static_cast<int>(kPagedAttentionMmaRows);
constexpr int kMmaKeys = 64;

template <int D>
struct MmaLayout {
  static constexpr int kLdh = D + 8;         // 16-bit row pitch of the Q, K and V tiles
  static constexpr int kLds = kMmaKeys + 4;  // f32 row pitch of a warp's scores
  static constexpr int kLdp = kMmaKeys + 8;  // 16-bit row pitch of its probabilities (same bytes)
  static constexpr int kLdo = D + 4;         // f32 row pitch of the output (K and V's bytes)
  static constexpr size_t kTile = size_t{kMmaRows} * kLdh * 2;  // Q, or one K or V buffer
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + kTile;      // two buffers
  static constexpr size_t kV = kK + 2 * kTile;  // two buffers
  static constexpr size_t kS = kV + 2 * kTile;  // kWarps x [16][kLds] f32
  static constexpr size_t kSWarp = size_t{16} * kLds * 4;
  static constexpr size_t kBytes = kS + kWarps * kSWarp;
  static_assert(kTile % 128 == 0 && kSWarp % 128 == 0, "wmma pointers need 32-byte alignment");
  static_assert(size_t{kMmaRows} * kLdo * 4 <= 4 * kTile, "the output fits the K and V buffers");
  static_assert(size_t{16} * kLdp * 2 <= kSWarp, "probabilities fit the scores' bytes");
};

// 16 bytes from global `src` to shared `dst` without passing through registers; zeros instead
// when !valid (src is then not read).
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void CpAsyncCommit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The block-table entry this thread's key of the chunk at `chunk` lives in (thread 2j or 2j + 1
// takes key chunk + j; see LoadKvChunk), or -1 past k_end or the table. Read an iteration before
// LoadKvChunk needs it, so that the lookup's memory latency is not waited out before every copy.
__device__ __forceinline__ int32_t ChunkEntry(const PagedAttentionArgs& a, const int32_t* table,
                                              int64_t chunk, int64_t k_end) {
  const int64_t key = chunk + (threadIdx.x >> 1);
  if (key >= k_end) return -1;
  const int64_t bi = key / a.block_tokens;
  return bi < a.max_blocks_per_seq ? table[bi] : -1;
}

// Starts copying keys [chunk, chunk + 64) of KV head kvh into the K and V buffers (rows of keys
// past k_end or beyond the block table zeroed, so that no stale or poisoned value meets a zero
// probability) and marks which keys exist in valid_s. `entry`: ChunkEntry for this chunk.
template <typename T, int D>
__device__ __forceinline__ void LoadKvChunk(const PagedAttentionArgs& a, int32_t entry,
                                            int64_t chunk, int64_t kvh, T* k_s, T* v_s,
                                            int* valid_s) {
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  constexpr int kLdh = MmaLayout<D>::kLdh;
  static_assert(kThreads == 2 * kMmaKeys, "two threads per key");
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  // Threads 2j and 2j + 1 take key j's even and odd pieces: one block-table entry per thread,
  // and each pair reads 32 contiguous bytes at a time.
  const int j = threadIdx.x >> 1, h = threadIdx.x & 1;
  const int64_t key = chunk + j;
  const T* krow =
      entry >= 0 && entry < a.num_blocks
          ? kc + ((entry * a.block_tokens + key % a.block_tokens) * a.num_kv_heads + kvh) * D
          : nullptr;
  const int64_t row = krow != nullptr ? krow - kc : 0;
#pragma unroll
  for (int piece = h; piece < kPieces; piece += 2) {
    CpAsync16(k_s + j * kLdh + piece * 8, kc + row + piece * 8, krow != nullptr);
    CpAsync16(v_s + j * kLdh + piece * 8, vc + row + piece * 8, krow != nullptr);
  }
  if (h == 0) valid_s[j] = krow != nullptr;
}

// The tensor-core kernels' start: each row's key range [lo, pos] into pos_s and lo_s (rows past
// the tile see no key: pos -1), the query rows as stored (scaled later, in f32; zero past the
// tile) into q_s at MmaLayout<D>::kLdh, then the block's key range [*k_begin, *k_end), its
// partition's share. False when its partition is unused: the block returns whole (the merge reads
// only the used partitions).
template <typename T, int D>
__device__ __forceinline__ bool MmaTileStart(const PagedAttentionArgs& a,
                                             const TileBlock<kMmaRows>& b, T* q_s, int* pos_s,
                                             int* lo_s, int64_t* k_begin, int64_t* k_end) {
  constexpr int kLdh = MmaLayout<D>::kLdh;
  if (threadIdx.x < kMmaRows) {
    const int r = threadIdx.x;
    int64_t pos = -1, lo = 0;
    if (r < b.rows) {
      pos = a.token_pos[b.tile.begin + r / b.group];
      lo = WindowStart(a, pos);
    }
    pos_s[r] = static_cast<int>(pos);
    lo_s[r] = static_cast<int>(lo);
  }
  for (int i = threadIdx.x; i < kMmaRows * (D / 8); i += kThreads) {
    const int r = i / (D / 8), piece = i % (D / 8);
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < b.rows) {
      const int64_t t = b.tile.begin + r / b.group;
      const int64_t h = b.kvh * b.group + r % b.group;
      v = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.q) + t * a.q_stride + h * D +
                                          piece * 8);
    }
    *reinterpret_cast<uint4*>(q_s + r * kLdh + piece * 8) = v;
  }
  __syncthreads();
  int64_t lo = INT64_MAX, hi = 0;
  for (int r = 0; r < b.rows; ++r) {
    lo = min(lo, static_cast<int64_t>(lo_s[r]));
    hi = max(hi, static_cast<int64_t>(pos_s[r]) + 1);
  }
  if (a.num_partitions > 1) {
    const Split sp = SplitKeys(lo, hi, a);
    if (b.part >= sp.used) return false;
    lo += b.part * sp.keys;
    hi = min(hi, lo + sp.keys);
  }
  *k_begin = lo;
  *k_end = hi;
  return true;
}

// Walks keys [k_begin, k_end) of KV head kvh 64 at a time through the two K and V buffers
// (k_s, v_s: two chunks of MmaLayout<D>::kLdh-pitched rows each), cp.async filling the next chunk
// while one is used: body(buf, chunk) runs, between barriers, with keys [chunk, chunk + 64) in
// buffer buf and valid_s[buf] marking which of them exist. Leaves no copy in flight.
template <typename T, int D, typename Body>
__device__ __forceinline__ void ForEachKvChunk(const PagedAttentionArgs& a, const int32_t* table,
                                               int64_t kvh, int64_t k_begin, int64_t k_end, T* k_s,
                                               T* v_s, int (*valid_s)[kMmaKeys], Body&& body) {
  constexpr int kLdh = MmaLayout<D>::kLdh;
  const int64_t chunks = k_end > k_begin ? (k_end - k_begin + kMmaKeys - 1) / kMmaKeys : 0;
  if (chunks > 0) {
    LoadKvChunk<T, D>(a, ChunkEntry(a, table, k_begin, k_end), k_begin, kvh, k_s, v_s, valid_s[0]);
  }
  // The next chunk's block-table entry, read a chunk ahead.
  int32_t ahead = chunks > 1 ? ChunkEntry(a, table, k_begin + kMmaKeys, k_end) : -1;
  CpAsyncCommit();
  for (int64_t c = 0; c < chunks; ++c) {
    const int buf = static_cast<int>(c & 1);
    const int64_t chunk = k_begin + c * kMmaKeys;
    if (c + 1 < chunks) {
      LoadKvChunk<T, D>(a, ahead, chunk + kMmaKeys, kvh, k_s + (buf ^ 1) * kMmaKeys * kLdh,
                        v_s + (buf ^ 1) * kMmaKeys * kLdh, valid_s[buf ^ 1]);
      // The chunk after's entry: its load is waited for only at the next iteration's copy.
      ahead = c + 2 < chunks ? ChunkEntry(a, table, chunk + 2 * kMmaKeys, k_end) : -1;
    }
    CpAsyncCommit();
    CpAsyncWait<1>();  // this chunk's copies (the next one's may still fly)
    __syncthreads();   // everyone's
    body(buf, chunk);
    __syncthreads();  // this buffer is free for the copy two chunks on
  }
  CpAsyncWait<0>();
}

// The tensor-core kernels' end, once every warp has put its rows' unnormalized outputs in o_s
// (pitch Ldo), their largest scores in m_fin and their sums in l_fin: the tile's rows written
// out (see WriteRowResult).
template <typename T, int D, int Ldo>
__device__ __forceinline__ void WriteMmaTile(const PagedAttentionArgs& a,
                                             const TileBlock<kMmaRows>& b, const float* o_s,
                                             const float* m_fin, const float* l_fin) {
  __syncthreads();
  for (int i = threadIdx.x; i < b.rows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    WriteRowResult<T, D, kMmaRows>(a, b.tile, b.kvh, b.part, b.group, r, d, o_s[r * Ldo + d],
                                   m_fin[r], l_fin[r]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) PrefillMmaKernel(PagedAttentionArgs a) {
  PdlBegin();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using L = MmaLayout<D>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragKt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragV = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  constexpr int kLdh = L::kLdh;
  constexpr int kFrags = D / 16;
  constexpr int kElems = Acc::num_elements;
  constexpr unsigned kAll = 0xffffffffu;

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int pos_s[kMmaRows], lo_s[kMmaRows];
  __shared__ int valid_s[2][kMmaKeys];
  __shared__ float alpha_s[kWarps][16];
  __shared__ float m_fin[kMmaRows], l_fin[kMmaRows];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  T* q_s = reinterpret_cast<T*>(smem + L::kQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kK);
  T* v_s = reinterpret_cast<T*>(smem + L::kV);
  float* s_w = reinterpret_cast<float*>(smem + L::kS + warp * L::kSWarp);
  T* p_w = reinterpret_cast<T*>(s_w);

  const TileBlock<kMmaRows> blk = TileBlockOf<kMmaRows>(a);
  const int64_t kvh = blk.kvh;
  const int rows = blk.rows;
  const int32_t* table = blk.table;

  int64_t k_begin = 0, k_end = 0;
  if (!MmaTileStart<T, D>(a, blk, q_s, pos_s, lo_s, &k_begin, &k_end)) return;

  // Which of the warp's 16 rows each accumulator element holds: load a matrix of row numbers.
  int row_of[kElems];
  for (int i = lane; i < 16 * 16; i += 32) s_w[(i / 16) * L::kLds + i % 16] = i / 16;
  __syncwarp();
  {
    Acc probe;
    wmma::load_matrix_sync(probe, s_w, L::kLds, wmma::mem_row_major);
#pragma unroll
    for (int i = 0; i < kElems; ++i) row_of[i] = static_cast<int>(probe.x[i]);
  }
  __syncwarp();
  Acc of[kFrags];
#pragma unroll
  for (int f = 0; f < kFrags; ++f) wmma::fill_fragment(of[f], 0.0f);

  const bool active = warp * 16 < rows;  // a warp whose rows are all past the tile only loads
  const int my_row = lane >> 1, half = lane & 1;
  const int row_pos = pos_s[warp * 16 + my_row], row_lo = lo_s[warp * 16 + my_row];
  const float qscale = a.scale * kLog2e;
  float m_run = -INFINITY, l_run = 0.0f;  // l_run: this lane's half of the row sum
  ForEachKvChunk<T, D>(
      a, table, kvh, k_begin, k_end, k_s, v_s, valid_s, [&](int buf, int64_t chunk) {
        if (!active) return;  // a warp whose rows are all past the tile only loads
        const T* kb = k_s + buf * kMmaKeys * kLdh;
        const T* vb = v_s + buf * kMmaKeys * kLdh;
        // Scores of the warp's 16 rows against the 64 keys, a slice of head_dim at a time (the
        // query's fragments come from shared memory: registers go to the output and the scores).
        Acc sf[kMmaKeys / 16];
#pragma unroll
        for (int n = 0; n < kMmaKeys / 16; ++n) wmma::fill_fragment(sf[n], 0.0f);
#pragma unroll
        for (int f = 0; f < kFrags; ++f) {
          FragA qf;
          wmma::load_matrix_sync(qf, q_s + warp * 16 * kLdh + f * 16, kLdh);
#pragma unroll
          for (int n = 0; n < kMmaKeys / 16; ++n) {
            FragKt kf;
            wmma::load_matrix_sync(kf, kb + n * 16 * kLdh + f * 16, kLdh);
            wmma::mma_sync(sf[n], qf, kf, sf[n]);
          }
        }
#pragma unroll
        for (int n = 0; n < kMmaKeys / 16; ++n) {
          wmma::store_matrix_sync(s_w + n * 16, sf[n], L::kLds, wmma::mem_row_major);
        }
        __syncwarp();
        // Online softmax: lanes 2r and 2r + 1 take row r's even and odd keys.
        float sv[kMmaKeys / 2];
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < kMmaKeys / 2; ++j) {
          const int col = 2 * j + half;
          const int64_t key = chunk + col;
          const bool ok = key < k_end && key <= row_pos && key >= row_lo && valid_s[buf][col] != 0;
          sv[j] = ok ? s_w[my_row * L::kLds + col] * qscale : -INFINITY;
          mx = fmaxf(mx, sv[j]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(kAll, mx, 1));
        const float mn = fmaxf(m_run, mx);
        const float alpha = mn == -INFINITY ? 1.0f : exp2f(m_run - mn);
        __syncwarp();  // every score read before the probabilities overwrite them
        float ls = 0.0f;
#pragma unroll
        for (int j = 0; j < kMmaKeys / 2; ++j) {
          const T pt = FromF<T>(sv[j] == -INFINITY ? 0.0f : exp2f(sv[j] - mn));
          p_w[my_row * L::kLdp + 2 * j + half] = pt;
          ls += ToF(pt);
        }
        l_run = l_run * alpha + ls;
        m_run = mn;
        if (half == 0) alpha_s[warp][my_row] = alpha;
        __syncwarp();
        float al[kElems];
#pragma unroll
        for (int i = 0; i < kElems; ++i) al[i] = alpha_s[warp][row_of[i]];
#pragma unroll
        for (int f = 0; f < kFrags; ++f) {
#pragma unroll
          for (int i = 0; i < kElems; ++i) of[f].x[i] *= al[i];
        }
    // O += P.V
#pragma unroll
        for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
          FragA pf;
          wmma::load_matrix_sync(pf, p_w + kk * 16, L::kLdp);
#pragma unroll
          for (int f = 0; f < kFrags; ++f) {
            FragV vf;
            wmma::load_matrix_sync(vf, vb + kk * 16 * kLdh + f * 16, kLdh);
            wmma::mma_sync(of[f], pf, vf, of[f]);
          }
        }
      });

  const float l_row = l_run + __shfl_xor_sync(kAll, l_run, 1);
  if (half == 0) {
    m_fin[warp * 16 + my_row] = m_run;
    l_fin[warp * 16 + my_row] = l_row;
  }
  __syncthreads();  // the K and V buffers are free (no copy in flight), m_fin and l_fin written
  float* o_s = reinterpret_cast<float*>(smem + L::kK);  // [kMmaRows][kLdo]
  if (active) {
#pragma unroll
    for (int f = 0; f < kFrags; ++f) {
      wmma::store_matrix_sync(o_s + warp * 16 * L::kLdo + f * 16, of[f], L::kLdo,
                              wmma::mem_row_major);
    }
  }
  WriteMmaTile<T, D, L::kLdo>(a, blk, o_s, m_fin, l_fin);
#endif
}

// ---------------------------------------------------------------------------------------------
// The same tiles through mma.sync (PagedAttentionArgs::mma_sync), scores and probabilities kept in
// registers. The tile, the key chunks, their cp.async pipeline, the masks, the rounding of the
// probabilities and the output's epilogue are the wmma kernel's; what differs is where the
// intermediate values live. With m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"),
// lane l of a warp holds, for g = l / 4 and c = 2 * (l % 4):
// clang-format off
//   A (16 x 16, row-major): a0 = (g, c..c+1), a1 = (g+8, c..c+1), a2 = (g, c+8..), a3 = (g+8, c+8..)
//   B (16 x 8, "col"):      b0 = (k = c..c+1, n = g), b1 = (k = c+8..c+9, n = g)
//   C (16 x 8, f32):        c0, c1 = (g, c..c+1), c2, c3 = (g+8, c..c+1)
// clang-format on
// so each lane's scores sit in two rows (g and g + 8 of the warp's 16), the four lanes of a
// quad share a row's reductions, and two neighbouring 8-key tiles of scores, rounded and packed,
// are exactly the A fragment of the probabilities for P.V: no shared-memory round trip, no
// row-number probe. Q's fragments are loaded once (ldmatrix) and stay in registers; K is read
// with ldmatrix (its rows are B's columns) and V with ldmatrix.trans.

template <int D>
struct MmaSyncLayout {
  // 16-bit row pitch, 16 bytes past D: the 8 rows of an ldmatrix phase hit 8 bank groups.
  static constexpr int kLdh = MmaLayout<D>::kLdh;
  // f32 output pitch: the float2 stores of a half-warp (4 rows) hit 32 banks.
  static constexpr int kLdo = D + 8;
  static constexpr size_t kTile = MmaLayout<D>::kTile;
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + kTile;      // two buffers
  static constexpr size_t kV = kK + 2 * kTile;  // two buffers
  static constexpr size_t kBytes = kV + 2 * kTile;
  static_assert(size_t{kMmaRows} * kLdo * 4 <= 4 * kTile, "the output fits the K and V buffers");
};

__device__ __forceinline__ unsigned SharedAddress(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8 x 8 matrices of 16-bit elements from shared memory: lane l gives the address of row
// l % 8 of matrix l / 8 and receives, in r[i], its two elements of matrix i (row l / 4, columns
// 2 (l % 4) and the next; transposed with Trans: rows 2 (l % 4) and the next, column l / 4).
template <bool Trans>
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(SharedAddress(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(SharedAddress(row)));
  }
#endif
}

// d += a.b for one m16n8k16 tile, 16-bit inputs of type T, f32 accumulators.
template <typename T>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __half>, "16-bit activations only");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Two values as T in one register, `lo` in the low half (the lower column of a fragment pair).
template <typename T>
__device__ __forceinline__ uint32_t Pack2(T lo, T hi) {
  uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) PrefillMmaSyncKernel(PagedAttentionArgs a) {
  PdlBegin();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = MmaSyncLayout<D>;
  constexpr int kLdh = L::kLdh;
  constexpr int kKSteps = D / 16;        // k16 steps of Q.K over head_dim
  constexpr int kSTiles = kMmaKeys / 8;  // n8 tiles of scores: 8 keys each
  constexpr int kOTiles = D / 8;         // n8 tiles of the output: 8 dims each
  constexpr unsigned kAll = 0xffffffffu;

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int pos_s[kMmaRows], lo_s[kMmaRows];
  __shared__ int valid_s[2][kMmaKeys];
  __shared__ float m_fin[kMmaRows], l_fin[kMmaRows];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c2 = 2 * (lane & 3);  // fragment row and column pair (see above)
  T* q_s = reinterpret_cast<T*>(smem + L::kQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kK);
  T* v_s = reinterpret_cast<T*>(smem + L::kV);

  const TileBlock<kMmaRows> blk = TileBlockOf<kMmaRows>(a);
  const int64_t kvh = blk.kvh;
  const int rows = blk.rows;
  const int32_t* table = blk.table;

  int64_t k_begin = 0, k_end = 0;
  if (!MmaTileStart<T, D>(a, blk, q_s, pos_s, lo_s, &k_begin, &k_end)) return;

  // The warp's query fragments: matrix i of each ldmatrix is rows 8 (i % 2) on, columns 8 (i / 2)
  // on, of the 16 x 16 slice: a0..a3 in order.
  uint32_t qf[kKSteps][4];
  {
    const T* qrow = q_s + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLdh + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) LdMatrixX4<false>(qf[kk], qrow + kk * 16);
  }
  float of[kOTiles][4];
#pragma unroll
  for (int n = 0; n < kOTiles; ++n) of[n][0] = of[n][1] = of[n][2] = of[n][3] = 0.0f;

  const bool active = warp * 16 < rows;  // a warp whose rows are all past the tile only loads
  // This lane's two rows: g and g + 8 of the warp's 16 ([0] and [1] below).
  const int pos0 = pos_s[warp * 16 + g], lo0 = lo_s[warp * 16 + g];
  const int pos1 = pos_s[warp * 16 + g + 8], lo1 = lo_s[warp * 16 + g + 8];
  const float qscale = a.scale * kLog2e;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.0f, 0.0f};  // this lane's part of each row's sum (its 2 of every 8 keys)
  ForEachKvChunk<T, D>(
      a, table, kvh, k_begin, k_end, k_s, v_s, valid_s, [&](int buf, int64_t chunk) {
        if (!active) return;  // a warp whose rows are all past the tile only loads
        const T* kb = k_s + buf * kMmaKeys * kLdh;
        const T* vb = v_s + buf * kMmaKeys * kLdh;
        // Scores: 16 rows x 64 keys. One ldmatrix gives two 8-key tiles' B fragments for a k16
        // step: matrices 0 and 1 are keys 16p..16p+7 at dims 16kk and 16kk+8 (b0, b1 of tile 2p),
        // 2 and 3 the next 8 keys (tile 2p + 1).
        float sf[kSTiles][4];
#pragma unroll
        for (int n = 0; n < kSTiles; ++n) sf[n][0] = sf[n][1] = sf[n][2] = sf[n][3] = 0.0f;
        const T* krow = kb + ((lane & 7) + (lane >> 4) * 8) * kLdh + ((lane >> 3) & 1) * 8;
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
          for (int p = 0; p < kSTiles / 2; ++p) {
            uint32_t kf[4];
            LdMatrixX4<false>(kf, krow + p * 16 * kLdh + kk * 16);
            Mma16816<T>(sf[2 * p], qf[kk], kf[0], kf[1]);
            Mma16816<T>(sf[2 * p + 1], qf[kk], kf[2], kf[3]);
          }
        }
        // Online softmax in the log2 domain, each row's max over its quad.
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = n * 8 + c2 + (e & 1);
            const int64_t key = chunk + col;
            const int row_pos = e < 2 ? pos0 : pos1, row_lo = e < 2 ? lo0 : lo1;
            const bool ok =
                key < k_end && key <= row_pos && key >= row_lo && valid_s[buf][col] != 0;
            sf[n][e] = ok ? sf[n][e] * qscale : -INFINITY;
            mx[e >> 1] = fmaxf(mx[e >> 1], sf[n][e]);
          }
        }
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          mx[h] = fmaxf(mx[h], __shfl_xor_sync(kAll, mx[h], 1));
          mx[h] = fmaxf(mx[h], __shfl_xor_sync(kAll, mx[h], 2));
          const float mn = fmaxf(m_run[h], mx[h]);
          alpha[h] = mn == -INFINITY ? 1.0f : exp2f(m_run[h] - mn);
          m_run[h] = mn;
        }
        // Probabilities rounded to T (the row sum over the rounded values, as the other kernels),
        // packed straight into P's A fragments: key tiles 2kk and 2kk + 1 make k16 step kk.
        uint32_t pf[kSTiles / 2][4];
        float ls[2] = {0.0f, 0.0f};
#pragma unroll
        for (int n = 0; n < kSTiles; ++n) {
          T pt[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float s = sf[n][e];
            pt[e] = FromF<T>(s == -INFINITY ? 0.0f : exp2f(s - m_run[e >> 1]));
            ls[e >> 1] += ToF(pt[e]);
          }
          pf[n / 2][(n & 1) * 2] = Pack2(pt[0], pt[1]);
          pf[n / 2][(n & 1) * 2 + 1] = Pack2(pt[2], pt[3]);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + ls[h];
#pragma unroll
        for (int n = 0; n < kOTiles; ++n) {
          of[n][0] *= alpha[0];
          of[n][1] *= alpha[0];
          of[n][2] *= alpha[1];
          of[n][3] *= alpha[1];
        }
        // O += P.V. One ldmatrix.trans gives two 8-dim tiles' B fragments for a k16 step of keys:
        // matrices 0 and 1 are keys 16kk..+7 and 16kk+8..+15 at dims 16d..+7 (b0, b1 of tile 2d),
        // 2 and 3 the same keys at the next 8 dims (tile 2d + 1).
        const T* vrow = vb + ((lane & 7) + ((lane >> 3) & 1) * 8) * kLdh + (lane >> 4) * 8;
#pragma unroll
        for (int kk = 0; kk < kSTiles / 2; ++kk) {
#pragma unroll
          for (int d = 0; d < kOTiles / 2; ++d) {
            uint32_t vf[4];
            LdMatrixX4<true>(vf, vrow + kk * 16 * kLdh + d * 16);
            Mma16816<T>(of[2 * d], pf[kk], vf[0], vf[1]);
            Mma16816<T>(of[2 * d + 1], pf[kk], vf[2], vf[3]);
          }
        }
      });

  // Each row's sum over its quad; lane 4g writes rows g and g + 8.
  float l_row[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_row[h] = l_run[h] + __shfl_xor_sync(kAll, l_run[h], 1);
    l_row[h] += __shfl_xor_sync(kAll, l_row[h], 2);
  }
  if ((lane & 3) == 0) {
    m_fin[warp * 16 + g] = m_run[0];
    l_fin[warp * 16 + g] = l_row[0];
    m_fin[warp * 16 + g + 8] = m_run[1];
    l_fin[warp * 16 + g + 8] = l_row[1];
  }
  __syncthreads();  // the K and V buffers are free (no copy in flight), m_fin and l_fin written
  float* o_s = reinterpret_cast<float*>(smem + L::kK);  // [kMmaRows][kLdo]
  if (active) {
    float* r0 = o_s + (warp * 16 + g) * L::kLdo + c2;
    float* r1 = r0 + 8 * L::kLdo;
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
      *reinterpret_cast<float2*>(r0 + n * 8) = make_float2(of[n][0], of[n][1]);
      *reinterpret_cast<float2*>(r1 + n * 8) = make_float2(of[n][2], of[n][3]);
    }
  }
  WriteMmaTile<T, D, L::kLdo>(a, blk, o_s, m_fin, l_fin);
#endif
}

// `kernel` over (tiles, KV heads, partitions) with `smem` bytes of dynamic shared memory, then,
// with several partitions, the merge of their states (R rows per tile).
template <typename T, int D, int R>
cudaError_t LaunchAndMerge(void (*kernel)(PagedAttentionArgs), size_t smem,
                           const PagedAttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.num_tiles), static_cast<unsigned>(a.num_kv_heads),
                  static_cast<unsigned>(a.num_partitions));
  if (cudaError_t e = LaunchPdlSmem(kernel, grid, dim3(kThreads), smem, stream, a);
      e != cudaSuccess) {
    return e;
  }
  if (a.num_partitions > 1) {
    const dim3 mgrid(static_cast<unsigned>(a.num_tiles), static_cast<unsigned>(a.num_kv_heads));
    return LaunchPdl(MergePartitionsKernel<T, D, R>, mgrid, dim3(kThreads), stream, a);
  }
  return cudaSuccess;
}

// A tensor-core kernel (`bytes` of dynamic shared memory) over the tiles, then the merge of its
// partitions. Its attributes are raised once per device (every layer of every prefill step
// launches it; `raised_on`, the kernel's own record); a failure is not remembered, so the next
// launch tries again.
template <typename T, int D>
cudaError_t LaunchMmaKernel(void (*kernel)(PagedAttentionArgs), size_t bytes,
                            std::atomic<int>* raised_on, const PagedAttentionArgs& a,
                            cudaStream_t stream) {
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (raised_on->load(std::memory_order_relaxed) != device) {
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(bytes));
        e != cudaSuccess) {
      return e;
    }
    // All of L1 as shared memory, so that two blocks fit an SM (a hint; the driver may otherwise
    // pick a split with room for one, halving the warps that hide latency). A hint refused is not
    // an error: the launch goes on without it.
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared) != cudaSuccess) {
      (void)cudaGetLastError();
    }
    raised_on->store(device, std::memory_order_relaxed);
  }
  return LaunchAndMerge<T, D, kMmaRows>(kernel, bytes, a, stream);
}

template <typename T, int D>
cudaError_t LaunchMma(const PagedAttentionArgs& a, cudaStream_t stream) {
  static std::atomic<int> raised_on{-1};
  return LaunchMmaKernel<T, D>(PrefillMmaKernel<T, D>, MmaLayout<D>::kBytes, &raised_on, a, stream);
}

template <typename T, int D>
cudaError_t LaunchMmaSync(const PagedAttentionArgs& a, cudaStream_t stream) {
  static std::atomic<int> raised_on{-1};
  return LaunchMmaKernel<T, D>(PrefillMmaSyncKernel<T, D>, MmaSyncLayout<D>::kBytes, &raised_on, a,
                               stream);
}

template <typename T, int D, int R>
cudaError_t LaunchDecode(const PagedAttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.num_tiles), static_cast<unsigned>(a.num_kv_heads),
                  static_cast<unsigned>(a.num_partitions));
  // The one-block build only where the other spills (16-bit head_dim 128), to keep the build short.
  if constexpr (sizeof(T) == 2 && D == 128) {
    if (a.decode_one_block) {
      return LaunchPdl(DecodeAttentionOneBlockKernel<T, D, R>, grid, dim3(kThreads), stream, a);
    }
  }
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
  return LaunchAndMerge<T, D, R>(PagedAttentionKernel<T, D, R>, 0, a, stream);
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
  if constexpr (sizeof(T) == 2 && D <= 128) {
    if (PagedAttentionUsesMmaKernel(a)) {
      return a.mma_sync ? LaunchMmaSync<T, D>(a, stream) : LaunchMma<T, D>(a, stream);
    }
  }
  // Tiles planned for the tensor-core kernel must not reach a kernel that holds fewer rows.
  if (a.tiles != nullptr && a.tile_tokens * group > PagedAttentionMaxRows(D)) {
    return cudaErrorInvalidValue;
  }
  return LaunchForRows<T, D>(a, a.tile_tokens * group, stream);
}

}  // namespace

int64_t PagedAttentionMaxRows(int64_t head_dim) { return head_dim * 16 <= 2048 ? 16 : 8; }

int64_t PagedAttentionWorkspaceFloats(const PagedAttentionArgs& a) {
  if (a.num_partitions <= 1) return 0;
  const int64_t rows = a.tile_tokens * (a.num_heads / a.num_kv_heads);
  const int64_t r = PagedAttentionUsesMmaKernel(a) ? kPagedAttentionMmaRows : RowsBucket(rows);
  return a.num_tiles * a.num_kv_heads * a.num_partitions * r * (a.head_dim + 2);
}

bool PagedAttentionUsesDecodeKernel(const PagedAttentionArgs& a) {
  return a.decode_kernel && a.tiles == nullptr && a.num_kv_heads > 0 &&
         a.num_heads / a.num_kv_heads <= 8;
}

int64_t PagedAttentionMmaSharedBytes(int64_t head_dim) {
  // The dynamic layout plus the kernel's static arrays (pos, lo, valid, alpha, m, l).
  constexpr int64_t kStatic = 4 * (2 * kMmaRows + 2 * kMmaKeys + kWarps * 16 + 2 * kMmaRows);
  switch (head_dim) {
    case 16:
      return MmaLayout<16>::kBytes + kStatic;
    case 32:
      return MmaLayout<32>::kBytes + kStatic;
    case 64:
      return MmaLayout<64>::kBytes + kStatic;
    case 128:
      return MmaLayout<128>::kBytes + kStatic;
    default:
      return 0;
  }
}

bool PagedAttentionMmaSupported(ActType act, int64_t head_dim, int64_t group) {
  return act != ActType::kF32 &&
         (head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128) && group >= 1 &&
         group <= kPagedAttentionMmaRows;
}

bool PagedAttentionUsesMmaKernel(const PagedAttentionArgs& a) {
  if (!a.mma_prefill || a.tiles == nullptr || a.num_kv_heads <= 0) return false;
  const int64_t group = a.num_heads / a.num_kv_heads;
  return PagedAttentionMmaSupported(a.act, a.head_dim, group) &&
         a.tile_tokens * group <= kPagedAttentionMmaRows && a.q_stride % 8 == 0 &&
         reinterpret_cast<uintptr_t>(a.q) % 16 == 0;
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
