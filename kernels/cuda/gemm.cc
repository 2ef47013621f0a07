#include "kernels/cuda/gemm.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda/runtime.h"

namespace strata {
namespace {

absl::Status LtStatus(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cublasLt ", what, ": ", cublasGetStatusName(s), ": ",
                                          cublasGetStatusString(s)));
}

cudaDataType_t CudaType(gpu::ActType t) {
  switch (t) {
    case gpu::ActType::kF32:
      return CUDA_R_32F;
    case gpu::ActType::kF16:
      return CUDA_R_16F;
    case gpu::ActType::kBF16:
      return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

// One cached problem: descriptors plus the chosen algorithm.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool has_bias = false;
};

}  // namespace

struct CublasLtGemm::Impl {
  cublasLtHandle_t handle = nullptr;
  DeviceBuffer workspace;
  bool small_m_gemv = false;
  int gemv_variant = 0;
  int64_t gemv_max_m = 8;
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int, int, bool>;
  absl::flat_hash_map<Key, Plan> plans;

  ~Impl() {
    for (auto& [key, p] : plans) {
      cublasLtMatrixLayoutDestroy(p.a);
      cublasLtMatrixLayoutDestroy(p.b);
      cublasLtMatrixLayoutDestroy(p.d);
      cublasLtMatmulDescDestroy(p.desc);
    }
    if (handle != nullptr) cublasLtDestroy(handle);
  }

  absl::StatusOr<Plan*> PlanFor(const GemmArgs& g, int64_t ldx, int64_t ldy) {
    const Key key{g.m,
                  g.n,
                  g.k,
                  ldx,
                  ldy,
                  static_cast<int>(g.act),
                  static_cast<int>(g.out_type),
                  g.bias != nullptr};
    if (auto it = plans.find(key); it != plans.end()) return &it->second;
    Plan p;
    const cudaDataType_t in_t = CudaType(g.act), out_t = CudaType(g.out_type);
    // Column-major view: D (n x m, ld ldy) = op(A) B with A = W seen as k x n (ld k), transposed,
    // and B = x seen as k x m (ld ldx).
    if (absl::Status s = LtStatus(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                                  "matmul descriptor");
        !s.ok()) {
      return s;
    }
    const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
    auto set = [&p](cublasLtMatmulDescAttributes_t attr, const void* value, size_t bytes) {
      return LtStatus(cublasLtMatmulDescSetAttribute(p.desc, attr, value, bytes), "attribute");
    };
    absl::Status s = set(CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a));
    if (s.ok()) s = set(CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b));
    if (s.ok() && g.bias != nullptr) {
      const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      s = set(CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi));
      if (s.ok()) s = set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &out_t, sizeof(out_t));
      p.has_bias = true;
    }
    if (s.ok()) s = LtStatus(cublasLtMatrixLayoutCreate(&p.a, in_t, g.k, g.n, g.k), "layout A");
    if (s.ok()) s = LtStatus(cublasLtMatrixLayoutCreate(&p.b, in_t, g.k, g.m, ldx), "layout B");
    if (s.ok()) s = LtStatus(cublasLtMatrixLayoutCreate(&p.d, out_t, g.n, g.m, ldy), "layout D");
    cublasLtMatmulPreference_t pref = nullptr;
    if (s.ok()) s = LtStatus(cublasLtMatmulPreferenceCreate(&pref), "preference");
    if (s.ok()) {
      const size_t ws = workspace.bytes();
      s = LtStatus(cublasLtMatmulPreferenceSetAttribute(
                       pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
                   "preference attribute");
    }
    if (s.ok()) {
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      s = LtStatus(cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.a, p.b, p.d, p.d, pref, 1,
                                                  &result, &found),
                   "heuristic");
      if (s.ok() && found == 0) {
        s = absl::InternalError(
            absl::StrCat("cublasLt: no algorithm for m=", g.m, " n=", g.n, " k=", g.k));
      }
      if (s.ok()) p.algo = result.algo;
    }
    if (pref != nullptr) cublasLtMatmulPreferenceDestroy(pref);
    if (!s.ok()) {
      if (p.a) cublasLtMatrixLayoutDestroy(p.a);
      if (p.b) cublasLtMatrixLayoutDestroy(p.b);
      if (p.d) cublasLtMatrixLayoutDestroy(p.d);
      cublasLtMatmulDescDestroy(p.desc);
      return s;
    }
    return &plans.emplace(key, p).first->second;
  }
};

void CublasLtGemm::set_small_m_gemv(bool on) { impl_->small_m_gemv = on; }
bool CublasLtGemm::small_m_gemv() const { return impl_->small_m_gemv; }
void CublasLtGemm::set_gemv_variant(int variant) { impl_->gemv_variant = variant; }
void CublasLtGemm::set_gemv_max_m(int64_t m) { impl_->gemv_max_m = std::clamp<int64_t>(m, 0, 8); }
bool CublasLtGemm::RoutesToGemv(int64_t m, int64_t k, bool long_rows) const {
  return impl_->small_m_gemv && m <= impl_->gemv_max_m && (long_rows || k <= kGemvMaxK);
}

CublasLtGemm::CublasLtGemm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CublasLtGemm::~CublasLtGemm() = default;

absl::StatusOr<std::unique_ptr<CublasLtGemm>> CublasLtGemm::Create(size_t workspace_bytes) {
  if (absl::StatusOr<int> n = CudaDeviceCount(); !n.ok()) return n.status();
  auto impl = std::make_unique<Impl>();
  if (absl::Status s = LtStatus(cublasLtCreate(&impl->handle), "create"); !s.ok()) return s;
  absl::StatusOr<DeviceBuffer> ws = DeviceBuffer::Allocate(workspace_bytes);
  if (!ws.ok()) return ws.status();
  impl->workspace = *std::move(ws);
  return std::unique_ptr<CublasLtGemm>(new CublasLtGemm(std::move(impl)));
}

absl::Status CublasLtGemm::Run(const GemmArgs& g, CudaStreamHandle stream) {
  if (g.m < 0 || g.n <= 0 || g.k <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("gemm: bad shape m=", g.m, " n=", g.n, " k=", g.k));
  }
  if (g.m == 0) return absl::OkStatus();
  if (g.x == nullptr || g.w == nullptr || g.y == nullptr) {
    return absl::InvalidArgumentError("gemm: x, w and y must be set");
  }
  const int64_t ldx = g.ldx ? g.ldx : g.k;
  const int64_t ldy = g.ldy ? g.ldy : g.n;
  if (ldx < g.k) return absl::InvalidArgumentError("gemm: ldx below k");
  if (ldy < g.n) return absl::InvalidArgumentError("gemm: ldy below n");
  if (g.allow_gemv && RoutesToGemv(g.m, g.k, g.gemv_long_rows)) {
    gpu::GemvArgs v{g.m,    g.n, g.k, g.x,   ldx,        g.w,
                    g.bias, g.y, ldy, g.act, g.out_type, impl_->gemv_variant};
    v.l2_prefetch = g.gemv_l2_prefetch;
    if (gpu::GemvSupported(v)) {
      return CudaStatus(gpu::LaunchGemv(v, reinterpret_cast<cudaStream_t>(stream)), "gemv launch");
    }
  }
  absl::StatusOr<Plan*> plan = impl_->PlanFor(g, ldx, ldy);
  if (!plan.ok()) return plan.status();
  Plan& p = **plan;
  if (p.has_bias) {
    RETURN_IF_ERROR(
        LtStatus(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias,
                                                sizeof(g.bias)),
                 "bias attribute"));
  }
  const float alpha = 1.0f, beta = 0.0f;
  return LtStatus(cublasLtMatmul(impl_->handle, p.desc, &alpha, g.w, p.a, g.x, p.b, &beta, g.y, p.d,
                                 g.y, p.d, &p.algo, impl_->workspace.data(),
                                 impl_->workspace.bytes(), reinterpret_cast<cudaStream_t>(stream)),
                  "matmul");
}

}  // namespace strata
