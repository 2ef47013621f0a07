#include "worker/engine/block_manager.h"

#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(BlockManagerTest, PublishedBlocksAreSharedAndCachedAfterRelease) {
  BlockManager m(4, 16);
  const int32_t a = *m.Allocate();
  const int32_t b = *m.Allocate();
  m.Publish(a, 100);
  m.Publish(b, 200);
  EXPECT_EQ(m.num_available(), 2);
  const std::vector<BlockHash> chain = {100, 200, 300};
  EXPECT_EQ(m.MatchPrefix(chain), 2);
  // A second sequence shares the prefix.
  const std::vector<int32_t> shared = m.AcquirePrefix(chain, 2);
  EXPECT_EQ(shared, (std::vector<int32_t>{a, b}));
  EXPECT_EQ(m.ref_count(a), 2);
  // Both release: the blocks stay cached and matchable, and count as available.
  for (int i = 0; i < 2; ++i) {
    m.Release(a);
    m.Release(b);
  }
  EXPECT_EQ(m.num_available(), 4);
  EXPECT_EQ(m.MatchPrefix(chain), 2);
  const std::vector<BlockEvent> events = m.DrainEvents();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].kind, BlockEvent::Kind::kStored);
  EXPECT_EQ(events[1].hash, 200u);
}

// With fair eviction, the owner holding the most published blocks loses its cached ones first,
// even when another's are older; one owner alone, or fair eviction off, is plain LRU.
TEST(BlockManagerTest, FairEvictionTakesFromTheLargestOwnerFirst) {
  for (bool fair : {true, false}) {
    SCOPED_TRACE(fair ? "fair" : "lru");
    BlockManager m(8, 16);
    m.SetFairEviction(fair);
    std::vector<int32_t> light, heavy;
    for (int i = 0; i < 2; ++i) {  // light's two blocks, released first (the oldest)
      light.push_back(*m.Allocate());
      m.Publish(light.back(), 100 + i, 0, /*owner=*/1);
    }
    for (int i = 0; i < 6; ++i) {
      heavy.push_back(*m.Allocate());
      m.Publish(heavy.back(), 200 + i, 0, /*owner=*/2);
    }
    for (int32_t b : light) m.Release(b);
    for (int32_t b : heavy) m.Release(b);
    EXPECT_EQ(m.num_published_by(1), 2);
    EXPECT_EQ(m.num_published_by(2), 6);
    // Four new blocks: fair takes heavy's four oldest; LRU takes light's two, then heavy's two.
    for (int i = 0; i < 4; ++i) ASSERT_TRUE(m.Allocate().has_value());
    const std::vector<BlockHash> light_chain = {100, 101};
    EXPECT_EQ(m.MatchPrefix(light_chain), fair ? 2 : 0);
    EXPECT_EQ(m.num_published_by(2), fair ? 2 : 4);
    // Level (two each): then the older of the two owners' least recent blocks goes first.
    if (fair) {
      ASSERT_TRUE(m.Allocate().has_value());
      EXPECT_EQ(m.MatchPrefix(light_chain), 0);  // light's 100 was released before heavy's 204
      EXPECT_EQ(m.num_published_by(1), 1);
    }
  }
}

TEST(BlockManagerTest, AllocationPrefersFreeThenEvictsLeastRecentlyReleased) {
  BlockManager m(3, 16);
  const int32_t a = *m.Allocate();
  const int32_t b = *m.Allocate();
  m.Publish(a, 1);
  m.Publish(b, 2);
  m.Release(b);  // released first: evicted first
  m.Release(a);
  m.DrainEvents();
  const int32_t c = *m.Allocate();  // the free block
  EXPECT_NE(c, a);
  EXPECT_NE(c, b);
  EXPECT_EQ(m.MatchPrefix(std::vector<BlockHash>{1}), 1);
  const int32_t d = *m.Allocate();  // evicts b (hash 2)
  EXPECT_EQ(d, b);
  EXPECT_EQ(m.MatchPrefix(std::vector<BlockHash>{2}), 0);
  const std::vector<BlockEvent> ev = m.DrainEvents();
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0].kind, BlockEvent::Kind::kRemoved);
  EXPECT_EQ(ev[0].hash, 2u);
  std::vector<BlockHash> inventory = m.PublishedHashes();
  EXPECT_EQ(inventory, (std::vector<BlockHash>{1}));
  const int32_t e = *m.Allocate();  // evicts a
  EXPECT_EQ(e, a);
  EXPECT_TRUE(m.PublishedHashes().empty());
  EXPECT_FALSE(m.Allocate().has_value());
}

TEST(BlockManagerTest, AcquiringACachedBlockProtectsItFromEviction) {
  BlockManager m(2, 16);
  const int32_t a = *m.Allocate();
  m.Publish(a, 7);
  m.Release(a);
  const std::vector<BlockHash> h = {7};
  m.AcquirePrefix(h, 1);
  const int32_t b = *m.Allocate();
  EXPECT_NE(b, a);
  EXPECT_FALSE(m.Allocate().has_value());  // a is in use, not evictable
}

TEST(BlockManagerTest, DuplicateHashStaysPrivate) {
  BlockManager m(2, 16);
  const int32_t a = *m.Allocate();
  const int32_t b = *m.Allocate();
  m.Publish(a, 5);
  m.Publish(b, 5);  // same content computed twice: b is not published
  m.Release(b);
  EXPECT_EQ(m.num_cached(), 1);
  EXPECT_EQ(*m.Allocate(), b);  // b went back to the free list
}

}  // namespace
}  // namespace strata
