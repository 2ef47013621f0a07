// TLS for Strata's gRPC traffic: the coordinator's API, the coordinator's calls to workers and to
// peer coordinators, and the workers' KV copies from one another.
//
// One set of PEM files serves a process both ways, the layout of a Kubernetes TLS Secret (and of
// cert-manager's): its certificate chain and key (its identity, as a server and, for mutual TLS, as
// a client), and the CA bundle that verifies its peers. A process given a certificate serves TLS
// only, and calls its peers over TLS, presenting the same certificate; a client given only a CA
// bundle (stratactl, loadgen) calls over TLS without a certificate of its own.
//
// The files are checked once at start, so that a wrong path, an expired certificate or a key that
// does not belong to the certificate stops the process with a message naming the flag, and then
// watched: gRPC reads them again every `reload_interval`, so certificates rotate without a restart
// (replace them whole, as a Secret volume does, by renaming a new directory or symlink over the
// old).
//
// Peers' certificates are checked against the CA bundle and against the name the caller dialled
// (the host of "host:port"), or `server_name` when given: the way to use one certificate for every
// worker of a cluster whose workers are dialled by address (a pod's IP).
#ifndef STRATA_COMMON_TLS_H_
#define STRATA_COMMON_TLS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace strata {

// Whether a TLS server asks its clients for certificates of their own (mutual TLS).
enum class TlsClientAuth {
  kNone,      // no; anyone who trusts the server's certificate may call
  kOptional,  // asked for, checked against the CA bundle when given
  kRequire,   // a client without a certificate the CA bundle verifies is refused at the handshake
};

// "none", "optional", "require"; INVALID_ARGUMENT naming `flag` for anything else.
absl::StatusOr<TlsClientAuth> ParseTlsClientAuth(const std::string& text, const std::string& flag);
const char* TlsClientAuthName(TlsClientAuth auth);

// Every binary takes these as --tls_cert, --tls_key, --tls_ca, --tls_server_name and
// --tls_client_auth, and error messages name them so.
struct TlsOptions {
  // PEM: this process's certificate chain (its own certificate first) and private key. Both or
  // neither. With them a server serves TLS only.
  std::string cert_file;
  std::string key_file;
  // PEM: the CA certificates that verify peers (servers this process calls and, with client_auth,
  // clients calling it). Empty: servers are verified against the system's CA certificates.
  std::string ca_file;
  // TLS even without files: a client verifying servers by the system's CA certificates (the flag
  // value --tls_ca=system).
  bool system_ca = false;
  // The name servers' certificates must carry (a DNS SAN), instead of the host dialled.
  std::string server_name;
  // A server's demand for client certificates (required client_auth needs ca_file).
  TlsClientAuth client_auth = TlsClientAuth::kNone;
  // How often the files are read again for rotated certificates.
  absl::Duration reload_interval = absl::Seconds(60);

  // Any TLS at all: a certificate (server and client), a CA bundle or the system's (client only).
  bool enabled() const { return !cert_file.empty() || !ca_file.empty() || system_ca; }
};

// OpenSSL's queued errors as text, "; "-separated (the queue emptied); "" when there are none.
std::string OpensslErrorText();

// What the checks found in a process's certificate, for its start-up log line.
struct TlsCertificateInfo {
  std::string subject;   // the leaf's subject, one line ("CN=strata-worker")
  std::string names;     // its subject alternative names, comma-separated ("DNS:a, IP:10.0.0.1")
  absl::Time not_after;  // when it expires
};

// Checks the files of `options` with OpenSSL: each readable and holding what it should (at least
// one certificate; one private key), the certificate in force (not before its start, not expired)
// and the key the certificate's. INVALID_ARGUMENT naming the flag and the file otherwise. Returns
// the certificate's details (empty without a certificate).
absl::StatusOr<TlsCertificateInfo> CheckTlsFiles(const TlsOptions& options);

// The credentials a process's servers listen with and its channels call with. A value: copies share
// the gRPC credentials, which hold the file watcher (one thread a process, however many channels).
// Default: plaintext both ways.
class GrpcCredentials {
 public:
  GrpcCredentials();

  // TLS as `options` say (plaintext when !options.enabled()), after CheckTlsFiles. A server given
  // these without a certificate is an error (ServerCredentials says so).
  static absl::StatusOr<GrpcCredentials> Load(const TlsOptions& options);

  bool tls() const { return tls_; }
  // For listening: plaintext, or TLS with the certificate. FAILED_PRECONDITION for TLS options
  // without a certificate (a client-only configuration).
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials() const;
  // A channel to `target` ("host:port") with these credentials and `args` (plus the server-name
  // override, when set).
  std::shared_ptr<grpc::Channel> NewChannel(const std::string& target,
                                            grpc::ChannelArguments args) const;
  std::shared_ptr<grpc::Channel> NewChannel(const std::string& target) const {
    return NewChannel(target, grpc::ChannelArguments());
  }

 private:
  bool tls_ = false;
  std::string server_name_;
  std::shared_ptr<grpc::ChannelCredentials> channel_;
  std::shared_ptr<grpc::ServerCredentials> server_;  // null when TLS without a certificate
};

}  // namespace strata

#endif  // STRATA_COMMON_TLS_H_
