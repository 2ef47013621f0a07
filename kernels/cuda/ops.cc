#include "kernels/cuda/ops.h"

#include <cuda_runtime_api.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/arg_check.h"
#include "kernels/cuda/runtime.h"

namespace strata {
namespace {

using cuda_args::Launched;

cudaStream_t S(CudaStreamHandle s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

absl::Status ActTypeOf(DType dtype, gpu::ActType* out) {
  switch (dtype) {
    case DType::kF32:
      *out = gpu::ActType::kF32;
      return absl::OkStatus();
    case DType::kF16:
      *out = gpu::ActType::kF16;
      return absl::OkStatus();
    case DType::kBF16:
      *out = gpu::ActType::kBF16;
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("dtype ", DTypeName(dtype), " is not an activation type (f32, f16, bf16)"));
  }
}

absl::Status EmbedCuda(const gpu::EmbedArgs& a, CudaStreamHandle stream) {
  STRATA_REQUIRE(a.num_tokens >= 0 && a.hidden > 0 && a.vocab > 0, "embed", "bad shape");
  if (a.num_tokens == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.tokens && a.table && a.out, "embed", "tokens, table and out must be set");
  return Launched(gpu::LaunchEmbed(a, S(stream)), "embed");
}

absl::Status AddRmsNormCuda(const gpu::AddRmsNormArgs& a, CudaStreamHandle stream) {
  STRATA_REQUIRE(a.rows >= 0 && a.dim > 0, "add_rms_norm", "bad shape");
  if (a.rows == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.residual && a.weight && a.out, "add_rms_norm",
                 "residual, weight and out must be set");
  STRATA_REQUIRE(a.delta_stride == 0 || a.delta_stride >= a.dim, "add_rms_norm",
                 "delta_stride below dim");
  STRATA_REQUIRE(a.out_stride == 0 || a.out_stride >= a.dim, "add_rms_norm",
                 "out_stride below dim");
  return Launched(gpu::LaunchAddRmsNorm(a, S(stream)), "add_rms_norm");
}

absl::Status HeadRmsNormCuda(const gpu::HeadRmsNormArgs& a, CudaStreamHandle stream) {
  STRATA_REQUIRE(a.num_tokens >= 0 && a.num_heads > 0 && a.head_dim > 0, "head_rms_norm",
                 "bad shape");
  if (a.num_tokens == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.x && a.weight, "head_rms_norm", "x and weight must be set");
  STRATA_REQUIRE(a.token_stride >= a.num_heads * a.head_dim, "head_rms_norm",
                 "token_stride below num_heads * head_dim");
  return Launched(gpu::LaunchHeadRmsNorm(a, S(stream)), "head_rms_norm");
}

namespace {

absl::Status ValidateRope(const gpu::RopeArgs& a) {
  STRATA_REQUIRE(a.num_tokens >= 0 && a.head_dim > 0 && a.head_dim % 2 == 0 && a.head_dim <= 1024 &&
                     a.num_q_heads >= 0 && a.num_k_heads >= 0,
                 "rope", "bad shape (head_dim must be even and at most 1024)");
  if (a.num_tokens == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.positions && a.inv_freq, "rope", "positions and inv_freq must be set");
  STRATA_REQUIRE(a.num_q_heads == 0 || (a.q && a.q_stride >= a.num_q_heads * a.head_dim), "rope",
                 "q unset or q_stride below num_q_heads * head_dim");
  STRATA_REQUIRE(a.num_k_heads == 0 || (a.k && a.k_stride >= a.num_k_heads * a.head_dim), "rope",
                 "k unset or k_stride below num_k_heads * head_dim");
  return absl::OkStatus();
}

}  // namespace

absl::Status RopeCuda(const gpu::RopeArgs& a, CudaStreamHandle stream) {
  if (absl::Status s = ValidateRope(a); !s.ok() || a.num_tokens == 0) return s;
  return Launched(gpu::LaunchRope(a, S(stream)), "rope");
}

absl::Status SiluMulCuda(const gpu::SiluMulArgs& a, CudaStreamHandle stream) {
  STRATA_REQUIRE(a.rows >= 0 && a.dim > 0, "silu_mul", "bad shape");
  if (a.rows == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.in && a.out, "silu_mul", "in and out must be set");
  return Launched(gpu::LaunchSiluMul(a, S(stream)), "silu_mul");
}

namespace {

absl::Status ValidateWriteKv(const gpu::WriteKvArgs& a) {
  STRATA_REQUIRE(a.num_tokens >= 0 && a.num_kv_heads > 0 && a.head_dim > 0 && a.block_tokens > 0 &&
                     a.num_blocks > 0,
                 "write_kv", "bad shape");
  if (a.num_tokens == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.k && a.v && a.slots && a.k_cache && a.v_cache, "write_kv",
                 "k, v, slots, k_cache and v_cache must be set");
  STRATA_REQUIRE(
      a.k_stride >= a.num_kv_heads * a.head_dim && a.v_stride >= a.num_kv_heads * a.head_dim,
      "write_kv", "k_stride or v_stride below num_kv_heads * head_dim");
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteKvCacheCuda(const gpu::WriteKvArgs& a, CudaStreamHandle stream) {
  if (absl::Status s = ValidateWriteKv(a); !s.ok() || a.num_tokens == 0) return s;
  return Launched(gpu::LaunchWriteKv(a, S(stream)), "write_kv");
}

absl::Status RopeWriteKvCuda(const gpu::RopeArgs& rope, const gpu::WriteKvArgs& kv,
                             CudaStreamHandle stream) {
  if (absl::Status s = ValidateRope(rope); !s.ok()) return s;
  if (absl::Status s = ValidateWriteKv(kv); !s.ok()) return s;
  STRATA_REQUIRE(rope.num_tokens == kv.num_tokens && rope.num_k_heads == kv.num_kv_heads &&
                     rope.head_dim == kv.head_dim && rope.act == kv.act,
                 "rope_write_kv", "rope and write_kv disagree on tokens, heads, head_dim or type");
  STRATA_REQUIRE(rope.k == kv.k && rope.k_stride == kv.k_stride, "rope_write_kv",
                 "kv.k must be rope.k (the rotated keys are written)");
  if (rope.num_tokens == 0) return absl::OkStatus();
  return Launched(gpu::LaunchRopeWriteKv(rope, kv, S(stream)), "rope_write_kv");
}

absl::Status GemvCuda(const gpu::GemvArgs& a, CudaStreamHandle stream) {
  STRATA_REQUIRE(a.m >= 0 && a.n > 0 && a.k > 0, "gemv", "bad shape");
  if (a.m == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.x && a.w && a.y, "gemv", "x, w and y must be set");
  STRATA_REQUIRE(a.ldx >= a.k && a.ldy >= (a.silu_pairs ? a.n / 2 : a.n), "gemv",
                 "ldx below k or ldy below the output row");
  STRATA_REQUIRE(gpu::GemvSupported(a), "gemv",
                 "unsupported arguments (m 1 to 8, k and ldx whole 16-byte vectors, 16-byte "
                 "aligned x, w and norm_weight, f32 output to accumulate, y not aliasing x; "
                 "silu_pairs: even n, output in act, no bias or accumulate; rope_heads: n = "
                 "(rope_heads + 2 kv_heads) head_dim, even head_dim, output in act, no "
                 "accumulate, positions, inv_freq, slots and both caches set)");
  return Launched(gpu::LaunchGemv(a, S(stream)), "gemv");
}

absl::Status PagedAttentionCuda(const gpu::PagedAttentionArgs& a, CudaStreamHandle stream) {
  STRATA_REQUIRE(a.num_tokens >= 0 && a.num_heads > 0 && a.num_kv_heads > 0 &&
                     a.num_heads % a.num_kv_heads == 0,
                 "paged_attention", "num_heads must be a positive multiple of num_kv_heads");
  STRATA_REQUIRE(a.head_dim == 16 || a.head_dim == 32 || a.head_dim == 64 || a.head_dim == 128 ||
                     a.head_dim == 256,
                 "paged_attention", "head_dim must be 16, 32, 64, 128 or 256");
  if (a.num_tokens == 0) return absl::OkStatus();
  STRATA_REQUIRE(
      a.block_tokens > 0 && a.num_blocks > 0 && a.num_seqs > 0 && a.max_blocks_per_seq > 0,
      "paged_attention", "bad cache or block table shape");
  STRATA_REQUIRE(
      a.q && a.k_cache && a.v_cache && a.token_seq && a.token_pos && a.block_tables && a.out,
      "paged_attention", "q, caches, token_seq, token_pos, block_tables and out must be set");
  STRATA_REQUIRE(a.q_stride >= a.num_heads * a.head_dim && a.out_stride >= a.num_heads * a.head_dim,
                 "paged_attention", "q_stride or out_stride below num_heads * head_dim");
  const int64_t group = a.num_heads / a.num_kv_heads;
  STRATA_REQUIRE(
      a.tile_tokens >= 1 && (a.tile_tokens * group <= gpu::PagedAttentionMaxRows(a.head_dim) ||
                             gpu::PagedAttentionUsesMmaKernel(a)),
      "paged_attention",
      "tile_tokens x group exceeds the rows one block holds (the tensor-core kernel's "
      "64 need mma_prefill, 16-bit activations, head_dim <= 128 and aligned q)");
  STRATA_REQUIRE(a.tiles != nullptr || (a.tile_tokens == 1 && a.num_tiles == a.num_tokens),
                 "paged_attention",
                 "without tiles, num_tiles must equal num_tokens and tile_tokens 1");
  STRATA_REQUIRE(a.num_tiles > 0 && a.num_tiles <= a.num_tokens, "paged_attention",
                 "num_tiles out of range");
  STRATA_REQUIRE(a.num_partitions >= 1 && a.num_partitions <= 65535, "paged_attention",
                 "num_partitions out of range");
  STRATA_REQUIRE(a.num_partitions == 1 ||
                     (a.partition_keys > 0 && a.partition_keys % 32 == 0 && a.workspace != nullptr),
                 "paged_attention",
                 "split-K needs partition_keys (a multiple of 32) and a workspace");
  if (gpu::PagedAttentionUsesDecodeKernel(a)) {
    STRATA_REQUIRE(a.num_partitions == 1 || a.counters != nullptr, "paged_attention",
                   "the decode kernel's split-K needs counters");
    const int64_t eb = a.act == gpu::ActType::kF32 ? 4 : 2;
    const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    STRATA_REQUIRE(
        aligned(a.q) && a.q_stride * eb % 16 == 0 && aligned(a.k_cache) && aligned(a.v_cache),
        "paged_attention",
        "the decode kernel needs q, q_stride, k_cache and v_cache 16-byte aligned");
  }
  return Launched(gpu::LaunchPagedAttention(a, S(stream)), "paged_attention");
}

absl::Status ArgmaxCuda(const gpu::ArgmaxArgs& a, CudaStreamHandle stream) {
  STRATA_REQUIRE(a.rows >= 0 && a.vocab > 0, "argmax", "bad shape");
  if (a.rows == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.logits && a.token, "argmax", "logits and token must be set");
  STRATA_REQUIRE(a.ld == 0 || a.ld >= a.vocab, "argmax", "ld below vocab");
  return Launched(gpu::LaunchArgmax(a, S(stream)), "argmax");
}

absl::Status SampleCuda(const gpu::SampleArgs& a, CudaStreamHandle stream) {
  STRATA_REQUIRE(a.rows >= 0 && a.vocab > 0, "sample", "bad shape");
  STRATA_REQUIRE(a.rows * a.vocab < (int64_t{1} << 31), "sample", "rows x vocab above 2^31");
  if (a.rows == 0) return absl::OkStatus();
  STRATA_REQUIRE(a.logits && a.params && a.token && a.workspace, "sample",
                 "logits, params, token and workspace must be set");
  STRATA_REQUIRE((a.pen_offsets == nullptr) == (a.pen_tokens == nullptr) &&
                     (a.pen_tokens == nullptr) == (a.pen_counts == nullptr),
                 "sample", "pen_offsets, pen_tokens and pen_counts are set together");
  STRATA_REQUIRE((a.ban_offsets == nullptr) == (a.ban_tokens == nullptr), "sample",
                 "ban_offsets and ban_tokens are set together");
  return Launched(gpu::LaunchSample(a, S(stream)), "sample");
}

std::vector<int32_t> PlanAttentionTiles(absl::Span<const int32_t> token_seq,
                                        absl::Span<const int32_t> token_pos,
                                        int64_t max_tile_tokens) {
  std::vector<int32_t> tiles;
  const int64_t n = static_cast<int64_t>(token_seq.size());
  int64_t i = 0;
  while (i < n) {
    int64_t j = i + 1;
    while (j < n && j - i < max_tile_tokens && token_seq[j] == token_seq[i] &&
           token_pos[j] == token_pos[j - 1] + 1) {
      ++j;
    }
    tiles.push_back(static_cast<int32_t>(i));
    tiles.push_back(static_cast<int32_t>(j - i));
    i = j;
  }
  return tiles;
}

int64_t AttentionTileTokens(int64_t head_dim, int64_t group) {
  return std::max<int64_t>(1, gpu::PagedAttentionMaxRows(head_dim) / std::max<int64_t>(1, group));
}

int64_t AttentionMmaTileTokens(int64_t group) {
  return std::max<int64_t>(1, gpu::kPagedAttentionMmaRows / std::max<int64_t>(1, group));
}

bool AttentionMmaRunsHere(gpu::ActType act, int64_t head_dim, int64_t group) {
  if (!gpu::PagedAttentionMmaSupported(act, head_dim, group)) return false;
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess) {
    return false;
  }
  return gpu::PagedAttentionMmaSharedBytes(head_dim) <= optin;
}

void ChooseAttentionPartitions(int64_t max_keys, int64_t multiprocessors,
                               gpu::PagedAttentionArgs* a) {
  a->num_partitions = 1;
  a->partition_keys = 0;
  const int64_t blocks = a->num_tiles * a->num_kv_heads;
  if (blocks <= 0) return;
  const int64_t target = 2 * std::max<int64_t>(1, multiprocessors);
  // The tiled kernel's warps take chunks of 32 keys (128 per block round); the decode kernel's
  // lane groups take 64 keys per block round for bf16 and f16.
  const int64_t unit = gpu::PagedAttentionUsesDecodeKernel(*a) ? 64 : 128;
  if (blocks >= target || max_keys <= unit) return;
  // Enough partitions to reach the target, at most one per unit of keys; the kernel splits each
  // tile's actual range over as many of them as it needs.
  const int64_t parts =
      std::min<int64_t>((target + blocks - 1) / blocks, (max_keys + unit - 1) / unit);
  if (parts <= 1) return;
  a->num_partitions = parts;
  a->partition_keys = unit;
}

}  // namespace strata
