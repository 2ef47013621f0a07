#include "common/tls_monitor.h"

#include <utility>

#include "common/log.h"

namespace strata {

TlsFileMonitor::TlsFileMonitor(TlsOptions options, MetricsRegistry* metrics)
    : options_(std::move(options)) {
  if (options_.cert_file.empty()) return;
  if (metrics != nullptr) {
    expiry_ = metrics->GetGauge("strata_tls_certificate_expiry_timestamp_seconds",
                                "When the TLS certificate on disk (--tls_cert) expires, in seconds "
                                "since the Unix epoch");
    usable_gauge_ = metrics->GetGauge(
        "strata_tls_files_usable",
        "1 while the TLS files on disk pass the checks made at start (readable, in force, the key "
        "the certificate's), else 0: gRPC serves them anyway, and handshakes fail");
  }
  Check();
  thread_ = std::make_unique<PeriodicThread>(options_.reload_interval, [this] { Check(); });
}

TlsFileMonitor::~TlsFileMonitor() { thread_.reset(); }

bool TlsFileMonitor::usable() const {
  absl::MutexLock lock(&mu_);
  return usable_;
}

void TlsFileMonitor::Check() {
  if (options_.cert_file.empty()) return;
  // Read without the lock: only the outcome is recorded under it.
  const absl::StatusOr<TlsCertificateInfo> info = CheckTlsFiles(options_);
  if (info.ok() && expiry_ != nullptr) {
    expiry_->Set(static_cast<double>(absl::ToUnixSeconds(info->not_after)));
  }
  if (usable_gauge_ != nullptr) usable_gauge_->Set(info.ok() ? 1 : 0);
  absl::MutexLock lock(&mu_);
  if (info.ok()) {
    if (!usable_) LOG(INFO) << "TLS files usable again: " << info->subject;
    usable_ = true;
    last_error_.clear();
    return;
  }
  usable_ = false;
  const std::string error(info.status().message());
  if (error != last_error_) {
    LOG(ERROR)
        << "TLS files unusable (gRPC reads them all the same: handshakes fail until they are "
           "fixed): "
        << error;
    last_error_ = error;
  }
}

}  // namespace strata
