// Helpers shared by the model runners' tests (testonly).
#ifndef STRATA_WORKER_MODEL_TEST_UTIL_H_
#define STRATA_WORKER_MODEL_TEST_UTIL_H_

#include <cmath>
#include <vector>

namespace strata {

// ||got - want|| / ||want|| in double; infinity when the sizes differ or got holds a NaN or an
// infinity (an unwritten or poisoned output).
inline double RelativeError(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / den);
}

}  // namespace strata

#endif  // STRATA_WORKER_MODEL_TEST_UTIL_H_
