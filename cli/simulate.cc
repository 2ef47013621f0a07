#include "cli/simulate.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <list>
#include <memory>
#include <optional>
#include <queue>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "common/hash.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "coordinator/block_index.h"
#include "worker/engine/block_manager.h"

namespace strata {

double StepCost::Step(double tokens, double kv_tokens, double pairs, double sampled, double deltas,
                      double delta_tokens) const {
  const double memory = weights_s + kv_token_s * kv_tokens + delta_s * deltas;
  const double compute = token_s * tokens + attention_pair_s * pairs + sequence_s * sampled;
  // A measured fine-tune's cost is its extra time over the base's step, whichever bound that is.
  return fixed_s + std::max(memory, compute) + delta_compute_s * deltas +
         delta_token_s * delta_tokens;
}

namespace {

// A worker's host tier: block hashes in least-recently-used order, with the events the
// coordinator's index sees.
class HostTier {
 public:
  explicit HostTier(int64_t capacity, Tier tier = Tier::kHost) : capacity_(capacity), tier_(tier) {}

  bool Contains(BlockHash h) const { return pos_.contains(h); }
  // Inserts `h`, or makes it the most recently used; drops the least recently used past capacity.
  void Put(BlockHash h, std::vector<BlockEvent>* events) {
    if (capacity_ <= 0) return;
    if (auto it = pos_.find(h); it != pos_.end()) {
      lru_.splice(lru_.end(), lru_, it->second);
      return;
    }
    lru_.push_back(h);
    pos_[h] = std::prev(lru_.end());
    events->push_back({BlockEvent::Kind::kStored, h, tier_});
    while (static_cast<int64_t>(lru_.size()) > capacity_) {
      const BlockHash old = lru_.front();
      lru_.pop_front();
      pos_.erase(old);
      events->push_back({BlockEvent::Kind::kRemoved, old, tier_});
    }
  }

 private:
  const int64_t capacity_;
  const Tier tier_;
  std::list<BlockHash> lru_;
  absl::flat_hash_map<BlockHash, std::list<BlockHash>::iterator> pos_;
};

struct Request {
  int64_t id = 0;
  size_t conversation = 0;
  size_t turn = 0;
  std::vector<int32_t> tokens;  // prompt, then generated
  int64_t prompt_len = 0;
  int64_t output_tokens = 0;
  int fine_tune = -1;
  uint64_t ns = 0;            // cache namespace
  bool holds_delta = false;   // pins its fine-tune's delta (while running)
  double io_wait_until = -1;  // waiting for its chain's blocks to load from disk, until then
  // Copying KV blocks from another worker (SimWorkerConfig::kv_copy_block_s): from which, how
  // many the router counted on, and when they have arrived (-1: no copy, or done).
  int copy_from = -1;
  int64_t copy_blocks = 0;
  double copy_until = -1;
  // On a prefill worker for its first token (SimConfig::prefill_workers).
  bool prefill_leg = false;
  double arrival = 0;
  double first_token = -1;
  double end = -1;
  int64_t cached_prompt = 0;
  bool admitted_once = false;
  bool waited_for_prefix = false;
  // The coordinator's bookkeeping (WorkerPool::Assignment).
  int worker = -1;
  std::vector<BlockHash> pending;
  int64_t prefill_blocks = 0;
  bool decoding = false;
  // The engine's (Engine::Sequence).
  int64_t num_computed = 0;
  int64_t num_generated = 0;
  std::vector<int32_t> block_table;
  std::vector<BlockHash> hashes;
  std::vector<BlockHash> planned;  // Engine::Sequence::planned_hashes
};

struct Chunk {
  Request* seq;
  int64_t start;
  int64_t count;
};

struct Worker {
  explicit Worker(const SimWorkerConfig& c)
      : blocks(c.kv_blocks, c.block_tokens),
        host(c.host_blocks),
        disk(c.host_blocks > 0 ? c.disk_blocks : 0, Tier::kDisk) {}
  BlockManager blocks;
  HostTier host;
  // The disk tier: every block that enters the host tier is written back to it (KvStore's
  // write-back, off the step path). Blocks loading from it into the host tier, with when each
  // arrives; its reads queue on one ring.
  HostTier disk;
  // In flight, in the order they finish (loads queue, so each is ready after the one before).
  std::deque<std::pair<double, BlockHash>> load_queue;
  absl::flat_hash_set<BlockHash> loading;
  double io_free_at = 0;
  std::vector<BlockEvent> host_events;
  std::deque<Request*> waiting;
  std::vector<Request*> running;  // in admission order
  std::vector<Chunk> plan;
  // During a step's admissions: blocks the planned requests have yet to publish.
  absl::flat_hash_set<BlockHash> inflight_blocks;
  // Fine-tune deltas held: when each is ready, its pins, and when it was last used.
  struct Delta {
    double ready = 0;
    int pins = 0;
    uint64_t used = 0;
  };
  absl::flat_hash_map<int, Delta> deltas;
  // DeltaCache loads one delta at a time, in order: when its loader is free again.
  double loader_free_at = 0;
  bool busy = false;
  bool wake_pending = false;
  double busy_s = 0;
  // WorkerPool's view of it.
  int64_t inflight = 0;
  int64_t prefill_blocks = 0;
  int64_t decoding = 0;
  int64_t served = 0;
};

class Simulator {
 public:
  Simulator(const std::vector<Conversation>& workload, const SimConfig& config)
      : workload_(workload), config_(config), ns_(CacheNamespace("simulated", "", "")) {
    for (int i = 0; i < config.workers; ++i) {
      workers_.push_back(std::make_unique<Worker>(config.worker));
      Worker* w = workers_.back().get();
      w->blocks.SetEvictionHook([w](int32_t, BlockKey key, int32_t) {
        // Engine::PutDown: a cached block leaving the device goes to the host tier.
        PutHost(w, key.hash);
      });
    }
  }

  SimResult Run() {
    chats_.assign(workload_.size(), ChatHistory(config_.replies_in_history));
    for (size_t c = 0; c < workload_.size(); ++c) {
      if (!workload_[c].turns.empty()) {
        Push(absl::ToDoubleSeconds(workload_[c].start), Event::kArrive, c, 0);
      }
    }
    while (!events_.empty()) {
      const Event e = events_.top();
      events_.pop();
      now_ = e.time;
      if (e.kind == Event::kArrive) {
        Arrive(e.a, e.b);
      } else if (e.kind == Event::kWake) {
        workers_[e.a]->wake_pending = false;
        if (!workers_[e.a]->busy) StartStep(static_cast<int>(e.a));
      } else {
        StepDone(static_cast<int>(e.a));
      }
    }
    return Summarize();
  }

 private:
  struct Event {
    enum Kind { kArrive, kWake, kStepDone };
    double time;
    uint64_t order;
    Kind kind;
    size_t a, b;
    bool operator>(const Event& o) const {
      return time != o.time ? time > o.time : order > o.order;
    }
  };

  void Push(double time, Event::Kind kind, size_t a, size_t b) {
    events_.push({time, next_order_++, kind, a, b});
  }

  int64_t bt() const { return config_.worker.block_tokens; }
  bool has_disk() const { return config_.worker.host_blocks > 0 && config_.worker.disk_blocks > 0; }

  // A block entering the host tier, and (written back) the disk tier.
  static void PutHost(Worker* w, BlockHash h) {
    w->host.Put(h, &w->host_events);
    w->disk.Put(h, &w->host_events);
  }

  // KvStore::Prefetch: the chain's blocks from `from` on that are on disk (and in neither the
  // host tier nor a load already) start loading into the host tier, one after another, with at
  // most half the host tier's slots in flight. Each takes its host slot at once (KvStore's
  // StartLoad allocates it), so the host tier holds it while it loads.
  void StartDiskLoads(int wi, absl::Span<const BlockHash> hashes, int64_t from, int64_t limit) {
    if (!has_disk()) return;
    Worker& w = *workers_[wi];
    const int64_t most = std::max<int64_t>(1, config_.worker.host_blocks / 2);
    double last = -1;
    for (int64_t i = from; i < limit && static_cast<int64_t>(w.loading.size()) < most; ++i) {
      const BlockHash h = hashes[i];
      if (w.loading.contains(h) || w.host.Contains(h)) continue;
      if (!w.disk.Contains(h)) break;
      last = std::max(now_, w.io_free_at) + config_.worker.disk_block_s;
      w.io_free_at = last;
      w.load_queue.emplace_back(last, h);
      w.loading.insert(h);
      w.host.Put(h, &w.host_events);
      w.disk.Put(h, &w.host_events);  // read: most recently used
      ++disk_loaded_blocks_;
    }
    if (last > now_) Push(last, Event::kWake, static_cast<size_t>(wi), 0);
  }

  // Loads that have finished, in the order they finish, are ready in the host tier (taking a
  // slot again if another block's took theirs meanwhile).
  void LandDiskLoads(Worker& w) {
    while (!w.load_queue.empty() && w.load_queue.front().first <= now_) {
      const BlockHash h = w.load_queue.front().second;
      w.load_queue.pop_front();
      w.loading.erase(h);
      w.host.Put(h, &w.host_events);
    }
  }
  static std::string FineTuneId(int k) { return absl::StrCat("ft", k); }
  absl::Time SimTime() const { return absl::UnixEpoch() + absl::Seconds(now_); }

  void Arrive(size_t conversation, size_t turn) {
    const Turn& t = workload_[conversation].turns[turn];
    auto owned = std::make_unique<Request>();
    Request* r = owned.get();
    requests_.push_back(std::move(owned));
    r->id = static_cast<int64_t>(requests_.size());
    r->conversation = conversation;
    r->turn = turn;
    r->tokens = chats_[conversation].Prompt(t);
    r->prompt_len = static_cast<int64_t>(r->tokens.size());
    r->output_tokens = std::max<int64_t>(1, t.output_tokens);
    r->fine_tune = workload_[conversation].fine_tune;
    const std::string fine_tune_id = r->fine_tune < 0 ? "" : FineTuneId(r->fine_tune);
    r->ns = r->fine_tune < 0 ? ns_ : CacheNamespace("simulated", fine_tune_id, "");
    r->arrival = now_;
    if (r->prompt_len < 1 ||
        r->prompt_len + r->output_tokens > config_.worker.kv_blocks * config_.worker.block_tokens) {
      ++rejected_;  // the engine would end it with kContextLength; the conversation stops
      return;
    }
    r->pending = PrefixBlockHashes(r->ns, r->tokens, static_cast<int>(bt()));
    Assign(r, /*decode_leg=*/false, /*source=*/-1);
    Enqueue(r);
  }

  // WorkerPool::Assign: picks r's worker (among the decode workers for a decode leg, and as the
  // pool splits new requests between prefill and decode workers), names a KV source (`source`,
  // or the router's), and counts the request against the worker.
  void Assign(Request* r, bool decode_leg, int source) {
    const std::string fine_tune_id = r->fine_tune < 0 ? "" : FineTuneId(r->fine_tune);
    const int64_t prompt_blocks = (r->prompt_len + bt() - 1) / bt();
    std::vector<WorkerLoadView> prefill_loads, other_loads;
    for (size_t i = 0; i < workers_.size(); ++i) {
      const Worker& w = *workers_[i];
      (static_cast<int>(i) < config_.prefill_workers ? prefill_loads : other_loads)
          .push_back({static_cast<WorkerSlot>(i), w.inflight, w.prefill_blocks, w.decoding});
    }
    std::vector<WorkerSlot> resident;
    if (r->fine_tune >= 0) {
      for (size_t i = 0; i < workers_.size(); ++i) {
        // WorkerPool::Assign: loaded (as a load report lists them), or sent one of the
        // fine-tune's requests lately.
        auto it = workers_[i]->deltas.find(r->fine_tune);
        if ((it != workers_[i]->deltas.end() && it->second.ready <= now_) ||
            recent_fine_tunes_.Recent(static_cast<WorkerSlot>(i), fine_tune_id, SimTime())) {
          resident.push_back(static_cast<WorkerSlot>(i));
        }
      }
    }
    RouteRequest req;
    req.fine_tune = r->fine_tune >= 0;
    req.fine_tune_resident = resident;
    req.prefix_hashes = r->pending;
    req.prompt_blocks = prompt_blocks;
    req.tie_break = tie_break_++;
    if (!r->pending.empty()) req.prefix_share = share_.Add(r->pending[0]);
    std::vector<WorkerSlot> sources;
    if (config_.worker.kv_copy_block_s > 0) {
      for (size_t i = 0; i < workers_.size(); ++i) sources.push_back(static_cast<WorkerSlot>(i));
      req.fetch_sources = sources;
    }
    // WorkerPool::Assign's choice, by the same function.
    const LegChoice choice = RouteNewRequest(
        req,
        !decode_leg && !other_loads.empty() ? absl::MakeConstSpan(prefill_loads)
                                            : absl::Span<const WorkerLoadView>(),
        other_loads.empty() ? absl::MakeConstSpan(prefill_loads) : absl::MakeConstSpan(other_loads),
        index_, config_.router,
        {config_.disaggregate_min_uncached_tokens, config_.disaggregate_max_prefill_queue_tokens},
        bt());
    r->prefill_leg = choice.prefill_leg;
    const WorkerScore& score = choice.decision.scores[choice.decision.chosen];
    int64_t cached = 0;
    for (int64_t c : score.overlap_blocks) cached += c;
    r->copy_from = -1;
    r->copy_until = -1;
    int64_t copy_blocks = 0, disk_blocks = 0;
    if (source >= 0 && source != static_cast<int>(score.slot) &&
        static_cast<int64_t>(r->pending.size()) > cached) {
      r->copy_from = source;  // the prefill worker holds the whole prompt
      copy_blocks = static_cast<int64_t>(r->pending.size()) - cached;
    } else if (score.fetch_source >= 0) {
      // WorkerPool::Assign names the source; the worker copies before queueing the request.
      r->copy_from = static_cast<int>(score.fetch_source);
      copy_blocks = score.fetch_blocks;
      disk_blocks = score.fetch_disk_blocks;
    }
    if (r->copy_from >= 0) {
      r->copy_blocks = copy_blocks;
      // Blocks on the source's disk are read into its host tier first (one after another).
      r->copy_until = now_ + static_cast<double>(copy_blocks) * config_.worker.kv_copy_block_s +
                      static_cast<double>(disk_blocks) * config_.worker.disk_block_s;
      cached += copy_blocks;
    }
    r->worker = static_cast<int>(score.slot);
    r->prefill_blocks = std::max<int64_t>(0, prompt_blocks - cached);
    r->decoding = false;
    Worker& w = *workers_[r->worker];
    ++w.inflight;
    ++w.served;
    w.prefill_blocks += r->prefill_blocks;
    index_.AddPending(score.slot, r->pending);
    if (r->fine_tune >= 0) {
      recent_fine_tunes_.Routed(score.slot, fine_tune_id, SimTime());
    }
  }

  // Queues r on its worker (Engine::AddRequest).
  void Enqueue(Request* r) {
    Worker& w = *workers_[r->worker];
    w.waiting.push_back(r);  // every request has the same priority: arrival order
    // Engine::LookUpAndPrefetch: the chain's blocks on disk start loading now.
    if (has_disk()) {
      const int64_t limit = (r->prompt_len - 1) / bt();
      StartDiskLoads(r->worker, r->pending,
                     std::min<int64_t>(w.blocks.MatchPrefix(r->pending), limit), limit);
    }
    // Engine::AddRequest: the fine-tune's delta starts loading now.
    if (r->fine_tune >= 0 && !w.deltas.contains(r->fine_tune)) StartLoad(r->worker, r->fine_tune);
    if (r->copy_until >= 0) Push(r->copy_until, Event::kWake, static_cast<size_t>(r->worker), 0);
    if (!w.busy && !w.wake_pending) {
      // An idle worker starts a step once every request arriving at this instant is queued.
      w.wake_pending = true;
      Push(now_, Event::kWake, static_cast<size_t>(r->worker), 0);
    }
  }

  // Starts loading fine-tune `t`'s delta on worker `wi`, making room by dropping the least
  // recently used delta that no sequence pins and that has finished loading; false when there is
  // no such room (the request waits for a running sequence of another fine-tune to finish).
  bool StartLoad(int wi, int t) {
    Worker& w = *workers_[wi];
    if (static_cast<int64_t>(w.deltas.size()) >= config_.worker.resident_deltas) {
      auto victim = w.deltas.end();
      for (auto it = w.deltas.begin(); it != w.deltas.end(); ++it) {
        if (it->second.pins > 0 || it->second.ready > now_) continue;
        if (victim == w.deltas.end() || it->second.used < victim->second.used) victim = it;
      }
      if (victim == w.deltas.end()) return false;
      w.deltas.erase(victim);
    }
    const double ready = std::max(now_, w.loader_free_at) + config_.worker.delta_load_s;
    w.loader_free_at = ready;
    w.deltas[t] = {ready, 0, ++delta_clock_};
    ++delta_loads_;
    if (ready > now_) Push(ready, Event::kWake, static_cast<size_t>(wi), 0);
    return true;
  }

  // Engine::Step: a fine-tune's sequence pins its delta to be admitted; false while it loads.
  bool AcquireDelta(int wi, Request* s) {
    if (s->holds_delta) return true;
    Worker& w = *workers_[wi];
    auto it = w.deltas.find(s->fine_tune);
    if (it == w.deltas.end()) {
      if (!StartLoad(wi, s->fine_tune)) return false;
      it = w.deltas.find(s->fine_tune);
    }
    if (it->second.ready > now_) return false;
    ++it->second.pins;
    it->second.used = ++delta_clock_;
    s->holds_delta = true;
    return true;
  }

  void ReleaseDelta(Worker& w, Request* s) {
    if (!s->holds_delta) return;
    auto it = w.deltas.find(s->fine_tune);
    if (it != w.deltas.end()) {
      --it->second.pins;
      it->second.used = ++delta_clock_;  // DeltaCache::Release marks it used
    }
    s->holds_delta = false;
  }

  // Engine::EnsureBlocks.
  bool EnsureBlocks(Worker& w, Request* s, int64_t num_tokens) {
    const int64_t want = (num_tokens + bt() - 1) / bt();
    const int64_t need = want - static_cast<int64_t>(s->block_table.size());
    if (need <= 0) return true;
    if (need > w.blocks.num_available()) return false;
    for (int64_t i = 0; i < need; ++i) s->block_table.push_back(*w.blocks.Allocate());
    return true;
  }

  // Engine::ReleaseBlocks.
  void ReleaseBlocks(Worker& w, Request* s) {
    for (auto it = s->block_table.rbegin(); it != s->block_table.rend(); ++it) {
      w.blocks.Release(*it);
    }
    s->block_table.clear();
    s->hashes.clear();
    s->planned.clear();
    s->num_computed = 0;
  }

  // Engine::AddInflight.
  void AddInflight(Worker& w, const Request& s) {
    for (size_t i = s.hashes.size(); i < s.planned.size(); ++i)
      w.inflight_blocks.insert(s.planned[i]);
  }

  // Engine::Preempt: back to the front of the queue, to recompute (its blocks usually stay
  // cached).
  void Preempt(Worker& w, Request* s) {
    ++preemptions_;
    ReleaseBlocks(w, s);
    ReleaseDelta(w, s);
    w.running.erase(std::find(w.running.begin(), w.running.end(), s));
    w.waiting.push_front(s);
  }

  // Engine::ImportKvBlocks, once the copies have arrived: the blocks past what worker `wi` holds in
  // any tier that the source still holds on its device or in host memory (up to what the router
  // counted on) become cached device blocks here.
  void ImportCopies(int wi, Request* s, const std::vector<BlockHash>& hashes, int64_t limit) {
    s->copy_until = -1;
    Worker& w = *workers_[wi];
    const Worker& src = *workers_[s->copy_from];
    int64_t held = std::min<int64_t>(w.blocks.MatchPrefix(hashes), limit);
    while (held < limit && (w.host.Contains(hashes[held]) || w.disk.Contains(hashes[held]))) {
      ++held;
    }
    std::vector<int32_t> stored;
    for (int64_t i = held; i < limit && i < held + s->copy_blocks; ++i) {
      const absl::Span<const BlockHash> one = absl::MakeConstSpan(hashes).subspan(i, 1);
      if (src.blocks.MatchPrefix(one) == 0 && !src.host.Contains(hashes[i]) &&
          !src.disk.Contains(hashes[i])) {
        break;
      }
      if (w.blocks.MatchPrefix(one) == 1) continue;
      const std::optional<int32_t> b = w.blocks.Allocate();
      if (!b) break;
      w.blocks.Publish(*b, hashes[i], s->ns);
      stored.push_back(*b);
    }
    for (auto it = stored.rbegin(); it != stored.rend(); ++it) w.blocks.Release(*it);
    copied_blocks_ += static_cast<int64_t>(stored.size());
  }

  // Engine::Admit, with the host tier's chain restored in the step.
  enum class AdmitResult { kAdmitted, kNoRoom, kWaitingForIo, kWaitingForPrefix };
  AdmitResult Admit(int wi, Request* s, int64_t budget, int64_t* restored) {
    Worker& w = *workers_[wi];
    const int64_t len = static_cast<int64_t>(s->tokens.size());
    // The prompt's hashes were made on arrival (the chain that routed it); a preempted sequence's
    // grown tokens need their own.
    std::vector<BlockHash> hashes =
        static_cast<int64_t>(s->tokens.size()) == s->prompt_len
            ? s->pending
            : PrefixBlockHashes(s->ns, s->tokens, static_cast<int>(bt()));
    const int64_t limit = (len - 1) / bt();
    if (s->copy_until >= 0) {
      if (now_ < s->copy_until) return AdmitResult::kWaitingForIo;
      ImportCopies(wi, s, hashes, limit);
    }
    const int64_t on_device = std::min<int64_t>(w.blocks.MatchPrefix(hashes), limit);
    int64_t in_host_end = on_device;
    while (in_host_end < limit && w.host.Contains(hashes[in_host_end]) &&
           !w.loading.contains(hashes[in_host_end])) {
      ++in_host_end;
    }
    // Engine::WaitForLoads: the chain goes on on disk; wait for it (others go ahead) up to
    // max_io_wait, then compute instead.
    const bool on_disk =
        has_disk() && in_host_end < limit &&
        (w.loading.contains(hashes[in_host_end]) || w.disk.Contains(hashes[in_host_end]));
    if (on_disk) {
      if (s->io_wait_until < 0) {
        s->io_wait_until = now_ + config_.worker.max_io_wait_s;
        Push(s->io_wait_until, Event::kWake, static_cast<size_t>(wi), 0);
      }
      if (now_ < s->io_wait_until) {
        StartDiskLoads(wi, hashes, in_host_end, limit);
        return AdmitResult::kWaitingForIo;
      }
    }
    s->io_wait_until = -1;
    // Engine::Admit: the chain goes on in blocks a request in this step is computing (not when it
    // goes on on disk and the wait for it is over).
    int64_t inflight_end = in_host_end;
    while (!on_disk && inflight_end < limit && w.inflight_blocks.contains(hashes[inflight_end])) {
      ++inflight_end;
    }
    if (inflight_end > in_host_end &&
        ((inflight_end - in_host_end) * bt() >= config_.worker.inflight_prefill_min_tokens ||
         inflight_end == limit)) {
      if (!s->waited_for_prefix) {
        s->waited_for_prefix = true;
        ++inflight_prefix_waits_;
      }
      return AdmitResult::kWaitingForPrefix;
    }
    // Most recently used first, so that blocks evicted into the host tier meanwhile push out
    // others.
    for (int64_t i = in_host_end; i-- > on_device;) w.host.Put(hashes[i], &w.host_events);
    s->block_table = w.blocks.AcquirePrefix(hashes, on_device);
    // Device blocks after the host run (copies; Engine::Admit) are held while it is restored.
    std::vector<int32_t> after;
    if (in_host_end > on_device && in_host_end < limit) {
      const absl::Span<const BlockHash> rest = absl::MakeConstSpan(hashes).subspan(in_host_end);
      after = w.blocks.AcquirePrefix(
          rest, std::min<int64_t>(w.blocks.MatchPrefix(rest), limit - in_host_end));
    }
    for (int64_t i = on_device; i < in_host_end; ++i) {
      if (!w.host.Contains(hashes[i])) break;
      const std::optional<int32_t> b = w.blocks.Allocate();
      if (!b) break;
      w.blocks.Publish(*b, hashes[i], s->ns);
      s->block_table.push_back(*b);
      ++*restored;
    }
    if (static_cast<int64_t>(s->block_table.size()) == in_host_end) {
      s->block_table.insert(s->block_table.end(), after.begin(), after.end());
    } else {
      for (auto it = after.rbegin(); it != after.rend(); ++it) w.blocks.Release(*it);
    }
    const int64_t cached = static_cast<int64_t>(s->block_table.size());
    s->hashes.assign(hashes.begin(), hashes.begin() + cached);
    if (config_.worker.inflight_prefill_min_tokens > 0) s->planned = std::move(hashes);
    s->num_computed = cached * bt();
    const int64_t n = std::min(len - s->num_computed, budget);
    if (!EnsureBlocks(w, s, s->num_computed + n)) {
      ReleaseBlocks(w, s);
      return AdmitResult::kNoRoom;
    }
    if (!s->admitted_once) {
      s->admitted_once = true;
      s->cached_prompt = std::min(s->num_computed, s->prompt_len);
    }
    w.plan.push_back({s, s->num_computed, n});
    return AdmitResult::kAdmitted;
  }

  // Engine::Step's plan, and the step's time.
  void StartStep(int wi) {
    Worker& w = *workers_[wi];
    w.plan.clear();
    int64_t budget = config_.worker.max_batch_tokens;
    for (size_t i = 0; i < w.running.size() && budget > 0;) {
      Request* s = w.running[i];
      const int64_t n =
          std::min<int64_t>(static_cast<int64_t>(s->tokens.size()) - s->num_computed, budget);
      bool preempted_self = false;
      while (!EnsureBlocks(w, s, s->num_computed + n)) {
        Request* victim = w.running.back();
        Preempt(w, victim);
        if (victim == s) {
          preempted_self = true;
          break;
        }
      }
      if (preempted_self) break;
      w.plan.push_back({s, s->num_computed, n});
      budget -= n;
      ++i;
    }
    int64_t restored = 0;
    bool delta_wait = false, io_wait = false;
    LandDiskLoads(w);
    w.inflight_blocks.clear();
    const bool dedupe = config_.worker.inflight_prefill_min_tokens > 0;
    if (dedupe) {
      for (const Chunk& c : w.plan) AddInflight(w, *c.seq);
    }
    for (size_t i = 0;
         i < w.waiting.size() && budget > 0 &&
         static_cast<int64_t>(w.running.size()) < config_.worker.max_running_sequences;) {
      Request* s = w.waiting[i];
      if (s->fine_tune >= 0 && !AcquireDelta(wi, s)) {
        delta_wait = true;  // still loading, or no room yet: the ones behind it go first
        ++i;
        continue;
      }
      const AdmitResult admitted = Admit(wi, s, budget, &restored);
      if (admitted != AdmitResult::kAdmitted) ReleaseDelta(w, s);
      if (admitted == AdmitResult::kNoRoom) break;
      if (admitted == AdmitResult::kWaitingForIo || admitted == AdmitResult::kWaitingForPrefix) {
        io_wait = io_wait || admitted == AdmitResult::kWaitingForIo;
        ++i;
        continue;
      }
      if (dedupe) AddInflight(w, *s);
      budget -= w.plan.back().count;
      w.running.push_back(s);
      w.waiting.erase(w.waiting.begin() + static_cast<ptrdiff_t>(i));
    }
    FlushBlockEvents(wi);
    restored_blocks_ += restored;
    if (w.plan.empty()) {
      if (!w.waiting.empty() && w.running.empty() && !delta_wait && !io_wait) {
        // Not even one request fits (Arrive refuses what the whole cache cannot hold, so this
        // does not happen): the engine ends it with kContextLength, and so does this.
        Request* s = w.waiting.front();
        w.waiting.pop_front();
        ++rejected_;
        --w.inflight;
        w.prefill_blocks -= s->prefill_blocks;
        index_.RemovePending(static_cast<WorkerSlot>(wi), s->pending);
        StartStep(wi);
      }
      return;
    }
    double tokens = 0, kv_tokens = 0, pairs = 0, sampled = 0;
    int64_t decoding = 0;
    std::vector<int> step_deltas;
    double delta_tokens = 0;
    for (const Chunk& c : w.plan) {
      if (c.seq->fine_tune >= 0) delta_tokens += static_cast<double>(c.count);
      if (c.seq->fine_tune >= 0 && std::find(step_deltas.begin(), step_deltas.end(),
                                             c.seq->fine_tune) == step_deltas.end()) {
        step_deltas.push_back(c.seq->fine_tune);
      }
      if (c.start + c.count == static_cast<int64_t>(c.seq->tokens.size())) ++sampled;
      tokens += static_cast<double>(c.count);
      kv_tokens += static_cast<double>(c.start + c.count);
      pairs += static_cast<double>(c.count) * (static_cast<double>(c.start) + (c.count + 1) / 2.0);
      if (c.start >= c.seq->prompt_len) ++decoding;
    }
    if (decoding > 0) {
      decode_rows_ += decoding;
      ++decode_steps_;
    }
    const double dt = config_.cost.Step(tokens, kv_tokens, pairs, sampled,
                                        static_cast<double>(step_deltas.size()), delta_tokens) +
                      static_cast<double>(restored) * config_.cost.host_block_s;
    ++steps_;
    step_deltas_ += static_cast<int64_t>(step_deltas.size());
    w.busy = true;
    w.busy_s += dt;
    Push(now_ + dt, Event::kStepDone, static_cast<size_t>(wi), 0);
  }

  // Engine::PublishFullBlocks.
  void PublishFullBlocks(Worker& w, Request* s) {
    const absl::Span<const int32_t> tokens(s->tokens);
    while (static_cast<int64_t>(s->hashes.size() + 1) * bt() <= s->num_computed) {
      const int64_t i = static_cast<int64_t>(s->hashes.size());
      const BlockHash parent = i == 0 ? kRootBlockHash : s->hashes.back();
      const BlockHash h = ChainBlockHash(parent, s->ns, tokens.subspan(i * bt(), bt()));
      w.blocks.Publish(s->block_table[i], h, s->ns);
      s->hashes.push_back(h);
    }
    if (s->hashes.size() >= s->planned.size()) s->planned.clear();
  }

  void StepDone(int wi) {
    Worker& w = *workers_[wi];
    w.busy = false;
    std::vector<Request*> finished;
    for (const Chunk& c : w.plan) {
      Request* s = c.seq;
      s->num_computed += c.count;
      PublishFullBlocks(w, s);
      if (s->num_computed < static_cast<int64_t>(s->tokens.size())) continue;  // mid-prefill
      ++s->num_generated;
      // A token no other prompt holds (the conversation's next turn resends it).
      s->tokens.push_back(
          static_cast<int32_t>(Hash64(absl::StrCat(s->id, ":", s->num_generated)) & 0x3fffffff));
      if (!s->decoding) {
        if (s->first_token < 0) s->first_token = now_;
        s->decoding = true;
        w.prefill_blocks -= s->prefill_blocks;
        ++w.decoding;
      }
      if (s->num_generated >= (s->prefill_leg ? 1 : s->output_tokens)) finished.push_back(s);
    }
    w.plan.clear();
    for (Request* s : finished) Finish(wi, s);
    FlushBlockEvents(wi);
    if (!w.running.empty() || !w.waiting.empty()) StartStep(wi);
  }

  void Finish(int wi, Request* s) {
    Worker& w = *workers_[wi];
    const bool handoff = s->prefill_leg && s->num_generated < s->output_tokens;
    if (!handoff) s->end = now_;
    if (config_.worker.keep_finished_warm) {
      // Engine::KeepWarm: tail first, so that the head is the host tier's most recently used.
      for (size_t i = s->hashes.size(); i-- > 0;) PutHost(&w, s->hashes[i]);
    }
    ReleaseBlocks(w, s);
    ReleaseDelta(w, s);
    w.running.erase(std::find(w.running.begin(), w.running.end(), s));
    // WorkerPool::Release.
    --w.inflight;
    --w.decoding;
    index_.RemovePending(static_cast<WorkerSlot>(wi), s->pending);
    if (handoff) {
      // The coordinator resumes it on a decode worker, which copies the prompt from this one.
      ++prefill_handoffs_;
      Assign(s, /*decode_leg=*/true, /*source=*/wi);
      Enqueue(s);
      return;
    }
    const Conversation& c = workload_[s->conversation];
    ChatHistory& chat = chats_[s->conversation];
    if (s->turn + 1 < c.turns.size()) {
      chat.Reply(std::vector<int32_t>(s->tokens.begin() + s->prompt_len, s->tokens.end()));
    } else {
      chat = ChatHistory(config_.replies_in_history);  // done with
    }
    // Only the statistics stay.
    std::vector<int32_t>().swap(s->tokens);
    std::vector<BlockHash>().swap(s->pending);
    if (s->turn + 1 < c.turns.size()) {
      Push(now_ + absl::ToDoubleSeconds(c.turns[s->turn + 1].think_time), Event::kArrive,
           s->conversation, s->turn + 1);
    }
  }

  // The worker's block events into the coordinator's index (immediately: the real event stream
  // lags by a network round trip).
  void FlushBlockEvents(int wi) {
    Worker& w = *workers_[wi];
    const WorkerSlot slot = static_cast<WorkerSlot>(wi);
    for (const BlockEvent& e : w.blocks.DrainEvents()) {
      if (e.kind == BlockEvent::Kind::kStored) {
        index_.Stored(slot, e.tier, {&e.hash, 1});
      } else {
        index_.Removed(slot, e.tier, {&e.hash, 1});
      }
    }
    for (const BlockEvent& e : w.host_events) {
      if (e.kind == BlockEvent::Kind::kStored) {
        index_.Stored(slot, e.tier, {&e.hash, 1});
      } else {
        index_.Removed(slot, e.tier, {&e.hash, 1});
      }
    }
    w.host_events.clear();
  }

  SimResult Summarize() const {
    SimResult out;
    out.requests = static_cast<int64_t>(requests_.size());
    out.rejected = rejected_;
    out.unfinished = out.requests - out.rejected;  // less the completed, below
    std::vector<double> ttft, tpot, e2e;
    double first = std::numeric_limits<double>::infinity(), last = 0;
    int64_t output_tokens = 0, prompt_tokens = 0, cached = 0;
    for (const auto& r : requests_) {
      first = std::min(first, r->arrival);
      if (r->end < 0) continue;
      ++out.completed;
      --out.unfinished;
      last = std::max(last, r->end);
      ttft.push_back(1e3 * (r->first_token - r->arrival + config_.request_overhead_s));
      if (r->num_generated > 1) {
        tpot.push_back(1e3 * (r->end - r->first_token) / static_cast<double>(r->num_generated - 1));
      }
      e2e.push_back(1e3 * (r->end - r->arrival + config_.request_overhead_s));
      output_tokens += r->num_generated;
      prompt_tokens += r->prompt_len;
      cached += r->cached_prompt;
    }
    auto stats = [](const std::vector<double>& v) {
      SimPercentiles p;
      if (v.empty()) return p;
      p.p50 = Percentile(v, 50);
      p.p90 = Percentile(v, 90);
      p.p99 = Percentile(v, 99);
      double sum = 0;
      for (double x : v) sum += x;
      p.mean = sum / static_cast<double>(v.size());
      return p;
    };
    out.ttft_ms = stats(ttft);
    out.tpot_ms = stats(tpot);
    out.e2e_ms = stats(e2e);
    out.duration_s = out.completed > 0 ? std::max(1e-9, last - first) : 0;
    if (out.completed > 0) {
      out.throughput_rps = static_cast<double>(out.completed) / out.duration_s;
      out.output_tokens_per_s = static_cast<double>(output_tokens) / out.duration_s;
    }
    out.cache_hit_rate =
        prompt_tokens > 0 ? static_cast<double>(cached) / static_cast<double>(prompt_tokens) : 0;
    out.preemptions = preemptions_;
    out.inflight_prefix_waits = inflight_prefix_waits_;
    out.restored_blocks = restored_blocks_;
    out.copied_blocks = copied_blocks_;
    out.prefill_handoffs = prefill_handoffs_;
    out.disk_loaded_blocks = disk_loaded_blocks_;
    out.delta_loads = delta_loads_;
    out.mean_step_deltas =
        steps_ > 0 ? static_cast<double>(step_deltas_) / static_cast<double>(steps_) : 0;
    out.mean_decode_batch =
        decode_steps_ > 0 ? static_cast<double>(decode_rows_) / static_cast<double>(decode_steps_)
                          : 0;
    for (const auto& w : workers_) {
      out.worker_utilization.push_back(out.duration_s > 0 ? w->busy_s / out.duration_s : 0);
      out.worker_requests.push_back(w->served);
    }
    return out;
  }

  const std::vector<Conversation>& workload_;
  std::vector<ChatHistory> chats_;  // one per conversation
  const SimConfig config_;
  const uint64_t ns_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<std::unique_ptr<Request>> requests_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events_;
  uint64_t next_order_ = 0;
  double now_ = 0;
  BlockIndex index_;
  PrefixShareWindow share_;
  RecentFineTuneRoutes recent_fine_tunes_;
  uint64_t tie_break_ = 0;
  int64_t rejected_ = 0;
  int64_t preemptions_ = 0;
  int64_t inflight_prefix_waits_ = 0;
  int64_t restored_blocks_ = 0;
  int64_t copied_blocks_ = 0;
  int64_t prefill_handoffs_ = 0;
  int64_t disk_loaded_blocks_ = 0;
  int64_t delta_loads_ = 0;
  int64_t steps_ = 0;
  int64_t step_deltas_ = 0;
  uint64_t delta_clock_ = 0;
  int64_t decode_rows_ = 0;
  int64_t decode_steps_ = 0;
};

}  // namespace

absl::StatusOr<SimResult> Simulate(const std::vector<Conversation>& workload,
                                   const SimConfig& config) {
  const SimWorkerConfig& w = config.worker;
  if (config.workers < 1 || config.workers > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("workers must be 1 to 4096, not ", config.workers));
  }
  if (config.prefill_workers < 0 || config.prefill_workers >= config.workers ||
      config.disaggregate_min_uncached_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefill_workers must be 0 to workers - 1 (", config.workers - 1, "), not ",
                     config.prefill_workers, ", and disaggregate_min_uncached_tokens 0 or more"));
  }
  if (w.kv_blocks < 1 || w.block_tokens < 1 || w.block_tokens > 1024 || w.max_batch_tokens < 1 ||
      w.max_running_sequences < 1 || w.host_blocks < 0 || w.resident_deltas < 1 ||
      !(w.delta_load_s >= 0) || !std::isfinite(w.delta_load_s) || w.disk_blocks < 0 ||
      !(w.disk_block_s >= 0) || !std::isfinite(w.disk_block_s) || !(w.max_io_wait_s >= 0) ||
      !std::isfinite(w.max_io_wait_s) || (w.disk_blocks > 0 && !(w.disk_block_s > 0))) {
    return absl::InvalidArgumentError(
        "kv_blocks, max_batch_tokens, max_running_sequences and resident_deltas must be positive, "
        "block_tokens 1 to 1024, host_blocks, disk_blocks and the times at least 0, and a disk "
        "tier's reads must take time");
  }
  // Every worker's blocks are allocated up front (BlockManager): about 50 bytes each.
  if (static_cast<double>(w.kv_blocks) * config.workers > 5e7) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_blocks x workers (", w.kv_blocks, " x ", config.workers,
        ") is past the simulator's 50 million blocks: use larger block_tokens or fewer workers"));
  }
  const StepCost& c = config.cost;
  for (double v :
       {c.fixed_s, c.weights_s, c.kv_token_s, c.token_s, c.attention_pair_s, c.sequence_s,
        c.delta_s, c.delta_compute_s, c.delta_token_s, c.host_block_s, config.request_overhead_s}) {
    if (!(v >= 0) || !std::isfinite(v)) {
      return absl::InvalidArgumentError("every step cost coefficient must be finite and >= 0");
    }
  }
  if (c.Step(1, 1, 1, 1) <= 0) {
    return absl::InvalidArgumentError("a step must take some time: every cost coefficient is 0");
  }
  Simulator sim(workload, config);
  return sim.Run();
}

std::string EngineProfileToJson(const EngineProfile& p) {
  return absl::StrFormat(
      "{\"model\":%s,\"machine\":%s,\"kv_blocks\":%d,\"block_tokens\":%d,"
      "\"max_batch_tokens\":%d,\"max_running_sequences\":%d,\"request_overhead_s\":%.9g,"
      "\"delta_load_s\":%.9g,\"block_bytes\":%d,"
      "\"cost\":{\"fixed_s\":%.9g,"
      "\"weights_s\":%.9g,\"kv_token_s\":%.9g,\"token_s\":%.9g,\"attention_pair_s\":%.9g,"
      "\"sequence_s\":%.9g,\"delta_s\":%.9g,\"delta_compute_s\":%.9g,\"delta_token_s\":%.9g,"
      "\"host_block_s\":%.9g}}\n",
      JsonQuote(p.model), JsonQuote(p.machine), p.kv_blocks, p.block_tokens, p.max_batch_tokens,
      p.max_running_sequences, p.request_overhead_s, p.delta_load_s, p.block_bytes, p.cost.fixed_s,
      p.cost.weights_s, p.cost.kv_token_s, p.cost.token_s, p.cost.attention_pair_s,
      p.cost.sequence_s, p.cost.delta_s, p.cost.delta_compute_s, p.cost.delta_token_s,
      p.cost.host_block_s);
}

absl::StatusOr<EngineProfile> EngineProfileFromJson(const std::string& text,
                                                    const std::string& origin) {
  ASSIGN_OR_RETURN(const JsonDocument doc, JsonDocument::Parse(text, origin));
  const JsonValue root = doc.root();
  EngineProfile p;
  ASSIGN_OR_RETURN(p.model, root.StringFieldOr("model", ""));
  ASSIGN_OR_RETURN(p.machine, root.StringFieldOr("machine", ""));
  ASSIGN_OR_RETURN(p.kv_blocks, root.IntField("kv_blocks"));
  ASSIGN_OR_RETURN(p.block_tokens, root.IntField("block_tokens"));
  ASSIGN_OR_RETURN(p.max_batch_tokens, root.IntField("max_batch_tokens"));
  ASSIGN_OR_RETURN(p.max_running_sequences, root.IntField("max_running_sequences"));
  ASSIGN_OR_RETURN(p.request_overhead_s, root.DoubleFieldOr("request_overhead_s", 0));
  if (!(p.request_overhead_s >= 0) || !std::isfinite(p.request_overhead_s)) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ": request_overhead_s must be finite and >= 0"));
  }
  ASSIGN_OR_RETURN(p.delta_load_s, root.DoubleFieldOr("delta_load_s", 0));
  ASSIGN_OR_RETURN(p.block_bytes, root.IntFieldOr("block_bytes", 0));
  if (p.block_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": block_bytes must be >= 0"));
  }
  if (!(p.delta_load_s >= 0) || !std::isfinite(p.delta_load_s)) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ": delta_load_s must be finite and >= 0"));
  }
  ASSIGN_OR_RETURN(const JsonValue cost, root.Field("cost"));
  struct Field {
    const char* name;
    double* value;
  };
  for (const Field& f :
       {Field{"fixed_s", &p.cost.fixed_s}, Field{"weights_s", &p.cost.weights_s},
        Field{"kv_token_s", &p.cost.kv_token_s}, Field{"token_s", &p.cost.token_s},
        Field{"attention_pair_s", &p.cost.attention_pair_s},
        Field{"sequence_s", &p.cost.sequence_s}, Field{"host_block_s", &p.cost.host_block_s}}) {
    ASSIGN_OR_RETURN(*f.value, cost.DoubleField(f.name));
    if (!(*f.value >= 0) || !std::isfinite(*f.value)) {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ": cost.", f.name, " must be finite and >= 0"));
    }
  }
  // Not measured by stratactl profile; an operator may add it.
  // Measured by stratactl profile only with --delta.
  for (const Field& f :
       {Field{"delta_s", &p.cost.delta_s}, Field{"delta_compute_s", &p.cost.delta_compute_s},
        Field{"delta_token_s", &p.cost.delta_token_s}}) {
    ASSIGN_OR_RETURN(*f.value, cost.DoubleFieldOr(f.name, 0));
    if (!(*f.value >= 0) || !std::isfinite(*f.value)) {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ": cost.", f.name, " must be finite and >= 0"));
    }
  }
  if (p.kv_blocks < 1 || p.kv_blocks > 1000000000 || p.block_tokens < 1 || p.block_tokens > 1024 ||
      p.max_batch_tokens < 1 || p.max_batch_tokens > 1000000000 || p.max_running_sequences < 1 ||
      p.max_running_sequences > 1000000) {
    return absl::InvalidArgumentError(absl::StrCat(
        origin,
        ": kv_blocks (1 to 1e9), block_tokens (1 to 1024), max_batch_tokens (1 to 1e9) and "
        "max_running_sequences (1 to 1e6) are out of range"));
  }
  return p;
}

}  // namespace strata
