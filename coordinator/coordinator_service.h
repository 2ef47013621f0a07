// The coordinator's gRPC services: strata.v1.Serving (what clients call) and strata.v1.Admin (what
// operators call), over a WorkerPool.
//
// The life of a Generate call (GenerateCall in the .cc file):
//   validate -> tokenize -> hash the prompt's blocks -> admit (bounded) -> route
//   (WorkerPool::Assign)
//   -> attempt: a Submit stream to the worker -> tokens are detokenized incrementally, checked for
//   stop strings and streamed to the client -> finish.
//
// Failover protocol. The coordinator keeps every token a worker has sent for the request, whether
// or not its text has reached the client yet (text may be held back for an incomplete character or
// a possible stop string). If the attempt fails with a retryable status (the worker died:
// UNAVAILABLE; it is draining: FAILED_PRECONDITION; it is full: RESOURCE_EXHAUSTED; ...), the
// request is submitted to another worker with those tokens as resume_token_ids and the same seed.
// Sampling is a pure function of (seed, position, logits), so the new worker continues exactly
// where the first stopped; token positions (first_token_index) let the coordinator drop anything
// it already has, so the client sees no gap and no duplicate. Before the first token this is a
// plain retry. Each worker is tried at most once per request.
//
// Cancellation. When the client cancels, disconnects or its deadline passes, the coordinator
// cancels the worker stream, which frees the sequence's KV blocks on the worker at once. The
// client's deadline is also set on the worker stream.
#ifndef STRATA_COORDINATOR_COORDINATOR_SERVICE_H_
#define STRATA_COORDINATOR_COORDINATOR_SERVICE_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "coordinator/access_log.h"
#include "coordinator/api_keys.h"
#include "coordinator/worker_pool.h"
#include "grammar/structured_output.h"
#include "proto/strata/v1/admin.grpc.pb.h"
#include "proto/strata/v1/serving.grpc.pb.h"
#include "tokenizer/tokenizer.h"

namespace strata {

struct CoordinatorOptions {
  // Generate calls accepted and not finished; beyond it Generate fails RESOURCE_EXHAUSTED.
  int64_t max_inflight_requests = 1024;
  // Workers tried per request, counting the first.
  int max_attempts = 4;
  // Prefix of the request ids the coordinator uses towards workers (unique per coordinator).
  std::string instance_id = "coord";
  // Where Generate calls are counted and timed (strata_coordinator_*), or null. Not owned; it must
  // outlive the service.
  MetricsRegistry* metrics = nullptr;
  // With API keys (--api_keys_file), every call but the HTTP gateway's (which checks keys itself
  // and sends gateway_secret as kGatewaySecretMetadata) carries a tenant's key as "authorization:
  // Bearer KEY" metadata (UNAUTHENTICATED otherwise); Generate keeps the tenant to its models
  // (NOT_FOUND, as for one that does not exist), its concurrent requests (RESOURCE_EXHAUSTED) and
  // its cache; ListModels lists what it may use; the Admin service wants a tenant with admin
  // (PERMISSION_DENIED).
  std::shared_ptr<ApiKeyStore> api_keys;
  std::string gateway_secret;
  // Without API keys: the gRPC metadata (and, through the HTTP gateway, the header) that names a
  // request's tenant for fair sharing on the workers, set by a trusted proxy in front (lowercase;
  // empty: none). Its value: 1 to 128 of [A-Za-z0-9._-] (INVALID_ARGUMENT naming it otherwise);
  // absent: the one tenant of every request without.
  std::string tenant_header;
  // Where each Generate call is logged when it ends (--access_log), or null. Not owned.
  AccessLog* access_log = nullptr;
  // The cluster secret (--cluster_secret_file), or null: a call carrying it may ask for the
  // tenants' use (GetTenantUsage, for peer coordinators). Not owned.
  const ClusterSecret* cluster_secret = nullptr;
  // TenantUsage.coordinator_id: random, drawn at each start.
  std::string coordinator_id;
};

// The models this coordinator serves: their names and tokenizers. Context length and vocabulary
// size come from the workers that serve them.
class ModelRegistry {
 public:
  // Each spec is NAME=DIR, DIR holding tokenizer.json (and optionally tokenizer_config.json).
  static absl::StatusOr<std::unique_ptr<ModelRegistry>> Load(const std::vector<std::string>& specs);
  const Tokenizer* Find(const std::string& name) const;
  std::vector<std::string> Names() const;

 private:
  std::map<std::string, std::unique_ptr<Tokenizer>> tokenizers_;
};

class CoordinatorService final : public v1::Serving::CallbackService,
                                 public v1::Admin::CallbackService {
 public:
  // `pool` and `models` are not owned and must outlive the service.
  CoordinatorService(WorkerPool* pool, const ModelRegistry* models, CoordinatorOptions options);
  ~CoordinatorService() override;

  // strata.v1.Serving.
  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* response) override;

  // strata.v1.Admin.
  grpc::ServerUnaryReactor* GetClusterStatus(grpc::CallbackServerContext* context,
                                             const v1::GetClusterStatusRequest* request,
                                             v1::ClusterStatus* response) override;
  grpc::ServerUnaryReactor* DrainWorker(grpc::CallbackServerContext* context,
                                        const v1::DrainWorkerRequest* request,
                                        v1::DrainWorkerResponse* response) override;
  grpc::ServerUnaryReactor* GetTenantUsage(grpc::CallbackServerContext* context,
                                           const v1::GetTenantUsageRequest* request,
                                           v1::TenantUsage* response) override;

  int64_t num_inflight() const { return inflight_.load(); }

  class GenerateCall;

 private:
  friend class GenerateCall;

  // Who makes the call: *tenant null without API keys or for the HTTP gateway, else the tenant
  // whose key it carries, of *keys (the keys in force, which the caller holds while it uses the
  // tenant); UNAUTHENTICATED when it carries none that is valid. For the gateway,
  // *gateway_tenant (when asked for) is the tenant it names (kGatewayTenantMetadata).
  grpc::Status Caller(grpc::CallbackServerContext* context, std::shared_ptr<const ApiKeys>* keys,
                      const Tenant** tenant, std::string* gateway_tenant = nullptr) const;
  // Whether the call comes from the HTTP gateway (it carries gateway_secret).
  bool FromGateway(grpc::CallbackServerContext* context) const;
  // Caller, for `model`'s tokenizer: a tenant may use it when it may use the model or one of its
  // fine-tunes (NOT_FOUND otherwise, as for a model that does not exist).
  grpc::Status TokenizerCaller(grpc::CallbackServerContext* context,
                               const std::string& model) const;
  // Caller, and PERMISSION_DENIED for a tenant that is not an admin.
  grpc::Status AdminCaller(grpc::CallbackServerContext* context) const;

  // One DrainWorker call: drains (or resumes) `worker` and, with `wait`, polls until it is idle.
  grpc::Status RunDrain(grpc::CallbackServerContext* context, const std::string& worker,
                        bool resume, bool wait, absl::Duration timeout,
                        v1::DrainWorkerResponse* response);

  // The model's limits as its workers report them; NOT_FOUND for a model not in the registry.
  absl::StatusOr<ModelView> Model(const std::string& name) const;

  // The series every finished call updates, looked up once (a registry lookup takes its mutex):
  // by gRPC status code as each first occurs, the rest at construction. Null without metrics.
  struct CallMetrics {
    // By grpc::StatusCode, OK (0) to UNAUTHENTICATED (16).
    std::array<std::atomic<Counter*>, grpc::StatusCode::UNAUTHENTICATED + 1> requests{};
    Histogram* duration = nullptr;
    Histogram* first_token = nullptr;
    Histogram* per_output_token = nullptr;
    Counter* prompt_tokens = nullptr;
    Counter* completion_tokens = nullptr;
    std::array<Counter*, 3> cached_tokens{};  // device, host, disk
    // Attempts routed with a KV source (WorkerPool::Assignment::kv_source_address), and the blocks
    // counted on.
    Counter* kv_copy_routes = nullptr;
    Counter* kv_copy_blocks = nullptr;
    Counter* prefill_handoffs = nullptr;
  };
  Counter* RequestsCounter(grpc::StatusCode code);

  WorkerPool* const pool_;
  const ModelRegistry* const models_;
  const CoordinatorOptions options_;
  CallMetrics call_metrics_;
  const absl::Time started_;
  std::atomic<int64_t> inflight_{0};
  std::atomic<uint64_t> next_id_{1};
  // Calls made with an API key, so that a reload that revokes the key can end them.
  absl::Mutex keyed_mu_;
  absl::flat_hash_set<GenerateCall*> keyed_calls_ ABSL_GUARDED_BY(keyed_mu_);
  // Ends the keyed calls whose key `keys` no longer holds (for their tenant): UNAUTHENTICATED.
  void RevokeCalls(const std::shared_ptr<const ApiKeys>& keys);
  std::atomic<uint64_t> completed_{0};
  std::atomic<uint64_t> failed_over_{0};
  // Structured-output grammars, compiled to check requests before they are routed (a schema the
  // workers would refuse is refused here, once).
  GrammarCache grammars_{256};
  // Admin DrainWorker calls run on their own threads (the RPC to the worker, and with wait the
  // polling, block); finished ones are joined on the next call, the rest on destruction.
  struct DrainThread {
    std::thread thread;
    std::atomic<bool> done{false};
  };
  absl::Mutex threads_mu_;
  std::list<DrainThread> drain_threads_ ABSL_GUARDED_BY(threads_mu_);
};

}  // namespace strata

#endif  // STRATA_COORDINATOR_COORDINATOR_SERVICE_H_
