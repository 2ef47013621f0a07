// Plain TCP for the servers' small HTTP endpoints (metrics, the OpenAI-compatible API) and their
// clients: a listening socket from a HOST:PORT flag, a connected one, and waits and writes bounded
// by a deadline and interrupted by a wake descriptor (an eventfd the server writes to when it
// stops).
#ifndef STRATA_COMMON_TCP_H_
#define STRATA_COMMON_TCP_H_

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/unique_fd.h"

namespace strata {

struct ListenSocket {
  UniqueFd fd;   // non-blocking, close-on-exec
  int port = 0;  // the port bound (the chosen one for port 0)
};

// Listens on `listen`, host:port: "[::]:9090" (every address, IPv6 and IPv4; every IPv4 address
// on a host without IPv6), "0.0.0.0:9090", "127.0.0.1:0" (port 0 picks one). INVALID_ARGUMENT
// naming `flag` (e.g. "--metrics_listen") for a malformed address; UNAVAILABLE when it cannot
// bind.
absl::StatusOr<ListenSocket> ListenTcp(const std::string& listen, absl::string_view flag,
                                       int backlog);

// A blocking socket connected to `target` (HOST:PORT, [V6]:PORT), close-on-exec, for clients
// (loadgen, tests); not valid when the address is malformed or nothing answers. A signal during
// the connect does not fail it.
UniqueFd ConnectTcp(const std::string& target);

// Waits until `fd` is ready for `events` (POLLIN, POLLOUT) or `wake_fd` is readable (the server
// stopping; -1: none), at most until `deadline`. True when `fd` is ready.
bool WaitFor(int fd, short events, int wake_fd, absl::Time deadline);

// Appends what the socket `fd` has to `out` (up to 16 KiB), waiting for it as WaitFor does. False
// when the peer has closed or failed, the deadline passed or the server is stopping.
bool RecvSome(int fd, std::string* out, int wake_fd, absl::Time deadline);

// Writes all of `data` to the socket `fd` (no SIGPIPE), waiting as WaitFor does. False when the
// peer is gone, the deadline passed or the server is stopping.
bool WriteAll(int fd, absl::string_view data, int wake_fd, absl::Time deadline);

// WriteAll for replies that may be large: each slice of kWriteSliceBytes must go out within
// `slice_timeout` of the one before, so a client that keeps reading, however slowly, is served
// while one that stops is dropped.
inline constexpr size_t kWriteSliceBytes = size_t{64} << 10;
bool WriteAllPaced(int fd, absl::string_view data, int wake_fd, absl::Duration slice_timeout);

}  // namespace strata

#endif  // STRATA_COMMON_TCP_H_
