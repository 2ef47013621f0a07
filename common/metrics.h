// Metrics: counters, gauges and histograms, rendered in Prometheus' text exposition format
// (version 0.0.4) for a server's /metrics endpoint (common/metrics_http.h).
//
// A series is a metric name plus label values. The registry creates each series on first use and
// returns the same object for the same name and labels afterwards, so callers may either keep the
// pointer (hot paths) or look the series up per event (rare events). Series live as long as the
// registry. A name has one type and one help text; using it as another type is a caller bug
// (CHECK).
//
// Thread contract: updates (Add, Set, Observe) are lock-free and callable from any thread; lookups
// and Render take the registry's mutex. Callback gauges run inside Render, on the rendering thread
// and outside the mutex, so they must be thread-safe themselves; RemoveGaugeCallback must not race
// with a Render that may still call the removed callback (remove before what it reads goes, with
// no scrape in flight, as the servers do by stopping their endpoint first or unregistering in
// their destructor while the registry outlives them).
#ifndef STRATA_COMMON_METRICS_H_
#define STRATA_COMMON_METRICS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace strata {

// Label names and values, in the order given.
using MetricLabels = std::vector<std::pair<std::string, std::string>>;

class Counter {
 public:
  // `v` must not be negative.
  void Add(double v = 1);
  // For a total that something else accumulates (a monotonic count read from a component): takes
  // `total` when it is larger than the current value.
  void SetTotal(double total);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Add(double v) { value_.fetch_add(v, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

class Histogram {
 public:
  // `bounds`: the buckets' upper bounds, increasing; +Inf is implied.
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);
  const std::vector<double>& bounds() const { return bounds_; }
  // Cumulative counts per bound, then +Inf; the sum; the count.
  std::vector<uint64_t> CumulativeCounts() const;
  double sum() const { return sum_.load(std::memory_order_relaxed); }

 private:
  const std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // bounds_.size() + 1, not cumulative
  std::atomic<double> sum_{0};
};

// Bounds for latencies in seconds: 1 ms to 60 s, about three per decade.
std::vector<double> LatencyBuckets();
// Bounds for the time between a stream's tokens: 1 ms to 1 s.
std::vector<double> TokenLatencyBuckets();

class MetricsRegistry {
 public:
  Counter* GetCounter(const std::string& name, const std::string& help,
                      const MetricLabels& labels = {}) ABSL_LOCKS_EXCLUDED(mu_);
  Gauge* GetGauge(const std::string& name, const std::string& help, const MetricLabels& labels = {})
      ABSL_LOCKS_EXCLUDED(mu_);
  Histogram* GetHistogram(const std::string& name, const std::string& help,
                          std::vector<double> bounds, const MetricLabels& labels = {})
      ABSL_LOCKS_EXCLUDED(mu_);
  // A gauge whose value `fn` computes at each Render (replacing an earlier one of the same series).
  void SetGaugeCallback(const std::string& name, const std::string& help,
                        const MetricLabels& labels, std::function<double()> fn)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Drops a callback gauge's series (its callback must not outlive what it reads).
  void RemoveGaugeCallback(const std::string& name, const MetricLabels& labels)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Every series, grouped by name in name order, each name with its HELP and TYPE lines.
  std::string Render() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  enum class Type { kCounter, kGauge, kHistogram };
  struct Series {
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Gauge> gauge;
    std::unique_ptr<Histogram> histogram;
    std::function<double()> callback;
  };
  struct Family {
    Type type;
    std::string help;
    std::map<std::string, Series> series;  // by rendered label set ({a="1",b="2"} or "")
  };
  Family* FamilyLocked(const std::string& name, const std::string& help, Type type)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::map<std::string, Family> families_ ABSL_GUARDED_BY(mu_);
};

}  // namespace strata

#endif  // STRATA_COMMON_METRICS_H_
