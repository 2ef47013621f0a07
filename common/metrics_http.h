// MetricsHttpServer: serves a MetricsRegistry over plain HTTP for Prometheus to scrape:
// GET /metrics answers the registry's text exposition; any other path is 404, any other method 405.
// One request per connection (Connection: close), handled one at a time on the server's own
// thread, each exchange within 2 s: a stuck or trickling client delays scrapes by 2 s at most,
// never the server that owns the registry, and never shutdown.
#ifndef STRATA_COMMON_METRICS_HTTP_H_
#define STRATA_COMMON_METRICS_HTTP_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/metrics.h"
#include "common/tls_stream.h"
#include "common/unique_fd.h"

namespace strata {

class MetricsHttpServer {
 public:
  // Listens on `listen`, host:port: "[::]:9090" (every address, IPv6 and IPv4), "0.0.0.0:9090",
  // "127.0.0.1:0" (port 0 picks one). INVALID_ARGUMENT naming --metrics_listen for a malformed
  // address; UNAVAILABLE when it cannot bind. `registry` must outlive the server.
  // With `tls` (not owned; it must outlive the server), HTTPS: each connection's handshake and
  // exchange within the same 2 s.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& listen,
                                                                  const MetricsRegistry* registry,
                                                                  TlsAcceptor* tls = nullptr);
  // Stops accepting and joins the thread.
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }

 private:
  MetricsHttpServer(UniqueFd listen_fd, UniqueFd wake_fd, int port,
                    const MetricsRegistry* registry);
  void Loop();
  void Serve(UniqueFd conn);

  UniqueFd listen_fd_;
  UniqueFd wake_fd_;  // an eventfd: written to stop the loop
  const int port_;
  const MetricsRegistry* registry_;
  TlsAcceptor* tls_ = nullptr;
  std::thread thread_;
};

// For a server's main: with `enabled` (its --metrics_tls), the acceptor that serves the metrics
// over HTTPS with `tls`'s certificate (no client certificate asked for: a scraper authenticates
// the server, not itself); null when not enabled. INVALID_ARGUMENT naming --metrics_tls when there
// is no certificate to serve with.
absl::StatusOr<std::unique_ptr<TlsAcceptor>> MetricsTls(bool enabled, const TlsOptions& tls);

// For a server's main: null when `listen` is empty (metrics off), else the started endpoint, its
// address logged.
absl::StatusOr<std::unique_ptr<MetricsHttpServer>> StartMetricsEndpoint(
    const std::string& listen, const MetricsRegistry* registry, TlsAcceptor* tls = nullptr);

}  // namespace strata

#endif  // STRATA_COMMON_METRICS_HTTP_H_
