#include "coordinator/coordinator_service.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/grpc_status.h"
#include "common/grpc_stream.h"
#include "common/hash.h"
#include "common/ids.h"
#include "common/log.h"
#include "common/sampling_params.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "common/version.h"
#include "grpcpp/alarm.h"
#include "tokenizer/stop_matcher.h"

namespace strata {
namespace {

constexpr size_t kMaxTextBytes = size_t{1} << 20;
constexpr int kMaxDetokenizeIds = 1 << 20;

// A call's metadata value under `key` (the first), or empty.
std::string MetadataValue(const grpc::CallbackServerContext* context, const char* key) {
  const auto& metadata = context->client_metadata();
  auto it = metadata.find(key);
  return it == metadata.end() ? std::string() : std::string(it->second.data(), it->second.size());
}

grpc::Status Invalid(absl::string_view message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(message));
}

// A token's text for logprobs: byte-level pieces that are not valid UTF-8 become "\xNN" escapes.
std::string TokenText(const Tokenizer& tokenizer, int32_t id) {
  const std::string bytes =
      tokenizer.TokenBytes(id, /*first=*/false, /*skip_special_tokens=*/false);
  std::string out;
  size_t i = 0;
  while (i < bytes.size()) {
    const size_t n = ValidUtf8SequenceLength(absl::string_view(bytes).substr(i));
    if (n == 0) {
      absl::StrAppendFormat(&out, "\\x%02X", static_cast<unsigned char>(bytes[i]));
      ++i;
    } else {
      out.append(bytes, i, n);
      i += n;
    }
  }
  return out;
}

void FillTexts(const Tokenizer& tokenizer, v1::PositionLogprobs* p) {
  p->mutable_token()->set_text(TokenText(tokenizer, p->token().token_id()));
  for (v1::TokenLogprob& t : *p->mutable_top()) t.set_text(TokenText(tokenizer, t.token_id()));
}

// Statuses after which another worker may succeed.
bool Retryable(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::CANCELLED:
    case grpc::StatusCode::ABORTED:
    case grpc::StatusCode::UNKNOWN:
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::ALREADY_EXISTS:
      return true;
    default:
      return false;
  }
}

}  // namespace

// ModelRegistry.

absl::StatusOr<std::unique_ptr<ModelRegistry>> ModelRegistry::Load(
    const std::vector<std::string>& specs) {
  auto registry = std::make_unique<ModelRegistry>();
  for (const std::string& spec : specs) {
    std::vector<std::string> parts = absl::StrSplit(spec, absl::MaxSplits('=', 1));
    if (parts.size() != 2 || parts[0].empty() || parts[1].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--model \"", spec, "\" is not NAME=DIR (DIR holding tokenizer.json)"));
    }
    absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromModelDir(parts[1]);
    if (!t.ok()) {
      return absl::Status(t.status().code(),
                          absl::StrCat("model ", parts[0], ": ", t.status().message()));
    }
    registry->tokenizers_[parts[0]] = *std::move(t);
  }
  if (registry->tokenizers_.empty()) {
    return absl::InvalidArgumentError("at least one --model NAME=DIR is required");
  }
  return registry;
}

const Tokenizer* ModelRegistry::Find(const std::string& name) const {
  auto it = tokenizers_.find(name);
  return it == tokenizers_.end() ? nullptr : it->second.get();
}

std::vector<std::string> ModelRegistry::Names() const {
  std::vector<std::string> out;
  for (const auto& [name, t] : tokenizers_) out.push_back(name);
  return out;
}

// GenerateCall: one Generate stream, from validation to the last chunk, across attempts.
//
// Thread contract. gRPC reactions (the client's cancellation, each attempt's reads and end, the
// first-token alarm) run on gRPC threads and serialize on mu_. No gRPC operation is started while
// mu_ is held. Every entry point holds the call (Enter / Leave) while it runs, and the server
// stream is finished, by whichever thread leaves last, only once the outcome is decided, no
// attempt is active, the alarm is not pending and no thread is inside: after that nothing can call
// back into the call, which deletes itself when gRPC reports the stream done. Attempts are owned by
// the call and outlive their own OnDone.
class CoordinatorService::GenerateCall final : public QueuedServerWriter<v1::GenerateResponse> {
 public:
  GenerateCall(CoordinatorService* service, grpc::CallbackServerContext* context,
               const v1::GenerateRequest* request)
      : service_(service), context_(context), request_(request), accepted_(absl::Now()) {}

  void Start();
  void OnCancel() override { ClientGone(); }
  // The call's access-log record, once it has ended.
  std::string AccessRecordLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether `keys` still give the call's key to its tenant.
  bool KeyStillValid(const ApiKeys& keys) const;
  std::pair<std::string, std::string> KeyAndTenant() const {
    return {authorization_, share_tenant_};
  }
  // Holds the call (as Enter) unless its outcome is decided already; then Revoke must follow.
  bool HoldUndecided() ABSL_LOCKS_EXCLUDED(mu_);
  // Ends a held call: UNAUTHENTICATED, its key revoked; the worker's sequence is cancelled.
  void Revoke() ABSL_LOCKS_EXCLUDED(mu_);

 protected:
  void OnWriteFailed() override { ClientGone(); }
  void OnStreamDone() override {
    int64_t generated = 0, cached = 0;
    bool completed = false;
    {
      // What the call did not use of the tokens it took goes back to its tenant.
      absl::MutexLock lock(&mu_);
      generated = static_cast<int64_t>(generated_.size());
      completed = final_.has_value() && final_->ok();
      // A call that failed before any token because no worker could take it (none free, none
      // serving, each refusing) used nothing; one a worker took used its prompt, even if the
      // client cancelled or ran out of time before the first token.
      const grpc::StatusCode code =
          final_.has_value() ? final_->error_code() : grpc::StatusCode::UNKNOWN;
      const bool refused = generated == 0 && !completed && !client_gone_ &&
                           (tried_.empty() || code == grpc::StatusCode::RESOURCE_EXHAUSTED ||
                            code == grpc::StatusCode::UNAVAILABLE);
      tokens_.Settle(refused ? 0 : static_cast<int64_t>(prompt_.size()) + generated, absl::Now());
      cached = cached_.num_device_tokens() + cached_.num_host_tokens() + cached_.num_disk_tokens();
      if (service_->options_.access_log != nullptr) {
        service_->options_.access_log->Append(AccessRecordLocked());
      }
    }
    // The tenant's usage, outside the call's lock (the registry has its own).
    if (const Tenant* t = tenant_ != nullptr ? tenant_ : gateway_tenant_;
        t != nullptr && completed) {
      TenantMetrics{service_->options_.metrics, tenant_ != nullptr ? "grpc" : "http"}.Tokens(
          *t, static_cast<int64_t>(prompt_.size()), cached, generated);
    }
    service_->inflight_.fetch_sub(1);
    if (running_ != nullptr) running_->Add(-1);
    if (keyed_) {
      absl::MutexLock lock(&service_->keyed_mu_);
      service_->keyed_calls_.erase(this);
    }
  }

 private:
  class Attempt final : public grpc::ClientReadReactor<v1::SubmitResponse> {
   public:
    Attempt(GenerateCall* call, WorkerPool::Assignment assignment)
        : call_(call), assignment_(std::move(assignment)) {}
    void OnReadDone(bool ok) override {
      if (!ok) return;
      call_->OnChunk(this, &response_);
      response_.Clear();
      StartRead(&response_);
    }
    void OnDone(const grpc::Status& status) override { call_->OnAttemptDone(this, status); }

    GenerateCall* const call_;
    WorkerPool::Assignment assignment_;
    grpc::ClientContext context_;
    v1::SubmitRequest request_;
    v1::SubmitResponse response_;
  };

  grpc::Status Validate();
  void Enter() ABSL_LOCKS_EXCLUDED(mu_);
  void Leave() ABSL_LOCKS_EXCLUDED(mu_);
  void StartAttempt();
  void OnChunk(Attempt* attempt, v1::SubmitResponse* chunk);
  void OnAttemptDone(Attempt* attempt, const grpc::Status& status);
  void ClientGone();
  void OnFirstTokenAlarm(bool fired);
  // Decides the outcome, unless it is decided already. Returns whether the first-token alarm must
  // now be cancelled (outside the lock).
  bool SetFinalLocked(grpc::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Counts and times the call in the service's metrics, once final_ is set.
  void RecordMetricsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A final chunk the coordinator writes itself (length or context reached between attempts).
  v1::GenerateResponse LocalFinishLocked(v1::FinishReason reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AppendTextLocked(absl::string_view piece, v1::GenerateResponse* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FillUsageLocked(v1::GenerateResponse* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  CoordinatorService* const service_;
  grpc::CallbackServerContext* const context_;
  const v1::GenerateRequest* const request_;
  const absl::Time accepted_;

  // Set by Start, read-only afterwards.
  std::string request_id_;
  // With API keys: the caller's tenant (null: none asked, or the HTTP gateway), one of its
  // concurrent requests held for the call's life, and the cache salt the call runs with.
  std::shared_ptr<const ApiKeys> keys_;
  const Tenant* tenant_ = nullptr;
  ApiKeys::Lease lease_;
  Gauge* running_ = nullptr;  // the tenant's running requests, with metrics
  std::string cache_salt_;
  // The tenant the workers share themselves by (the caller's, or the one the gateway names;
  // empty without API keys) and its scheduling weight.
  std::string share_tenant_;
  double share_weight_ = 1;
  // For the gateway's calls, the tenant it names (of keys_), for its tokens_per_minute.
  const Tenant* gateway_tenant_ = nullptr;
  // Tokens taken from the tenant's tokens_per_minute (settled in OnStreamDone).
  ApiKeys::TokenGrant tokens_;
  const Tokenizer* tokenizer_ = nullptr;
  ModelView model_;
  // The longest context any worker that could take the request serves (Validate).
  uint32_t longest_context_ = 0;
  ResolvedSampling sampling_;
  uint64_t seed_ = 0;
  std::vector<int32_t> prompt_;
  std::vector<BlockHash> hashes_;
  int64_t prompt_blocks_ = 0;

  absl::Mutex mu_;
  std::vector<int32_t> generated_ ABSL_GUARDED_BY(mu_);
  std::optional<IncrementalDecoder> decoder_ ABSL_GUARDED_BY(mu_);
  std::optional<StopMatcher> stop_ ABSL_GUARDED_BY(mu_);
  bool sent_first_chunk_ ABSL_GUARDED_BY(mu_) = false;
  bool have_first_token_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time first_token_time_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Attempt>> attempts_ ABSL_GUARDED_BY(mu_);
  Attempt* active_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<WorkerSlot> tried_ ABSL_GUARDED_BY(mu_);
  grpc::Status last_failure_ ABSL_GUARDED_BY(mu_);
  std::optional<grpc::Status> final_ ABSL_GUARDED_BY(mu_);
  bool finish_requested_ ABSL_GUARDED_BY(mu_) = false;
  int holds_ ABSL_GUARDED_BY(mu_) = 0;
  bool client_gone_ ABSL_GUARDED_BY(mu_) = false;
  bool alarm_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool counted_failover_ ABSL_GUARDED_BY(mu_) = false;
  // Disaggregated serving: the prefill leg sent its token, the handoffs to a decode worker so far
  // (0 or 1; they do not count against max_attempts), and the worker decode legs copy from.
  bool prefill_done_ ABSL_GUARDED_BY(mu_) = false;
  int handoffs_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<WorkerSlot> kv_source_slot_ ABSL_GUARDED_BY(mu_);
  v1::CachedTokens cached_ ABSL_GUARDED_BY(mu_);
  v1::FinishReason finish_reason_ ABSL_GUARDED_BY(mu_) = v1::FINISH_REASON_UNSPECIFIED;
  grpc::Alarm alarm_;
  // For the access log (set by Start when there is one): which API, the client's address, the
  // W3C trace id it sent, and the gateway's HTTP request.
  const char* api_ = "grpc";
  std::string peer_, trace_id_, http_request_;
  // With API keys: the caller's Authorization value (the gateway forwards its client's), kept to
  // check against reloaded keys while the call is in keyed_calls_.
  std::string authorization_;
  bool keyed_ = false;
  bool revoked_ ABSL_GUARDED_BY(mu_) = false;
};

grpc::Status CoordinatorService::GenerateCall::Validate() {
  const v1::GenerateRequest& r = *request_;
  // (The caller is known: Start authenticated it.) A model the tenant may not use, or one that
  // does not exist, is the same NOT_FOUND to a tenant, naming only what it asked for.
  const TenantMetrics metrics{service_->options_.metrics, "grpc"};
  const auto not_found = [&] {
    metrics.Refused(*tenant_, "model");
    return ToGrpcStatus(ApiKeys::NotFound(r.model(), r.fine_tune_id()));
  };
  if (tenant_ != nullptr && !ApiKeys::Allows(*tenant_, r.model(), r.fine_tune_id())) {
    return not_found();
  }
  if (!IsValidId(r.request_id())) {
    return Invalid("request_id must be at most 128 bytes of [A-Za-z0-9._-]");
  }
  request_id_ = r.request_id().empty() ? absl::StrCat(service_->options_.instance_id, "-",
                                                      service_->next_id_.fetch_add(1))
                                       : r.request_id();
  if (r.model().empty()) return Invalid("model is required (ListModels names the models)");
  absl::StatusOr<ModelView> model = service_->Model(r.model());
  if (!model.ok()) return tenant_ != nullptr ? not_found() : ToGrpcStatus(model.status());
  model_ = *model;
  tokenizer_ = service_->models_->Find(r.model());
  if (!r.fine_tune_id().empty() &&
      std::find(model_.fine_tune_ids.begin(), model_.fine_tune_ids.end(), r.fine_tune_id()) ==
          model_.fine_tune_ids.end()) {
    if (tenant_ != nullptr) return not_found();
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("fine_tune_id \"", r.fine_tune_id(),
                                     "\" is not registered for model ", r.model()));
  }
  cache_salt_ = tenant_ != nullptr ? ApiKeys::CacheSalt(*tenant_, r.cache_salt()) : r.cache_salt();
  if (cache_salt_.size() > 256) return Invalid("cache_salt must be at most 256 bytes");
  if (r.priority() < -100 || r.priority() > 100) return Invalid("priority must be in [-100, 100]");
  // Priority goes before fair sharing: a tenant asks for no more than its keys grant it.
  if (const Tenant* t = tenant_ != nullptr ? tenant_ : gateway_tenant_;
      t != nullptr && r.priority() > t->max_priority) {
    return Invalid(absl::StrCat("priority must be at most ", t->max_priority, " for tenant \"",
                                t->name, "\" (its max_priority)"));
  }
  if (model_.num_workers == 0 || model_.max_context_tokens == 0) {
    return grpc::Status(
        grpc::StatusCode::UNAVAILABLE,
        model_.num_known_workers == 0
            ? absl::StrCat("no worker serves model ", r.model(), " (none has connected yet)")
            : absl::StrCat("none of the ", model_.num_known_workers, " workers of model ",
                           r.model(), " is serving right now (draining or unavailable)"));
  }
  absl::StatusOr<ResolvedSampling> sampling =
      ResolveSamplingParams(r.sampling(), model_.vocab_size);
  if (!sampling.ok()) return ToGrpcStatus(sampling.status());
  sampling_ = *std::move(sampling);
  if (absl::StatusOr<std::shared_ptr<const Grammar>> g =
          service_->grammars_.Get(r.sampling().structured_output(), "sampling.structured_output");
      !g.ok()) {
    return ToGrpcStatus(g.status());
  }
  switch (r.prompt_case()) {
    case v1::GenerateRequest::kText: {
      if (r.text().size() > kMaxTextBytes) return Invalid("text must be at most 1 MiB");
      absl::StatusOr<std::vector<int32_t>> ids =
          tokenizer_->Encode(r.text(), /*add_special_tokens=*/true);
      if (!ids.ok()) return Invalid(absl::StrCat("text: ", ids.status().message()));
      prompt_ = *std::move(ids);
      if (prompt_.empty()) return Invalid("text encodes to no tokens");
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = r.token_ids().ids();
      if (ids.empty()) return Invalid("token_ids.ids must not be empty");
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0 || static_cast<uint32_t>(ids[i]) >= model_.vocab_size) {
          return Invalid(absl::StrCat("token_ids.ids[", i, "] = ", ids[i],
                                      " is outside the vocabulary [0, ", model_.vocab_size, ")"));
        }
      }
      prompt_.assign(ids.begin(), ids.end());
      break;
    }
    case v1::GenerateRequest::PROMPT_NOT_SET:
      return Invalid("prompt is required: set text or token_ids");
  }
  // The longest contexts of the workers that could take it: serving now, and of any (a fine-tune's
  // own workers' when it names one).
  uint32_t longest_now = model_.max_context_tokens;
  longest_context_ = model_.max_known_context_tokens;  // (serving ones among them)
  std::string whose = absl::StrCat("model ", r.model(), " has");
  if (auto it = model_.fine_tune_contexts.find(r.fine_tune_id());
      !r.fine_tune_id().empty() && it != model_.fine_tune_contexts.end()) {
    longest_now = it->second.serving;
    longest_context_ = it->second.known;
    whose = absl::StrCat("fine-tune ", r.fine_tune_id(), " of model ", r.model(), " has");
  }
  if (prompt_.size() >= longest_context_) {
    return Invalid(absl::StrCat("prompt has ", prompt_.size(), " tokens; ", whose, " a context of ",
                                longest_context_, " tokens (prompt plus output)",
                                model_.min_context_tokens < model_.max_context_tokens
                                    ? " on its workers that serve the longest"
                                    : ""));
  }
  if (longest_now > 0 && prompt_.size() >= longest_now) {
    // A worker that holds it is draining or unavailable for now.
    return grpc::Status(
        grpc::StatusCode::UNAVAILABLE,
        absl::StrCat("prompt has ", prompt_.size(), " tokens; the workers of model ", r.model(),
                     " that serve contexts that long (up to ", longest_context_,
                     " tokens) are draining or unavailable, and those serving now hold ",
                     longest_now));
  }
  if (sampling_.seed.has_value()) {
    seed_ = *sampling_.seed;
  } else {
    absl::BitGen gen;
    seed_ = absl::Uniform<uint64_t>(gen);
  }
  const int block_tokens = static_cast<int>(std::max<uint32_t>(1, model_.block_tokens));
  std::string revision;
  if (auto it = model_.fine_tune_revisions.find(r.fine_tune_id());
      it != model_.fine_tune_revisions.end()) {
    revision = it->second;
  }
  hashes_ = PrefixBlockHashes(
      CacheNamespace(r.model(), FineTuneNamespaceId(r.fine_tune_id(), revision), cache_salt_),
      prompt_, block_tokens);
  prompt_blocks_ = (static_cast<int64_t>(prompt_.size()) + block_tokens - 1) / block_tokens;
  // The tenant's limits, once the request is known to be valid (the HTTP gateway has applied
  // those on requests itself): its rate, its concurrency, then its tokens_per_minute (the prompt
  // and max_tokens now, what goes unused back at the end).
  if (tenant_ != nullptr) {
    if (absl::Status rate = ApiKeys::Admit(*tenant_, 1, absl::Now()); !rate.ok()) {
      metrics.Refused(*tenant_, "rate");
      return ToGrpcStatus(rate);
    }
    absl::StatusOr<ApiKeys::Lease> lease = ApiKeys::Acquire(*tenant_);
    if (!lease.ok()) {
      metrics.Refused(*tenant_, "concurrency");
      return ToGrpcStatus(lease.status());
    }
    lease_ = *std::move(lease);
  }
  if (const Tenant* payer = tenant_ != nullptr ? tenant_ : gateway_tenant_; payer != nullptr) {
    absl::StatusOr<ApiKeys::TokenGrant> grant = ApiKeys::TakeTokens(
        *payer, static_cast<int64_t>(prompt_.size()) + sampling_.max_tokens, absl::Now());
    if (!grant.ok()) {
      TenantMetrics{service_->options_.metrics, tenant_ != nullptr ? "grpc" : "http"}.Refused(
          *payer, "tokens");
      // It never runs: what it took of the request rate goes back (the gateway does the same).
      if (tenant_ != nullptr) ApiKeys::Unadmit(*tenant_, 1);
      return ToGrpcStatus(grant.status());
    }
    tokens_ = *std::move(grant);
  }
  if (tenant_ != nullptr) running_ = metrics.Taken(*tenant_);
  return grpc::Status::OK;
}

void CoordinatorService::GenerateCall::Enter() {
  absl::MutexLock lock(&mu_);
  ++holds_;
}

void CoordinatorService::GenerateCall::Leave() {
  std::optional<grpc::Status> finish;
  bool drop_queued = false;
  {
    absl::MutexLock lock(&mu_);
    --holds_;
    if (final_.has_value() && holds_ == 0 && active_ == nullptr && !alarm_pending_ &&
        !finish_requested_) {
      finish_requested_ = true;
      finish = *final_;
      drop_queued = revoked_;
    }
  }
  if (!finish.has_value()) return;
  // A revoked call's tokens still queued are not sent: the key no longer entitles to them.
  if (drop_queued) {
    Abort(*std::move(finish));
  } else {
    RequestFinish(*std::move(finish));
  }
}

void CoordinatorService::GenerateCall::Start() {
  Enter();
  if (service_->options_.access_log != nullptr) {
    if (service_->FromGateway(context_)) {
      api_ = "http";
      peer_ = MetadataValue(context_, kGatewayClientMetadata);
      http_request_ = MetadataValue(context_, kGatewayHttpRequestMetadata);
    } else {
      peer_ = context_->peer();
    }
    trace_id_ = TraceIdOf(MetadataValue(context_, "traceparent"));
  }
  // Counted in flight either way (OnStreamDone takes it off); a caller without a valid key hears
  // that first, and nothing of the coordinator's load.
  const bool full = service_->inflight_.fetch_add(1) >= service_->options_.max_inflight_requests;
  grpc::Status valid = service_->Caller(context_, &keys_, &tenant_, &share_tenant_);
  if (tenant_ != nullptr) {
    share_tenant_ = tenant_->name;
    share_weight_ = tenant_->scheduling_weight;
  } else if (valid.ok() && service_->options_.api_keys == nullptr &&
             !service_->options_.tenant_header.empty()) {
    // A trusted proxy's tenant, for fair sharing only.
    const auto& metadata = context_->client_metadata();
    auto it = metadata.find(service_->options_.tenant_header);
    if (it != metadata.end()) {
      share_tenant_.assign(it->second.data(), it->second.size());
      if (!ValidTenantName(share_tenant_)) {
        valid = grpc::Status(
            grpc::StatusCode::INVALID_ARGUMENT,
            absl::StrCat(service_->options_.tenant_header, " must be 1 to 128 of [A-Za-z0-9._-]"));
      }
    }
  } else if (!share_tenant_.empty()) {
    keys_ = service_->options_.api_keys->Current();
    gateway_tenant_ = keys_->Find(share_tenant_);
    if (gateway_tenant_ != nullptr) share_weight_ = gateway_tenant_->scheduling_weight;
  }
  if (valid.ok() && full) {
    valid = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                         absl::StrCat("coordinator has ", service_->options_.max_inflight_requests,
                                      " requests in flight: back off and retry"));
  } else if (valid.ok()) {
    valid = Validate();
  }
  if (!valid.ok()) {
    {
      absl::MutexLock lock(&mu_);
      SetFinalLocked(valid);
    }
    Leave();
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    decoder_.emplace(tokenizer_, sampling_.skip_special_tokens, prompt_);
    stop_.emplace(sampling_.stop);
    if (request_->first_token_timeout_ms() > 0) alarm_pending_ = true;
  }
  if (request_->first_token_timeout_ms() > 0) {
    alarm_.Set(
        absl::ToChronoTime(accepted_ + absl::Milliseconds(request_->first_token_timeout_ms())),
        [this](bool fired) { OnFirstTokenAlarm(fired); });
  }
  StartAttempt();
  // A call made with a key (its own, or the gateway's client's) ends if a reload revokes it.
  // Registered, then checked against the keys in force now: a reload since the key was checked
  // has either found the call registered or left its keys for this check to find.
  if (service_->options_.api_keys != nullptr && (tenant_ != nullptr || !share_tenant_.empty())) {
    authorization_ = MetadataValue(context_, "authorization");
    if (!authorization_.empty()) {
      keyed_ = true;
      {
        absl::MutexLock lock(&service_->keyed_mu_);
        service_->keyed_calls_.insert(this);
      }
      // A direct caller was authenticated against keys_: unless a reload has replaced them
      // since, its key still holds. (The gateway checked its client's before keys_ was read.)
      const std::shared_ptr<const ApiKeys> now = service_->options_.api_keys->Current();
      if ((tenant_ == nullptr || now != keys_) && !KeyStillValid(*now)) {
        Revoke();  // (and Leave)
        return;
      }
    }
  }
  Leave();
}

void CoordinatorService::GenerateCall::StartAttempt() {
  Attempt* attempt = nullptr;
  bool cancel_alarm = false;
  std::optional<v1::GenerateResponse> local;
  {
    absl::MutexLock lock(&mu_);
    if (!final_.has_value() && !client_gone_) {
      absl::StatusOr<WorkerPool::Assignment> a =
          static_cast<int>(tried_.size()) - handoffs_ >= service_->options_.max_attempts
              ? absl::UnavailableError("tried too many workers")
              : service_->pool_->Assign(
                    request_->model(), hashes_, prompt_blocks_, tried_, request_->fine_tune_id(),
                    generated_.empty() ? WorkerPool::Leg::kAuto : WorkerPool::Leg::kDecode,
                    kv_source_slot_,
                    {static_cast<int64_t>(prompt_.size() + generated_.size()),
                     static_cast<int64_t>(prompt_.size()) + sampling_.max_tokens});
      if (a.status().code() == absl::StatusCode::kOutOfRange && !generated_.empty()) {
        // The generation so far fits no worker left (the one with the longest context failed
        // it): it ends where the cluster's context does now.
        LOG(WARNING) << "request " << request_id_ << ": " << a.status().message()
                     << "; ending it at token " << generated_.size();
        local = LocalFinishLocked(v1::FINISH_REASON_CONTEXT_LENGTH);
        cancel_alarm = SetFinalLocked(grpc::Status::OK);
      } else if (!a.ok()) {
        // Prefer the workers' own answer (RESOURCE_EXHAUSTED: all full) over "no worker left".
        // A prompt that fits none of the workers that can take it now waits for one that holds it
        // (validated against them all): UNAVAILABLE, not the client's error.
        grpc::Status s =
            a.status().code() == absl::StatusCode::kOutOfRange
                ? grpc::Status(grpc::StatusCode::UNAVAILABLE, std::string(a.status().message()))
                : ToGrpcStatus(a.status());
        if (last_failure_.error_code() == grpc::StatusCode::NOT_FOUND) {
          s = last_failure_;  // no worker serves the fine-tune any more
        } else if (!last_failure_.ok()) {
          s = grpc::Status(last_failure_.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED
                               ? grpc::StatusCode::RESOURCE_EXHAUSTED
                               : grpc::StatusCode::UNAVAILABLE,
                           absl::StrCat(a.status().message(),
                                        "; last worker error: ", last_failure_.error_message()));
        }
        cancel_alarm = SetFinalLocked(s);
      } else {
        tried_.push_back(a->slot);
        attempts_.push_back(std::make_unique<Attempt>(this, *std::move(a)));
        attempt = attempts_.back().get();
        active_ = attempt;
        v1::SubmitRequest& s = attempt->request_;
        // The coordinator's own id: unique per attempt and short (a client id may take all 128
        // bytes the worker allows).
        s.set_request_id(
            absl::StrCat(service_->options_.instance_id, "-", service_->next_id_.fetch_add(1)));
        s.set_model(request_->model());
        s.set_fine_tune_id(request_->fine_tune_id());
        s.mutable_prompt_token_ids()->Add(prompt_.begin(), prompt_.end());
        s.mutable_resume_token_ids()->Add(generated_.begin(), generated_.end());
        *s.mutable_sampling() = request_->sampling();
        s.mutable_sampling()->clear_stop();
        s.mutable_sampling()->set_seed(seed_);
        // A resumed generation's client has its prompt logprobs (they came with the first
        // tokens); asking again would have the worker compute the whole prompt anew, its cached
        // and copied blocks unused.
        if (!generated_.empty()) s.mutable_sampling()->clear_prompt_logprobs();
        if (attempt->assignment_.prefill_leg) {
          // The prompt and its first token; a decode worker generates the rest (OnAttemptDone).
          // min_tokens 1 keeps the first token's EOS suppression, and so the same token.
          s.mutable_sampling()->set_max_tokens(1);
          s.mutable_sampling()->set_min_tokens(std::min<uint32_t>(s.sampling().min_tokens(), 1));
        }
        s.set_cache_salt(cache_salt_);
        s.set_priority(request_->priority());
        s.set_tenant(share_tenant_);
        s.set_tenant_weight(share_weight_);
        for (BlockHash h : hashes_) s.add_prefix_block_hashes(h);
        s.set_kv_source_address(attempt->assignment_.kv_source_address);
        if (const auto& m = service_->call_metrics_;
            m.kv_copy_routes != nullptr && !attempt->assignment_.kv_source_address.empty()) {
          m.kv_copy_routes->Add();
          m.kv_copy_blocks->Add(static_cast<double>(attempt->assignment_.kv_source_blocks));
        }
        if (context_->deadline() != std::chrono::system_clock::time_point::max()) {
          attempt->context_.set_deadline(context_->deadline());
        }
        if (!generated_.empty() && handoffs_ > 0 && !counted_failover_) {
          VLOG(1) << "request " << request_id_ << ": decoding on " << attempt->assignment_.address
                  << " after its prefill leg";
        } else if (!generated_.empty()) {
          LOG(INFO) << "request " << request_id_ << ": failing over to "
                    << attempt->assignment_.address << " at token " << generated_.size();
        }
        VLOG(1) << "request " << request_id_ << " is " << s.request_id() << " on "
                << attempt->assignment_.address;
      }
    }
  }
  if (local.has_value()) Write(*std::move(local));
  if (cancel_alarm) alarm_.Cancel();
  if (attempt != nullptr) {
    service_->pool_->Authorize(&attempt->context_);
    attempt->assignment_.stub->async()->Submit(&attempt->context_, &attempt->request_, attempt);
    attempt->StartRead(&attempt->response_);
    attempt->StartCall();
  }
}

void CoordinatorService::GenerateCall::AppendTextLocked(absl::string_view piece,
                                                        v1::GenerateResponse* out) {
  // Stop strings do not apply before min_tokens tokens.
  if (static_cast<int64_t>(generated_.size()) <= sampling_.min_tokens) {
    out->mutable_text()->append(piece.data(), piece.size());
  } else {
    out->mutable_text()->append(stop_->Add(piece));
  }
}

void CoordinatorService::GenerateCall::FillUsageLocked(v1::GenerateResponse* out) {
  v1::Usage* u = out->mutable_usage();
  u->set_num_prompt_tokens(static_cast<uint32_t>(prompt_.size()));
  u->set_num_completion_tokens(static_cast<uint32_t>(generated_.size()));
  *u->mutable_cached() = cached_;
  const absl::Time now = absl::Now();
  u->set_time_to_first_token_ms(
      have_first_token_ ? absl::ToDoubleMilliseconds(first_token_time_ - accepted_) : 0.0);
  u->set_total_time_ms(absl::ToDoubleMilliseconds(now - accepted_));
}

v1::GenerateResponse CoordinatorService::GenerateCall::LocalFinishLocked(v1::FinishReason reason) {
  v1::GenerateResponse out;
  out.set_request_id(request_id_);
  out.set_first_token_index(static_cast<uint32_t>(generated_.size()));
  std::string tail = decoder_->Flush();
  AppendTextLocked(tail, &out);
  if (!stop_->stopped()) out.mutable_text()->append(stop_->Flush());
  out.set_finish_reason(reason);
  finish_reason_ = reason;
  FillUsageLocked(&out);
  return out;
}

std::string CoordinatorService::GenerateCall::AccessRecordLocked() {
  const grpc::Status& status =
      final_.has_value() ? *final_ : grpc::Status(grpc::StatusCode::UNKNOWN, "no outcome");
  AccessRecord r(accepted_, "generate");
  r.Str("request_id", request_id_.empty() ? request_->request_id() : request_id_)
      .Str("api", api_)
      .StrIfSet("http_request", http_request_)
      .StrIfSet("peer", peer_)
      .StrIfSet("trace_id", trace_id_)
      .StrIfSet("tenant", share_tenant_)
      .Str("model", request_->model())
      .StrIfSet("fine_tune", request_->fine_tune_id())
      .Int("priority", request_->priority())
      .Str("status", absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())));
  if (!status.ok()) r.Str("error", status.error_message(), 1024);
  if (finish_reason_ != v1::FINISH_REASON_UNSPECIFIED) {
    r.Str("finish_reason", v1::FinishReason_Name(finish_reason_));
  }
  r.Int("prompt_tokens", static_cast<int64_t>(prompt_.size()))
      .Raw("cached_tokens", absl::StrCat("{\"device\":", cached_.num_device_tokens(),
                                         ",\"host\":", cached_.num_host_tokens(),
                                         ",\"disk\":", cached_.num_disk_tokens(), "}"))
      .Int("completion_tokens", static_cast<int64_t>(generated_.size()));
  if (have_first_token_) r.Ms("ttft_ms", first_token_time_ - accepted_);
  r.Ms("duration_ms", absl::Now() - accepted_);
  std::vector<std::string> workers;
  for (const auto& a : attempts_) workers.push_back(a->assignment_.address);
  r.StrList("workers", workers);
  // Disaggregated: the first of them computed the prompt, the next took the generation on.
  if (handoffs_ > 0) r.Int("prefill_handoff", 1);
  if (client_gone_) r.Int("client_gone", 1);
  return r.Done();
}

void CoordinatorService::GenerateCall::OnChunk(Attempt* attempt, v1::SubmitResponse* chunk) {
  std::optional<v1::GenerateResponse> out;
  bool cancel_attempt = false;
  bool cancel_alarm = false;
  Enter();
  // A chunk that arrives after the outcome is decided (a stop string matched) is dropped.
  if (absl::MutexLock lock(&mu_); !final_.has_value() && attempt == active_) {
    v1::GenerateResponse r;
    r.set_request_id(request_id_);
    r.set_first_token_index(static_cast<uint32_t>(generated_.size()));
    if (!sent_first_chunk_) {
      r.set_seed(seed_);
      for (v1::PositionLogprobs& p : *chunk->mutable_prompt_logprobs()) {
        FillTexts(*tokenizer_, &p);
        *r.add_prompt_logprobs() = std::move(p);
      }
    }
    const int64_t first = chunk->first_token_index();
    bool stopped = false;
    for (int k = 0; k < chunk->token_ids_size() && !stopped; ++k) {
      const int64_t position = first + k;
      if (position < static_cast<int64_t>(generated_.size())) continue;  // already have it
      if (position > static_cast<int64_t>(generated_.size())) {
        LOG(ERROR) << "request " << request_id_ << ": worker skipped from token "
                   << generated_.size() << " to " << position;
        break;
      }
      const int32_t token = chunk->token_ids(k);
      generated_.push_back(token);
      r.add_token_ids(token);
      if (k < chunk->logprobs_size()) {
        v1::PositionLogprobs* p = r.add_logprobs();
        *p = std::move(*chunk->mutable_logprobs(k));
        FillTexts(*tokenizer_, p);
      }
      // The EOS or stop token that ends the generation is not part of its text (as in vLLM),
      // whether or not special tokens are skipped.
      if (k + 1 < chunk->token_ids_size() ||
          (chunk->finish_reason() != v1::FINISH_REASON_STOP_TOKEN &&
           chunk->finish_reason() != v1::FINISH_REASON_EOS)) {
        AppendTextLocked(decoder_->Add(token), &r);
      }
      if (stop_->stopped()) {
        stopped = true;
        r.set_finish_reason(v1::FINISH_REASON_STOP_STRING);
        r.set_matched_stop(stop_->matched());
      }
    }
    if (!have_first_token_ && !generated_.empty()) {
      have_first_token_ = true;
      first_token_time_ = absl::Now();
      cancel_alarm = alarm_pending_;
    }
    // Each attempt (a failover one too) moves from prefill to decode at its first tokens.
    if (chunk->token_ids_size() > 0 && !attempt->assignment_.decoding) {
      service_->pool_->FirstToken(&attempt->assignment_);
    }
    // After a prefill leg, the prompt tokens found cached are the prefill worker's: the decode
    // worker's count the blocks it copied from there.
    if (chunk->has_usage() && !prefill_done_) cached_ = chunk->usage().cached();
    if (stopped) {
      FillUsageLocked(&r);
      cancel_alarm |= SetFinalLocked(grpc::Status::OK);
      cancel_attempt = true;
    } else if (attempt->assignment_.prefill_leg &&
               chunk->finish_reason() == v1::FINISH_REASON_LENGTH &&
               static_cast<int64_t>(generated_.size()) < sampling_.max_tokens) {
      // The prefill leg's one token: the rest comes from a decode worker once it ends.
      prefill_done_ = true;
    } else if (chunk->finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      // The decoder's last bytes go through the stop strings too, in order.
      AppendTextLocked(decoder_->Flush(), &r);
      if (stop_->stopped()) {
        r.set_finish_reason(v1::FINISH_REASON_STOP_STRING);
        r.set_matched_stop(stop_->matched());
      } else {
        r.mutable_text()->append(stop_->Flush());
        r.set_finish_reason(chunk->finish_reason());
        if (chunk->finish_reason() == v1::FINISH_REASON_STOP_TOKEN && !generated_.empty()) {
          r.set_matched_stop(TokenText(*tokenizer_, generated_.back()));
        }
      }
      FillUsageLocked(&r);
      // The attempt ends with OK right after this chunk; the stream finishes then.
      cancel_alarm |= SetFinalLocked(grpc::Status::OK);
    }
    if (r.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) finish_reason_ = r.finish_reason();
    if (r.token_ids_size() > 0 || !r.text().empty() || !sent_first_chunk_ ||
        r.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      sent_first_chunk_ = true;
      out = std::move(r);
    }
  }
  if (out.has_value()) Write(*std::move(out));
  if (cancel_alarm) alarm_.Cancel();
  if (cancel_attempt) attempt->context_.TryCancel();
  Leave();
}

void CoordinatorService::GenerateCall::OnAttemptDone(Attempt* attempt, const grpc::Status& status) {
  bool retry = false;
  bool cancel_alarm = false;
  std::optional<v1::GenerateResponse> local;
  Enter();
  {
    absl::MutexLock lock(&mu_);
    active_ = nullptr;
    service_->pool_->Release(&attempt->assignment_);
    if (final_.has_value() || client_gone_) {
      cancel_alarm =
          SetFinalLocked(grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled"));
    } else if (prefill_done_ && attempt->assignment_.prefill_leg && status.ok()) {
      // Disaggregated: a decode worker takes the generation on, copying the prompt's KV blocks
      // from the prefill worker, which holds them all now.
      ++handoffs_;
      kv_source_slot_ = attempt->assignment_.slot;
      if (service_->call_metrics_.prefill_handoffs != nullptr) {
        service_->call_metrics_.prefill_handoffs->Add();
      }
      retry = true;
    } else {
      grpc::Status failure = status;
      if (status.ok()) {
        failure = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                               "worker ended the stream without a finish reason");
      }
      // A worker that no longer serves the fine-tune (removed there a moment ago, before this
      // coordinator heard): another may still.
      const bool fine_tune_gone_there =
          failure.error_code() == grpc::StatusCode::NOT_FOUND &&
          !request_->fine_tune_id().empty() &&
          absl::StrContains(failure.error_message(), "is not served by this worker");
      if (!Retryable(failure.error_code()) && !fine_tune_gone_there) {
        // The request's own fault (INVALID_ARGUMENT, NOT_FOUND, ...) or its deadline.
        cancel_alarm = SetFinalLocked(failure);
      } else {
        last_failure_ = failure;
        service_->pool_->ReportSubmitFailure(attempt->assignment_.slot, failure);
        LOG(WARNING) << "request " << request_id_ << ": worker " << attempt->assignment_.address
                     << " failed after " << generated_.size() << " tokens ("
                     << failure.error_message() << "); retrying elsewhere";
        if (!generated_.empty() && !counted_failover_) {
          counted_failover_ = true;
          service_->failed_over_.fetch_add(1);
        }
        const int64_t n = static_cast<int64_t>(generated_.size());
        if (n >= sampling_.max_tokens) {
          local = LocalFinishLocked(v1::FINISH_REASON_LENGTH);
          cancel_alarm = SetFinalLocked(grpc::Status::OK);
        } else if (static_cast<int64_t>(prompt_.size()) + n >= longest_context_) {
          // No worker that could take it holds more (one that does, serving now, is found by
          // Assign).
          local = LocalFinishLocked(v1::FINISH_REASON_CONTEXT_LENGTH);
          cancel_alarm = SetFinalLocked(grpc::Status::OK);
        } else {
          retry = true;
        }
      }
    }
  }
  if (local.has_value()) Write(*std::move(local));
  if (cancel_alarm) alarm_.Cancel();
  if (retry) StartAttempt();
  Leave();
}

bool CoordinatorService::GenerateCall::KeyStillValid(const ApiKeys& keys) const {
  absl::StatusOr<const Tenant*> t = keys.Authenticate(authorization_);
  return t.ok() && (*t)->name == share_tenant_;
}

bool CoordinatorService::GenerateCall::HoldUndecided() {
  absl::MutexLock lock(&mu_);
  if (final_.has_value() || finish_requested_) return false;
  ++holds_;
  return true;
}

void CoordinatorService::GenerateCall::Revoke() {
  Attempt* active = nullptr;
  bool cancel_alarm = false;
  {
    absl::MutexLock lock(&mu_);
    active = active_;
    revoked_ = !final_.has_value();
    cancel_alarm =
        SetFinalLocked(grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                                    "the API key this request was made with has been revoked"));
  }
  // Cancelling the worker stream frees the sequence's KV blocks there.
  if (active != nullptr) active->context_.TryCancel();
  if (cancel_alarm) alarm_.Cancel();
  Leave();
}

void CoordinatorService::RevokeCalls(const std::shared_ptr<const ApiKeys>& keys) {
  std::vector<GenerateCall*> revoked;
  {
    // Held under keyed_mu_, so that none is deleted before it is held (a call leaves
    // keyed_calls_ in OnStreamDone, before it goes).
    absl::MutexLock lock(&keyed_mu_);
    // Each distinct (key, tenant) is looked up once (a lookup compares every key).
    absl::flat_hash_map<std::pair<std::string, std::string>, bool> valid;
    for (GenerateCall* call : keyed_calls_) {
      auto [it, added] = valid.try_emplace(call->KeyAndTenant(), false);
      if (added) it->second = call->KeyStillValid(*keys);
      if (!it->second && call->HoldUndecided()) revoked.push_back(call);
    }
  }
  for (GenerateCall* call : revoked) call->Revoke();
  if (!revoked.empty()) {
    LOG(INFO) << "API keys reloaded: " << revoked.size()
              << " running request(s) made with a revoked key ended";
  }
}

void CoordinatorService::GenerateCall::ClientGone() {
  Attempt* active = nullptr;
  bool cancel_alarm = false;
  Enter();
  {
    absl::MutexLock lock(&mu_);
    if (!client_gone_) {
      client_gone_ = true;
      active = active_;
      cancel_alarm =
          SetFinalLocked(grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled"));
    }
  }
  // Cancelling the worker stream frees the sequence's KV blocks there.
  if (active != nullptr) active->context_.TryCancel();
  if (cancel_alarm) alarm_.Cancel();
  Leave();
}

void CoordinatorService::GenerateCall::OnFirstTokenAlarm(bool fired) {
  Attempt* active = nullptr;
  Enter();
  {
    absl::MutexLock lock(&mu_);
    alarm_pending_ = false;
    if (fired && !have_first_token_ && !final_.has_value()) {
      active = active_;
      SetFinalLocked(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                  absl::StrCat("no first token within first_token_timeout_ms = ",
                                               request_->first_token_timeout_ms())));
    }
  }
  if (active != nullptr) active->context_.TryCancel();
  Leave();
}

bool CoordinatorService::GenerateCall::SetFinalLocked(grpc::Status status) {
  if (final_.has_value()) return false;
  final_ = std::move(status);
  service_->completed_.fetch_add(1);
  RecordMetricsLocked();
  // A pending alarm must go before the stream can finish: its callback (with fired = false)
  // clears alarm_pending_.
  return alarm_pending_;
}

void CoordinatorService::GenerateCall::RecordMetricsLocked() {
  if (service_->options_.metrics == nullptr) return;
  // Lock-free updates of series looked up beforehand: no registry lock under the call's.
  service_->RequestsCounter(final_->error_code())->Add();
  if (!final_->ok()) return;
  const CallMetrics& m = service_->call_metrics_;
  m.duration->Observe(absl::ToDoubleSeconds(absl::Now() - accepted_));
  if (have_first_token_) {
    m.first_token->Observe(absl::ToDoubleSeconds(first_token_time_ - accepted_));
    // The stream's pace after its first token (what a reader of a streamed answer waits a token).
    if (generated_.size() >= 2) {
      m.per_output_token->Observe(absl::ToDoubleSeconds(absl::Now() - first_token_time_) /
                                  static_cast<double>(generated_.size() - 1));
    }
  }
  m.prompt_tokens->Add(static_cast<double>(prompt_.size()));
  m.completion_tokens->Add(static_cast<double>(generated_.size()));
  m.cached_tokens[0]->Add(cached_.num_device_tokens());
  m.cached_tokens[1]->Add(cached_.num_host_tokens());
  m.cached_tokens[2]->Add(cached_.num_disk_tokens());
}

Counter* CoordinatorService::RequestsCounter(grpc::StatusCode code) {
  auto lookup = [&] {
    return options_.metrics->GetCounter(
        "strata_coordinator_requests_total", "Generate calls finished, by gRPC status.",
        {{"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(code))}});
  };
  const size_t i = static_cast<size_t>(code);
  if (i >= call_metrics_.requests.size()) return lookup();
  std::atomic<Counter*>& slot = call_metrics_.requests[i];
  Counter* c = slot.load(std::memory_order_acquire);
  if (c == nullptr) {
    // The registry returns the same series to every caller, so a race stores the same pointer.
    c = lookup();
    slot.store(c, std::memory_order_release);
  }
  return c;
}

// CoordinatorService.

CoordinatorService::CoordinatorService(WorkerPool* pool, const ModelRegistry* models,
                                       CoordinatorOptions options)
    : pool_(pool), models_(models), options_(std::move(options)), started_(absl::Now()) {
  if (options_.api_keys != nullptr) {
    options_.api_keys->SetReloadHook(
        [this](const std::shared_ptr<const ApiKeys>& keys) { RevokeCalls(keys); });
  }
  if (MetricsRegistry* m = options_.metrics; m != nullptr) {
    call_metrics_.duration = m->GetHistogram(
        "strata_coordinator_request_duration_seconds",
        "Generate calls that succeeded: acceptance to last token.", LatencyBuckets());
    call_metrics_.first_token = m->GetHistogram(
        "strata_coordinator_time_to_first_token_seconds",
        "Generate calls that succeeded: acceptance to first token.", LatencyBuckets());
    call_metrics_.per_output_token = m->GetHistogram(
        "strata_coordinator_time_per_output_token_seconds",
        "Generate calls that succeeded with two tokens or more: from the first token to the last, "
        "over the tokens after the first.",
        TokenLatencyBuckets());
    call_metrics_.prompt_tokens = m->GetCounter("strata_coordinator_prompt_tokens_total",
                                                "Prompt tokens of successful calls.");
    call_metrics_.completion_tokens = m->GetCounter("strata_coordinator_completion_tokens_total",
                                                    "Tokens generated for successful calls.");
    const char* kCached = "Prompt tokens served from the KV cache, by the tier they came from.";
    int t = 0;
    for (const char* tier : {"device", "host", "disk"}) {
      call_metrics_.cached_tokens[t++] =
          m->GetCounter("strata_coordinator_cached_prompt_tokens_total", kCached, {{"tier", tier}});
    }
    call_metrics_.kv_copy_routes = m->GetCounter(
        "strata_coordinator_kv_copy_routes_total",
        "Requests routed to a worker told to copy the prompt's KV blocks from another.");
    call_metrics_.kv_copy_blocks =
        m->GetCounter("strata_coordinator_kv_copy_blocks_total",
                      "KV blocks the router counted on workers copying from others.");
    call_metrics_.prefill_handoffs = m->GetCounter(
        "strata_coordinator_prefill_handoffs_total",
        "Requests whose prompt a prefill worker computed and a decode worker continued.");
    // Computed at each scrape; removed again when the service goes.
    m->SetGaugeCallback("strata_coordinator_inflight_requests", "Generate calls in flight now.", {},
                        [this] { return static_cast<double>(inflight_.load()); });
    for (const auto state :
         {v1::WORKER_STATE_SERVING, v1::WORKER_STATE_DRAINING, v1::WORKER_STATE_UNAVAILABLE}) {
      m->SetGaugeCallback("strata_coordinator_workers", "Workers known, by state.",
                          {{"state", v1::WorkerState_Name(state)}}, [this, state] {
                            int n = 0;
                            for (const v1::WorkerStatus& w : pool_->Status())
                              n += w.state() == state;
                            return static_cast<double>(n);
                          });
    }
  }
}

CoordinatorService::~CoordinatorService() {
  if (options_.api_keys != nullptr) options_.api_keys->SetReloadHook(nullptr);
  if (MetricsRegistry* m = options_.metrics; m != nullptr) {
    m->RemoveGaugeCallback("strata_coordinator_inflight_requests", {});
    for (const auto state :
         {v1::WORKER_STATE_SERVING, v1::WORKER_STATE_DRAINING, v1::WORKER_STATE_UNAVAILABLE}) {
      m->RemoveGaugeCallback("strata_coordinator_workers",
                             {{"state", v1::WorkerState_Name(state)}});
    }
  }
  std::list<DrainThread> threads;
  {
    absl::MutexLock lock(&threads_mu_);
    threads.swap(drain_threads_);
  }
  for (DrainThread& t : threads) t.thread.join();
}

absl::StatusOr<ModelView> CoordinatorService::Model(const std::string& name) const {
  if (models_->Find(name) == nullptr) {
    return absl::NotFoundError(absl::StrCat("model \"", name, "\" is not served here (models: ",
                                            absl::StrJoin(models_->Names(), ", "), ")"));
  }
  for (const ModelView& m : pool_->Models()) {
    if (m.name == name) return m;
  }
  ModelView m;
  m.name = name;
  return m;
}

grpc::ServerWriteReactor<v1::GenerateResponse>* CoordinatorService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto* call = new GenerateCall(this, context, request);
  call->Start();
  return call;
}

grpc::Status CoordinatorService::Caller(grpc::CallbackServerContext* context,
                                        std::shared_ptr<const ApiKeys>* keys, const Tenant** tenant,
                                        std::string* gateway_tenant) const {
  *tenant = nullptr;
  if (options_.api_keys == nullptr) return grpc::Status::OK;
  auto value = [context](const char* key) { return MetadataValue(context, key); };
  if (FromGateway(context)) {
    // The HTTP gateway, which checked the key itself.
    if (gateway_tenant != nullptr) *gateway_tenant = value(kGatewayTenantMetadata);
    return grpc::Status::OK;
  }
  *keys = options_.api_keys->Current();
  absl::StatusOr<const Tenant*> t = (*keys)->Authenticate(value("authorization"));
  if (!t.ok()) {
    TenantMetrics{options_.metrics, "grpc"}.Unauthenticated();
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        absl::StrCat(t.status().message(), " (gRPC metadata \"authorization\")"));
  }
  *tenant = *t;
  return grpc::Status::OK;
}

bool CoordinatorService::FromGateway(grpc::CallbackServerContext* context) const {
  return !options_.gateway_secret.empty() &&
         SecretsEqual(options_.gateway_secret, MetadataValue(context, kGatewaySecretMetadata));
}

grpc::Status CoordinatorService::TokenizerCaller(grpc::CallbackServerContext* context,
                                                 const std::string& model) const {
  std::shared_ptr<const ApiKeys> keys;
  const Tenant* tenant = nullptr;
  if (grpc::Status s = Caller(context, &keys, &tenant); !s.ok() || tenant == nullptr) return s;
  std::vector<std::string> fine_tunes;
  for (const ModelView& v : pool_->Models()) {
    if (v.name == model) {
      fine_tunes.insert(fine_tunes.end(), v.fine_tune_ids.begin(), v.fine_tune_ids.end());
    }
  }
  if (ApiKeys::AllowsAny(*tenant, model, fine_tunes)) return grpc::Status::OK;
  return ToGrpcStatus(ApiKeys::NotFound(model, ""));
}

grpc::Status CoordinatorService::AdminCaller(grpc::CallbackServerContext* context) const {
  std::shared_ptr<const ApiKeys> keys;
  const Tenant* tenant = nullptr;
  if (grpc::Status s = Caller(context, &keys, &tenant); !s.ok()) return s;
  if (tenant != nullptr && !tenant->admin) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        absl::StrCat("tenant \"", tenant->name,
                                     "\" may not call the Admin service (it needs \"admin\": "
                                     "true in --api_keys_file)"));
  }
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* CoordinatorService::Tokenize(grpc::CallbackServerContext* context,
                                                       const v1::TokenizeRequest* request,
                                                       v1::TokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status s = TokenizerCaller(context, request->model()); !s.ok()) {
    reactor->Finish(s);
    return reactor;
  }
  const Tokenizer* t = models_->Find(request->model());
  absl::StatusOr<ModelView> model = Model(request->model());
  if (t == nullptr || !model.ok()) {
    reactor->Finish(ToGrpcStatus(model.status()));
    return reactor;
  }
  if (request->text().size() > kMaxTextBytes) {
    reactor->Finish(Invalid("text must be at most 1 MiB"));
    return reactor;
  }
  absl::StatusOr<std::vector<int32_t>> ids =
      t->Encode(request->text(), request->add_special_tokens());
  if (!ids.ok()) {
    reactor->Finish(Invalid(absl::StrCat("text: ", ids.status().message())));
    return reactor;
  }
  response->mutable_token_ids()->Add(ids->begin(), ids->end());
  if (request->return_token_texts()) {
    for (int32_t id : *ids) response->add_token_texts(TokenText(*t, id));
  }
  response->set_max_context_tokens(model->max_context_tokens);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* CoordinatorService::Detokenize(grpc::CallbackServerContext* context,
                                                         const v1::DetokenizeRequest* request,
                                                         v1::DetokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status s = TokenizerCaller(context, request->model()); !s.ok()) {
    reactor->Finish(s);
    return reactor;
  }
  const Tokenizer* t = models_->Find(request->model());
  if (t == nullptr) {
    reactor->Finish(ToGrpcStatus(Model(request->model()).status()));
    return reactor;
  }
  if (request->token_ids_size() > kMaxDetokenizeIds) {
    reactor->Finish(Invalid("token_ids must hold at most 1048576 ids"));
    return reactor;
  }
  for (int i = 0; i < request->token_ids_size(); ++i) {
    const int32_t id = request->token_ids(i);
    if (id < 0 || id >= t->vocab_size()) {
      reactor->Finish(Invalid(absl::StrCat(
          "token_ids[", i, "] = ", id, " is outside the vocabulary [0, ", t->vocab_size(), ")")));
      return reactor;
    }
  }
  absl::StatusOr<std::string> text =
      t->Decode(absl::MakeConstSpan(request->token_ids().data(), request->token_ids_size()),
                request->skip_special_tokens());
  if (!text.ok()) {
    reactor->Finish(ToGrpcStatus(text.status()));
    return reactor;
  }
  response->set_text(*std::move(text));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* CoordinatorService::ListModels(grpc::CallbackServerContext* context,
                                                         const v1::ListModelsRequest* /*request*/,
                                                         v1::ListModelsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::shared_ptr<const ApiKeys> keys;
  const Tenant* tenant = nullptr;
  if (grpc::Status s = Caller(context, &keys, &tenant); !s.ok()) {
    reactor->Finish(s);
    return reactor;
  }
  const std::vector<ModelView> served = pool_->Models();
  for (const std::string& name : models_->Names()) {
    v1::ModelInfo* m = response->add_models();
    m->set_name(name);
    for (const ModelView& v : served) {
      if (v.name != name) continue;
      m->set_max_context_tokens(v.max_context_tokens);
      m->set_min_context_tokens(v.min_context_tokens);
      m->set_vocab_size(v.vocab_size);
      m->set_num_workers(v.num_workers);
      for (const std::string& ft : v.fine_tune_ids) {
        if (tenant != nullptr && !ApiKeys::Allows(*tenant, name, ft)) continue;
        m->add_fine_tune_ids(ft);
        const auto it = v.fine_tune_contexts.find(ft);
        m->add_fine_tune_max_context_tokens(it == v.fine_tune_contexts.end() ? v.max_context_tokens
                                            : it->second.serving > 0         ? it->second.serving
                                                                             : it->second.known);
      }
    }
    // A tenant sees a base model it may use, or one with a fine-tune it may use (listed under it,
    // alone).
    if (tenant != nullptr && m->fine_tune_ids_size() == 0 && !ApiKeys::Allows(*tenant, name, "")) {
      response->mutable_models()->RemoveLast();
      continue;
    }
    if (m->vocab_size() == 0)
      m->set_vocab_size(static_cast<uint32_t>(models_->Find(name)->vocab_size()));
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* CoordinatorService::GetClusterStatus(
    grpc::CallbackServerContext* context, const v1::GetClusterStatusRequest* /*request*/,
    v1::ClusterStatus* response) {
  if (grpc::Status s = AdminCaller(context); !s.ok()) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(s);
    return reactor;
  }
  for (v1::WorkerStatus& w : pool_->Status()) *response->add_workers() = std::move(w);
  response->set_num_inflight_requests(
      static_cast<uint32_t>(std::max<int64_t>(0, inflight_.load())));
  response->set_num_completed_requests(completed_.load());
  response->set_num_failed_over_requests(failed_over_.load());
  response->set_uptime_ms(absl::ToInt64Milliseconds(absl::Now() - started_));
  response->set_version(kStrataVersion);
  if (options_.api_keys != nullptr) {
    const std::shared_ptr<const ApiKeys> keys = options_.api_keys->Current();
    const absl::Time now = absl::Now();
    for (const auto& t : keys->tenants()) {
      v1::TenantStatus* s = response->add_tenants();
      s->set_name(t->name);
      s->set_running_requests(static_cast<uint32_t>(
          std::clamp<int64_t>(t->running->load(), 0, std::numeric_limits<uint32_t>::max())));
      s->set_max_concurrent_requests(static_cast<uint32_t>(t->max_concurrent_requests));
      s->set_peer_running_requests(static_cast<uint32_t>(
          std::clamp<int64_t>(t->peer_running->load(), 0, std::numeric_limits<uint32_t>::max())));
      s->set_requests_per_minute(static_cast<uint64_t>(t->requests_per_minute));
      s->set_tokens_per_minute(static_cast<uint64_t>(t->tokens_per_minute));
      s->set_tokens_available(ApiKeys::TokensAvailable(*t, now));
      s->set_requests_available(ApiKeys::RequestsAvailable(*t, now));
      s->set_scheduling_weight(t->scheduling_weight);
      s->set_max_priority(static_cast<int32_t>(t->max_priority));
      for (const std::string& m : t->models) s->add_models(m);
      s->set_all_models(t->all_models);
      s->set_admin(t->admin);
    }
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* CoordinatorService::GetTenantUsage(
    grpc::CallbackServerContext* context, const v1::GetTenantUsageRequest* /*request*/,
    v1::TenantUsage* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // A peer coordinator (the cluster secret), or an admin.
  const bool peer =
      options_.cluster_secret != nullptr &&
      options_.cluster_secret->Match(MetadataValue(context, kClusterSecretMetadata)) >= 0;
  if (!peer) {
    if (grpc::Status s = AdminCaller(context); !s.ok()) {
      reactor->Finish(s);
      return reactor;
    }
  }
  response->set_coordinator_id(options_.coordinator_id);
  if (options_.api_keys != nullptr) {
    for (const auto& t : options_.api_keys->Current()->tenants()) {
      v1::TenantUse* u = response->add_tenants();
      u->set_name(t->name);
      u->set_running_requests(t->running->load());
      u->set_requests_taken(ApiKeys::RequestsTaken(*t));
      u->set_tokens_taken(ApiKeys::TokensTaken(*t));
      const absl::Time now = absl::Now();
      u->set_requests_available(ApiKeys::RequestsAvailable(*t, now));
      u->set_tokens_available(ApiKeys::TokensAvailable(*t, now));
    }
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::Status CoordinatorService::RunDrain(grpc::CallbackServerContext* context,
                                          const std::string& worker, bool resume, bool wait,
                                          absl::Duration timeout,
                                          v1::DrainWorkerResponse* response) {
  const absl::Time give_up = absl::Now() + timeout;
  while (true) {
    if (context->IsCancelled()) {
      return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled while waiting");
    }
    absl::StatusOr<WorkerPool::DrainOutcome> out = pool_->Drain(worker, resume);
    if (!out.ok()) return ToGrpcStatus(out.status());
    if (!wait || out->num_inflight_sequences == 0) {
      *response->mutable_status() = std::move(out->status);
      return grpc::Status::OK;
    }
    if (absl::Now() >= give_up) {
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          absl::StrCat("worker ", worker, " still has ",
                                       out->num_inflight_sequences, " sequences in flight"));
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
}

grpc::ServerUnaryReactor* CoordinatorService::DrainWorker(grpc::CallbackServerContext* context,
                                                          const v1::DrainWorkerRequest* request,
                                                          v1::DrainWorkerResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status s = AdminCaller(context); !s.ok()) {
    reactor->Finish(s);
    return reactor;
  }
  if (request->worker().empty()) {
    reactor->Finish(Invalid("worker is required (an address or worker_id)"));
    return reactor;
  }
  if (request->timeout_ms() > 3600000) {
    reactor->Finish(Invalid("timeout_ms must be in [0, 3600000]"));
    return reactor;
  }
  // The drain RPC (and, with wait, the polling) blocks: run it off the gRPC thread.
  const std::string worker = request->worker();
  const bool resume = request->resume();
  const bool wait = request->wait() && !resume;
  const absl::Duration timeout =
      absl::Milliseconds(request->timeout_ms() == 0 ? 60000 : request->timeout_ms());
  absl::MutexLock lock(&threads_mu_);
  // Join the drains that have finished, so that repeated calls do not pile up threads.
  for (auto it = drain_threads_.begin(); it != drain_threads_.end();) {
    if (it->done.load()) {
      it->thread.join();
      it = drain_threads_.erase(it);
    } else {
      ++it;
    }
  }
  DrainThread& d = drain_threads_.emplace_back();
  d.thread = std::thread([this, context, reactor, response, worker, resume, wait, timeout, &d] {
    reactor->Finish(RunDrain(context, worker, resume, wait, timeout, response));
    d.done.store(true);
  });
  return reactor;
}

}  // namespace strata
