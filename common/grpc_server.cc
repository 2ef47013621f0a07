#include "common/grpc_server.h"

#include <memory>
#include <utility>
#include <vector>

#include "absl/base/call_once.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/log.h"
#include "grpc/support/log.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/impl/server_builder_plugin.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"

namespace strata {
namespace {

void GprLogToStrata(gpr_log_func_args* args) {
  LogSeverity severity = LogSeverity::kInfo;
  if (args->severity == GPR_LOG_SEVERITY_ERROR) {
    severity = LogSeverity::kError;
  } else if (args->severity == GPR_LOG_SEVERITY_DEBUG) {
    if (!VLogIsOn(2)) return;
  }
  log_internal::LogMessage(args->file, args->line, severity).stream() << "grpc: " << args->message;
}

absl::once_flag g_init_once;

void InitGrpcOnce() {
  absl::call_once(g_init_once, [] {
    gpr_set_log_function(&GprLogToStrata);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    grpc::EnableDefaultHealthCheckService(true);
  });
}

// Leaves server reflection (which InitGrpcOnce adds to every server) out of one server: the
// plaintext health port answers health checks and nothing else.
class WithoutReflection final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    for (auto it = plugins->begin(); it != plugins->end();) {
      it = (*it)->name() == "proto_server_reflection" ? plugins->erase(it) : it + 1;
    }
  }
};

// "host:port" -> "host"; keeps IPv6 brackets.
absl::string_view HostPart(absl::string_view address) {
  const size_t colon = address.rfind(':');
  return colon == absl::string_view::npos ? address : address.substr(0, colon);
}

}  // namespace

absl::StatusOr<std::unique_ptr<GrpcServer>> GrpcServer::Start(
    const GrpcServerOptions& options, std::vector<ServiceToServe> services) {
  InitGrpcOnce();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(
      options.listen_address,
      options.credentials != nullptr ? options.credentials : grpc::InsecureServerCredentials(),
      &port);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  // A port another process (or server) holds is an error, not a silently shared listener.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  std::vector<std::string> names;
  for (const ServiceToServe& s : services) {
    builder.RegisterService(s.service);
    names.push_back(s.name);
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen_address, " (address in use or invalid)"));
  }
  const std::string address = absl::StrCat(HostPart(options.listen_address), ":", port);
  std::unique_ptr<GrpcServer> out(new GrpcServer(std::move(server), port, address, names));
  out->max_message_bytes_ = options.max_message_bytes;
  out->tls_ = options.credentials != nullptr;
  if (!options.health_listen_address.empty()) {
    // No services but the default health service, which every server built here has.
    grpc::ServerBuilder health_builder;
    health_builder.SetOption(std::make_unique<WithoutReflection>());
    // Health checks alone: every other method, through the generic service, is UNIMPLEMENTED
    // (and without any service of its own, gRPC would start no thread to serve the port).
    out->unknown_ = std::make_unique<grpc::CallbackGenericService>();
    health_builder.RegisterCallbackGenericService(out->unknown_.get());
    health_builder.AddListeningPort(options.health_listen_address,
                                    grpc::InsecureServerCredentials(), &out->health_port_);
    health_builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    out->health_server_ = health_builder.BuildAndStart();
    if (out->health_server_ == nullptr || out->health_port_ == 0) {
      out->server_->Shutdown(absl::ToChronoTime(absl::Now()));
      return absl::UnavailableError(absl::StrCat("cannot listen on ", options.health_listen_address,
                                                 " (the health port: address in use or invalid)"));
    }
  }
  out->SetServing(true);
  for (grpc::Server* s : {out->server_.get(), out->health_server_.get()}) {
    if (s == nullptr) continue;
    if (grpc::HealthCheckServiceInterface* health = s->GetHealthCheckService()) {
      health->SetServingStatus(kLivenessService, true);
    }
  }
  LOG(INFO) << "serving on " << address << (out->tls_ ? " (TLS)" : "")
            << (out->health_port_ != 0
                    ? absl::StrCat("; health alone, plaintext, on port ", out->health_port_)
                    : "");
  return out;
}

GrpcServer::GrpcServer(std::unique_ptr<grpc::Server> server, int port, std::string address,
                       std::vector<std::string> service_names)
    : server_(std::move(server)),
      port_(port),
      address_(std::move(address)),
      service_names_(std::move(service_names)) {}

GrpcServer::~GrpcServer() { Shutdown(absl::ZeroDuration()); }

void GrpcServer::SetServing(bool serving) {
  for (grpc::Server* s : {server_.get(), health_server_.get()}) {
    if (s == nullptr) continue;
    grpc::HealthCheckServiceInterface* health = s->GetHealthCheckService();
    if (health == nullptr) continue;
    health->SetServingStatus("", serving);
    for (const std::string& name : service_names_) health->SetServingStatus(name, serving);
  }
}

void GrpcServer::Shutdown(absl::Duration grace) {
  if (shut_down_.exchange(true)) return;
  SetServing(false);
  server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  if (health_server_ != nullptr) health_server_->Shutdown(absl::ToChronoTime(absl::Now()));
}

void GrpcServer::Wait() {
  server_->Wait();
  if (health_server_ != nullptr) health_server_->Wait();
}

}  // namespace strata
