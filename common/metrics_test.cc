#include "common/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/metrics_http.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(MetricsTest, RendersPrometheusTextExposition) {
  MetricsRegistry r;
  r.GetCounter("strata_requests_total", "Requests by outcome.", {{"code", "OK"}})->Add(3);
  r.GetCounter("strata_requests_total", "Requests by outcome.", {{"code", "UNAVAILABLE"}})->Add();
  r.GetGauge("strata_inflight", "In flight now.")->Set(2.5);
  r.SetGaugeCallback("strata_answer", "Computed at scrape.", {{"path", "a\"b\\c\nd"}},
                     [] { return 42.0; });
  Histogram* h = r.GetHistogram("strata_ttft_seconds", "TTFT.", {0.1, 1}, {{"model", "m"}});
  h->Observe(0.05);
  h->Observe(0.1);  // an upper bound is inclusive
  h->Observe(0.5);
  h->Observe(7);
  EXPECT_EQ(r.Render(),
            "# HELP strata_answer Computed at scrape.\n"
            "# TYPE strata_answer gauge\n"
            "strata_answer{path=\"a\\\"b\\\\c\\nd\"} 42\n"
            "# HELP strata_inflight In flight now.\n"
            "# TYPE strata_inflight gauge\n"
            "strata_inflight 2.5\n"
            "# HELP strata_requests_total Requests by outcome.\n"
            "# TYPE strata_requests_total counter\n"
            "strata_requests_total{code=\"OK\"} 3\n"
            "strata_requests_total{code=\"UNAVAILABLE\"} 1\n"
            "# HELP strata_ttft_seconds TTFT.\n"
            "# TYPE strata_ttft_seconds histogram\n"
            "strata_ttft_seconds_bucket{model=\"m\",le=\"0.1\"} 2\n"
            "strata_ttft_seconds_bucket{model=\"m\",le=\"1\"} 3\n"
            "strata_ttft_seconds_bucket{model=\"m\",le=\"+Inf\"} 4\n"
            "strata_ttft_seconds_sum{model=\"m\"} 7.65\n"
            "strata_ttft_seconds_count{model=\"m\"} 4\n");
}

TEST(MetricsTest, ASeriesIsCreatedOnceAndTotalsOnlyGrow) {
  MetricsRegistry r;
  Counter* a = r.GetCounter("c_total", "c", {{"k", "v"}});
  EXPECT_EQ(r.GetCounter("c_total", "c", {{"k", "v"}}), a);
  EXPECT_NE(r.GetCounter("c_total", "c", {{"k", "w"}}), a);
  a->SetTotal(10);
  a->SetTotal(4);  // a restarted source never makes a counter go back
  EXPECT_EQ(a->value(), 10);
  EXPECT_DEATH(r.GetGauge("c_total", "c"), "two types");
}

TEST(MetricsTest, ConcurrentUpdatesAreNotLost) {
  MetricsRegistry r;
  Counter* c = r.GetCounter("n_total", "n");
  Histogram* h = r.GetHistogram("h", "h", LatencyBuckets());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        c->Add();
        h->Observe(0.003);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(c->value(), 40000);
  EXPECT_EQ(h->CumulativeCounts().back(), 40000u);
}

// A connected socket to 127.0.0.1:port.
int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  return fd;
}

// One HTTP exchange with the server on loopback; the whole response.
std::string Http(int port, const std::string& request) {
  const int fd = Connect(port);
  EXPECT_EQ(send(fd, request.data(), request.size(), 0), static_cast<ssize_t>(request.size()));
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

TEST(MetricsHttpServerTest, ServesTheRegistryAtMetrics) {
  MetricsRegistry r;
  r.GetCounter("strata_up_total", "u")->Add(7);
  auto server = MetricsHttpServer::Start("127.0.0.1:0", &r);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  ASSERT_GT(port, 0);
  const std::string ok = Http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(ok.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << ok;
  EXPECT_NE(ok.find("Content-Type: text/plain; version=0.0.4"), std::string::npos);
  EXPECT_NE(ok.find("\r\n\r\n# HELP strata_up_total u\n"), std::string::npos) << ok;
  EXPECT_NE(ok.find("strata_up_total 7\n"), std::string::npos);
  // Values move between scrapes.
  r.GetCounter("strata_up_total", "u")->Add();
  EXPECT_NE(Http(port, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").find("strata_up_total 8\n"),
            std::string::npos);
  const std::string head = Http(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
  EXPECT_EQ(head.rfind("HTTP/1.1 200 OK\r\n", 0), 0u);
  EXPECT_EQ(head.find("strata_up_total"), std::string::npos);
  EXPECT_EQ(Http(port, "GET / HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 404", 0), 0u);
  EXPECT_EQ(Http(port, "POST /metrics HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 405", 0), 0u);
  EXPECT_EQ(Http(port, "garbage\r\n\r\n").rfind("HTTP/1.1 400", 0), 0u);
  // A client that connects and says nothing holds a scrape up for at most the read timeout.
  const int idle = Connect(port);
  EXPECT_NE(Http(port, "GET /metrics HTTP/1.1\r\n\r\n").find("strata_up_total"), std::string::npos);
  close(idle);
  // One that trickles its request in a byte at a time is cut off after 2 s in all.
  const int slow = Connect(port);
  const absl::Time start = absl::Now();
  const std::string request = "GET /metrics HTTP/1.1\r\n";
  for (size_t i = 0; i < request.size(); ++i) {
    if (send(slow, &request[i], 1, MSG_NOSIGNAL) != 1) break;
    absl::SleepFor(absl::Milliseconds(150));
  }
  char byte;
  EXPECT_LE(recv(slow, &byte, 1, 0), 0);  // closed without an answer
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  close(slow);
  // A connection in progress does not hold up shutdown.
  const int pending = Connect(port);
  const absl::Time stop = absl::Now();
  server->reset();  // stops and joins promptly
  EXPECT_LT(absl::Now() - stop, absl::Seconds(1));
  close(pending);
}

TEST(MetricsHttpServerTest, BadAddressesNameTheFlag) {
  MetricsRegistry r;
  for (const char* bad : {"9090", ":9090", "[::]:x", "[::]:70000", "no.such.host.invalid:9090"}) {
    auto s = MetricsHttpServer::Start(bad, &r);
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_NE(s.status().message().find("--metrics_listen"), std::string::npos) << s.status();
  }
  // Dual-stack on every address works here too.
  auto any = MetricsHttpServer::Start("[::]:0", &r);
  ASSERT_TRUE(any.ok()) << any.status();
  EXPECT_EQ(Http((*any)->port(), "GET /metrics HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 200", 0), 0u);
}

}  // namespace
}  // namespace strata
