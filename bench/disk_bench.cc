// disk_bench: the disk tier's I/O path (memtier/io_ring.h: O_DIRECT, io_uring, registered buffers)
// reading and writing fixed-size blocks of a file at a given queue depth, for comparison with fio
// on the same file, block size and depth (bench/run_disk_bench.sh runs both).
//
//   disk_bench --path FILE [--file_mib 4096] [--block_kib 2048] [--queue_depth 32] [--seconds 10]
//       [--json_out FILE]
//
// Phases: fill the file sequentially (so reads hit written extents, not holes), then random writes,
// then random reads, each for --seconds (the fill runs to the end of the file). Offsets are block
// aligned and drawn uniformly; the queue is kept full. Reports GB/s (10^9 bytes per second).
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/init.h"
#include "memtier/io_ring.h"

ABSL_FLAG(std::string, path, "/tmp/strata-disk-bench", "File to read and write (preallocated).");
ABSL_FLAG(int64_t, file_mib, 4096, "File size in MiB.");
ABSL_FLAG(int64_t, block_kib, 2048, "Block size in KiB.");
ABSL_FLAG(int, queue_depth, 32, "I/Os in flight.");
ABSL_FLAG(double, seconds, 10, "Seconds per random phase.");
ABSL_FLAG(std::string, json_out, "", "Write the results as JSON to this file.");
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

int Main() {
  const int64_t block = absl::GetFlag(FLAGS_block_kib) << 10;
  const int64_t blocks = (absl::GetFlag(FLAGS_file_mib) << 20) / block;
  const unsigned depth = static_cast<unsigned>(absl::GetFlag(FLAGS_queue_depth));
  absl::StatusOr<SlotFile> file = SlotFile::Open(absl::GetFlag(FLAGS_path), blocks, block);
  if (!file.ok()) {
    std::fprintf(stderr, "disk_bench: %s\n", std::string(file.status().message()).c_str());
    return 1;
  }
  std::vector<AlignedBuffer> buffers;
  std::vector<iovec> iov;
  for (unsigned i = 0; i < depth; ++i) {
    absl::StatusOr<AlignedBuffer> b = AlignedBuffer::Create(
        static_cast<size_t>(block), block >= (int64_t{2} << 20) ? size_t{2} << 20 : 4096);
    if (!b.ok()) return 1;
    for (size_t k = 0; k < b->size(); ++k) b->data()[k] = static_cast<uint8_t>(k * 31 + i);
    iov.push_back({b->data(), b->size()});
    buffers.push_back(*std::move(b));
  }
  absl::StatusOr<std::unique_ptr<IoRing>> ring = IoRing::Create(depth, iov);
  if (!ring.ok()) {
    std::fprintf(stderr, "disk_bench: %s\n", std::string(ring.status().message()).c_str());
    return 1;
  }
  std::mt19937_64 rng(1);
  std::uniform_int_distribution<int64_t> pick(0, blocks - 1);

  // Runs one phase: `next` gives the block of each new I/O (-1: no more).
  auto run = [&](const std::string& name, bool write, auto next, absl::Duration limit) -> Phase {
    Phase p;
    p.name = name;
    const absl::Time start = absl::Now();
    std::vector<unsigned> free_buffers;
    for (unsigned i = 0; i < depth; ++i) free_buffers.push_back(i);
    bool more = true;
    int64_t bytes = 0;
    while (true) {
      while (more && !free_buffers.empty() && absl::Now() - start < limit) {
        const int64_t b = next();
        if (b < 0) {
          more = false;
          break;
        }
        const unsigned i = free_buffers.back();
        free_buffers.pop_back();
        absl::Status s =
            write ? (*ring)->QueueWrite(file->fd(), static_cast<int>(i), buffers[i].data(),
                                        static_cast<uint32_t>(block), file->SlotOffset(b), i)
                  : (*ring)->QueueRead(file->fd(), static_cast<int>(i), buffers[i].data(),
                                       static_cast<uint32_t>(block), file->SlotOffset(b), i);
        if (!s.ok()) {
          std::fprintf(stderr, "disk_bench: %s\n", std::string(s.message()).c_str());
          std::exit(1);
        }
      }
      if ((*ring)->outstanding() == 0) break;
      absl::StatusOr<std::vector<IoRing::Completion>> done = (*ring)->Reap(1);
      if (!done.ok()) std::exit(1);
      for (const IoRing::Completion& c : *done) {
        if (c.result != block) {
          std::fprintf(stderr, "disk_bench: I/O returned %d\n", c.result);
          std::exit(1);
        }
        bytes += block;
        ++p.ios;
        free_buffers.push_back(static_cast<unsigned>(c.tag));
      }
    }
    p.gb_per_s = static_cast<double>(bytes) / absl::ToDoubleSeconds(absl::Now() - start) / 1e9;
    return p;
  };
  int64_t seq = 0;
  std::vector<Phase> phases;
  const absl::Duration limit = absl::Seconds(absl::GetFlag(FLAGS_seconds));
  for (absl::string_view phase : absl::StrSplit(absl::GetFlag(FLAGS_phases), ',')) {
    if (phase == "fill") {
      phases.push_back(run(
          "fill (sequential write)", true, [&] { return seq < blocks ? seq++ : int64_t{-1}; },
          absl::InfiniteDuration()));
    } else if (phase == "randwrite") {
      phases.push_back(run(
          "random write", true, [&] { return pick(rng); }, limit));
    } else if (phase == "randread") {
      phases.push_back(run(
          "random read", false, [&] { return pick(rng); }, limit));
    } else {
      std::fprintf(stderr, "disk_bench: unknown phase %s\n", std::string(phase).c_str());
      return 2;
    }
  }

  std::string json = absl::StrFormat(
      "{\"path\":\"%s\",\"file_mib\":%d,\"block_kib\":%d,\"queue_depth\":%d,\"phases\":[",
      absl::GetFlag(FLAGS_path), absl::GetFlag(FLAGS_file_mib), absl::GetFlag(FLAGS_block_kib),
      depth);
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
