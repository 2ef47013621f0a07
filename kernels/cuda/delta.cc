#include "kernels/cuda/delta.h"

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/arg_check.h"
#include "kernels/cuda/runtime.h"

namespace strata {
namespace {

bool Aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

cudaStream_t S(CudaStreamHandle s) { return reinterpret_cast<cudaStream_t>(s); }

absl::Status CheckView(const gpu::DeltaView& d, const char* op) {
  STRATA_REQUIRE(d.bits == 2 || d.bits == 4 || d.bits == 8, op, "delta.bits must be 2, 4 or 8");
  STRATA_REQUIRE(d.rows >= 0, op, "delta.rows must be >= 0");
  STRATA_REQUIRE(d.cols > 0 && d.cols % 8 == 0, op, "delta.cols must be a positive multiple of 8");
  if (d.rows == 0) return absl::OkStatus();
  STRATA_REQUIRE(d.q != nullptr && d.scale != nullptr, op, "delta.q and delta.scale must be set");
  STRATA_REQUIRE(!d.sparse_2_4 || d.index != nullptr, op, "delta.index must be set with 2:4");
  STRATA_REQUIRE(Aligned(d.q, 8), op, "delta.q must be 8-byte aligned");
  STRATA_REQUIRE(Aligned(d.scale, 4), op, "delta.scale must be 4-byte aligned");
  return absl::OkStatus();
}

// The checks DeltaGemvCuda and DeltaMmaCuda share.
absl::Status CheckProduct(const gpu::DeltaGemvArgs& a, const char* kOp) {
  if (absl::Status s = CheckView(a.delta, kOp); !s.ok()) return s;
  STRATA_REQUIRE(a.m >= 0, kOp, "m must be >= 0");
  if (a.m == 0 || a.delta.rows == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.x != nullptr && a.y != nullptr, kOp, "x and y must be set");
  STRATA_REQUIRE(a.ldx >= a.delta.cols, kOp, "ldx below delta.cols");
  STRATA_REQUIRE(a.ldy >= a.delta.rows, kOp, "ldy below delta.rows");
  const int64_t eb = gpu::ActBytes(a.act);
  STRATA_REQUIRE(Aligned(a.x, 16) && (a.ldx * eb) % 16 == 0, kOp,
                 "x and its row stride ldx must be 16-byte aligned");
  STRATA_REQUIRE(a.rows != nullptr || a.row_offset >= 0, kOp, "row_offset must be >= 0");
  return absl::OkStatus();
}

}  // namespace

gpu::DeltaView ToDeltaView(const PackedDelta& d) {
  gpu::DeltaView v;
  v.rows = d.rows;
  v.cols = d.cols;
  v.bits = d.bits;
  v.sparse_2_4 = d.sparse_2_4;
  v.q = d.q;
  v.index = d.index;
  v.scale = d.scale;
  return v;
}

absl::Status DeltaGemvCuda(const gpu::DeltaGemvArgs& a, CudaStreamHandle stream) {
  constexpr const char* kOp = "delta_gemv";
  if (absl::Status s = CheckProduct(a, kOp); !s.ok()) return s;
  return cuda_args::Launched(gpu::LaunchDeltaGemv(a, S(stream)), kOp);
}

absl::Status DeltaMmaCuda(const gpu::DeltaGemvArgs& a, CudaStreamHandle stream) {
  constexpr const char* kOp = "delta_mma";
  STRATA_REQUIRE(a.act != gpu::ActType::kF32, kOp, "act must be f16 or bf16 (f32: delta_gemv)");
  STRATA_REQUIRE((a.split_workspace == nullptr) == (a.split_counters == nullptr), kOp,
                 "split_workspace and split_counters must be set together");
  STRATA_REQUIRE(a.split_workspace_floats >= 0 && a.split_counters_count >= 0, kOp,
                 "split_workspace_floats and split_counters_count must be >= 0");
  if (absl::Status s = CheckProduct(a, kOp); !s.ok()) return s;
  return cuda_args::Launched(gpu::LaunchDeltaMma(a, S(stream)), kOp);
}

absl::Status UnpackDeltaCuda(const gpu::UnpackDeltaArgs& a, CudaStreamHandle stream) {
  constexpr const char* kOp = "unpack_delta";
  if (absl::Status s = CheckView(a.delta, kOp); !s.ok()) return s;
  STRATA_REQUIRE(a.num_rows >= 0, kOp, "num_rows must be >= 0");
  if (a.num_rows == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.out != nullptr, kOp, "out must be set");
  STRATA_REQUIRE(a.ld_out >= a.delta.cols, kOp, "ld_out below delta.cols");
  STRATA_REQUIRE(
      a.src_rows != nullptr || (a.row_begin >= 0 && a.row_begin + a.num_rows <= a.delta.rows), kOp,
      "[row_begin, row_begin + num_rows) outside the delta's rows");
  return cuda_args::Launched(gpu::LaunchUnpackDelta(a, S(stream)), kOp);
}

absl::Status AddRowsCuda(const gpu::AddRowsArgs& a, CudaStreamHandle stream) {
  constexpr const char* kOp = "add_rows";
  STRATA_REQUIRE(a.m >= 0 && a.n >= 0, kOp, "m and n must be >= 0");
  if (a.m == 0 || a.n == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.src != nullptr && a.y != nullptr, kOp, "src and y must be set");
  STRATA_REQUIRE(a.ld_src == 0 || a.ld_src >= a.n, kOp, "ld_src below n");
  STRATA_REQUIRE(a.ldy >= a.n, kOp, "ldy below n");
  return cuda_args::Launched(gpu::LaunchAddRows(a, S(stream)), kOp);
}

}  // namespace strata
