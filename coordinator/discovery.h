// Where the workers are: a static list of addresses, or a DNS name whose A/AAAA records are the
// workers (a Kubernetes headless Service), re-resolved periodically by the WorkerPool.
#ifndef STRATA_COORDINATOR_DISCOVERY_H_
#define STRATA_COORDINATOR_DISCOVERY_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace strata {

struct WorkerTargets {
  // host:port entries of a static list.
  std::vector<std::string> static_addresses;
  // For DNS discovery: the name and the port every worker listens on.
  std::string dns_name;
  int dns_port = 0;

  bool uses_dns() const { return !dns_name.empty(); }
};

// Parses a --workers value: "host:port,host:port,..." or "dns:NAME:PORT" (also "dns:///NAME:PORT").
// INVALID_ARGUMENT naming the bad entry.
absl::StatusOr<WorkerTargets> ParseWorkerTargets(absl::string_view spec);

// Every address `name` resolves to, as "ip:port" ("[ip6]:port" for IPv6), sorted and without
// duplicates. UNAVAILABLE when the name does not resolve.
absl::StatusOr<std::vector<std::string>> ResolveAll(const std::string& name, int port);

}  // namespace strata

#endif  // STRATA_COORDINATOR_DISCOVERY_H_
