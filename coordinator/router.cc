#include "coordinator/router.h"

#include <algorithm>
#include <cmath>

namespace strata {

LegChoice RouteNewRequest(const RouteRequest& request, absl::Span<const WorkerLoadView> prefill,
                          absl::Span<const WorkerLoadView> others, const BlockIndex& index,
                          const RouterConfig& config, const DisaggregationConfig& split,
                          int64_t block_tokens) {
  LegChoice out;
  if (others.empty() || prefill.empty()) {
    // Prefill workers take prompts only while the model has workers to hand the rest to.
    out.decision = Route(request, others.empty() ? prefill : others, index, config);
    return out;
  }
  // Where would the prompt run without a prefill worker, and how much of it is there already?
  out.decision = Route(request, others, index, config);
  const WorkerScore& best = out.decision.scores[out.decision.chosen];
  int64_t cached = 0;
  for (int64_t c : best.overlap_blocks) cached += c;
  if (best.fetch_source >= 0) cached += best.fetch_blocks;
  if ((request.prompt_blocks - cached) * block_tokens < split.min_uncached_tokens) return out;
  RouteDecision there = Route(request, prefill, index, config);
  // Unless the prefill workers are backed up: then the decode worker computes it itself, sooner
  // (conditional disaggregation, by queue as well as by length).
  const WorkerLoadView& queue = prefill[static_cast<size_t>(there.chosen)];
  if (split.max_prefill_queue_tokens > 0 &&
      queue.queued_prefill_blocks * block_tokens > split.max_prefill_queue_tokens) {
    return out;
  }
  out.decision = std::move(there);
  out.prefill_leg = true;
  return out;
}

RouteDecision Route(const RouteRequest& request, absl::Span<const WorkerLoadView> candidates,
                    const BlockIndex& index, const RouterConfig& config) {
  RouteDecision d;
  const size_t n = candidates.size();
  if (n == 0) return d;
  if (config.round_robin) {
    d.chosen = static_cast<int>(request.tie_break % n);
    d.scores.resize(n);
    for (size_t i = 0; i < n; ++i) d.scores[i].slot = candidates[i].slot;
    return d;
  }
  std::vector<WorkerSlot> slots(n);
  double total_inflight = 0;
  for (size_t i = 0; i < n; ++i) {
    slots[i] = candidates[i].slot;
    total_inflight += static_cast<double>(candidates[i].inflight_requests);
  }
  const std::vector<std::array<int64_t, kNumTiers>> overlap =
      index.PrefixOverlap(request.prefix_hashes, slots);
  // Each source's prefix on the device and in host memory, and how far its disk tier carries it
  // on (what it copies out; the chain's head stays on the faster tiers, which evict its tail
  // first).
  std::vector<int64_t> source_blocks, source_disk_blocks;
  if (config.fetch_weight > 0 && !request.fetch_sources.empty() && !request.prefix_hashes.empty()) {
    // Blocks a source has reported computing, not those of requests just routed to it: it cannot
    // send those yet.
    for (const auto& o : index.PrefixOverlap(request.prefix_hashes, request.fetch_sources,
                                             /*with_pending=*/false)) {
      source_blocks.push_back(o[static_cast<int>(Tier::kDevice)] +
                              o[static_cast<int>(Tier::kHost)]);
      source_disk_blocks.push_back(o[static_cast<int>(Tier::kDisk)]);
    }
  }
  // The mean counts this request, wherever it goes.
  const double mean = (total_inflight + 1) / static_cast<double>(n);
  const double limit = std::max(mean * (1 + config.balance_tolerance), mean + config.balance_slack);
  d.scores.resize(n);
  bool any_under = false;
  for (size_t i = 0; i < n; ++i) {
    const WorkerLoadView& c = candidates[i];
    WorkerScore& s = d.scores[i];
    s.slot = c.slot;
    s.overlap_blocks = overlap[i];
    int64_t own = 0;
    for (int t = 0; t < kNumTiers; ++t) {
      s.credit += config.tier_weights[t] * static_cast<double>(overlap[i][t]);
      own += overlap[i][t];
    }
    // A block the source must first read from its disk counts as a disk hit does, relative to a
    // device hit.
    const double disk_ratio = config.tier_weights[static_cast<int>(Tier::kDevice)] > 0
                                  ? config.tier_weights[static_cast<int>(Tier::kDisk)] /
                                        config.tier_weights[static_cast<int>(Tier::kDevice)]
                                  : 0;
    double fetch_credit = 0;
    for (size_t j = 0; j < source_blocks.size(); ++j) {
      if (request.fetch_sources[j] == c.slot ||
          (request.can_copy && !request.can_copy(c.slot, request.fetch_sources[j]))) {
        continue;
      }
      const int64_t fast = std::max<int64_t>(0, source_blocks[j] - own);
      const int64_t more = std::max<int64_t>(0, source_blocks[j] + source_disk_blocks[j] - own);
      const double credit =
          static_cast<double>(fast) + disk_ratio * static_cast<double>(more - fast);
      if (more >= std::max<int64_t>(1, config.fetch_min_blocks) && credit > fetch_credit) {
        s.fetch_source = request.fetch_sources[j];
        s.fetch_blocks = more;
        s.fetch_disk_blocks = more - fast;
        fetch_credit = credit;
      }
    }
    s.credit += config.fetch_weight * fetch_credit;
    s.cost = std::max(0.0, static_cast<double>(request.prompt_blocks + c.queued_prefill_blocks) -
                               s.credit) +
             config.decode_weight * static_cast<double>(c.decode_sequences);
    if (request.fine_tune &&
        std::find(request.fine_tune_resident.begin(), request.fine_tune_resident.end(), c.slot) ==
            request.fine_tune_resident.end()) {
      s.cost += config.cold_fine_tune_blocks;
    }
    s.over_balance_limit = static_cast<double>(c.inflight_requests + 1) > limit;
    any_under |= !s.over_balance_limit;
  }
  auto better = [&](size_t a, size_t b) {
    const WorkerScore& sa = d.scores[a];
    const WorkerScore& sb = d.scores[b];
    if (any_under && sa.over_balance_limit != sb.over_balance_limit) return !sa.over_balance_limit;
    if (sa.cost != sb.cost) return sa.cost < sb.cost;
    if (candidates[a].inflight_requests != candidates[b].inflight_requests) {
      return candidates[a].inflight_requests < candidates[b].inflight_requests;
    }
    return (a + n - request.tie_break % n) % n < (b + n - request.tie_break % n) % n;
  };
  size_t best = 0;
  for (size_t i = 1; i < n; ++i) {
    if (better(i, best)) best = i;
  }
  d.chosen = static_cast<int>(best);

  // Hot-prefix replication.
  auto holds = [&](size_t i) {
    const WorkerScore& s = d.scores[i];
    return s.overlap_blocks[0] + s.overlap_blocks[1] + s.overlap_blocks[2] > 0;
  };
  if (config.replicate_hot_prefixes && holds(best)) {
    const int64_t wanted =
        static_cast<int64_t>(std::ceil(std::clamp(request.prefix_share, 0.0, 1.0) * n - 1e-9));
    int64_t holders = 0;
    for (size_t i = 0; i < n; ++i) holders += holds(i) ? 1 : 0;
    if (holders < wanted) {
      int target = -1;
      for (size_t i = 0; i < n; ++i) {
        if (holds(i) || d.scores[i].over_balance_limit) continue;
        if (candidates[i].inflight_requests >= candidates[best].inflight_requests) continue;
        if (target < 0 || candidates[i].inflight_requests < candidates[target].inflight_requests) {
          target = static_cast<int>(i);
        }
      }
      if (target >= 0) {
        d.chosen = target;
        d.replicated = true;
      }
    }
  }
  return d;
}

double PrefixShareWindow::Add(BlockHash first) {
  if (recent_.size() < window_) {
    recent_.push_back(first);
  } else {
    const BlockHash old = recent_[next_];
    if (--counts_[old] == 0) counts_.erase(old);
    recent_[next_] = first;
    next_ = (next_ + 1) % window_;
  }
  ++counts_[first];
  return static_cast<double>(counts_[first]) / static_cast<double>(recent_.size());
}

void RecentFineTuneRoutes::Routed(WorkerSlot worker, absl::string_view fine_tune_id,
                                  absl::Time now) {
  auto it = last_.find(fine_tune_id);
  if (it == last_.end()) it = last_.emplace(std::string(fine_tune_id), Routes()).first;
  Routes& routes = it->second;
  auto r =
      std::find_if(routes.begin(), routes.end(), [&](const auto& e) { return e.first == worker; });
  if (r != routes.end()) {
    r->second = now;
  } else {
    routes.emplace_back(worker, now);
  }
  // Now and then forget what is past the window, so the map holds the recent routes only.
  if (++routed_ % 1024 == 0) {
    for (auto& [id, list] : last_) {
      list.erase(std::remove_if(list.begin(), list.end(),
                                [&](const auto& e) { return now - e.second > window_; }),
                 list.end());
    }
    absl::erase_if(last_, [](const auto& e) { return e.second.empty(); });
  }
}

void RecentFineTuneRoutes::Forget(WorkerSlot worker, absl::string_view fine_tune_id) {
  auto it = last_.find(fine_tune_id);
  if (it == last_.end()) return;
  Routes& routes = it->second;
  routes.erase(std::remove_if(routes.begin(), routes.end(),
                              [&](const auto& e) { return e.first == worker; }),
               routes.end());
  if (routes.empty()) last_.erase(it);
}

bool RecentFineTuneRoutes::Recent(WorkerSlot worker, absl::string_view fine_tune_id,
                                  absl::Time now) const {
  auto it = last_.find(fine_tune_id);
  if (it == last_.end()) return false;
  for (const auto& [w, when] : it->second) {
    if (w == worker) return now - when <= window_;
  }
  return false;
}

}  // namespace strata
