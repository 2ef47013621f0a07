#include "bench/kernel_trace.h"

#include <cxxabi.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

#ifdef STRATA_HAVE_CUDA
#include <cupti.h>
#include <dlfcn.h>

#include <mutex>
#endif

namespace strata {

std::string ShortKernelName(const std::string& name) {
  std::string s = name;
  if (s.rfind("_Z", 0) == 0) {
    int status = 0;
    char* d = abi::__cxa_demangle(s.c_str(), nullptr, nullptr, &status);
    if (status == 0 && d != nullptr) s = d;
    std::free(d);
  }
  // Drop the parameter list, from the first '(' outside template arguments that does not open
  // "(anonymous namespace)", and a function template's return type.
  constexpr absl::string_view kAnonymous = "(anonymous namespace)";
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '<') ++depth;
    if (c == '>') --depth;
    if (c == '(' && depth == 0) {
      if (absl::string_view(s).substr(i, kAnonymous.size()) == kAnonymous) {
        i += kAnonymous.size() - 1;
        continue;
      }
      if (i > 0) s.resize(i);
      break;
    }
  }
  if (s.rfind("void ", 0) == 0) s = s.substr(5);
  // Drop the qualification: everything up to the last top-level "::".
  depth = 0;
  size_t begin = 0;
  for (size_t i = 0; i + 1 < s.size(); ++i) {
    const char c = s[i];
    if (c == '<') ++depth;
    if (c == '>') --depth;
    if (depth == 0 && c == ':' && s[i + 1] == ':') begin = i + 2;
  }
  s = s.substr(begin);
  if (s.size() > 200) s.resize(200);
  return s;
}

KernelTraceSummary Summarize(std::vector<KernelRecord> records) {
  KernelTraceSummary out;
  if (records.empty()) return out;
  std::sort(records.begin(), records.end(), [](const KernelRecord& a, const KernelRecord& b) {
    return a.start_ns < b.start_ns || (a.start_ns == b.start_ns && a.end_ns < b.end_ns);
  });
  out.kernels = static_cast<int64_t>(records.size());
  uint64_t first = records.front().start_ns, last = 0;
  // The union of [start, end) intervals, sweeping by start: an interval that begins before the
  // covered frontier adds only its part past it.
  uint64_t frontier = first, busy = 0;
  std::map<std::string, KernelTraceSummary::Entry> by_name;
  for (const KernelRecord& r : records) {
    const uint64_t end = std::max(r.end_ns, r.start_ns);
    last = std::max(last, end);
    const uint64_t from = std::max(r.start_ns, frontier);
    if (end > from) busy += end - from;
    frontier = std::max(frontier, end);
    KernelTraceSummary::Entry& e = by_name[r.name];
    e.name = r.name;
    ++e.count;
    e.total_us += static_cast<double>(end - r.start_ns) / 1000.0;
  }
  out.span_us = static_cast<double>(last - first) / 1000.0;
  out.busy_us = static_cast<double>(busy) / 1000.0;
  out.idle_us = out.span_us - out.busy_us;
  for (auto& [name, e] : by_name) out.by_name.push_back(std::move(e));
  std::sort(out.by_name.begin(), out.by_name.end(),
            [](const KernelTraceSummary::Entry& a, const KernelTraceSummary::Entry& b) {
              return a.total_us > b.total_us || (a.total_us == b.total_us && a.name < b.name);
            });
  return out;
}

#ifdef STRATA_HAVE_CUDA

namespace {

// CUPTI's entry points, from dlopen.
struct Cupti {
  decltype(&cuptiActivityRegisterCallbacks) register_callbacks = nullptr;
  decltype(&cuptiActivityEnable) enable = nullptr;
  decltype(&cuptiActivityDisable) disable = nullptr;
  decltype(&cuptiActivityFlushAll) flush_all = nullptr;
  decltype(&cuptiActivityGetNextRecord) next_record = nullptr;
  decltype(&cuptiActivityGetNumDroppedRecords) dropped = nullptr;
  decltype(&cuptiGetTimestamp) timestamp = nullptr;
  decltype(&cuptiGetResultString) result_string = nullptr;
};

Cupti* api = nullptr;
bool active = false;
// Never destroyed: CUPTI may hand back a buffer while the process exits.
std::mutex& mu = *new std::mutex;
std::vector<KernelRecord>& pending = *new std::vector<KernelRecord>;  // guarded by mu

constexpr size_t kBufferBytes = 8 << 20;

void BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer == nullptr ? 0 : kBufferBytes;
  *max_records = 0;
}

void BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::vector<KernelRecord> got;
  CUpti_Activity* rec = nullptr;
  while (api->next_record(buffer, valid, &rec) == CUPTI_SUCCESS) {
    if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
    // An incomplete record (no end yet) counts as ending where it starts.
    got.push_back({ShortKernelName(k->name != nullptr ? k->name : "?"), k->start,
                   std::max(k->end, k->start)});
  }
  std::free(buffer);
  std::lock_guard<std::mutex> lock(mu);
  pending.insert(pending.end(), got.begin(), got.end());
}

absl::Status Check(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return absl::OkStatus();
  const char* text = nullptr;
  if (api->result_string != nullptr) api->result_string(r, &text);
  return absl::UnavailableError(
      absl::StrCat("CUPTI ", what, ": ", text != nullptr ? text : absl::StrCat("error ", r)));
}

absl::Status Load(const std::string& so) {
  if (api != nullptr) return absl::OkStatus();
  void* lib = dlopen(so.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot load ", so, ": ", dlerror()));
  }
  auto* c = new Cupti;
  auto get = [lib](auto* fn, const char* sym) {
    *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(dlsym(lib, sym));
    return *fn != nullptr;
  };
  const bool ok = get(&c->register_callbacks, "cuptiActivityRegisterCallbacks") &&
                  get(&c->enable, "cuptiActivityEnable") &&
                  get(&c->disable, "cuptiActivityDisable") &&
                  get(&c->flush_all, "cuptiActivityFlushAll") &&
                  get(&c->next_record, "cuptiActivityGetNextRecord") &&
                  get(&c->dropped, "cuptiActivityGetNumDroppedRecords") &&
                  get(&c->timestamp, "cuptiGetTimestamp");
  get(&c->result_string, "cuptiGetResultString");
  if (!ok) {
    delete c;
    dlclose(lib);
    return absl::UnavailableError(absl::StrCat(so, " lacks the activity API's functions"));
  }
  api = c;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<KernelTrace>> KernelTrace::Start(absl::string_view library) {
  if (active) return absl::FailedPreconditionError("a kernel trace is already running");
  if (absl::Status s = Load(std::string(library)); !s.ok()) return s;
  if (absl::Status s =
          Check(api->register_callbacks(BufferRequested, BufferCompleted), "register callbacks");
      !s.ok()) {
    return s;
  }
  // CONCURRENT_KERNEL leaves kernels free to overlap (KIND_KERNEL would serialize them).
  if (absl::Status s =
          Check(api->enable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "enable kernel records");
      !s.ok()) {
    return s;
  }
  active = true;
  return std::unique_ptr<KernelTrace>(new KernelTrace());
}

KernelTrace::~KernelTrace() {
  api->flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  api->disable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  std::lock_guard<std::mutex> lock(mu);
  pending.clear();
  active = false;
}

uint64_t KernelTrace::Now() const {
  uint64_t t = 0;
  api->timestamp(&t);
  return t;
}

std::vector<KernelRecord> KernelTrace::Collect(uint64_t from, uint64_t to) {
  api->flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  size_t lost = 0;
  if (api->dropped(nullptr, 0, &lost) == CUPTI_SUCCESS) dropped_ += lost;
  std::vector<KernelRecord> all;
  {
    std::lock_guard<std::mutex> lock(mu);
    all.swap(pending);
  }
  std::vector<KernelRecord> out;
  for (KernelRecord& r : all) {
    if (r.start_ns >= from && r.start_ns < to) out.push_back(std::move(r));
  }
  std::sort(out.begin(), out.end(),
            [](const KernelRecord& a, const KernelRecord& b) { return a.start_ns < b.start_ns; });
  return out;
}

#else  // no CUDA

absl::StatusOr<std::unique_ptr<KernelTrace>> KernelTrace::Start(absl::string_view) {
  return absl::UnavailableError("built without CUDA");
}
KernelTrace::~KernelTrace() = default;
uint64_t KernelTrace::Now() const { return 0; }
std::vector<KernelRecord> KernelTrace::Collect(uint64_t, uint64_t) { return {}; }

#endif

}  // namespace strata
