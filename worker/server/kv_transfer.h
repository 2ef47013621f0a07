// KV block copies between workers over plain TCP: the bulk path beside Worker.FetchKvBlocks.
//
// gRPC moves a copy at 0.8-1.7 GB/s over loopback on the development machine (HTTP/2 framing,
// one write in flight per stream, a serialize and a parse copy of every payload), where a plain
// socket moves 4+ GB/s. A worker therefore also listens on a TCP port of its own
// (WorkerInfo.kv_transfer_port) and answers there the same request FetchKvBlocks answers, with
// the same refusals and the same blocks; the fetcher uses it whenever the source advertises one
// and falls back to FetchKvBlocks otherwise (KvFetcher).
//
// Wire format, integers little-endian, one copy call per connection:
//   client: "STKV", u32 version (1), u32 secret length, the cluster secret (may be empty),
//           u32 request length, a serialized v1.FetchKvBlocksRequest;
//   server: any number of block frames: u8 1, u64 block hash, u64 cache namespace,
//           u64 payload length, the payload;
//           then one end frame: u8 2, u32 gRPC status code, u32 message length, the message.
// A connection that does not end with an end frame failed (the blocks before it still count).
// A client that closes its connection cancels the copy at the source.
//
// With TLS (KvTransferServerOptions::tls, KvTransferCall::UseTls: workers given --tls_cert) the
// same bytes go inside a TLS connection, mutual as the options say, after its handshake; a
// handshake that fails counts as a connection never made (the caller copies over gRPC).
//
// Threads: the server accepts on a thread of its own and serves each connection on another
// (at most max_connections at once; more are answered RESOURCE_EXHAUSTED).
#ifndef STRATA_WORKER_SERVER_KV_TRANSFER_H_
#define STRATA_WORKER_SERVER_KV_TRANSFER_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/secrets.h"
#include "common/tls_stream.h"
#include "proto/strata/v1/worker.pb.h"
#include "worker/engine/engine.h"

namespace strata {

// A block as FetchKvBlocks carries it, and back: the payload is moved, not copied.
v1::KvBlockData ToKvBlockData(Engine::KvBlockCopy copy);
Engine::KvBlockCopy FromKvBlockData(v1::KvBlockData& data);

// Where an export's blocks go (a FetchKvBlocks stream, or a KV transfer connection). The exporter
// (the worker's step loop) calls Write for each block in chain order, then Finish or Abort once;
// after that it does not touch the sink.
class KvExportSink {
 public:
  virtual ~KvExportSink() = default;
  // Queues a block to send; false when the sink has failed (the caller went away).
  virtual bool Write(Engine::KvBlockCopy copy) = 0;
  // Blocks queued and not yet sent.
  virtual size_t num_queued() = 0;
  // The caller went away or gave up.
  virtual bool cancelled() = 0;
  // Ends the copy with `status` once the queued blocks are sent.
  virtual void Finish(absl::Status status) = 0;
  // Ends it at once, dropping what is queued.
  virtual void Abort(absl::Status status) = 0;
  // Calls `wake` once, from the thread that sends, when fewer than `blocks` are queued (at once,
  // on the caller's thread, if that is so already): an exporter waiting for the network to drain
  // its sink goes on as soon as there is room. A later call replaces an earlier one.
  virtual void WakeWhenBelow(size_t blocks, std::function<void()> wake) = 0;
};

struct KvTransferServerOptions {
  // "HOST:PORT"; port 0 picks a free one.
  std::string listen_address;
  // Checked against the secret each connection sends, when set (not owned).
  const ClusterSecret* cluster_secret = nullptr;
  int max_connections = 16;
  // How long a connection may take to send its whole request.
  absl::Duration request_timeout = absl::Seconds(2);
  // Takes an authenticated request and its sink: it ends the sink (Finish or Abort) eventually,
  // at once for a request it refuses. Runs on the connection's thread.
  std::function<void(const v1::FetchKvBlocksRequest&, std::shared_ptr<KvExportSink>)> on_request;
  // TLS (mutual, as its options say): every connection's handshake before its request; null:
  // plain TCP. Not owned; it must outlive the server.
  TlsContextSource* tls = nullptr;
  // Counts a refused secret, and one of the cluster's other (older) secrets (not called when
  // unset).
  std::function<void()> on_unauthenticated;
  std::function<void()> on_other_secret;
  // Counts a TLS handshake that failed (not TLS, a certificate refused, too slow).
  std::function<void()> on_tls_failure;
};

class KvTransferServer {
 public:
  static absl::StatusOr<std::unique_ptr<KvTransferServer>> Start(KvTransferServerOptions options);
  // Stop().
  ~KvTransferServer();
  KvTransferServer(const KvTransferServer&) = delete;
  KvTransferServer& operator=(const KvTransferServer&) = delete;

  int port() const { return port_; }
  // Closes the listener and every connection (their sinks fail) and waits for the threads.
  // Idempotent.
  void Stop();
  // Connections being served now.
  int active_connections() const { return active_.load(); }

  class Connection;

 private:
  explicit KvTransferServer(KvTransferServerOptions options);
  void Accept();
  void Serve(int fd);

  const KvTransferServerOptions options_;
  int listener_ = -1;
  int port_ = 0;
  std::atomic<int> active_{0};
  std::mutex stop_mu_;  // held through Stop
  std::mutex mu_;
  bool stopped_ = false;                           // guarded by mu_
  std::vector<std::shared_ptr<Connection>> live_;  // guarded by mu_
  struct Served {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> finished;
  };
  std::vector<Served> threads_;  // guarded by mu_
  std::thread acceptor_;
};

// One copy call on the client's side: Run connects to `address` ("HOST:PORT"), sends `request`
// with `secret`, and appends the blocks that arrive to `blocks`. Returns the source's end status,
// or why the connection failed (UNAVAILABLE when it could not be made at all: nothing was sent).
// Cancel, from any thread, ends a Run in progress (CANCELLED) or makes the next one end at once.
class KvTransferCall {
 public:
  absl::Status Run(const std::string& address, const std::string& secret,
                   const v1::FetchKvBlocksRequest& request, absl::Time deadline,
                   std::vector<Engine::KvBlockCopy>* blocks);
  // The same, handing each block to `on_block` as it arrives (on the calling thread).
  absl::Status Run(const std::string& address, const std::string& secret,
                   const v1::FetchKvBlocksRequest& request, absl::Time deadline,
                   absl::FunctionRef<void(Engine::KvBlockCopy)> on_block);
  void Cancel();
  // TLS for the calls from here on (`client`, a client context: not owned, it must outlive the
  // call), checking the source's certificate against `server_name` (empty: the host dialled).
  void UseTls(TlsContextSource* client, std::string server_name) {
    tls_ = client;
    tls_server_name_ = std::move(server_name);
  }
  // Whether the last Run made its connection (when not, nothing reached the source, and the
  // caller may ask another way), and whether it was refused outright (nothing listens there: a
  // source that restarted on another port).
  bool connected() const { return connected_; }
  bool refused() const { return refused_; }

  // The most payload bytes a block frame may announce.
  static constexpr uint64_t kMaxPayloadBytes = uint64_t{1} << 30;

 private:
  std::mutex mu_;
  int fd_ = -1;             // guarded by mu_
  bool cancelled_ = false;  // guarded by mu_
  bool connected_ = false;  // Run's thread only
  bool refused_ = false;    // Run's thread only
  TlsContextSource* tls_ = nullptr;
  std::string tls_server_name_;
};

}  // namespace strata

#endif  // STRATA_WORKER_SERVER_KV_TRANSFER_H_
