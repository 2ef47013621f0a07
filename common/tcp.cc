#include "common/tcp.h"

#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace strata {
namespace {

absl::Status Invalid(absl::string_view flag, const std::string& listen, const std::string& why) {
  return absl::InvalidArgumentError(
      absl::StrCat(flag, " \"", listen, "\" ", why, " (want HOST:PORT, e.g. [::]:9090)"));
}

// HOST:PORT (brackets around an IPv6 host taken off) into its parts.
absl::Status SplitHostPort(const std::string& address, absl::string_view flag, std::string* host,
                           int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) return Invalid(flag, address, "has no host");
  *host = address.substr(0, colon);
  if (!absl::SimpleAtoi(address.substr(colon + 1), port) || *port < 0 || *port > 65535) {
    return Invalid(flag, address, "has no port in 0-65535");
  }
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ListenSocket> ListenTcp(const std::string& listen, absl::string_view flag,
                                       int backlog) {
  std::string host;
  int port = 0;
  if (absl::Status s = SplitHostPort(listen, flag, &host, &port); !s.ok()) return s;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port_text = std::to_string(port);
  if (const int rc = getaddrinfo(host.c_str(), port_text.c_str(), &hints, &res); rc != 0) {
    return Invalid(flag, listen, absl::StrCat("does not resolve: ", gai_strerror(rc)));
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
    if (::bind(s.get(), ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(s.get(), backlog) != 0) {
      last_error = strerror(errno);
      continue;
    }
    fd = std::move(s);
  }
  freeaddrinfo(res);
  // "[::]" on a host without IPv6: every IPv4 address instead, as gRPC's own listener does.
  if (!fd.valid() && host == "::") return ListenTcp(absl::StrCat("0.0.0.0:", port), flag, backlog);
  if (!fd.valid()) {
    return absl::UnavailableError(
        absl::StrCat(flag, ": cannot listen on ", listen, ": ", last_error));
  }
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len);
  ListenSocket out;
  out.port = ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                              : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  out.fd = std::move(fd);
  return out;
}

namespace {

// connect(2) on a blocking socket, carried through a signal that interrupts it (the attempt goes on
// in the kernel: wait for it, then read how it ended).
bool Connect(int fd, const sockaddr* addr, socklen_t len) {
  if (::connect(fd, addr, len) == 0) return true;
  if (errno != EINTR) return false;
  pollfd p{fd, POLLOUT, 0};
  while (::poll(&p, 1, -1) < 0) {
    if (errno != EINTR) return false;
  }
  int error = 0;
  socklen_t size = sizeof error;
  return ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size) == 0 && error == 0;
}

}  // namespace

UniqueFd ConnectTcp(const std::string& target) {
  std::string host;
  int port = 0;
  if (!SplitHostPort(target, "address", &host, &port).ok()) return UniqueFd();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) {
    return UniqueFd();
  }
  UniqueFd fd;
  for (addrinfo* ai = res; ai != nullptr && !fd.valid(); ai = ai->ai_next) {
    UniqueFd s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (s.valid() && Connect(s.get(), ai->ai_addr, ai->ai_addrlen)) fd = std::move(s);
  }
  freeaddrinfo(res);
  return fd;
}

bool WaitFor(int fd, short events, int wake_fd, absl::Time deadline) {
  while (true) {
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) return false;
    pollfd fds[2] = {{fd, events, 0}, {wake_fd, POLLIN, 0}};
    const int rc = ::poll(fds, wake_fd >= 0 ? 2 : 1, static_cast<int>(std::min<int64_t>(ms, 1000)));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0 || (wake_fd >= 0 && fds[1].revents != 0)) return false;
    if (fds[0].revents != 0) return true;
  }
}

bool RecvSome(int fd, std::string* out, int wake_fd, absl::Time deadline) {
  char buf[16384];
  while (WaitFor(fd, POLLIN, wake_fd, deadline)) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return false;
    out->append(buf, static_cast<size_t>(n));
    return true;
  }
  return false;
}

bool WriteAll(int fd, absl::string_view data, int wake_fd, absl::Time deadline) {
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

bool WriteAllPaced(int fd, absl::string_view data, int wake_fd, absl::Duration slice_timeout) {
  for (size_t at = 0; at < data.size(); at += kWriteSliceBytes) {
    if (!WriteAll(fd, data.substr(at, kWriteSliceBytes), wake_fd, absl::Now() + slice_timeout)) {
      return false;
    }
  }
  return true;
}

}  // namespace strata
