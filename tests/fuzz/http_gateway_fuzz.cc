// The OpenAI-compatible HTTP API's front door, from untrusted bytes: a real OpenAiGateway on
// loopback (its coordinator unreachable, so a request that parses is answered with an error from
// the call behind it) reading a connection's bytes as HTTP/1.1: the request line, headers
// (Content-Length, Transfer-Encoding: chunked, Expect: 100-continue, Connection, Authorization, a
// tenant header), bodies, and requests pipelined on one connection.
//
// Input: the bytes a client sends on one connection, then its write side closed.
//
// Checks: whatever it answers is HTTP ("HTTP/1.1 " and a three-digit status) and comes within the
// read timeout; afterwards the gateway still answers GET /health with 200 on a new connection.
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/tcp.h"
#include "coordinator/openai_gateway.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "tests/fuzz/fuzz_target.h"

namespace {

strata::OpenAiGateway& Gateway() {
  static strata::OpenAiGateway* const gateway = [] {
    strata::OpenAiGatewayOptions o;
    strata::ChatTemplate chatml;
    chatml.format = strata::ChatFormat::kChatml;
    o.chat_templates["strata-tiny"] = chatml;
    o.read_timeout = absl::Seconds(2);
    o.keep_alive_timeout = absl::Milliseconds(100);
    o.max_body_bytes = 64 << 10;
    o.tenant_header = "x-tenant";
    // Nothing listens on port 1: every call behind a request fails at once, UNAVAILABLE.
    auto g = strata::OpenAiGateway::Start(
        "127.0.0.1:0", grpc::CreateChannel("127.0.0.1:1", grpc::InsecureChannelCredentials()),
        std::move(o));
    FUZZ_CHECK(g.ok(), "%s", g.status().ToString().c_str());
    return g->release();
  }();
  return *gateway;
}

// Sends `request` on a new connection, closes its write side, and reads the answer to the end.
// False when the answer did not end within `timeout`; a connection that cannot be made is a
// failure of its own (the harness's, not the gateway's: checked apart).
bool Exchange(absl::string_view request, absl::Duration timeout, std::string* answer) {
  strata::UniqueFd fd = strata::ConnectTcp(absl::StrCat("127.0.0.1:", Gateway().port()));
  FUZZ_CHECK(fd.valid(), "no connection to the gateway: %s", std::strerror(errno));
  // Closed with a reset: thousands of connections a second leave no TIME_WAIT behind.
  const linger reset{1, 0};
  setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
  const absl::Time deadline = absl::Now() + timeout;
  // (The gateway may answer and close before it has read everything.)
  strata::WriteAll(fd.get(), request, -1, deadline);
  shutdown(fd.get(), SHUT_WR);
  answer->clear();
  while (strata::RecvSome(fd.get(), answer, -1, deadline)) {
  }
  return absl::Now() < deadline;
}

bool LooksLikeHttp(absl::string_view answer) {
  return answer.size() >= 12 && absl::StartsWith(answer, "HTTP/1.1 ") &&
         std::isdigit(static_cast<unsigned char>(answer[9])) &&
         std::isdigit(static_cast<unsigned char>(answer[10])) &&
         std::isdigit(static_cast<unsigned char>(answer[11]));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  Gateway();
  return 0;
}

STRATA_FUZZ_TARGET(data, size) {
  const absl::string_view request(reinterpret_cast<const char*>(data), size);
  std::string answer;
  FUZZ_CHECK(Exchange(request, absl::Seconds(10), &answer),
             "no end to the answer within 10 s (%zu bytes so far)", answer.size());
  FUZZ_CHECK(answer.empty() || LooksLikeHttp(answer), "the answer is not HTTP: \"%.200s\"",
             answer.c_str());
  std::string health;
  FUZZ_CHECK(Exchange("GET /health HTTP/1.1\r\nHost: x\r\n\r\n", absl::Seconds(10), &health),
             "GET /health got no answer after the input");
  FUZZ_CHECK(absl::StartsWith(health, "HTTP/1.1 200"), "GET /health after the input: \"%.200s\"",
             health.c_str());
  return 0;
}
