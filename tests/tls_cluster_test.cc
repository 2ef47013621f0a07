// A cluster over TLS, through real processes on loopback: a coordinator and two workers (one
// prefilling, one decoding) given one certificate for the name strata.test (not the address they
// are dialled by: --tls_server_name), its key and its CA. Clients reach the coordinator with the
// CA alone, workers only with a certificate of the cluster's CA (mutual TLS, their default), the
// decode worker copies KV blocks from the prefill worker over its KV transfer port in TLS, probes
// use the plaintext health port, the HTTP API is HTTPS, and stratactl speaks TLS too. A worker
// given unusable TLS files stops at once, naming the flag.
#include <sys/wait.h>

#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/tls.h"
#include "common/tls_test_certs.h"
#include "gtest/gtest.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "tests/cluster_client.h"
#include "tests/http_client.h"
#include "tests/local_cluster.h"
#include "tests/process.h"
#include "worker/server/kv_transfer.h"

namespace strata {
namespace {

constexpr char kServerName[] = "strata.test";

struct TlsFiles {
  std::string ca, cert, key;
  std::string other_key;  // another certificate's key
};

TlsFiles WriteTlsFiles(const std::string& name) {
  TestCa ca("strata-cluster-ca");
  TestCertificateSpec spec;
  spec.common_name = "strata";
  spec.dns_names = {kServerName};  // no IP address: peers are checked against --tls_server_name
  const TestCertificate cert = ca.Issue(spec);
  TlsFiles f;
  const std::string base = absl::StrCat(TestOutputDir(), "/", name, "-");
  f.ca = base + "ca.pem";
  f.cert = base + "cert.pem";
  f.key = base + "key.pem";
  f.other_key = base + "other-key.pem";
  WriteTestFile(f.ca, ca.cert_pem());
  WriteTestFile(f.cert, cert.cert_pem);
  WriteTestFile(f.key, cert.key_pem);
  WriteTestFile(f.other_key, ca.Issue(spec).key_pem);
  return f;
}

std::vector<std::string> TlsFlags(const TlsFiles& f) {
  return {"--tls_cert=" + f.cert, "--tls_key=" + f.key, "--tls_ca=" + f.ca,
          absl::StrCat("--tls_server_name=", kServerName)};
}

GrpcCredentials Credentials(const TlsFiles& f, bool with_certificate,
                            const std::string& server_name = kServerName) {
  TlsOptions o;
  o.ca_file = f.ca;
  o.server_name = server_name;
  if (with_certificate) {
    o.cert_file = f.cert;
    o.key_file = f.key;
  }
  absl::StatusOr<GrpcCredentials> c = GrpcCredentials::Load(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : GrpcCredentials();
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A wait status's exit code, -1 for anything but an exit.
int ExitCode(int wait_status) {
  return wait_status >= 0 && WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : -1;
}

// Live sequences on the workers (running or waiting).
int64_t LiveSequences(LocalCluster& cluster) {
  const v1::ClusterStatus status = Status(cluster.admin());
  int64_t live = 0;
  for (const auto& w : status.workers()) {
    live += w.load().num_running_sequences() + w.load().num_waiting_sequences();
  }
  return live;
}

grpc::Status GetInfo(const std::shared_ptr<grpc::Channel>& channel, v1::WorkerInfo* info) {
  auto stub = v1::Worker::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  return stub->GetInfo(&ctx, v1::GetInfoRequest(), info);
}

// stratactl `args`, its exit status and output.
std::pair<int, std::string> Stratactl(const std::vector<std::string>& args,
                                      const std::string& log) {
  std::vector<std::string> argv = {"cli/stratactl"};
  argv.insert(argv.end(), args.begin(), args.end());
  absl::StatusOr<ChildProcess> p = ChildProcess::Start(argv, log);
  if (!p.ok()) return {-1, std::string(p.status().message())};
  const int rc = ExitCode(p->Wait(absl::Seconds(30)));
  return {rc, ReadAll(log)};
}

TEST(TlsClusterTest, AClusterServesAndCopiesKvBlocksOverTls) {
  const TlsFiles f = WriteTlsFiles("tls-cluster");
  const int decode_metrics = FreePort(), http = FreePort(), coordinator_metrics = FreePort();
  const int health0 = FreePort(), health1 = FreePort(), prefill_metrics = FreePort();
  LocalClusterOptions o;
  o.name = "tls-cluster";
  o.worker_flags = TlsFlags(f);
  o.per_worker_flags = {
      {"--role=prefill", absl::StrCat("--health_listen=127.0.0.1:", health0),
       absl::StrCat("--metrics_listen=127.0.0.1:", prefill_metrics), "--metrics_tls"},
      {"--role=decode", absl::StrCat("--health_listen=127.0.0.1:", health1),
       absl::StrCat("--metrics_listen=127.0.0.1:", decode_metrics)}};
  o.coordinator_flags = TlsFlags(f);
  o.coordinator_flags.push_back("--disaggregate_min_uncached_tokens=64");
  o.coordinator_flags.push_back(absl::StrCat("--http_listen=127.0.0.1:", http));
  o.coordinator_flags.push_back(absl::StrCat("--metrics_listen=127.0.0.1:", coordinator_metrics));
  o.credentials = Credentials(f, /*with_certificate=*/true);
  auto started = LocalCluster::Start(o);
  ASSERT_TRUE(started.ok()) << started.status();
  LocalCluster& cluster = **started;

  // A prompt of some 200 tokens: prefilled on worker 0, its KV blocks copied to worker 1.
  std::string text;
  for (int i = 0; i < 20; ++i) absl::StrAppend(&text, "def step_", i, "(x): return x + ", i, "\n");
  const Generated split = Generate(cluster.serving(), TextRequest(text, 12, 3));
  ASSERT_TRUE(split.status.ok()) << split.status.error_message();
  EXPECT_EQ(split.tokens.size(), 12u);
  std::map<std::string, double> m = WaitForMetrics(decode_metrics, [](auto& m) {
    return m["strata_worker_kv_fetches_total{outcome=\"copied\"}"] >= 1;
  });
  EXPECT_EQ(m["strata_worker_kv_fetches_total{outcome=\"copied\"}"], 1);
  EXPECT_GE(m["strata_worker_kv_blocks_received_total"], 10);
  // Over the KV transfer port, in TLS.
  EXPECT_GT(m["strata_worker_kv_fetch_bytes_total{transport=\"tcp\"}"], 0);
  EXPECT_EQ(m["strata_worker_kv_fetch_bytes_total{transport=\"grpc\"}"], 0);
  // The TLS files, watched.
  EXPECT_EQ(m["strata_tls_files_usable"], 1);
  EXPECT_GT(m["strata_tls_certificate_expiry_timestamp_seconds"], absl::ToUnixSeconds(absl::Now()));
  for (int i = 0; i < 2; ++i) {
    v1::WorkerInfo info;
    grpc::Status s = GetInfo(Credentials(f, true).NewChannel(cluster.worker_address(i)), &info);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_NE(info.kv_transfer_port(), 0u) << i;
    EXPECT_TRUE(info.tls()) << i;
  }
  // The transfer port speaks TLS only, and only to the cluster's certificates: a plain caller and
  // one without a certificate get no answer; one with the cluster's certificate an end frame.
  {
    v1::WorkerInfo info;
    // (The decode worker's, whose metrics count the refusals.)
    ASSERT_TRUE(GetInfo(Credentials(f, true).NewChannel(cluster.worker_address(1)), &info).ok());
    const std::string port = absl::StrCat("127.0.0.1:", info.kv_transfer_port());
    v1::FetchKvBlocksRequest request;
    request.add_block_hashes(1);
    std::vector<Engine::KvBlockCopy> blocks;
    KvTransferCall plain;
    absl::Status s = plain.Run(port, "", request, absl::Now() + absl::Seconds(5), &blocks);
    EXPECT_TRUE(absl::IsUnavailable(s)) << s;
    TlsOptions ca_only;
    ca_only.ca_file = f.ca;
    TlsOptions with_cert = ca_only;
    with_cert.cert_file = f.cert;
    with_cert.key_file = f.key;
    auto anonymous = TlsContextSource::Create(ca_only, TlsRole::kClient);
    auto member = TlsContextSource::Create(with_cert, TlsRole::kClient);
    ASSERT_TRUE(anonymous.ok() && member.ok());
    KvTransferCall no_cert;
    no_cert.UseTls(anonymous->get(), kServerName);
    s = no_cert.Run(port, "", request, absl::Now() + absl::Seconds(5), &blocks);
    EXPECT_TRUE(absl::IsUnavailable(s)) << s;
    KvTransferCall wrong_name;
    wrong_name.UseTls(member->get(), "other.test");
    s = wrong_name.Run(port, "", request, absl::Now() + absl::Seconds(5), &blocks);
    EXPECT_TRUE(absl::IsUnavailable(s)) << s;
    EXPECT_FALSE(wrong_name.connected());
    KvTransferCall ok;
    ok.UseTls(member->get(), kServerName);
    s = ok.Run(port, "", request, absl::Now() + absl::Seconds(5), &blocks);
    EXPECT_FALSE(absl::IsUnavailable(s)) << s;  // the source's answer, whatever it is
    EXPECT_TRUE(ok.connected());
    m = WaitForMetrics(decode_metrics, [](auto& m) {
      return m["strata_worker_kv_transfer_tls_failures_total"] >= 2;
    });
    EXPECT_GE(m["strata_worker_kv_transfer_tls_failures_total"], 2);
  }

  // The coordinator takes clients with the CA alone; a worker wants a certificate (mutual TLS).
  {
    auto serving =
        v1::Serving::NewStub(Credentials(f, false).NewChannel(cluster.coordinator_address()));
    const Generated g = Generate(serving.get(), TextRequest("x = ", 4, 1));
    EXPECT_TRUE(g.status.ok()) << g.status.error_message();
    v1::WorkerInfo info;
    grpc::Status s = GetInfo(Credentials(f, false).NewChannel(cluster.worker_address(0)), &info);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  }
  // Plaintext, or a name the certificate does not carry, gets nowhere.
  {
    auto plain = v1::Serving::NewStub(
        grpc::CreateChannel(cluster.coordinator_address(), grpc::InsecureChannelCredentials()));
    Generated g = Generate(plain.get(), TextRequest("x = ", 4, 1));
    EXPECT_EQ(g.status.error_code(), grpc::StatusCode::UNAVAILABLE) << g.status.error_message();
    auto wrong_name = v1::Serving::NewStub(
        Credentials(f, false, "other.test").NewChannel(cluster.coordinator_address()));
    g = Generate(wrong_name.get(), TextRequest("x = ", 4, 1));
    EXPECT_EQ(g.status.error_code(), grpc::StatusCode::UNAVAILABLE) << g.status.error_message();
  }
  // --metrics_tls: the prefill worker's metrics over HTTPS only.
  {
    auto c = TestTlsClient::Connect(prefill_metrics, ReadAll(f.ca), kServerName);
    ASSERT_TRUE(c.ok()) << c.status();
    ASSERT_TRUE((*c)->Write(HttpRequestText("GET", "/metrics", "")));
    const std::string reply = (*c)->ReadToEnd();
    EXPECT_EQ(reply.rfind("HTTP/1.1 200", 0), 0u) << reply.substr(0, 200);
    EXPECT_NE(reply.find("strata_tls_files_usable 1"), std::string::npos);
    const HttpReply plain = HttpRaw(prefill_metrics, HttpRequestText("GET", "/metrics", ""));
    EXPECT_NE(plain.status, 200);
  }
  // Probes: the health ports answer in plaintext, and serve nothing else.
  for (int port : {health0, health1}) {
    auto channel =
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
    auto health = grpc::health::v1::Health::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::health::v1::HealthCheckResponse response;
    grpc::Status s = health->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &response);
    ASSERT_TRUE(s.ok()) << port << ": " << s.error_message();
    EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
    v1::WorkerInfo info;
    s = GetInfo(channel, &info);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED) << s.error_message();
  }
  // The OpenAI-compatible API over HTTPS, with the same certificate: requests kept alive on one
  // connection, a streamed completion to its end.
  {
    auto c = TestTlsClient::Connect(http, ReadAll(f.ca), kServerName);
    ASSERT_TRUE(c.ok()) << c.status();
    ASSERT_TRUE((*c)->Write(HttpRequestText("GET", "/health", "", /*close=*/false)));
    std::string reply = (*c)->Read();
    EXPECT_EQ(reply.rfind("HTTP/1.1 200", 0), 0u) << reply;
    ASSERT_TRUE((*c)->Write(HttpRequestText(
        "POST", "/v1/completions",
        R"({"model": "strata-tiny", "prompt": "def ", "max_tokens": 6, "stream": true,
            "ignore_eos": true})")));
    reply = (*c)->ReadToEnd();
    EXPECT_NE(reply.find("HTTP/1.1 200"), std::string::npos) << reply;
    EXPECT_NE(reply.find("data: [DONE]"), std::string::npos) << reply;
  }
  // A client that leaves a stream over HTTPS frees its sequence, as over plain HTTP.
  {
    auto c = TestTlsClient::Connect(http, ReadAll(f.ca), kServerName);
    ASSERT_TRUE(c.ok()) << c.status();
    ASSERT_TRUE((*c)->Write(HttpRequestText(
        "POST", "/v1/completions",
        R"({"model": "strata-tiny", "prompt": "x", "max_tokens": 3000, "stream": true,
            "ignore_eos": true})")));
    std::string got;
    while (got.find("data: ") == std::string::npos) {
      const std::string part = (*c)->Read();
      ASSERT_FALSE(part.empty()) << got;
      got += part;
    }
    // Running (the workers' load reports lag the first token by up to their interval).
    for (const absl::Time give_up = absl::Now() + absl::Seconds(10);
         LiveSequences(cluster) != 1 && absl::Now() < give_up;) {
      absl::SleepFor(absl::Milliseconds(20));
    }
    ASSERT_EQ(LiveSequences(cluster), 1);
    (*c)->Abort();
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    while (LiveSequences(cluster) != 0 && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(50));
    }
    EXPECT_EQ(LiveSequences(cluster), 0) << "the generation went on after its client left";
  }
  // Plain HTTP to the HTTPS port gets no HTTP answer; a client trusting another CA no handshake.
  {
    const int fd = ConnectLoopback(http);
    ASSERT_GE(fd, 0);
    const std::string req = HttpRequestText("GET", "/health", "");
    ASSERT_EQ(::send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
    std::string text;
    ReadToClose(fd, &text);
    ::close(fd);
    EXPECT_EQ(text.find("HTTP/1.1"), std::string::npos) << text;
    TestCa other("other");
    EXPECT_FALSE(TestTlsClient::Connect(http, other.cert_pem(), kServerName).ok());
    m = WaitForMetrics(coordinator_metrics, [](auto& m) {
      return m["strata_coordinator_http_tls_failures_total"] >= 2;
    });
    EXPECT_GE(m["strata_coordinator_http_tls_failures_total"], 2);
  }

  // stratactl with the CA (and the name), and without.
  const std::string log = TestOutputDir() + "/tls-cluster-stratactl";
  auto [rc, out] = Stratactl({"status", "--coordinator", cluster.coordinator_address(), "--tls-ca",
                              f.ca, "--tls-server-name", kServerName, "--json"},
                             log + "-1.log");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("worker-1"), std::string::npos) << out;
  std::tie(rc, out) = Stratactl({"status", "--coordinator", cluster.coordinator_address(),
                                 "--tls-ca", f.ca, "--tls-server-name", kServerName},
                                log + "-table.log");
  EXPECT_NE(out.find("in+out/tls:"), std::string::npos) << out;  // the KV COPIES column
  std::tie(rc, out) =
      Stratactl({"status", "--coordinator", cluster.coordinator_address()}, log + "-2.log");
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("if it serves TLS, give --tls-ca"), std::string::npos) << out;
  std::tie(rc, out) = Stratactl(
      {"status", "--coordinator", cluster.coordinator_address(), "--tls-ca", f.ca + ".missing"},
      log + "-3.log");
  EXPECT_EQ(rc, 2) << out;  // a usage error
  EXPECT_NE(out.find("--tls-ca: cannot open"), std::string::npos) << out;
}

TEST(TlsClusterTest, AWorkerWithUnusableTlsFlagsStopsNamingTheFlag) {
  const TlsFiles f = WriteTlsFiles("tls-bad");
  struct Case {
    std::vector<std::string> flags;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--tls_cert=" + f.cert, "--tls_key=" + f.other_key, "--tls_ca=" + f.ca},
       "--tls_key: the key in"},
      {{"--tls_cert=" + f.cert, "--tls_key=" + f.key, "--tls_ca=" + f.ca + ".missing"},
       "--tls_ca: cannot open"},
      {{"--tls_cert=" + f.cert}, "--tls_cert is given without --tls_key"},
      {{"--tls_ca=" + f.ca}, "--tls_ca without --tls_cert"},
      {{"--tls_cert=" + f.cert, "--tls_key=" + f.key, "--tls_client_auth=always"},
       "--tls_client_auth: \"always\" is none of"},
      {{"--metrics_listen=127.0.0.1:0", "--metrics_tls"}, "--metrics_tls: a TLS server needs"},
  };
  int i = 0;
  for (const Case& c : cases) {
    std::vector<std::string> argv = {kWorkerBinary, absl::StrCat("--model=", kTinyModelDir),
                                     "--listen=127.0.0.1:0"};
    argv.insert(argv.end(), c.flags.begin(), c.flags.end());
    const std::string log = absl::StrCat(TestOutputDir(), "/tls-bad-", i++, ".log");
    absl::StatusOr<ChildProcess> p = ChildProcess::Start(argv, log);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(ExitCode(p->Wait(absl::Seconds(30))), 1) << c.message;
    const std::string out = ReadAll(log);
    EXPECT_NE(out.find(c.message), std::string::npos) << out;
  }
}

}  // namespace
}  // namespace strata
