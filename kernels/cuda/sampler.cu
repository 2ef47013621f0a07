// Seeded sampling on the GPU (SampleArgs in ops_kernel.h), step for step the CPU sampler's
// arithmetic (worker/engine/sampler.cc): penalties and temperature with the same IEEE float
// operations (no contraction into FMAs), log-sum-exp and candidate probabilities in double. Rows
// whose draw depends on the candidates' order (top-k below the vocabulary, top-p below 1) order
// them by a stable segmented radix sort on (logit descending), which keeps equal logits in
// ascending id order as the CPU's comparison does; the others draw by an exponential race
// (DrawsByRace in sample_row.h) within the first kernel, with no sort: the ratios p_i / E_i are the
// CPU's to the last bit or two of exp and log, so only a near-tie (about 1e-16 apart) could pick
// another token. Sums over the candidates are parallel, so they round differently from the CPU's
// sequential ones in the last bits; a walk's draw would have to land within about 1e-16 of a
// boundary to pick another token.
#include <cfloat>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "kernels/cuda/cuda_types.cuh"
#include "kernels/cuda/ops_kernel.h"

namespace strata::gpu {
namespace {

constexpr int kThreads = 1024;

size_t Align(size_t n) { return (n + 255) / 256 * 256; }

struct Layout {
  size_t keys_in, keys_out, vals_in, vals_out, offsets, ends, lse, finite, cum, temp, temp_bytes,
      total;
  // Rows split over blocks (SampleArgs::split_rows): each (row, chunk)'s partial results.
  size_t pmax, pbest, pfinite, psum, pratio, pid;
};

// A split row's chunks: kSplitChunk logits each, one block apiece.
constexpr int64_t kSplitChunk = 8192;
int64_t SplitChunks(int64_t vocab) { return (vocab + kSplitChunk - 1) / kSplitChunk; }
__device__ __forceinline__ int64_t ChunkEnd(int64_t begin, int64_t vocab) {
  return begin + kSplitChunk < vocab ? begin + kSplitChunk : vocab;
}

// The per-row values and the split rows' per-chunk partials (32 bytes a chunk of 8192 logits)
// first; then, only where some row sorts (`sorted`), the sort's keys, values, prefix sums and cub's
// scratch: about 24 bytes a logit, which races and greedy rows never touch.
Layout LayoutFor(int64_t rows, int64_t vocab, bool sorted) {
  Layout l{};
  const size_t n = static_cast<size_t>(rows * vocab);
  size_t at = 0;
  // Each region at the next 256-byte boundary.
  auto take = [&at](size_t bytes) {
    const size_t offset = at;
    at += Align(bytes);
    return offset;
  };
  l.offsets = take(4 * rows);
  l.ends = take(4 * rows);
  l.lse = take(8 * rows);
  l.finite = take(4 * rows);
  const size_t parts = static_cast<size_t>(rows * SplitChunks(vocab));
  l.pmax = take(4 * parts);
  l.pbest = take(4 * parts);
  l.pfinite = take(4 * parts);
  l.psum = take(8 * parts);
  l.pratio = take(8 * parts);
  l.pid = take(4 * parts);
  if (sorted) {
    l.keys_in = take(4 * n);
    l.keys_out = take(4 * n);
    l.vals_in = take(4 * n);
    l.vals_out = take(4 * n);
    l.cum = take(8 * n);
    size_t temp = 0;
    (void)cub::DeviceSegmentedRadixSort::SortPairsDescending(
        nullptr, temp, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
        static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), static_cast<int>(n),
        static_cast<int>(rows), static_cast<const int*>(nullptr), static_cast<const int*>(nullptr));
    l.temp_bytes = temp;
    l.temp = take(temp);
  }
  l.total = at;
  return l;
}

// A race's best ratio p_i / E_i so far and its id.
struct Race {
  double ratio;
  int id;
};
struct RaceBetter {
  __device__ Race operator()(const Race& x, const Race& y) const {
    return x.ratio > y.ratio || (x.ratio == y.ratio && x.id < y.id) ? x : y;
  }
};

// A row's results once its logits are processed and reduced (one thread): the log-sum-exp and the
// count of finite logits for the sort's kernel after, the row's segment bounds (empty for rows
// that do not sort), and for those that do not, the token and its log-probability: greedy, the
// first maximum; a race, its winner, or token 0 with no finite logit, as on the CPU.
__device__ void FinishRow(const SampleArgs& a, const Layout& l, int64_t r, const SampleRow& p,
                          bool sorted, float mx, int best, int finite, double total, Race won) {
  char* ws = static_cast<char*>(a.workspace);
  const double lse = mx == -INFINITY ? -INFINITY : mx + log(total);
  reinterpret_cast<double*>(ws + l.lse)[r] = lse;
  reinterpret_cast<int*>(ws + l.finite)[r] = finite;
  reinterpret_cast<int*>(ws + l.offsets)[r] = static_cast<int>(r * a.vocab);
  reinterpret_cast<int*>(ws + l.ends)[r] = static_cast<int>((sorted ? r + 1 : r) * a.vocab);
  if (!sorted) {
    const int t =
        p.temperature == 0 ? (best == INT32_MAX ? 0 : best) : (won.id == INT32_MAX ? 0 : won.id);
    a.token[r] = t;
    if (a.logprob) {
      a.logprob[r] = static_cast<float>(static_cast<double>(a.logits[r * a.vocab + t]) - lse);
    }
  }
}

// Whether row r sorts. Without the sort's workspace (sorted_draws false) no row may sort: one that
// should is raced rather than written past the workspace (the caller's bug).
__device__ __forceinline__ bool RowSorts(const SampleArgs& a, const SampleRow& p) {
  return a.sorted_draws && DrawsSorted(p, a.vocab);
}

// What ProcessRange reduces: the largest logit, the first index holding it (INT32_MAX: none seen)
// and the count of finite logits. `finite` is valid in thread 0 only (mx and best in every thread).
struct RangeScan {
  float mx;
  int best;
  int finite;
};

// Row r's logits [begin, end), by the whole block: penalties and bans of the tokens in the range,
// then temperature in place, the sort's inputs (ids and keys) where the row sorts, and the range's
// reductions.
__device__ RangeScan ProcessRange(const SampleArgs& a, const Layout& l, int64_t r,
                                  const SampleRow& p, int64_t begin, int64_t end) {
  float* row = a.logits + r * a.vocab;
  char* ws = static_cast<char*>(a.workspace);
  if (a.pen_offsets != nullptr) {
    const float rep = p.repetition_penalty;
    const bool additive = p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
    for (int64_t j = a.pen_offsets[r] + threadIdx.x; j < a.pen_offsets[r + 1]; j += blockDim.x) {
      const int32_t t = a.pen_tokens[j];
      if (t < begin || t >= end) continue;  // other ranges' (and ids outside the vocabulary)
      float v = row[t];
      if (rep != 1.0f) v = v > 0 ? __fdiv_rn(v, rep) : __fmul_rn(v, rep);
      const int32_t count = a.pen_counts[j];
      if (additive && count > 0) {
        v = __fsub_rn(v, __fadd_rn(p.presence_penalty,
                                   __fmul_rn(p.frequency_penalty, static_cast<float>(count))));
      }
      row[t] = v;
    }
  }
  __syncthreads();
  if (a.ban_offsets != nullptr) {
    for (int64_t j = a.ban_offsets[r] + threadIdx.x; j < a.ban_offsets[r + 1]; j += blockDim.x) {
      const int32_t t = a.ban_tokens[j];
      if (t >= begin && t < end) row[t] = -INFINITY;
    }
  }
  __syncthreads();
  const bool scale = p.temperature > 0 && p.temperature != 1.0f;
  const bool sorted = RowSorts(a, p);
  const float inv = __fdiv_rn(1.0f, p.temperature);
  float best = -INFINITY;
  int best_i = INT32_MAX;
  int finite = 0;
  int32_t* ids = reinterpret_cast<int32_t*>(ws + l.vals_in) + r * a.vocab;
  float* keys = reinterpret_cast<float*>(ws + l.keys_in) + r * a.vocab;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float v = row[i];
    if (scale) {
      v = __fmul_rn(v, inv);
      row[i] = v;
    }
    if (v > best || (v == best && i < best_i)) {
      best = v;
      best_i = static_cast<int>(i);
    }
    finite += v != -INFINITY;
    if (sorted) {
      ids[i] = static_cast<int32_t>(i);
      keys[i] = v == 0.0f ? 0.0f : v;  // -0.0 sorts as +0.0 (the CPU compares them equal)
    }
  }
  using MaxReduce = cub::BlockReduce<float, kThreads>;
  using IntReduce = cub::BlockReduce<int, kThreads>;
  __shared__ union {
    typename MaxReduce::TempStorage f;
    typename IntReduce::TempStorage i;
  } tmp;
  __shared__ float mx_s;
  __shared__ int best_s;
  const float mx = MaxReduce(tmp.f).Reduce(best, [](float x, float y) { return fmaxf(x, y); });
  if (threadIdx.x == 0) {
    mx_s = mx;
    best_s = INT32_MAX;
  }
  __syncthreads();
  // The first index holding the maximum (the CPU's greedy choice).
  if (best == mx_s && best_i != INT32_MAX) atomicMin(&best_s, best_i);
  const int finite_total = IntReduce(tmp.i).Sum(finite);
  __syncthreads();
  return {mx_s, best_s, finite_total};
}

// The log-sum-exp's sum over row r's (processed) logits [begin, end) around the row's maximum mx
// and, for a race, the range's best ratio p_i / E_i (lowest id on ties). By the whole block; valid
// in thread 0.
__device__ void SumAndRace(const SampleArgs& a, int64_t r, const SampleRow& p, int64_t begin,
                           int64_t end, float mx, double* total, Race* won) {
  const float* row = a.logits + r * a.vocab;
  const bool by_race = p.temperature > 0 && !RowSorts(a, p);
  const double min_p_bound = p.min_p;  // min-p's bound on p_i = exp(l_i - max), relative to 1
  double sum = 0;
  Race race{-1.0, INT32_MAX};
  if (mx != -INFINITY) {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const float v = row[i];
      const double e = exp(static_cast<double>(v) - mx);
      sum += e;
      if (by_race && v != -INFINITY && e >= min_p_bound) {
        // E_i >= 1 - u: a sure loser (by a margin over rounding) skips the log.
        const double u = RaceUniform(p.race_key, i);
        if (!(e < race.ratio * (1.0 - u) * (1.0 - 1e-12))) {
          const double ratio = e / -log(u);
          if (ratio > race.ratio) race = {ratio, static_cast<int>(i)};  // ids ascend per thread
        }
      }
    }
  }
  using DoubleReduce = cub::BlockReduce<double, kThreads>;
  using RaceReduce = cub::BlockReduce<Race, kThreads>;
  __shared__ union {
    typename DoubleReduce::TempStorage d;
    typename RaceReduce::TempStorage r;
  } tmp;
  *total = DoubleReduce(tmp.d).Sum(sum);
  *won = Race{-1.0, INT32_MAX};
  if (by_race) {      // the same for the whole block
    __syncthreads();  // tmp is reused
    *won = RaceReduce(tmp.r).Reduce(race, RaceBetter{});
  }
}

// Penalties, bans and temperature in place; then the log-sum-exp, the greedy choice, the count of
// finite logits, and either the draw by a race or the sort's inputs (ids, segment bounds: empty
// for rows that do not sort). One block a row.
__global__ void __launch_bounds__(kThreads) PrepareKernel(SampleArgs a, Layout l) {
  const int64_t r = blockIdx.x;
  const SampleRow p = a.params[r];
  const RangeScan scan = ProcessRange(a, l, r, p, 0, a.vocab);
  double total = 0;
  Race won{-1.0, INT32_MAX};
  SumAndRace(a, r, p, 0, a.vocab, scan.mx, &total, &won);
  if (threadIdx.x == 0) {
    FinishRow(a, l, r, p, RowSorts(a, p), scan.mx, scan.best, scan.finite, total, won);
  }
}

// The same with each row split over blocks (SampleArgs::split_rows): a (row, chunk) block
// processes kSplitChunk logits and writes its range's reductions ...
__global__ void __launch_bounds__(kThreads) SplitScanKernel(SampleArgs a, Layout l) {
  const int64_t r = blockIdx.x, c = blockIdx.y, chunks = gridDim.y;
  const SampleRow p = a.params[r];
  const int64_t begin = c * kSplitChunk, end = ChunkEnd(begin, a.vocab);
  const RangeScan scan = ProcessRange(a, l, r, p, begin, end);
  if (threadIdx.x == 0) {
    char* ws = static_cast<char*>(a.workspace);
    reinterpret_cast<float*>(ws + l.pmax)[r * chunks + c] = scan.mx;
    reinterpret_cast<int*>(ws + l.pbest)[r * chunks + c] = scan.best;
    reinterpret_cast<int*>(ws + l.pfinite)[r * chunks + c] = scan.finite;
  }
}

// ... then, around the row's maximum (the chunks' largest), its range's sum and race ...
__global__ void __launch_bounds__(kThreads) SplitSumKernel(SampleArgs a, Layout l) {
  const int64_t r = blockIdx.x, c = blockIdx.y, chunks = gridDim.y;
  const SampleRow p = a.params[r];
  const int64_t begin = c * kSplitChunk, end = ChunkEnd(begin, a.vocab);
  char* ws = static_cast<char*>(a.workspace);
  const float* pmax = reinterpret_cast<const float*>(ws + l.pmax) + r * chunks;
  float mx = -INFINITY;
  for (int64_t k = 0; k < chunks; ++k) mx = fmaxf(mx, pmax[k]);
  double total = 0;
  Race won{-1.0, INT32_MAX};
  SumAndRace(a, r, p, begin, end, mx, &total, &won);
  if (threadIdx.x == 0) {
    reinterpret_cast<double*>(ws + l.psum)[r * chunks + c] = total;
    reinterpret_cast<double*>(ws + l.pratio)[r * chunks + c] = won.ratio;
    reinterpret_cast<int*>(ws + l.pid)[r * chunks + c] = won.id;
  }
}

// ... and one thread a row folds the chunks' results in chunk order: the first index of the
// maximum, the finite count, the sum, the race's winner.
__global__ void SplitFinishKernel(SampleArgs a, Layout l, int64_t chunks) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= a.rows) return;
  const SampleRow p = a.params[r];
  const char* ws = static_cast<const char*>(a.workspace);
  const float* pmax = reinterpret_cast<const float*>(ws + l.pmax) + r * chunks;
  const int* pbest = reinterpret_cast<const int*>(ws + l.pbest) + r * chunks;
  const int* pfinite = reinterpret_cast<const int*>(ws + l.pfinite) + r * chunks;
  const double* psum = reinterpret_cast<const double*>(ws + l.psum) + r * chunks;
  const double* pratio = reinterpret_cast<const double*>(ws + l.pratio) + r * chunks;
  const int* pid = reinterpret_cast<const int*>(ws + l.pid) + r * chunks;
  float mx = -INFINITY;
  for (int64_t k = 0; k < chunks; ++k) mx = fmaxf(mx, pmax[k]);
  int best = INT32_MAX, finite = 0;
  double total = 0;
  Race won{-1.0, INT32_MAX};
  for (int64_t k = 0; k < chunks; ++k) {
    if (pmax[k] == mx && pbest[k] < best) best = pbest[k];
    finite += pfinite[k];
    total += psum[k];
    won = RaceBetter{}(won, Race{pratio[k], pid[k]});
  }
  FinishRow(a, l, r, p, RowSorts(a, p), mx, best, finite, total, won);
}

// Inclusive prefix sums of p_i = exp(sorted_i - top) over i < n, into cum (double), by a block scan
// over chunks with a running carry.
__device__ void PrefixSums(const float* sorted, int n, double top, double* cum) {
  using Scan = cub::BlockScan<double, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ double carry_s;
  if (threadIdx.x == 0) carry_s = 0;
  __syncthreads();
  for (int base = 0; base < n; base += kThreads) {
    const int i = base + threadIdx.x;
    const double p = i < n ? exp(static_cast<double>(sorted[i]) - top) : 0.0;
    double inclusive, chunk_total;
    Scan(scan_tmp).InclusiveSum(p, inclusive, chunk_total);
    const double carry = carry_s;
    if (i < n) cum[i] = carry + inclusive;
    __syncthreads();
    if (threadIdx.x == 0) carry_s = carry + chunk_total;
    __syncthreads();
  }
}

// The first i in [0, n) with cum[i] > x (strict) or >= x, or n when none.
__device__ int FirstAbove(const double* cum, int n, double x, bool strict) {
  __shared__ int first_s;
  if (threadIdx.x == 0) first_s = n;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (strict ? cum[i] > x : cum[i] >= x) {
      atomicMin(&first_s, i);
      break;  // later elements of this thread's walk have higher indices
    }
  }
  __syncthreads();
  const int f = first_s;
  __syncthreads();
  return f;
}

// Truncation and the draw over the sorted candidates.
__global__ void __launch_bounds__(kThreads) PickKernel(SampleArgs a, Layout l) {
  const int64_t r = blockIdx.x;
  const SampleRow p = a.params[r];
  // Drawn already (as PrepareKernel decides: only rows with temperature above 0 sort).
  if (!DrawsSorted(p, a.vocab)) return;
  char* ws = static_cast<char*>(a.workspace);
  const float* sorted = reinterpret_cast<const float*>(ws + l.keys_out) + r * a.vocab;
  const int32_t* ids = reinterpret_cast<const int32_t*>(ws + l.vals_out) + r * a.vocab;
  double* cum = reinterpret_cast<double*>(ws + l.cum) + r * a.vocab;
  const double lse = reinterpret_cast<const double*>(ws + l.lse)[r];
  const int finite = reinterpret_cast<const int*>(ws + l.finite)[r];
  int keep = finite;
  if (p.top_k > 0 && p.top_k < keep) keep = p.top_k;
  if (keep == 0) {
    if (threadIdx.x == 0) {
      a.token[r] = 0;
      if (a.logprob)
        a.logprob[r] = static_cast<float>(static_cast<double>(a.logits[r * a.vocab]) - lse);
    }
    return;
  }
  const double top = sorted[0];
  PrefixSums(sorted, keep, top, cum);
  int n = keep;
  if (p.min_p > 0) {
    // p_i falls along the sorted candidates: keep those with p_i >= min_p * p_0 (at least one).
    __shared__ int cut_s;
    if (threadIdx.x == 0) cut_s = keep;
    __syncthreads();
    const double bound = static_cast<double>(p.min_p) * 1.0;  // p_0 = exp(0)
    for (int i = threadIdx.x; i < keep; i += blockDim.x) {
      if (exp(static_cast<double>(sorted[i]) - top) < bound) {
        atomicMin(&cut_s, i);
        break;
      }
    }
    __syncthreads();
    n = cut_s < 1 ? 1 : cut_s;
  }
  if (p.top_p < 1.0f) {
    const double full = cum[n - 1];
    const int i = FirstAbove(cum, n, static_cast<double>(p.top_p) * full, /*strict=*/false);
    if (i < n) n = i + 1;
  }
  const double kept = cum[n - 1];
  const int pick = FirstAbove(cum, n, p.u * kept, /*strict=*/true);
  if (threadIdx.x == 0) {
    const int32_t t = ids[pick < n ? pick : n - 1];
    a.token[r] = t;
    if (a.logprob) {
      a.logprob[r] = static_cast<float>(static_cast<double>(a.logits[r * a.vocab + t]) - lse);
    }
  }
}

}  // namespace

size_t SampleWorkspaceBytes(int64_t rows, int64_t vocab, bool sorted_draws) {
  return LayoutFor(rows, vocab, sorted_draws).total;
}

cudaError_t LaunchSample(const SampleArgs& a, cudaStream_t stream) {
  const Layout l = LayoutFor(a.rows, a.vocab, a.sorted_draws);
  if (a.split_rows) {
    const int64_t chunks = SplitChunks(a.vocab);
    const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(chunks));
    SplitScanKernel<<<grid, kThreads, 0, stream>>>(a, l);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    SplitSumKernel<<<grid, kThreads, 0, stream>>>(a, l);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    SplitFinishKernel<<<static_cast<unsigned>((a.rows + 127) / 128), 128, 0, stream>>>(a, l,
                                                                                       chunks);
  } else {
    PrepareKernel<<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a, l);
  }
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (!a.sorted_draws) return cudaSuccess;  // PrepareKernel chose every token
  char* ws = static_cast<char*>(a.workspace);
  size_t temp = l.temp_bytes;
  const int* offsets = reinterpret_cast<const int*>(ws + l.offsets);
  if (cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairsDescending(
          ws + l.temp, temp, reinterpret_cast<const float*>(ws + l.keys_in),
          reinterpret_cast<float*>(ws + l.keys_out),
          reinterpret_cast<const int32_t*>(ws + l.vals_in),
          reinterpret_cast<int32_t*>(ws + l.vals_out), static_cast<int>(a.rows * a.vocab),
          static_cast<int>(a.rows), offsets, reinterpret_cast<const int*>(ws + l.ends), 0, 32,
          stream);
      e != cudaSuccess) {
    return e;
  }
  PickKernel<<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a, l);
  return cudaGetLastError();
}

}  // namespace strata::gpu
