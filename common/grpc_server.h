// GrpcServer: how every Strata server (coordinator, worker) listens. Besides the given services it
// serves gRPC health checking (grpc.health.v1.Health, reporting each service and "" for the whole
// server, plus kLivenessService) and server reflection (so grpcurl and similar tools can list and
// call the API), and it routes gRPC's own log messages into common/log.h.
#ifndef STRATA_COMMON_GRPC_SERVER_H_
#define STRATA_COMMON_GRPC_SERVER_H_

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/impl/codegen/service_type.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"

namespace strata {

struct GrpcServerOptions {
  // host:port to listen on; port 0 picks a free port (see GrpcServer::port()).
  std::string listen_address = "127.0.0.1:0";
  // Largest request or response message, in bytes.
  int max_message_bytes = 64 << 20;
  // How listen_address is served: TLS (GrpcCredentials::ServerCredentials) or, when null,
  // plaintext.
  std::shared_ptr<grpc::ServerCredentials> credentials;
  // Where a second, plaintext port serves the health service alone (the same statuses as the main
  // port), for probes that cannot speak TLS (a kubelet's gRPC probe). Empty: none.
  std::string health_listen_address;
};

// A service to serve and the fully qualified name it reports health under (for a generated service
// `strata::v1::Worker`, that is `strata::v1::Worker::service_full_name()`).
struct ServiceToServe {
  grpc::Service* service;
  std::string name;
};

// The health service name that reports SERVING for as long as the server runs (Kubernetes'
// liveness probes: `grpc: {port: P, service: liveness}`).
inline constexpr char kLivenessService[] = "liveness";

// A started server. Owns the grpc::Server; the services are not owned and must outlive it.
// Thread-safe.
class GrpcServer {
 public:
  // Starts serving. UNAVAILABLE when the address cannot be bound (in use, bad host).
  static absl::StatusOr<std::unique_ptr<GrpcServer>> Start(const GrpcServerOptions& options,
                                                           std::vector<ServiceToServe> services);
  GrpcServer(const GrpcServer&) = delete;
  GrpcServer& operator=(const GrpcServer&) = delete;
  // Shuts down at once if still running.
  ~GrpcServer();

  // The port bound (the chosen one when the options asked for port 0).
  int port() const { return port_; }
  // The health-only port's, 0 without one.
  int health_port() const { return health_port_; }
  // "host:port" with the bound port, usable as a client target.
  const std::string& address() const { return address_; }
  // A channel to this server's own services inside the process (no socket), for front ends that
  // the same binary serves (the coordinator's HTTP API).
  std::shared_ptr<grpc::Channel> InProcessChannel() {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(max_message_bytes_);
    return server_->InProcessChannel(args);
  }

  // Reports SERVING or NOT_SERVING for every service and for "" (a draining server reports
  // NOT_SERVING so that load balancers stop sending to it, while in-flight calls finish). The
  // health service name kLivenessService is left SERVING: a liveness probe asks that one, so that a
  // drained, idle server is not restarted.
  void SetServing(bool serving);

  // Stops accepting calls, reports NOT_SERVING, and cancels calls still running after `grace`.
  // Later calls do nothing.
  void Shutdown(absl::Duration grace);
  // Blocks until the server has shut down.
  void Wait();

  // Whether the server calls can reach is TLS.
  bool tls() const { return tls_; }

 private:
  GrpcServer(std::unique_ptr<grpc::Server> server, int port, std::string address,
             std::vector<std::string> service_names);

  std::unique_ptr<grpc::Server> server_;
  // The plaintext health-only port, or null; every method but health checks answers
  // UNIMPLEMENTED there (unknown_, which outlives it).
  std::unique_ptr<grpc::CallbackGenericService> unknown_;
  std::unique_ptr<grpc::Server> health_server_;
  int health_port_ = 0;
  bool tls_ = false;
  const int port_;
  const std::string address_;
  int max_message_bytes_ = 0;  // GrpcServerOptions::max_message_bytes
  const std::vector<std::string> service_names_;
  std::atomic<bool> shut_down_{false};
};

}  // namespace strata

#endif  // STRATA_COMMON_GRPC_SERVER_H_
