// End-to-end: a coordinator without API keys behind a trusted proxy (--tenant_header): the tenant
// the proxy names, over HTTP (the header) and gRPC (the metadata), reaches the worker, which
// shares itself fairly by it and counts each tenant's tokens; a malformed name is refused naming
// the header, and a request without one is served as before.
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "proto/strata/v1/serving.grpc.pb.h"
#include "tests/http_client.h"
#include "tests/local_cluster.h"

namespace strata {
namespace {

// A header HTTP, gRPC or Strata uses itself cannot name tenants (gRPC sets user-agent on every
// call, which would then name one), nor can the header go with API keys: the coordinator refuses
// to start, exit status 2, naming the flag.
TEST(TenantHeaderTest, ReservedHeaderNamesAreRefusedAtStart) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string log = absl::StrCat(tmp == nullptr ? "/tmp" : tmp, "/refused.log");
  for (const std::vector<std::string>& flags : std::vector<std::vector<std::string>>{
           {"--tenant_header=User-Agent"},
           {"--tenant_header=x-strata-tenant"},
           {"--tenant_header=x-tenant-bin"},
           {"--tenant_header=content-length"},
           {"--tenant_header=x tenant"},
           {"--tenant_header=x-tenant-id", "--api_keys_file=/nonexistent/keys.json"}}) {
    std::vector<std::string> argv = {kCoordinatorBinary,
                                     absl::StrCat("--model=", kTinyModel, "=", kTinyModelDir),
                                     "--workers=127.0.0.1:1", "--listen=127.0.0.1:0"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    absl::StatusOr<ChildProcess> p = ChildProcess::Start(argv, log);
    ASSERT_TRUE(p.ok()) << p.status();
    const int status = p->Wait(absl::Seconds(30));
    ASSERT_TRUE(WIFEXITED(status)) << flags[0];
    EXPECT_EQ(WEXITSTATUS(status), 2) << flags[0];
    std::ifstream in(log);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_TRUE(absl::StrContains(text, "--tenant_header")) << text;
  }
}

TEST(TenantHeaderTest, AProxysTenantReachesTheWorkers) {
  LocalClusterOptions o;
  o.num_workers = 1;
  o.name = "tenant-header";
  const int http = FreePort(), worker_metrics = FreePort();
  o.worker_flags = {absl::StrCat("--metrics_listen=127.0.0.1:", worker_metrics)};
  o.coordinator_flags = {absl::StrCat("--http_listen=127.0.0.1:", http),
                         "--tenant_header=X-Tenant-Id"};
  auto cluster = LocalCluster::Start(o);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto complete = [&](const std::string& header) {
    const std::string body =
        R"({"model": "strata-tiny", "prompt": "int main", "max_tokens": 3, "ignore_eos": true})";
    return HttpRaw(http, HttpRequestText("POST", "/v1/completions", body, /*close=*/true, header));
  };
  HttpReply r = complete("X-Tenant-Id: team-a\r\n");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(complete("").status, 200);  // no tenant named: served as before
  r = complete("x-tenant-id: team a!\r\n");
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "x-tenant-id")) << r.body;
  // Present but empty, or twice, is refused as over gRPC (and as for Authorization).
  EXPECT_EQ(complete("X-Tenant-Id:\r\n").status, 400);
  r = complete("X-Tenant-Id: team-a\r\nX-Tenant-Id: team-b\r\n");
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "more than one")) << r.body;

  auto serving = v1::Serving::NewStub(
      grpc::CreateChannel((*cluster)->coordinator_address(), grpc::InsecureChannelCredentials()));
  auto generate = [&](const std::string& tenant) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-tenant-id", tenant);
    v1::GenerateRequest req;
    req.set_model("strata-tiny");
    req.set_text("int main");
    req.mutable_sampling()->set_max_tokens(3);
    req.mutable_sampling()->set_ignore_eos(true);
    auto reader = serving->Generate(&ctx, req);
    v1::GenerateResponse chunk;
    while (reader->Read(&chunk)) {
    }
    return reader->Finish();
  };
  grpc::Status s = generate("team-b");
  ASSERT_TRUE(s.ok()) << s.error_message();
  s = generate(std::string(129, 'b'));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "x-tenant-id")) << s.error_message();

  // The worker counts both teams' tokens (its metrics come every 250 ms).
  const std::string a = R"(strata_worker_tenant_tokens_total{tenant="team-a",kind="generated"})";
  const std::string b = R"(strata_worker_tenant_tokens_total{tenant="team-b",kind="generated"})";
  const std::string waits = "strata_worker_queue_wait_seconds_count";
  std::map<std::string, double> m = WaitForMetrics(
      worker_metrics, [&](auto& now) { return now[a] >= 3 && now[b] >= 3 && now[waits] >= 3; });
  EXPECT_EQ(m[a], 3);
  EXPECT_EQ(m[b], 3);
  // Each of the three requests that reached it waited in its queue once (admitted once each).
  EXPECT_EQ(m[waits], 3);
  EXPECT_GE(m["strata_worker_queue_wait_seconds_sum"], 0);
  EXPECT_EQ(m["strata_worker_queue_wait_seconds_bucket{le=\"+Inf\"}"], 3);
  // And by tenant: one admission each for team-a and team-b (a request naming none has no series).
  const std::map<std::string, double> t = WaitForMetrics(worker_metrics, [](auto& now) {
    return now[R"(strata_worker_tenant_admissions_total{tenant="team-b"})"] >= 1;
  });
  std::string seen;
  for (const auto& [k, v] : t) {
    if (absl::StartsWith(k, "strata_worker_tenant_")) absl::StrAppend(&seen, k, " ", v, "\n");
  }
  for (const char* tenant : {"team-a", "team-b"}) {
    const std::string admissions =
        absl::StrCat("strata_worker_tenant_admissions_total{tenant=\"", tenant, "\"}");
    const std::string wait =
        absl::StrCat("strata_worker_tenant_queue_wait_seconds_total{tenant=\"", tenant, "\"}");
    ASSERT_TRUE(t.count(admissions) && t.count(wait)) << tenant << " in\n" << seen;
    EXPECT_EQ(t.at(admissions), 1) << tenant;
    EXPECT_GT(t.at(wait), 0) << tenant;
  }
}

}  // namespace
}  // namespace strata
