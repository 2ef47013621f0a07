// grpc_health_probe ADDRESS [SERVICE]: asks a server's grpc.health.v1.Health service whether
// SERVICE ("" for the whole server) is SERVING, the way a kubelet's gRPC probe does. Exits 0 when
// it is, 1 when it answers anything else, 2 when it cannot be reached within a second. For tests
// that stand in for the kubelet.
#include <chrono>
#include <cstdio>
#include <string>

#include "grpcpp/grpcpp.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::fprintf(stderr, "usage: grpc_health_probe ADDRESS [SERVICE]\n");
    return 2;
  }
  auto channel = grpc::CreateChannel(argv[1], grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
  grpc::health::v1::HealthCheckRequest request;
  if (argc == 3) request.set_service(argv[2]);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) {
    std::fprintf(stderr, "%s: %s\n", argv[1], status.error_message().c_str());
    return 2;
  }
  if (response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    std::fprintf(
        stderr, "%s: %s\n", argv[1],
        grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()).c_str());
    return 1;
  }
  return 0;
}
