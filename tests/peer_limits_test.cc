// End-to-end: two coordinators over one worker, real processes on loopback, each with the other
// (and itself, each under two names) as --peers: a tenant is held to its max_concurrent_requests,
// requests_per_minute and tokens_per_minute across both, not by each; the usage endpoint answers
// only the cluster secret or an admin.
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/secrets.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/strata/v1/admin.grpc.pb.h"
#include "proto/strata/v1/serving.grpc.pb.h"
#include "tests/cluster_client.h"
#include "tests/http_client.h"
#include "tests/local_cluster.h"
#include "tests/process.h"

namespace strata {
namespace {

constexpr char kOps[] = "sk-peers-ops-0000000000";
constexpr char kConc[] = "sk-peers-conc-000000000";
constexpr char kRate[] = "sk-peers-rate-000000000";
constexpr char kMetered[] = "sk-peers-metered-000000";
constexpr char kLate[] = "sk-peers-late-000000000";
constexpr char kSecret[] = "peers-cluster-secret-0123456789ab";

class PeerLimitsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string root = TestOutputDir();
    const std::string keys = root + "/peer-keys.json";
    std::ofstream(keys) << absl::StrCat(R"({"tenants": [{"name": "ops", "keys": [")", kOps,
                                        R"("], "admin": true},
            {"name": "conc", "keys": [")",
                                        kConc, R"("], "max_concurrent_requests": 2},
            {"name": "rate", "keys": [")",
                                        kRate, R"("], "requests_per_minute": 4},
            {"name": "metered", "keys": [")",
                                        kMetered, R"("], "tokens_per_minute": 300},
            {"name": "late", "keys": [")",
                                        kLate, R"("], "requests_per_minute": 10}]})");
    keys_ = keys;
    const std::string secret = root + "/peer-secret";
    std::ofstream(secret) << kSecret << "\n";
    secret_ = secret;
    LocalClusterOptions o;
    o.num_workers = 1;
    o.coordinator = false;
    o.name = "peers";
    o.admin_api_key = kOps;
    o.worker_flags = {absl::StrCat("--cluster_secret_file=", secret)};
    auto c = LocalCluster::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = c->release();
    int* ports = ports_;
    ports[0] = FreePort();
    ports[1] = FreePort();
    // Both, each under two names: each coordinator skips itself, and counts the other once.
    const std::string peers = absl::StrCat("--peers=127.0.0.1:", ports[0], ",127.0.0.1:", ports[1],
                                           ",localhost:", ports[0], ",localhost:", ports[1]);
    for (int i = 0; i < 2; ++i) {
      absl::StatusOr<std::string> address = cluster_->StartExtraCoordinator(
          {absl::StrCat("--listen=127.0.0.1:", ports[i]), peers, "--peer_sync_interval_s=0.1",
           absl::StrCat("--api_keys_file=", keys), absl::StrCat("--cluster_secret_file=", secret)},
          absl::StrCat("peers-coordinator-", i));
      ASSERT_TRUE(address.ok()) << address.status();
      auto channel = grpc::CreateChannel(*address, grpc::InsecureChannelCredentials());
      serving_[i] = v1::Serving::NewStub(channel).release();
      admin_[i] = v1::Admin::NewStub(channel).release();
      ASSERT_TRUE(cluster_->WaitForServingWorkers(admin_[i], 1, absl::Seconds(60)).ok());
    }
  }
  static void TearDownTestSuite() {
    for (int i = 0; i < 2; ++i) {
      delete serving_[i];
      delete admin_[i];
    }
    delete cluster_;
    cluster_ = nullptr;
  }

  static v1::GenerateRequest Request(int max_tokens) {
    v1::GenerateRequest req = TextRequest("x", max_tokens, 1);
    req.mutable_sampling()->set_ignore_eos(true);
    return req;
  }
  static grpc::Status Generate(int coordinator, const char* key, int max_tokens) {
    return GenerateWith(serving_[coordinator], Request(max_tokens),
                        {{"authorization", absl::StrCat("Bearer ", key)}})
        .status;
  }
  // Coordinator i's view of tenant `name`.
  static v1::TenantStatus Tenant(int i, const std::string& name) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", absl::StrCat("Bearer ", kOps));
    v1::ClusterStatus status;
    EXPECT_TRUE(admin_[i]->GetClusterStatus(&ctx, {}, &status).ok());
    for (const v1::TenantStatus& t : status.tenants()) {
      if (t.name() == name) return t;
    }
    ADD_FAILURE() << "no tenant " << name;
    return {};
  }
  static bool Await(const std::function<bool()>& done) {
    for (int i = 0; i < 200 && !done(); ++i) absl::SleepFor(absl::Milliseconds(25));
    return done();
  }

  static inline LocalCluster* cluster_ = nullptr;
  static inline std::string keys_, secret_;
  static inline int ports_[2] = {};
  static inline v1::Serving::Stub* serving_[2] = {};
  static inline v1::Admin::Stub* admin_[2] = {};
};

// Two requests running through coordinator 0 fill the tenant's max_concurrent_requests of 2 on
// coordinator 1 too; once they end, coordinator 1 takes its requests again.
TEST_F(PeerLimitsTest, ConcurrencyCountsEveryCoordinatorsRequests) {
  OpenStreams running;
  for (int i = 0; i < 2; ++i) {
    running.contexts.push_back(std::make_unique<grpc::ClientContext>());
    running.contexts.back()->AddMetadata("authorization", absl::StrCat("Bearer ", kConc));
    running.readers.push_back(serving_[0]->Generate(running.contexts.back().get(), Request(4000)));
    running.first.emplace_back();
    ASSERT_TRUE(running.readers.back()->Read(&running.first.back()));
  }
  ASSERT_TRUE(Await([] { return Tenant(1, "conc").peer_running_requests() == 2; }));
  EXPECT_EQ(Tenant(0, "conc").peer_running_requests(), 0u);  // not itself, though it is a peer
  EXPECT_EQ(Tenant(0, "conc").running_requests(), 2u);
  const grpc::Status refused = Generate(1, kConc, 2);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_TRUE(absl::StrContains(refused.error_message(), "through other coordinators"))
      << refused.error_message();
  for (auto& ctx : running.contexts) ctx->TryCancel();
  for (const Generated& g : running.CollectAll()) {
    EXPECT_EQ(g.status.error_code(), grpc::StatusCode::CANCELLED);
  }
  ASSERT_TRUE(Await([] { return Tenant(1, "conc").peer_running_requests() == 0; }));
  EXPECT_TRUE(Generate(1, kConc, 2).ok());
}

// A tenant's requests_per_minute of 4: three through coordinator 0 leave one for coordinator 1.
TEST_F(PeerLimitsTest, RequestRatesDrainEveryCoordinatorsBucket) {
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(Generate(0, kRate, 1).ok()) << i;
  ASSERT_TRUE(Await([] { return Tenant(1, "rate").requests_available() < 1.5; }))
      << Tenant(1, "rate").requests_available();
  EXPECT_TRUE(Generate(1, kRate, 1).ok());
  const grpc::Status refused = Generate(1, kRate, 1);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_TRUE(absl::StrContains(refused.error_message(), "requests_per_minute"))
      << refused.error_message();
  // And coordinator 0 learns of coordinator 1's.
  ASSERT_TRUE(Await([] { return Tenant(0, "rate").requests_available() < 1; }));
  EXPECT_EQ(Generate(0, kRate, 1).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
}

// A tenant's tokens_per_minute of 300: a generation of 200 tokens through coordinator 0 is
// charged to coordinator 1's bucket as it settles.
TEST_F(PeerLimitsTest, TokenRatesDrainEveryCoordinatorsBucket) {
  ASSERT_TRUE(Generate(0, kMetered, 200).ok());
  // (About 99 left once charged, refilled at 5 a second: a request of 180 fits only in 16 s.)
  ASSERT_TRUE(Await([] { return Tenant(1, "metered").tokens_available() < 160; }))
      << Tenant(1, "metered").tokens_available();
  const grpc::Status refused = Generate(1, kMetered, 180);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_TRUE(absl::StrContains(refused.error_message(), "tokens_per_minute"))
      << refused.error_message();
}

// A coordinator that starts (a restart, a rollout) takes up where its peers' buckets are rather
// than with full ones.
TEST_F(PeerLimitsTest, AStartingCoordinatorBeginsAtItsPeersLevel) {
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(Generate(0, kLate, 1).ok()) << i;
  const int port = FreePort();
  absl::StatusOr<std::string> address = cluster_->StartExtraCoordinator(
      {absl::StrCat("--listen=127.0.0.1:", port),
       absl::StrCat("--peers=127.0.0.1:", ports_[0], ",127.0.0.1:", ports_[1], ",127.0.0.1:", port),
       "--peer_sync_interval_s=0.1", absl::StrCat("--api_keys_file=", keys_),
       absl::StrCat("--cluster_secret_file=", secret_)},
      "peers-coordinator-late");
  ASSERT_TRUE(address.ok()) << address.status();
  auto admin =
      v1::Admin::NewStub(grpc::CreateChannel(*address, grpc::InsecureChannelCredentials()));
  auto late = [&] {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", absl::StrCat("Bearer ", kOps));
    v1::ClusterStatus status;
    if (!admin->GetClusterStatus(&ctx, {}, &status).ok()) return 100.0;
    for (const v1::TenantStatus& t : status.tenants()) {
      if (t.name() == "late") return t.requests_available();
    }
    return 100.0;
  };
  // 10 a minute, 6 used: about 4 left there, and so here (not 10).
  ASSERT_TRUE(Await([&] { return late() < 5; })) << late();
}

// The tenants' use is for peers (the cluster secret) and admins only.
TEST_F(PeerLimitsTest, UsageAnswersOnlyPeersAndAdmins) {
  auto usage = [](int i, const std::string& key, const std::string& value, v1::TenantUsage* out) {
    grpc::ClientContext ctx;
    if (!key.empty()) ctx.AddMetadata(key, value);
    return admin_[i]->GetTenantUsage(&ctx, {}, out);
  };
  v1::TenantUsage u;
  EXPECT_EQ(usage(0, "", "", &u).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(usage(0, kClusterSecretMetadata, "not-the-secret-0123456789abcdef", &u).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(usage(0, "authorization", absl::StrCat("Bearer ", kConc), &u).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  v1::TenantUsage a, b;
  ASSERT_TRUE(usage(0, kClusterSecretMetadata, kSecret, &a).ok());
  ASSERT_TRUE(usage(1, "authorization", absl::StrCat("Bearer ", kOps), &b).ok());
  EXPECT_EQ(a.tenants_size(), 5);
  EXPECT_FALSE(a.coordinator_id().empty());
  EXPECT_NE(a.coordinator_id(), b.coordinator_id());
}

}  // namespace
}  // namespace strata
