// WorkerService: the strata.v1.Worker gRPC service over one Engine.
//
// Threads. The engine belongs to one step-loop thread that this class starts; it alone calls the
// engine. gRPC callback threads validate requests and post commands (add, cancel, watch, unwatch)
// to the loop through a mutex-guarded inbox. Output flows back through the stream reactors below,
// each of which has its own small lock and write queue.
//
// Stream lifetime protocol. The loop thread keeps every open Submit and WatchEvents stream in maps
// that only it touches. It may use a stream until it asks the stream to finish; after that it never
// touches the stream again. A stream's Finish (and so its OnDone, which deletes it) happens only
// after the loop asked it to finish, so the loop never sees a deleted stream. gRPC threads tell the
// loop about cancellations and failed writes by posting commands keyed by a per-stream serial
// number, never by pointer dereference.
//
// Admission. At most `max_live_sequences` Submit streams are live (running plus queued) at once;
// beyond that Submit fails with RESOURCE_EXHAUSTED, except for a tenant (SubmitRequest.tenant)
// that holds less than an equal part of them (max_live_sequences over the tenants with live
// sequences, its own counted): one tenant's backlog does not lock the others out of the queue
// the engine shares fairly. The parts let the worker go past max_live_sequences, never past
// twice it. While draining, Submit fails with
// FAILED_PRECONDITION and admitted sequences run to completion. A client that cancels or
// disconnects has its sequence cancelled in the engine at the loop's next turn, which frees its KV
// blocks.
#ifndef STRATA_WORKER_SERVER_WORKER_SERVICE_H_
#define STRATA_WORKER_SERVER_WORKER_SERVICE_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "common/secrets.h"
#include "grammar/structured_output.h"
#include "proto/strata/v1/worker.grpc.pb.h"
#include "worker/engine/engine.h"
#include "worker/server/kv_fetcher.h"
#include "worker/server/kv_transfer.h"

namespace strata {

struct WorkerServiceOptions {
  // Stable name reported in WorkerInfo (the pod name in Kubernetes).
  std::string worker_id = "worker";
  // The model name clients submit under; also the cache namespace's model name (it must equal the
  // engine's EngineConfig::model_name so that the coordinator's block hashes match).
  std::string model_name = "model";
  // Its part in disaggregated serving, for the coordinators (WorkerInfo.role).
  v1::WorkerRole role = v1::WORKER_ROLE_MIXED;
  // When set, every Worker call must carry one of its secrets (kClusterSecretMetadata):
  // UNAUTHENTICATED otherwise (common/secrets.h).
  // Not owned; it must outlive the service.
  const ClusterSecret* cluster_secret = nullptr;
  // Running plus queued sequences accepted at once (a tenant under its part of them past it, up
  // to twice this; see above).
  int64_t max_live_sequences = 256;
  // Buffered events per WatchEvents stream before a slow watcher is cut off (it re-subscribes and
  // gets a fresh snapshot).
  int64_t max_buffered_events = 4096;
  // "cpu" or the GPU's name.
  std::string device = "cpu";
  // The draft model's name, for WorkerInfo (empty: none).
  std::string draft_model;
  int32_t tensor_parallel_size = 1;
  // When the loop stops: how long the engine may spend writing its cached KV blocks down to the
  // disk tier (Engine::PersistKv) after the open streams are failed over; zero: not at all.
  absl::Duration persist_kv_timeout = absl::ZeroDuration();
  // A Submit naming kv_source_address: the prompt's leading blocks that no tier here holds (at
  // least kv_fetch_min_blocks of them) are copied from that worker before the sequence is queued
  // (KvFetcher; its options here). False: such Submits are queued at once and compute them.
  bool kv_fetch = true;
  int64_t kv_fetch_min_blocks = 1;
  // Most bytes one Submit copies (they are held in host memory until stored); a copy also takes
  // at most half the device cache's blocks, so that it does not push out the whole cache.
  int64_t kv_fetch_max_bytes = int64_t{2} << 30;
  // KV block bytes copied between the cache and other workers between two engine steps, each
  // way: read out for FetchKvBlocks calls answered here (ContinueExports), and stored from copies
  // that arrived (ContinueImports); this many (one block at least), and as much again for every
  // 10 ms of the last step.
  int64_t kv_copy_slice_bytes = int64_t{8} << 20;
  // What the worker's weights are, for KV copies (FetchKvBlocksRequest.model_fingerprint): empty
  // for the engine's own (BaseFingerprint of its files); random weights name their seed here.
  std::string model_fingerprint;
  KvFetcherOptions kv_fetcher;
  // "HOST:PORT" on which to answer KV copies over plain TCP (worker/server/kv_transfer.h), the bulk
  // path beside FetchKvBlocks; port 0 picks a free one, reported in WorkerInfo.kv_transfer_port.
  // Empty: FetchKvBlocks only.
  std::string kv_transfer_listen;
  // TLS on that port (a server context, mutual as its options say; not owned, it must outlive the
  // service); null: plain TCP.
  TlsContextSource* kv_transfer_tls = nullptr;
  // Where the service records its metrics (strata_worker_*; see docs/ARCHITECTURE.md), or null.
  // Not owned; it must outlive the service.
  MetricsRegistry* metrics = nullptr;
};

class WorkerService final : public v1::Worker::CallbackService {
 public:
  // Starts the step loop. `engine` is owned; its model weights must outlive the service.
  static absl::StatusOr<std::unique_ptr<WorkerService>> Create(std::unique_ptr<Engine> engine,
                                                               WorkerServiceOptions options);
  // Stops the loop. Open streams are finished with UNAVAILABLE first. Destroy the GrpcServer that
  // serves this service (or call its Shutdown) before the service.
  ~WorkerService() override;

  // Cuts the loop's last act, writing the KV cache to disk, short (or skips it): a second signal,
  // or a tensor-parallel group that lost a rank. Callable from any thread.
  void CancelPersist() { persist_cancel_.store(true); }

  // Finishes every open stream with UNAVAILABLE and stops the loop. Idempotent.
  void Stop();

  // Replaces options.worker_id (for a name that is known only once the server has bound its port).
  void set_worker_id(std::string worker_id) ABSL_LOCKS_EXCLUDED(mu_);

  // Starts (true) or stops (false) draining, as the Drain RPC does.
  void SetDraining(bool draining);

  // Called (on a gRPC thread) whenever draining starts or stops, so that the server's health status
  // can follow.
  void SetDrainListener(std::function<void(bool draining)> listener);

  uint64_t epoch() const { return epoch_; }
  bool draining() const { return draining_.load(); }
  // Submit streams accepted and not finished.
  int64_t num_live_sequences() const { return num_live_.load(); }
  // FetchKvBlocks calls taken from other workers (with the cluster secret, if any), and when the
  // last one came (absl::InfinitePast() before any): a draining worker stays while its peers copy
  // its KV blocks.
  int64_t num_kv_export_calls() const { return num_export_calls_.load(); }
  // The port KV copies are answered on over TCP (options.kv_transfer_listen), or 0.
  int kv_transfer_port() const { return transfer_ != nullptr ? transfer_->port() : 0; }
  absl::Time last_kv_export_call() const {
    const int64_t ns = last_export_call_ns_.load();
    return ns == 0 ? absl::InfinitePast() : absl::FromUnixNanos(ns);
  }

  // strata.v1.Worker.
  grpc::ServerWriteReactor<v1::SubmitResponse>* Submit(grpc::CallbackServerContext* context,
                                                       const v1::SubmitRequest* request) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context,
                                   const v1::CancelRequest* request,
                                   v1::CancelResponse* response) override;
  grpc::ServerWriteReactor<v1::WorkerEvent>* WatchEvents(
      grpc::CallbackServerContext* context, const v1::WatchEventsRequest* request) override;
  grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* context,
                                    const v1::GetInfoRequest* request,
                                    v1::WorkerInfo* response) override;
  grpc::ServerUnaryReactor* Drain(grpc::CallbackServerContext* context,
                                  const v1::DrainRequest* request,
                                  v1::DrainResponse* response) override;
  grpc::ServerWriteReactor<v1::KvBlockData>* FetchKvBlocks(
      grpc::CallbackServerContext* context, const v1::FetchKvBlocksRequest* request) override;

  class SubmitStream;
  class EventStream;
  class ExportStream;

 private:
  struct Command;
  struct LoopState;
  // A FetchKvBlocks call still sending: the hashes left, the bytes it may still send, until when
  // it waits for blocks loading from the disk tier (InfiniteFuture while it is not waiting), and
  // when it ends whatever is left.
  struct Exporting {
    std::shared_ptr<KvExportSink> sink;
    std::vector<BlockHash> hashes;
    int64_t bytes_left = 0;
    absl::Time disk_deadline = absl::InfiniteFuture();
    absl::Time deadline;
  };
  // What one SendExported call did.
  struct Sent {
    int64_t bytes = 0;
    // It found fewer blocks in device and host memory than it had room for.
    bool short_of_blocks = false;
    // The stream failed (the caller went away).
    bool failed = false;
  };

  WorkerService(std::unique_ptr<Engine> engine, WorkerServiceOptions options);
  void Post(Command command) ABSL_LOCKS_EXCLUDED(mu_);
  // Wakes the loop from its wait (disk loads landed, an export's sink has room again).
  void WakeLoop() ABSL_LOCKS_EXCLUDED(mu_);
  void Loop();
  void ProcessInbox(LoopState* state);
  void StepEngine(LoopState* state);
  void PublishBlockEvents(LoopState* state);
  void SendLoadReports(LoopState* state);
  // Drops watchers that are more than max_buffered_events behind (they re-subscribe).
  void CutSlowWatchers(LoopState* state, size_t incoming);
  void FinishSubmit(LoopState* state, const std::string& request_id, const grpc::Status& status);
  // Queues an accepted Submit in the engine (or finishes its stream with why not).
  void AddToEngine(LoopState* state, Command& c);
  // A Submit with a KV source: starts copying the prompt's missing blocks and parks the command
  // until they arrive; false when there is nothing to copy (the caller queues it at once).
  bool StartKvFetch(LoopState* state, Command& c);
  // Some of a parked Submit's copies arrived (a part, while more come): ContinueImports stores
  // them.
  void TakeKvPart(LoopState* state, Command& c);
  // The copy for a parked Submit ended (its last blocks, or why it failed): once ContinueImports
  // has stored what came, the Submit is queued (EndKvFetch).
  void FinishKvFetch(LoopState* state, Command& c);
  // Adds arrived blocks to those of the parked Submit `request_id`, and it to the imports waiting
  // (unless its import already stopped: stale, or given up).
  void TakeKvBlocks(LoopState* state, const std::string& request_id,
                    std::vector<Engine::KvBlockCopy>& blocks);
  // Stores the next slice of the copies that arrived, in arrival order (a large copy takes
  // several steps, so that the sequences running here are not held up; its first blocks are
  // stored while the rest still come); queues each Submit whose copy has ended and whose blocks
  // are all stored, or whose import stopped. True when more are waiting.
  bool ContinueImports(LoopState* state);
  // Bytes of one KV block as copies between workers carry it (1 when the engine keeps no prefix
  // cache).
  int64_t TransferBlockBytes() const {
    return std::max<int64_t>(1, engine_->kv_transfer_layout().block_bytes());
  }
  // KV bytes copied each way between two steps (options_.kv_copy_slice_bytes, more after long
  // steps while there are more to step).
  int64_t CopySliceBytes(const LoopState& state) const;
  // A parked Submit whose import is over: the fetch's metrics, then into the engine.
  void EndKvFetch(LoopState* state, const std::string& request_id);
  // A copy asked for over gRPC or TCP, its caller authenticated: checked, counted and posted to
  // the loop (Export), or refused through `sink`.
  void RequestExport(const v1::FetchKvBlocksRequest& request, std::shared_ptr<KvExportSink> sink);
  // Takes a FetchKvBlocks call on (ContinueExports answers it from the engine's cache).
  void Export(LoopState* state, Command& c);
  // Sends the next blocks of `e` found in device or host memory now, up to max_bytes (one block
  // at least).
  Sent SendExported(Exporting& e, int64_t max_bytes);
  // Sends the exports' next blocks: a slice between two engine steps, sized by the last step's
  // time, shared among the exports in turn; an export whose stream already holds enough unsent
  // waits for the network. Finishes those done, out of time, or waiting for disk loads that
  // stopped coming. True when one could send more at once.
  bool ContinueExports(LoopState* state);
  // A live place for a sequence of `tenant` (counted in num_live_ and by tenant), or why there is
  // none (RESOURCE_EXHAUSTED); given back by ReleaseLive.
  absl::Status TakeLive(const std::string& tenant) ABSL_LOCKS_EXCLUDED(live_mu_);
  // OK when the call carries the cluster secret (or none is set); UNAUTHENTICATED, counted.
  grpc::Status CheckCaller(grpc::CallbackServerContext* context) const;
  Counter* Unauthenticated() const;  // with options_.metrics
  Counter* OtherSecret() const;      // with options_.metrics
  void ReleaseLive(const std::string& tenant) ABSL_LOCKS_EXCLUDED(live_mu_);
  v1::LoadReport MakeLoadReport(const EngineStats& stats, const LoopState& state) const;
  // Refreshes the gauges and component totals in options_.metrics (at most every 250 ms).
  void PublishMetrics(LoopState* state);

  std::unique_ptr<Engine> engine_;
  const WorkerServiceOptions options_;
  const uint64_t epoch_;
  // Read before the loop starts, immutable after.
  const KvStoreStats tiers_at_start_;
  // Structured-output grammars compiled for requests, reused by later ones with the same spec.
  GrammarCache grammars_{256};
  std::atomic<bool> draining_{false};
  std::atomic<bool> persist_cancel_{false};
  // Series of options_.metrics updated every step (null without metrics).
  Histogram* step_seconds_ = nullptr;
  Histogram* queue_wait_seconds_ = nullptr;
  Counter* generated_tokens_ = nullptr;
  std::atomic<int64_t> num_live_{0};
  std::atomic<int64_t> num_export_calls_{0};
  std::atomic<int64_t> last_export_call_ns_{0};
  absl::Mutex live_mu_;
  absl::flat_hash_map<std::string, int64_t> live_by_tenant_ ABSL_GUARDED_BY(live_mu_);
  std::atomic<uint64_t> next_serial_{1};

  absl::Mutex mu_;
  std::vector<Command> inbox_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Set by the engine's disk tier when loads finish (see Engine::SetIoNotify).
  bool io_ready_ ABSL_GUARDED_BY(mu_) = false;
  // Set with the loop's last look at the inbox: commands posted later are answered by Post itself.
  bool loop_exited_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void(bool)> drain_listener_ ABSL_GUARDED_BY(mu_);
  std::string worker_id_ ABSL_GUARDED_BY(mu_);

  // options_.model_fingerprint, or the engine's.
  const std::string fingerprint_;
  // Copies KV blocks from other workers (with options_.kv_fetch); stopped after the loop.
  std::unique_ptr<KvFetcher> fetcher_;
  // Answers KV copies over TCP (options_.kv_transfer_listen); stopped before the loop.
  std::unique_ptr<KvTransferServer> transfer_;

  std::thread loop_;
};

}  // namespace strata

#endif  // STRATA_WORKER_SERVER_WORKER_SERVICE_H_
