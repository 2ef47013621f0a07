// TlsFileMonitor: makes what a process's TLS files hold visible while it serves. gRPC reads the
// files again every --tls_reload_s and takes what it finds as it is: an expired certificate, or a
// key that is not the certificate's (one file replaced before the other), is served all the same,
// and every handshake fails until the files are fixed. The monitor reads them as often, checks
// them as at start (CheckTlsFiles), and reports:
//   strata_tls_certificate_expiry_timestamp_seconds  when the certificate on disk expires
//   strata_tls_files_usable                          1 while the files pass the checks, else 0
// and logs an error when the files turn unusable (once, until they change) and when they are
// usable again. Alert on the gauge, and on the expiry a couple of weeks ahead.
#ifndef STRATA_COMMON_TLS_MONITOR_H_
#define STRATA_COMMON_TLS_MONITOR_H_

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/metrics.h"
#include "common/periodic.h"
#include "common/tls.h"

namespace strata {

class TlsFileMonitor {
 public:
  // Checks once, then every options.reload_interval on a thread of its own. Does nothing (no
  // thread, no metrics) without a certificate. `metrics` may be null (logs only); it must outlive
  // the monitor.
  TlsFileMonitor(TlsOptions options, MetricsRegistry* metrics);
  ~TlsFileMonitor();
  TlsFileMonitor(const TlsFileMonitor&) = delete;
  TlsFileMonitor& operator=(const TlsFileMonitor&) = delete;

  // Whether the last check passed (true without a certificate).
  bool usable() const ABSL_LOCKS_EXCLUDED(mu_);
  // Checks now (the thread's task; tests call it too).
  void Check() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const TlsOptions options_;
  Gauge* expiry_ = nullptr;  // owned by the registry
  Gauge* usable_gauge_ = nullptr;
  mutable absl::Mutex mu_;
  bool usable_ ABSL_GUARDED_BY(mu_) = true;
  std::string last_error_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<PeriodicThread> thread_;  // last: stopped first
};

}  // namespace strata

#endif  // STRATA_COMMON_TLS_MONITOR_H_
