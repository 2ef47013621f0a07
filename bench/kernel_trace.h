// Kernel timestamps as the GPU ran them: CUPTI's activity records (loaded at run time from
// libcupti.so, so that a machine without it still runs the benchmark), for a decode step's kernels
// inside its CUDA graph: each kernel's duration and the idle time between kernels, which timing
// ops one at a time (or Nsight Compute, which serializes and flushes caches) cannot show.
//
// Summarize is plain C++ over records, tested on the CPU (kernel_trace_test).
#ifndef STRATA_BENCH_KERNEL_TRACE_H_
#define STRATA_BENCH_KERNEL_TRACE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace strata {

struct KernelRecord {
  std::string name;  // demangled and shortened: ShortKernelName
  uint64_t start_ns = 0;
  uint64_t end_ns = 0;
};

// "strata::gpu::(anonymous namespace)::GemvKernel<__nv_bfloat16, 2, 8>(strata::gpu::GemvArgs)" ->
// "GemvKernel<__nv_bfloat16, 2, 8>": the function's unqualified name with its template arguments,
// at most 200 characters; a mangled name is demangled first, and one that is not C++ stays as it
// is.
std::string ShortKernelName(const std::string& name);

struct KernelTraceSummary {
  int64_t kernels = 0;
  double span_us = 0;  // first start to last end
  double busy_us = 0;  // the union of the kernels' intervals (overlapping kernels count once)
  double idle_us = 0;  // span - busy: no kernel running
  // Per name: launches and the sum of their durations (overlaps counted in each), largest first.
  struct Entry {
    std::string name;
    int64_t count = 0;
    double total_us = 0;
  };
  std::vector<Entry> by_name;
};
KernelTraceSummary Summarize(std::vector<KernelRecord> records);

// One trace at a time per process. Start before the graphs to be traced are instantiated (CUPTI
// sees graph kernels only from then on).
class KernelTrace {
 public:
  // UNAVAILABLE when CUPTI cannot be loaded or enabled (the message says why). `library` is
  // dlopen'ed: CUDA 13's CUPTI, whose record layout this file is compiled for.
  static absl::StatusOr<std::unique_ptr<KernelTrace>> Start(
      absl::string_view library = "libcupti.so.13");
  ~KernelTrace();  // stops recording

  // CUPTI's clock (ns), the one the records use: brackets a window for Collect.
  uint64_t Now() const;
  // Flushes CUPTI's buffers (call it once the kernels are done); the kernels that started in
  // [from, to), by start time. Every other record collected so far is dropped.
  std::vector<KernelRecord> Collect(uint64_t from, uint64_t to);
  // Records CUPTI had to drop (buffers full); nonzero means the window lost kernels.
  uint64_t dropped() const { return dropped_; }

 private:
  KernelTrace() = default;
  uint64_t dropped_ = 0;
};

}  // namespace strata

#endif  // STRATA_BENCH_KERNEL_TRACE_H_
