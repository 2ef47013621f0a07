// PeerSync: tenants held to their limits across every coordinator of a cluster, not each.
//
// A tenant's limits (--api_keys_file: max_concurrent_requests, requests_per_minute,
// tokens_per_minute) are counted by the coordinator its requests reach. With several
// coordinators behind one Service, each would let the tenant use all of them. With --peers (the
// other coordinators: a list, or a headless Service's DNS name), each coordinator asks every peer
// every --peer_sync_interval_s for what its tenants used (Admin.GetTenantUsage, with the cluster
// secret) and:
//   - charges what a peer's requests took of each rate bucket since the last answer to its own
//     buckets (ApiKeys::ChargePeerUse), so every coordinator's buckets drain with the whole
//     cluster's use;
//   - counts a peer's running requests against max_concurrent_requests (Tenant::peer_running).
// Between two answers the cluster can go past a limit by what the tenant starts in that interval
// through other coordinators (and their answers' delay); never through one. A peer that
// restarts (its coordinator_id changes) starts from its counters then, and a coordinator that
// starts has full buckets; one that stops answering for 3 intervals (at least 3 s) no longer
// counts running requests. A coordinator skips itself when a peers' name resolves to it, and
// counts a peer reached under two addresses once.
#ifndef STRATA_COORDINATOR_PEER_SYNC_H_
#define STRATA_COORDINATOR_PEER_SYNC_H_

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "common/periodic.h"
#include "common/secrets.h"
#include "common/tls.h"
#include "coordinator/api_keys.h"
#include "coordinator/discovery.h"
#include "proto/strata/v1/admin.grpc.pb.h"

namespace strata {

class PeerSync {
 public:
  struct Options {
    WorkerTargets peers;  // the same forms as --workers
    absl::Duration interval = absl::Milliseconds(500);
    std::string self_id;                    // this coordinator's TenantUsage.coordinator_id
    const ClusterSecret* secret = nullptr;  // sent to peers; required
    MetricsRegistry* metrics = nullptr;     // strata_coordinator_peer_*; may be null
    GrpcCredentials credentials;            // what calls to peers go with
  };
  PeerSync(std::shared_ptr<ApiKeyStore> keys, Options options);
  ~PeerSync();

  // Rounds every interval on a thread of its own until destroyed.
  void Start();

 private:
  // One round: resolves the peers and asks them all at once (each call bounded by Deadline).
  void SyncOnce();

  struct Peer {
    std::unique_ptr<v1::Admin::Stub> stub;
    std::string id;  // its coordinator_id, once it answered
    struct Use {
      double requests = 0;
      double tokens = 0;
      int64_t running = 0;
    };
    std::map<std::string, Use> last;  // by tenant, as it last answered
    absl::Time last_answer = absl::InfinitePast();
    bool self = false;
    bool failing = false;  // its last call failed (logged once until it answers again)
  };

  // A call's deadline, and how long a peer's running requests count after its last answer: not
  // shorter than a loaded machine needs (a short interval must not make the limits fail open).
  absl::Duration Deadline() const { return std::max(options_.interval, absl::Seconds(1)); }
  absl::Duration Stale() const { return std::max(3 * options_.interval, absl::Seconds(3)); }

  std::shared_ptr<ApiKeyStore> keys_;
  const Options options_;
  absl::Mutex mu_;                                          // held through a round (one at a time)
  std::map<std::string, Peer> peers_ ABSL_GUARDED_BY(mu_);  // by address
  std::unique_ptr<PeriodicThread> thread_;
};

}  // namespace strata

#endif  // STRATA_COORDINATOR_PEER_SYNC_H_
