// Host-side planning of the CUDA ops (kernels/cuda/ops.h): attention tiles, partitions, which
// kernel takes which arguments, argument refusals that happen before any launch, and the
// activation type mapping. Needs no GPU, so it runs everywhere the build has CUDA.
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

#ifdef STRATA_HAVE_CUDA
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/ops_kernel.h"
#include "kernels/dtype.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

TEST(OpsCudaPlanningTest, ActTypeOfMapsActivationTypesOnly) {
  gpu::ActType t = gpu::ActType::kF32;
  ASSERT_TRUE(ActTypeOf(DType::kBF16, &t).ok());
  EXPECT_EQ(t, gpu::ActType::kBF16);
  ASSERT_TRUE(ActTypeOf(DType::kF16, &t).ok());
  EXPECT_EQ(t, gpu::ActType::kF16);
  ASSERT_TRUE(ActTypeOf(DType::kF32, &t).ok());
  EXPECT_EQ(t, gpu::ActType::kF32);
  const absl::Status s = ActTypeOf(DType::kI8, &t);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("not an activation type"), absl::string_view::npos) << s;
}

TEST(OpsCudaPlanningTest, PlanAttentionTilesCutsRunsOfOneSequence) {
  // Sequence 0 at 0..4, sequence 1 at 7, 8, sequence 0 again at 5 (a new run), sequence 2 at 3, 5
  // (not consecutive).
  const std::vector<int32_t> seq = {0, 0, 0, 0, 0, 1, 1, 0, 2, 2};
  const std::vector<int32_t> pos = {0, 1, 2, 3, 4, 7, 8, 5, 3, 5};
  EXPECT_EQ(PlanAttentionTiles(seq, pos, 2),
            (std::vector<int32_t>{0, 2, 2, 2, 4, 1, 5, 2, 7, 1, 8, 1, 9, 1}));
  EXPECT_EQ(PlanAttentionTiles(seq, pos, 16), (std::vector<int32_t>{0, 5, 5, 2, 7, 1, 8, 1, 9, 1}));
  EXPECT_EQ(PlanAttentionTiles(seq, pos, 1).size(), 2 * seq.size());
  EXPECT_TRUE(PlanAttentionTiles({}, {}, 4).empty());
}

TEST(OpsCudaPlanningTest, TileTokensFitOneBlock) {
  for (const int64_t head_dim : {16, 32, 64, 128, 256}) {
    for (const int64_t group : {1, 2, 4, 8}) {
      const int64_t tokens = AttentionTileTokens(head_dim, group);
      EXPECT_GE(tokens, 1);
      EXPECT_LE(tokens * group, gpu::PagedAttentionMaxRows(head_dim))
          << "head_dim " << head_dim << " group " << group;
    }
  }
}

TEST(OpsCudaPlanningTest, TensorCoreKernelTakesPlannedSixteenBitTilesOnly) {
  for (const int64_t group : {1, 2, 3, 4, 7, 8, 16, 64}) {
    const int64_t tokens = AttentionMmaTileTokens(group);
    EXPECT_GE(tokens, 1);
    EXPECT_LE(tokens * group, gpu::kPagedAttentionMmaRows) << "group " << group;
    EXPECT_GT((tokens + 1) * group, gpu::kPagedAttentionMmaRows) << "group " << group;
  }
  alignas(16) static const uint16_t q[64] = {};
  const int32_t tiles[2] = {0, 1};
  int32_t meta[4] = {};
  // Llama-3-8B's prefill: 32 heads over 8 KV heads of 128 dims, bf16, tiles of 16 tokens (the
  // pointers are host dummies: nothing here launches).
  gpu::PagedAttentionArgs a;
  a.num_tokens = 32;
  a.num_heads = 32;
  a.num_kv_heads = 8;
  a.head_dim = 128;
  a.act = gpu::ActType::kBF16;
  a.q = q;
  a.q_stride = a.out_stride = 1 << 16;
  a.k_cache = a.v_cache = q;
  a.out = const_cast<uint16_t*>(q);
  a.token_seq = a.token_pos = a.block_tables = meta;
  a.block_tokens = 16;
  a.num_blocks = 1;
  a.num_seqs = 1;
  a.max_blocks_per_seq = 1;
  a.tiles = tiles;
  a.num_tiles = 2;
  a.tile_tokens = AttentionMmaTileTokens(4);
  a.mma_prefill = true;
  EXPECT_TRUE(gpu::PagedAttentionUsesMmaKernel(a));
  a.act = gpu::ActType::kF16;
  EXPECT_TRUE(gpu::PagedAttentionUsesMmaKernel(a));
  // Its split-K workspace holds 64 rows per (tile, KV head, partition).
  a.num_partitions = 3;
  a.partition_keys = 128;
  EXPECT_EQ(gpu::PagedAttentionWorkspaceFloats(a), 2 * 8 * 3 * 64 * (128 + 2));
  a.num_partitions = 1;
  a.partition_keys = 0;
  // Each of these sends the arguments to the CUDA-core kernels, and where the tiles hold more rows
  // than those kernels do (16 at head_dim 128), PagedAttentionCuda refuses them before any launch
  // rather than drop rows.
  const std::vector<std::pair<const char*, std::function<void(gpu::PagedAttentionArgs&)>>> off = {
      {"option off", [](gpu::PagedAttentionArgs& x) { x.mma_prefill = false; }},
      {"f32", [](gpu::PagedAttentionArgs& x) { x.act = gpu::ActType::kF32; }},
      {"head_dim 256", [](gpu::PagedAttentionArgs& x) { x.head_dim = 256; }},
      {"one tile per token", [](gpu::PagedAttentionArgs& x) { x.tiles = nullptr; }},
      {"tiles over 64 rows", [](gpu::PagedAttentionArgs& x) { x.tile_tokens = 17; }},
      {"odd query stride", [](gpu::PagedAttentionArgs& x) { x.q_stride = 6145; }},
      {"misaligned query", [](gpu::PagedAttentionArgs& x) { x.q = q + 1; }},
      {"group over 64",
       [](gpu::PagedAttentionArgs& x) {
         x.num_heads = 128;
         x.num_kv_heads = 1;
         x.tile_tokens = 1;
       }},
  };
  int refused = 0;
  for (const auto& [name, change] : off) {
    gpu::PagedAttentionArgs b = a;
    change(b);
    EXPECT_FALSE(gpu::PagedAttentionUsesMmaKernel(b)) << name;
    if (b.tiles == nullptr) continue;
    const absl::Status st = PagedAttentionCuda(b, CudaStreamHandle{});
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << name << ": " << st;
    EXPECT_NE(st.message().find("tile_tokens x group"), absl::string_view::npos) << st;
    ++refused;
  }
  EXPECT_EQ(refused, 7);
}

TEST(OpsCudaPlanningTest, ChooseAttentionPartitionsCoversTheKeys) {
  for (const int64_t num_tiles : {1, 5, 64, 300}) {
    for (const int64_t num_kv_heads : {1, 8}) {
      for (const int64_t max_keys : {1, 256, 257, 700, 4096, 131072}) {
        SCOPED_TRACE(::testing::Message() << "tiles " << num_tiles << " kv heads " << num_kv_heads
                                          << " max_keys " << max_keys);
        gpu::PagedAttentionArgs a;
        a.num_tiles = num_tiles;
        a.num_kv_heads = num_kv_heads;
        ChooseAttentionPartitions(max_keys, 132, &a);
        if (a.num_partitions == 1) continue;
        EXPECT_GT(a.num_partitions, 1);
        EXPECT_LE(a.num_partitions, 65535);
        EXPECT_EQ(a.partition_keys % 128, 0);
        EXPECT_EQ(a.partition_keys, 128);
        EXPECT_LE(a.num_partitions, (max_keys + 127) / 128) << "a partition with no keys";
        EXPECT_LT(num_tiles * num_kv_heads, 2 * 132) << "split although the tiles fill the GPU";
      }
    }
  }
  gpu::PagedAttentionArgs decode;
  decode.num_tiles = 5;
  decode.num_kv_heads = 2;
  ChooseAttentionPartitions(700, 132, &decode);
  EXPECT_GT(decode.num_partitions, 1);
  // The decode kernel splits in units of 64 keys: batch 1 of Llama-3-8B over 512 keys gets 8.
  gpu::PagedAttentionArgs b1;
  b1.num_tiles = 1;
  b1.num_heads = 32;
  b1.num_kv_heads = 8;
  b1.decode_kernel = true;
  ChooseAttentionPartitions(512, 132, &b1);
  EXPECT_EQ(b1.partition_keys, 64);
  EXPECT_EQ(b1.num_partitions, 8);
  // Not for planned tiles (prefill) or groups over 8: the tiled kernel's 128.
  b1.tiles = reinterpret_cast<const int32_t*>(&b1);
  ChooseAttentionPartitions(512, 132, &b1);
  EXPECT_EQ(b1.partition_keys, 128);
}

#else  // !STRATA_HAVE_CUDA

TEST(OpsCudaPlanningTest, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
