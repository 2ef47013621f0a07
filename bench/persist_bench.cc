// persist_bench: what a worker's shutdown and restart cost with a disk KV tier. It fills the host
// tier with blocks put down from a device tier (host memory here), then times:
//   - KvStore::Persist, writing every host block to the disk tier (what strata-worker does on
//     SIGTERM, bounded by --persist_kv_s);
//   - opening a store on the same file again, which indexes the blocks it finds (the replacement
//     worker's start).
// Blocks are Llama-3-8B's by default: 32 layers x K and V x 16 tokens x 8 KV heads x 128 in bf16,
// 2 MiB each.
//
//   persist_bench --path=FILE [--host_mib=2048] [--queue_depth=32] [--reps=3] [--layers=32]
//       [--kv_heads=8] [--head_dim=128] [--json_out=FILE]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "bench/stats.h"
#include "common/init.h"
#include "common/log.h"
#include "memtier/device_tier.h"
#include "memtier/kv_store.h"

ABSL_FLAG(std::string, path, "/tmp/strata-persist-bench", "The disk tier's file (deleted after).");
ABSL_FLAG(int64_t, host_mib, 2048, "Host tier size: the blocks persisted.");
ABSL_FLAG(int, queue_depth, 32, "Disk tier operations in flight.");
ABSL_FLAG(int, reps, 3, "Repetitions; medians are reported.");
ABSL_FLAG(int64_t, layers, 32, "Model layers.");
ABSL_FLAG(int64_t, kv_heads, 8, "KV heads.");
ABSL_FLAG(int64_t, head_dim, 128, "Head dimension.");
ABSL_FLAG(std::string, json_out, "", "Append one JSON line with the medians here.");

namespace strata {
namespace {

int Main() {
  KvBlockLayout layout;
  layout.num_segments = 2 * absl::GetFlag(FLAGS_layers);
  layout.block_tokens = 16;
  layout.num_heads = absl::GetFlag(FLAGS_kv_heads);
  layout.head_dim = absl::GetFlag(FLAGS_head_dim);
  layout.dtype = DType::kBF16;
  DeviceTierConfig dc;
  dc.layout = layout;
  dc.num_slots = 1;
  absl::StatusOr<std::unique_ptr<DeviceTier>> device = DeviceTier::Create(dc);
  if (!device.ok()) {
    LOG(ERROR) << device.status();
    return 1;
  }
  const std::string path = absl::GetFlag(FLAGS_path);
  KvStoreConfig config;
  config.host_bytes = absl::GetFlag(FLAGS_host_mib) << 20;
  config.disk_bytes = config.host_bytes + config.host_bytes / 4;
  config.disk_path = path;
  config.disk_queue_depth = absl::GetFlag(FLAGS_queue_depth);

  std::vector<double> persist_s, open_s, put_s;
  int64_t blocks = 0, slot_bytes = 0, recovered = 0;
  std::vector<uint8_t> payload(layout.block_bytes());
  for (int rep = 0; rep < absl::GetFlag(FLAGS_reps); ++rep) {
    std::remove(path.c_str());
    absl::StatusOr<std::unique_ptr<KvStore>> store = KvStore::Create(config, layout, device->get());
    if (!store.ok()) {
      LOG(ERROR) << store.status();
      return 1;
    }
    blocks = (*store)->stats().host.num_slots;
    slot_bytes = (*store)->stats().host.slot_bytes;
    // Fill the host tier: each block computed into the device slot, then put down. The store's own
    // write-backs are left to Persist (no Poll in between).
    absl::Time t0 = absl::Now();
    for (int64_t i = 0; i < blocks; ++i) {
      std::memset(payload.data(), static_cast<int>(i & 0xff), payload.size());
      const BlockKey key{0x9e3779b97f4a7c15ull * static_cast<uint64_t>(i + 1), 1};
      absl::Status written;
      (*device)->Write(0, key, payload, [&written](absl::Status s) { written = std::move(s); });
      (*device)->Flush();
      if (!written.ok()) {
        LOG(ERROR) << written;
        return 1;
      }
      (*store)->Put(0, key);
    }
    put_s.push_back(absl::ToDoubleSeconds(absl::Now() - t0));
    t0 = absl::Now();
    const int64_t n = (*store)->Persist(absl::InfiniteFuture());
    persist_s.push_back(absl::ToDoubleSeconds(absl::Now() - t0));
    if (n != blocks) {
      LOG(ERROR) << "persisted " << n << " of " << blocks << " blocks";
      return 1;
    }
    store->reset();
    t0 = absl::Now();
    store = KvStore::Create(config, layout, device->get());
    open_s.push_back(absl::ToDoubleSeconds(absl::Now() - t0));
    if (!store.ok()) {
      LOG(ERROR) << store.status();
      return 1;
    }
    recovered = (*store)->stats().disk_recovered;
    if (recovered != blocks) {
      LOG(ERROR) << "recovered " << recovered << " of " << blocks << " blocks";
      return 1;
    }
  }
  std::remove(path.c_str());
  const double bytes = static_cast<double>(blocks) * slot_bytes;
  const double persist = Median(persist_s), open = Median(open_s), put = Median(put_s);
  std::printf("%lld blocks of %lld bytes (%.2f GiB), queue depth %d, medians of %d\n",
              static_cast<long long>(blocks), static_cast<long long>(slot_bytes), bytes / (1 << 30),
              absl::GetFlag(FLAGS_queue_depth), absl::GetFlag(FLAGS_reps));
  std::printf("put down to host  %8.3f s  %6.2f GB/s\n", put, bytes / put / 1e9);
  std::printf("persist to disk   %8.3f s  %6.2f GB/s\n", persist, bytes / persist / 1e9);
  std::printf("reopen + recover  %8.3f s  (%lld blocks indexed)\n", open,
              static_cast<long long>(recovered));
  const std::string json_out = absl::GetFlag(FLAGS_json_out);
  if (!json_out.empty()) {
    if (std::FILE* f = std::fopen(json_out.c_str(), "a")) {
      absl::FPrintF(f,
                    "{\"blocks\":%d,\"slot_bytes\":%d,\"queue_depth\":%d,\"put_s\":%.4f,"
                    "\"persist_s\":%.4f,\"persist_gb_per_s\":%.3f,\"reopen_s\":%.4f}\n",
                    blocks, slot_bytes, absl::GetFlag(FLAGS_queue_depth), put, persist,
                    bytes / persist / 1e9, open);
      std::fclose(f);
    }
  }
  return 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv,
                      "persist_bench --path=FILE: what persisting the host KV tier to disk and "
                      "recovering it cost");
  return strata::Main();
}
