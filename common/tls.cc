#include "common/tls.h"

#include <arpa/inet.h>

#include <algorithm>
#include <ctime>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/openssl_ptr.h"
#include "common/status_macros.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_certificate_verifier.h"
#include "grpcpp/security/tls_credentials_options.h"
#include "openssl/err.h"
#include "openssl/pem.h"
#include "openssl/x509v3.h"

namespace strata {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& flag, const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (!text.ok()) {
    // "cannot open PATH: why"
    return absl::InvalidArgumentError(absl::StrCat(flag, ": ", text.status().message()));
  }
  return text;
}

// Every certificate in `pem`, in order.
std::vector<UniqueX509> ParseCertificates(const std::string& pem) {
  std::vector<UniqueX509> out;
  UniqueBio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  while (bio != nullptr) {
    UniqueX509 cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (cert == nullptr) break;
    out.push_back(std::move(cert));
  }
  ERR_clear_error();  // the end of the input reads as an error
  return out;
}

// No passphrase: an encrypted key fails to load instead of prompting on a terminal.
int NoPassphrase(char*, int, int, void*) { return 0; }

absl::Time AsnTime(const ASN1_TIME* t) {
  struct tm tm = {};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1) return absl::InfinitePast();
  return absl::FromTimeT(timegm(&tm));
}

std::string Subject(X509* cert) {
  UniqueBio bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr) return "";
  X509_NAME_print_ex(bio.get(), X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, n > 0 ? static_cast<size_t>(n) : 0);
}

std::string AltNames(X509* cert) {
  GENERAL_NAMES* names =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  if (names == nullptr) return "";
  std::vector<std::string> out;
  for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
    const GENERAL_NAME* name = sk_GENERAL_NAME_value(names, i);
    if (name->type == GEN_DNS) {
      const ASN1_STRING* s = name->d.dNSName;
      out.push_back(
          absl::StrCat("DNS:", std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                                           static_cast<size_t>(ASN1_STRING_length(s)))));
    } else if (name->type == GEN_IPADD) {
      const ASN1_OCTET_STRING* s = name->d.iPAddress;
      char text[INET6_ADDRSTRLEN] = "?";
      const int length = ASN1_STRING_length(s);
      if (length == 4 || length == 16) {
        inet_ntop(length == 4 ? AF_INET : AF_INET6, ASN1_STRING_get0_data(s), text, sizeof(text));
      }
      out.push_back(absl::StrCat("IP:", text));
    }
  }
  GENERAL_NAMES_free(names);
  return absl::StrJoin(out, ", ");
}

std::string UtcText(absl::Time t) {
  return absl::FormatTime("%Y-%m-%d %H:%M:%S UTC", t, absl::UTCTimeZone());
}

// Logs a warning when `leaf` (with the rest of `chain` as intermediates) does not verify against
// the CA bundle: its peers, checking it against the same bundle, would refuse it. Not an error,
// since a server may present a publicly trusted certificate to its clients and still verify its
// own peers with a private CA.
void WarnUnlessSignedByCa(const std::vector<UniqueX509>& chain, const std::vector<UniqueX509>& cas,
                          const TlsOptions& options) {
  UniqueX509Store store(X509_STORE_new());
  UniqueX509StoreCtx ctx(X509_STORE_CTX_new());
  STACK_OF(X509)* untrusted = sk_X509_new_null();
  if (store == nullptr || ctx == nullptr || untrusted == nullptr) {
    sk_X509_free(untrusted);
    return;
  }
  for (const UniqueX509& ca : cas) X509_STORE_add_cert(store.get(), ca.get());
  for (size_t i = 1; i < chain.size(); ++i) sk_X509_push(untrusted, chain[i].get());
  if (X509_STORE_CTX_init(ctx.get(), store.get(), chain.front().get(), untrusted) == 1 &&
      X509_verify_cert(ctx.get()) != 1) {
    LOG(WARNING) << "--tls_cert " << options.cert_file << " does not verify against --tls_ca "
                 << options.ca_file << " ("
                 << X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get()))
                 << "): peers that check it against the same CA bundle will refuse it";
  }
  ctx.reset();              // before the stack it points to
  sk_X509_free(untrusted);  // the certificates stay owned by `chain`
  ERR_clear_error();
}

}  // namespace

std::string OpensslErrorText() {
  std::string out;
  for (unsigned long e = ERR_get_error(); e != 0; e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    absl::StrAppend(&out, out.empty() ? "" : "; ", buf);
  }
  return out;
}

absl::StatusOr<TlsClientAuth> ParseTlsClientAuth(const std::string& text, const std::string& flag) {
  if (text == "none") return TlsClientAuth::kNone;
  if (text == "optional") return TlsClientAuth::kOptional;
  if (text == "require") return TlsClientAuth::kRequire;
  return absl::InvalidArgumentError(
      absl::StrCat(flag, ": \"", text, "\" is none of none, optional, require"));
}

const char* TlsClientAuthName(TlsClientAuth auth) {
  switch (auth) {
    case TlsClientAuth::kNone:
      return "none";
    case TlsClientAuth::kOptional:
      return "optional";
    case TlsClientAuth::kRequire:
      return "require";
  }
  return "?";
}

absl::StatusOr<TlsCertificateInfo> CheckTlsFiles(const TlsOptions& options) {
  if (options.cert_file.empty() != options.key_file.empty()) {
    return absl::InvalidArgumentError(options.cert_file.empty()
                                          ? "--tls_key is given without --tls_cert"
                                          : "--tls_cert is given without --tls_key");
  }
  if (options.client_auth != TlsClientAuth::kNone && options.ca_file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_client_auth=", TlsClientAuthName(options.client_auth),
                     " needs --tls_ca (the CA bundle that verifies the clients' certificates)"));
  }
  if (options.reload_interval < absl::Seconds(1)) {
    return absl::InvalidArgumentError("--tls_reload_s must be at least 1");
  }
  std::vector<UniqueX509> cas;
  if (!options.ca_file.empty()) {
    ASSIGN_OR_RETURN(const std::string pem, ReadPem("--tls_ca", options.ca_file));
    cas = ParseCertificates(pem);
    if (cas.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls_ca: ", options.ca_file, " holds no PEM certificate"));
    }
  }
  TlsCertificateInfo info;
  if (options.cert_file.empty()) return info;

  ASSIGN_OR_RETURN(const std::string cert_pem, ReadPem("--tls_cert", options.cert_file));
  std::vector<UniqueX509> chain = ParseCertificates(cert_pem);
  if (chain.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_cert: ", options.cert_file, " holds no PEM certificate"));
  }
  X509* leaf = chain.front().get();
  info.subject = Subject(leaf);
  info.names = AltNames(leaf);
  info.not_after = AsnTime(X509_get0_notAfter(leaf));
  const absl::Time not_before = AsnTime(X509_get0_notBefore(leaf));
  const absl::Time now = absl::Now();
  if (now > info.not_after) {
    return absl::InvalidArgumentError(absl::StrCat("--tls_cert: the certificate in ",
                                                   options.cert_file, " expired at ",
                                                   UtcText(info.not_after)));
  }
  if (now < not_before) {
    return absl::InvalidArgumentError(absl::StrCat("--tls_cert: the certificate in ",
                                                   options.cert_file, " is not valid until ",
                                                   UtcText(not_before)));
  }

  ASSIGN_OR_RETURN(const std::string key_pem, ReadPem("--tls_key", options.key_file));
  UniqueBio bio(BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size())));
  UniqueEvpPkey key(bio == nullptr
                        ? nullptr
                        : PEM_read_bio_PrivateKey(bio.get(), nullptr, &NoPassphrase, nullptr));
  if (key == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_key: ", options.key_file, " holds no unencrypted PEM private key", [] {
          const std::string e = OpensslErrorText();
          return e.empty() ? e : absl::StrCat(" (", e, ")");
        }()));
  }
  if (X509_check_private_key(leaf, key.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat("--tls_key: the key in ", options.key_file,
                                                   " is not the certificate's in --tls_cert ",
                                                   options.cert_file));
  }
  if (!cas.empty()) WarnUnlessSignedByCa(chain, cas, options);
  return info;
}

GrpcCredentials::GrpcCredentials()
    : channel_(grpc::InsecureChannelCredentials()), server_(grpc::InsecureServerCredentials()) {}

absl::StatusOr<GrpcCredentials> GrpcCredentials::Load(const TlsOptions& options) {
  if (!options.enabled()) {
    // Settings that mean something only with TLS: refused rather than served in plaintext.
    if (!options.key_file.empty()) {
      return absl::InvalidArgumentError("--tls_key is given without --tls_cert");
    }
    if (!options.server_name.empty()) {
      return absl::InvalidArgumentError(
          "--tls_server_name is given without TLS (--tls_ca or --tls_cert)");
    }
    if (options.client_auth != TlsClientAuth::kNone) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls_client_auth=", TlsClientAuthName(options.client_auth),
                       " is given without --tls_cert and --tls_ca"));
    }
    return GrpcCredentials();
  }
  ASSIGN_OR_RETURN(const TlsCertificateInfo info, CheckTlsFiles(options));
  const unsigned int refresh_s = static_cast<unsigned int>(
      std::max<int64_t>(1, absl::ToInt64Seconds(options.reload_interval)));
  std::shared_ptr<grpc::experimental::CertificateProviderInterface> provider;
  if (!options.cert_file.empty()) {
    provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
        options.key_file, options.cert_file, options.ca_file, refresh_s);
  } else if (!options.ca_file.empty()) {
    provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(options.ca_file,
                                                                                    refresh_s);
  }

  GrpcCredentials out;
  out.tls_ = true;
  out.server_name_ = options.server_name;

  grpc::experimental::TlsChannelCredentialsOptions client;
  if (provider != nullptr) client.set_certificate_provider(provider);
  if (!options.ca_file.empty()) client.watch_root_certs();  // else the system's CA certificates
  if (!options.cert_file.empty()) client.watch_identity_key_cert_pairs();
  client.set_verify_server_certs(true);
  client.set_certificate_verifier(
      std::make_shared<grpc::experimental::HostNameCertificateVerifier>());
  out.channel_ = grpc::experimental::TlsCredentials(client);
  if (out.channel_ == nullptr) return absl::InternalError("gRPC made no TLS channel credentials");

  out.server_ = nullptr;
  if (!options.cert_file.empty()) {
    grpc::experimental::TlsServerCredentialsOptions server(provider);
    server.watch_identity_key_cert_pairs();
    if (!options.ca_file.empty()) server.watch_root_certs();
    switch (options.client_auth) {
      case TlsClientAuth::kNone:
        server.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
        break;
      case TlsClientAuth::kOptional:
        server.set_cert_request_type(GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
        break;
      case TlsClientAuth::kRequire:
        server.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
        break;
    }
    out.server_ = grpc::experimental::TlsServerCredentials(server);
    if (out.server_ == nullptr) return absl::InternalError("gRPC made no TLS server credentials");
    LOG(INFO) << "TLS: certificate " << info.subject
              << (info.names.empty() ? "" : absl::StrCat(" [", info.names, "]")) << ", expires "
              << UtcText(info.not_after) << "; client certificates "
              << TlsClientAuthName(options.client_auth)
              << (options.ca_file.empty() ? ""
                                          : absl::StrCat("; peers verified by ", options.ca_file))
              << "; files read again every " << refresh_s << " s";
    if (info.not_after - absl::Now() < absl::Hours(24 * 14)) {
      LOG(WARNING) << "TLS: the certificate in " << options.cert_file
                   << " expires in under 14 days (" << UtcText(info.not_after) << ")";
    }
  }
  return out;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> GrpcCredentials::ServerCredentials()
    const {
  if (server_ == nullptr) {
    return absl::FailedPreconditionError(
        "TLS without a certificate of its own cannot serve: give --tls_cert and --tls_key");
  }
  return server_;
}

std::shared_ptr<grpc::Channel> GrpcCredentials::NewChannel(const std::string& target,
                                                           grpc::ChannelArguments args) const {
  if (tls_ && !server_name_.empty()) args.SetSslTargetNameOverride(server_name_);
  return grpc::CreateCustomChannel(target, channel_, args);
}

}  // namespace strata
