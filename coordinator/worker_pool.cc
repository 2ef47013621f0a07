#include "coordinator/worker_pool.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/tier_proto.h"

namespace strata {
namespace {

// Bytes of one KV block in a worker's device cache (0 when its info names none).
uint64_t DeviceBlockBytes(const v1::WorkerInfo& info) {
  for (const v1::TierCapacity& t : info.tiers()) {
    if (t.tier() == v1::TIER_DEVICE) return t.block_bytes();
  }
  return 0;
}

std::chrono::system_clock::time_point Deadline(absl::Duration d) {
  return absl::ToChronoTime(absl::Now() + d);
}

}  // namespace

std::string KvCopyKey(const v1::WorkerInfo& info) {
  if (!info.has_kv_layout()) return "";
  return absl::StrCat(info.model().size(), ":", info.model(), ":", info.model_fingerprint().size(),
                      ":", info.model_fingerprint(), ":", info.tensor_parallel_size(), ":",
                      info.block_tokens(), ":", DeviceBlockBytes(info), ":",
                      info.kv_layout().SerializeAsString());
}

namespace {

// The rule of CanCopyKvBlocks, over the two workers' keys.
bool KeysAllowCopy(const std::string& source_key, const std::string& receiver_key,
                   bool receiver_copies) {
  return receiver_copies && !source_key.empty() && source_key == receiver_key;
}

}  // namespace

bool CanCopyKvBlocks(const v1::WorkerInfo& source, const v1::WorkerInfo& receiver) {
  return KeysAllowCopy(KvCopyKey(source), KvCopyKey(receiver), receiver.kv_fetch());
}

bool WorkerPool::CanCopy(const Worker& source, const Worker& receiver) {
  return KeysAllowCopy(source.kv_copy_key, receiver.kv_copy_key, receiver.info.kv_fetch());
}

WorkerPool::WorkerPool(WorkerPoolOptions options) : options_(std::move(options)) {}

WorkerPool::~WorkerPool() { Stop(); }

void WorkerPool::Start() {
  {
    absl::MutexLock lock(&mu_);
    if (started_) return;
    started_ = true;
  }
  if (options_.targets.uses_dns() || options_.resolver) {
    discovery_ = std::thread([this] { DiscoveryLoop(); });
  } else {
    UpdateAddresses(options_.targets.static_addresses);
    // Static workers still get their info refreshed (draining state) on the same period.
    discovery_ = std::thread([this] { DiscoveryLoop(); });
  }
}

void WorkerPool::Stop() {
  std::vector<std::thread> threads;
  {
    absl::MutexLock lock(&mu_);
    if (stop_) return;
    stop_ = true;
    for (auto& w : workers_) {
      if (w->active_context != nullptr) w->active_context->TryCancel();
      if (w->thread.joinable()) threads.push_back(std::move(w->thread));
    }
    // A worker that does not answer must not hold the shutdown up for the RPC timeout.
    for (grpc::ClientContext* ctx : info_contexts_) ctx->TryCancel();
  }
  if (discovery_.joinable()) discovery_.join();
  for (std::thread& t : threads) t.join();
}

void WorkerPool::SleepUnlessStopping(Worker* w, absl::Duration d) {
  absl::MutexLock lock(&mu_);
  auto done = [this, w]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return Stopping(w); };
  mu_.AwaitWithTimeout(absl::Condition(&done), d);
}

void WorkerPool::DiscoveryLoop() {
  Worker none;  // never removed: only the pool's stop flag wakes the sleep below
  while (true) {
    if (options_.targets.uses_dns() || options_.resolver) {
      absl::StatusOr<std::vector<std::string>> addrs =
          options_.resolver ? options_.resolver()
                            : ResolveAll(options_.targets.dns_name, options_.targets.dns_port);
      if (addrs.ok()) {
        UpdateAddresses(*addrs);
      } else {
        // Keep what we have: a DNS hiccup must not drop healthy workers.
        LOG(WARNING) << addrs.status();
      }
    }
    std::vector<Worker*> live;
    {
      absl::MutexLock lock(&mu_);
      if (stop_) return;
      for (auto& w : workers_) {
        if (!w->removed && (w->state == State::kServing || w->state == State::kDraining)) {
          live.push_back(w.get());
        }
      }
    }
    for (Worker* w : live) RefreshInfo(w);
    SleepUnlessStopping(&none, options_.resolve_interval);
    absl::MutexLock lock(&mu_);
    if (stop_) return;
  }
}

void WorkerPool::UpdateAddresses(const std::vector<std::string>& addresses) {
  std::vector<std::thread> finished;
  std::vector<Worker*> to_start;
  {
    absl::MutexLock lock(&mu_);
    if (stop_) return;
    for (auto& w : workers_) {
      const bool listed =
          std::find(addresses.begin(), addresses.end(), w->address) != addresses.end();
      if (!listed && !w->removed) {
        LOG(INFO) << "worker " << w->address << " is gone from discovery; dropping it";
        w->removed = true;
        w->state = State::kUnavailable;
        index_.DropWorker(w->slot);
        if (w->active_context != nullptr) w->active_context->TryCancel();
      }
    }
    for (const std::string& address : addresses) {
      auto it = by_address_.find(address);
      Worker* w = nullptr;
      if (it == by_address_.end()) {
        auto record = std::make_unique<Worker>();
        record->slot = static_cast<WorkerSlot>(workers_.size());
        record->address = address;
        grpc::ChannelArguments args;
        args.SetMaxReceiveMessageSize(64 << 20);
        // Reconnect quickly after a worker restarts.
        args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
        args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
        record->channel = options_.credentials.NewChannel(address, args);
        record->stub = v1::Worker::NewStub(record->channel);
        w = record.get();
        by_address_[address] = w->slot;
        workers_.push_back(std::move(record));
        LOG(INFO) << "discovered worker " << address;
      } else {
        w = workers_[it->second].get();
        if (!w->removed) continue;
        LOG(INFO) << "worker " << address << " is back";
        w->removed = false;
        w->state = State::kConnecting;
        if (w->thread.joinable()) finished.push_back(std::move(w->thread));
      }
      to_start.push_back(w);
    }
  }
  // A returning worker's old thread saw `removed` and is exiting; wait for it outside the lock.
  for (std::thread& t : finished) t.join();
  absl::MutexLock lock(&mu_);
  // Stop may have collected the threads in between: start none it cannot join.
  if (stop_) return;
  for (Worker* w : to_start) w->thread = std::thread([this, w] { WatchLoop(w); });
}

bool WorkerPool::RefreshInfo(Worker* w) {
  grpc::ClientContext ctx;
  ctx.set_deadline(Deadline(options_.rpc_timeout));
  Authorize(&ctx);
  uint64_t call;
  {
    absl::MutexLock lock(&mu_);
    if (stop_) return false;
    call = ++w->info_calls;
    info_contexts_.insert(&ctx);
  }
  v1::WorkerInfo info;
  const grpc::Status s = w->stub->GetInfo(&ctx, v1::GetInfoRequest(), &info);
  absl::MutexLock lock(&mu_);
  info_contexts_.erase(&ctx);
  if (!s.ok()) return false;  // the watch stream decides availability
  if (w->removed || info.worker_epoch() != w->info.worker_epoch()) return true;
  if (call < w->info_applied) return true;  // a later call's answer is in already
  w->info_applied = call;
  w->info = info;
  w->kv_copy_key = KvCopyKey(info);
  if (w->state == State::kServing && info.draining()) w->state = State::kDraining;
  if (w->state == State::kDraining && !info.draining() && !w->drained_by_admin) {
    w->state = State::kServing;
  }
  return true;
}

void WorkerPool::WatchLoop(Worker* w) {
  absl::Duration backoff = absl::Milliseconds(50);
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (Stopping(w)) return;
    }
    // Who is it?
    v1::WorkerInfo info;
    grpc::Status status;
    uint64_t info_call = 0;
    {
      grpc::ClientContext ctx;
      ctx.set_deadline(Deadline(options_.rpc_timeout));
      Authorize(&ctx);
      {
        absl::MutexLock lock(&mu_);
        if (Stopping(w)) return;
        w->active_context = &ctx;
        info_call = ++w->info_calls;
      }
      status = w->stub->GetInfo(&ctx, v1::GetInfoRequest(), &info);
      absl::MutexLock lock(&mu_);
      w->active_context = nullptr;
    }
    if (!status.ok()) {
      {
        absl::MutexLock lock(&mu_);
        if (w->state != State::kUnavailable) {
          LOG(WARNING) << "worker " << w->address << " is unavailable: " << status.error_message();
        }
        w->state = State::kUnavailable;
      }
      SleepUnlessStopping(w, backoff);
      backoff = std::min(backoff * 2, options_.max_reconnect_backoff);
      continue;
    }
    {
      absl::MutexLock lock(&mu_);
      if (w->has_info && w->info.worker_epoch() != info.worker_epoch()) {
        LOG(INFO) << "worker " << w->address << " restarted (new epoch)";
      }
      w->info = info;
      w->kv_copy_key = KvCopyKey(info);
      w->info_applied = std::max(w->info_applied, info_call);
      w->has_info = true;
    }
    // Its events.
    grpc::ClientContext ctx;
    Authorize(&ctx);
    v1::WatchEventsRequest req;
    req.set_load_report_interval_ms(options_.load_report_interval_ms);
    {
      absl::MutexLock lock(&mu_);
      if (Stopping(w)) return;
      w->active_context = &ctx;
    }
    std::unique_ptr<grpc::ClientReader<v1::WorkerEvent>> reader = w->stub->WatchEvents(&ctx, req);
    v1::WorkerEvent ev;
    uint64_t expected = 1;
    const absl::Time opened = absl::Now();
    std::string broken;
    while (reader->Read(&ev)) {
      if (ev.worker_epoch() != info.worker_epoch()) {
        broken = "the worker restarted";
        break;
      }
      if (ev.sequence_number() != expected) {
        broken = absl::StrCat("event ", expected, " was lost");
        break;
      }
      ++expected;
      bool refresh = false;  // the worker's fine-tunes changed: ask for its info now
      {
        absl::MutexLock lock(&mu_);
        w->last_event_unix_ms = absl::ToUnixMillis(absl::Now());
        switch (ev.event_case()) {
          case v1::WorkerEvent::kStored:
            index_.Stored(w->slot, FromProtoTier(ev.stored().tier()),
                          absl::MakeConstSpan(ev.stored().block_hashes().data(),
                                              ev.stored().block_hashes_size()));
            break;
          case v1::WorkerEvent::kRemoved:
            index_.Removed(w->slot, FromProtoTier(ev.removed().tier()),
                           absl::MakeConstSpan(ev.removed().block_hashes().data(),
                                               ev.removed().block_hashes_size()));
            break;
          case v1::WorkerEvent::kLoad:
            refresh = ev.load().fine_tunes_generation() != w->info.fine_tunes_generation();
            w->load = ev.load();
            break;
          case v1::WorkerEvent::kSnapshotComplete:
            w->state =
                (w->info.draining() || w->drained_by_admin) ? State::kDraining : State::kServing;
            LOG(INFO) << "worker " << w->address << " (" << w->info.worker_id() << ", model "
                      << w->info.model() << ") is "
                      << (w->state == State::kServing ? "serving" : "draining");
            break;
          case v1::WorkerEvent::EVENT_NOT_SET:
            break;
        }
      }
      if (refresh) RefreshInfo(w);  // not answered: the next load report asks again
    }
    if (broken.empty()) {
      ctx.TryCancel();
    } else {
      ctx.TryCancel();
      while (reader->Read(&ev)) {
      }
    }
    status = reader->Finish();
    {
      absl::MutexLock lock(&mu_);
      w->active_context = nullptr;
      index_.DropWorker(w->slot);
      if (Stopping(w)) return;
      w->state = State::kUnavailable;
      LOG(WARNING) << "lost the event stream of worker " << w->address << ": "
                   << (broken.empty() ? status.error_message() : broken);
    }
    if (absl::Now() - opened > absl::Seconds(10)) backoff = absl::Milliseconds(50);
    SleepUnlessStopping(w, backoff);
    backoff = std::min(backoff * 2, options_.max_reconnect_backoff);
  }
}

absl::StatusOr<WorkerPool::Assignment> WorkerPool::Assign(
    const std::string& model, absl::Span<const BlockHash> hashes, int64_t prompt_blocks,
    absl::Span<const WorkerSlot> exclude, const std::string& fine_tune_id, Leg leg,
    std::optional<WorkerSlot> kv_source, ContextNeed context) {
  absl::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  // Candidates by role: prefill workers, and the others (decode and mixed).
  std::vector<WorkerLoadView> prefill_loads, other_loads;
  std::vector<WorkerSlot> resident;  // workers holding the fine-tune's delta now
  std::vector<WorkerSlot> sources;   // workers whose KV blocks the chosen one may copy
  int known = 0;
  int too_short = 0;            // workers that could take it but for their context
  int64_t longest_context = 0;  // the longest of theirs
  // A worker's context (0 from one that does not say: not held against it).
  auto context_of = [](const Worker& w) -> int64_t { return w.info.max_context_tokens(); };
  for (const auto& w : workers_) {
    if (w->removed || !w->has_info || w->info.model() != model) continue;
    // A draining worker still answers copies, also one that refused this request for draining (a
    // worker drained by SIGTERM stays a while for them); one that failed it otherwise (tried) may
    // be gone.
    if ((w->state == State::kDraining ||
         (w->state == State::kServing &&
          std::find(exclude.begin(), exclude.end(), w->slot) == exclude.end())) &&
        w->suspect_until <= now) {
      sources.push_back(w->slot);
    }
    if (!fine_tune_id.empty() &&
        std::find(w->info.fine_tune_ids().begin(), w->info.fine_tune_ids().end(), fine_tune_id) ==
            w->info.fine_tune_ids().end()) {
      continue;
    }
    ++known;
    if (w->state != State::kServing || w->suspect_until > now) continue;
    if (std::find(exclude.begin(), exclude.end(), w->slot) != exclude.end()) continue;
    if (const int64_t c = context_of(*w); c > 0 && c <= context.held) {
      ++too_short;
      longest_context = std::max(longest_context, c);
      continue;
    }
    WorkerLoadView v;
    v.slot = w->slot;
    const int64_t block_tokens = std::max<int64_t>(1, w->info.block_tokens());
    // The balance limit uses this coordinator's own, exact count: a worker's load report is up to
    // one report interval old, and a stale count would push conversations off their caches.
    // Work from other coordinators still shows in the cost terms below through the reports.
    v.inflight_requests = w->inflight;
    v.queued_prefill_blocks = std::max<int64_t>(
        w->prefill_blocks,
        static_cast<int64_t>(w->load.num_pending_prefill_tokens()) / block_tokens);
    v.decode_sequences = std::max<int64_t>(w->decoding, w->load.num_decode_sequences());
    (w->info.role() == v1::WORKER_ROLE_PREFILL ? prefill_loads : other_loads).push_back(v);
    // Its load report lists the delta as loaded, or this coordinator sent it one of the
    // fine-tune's requests lately (the delta is loading there, or was loaded since the report).
    if (!fine_tune_id.empty() &&
        (std::find(w->load.resident_fine_tune_ids().begin(), w->load.resident_fine_tune_ids().end(),
                   fine_tune_id) != w->load.resident_fine_tune_ids().end() ||
         recent_fine_tunes_.Recent(w->slot, fine_tune_id, now))) {
      resident.push_back(w->slot);
    }
  }
  if (prefill_loads.empty() && other_loads.empty() && too_short > 0) {
    return absl::OutOfRangeError(
        absl::StrCat("a context of ", context.held, " tokens fits none of the ", too_short,
                     " workers of model \"", model, "\" that could take it now (the longest holds ",
                     longest_context, ")"));
  }
  if (prefill_loads.empty() && other_loads.empty()) {
    return absl::UnavailableError(
        known == 0 ? absl::StrCat("no worker serves model \"", model, "\"",
                                  fine_tune_id.empty() ? "" : " with fine-tune \"", fine_tune_id,
                                  fine_tune_id.empty() ? "" : "\"", " right now")
                   : absl::StrCat("none of the ", known, " workers of model \"", model,
                                  "\" can take a request now (unavailable, draining or tried)"));
  }
  RouteRequest req;
  req.prefix_hashes = hashes;
  req.prompt_blocks = prompt_blocks;
  req.tie_break = tie_break_.fetch_add(1);
  req.fine_tune = !fine_tune_id.empty();
  req.fine_tune_resident = resident;
  req.fetch_sources = sources;
  req.can_copy = [this](WorkerSlot receiver, WorkerSlot source) {
    mu_.AssertHeld();  // called within Route, below
    return CanCopy(*workers_[source], *workers_[receiver]);
  };
  if (!hashes.empty()) {
    // Count this prompt's first block among the recent ones (retries count again: they are load).
    req.prefix_share = prefix_share_.Add(hashes[0]);
  }
  // Where the whole generation fits (prompt plus max_tokens) somewhere, it goes there: elsewhere
  // it would end short. (The workers that generate it, that is: a prefill leg's need only hold
  // the prompt.)
  if (context.wanted > context.held) {
    std::vector<WorkerLoadView>& generating = other_loads.empty() ? prefill_loads : other_loads;
    auto short_of = [&](const WorkerLoadView& v) {
      const int64_t c = context_of(*workers_[v.slot]);
      return c != 0 && c < context.wanted;
    };
    // (Usually every worker holds it, or none does: nothing to drop.)
    const auto fitting = std::count_if(generating.begin(), generating.end(),
                                       [&](const WorkerLoadView& v) { return !short_of(v); });
    if (fitting > 0 && fitting < static_cast<int64_t>(generating.size())) {
      generating.erase(std::remove_if(generating.begin(), generating.end(), short_of),
                       generating.end());
    }
  }
  // A prompt goes to a prefill worker only if some decode or mixed worker here can copy its blocks
  // from there (else it would be computed twice).
  if (leg == Leg::kAuto && !prefill_loads.empty() && !other_loads.empty()) {
    std::vector<WorkerLoadView> handing_off;
    for (const WorkerLoadView& p : prefill_loads) {
      for (const WorkerLoadView& v : other_loads) {
        if (CanCopy(*workers_[p.slot], *workers_[v.slot])) {
          handing_off.push_back(p);
          break;
        }
      }
    }
    prefill_loads = std::move(handing_off);
  }
  // A decode leg goes to a worker that can copy the prefill worker's blocks, where there is one.
  if (kv_source.has_value() && *kv_source < workers_.size()) {
    const Worker* named = workers_[*kv_source].get();
    std::vector<WorkerLoadView> fitting;
    for (const WorkerLoadView& v : other_loads) {
      if (CanCopy(*named, *workers_[v.slot])) fitting.push_back(v);
    }
    if (!fitting.empty()) other_loads = std::move(fitting);
  }
  // A decode leg (a resumed generation) goes to decode and mixed workers; a new request may be
  // split off to a prefill worker.
  const LegChoice choice = RouteNewRequest(
      req,
      leg == Leg::kAuto && !other_loads.empty() ? absl::MakeConstSpan(prefill_loads)
                                                : absl::Span<const WorkerLoadView>(),
      other_loads.empty() ? absl::MakeConstSpan(prefill_loads) : absl::MakeConstSpan(other_loads),
      index_, options_.router,
      {options_.disaggregate_min_uncached_tokens, options_.disaggregate_max_prefill_queue_tokens},
      std::max<int64_t>(1,
                        workers_[other_loads.empty() ? prefill_loads[0].slot : other_loads[0].slot]
                            ->info.block_tokens()));
  const bool prefill_leg = choice.prefill_leg;
  const RouteDecision& d = choice.decision;
  const WorkerScore& score = d.scores[d.chosen];
  Worker* w = workers_[score.slot].get();
  Assignment a;
  a.slot = w->slot;
  a.address = w->address;
  a.stub = w->stub.get();
  a.pending.assign(hashes.begin(), hashes.end());
  a.prefill_leg = prefill_leg;
  int64_t cached = 0;
  for (int64_t c : score.overlap_blocks) cached += c;
  a.expected_cached_blocks = cached;
  const Worker* source =
      score.fetch_source < 0 ? nullptr : workers_[static_cast<size_t>(score.fetch_source)].get();
  int64_t source_blocks = score.fetch_blocks;
  if (kv_source.has_value() && *kv_source < workers_.size() && *kv_source != w->slot) {
    // The prefill leg's worker holds the whole prompt (its events may not have said so yet).
    const Worker* named = workers_[*kv_source].get();
    if (!named->removed && named->info.model() == model &&
        (named->state == State::kServing || named->state == State::kDraining) &&
        CanCopy(*named, *w) && static_cast<int64_t>(hashes.size()) > cached) {
      source = named;
      source_blocks = static_cast<int64_t>(hashes.size()) - cached;
    }
  }
  if (source != nullptr) {
    a.kv_source_address = source->address;
    a.kv_source_blocks = source_blocks;
    cached += source_blocks;
  }
  a.prefill_blocks = std::max<int64_t>(0, prompt_blocks - cached);
  ++w->inflight;
  ++w->routed;
  w->prefill_blocks += a.prefill_blocks;
  index_.AddPending(w->slot, a.pending);
  a.fine_tune_id = fine_tune_id;
  if (!fine_tune_id.empty()) recent_fine_tunes_.Routed(w->slot, fine_tune_id, now);
  VLOG(1) << "routed to " << w->address << (prefill_leg ? " (prefill leg" : " (")
          << (prefill_leg ? ", " : "") << "cost " << score.cost << ", " << cached
          << " cached blocks of " << prompt_blocks << (d.replicated ? ", replicating" : "")
          << (a.kv_source_address.empty()
                  ? ""
                  : absl::StrCat(", ", a.kv_source_blocks, " to copy from ", a.kv_source_address))
          << ")";
  return a;
}

void WorkerPool::FirstToken(Assignment* a) {
  absl::MutexLock lock(&mu_);
  if (a->decoding) return;
  Worker* w = workers_[a->slot].get();
  w->prefill_blocks -= a->prefill_blocks;
  ++w->decoding;
  a->decoding = true;
}

void WorkerPool::Release(Assignment* a) {
  absl::MutexLock lock(&mu_);
  Worker* w = workers_[a->slot].get();
  --w->inflight;
  if (a->decoding) {
    --w->decoding;
  } else {
    w->prefill_blocks -= a->prefill_blocks;
  }
  index_.RemovePending(w->slot, a->pending);
  a->pending.clear();
  // A fine-tune's request that ended before its first token (its delta failed to load there, or
  // the worker failed) does not make that worker the fine-tune's home.
  if (!a->decoding && !a->fine_tune_id.empty()) recent_fine_tunes_.Forget(w->slot, a->fine_tune_id);
}

void WorkerPool::ReportSubmitFailure(WorkerSlot slot, const grpc::Status& status) {
  absl::MutexLock lock(&mu_);
  if (slot >= workers_.size()) return;
  Worker* w = workers_[slot].get();
  if (status.error_code() == grpc::StatusCode::FAILED_PRECONDITION && w->state == State::kServing) {
    w->state = State::kDraining;
  } else if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    // A dead worker's event stream breaks at the same moment and marks it unavailable; a blip
    // only keeps it out of routing for a second.
    w->suspect_until = absl::Now() + absl::Seconds(1);
  }
}

std::vector<ModelView> WorkerPool::Models() {
  absl::MutexLock lock(&mu_);
  std::vector<ModelView> out;
  for (const auto& w : workers_) {
    if (w->removed || !w->has_info) continue;
    auto it = std::find_if(out.begin(), out.end(),
                           [&](const ModelView& m) { return m.name == w->info.model(); });
    if (it == out.end()) {
      ModelView m;
      m.name = w->info.model();
      m.vocab_size = w->info.vocab_size();
      m.block_tokens = w->info.block_tokens();
      out.push_back(m);
      it = out.end() - 1;
    }
    // Contexts: of the serving workers, once there is one; until then, of any.
    const uint32_t context = w->info.max_context_tokens();
    it->max_known_context_tokens = std::max(it->max_known_context_tokens, context);
    const bool serving = w->state == State::kServing;
    if (serving && it->num_workers == 0) {
      it->max_context_tokens = context;
      it->min_context_tokens = context;
    } else if (serving || it->num_workers == 0) {
      it->max_context_tokens = std::max(it->max_context_tokens, context);
      it->min_context_tokens =
          it->min_context_tokens == 0 ? context : std::min(it->min_context_tokens, context);
    }
    for (int i = 0; i < w->info.fine_tune_ids_size(); ++i) {
      const std::string& ft = w->info.fine_tune_ids(i);
      if (std::find(it->fine_tune_ids.begin(), it->fine_tune_ids.end(), ft) ==
          it->fine_tune_ids.end()) {
        it->fine_tune_ids.push_back(ft);
      }
      if (i < w->info.fine_tune_revisions_size()) {
        it->fine_tune_revisions.emplace(ft, w->info.fine_tune_revisions(i));
      }
      ModelView::Contexts& c = it->fine_tune_contexts[ft];
      c.known = std::max(c.known, context);
      if (serving) c.serving = std::max(c.serving, context);
    }
    if (w->state == State::kServing) ++it->num_workers;
    ++it->num_known_workers;
  }
  return out;
}

v1::WorkerStatus WorkerPool::StatusLocked(const Worker& w) {
  v1::WorkerStatus s;
  s.set_address(w.address);
  switch (w.state) {
    case State::kServing:
      s.set_state(v1::WORKER_STATE_SERVING);
      break;
    case State::kDraining:
      s.set_state(v1::WORKER_STATE_DRAINING);
      break;
    case State::kConnecting:
    case State::kUnavailable:
      s.set_state(v1::WORKER_STATE_UNAVAILABLE);
      break;
  }
  if (w.has_info) *s.mutable_info() = w.info;
  *s.mutable_load() = w.load;
  for (Tier t : {Tier::kDevice, Tier::kHost, Tier::kDisk}) {
    const int64_t n = index_.NumBlocks(w.slot, t);
    if (n == 0 && t != Tier::kDevice) continue;
    v1::TierLoad* tl = s.add_indexed();
    tl->set_tier(ToProtoTier(t));
    tl->set_num_total_blocks(static_cast<uint64_t>(n));
  }
  s.set_last_event_unix_ms(w.last_event_unix_ms);
  s.set_num_inflight_requests(static_cast<uint32_t>(std::max<int64_t>(0, w.inflight)));
  s.set_num_routed_requests(w.routed);
  return s;
}

std::vector<v1::WorkerStatus> WorkerPool::Status() {
  absl::MutexLock lock(&mu_);
  std::vector<v1::WorkerStatus> out;
  for (const auto& w : workers_) {
    if (!w->removed) out.push_back(StatusLocked(*w));
  }
  return out;
}

WorkerPool::Worker* WorkerPool::FindLocked(const std::string& worker) {
  for (auto& w : workers_) {
    if (w->removed) continue;
    if (w->address == worker || (w->has_info && w->info.worker_id() == worker)) return w.get();
  }
  return nullptr;
}

absl::StatusOr<WorkerPool::DrainOutcome> WorkerPool::Drain(const std::string& worker, bool resume) {
  v1::Worker::Stub* stub = nullptr;
  {
    absl::MutexLock lock(&mu_);
    Worker* w = FindLocked(worker);
    if (w == nullptr) {
      std::vector<std::string> known;
      for (const auto& x : workers_) {
        if (!x->removed) known.push_back(x->address);
      }
      return absl::NotFoundError(absl::StrCat(
          "worker \"", worker, "\" is not known (workers: ", absl::StrJoin(known, ", "), ")"));
    }
    stub = w->stub.get();
    w->drained_by_admin = !resume;
    if (!resume && w->state == State::kServing) w->state = State::kDraining;
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(Deadline(options_.rpc_timeout));
  Authorize(&ctx);
  v1::DrainRequest req;
  req.set_resume(resume);
  v1::DrainResponse resp;
  const grpc::Status s = stub->Drain(&ctx, req, &resp);
  absl::MutexLock lock(&mu_);
  Worker* w = FindLocked(worker);
  if (w == nullptr) return absl::NotFoundError(absl::StrCat("worker \"", worker, "\" is gone"));
  if (!s.ok()) {
    return absl::UnavailableError(
        absl::StrCat("worker ", w->address, " did not answer Drain: ", s.error_message()));
  }
  w->info.set_draining(resp.draining());
  if (resume && w->state == State::kDraining) w->state = State::kServing;
  DrainOutcome out;
  out.status = StatusLocked(*w);
  out.num_inflight_sequences = resp.num_inflight_sequences();
  return out;
}

bool WorkerPool::WaitForWorkers(const std::string& model, int n, absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  while (true) {
    int serving = 0;
    for (const ModelView& m : Models()) {
      if (m.name == model) serving = static_cast<int>(m.num_workers);
    }
    if (serving >= n) return true;
    if (absl::Now() >= give_up) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

}  // namespace strata
