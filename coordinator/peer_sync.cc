#include "coordinator/peer_sync.h"

#include <utility>

#include "absl/synchronization/blocking_counter.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "grpcpp/grpcpp.h"

namespace strata {

PeerSync::PeerSync(std::shared_ptr<ApiKeyStore> keys, Options options)
    : keys_(std::move(keys)), options_(std::move(options)) {}

PeerSync::~PeerSync() { thread_.reset(); }

void PeerSync::Start() {
  thread_ = std::make_unique<PeriodicThread>(options_.interval, [this] { SyncOnce(); });
}

void PeerSync::SyncOnce() {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> addresses = options_.peers.static_addresses;
  if (options_.peers.uses_dns()) {
    absl::StatusOr<std::vector<std::string>> resolved =
        ResolveAll(options_.peers.dns_name, options_.peers.dns_port);
    if (!resolved.ok()) {
      // Keep the peers known: a DNS hiccup must not lift the limits.
      LOG(WARNING) << "--peers: " << resolved.status();
      addresses.clear();
      for (const auto& [address, peer] : peers_) addresses.push_back(address);
    } else {
      addresses = *std::move(resolved);
    }
  }
  std::map<std::string, Peer> kept;
  for (const std::string& address : addresses) {
    auto it = peers_.find(address);
    if (it != peers_.end()) {
      kept.emplace(address, std::move(it->second));
      continue;
    }
    Peer p;
    p.stub = v1::Admin::NewStub(options_.credentials.NewChannel(address));
    kept.emplace(address, std::move(p));
  }
  peers_ = std::move(kept);

  // Every peer at once (a silent one costs the round one interval, not one each).
  struct Call {
    grpc::ClientContext ctx;
    v1::GetTenantUsageRequest request;
    v1::TenantUsage usage;
    grpc::Status status;
  };
  std::map<std::string, std::unique_ptr<Call>> calls;
  for (auto& [address, peer] : peers_) {
    if (!peer.self) calls.emplace(address, std::make_unique<Call>());
  }
  absl::BlockingCounter pending(static_cast<int>(calls.size()));
  const std::string secret = options_.secret != nullptr ? options_.secret->Sent() : "";
  for (auto& [address, call] : calls) {
    Call* c = call.get();
    c->ctx.set_deadline(absl::ToChronoTime(absl::Now() + Deadline()));
    if (!secret.empty()) c->ctx.AddMetadata(kClusterSecretMetadata, secret);
    peers_.at(address).stub->async()->GetTenantUsage(&c->ctx, &c->request, &c->usage,
                                                     [c, &pending](grpc::Status s) {
                                                       c->status = std::move(s);
                                                       pending.DecrementCount();
                                                     });
  }
  pending.Wait();

  const std::shared_ptr<const ApiKeys> keys = keys_->Current();
  int answered = 0;
  // The address each peer answered under this round: a peer under two addresses counts once.
  std::map<std::string, std::string> counted;
  for (auto& [address, call] : calls) {
    Peer& peer = peers_.at(address);
    const grpc::Status& s = call->status;
    const v1::TenantUsage& usage = call->usage;
    const absl::Time now = absl::Now();
    if (!s.ok()) {
      if (!peer.failing) {
        LOG(WARNING) << "peer coordinator " << address
                     << " does not answer for its tenants' use: " << s.error_message();
      }
      peer.failing = true;
      if (options_.metrics != nullptr) {
        options_.metrics
            ->GetCounter("strata_coordinator_peer_sync_failures_total",
                         "Calls to a peer coordinator (--peers) for its tenants' use that failed.")
            ->Add();
      }
      continue;
    }
    if (peer.failing) LOG(INFO) << "peer coordinator " << address << " answers again";
    peer.failing = false;
    if (usage.coordinator_id() == options_.self_id) {
      peer.self = true;  // this coordinator, under the peers' name
      continue;
    }
    if (!counted.emplace(usage.coordinator_id(), address).second) {
      peer.id = usage.coordinator_id();  // another address of a peer counted: forgotten below
      continue;
    }
    ++answered;
    // A peer seen for the first time, or restarted, counts from its counters now.
    const bool known = peer.id == usage.coordinator_id();
    peer.id = usage.coordinator_id();
    // Tenants the answer leaves out (not in the peer's keys just now) keep their baselines: its
    // counters carry on by name, and a tenant back in its keys must not be charged its whole
    // history at once. Their running requests are none.
    std::map<std::string, Peer::Use> use = known ? peer.last : std::map<std::string, Peer::Use>();
    for (auto& [name, u] : use) u.running = 0;
    for (const v1::TenantUse& t : usage.tenants()) {
      Peer::Use& u = use[t.name()];
      u.requests = t.requests_taken();
      u.tokens = t.tokens_taken();
      u.running = t.running_requests();
      const Tenant* tenant = keys->Find(t.name());
      if (tenant == nullptr) continue;
      if (!known) {
        // A baseline, not a charge; but no more left here than there (this coordinator may
        // have just started, with full buckets).
        ApiKeys::LowerToPeer(*tenant, t.requests_available(), t.tokens_available(), now);
        continue;
      }
      const auto b = peer.last.find(t.name());
      const Peer::Use before = b == peer.last.end() ? Peer::Use() : b->second;
      ApiKeys::ChargePeerUse(*tenant, u.requests - before.requests, u.tokens - before.tokens, now);
    }
    peer.last = std::move(use);
    peer.last_answer = now;
  }
  // A peer counted under one address forgets what it told under any other (one that failed this
  // round included), so that neither charges nor running requests count twice.
  for (auto& [address, peer] : peers_) {
    auto it = counted.find(peer.id);
    if (!peer.id.empty() && it != counted.end() && it->second != address) {
      peer.last.clear();
      peer.id.clear();
    }
  }
  // Running requests elsewhere: those of the peers that answered lately.
  const absl::Time now = absl::Now();
  std::map<std::string, int64_t> running;
  for (const auto& [address, peer] : peers_) {
    if (peer.self || now - peer.last_answer > Stale()) continue;
    for (const auto& [name, u] : peer.last) running[name] += u.running;
  }
  for (const auto& t : keys->tenants()) {
    auto it = running.find(t->name);
    t->peer_running->store(it == running.end() ? 0 : it->second);
  }
  if (options_.metrics != nullptr) {
    options_.metrics
        ->GetGauge("strata_coordinator_peers",
                   "Peer coordinators (--peers) that answered the last round for their tenants' "
                   "use.")
        ->Set(answered);
  }
}

}  // namespace strata
