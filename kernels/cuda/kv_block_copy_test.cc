// Differential test of KvBlockCopyCuda against the CPU reference over a sweep of shapes (segment
// counts and sizes of real models, block counts past one wave), gathering into a poisoned packed
// buffer and scattering into a poisoned cache. Needs a GPU: tagged "gpu"; skipped where the build
// has no CUDA or the machine has no usable device.
#include "kernels/kv_block_copy.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

class KvBlockCopyCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
  }
};

TEST_F(KvBlockCopyCudaTest, MatchesCpuReferenceBothWays) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  ASSERT_TRUE(stream.ok()) << stream.status();
  struct Shape {
    int64_t segments, segment_bytes, cache_blocks, num_blocks;
  };
  // strata-tiny (8 x 8 KiB), Llama-3-8B bf16 (64 x 32 KiB), odd sizes, one block, many blocks.
  for (const Shape& sh : {Shape{8, 8192, 64, 17}, Shape{64, 32768, 40, 33}, Shape{3, 48, 9, 1},
                          Shape{2, 16, 5000, 4000}}) {
    SCOPED_TRACE(::testing::Message() << sh.segments << " segments of " << sh.segment_bytes
                                      << " bytes, " << sh.num_blocks << " blocks");
    const int64_t seg_bytes_total = sh.cache_blocks * sh.segment_bytes;
    std::vector<std::vector<uint8_t>> host(sh.segments, std::vector<uint8_t>(seg_bytes_total));
    for (auto& seg : host) {
      for (auto& b : seg) b = static_cast<uint8_t>(rng());
    }
    std::vector<int32_t> ids(sh.num_blocks);
    std::vector<int32_t> perm(sh.cache_blocks);
    for (int32_t i = 0; i < sh.cache_blocks; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);  // distinct ids, so scatter is well defined
    for (int64_t i = 0; i < sh.num_blocks; ++i) ids[i] = perm[i];

    // Device copies of the cache, its pointer table, the ids.
    std::vector<DeviceBuffer> dsegs;
    std::vector<void*> dptrs;
    for (const auto& seg : host) {
      auto b = DeviceBuffer::Allocate(seg.size());
      ASSERT_TRUE(b.ok());
      ASSERT_TRUE(b->CopyFromHost(seg.data(), seg.size()).ok());
      dptrs.push_back(b->data());
      dsegs.push_back(*std::move(b));
    }
    auto dtable = DeviceBuffer::Allocate(dptrs.size() * sizeof(void*));
    auto dids = DeviceBuffer::Allocate(ids.size() * sizeof(int32_t));
    const size_t packed_bytes = sh.num_blocks * sh.segments * sh.segment_bytes;
    auto dpacked = DeviceBuffer::Allocate(packed_bytes);
    ASSERT_TRUE(dtable.ok() && dids.ok() && dpacked.ok());
    ASSERT_TRUE(dtable->CopyFromHost(dptrs.data(), dptrs.size() * sizeof(void*)).ok());
    ASSERT_TRUE(dids->CopyFromHost(ids.data(), ids.size() * sizeof(int32_t)).ok());
    ASSERT_TRUE(dpacked->Fill(0xA5).ok());

    // Gather on both, compare.
    std::vector<void*> hptrs;
    for (auto& seg : host) hptrs.push_back(seg.data());
    std::vector<uint8_t> want(packed_bytes);
    KvBlockCopyParams p;
    p.direction = KvBlockCopyDirection::kGather;
    p.num_segments = sh.segments;
    p.segment_bytes = sh.segment_bytes;
    p.cache_blocks = sh.cache_blocks;
    p.num_blocks = sh.num_blocks;
    p.segments = hptrs.data();
    p.block_ids = ids.data();
    p.packed = want.data();
    ASSERT_TRUE(KvBlockCopyCpu(p).ok());
    KvBlockCopyParams d = p;
    d.segments = static_cast<void* const*>(dtable->data());
    d.block_ids = dids->as<int32_t>();
    d.packed = dpacked->data();
    ASSERT_TRUE(KvBlockCopyCuda(d, stream->handle()).ok());
    ASSERT_TRUE(stream->Synchronize().ok());
    std::vector<uint8_t> got(packed_bytes);
    ASSERT_TRUE(dpacked->CopyToHost(got.data(), packed_bytes).ok());
    ASSERT_EQ(got, want);

    // Scatter fresh random blocks into a poisoned device cache; the named blocks must hold them
    // and every other byte keep the poison.
    for (auto& b : want) b = static_cast<uint8_t>(rng());
    ASSERT_TRUE(dpacked->CopyFromHost(want.data(), packed_bytes).ok());
    for (auto& seg : dsegs) ASSERT_TRUE(seg.Fill(0x5A).ok());
    d.direction = KvBlockCopyDirection::kScatter;
    ASSERT_TRUE(KvBlockCopyCuda(d, stream->handle()).ok());
    ASSERT_TRUE(stream->Synchronize().ok());
    std::vector<std::vector<uint8_t>> expect(sh.segments,
                                             std::vector<uint8_t>(seg_bytes_total, 0x5A));
    std::vector<void*> eptrs;
    for (auto& seg : expect) eptrs.push_back(seg.data());
    p.direction = KvBlockCopyDirection::kScatter;
    p.segments = eptrs.data();
    p.packed = want.data();
    ASSERT_TRUE(KvBlockCopyCpu(p).ok());
    for (int64_t s = 0; s < sh.segments; ++s) {
      std::vector<uint8_t> seg(seg_bytes_total);
      ASSERT_TRUE(dsegs[s].CopyToHost(seg.data(), seg.size()).ok());
      ASSERT_EQ(seg, expect[s]) << "segment " << s;
    }
  }
}

TEST_F(KvBlockCopyCudaTest, HostPointersAreRefused) {
  std::vector<uint8_t> seg(64);
  void* ptrs[1] = {seg.data()};
  int32_t id = 0;
  alignas(16) uint8_t packed[16];
  KvBlockCopyParams p;
  p.num_segments = 1;
  p.segment_bytes = 16;
  p.cache_blocks = 4;
  p.num_blocks = 1;
  p.segments = ptrs;
  p.block_ids = &id;
  p.packed = packed;
  EXPECT_TRUE(absl::IsInvalidArgument(KvBlockCopyCuda(p, nullptr)));
}

#else  // !STRATA_HAVE_CUDA

TEST(KvBlockCopyCudaTest, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
