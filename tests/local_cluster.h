// LocalCluster: a coordinator and N workers as real processes on loopback, serving the bundled
// strata-tiny model, for end-to-end tests and benchmarks. Every process picks its own port
// (--listen 127.0.0.1:0 with --port_file), so tests can run in parallel; the destructor stops them
// all, and they die with the test process if it crashes.
#ifndef STRATA_TESTS_LOCAL_CLUSTER_H_
#define STRATA_TESTS_LOCAL_CLUSTER_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/tls.h"
#include "grpcpp/grpcpp.h"
#include "proto/strata/v1/admin.grpc.pb.h"
#include "proto/strata/v1/serving.grpc.pb.h"
#include "proto/strata/v1/worker.grpc.pb.h"
#include "tests/process.h"

namespace strata {

inline constexpr char kTinyModel[] = "strata-tiny";
inline constexpr char kTinyModelDir[] = "models/strata-tiny/base";

// Copies the bundled LoRA adapter (models/strata-tiny/lora-c-headers) into `dir` (made), a PEFT
// adapter directory that a worker's --fine_tune_dir serves under the directory's name.
void CopyBundledLoraAdapter(const std::string& dir);

struct LocalClusterOptions {
  int num_workers = 2;
  // Extra flags for every worker (with "{i}" replaced by the worker's index) / for the
  // coordinator.
  std::vector<std::string> worker_flags;
  std::vector<std::string> coordinator_flags;
  // More flags for worker i (after worker_flags), where given.
  std::vector<std::vector<std::string>> per_worker_flags;
  // Start a coordinator (false: workers only).
  bool coordinator = true;
  std::string name = "cluster";
  // For a coordinator with --api_keys_file: an admin tenant's key, for the status calls that wait
  // for the workers.
  std::string admin_api_key;
  // What the test's own stubs (serving(), admin(), worker(i)) call with: TLS for a cluster started
  // with TLS flags.
  GrpcCredentials credentials;
};

class LocalCluster {
 public:
  // Starts the workers, then the coordinator, and waits until the coordinator routes to every
  // worker.
  static absl::StatusOr<std::unique_ptr<LocalCluster>> Start(LocalClusterOptions options);
  ~LocalCluster();

  v1::Serving::Stub* serving() { return serving_.get(); }
  v1::Admin::Stub* admin() { return admin_.get(); }
  v1::Worker::Stub* worker(int i) { return workers_[i].stub.get(); }
  ChildProcess& worker_process(int i) { return workers_[i].process; }
  // The coordinator Start began with.
  ChildProcess& coordinator_process() { return coordinators_.front(); }
  const std::string& worker_address(int i) const { return workers_[i].address; }
  const std::string& coordinator_address() const { return coordinator_address_; }
  int num_workers() const { return static_cast<int>(workers_.size()); }
  std::string workers_flag() const;
  // Kills worker `i` (SIGKILL) and starts it again with the same flags on the same address.
  absl::Status RestartWorker(int i);

  // Starts another coordinator over the same workers (different flags), returning its address.
  absl::StatusOr<std::string> StartExtraCoordinator(const std::vector<std::string>& flags,
                                                    const std::string& name);
  // Waits until the coordinator at `address` reports `n` serving workers.
  absl::Status WaitForServingWorkers(v1::Admin::Stub* admin, int n, absl::Duration timeout);

 private:
  struct Worker {
    ChildProcess process;
    std::vector<std::string> flags;
    int restarts = 0;
    std::string address;
    std::unique_ptr<v1::Worker::Stub> stub;
  };
  LocalCluster() = default;

  LocalClusterOptions options_;
  std::vector<Worker> workers_;
  std::vector<ChildProcess> coordinators_;
  std::string coordinator_address_;
  std::unique_ptr<v1::Serving::Stub> serving_;
  std::unique_ptr<v1::Admin::Stub> admin_;
};

// The path of a binary in the test's runfiles.
inline constexpr char kWorkerBinary[] = "worker/server/strata-worker";
inline constexpr char kCoordinatorBinary[] = "coordinator/strata-coordinator";

// Starts one process of `binary` with `flags` plus --listen 127.0.0.1:0 and a port file; returns it
// with its address once it serves.
absl::StatusOr<std::pair<ChildProcess, std::string>> StartServer(const std::string& binary,
                                                                 std::vector<std::string> flags,
                                                                 const std::string& name);

}  // namespace strata

#endif  // STRATA_TESTS_LOCAL_CLUSTER_H_
