// Certificates for tests of TLS: a throwaway CA that issues leaf certificates, all made in memory
// with OpenSSL (P-256 keys, SHA-256 signatures), so that tests need no files checked in and no
// openssl binary. Test-only.
#ifndef STRATA_COMMON_TLS_TEST_CERTS_H_
#define STRATA_COMMON_TLS_TEST_CERTS_H_

#include <string>
#include <vector>

#include "absl/time/time.h"
#include "common/openssl_ptr.h"

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

}  // namespace strata

#endif  // STRATA_COMMON_TLS_TEST_CERTS_H_
