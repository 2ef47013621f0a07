// A minimal HTTP/1.1 client for end-to-end tests of the servers' HTTP endpoints (metrics, the
// OpenAI-compatible API): one request per connection, the whole response read until the server
// closes.
#ifndef STRATA_TESTS_HTTP_CLIENT_H_
#define STRATA_TESTS_HTTP_CLIENT_H_

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/tcp.h"

namespace strata {

// A port free now (bound, then released) on loopback, for a server flag that takes HOST:PORT.
// Drawn below the kernel's ephemeral range (ip_local_port_range), so that no server started
// meanwhile on port 0, and no outgoing connection, can be given it before its user binds it.
inline int FreePort() {
  int ephemeral_low = 0;
  if (FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    if (std::fscanf(f, "%d", &ephemeral_low) != 1) ephemeral_low = 0;
    std::fclose(f);
  }
  auto try_bind = [](int want) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(want));
    socklen_t len = sizeof(a);
    int port = 0;
    if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
      port = ntohs(a.sin_port);
    }
    close(fd);
    return port;
  };
  if (ephemeral_low > 12000) {
    static std::mt19937 rng(static_cast<uint32_t>(getpid()) ^
                            static_cast<uint32_t>(absl::ToUnixNanos(absl::Now())));
    std::uniform_int_distribution<int> pick(10000, ephemeral_low - 1);
    for (int i = 0; i < 100; ++i) {
      if (const int port = try_bind(pick(rng)); port != 0) return port;
    }
  }
  return try_bind(0);
}

// A connected socket to 127.0.0.1:port (the caller closes it), or -1.
inline int ConnectLoopback(int port) {
  return ConnectTcp(absl::StrCat("127.0.0.1:", port)).release();
}

struct HttpReply {
  int status = 0;  // 0: no answer
  std::string head;
  std::string body;
};

// The raw request text for `method` `path` with a body (Content-Length set when `body` is not
// empty or the method is POST). `close`: the connection ends with the answer, which the one-shot
// helpers below read to the close.
inline std::string HttpRequestText(const std::string& method, const std::string& path,
                                   const std::string& body, bool close = true,
                                   const std::string& headers = "") {
  // `headers`: more header lines, each ending in \r\n.
  std::string r = absl::StrCat(method, " ", path, " HTTP/1.1\r\nHost: test\r\n",
                               close ? "Connection: close\r\n" : "", headers);
  if (method == "POST" || !body.empty()) {
    absl::StrAppend(&r, "Content-Type: application/json\r\nContent-Length: ", body.size(), "\r\n");
  }
  return absl::StrCat(r, "\r\n", body);
}

// Splits a response into status, head and body.
inline HttpReply ParseHttpReply(const std::string& text) {
  HttpReply r;
  const size_t end = text.find("\r\n\r\n");
  if (end == std::string::npos) return r;
  r.head = text.substr(0, end);
  r.body = text.substr(end + 4);
  const std::vector<std::string> first = absl::StrSplit(r.head.substr(0, r.head.find("\r\n")), ' ');
  if (first.size() < 2 || !absl::SimpleAtoi(first[1], &r.status)) r.status = 0;
  return r;
}

// Appends what `fd` receives until the peer closes (or fails) to `out`.
inline void ReadToClose(int fd, std::string* out) {
  char buf[4096];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) out->append(buf, static_cast<size_t>(n));
}

// Sends `raw` to 127.0.0.1:port and reads the response until the server closes.
inline HttpReply HttpRaw(int port, const std::string& raw) {
  const int fd = ConnectLoopback(port);
  if (fd < 0) return {};
  send(fd, raw.data(), raw.size(), MSG_NOSIGNAL);
  std::string text;
  ReadToClose(fd, &text);
  close(fd);
  return ParseHttpReply(text);
}

inline HttpReply Http(int port, const std::string& method, const std::string& path,
                      const std::string& body = "") {
  return HttpRaw(port, HttpRequestText(method, path, body));
}

// The payloads of a server-sent-event stream's "data:" lines, in order.
inline std::vector<std::string> SseData(absl::string_view body) {
  std::vector<std::string> out;
  for (absl::string_view line : absl::StrSplit(body, '\n')) {
    if (absl::ConsumePrefix(&line, "data: ")) out.emplace_back(line);
  }
  return out;
}

// Prometheus text exposition: each sample line's value by its series ("name{labels}").
inline std::map<std::string, double> ParseMetrics(absl::string_view text) {
  std::map<std::string, double> out;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    double v = 0;
    if (space != absl::string_view::npos && absl::SimpleAtod(line.substr(space + 1), &v)) {
      out[std::string(line.substr(0, space))] = v;
    }
  }
  return out;
}

// Scrapes GET /metrics from 127.0.0.1:port until `done` holds of the samples (metrics that follow
// an answer or come on a timer), for up to `timeout`; the last samples either way, so a test's
// expectations name what was missing (and their text in `*text`, when given, for its messages).
inline std::map<std::string, double> WaitForMetrics(
    int port, const std::function<bool(std::map<std::string, double>&)>& done,
    absl::Duration timeout = absl::Seconds(5), std::string* text = nullptr) {
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    HttpReply r = Http(port, "GET", "/metrics");
    std::map<std::string, double> m = ParseMetrics(r.body);
    if (done(m) || absl::Now() >= deadline) {
      if (text != nullptr) *text = std::move(r.body);
      return m;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
}

}  // namespace strata

#endif  // STRATA_TESTS_HTTP_CLIENT_H_
