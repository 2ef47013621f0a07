// Small statistics shared by the benchmarks.
#ifndef STRATA_BENCH_STATS_H_
#define STRATA_BENCH_STATS_H_

#include <algorithm>
#include <vector>

namespace strata {

// The median of `v` (the upper one of an even count); 0 for none.
inline double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

}  // namespace strata

#endif  // STRATA_BENCH_STATS_H_
