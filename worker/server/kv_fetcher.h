// KvFetcher: copies KV blocks from other workers (their Worker.FetchKvBlocks), for requests that a
// coordinator sent here with SubmitRequest.kv_source_address: the prefix another worker has
// computed is copied rather than computed again.
//
// Each Fetch runs on one of the fetcher's own threads (blocking reads), never on the worker's
// step loop, and asks the source in calls of up to max_bytes_per_call until it has every block
// asked for or the source has no more. A call goes over the source's KV transfer port (plain TCP,
// worker/server/kv_transfer.h) when its WorkerInfo names one (asked once per address with
// GetInfo, again after that port fails to connect), over FetchKvBlocks otherwise. One channel per
// source address is kept (the least recently used dropped past kMaxChannels). Calls carry the
// cluster secret (the first of the file's) and stop at `timeout` after the Fetch began.
//
// Thread contract: Fetch and Stop from any thread. `done` runs exactly once per Fetch, on a
// fetcher thread (or on the caller's, with CANCELLED, after Stop), never under the fetcher's lock.
#ifndef STRATA_WORKER_SERVER_KV_FETCHER_H_
#define STRATA_WORKER_SERVER_KV_FETCHER_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/secrets.h"
#include "common/tls.h"
#include "grpcpp/grpcpp.h"
#include "proto/strata/v1/worker.grpc.pb.h"
#include "worker/engine/engine.h"
#include "worker/server/kv_transfer.h"

namespace strata {

struct KvFetcherOptions {
  // Sent with every call when set (not owned; it must outlive the fetcher).
  const ClusterSecret* cluster_secret = nullptr;
  // Longest a Fetch takes, all its calls together, counted from Fetch (waiting in the queue
  // included: a fetch still queued at its deadline, or within a tenth of the timeout of it, ends
  // DEADLINE_EXCEEDED without a call).
  absl::Duration timeout = absl::Seconds(2);
  // Fetches run at once; more wait in order.
  int threads = 2;
  // FetchKvBlocksRequest.max_bytes of each call.
  int64_t max_bytes_per_call = int64_t{1} << 30;
  // Use a source's KV transfer port when it has one.
  bool use_kv_transfer = true;
  // What the calls to other workers go with: TLS when the worker serves TLS.
  GrpcCredentials credentials;
  // TLS on the KV transfer port (a client context: not owned, it must outlive the fetcher), the
  // source's certificate checked against transfer_server_name (empty: the host dialled). With
  // TLS `credentials` and no transfer_tls the port is never used (no plaintext beside TLS).
  TlsContextSource* transfer_tls = nullptr;
  std::string transfer_server_name;
  // A Fetch given a Part callback hands the blocks over in parts of at least this many bytes as
  // they arrive (the rest with `done`), so that they can be stored while more come.
  int64_t part_bytes = int64_t{8} << 20;
};

// What one Fetch copied: blocks in chain order (those not handed over in parts before), and how
// long it took. `status` is not OK when a call failed; the blocks before the failure are still
// there.
struct KvFetchResult {
  std::vector<Engine::KvBlockCopy> blocks;
  absl::Status status;
  absl::Duration took;
  int64_t calls = 0;
  // Payload bytes that arrived.
  int64_t bytes = 0;
  // Of those, the calls made over a KV transfer port, and the payload bytes they brought.
  int64_t transfer_calls = 0;
  int64_t transfer_bytes = 0;
};

class KvFetcher {
 public:
  using Done = absl::AnyInvocable<void(KvFetchResult) &&>;
  // Consecutive blocks of the chain, in order, before `done` (on a fetcher thread).
  using Part = absl::AnyInvocable<void(std::vector<Engine::KvBlockCopy>)>;

  explicit KvFetcher(KvFetcherOptions options);
  // Stop().
  ~KvFetcher();
  KvFetcher(const KvFetcher&) = delete;
  KvFetcher& operator=(const KvFetcher&) = delete;

  // Copies from the worker at `address` the blocks `request` names (block_hashes, with its model,
  // fingerprint and layout set by the caller; max_bytes is the fetcher's). Returns a ticket for
  // Cancel.
  // With `part`, the blocks arrive through it in parts (KvFetcherOptions::part_bytes), and
  // `done`'s result holds only the last ones.
  uint64_t Fetch(std::string address, v1::FetchKvBlocksRequest request, Done done,
                 Part part = nullptr);
  // Ends a Fetch early (its request went away): its call is cancelled, or it is not started;
  // `done` still runs, with the blocks copied so far and CANCELLED. A finished one is left alone.
  void Cancel(uint64_t ticket);
  // Cancels the calls in flight, finishes the queued fetches with CANCELLED and waits for the
  // threads. Idempotent; later Fetches finish with CANCELLED at once.
  void Stop();

  static constexpr size_t kMaxChannels = 64;

 private:
  struct Job {
    uint64_t ticket = 0;
    std::string address;
    v1::FetchKvBlocksRequest request;
    Done done;
    Part part;
    // From Fetch: time in the queue counts against the timeout too.
    absl::Time queued;
    absl::Time deadline;
  };
  void Run();
  // Runs `job`'s calls (it takes their request's hashes as it goes).
  KvFetchResult Copy(Job& job);
  std::shared_ptr<v1::Worker::Stub> StubFor(const std::string& address);
  // "HOST:PORT" of the KV transfer port of the worker at `address` (gRPC), or empty when it has
  // none or did not say (remembered per address for kTransferAddressTtl, or until Forget).
  // (The question is cancellable as the copy is: `ticket`.)
  std::string TransferAddressFor(uint64_t ticket, const std::string& address,
                                 v1::Worker::Stub& stub, absl::Time deadline);
  // Copies from `address` go over gRPC: until the next copy asks GetInfo again (ask_again), or
  // for kTransferAddressTtl.
  void ForgetTransferAddress(const std::string& address, bool ask_again);
  // What Cancel interrupts for a running fetch: its gRPC call or its TCP call.
  struct Active {
    grpc::ClientContext* context = nullptr;
    KvTransferCall* call = nullptr;
  };

  const KvFetcherOptions options_;
  // (std:: primitives, which TSAN sees, unlike Debian's uninstrumented absl::Mutex.)
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;                         // guarded by mu_
  bool stop_ = false;                             // guarded by mu_
  uint64_t next_ticket_ = 1;                      // guarded by mu_
  absl::flat_hash_map<uint64_t, Active> active_;  // guarded by mu_: running fetches
  absl::flat_hash_set<uint64_t> cancelled_;       // guarded by mu_: of those
  // Channels by address, most recently used first (guarded by mu_).
  std::list<std::pair<std::string, std::shared_ptr<v1::Worker::Stub>>> stubs_;
  // KV transfer addresses by gRPC address ("" for none, GetInfo failed, or the port could not be
  // reached), and when they were asked; guarded by mu_; at most kMaxChannels. Asked again after
  // kTransferAddressTtl.
  struct TransferAddress {
    std::string address;
    absl::Time asked;
  };
  absl::flat_hash_map<std::string, TransferAddress> transfer_addresses_;
  static constexpr absl::Duration kTransferAddressTtl = absl::Seconds(60);
  std::vector<std::thread> threads_;
};

}  // namespace strata

#endif  // STRATA_WORKER_SERVER_KV_FETCHER_H_
