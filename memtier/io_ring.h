// Owned OS resources for the disk tier: page-aligned buffers, an O_DIRECT slot file, and an
// io_uring ring with registered buffers. Each is a move-only RAII type (STYLE: written once).
//
// Thread contract: an IoRing belongs to one thread (the disk tier's I/O thread); AlignedBuffer and
// SlotFile are plain resources with no internal synchronization.
#ifndef STRATA_MEMTIER_IO_RING_H_
#define STRATA_MEMTIER_IO_RING_H_

#include <liburing.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace strata {

// `bytes` of zeroed memory aligned to `alignment` (4096: what O_DIRECT needs; 2 MiB or more also
// asks for transparent huge pages, so that large I/Os are few segments).
class AlignedBuffer {
 public:
  static absl::StatusOr<AlignedBuffer> Create(size_t bytes, size_t alignment = 4096);
  AlignedBuffer() = default;
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  ~AlignedBuffer();

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  absl::Span<uint8_t> span() const { return absl::MakeSpan(data_, size_); }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// A preallocated file of `num_slots` slots of `slot_bytes` each, opened O_DIRECT (the page cache is
// bypassed: reads and writes must be aligned to 4096 bytes in offset, length and memory).
class SlotFile {
 public:
  // Creates or reopens `path`, preallocating num_slots * slot_bytes (fallocate). RESOURCE_EXHAUSTED
  // when the file system is full (or the file would pass a quota or size limit),
  // FAILED_PRECONDITION when another process has it open as a slot file (an exclusive flock, held
  // until close; waited for up to 2 s, for a killed predecessor's kernel I/O to drain),
  // INVALID_ARGUMENT for sizes that are not multiples of 4096, UNAVAILABLE for other I/O errors
  // (the message names the path and the error).
  static absl::StatusOr<SlotFile> Open(const std::string& path, int64_t num_slots,
                                       int64_t slot_bytes);
  SlotFile() = default;
  SlotFile(SlotFile&& other) noexcept;
  SlotFile& operator=(SlotFile&& other) noexcept;
  ~SlotFile();

  int fd() const { return fd_; }
  int64_t num_slots() const { return num_slots_; }
  int64_t slot_bytes() const { return slot_bytes_; }
  uint64_t SlotOffset(int64_t slot) const { return static_cast<uint64_t>(slot * slot_bytes_); }
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  int64_t num_slots_ = 0;
  int64_t slot_bytes_ = 0;
  std::string path_;
};

// One io_uring with `buffers` registered (fixed buffers: the kernel pins and maps them once, so
// each read and write skips that work).
class IoRing {
 public:
  struct Completion {
    uint64_t tag = 0;
    // Bytes transferred, or -errno.
    int32_t result = 0;
  };

  // UNAVAILABLE when io_uring cannot be set up (an old kernel, a seccomp filter, memlock limits).
  static absl::StatusOr<std::unique_ptr<IoRing>> Create(unsigned queue_depth,
                                                        absl::Span<const iovec> buffers);
  // Close(), logging an error.
  ~IoRing();
  // Waits for every operation the kernel took (it may write into their buffers until then), drops
  // those it never took, and closes the ring. UNAVAILABLE when the wait failed: the kernel may
  // still own some buffers, and the caller must not reuse them. The ring takes nothing after.
  absl::Status Close();
  IoRing(const IoRing&) = delete;
  IoRing& operator=(const IoRing&) = delete;

  // Queue a read or write of `len` bytes at file `offset` into / from `addr`, which lies inside
  // registered buffer `buffer_index` (or anywhere, page-aligned, when buffer_index is -1: a plain
  // read or write, for memory that could not be registered). RESOURCE_EXHAUSTED when `queue_depth`
  // operations are already queued or in flight (reap first). Nothing reaches the kernel until
  // Submit.
  absl::Status QueueRead(int fd, int buffer_index, uint8_t* addr, uint32_t len, uint64_t offset,
                         uint64_t tag);
  absl::Status QueueWrite(int fd, int buffer_index, const uint8_t* addr, uint32_t len,
                          uint64_t offset, uint64_t tag);
  // Queue a one-shot wait for `fd` to become readable (an eventfd that other threads signal), so
  // that one Reap wakes for either I/O or new work. Counts against queue_depth like an I/O.
  absl::Status QueuePoll(int fd, uint64_t tag);
  // Submits everything queued (one system call unless the kernel takes part of it).
  // RESOURCE_EXHAUSTED when the kernel takes no more now (EAGAIN, EBUSY): reap, then retry; what
  // is left stays queued.
  absl::Status Submit();
  // Submits anything still queued (retrying while the kernel refuses it), waits for at least
  // `min_completions` (at most what is outstanding) and returns every completion available, in no
  // particular order.
  absl::StatusOr<std::vector<Completion>> Reap(int min_completions);

  unsigned queue_depth() const { return queue_depth_; }
  // Queued plus in flight.
  int outstanding() const { return outstanding_; }

 private:
  IoRing(unsigned queue_depth) : queue_depth_(queue_depth) {}
  absl::Status Queue(bool write, int fd, int buffer_index, uint8_t* addr, uint32_t len,
                     uint64_t offset, uint64_t tag);

  io_uring ring_{};
  const unsigned queue_depth_;
  int outstanding_ = 0;
  int unsubmitted_ = 0;
};

}  // namespace strata

#endif  // STRATA_MEMTIER_IO_RING_H_
