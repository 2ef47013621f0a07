// The router against tables: each case builds an index and loads, routes, and checks the choice and
// the scores.
#include "coordinator/router.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

struct Placement {
  WorkerSlot worker;
  Tier tier;
  std::vector<BlockHash> hashes;
};

struct Case {
  std::string name;
  std::vector<Placement> index;
  std::vector<WorkerLoadView> loads;
  std::vector<BlockHash> prefix;
  int64_t prompt_blocks;
  uint64_t tie_break;
  int want_chosen;
  // Expected (credit, cost) per candidate; empty: not checked.
  std::vector<std::pair<double, double>> want_scores;
  RouterConfig config = {};
};

const std::vector<BlockHash> kChain = {100, 101, 102, 103, 104};

std::vector<WorkerLoadView> Idle(int n) {
  std::vector<WorkerLoadView> v;
  for (int i = 0; i < n; ++i) v.push_back(WorkerLoadView{static_cast<WorkerSlot>(i), 0, 0, 0});
  return v;
}

TEST(RouterTest, Table) {
  RouterConfig rr;
  rr.round_robin = true;
  const std::vector<Case> cases = {
      {"no candidates", {}, {}, kChain, 6, 0, -1, {}},
      {"cold, idle: tie_break rotates 0", {}, Idle(3), kChain, 6, 0, 0, {{0, 6}, {0, 6}, {0, 6}}},
      {"cold, idle: tie_break rotates 1", {}, Idle(3), kChain, 6, 1, 1, {}},
      {"cold, idle: tie_break rotates 5", {}, Idle(3), kChain, 6, 5, 2, {}},
      {"longest device prefix wins",
       {{1, Tier::kDevice, {100, 101, 102, 103}}, {2, Tier::kDevice, {100}}},
       Idle(3),
       kChain,
       6,
       0,
       1,
       {{0, 6}, {4, 2}, {1, 5}}},
      {"a prefix must start at the first block",
       {{0, Tier::kDevice, {101, 102, 103, 104}}, {1, Tier::kDevice, {100}}},
       Idle(2),
       kChain,
       6,
       0,
       1,
       {{0, 6}, {1, 5}}},
      {"slower tiers earn less credit",
       {{0, Tier::kDisk, {100, 101, 102, 103}}, {1, Tier::kDevice, {100, 101}}},
       Idle(2),
       kChain,
       6,
       0,
       1,
       {{1, 5}, {2, 4}}},
      {"mixed tiers on one worker",
       {{0, Tier::kDevice, {100, 101}}, {0, Tier::kHost, {102, 103}}},
       Idle(1),
       kChain,
       6,
       0,
       0,
       {{3.5, 2.5}}},
      {"decode load outweighs a short prefix",
       {{0, Tier::kDevice, {100, 101, 102}}},
       {{0, 1, 0, 5}, {1, 0, 0, 0}},
       kChain,
       6,
       0,
       1,
       {{3, 8}, {0, 6}}},
      {"queued prefill outweighs a prefix",
       {{0, Tier::kDevice, {100, 101, 102, 103}}},
       {{0, 1, 10, 0}, {1, 0, 0, 0}},
       kChain,
       6,
       0,
       1,
       {{4, 12}, {0, 6}}},
      {"credit never makes cost negative",
       {{0, Tier::kDevice, {100, 101, 102, 103, 104}}},
       Idle(1),
       kChain,
       2,
       0,
       0,
       {{5, 0}}},
      {"over the balance limit: the prefix holder is passed over",
       {{0, Tier::kDevice, {100, 101, 102, 103, 104}}},
       {{0, 10, 0, 0}, {1, 2, 0, 0}, {2, 1, 0, 0}, {3, 2, 0, 0}},
       kChain,
       6,
       0,
       2,
       {}},
      {"under the balance limit: the prefix holder keeps it",
       {{0, Tier::kDevice, {100, 101, 102, 103, 104}}},
       {{0, 2, 0, 0}, {1, 1, 0, 0}, {2, 2, 0, 0}, {3, 2, 0, 0}},
       kChain,
       6,
       0,
       0,
       {}},
      {"equal cost: fewer in-flight requests win",
       {},
       {{0, 3, 0, 0}, {1, 1, 0, 0}, {2, 2, 0, 0}},
       kChain,
       6,
       0,
       1,
       {}},
      {"round robin ignores the index",
       {{0, Tier::kDevice, {100, 101, 102, 103, 104}}},
       Idle(4),
       kChain,
       6,
       7,
       3,
       {},
       rr},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    BlockIndex index;
    for (const Placement& p : c.index) index.Stored(p.worker, p.tier, p.hashes);
    RouteRequest req;
    req.prefix_hashes = c.prefix;
    req.prompt_blocks = c.prompt_blocks;
    req.tie_break = c.tie_break;
    const RouteDecision d = Route(req, c.loads, index, c.config);
    EXPECT_EQ(d.chosen, c.want_chosen);
    ASSERT_EQ(d.scores.size(), c.loads.size());
    for (size_t i = 0; i < c.want_scores.size(); ++i) {
      EXPECT_DOUBLE_EQ(d.scores[i].credit, c.want_scores[i].first) << "candidate " << i;
      EXPECT_DOUBLE_EQ(d.scores[i].cost, c.want_scores[i].second) << "candidate " << i;
    }
  }
}

// A worker that can copy a prompt's blocks from another earns fetch_weight per block it lacks;
// the decision names the source.
TEST(RouterTest, ABusyHoldersPromptGoesToAnIdleWorkerThatCopiesIt) {
  BlockIndex index;
  index.Stored(0, Tier::kDevice, {100, 101, 102});
  index.Stored(0, Tier::kHost, {103});
  index.Stored(1, Tier::kDevice, {100});
  std::vector<WorkerLoadView> loads = Idle(3);
  loads[0].decode_sequences = 8;  // the holder is busy
  RouteRequest req;
  req.prefix_hashes = kChain;
  req.prompt_blocks = 6;
  const std::vector<WorkerSlot> sources = {0, 1, 2};
  req.fetch_sources = sources;
  RouterConfig config;
  config.fetch_weight = 0.5;
  RouteDecision d = Route(req, loads, index, config);
  // 0: credit 3.75, cost 6 - 3.75 + 8; 1: its own block and 3 to copy from 0, cost
  // 6 - (1 + 1.5); 2: 4 to copy, cost 6 - 2.
  ASSERT_EQ(d.scores.size(), 3u);
  EXPECT_DOUBLE_EQ(d.scores[0].cost, 10.25);
  EXPECT_EQ(d.scores[0].fetch_source, -1);  // no other source holds more
  EXPECT_DOUBLE_EQ(d.scores[1].credit, 2.5);
  EXPECT_EQ(d.scores[1].fetch_source, 0);
  EXPECT_EQ(d.scores[1].fetch_blocks, 3);
  EXPECT_DOUBLE_EQ(d.scores[2].credit, 2);
  EXPECT_EQ(d.scores[2].fetch_blocks, 4);
  EXPECT_EQ(d.chosen, 1);

  // The holder itself need not be a candidate (draining). A source's disk blocks count as a disk
  // hit does (0.25 of a device block): copying them means reading them first.
  index.Stored(2, Tier::kDisk, {100, 101, 102, 103, 104});
  const std::vector<WorkerLoadView> two = {loads[1], loads[2]};
  d = Route(req, two, index, config);
  // Worker 1 (candidate 0) still: worker 2's 5 disk blocks earn 1.25 and leave nothing to copy;
  // worker 1 copies 3 from worker 0's device and host (credit 3) rather than 4 from worker 2's
  // disk (credit 1).
  EXPECT_EQ(d.chosen, 0);
  EXPECT_EQ(d.scores[0].fetch_source, 0);
  EXPECT_EQ(d.scores[0].fetch_disk_blocks, 0);
  EXPECT_EQ(d.scores[1].fetch_source, -1);
  // A source a candidate cannot copy from (other weights, another layout, or it copies nothing)
  // earns it nothing: worker 1 then copies from worker 2's disk, the next best; worker 2 not at
  // all.
  {
    RouteRequest r = req;
    r.fetch_sources = sources;
    r.can_copy = [](WorkerSlot receiver, WorkerSlot source) {
      return receiver == 1 && source != 0;
    };
    const RouteDecision c = Route(r, two, index, config);
    EXPECT_EQ(c.scores[0].fetch_source, 2);
    EXPECT_EQ(c.scores[0].fetch_blocks, 4);
    EXPECT_EQ(c.scores[0].fetch_disk_blocks, 4);
    EXPECT_EQ(c.scores[1].fetch_source, -1);
    r.can_copy = [](WorkerSlot, WorkerSlot) { return false; };
    EXPECT_EQ(Route(r, two, index, config).scores[0].fetch_source, -1);
  }

  // Blocks still being computed for a request just routed to a worker (pending) are not there to
  // copy yet.
  BlockIndex pending;
  pending.AddPending(0, kChain);
  {
    RouteRequest r = req;
    r.fetch_sources = sources;
    const RouteDecision p = Route(r, Idle(2), pending, config);
    EXPECT_EQ(p.scores[1].fetch_source, -1);
    EXPECT_EQ(p.scores[0].overlap_blocks[0], 5);  // the holder's own pending blocks still count
  }

  // Fewer than fetch_min_blocks to gain, a weight of 0, or no sources: no copies. With 4 wanted,
  // only worker 2's disk has that many beyond worker 1's own block.
  config.fetch_min_blocks = 4;
  d = Route(req, two, index, config);
  EXPECT_EQ(d.scores[0].fetch_source, 2);
  EXPECT_EQ(d.scores[0].fetch_blocks, 4);
  EXPECT_EQ(d.scores[0].fetch_disk_blocks, 4);
  EXPECT_DOUBLE_EQ(d.scores[0].credit, 1 + 0.5 * 0.25 * 4);
  config.fetch_min_blocks = 5;
  d = Route(req, two, index, config);
  EXPECT_EQ(d.scores[0].fetch_source, -1);
  config.fetch_min_blocks = 2;
  config.fetch_weight = 0;
  EXPECT_EQ(Route(req, two, index, config).scores[0].fetch_source, -1);
  config.fetch_weight = 0.5;
  req.fetch_sources = {};
  EXPECT_EQ(Route(req, two, index, config).scores[0].fetch_source, -1);
}

TEST(RouterTest, PendingBlocksRouteABurstToTheSameWorker) {
  BlockIndex index;
  std::vector<WorkerLoadView> loads = Idle(4);
  RouteRequest req;
  req.prefix_hashes = kChain;
  req.prompt_blocks = 6;
  req.tie_break = 2;
  const RouteDecision first = Route(req, loads, index, RouterConfig());
  ASSERT_EQ(first.chosen, 2);
  index.AddPending(2, kChain);
  for (WorkerLoadView& l : loads) l.inflight_requests = 1;
  req.tie_break = 3;
  const RouteDecision second = Route(req, loads, index, RouterConfig());
  EXPECT_EQ(second.chosen, 2);
  EXPECT_EQ(second.scores[2].overlap_blocks[0], 5);
}

TEST(RouterTest, AHotPrefixReplicatesToALessLoadedWorker) {
  BlockIndex index;
  index.Stored(0, Tier::kDevice, kChain);
  std::vector<WorkerLoadView> loads = {{0, 2, 0, 2}, {1, 1, 0, 1}, {2, 0, 0, 0}};
  RouteRequest req;
  req.prefix_hashes = kChain;
  req.prompt_blocks = 6;
  // A third of recent traffic: one worker is enough, the cache wins.
  req.prefix_share = 0.3;
  RouteDecision d = Route(req, loads, index, RouterConfig());
  EXPECT_EQ(d.chosen, 0);
  EXPECT_FALSE(d.replicated);
  // Half of it needs two workers: copied to the least loaded one that lacks it.
  req.prefix_share = 0.5;
  d = Route(req, loads, index, RouterConfig());
  EXPECT_EQ(d.chosen, 2);
  EXPECT_TRUE(d.replicated);
  // Not to a worker as busy as the holder.
  loads = {{0, 1, 0, 1}, {1, 1, 0, 1}, {2, 1, 0, 1}};
  d = Route(req, loads, index, RouterConfig());
  EXPECT_EQ(d.chosen, 0);
  EXPECT_FALSE(d.replicated);
  // Once two hold it, cost and load decide.
  index.Stored(1, Tier::kDevice, kChain);
  loads = {{0, 2, 0, 2}, {1, 1, 0, 1}, {2, 0, 0, 0}};
  d = Route(req, loads, index, RouterConfig());
  EXPECT_EQ(d.chosen, 1);
  EXPECT_FALSE(d.replicated);
  // All of it wants all three.
  req.prefix_share = 1.0;
  d = Route(req, loads, index, RouterConfig());
  EXPECT_EQ(d.chosen, 2);
  EXPECT_TRUE(d.replicated);
}

TEST(RouterTest, AHotPrefixSpreadsOverEveryWorkerAndStaysBalanced) {
  // Replays 400 requests sharing one prefix through the router with four workers, each request
  // holding its worker for 8 routing rounds; the prefix is cached wherever a request ran.
  BlockIndex index;
  std::vector<WorkerLoadView> loads = Idle(4);
  std::vector<int> share(4, 0);
  std::vector<std::pair<int, int>> running;  // (worker, rounds left)
  std::vector<std::pair<int, int>> pending;  // the same, for the index's pending entries
  for (int r = 0; r < 400; ++r) {
    for (auto& [w, left] : running) {
      if (--left == 0) --loads[w].inflight_requests;
    }
    for (auto& [w, left] : pending) {
      if (--left == 0) index.RemovePending(static_cast<WorkerSlot>(w), kChain);
    }
    std::erase_if(pending, [](const auto& p) { return p.second == 0; });
    std::erase_if(running, [](const auto& p) { return p.second == 0; });
    RouteRequest req;
    req.prefix_hashes = kChain;
    req.prompt_blocks = 6;
    req.tie_break = static_cast<uint64_t>(r);
    req.prefix_share = 1.0;
    const RouteDecision d = Route(req, loads, index, RouterConfig());
    ASSERT_GE(d.chosen, 0);
    ++share[d.chosen];
    ++loads[d.chosen].inflight_requests;
    running.push_back({d.chosen, 8});
    index.Stored(static_cast<WorkerSlot>(d.chosen), Tier::kDevice, kChain);
    index.AddPending(static_cast<WorkerSlot>(d.chosen), kChain);
    pending.push_back({d.chosen, 8});
  }
  for (int w = 0; w < 4; ++w) {
    EXPECT_GE(share[w], 75) << "worker " << w;
    EXPECT_LE(share[w], 125) << "worker " << w;
  }
}

// A fine-tune's request prefers a worker that holds its delta, unless load says otherwise; the
// base's requests ignore residency.
TEST(RouterTest, FineTunesPreferWorkersHoldingTheirDelta) {
  BlockIndex index;
  const std::vector<WorkerSlot> resident = {2};
  RouteRequest req;
  req.prefix_hashes = kChain;
  req.prompt_blocks = 6;
  req.fine_tune = true;
  req.fine_tune_resident = resident;
  RouteDecision d = Route(req, Idle(3), index, RouterConfig{});
  EXPECT_EQ(d.chosen, 2);
  EXPECT_DOUBLE_EQ(d.scores[0].cost, 10);
  EXPECT_DOUBLE_EQ(d.scores[2].cost, 6);
  // A busy holder loses to an idle worker once its queue costs more than the load.
  std::vector<WorkerLoadView> loads = Idle(3);
  loads[2].queued_prefill_blocks = 5;
  d = Route(req, loads, index, RouterConfig{});
  EXPECT_NE(d.chosen, 2);
  // The base's requests: residency does not count.
  req.fine_tune = false;
  d = Route(req, Idle(3), index, RouterConfig{});
  EXPECT_DOUBLE_EQ(d.scores[0].cost, d.scores[2].cost);
}

TEST(RecentFineTuneRoutesTest, RemembersWhereEachFineTuneWentWithinTheWindow) {
  RecentFineTuneRoutes recent(absl::Seconds(30));
  const absl::Time t0 = absl::UnixEpoch() + absl::Hours(1);
  EXPECT_FALSE(recent.Recent(0, "a", t0));
  recent.Routed(0, "a", t0);
  EXPECT_TRUE(recent.Recent(0, "a", t0 + absl::Seconds(30)));
  EXPECT_FALSE(recent.Recent(0, "a", t0 + absl::Seconds(31)));
  EXPECT_FALSE(recent.Recent(1, "a", t0));  // another worker
  EXPECT_FALSE(recent.Recent(0, "b", t0));  // another fine-tune
  // Each request renews it; old pairs are forgotten as the map is pruned.
  recent.Routed(0, "a", t0 + absl::Seconds(20));
  EXPECT_TRUE(recent.Recent(0, "a", t0 + absl::Seconds(45)));
  recent.Forget(0, "a");
  EXPECT_FALSE(recent.Recent(0, "a", t0 + absl::Seconds(45)));
  recent.Routed(0, "a", t0 + absl::Seconds(20));
  for (int i = 0; i < 2048; ++i) recent.Routed(2, "x", t0 + absl::Minutes(5));
  EXPECT_FALSE(recent.Recent(0, "a", t0 + absl::Minutes(5)));
  EXPECT_TRUE(recent.Recent(2, "x", t0 + absl::Minutes(5)));
}

// A burst for a cold fine-tune: with the route remembered, the second request follows the first
// to the worker loading its delta instead of being spread by the tie-break.
TEST(RecentFineTuneRoutesTest, ABurstForAColdFineTuneStaysTogether) {
  BlockIndex index;
  RouterConfig config;
  RecentFineTuneRoutes recent;
  const absl::Time now = absl::UnixEpoch();
  std::vector<WorkerLoadView> loads = {{0, 0, 0, 0}, {1, 0, 0, 0}};
  std::vector<int> chosen;
  for (uint64_t i = 0; i < 4; ++i) {
    std::vector<WorkerSlot> resident;
    for (WorkerSlot w : {0u, 1u}) {
      if (recent.Recent(w, "t", now)) resident.push_back(w);
    }
    RouteRequest req;
    req.prompt_blocks = 2;
    req.tie_break = i;
    req.fine_tune = true;
    req.fine_tune_resident = resident;
    const RouteDecision d = Route(req, loads, index, config);
    chosen.push_back(d.chosen);
    recent.Routed(loads[d.chosen].slot, "t", now);
  }
  EXPECT_EQ(chosen, std::vector<int>(4, chosen[0]));
}

}  // namespace
}  // namespace strata
