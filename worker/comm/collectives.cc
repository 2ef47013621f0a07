#include "worker/comm/collectives.h"

#include <cstring>

namespace strata {

absl::Status SingleRankCollectives::AllGather(const float* in, int64_t count, float* out) {
  if (count < 0) return absl::InvalidArgumentError("AllGather: negative count");
  if (in != out && count > 0) std::memmove(out, in, static_cast<size_t>(count) * sizeof(float));
  return absl::OkStatus();
}

}  // namespace strata
