#include "memtier/io_ring.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace strata {
namespace {

std::string ErrnoText(int err) { return strerror(err); }

}  // namespace

absl::StatusOr<AlignedBuffer> AlignedBuffer::Create(size_t bytes, size_t alignment) {
  if (bytes == 0) return absl::InvalidArgumentError("AlignedBuffer of 0 bytes");
  void* p = nullptr;
  if (posix_memalign(&p, alignment, bytes) != 0) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", bytes, " aligned bytes"));
  }
  // Large buffers ask for transparent huge pages: an I/O into one 2 MiB page is one segment for the
  // block layer instead of 512, which the device would otherwise split into several requests.
  if (alignment >= (size_t{2} << 20)) madvise(p, bytes, MADV_HUGEPAGE);
  memset(p, 0, bytes);
  AlignedBuffer b;
  b.data_ = static_cast<uint8_t*>(p);
  b.size_ = bytes;
  return b;
}

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    free(data_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

AlignedBuffer::~AlignedBuffer() { free(data_); }

absl::StatusOr<SlotFile> SlotFile::Open(const std::string& path, int64_t num_slots,
                                        int64_t slot_bytes) {
  if (num_slots < 1 || slot_bytes < 4096 || slot_bytes % 4096 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     ": need at least one slot and a slot size that is a positive multiple "
                     "of 4096 bytes (got ",
                     num_slots, " x ", slot_bytes, ")"));
  }
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0600);
  if (fd < 0) {
    const int err = errno;
    return absl::UnavailableError(
        absl::StrCat("cannot open ", path, " with O_DIRECT: ", ErrnoText(err)));
  }
  // One process per slot file: a second worker on the same file would overwrite its slots. A
  // process killed with I/O in flight keeps its lock until the kernel has torn its ring down
  // (milliseconds), so a restart waits up to 2 s for it.
  int err = 0;
  for (int attempt = 0; attempt < 200; ++attempt) {
    err = flock(fd, LOCK_EX | LOCK_NB) == 0 ? 0 : errno;
    if (err != EWOULDBLOCK || attempt == 199) break;
    usleep(10 * 1000);
  }
  if (err != 0) {
    close(fd);
    return err == EWOULDBLOCK
               ? absl::FailedPreconditionError(
                     absl::StrCat(path, " is in use by another process (flock)"))
               : absl::UnavailableError(absl::StrCat("cannot lock ", path, ": ", ErrnoText(err)));
  }
  SlotFile f;
  f.fd_ = fd;
  f.num_slots_ = num_slots;
  f.slot_bytes_ = slot_bytes;
  f.path_ = path;
  const int rc = posix_fallocate(fd, 0, num_slots * slot_bytes);
  if (rc != 0) {
    const std::string what = absl::StrCat("cannot preallocate ", num_slots * slot_bytes,
                                          " bytes for ", path, ": ", ErrnoText(rc));
    return rc == ENOSPC || rc == EDQUOT || rc == EFBIG ? absl::ResourceExhaustedError(what)
                                                       : absl::UnavailableError(what);
  }
  return f;
}

SlotFile::SlotFile(SlotFile&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      num_slots_(other.num_slots_),
      slot_bytes_(other.slot_bytes_),
      path_(std::move(other.path_)) {}

SlotFile& SlotFile::operator=(SlotFile&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    num_slots_ = other.num_slots_;
    slot_bytes_ = other.slot_bytes_;
    path_ = std::move(other.path_);
  }
  return *this;
}

SlotFile::~SlotFile() {
  if (fd_ >= 0) close(fd_);
}

absl::StatusOr<std::unique_ptr<IoRing>> IoRing::Create(unsigned queue_depth,
                                                       absl::Span<const iovec> buffers) {
  if (queue_depth < 1 || queue_depth > 4096) {
    return absl::InvalidArgumentError("io_uring queue depth must be in [1, 4096]");
  }
  std::unique_ptr<IoRing> r(new IoRing(queue_depth));
  if (int rc = io_uring_queue_init(queue_depth, &r->ring_, 0); rc < 0) {
    r->ring_.ring_fd = -1;
    return absl::UnavailableError(absl::StrCat("io_uring_queue_init: ", ErrnoText(-rc)));
  }
  if (!buffers.empty()) {
    if (int rc = io_uring_register_buffers(&r->ring_, buffers.data(),
                                           static_cast<unsigned>(buffers.size()));
        rc < 0) {
      return absl::UnavailableError(absl::StrCat("io_uring_register_buffers (", buffers.size(),
                                                 " buffers): ", ErrnoText(-rc),
                                                 rc == -ENOMEM ? " (raise RLIMIT_MEMLOCK)" : ""));
    }
  }
  return r;
}

IoRing::~IoRing() {
  if (absl::Status s = Close(); !s.ok()) LOG(ERROR) << s;
}

absl::Status IoRing::Close() {
  if (ring_.ring_fd < 0) return absl::OkStatus();
  // Entries never submitted never reached the kernel: they are dropped with the ring. Those the
  // kernel took may still write into our buffers: wait for each of them.
  int in_kernel = outstanding_ - unsubmitted_;
  absl::Status status;
  while (in_kernel > 0) {
    io_uring_cqe* cqe = nullptr;
    const int rc = io_uring_wait_cqe(&ring_, &cqe);
    if (rc == -EINTR) continue;
    if (rc < 0) {
      status = absl::UnavailableError(
          absl::StrCat("io_uring_wait_cqe: ", ErrnoText(-rc), "; ", in_kernel,
                       " operations may still be in the kernel, writing into their buffers"));
      break;
    }
    io_uring_cqe_seen(&ring_, cqe);
    --in_kernel;
  }
  io_uring_queue_exit(&ring_);
  ring_.ring_fd = -1;
  outstanding_ = unsubmitted_ = 0;
  return status;
}

absl::Status IoRing::Queue(bool write, int fd, int buffer_index, uint8_t* addr, uint32_t len,
                           uint64_t offset, uint64_t tag) {
  if (outstanding_ >= static_cast<int>(queue_depth_)) {
    return absl::ResourceExhaustedError("io_uring queue is full: reap completions first");
  }
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) return absl::ResourceExhaustedError("io_uring submission queue is full");
  if (buffer_index < 0) {
    if (write) {
      io_uring_prep_write(sqe, fd, addr, len, offset);
    } else {
      io_uring_prep_read(sqe, fd, addr, len, offset);
    }
  } else if (write) {
    io_uring_prep_write_fixed(sqe, fd, addr, len, offset, buffer_index);
  } else {
    io_uring_prep_read_fixed(sqe, fd, addr, len, offset, buffer_index);
  }
  io_uring_sqe_set_data64(sqe, tag);
  ++outstanding_;
  ++unsubmitted_;
  return absl::OkStatus();
}

absl::Status IoRing::QueueRead(int fd, int buffer_index, uint8_t* addr, uint32_t len,
                               uint64_t offset, uint64_t tag) {
  return Queue(false, fd, buffer_index, addr, len, offset, tag);
}

absl::Status IoRing::QueueWrite(int fd, int buffer_index, const uint8_t* addr, uint32_t len,
                                uint64_t offset, uint64_t tag) {
  return Queue(true, fd, buffer_index, const_cast<uint8_t*>(addr), len, offset, tag);
}

absl::Status IoRing::QueuePoll(int fd, uint64_t tag) {
  if (outstanding_ >= static_cast<int>(queue_depth_)) {
    return absl::ResourceExhaustedError("io_uring queue is full: reap completions first");
  }
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) return absl::ResourceExhaustedError("io_uring submission queue is full");
  io_uring_prep_poll_add(sqe, fd, POLLIN);
  io_uring_sqe_set_data64(sqe, tag);
  ++outstanding_;
  ++unsubmitted_;
  return absl::OkStatus();
}

absl::Status IoRing::Submit() {
  while (unsubmitted_ > 0) {
    const int rc = io_uring_submit(&ring_);
    if (rc == -EINTR) continue;
    if (rc == -EAGAIN || rc == -EBUSY || rc == 0) {
      // The kernel is short of resources or completions must be reaped first; what is left
      // goes with the next Submit or Reap.
      return absl::ResourceExhaustedError(
          absl::StrCat("io_uring_submit: ", rc == 0 ? "nothing taken" : ErrnoText(-rc)));
    }
    if (rc < 0) return absl::UnavailableError(absl::StrCat("io_uring_submit: ", ErrnoText(-rc)));
    unsubmitted_ -= std::min(rc, unsubmitted_);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<IoRing::Completion>> IoRing::Reap(int min_completions) {
  std::vector<Completion> out;
  const int want = std::min(min_completions, outstanding_);
  while (true) {
    if (unsubmitted_ > 0) {
      if (absl::Status s = Submit(); !s.ok() && !absl::IsResourceExhausted(s)) return s;
    }
    // Whatever is ready, without waiting.
    io_uring_cqe* cqe = nullptr;
    while (outstanding_ > 0 && io_uring_peek_cqe(&ring_, &cqe) == 0) {
      out.push_back({io_uring_cqe_get_data64(cqe), cqe->res});
      io_uring_cqe_seen(&ring_, cqe);
      --outstanding_;
    }
    if (static_cast<int>(out.size()) >= want) return out;
    if (outstanding_ > unsubmitted_) {
      // Something is in the kernel: wait for it.
      const int rc = io_uring_wait_cqe(&ring_, &cqe);
      if (rc == -EINTR) continue;
      if (rc < 0) {
        return absl::UnavailableError(absl::StrCat("io_uring_wait_cqe: ", ErrnoText(-rc)));
      }
      continue;  // taken by the peek loop
    }
    // Nothing in the kernel and it takes nothing now: back off, then submit again.
    usleep(100);
  }
}

}  // namespace strata
