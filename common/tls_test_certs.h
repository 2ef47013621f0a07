// Certificates for tests of TLS: a throwaway CA that issues leaf certificates, all made in memory
// with OpenSSL (P-256 keys, SHA-256 signatures), so that tests need no files checked in and no
// openssl binary. Test-only.
#ifndef STRATA_COMMON_TLS_TEST_CERTS_H_
#define STRATA_COMMON_TLS_TEST_CERTS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/openssl_ptr.h"
#include "openssl/ssl.h"

namespace strata {

// A certificate and its key, PEM.
struct TestCertificate {
  std::string cert_pem;
  std::string key_pem;
};

struct TestCertificateSpec {
  std::string common_name = "strata-test";
  std::vector<std::string> dns_names;           // subject alternative names
  std::vector<std::string> ips;                 // "127.0.0.1", "::1"
  absl::Duration valid_from = absl::Hours(-1);  // relative to now
  absl::Duration valid_until = absl::Hours(24);
};

// A self-signed CA. Not thread-safe (tests use one from one thread).
class TestCa {
 public:
  explicit TestCa(const std::string& name);
  TestCa(const TestCa&) = delete;
  TestCa& operator=(const TestCa&) = delete;

  const std::string& cert_pem() const { return cert_pem_; }
  // A leaf certificate signed by this CA (usable by servers and clients alike).
  TestCertificate Issue(const TestCertificateSpec& spec);

 private:
  UniqueEvpPkey key_;
  UniqueX509 cert_;
  std::string cert_pem_;
  long next_serial_ = 2;
};

// Writes `text` to `path` (replacing it), CHECK-failing the test on error.
void WriteTestFile(const std::string& path, const std::string& text);

// A blocking TLS client connection for tests (an HTTPS client's part): connects to
// 127.0.0.1:port and checks the server's certificate against `ca_pem` and `server_name` (also
// sent as SNI). Reads and writes give up after 10 s. One thread at a time: OpenSSL does not allow
// reading and writing one connection from two threads at once.
class TestTlsClient {
 public:
  // UNAVAILABLE with OpenSSL's reason when the handshake fails (a certificate refused, say).
  static absl::StatusOr<std::unique_ptr<TestTlsClient>> Connect(int port, const std::string& ca_pem,
                                                                const std::string& server_name);
  ~TestTlsClient();
  TestTlsClient(const TestTlsClient&) = delete;
  TestTlsClient& operator=(const TestTlsClient&) = delete;

  bool Write(absl::string_view data);
  // One read of up to `at_most` bytes: empty at the end (the server's close_notify, or its
  // connection closed) or on an error.
  std::string Read(size_t at_most = 16384);
  // Everything until the end.
  std::string ReadToEnd();
  // The end of what this side sends (close_notify), reading on still possible.
  void CloseNotify();
  // The connection closed at once, without close_notify (a client that vanishes).
  void Abort();

 private:
  TestTlsClient() = default;
  SSL_CTX* ctx_ = nullptr;
  SSL* ssl_ = nullptr;
  int fd_ = -1;
};

}  // namespace strata

#endif  // STRATA_COMMON_TLS_TEST_CERTS_H_
