#include "kernels/axpy.h"

#include <cstdint>

namespace strata {
namespace {

bool PartiallyOverlaps(const float* a, const float* b, int64_t n) {
  if (a == b) return false;
  const auto ua = reinterpret_cast<uintptr_t>(a);
  const auto ub = reinterpret_cast<uintptr_t>(b);
  const auto bytes = static_cast<uintptr_t>(n) * sizeof(float);
  return ua < ub + bytes && ub < ua + bytes;
}

}  // namespace

absl::Status ValidateAxpy(const AxpyParams& p) {
  if (p.n < 0) return absl::InvalidArgumentError("axpy: n must be >= 0");
  if (p.n == 0) return absl::OkStatus();
  if (p.x == nullptr) return absl::InvalidArgumentError("axpy: x is null");
  if (p.y == nullptr) return absl::InvalidArgumentError("axpy: y is null");
  if (p.out == nullptr) return absl::InvalidArgumentError("axpy: out is null");
  if (PartiallyOverlaps(p.out, p.y, p.n)) {
    return absl::InvalidArgumentError("axpy: out partially overlaps y");
  }
  if (p.out == p.x || PartiallyOverlaps(p.out, p.x, p.n)) {
    return absl::InvalidArgumentError("axpy: out overlaps x");
  }
  return absl::OkStatus();
}

}  // namespace strata
