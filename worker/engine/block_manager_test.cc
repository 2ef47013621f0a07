#include "worker/engine/block_manager.h"

#include <map>
#include <optional>
#include <random>
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
// A hold (a block being copied) takes a reference to a published block, keeps it from eviction
// and counts no hit; an unpublished hash holds nothing.
TEST(BlockManagerTest, AHoldKeepsACachedBlockWithoutCountingAHit) {
  BlockManager m(2, 16);
  const int32_t a = *m.Allocate();
  m.Publish(a, 100);
  m.Release(a);
  EXPECT_FALSE(m.Hold(999).has_value());
  ASSERT_EQ(m.Hold(100), a);
  EXPECT_EQ(m.ref_count(a), 1);
  EXPECT_EQ(m.hit_count(a), 0);
  // The other block is taken, and then nothing: the held one is not evicted.
  EXPECT_TRUE(m.Allocate().has_value());
  EXPECT_FALSE(m.Allocate().has_value());
  m.Release(a);
  EXPECT_EQ(m.Allocate(), a);
}

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

// Random publishes, releases, reuses and evictions across owners: every eviction takes the block
// a straightforward reading of the rule picks (most published blocks, then the oldest release).
TEST(BlockManagerTest, FairEvictionFollowsItsRuleUnderRandomUse) {
  constexpr int kBlocks = 24;
  BlockManager m(kBlocks, 16);
  m.SetFairEviction(true);
  std::mt19937 rng(5);
  struct Model {
    int32_t owner = -1;  // published by; -1: not published
    BlockHash hash = 0;
    int refs = 0;
    uint64_t released = 0;
  };
  std::vector<Model> model(kBlocks);
  uint64_t clock = 0;
  BlockHash next_hash = 1;
  int32_t evicted = -1;
  int evictions = 0;
  m.SetEvictionHook([&](int32_t block, BlockKey, int32_t) {
    evicted = block;
    ++evictions;
  });
  std::vector<int32_t> held;
  for (int step = 0; step < 5000; ++step) {
    const int op = std::uniform_int_distribution<int>(0, 9)(rng);
    if (op < 4) {  // a new block, published by a random owner (an allocation may evict)
      int32_t expect = -1;
      bool any_free = false;
      for (const Model& b : model) any_free = any_free || (b.owner < 0 && b.refs == 0);
      if (!any_free) {
        std::map<int32_t, int64_t> published;
        for (const Model& b : model) {
          if (b.owner >= 0) ++published[b.owner];
        }
        for (int32_t i = 0; i < kBlocks; ++i) {
          const Model& b = model[i];
          if (b.owner < 0 || b.refs > 0) continue;
          if (expect < 0) {
            expect = i;
            continue;
          }
          const Model& e = model[expect];
          if (published[b.owner] > published[e.owner] ||
              (published[b.owner] == published[e.owner] && b.released < e.released)) {
            expect = i;
          }
        }
      }
      evicted = -1;
      std::optional<int32_t> got = m.Allocate();
      if (!got.has_value()) {
        EXPECT_EQ(expect, -1);
        continue;
      }
      EXPECT_EQ(evicted, expect) << "step " << step;
      Model& b = model[*got];
      b = Model{};
      b.refs = 1;
      b.owner = std::uniform_int_distribution<int32_t>(0, 3)(rng);
      b.hash = next_hash++;
      m.Publish(*got, b.hash, 0, b.owner);
      held.push_back(*got);
    } else if (op < 8 && !held.empty()) {  // a release
      const size_t k = std::uniform_int_distribution<size_t>(0, held.size() - 1)(rng);
      const int32_t id = held[k];
      held.erase(held.begin() + static_cast<ptrdiff_t>(k));
      m.Release(id);
      if (--model[id].refs == 0) model[id].released = clock++;
    } else {  // a reuse of a cached block
      for (int32_t i = 0; i < kBlocks; ++i) {
        if (model[i].owner >= 0 && model[i].refs == 0) {
          const std::vector<BlockHash> chain = {model[i].hash};
          EXPECT_EQ(m.AcquirePrefix(chain, 1), std::vector<int32_t>{i});
          ++model[i].refs;
          held.push_back(i);
          break;
        }
      }
    }
  }
  EXPECT_GT(evictions, 500);
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
