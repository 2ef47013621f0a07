// disk_bench: the disk tier's I/O path reading and writing fixed-size blocks of a file at a given
// queue depth, for comparison with fio on the same file, block size and depth
// (bench/run_disk_bench.sh runs both). --api ring drives memtier's IoRing directly (O_DIRECT,
// io_uring, registered buffers); --api tier drives the DiskTier itself: slot images written from
// and read into a registered host pool through its I/O thread, every read checked (header, key,
// payload checksum) as in serving.
//
//   disk_bench --path FILE [--api ring|tier] [--file_mib 4096] [--block_kib 2048]
//       [--queue_depth 32] [--seconds 10] [--json_out FILE]
//
// Phases: fill the file sequentially (so reads hit written extents, not holes), then random writes,
// then random reads, each for --seconds (the fill runs to the end of the file). Offsets are block
// aligned and drawn uniformly; the queue is kept full. Reports GB/s (10^9 bytes per second).
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/init.h"
#include "common/log.h"
#include "memtier/disk_tier.h"
#include "memtier/host_tier.h"
#include "memtier/io_ring.h"
#include "memtier/slot_format.h"

ABSL_FLAG(std::string, path, "/tmp/strata-disk-bench", "File to read and write (preallocated).");
ABSL_FLAG(int64_t, file_mib, 4096, "File size in MiB.");
ABSL_FLAG(int64_t, block_kib, 2048, "Block size in KiB.");
ABSL_FLAG(int, queue_depth, 32, "I/Os in flight.");
ABSL_FLAG(double, seconds, 10, "Seconds per random phase.");
ABSL_FLAG(std::string, json_out, "", "Write the results as JSON to this file.");
ABSL_FLAG(std::string, api, "ring", "ring (memtier's IoRing) or tier (the DiskTier).");
ABSL_FLAG(
    std::string, phases, "fill,randwrite,randread",
    "Phases to run, in order: fill (sequential write of the whole file), randwrite, randread.");

namespace strata {
namespace {

struct Phase {
  std::string name;
  double gb_per_s = 0;
  int64_t ios = 0;
};

// One way of doing block I/O at a queue depth: Issue starts a read or write of `block` with buffer
// `buffer` (0 .. depth-1); Wait blocks for at least one completion and returns the buffers freed.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual void Issue(bool write, int64_t block, int buffer) = 0;
  virtual std::vector<int> Wait() = 0;
  virtual int64_t outstanding() const = 0;
};

class RingBackend final : public Backend {
 public:
  static std::unique_ptr<RingBackend> Create(int64_t blocks, int64_t block, int depth) {
    auto r = std::unique_ptr<RingBackend>(new RingBackend(block));
    absl::StatusOr<SlotFile> file = SlotFile::Open(absl::GetFlag(FLAGS_path), blocks, block);
    CHECK_OK(file.status());
    r->file_ = *std::move(file);
    std::vector<iovec> iov;
    for (int i = 0; i < depth; ++i) {
      absl::StatusOr<AlignedBuffer> b = AlignedBuffer::Create(
          static_cast<size_t>(block), block >= (int64_t{2} << 20) ? size_t{2} << 20 : 4096);
      CHECK_OK(b.status());
      for (size_t k = 0; k < b->size(); ++k) b->data()[k] = static_cast<uint8_t>(k * 31 + i);
      iov.push_back({b->data(), b->size()});
      r->buffers_.push_back(*std::move(b));
    }
    absl::StatusOr<std::unique_ptr<IoRing>> ring =
        IoRing::Create(static_cast<unsigned>(depth), iov);
    CHECK_OK(ring.status());
    r->ring_ = *std::move(ring);
    return r;
  }
  void Issue(bool write, int64_t block, int i) override {
    uint8_t* buf = buffers_[i].data();
    const uint32_t n = static_cast<uint32_t>(block_);
    CHECK_OK(write ? ring_->QueueWrite(file_.fd(), i, buf, n, file_.SlotOffset(block), i)
                   : ring_->QueueRead(file_.fd(), i, buf, n, file_.SlotOffset(block), i));
  }
  std::vector<int> Wait() override {
    absl::StatusOr<std::vector<IoRing::Completion>> done = ring_->Reap(1);
    CHECK_OK(done.status());
    std::vector<int> freed;
    for (const IoRing::Completion& c : *done) {
      CHECK_EQ(c.result, block_) << "I/O returned " << c.result;
      freed.push_back(static_cast<int>(c.tag));
    }
    return freed;
  }
  int64_t outstanding() const override { return ring_->outstanding(); }

 private:
  explicit RingBackend(int64_t block) : block_(block) {}
  const int64_t block_;
  SlotFile file_;
  std::vector<AlignedBuffer> buffers_;
  std::unique_ptr<IoRing> ring_;
};

// The DiskTier: a block is one slot image of a host pool registered with the tier's ring; every
// read is checked (header, key, payload checksum) as in serving.
class TierBackend final : public Backend {
 public:
  static std::unique_ptr<TierBackend> Create(int64_t blocks, int64_t block, int depth) {
    CHECK_GE(block, 8192) << "--api tier needs blocks of 8 KiB or more";
    // A layout whose slot (header page included) is exactly one block.
    const KvCodec codec(KvBlockLayout{1, (block - 4096) / 4096, 1, 1024}, KvCompression::kNone);
    auto t = std::unique_ptr<TierBackend>(new TierBackend());
    HostTierConfig hc;
    hc.codec = codec;
    hc.num_slots = depth;
    absl::StatusOr<std::unique_ptr<HostTier>> host = HostTier::Create(hc);
    CHECK_OK(host.status());
    t->host_ = *std::move(host);
    std::vector<uint8_t> payload(codec.raw_bytes());
    for (size_t k = 0; k < payload.size(); ++k) payload[k] = static_cast<uint8_t>(k * 31);
    for (int i = 0; i < depth; ++i) {
      t->host_->Write(i, kKey, payload, [](absl::Status s) { CHECK_OK(s); });
    }
    t->host_->Flush();
    DiskTierConfig dc;
    dc.path = absl::GetFlag(FLAGS_path);
    dc.num_slots = blocks;
    dc.codec = codec;
    dc.queue_depth = depth;
    dc.registered_region = t->host_->region();
    dc.recover = false;
    absl::StatusOr<std::unique_ptr<DiskTier>> disk = DiskTier::Open(dc);
    CHECK_OK(disk.status());
    t->disk_ = *std::move(disk);
    CHECK_EQ(t->disk_->slot_bytes(), block);
    return t;
  }
  void Issue(bool write, int64_t block, int i) override {
    auto done = [this, i](absl::Status s) {
      CHECK_OK(s);
      freed_.push_back(i);
    };
    if (write) {
      disk_->WriteImage(block, host_->image(i), done);
    } else {
      disk_->ReadImage(block, kKey, host_->image(i), done);
    }
  }
  std::vector<int> Wait() override {
    freed_.clear();
    disk_->WaitAndPoll();
    return freed_;
  }
  int64_t outstanding() const override { return disk_->in_flight(); }

 private:
  static constexpr BlockKey kKey{1, 0};
  std::unique_ptr<HostTier> host_;
  std::unique_ptr<DiskTier> disk_;
  std::vector<int> freed_;
};

// Runs one phase at full queue depth: `next` gives the block of each new I/O (-1: no more).
template <typename Next>
Phase RunPhase(Backend& io, const std::string& name, bool write, Next next, int depth,
               int64_t block, absl::Duration limit) {
  Phase p;
  p.name = name;
  const absl::Time start = absl::Now();
  std::vector<int> free_buffers;
  for (int i = 0; i < depth; ++i) free_buffers.push_back(i);
  bool more = true;
  while (true) {
    while (more && !free_buffers.empty() && absl::Now() - start < limit) {
      const int64_t b = next();
      if (b < 0) {
        more = false;
        break;
      }
      io.Issue(write, b, free_buffers.back());
      free_buffers.pop_back();
    }
    if (io.outstanding() == 0) break;
    for (int i : io.Wait()) {
      ++p.ios;
      free_buffers.push_back(i);
    }
  }
  p.gb_per_s =
      static_cast<double>(p.ios * block) / absl::ToDoubleSeconds(absl::Now() - start) / 1e9;
  return p;
}

int Report(const std::vector<Phase>& phases, int64_t block, unsigned depth);

int Main() {
  const int64_t block = absl::GetFlag(FLAGS_block_kib) << 10;
  const int64_t blocks = (absl::GetFlag(FLAGS_file_mib) << 20) / block;
  const int depth = absl::GetFlag(FLAGS_queue_depth);
  std::unique_ptr<Backend> io;
  if (absl::GetFlag(FLAGS_api) == "tier") {
    io = TierBackend::Create(blocks, block, depth);
  } else if (absl::GetFlag(FLAGS_api) == "ring") {
    io = RingBackend::Create(blocks, block, depth);
  } else {
    std::fprintf(stderr, "disk_bench: --api must be ring or tier\n");
    return 2;
  }
  std::mt19937_64 rng(1);
  std::uniform_int_distribution<int64_t> pick(0, blocks - 1);
  int64_t seq = 0;
  std::vector<Phase> phases;
  const absl::Duration limit = absl::Seconds(absl::GetFlag(FLAGS_seconds));
  for (absl::string_view phase : absl::StrSplit(absl::GetFlag(FLAGS_phases), ',')) {
    if (phase == "fill") {
      phases.push_back(RunPhase(
          *io, "fill (sequential write)", true, [&] { return seq < blocks ? seq++ : int64_t{-1}; },
          depth, block, absl::InfiniteDuration()));
    } else if (phase == "randwrite") {
      phases.push_back(RunPhase(
          *io, "random write", true, [&] { return pick(rng); }, depth, block, limit));
    } else if (phase == "randread") {
      phases.push_back(RunPhase(
          *io, "random read", false, [&] { return pick(rng); }, depth, block, limit));
    } else {
      std::fprintf(stderr, "disk_bench: unknown phase %s\n", std::string(phase).c_str());
      return 2;
    }
  }
  return Report(phases, block, static_cast<unsigned>(depth));
}

int Report(const std::vector<Phase>& phases, int64_t block, unsigned depth) {
  std::string json = absl::StrFormat(
      "{\"path\":\"%s\",\"api\":\"%s\",\"file_mib\":%d,\"block_kib\":%d,\"queue_depth\":%d,"
      "\"phases\":[",
      absl::GetFlag(FLAGS_path), absl::GetFlag(FLAGS_api), absl::GetFlag(FLAGS_file_mib),
      absl::GetFlag(FLAGS_block_kib), depth);
  for (size_t i = 0; i < phases.size(); ++i) {
    std::printf("%-24s %8.3f GB/s  (%lld I/Os of %lld KiB, queue depth %u)\n",
                phases[i].name.c_str(), phases[i].gb_per_s, static_cast<long long>(phases[i].ios),
                static_cast<long long>(block >> 10), depth);
    absl::StrAppendFormat(&json, "%s{\"phase\":\"%s\",\"gb_per_s\":%.4f,\"ios\":%d}",
                          i == 0 ? "" : ",", phases[i].name, phases[i].gb_per_s, phases[i].ios);
  }
  json += "]}";
  if (const std::string out = absl::GetFlag(FLAGS_json_out); !out.empty()) {
    if (std::FILE* f = std::fopen(out.c_str(), "w")) {
      std::fprintf(f, "%s\n", json.c_str());
      std::fclose(f);
    }
  }
  return 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv, "disk_bench --path FILE: io_uring + O_DIRECT block throughput");
  return strata::Main();
}
