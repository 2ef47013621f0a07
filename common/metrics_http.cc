#include "common/metrics_http.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/log.h"
#include "common/tcp.h"

namespace strata {
namespace {

std::string Response(const char* status, const char* content_type, const std::string& body) {
  return absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
                      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& listen, const MetricsRegistry* registry, TlsAcceptor* tls) {
  absl::StatusOr<ListenSocket> socket = ListenTcp(listen, "--metrics_listen", 16);
  if (!socket.ok()) return socket.status();
  UniqueFd fd = std::move(socket->fd);
  const int bound = socket->port;
  UniqueFd wake(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake.valid()) return absl::UnavailableError(absl::StrCat("eventfd: ", strerror(errno)));
  std::unique_ptr<MetricsHttpServer> server(
      new MetricsHttpServer(std::move(fd), std::move(wake), bound, registry));
  server->tls_ = tls;
  server->thread_ = std::thread([s = server.get()] { s->Loop(); });
  return server;
}

MetricsHttpServer::MetricsHttpServer(UniqueFd listen_fd, UniqueFd wake_fd, int port,
                                     const MetricsRegistry* registry)
    : listen_fd_(std::move(listen_fd)),
      wake_fd_(std::move(wake_fd)),
      port_(port),
      registry_(registry) {}

MetricsHttpServer::~MetricsHttpServer() {
  const uint64_t one = 1;
  if (::write(wake_fd_.get(), &one, sizeof(one)) != sizeof(one)) {
    LOG(ERROR) << "metrics: cannot wake the server thread: " << strerror(errno);
  }
  if (thread_.joinable()) thread_.join();
}

void MetricsHttpServer::Loop() {
  while (true) {
    pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {wake_fd_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      LOG(ERROR) << "metrics: poll: " << strerror(errno);
      return;
    }
    if (fds[1].revents != 0) return;
    if ((fds[0].revents & POLLIN) == 0) continue;
    UniqueFd conn(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn.valid()) {
      // The client gave up, or descriptors ran out: back off a little instead of spinning.
      if (errno != EAGAIN && errno != ECONNABORTED && errno != EINTR) {
        pollfd wake = {wake_fd_.get(), POLLIN, 0};
        ::poll(&wake, 1, 100);
      }
      continue;
    }
    Serve(std::move(conn));
  }
}

void MetricsHttpServer::Serve(UniqueFd conn) {
  // One deadline for the whole exchange: a client that trickles bytes in or reads slowly holds
  // the endpoint for 2 s at most, and the server's shutdown not at all.
  const absl::Time deadline = absl::Now() + absl::Seconds(2);
  const int wake = wake_fd_.get();
  int fd = conn.get();
  std::unique_ptr<TlsBridge> bridge;  // HTTPS: the exchange over the bridge, closed last
  if (tls_ != nullptr) {
    absl::StatusOr<std::unique_ptr<TlsBridge>> accepted =
        tls_->Accept(std::move(conn), wake, deadline);
    if (!accepted.ok()) return;
    bridge = *std::move(accepted);
    fd = bridge->fd();
  }
  std::string request;
  while (request.find("\r\n\r\n") == std::string::npos && request.size() < 8192) {
    if (!RecvSome(fd, &request, wake, deadline)) return;
  }
  const std::string line = request.substr(0, request.find("\r\n"));
  const std::vector<std::string> parts = absl::StrSplit(line, ' ');
  std::string response;
  if (parts.size() != 3) {
    response = Response("400 Bad Request", "text/plain", "bad request line\n");
  } else if (parts[0] != "GET" && parts[0] != "HEAD") {
    response = Response("405 Method Not Allowed", "text/plain", "GET /metrics\n");
  } else if (parts[1].substr(0, parts[1].find('?')) != "/metrics") {
    response = Response("404 Not Found", "text/plain", "GET /metrics\n");
  } else {
    response = Response("200 OK", "text/plain; version=0.0.4; charset=utf-8", registry_->Render());
    if (parts[0] == "HEAD") response.resize(response.find("\r\n\r\n") + 4);
  }
  WriteAll(fd, response, wake, deadline);
}

absl::StatusOr<std::unique_ptr<TlsAcceptor>> MetricsTls(bool enabled, const TlsOptions& tls) {
  if (!enabled) return nullptr;
  TlsOptions o = tls;
  o.client_auth = TlsClientAuth::kNone;
  absl::StatusOr<std::unique_ptr<TlsAcceptor>> acceptor = TlsAcceptor::Create(o);
  if (!acceptor.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics_tls: ", acceptor.status().message()));
  }
  return acceptor;
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> StartMetricsEndpoint(
    const std::string& listen, const MetricsRegistry* registry, TlsAcceptor* tls) {
  if (listen.empty()) return nullptr;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start(listen, registry, tls);
  if (server.ok()) {
    LOG(INFO) << "metrics at " << (tls != nullptr ? "https://" : "http://") << listen
              << "/metrics (port " << (*server)->port() << ")";
  }
  return server;
}

}  // namespace strata
