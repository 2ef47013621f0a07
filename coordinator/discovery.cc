#include "coordinator/discovery.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace strata {
namespace {

// Splits "host:port" (host may be "[v6]"); false when malformed.
bool SplitHostPort(absl::string_view s, std::string* host, int* port) {
  const size_t colon = s.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) return false;
  absl::string_view h = s.substr(0, colon);
  if (absl::StartsWith(h, "[") != absl::EndsWith(h, "]")) return false;
  int p = 0;
  if (!absl::SimpleAtoi(s.substr(colon + 1), &p) || p <= 0 || p > 65535) return false;
  *host = std::string(h);
  *port = p;
  return true;
}

}  // namespace

absl::StatusOr<WorkerTargets> ParseWorkerTargets(absl::string_view spec) {
  WorkerTargets t;
  spec = absl::StripAsciiWhitespace(spec);
  if (spec.empty()) {
    return absl::InvalidArgumentError("--workers is empty: give host:port,... or dns:NAME:PORT");
  }
  if (absl::ConsumePrefix(&spec, "dns:")) {
    absl::ConsumePrefix(&spec, "///");
    std::string host;
    int port = 0;
    if (!SplitHostPort(spec, &host, &port)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--workers: \"dns:", spec, "\" is not dns:NAME:PORT"));
    }
    t.dns_name = host;
    t.dns_port = port;
    return t;
  }
  for (absl::string_view entry : absl::StrSplit(spec, ',', absl::SkipWhitespace())) {
    entry = absl::StripAsciiWhitespace(entry);
    std::string host;
    int port = 0;
    if (!SplitHostPort(entry, &host, &port)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--workers: \"", entry, "\" is not host:port"));
    }
    t.static_addresses.push_back(std::string(entry));
  }
  std::sort(t.static_addresses.begin(), t.static_addresses.end());
  t.static_addresses.erase(std::unique(t.static_addresses.begin(), t.static_addresses.end()),
                           t.static_addresses.end());
  return t;
}

absl::StatusOr<std::vector<std::string>> ResolveAll(const std::string& name, int port) {
  addrinfo hints;
  std::memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(name.c_str(), nullptr, &hints, &res);
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve worker name ", name, ": ", gai_strerror(rc)));
  }
  std::vector<std::string> out;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    char buf[INET6_ADDRSTRLEN] = {};
    if (a->ai_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, buf, sizeof(buf));
      out.push_back(absl::StrCat(buf, ":", port));
    } else if (a->ai_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr, buf,
                sizeof(buf));
      out.push_back(absl::StrCat("[", buf, "]:", port));
    }
  }
  freeaddrinfo(res);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace strata
