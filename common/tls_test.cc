#include "common/tls.h"

#include <chrono>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/grpc_server.h"
#include "common/tls_test_certs.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "proto/strata/v1/serving.grpc.pb.h"

namespace strata {
namespace {

using ::testing::HasSubstr;
using HealthResponse = ::grpc::health::v1::HealthCheckResponse;

class EmptyServing final : public strata::v1::Serving::CallbackService {};

class TlsTest : public ::testing::Test {
 protected:
  TlsTest() : ca_("strata-test-ca"), other_ca_("other-ca") {}

  std::string Path(const std::string& name) {
    return absl::StrCat(::testing::TempDir(), "/", test_info_name(), "-", name);
  }
  static std::string test_info_name() {
    return ::testing::UnitTest::GetInstance()->current_test_info()->name();
  }
  // Writes a certificate and key (cert.pem, key.pem with `prefix`) and returns their options.
  TlsOptions Write(const TestCertificate& c, const std::string& prefix, const std::string& ca_pem) {
    TlsOptions o;
    o.cert_file = Path(prefix + "cert.pem");
    o.key_file = Path(prefix + "key.pem");
    WriteTestFile(o.cert_file, c.cert_pem);
    WriteTestFile(o.key_file, c.key_pem);
    if (!ca_pem.empty()) {
      o.ca_file = Path(prefix + "ca.pem");
      WriteTestFile(o.ca_file, ca_pem);
    }
    return o;
  }
  TestCertificate Localhost(TestCa& ca) {
    TestCertificateSpec spec;
    spec.common_name = "strata-server";
    spec.dns_names = {"localhost", "strata-worker"};
    spec.ips = {"127.0.0.1"};
    return ca.Issue(spec);
  }
  TlsOptions ClientTrusting(const std::string& ca_pem, const std::string& prefix) {
    TlsOptions o;
    o.ca_file = Path(prefix + "client-ca.pem");
    WriteTestFile(o.ca_file, ca_pem);
    return o;
  }

  void Serve(const TlsOptions& options) {
    absl::StatusOr<GrpcCredentials> creds = GrpcCredentials::Load(options);
    ASSERT_TRUE(creds.ok()) << creds.status();
    absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> server_creds =
        creds->ServerCredentials();
    ASSERT_TRUE(server_creds.ok()) << server_creds.status();
    GrpcServerOptions server_options;
    server_options.credentials = *server_creds;
    server_options.health_listen_address = "127.0.0.1:0";
    auto server =
        GrpcServer::Start(server_options, {{&service_, strata::v1::Serving::service_full_name()}});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }

  // A health check through `channel`: OK with the status, or the call's error.
  static grpc::Status Check(const std::shared_ptr<grpc::Channel>& channel,
                            HealthResponse* response = nullptr) {
    HealthResponse scratch;
    auto stub = grpc::health::v1::Health::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    return stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(),
                       response != nullptr ? response : &scratch);
  }
  // An empty reflection stream: OK where the server reflects, UNIMPLEMENTED where it does not.
  static grpc::Status Reflect(const std::shared_ptr<grpc::Channel>& channel) {
    grpc::GenericStub stub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::CompletionQueue cq;
    auto call = stub.PrepareCall(
        &ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
    void* tag = nullptr;
    bool ok = false;
    grpc::Status status;
    call->StartCall(reinterpret_cast<void*>(1));
    cq.Next(&tag, &ok);
    if (ok) {
      call->WritesDone(reinterpret_cast<void*>(2));
      cq.Next(&tag, &ok);
    }
    call->Finish(&status, reinterpret_cast<void*>(3));
    while (cq.Next(&tag, &ok) && tag != reinterpret_cast<void*>(3)) {
    }
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
    return status;
  }
  grpc::Status CheckWith(const TlsOptions& client, const std::string& target) {
    absl::StatusOr<GrpcCredentials> creds = GrpcCredentials::Load(client);
    EXPECT_TRUE(creds.ok()) << creds.status();
    if (!creds.ok()) return grpc::Status(grpc::StatusCode::INTERNAL, "no credentials");
    return Check(creds->NewChannel(target));
  }
  std::string Target(const std::string& host) { return absl::StrCat(host, ":", server_->port()); }

  TestCa ca_;
  TestCa other_ca_;
  EmptyServing service_;
  std::unique_ptr<GrpcServer> server_;
};

TEST_F(TlsTest, CheckReportsTheCertificate) {
  TlsOptions o = Write(Localhost(ca_), "", ca_.cert_pem());
  absl::StatusOr<TlsCertificateInfo> info = CheckTlsFiles(o);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->subject, "CN=strata-server");
  EXPECT_EQ(info->names, "DNS:localhost, DNS:strata-worker, IP:127.0.0.1");
  EXPECT_GT(info->not_after, absl::Now() + absl::Hours(23));
  EXPECT_LT(info->not_after, absl::Now() + absl::Hours(25));
}

TEST_F(TlsTest, BadFilesAreRefusedNamingTheFlag) {
  const TlsOptions good = Write(Localhost(ca_), "", ca_.cert_pem());
  auto expect_error = [](const TlsOptions& o, const std::string& want) {
    absl::StatusOr<GrpcCredentials> creds = GrpcCredentials::Load(o);
    ASSERT_FALSE(creds.ok());
    EXPECT_EQ(creds.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(creds.status().message()), HasSubstr(want));
  };
  TlsOptions o = good;
  o.key_file.clear();
  expect_error(o, "--tls_cert is given without --tls_key");
  o = good;
  o.cert_file.clear();
  o.ca_file.clear();
  expect_error(o, "--tls_key is given without --tls_cert");
  o = good;
  o.cert_file = Path("missing.pem");
  expect_error(o, absl::StrCat("--tls_cert: cannot open ", o.cert_file));
  o = good;
  o.ca_file = Path("not-pem.txt");
  WriteTestFile(o.ca_file, "not a certificate\n");
  expect_error(o, absl::StrCat("--tls_ca: ", o.ca_file, " holds no PEM certificate"));
  o = good;
  o.key_file = Path("cert-as-key.pem");
  WriteTestFile(o.key_file, Localhost(ca_).cert_pem);
  expect_error(o, "--tls_key: ");
  // Another certificate's key.
  o = good;
  o.key_file = Path("other-key.pem");
  WriteTestFile(o.key_file, Localhost(ca_).key_pem);
  expect_error(o, "--tls_key: the key in");
  // Expired, and not yet valid.
  TestCertificateSpec spec;
  spec.valid_from = absl::Hours(-48);
  spec.valid_until = absl::Hours(-24);
  expect_error(Write(ca_.Issue(spec), "expired-", ""), "expired at");
  spec.valid_from = absl::Hours(24);
  spec.valid_until = absl::Hours(48);
  expect_error(Write(ca_.Issue(spec), "future-", ""), "is not valid until");
  // Client certificates demanded with nothing to check them by.
  o = good;
  o.ca_file.clear();
  o.client_auth = TlsClientAuth::kRequire;
  expect_error(o, "--tls_client_auth=require needs --tls_ca");

  // Settings that mean something only with TLS, without it: refused, not served in plaintext.
  TlsOptions plain;
  plain.server_name = "strata.internal";
  expect_error(plain, "--tls_server_name is given without TLS");
  plain = TlsOptions();
  plain.client_auth = TlsClientAuth::kRequire;
  expect_error(plain, "--tls_client_auth=require is given without --tls_cert");

  EXPECT_FALSE(ParseTlsClientAuth("maybe", "--tls_client_auth").ok());
  EXPECT_EQ(*ParseTlsClientAuth("optional", "--tls_client_auth"), TlsClientAuth::kOptional);
}

TEST_F(TlsTest, ClientOnlyCredentialsCannotServe) {
  absl::StatusOr<GrpcCredentials> creds = GrpcCredentials::Load(ClientTrusting(ca_.cert_pem(), ""));
  ASSERT_TRUE(creds.ok()) << creds.status();
  EXPECT_TRUE(creds->tls());
  EXPECT_EQ(creds->ServerCredentials().status().code(), absl::StatusCode::kFailedPrecondition);
  // Plaintext both ways when nothing is given.
  absl::StatusOr<GrpcCredentials> plain = GrpcCredentials::Load(TlsOptions());
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(plain->tls());
  EXPECT_TRUE(plain->ServerCredentials().ok());
}

TEST_F(TlsTest, TlsServerAnswersClientsThatTrustItsCa) {
  ASSERT_NO_FATAL_FAILURE(Serve(Write(Localhost(ca_), "server-", "")));
  EXPECT_TRUE(server_->tls());
  HealthResponse health;
  absl::StatusOr<GrpcCredentials> creds = GrpcCredentials::Load(ClientTrusting(ca_.cert_pem(), ""));
  ASSERT_TRUE(creds.ok());
  grpc::Status s = Check(creds->NewChannel(Target("127.0.0.1")), &health);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(health.status(), HealthResponse::SERVING);
  // (The address dialled is checked against the certificate's IP address here; a name given as
  // --tls_server_name against its DNS names in ServerNameIsChecked.)

  // A plaintext client, and one that trusts another CA, get nowhere.
  s = Check(grpc::CreateChannel(Target("127.0.0.1"), grpc::InsecureChannelCredentials()));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  s = CheckWith(ClientTrusting(other_ca_.cert_pem(), "other-"), Target("127.0.0.1"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
}

TEST_F(TlsTest, ServerNameIsChecked) {
  TestCertificateSpec spec;
  spec.common_name = "worker";
  spec.dns_names = {"strata-worker"};  // not the address dialled
  ASSERT_NO_FATAL_FAILURE(Serve(Write(ca_.Issue(spec), "server-", "")));
  TlsOptions client = ClientTrusting(ca_.cert_pem(), "");
  grpc::Status s = CheckWith(client, Target("127.0.0.1"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  client.server_name = "strata-worker";
  s = CheckWith(client, Target("127.0.0.1"));
  EXPECT_TRUE(s.ok()) << s.error_message();
  client.server_name = "strata-coordinator";
  s = CheckWith(client, Target("127.0.0.1"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
}

TEST_F(TlsTest, RequiredClientCertificatesAreChecked) {
  TlsOptions server = Write(Localhost(ca_), "server-", ca_.cert_pem());
  server.client_auth = TlsClientAuth::kRequire;
  ASSERT_NO_FATAL_FAILURE(Serve(server));
  // No certificate.
  grpc::Status s = CheckWith(ClientTrusting(ca_.cert_pem(), ""), Target("127.0.0.1"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  // One from the cluster's CA.
  s = CheckWith(Write(ca_.Issue(TestCertificateSpec()), "client-", ca_.cert_pem()),
                Target("127.0.0.1"));
  EXPECT_TRUE(s.ok()) << s.error_message();
  // One from another CA.
  s = CheckWith(Write(other_ca_.Issue(TestCertificateSpec()), "stranger-", ca_.cert_pem()),
                Target("127.0.0.1"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
}

TEST_F(TlsTest, HealthPortIsPlaintextAndServesHealthAlone) {
  ASSERT_NO_FATAL_FAILURE(Serve(Write(Localhost(ca_), "server-", "")));
  ASSERT_NE(server_->health_port(), 0);
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->health_port()),
                                     grpc::InsecureChannelCredentials());
  HealthResponse health;
  grpc::Status s = Check(channel, &health);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(health.status(), HealthResponse::SERVING);
  // The API is not there.
  auto serving = strata::v1::Serving::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  strata::v1::ListModelsResponse models;
  s = serving->ListModels(&ctx, strata::v1::ListModelsRequest(), &models);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED) << s.error_message();
  // Nor is reflection (the main port has it).
  EXPECT_EQ(Reflect(channel).error_code(), grpc::StatusCode::UNIMPLEMENTED);
  {
    absl::StatusOr<GrpcCredentials> creds =
        GrpcCredentials::Load(ClientTrusting(ca_.cert_pem(), ""));
    ASSERT_TRUE(creds.ok());
    grpc::Status r = Reflect(creds->NewChannel(Target("127.0.0.1")));
    EXPECT_TRUE(r.ok()) << r.error_message();
  }
  // It follows the server's status.
  server_->SetServing(false);
  ASSERT_TRUE(Check(channel, &health).ok());
  EXPECT_EQ(health.status(), HealthResponse::NOT_SERVING);
}

TEST_F(TlsTest, RotatedCertificatesAreServedWithoutARestart) {
  TlsOptions server = Write(Localhost(ca_), "server-", "");
  server.reload_interval = absl::Seconds(1);
  ASSERT_NO_FATAL_FAILURE(Serve(server));
  const TlsOptions other_client = ClientTrusting(other_ca_.cert_pem(), "");
  ASSERT_EQ(CheckWith(other_client, Target("127.0.0.1")).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // The files replaced by a certificate of the other CA: new connections get it.
  const TestCertificate next = Localhost(other_ca_);
  WriteTestFile(server.key_file, next.key_pem);
  WriteTestFile(server.cert_file, next.cert_pem);
  grpc::Status s;
  for (int i = 0; i < 100; ++i) {
    s = CheckWith(other_client, Target("127.0.0.1"));
    if (s.ok()) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(CheckWith(ClientTrusting(ca_.cert_pem(), "old-"), Target("127.0.0.1")).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

}  // namespace
}  // namespace strata
