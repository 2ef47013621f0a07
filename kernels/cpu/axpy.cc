#include "kernels/axpy.h"

namespace strata {

absl::Status AxpyCpu(const AxpyParams& p) {
  if (absl::Status s = ValidateAxpy(p); !s.ok()) return s;
  for (int64_t i = 0; i < p.n; ++i) p.out[i] = p.alpha * p.x[i] + p.y[i];
  return absl::OkStatus();
}

}  // namespace strata
