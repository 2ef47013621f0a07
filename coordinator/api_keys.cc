#include "coordinator/api_keys.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/hash.h"
#include "common/json.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"

namespace strata {
namespace {

constexpr size_t kMaxCacheSaltBytes = 256;  // as the coordinator and workers take it
// In TakeTokens' refusals, by which IsTokensRefusal knows them.
constexpr char kOverTokensPerMinute[] = "is over its tokens_per_minute";

}  // namespace

absl::StatusOr<std::shared_ptr<const ApiKeys>> ApiKeys::Load(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return Parse(text, path);
}

absl::StatusOr<std::shared_ptr<const ApiKeys>> ApiKeys::Parse(absl::string_view json,
                                                              const std::string& origin) {
  RunningCounters counters;
  return Parse(json, origin, &counters);
}

absl::StatusOr<std::shared_ptr<const ApiKeys>> ApiKeys::Parse(absl::string_view json,
                                                              const std::string& origin,
                                                              RunningCounters* counters) {
  ASSIGN_OR_RETURN(JsonDocument doc, JsonDocument::Parse(json, origin));
  ASSIGN_OR_RETURN(JsonValue list, doc.root().Field("tenants"));
  ASSIGN_OR_RETURN(std::vector<JsonValue> tenants, list.AsArray());
  if (tenants.empty()) return list.Error("must list at least one tenant");
  auto keys = std::make_shared<ApiKeys>();
  absl::flat_hash_set<std::string> names, seen_keys;
  for (const JsonValue& t : tenants) {
    ASSIGN_OR_RETURN(auto members, t.AsObject());
    for (const auto& [key, value] : members) {
      if (key != "name" && key != "keys" && key != "models" && key != "max_concurrent_requests" &&
          key != "isolate_cache" && key != "admin" && key != "requests_per_minute" &&
          key != "scheduling_weight" && key != "tokens_per_minute" && key != "max_priority") {
        return t.Error(absl::StrCat("has \"", key,
                                    "\": a tenant takes name, keys, models, "
                                    "max_concurrent_requests, requests_per_minute, "
                                    "tokens_per_minute, max_priority, scheduling_weight, "
                                    "isolate_cache and admin"));
      }
    }
    auto tenant = std::make_unique<Tenant>();
    ASSIGN_OR_RETURN(JsonValue name, t.Field("name"));
    ASSIGN_OR_RETURN(absl::string_view n, name.AsString());
    if (!ValidTenantName(n)) return name.Error("must be 1 to 128 of [A-Za-z0-9._-]");
    if (!names.insert(std::string(n)).second) return name.Error("names a tenant twice");
    tenant->name = std::string(n);
    ASSIGN_OR_RETURN(JsonValue key_list, t.Field("keys"));
    ASSIGN_OR_RETURN(std::vector<JsonValue> key_values, key_list.AsArray());
    if (key_values.empty()) return key_list.Error("must list at least one key");
    for (const JsonValue& k : key_values) {
      ASSIGN_OR_RETURN(absl::string_view key, k.AsString());
      if (!ValidSecret(key)) {
        return k.Error("must be 16 to 256 printable ASCII characters without spaces");
      }
      if (!seen_keys.insert(std::string(key)).second) return k.Error("is given twice");
      tenant->keys.emplace_back(key);
    }
    if (std::optional<JsonValue> models = t.FindField("models")) {
      ASSIGN_OR_RETURN(std::vector<JsonValue> model_values, models->AsArray());
      tenant->all_models = false;
      for (const JsonValue& m : model_values) {
        ASSIGN_OR_RETURN(absl::string_view model, m.AsString());
        if (model.empty()) return m.Error("must not be empty");
        tenant->models.emplace(model);
      }
    }
    ASSIGN_OR_RETURN(tenant->max_concurrent_requests, t.IntFieldOr("max_concurrent_requests", 0));
    if (tenant->max_concurrent_requests < 0 || tenant->max_concurrent_requests > 1000000) {
      return t.Error("has max_concurrent_requests outside [0, 1000000] (0: no limit)");
    }
    ASSIGN_OR_RETURN(tenant->isolate_cache, t.BoolFieldOr("isolate_cache", true));
    ASSIGN_OR_RETURN(tenant->admin, t.BoolFieldOr("admin", false));
    ASSIGN_OR_RETURN(tenant->requests_per_minute, t.IntFieldOr("requests_per_minute", 0));
    if (tenant->requests_per_minute < 0 || tenant->requests_per_minute > 100000000) {
      return t.Error("has requests_per_minute outside [0, 100000000] (0: no limit)");
    }
    ASSIGN_OR_RETURN(tenant->tokens_per_minute, t.IntFieldOr("tokens_per_minute", 0));
    if (tenant->tokens_per_minute < 0 || tenant->tokens_per_minute > 10000000000) {
      return t.Error("has tokens_per_minute outside [0, 10000000000] (0: no limit)");
    }
    ASSIGN_OR_RETURN(tenant->max_priority, t.IntFieldOr("max_priority", 0));
    // (Not below 0, the priority of every request that sets none.)
    if (tenant->max_priority < 0 || tenant->max_priority > 100) {
      return t.Error("has max_priority outside [0, 100] (default 0)");
    }
    ASSIGN_OR_RETURN(tenant->scheduling_weight, t.DoubleFieldOr("scheduling_weight", 1));
    if (!(tenant->scheduling_weight >= 0.001 && tenant->scheduling_weight <= 1000)) {
      return t.Error("has scheduling_weight outside [0.001, 1000] (default 1)");
    }
    keys->tenants_.push_back(std::move(tenant));
  }
  // Only a file that parsed whole touches the counters.
  for (auto& tenant : keys->tenants_) {
    auto [it, added] = counters->emplace(
        tenant->name,
        TenantState{tenant->running, tenant->peer_running, tenant->bucket, tenant->token_bucket});
    if (!added) {
      tenant->running = it->second.running;
      tenant->peer_running = it->second.peer_running;
      tenant->bucket = it->second.bucket;
      tenant->token_bucket = it->second.token_bucket;
    }
  }
  return std::shared_ptr<const ApiKeys>(std::move(keys));
}

bool ValidTenantName(absl::string_view s) {
  if (s.empty() || s.size() > 128) return false;
  for (char c : s) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

std::optional<int64_t> RetryAfterSeconds(absl::string_view message) {
  const size_t at = message.find("retry in ");
  if (at == absl::string_view::npos) return std::nullopt;
  absl::string_view rest = message.substr(at + 9);
  const size_t end = rest.find(" s");
  double seconds = 0;
  if (end == absl::string_view::npos || !absl::SimpleAtod(rest.substr(0, end), &seconds) ||
      !(seconds >= 0 && seconds < 1e9)) {
    return std::nullopt;
  }
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(seconds)));
}

const Tenant* ApiKeys::Find(absl::string_view name) const {
  for (const auto& t : tenants_) {
    if (t->name == name) return t.get();
  }
  return nullptr;
}

absl::StatusOr<const Tenant*> ApiKeys::Authenticate(absl::string_view authorization) const {
  authorization = absl::StripAsciiWhitespace(authorization);
  if (authorization.empty()) {
    return absl::UnauthenticatedError(
        "no API key: send it as the header \"Authorization: Bearer KEY\"");
  }
  if (authorization.size() < 7 || !absl::EqualsIgnoreCase(authorization.substr(0, 7), "bearer ")) {
    return absl::UnauthenticatedError(
        "the Authorization header must be \"Bearer KEY\" (an API key)");
  }
  const absl::string_view key = absl::StripAsciiWhitespace(authorization.substr(7));
  // Every key is compared, whichever matches.
  const Tenant* found = nullptr;
  for (const auto& t : tenants_) {
    for (const std::string& k : t->keys) {
      if (SecretsEqual(k, key) && found == nullptr) found = t.get();
    }
  }
  if (found == nullptr) return absl::UnauthenticatedError("the API key is not valid");
  return found;
}

bool ApiKeys::Allows(const Tenant& tenant, absl::string_view model, absl::string_view fine_tune) {
  if (tenant.all_models) return true;
  if (fine_tune.empty()) return tenant.models.count(std::string(model)) > 0;
  return tenant.models.count(std::string(fine_tune)) > 0 ||
         tenant.models.count(absl::StrCat(model, "/", fine_tune)) > 0;
}

bool ApiKeys::AllowsAny(const Tenant& tenant, absl::string_view model,
                        const std::vector<std::string>& fine_tunes) {
  if (Allows(tenant, model, "")) return true;
  for (const std::string& ft : fine_tunes) {
    if (Allows(tenant, model, ft)) return true;
  }
  return false;
}

absl::Status ApiKeys::NotFound(absl::string_view model, absl::string_view fine_tune) {
  return absl::NotFoundError(absl::StrCat("model \"", fine_tune.empty() ? model : fine_tune,
                                          "\" does not exist or this API key may not use it"));
}

std::string ApiKeys::CacheSalt(const Tenant& tenant, absl::string_view asked) {
  // (Empty for a tenant that shares: the cache of every request without a salt.)
  if (!tenant.isolate_cache && asked.empty()) return "";
  const std::string prefix =
      tenant.isolate_cache ? absl::StrCat("tenant:", tenant.name) : std::string("salt");
  if (asked.empty()) return prefix;
  std::string salt = absl::StrCat(prefix, "/", asked);
  // Within the 256 bytes a salt may have: a long one the request may give (up to 256) stands
  // as its hash, after "#" (which no salt written after "/" can be mistaken for). One over 256
  // stays too long, refused as the request's.
  if (salt.size() > kMaxCacheSaltBytes && asked.size() <= kMaxCacheSaltBytes) {
    salt = absl::StrCat(prefix, "#", absl::Hex(Hash64(asked), absl::kZeroPad16));
  }
  return salt;
}

ApiKeys::Lease& ApiKeys::Lease::operator=(Lease&& o) noexcept {
  if (this != &o) {
    if (running_ != nullptr) running_->fetch_sub(units_);
    running_ = std::move(o.running_);
    units_ = o.units_;
    o.running_ = nullptr;
  }
  return *this;
}

ApiKeys::Lease::~Lease() {
  if (running_ != nullptr) running_->fetch_sub(units_);
}

namespace {

// Brings `b` up to `now` at `per_minute` a minute, full at first use.
void Refill(Tenant::RateBucket& b, int64_t per_minute, absl::Time now)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(b.mu) {
  const double capacity = static_cast<double>(per_minute);
  if (!b.used) {
    b.tokens = capacity;
    b.used = true;
  } else if (now > b.last) {
    b.tokens = std::min(capacity, b.tokens + absl::ToDoubleSeconds(now - b.last) * capacity / 60);
  }
  b.last = std::max(b.last, now);
}

}  // namespace

absl::Status ApiKeys::Admit(const Tenant& tenant, int64_t units, absl::Time now) {
  const int64_t rpm = tenant.requests_per_minute;
  if (rpm <= 0) return absl::OkStatus();
  if (units > rpm) {
    return absl::ResourceExhaustedError(
        absl::StrCat("this request is ", units, " generations, over tenant \"", tenant.name,
                     "\"'s requests_per_minute (", rpm, "): ask for fewer choices"));
  }
  Tenant::RateBucket& b = *tenant.bucket;
  absl::MutexLock lock(&b.mu);
  const double per_second = static_cast<double>(rpm) / 60.0;
  Refill(b, rpm, now);
  if (b.tokens < static_cast<double>(units)) {
    const double wait_s = (static_cast<double>(units) - b.tokens) / per_second;
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant \"", tenant.name, "\" is over its requests_per_minute (", rpm,
                     "): retry in ", absl::StrFormat("%.1f", wait_s), " s"));
  }
  b.tokens -= static_cast<double>(units);
  b.taken += static_cast<double>(units);
  return absl::OkStatus();
}

void ApiKeys::Unadmit(const Tenant& tenant, int64_t units) {
  const int64_t rpm = tenant.requests_per_minute;
  if (rpm <= 0 || units <= 0) return;
  Tenant::RateBucket& b = *tenant.bucket;
  absl::MutexLock lock(&b.mu);
  b.tokens = std::min(static_cast<double>(rpm), b.tokens + static_cast<double>(units));
  b.taken -= static_cast<double>(units);
}

namespace {

double Taken(Tenant::RateBucket& b) {
  absl::MutexLock lock(&b.mu);
  return b.taken;
}

// Charges `amount` a peer took (or, negative, gave back) to `b`.
void Charge(Tenant::RateBucket& b, int64_t per_minute, double amount, absl::Time now) {
  if (per_minute <= 0 || amount == 0) return;
  absl::MutexLock lock(&b.mu);
  Refill(b, per_minute, now);
  // At most a minute's debt: a burst of peers' use locks a tenant out for a minute, not longer.
  b.tokens = std::clamp(b.tokens - amount, -static_cast<double>(per_minute),
                        static_cast<double>(per_minute));
}

// Lowers `b` to `level` when it holds more.
void Lower(Tenant::RateBucket& b, int64_t per_minute, double level, absl::Time now) {
  if (per_minute <= 0) return;
  absl::MutexLock lock(&b.mu);
  Refill(b, per_minute, now);
  b.tokens = std::min(b.tokens, std::max(level, -static_cast<double>(per_minute)));
}

}  // namespace

void ApiKeys::LowerToPeer(const Tenant& tenant, double requests_available, double tokens_available,
                          absl::Time now) {
  Lower(*tenant.bucket, tenant.requests_per_minute, requests_available, now);
  Lower(*tenant.token_bucket, tenant.tokens_per_minute, tokens_available, now);
}

double ApiKeys::RequestsTaken(const Tenant& tenant) { return Taken(*tenant.bucket); }
double ApiKeys::TokensTaken(const Tenant& tenant) { return Taken(*tenant.token_bucket); }

void ApiKeys::ChargePeerUse(const Tenant& tenant, double requests, double tokens, absl::Time now) {
  Charge(*tenant.bucket, tenant.requests_per_minute, requests, now);
  Charge(*tenant.token_bucket, tenant.tokens_per_minute, tokens, now);
}

bool ApiKeys::IsTokensRefusal(const absl::Status& status) {
  return absl::IsResourceExhausted(status) &&
         absl::StrContains(status.message(), kOverTokensPerMinute);
}

absl::StatusOr<ApiKeys::TokenGrant> ApiKeys::TakeTokens(const Tenant& tenant, int64_t tokens,
                                                        absl::Time now) {
  const int64_t tpm = tenant.tokens_per_minute;
  if (tpm <= 0) return TokenGrant();
  const int64_t take = std::min(tokens, tpm);
  Tenant::RateBucket& b = *tenant.token_bucket;
  absl::MutexLock lock(&b.mu);
  Refill(b, tpm, now);
  if (b.tokens < static_cast<double>(take)) {
    const double wait_s = (static_cast<double>(take) - b.tokens) * 60 / static_cast<double>(tpm);
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant \"", tenant.name, "\" ", kOverTokensPerMinute, " (", tpm, "): this request takes ",
        take, " tokens (its prompt plus max_tokens", tokens > tpm ? ", at most a minute's" : "",
        "); retry in ", absl::StrFormat("%.1f", wait_s), " s"));
  }
  b.tokens -= static_cast<double>(take);
  b.taken += static_cast<double>(take);
  return TokenGrant(tenant.token_bucket, tpm, take);
}

namespace {

// What `b` holds at `now` (0 without a limit).
double Available(Tenant::RateBucket& b, int64_t per_minute, absl::Time now) {
  if (per_minute <= 0) return 0;
  absl::MutexLock lock(&b.mu);
  Refill(b, per_minute, now);
  return b.tokens;
}

}  // namespace

double ApiKeys::RequestsAvailable(const Tenant& tenant, absl::Time now) {
  return Available(*tenant.bucket, tenant.requests_per_minute, now);
}

double ApiKeys::TokensAvailable(const Tenant& tenant, absl::Time now) {
  return Available(*tenant.token_bucket, tenant.tokens_per_minute, now);
}

void ApiKeys::TokenGrant::Settle(int64_t used, absl::Time now) {
  if (bucket_ == nullptr) return;
  {
    absl::MutexLock lock(&bucket_->mu);
    Refill(*bucket_, per_minute_, now);
    bucket_->tokens = std::min(static_cast<double>(per_minute_),
                               bucket_->tokens + static_cast<double>(taken_ - used));
    bucket_->taken -= static_cast<double>(taken_ - used);
  }
  bucket_ = nullptr;
}

absl::StatusOr<ApiKeys::Lease> ApiKeys::Acquire(const Tenant& tenant, int64_t units) {
  const int64_t limit = tenant.max_concurrent_requests;
  if (limit > 0 && units > limit) {
    return absl::ResourceExhaustedError(
        absl::StrCat("this request is ", units, " generations, over tenant \"", tenant.name,
                     "\"'s max_concurrent_requests (", limit, "): ask for fewer choices"));
  }
  // (Its requests through the other coordinators count as they last told; between their reports
  // the cluster may run a few more than the limit, never this coordinator alone.)
  const int64_t elsewhere = limit > 0 ? std::max<int64_t>(0, tenant.peer_running->load()) : 0;
  int64_t now = tenant.running->load();
  do {
    if (limit > 0 && now + elsewhere + units > limit) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "tenant \"", tenant.name, "\" has ", now + elsewhere, " requests running",
          elsewhere > 0 ? absl::StrCat(" (", elsewhere, " through other coordinators)") : "",
          " and ", limit, " may (max_concurrent_requests): retry when one ends"));
    }
  } while (!tenant.running->compare_exchange_weak(now, now + units));
  return Lease(tenant.running, units);
}

void TenantMetrics::Unauthenticated() const {
  if (registry == nullptr) return;
  registry
      ->GetCounter("strata_coordinator_unauthenticated_total",
                   "Calls refused for a missing or unknown API key, by API.", {{"api", api}})
      ->Add();
}

void TenantMetrics::Refused(const Tenant& tenant, const char* reason) const {
  if (registry == nullptr) return;
  registry
      ->GetCounter("strata_coordinator_tenant_refused_total",
                   "Requests refused by tenant, API and reason: model (one the tenant may not "
                   "use), rate (past its requests_per_minute), concurrency (past its "
                   "max_concurrent_requests) or tokens (past its tokens_per_minute).",
                   {{"tenant", tenant.name}, {"api", api}, {"reason", reason}})
      ->Add();
}

Gauge* TenantMetrics::Taken(const Tenant& tenant) const {
  Counted(tenant);
  return Running(tenant);
}

void TenantMetrics::Counted(const Tenant& tenant) const {
  if (registry == nullptr) return;
  registry
      ->GetCounter("strata_coordinator_tenant_requests_total",
                   "Requests taken by tenant and API: past the key, model, rate, concurrency and "
                   "token checks (a request refused is counted in "
                   "strata_coordinator_tenant_refused_total instead).",
                   {{"tenant", tenant.name}, {"api", api}})
      ->Add();
}

Gauge* TenantMetrics::Running(const Tenant& tenant) const {
  if (registry == nullptr) return nullptr;
  Gauge* running = registry->GetGauge("strata_coordinator_tenant_running_requests",
                                      "Requests of the tenant running now, by API.",
                                      {{"tenant", tenant.name}, {"api", api}});
  running->Add(1);
  return running;
}

void TenantMetrics::Tokens(const Tenant& tenant, int64_t prompt, int64_t cached,
                           int64_t completion) const {
  if (registry == nullptr) return;
  const char* kHelp =
      "Tokens of a tenant's completed generations by API: prompt, the part of it found in the "
      "prefix cache (cached_prompt), and completion.";
  using Count = std::pair<const char*, int64_t>;
  for (auto [kind, n] :
       {Count{"prompt", prompt}, Count{"cached_prompt", cached}, Count{"completion", completion}}) {
    registry
        ->GetCounter("strata_coordinator_tenant_tokens_total", kHelp,
                     {{"tenant", tenant.name}, {"api", api}, {"kind", kind}})
        ->Add(static_cast<double>(n));
  }
}

absl::StatusOr<std::unique_ptr<ApiKeyStore>> ApiKeyStore::Open(const std::string& path) {
  std::unique_ptr<ApiKeyStore> store(new ApiKeyStore(path));
  RETURN_IF_ERROR(store->Reload());
  return store;
}

ApiKeyStore::~ApiKeyStore() { watcher_.reset(); }  // before the members it reads go

std::shared_ptr<const ApiKeys> ApiKeyStore::Current() const {
  absl::MutexLock lock(&mu_);
  return current_;
}

absl::Status ApiKeyStore::Reload() {
  absl::MutexLock reloading(&reload_mu_);
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path_));
  std::shared_ptr<const ApiKeys> changed;
  {
    absl::MutexLock lock(&mu_);
    if (current_ != nullptr && text == text_) return absl::OkStatus();
    const bool first = current_ == nullptr;
    ASSIGN_OR_RETURN(current_, ApiKeys::Parse(text, path_, &counters_));
    text_ = std::move(text);
    if (!first) changed = current_;
  }
  if (changed != nullptr) {
    absl::MutexLock lock(&hook_mu_);
    if (hook_) hook_(changed);
  }
  return absl::OkStatus();
}

void ApiKeyStore::SetReloadHook(std::function<void(const std::shared_ptr<const ApiKeys>&)> hook) {
  absl::MutexLock lock(&hook_mu_);
  hook_ = std::move(hook);
}

void ApiKeyStore::Watch(absl::Duration period) {
  if (watcher_ != nullptr) return;  // watched already
  watcher_ = std::make_unique<PeriodicThread>(period, [this] {
    const std::shared_ptr<const ApiKeys> before = Current();
    if (absl::Status s = Reload(); !s.ok()) {
      LOG(WARNING) << "API keys: " << path_ << " not reloaded, the keys before stay: " << s;
    } else if (Current() != before) {
      LOG(INFO) << "API keys reloaded from " << path_ << ": " << Current()->tenants().size()
                << " tenant(s)";
    }
  });
}

}  // namespace strata
