#include "common/tls_test_certs.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "common/tls_stream.h"
#include "openssl/ec.h"
#include "openssl/err.h"
#include "openssl/pem.h"
#include "openssl/x509v3.h"

namespace strata {
namespace {

UniqueEvpPkey NewKey() {
  UniqueEvpPkey key(EVP_EC_gen("P-256"));
  CHECK(key != nullptr) << "EVP_EC_gen failed";
  return key;
}

void AddExtension(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  CHECK(ext != nullptr) << "extension " << nid << "=" << value;
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}

// A certificate for `key` named `common_name`, not yet signed or extended.
UniqueX509 NewCertificate(EVP_PKEY* key, const std::string& common_name, long serial,
                          absl::Duration valid_from, absl::Duration valid_until) {
  UniqueX509 cert(X509_new());
  CHECK(cert != nullptr);
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), serial);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), absl::ToInt64Seconds(valid_from));
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), absl::ToInt64Seconds(valid_until));
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(common_name.c_str()), -1, -1,
                             0);
  return cert;
}

std::string CertPem(X509* cert) {
  UniqueBio bio(BIO_new(BIO_s_mem()));
  CHECK(PEM_write_bio_X509(bio.get(), cert) == 1);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

std::string KeyPem(EVP_PKEY* key) {
  UniqueBio bio(BIO_new(BIO_s_mem()));
  CHECK(PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) == 1);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

}  // namespace

TestCa::TestCa(const std::string& name) : key_(NewKey()) {
  cert_ = NewCertificate(key_.get(), name, 1, absl::Hours(-1), absl::Hours(24 * 30));
  X509_set_issuer_name(cert_.get(), X509_get_subject_name(cert_.get()));
  AddExtension(cert_.get(), cert_.get(), NID_basic_constraints, "critical,CA:TRUE");
  AddExtension(cert_.get(), cert_.get(), NID_key_usage, "critical,keyCertSign,cRLSign");
  AddExtension(cert_.get(), cert_.get(), NID_subject_key_identifier, "hash");
  CHECK(X509_sign(cert_.get(), key_.get(), EVP_sha256()) > 0);
  cert_pem_ = CertPem(cert_.get());
}

TestCertificate TestCa::Issue(const TestCertificateSpec& spec) {
  UniqueEvpPkey key = NewKey();
  UniqueX509 cert = NewCertificate(key.get(), spec.common_name, next_serial_++, spec.valid_from,
                                   spec.valid_until);
  X509_set_issuer_name(cert.get(), X509_get_subject_name(cert_.get()));
  AddExtension(cert.get(), cert_.get(), NID_basic_constraints, "critical,CA:FALSE");
  AddExtension(cert.get(), cert_.get(), NID_key_usage, "critical,digitalSignature");
  AddExtension(cert.get(), cert_.get(), NID_ext_key_usage, "serverAuth,clientAuth");
  AddExtension(cert.get(), cert_.get(), NID_authority_key_identifier, "keyid:always");
  std::vector<std::string> names;
  for (const std::string& d : spec.dns_names) names.push_back(absl::StrCat("DNS:", d));
  for (const std::string& ip : spec.ips) names.push_back(absl::StrCat("IP:", ip));
  if (!names.empty()) {
    AddExtension(cert.get(), cert_.get(), NID_subject_alt_name, absl::StrJoin(names, ","));
  }
  CHECK(X509_sign(cert.get(), key_.get(), EVP_sha256()) > 0);
  return TestCertificate{CertPem(cert.get()), KeyPem(key.get())};
}

absl::StatusOr<std::unique_ptr<TestTlsClient>> TestTlsClient::Connect(
    int port, const std::string& ca_pem, const std::string& server_name) {
  std::unique_ptr<TestTlsClient> c(new TestTlsClient());
  c->ctx_ = SSL_CTX_new(TLS_client_method());
  CHECK(c->ctx_ != nullptr);
  X509_STORE* store = SSL_CTX_get_cert_store(c->ctx_);
  {
    UniqueBio bio(BIO_new_mem_buf(ca_pem.data(), static_cast<int>(ca_pem.size())));
    UniqueX509 ca(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    CHECK(ca != nullptr) << "the CA is not PEM";
    X509_STORE_add_cert(store, ca.get());  // takes its own reference
  }
  SSL_CTX_set_verify(c->ctx_, SSL_VERIFY_PEER, nullptr);
  c->fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(c->fd_ >= 0);
  timeval tv{10, 0};
  ::setsockopt(c->fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(c->fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(c->fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return absl::UnavailableError(absl::StrCat("connect: ", strerror(errno)));
  }
  c->ssl_ = SSL_new(c->ctx_);
  // Writes to a server that closed first fail with EPIPE, without killing the test with SIGPIPE.
  BIO* bio = NewSocketBioWithoutSigpipe(c->fd_);
  CHECK(bio != nullptr);
  SSL_set_bio(c->ssl_, bio, bio);
  SSL_set_tlsext_host_name(c->ssl_, server_name.c_str());
  SSL_set1_host(c->ssl_, server_name.c_str());
  if (SSL_connect(c->ssl_) != 1) {
    char buf[256] = "no detail";
    if (const unsigned long e = ERR_get_error(); e != 0) ERR_error_string_n(e, buf, sizeof(buf));
    ERR_clear_error();
    return absl::UnavailableError(absl::StrCat("TLS handshake: ", buf));
  }
  return c;
}

TestTlsClient::~TestTlsClient() {
  if (ssl_ != nullptr) SSL_free(ssl_);
  if (ctx_ != nullptr) SSL_CTX_free(ctx_);
  if (fd_ >= 0) ::close(fd_);
}

bool TestTlsClient::Write(absl::string_view data) {
  while (!data.empty()) {
    const int n = SSL_write(ssl_, data.data(), static_cast<int>(data.size()));
    if (n <= 0) {
      ERR_clear_error();
      return false;
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

std::string TestTlsClient::Read(size_t at_most) {
  std::string out(at_most, '\0');
  const int n = SSL_read(ssl_, out.data(), static_cast<int>(at_most));
  if (n <= 0) {
    ERR_clear_error();
    return "";
  }
  out.resize(static_cast<size_t>(n));
  return out;
}

std::string TestTlsClient::ReadToEnd() {
  std::string out;
  for (std::string part = Read(); !part.empty(); part = Read()) out += part;
  return out;
}

void TestTlsClient::CloseNotify() {
  SSL_shutdown(ssl_);
  ERR_clear_error();
}

void TestTlsClient::Abort() {
  if (fd_ >= 0) {
    linger l{1, 0};  // a reset, as a process killed mid-connection sends
    ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    ::close(fd_);
    fd_ = -1;
  }
}

void WriteTestFile(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    CHECK(out.good()) << "cannot write " << tmp;
  }
  CHECK(std::rename(tmp.c_str(), path.c_str()) == 0) << "cannot rename " << tmp;
}

}  // namespace strata
