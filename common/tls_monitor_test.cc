#include "common/tls_monitor.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/metrics.h"
#include "common/tls_test_certs.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

std::string Path(const std::string& name) {
  return absl::StrCat(::testing::TempDir(), "/",
                      ::testing::UnitTest::GetInstance()->current_test_info()->name(), "-", name);
}

TEST(TlsFileMonitorTest, ReportsExpiryAndAPairThatNoLongerMatches) {
  TestCa ca("monitor-ca");
  TlsOptions o;
  o.cert_file = Path("cert.pem");
  o.key_file = Path("key.pem");
  o.reload_interval = absl::Hours(1);  // checked by hand below
  const TestCertificate c = ca.Issue(TestCertificateSpec());
  WriteTestFile(o.cert_file, c.cert_pem);
  WriteTestFile(o.key_file, c.key_pem);
  MetricsRegistry metrics;
  TlsFileMonitor monitor(o, &metrics);
  Gauge* expiry = metrics.GetGauge("strata_tls_certificate_expiry_timestamp_seconds", "");
  Gauge* usable = metrics.GetGauge("strata_tls_files_usable", "");
  EXPECT_TRUE(monitor.usable());
  EXPECT_EQ(usable->value(), 1);
  // TestCertificateSpec's default: valid for a day.
  EXPECT_NEAR(expiry->value(), absl::ToUnixSeconds(absl::Now() + absl::Hours(24)), 60);

  // The key replaced alone.
  WriteTestFile(o.key_file, ca.Issue(TestCertificateSpec()).key_pem);
  monitor.Check();
  EXPECT_FALSE(monitor.usable());
  EXPECT_EQ(usable->value(), 0);

  // The matching certificate follows, valid for two days.
  TestCertificateSpec longer;
  longer.valid_until = absl::Hours(48);
  const TestCertificate next = ca.Issue(longer);
  WriteTestFile(o.cert_file, next.cert_pem);
  WriteTestFile(o.key_file, next.key_pem);
  monitor.Check();
  EXPECT_TRUE(monitor.usable());
  EXPECT_EQ(usable->value(), 1);
  EXPECT_NEAR(expiry->value(), absl::ToUnixSeconds(absl::Now() + absl::Hours(48)), 60);
}

TEST(TlsFileMonitorTest, NothingWithoutACertificate) {
  MetricsRegistry metrics;
  TlsFileMonitor monitor(TlsOptions(), &metrics);
  EXPECT_TRUE(monitor.usable());
  EXPECT_EQ(metrics.Render().find("strata_tls"), std::string::npos);
}

}  // namespace
}  // namespace strata
