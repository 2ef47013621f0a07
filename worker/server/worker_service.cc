#include "worker/server/worker_service.h"

#include <algorithm>
#include <array>
#include <deque>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/grpc_stream.h"
#include "common/log.h"
#include "common/secrets.h"
#include "common/tier_proto.h"
#include "common/version.h"
#include "kernels/dtype.h"
#include "worker/model/model_runner.h"
#include "worker/server/submit_request.h"

namespace strata {
namespace {

// Hashes per KvBlocksStored event of a snapshot.
constexpr size_t kSnapshotChunk = 1024;
// Step durations averaged in load reports.
constexpr size_t kStepWindow = 32;
// Least time between two load reports sent because the load changed.
constexpr absl::Duration kMinChangeReportInterval = absl::Milliseconds(5);
// Most block hashes one FetchKvBlocks call names.
constexpr int kMaxFetchBlocks = 4096;
// Longest a FetchKvBlocks call waits for the next of its blocks to load from the disk tier.
constexpr absl::Duration kExportDiskWait = absl::Milliseconds(500);
// Longest a FetchKvBlocks call streams in all (a caller that stopped reading is dropped).
constexpr absl::Duration kExportMaxDuration = absl::Seconds(30);
// Between two engine steps the exports read out options_.kv_copy_slice_bytes, and the imports store
// as much, and as much again for every this many ms of the last step. A step thus waits behind
// copying in proportion to its own length (a device or memory copy of 8 MiB takes a millisecond or
// two), while copies keep pace with the network when steps are long. Each export's stream holds at
// most twice a slice unsent.
constexpr double kCopySliceStepMs = 10;

v1::KvBlockLayout ToProtoLayout(const KvBlockLayout& layout) {
  v1::KvBlockLayout out;
  out.set_num_segments(static_cast<uint32_t>(layout.num_segments));
  out.set_block_tokens(static_cast<uint32_t>(layout.block_tokens));
  out.set_num_kv_heads(static_cast<uint32_t>(layout.num_heads));
  out.set_head_dim(static_cast<uint32_t>(layout.head_dim));
  out.set_dtype(absl::AsciiStrToLower(DTypeName(layout.dtype)));
  return out;
}

uint64_t NewEpoch() {
  absl::BitGen gen;
  uint64_t e = 0;
  while (e == 0) e = absl::Uniform<uint64_t>(gen);
  return e;
}

v1::TokenLogprob ToTokenLogprob(int32_t token, float logprob, int32_t rank) {
  v1::TokenLogprob t;
  t.set_token_id(token);
  t.set_logprob(logprob);
  t.set_rank(static_cast<uint32_t>(rank));
  return t;
}

void ToPositionLogprobs(const SampledToken& s, v1::PositionLogprobs* out) {
  *out->mutable_token() = ToTokenLogprob(s.token, s.logprob, s.rank);
  for (size_t i = 0; i < s.top.size(); ++i) {
    *out->add_top() = ToTokenLogprob(s.top[i].first, s.top[i].second, static_cast<int32_t>(i + 1));
  }
}

}  // namespace

// One Submit call.
class WorkerService::SubmitStream final : public QueuedServerWriter<v1::SubmitResponse> {
 public:
  SubmitStream(WorkerService* service, std::string request_id, uint64_t serial)
      : service_(service), request_id_(std::move(request_id)), serial_(serial) {}

  uint64_t serial() const { return serial_; }

  void OnCancel() override { PostCancel(); }

 protected:
  bool Merge(v1::SubmitResponse& queued, v1::SubmitResponse& next) override {
    queued.mutable_token_ids()->Add(next.token_ids().begin(), next.token_ids().end());
    for (auto& lp : *next.mutable_logprobs()) *queued.add_logprobs() = std::move(lp);
    if (next.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      queued.set_finish_reason(next.finish_reason());
    }
    if (next.has_usage()) *queued.mutable_usage() = next.usage();
    return true;
  }
  void OnWriteFailed() override { PostCancel(); }

 private:
  void PostCancel();

  WorkerService* const service_;
  const std::string request_id_;
  const uint64_t serial_;
};

// One WatchEvents call.
class WorkerService::EventStream final : public QueuedServerWriter<v1::WorkerEvent> {
 public:
  EventStream(WorkerService* service, uint64_t serial) : service_(service), serial_(serial) {}
  uint64_t serial() const { return serial_; }
  void OnCancel() override { PostUnwatch(); }

 protected:
  void OnWriteFailed() override { PostUnwatch(); }

 private:
  void PostUnwatch();

  WorkerService* const service_;
  const uint64_t serial_;
};

// One FetchKvBlocks call: the loop queues every block, then the finish.
class WorkerService::ExportStream final : public QueuedServerWriter<v1::KvBlockData> {
 public:
  // The caller went away or gave up: the loop stops reading blocks for it.
  void OnCancel() override { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }
  // KvExportSink::WakeWhenBelow.
  void WakeWhenBelow(size_t blocks, std::function<void()> wake) {
    {
      std::lock_guard<std::mutex> lock(wake_mu_);
      wake_below_ = blocks;
      wake_ = std::move(wake);
    }
    if (num_queued() < blocks) Wake();
  }

 private:
  void OnWrittenLocked(size_t queued) override {
    bool below = false;
    {
      std::lock_guard<std::mutex> lock(wake_mu_);
      below = wake_ != nullptr && queued < wake_below_;
    }
    if (below) Wake();
  }
  void Wake() {
    std::function<void()> wake;
    {
      std::lock_guard<std::mutex> lock(wake_mu_);
      wake = std::exchange(wake_, nullptr);
    }
    if (wake != nullptr) wake();
  }

  std::atomic<bool> cancelled_{false};
  std::mutex wake_mu_;
  size_t wake_below_ = 0;       // guarded by wake_mu_
  std::function<void()> wake_;  // guarded by wake_mu_
};

namespace {

// A FetchKvBlocks stream as the loop's export sink. The stream deletes itself once finished, which
// the sink's Finish or Abort asks for once.
class GrpcExportSink final : public KvExportSink {
 public:
  explicit GrpcExportSink(WorkerService::ExportStream* stream) : stream_(stream) {}
  ~GrpcExportSink() override {
    if (stream_ != nullptr) stream_->Abort(grpc::Status(grpc::StatusCode::CANCELLED, "dropped"));
  }
  bool Write(Engine::KvBlockCopy copy) override {
    return stream_->Write(ToKvBlockData(std::move(copy)));
  }
  size_t num_queued() override { return stream_->num_queued(); }
  bool cancelled() override { return stream_->cancelled(); }
  void Finish(absl::Status status) override {
    std::exchange(stream_, nullptr)->RequestFinish(ToGrpcStatus(status));
  }
  void Abort(absl::Status status) override {
    std::exchange(stream_, nullptr)->Abort(ToGrpcStatus(status));
  }
  void WakeWhenBelow(size_t blocks, std::function<void()> wake) override {
    stream_->WakeWhenBelow(blocks, std::move(wake));
  }

 private:
  WorkerService::ExportStream* stream_;
};

}  // namespace

struct WorkerService::Command {
  enum class Kind { kAdd, kCancel, kCancelById, kWatch, kUnwatch, kExport, kFetchedPart, kFetched };
  Kind kind = Kind::kAdd;
  std::string request_id;
  uint64_t serial = 0;
  // kAdd.
  SubmitStream* submit = nullptr;
  ParsedSubmit parsed;
  absl::Time accepted;
  // kCancelById: answered by the loop.
  grpc::ServerUnaryReactor* unary = nullptr;
  v1::CancelResponse* cancel_response = nullptr;
  // kWatch.
  EventStream* watch = nullptr;
  absl::Duration load_interval;
  // kExport.
  std::shared_ptr<KvExportSink> export_sink;
  v1::FetchKvBlocksRequest export_request;
  // kFetchedPart, kFetched (request_id and serial name the parked kAdd): the part's blocks, or
  // the end of the copy.
  KvFetchResult fetched;
};

struct WorkerService::LoopState {
  struct Live {
    SubmitStream* stream = nullptr;
    uint64_t serial = 0;
    bool want_logprobs = false;
    absl::Time accepted;
    std::string tenant;
  };
  struct Watcher {
    EventStream* stream = nullptr;
    uint64_t serial = 0;
    absl::Duration interval;
    absl::Time next_report;
    uint64_t next_sequence = 1;
  };
  absl::flat_hash_map<std::string, Live> live;
  // Submits waiting for KV blocks copied from another worker, by request id (not yet in the
  // engine, but counted live and cancellable).
  struct Fetching {
    Command add;
    Engine::PromptBlocks blocks;
    uint64_t ticket = 0;  // the KvFetcher's
    // The copies, stored as they arrive (ContinueImports): the blocks that came so far, how many
    // of them were taken to the engine, and how many of those it stored; the copy's end, once
    // it ended.
    std::vector<Engine::KvBlockCopy> arrived = {};
    size_t imported = 0;
    int64_t stored = 0;
    std::optional<KvFetchResult> result = std::nullopt;
    // It waits in `importing`.
    bool queued = false;
    // The blocks before the copies left the cache (the copies are of no use), or the engine
    // stopped taking them: the copy is cancelled, and ends when the fetcher says so.
    bool stale = false;
    bool given_up = false;
    // What the stored blocks and the prompt's head before them hold in the engine until the
    // request takes them (Engine::EndImport when it ends, however it ends).
    Engine::ImportLease lease = {};
  };
  absl::flat_hash_map<std::string, Fetching> fetching;
  // The Submits with copies that arrived and wait to be stored, in arrival order, by id and
  // serial (one cancelled meanwhile is no longer in `fetching`).
  std::deque<std::pair<std::string, uint64_t>> importing;
  // FetchKvBlocks calls still sending (ContinueExports), and which goes first next time.
  std::vector<Exporting> exporting;
  uint64_t export_turn = 0;
  std::vector<Watcher> watchers;
  std::deque<double> step_ms;
  std::array<int64_t, 4> last_reported_counts = {0, 0, 0, 0};
  absl::Time last_change_report = absl::InfinitePast();
  absl::Time next_metrics = absl::InfinitePast();
  // Each tenant's metric series, looked up once; `seen` marks those the engine still lists at a
  // publish (the others read 0: the engine forgot them, idle).
  struct TenantSeries {
    Counter* tokens[2] = {};  // computed, generated
    Counter* admissions = nullptr;
    Counter* queue_wait = nullptr;
    Gauge* sequences[2] = {};          // running, waiting
    Gauge* kv_blocks[kNumTiers] = {};  // null for a tier not configured
    bool seen = false;
  };
  absl::flat_hash_map<std::string, TenantSeries> tenant_series;
};

void WorkerService::SubmitStream::PostCancel() {
  Command c;
  c.kind = Command::Kind::kCancel;
  c.request_id = request_id_;
  c.serial = serial_;
  service_->Post(std::move(c));
}

void WorkerService::EventStream::PostUnwatch() {
  Command c;
  c.kind = Command::Kind::kUnwatch;
  c.serial = serial_;
  service_->Post(std::move(c));
}

absl::StatusOr<std::unique_ptr<WorkerService>> WorkerService::Create(std::unique_ptr<Engine> engine,
                                                                     WorkerServiceOptions options) {
  if (engine == nullptr) return absl::InvalidArgumentError("WorkerService needs an engine");
  if (options.model_name != engine->config().model_name) {
    return absl::InvalidArgumentError(
        absl::StrCat("WorkerService: model_name \"", options.model_name,
                     "\" differs from the engine's cache namespace model \"",
                     engine->config().model_name, "\""));
  }
  if (options.max_live_sequences < 1) {
    return absl::InvalidArgumentError("WorkerService: max_live_sequences must be positive");
  }
  std::unique_ptr<WorkerService> service(new WorkerService(std::move(engine), std::move(options)));
  if (!service->options_.kv_transfer_listen.empty()) {
    KvTransferServerOptions to;
    to.listen_address = service->options_.kv_transfer_listen;
    to.cluster_secret = service->options_.cluster_secret;
    to.tls = service->options_.kv_transfer_tls;
    WorkerService* s = service.get();
    to.on_request = [s](const v1::FetchKvBlocksRequest& request,
                        std::shared_ptr<KvExportSink> sink) {
      s->RequestExport(request, std::move(sink));
    };
    if (s->options_.metrics != nullptr) {
      to.on_unauthenticated = [s] { s->Unauthenticated()->Add(); };
      to.on_other_secret = [s] { s->OtherSecret()->Add(); };
      if (to.tls != nullptr) {
        Counter* failures = s->options_.metrics->GetCounter(
            "strata_worker_kv_transfer_tls_failures_total",
            "TLS handshakes on the KV transfer port that failed (not TLS, a certificate refused, "
            "too slow)");
        to.on_tls_failure = [failures] { failures->Add(); };
      }
    }
    absl::StatusOr<std::unique_ptr<KvTransferServer>> transfer =
        KvTransferServer::Start(std::move(to));
    if (!transfer.ok()) return transfer.status();  // the service stops as it goes
    service->transfer_ = *std::move(transfer);
  }
  return service;
}

WorkerService::WorkerService(std::unique_ptr<Engine> engine, WorkerServiceOptions options)
    : engine_(std::move(engine)),
      options_(std::move(options)),
      epoch_(NewEpoch()),
      tiers_at_start_(engine_->Stats().tiers),
      fingerprint_(options_.model_fingerprint.empty() ? engine_->model_fingerprint()
                                                      : options_.model_fingerprint) {
  worker_id_ = options_.worker_id;
  if (options_.metrics != nullptr) {
    step_seconds_ = options_.metrics->GetHistogram(
        "strata_worker_step_seconds", "Engine step time.",
        {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5});
    queue_wait_seconds_ = options_.metrics->GetHistogram(
        "strata_worker_queue_wait_seconds",
        "Time requests waited in the engine's queue before their first admission.",
        LatencyBuckets());
    generated_tokens_ = options_.metrics->GetCounter("strata_worker_generated_tokens_total",
                                                     "Tokens generated (sampled).");
    if (options_.cluster_secret != nullptr) {  // the series, at 0
      Unauthenticated();
      OtherSecret();
    }
  }
  if (options_.kv_fetch) {
    fetcher_ = std::make_unique<KvFetcher>(options_.kv_fetcher);
  }
  // Disk loads a waiting request needs wake the loop as they finish.
  engine_->SetIoNotify([this] { WakeLoop(); });
  loop_ = std::thread([this] { Loop(); });
}

WorkerService::~WorkerService() { Stop(); }

void WorkerService::WakeLoop() {
  absl::MutexLock lock(&mu_);
  io_ready_ = true;
}

void WorkerService::Stop() {
  // No more copies asked for over TCP; those being sent fail (the loop drops them).
  if (transfer_ != nullptr) transfer_->Stop();
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (loop_.joinable()) loop_.join();
  // Its callbacks post to a loop that has exited, which drops them.
  if (fetcher_ != nullptr) fetcher_->Stop();
  // The engine outlives this object's mutex in destruction: stop its calls into it first.
  engine_->SetIoNotify(nullptr);
}

void WorkerService::SetDrainListener(std::function<void(bool)> listener) {
  absl::MutexLock lock(&mu_);
  drain_listener_ = std::move(listener);
}

void WorkerService::set_worker_id(std::string worker_id) {
  absl::MutexLock lock(&mu_);
  worker_id_ = std::move(worker_id);
}

void WorkerService::SetDraining(bool draining) {
  if (draining_.exchange(draining) == draining) return;
  std::function<void(bool)> listener;
  {
    absl::MutexLock lock(&mu_);
    listener = drain_listener_;
  }
  LOG(INFO) << (draining ? "draining: no new sequences are admitted"
                         : "drain undone: admitting sequences again");
  if (listener) listener(draining);
}

void WorkerService::Post(Command command) {
  {
    absl::MutexLock lock(&mu_);
    if (!loop_exited_) {
      inbox_.push_back(std::move(command));
      return;
    }
  }
  // The loop is gone (shutting down): answer here so that no call is left open.
  const grpc::Status gone(grpc::StatusCode::UNAVAILABLE, "worker is shutting down");
  switch (command.kind) {
    case Command::Kind::kAdd:
      ReleaseLive(command.parsed.options.tenant);
      command.submit->RequestFinish(gone);
      break;
    case Command::Kind::kWatch:
      command.watch->RequestFinish(gone);
      break;
    case Command::Kind::kCancelById:
      command.cancel_response->set_cancelled(false);
      command.unary->Finish(grpc::Status::OK);
      break;
    case Command::Kind::kExport:
      command.export_sink->Finish(FromGrpcStatus(gone));
      break;
    case Command::Kind::kCancel:
    case Command::Kind::kUnwatch:
    case Command::Kind::kFetchedPart:
    case Command::Kind::kFetched:
      break;  // their streams were finished when the loop exited
  }
}

Counter* WorkerService::Unauthenticated() const {
  return options_.metrics->GetCounter("strata_worker_unauthenticated_total",
                                      "Worker calls refused for lacking the cluster secret.");
}

Counter* WorkerService::OtherSecret() const {
  return options_.metrics->GetCounter(
      "strata_worker_calls_with_other_secret_total",
      "Worker calls that carried a cluster secret other than the first of the file's (from a "
      "coordinator not yet moved to it during a rotation).");
}

grpc::Status WorkerService::CheckCaller(grpc::CallbackServerContext* context) const {
  if (options_.cluster_secret == nullptr) return grpc::Status::OK;
  const auto& metadata = context->client_metadata();
  auto it = metadata.find(kClusterSecretMetadata);
  if (it != metadata.end()) {
    const int match =
        options_.cluster_secret->Match(absl::string_view(it->second.data(), it->second.size()));
    if (match > 0 && options_.metrics != nullptr) OtherSecret()->Add();
    if (match >= 0) return grpc::Status::OK;
  }
  if (options_.metrics != nullptr) Unauthenticated()->Add();
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      absl::StrCat("this worker answers its cluster's coordinators only: the call "
                                   "lacks the cluster secret (gRPC metadata ",
                                   kClusterSecretMetadata, "; --cluster_secret_file)"));
}

grpc::ServerWriteReactor<v1::SubmitResponse>* WorkerService::Submit(
    grpc::CallbackServerContext* context, const v1::SubmitRequest* request) {
  auto* stream = new SubmitStream(this, request->request_id(), next_serial_.fetch_add(1));
  if (grpc::Status caller = CheckCaller(context); !caller.ok()) {
    stream->RequestFinish(caller);
    return stream;
  }
  const ModelConfig& mc = engine_->model_config();
  SubmitLimits limits;
  limits.model_name = options_.model_name;
  limits.vocab_size = mc.vocab_size;
  limits.max_context_tokens = engine_->MaxContextTokens();
  limits.fine_tunes = engine_.get();
  limits.grammars = &grammars_;
  absl::StatusOr<ParsedSubmit> parsed = ParseSubmitRequest(*request, limits);
  if (!parsed.ok()) {
    stream->RequestFinish(ToGrpcStatus(parsed.status()));
    return stream;
  }
  // Counted before the draining check, so that a drain that sees no live sequences cannot miss
  // this one.
  const std::string& tenant = parsed->options.tenant;
  if (absl::Status place = TakeLive(tenant); !place.ok()) {
    stream->RequestFinish(ToGrpcStatus(place));
    return stream;
  }
  if (draining_.load()) {
    ReleaseLive(tenant);
    stream->RequestFinish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                       "worker is draining: route the request elsewhere"));
    return stream;
  }
  Command c;
  c.kind = Command::Kind::kAdd;
  c.request_id = parsed->request_id;
  c.serial = stream->serial();
  c.submit = stream;
  c.parsed = *std::move(parsed);
  c.accepted = absl::Now();
  Post(std::move(c));
  return stream;
}

grpc::ServerUnaryReactor* WorkerService::Cancel(grpc::CallbackServerContext* context,
                                                const v1::CancelRequest* request,
                                                v1::CancelResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status caller = CheckCaller(context); !caller.ok()) {
    reactor->Finish(caller);
    return reactor;
  }
  Command c;
  c.kind = Command::Kind::kCancelById;
  c.request_id = request->request_id();
  c.unary = reactor;
  c.cancel_response = response;
  Post(std::move(c));
  return reactor;
}

grpc::ServerWriteReactor<v1::WorkerEvent>* WorkerService::WatchEvents(
    grpc::CallbackServerContext* context, const v1::WatchEventsRequest* request) {
  auto* stream = new EventStream(this, next_serial_.fetch_add(1));
  if (grpc::Status caller = CheckCaller(context); !caller.ok()) {
    stream->RequestFinish(caller);
    return stream;
  }
  const uint32_t ms = request->load_report_interval_ms();
  if (ms != 0 && (ms < 10 || ms > 60000)) {
    stream->RequestFinish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                       "load_report_interval_ms must be in [10, 60000] or 0"));
    return stream;
  }
  Command c;
  c.kind = Command::Kind::kWatch;
  c.serial = stream->serial();
  c.watch = stream;
  c.load_interval = absl::Milliseconds(ms == 0 ? 500 : ms);
  Post(std::move(c));
  return stream;
}

grpc::ServerUnaryReactor* WorkerService::GetInfo(grpc::CallbackServerContext* context,
                                                 const v1::GetInfoRequest* /*request*/,
                                                 v1::WorkerInfo* info) {
  if (grpc::Status caller = CheckCaller(context); !caller.ok()) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(caller);
    return reactor;
  }
  const ModelConfig& mc = engine_->model_config();
  {
    absl::MutexLock lock(&mu_);
    info->set_worker_id(worker_id_);
  }
  info->set_worker_epoch(epoch_);
  info->set_model(options_.model_name);
  info->set_vocab_size(static_cast<uint32_t>(mc.vocab_size));
  info->set_max_context_tokens(static_cast<uint32_t>(engine_->MaxContextTokens()));
  info->set_tensor_parallel_size(static_cast<uint32_t>(options_.tensor_parallel_size));
  info->set_block_tokens(static_cast<uint32_t>(engine_->block_tokens()));
  // (The generation first: a change between the two makes the list look older, never newer.)
  info->set_fine_tunes_generation(static_cast<uint64_t>(engine_->FineTunesGeneration()));
  for (const auto& [ft, revision] : engine_->FineTuneRevisions()) {
    info->add_fine_tune_ids(ft);
    info->add_fine_tune_revisions(revision);
  }
  v1::TierCapacity* tier = info->add_tiers();
  tier->set_tier(v1::TIER_DEVICE);
  tier->set_num_blocks(static_cast<uint64_t>(engine_->num_kv_blocks()));
  tier->set_block_bytes(static_cast<uint64_t>(engine_->kv_block_bytes()));
  // The lower tiers as the engine opened them (the load reports follow later changes).
  for (const auto& [t, load] : {std::pair{v1::TIER_HOST, &tiers_at_start_.host},
                                std::pair{v1::TIER_DISK, &tiers_at_start_.disk}}) {
    if (load->num_slots == 0) continue;
    tier = info->add_tiers();
    tier->set_tier(t);
    tier->set_num_blocks(static_cast<uint64_t>(load->num_slots));
    tier->set_block_bytes(static_cast<uint64_t>(load->slot_bytes));
  }
  info->set_max_running_sequences(static_cast<uint32_t>(engine_->config().max_running_sequences));
  info->set_device(options_.device);
  info->set_version(kStrataVersion);
  info->set_draining(draining_.load());
  info->set_role(options_.role);
  info->set_model_fingerprint(fingerprint_);
  if (engine_->kv_transfer_layout().valid()) {
    *info->mutable_kv_layout() = ToProtoLayout(engine_->kv_transfer_layout());
  }
  info->set_kv_fetch(fetcher_ != nullptr);
  info->set_kv_transfer_port(static_cast<uint32_t>(kv_transfer_port()));
  info->set_tls(options_.kv_fetcher.credentials.tls());
  info->set_num_speculative_tokens(static_cast<uint32_t>(engine_->config().num_speculative_tokens));
  info->set_draft_model(options_.draft_model);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::Drain(grpc::CallbackServerContext* context,
                                               const v1::DrainRequest* request,
                                               v1::DrainResponse* response) {
  if (grpc::Status caller = CheckCaller(context); !caller.ok()) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(caller);
    return reactor;
  }
  const bool draining = !request->resume();
  SetDraining(draining);
  response->set_draining(draining);
  response->set_num_inflight_sequences(static_cast<uint32_t>(num_live_.load()));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

void WorkerService::Loop() {
  LoopState state;
  while (true) {
    bool stopping = false;
    {
      absl::MutexLock lock(&mu_);
      stopping = stop_;
    }
    if (stopping) break;
    ProcessInbox(&state);
    const bool imports_ready = ContinueImports(&state);
    if (engine_->HasWork()) StepEngine(&state);
    const bool exports_ready = ContinueExports(&state);
    PublishBlockEvents(&state);
    SendLoadReports(&state);
    PublishMetrics(&state);
    if ((engine_->HasWork() && !engine_->WaitingForIo()) || exports_ready || imports_ready) {
      continue;
    }
    // Idle, or waiting only for disk loads or the network: sleep until a command arrives, loads
    // finish, or the next load report is due (waiting for loads, at most 10 ms: the engine gives
    // up on them after max_io_wait, which needs a step to notice; an export waiting for them or
    // for its stream to drain, 5 ms).
    absl::Time wake = absl::Now() + (!state.exporting.empty() ? absl::Milliseconds(5)
                                     : engine_->HasWork()     ? absl::Milliseconds(10)
                                                              : absl::Seconds(1));
    for (const auto& w : state.watchers) wake = std::min(wake, w.next_report);
    absl::MutexLock lock(&mu_);
    auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return stop_ || !inbox_.empty() || io_ready_;
    };
    mu_.AwaitWithDeadline(absl::Condition(&ready), wake);
    io_ready_ = false;
  }
  // Shutting down: fail everything still open so that coordinators fail over at once. The last
  // inbox swap and loop_exited_ happen under one lock, so every command is handled exactly once.
  {
    absl::MutexLock lock(&mu_);
    loop_exited_ = true;
  }
  ProcessInbox(&state);
  const grpc::Status gone(grpc::StatusCode::UNAVAILABLE, "worker is shutting down");
  for (auto& [id, live] : state.live) {
    engine_->Cancel(id);
    ReleaseLive(live.tenant);
    live.stream->RequestFinish(gone);
  }
  state.live.clear();
  for (auto& [id, parked] : state.fetching) {
    engine_->EndImport(&parked.lease);
    ReleaseLive(parked.add.parsed.options.tenant);
    parked.add.submit->RequestFinish(gone);
  }
  state.fetching.clear();
  for (auto& w : state.watchers) w.stream->RequestFinish(gone);
  state.watchers.clear();
  // Exports still sending end with what they sent (the caller computes the rest).
  for (Exporting& e : state.exporting) e.sink->Finish(absl::OkStatus());
  state.exporting.clear();
  // Commands posted from now on (cancellations racing with shutdown) refer to finished streams.
  if (options_.persist_kv_timeout > absl::ZeroDuration() && engine_->kv_store() != nullptr &&
      engine_->kv_store()->has_disk() && !persist_cancel_.load()) {
    const absl::Time start = absl::Now();
    const int64_t written =
        engine_->PersistKv(start + options_.persist_kv_timeout, &persist_cancel_);
    LOG(INFO) << "KV cache persisted: " << written << " blocks written to the disk tier in "
              << absl::FormatDuration(absl::Now() - start);
  }
}

void WorkerService::ProcessInbox(LoopState* state) {
  std::vector<Command> commands;
  {
    absl::MutexLock lock(&mu_);
    commands.swap(inbox_);
  }
  for (Command& c : commands) {
    switch (c.kind) {
      case Command::Kind::kAdd: {
        if (state->live.contains(c.request_id) || state->fetching.contains(c.request_id)) {
          ReleaseLive(c.parsed.options.tenant);
          c.submit->RequestFinish(grpc::Status(
              grpc::StatusCode::ALREADY_EXISTS,
              absl::StrCat("request_id ", c.request_id, " is already running on this worker")));
          break;
        }
        if (!c.parsed.kv_source_address.empty() && StartKvFetch(state, c)) break;
        AddToEngine(state, c);
        break;
      }
      case Command::Kind::kFetched:
        FinishKvFetch(state, c);
        break;
      case Command::Kind::kFetchedPart:
        TakeKvPart(state, c);
        break;
      case Command::Kind::kExport:
        Export(state, c);
        break;
      case Command::Kind::kCancel: {
        auto it = state->live.find(c.request_id);
        if (it != state->live.end() && it->second.serial == c.serial) {
          VLOG(1) << "cancelling " << c.request_id << " (client cancelled or went away)";
          engine_->Cancel(c.request_id);
        }
        auto parked = state->fetching.find(c.request_id);
        if (parked != state->fetching.end() && parked->second.add.serial == c.serial) {
          fetcher_->Cancel(parked->second.ticket);
          engine_->EndImport(&parked->second.lease);
          ReleaseLive(parked->second.add.parsed.options.tenant);
          parked->second.add.submit->RequestFinish(
              grpc::Status(grpc::StatusCode::CANCELLED, "sequence cancelled"));
          state->fetching.erase(parked);
        }
        break;
      }
      case Command::Kind::kCancelById: {
        bool found = state->live.contains(c.request_id) && engine_->Cancel(c.request_id);
        if (auto parked = state->fetching.find(c.request_id); parked != state->fetching.end()) {
          fetcher_->Cancel(parked->second.ticket);
          engine_->EndImport(&parked->second.lease);
          ReleaseLive(parked->second.add.parsed.options.tenant);
          parked->second.add.submit->RequestFinish(
              grpc::Status(grpc::StatusCode::CANCELLED, "sequence cancelled"));
          state->fetching.erase(parked);
          found = true;
        }
        c.cancel_response->set_cancelled(found);
        c.unary->Finish(grpc::Status::OK);
        break;
      }
      case Command::Kind::kWatch: {
        // Bring existing watchers up to date first, so that the snapshot and every later change
        // line up for the new one.
        PublishBlockEvents(state);
        LoopState::Watcher w;
        w.stream = c.watch;
        w.interval = c.load_interval;
        w.next_report = absl::Now();
        // The inventory, per tier, in chunks.
        const std::vector<BlockEvent> inventory = engine_->BlockInventory();
        for (int t = 0; t < kNumTiers; ++t) {
          std::vector<BlockHash> hashes;
          for (const BlockEvent& ev : inventory) {
            if (static_cast<int>(ev.tier) == t) hashes.push_back(ev.hash);
          }
          for (size_t i = 0; i < hashes.size(); i += kSnapshotChunk) {
            v1::WorkerEvent e;
            e.set_worker_epoch(epoch_);
            e.set_sequence_number(w.next_sequence++);
            v1::KvBlocksStored* stored = e.mutable_stored();
            stored->set_tier(ToProtoTier(static_cast<Tier>(t)));
            const size_t end = std::min(hashes.size(), i + kSnapshotChunk);
            stored->mutable_block_hashes()->Add(hashes.begin() + static_cast<ptrdiff_t>(i),
                                                hashes.begin() + static_cast<ptrdiff_t>(end));
            w.stream->Write(std::move(e));
          }
        }
        v1::WorkerEvent done;
        done.set_worker_epoch(epoch_);
        done.set_sequence_number(w.next_sequence++);
        done.set_snapshot_complete(true);
        w.stream->Write(std::move(done));
        w.serial = c.watch->serial();
        state->watchers.push_back(w);
        break;
      }
      case Command::Kind::kUnwatch: {
        for (auto it = state->watchers.begin(); it != state->watchers.end(); ++it) {
          if (it->serial == c.serial) {
            it->stream->RequestFinish(grpc::Status(grpc::StatusCode::CANCELLED, "unwatched"));
            state->watchers.erase(it);
            break;
          }
        }
        break;
      }
    }
  }
}

void WorkerService::AddToEngine(LoopState* state, Command& c) {
  const std::string tenant = c.parsed.options.tenant;
  const bool want_logprobs = c.parsed.options.sampling.logprobs >= 0;
  absl::Status added =
      engine_->AddRequest(c.request_id, std::move(c.parsed.prompt), std::move(c.parsed.options));
  if (!added.ok()) {
    ReleaseLive(tenant);
    c.submit->RequestFinish(ToGrpcStatus(added));
    return;
  }
  LoopState::Live live;
  live.stream = c.submit;
  live.serial = c.serial;
  live.want_logprobs = want_logprobs;
  live.accepted = c.accepted;
  live.tenant = tenant;
  state->live.emplace(c.request_id, std::move(live));
}

bool WorkerService::StartKvFetch(LoopState* state, Command& c) {
  if (fetcher_ == nullptr) return false;
  Engine::PromptBlocks blocks = engine_->LookUpPrompt(c.parsed.prompt, c.parsed.options);
  const int64_t missing = static_cast<int64_t>(blocks.hashes.size()) - blocks.held;
  if (missing < std::max<int64_t>(1, options_.kv_fetch_min_blocks)) return false;
  // The leading blocks it lacks, within the byte budget and half the device cache.
  const int64_t block_bytes = TransferBlockBytes();
  const int64_t most = std::min<int64_t>(
      {kMaxFetchBlocks, options_.kv_fetch_max_bytes / block_bytes, engine_->num_kv_blocks() / 2});
  if (std::min(missing, most) < std::max<int64_t>(1, options_.kv_fetch_min_blocks)) return false;
  v1::FetchKvBlocksRequest request;
  for (size_t i = static_cast<size_t>(blocks.held);
       i < blocks.hashes.size() && request.block_hashes_size() < most; ++i) {
    request.add_block_hashes(blocks.hashes[i]);
  }
  request.set_model(options_.model_name);
  request.set_model_fingerprint(fingerprint_);
  *request.mutable_layout() = ToProtoLayout(engine_->kv_transfer_layout());
  const std::string address = c.parsed.kv_source_address;
  const std::string id = c.request_id;
  const uint64_t serial = c.serial;
  LoopState::Fetching& parked =
      state->fetching.emplace(id, LoopState::Fetching{std::move(c), std::move(blocks)})
          .first->second;
  auto post = [this, id, serial](Command::Kind kind, KvFetchResult result) {
    Command c;
    c.kind = kind;
    c.request_id = id;
    c.serial = serial;
    c.fetched = std::move(result);
    Post(std::move(c));
  };
  parked.ticket = fetcher_->Fetch(
      address, std::move(request),
      [post](KvFetchResult result) mutable { post(Command::Kind::kFetched, std::move(result)); },
      [post](std::vector<Engine::KvBlockCopy> blocks) mutable {
        KvFetchResult part;
        part.blocks = std::move(blocks);
        post(Command::Kind::kFetchedPart, std::move(part));
      });
  return true;
}

void WorkerService::TakeKvBlocks(LoopState* state, const std::string& request_id,
                                 std::vector<Engine::KvBlockCopy>& blocks) {
  LoopState::Fetching& parked = state->fetching.at(request_id);
  if (blocks.empty() || parked.stale || parked.given_up) return;
  for (Engine::KvBlockCopy& b : blocks) parked.arrived.push_back(std::move(b));
  if (!parked.queued) {
    parked.queued = true;
    state->importing.emplace_back(parked.add.request_id, parked.add.serial);
  }
}

void WorkerService::TakeKvPart(LoopState* state, Command& c) {
  auto it = state->fetching.find(c.request_id);
  if (it == state->fetching.end() || it->second.add.serial != c.serial) return;  // cancelled
  TakeKvBlocks(state, c.request_id, c.fetched.blocks);
}

void WorkerService::FinishKvFetch(LoopState* state, Command& c) {
  auto it = state->fetching.find(c.request_id);
  if (it == state->fetching.end() || it->second.add.serial != c.serial) return;  // cancelled
  TakeKvBlocks(state, c.request_id, c.fetched.blocks);
  LoopState::Fetching& parked = it->second;
  c.fetched.blocks.clear();
  parked.result = std::move(c.fetched);
  // Ends once the last blocks are stored (ContinueImports), or now.
  if (!parked.queued) EndKvFetch(state, c.request_id);
}

int64_t WorkerService::CopySliceBytes(const LoopState& state) const {
  const int64_t slice = std::max(options_.kv_copy_slice_bytes, TransferBlockBytes());
  // With nothing to step, slices hold nothing up: they go back to back, and the first is sent
  // while the next are read (the last step, however long, was before).
  if (!engine_->HasWork()) return slice;
  const double last_step_ms = state.step_ms.empty() ? 0 : state.step_ms.back();
  return slice * (1 + static_cast<int64_t>(last_step_ms / kCopySliceStepMs));
}

bool WorkerService::ContinueImports(LoopState* state) {
  const int64_t block_bytes = TransferBlockBytes();
  int64_t room = CopySliceBytes(*state);
  while (!state->importing.empty() && room >= block_bytes) {
    const auto [id, serial] = state->importing.front();
    auto it = state->fetching.find(id);
    if (it == state->fetching.end() || it->second.add.serial != serial) {
      state->importing.pop_front();  // cancelled
      continue;
    }
    LoopState::Fetching& p = it->second;
    std::vector<Engine::KvBlockCopy>& blocks = p.arrived;
    const size_t n = std::min(blocks.size() - p.imported,
                              static_cast<size_t>(std::max<int64_t>(1, room / block_bytes)));
    // The next blocks follow the prompt's head and those stored before them (held by the
    // lease from the first call on).
    Engine::PromptBlocks part = p.blocks;
    part.held += static_cast<int64_t>(p.imported);
    const int64_t got = n == 0 ? 0
                               : engine_->ImportKvBlocks(
                                     part, p.add.parsed.options.tenant,
                                     absl::MakeConstSpan(blocks).subspan(p.imported, n), &p.lease);
    // (Blocks found on the device already count as taken, not as stored.)
    const int64_t taken = p.lease.covered - part.held;
    for (size_t i = p.imported; i < p.imported + n; ++i) std::string().swap(blocks[i].payload);
    p.imported += n;
    p.stored += got;
    room -= static_cast<int64_t>(n) * block_bytes;
    if (taken < static_cast<int64_t>(n)) {
      // The engine took no more: the rest of the copy is of no use. Either none at all, because
      // the prompt's blocks held here when the copies were asked for left the cache before the
      // first was stored (the lease never started: the copies are stale), or no device block
      // was free.
      (p.lease.started ? p.given_up : p.stale) = true;
      if (!p.result.has_value()) fetcher_->Cancel(p.ticket);
    }
    if (p.given_up || p.stale || p.imported == blocks.size()) {
      // Stored what came; the request goes on once the copy has ended too.
      state->importing.pop_front();
      p.queued = false;
      if (p.result.has_value()) EndKvFetch(state, id);
    }
  }
  return !state->importing.empty();
}

void WorkerService::EndKvFetch(LoopState* state, const std::string& request_id) {
  auto it = state->fetching.find(request_id);
  LoopState::Fetching parked = std::move(it->second);
  state->fetching.erase(it);
  engine_->EndImport(&parked.lease);
  const KvFetchResult& result = *parked.result;
  const int64_t stored = parked.stored;
  const int64_t wanted = static_cast<int64_t>(parked.blocks.hashes.size()) - parked.blocks.held;
  // A copy cancelled here (stale, or given up) ended CANCELLED: that is not the source's failure.
  const bool failed = !result.status.ok() && !parked.stale && !parked.given_up;
  const char* outcome = parked.stale       ? "stale"
                        : stored == wanted ? "copied"
                        : stored > 0       ? "partial"
                        : !failed          ? "none"
                                           : "failed";
  if (failed) {
    LOG(WARNING) << "request " << request_id << ": " << result.status << " (" << stored
                 << " blocks copied; computing the rest)";
  }
  VLOG(1) << "request " << request_id << ": " << stored << " of " << wanted
          << " KV blocks copied from " << parked.add.parsed.kv_source_address << " in "
          << absl::FormatDuration(result.took);
  if (options_.metrics != nullptr) {
    options_.metrics
        ->GetCounter("strata_worker_kv_fetches_total",
                     "Submits that copied their prompt's KV blocks from another worker, by "
                     "outcome (copied: every block it lacked; partial: some; none: the source "
                     "held none of them; failed: the source could not be asked; stale: the "
                     "prompt's blocks held here left the cache meanwhile, so the copies were "
                     "dropped).",
                     {{"outcome", outcome}})
        ->Add();
    options_.metrics
        ->GetCounter("strata_worker_kv_blocks_received_total",
                     "KV blocks copied from other workers and stored in the device cache.")
        ->Add(static_cast<double>(stored));
    constexpr char kBytes[] =
        "KV block bytes copied in from other workers, by transport (tcp: their KV transfer port; "
        "grpc: Worker.FetchKvBlocks, where a worker has no such port or it cannot be reached).";
    options_.metrics
        ->GetCounter("strata_worker_kv_fetch_bytes_total", kBytes, {{"transport", "tcp"}})
        ->Add(static_cast<double>(result.transfer_bytes));
    options_.metrics
        ->GetCounter("strata_worker_kv_fetch_bytes_total", kBytes, {{"transport", "grpc"}})
        ->Add(static_cast<double>(result.bytes - result.transfer_bytes));
    options_.metrics
        ->GetHistogram("strata_worker_kv_fetch_seconds",
                       "Time a Submit waited for KV blocks copied from another worker.",
                       {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5})
        ->Observe(absl::ToDoubleSeconds(result.took));
  }
  AddToEngine(state, parked.add);
}

void WorkerService::Export(LoopState* state, Command& c) {
  const v1::FetchKvBlocksRequest& r = c.export_request;
  const KvBlockLayout& layout = engine_->kv_transfer_layout();
  auto refuse = [&](const std::string& why) {
    c.export_sink->Finish(absl::FailedPreconditionError(why));
  };
  if (r.model() != options_.model_name) {
    return refuse(absl::StrCat("model \"", r.model(), "\" is not this worker's (\"",
                               options_.model_name, "\")"));
  }
  if (r.model_fingerprint() != fingerprint_) {
    return refuse(absl::StrCat("model_fingerprint ", r.model_fingerprint(),
                               " is not this worker's weights' (", fingerprint_, ")"));
  }
  if (!layout.valid()) return refuse("this worker keeps no prefix cache to copy blocks from");
  const v1::KvBlockLayout want = ToProtoLayout(layout);
  if (r.layout().SerializeAsString() != want.SerializeAsString()) {
    return refuse(absl::StrCat("layout (", r.layout().ShortDebugString(),
                               ") is not this worker's blocks' (", want.ShortDebugString(), ")"));
  }
  Exporting e;
  e.sink = std::move(c.export_sink);
  e.hashes.assign(r.block_hashes().begin(), r.block_hashes().end());
  e.bytes_left = r.max_bytes() == 0
                     ? int64_t{64} << 20
                     : static_cast<int64_t>(std::min<uint64_t>(r.max_bytes(), int64_t{1} << 30));
  // One block at least, whatever max_bytes says.
  e.bytes_left = std::max<int64_t>(e.bytes_left, layout.block_bytes());
  e.deadline = absl::Now() + kExportMaxDuration;
  // Sent in slices between engine steps (ContinueExports, later in this loop iteration), so that
  // a long copy never holds up the sequences running here.
  state->exporting.push_back(std::move(e));
}

WorkerService::Sent WorkerService::SendExported(Exporting& e, int64_t max_bytes) {
  Sent sent;
  const int64_t block_bytes = TransferBlockBytes();
  std::vector<Engine::KvBlockCopy> copies = engine_->ExportKvBlocks(e.hashes, max_bytes);
  sent.short_of_blocks = static_cast<int64_t>(copies.size()) <
                         std::min<int64_t>(static_cast<int64_t>(e.hashes.size()),
                                           std::max<int64_t>(1, max_bytes / block_bytes));
  for (Engine::KvBlockCopy& copy : copies) {
    sent.bytes += static_cast<int64_t>(copy.payload.size());
    if (!e.sink->Write(std::move(copy))) sent.failed = true;
  }
  e.bytes_left -= sent.bytes;
  e.hashes.erase(e.hashes.begin(), e.hashes.begin() + static_cast<ptrdiff_t>(copies.size()));
  if (options_.metrics != nullptr && !copies.empty()) {
    options_.metrics
        ->GetCounter("strata_worker_kv_blocks_sent_total",
                     "KV blocks copied out to other workers (FetchKvBlocks).")
        ->Add(static_cast<double>(copies.size()));
  }
  return sent;
}

bool WorkerService::ContinueExports(LoopState* state) {
  if (state->exporting.empty()) return false;
  engine_->PollIo();
  const absl::Time now = absl::Now();
  const int64_t block_bytes = TransferBlockBytes();
  const int64_t slice = CopySliceBytes(*state);
  int64_t room = slice;
  const int64_t most_unsent = 2 * slice;
  // An export whose sink holds too much unsent waits for the network, which wakes the loop once
  // less than a slice is left (its sink's WakeWhenBelow).
  auto wait_for_network = [&](Exporting& e) {
    e.sink->WakeWhenBelow(static_cast<size_t>(std::max<int64_t>(1, slice / block_bytes)),
                          [this] { WakeLoop(); });
  };
  bool ready = false;
  const size_t n = state->exporting.size();
  const size_t first = static_cast<size_t>(state->export_turn++ % n);
  // How each export ends this time, if it does.
  enum class End { kNo, kFinish, kAbort };
  std::vector<End> ended(n, End::kNo);
  for (size_t k = 0; k < n; ++k) {
    const size_t i = (first + k) % n;
    Exporting& e = state->exporting[i];
    if (e.sink->cancelled() || now >= e.deadline) {
      ended[i] = End::kAbort;  // gone, or no longer reading: what is queued is dropped
      continue;
    }
    const int64_t unsent = static_cast<int64_t>(e.sink->num_queued()) * block_bytes;
    const int64_t allowed = std::min({room, e.bytes_left, most_unsent - unsent});
    Sent sent;
    const bool tried = allowed >= block_bytes;
    if (tried) {
      sent = SendExported(e, allowed);
      room -= sent.bytes;
    }
    if (sent.failed) {
      ended[i] = End::kAbort;
    } else if (e.hashes.empty() || e.bytes_left < block_bytes) {
      ended[i] = End::kFinish;
    } else if (!tried) {
      // Its stream holds enough unsent (it waits for the network), or the others took this
      // step's slice (it goes on at once); a wait for the disk keeps its deadline.
      if (unsent + block_bytes > most_unsent) {
        wait_for_network(e);
      } else {
        ready = true;
      }
    } else if (sent.short_of_blocks) {
      // The next blocks are on the disk tier, or nowhere. The tier loads a chain some blocks at a
      // time: the next ones start as these land. It waits while they keep coming.
      if (!engine_->PrefetchForExport(e.hashes)) {
        ended[i] = End::kFinish;
      } else if (sent.bytes > 0 || e.disk_deadline == absl::InfiniteFuture()) {
        e.disk_deadline = now + kExportDiskWait;
      } else if (now >= e.disk_deadline) {
        ended[i] = End::kFinish;
      }
    } else {
      e.disk_deadline = absl::InfiniteFuture();
      // More is in memory: at once, unless its stream holds enough unsent already.
      if (unsent + sent.bytes + block_bytes <= most_unsent) {
        ready = true;
      } else {
        wait_for_network(e);
      }
    }
  }
  for (size_t i = n; i-- > 0;) {
    if (ended[i] == End::kNo) continue;
    if (ended[i] == End::kAbort) {
      state->exporting[i].sink->Abort(absl::CancelledError("the caller stopped reading the copy"));
    } else {
      state->exporting[i].sink->Finish(absl::OkStatus());
    }
    // A long copy counts as the peer's last call from its end, for a drain waiting on copies.
    last_export_call_ns_.store(absl::ToUnixNanos(now));
    state->exporting[i] = std::move(state->exporting.back());
    state->exporting.pop_back();
  }
  return ready;
}

grpc::ServerWriteReactor<v1::KvBlockData>* WorkerService::FetchKvBlocks(
    grpc::CallbackServerContext* context, const v1::FetchKvBlocksRequest* request) {
  auto* stream = new ExportStream();
  if (grpc::Status caller = CheckCaller(context); !caller.ok()) {
    stream->RequestFinish(caller);
    return stream;
  }
  RequestExport(*request, std::make_shared<GrpcExportSink>(stream));
  return stream;
}

void WorkerService::RequestExport(const v1::FetchKvBlocksRequest& request,
                                  std::shared_ptr<KvExportSink> sink) {
  if (request.block_hashes_size() > kMaxFetchBlocks) {
    return sink->Finish(
        absl::InvalidArgumentError(absl::StrCat("block_hashes holds ", request.block_hashes_size(),
                                                " hashes; at most ", kMaxFetchBlocks, " a call")));
  }
  last_export_call_ns_.store(absl::ToUnixNanos(absl::Now()));
  num_export_calls_.fetch_add(1);
  Command c;
  c.kind = Command::Kind::kExport;
  c.export_sink = std::move(sink);
  c.export_request = request;
  Post(std::move(c));
}

void WorkerService::FinishSubmit(LoopState* state, const std::string& request_id,
                                 const grpc::Status& status) {
  auto it = state->live.find(request_id);
  if (it == state->live.end()) return;
  // The place first: a client that sees its stream end may submit again at once.
  ReleaseLive(it->second.tenant);
  it->second.stream->RequestFinish(status);
  state->live.erase(it);
}

absl::Status WorkerService::TakeLive(const std::string& tenant) {
  const int64_t cap = options_.max_live_sequences;
  absl::MutexLock lock(&live_mu_);
  int64_t& mine = live_by_tenant_[tenant];
  const int64_t total = num_live_.load();
  if (total >= cap) {
    // Full: a tenant under an equal part of the places still gets one (up to twice the cap).
    const int64_t tenants = static_cast<int64_t>(live_by_tenant_.size());  // its own counted
    const int64_t part = std::max<int64_t>(1, cap / tenants);
    if (mine >= part || total >= 2 * cap) {
      if (mine == 0) live_by_tenant_.erase(tenant);
      return absl::ResourceExhaustedError(absl::StrCat(
          "worker queue is full (", total, " sequences running or queued, ", cap, " allowed",
          tenants > 1 ? absl::StrCat("; this tenant holds ", mine, ", its part is ", part) : "",
          "): back off or route elsewhere"));
    }
  }
  ++mine;
  num_live_.fetch_add(1);
  return absl::OkStatus();
}

void WorkerService::ReleaseLive(const std::string& tenant) {
  absl::MutexLock lock(&live_mu_);
  num_live_.fetch_sub(1);
  auto it = live_by_tenant_.find(tenant);
  if (it != live_by_tenant_.end() && --it->second <= 0) live_by_tenant_.erase(it);
}

void WorkerService::StepEngine(LoopState* state) {
  const absl::Time start = absl::Now();
  absl::StatusOr<std::vector<RequestOutput>> outputs = engine_->Step();
  const absl::Time end = absl::Now();
  if (step_seconds_ != nullptr) step_seconds_->Observe(absl::ToDoubleSeconds(end - start));
  for (const double wait : engine_->DrainQueueWaits()) {
    if (queue_wait_seconds_ != nullptr) queue_wait_seconds_->Observe(wait);
  }
  state->step_ms.push_back(absl::ToDoubleMilliseconds(end - start));
  if (state->step_ms.size() > kStepWindow) state->step_ms.pop_front();
  if (!outputs.ok()) {
    // Our bug, not the clients': fail every sequence so that the coordinator retries elsewhere.
    LOG(ERROR) << "engine step failed: " << outputs.status();
    std::vector<std::string> ids;
    for (const auto& [id, live] : state->live) ids.push_back(id);
    for (const std::string& id : ids) {
      engine_->Cancel(id);
      FinishSubmit(
          state, id,
          grpc::Status(grpc::StatusCode::UNAVAILABLE,
                       absl::StrCat("worker engine failed: ", outputs.status().message())));
    }
    return;
  }
  // Counted before any stream hears of them: a client that reads its last token and then scrapes
  // the metrics finds it counted.
  if (generated_tokens_ != nullptr) {
    int64_t generated = 0;
    for (const RequestOutput& out : *outputs) generated += static_cast<int64_t>(out.tokens.size());
    generated_tokens_->Add(static_cast<double>(generated));
  }
  for (RequestOutput& out : *outputs) {
    if (options_.metrics != nullptr) {
      if (out.finish != FinishReason::kNone) {
        options_.metrics
            ->GetCounter("strata_worker_sequences_finished_total", "Sequences finished, by reason.",
                         {{"reason", FinishReasonLabel(out.finish)}})
            ->Add();
      }
    }
    auto it = state->live.find(out.request_id);
    if (it == state->live.end()) continue;  // its stream is gone
    LoopState::Live& live = it->second;
    if (out.finish == FinishReason::kCancelled) {
      FinishSubmit(state, out.request_id,
                   grpc::Status(grpc::StatusCode::CANCELLED, "sequence cancelled"));
      continue;
    }
    if (out.finish == FinishReason::kError) {
      // Another worker may well serve it (its copy of the delta intact): ABORTED lets the
      // coordinator retry there without taking this worker out of routing for everyone else.
      FinishSubmit(state, out.request_id,
                   grpc::Status(grpc::StatusCode::ABORTED,
                                absl::StrCat("this worker could not serve the request: ",
                                             out.error.message())));
      continue;
    }
    v1::SubmitResponse r;
    for (const SampledToken& t : out.tokens) r.add_token_ids(t.token);
    r.set_first_token_index(
        static_cast<uint32_t>(out.num_generated_tokens - static_cast<int64_t>(out.tokens.size())));
    if (live.want_logprobs) {
      for (const SampledToken& t : out.tokens) ToPositionLogprobs(t, r.add_logprobs());
    }
    for (const SampledToken& t : out.prompt_logprobs)
      ToPositionLogprobs(t, r.add_prompt_logprobs());
    if (out.finish != FinishReason::kNone) {
      r.set_finish_reason(ToProtoFinishReason(out.finish));
      v1::Usage* u = r.mutable_usage();
      u->set_num_prompt_tokens(static_cast<uint32_t>(out.num_prompt_tokens));
      u->set_num_completion_tokens(static_cast<uint32_t>(out.num_generated_tokens));
      const auto& by_tier = out.num_cached_prompt_tokens_by_tier;
      v1::CachedTokens* cached = u->mutable_cached();
      cached->set_num_device_tokens(
          static_cast<uint32_t>(by_tier[static_cast<int>(Tier::kDevice)]));
      cached->set_num_host_tokens(static_cast<uint32_t>(by_tier[static_cast<int>(Tier::kHost)]));
      cached->set_num_disk_tokens(static_cast<uint32_t>(by_tier[static_cast<int>(Tier::kDisk)]));
      u->set_total_time_ms(absl::ToDoubleMilliseconds(end - live.accepted));
      live.stream->Write(std::move(r));
      FinishSubmit(state, out.request_id, grpc::Status::OK);
      continue;
    }
    if (r.token_ids_size() > 0 || r.prompt_logprobs_size() > 0) live.stream->Write(std::move(r));
  }
}

void WorkerService::PublishBlockEvents(LoopState* state) {
  const std::vector<BlockEvent> events = engine_->DrainBlockEvents();
  if (events.empty() || state->watchers.empty()) return;
  // Consecutive events of one kind and tier become one message.
  std::vector<v1::WorkerEvent> messages;
  Tier last_tier = Tier::kDevice;
  for (const BlockEvent& ev : events) {
    const bool stored = ev.kind == BlockEvent::Kind::kStored;
    if (messages.empty() || messages.back().has_stored() != stored || last_tier != ev.tier) {
      v1::WorkerEvent e;
      e.set_worker_epoch(epoch_);
      if (stored) {
        e.mutable_stored()->set_tier(ToProtoTier(ev.tier));
      } else {
        e.mutable_removed()->set_tier(ToProtoTier(ev.tier));
      }
      messages.push_back(std::move(e));
      last_tier = ev.tier;
    }
    if (stored) {
      messages.back().mutable_stored()->add_block_hashes(ev.hash);
    } else {
      messages.back().mutable_removed()->add_block_hashes(ev.hash);
    }
  }
  CutSlowWatchers(state, messages.size());
  for (auto& w : state->watchers) {
    for (v1::WorkerEvent m : messages) {
      m.set_sequence_number(w.next_sequence++);
      w.stream->Write(std::move(m));
    }
  }
}

void WorkerService::CutSlowWatchers(LoopState* state, size_t incoming) {
  for (auto it = state->watchers.begin(); it != state->watchers.end();) {
    if (it->stream->num_queued() + incoming > static_cast<size_t>(options_.max_buffered_events)) {
      LOG(WARNING) << "cutting off a slow event watcher; it will re-subscribe";
      // Abort, not RequestFinish: a reader that stopped reading would never drain the queue.
      it->stream->Abort(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                     "event watcher fell too far behind; re-subscribe"));
      it = state->watchers.erase(it);
      continue;
    }
    ++it;
  }
}

v1::LoadReport WorkerService::MakeLoadReport(const EngineStats& st, const LoopState& state) const {
  v1::LoadReport r;
  r.set_num_running_sequences(static_cast<uint32_t>(st.num_running));
  r.set_num_decode_sequences(static_cast<uint32_t>(st.num_decode));
  r.set_num_waiting_sequences(static_cast<uint32_t>(st.num_waiting));
  r.set_num_pending_prefill_tokens(static_cast<uint64_t>(st.num_pending_prefill_tokens));
  for (const std::string& id : st.deltas.resident_ids) r.add_resident_fine_tune_ids(id);
  r.set_fine_tunes_generation(static_cast<uint64_t>(st.deltas.num_registry_changes));
  v1::TierLoad* t = r.add_tiers();
  t->set_tier(v1::TIER_DEVICE);
  t->set_num_free_blocks(static_cast<uint64_t>(st.num_free_blocks));
  t->set_num_total_blocks(static_cast<uint64_t>(st.num_total_blocks));
  for (const auto& [tier, load] :
       {std::pair{v1::TIER_HOST, &st.tiers.host}, std::pair{v1::TIER_DISK, &st.tiers.disk}}) {
    if (load->num_slots == 0) continue;
    t = r.add_tiers();
    t->set_tier(tier);
    t->set_num_free_blocks(static_cast<uint64_t>(load->num_slots - load->num_used));
    t->set_num_total_blocks(static_cast<uint64_t>(load->num_slots));
  }
  if (st.tiers.host.num_slots > 0) {
    const KvStoreStats& ts = st.tiers;
    v1::KvTierStats* k = r.mutable_kv_tiers();
    k->set_disk_enabled(ts.disk_enabled);
    k->set_write_backs(static_cast<uint64_t>(ts.write_backs));
    k->set_loads(static_cast<uint64_t>(ts.loads));
    k->set_lost_evictions(static_cast<uint64_t>(ts.lost_evictions));
    k->set_corrupt_blocks(static_cast<uint64_t>(ts.corrupt_blocks));
    k->set_io_errors(static_cast<uint64_t>(ts.io_errors));
    k->set_prefetch_promoted(static_cast<uint64_t>(ts.prefetch_promoted));
    k->set_prefetch_used(static_cast<uint64_t>(ts.prefetch_used));
    k->set_lower_tier_hits(static_cast<uint64_t>(ts.lower_tier_hits));
    k->set_lower_tier_hits_covered(static_cast<uint64_t>(ts.lower_tier_hits_covered));
    k->set_disk_recovered(static_cast<uint64_t>(ts.disk_recovered));
  }
  double sum = 0;
  for (double ms : state.step_ms) sum += ms;
  r.set_mean_step_time_ms(state.step_ms.empty() ? 0.0 : sum / state.step_ms.size());
  r.set_time_unix_ms(absl::ToUnixMillis(absl::Now()));
  return r;
}

void WorkerService::SendLoadReports(LoopState* state) {
  if (state->watchers.empty()) return;
  const absl::Time now = absl::Now();
  // Besides the periodic reports, a change in the counts that routing uses is reported at once
  // (at most every kMinChangeReportInterval), so that coordinators never route on a stale picture.
  // Engine::Stats walks every sequence, so the step loop asks for it only when a report may go out.
  bool periodic_due = false;
  for (const auto& w : state->watchers) periodic_due |= w.next_report <= now;
  const bool change_allowed = now - state->last_change_report >= kMinChangeReportInterval;
  if (!periodic_due && !change_allowed) return;
  const EngineStats st = engine_->Stats(/*with_tenants=*/false);
  const std::array<int64_t, 4> counts = {st.num_running, st.num_waiting, st.num_decode,
                                         st.num_pending_prefill_tokens};
  const bool changed = change_allowed && counts != state->last_reported_counts;
  if (!periodic_due && !changed) return;
  if (changed) {
    state->last_reported_counts = counts;
    state->last_change_report = now;
  }
  CutSlowWatchers(state, 1);
  const v1::LoadReport report = MakeLoadReport(st, *state);
  for (auto& w : state->watchers) {
    if (!changed && w.next_report > now) continue;
    v1::WorkerEvent e;
    e.set_worker_epoch(epoch_);
    e.set_sequence_number(w.next_sequence++);
    *e.mutable_load() = report;
    w.stream->Write(std::move(e));
    w.next_report = now + w.interval;
  }
}

void WorkerService::PublishMetrics(LoopState* state) {
  MetricsRegistry* m = options_.metrics;
  if (m == nullptr) return;
  const absl::Time now = absl::Now();
  if (now < state->next_metrics) return;
  state->next_metrics = now + absl::Milliseconds(250);
  const EngineStats st = engine_->Stats();
  m->GetGauge("strata_worker_running_sequences", "Sequences in the running batch.")
      ->Set(static_cast<double>(st.num_running));
  m->GetGauge("strata_worker_waiting_sequences", "Sequences admitted, waiting to run.")
      ->Set(static_cast<double>(st.num_waiting));
  m->GetGauge("strata_worker_live_sequences", "Sequences accepted and not finished.")
      ->Set(static_cast<double>(num_live_.load()));
  m->GetGauge("strata_worker_draining", "1 while the worker drains (admits nothing new).")
      ->Set(draining_.load() ? 1 : 0);
  m->GetGauge("strata_worker_role",
              "1, labelled with the worker's part in disaggregated serving (--role).",
              {{"role", options_.role == v1::WORKER_ROLE_PREFILL  ? "prefill"
                        : options_.role == v1::WORKER_ROLE_DECODE ? "decode"
                                                                  : "mixed"}})
      ->Set(1);
  m->GetCounter("strata_worker_preemptions_total", "Sequences preempted for KV blocks.")
      ->SetTotal(static_cast<double>(st.num_preemptions));
  m->GetCounter("strata_worker_inflight_prefix_waits_total",
                "Requests that waited for a prompt prefix another request was computing, instead "
                "of computing it again.")
      ->SetTotal(static_cast<double>(st.num_inflight_prefix_waits));
  m->GetCounter("strata_worker_inflight_prefix_tokens_total",
                "Prompt tokens taken from the prefix cache after waiting for another request to "
                "compute them.")
      ->SetTotal(static_cast<double>(st.num_inflight_prefix_tokens));
  m->GetCounter("strata_worker_structured_tokens_total",
                "Tokens sampled under a structured output's grammar.")
      ->SetTotal(static_cast<double>(st.num_structured_tokens));
  m->GetCounter("strata_worker_grammar_mask_seconds_total",
                "Host time spent on structured output's token masks (summed over threads).")
      ->SetTotal(st.grammar_mask_seconds);
  const char* kLookups =
      "Token-mask results looked up by stack top: kept (hit) or worked out (miss).";
  m->GetCounter("strata_worker_grammar_mask_lookups_total", kLookups, {{"result", "hit"}})
      ->SetTotal(static_cast<double>(st.grammar_masks.hits));
  m->GetCounter("strata_worker_grammar_mask_lookups_total", kLookups, {{"result", "miss"}})
      ->SetTotal(static_cast<double>(st.grammar_masks.misses));
  m->GetGauge("strata_worker_grammar_mask_cache_bytes", "Memory of the token-mask results kept.")
      ->Set(static_cast<double>(st.grammar_masks.bytes));
  m->GetCounter("strata_worker_draft_tokens_total",
                "Speculative decoding: draft tokens computed beside their sequence's last token.")
      ->SetTotal(static_cast<double>(st.num_draft_tokens));
  m->GetCounter("strata_worker_accepted_draft_tokens_total",
                "Speculative decoding: draft tokens kept (output tokens that took no step of their "
                "own).")
      ->SetTotal(static_cast<double>(st.num_accepted_draft_tokens));
  if (st.has_draft_model) {
    const DraftModelStats& d = st.draft_model;
    m->GetCounter("strata_worker_draft_model_seconds_total",
                  "Speculative decoding with a draft model: time spent proposing drafts.")
        ->SetTotal(d.seconds);
    const char* kDraftTokens =
        "Tokens the draft model computed: bringing its cache up to a sequence's tokens "
        "(catch_up) or feeding its own drafts back (draft); and those it took from cached blocks "
        "instead (prefix_hit).";
    m->GetCounter("strata_worker_draft_model_tokens_total", kDraftTokens, {{"kind", "catch_up"}})
        ->SetTotal(static_cast<double>(d.catch_up_tokens));
    m->GetCounter("strata_worker_draft_model_tokens_total", kDraftTokens, {{"kind", "draft"}})
        ->SetTotal(static_cast<double>(d.draft_forward_tokens));
    m->GetCounter("strata_worker_draft_model_tokens_total", kDraftTokens, {{"kind", "prefix_hit"}})
        ->SetTotal(static_cast<double>(d.prefix_hit_tokens));
    const char* kDraftBlocks =
        "The draft model's KV cache blocks: all, free to take (unused or cached and unheld), "
        "cached (published for prefix reuse).";
    m->GetGauge("strata_worker_draft_model_kv_blocks", kDraftBlocks, {{"state", "total"}})
        ->Set(static_cast<double>(d.num_blocks));
    m->GetGauge("strata_worker_draft_model_kv_blocks", kDraftBlocks, {{"state", "free"}})
        ->Set(static_cast<double>(d.num_free_blocks));
    m->GetGauge("strata_worker_draft_model_kv_blocks", kDraftBlocks, {{"state", "cached"}})
        ->Set(static_cast<double>(d.num_cached_blocks));
    m->GetCounter("strata_worker_draft_model_evictions_total",
                  "Sequences whose draft KV blocks went to another (they catch up again).")
        ->SetTotal(static_cast<double>(d.evictions));
  }
  // Per tenant (requests the coordinator sent with API keys; the unnamed tenant is left out).
  const char* kTenantTokens =
      "Tokens the engine computed for a tenant (prompt tokens not cached, decode inputs, drafts, "
      "recomputation after preemption) and generated for it.";
  const char* kTenantSequences = "A tenant's sequences, running or waiting to be admitted.";
  const char* kTenantBlocks =
      "KV blocks kept for a tenant, by tier (device: published, in use or cached).";
  for (auto& [name, series] : state->tenant_series) series.seen = false;
  for (const EngineStats::Tenant& t : st.tenants) {
    if (t.name.empty()) continue;
    auto [it, added] = state->tenant_series.try_emplace(t.name);
    LoopState::TenantSeries& s = it->second;
    if (added) {
      int i = 0;
      for (const char* kind : {"computed", "generated"}) {
        s.tokens[i++] = m->GetCounter("strata_worker_tenant_tokens_total", kTenantTokens,
                                      {{"tenant", t.name}, {"kind", kind}});
      }
      s.admissions =
          m->GetCounter("strata_worker_tenant_admissions_total",
                        "A tenant's requests admitted (each counted once).", {{"tenant", t.name}});
      s.queue_wait = m->GetCounter(
          "strata_worker_tenant_queue_wait_seconds_total",
          "Seconds a tenant's admitted requests waited in the queue before their first admission "
          "(over strata_worker_tenant_admissions_total: its mean wait).",
          {{"tenant", t.name}});
      i = 0;
      for (const char* label : {"running", "waiting"}) {
        s.sequences[i++] = m->GetGauge("strata_worker_tenant_sequences", kTenantSequences,
                                       {{"tenant", t.name}, {"state", label}});
      }
      for (int tier = 0; tier < kNumTiers; ++tier) {
        // The lower tiers configured at start.
        if ((tier == static_cast<int>(Tier::kHost) && tiers_at_start_.host.num_slots == 0) ||
            (tier == static_cast<int>(Tier::kDisk) && tiers_at_start_.disk.num_slots == 0)) {
          continue;
        }
        s.kv_blocks[tier] =
            m->GetGauge("strata_worker_tenant_kv_blocks", kTenantBlocks,
                        {{"tenant", t.name}, {"tier", TierName(static_cast<Tier>(tier))}});
      }
    }
    s.seen = true;
    s.tokens[0]->SetTotal(static_cast<double>(t.computed_tokens));
    s.tokens[1]->SetTotal(static_cast<double>(t.generated_tokens));
    s.admissions->SetTotal(static_cast<double>(t.admissions));
    s.queue_wait->SetTotal(t.queue_wait_seconds);
    s.sequences[0]->Set(static_cast<double>(t.running));
    s.sequences[1]->Set(static_cast<double>(t.waiting));
    for (int tier = 0; tier < kNumTiers; ++tier) {
      if (s.kv_blocks[tier] != nullptr)
        s.kv_blocks[tier]->Set(static_cast<double>(t.kv_blocks[tier]));
    }
  }
  // A tenant the engine forgot (idle, past 4096) has no sequences; its blocks, still counted
  // under its id, show again when it comes back.
  for (auto& [name, s] : state->tenant_series) {
    if (s.seen) continue;
    for (Gauge* g : s.sequences) g->Set(0);
    for (Gauge* g : s.kv_blocks) {
      if (g != nullptr) g->Set(0);
    }
  }
  const char* kBlocks = "KV blocks per tier: capacity (total) and in use (used).";
  m->GetGauge("strata_worker_kv_blocks", kBlocks, {{"tier", "device"}, {"state", "total"}})
      ->Set(static_cast<double>(st.num_total_blocks));
  m->GetGauge("strata_worker_kv_blocks", kBlocks, {{"tier", "device"}, {"state", "used"}})
      ->Set(static_cast<double>(st.num_total_blocks - st.num_free_blocks));
  if (engine_->ServesFineTunes()) {
    const DeltaCacheStats& d = st.deltas;
    const char* kFineTunes =
        "Fine-tunes registered (total), and deltas in memory (resident; a removed fine-tune's "
        "while sequences still run on it).";
    m->GetGauge("strata_worker_fine_tunes", kFineTunes, {{"state", "total"}})
        ->Set(static_cast<double>(d.num_registered));
    m->GetGauge("strata_worker_fine_tunes", kFineTunes, {{"state", "resident"}})
        ->Set(static_cast<double>(d.num_resident));
    const char* kCache = "Delta cache: capacity and bytes in use.";
    m->GetGauge("strata_worker_delta_cache_bytes", kCache, {{"state", "total"}})
        ->Set(static_cast<double>(d.capacity_bytes));
    m->GetGauge("strata_worker_delta_cache_bytes", kCache, {{"state", "used"}})
        ->Set(static_cast<double>(d.resident_bytes));
    m->GetCounter("strata_worker_delta_loads_total", "Fine-tune deltas loaded from disk.")
        ->SetTotal(static_cast<double>(d.num_loads));
    m->GetCounter("strata_worker_delta_load_failures_total", "Fine-tune delta loads that failed.")
        ->SetTotal(static_cast<double>(d.num_load_failures));
    m->GetCounter("strata_worker_delta_evictions_total", "Fine-tune deltas evicted for room.")
        ->SetTotal(static_cast<double>(d.num_evictions));
    if (const GpuDeltaStats& g = st.gpu_deltas; g.capacity_bytes > 0) {
      const char* kDevice = "GPU memory for fine-tune deltas: capacity and bytes in use.";
      m->GetGauge("strata_worker_delta_device_bytes", kDevice, {{"state", "total"}})
          ->Set(static_cast<double>(g.capacity_bytes));
      m->GetGauge("strata_worker_delta_device_bytes", kDevice, {{"state", "used"}})
          ->Set(static_cast<double>(g.bytes_used));
      m->GetCounter("strata_worker_delta_device_uploads_total",
                    "Fine-tune deltas copied to GPU memory.")
          ->SetTotal(static_cast<double>(g.uploads));
      m->GetCounter("strata_worker_delta_device_evictions_total",
                    "Fine-tune deltas dropped from GPU memory for room.")
          ->SetTotal(static_cast<double>(g.evictions));
    }
  }
  if (engine_->kv_store() == nullptr) return;
  const KvStoreStats& t = st.tiers;
  struct TierStats {
    const char* name;
    const KvStoreStats::PerTier& s;
    const KvStoreStats::PerTier& at_start;
  };
  for (const TierStats& tier : {TierStats{"host", t.host, tiers_at_start_.host},
                                TierStats{"disk", t.disk, tiers_at_start_.disk}}) {
    // A tier configured at start keeps its series: a disk tier turned off reads 0, not stale.
    if (tier.at_start.num_slots == 0) continue;
    m->GetGauge("strata_worker_kv_blocks", kBlocks, {{"tier", tier.name}, {"state", "total"}})
        ->Set(static_cast<double>(tier.s.num_slots));
    m->GetGauge("strata_worker_kv_blocks", kBlocks, {{"tier", tier.name}, {"state", "used"}})
        ->Set(static_cast<double>(tier.s.num_used));
    m->GetCounter("strata_worker_kv_tier_stores_total", "Blocks written into a lower tier.",
                  {{"tier", tier.name}})
        ->SetTotal(static_cast<double>(tier.s.stores));
    m->GetCounter("strata_worker_kv_tier_hits_total", "Blocks read back out of a lower tier.",
                  {{"tier", tier.name}})
        ->SetTotal(static_cast<double>(tier.s.hits));
    m->GetCounter("strata_worker_kv_tier_evictions_total", "Blocks dropped from a lower tier.",
                  {{"tier", tier.name}})
        ->SetTotal(static_cast<double>(tier.s.evictions));
  }
  m->GetGauge("strata_worker_kv_disk_enabled", "1 while the disk tier is on.")
      ->Set(t.disk_enabled ? 1 : 0);
  m->GetCounter("strata_worker_kv_corrupt_blocks_total",
                "Lower-tier reads that failed a checksum or key check (served as misses).")
      ->SetTotal(static_cast<double>(t.corrupt_blocks));
  const char* kDirty =
      "Host blocks evicted before their write-back (written from a copy, or lost).";
  m->GetCounter("strata_worker_kv_dirty_evictions_total", kDirty, {{"outcome", "spilled"}})
      ->SetTotal(static_cast<double>(t.dirty_evictions - t.lost_evictions));
  m->GetCounter("strata_worker_kv_dirty_evictions_total", kDirty, {{"outcome", "lost"}})
      ->SetTotal(static_cast<double>(t.lost_evictions));
  m->GetCounter("strata_worker_kv_dropped_puts_total",
                "KV blocks leaving the device that no host slot could take (every one pinned by "
                "a restore in progress): lost to the lower tiers.")
      ->SetTotal(static_cast<double>(t.dropped_puts));
  m->GetCounter("strata_worker_kv_disk_waits_total",
                "Times a KV block leaving the device waited for the disk tier (every host slot "
                "pinned by writes in flight, or every spill copy in use): the host tier is small "
                "for the bursts, or the disk slow.")
      ->SetTotal(static_cast<double>(t.disk_waits));
  m->GetCounter("strata_worker_kv_disk_wait_seconds_total",
                "Engine time spent in those waits for the disk tier.")
      ->SetTotal(t.disk_wait_seconds);
}

}  // namespace strata
