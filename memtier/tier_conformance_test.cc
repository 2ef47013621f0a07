// The BlockTier contract (block_tier.h), run against every tier: device, host and disk, raw and
// quantized. A tier that passes here can sit under the KV store.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "memtier/block_tier.h"
#include "memtier/device_tier.h"
#include "memtier/disk_tier.h"
#include "memtier/host_tier.h"
#include "memtier/kv_codec.h"
#include "tests/test_dir.h"

namespace strata {
namespace {

constexpr KvBlockLayout kLayout{4, 16, 2, 8};  // 4 KiB raw
constexpr int64_t kSlots = 16;

struct TierCase {
  std::string name;
  KvBlockLayout layout;
  KvCompression compression;
  // Opens the tier; `dir` is the same for every call of one test (reopening finds the same file).
  std::function<absl::StatusOr<std::unique_ptr<BlockTier>>(const std::string& dir)> open;
};

void PrintTo(const TierCase& c, std::ostream* os) { *os << c.name; }

std::vector<TierCase> Cases() {
  std::vector<TierCase> cases;
  // f32 blocks (the CPU engine's) and bf16 blocks (a GPU engine's).
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    KvBlockLayout layout = kLayout;
    layout.dtype = dtype;
    const std::string prefix = dtype == DType::kF32 ? "" : "bf16_";
    cases.push_back({prefix + "device", layout, KvCompression::kNone, [layout](const std::string&) {
                       DeviceTierConfig c;
                       c.layout = layout;
                       c.num_slots = kSlots;
                       return absl::StatusOr<std::unique_ptr<BlockTier>>(DeviceTier::Create(c));
                     }});
    // GPU memory: skipped where there is no CUDA device (see SetUp).
    cases.push_back(
        {prefix + "device_gpu", layout, KvCompression::kNone, [layout](const std::string&) {
           DeviceTierConfig c;
           c.layout = layout;
           c.num_slots = kSlots;
           c.gpu_memory = true;
           return absl::StatusOr<std::unique_ptr<BlockTier>>(DeviceTier::Create(c));
         }});
    for (KvCompression comp :
         {KvCompression::kNone, KvCompression::kInt8, KvCompression::kFp8E4M3}) {
      const std::string suffix(KvCompressionName(comp));
      cases.push_back({prefix + "host_" + suffix, layout, comp, [layout, comp](const std::string&) {
                         HostTierConfig c;
                         c.codec = KvCodec(layout, comp);
                         c.num_slots = kSlots;
                         return absl::StatusOr<std::unique_ptr<BlockTier>>(HostTier::Create(c));
                       }});
      cases.push_back(
          {prefix + "disk_" + suffix, layout, comp, [layout, comp](const std::string& dir) {
             DiskTierConfig c;
             c.path = dir + "/slots";
             c.codec = KvCodec(layout, comp);
             c.num_slots = kSlots;
             c.queue_depth = 4;
             return absl::StatusOr<std::unique_ptr<BlockTier>>(DiskTier::Open(c));
           }});
    }
  }
  return cases;
}

// Element i of a raw block, as a float.
float ElementOf(const KvBlockLayout& layout, const std::vector<uint8_t>& block, size_t i) {
  if (layout.dtype == DType::kF32) {
    float f;
    std::memcpy(&f, block.data() + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, block.data() + 2 * i, 2);
  return Bf16ToFloat(h);
}

std::vector<uint8_t> RandomBlock(const KvBlockLayout& layout, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<uint8_t> out(layout.block_bytes());
  for (int64_t i = 0; i < layout.num_segments * layout.segment_elements(); ++i) {
    const float x = dist(rng);
    if (layout.dtype == DType::kF32) {
      std::memcpy(out.data() + 4 * i, &x, 4);
    } else {
      const uint16_t h = FloatToBf16(x);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

BlockKey KeyOf(uint32_t i) { return BlockKey{0x9e3779b97f4a7c15ull * (i + 1), 77}; }

class TierConformanceTest : public ::testing::TestWithParam<TierCase> {
 protected:
  void SetUp() override {
    dir_ = FreshTestDir();
    Open();
  }
  void Open() {
    tier_.reset();
    auto t = GetParam().open(dir_);
    if (GetParam().name.find("device_gpu") != std::string::npos &&
        absl::IsUnavailable(t.status())) {
      GTEST_SKIP() << "no CUDA device: " << t.status();
    }
    ASSERT_TRUE(t.ok()) << t.status();
    tier_ = *std::move(t);
  }
  // Runs one operation to completion; its status.
  absl::Status WriteNow(int64_t slot, BlockKey key, const std::vector<uint8_t>& payload) {
    absl::Status result = absl::InternalError("callback never ran");
    tier_->Write(slot, key, payload, [&result](absl::Status s) { result = std::move(s); });
    tier_->Flush();
    return result;
  }
  absl::Status ReadNow(int64_t slot, BlockKey key, std::vector<uint8_t>* out) {
    out->assign(tier_->payload_bytes(), 0xAB);  // poisoned
    absl::Status result = absl::InternalError("callback never ran");
    tier_->Read(slot, key, absl::MakeSpan(*out),
                [&result](absl::Status s) { result = std::move(s); });
    tier_->Flush();
    return result;
  }
  void ExpectSameBlock(const std::vector<uint8_t>& want, const std::vector<uint8_t>& got) {
    ASSERT_EQ(want.size(), got.size());
    if (GetParam().compression == KvCompression::kNone) {
      EXPECT_EQ(0, std::memcmp(want.data(), got.data(), want.size()));
      return;
    }
    const KvBlockLayout& l = GetParam().layout;
    const size_t n = static_cast<size_t>(l.num_segments * l.segment_elements());
    float amax = 0;
    for (size_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(ElementOf(l, want, i)));
    int bad = 0;
    for (size_t i = 0; i < n; ++i) {
      const float a = ElementOf(l, want, i), b = ElementOf(l, got, i);
      if (std::fabs(a - b) > 0.07f * std::fabs(a) + 0.005f * amax) ++bad;
    }
    EXPECT_EQ(bad, 0);
  }

  std::vector<uint8_t> RandomBlock(int64_t seed) const {
    return ::strata::RandomBlock(GetParam().layout, static_cast<uint32_t>(seed));
  }

  std::string dir_;
  std::unique_ptr<BlockTier> tier_;
};

TEST_P(TierConformanceTest, EveryBlockReadsBackAsWritten) {
  std::vector<std::vector<uint8_t>> blocks;
  int callbacks = 0;
  for (int64_t s = 0; s < kSlots; ++s) {
    blocks.push_back(RandomBlock(static_cast<uint32_t>(s)));
    tier_->Write(s, KeyOf(s), blocks.back(), [&callbacks](absl::Status st) {
      EXPECT_TRUE(st.ok()) << st;
      ++callbacks;
    });
  }
  tier_->Flush();
  EXPECT_EQ(callbacks, kSlots);
  EXPECT_EQ(tier_->in_flight(), 0);
  std::vector<std::vector<uint8_t>> out(kSlots);
  for (int64_t s = kSlots - 1; s >= 0; --s) {
    out[s].assign(tier_->payload_bytes(), 0xCD);
    tier_->Read(s, KeyOf(s), absl::MakeSpan(out[s]),
                [](absl::Status st) { EXPECT_TRUE(st.ok()) << st; });
  }
  EXPECT_EQ(tier_->in_flight(), kSlots);
  tier_->Flush();
  for (int64_t s = 0; s < kSlots; ++s) ExpectSameBlock(blocks[s], out[s]);
}

TEST_P(TierConformanceTest, CallbacksRunOnceAndOnlyFromPoll) {
  int runs = 0;
  const std::vector<uint8_t> block = RandomBlock(1);
  tier_->Write(3, KeyOf(3), block, [&runs](absl::Status) { ++runs; });
  EXPECT_EQ(runs, 0);  // never inside Write
  tier_->Flush();
  EXPECT_EQ(runs, 1);
  tier_->Flush();
  EXPECT_EQ(tier_->Poll(), 0);
  EXPECT_EQ(runs, 1);
  // A callback may issue the next operation.
  std::vector<uint8_t> out(tier_->payload_bytes());
  bool read_ok = false;
  tier_->Write(4, KeyOf(4), block, [&](absl::Status) {
    tier_->Read(4, KeyOf(4), absl::MakeSpan(out), [&](absl::Status s) { read_ok = s.ok(); });
  });
  tier_->Flush();
  EXPECT_TRUE(read_ok);
  ExpectSameBlock(block, out);
}

TEST_P(TierConformanceTest, MissesAreNotFoundOrDataLossNeverData) {
  std::vector<uint8_t> out;
  EXPECT_TRUE(absl::IsNotFound(ReadNow(5, KeyOf(5), &out))) << ReadNow(5, KeyOf(5), &out);
  ASSERT_TRUE(WriteNow(5, KeyOf(5), RandomBlock(5)).ok());
  BlockKey other_hash = KeyOf(5);
  other_hash.hash ^= 1;
  BlockKey other_namespace = KeyOf(5);
  other_namespace.cache_namespace ^= 1;
  EXPECT_TRUE(absl::IsDataLoss(ReadNow(5, other_hash, &out)));
  EXPECT_TRUE(absl::IsDataLoss(ReadNow(5, other_namespace, &out)));
  EXPECT_TRUE(ReadNow(5, KeyOf(5), &out).ok());
}

TEST_P(TierConformanceTest, OverwriteReplacesTheBlock) {
  const std::vector<uint8_t> a = RandomBlock(10), b = RandomBlock(11);
  ASSERT_TRUE(WriteNow(7, KeyOf(10), a).ok());
  ASSERT_TRUE(WriteNow(7, KeyOf(11), b).ok());
  std::vector<uint8_t> out;
  EXPECT_TRUE(absl::IsDataLoss(ReadNow(7, KeyOf(10), &out)));
  ASSERT_TRUE(ReadNow(7, KeyOf(11), &out).ok());
  ExpectSameBlock(b, out);
}

TEST_P(TierConformanceTest, BadSlotsAndSizesAreInvalidArgument) {
  const std::vector<uint8_t> block = RandomBlock(2);
  EXPECT_TRUE(absl::IsInvalidArgument(WriteNow(-1, KeyOf(0), block)));
  EXPECT_TRUE(absl::IsInvalidArgument(WriteNow(kSlots, KeyOf(0), block)));
  std::vector<uint8_t> shorter(block.begin(), block.end() - 4);
  EXPECT_TRUE(absl::IsInvalidArgument(WriteNow(0, KeyOf(0), shorter)));
  std::vector<uint8_t> out;
  EXPECT_TRUE(absl::IsInvalidArgument(ReadNow(kSlots, KeyOf(0), &out)));
  out.assign(tier_->payload_bytes() + 1, 0);
  absl::Status st;
  tier_->Read(0, KeyOf(0), absl::MakeSpan(out), [&st](absl::Status s) { st = std::move(s); });
  tier_->Flush();
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  // And the tier goes on working.
  EXPECT_TRUE(WriteNow(0, KeyOf(0), block).ok());
}

TEST_P(TierConformanceTest, SizesAreConsistent) {
  EXPECT_EQ(tier_->num_slots(), kSlots);
  EXPECT_EQ(tier_->payload_bytes(), GetParam().layout.block_bytes());
  EXPECT_GE(tier_->slot_bytes(),
            KvCodec(GetParam().layout, GetParam().compression).encoded_bytes());
  if (GetParam().compression != KvCompression::kNone) {
    // Quantized slots take at most half the raw bytes plus the header's page.
    EXPECT_LE(tier_->slot_bytes(), GetParam().layout.block_bytes() / 2 + 4096);
  }
}

TEST_P(TierConformanceTest, PersistentTiersFindTheirBlocksAfterReopening) {
  for (int64_t s = 0; s < 6; ++s) ASSERT_TRUE(WriteNow(s, KeyOf(s), RandomBlock(s)).ok());
  Open();
  const std::vector<StoredSlot> found = tier_->Scan();
  if (!tier_->persistent()) {
    EXPECT_TRUE(found.empty());
    return;
  }
  ASSERT_EQ(found.size(), 6u);
  for (const StoredSlot& f : found) {
    EXPECT_EQ(f.key, KeyOf(f.slot));
    std::vector<uint8_t> out;
    ASSERT_TRUE(ReadNow(f.slot, f.key, &out).ok());
    ExpectSameBlock(RandomBlock(f.slot), out);
  }
}

// The host tier's in-place access for raw blocks (KvStore copies device blocks straight into and
// out of slot images): a payload filled in place and sealed reads back through Read, Check finds
// an unwritten slot, another key and a damaged byte, and compressed pools refuse it.
TEST(HostTierInPlaceTest, RawImagesAreFilledSealedAndCheckedInPlace) {
  HostTierConfig c;
  c.codec = KvCodec(kLayout, KvCompression::kNone);
  c.num_slots = 4;
  auto host = HostTier::Create(c);
  ASSERT_TRUE(host.ok()) << host.status();
  HostTier& h = **host;
  ASSERT_TRUE(h.stores_raw());
  const std::vector<uint8_t> block = RandomBlock(kLayout, 7);
  const BlockKey key{0x1234, 5};
  EXPECT_TRUE(absl::IsNotFound(h.Check(1, key))) << h.Check(1, key);
  absl::Span<uint8_t> payload = h.raw_payload(1);
  ASSERT_EQ(payload.size(), block.size());
  std::copy(block.begin(), block.end(), payload.begin());
  ASSERT_TRUE(h.Seal(1, key).ok());
  EXPECT_TRUE(h.Check(1, key).ok());
  std::vector<uint8_t> out(block.size());
  absl::Status r = absl::InternalError("no callback");
  h.Read(1, key, absl::MakeSpan(out), [&r](absl::Status s) { r = std::move(s); });
  h.Poll();
  ASSERT_TRUE(r.ok()) << r;
  EXPECT_EQ(out, block);
  EXPECT_TRUE(absl::IsDataLoss(h.Check(1, BlockKey{0x9999, 5})));
  payload[100] ^= 1;
  const absl::Status damaged = h.Check(1, key);
  EXPECT_TRUE(absl::IsDataLoss(damaged)) << damaged;
  EXPECT_NE(damaged.message().find("slot 1"), std::string::npos) << damaged;
  EXPECT_TRUE(absl::IsInvalidArgument(h.Seal(9, key)));
  EXPECT_TRUE(h.raw_payload(9).empty());

  c.codec = KvCodec(kLayout, KvCompression::kInt8);
  auto quantized = HostTier::Create(c);
  ASSERT_TRUE(quantized.ok()) << quantized.status();
  EXPECT_FALSE((*quantized)->stores_raw());
  EXPECT_TRUE((*quantized)->raw_payload(0).empty());
  EXPECT_TRUE(absl::IsFailedPrecondition((*quantized)->Seal(0, key)));
}

INSTANTIATE_TEST_SUITE_P(AllTiers, TierConformanceTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<TierCase>& info) {
                           return info.param.name;
                         });

}  // namespace
}  // namespace strata
