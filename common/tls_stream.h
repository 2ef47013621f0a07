// TLS for the servers' own HTTP endpoints (the coordinator's OpenAI-compatible API): a TLS
// connection, once its handshake is done, is carried over a local socket pair, so that a server
// written for plain sockets serves it unchanged.
//
//   TlsAcceptor: the server's TLS context (certificate chain and key from TlsOptions, TLS 1.2 or
//     later, ALPN "http/1.1"), made again when the files change (looked at no more often than
//     TlsOptions::reload_interval), so certificates rotate without a restart. Thread-safe.
//   TlsBridge: one accepted connection. Accept does the handshake on the calling thread, then a
//     thread of the bridge's own moves bytes both ways between the TLS connection and a socket
//     pair; the server reads and writes `fd()` as it would the client's socket. Closes pass
//     through both ways: the client closing (or vanishing) reads as the end of `fd()`'s input
//     (POLLRDHUP), and `fd()` shut for writing or closed sends the client TLS's close_notify.
//     Once the server is done (close_notify sent, or the bridge destroyed), the pump delivers
//     what is left for at most 2 s more: a client that stopped reading does not hold the
//     server's connection thread.
//
// A record of the HTTP traffic costs one more copy through the kernel, which the small requests
// and token streams of the HTTP API do not notice; KV bytes never take this path.
#ifndef STRATA_COMMON_TLS_STREAM_H_
#define STRATA_COMMON_TLS_STREAM_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/tls.h"
#include "common/unique_fd.h"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct bio_st BIO;
typedef struct ssl_st SSL;

namespace strata {

// A BIO for an SSL on the socket `fd` (not owned) whose writes never raise SIGPIPE (OpenSSL's own
// socket BIO writes with write(2): a peer gone before a write would kill the process). Reads and
// writes retry (BIO_should_retry) on EAGAIN, for non-blocking sockets and sockets with timeouts.
// With `read_deadline_ns` (absl::GetCurrentTimeNanos() time; not owned, it must outlive the BIO),
// a read past it is not made and retries instead, so that blocking reads under SO_RCVTIMEO keep
// to a deadline even against a peer that trickles bytes. Give it to SSL_set_bio.
BIO* NewSocketBioWithoutSigpipe(int fd, const std::atomic<int64_t>* read_deadline_ns = nullptr);

class TlsBridge;
struct TlsBridgeFactory;

enum class TlsRole { kServer, kClient };

// An OpenSSL context made from TlsOptions for one role, made again when the files change (looked
// at no more often than options.reload_interval); files that do not pass (a key beside a
// certificate it does not belong to: half replaced) leave the context before in use. TLS 1.2 or
// later; SSL_write may take part of a buffer.
//   server: presents the certificate chain and key; asks clients for certificates as
//           options.client_auth says, verified by options.ca_file; with alpn_http11, selects
//           "http/1.1" when the client offers it.
//   client: verifies servers by options.ca_file (or the system's CA certificates); presents the
//           certificate and key when given. (The name to check is set per connection.)
// Thread-safe.
class TlsContextSource {
 public:
  // INVALID_ARGUMENT naming the flag when the files cannot be used (CheckTlsFiles); a server
  // needs options.cert_file.
  static absl::StatusOr<std::unique_ptr<TlsContextSource>> Create(const TlsOptions& options,
                                                                  TlsRole role,
                                                                  bool alpn_http11 = false);
  ~TlsContextSource();
  TlsContextSource(const TlsContextSource&) = delete;
  TlsContextSource& operator=(const TlsContextSource&) = delete;

  // The context for a new connection, made again first when the files changed.
  std::shared_ptr<SSL_CTX> Get() ABSL_LOCKS_EXCLUDED(mu_);
  const TlsOptions& options() const { return options_; }

 private:
  TlsContextSource(TlsOptions options, TlsRole role, bool alpn_http11);

  const TlsOptions options_;
  const TlsRole role_;
  const bool alpn_http11_;
  absl::Mutex mu_;
  std::shared_ptr<SSL_CTX> context_ ABSL_GUARDED_BY(mu_);
  std::string stamp_ ABSL_GUARDED_BY(mu_);  // the files' sizes and times when it was made
  absl::Time checked_ ABSL_GUARDED_BY(mu_);
};

class TlsAcceptor {
 public:
  // INVALID_ARGUMENT naming the flag when the certificate or key cannot be used (CheckTlsFiles);
  // options.cert_file must be set.
  static absl::StatusOr<std::unique_ptr<TlsAcceptor>> Create(const TlsOptions& options);
  ~TlsAcceptor();
  TlsAcceptor(const TlsAcceptor&) = delete;
  TlsAcceptor& operator=(const TlsAcceptor&) = delete;

  // The TLS handshake on `conn` (an accepted socket; made non-blocking), by `deadline` and cut
  // short when `wake_fd` (-1: none) turns readable. UNAVAILABLE when the client does not complete
  // it (not TLS, a certificate it refuses, gone, too slow).
  absl::StatusOr<std::unique_ptr<TlsBridge>> Accept(UniqueFd conn, int wake_fd,
                                                    absl::Time deadline);

 private:
  explicit TlsAcceptor(std::unique_ptr<TlsContextSource> source);

  const std::unique_ptr<TlsContextSource> source_;
};

// Makes a client's `ssl` check the server's certificate against `name`: an address against the
// certificate's IP addresses (and sent as no SNI, which names hosts only), a name against its DNS
// names (and sent as SNI). INVALID_ARGUMENT when OpenSSL takes neither.
absl::Status CheckServerName(SSL* ssl, const std::string& name);

// The client's side of the same: the TLS handshake on the connected socket `conn` (checking the
// server's certificate against `client`'s CA and `server_name`, a DNS name or an address), by
// `deadline`; then a bridge as Accept's. UNAVAILABLE when the handshake fails.
absl::StatusOr<std::unique_ptr<TlsBridge>> TlsConnect(TlsContextSource& client, UniqueFd conn,
                                                      const std::string& server_name,
                                                      absl::Time deadline);

// One TLS connection carried over a socket pair (above). Owned by the server's connection thread;
// the bridge's thread ends when either side closes, the client fails, or `wake_fd` turns readable.
class TlsBridge {
 public:
  ~TlsBridge();  // closes fd() if still open, and joins the thread
  TlsBridge(const TlsBridge&) = delete;
  TlsBridge& operator=(const TlsBridge&) = delete;

  // The server's end: a blocking, close-on-exec stream socket.
  int fd() const { return local_.get(); }
  // The TLS version and cipher the handshake agreed on ("TLSv1.3 TLS_AES_256_GCM_SHA384").
  const std::string& protocol() const { return protocol_; }

 private:
  friend struct TlsBridgeFactory;
  TlsBridge() = default;

  UniqueFd local_;
  UniqueFd done_;  // an eventfd: written when the bridge goes, so the pump finishes in time
  std::string protocol_;
  std::thread thread_;
};

}  // namespace strata

#endif  // STRATA_COMMON_TLS_STREAM_H_
