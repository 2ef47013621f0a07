#include "memtier/owner_lru.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

std::vector<int64_t> Runs(const OwnerLru& lru, bool fair) {
  std::vector<int64_t> out;
  lru.ForEachRun(fair, [&](const std::list<int64_t>& run) {
    out.insert(out.end(), run.begin(), run.end());
    out.push_back(-1);  // end of a run
    return true;
  });
  return out;
}

std::vector<int64_t> EvictionOrder(const OwnerLru& lru, bool fair) {
  std::vector<int64_t> out;
  lru.ForEachInEvictionOrder(fair, [&](int64_t s) {
    out.push_back(s);
    return true;
  });
  return out;
}

TEST(OwnerLruTest, PlainAndFairOrders) {
  OwnerLru lru(8, /*fair=*/true);
  lru.PushBack(0, 1);
  lru.PushBack(1, 2);
  lru.PushBack(2, 1);
  lru.PushBack(3, 2);
  lru.PushBack(4, 2);
  EXPECT_EQ(Runs(lru, false), (std::vector<int64_t>{0, 1, 2, 3, 4, -1}));
  // Owner 2 holds three slots, owner 1 two.
  EXPECT_EQ(Runs(lru, true), (std::vector<int64_t>{1, 3, 4, -1, 0, 2, -1}));
  EXPECT_EQ(lru.Front(true), 1);
  EXPECT_EQ(lru.Front(false), 0);
  // Evictions one after another: 2's oldest (3 against 2), then a tie taken by the older
  // front (0, of owner 1), then 2's, ...
  EXPECT_EQ(EvictionOrder(lru, true), (std::vector<int64_t>{1, 0, 3, 2, 4}));
  EXPECT_EQ(EvictionOrder(lru, false), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  lru.Touch(1);
  EXPECT_EQ(Runs(lru, false), (std::vector<int64_t>{0, 2, 3, 4, 1, -1}));
  EXPECT_EQ(Runs(lru, true), (std::vector<int64_t>{3, 4, 1, -1, 0, 2, -1}));
  lru.Erase(3);
  lru.Erase(4);
  // Two each: the owner whose oldest slot is older goes first.
  EXPECT_EQ(Runs(lru, true), (std::vector<int64_t>{0, 2, -1, 1, -1}));
  EXPECT_EQ(lru.owner(1), 2);
  EXPECT_TRUE(lru.Contains(1));
  EXPECT_FALSE(lru.Contains(3));
  lru.Clear();
  EXPECT_TRUE(lru.empty());
  EXPECT_EQ(Runs(lru, true), std::vector<int64_t>{});
  lru.PushBack(3, 7);  // reusable after Clear
  EXPECT_EQ(Runs(lru, true), (std::vector<int64_t>{3, -1}));
  EXPECT_EQ(OwnerLru(4).Front(true), -1);
}

// Without fair, owners are recorded but one order serves every question.
TEST(OwnerLruTest, APlainOrderIgnoresOwners) {
  OwnerLru lru(4);
  lru.PushBack(0, 1);
  lru.PushBack(1, 2);
  lru.PushBack(2, 2);
  EXPECT_EQ(lru.owner(2), 2);
  EXPECT_EQ(Runs(lru, true), (std::vector<int64_t>{0, 1, 2, -1}));
  EXPECT_EQ(EvictionOrder(lru, true), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(lru.Front(true), 0);
  lru.Touch(0);
  lru.Erase(1);
  EXPECT_EQ(Runs(lru, true), (std::vector<int64_t>{2, 0, -1}));
}

// Against a plain model: random pushes, touches and erases, checking both orders each time.
TEST(OwnerLruTest, MatchesAModel) {
  constexpr int64_t kSlots = 40;
  OwnerLru lru(kSlots, /*fair=*/true);
  std::vector<std::pair<int64_t, int32_t>> model;  // (slot, owner), oldest first
  std::mt19937 rng(7);
  for (int step = 0; step < 5000; ++step) {
    const int64_t slot = static_cast<int64_t>(rng() % kSlots);
    auto it = std::find_if(model.begin(), model.end(), [&](auto& p) { return p.first == slot; });
    if (it == model.end()) {
      const int32_t owner = static_cast<int32_t>(rng() % 4);
      lru.PushBack(slot, owner);
      model.emplace_back(slot, owner);
    } else if (rng() % 2 == 0) {
      lru.Touch(slot);
      auto p = *it;
      model.erase(it);
      model.push_back(p);
    } else {
      lru.Erase(slot);
      model.erase(it);
    }
    std::vector<int64_t> plain;
    for (auto& p : model) plain.push_back(p.first);
    plain.push_back(-1);
    ASSERT_EQ(Runs(lru, false), plain) << step;
    // Fair: owners by count (desc), then by the age of their oldest slot.
    std::map<int32_t, std::vector<int64_t>> by_owner;
    std::map<int32_t, size_t> first_at;
    for (size_t i = 0; i < model.size(); ++i) {
      if (!by_owner.count(model[i].second)) first_at[model[i].second] = i;
      by_owner[model[i].second].push_back(model[i].first);
    }
    std::vector<int32_t> owners;
    for (auto& [o, v] : by_owner) owners.push_back(o);
    std::sort(owners.begin(), owners.end(), [&](int32_t a, int32_t b) {
      if (by_owner[a].size() != by_owner[b].size()) return by_owner[a].size() > by_owner[b].size();
      return first_at[a] < first_at[b];
    });
    std::vector<int64_t> fair;
    for (int32_t o : owners) {
      fair.insert(fair.end(), by_owner[o].begin(), by_owner[o].end());
      fair.push_back(-1);
    }
    ASSERT_EQ(Runs(lru, true), fair) << step;
    for (int32_t o = 0; o < 4; ++o) {
      ASSERT_EQ(lru.count(o), static_cast<int64_t>(by_owner[o].size())) << step;
    }
    // Successive evictions: each the oldest of the owner then holding the most (ties: the older
    // oldest).
    std::vector<std::pair<int64_t, int32_t>> left = model;
    std::vector<int64_t> evictions;
    while (!left.empty()) {
      std::map<int32_t, int64_t> count;
      for (auto& p : left) ++count[p.second];
      size_t pick = 0;
      for (size_t i = 1; i < left.size(); ++i) {
        // The first in recency order among the owners with the most: their oldest fronts.
        if (count[left[i].second] > count[left[pick].second]) pick = i;
      }
      evictions.push_back(left[pick].first);
      left.erase(left.begin() + static_cast<std::ptrdiff_t>(pick));
    }
    ASSERT_EQ(EvictionOrder(lru, true), evictions) << step;
    if (!model.empty()) {
      ASSERT_EQ(lru.Front(true), evictions.front()) << step;
    }
  }
}

}  // namespace
}  // namespace strata
