#include "worker/comm/shm_collectives.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "common/copy.h"
#include "common/status_macros.h"

namespace strata {
namespace {

constexpr uint64_t kMagic = 0x5354524154415450;  // "STRATATP"
constexpr uint32_t kVersion = 1;
constexpr int kMaxRanks = 64;
constexpr int64_t kHeaderBytes = 4096;
// Spins on the generation word before sleeping: long enough to catch a peer that is a few
// microseconds behind, short enough not to steal a core from a peer that is computing.
constexpr int kSpins = 2000;

absl::Status OsError(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

uint32_t* FutexWord(std::atomic<uint32_t>* a) { return reinterpret_cast<uint32_t*>(a); }

void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ms) {
  timespec ts;
  ts.tv_sec = timeout_ms / 1000;
  ts.tv_nsec = (timeout_ms % 1000) * 1000000;
  // Shared (not FUTEX_PRIVATE): the word lives in memory other processes map.
  syscall(SYS_futex, FutexWord(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void FutexWakeAll(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, FutexWord(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// out[i - begin] = a[i] + b[i] for i in [begin, end); out may be a + begin (slots never overlap
// otherwise). Loading 16 of each before storing lets the compiler vectorize without alias checks.
void AddSlots(const float* a, const float* b, float* out, int64_t begin, int64_t end) {
  float x[16], y[16];
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    for (int j = 0; j < 16; ++j) x[j] = a[i + j], y[j] = b[i + j];
    float* __restrict o = out + (i - begin);
    for (int j = 0; j < 16; ++j) o[j] = x[j] + y[j];
  }
  for (; i < end; ++i) out[i - begin] = a[i] + b[i];
}

int64_t ControlBytes(int world_size, int64_t slot_bytes) {
  return kHeaderBytes + 2 * (world_size + 1) * slot_bytes;
}

}  // namespace

struct ShmControlHeader {
  uint64_t magic;
  uint32_t version;
  int32_t world_size;
  int64_t slot_bytes;
  alignas(64) std::atomic<uint32_t> arrived;
  alignas(64) std::atomic<uint32_t> generation;
  std::atomic<uint32_t> sleepers;
  // 0: healthy; 1: a rank is writing the reason; 2: aborted, reason written.
  alignas(64) std::atomic<uint32_t> aborted;
  char reason[512];
};
static_assert(sizeof(ShmControlHeader) <= kHeaderBytes);
static_assert(std::atomic<uint32_t>::is_always_lock_free);

absl::StatusOr<ShmGroup> ShmGroup::Create(int world_size, int64_t slot_bytes) {
  if (world_size < 1 || world_size > kMaxRanks) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor-parallel size ", world_size, " is outside [1, ", kMaxRanks, "]"));
  }
  if (slot_bytes < 4096 || slot_bytes % 64 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("slot_bytes ", slot_bytes, " is not a multiple of 64 of at least 4096"));
  }
  UniqueFd control(memfd_create("strata-tp-control", MFD_CLOEXEC));
  if (!control.valid()) return OsError("memfd_create");
  UniqueFd memory(memfd_create("strata-tp-memory", MFD_CLOEXEC));
  if (!memory.valid()) return OsError("memfd_create");
  const int64_t bytes = ControlBytes(world_size, slot_bytes);
  if (ftruncate(control.get(), bytes) != 0) return OsError("ftruncate of the control segment");
  void* p = mmap(nullptr, kHeaderBytes, PROT_READ | PROT_WRITE, MAP_SHARED, control.get(), 0);
  if (p == MAP_FAILED) return OsError("mmap of the control segment");
  // The memfd starts zero-filled, which is every atomic's initial value.
  auto* h = new (p) ShmControlHeader();
  h->version = kVersion;
  h->world_size = world_size;
  h->slot_bytes = slot_bytes;
  h->magic = kMagic;  // ranks join only after Create returns
  munmap(p, kHeaderBytes);
  return ShmGroup(std::move(control), std::move(memory), world_size);
}

absl::Status ShmGroup::SetInheritable(bool inheritable) const {
  for (int fd : {control_.get(), memory_.get()}) {
    const int flags = fcntl(fd, F_GETFD);
    if (flags < 0 ||
        fcntl(fd, F_SETFD, inheritable ? flags & ~FD_CLOEXEC : flags | FD_CLOEXEC) != 0) {
      return OsError("fcntl(F_SETFD) on a tensor-parallel group descriptor");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ShmCollectives>> ShmCollectives::Join(int control_fd, int memory_fd,
                                                                     int rank, int world_size) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor-parallel rank ", rank, " of ", world_size));
  }
  struct stat st;
  if (fstat(control_fd, &st) != 0) return OsError("fstat of the control segment");
  if (st.st_size < kHeaderBytes) {
    return absl::InvalidArgumentError("the control descriptor is not a tensor-parallel group");
  }
  void* p = mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, control_fd, 0);
  if (p == MAP_FAILED) return OsError("mmap of the control segment");
  const ShmControlHeader* h = static_cast<const ShmControlHeader*>(p);
  absl::Status bad;
  if (h->magic != kMagic || h->version != kVersion) {
    bad = absl::InvalidArgumentError("the control descriptor is not a tensor-parallel group");
  } else if (h->world_size != world_size) {
    bad = absl::InvalidArgumentError(
        absl::StrCat("the group has ", h->world_size, " ranks, not ", world_size));
  } else if (st.st_size != ControlBytes(world_size, h->slot_bytes)) {
    bad = absl::InvalidArgumentError("the control segment has the wrong size");
  }
  if (!bad.ok()) {
    munmap(p, st.st_size);
    return bad;
  }
  UniqueFd memory(fcntl(memory_fd, F_DUPFD_CLOEXEC, 0));
  if (!memory.valid()) {
    munmap(p, st.st_size);
    return OsError("dup of the shared memory descriptor");
  }
  std::unique_ptr<ShmCollectives> c(
      new ShmCollectives(rank, world_size, std::move(memory), p, st.st_size));
  if (absl::Status s = c->Aborted(); !s.ok()) return absl::FailedPreconditionError(s.message());
  return c;
}

ShmCollectives::ShmCollectives(int rank, int world_size, UniqueFd memory_fd, void* control,
                               int64_t control_bytes)
    : rank_(rank),
      world_size_(world_size),
      memory_fd_(std::move(memory_fd)),
      control_(control),
      control_bytes_(control_bytes),
      header_(static_cast<ShmControlHeader*>(control)),
      slot_bytes_(header_->slot_bytes),
      banks_(static_cast<char*>(control) + kHeaderBytes) {}

ShmCollectives::~ShmCollectives() {
  if (memory_ != nullptr) munmap(memory_, memory_bytes_);
  munmap(control_, control_bytes_);
}

char* ShmCollectives::Slot(int r) const {
  const int64_t bank = static_cast<int64_t>(operation_ % 2);
  return banks_ + (bank * (world_size_ + 1) + r) * slot_bytes_;
}

absl::Status ShmCollectives::Aborted() const {
  uint32_t state = header_->aborted.load(std::memory_order_acquire);
  if (state == 0) return absl::OkStatus();
  // The aborting rank is writing its reason, a few stores; it may also have died doing so.
  for (int i = 0; state == 1 && i < 100000; ++i) {
    CpuRelax();
    state = header_->aborted.load(std::memory_order_acquire);
  }
  if (state == 1) return absl::UnavailableError("tensor-parallel group aborted (no reason given)");
  const size_t n = strnlen(header_->reason, sizeof(header_->reason));
  return absl::UnavailableError(
      absl::StrCat("tensor-parallel group aborted: ", absl::string_view(header_->reason, n)));
}

std::string ShmCollectives::AbortReason() const {
  absl::Status s = Aborted();
  return s.ok() ? std::string() : std::string(s.message());
}

void ShmCollectives::Abort(absl::string_view why) {
  uint32_t expected = 0;
  if (header_->aborted.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
    const std::string text = absl::StrCat("rank ", rank_, ": ", why);
    const size_t n = std::min(text.size(), sizeof(header_->reason) - 1);
    std::memcpy(header_->reason, text.data(), n);
    header_->reason[n] = '\0';
    header_->aborted.store(2, std::memory_order_seq_cst);
  }
  // Moving the generation on wakes every rank in a barrier, also one just about to sleep (its futex
  // wait finds the word changed); each then finds the abort.
  header_->generation.fetch_add(1, std::memory_order_seq_cst);
  FutexWakeAll(&header_->generation);
}

absl::Status ShmCollectives::Barrier() {
  ShmControlHeader* h = header_;
  RETURN_IF_ERROR(Aborted());
  const uint32_t generation = h->generation.load(std::memory_order_acquire);
  if (h->arrived.fetch_add(1, std::memory_order_acq_rel) + 1 ==
      static_cast<uint32_t>(world_size_)) {
    // Last to arrive: nobody touches the counter again until the generation moves on.
    h->arrived.store(0, std::memory_order_relaxed);
    h->generation.fetch_add(1, std::memory_order_seq_cst);
    if (h->sleepers.load(std::memory_order_seq_cst) > 0) FutexWakeAll(&h->generation);
    return Aborted();
  }
  // The generation also moves when the group is aborted: every way out checks for that.
  for (int i = 0; i < kSpins; ++i) {
    if (h->generation.load(std::memory_order_acquire) != generation) return Aborted();
    CpuRelax();
  }
  while (true) {
    // Registering as a sleeper before the last look at the generation pairs with the last
    // arrival's advance-then-read of `sleepers`: one of the two sees the other.
    h->sleepers.fetch_add(1, std::memory_order_seq_cst);
    if (h->generation.load(std::memory_order_seq_cst) == generation &&
        h->aborted.load(std::memory_order_acquire) == 0) {
      FutexWait(&h->generation, generation, /*timeout_ms=*/100);
    }
    h->sleepers.fetch_sub(1, std::memory_order_seq_cst);
    if (h->generation.load(std::memory_order_acquire) != generation) return Aborted();
    RETURN_IF_ERROR(Aborted());
  }
}

absl::Status ShmCollectives::AllReduceSum(float* data, int64_t count) {
  if (count < 0) return absl::InvalidArgumentError("AllReduceSum: negative count");
  RETURN_IF_ERROR(Aborted());
  const int64_t per_operation = slot_bytes_ / static_cast<int64_t>(sizeof(float));
  for (int64_t offset = 0; offset < count; offset += per_operation) {
    const int64_t n = std::min(per_operation, count - offset);
    CopyBytes(Slot(rank_), data + offset, n * sizeof(float));
    RETURN_IF_ERROR(Barrier());
    // This rank's share of the elements, in 16-float (cache line) pieces.
    const int64_t share = (n + world_size_ * 16 - 1) / (world_size_ * 16) * 16;
    const int64_t begin = std::min(n, rank_ * share), end = std::min(n, begin + share);
    float* result = SlotFloats(world_size_);
    if (world_size_ == 1) {
      CopyBytes(result + begin, SlotFloats(0) + begin, (end - begin) * sizeof(float));
    } else if (begin < end) {
      AddSlots(SlotFloats(0), SlotFloats(1), result + begin, begin, end);
      for (int r = 2; r < world_size_; ++r) {
        AddSlots(result, SlotFloats(r), result + begin, begin, end);
      }
    }
    RETURN_IF_ERROR(Barrier());
    CopyBytes(data + offset, result, n * sizeof(float));
    ++operation_;
  }
  return absl::OkStatus();
}

absl::Status ShmCollectives::AllGather(const float* in, int64_t count, float* out) {
  if (count < 0) return absl::InvalidArgumentError("AllGather: negative count");
  RETURN_IF_ERROR(Aborted());
  const int64_t per_operation = slot_bytes_ / static_cast<int64_t>(sizeof(float));
  for (int64_t offset = 0; offset < count; offset += per_operation) {
    const int64_t n = std::min(per_operation, count - offset);
    CopyBytes(Slot(rank_), in + offset, n * sizeof(float));
    RETURN_IF_ERROR(Barrier());
    for (int r = 0; r < world_size_; ++r) {
      CopyBytes(out + r * count + offset, Slot(r), n * sizeof(float));
    }
    ++operation_;
  }
  return absl::OkStatus();
}

absl::Status ShmCollectives::Broadcast(std::string* bytes) {
  RETURN_IF_ERROR(Aborted());
  const int64_t payload = slot_bytes_ - static_cast<int64_t>(sizeof(uint64_t));
  uint64_t total = rank_ == 0 ? bytes->size() : 0;
  uint64_t done = 0;
  // At least one operation, so that an empty message still reaches everyone.
  do {
    char* slot = Slot(0);
    if (rank_ == 0) {
      const uint64_t n = std::min<uint64_t>(payload, total - done);
      std::memcpy(slot, &total, sizeof(total));
      CopyBytes(slot + sizeof(total), bytes->data() + done, n);
      RETURN_IF_ERROR(Barrier());
      done += n;
    } else {
      RETURN_IF_ERROR(Barrier());
      if (done == 0) {
        std::memcpy(&total, slot, sizeof(total));
        bytes->resize(total);
      }
      const uint64_t n = std::min<uint64_t>(payload, total - done);
      CopyBytes(bytes->data() + done, slot + sizeof(total), n);
      done += n;
    }
    ++operation_;
  } while (done < total);
  return absl::OkStatus();
}

absl::StatusOr<void*> ShmCollectives::SharedMemory(int64_t bytes) {
  if (bytes <= 0) return absl::InvalidArgumentError("SharedMemory: bytes must be positive");
  if (memory_ != nullptr) {
    if (bytes == memory_bytes_) return memory_;
    return absl::FailedPreconditionError(absl::StrCat(
        "SharedMemory: the group's memory is mapped as ", memory_bytes_, " bytes, not ", bytes));
  }
  struct stat st;
  if (fstat(memory_fd_.get(), &st) != 0) return OsError("fstat of the shared memory");
  if (st.st_size < bytes) {
    if (rank_ != 0) {
      return absl::FailedPreconditionError(absl::StrCat("SharedMemory: rank 0 shared ", st.st_size,
                                                        " bytes; rank ", rank_, " needs ", bytes));
    }
    if (ftruncate(memory_fd_.get(), bytes) != 0) {
      return absl::ResourceExhaustedError(absl::StrCat("cannot size the group's shared memory to ",
                                                       bytes, " bytes: ", std::strerror(errno)));
    }
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memory_fd_.get(), 0);
  if (p == MAP_FAILED) return OsError("mmap of the shared memory");
  memory_ = p;
  memory_bytes_ = bytes;
  return memory_;
}

}  // namespace strata
