#include "kernels/kv_block_copy.h"

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

// A paged cache of `segments` arrays, each [blocks, bytes], filled with distinct bytes.
struct Cache {
  Cache(int64_t segments, int64_t blocks, int64_t bytes, uint32_t seed) {
    std::mt19937 rng(seed);
    for (int64_t s = 0; s < segments; ++s) {
      data.emplace_back(blocks * bytes);
      for (auto& b : data.back()) b = static_cast<uint8_t>(rng());
    }
    for (auto& d : data) ptrs.push_back(d.data());
  }
  std::vector<std::vector<uint8_t>> data;
  std::vector<void*> ptrs;
};

TEST(KvBlockCopyCpuTest, GatherPacksSegmentsBackToBackAndScatterPutsThemBack) {
  constexpr int64_t kSegments = 3, kBlocks = 5, kBytes = 32;
  Cache cache(kSegments, kBlocks, kBytes, 1);
  const std::vector<int32_t> ids = {4, 0, 4};
  alignas(16) std::vector<uint8_t> packed(ids.size() * kSegments * kBytes, 0xEE);
  KvBlockCopyParams p;
  p.direction = KvBlockCopyDirection::kGather;
  p.num_segments = kSegments;
  p.segment_bytes = kBytes;
  p.cache_blocks = kBlocks;
  p.num_blocks = static_cast<int64_t>(ids.size());
  p.segments = cache.ptrs.data();
  p.block_ids = ids.data();
  p.packed = packed.data();
  ASSERT_TRUE(KvBlockCopyCpu(p).ok());
  for (size_t i = 0; i < ids.size(); ++i) {
    for (int64_t s = 0; s < kSegments; ++s) {
      for (int64_t b = 0; b < kBytes; ++b) {
        ASSERT_EQ(packed[(i * kSegments + s) * kBytes + b], cache.data[s][ids[i] * kBytes + b]);
      }
    }
  }
  // Scatter the first two packed blocks into blocks 2 and 3 of a fresh cache.
  Cache other(kSegments, kBlocks, kBytes, 2);
  const std::vector<int32_t> to = {2, 3};
  p.direction = KvBlockCopyDirection::kScatter;
  p.num_blocks = 2;
  p.segments = other.ptrs.data();
  p.block_ids = to.data();
  ASSERT_TRUE(KvBlockCopyCpu(p).ok());
  for (int64_t s = 0; s < kSegments; ++s) {
    for (int64_t b = 0; b < kBytes; ++b) {
      EXPECT_EQ(other.data[s][2 * kBytes + b], cache.data[s][4 * kBytes + b]);
      EXPECT_EQ(other.data[s][3 * kBytes + b], cache.data[s][0 * kBytes + b]);
    }
  }
  const Cache untouched(kSegments, kBlocks, kBytes, 2);
  for (int64_t s = 0; s < kSegments; ++s) {
    for (int64_t b : {int64_t{0}, int64_t{1}, int64_t{4}}) {
      EXPECT_EQ(0, std::memcmp(other.data[s].data() + b * kBytes,
                               untouched.data[s].data() + b * kBytes, kBytes));
    }
  }
}

TEST(KvBlockCopyCpuTest, BadParametersAreRefusedNamingTheField) {
  Cache cache(2, 4, 16, 3);
  std::vector<int32_t> ids = {1};
  alignas(16) uint8_t packed[32];
  KvBlockCopyParams p;
  p.num_segments = 2;
  p.segment_bytes = 16;
  p.cache_blocks = 4;
  p.num_blocks = 1;
  p.segments = cache.ptrs.data();
  p.block_ids = ids.data();
  p.packed = packed;
  EXPECT_TRUE(KvBlockCopyCpu(p).ok());
  KvBlockCopyParams q = p;
  q.segment_bytes = 24;
  EXPECT_NE(KvBlockCopyCpu(q).message().find("segment_bytes"), absl::string_view::npos);
  q = p;
  ids[0] = 4;
  const absl::Status s = KvBlockCopyCpu(q);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("block_ids[0]"), absl::string_view::npos) << s;
  q = p;
  q.packed = packed + 1;
  EXPECT_NE(KvBlockCopyCpu(q).message().find("aligned"), absl::string_view::npos);
  q = p;
  q.num_blocks = 0;
  q.segments = nullptr;
  EXPECT_TRUE(KvBlockCopyCpu(q).ok());  // nothing to move
}

}  // namespace
}  // namespace strata
