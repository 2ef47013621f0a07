#include "common/metrics_http.h"

#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/log.h"

namespace strata {
namespace {

absl::Status Invalid(const std::string& listen, const std::string& why) {
  return absl::InvalidArgumentError(
      absl::StrCat("--metrics_listen \"", listen, "\" ", why, " (want HOST:PORT, e.g. [::]:9090)"));
}

// Waits until `fd` is ready for `events` or `wake_fd` is readable (the server stopping), at most
// until `deadline`. True when `fd` is ready.
bool WaitFor(int fd, short events, int wake_fd, absl::Time deadline) {
  while (true) {
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) return false;
    pollfd fds[2] = {{fd, events, 0}, {wake_fd, POLLIN, 0}};
    const int rc = ::poll(fds, 2, static_cast<int>(std::min<int64_t>(ms, 1000)));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0 || fds[1].revents != 0) return false;
    if (fds[0].revents != 0) return true;
  }
}

bool WriteAll(int fd, const std::string& data, int wake_fd, absl::Time deadline) {
  size_t done = 0;
  while (done < data.size()) {
    if (!WaitFor(fd, POLLOUT, wake_fd, deadline)) return false;
    const ssize_t n =
        ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

std::string Response(const char* status, const char* content_type, const std::string& body) {
  return absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
                      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& listen, const MetricsRegistry* registry) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) return Invalid(listen, "has no host");
  std::string host = listen.substr(0, colon);
  int port = 0;
  if (!absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return Invalid(listen, "has no port in 0-65535");
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port_text = std::to_string(port);
  if (const int rc = getaddrinfo(host.c_str(), port_text.c_str(), &hints, &res); rc != 0) {
    return Invalid(listen, absl::StrCat("does not resolve: ", gai_strerror(rc)));
  }
  UniqueFd fd;
  std::string last_error = "no address";
  for (addrinfo* ai = res; ai != nullptr && !fd.valid(); ai = ai->ai_next) {
    UniqueFd s(
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol));
    if (!s.valid()) {
      last_error = strerror(errno);
      continue;
    }
    const int one = 1, zero = 0;
    setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    // "[::]" also takes IPv4 connections.
    if (ai->ai_family == AF_INET6)
      setsockopt(s.get(), IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    if (::bind(s.get(), ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(s.get(), 16) != 0) {
      last_error = strerror(errno);
      continue;
    }
    fd = std::move(s);
  }
  freeaddrinfo(res);
  // "[::]" on a host without IPv6: every IPv4 address instead, as gRPC's own listener does.
  if (!fd.valid() && host == "::") return Start(absl::StrCat("0.0.0.0:", port), registry);
  if (!fd.valid()) {
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot listen on ", listen, ": ", last_error));
  }
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len);
  const int bound =
      ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                       : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  UniqueFd wake(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake.valid()) return absl::UnavailableError(absl::StrCat("eventfd: ", strerror(errno)));
  std::unique_ptr<MetricsHttpServer> server(
      new MetricsHttpServer(std::move(fd), std::move(wake), bound, registry));
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
    Serve(conn.get());
  }
}

void MetricsHttpServer::Serve(int fd) {
  // One deadline for the whole exchange: a client that trickles bytes in or reads slowly holds
  // the endpoint for 2 s at most, and the server's shutdown not at all.
  const absl::Time deadline = absl::Now() + absl::Seconds(2);
  const int wake = wake_fd_.get();
  std::string request;
  char buf[1024];
  while (request.find("\r\n\r\n") == std::string::npos && request.size() < 8192) {
    if (!WaitFor(fd, POLLIN, wake, deadline)) return;
    const ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return;
    request.append(buf, static_cast<size_t>(n));
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

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> StartMetricsEndpoint(
    const std::string& listen, const MetricsRegistry* registry) {
  if (listen.empty()) return nullptr;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start(listen, registry);
  if (server.ok()) {
    LOG(INFO) << "metrics at http://" << listen << "/metrics (port " << (*server)->port() << ")";
  }
  return server;
}

}  // namespace strata
