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
};

// The per-row values first; then, only where some row sorts (`sorted`), the sort's keys, values,
// prefix sums and cub's scratch: about 24 bytes a logit, which races and greedy rows never touch.
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

// Penalties, bans and temperature in place; then the log-sum-exp, the greedy choice, the count of
// finite logits, and either the draw by a race or the sort's inputs (ids, segment bounds: empty
// for rows that do not sort).
__global__ void __launch_bounds__(kThreads) PrepareKernel(SampleArgs a, Layout l) {
  const int64_t r = blockIdx.x;
  const SampleRow p = a.params[r];
  float* row = a.logits + r * a.vocab;
  char* ws = static_cast<char*>(a.workspace);
  if (a.pen_offsets != nullptr) {
    const float rep = p.repetition_penalty;
    const bool additive = p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
    for (int64_t j = a.pen_offsets[r] + threadIdx.x; j < a.pen_offsets[r + 1]; j += blockDim.x) {
      const int32_t t = a.pen_tokens[j];
      if (t < 0 || t >= a.vocab) continue;
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
      if (t >= 0 && t < a.vocab) row[t] = -INFINITY;
    }
  }
  __syncthreads();
  const bool scale = p.temperature > 0 && p.temperature != 1.0f;
  // Without the sort's workspace (sorted_draws false) no row may sort: one that should is raced
  // rather than written past the workspace (the caller's bug; SampleArgs::sorted_draws).
  const bool sorted = a.sorted_draws && DrawsSorted(p, a.vocab);
  const bool by_race = p.temperature > 0 && !sorted;
  const float inv = __fdiv_rn(1.0f, p.temperature);
  float best = -INFINITY;
  int best_i = INT32_MAX;
  int finite = 0;
  int32_t* ids = reinterpret_cast<int32_t*>(ws + l.vals_in) + r * a.vocab;
  float* keys = reinterpret_cast<float*>(ws + l.keys_in) + r * a.vocab;
  for (int64_t i = threadIdx.x; i < a.vocab; i += blockDim.x) {
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
  using DoubleReduce = cub::BlockReduce<double, kThreads>;
  using RaceReduce = cub::BlockReduce<Race, kThreads>;
  __shared__ union {
    typename MaxReduce::TempStorage f;
    typename IntReduce::TempStorage i;
    typename DoubleReduce::TempStorage d;
    typename RaceReduce::TempStorage r;
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
  // The log-sum-exp's sum and, for a race, each thread's best ratio p_i / E_i (lowest id on ties).
  const double min_p_bound = p.min_p;  // min-p's bound on p_i = exp(l_i - max), relative to 1
  double sum = 0;
  Race race{-1.0, INT32_MAX};
  if (mx_s != -INFINITY) {
    for (int64_t i = threadIdx.x; i < a.vocab; i += blockDim.x) {
      const float v = row[i];
      const double e = exp(static_cast<double>(v) - mx_s);
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
  const double total = DoubleReduce(tmp.d).Sum(sum);
  Race won{-1.0, INT32_MAX};
  if (by_race) {      // the same for the whole block
    __syncthreads();  // tmp is reused
    won = RaceReduce(tmp.r).Reduce(race, RaceBetter{});
  }
  if (threadIdx.x == 0) {
    const double lse = mx_s == -INFINITY ? -INFINITY : mx_s + log(total);
    reinterpret_cast<double*>(ws + l.lse)[r] = lse;
    reinterpret_cast<int*>(ws + l.finite)[r] = finite_total;
    reinterpret_cast<int*>(ws + l.offsets)[r] = static_cast<int>(r * a.vocab);
    reinterpret_cast<int*>(ws + l.ends)[r] = static_cast<int>((sorted ? r + 1 : r) * a.vocab);
    if (!sorted) {
      // Greedy: the first maximum. A race: its winner, or token 0 with no finite logit, as on
      // the CPU.
      const int t = p.temperature == 0 ? (best_s == INT32_MAX ? 0 : best_s)
                                       : (won.id == INT32_MAX ? 0 : won.id);
      a.token[r] = t;
      if (a.logprob) a.logprob[r] = static_cast<float>(static_cast<double>(row[t]) - lse);
    }
  }
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
  PrepareKernel<<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a, l);
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
