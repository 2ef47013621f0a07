// WorkerPool: the coordinator's view of its workers, and where routing decisions are made.
//
// Discovery. The pool starts with the addresses of a static list, or re-resolves a DNS name every
// `resolve_interval` (a Kubernetes headless Service): new addresses become workers, and workers
// whose address disappeared are dropped (requests already on them finish or fail over).
//
// Watching. Each worker has one thread that asks for its WorkerInfo, then holds a WatchEvents
// stream and feeds the shared BlockIndex from it. A worker becomes routable (SERVING) once its
// snapshot is complete; when the stream breaks, a sequence number is skipped or the epoch changes,
// everything known about it is dropped from the index, it is UNAVAILABLE, and the thread reconnects
// with exponential backoff.
//
// Routing. Assign runs the pure Route function over a consistent view (index plus loads, under the
// pool's lock) and records the request against the chosen worker: in-flight count, prefill blocks
// until its first token, and pending index entries for its prompt's blocks. Release undoes that.
//
// Thread-safe. Worker records live as long as the pool, so a stub handed out by Assign stays valid.
#ifndef STRATA_COORDINATOR_WORKER_POOL_H_
#define STRATA_COORDINATOR_WORKER_POOL_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/secrets.h"
#include "common/tls.h"
#include "coordinator/block_index.h"
#include "coordinator/discovery.h"
#include "coordinator/router.h"
#include "grpcpp/grpcpp.h"
#include "proto/strata/v1/admin.pb.h"
#include "proto/strata/v1/worker.grpc.pb.h"

namespace strata {

struct WorkerPoolOptions {
  WorkerTargets targets;
  // Replaces DNS resolution of targets.dns_name (tests).
  std::function<absl::StatusOr<std::vector<std::string>>()> resolver;
  absl::Duration resolve_interval = absl::Seconds(5);
  // Also how often each worker's info (draining) is refreshed.
  uint32_t load_report_interval_ms = 100;
  absl::Duration rpc_timeout = absl::Seconds(2);
  absl::Duration max_reconnect_backoff = absl::Seconds(2);
  RouterConfig router;
  // Disaggregated serving, where a model has prefill workers and decode (or mixed) workers: a new
  // request whose prompt leaves at least this many tokens to compute on the decode worker the
  // router would pick (none of its cache, nor copies, hold them) has its prompt computed on a
  // prefill worker instead (Assignment::prefill_leg).
  int64_t disaggregate_min_uncached_tokens = 512;
  // ... unless the prefill worker it would go to has more than this many prompt tokens queued
  // (0: no limit): then it goes to the decode worker whole.
  int64_t disaggregate_max_prefill_queue_tokens = 0;
  // The cluster secret every call to a worker carries (its first; common/secrets.h); null: none.
  // Not owned; it must outlive the pool.
  const ClusterSecret* cluster_secret = nullptr;
  // What the calls to workers go with (TLS when the cluster serves it).
  GrpcCredentials credentials;
};

// One model as the workers serving it describe it.
struct ModelView {
  std::string name;
  // The longest and shortest contexts its serving workers serve (WorkerInfo.max_context_tokens);
  // those of any worker of it that has reported one while none is serving.
  uint32_t max_context_tokens = 0;
  uint32_t min_context_tokens = 0;
  // The longest context of any of its workers, serving or not (draining, unavailable for now): a
  // prompt shorter than this but not than max_context_tokens waits for such a worker.
  uint32_t max_known_context_tokens = 0;
  // The longest contexts of the workers that serve each fine-tune: serving now, and of any.
  struct Contexts {
    uint32_t serving = 0;
    uint32_t known = 0;
  };
  std::map<std::string, Contexts> fine_tune_contexts;
  uint32_t vocab_size = 0;
  uint32_t block_tokens = 0;
  std::vector<std::string> fine_tune_ids;
  // Each fine-tune's revision as the workers report it (WorkerInfo.fine_tune_revisions; the first
  // worker's when they disagree).
  std::map<std::string, std::string> fine_tune_revisions;
  // Workers serving it now.
  uint32_t num_workers = 0;
  // Workers of it in any state (serving, draining, unavailable).
  uint32_t num_known_workers = 0;
};

// Whether `receiver` can copy `source`'s KV blocks (Worker.FetchKvBlocks), as their infos say: it
// copies at all (WorkerInfo.kv_fetch), and both keep a prefix cache of one block layout over the
// same weights (model, fingerprint, layout, tensor-parallel degree).
bool CanCopyKvBlocks(const v1::WorkerInfo& source, const v1::WorkerInfo& receiver);
// What CanCopyKvBlocks compares: equal for two workers whose blocks fit each other's caches;
// empty for a worker that keeps no prefix cache (or predates WorkerInfo.kv_layout).
std::string KvCopyKey(const v1::WorkerInfo& info);

// A request's length against the workers' contexts (WorkerInfo.max_context_tokens): `held`
// tokens reach the worker (the prompt, plus what was generated before a failover), and it may
// grow to `wanted` (plus the rest of max_tokens). 0: not known.
struct ContextNeed {
  int64_t held = 0;
  int64_t wanted = 0;
};

class WorkerPool {
 public:
  // Adds the cluster secret, if any, to a call to a worker.
  void Authorize(grpc::ClientContext* ctx) const {
    if (options_.cluster_secret != nullptr) {
      ctx->AddMetadata(kClusterSecretMetadata, options_.cluster_secret->Sent());
    }
  }
  // A request's claim on a worker, from Assign until Release.
  struct Assignment {
    WorkerSlot slot = 0;
    std::string address;
    v1::Worker::Stub* stub = nullptr;
    std::vector<BlockHash> pending;
    int64_t prefill_blocks = 0;
    bool decoding = false;
    // Of the prompt's full blocks, how many the router expected to find cached there.
    int64_t expected_cached_blocks = 0;
    // The request's fine-tune (empty for the base).
    std::string fine_tune_id;
    // A worker to copy the prompt's KV blocks it lacks from (SubmitRequest.kv_source_address),
    // and how many the router counted on copying; empty and 0 for none.
    std::string kv_source_address;
    int64_t kv_source_blocks = 0;
    // A prefill worker's part of a disaggregated request: it computes the prompt and the first
    // token, and the rest goes to a decode worker (Leg::kDecode) that copies the prompt's blocks.
    bool prefill_leg = false;
  };

  // Which workers a request may go to, by their roles (WorkerInfo.role).
  enum class Leg {
    // A new request: a prefill worker's leg when the model has both kinds and the prompt is long
    // enough uncached (WorkerPoolOptions::disaggregate_min_uncached_tokens), else any decode or
    // mixed worker; any worker at all when the model lacks either kind.
    kAuto,
    // The rest of a generation (after a prefill leg, or a failover): decode and mixed workers,
    // any when there are none.
    kDecode,
  };

  explicit WorkerPool(WorkerPoolOptions options);
  // Stops every thread and cancels every stream.
  ~WorkerPool();
  void Start();
  void Stop();

  // Picks a SERVING worker of `model` (that serves `fine_tune_id`, when not empty) outside
  // `exclude`. UNAVAILABLE when none can take it.
  // `kv_source`, when set, is a worker to copy the prompt's KV blocks from whether or not its
  // events have reported them yet (a prefill leg's worker), tried already or not.
  // `context`: a worker whose context holds no more than `held` tokens is left out (OUT_OF_RANGE
  // when that leaves none that could take it otherwise); of the rest, those that hold `wanted`
  // are picked from where there are any (a generation elsewhere would end short of max_tokens).
  // A prefill leg's worker need only hold the prompt.
  absl::StatusOr<Assignment> Assign(const std::string& model, absl::Span<const BlockHash> hashes,
                                    int64_t prompt_blocks, absl::Span<const WorkerSlot> exclude,
                                    const std::string& fine_tune_id = "", Leg leg = Leg::kAuto,
                                    std::optional<WorkerSlot> kv_source = std::nullopt,
                                    ContextNeed context = {}) ABSL_LOCKS_EXCLUDED(mu_);
  // The request's first token arrived: it moves from prefill to decode.
  void FirstToken(Assignment* a) ABSL_LOCKS_EXCLUDED(mu_);
  void Release(Assignment* a) ABSL_LOCKS_EXCLUDED(mu_);
  // What a failed Submit taught: the worker is gone (UNAVAILABLE) or draining
  // (FAILED_PRECONDITION).
  void ReportSubmitFailure(WorkerSlot slot, const grpc::Status& status) ABSL_LOCKS_EXCLUDED(mu_);

  std::vector<ModelView> Models() ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<v1::WorkerStatus> Status() ABSL_LOCKS_EXCLUDED(mu_);
  struct DrainOutcome {
    v1::WorkerStatus status;
    // Sequences still running or queued on the worker.
    uint32_t num_inflight_sequences = 0;
  };
  // Asks a worker (by address or worker_id) to drain (and stops routing to it) or to resume.
  // NOT_FOUND for an unknown worker, UNAVAILABLE when it does not answer. Blocks for one RPC.
  absl::StatusOr<DrainOutcome> Drain(const std::string& worker, bool resume)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Waits until `n` workers of `model` are SERVING (or `timeout` passes).
  bool WaitForWorkers(const std::string& model, int n, absl::Duration timeout)
      ABSL_LOCKS_EXCLUDED(mu_);

 private:
  enum class State { kConnecting, kServing, kDraining, kUnavailable };
  struct Worker {
    WorkerSlot slot = 0;
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::Worker::Stub> stub;
    std::thread thread;
    // Guarded by the pool's mu_.
    State state = State::kConnecting;
    bool removed = false;  // dropped by discovery; its thread exits
    bool drained_by_admin = false;
    // A Submit to it just failed UNAVAILABLE: not routed to until then, unless its event stream
    // (the judge of availability) says otherwise first by breaking.
    absl::Time suspect_until = absl::InfinitePast();
    bool has_info = false;
    v1::WorkerInfo info;
    // What its KV blocks are (KvCopyKey of its info): workers with equal keys can copy each
    // other's blocks, where the receiver copies at all; empty without a prefix cache.
    std::string kv_copy_key;
    // GetInfo calls sent to it, and the number of the one whose answer `info` is: an answer to
    // an older call (the periodic refresh racing one a load report asked for) is not applied.
    uint64_t info_calls = 0;
    uint64_t info_applied = 0;
    v1::LoadReport load;
    int64_t last_event_unix_ms = 0;
    int64_t inflight = 0;
    uint64_t routed = 0;
    int64_t prefill_blocks = 0;
    int64_t decoding = 0;
    grpc::ClientContext* active_context = nullptr;  // for cancellation on stop / removal
  };

  void DiscoveryLoop();
  void UpdateAddresses(const std::vector<std::string>& addresses) ABSL_LOCKS_EXCLUDED(mu_);
  void WatchLoop(Worker* w);
  bool Stopping(const Worker* w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || w->removed; }
  // Sleeps up to `d`, waking early when the pool stops or `w` is removed.
  void SleepUnlessStopping(Worker* w, absl::Duration d) ABSL_LOCKS_EXCLUDED(mu_);
  // CanCopyKvBlocks from the workers' stored keys.
  static bool CanCopy(const Worker& source, const Worker& receiver);
  // Asks `w` for its info again; false when it did not answer.
  bool RefreshInfo(Worker* w) ABSL_LOCKS_EXCLUDED(mu_);
  Worker* FindLocked(const std::string& worker) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::WorkerStatus StatusLocked(const Worker& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const WorkerPoolOptions options_;
  std::thread discovery_;
  std::atomic<uint64_t> tie_break_{0};

  absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // GetInfo calls of RefreshInfo in flight (any thread), cancelled by Stop.
  absl::flat_hash_set<grpc::ClientContext*> info_contexts_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Worker>> workers_ ABSL_GUARDED_BY(mu_);  // by slot, never shrinks
  absl::flat_hash_map<std::string, WorkerSlot> by_address_ ABSL_GUARDED_BY(mu_);
  BlockIndex index_ ABSL_GUARDED_BY(mu_);
  // The share of recent traffic each prefix has, for hot-prefix replication.
  PrefixShareWindow prefix_share_ ABSL_GUARDED_BY(mu_);
  // Where each fine-tune's requests went lately, for routing before load reports catch up.
  RecentFineTuneRoutes recent_fine_tunes_ ABSL_GUARDED_BY(mu_);
};

}  // namespace strata

#endif  // STRATA_COORDINATOR_WORKER_POOL_H_
