#include "memtier/disk_tier.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/copy.h"
#include "common/log.h"
#include "memtier/host_tier.h"
#include "memtier/slot_format.h"

namespace strata {
namespace {

constexpr uint64_t kWakeTag = ~uint64_t{0};
// io_uring registers each buffer up to 1 GiB.
constexpr int64_t kMaxRegisteredBytes = int64_t{1} << 30;

}  // namespace

struct DiskTier::Op {
  using Kind = OpKind;
  Kind kind = Kind::kWrite;
  int64_t slot = 0;
  BlockKey key;
  uint64_t generation = 0;
  const uint8_t* src = nullptr;  // payload or image to write
  uint8_t* dst = nullptr;        // payload or image to fill
  Done done;
  absl::Status status;
  // I/O thread state.
  int staging = -1;
  uint8_t* io_addr = nullptr;
  int buffer_index = -1;

  bool write() const { return kind == Kind::kWrite || kind == Kind::kWriteImage; }
};

absl::StatusOr<std::unique_ptr<DiskTier>> DiskTier::Open(DiskTierConfig config) {
  if (config.num_slots <= 0) return absl::InvalidArgumentError("disk tier: needs slots");
  // The ring has one more entry, for the wake-up poll.
  if (config.queue_depth < 1 || config.queue_depth > 4095) {
    return absl::InvalidArgumentError("disk tier: queue_depth must be in [1, 4095]");
  }
  if (config.staging_slots <= 0) config.staging_slots = config.queue_depth;
  const int64_t slot_bytes = HostTier::SlotBytesFor(config.codec);
  if (!config.registered_region.empty() &&
      (reinterpret_cast<uintptr_t>(config.registered_region.data()) % 4096 != 0 ||
       config.registered_region.size() % static_cast<size_t>(slot_bytes) != 0)) {
    return absl::InvalidArgumentError(
        "disk tier: the registered region must be 4096-aligned whole slots");
  }
  absl::StatusOr<SlotFile> file = SlotFile::Open(config.path, config.num_slots, slot_bytes);
  if (!file.ok()) return file.status();
  std::unique_ptr<DiskTier> tier(new DiskTier(std::move(config), *std::move(file), slot_bytes));
  if (absl::Status s = tier->Start(); !s.ok()) return s;
  return tier;
}

DiskTier::DiskTier(DiskTierConfig config, SlotFile file, int64_t slot_bytes)
    : config_(std::move(config)), file_(std::move(file)), slot_bytes_(slot_bytes) {}

absl::Status DiskTier::Start() {
  absl::StatusOr<AlignedBuffer> staging = AlignedBuffer::Create(
      static_cast<size_t>(slot_bytes_) * config_.staging_slots,
      slot_bytes_ * config_.staging_slots >= (int64_t{2} << 20) ? size_t{2} << 20 : size_t{4096});
  if (!staging.ok()) return staging.status();
  staging_ = *std::move(staging);
  for (int i = config_.staging_slots - 1; i >= 0; --i) free_staging_.push_back(i);

  std::vector<iovec> buffers;
  buffers.push_back({staging_.data(), staging_.size()});
  const absl::Span<uint8_t> region = config_.registered_region;
  if (!region.empty()) {
    region_chunk_bytes_ = std::max<int64_t>(1, kMaxRegisteredBytes / slot_bytes_) * slot_bytes_;
    for (size_t off = 0; off < region.size(); off += region_chunk_bytes_) {
      const size_t n = std::min<size_t>(region_chunk_bytes_, region.size() - off);
      buffers.push_back({region.data() + off, n});
    }
  }
  // One more entry than queue_depth for the wake-up poll.
  const unsigned entries = static_cast<unsigned>(config_.queue_depth) + 1;
  absl::StatusOr<std::unique_ptr<IoRing>> ring = IoRing::Create(entries, buffers);
  if (ring.ok()) {
    fixed_buffers_ = true;
  } else {
    LOG(WARNING) << "disk tier " << file_.path() << ": " << ring.status().message()
                 << "; using plain reads and writes";
    ring = IoRing::Create(entries, {});
    if (!ring.ok()) return ring.status();
  }
  ring_ = *std::move(ring);
  stats_.fixed_buffers = fixed_buffers_;
  if (config_.recover) {
    if (absl::Status s = Recover(); !s.ok()) return s;
  }
  event_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (event_fd_ < 0) return absl::UnavailableError(absl::StrCat("eventfd: ", strerror(errno)));
  thread_ = std::thread([this] { IoLoop(); });
  return absl::OkStatus();
}

absl::Status DiskTier::Recover() {
  // Read the first 4096 bytes (the header's page) of every slot, a staging area at a time.
  const int batch = std::min(config_.staging_slots, config_.queue_depth);
  absl::flat_hash_map<BlockHash, StoredSlot> newest;  // by hash; the key check follows
  const uint32_t want_layout = config_.codec.payload_layout();
  const uint64_t want_bytes = static_cast<uint64_t>(config_.codec.encoded_bytes());
  for (int64_t first = 0; first < config_.num_slots; first += batch) {
    const int64_t n = std::min<int64_t>(batch, config_.num_slots - first);
    for (int64_t i = 0; i < n; ++i) {
      uint8_t* addr = staging_.data() + i * slot_bytes_;
      std::memset(addr, 0, kSlotHeaderBytes);
      if (absl::Status s = ring_->QueueRead(file_.fd(), fixed_buffers_ ? 0 : -1, addr, 4096,
                                            file_.SlotOffset(first + i), first + i);
          !s.ok()) {
        return s;
      }
    }
    absl::StatusOr<std::vector<IoRing::Completion>> done = ring_->Reap(static_cast<int>(n));
    if (!done.ok()) return done.status();
    for (const IoRing::Completion& c : *done) {
      const int64_t slot = static_cast<int64_t>(c.tag);
      if (c.result != 4096) {
        ++stats_.invalid_slots;
        continue;
      }
      const uint8_t* addr = staging_.data() + (slot - first) * slot_bytes_;
      absl::StatusOr<SlotHeader> h =
          ValidateSlotHeader(absl::MakeConstSpan(addr, static_cast<size_t>(slot_bytes_)));
      if (absl::IsNotFound(h.status())) continue;
      if (!h.ok() || h->payload_layout != want_layout || h->payload_bytes != want_bytes) {
        ++stats_.invalid_slots;
        continue;
      }
      next_generation_ = std::max(next_generation_, h->generation + 1);
      StoredSlot found{slot, BlockKey{h->block_hash, h->cache_namespace}, h->generation};
      auto [it, inserted] = newest.try_emplace(h->block_hash, found);
      if (!inserted && it->second.generation < found.generation) it->second = found;
    }
  }
  for (const auto& [hash, found] : newest) recovered_.push_back(found);
  std::sort(recovered_.begin(), recovered_.end(),
            [](const StoredSlot& a, const StoredSlot& b) { return a.slot < b.slot; });
  stats_.recovered_slots = static_cast<int64_t>(recovered_.size());
  return absl::OkStatus();
}

DiskTier::~DiskTier() {
  if (!thread_.joinable()) return;
  Flush();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  const uint64_t one = 1;
  if (write(event_fd_, &one, sizeof(one)) < 0) {
    LOG(ERROR) << "disk tier: cannot wake the I/O thread: " << strerror(errno);
  }
  thread_.join();
  close(event_fd_);
}

int DiskTier::BufferIndexOf(const uint8_t* p) const {
  if (!fixed_buffers_) return -1;
  const absl::Span<uint8_t> region = config_.registered_region;
  if (region.empty() || p < region.data() || p >= region.data() + region.size()) return -2;
  return 1 + static_cast<int>((p - region.data()) / region_chunk_bytes_);
}

void DiskTier::Issue(OpKind kind, int64_t slot, BlockKey key, const uint8_t* src, uint8_t* dst,
                     size_t bytes, Done done) {
  auto op = std::make_unique<Op>();
  op->kind = kind;
  op->slot = slot;
  op->key = key;
  op->src = src;
  op->dst = dst;
  op->done = std::move(done);
  const bool image = kind == Op::Kind::kWriteImage || kind == Op::Kind::kReadImage;
  absl::Status s =
      CheckSlotAccess(*this, slot, image ? static_cast<size_t>(payload_bytes()) : bytes);
  if (s.ok() && image && static_cast<int64_t>(bytes) != slot_bytes_) {
    s = absl::InvalidArgumentError(
        absl::StrCat("disk tier: image of ", bytes, " bytes; a slot is ", slot_bytes_));
  }
  if (!s.ok()) {
    op->status = std::move(s);
    ++in_flight_;
    failed_.push_back(std::move(op));
    return;
  }
  if (op->write()) {
    op->generation = next_generation_++;
    if (image) SetSlotGeneration(absl::MakeSpan(dst, bytes), op->generation);
  }
  ++in_flight_;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back(std::move(op));
  }
  const uint64_t one = 1;
  if (write(event_fd_, &one, sizeof(one)) < 0) {
    LOG(ERROR) << "disk tier: cannot wake the I/O thread: " << strerror(errno);
  }
}

void DiskTier::Write(int64_t slot, BlockKey key, absl::Span<const uint8_t> payload, Done done) {
  Issue(Op::Kind::kWrite, slot, key, payload.data(), nullptr, payload.size(), std::move(done));
}

void DiskTier::Read(int64_t slot, BlockKey key, absl::Span<uint8_t> out, Done done) {
  Issue(Op::Kind::kRead, slot, key, nullptr, out.data(), out.size(), std::move(done));
}

void DiskTier::WriteImage(int64_t slot, absl::Span<uint8_t> image, Done done) {
  // The image names its block in its header; `dst` carries it only to rewrite the generation.
  Issue(Op::Kind::kWriteImage, slot, BlockKey{}, image.data(), image.data(), image.size(),
        std::move(done));
}

void DiskTier::ReadImage(int64_t slot, BlockKey key, absl::Span<uint8_t> image, Done done) {
  Issue(Op::Kind::kReadImage, slot, key, nullptr, image.data(), image.size(), std::move(done));
}

int DiskTier::Poll() {
  std::vector<std::unique_ptr<Op>> done;
  done.swap(failed_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& op : finished_) done.push_back(std::move(op));
    finished_.clear();
  }
  for (auto& op : done) {
    --in_flight_;
    if (op->status.ok() || absl::IsDataLoss(op->status)) {
      // The transfer itself happened.
      if (op->write()) {
        ++stats_.writes;
        stats_.write_bytes += slot_bytes_;
      } else {
        ++stats_.reads;
        stats_.read_bytes += slot_bytes_;
      }
    }
    if (absl::IsDataLoss(op->status)) ++stats_.corrupt_reads;
    if (absl::IsUnavailable(op->status) || absl::IsResourceExhausted(op->status)) {
      ++stats_.io_errors;
    }
    std::move(op->done)(std::move(op->status));
  }
  return static_cast<int>(done.size());
}

int DiskTier::WaitAndPoll() {
  if (in_flight_ > 0 && failed_.empty()) {
    std::unique_lock<std::mutex> lock(mu_);
    finished_cv_.wait(lock, [this] { return !finished_.empty(); });
  }
  return Poll();
}

void DiskTier::Flush() {
  while (in_flight_ > 0) WaitAndPoll();
}

bool DiskTier::Prepare(Op* op) {
  const bool payload = op->kind == Op::Kind::kWrite || op->kind == Op::Kind::kRead;
  uint8_t* image = op->kind == Op::Kind::kWriteImage  ? const_cast<uint8_t*>(op->src)
                   : op->kind == Op::Kind::kReadImage ? op->dst
                                                      : nullptr;
  const int index = payload ? -2 : BufferIndexOf(image);
  if (index == -2) {
    if (free_staging_.empty()) return false;
    op->staging = free_staging_.back();
    free_staging_.pop_back();
    op->io_addr = staging_.data() + op->staging * slot_bytes_;
    op->buffer_index = fixed_buffers_ ? 0 : -1;
  } else {
    op->io_addr = image;
    op->buffer_index = index;
  }
  const absl::Span<uint8_t> io(op->io_addr, static_cast<size_t>(slot_bytes_));
  if (op->kind == Op::Kind::kWrite) {
    const int64_t n = config_.codec.encoded_bytes();
    config_.codec.Encode(absl::MakeConstSpan(op->src, static_cast<size_t>(payload_bytes())),
                         io.subspan(kSlotHeaderBytes, n));
    SlotHeader h;
    h.block_hash = op->key.hash;
    h.cache_namespace = op->key.cache_namespace;
    h.payload_layout = config_.codec.payload_layout();
    h.generation = op->generation;
    CHECK_OK(SealSlot(h, n, io));
  } else if (op->kind == Op::Kind::kWriteImage && op->staging >= 0) {
    CopyBytes(op->io_addr, op->src, slot_bytes_);
  }
  return true;
}

void DiskTier::Complete(Op* op, int32_t result) {
  const char* what = op->write() ? "write" : "read";
  if (result < 0) {
    const std::string msg = absl::StrCat("disk tier ", file_.path(), ": ", what, " of slot ",
                                         op->slot, ": ", strerror(-result));
    op->status = result == -ENOSPC || result == -EDQUOT ? absl::ResourceExhaustedError(msg)
                                                        : absl::UnavailableError(msg);
  } else if (result != slot_bytes_) {
    op->status = absl::UnavailableError(absl::StrCat("disk tier ", file_.path(), ": short ", what,
                                                     " of slot ", op->slot, " (", result, " of ",
                                                     slot_bytes_, " bytes)"));
  } else if (!op->write()) {
    const absl::Span<const uint8_t> io(op->io_addr, static_cast<size_t>(slot_bytes_));
    absl::Status s = CheckSlotImage(io, op->key, config_.codec);
    if (!s.ok()) {
      op->status = absl::Status(
          absl::IsNotFound(s) ? absl::StatusCode::kNotFound : absl::StatusCode::kDataLoss,
          absl::StrCat("disk tier ", file_.path(), ": slot ", op->slot, ": ", s.message()));
    } else if (op->kind == Op::Kind::kRead) {
      config_.codec.Decode(io.subspan(kSlotHeaderBytes, config_.codec.encoded_bytes()),
                           absl::MakeSpan(op->dst, static_cast<size_t>(payload_bytes())));
    } else if (op->staging >= 0) {
      CopyBytes(op->dst, op->io_addr, slot_bytes_);
    }
  }
  ReleaseStaging(op);
}

void DiskTier::ReleaseStaging(Op* op) {
  if (op->staging >= 0) {
    free_staging_.push_back(op->staging);
    op->staging = -1;
  }
}

void DiskTier::Fail(Op* op, const absl::Status& status) {
  op->status = status;
  ReleaseStaging(op);
}

void DiskTier::Deliver(std::vector<std::unique_ptr<Op>>* completed) {
  if (completed->empty()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& op : *completed) finished_.push_back(std::move(op));
  }
  completed->clear();
  finished_cv_.notify_all();
  if (config_.notify) config_.notify();
}

void DiskTier::WaitForWake() {
  pollfd p{event_fd_, POLLIN, 0};
  while (poll(&p, 1, -1) < 0 && errno == EINTR) {
  }
  DrainWake();
}

void DiskTier::DrainWake() {
  uint64_t count;
  while (read(event_fd_, &count, sizeof(count)) > 0) {
  }
}

void DiskTier::IoLoop() {
  std::deque<std::unique_ptr<Op>> queue;  // accepted, not yet issued
  absl::flat_hash_set<Op*> in_ring;       // issued, completion not yet reaped
  bool wake_armed = false;
  const int max_io = config_.queue_depth;
  for (;;) {
    bool stopping;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (!pending_.empty()) {
        queue.push_back(std::move(pending_.front()));
        pending_.pop_front();
      }
      stopping = stop_;
    }
    std::vector<std::unique_ptr<Op>> completed;
    if (ring_ == nullptr) {
      // The ring has failed: every operation fails as it arrives.
      for (auto& op : queue) {
        Fail(op.get(), ring_status_);
        completed.push_back(std::move(op));
      }
      queue.clear();
      Deliver(&completed);
      if (stopping) break;
      WaitForWake();
      continue;
    }
    int io_outstanding = ring_->outstanding() - (wake_armed ? 1 : 0);
    while (!queue.empty() && io_outstanding < max_io) {
      Op* op = queue.front().get();
      if (!Prepare(op)) break;
      const int fault = config_.fault_injector ? config_.fault_injector(op->write(), op->slot) : 0;
      absl::Status queued;
      if (fault < 0) {
        Complete(op, fault);
        completed.push_back(std::move(queue.front()));
        queue.pop_front();
        continue;
      }
      const uint64_t tag = reinterpret_cast<uint64_t>(op);
      queued = op->write() ? ring_->QueueWrite(file_.fd(), op->buffer_index, op->io_addr,
                                               static_cast<uint32_t>(slot_bytes_),
                                               file_.SlotOffset(op->slot), tag)
                           : ring_->QueueRead(file_.fd(), op->buffer_index, op->io_addr,
                                              static_cast<uint32_t>(slot_bytes_),
                                              file_.SlotOffset(op->slot), tag);
      if (!queued.ok()) {
        Complete(op, -EIO);
        completed.push_back(std::move(queue.front()));
        queue.pop_front();
        continue;
      }
      in_ring.insert(queue.front().release());  // owned by the ring until its completion
      queue.pop_front();
      ++io_outstanding;
    }
    if (stopping && queue.empty() && io_outstanding == 0 && completed.empty()) break;
    absl::Status ring_error;
    if (!wake_armed && !stopping) {
      // A full ring (a transient shortage) has completions coming: wait for those instead.
      const absl::Status armed = ring_->QueuePoll(event_fd_, kWakeTag);
      wake_armed = armed.ok();
      if (!armed.ok() && !absl::IsResourceExhausted(armed)) ring_error = armed;
    }
    if (ring_error.ok() && completed.empty()) {
      if (config_.ring_fault_injector) ring_error = config_.ring_fault_injector();
      absl::StatusOr<std::vector<IoRing::Completion>> reaped =
          ring_error.ok() ? ring_->Reap(1) : ring_error;
      if (!reaped.ok()) {
        ring_error = reaped.status();
      } else {
        for (const IoRing::Completion& c : *reaped) {
          if (c.tag == kWakeTag) {
            wake_armed = false;
            DrainWake();
            continue;
          }
          Op* raw = reinterpret_cast<Op*>(c.tag);
          in_ring.erase(raw);
          std::unique_ptr<Op> op(raw);
          Complete(op.get(), c.result);
          completed.push_back(std::move(op));
        }
      }
    }
    if (!ring_error.ok()) {
      ring_status_ = absl::UnavailableError(
          absl::StrCat("disk tier ", file_.path(), ": io_uring failed: ", ring_error.message()));
      LOG(ERROR) << ring_status_ << "; every disk operation fails from now on";
      // Complete the armed wake-up poll, so that closing the ring (which waits for what the kernel
      // holds, our buffers included) does not wait for the owner.
      const uint64_t one = 1;
      if (wake_armed && write(event_fd_, &one, sizeof(one)) < 0) {
        LOG(ERROR) << "disk tier: cannot complete the wake-up poll: " << strerror(errno);
      }
      // Failing the operations hands their buffers back, which is only safe once the kernel is
      // done with them; when that cannot be known, stopping is the only safe answer.
      if (absl::Status closed = ring_->Close(); !closed.ok()) {
        LOG(FATAL) << ring_status_ << "; closing the ring: " << closed;
      }
      ring_.reset();
      wake_armed = false;
      for (Op* op : in_ring) {
        Fail(op, ring_status_);
        completed.push_back(std::unique_ptr<Op>(op));
      }
      in_ring.clear();
      // What is still queued fails on the next turn (ring_ is null).
    }
    Deliver(&completed);
  }
}

}  // namespace strata
