#include "coordinator/block_index.h"

#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(BlockIndexTest, StoredRemovedAndCountsPerTier) {
  BlockIndex index;
  index.Stored(0, Tier::kDevice, {1, 2, 3});
  index.Stored(0, Tier::kHost, {3});
  index.Stored(1, Tier::kDisk, {2});
  EXPECT_EQ(index.Find(3, 0), 0b011);
  EXPECT_EQ(index.Find(2, 1), 0b100);
  EXPECT_EQ(index.Find(2, 2), 0);
  EXPECT_EQ(index.NumBlocks(0, Tier::kDevice), 3);
  EXPECT_EQ(index.NumBlocks(0, Tier::kHost), 1);
  // Duplicate stored events do not double count; removals of unknown blocks are ignored.
  index.Stored(0, Tier::kDevice, {1});
  index.Removed(0, Tier::kDevice, {3, 99});
  EXPECT_EQ(index.NumBlocks(0, Tier::kDevice), 2);
  EXPECT_EQ(index.Find(3, 0), 0b010);
  index.Removed(0, Tier::kHost, {3});
  EXPECT_EQ(index.Find(3, 0), 0);
  EXPECT_EQ(index.num_hashes(), 2);  // 1 and 2
}

TEST(BlockIndexTest, DropWorkerForgetsOnlyThatWorkerAndKeepsPending) {
  BlockIndex index;
  index.Stored(0, Tier::kDevice, {1, 2});
  index.Stored(1, Tier::kDevice, {1});
  index.AddPending(0, {5});
  index.DropWorker(0);
  EXPECT_EQ(index.Find(1, 0), 0);
  EXPECT_EQ(index.Find(1, 1), 0b001);
  EXPECT_EQ(index.Find(5, 0), 0b001);
  EXPECT_EQ(index.NumBlocks(0, Tier::kDevice), 0);
  index.RemovePending(0, {5});
  EXPECT_EQ(index.Find(5, 0), 0);
  EXPECT_EQ(index.num_hashes(), 1);
}

TEST(BlockIndexTest, PendingIsReferenceCountedAndIndependentOfEvents) {
  BlockIndex index;
  index.AddPending(2, {7});
  index.AddPending(2, {7});
  index.Stored(2, Tier::kDevice, {7});
  index.Removed(2, Tier::kDevice, {7});
  EXPECT_EQ(index.Find(7, 2), 0b001);  // still pending twice
  EXPECT_EQ(index.Pending(7, 2), 2);
  EXPECT_EQ(index.Pending(7, 3), 0);
  index.RemovePending(2, {7});
  EXPECT_EQ(index.Find(7, 2), 0b001);
  index.RemovePending(2, {7});
  EXPECT_EQ(index.Find(7, 2), 0);
  EXPECT_EQ(index.num_hashes(), 0);
}

TEST(BlockIndexTest, PrefixOverlapStopsAtTheFirstMissingBlockPerWorker) {
  BlockIndex index;
  index.Stored(0, Tier::kDevice, {10, 11});
  index.Stored(0, Tier::kHost, {12});
  index.Stored(0, Tier::kDisk, {12, 13});
  index.Stored(1, Tier::kDevice, {11, 12, 13});  // lacks the first block
  index.Stored(2, Tier::kDisk, {10});
  const std::vector<BlockHash> chain = {10, 11, 12, 13, 14};
  const std::vector<WorkerSlot> workers = {0, 1, 2, 3};
  const auto overlap = index.PrefixOverlap(chain, workers);
  EXPECT_EQ(overlap[0], (std::array<int64_t, 3>{2, 1, 1}));  // 12's fastest copy is on host
  EXPECT_EQ(overlap[1], (std::array<int64_t, 3>{0, 0, 0}));
  EXPECT_EQ(overlap[2], (std::array<int64_t, 3>{0, 0, 1}));
  EXPECT_EQ(overlap[3], (std::array<int64_t, 3>{0, 0, 0}));
}

}  // namespace
}  // namespace strata
