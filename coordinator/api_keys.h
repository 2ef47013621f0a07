// API keys for the coordinator's APIs (strata-coordinator --api_keys_file): who may call them,
// which models and fine-tunes each tenant may use, how many of a tenant's requests may run at
// once, and the prefix cache each tenant's requests share.
//
// The file is JSON:
//   {"tenants": [
//     {"name": "acme",                          // 1 to 128 of [A-Za-z0-9._-], unique
//      "keys": ["sk-acme-...", "sk-acme-2-..."], // 16 to 256 printable ASCII characters, no
//                                               //   spaces; unique across tenants
//      "models": ["strata-tiny", "c-headers"],  // optional: the base models and fine-tunes it may
//                                               //   use (a base listed allows the base, not its
//                                               //   fine-tunes; "BASE/FINE_TUNE" binds a
//                                               //   fine-tune to one base, a fine-tune alone
//                                               //   allows it over any base); absent: all
//      "max_concurrent_requests": 8,            // optional: 0 (default) is no limit; each of a
//                                               //   request's generations (n, prompts) counts
//      "requests_per_minute": 600,              // optional: 0 (default) is no limit; a bucket
//                                               //   of a minute's requests, refilled evenly
//      "tokens_per_minute": 100000,             // optional: 0 (default) is no limit; a bucket
//                                               //   of a minute's tokens, refilled evenly: a
//                                               //   generation takes its prompt plus max_tokens
//                                               //   (at most a minute's) and gives back what it
//                                               //   did not use when it ends
//      "max_priority": 0,                       // optional, in [0, 100] (default 0): the
//                                               //   highest priority its requests may ask for
//                                               //   (priority outranks fair sharing)
//      "scheduling_weight": 2,                  // optional, in [0.001, 1000] (default 1): its
//                                               //   share of a busy worker against other
//                                               //   tenants' (fair sharing, worker/engine)
//      "isolate_cache": true,                   // optional (default true): its requests reuse
//                                               //   only its own cached prefixes
//      "admin": false}]}                        // optional: may call the Admin service (cluster
//                                               //   status, drain) over gRPC
// A request carries its key as "Authorization: Bearer KEY", as OpenAI's clients send it (over
// HTTP), or as the gRPC metadata "authorization: Bearer KEY" (stratactl: STRATA_API_KEY).
// Isolation matters because a shared prefix cache answers faster for text another tenant sent
// recently, which a tenant could time; an isolated tenant's requests get cache_salt
// "tenant:NAME" (with the request's own cache_salt after it), so they meet only its own blocks.
// A sharing tenant's own salt goes under "salt/", so it can never name an isolated tenant's.
// A model a tenant may not use answers exactly as one that does not exist, naming nothing else.
// A revoked key stops new requests at the next reload; requests already running finish.
#ifndef STRATA_COORDINATOR_API_KEYS_H_
#define STRATA_COORDINATOR_API_KEYS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "common/periodic.h"
#include "common/secrets.h"

namespace strata {

struct Tenant {
  std::string name;
  std::vector<std::string> keys;
  std::set<std::string> models;  // empty: every model
  bool all_models = true;
  int64_t max_concurrent_requests = 0;  // 0: no limit
  bool isolate_cache = true;
  bool admin = false;
  // Requests of this tenant running now (ApiKeys::Acquire); shared with the same tenant of the
  // keys a reload (ApiKeyStore) brings in.
  std::shared_ptr<std::atomic<int64_t>> running = std::make_shared<std::atomic<int64_t>>(0);
  // Its requests running through the other coordinators of the cluster, as they last told
  // (PeerSync); Acquire counts them against max_concurrent_requests too. Shared likewise.
  std::shared_ptr<std::atomic<int64_t>> peer_running = std::make_shared<std::atomic<int64_t>>(0);
  int64_t requests_per_minute = 0;  // 0: no limit
  double scheduling_weight = 1;
  int64_t max_priority = 0;
  // Its rate limit's bucket (ApiKeys::Admit), shared across reloads as `running` is.
  struct RateBucket {
    absl::Mutex mu;
    double tokens ABSL_GUARDED_BY(mu) = 0;  // may go below 0 (TokenGrant::Settle)
    bool used ABSL_GUARDED_BY(mu) = false;  // false: full at first use
    absl::Time last ABSL_GUARDED_BY(mu);
    // What this coordinator's own requests took from it since start, net of what they gave
    // back (not what peers' use charged): what its peers charge to theirs.
    double taken ABSL_GUARDED_BY(mu) = 0;
  };
  std::shared_ptr<RateBucket> bucket = std::make_shared<RateBucket>();
  int64_t tokens_per_minute = 0;  // 0: no limit
  // Its token limit's bucket (ApiKeys::TakeTokens), shared across reloads likewise.
  std::shared_ptr<RateBucket> token_bucket = std::make_shared<RateBucket>();
};

// The metadata with which the coordinator's own HTTP gateway, which checks keys itself, calls
// its in-process gRPC services: a random secret drawn at each start (NewSecret).
inline constexpr char kGatewaySecretMetadata[] = "x-strata-gateway-secret";
// Beside it, on generation calls, the tenant whose key the gateway checked (for fair sharing on
// the workers); read only from a call that carries the secret.
inline constexpr char kGatewayTenantMetadata[] = "x-strata-tenant";
// Beside it too, for the access log: the HTTP client's address and the gateway's id of the HTTP
// request the call serves.
inline constexpr char kGatewayClientMetadata[] = "x-strata-client-address";
inline constexpr char kGatewayHttpRequestMetadata[] = "x-strata-http-request";
// The wait a refusal's message names ("retry in S s", as the rate and token limits write it), in
// whole seconds rounded up, at least 1; nullopt when it names none.
std::optional<int64_t> RetryAfterSeconds(absl::string_view message);
// A tenant's name as the keys file and --tenant_header take it: 1 to 128 of [A-Za-z0-9._-].
bool ValidTenantName(absl::string_view name);

class ApiKeys {
 public:
  // INVALID_ARGUMENT naming the file and the field for a file that is not as above.
  static absl::StatusOr<std::shared_ptr<const ApiKeys>> Load(const std::string& path);
  static absl::StatusOr<std::shared_ptr<const ApiKeys>> Parse(absl::string_view json,
                                                              const std::string& origin);
  // What a tenant keeps across reloads (its running requests, its rate bucket), by tenant name:
  // Parse takes a tenant's from here when it is there, and adds the others.
  struct TenantState {
    std::shared_ptr<std::atomic<int64_t>> running;
    std::shared_ptr<std::atomic<int64_t>> peer_running;
    std::shared_ptr<Tenant::RateBucket> bucket;
    std::shared_ptr<Tenant::RateBucket> token_bucket;
  };
  using RunningCounters = std::map<std::string, TenantState>;
  static absl::StatusOr<std::shared_ptr<const ApiKeys>> Parse(absl::string_view json,
                                                              const std::string& origin,
                                                              RunningCounters* counters);

  // The tenant whose key an Authorization header's value carries ("Bearer KEY"). UNAUTHENTICATED
  // when there is none, it is not a bearer token, or no tenant has that key. Keys are compared
  // in time independent of where they differ.
  absl::StatusOr<const Tenant*> Authenticate(absl::string_view authorization) const;

  // Whether `tenant` may use `model` (a base model) with `fine_tune` (empty: the base itself): the
  // base listed, or the fine-tune listed as "MODEL/FINE_TUNE" or alone (then over any base that
  // serves a fine-tune of that name).
  static bool Allows(const Tenant& tenant, absl::string_view model, absl::string_view fine_tune);
  // Whether `tenant` may use `model` or any of its `fine_tunes` (what its tokenizer serves).
  static bool AllowsAny(const Tenant& tenant, absl::string_view model,
                        const std::vector<std::string>& fine_tunes);
  // What a tenant is told about a model it may not use, or one that does not exist: the same
  // NOT_FOUND either way, naming only what it asked for.
  static absl::Status NotFound(absl::string_view model, absl::string_view fine_tune);

  // The cache_salt a request of `tenant` runs with, given the one it asked for: an isolated
  // tenant's under "tenant:NAME", another's salt under "salt:" (so that no salt a tenant asks
  // for can be an isolated tenant's).
  static std::string CacheSalt(const Tenant& tenant, absl::string_view asked);

  // One of the tenant's concurrent requests, held until destroyed.
  class Lease {
   public:
    Lease() = default;
    Lease(std::shared_ptr<std::atomic<int64_t>> running, int64_t units)
        : running_(std::move(running)), units_(units) {}
    Lease(Lease&& o) noexcept = default;
    Lease& operator=(Lease&& o) noexcept;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease();

   private:
    std::shared_ptr<std::atomic<int64_t>> running_;  // outlives a reload of the keys
    int64_t units_ = 0;
  };
  // Whether `units` more of `tenant`'s requests fit its requests_per_minute at `now` (taking
  // them from its bucket); RESOURCE_EXHAUSTED, saying when to retry, when they do not.
  static absl::Status Admit(const Tenant& tenant, int64_t units, absl::Time now);
  // Gives back `units` Admit took for generations that never ran (refused for the tenant's
  // tokens_per_minute once their prompts were tokenized), up to a full bucket.
  static void Unadmit(const Tenant& tenant, int64_t units);
  // Whether a refusal is TakeTokens' (the tenant's tokens_per_minute).
  static bool IsTokensRefusal(const absl::Status& status);

  // Tokens a generation took from its tenant's tokens_per_minute bucket, settled when it ends.
  class TokenGrant {
   public:
    TokenGrant() = default;
    TokenGrant(std::shared_ptr<Tenant::RateBucket> bucket, int64_t per_minute, int64_t taken)
        : bucket_(std::move(bucket)), per_minute_(per_minute), taken_(taken) {}
    TokenGrant(TokenGrant&&) noexcept = default;
    TokenGrant& operator=(TokenGrant&&) noexcept = default;
    int64_t taken() const { return taken_; }
    // The generation used `used` tokens (its prompt and what it generated): what it took and did
    // not use goes back to the bucket, and what it used past that (it took at most a minute's) is
    // taken now, even below zero, to be refilled before the tenant's next request. Once only.
    void Settle(int64_t used, absl::Time now);

   private:
    std::shared_ptr<Tenant::RateBucket> bucket_;  // outlives a reload of the keys
    int64_t per_minute_ = 0;
    int64_t taken_ = 0;
  };
  // Takes `tokens` (a generation's prompt plus max_tokens; at most a minute's) from `tenant`'s
  // tokens_per_minute bucket; RESOURCE_EXHAUSTED, saying when to retry, when it does not hold
  // them. Without a limit, an empty grant.
  static absl::StatusOr<TokenGrant> TakeTokens(const Tenant& tenant, int64_t tokens,
                                               absl::Time now);
  // The tokens its tokens_per_minute bucket holds at `now` (0 without a limit); the requests its
  // requests_per_minute bucket holds likewise.
  static double TokensAvailable(const Tenant& tenant, absl::Time now);
  static double RequestsAvailable(const Tenant& tenant, absl::Time now);

  // Across coordinators (PeerSync): what this coordinator's requests took of the tenant's
  // requests_per_minute and tokens_per_minute buckets since it started, net of what they gave
  // back (0 without the limit)...
  static double RequestsTaken(const Tenant& tenant);
  static double TokensTaken(const Tenant& tenant);
  // ... and what a peer's took since it last told, charged to this coordinator's buckets (taken
  // even below zero, to be refilled; a negative amount gives back, up to a full bucket), so that
  // every coordinator's buckets drain with the whole cluster's use.
  static void ChargePeerUse(const Tenant& tenant, double requests, double tokens, absl::Time now);
  // Lowers the tenant's buckets to what a peer's hold, when they hold more (a coordinator that
  // starts, with full buckets, takes up where the cluster is).
  static void LowerToPeer(const Tenant& tenant, double requests_available, double tokens_available,
                          absl::Time now);

  // A lease on `units` of `tenant`'s concurrent requests (an HTTP request with n choices or
  // several prompts is that many generations); RESOURCE_EXHAUSTED when they would pass its
  // max_concurrent_requests.
  static absl::StatusOr<Lease> Acquire(const Tenant& tenant, int64_t units = 1);

  const std::vector<std::unique_ptr<Tenant>>& tenants() const { return tenants_; }
  // The tenant named `name`, or null.
  const Tenant* Find(absl::string_view name) const;

 private:
  std::vector<std::unique_ptr<Tenant>> tenants_;
};

// The coordinator's series per tenant, for one of its APIs ("http", "grpc"); nothing is counted
// without a registry:
//   strata_coordinator_unauthenticated_total{api}
//   strata_coordinator_tenant_requests_total{tenant,api}: requests taken (past key, model and
//     concurrency checks)
//   strata_coordinator_tenant_refused_total{tenant,api,reason}: model (one it may not use),
//     rate (past requests_per_minute) or concurrency
//   strata_coordinator_tenant_running_requests{tenant,api}
struct TenantMetrics {
  MetricsRegistry* registry = nullptr;
  const char* api = "";
  void Unauthenticated() const;
  void Refused(const Tenant& tenant, const char* reason) const;
  // A request taken: counted, and running until the returned gauge (null without a registry) is
  // given Add(-1).
  Gauge* Taken(const Tenant& tenant) const;
  // Taken's two halves, for a request that runs before it is known to be taken (the gateway's,
  // whose tokens are checked by the calls it makes): counted once past every check...
  void Counted(const Tenant& tenant) const;
  // ... and running (the gauge as Taken's) from when it starts.
  Gauge* Running(const Tenant& tenant) const;
  // The tokens of one of its generations that completed (usage as the client saw it).
  void Tokens(const Tenant& tenant, int64_t prompt, int64_t cached, int64_t completion) const;
};

// The keys in force, from a file read again whenever it changes (Watch), so that keys can be
// added, rotated and revoked without a restart (a Kubernetes Secret's mounted file changes in
// place). A file that no longer parses leaves the keys before it in force. Thread-safe.
class ApiKeyStore {
 public:
  // Reads `path`; errors as ApiKeys::Load.
  static absl::StatusOr<std::unique_ptr<ApiKeyStore>> Open(const std::string& path);
  ~ApiKeyStore();

  // The keys now; a caller keeps the pointer for as long as it uses a Tenant of them.
  std::shared_ptr<const ApiKeys> Current() const;
  // Reads the file again: OK with its keys in force (a file whose bytes did not change is not
  // parsed again), or the error, the keys before staying in force. A tenant keeps its requests
  // running (and so its concurrency) across a reload.
  absl::Status Reload();
  // Reloads every `period` on a thread of its own until destroyed, logging what changes and
  // what fails.
  void Watch(absl::Duration period);
  // Runs `hook` with the new keys after each reload that changes them (on the reloading
  // thread); null removes it. Once this returns, a hook replaced is no longer running.
  void SetReloadHook(std::function<void(const std::shared_ptr<const ApiKeys>&)> hook);

 private:
  explicit ApiKeyStore(std::string path) : path_(std::move(path)) {}

  const std::string path_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const ApiKeys> current_ ABSL_GUARDED_BY(mu_);
  std::string text_ ABSL_GUARDED_BY(mu_);
  ApiKeys::RunningCounters counters_ ABSL_GUARDED_BY(mu_);
  absl::Mutex reload_mu_;  // one Reload at a time, so that an older read never lands last
  absl::Mutex hook_mu_;    // held while the hook runs (after reload_mu_)
  std::function<void(const std::shared_ptr<const ApiKeys>&)> hook_ ABSL_GUARDED_BY(hook_mu_);
  std::unique_ptr<PeriodicThread> watcher_;
};

}  // namespace strata

#endif  // STRATA_COORDINATOR_API_KEYS_H_
