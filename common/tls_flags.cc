#include "common/tls_flags.h"

#include <string>

#include "absl/flags/flag.h"
#include "common/status_macros.h"

ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain (this process's first). With --tls_key: serve gRPC over TLS only, "
          "and present it to peers this process calls (mutual TLS).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert (unencrypted).");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA bundle that verifies peers: the servers this process calls and, with "
          "--tls_client_auth, its clients. Alone (no --tls_cert): call over TLS without a "
          "certificate of our own. system (or empty, with --tls_cert): servers are verified by the "
          "system's CA certificates.");
ABSL_FLAG(std::string, tls_server_name, "",
          "The DNS name servers' certificates must carry, instead of the host dialled (one "
          "certificate for workers dialled by IP address).");
ABSL_FLAG(std::string, tls_client_auth, "",
          "none | optional | require: the client certificates a TLS server asks for, checked "
          "against --tls_ca. Default: strata-worker requires them when --tls_ca is given, "
          "strata-coordinator does not ask.");
ABSL_FLAG(int, tls_reload_s, 60,
          "How often the TLS files are read again, so that certificates rotate without a restart.");

namespace strata {

absl::StatusOr<TlsOptions> TlsOptionsFromFlags(TlsClientAuth default_client_auth) {
  TlsOptions options;
  options.cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.key_file = absl::GetFlag(FLAGS_tls_key);
  options.ca_file = absl::GetFlag(FLAGS_tls_ca);
  if (options.ca_file == "system") {
    options.ca_file.clear();
    options.system_ca = true;
  }
  options.server_name = absl::GetFlag(FLAGS_tls_server_name);
  options.reload_interval = absl::Seconds(absl::GetFlag(FLAGS_tls_reload_s));
  const std::string auth = absl::GetFlag(FLAGS_tls_client_auth);
  if (auth.empty()) {
    options.client_auth = options.ca_file.empty() ? TlsClientAuth::kNone : default_client_auth;
  } else {
    ASSIGN_OR_RETURN(options.client_auth, ParseTlsClientAuth(auth, "--tls_client_auth"));
  }
  return options;
}

}  // namespace strata
