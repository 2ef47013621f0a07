#include "common/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/log.h"

namespace strata {
namespace {

// [a-zA-Z_:][a-zA-Z0-9_:]*, checked on every lookup, so by hand rather than with std::regex.
bool ValidName(const std::string& name) {
  if (name.empty() || absl::ascii_isdigit(static_cast<unsigned char>(name[0]))) return false;
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_' && c != ':') return false;
  }
  return true;
}

std::string Escape(const std::string& s, bool quote) {
  std::string out;
  for (char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '"' && quote) {
      out += "\\\"";
    } else {
      out += c;
    }
  }
  return out;
}

std::string LabelText(const MetricLabels& labels) {
  if (labels.empty()) return "";
  std::vector<std::string> parts;
  for (const auto& [k, v] : labels) {
    CHECK(ValidName(k) && k.find(':') == std::string::npos) << "bad label name " << k;
    parts.push_back(absl::StrCat(k, "=\"", Escape(v, true), "\""));
  }
  return absl::StrCat("{", absl::StrJoin(parts, ","), "}");
}

// Adds a label to a rendered label set ({a="1"} + le="0.5" -> {a="1",le="0.5"}).
std::string WithLabel(const std::string& labels, const std::string& extra) {
  if (labels.empty()) return absl::StrCat("{", extra, "}");
  return absl::StrCat(labels.substr(0, labels.size() - 1), ",", extra, "}");
}

std::string Number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return absl::StrFormat("%.0f", v);
  // The shortest form that reads back as the same double (0.1, not 0.10000000000000001).
  for (int precision : {15, 16}) {
    std::string s = absl::StrFormat("%.*g", precision, v);
    if (std::strtod(s.c_str(), nullptr) == v) return s;
  }
  return absl::StrFormat("%.17g", v);
}

}  // namespace

void Counter::Add(double v) {
  CHECK_GE(v, 0) << "a counter only grows";
  value_.fetch_add(v, std::memory_order_relaxed);
}

void Counter::SetTotal(double total) {
  double cur = value_.load(std::memory_order_relaxed);
  while (total > cur && !value_.compare_exchange_weak(cur, total, std::memory_order_relaxed)) {
  }
}

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  CHECK(std::is_sorted(bounds_.begin(), bounds_.end()) &&
        std::adjacent_find(bounds_.begin(), bounds_.end()) == bounds_.end())
      << "histogram bounds must increase";
  for (size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0, std::memory_order_relaxed);
}

void Histogram::Observe(double v) {
  const size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::CumulativeCounts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  uint64_t total = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    total += counts_[i].load(std::memory_order_relaxed);
    out[i] = total;
  }
  return out;
}

std::vector<double> LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

std::vector<double> TokenLatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1};
}

MetricsRegistry::Family* MetricsRegistry::FamilyLocked(const std::string& name,
                                                       const std::string& help, Type type) {
  CHECK(ValidName(name)) << "bad metric name " << name;
  auto [it, inserted] = families_.try_emplace(name);
  if (inserted) {
    it->second.type = type;
    it->second.help = help;
  }
  CHECK(it->second.type == type) << "metric " << name << " used as two types";
  return &it->second;
}

Counter* MetricsRegistry::GetCounter(const std::string& name, const std::string& help,
                                     const MetricLabels& labels) {
  absl::MutexLock lock(&mu_);
  Series& s = FamilyLocked(name, help, Type::kCounter)->series[LabelText(labels)];
  if (s.counter == nullptr) s.counter = std::make_unique<Counter>();
  return s.counter.get();
}

Gauge* MetricsRegistry::GetGauge(const std::string& name, const std::string& help,
                                 const MetricLabels& labels) {
  absl::MutexLock lock(&mu_);
  Series& s = FamilyLocked(name, help, Type::kGauge)->series[LabelText(labels)];
  CHECK(s.callback == nullptr) << name << " is a callback gauge";
  if (s.gauge == nullptr) s.gauge = std::make_unique<Gauge>();
  return s.gauge.get();
}

Histogram* MetricsRegistry::GetHistogram(const std::string& name, const std::string& help,
                                         std::vector<double> bounds, const MetricLabels& labels) {
  absl::MutexLock lock(&mu_);
  Series& s = FamilyLocked(name, help, Type::kHistogram)->series[LabelText(labels)];
  if (s.histogram == nullptr) s.histogram = std::make_unique<Histogram>(std::move(bounds));
  return s.histogram.get();
}

void MetricsRegistry::SetGaugeCallback(const std::string& name, const std::string& help,
                                       const MetricLabels& labels, std::function<double()> fn) {
  absl::MutexLock lock(&mu_);
  Series& s = FamilyLocked(name, help, Type::kGauge)->series[LabelText(labels)];
  CHECK(s.gauge == nullptr) << name << " is a plain gauge";
  s.callback = std::move(fn);
}

void MetricsRegistry::RemoveGaugeCallback(const std::string& name, const MetricLabels& labels) {
  absl::MutexLock lock(&mu_);
  auto it = families_.find(name);
  if (it == families_.end()) return;
  it->second.series.erase(LabelText(labels));
  if (it->second.series.empty()) families_.erase(it);
}

std::string MetricsRegistry::Render() const {
  // Callback gauges run first, outside the lock: they may take other locks, and updates and
  // lookups from serving threads must not wait for them.
  std::vector<std::pair<const Series*, std::function<double()>>> callbacks;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [name, family] : families_) {
      for (const auto& [labels, s] : family.series) {
        if (s.callback) callbacks.emplace_back(&s, s.callback);
      }
    }
  }
  std::map<const Series*, double> values;
  for (const auto& [series, fn] : callbacks) values[series] = fn();
  absl::MutexLock lock(&mu_);
  std::string out;
  for (const auto& [name, family] : families_) {
    const char* type = family.type == Type::kCounter ? "counter"
                       : family.type == Type::kGauge ? "gauge"
                                                     : "histogram";
    absl::StrAppend(&out, "# HELP ", name, " ", Escape(family.help, false), "\n", "# TYPE ", name,
                    " ", type, "\n");
    for (const auto& [labels, s] : family.series) {
      if (s.counter != nullptr) {
        absl::StrAppend(&out, name, labels, " ", Number(s.counter->value()), "\n");
      } else if (s.gauge != nullptr) {
        absl::StrAppend(&out, name, labels, " ", Number(s.gauge->value()), "\n");
      } else if (s.callback) {
        // A callback registered since the values were taken is left for the next scrape.
        auto it = values.find(&s);
        if (it != values.end()) absl::StrAppend(&out, name, labels, " ", Number(it->second), "\n");
      } else if (s.histogram != nullptr) {
        const std::vector<uint64_t> counts = s.histogram->CumulativeCounts();
        const std::vector<double>& bounds = s.histogram->bounds();
        for (size_t i = 0; i <= bounds.size(); ++i) {
          const std::string le = i < bounds.size() ? Number(bounds[i]) : "+Inf";
          absl::StrAppend(&out, name, "_bucket", WithLabel(labels, absl::StrCat("le=\"", le, "\"")),
                          " ", counts[i], "\n");
        }
        absl::StrAppend(&out, name, "_sum", labels, " ", Number(s.histogram->sum()), "\n", name,
                        "_count", labels, " ", counts.back(), "\n");
      }
    }
  }
  return out;
}

}  // namespace strata
