#include "common/grpc_server.h"

#include <memory>
#include <string>
#include <vector>

#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"
#include "google/protobuf/dynamic_message.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "proto/strata/v1/serving.grpc.pb.h"

namespace strata {
namespace {

using ::google::protobuf::Descriptor;
using ::google::protobuf::DescriptorPool;
using ::google::protobuf::DynamicMessageFactory;
using ::google::protobuf::Message;
using HealthResponse = ::grpc::health::v1::HealthCheckResponse;

// A Serving service whose methods are all unimplemented: enough to be registered and reflected.
class EmptyServing final : public strata::v1::Serving::CallbackService {};

class GrpcServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto server = GrpcServer::Start(GrpcServerOptions{},
                                    {{&service_, strata::v1::Serving::service_full_name()}});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  }

  grpc::Status Check(const std::string& service, HealthResponse* response) {
    auto stub = grpc::health::v1::Health::NewStub(channel_);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    return stub->Check(&ctx, request, response);
  }

  // One request/response exchange on the reflection stream, with messages built from the
  // descriptors that gRPC's reflection library registers (Debian ships no reflection.proto to
  // compile).
  std::unique_ptr<Message> Reflect(const std::string& field, const std::string& value) {
    const DescriptorPool* pool = DescriptorPool::generated_pool();
    const Descriptor* req_type =
        pool->FindMessageTypeByName("grpc.reflection.v1alpha.ServerReflectionRequest");
    const Descriptor* resp_type =
        pool->FindMessageTypeByName("grpc.reflection.v1alpha.ServerReflectionResponse");
    if (req_type == nullptr || resp_type == nullptr) {
      ADD_FAILURE() << "reflection descriptors are not registered";
      return nullptr;
    }
    std::unique_ptr<Message> request(factory_.GetPrototype(req_type)->New());
    request->GetReflection()->SetString(request.get(), req_type->FindFieldByName(field), value);

    grpc::GenericStub stub(channel_);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::CompletionQueue cq;
    auto call = stub.PrepareCall(
        &ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
    void* tag = nullptr;
    bool ok = false;
    auto step = [&](intptr_t want) {
      EXPECT_TRUE(cq.Next(&tag, &ok));
      EXPECT_EQ(reinterpret_cast<intptr_t>(tag), want);
      return ok;
    };
    call->StartCall(reinterpret_cast<void*>(1));
    if (!step(1)) return nullptr;
    grpc::Slice slice(request->SerializeAsString());
    grpc::ByteBuffer out(&slice, 1);
    call->Write(out, reinterpret_cast<void*>(2));
    if (!step(2)) return nullptr;
    call->WritesDone(reinterpret_cast<void*>(3));
    step(3);
    grpc::ByteBuffer in;
    call->Read(&in, reinterpret_cast<void*>(4));
    const bool got = step(4);
    grpc::Status status;
    call->Finish(&status, reinterpret_cast<void*>(5));
    step(5);
    cq.Shutdown();
    EXPECT_TRUE(status.ok()) << status.error_message();
    if (!got) return nullptr;
    std::vector<grpc::Slice> slices;
    EXPECT_TRUE(in.Dump(&slices).ok());
    std::string bytes;
    for (const grpc::Slice& s : slices)
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    std::unique_ptr<Message> response(factory_.GetPrototype(resp_type)->New());
    EXPECT_TRUE(response->ParseFromString(bytes));
    return response;
  }

  EmptyServing service_;
  std::unique_ptr<GrpcServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  DynamicMessageFactory factory_;
};

TEST_F(GrpcServerTest, BindsAPortAndReportsIt) {
  EXPECT_GT(server_->port(), 0);
  EXPECT_EQ(server_->address(), "127.0.0.1:" + std::to_string(server_->port()));
}

TEST_F(GrpcServerTest, HealthReportsServerAndServicesAndFollowsSetServing) {
  HealthResponse r;
  ASSERT_TRUE(Check("", &r).ok());
  EXPECT_EQ(r.status(), HealthResponse::SERVING);
  ASSERT_TRUE(Check("strata.v1.Serving", &r).ok());
  EXPECT_EQ(r.status(), HealthResponse::SERVING);
  EXPECT_EQ(Check("strata.v1.Nope", &r).error_code(), grpc::StatusCode::NOT_FOUND);

  server_->SetServing(false);
  ASSERT_TRUE(Check("strata.v1.Serving", &r).ok());
  EXPECT_EQ(r.status(), HealthResponse::NOT_SERVING);
  ASSERT_TRUE(Check("", &r).ok());
  EXPECT_EQ(r.status(), HealthResponse::NOT_SERVING);
  // A draining server is still alive: liveness probes must not restart it.
  ASSERT_TRUE(Check(kLivenessService, &r).ok());
  EXPECT_EQ(r.status(), HealthResponse::SERVING);
  server_->SetServing(true);
  ASSERT_TRUE(Check("", &r).ok());
  EXPECT_EQ(r.status(), HealthResponse::SERVING);
  ASSERT_TRUE(Check(kLivenessService, &r).ok());
  EXPECT_EQ(r.status(), HealthResponse::SERVING);
}

TEST_F(GrpcServerTest, UnimplementedMethodFailsCleanlyAndServerKeepsServing) {
  auto stub = strata::v1::Serving::NewStub(channel_);
  grpc::ClientContext ctx;
  strata::v1::ListModelsResponse response;
  EXPECT_EQ(stub->ListModels(&ctx, {}, &response).error_code(), grpc::StatusCode::UNIMPLEMENTED);
  HealthResponse r;
  EXPECT_TRUE(Check("", &r).ok());
}

TEST_F(GrpcServerTest, ReflectionListsServicesAndServesTheirFiles) {
  std::unique_ptr<Message> list = Reflect("list_services", "*");
  ASSERT_NE(list, nullptr);
  const auto* refl = list->GetReflection();
  const Message& services =
      refl->GetMessage(*list, list->GetDescriptor()->FindFieldByName("list_services_response"));
  const auto* field = services.GetDescriptor()->FindFieldByName("service");
  std::vector<std::string> names;
  for (int i = 0; i < services.GetReflection()->FieldSize(services, field); ++i) {
    const Message& s = services.GetReflection()->GetRepeatedMessage(services, field, i);
    names.push_back(s.GetReflection()->GetString(s, s.GetDescriptor()->FindFieldByName("name")));
  }
  EXPECT_NE(std::find(names.begin(), names.end(), "strata.v1.Serving"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "grpc.health.v1.Health"), names.end());

  std::unique_ptr<Message> file = Reflect("file_containing_symbol", "strata.v1.Serving");
  ASSERT_NE(file, nullptr);
  const Message& fdr = file->GetReflection()->GetMessage(
      *file, file->GetDescriptor()->FindFieldByName("file_descriptor_response"));
  const auto* protos = fdr.GetDescriptor()->FindFieldByName("file_descriptor_proto");
  ASSERT_GE(fdr.GetReflection()->FieldSize(fdr, protos), 1);
  google::protobuf::FileDescriptorProto fd;
  ASSERT_TRUE(fd.ParseFromString(fdr.GetReflection()->GetRepeatedString(fdr, protos, 0)));
  EXPECT_EQ(fd.name(), "proto/strata/v1/serving.proto");
  EXPECT_EQ(fd.package(), "strata.v1");
}

TEST_F(GrpcServerTest, BusyPortIsAnErrorNotACrash) {
  EmptyServing other;
  GrpcServerOptions options;
  options.listen_address = server_->address();
  auto second = GrpcServer::Start(options, {{&other, strata::v1::Serving::service_full_name()}});
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find(server_->address()), absl::string_view::npos);
}

TEST_F(GrpcServerTest, ShutdownStopsServingAndIsIdempotent) {
  server_->Shutdown(absl::Milliseconds(100));
  server_->Shutdown(absl::ZeroDuration());
  server_->Wait();
  HealthResponse r;
  EXPECT_EQ(Check("", &r).error_code(), grpc::StatusCode::UNAVAILABLE);
}

}  // namespace
}  // namespace strata
