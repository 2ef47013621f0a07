// The TLS flags of Strata's binaries (strata-coordinator, strata-worker, loadgen), defined once:
//   --tls_cert, --tls_key   PEM certificate chain and key: serve TLS only, and present them to
//   peers
//   --tls_ca                PEM CA bundle that verifies peers (default: the system's, for servers)
//   --tls_server_name       the name peers' certificates must carry, instead of the host dialled
//   --tls_client_auth       none | optional | require: client certificates a TLS server asks for
//   --tls_reload_s          how often the files are read again (rotation without a restart)
// See common/tls.h.
#ifndef STRATA_COMMON_TLS_FLAGS_H_
#define STRATA_COMMON_TLS_FLAGS_H_

#include "absl/status/statusor.h"
#include "common/tls.h"

namespace strata {

// The options the flags give; --tls_client_auth unset takes `default_client_auth` when a CA bundle
// is given, else none. INVALID_ARGUMENT naming the flag for a bad value.
absl::StatusOr<TlsOptions> TlsOptionsFromFlags(TlsClientAuth default_client_auth);

}  // namespace strata

#endif  // STRATA_COMMON_TLS_FLAGS_H_
