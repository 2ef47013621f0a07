// DeltaCache on real delta files of the bundled strata-tiny fine-tunes: registration checks,
// asynchronous loads, LRU eviction under the byte budget with pinned deltas kept, and failed loads.
#include "worker/engine/delta_cache.h"

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "worker/model/config.h"
#include "worker/model/delta_test_util.h"
#include "worker/model/lora.h"
#include "worker/model/safetensors.h"

namespace strata {
namespace {

using delta_test::kBase;
using delta_test::TempPath;

class DeltaCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<ModelConfig> config = LoadModelConfig(kBase);
    ASSERT_TRUE(config.ok());
    absl::StatusOr<std::unique_ptr<ModelWeights>> w = LoadModelWeights(kBase, *config, 0, 1);
    ASSERT_TRUE(w.ok());
    base_ = *std::move(w);
    fingerprint_ = BaseFingerprint(*base_->files);
    c_path_ = Compress("models/strata-tiny/ft-c-headers", "c");
    man_path_ = Compress("models/strata-tiny/ft-man", "man");
    absl::StatusOr<DeltaFileInfo> info = ReadDeltaFileInfo(c_path_);
    ASSERT_TRUE(info.ok());
    delta_bytes_ = info->data_bytes;
  }

  std::string Compress(const std::string& ft, const std::string& name) {
    const std::string out = TempPath(name + ".delta.safetensors");
    EXPECT_TRUE(CompressDelta(kBase, ft, out, {}).ok());
    return out;
  }

  // Waits (up to 30 s) until `loads` loads have ended, well or not.
  static void WaitForLoads(const DeltaCache& cache, int64_t loads) {
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (absl::Now() < deadline) {
      const DeltaCacheStats s = cache.GetStats();
      if (s.num_loads + s.num_load_failures >= loads) return;
      absl::SleepFor(absl::Milliseconds(2));
    }
    ADD_FAILURE() << "loads did not end";
  }

  std::unique_ptr<ModelWeights> base_;
  std::string fingerprint_, c_path_, man_path_;
  int64_t delta_bytes_ = 0;
};

TEST_F(DeltaCacheTest, RegistrationChecksIdFileBaseAndSize) {
  DeltaCache cache(base_.get(), fingerprint_, 4 * delta_bytes_);
  EXPECT_TRUE(cache.Register("c-headers", c_path_).ok());
  EXPECT_EQ(cache.Register("c-headers", man_path_).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(cache.Register("bad id!", man_path_).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache.Register("gone", TempPath("nope.safetensors")).code(),
            absl::StatusCode::kNotFound);
  // A delta made against another base (ft-man as the "base").
  const std::string other = TempPath("other-base.delta.safetensors");
  ASSERT_TRUE(
      CompressDelta("models/strata-tiny/ft-man", "models/strata-tiny/ft-c-headers", other, {})
          .ok());
  const absl::Status wrong_base = cache.Register("other", other);
  EXPECT_EQ(wrong_base.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(wrong_base.message(), "different base model")) << wrong_base;
  DeltaCache small(base_.get(), fingerprint_, delta_bytes_);
  const absl::Status too_big = small.Register("c-headers", c_path_);
  EXPECT_EQ(too_big.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(too_big.message(), "more than the whole delta cache")) << too_big;
  EXPECT_EQ(cache.Ids(), std::vector<std::string>{"c-headers"});
  EXPECT_EQ(cache.Acquire("nope").status().code(), absl::StatusCode::kNotFound);
}

// A LoRA adapter's directory registers by its header (checked against the base's shapes), counts
// its factors (bf16 over this bf16 base) against the budget, and loads like a delta.
TEST_F(DeltaCacheTest, RegistersAndLoadsLoraAdapters) {
  constexpr char kLora[] = "models/strata-tiny/lora-c-headers";
  absl::StatusOr<LoraAdapterInfo> info =
      ReadLoraAdapterInfo(kLora, base_->config, LoraFactorType(*base_));
  ASSERT_TRUE(info.ok()) << info.status();
  DeltaCache cache(base_.get(), fingerprint_, 4 * delta_bytes_);
  ASSERT_TRUE(cache.Register("lora", kLora).ok());
  EXPECT_EQ(cache.Revision("lora"), info->revision);
  cache.Prefetch("lora");
  WaitForLoads(cache, 1);
  absl::StatusOr<const DeltaWeights*> d = cache.Acquire("lora");
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_NE(*d, nullptr);
  EXPECT_TRUE((*d)->lora);
  EXPECT_EQ(cache.GetStats().resident_bytes, info->resident_bytes);
  cache.Release(*d);
  // Too big for the budget, and an adapter for another shape of model, are refused at start.
  DeltaCache small(base_.get(), fingerprint_, info->resident_bytes - 1);
  EXPECT_TRUE(absl::StrContains(small.Register("lora", kLora).message(), "whole delta cache"));
  const std::string other = TempPath("other-lora");
  std::filesystem::create_directories(other);
  std::filesystem::copy_file(std::string(kLora) + "/adapter_config.json",
                             other + "/adapter_config.json",
                             std::filesystem::copy_options::overwrite_existing);
  const std::vector<float> a(8 * 100, 0.0f);
  ASSERT_TRUE(WriteSafetensors(other + "/adapter_model.safetensors",
                               {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                 DType::kF32,
                                 {8, 100},
                                 absl::Span<const uint8_t>(
                                     reinterpret_cast<const uint8_t*>(a.data()), a.size() * 4)}})
                  .ok());
  const absl::Status wrong = cache.Register("other", other);
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(wrong.message(), "fine-tune other: ")) << wrong;
  EXPECT_TRUE(absl::StrContains(wrong.message(), "q_proj")) << wrong;
}

TEST_F(DeltaCacheTest, LoadsInTheBackgroundThenServesPinned) {
  DeltaCache cache(base_.get(), fingerprint_, 4 * delta_bytes_);
  ASSERT_TRUE(cache.Register("c", c_path_).ok());
  std::atomic<int> notified{0};
  cache.SetNotify([&] { notified.fetch_add(1); });
  cache.Prefetch("c");
  WaitForLoads(cache, 1);
  EXPECT_EQ(notified.load(), 1);
  absl::StatusOr<const DeltaWeights*> d = cache.Acquire("c");
  ASSERT_TRUE(d.ok());
  ASSERT_NE(*d, nullptr);
  EXPECT_EQ((*d)->path, c_path_);
  DeltaCacheStats s = cache.GetStats();
  EXPECT_EQ(s.num_loads, 1);
  EXPECT_EQ(s.num_hits, 1);
  EXPECT_EQ(s.num_pinned, 1);
  EXPECT_EQ(s.resident_bytes, (*d)->resident_bytes);
  EXPECT_EQ(s.resident_ids, std::vector<std::string>{"c"});
  cache.Release(*d);
  EXPECT_EQ(cache.GetStats().num_pinned, 0);
  // Prefetch of a resident delta loads nothing.
  cache.Prefetch("c");
  EXPECT_EQ(cache.GetStats().num_loads, 1);
}

TEST_F(DeltaCacheTest, EvictsTheLeastRecentlyUsedUnpinnedDelta) {
  // Room for two deltas of this size, not three.
  DeltaCache cache(base_.get(), fingerprint_, 2 * delta_bytes_ + delta_bytes_ / 2);
  ASSERT_TRUE(cache.Register("a", c_path_).ok());
  ASSERT_TRUE(cache.Register("b", man_path_).ok());
  ASSERT_TRUE(cache.Register("c", c_path_).ok());
  // Acquire of an unloaded delta starts its load and answers null.
  EXPECT_EQ(*cache.Acquire("a"), nullptr);
  EXPECT_EQ(*cache.Acquire("b"), nullptr);
  WaitForLoads(cache, 2);
  const DeltaWeights* a = *cache.Acquire("a");
  const DeltaWeights* b = *cache.Acquire("b");
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  // Both pinned: c must wait for room.
  EXPECT_EQ(*cache.Acquire("c"), nullptr);
  DeltaCacheStats s = cache.GetStats();
  EXPECT_EQ(s.num_waiting_for_room, 1);
  EXPECT_EQ(s.num_evictions, 0);
  // Releasing b makes it the only unpinned delta: it goes, c comes in.
  cache.Release(b);
  WaitForLoads(cache, 3);
  s = cache.GetStats();
  EXPECT_EQ(s.num_evictions, 1);
  EXPECT_EQ(s.num_resident, 2);
  EXPECT_LE(s.resident_bytes, 2 * delta_bytes_ + delta_bytes_ / 2);
  const DeltaWeights* c = *cache.Acquire("c");
  EXPECT_NE(c, nullptr);
  EXPECT_EQ(*cache.Acquire("a"), a);        // still resident, same memory
  EXPECT_EQ(*cache.Acquire("b"), nullptr);  // evicted: loading again, needs room
  cache.Release(a);
  cache.Release(a);
  cache.Release(c);
  WaitForLoads(cache, 4);
  EXPECT_NE(*cache.Acquire("b"), nullptr);
}

TEST_F(DeltaCacheTest, AFailedLoadIsReportedAndRetried) {
  const std::string path = TempPath("flaky.delta.safetensors");
  {
    std::ifstream in(c_path_, std::ios::binary);
    std::ofstream(path, std::ios::binary) << in.rdbuf();
  }
  DeltaCache cache(base_.get(), fingerprint_, 4 * delta_bytes_, absl::ZeroDuration());
  ASSERT_TRUE(cache.Register("flaky", path).ok());
  // Corrupt the data after registration (which reads only the header).
  {
    std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(-64, std::ios::end);
    f.put('\x55');
  }
  EXPECT_EQ(*cache.Acquire("flaky"), nullptr);
  WaitForLoads(cache, 1);
  absl::StatusOr<const DeltaWeights*> d = cache.Acquire("flaky");
  EXPECT_EQ(d.status().code(), absl::StatusCode::kDataLoss) << d.status();
  EXPECT_EQ(cache.GetStats().num_load_failures, 1);
  // Repaired: the next Prefetch tries again.
  {
    std::ifstream in(c_path_, std::ios::binary);
    std::ofstream(path, std::ios::binary | std::ios::trunc) << in.rdbuf();
  }
  cache.Prefetch("flaky");
  WaitForLoads(cache, 2);
  d = cache.Acquire("flaky");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_NE(*d, nullptr);
}

TEST_F(DeltaCacheTest, AFailedLoadIsNotRetriedBeforeItsBackoff) {
  DeltaCache cache(base_.get(), fingerprint_, 4 * delta_bytes_, absl::Hours(1));
  const std::string path = TempPath("gone.delta.safetensors");
  {
    std::ifstream in(c_path_, std::ios::binary);
    std::ofstream(path, std::ios::binary) << in.rdbuf();
  }
  ASSERT_TRUE(cache.Register("gone", path).ok());
  std::remove(path.c_str());
  cache.Prefetch("gone");
  WaitForLoads(cache, 1);
  cache.Prefetch("gone");  // within the backoff: no second read
  EXPECT_EQ(cache.Acquire("gone").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache.GetStats().num_load_failures, 1);
}

// Fine-tunes come and go while serving: an unregistered or replaced delta that a sequence holds
// stays in memory (and in the budget) until its last Release, and is gone then.
TEST_F(DeltaCacheTest, UnregisterAndReplaceWhileServing) {
  DeltaCache cache(base_.get(), fingerprint_, 4 * delta_bytes_);
  ASSERT_TRUE(cache.Register("a", c_path_).ok());
  ASSERT_TRUE(cache.Register("b", man_path_).ok());
  EXPECT_EQ(cache.Unregister("nope").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(*cache.Acquire("a"), nullptr);
  WaitForLoads(cache, 1);
  const DeltaWeights* a = *cache.Acquire("a");
  ASSERT_NE(a, nullptr);
  // Unregistered while held: unknown from now on, in memory until released.
  ASSERT_TRUE(cache.Unregister("a").ok());
  EXPECT_FALSE(cache.Has("a"));
  EXPECT_EQ(cache.Acquire("a").status().code(), absl::StatusCode::kNotFound);
  DeltaCacheStats s = cache.GetStats();
  EXPECT_EQ(s.num_registered, 1);
  EXPECT_EQ(s.num_resident, 1);
  EXPECT_EQ(s.num_pinned, 1);
  EXPECT_TRUE(s.resident_ids.empty());
  EXPECT_EQ(a->path, c_path_);  // still readable
  cache.Release(a);
  s = cache.GetStats();
  EXPECT_EQ(s.num_resident, 0);
  EXPECT_EQ(s.resident_bytes, 0);
  // Registered again under the same id: a fresh load.
  ASSERT_TRUE(cache.Register("a", c_path_).ok());
  EXPECT_EQ(*cache.Acquire("a"), nullptr);
  WaitForLoads(cache, 2);
  const DeltaWeights* old = *cache.Acquire("a");
  ASSERT_NE(old, nullptr);
  const std::string old_revision = cache.Revision("a");
  // Replaced by another file while held: the new revision at once, the old delta until released.
  ASSERT_TRUE(cache.Replace("a", man_path_).ok());
  EXPECT_NE(cache.Revision("a"), old_revision);
  EXPECT_EQ(cache.Revision("a"), cache.Revision("b"));
  EXPECT_EQ(cache.GetStats().num_registered, 2);
  // A caller that looked before the replacement is told to start again.
  EXPECT_EQ(cache.Acquire("a", &old_revision).status().code(), absl::StatusCode::kAborted);
  const std::string new_revision = cache.Revision("a");
  EXPECT_EQ(*cache.Acquire("a", &new_revision), nullptr);  // loading the new file
  WaitForLoads(cache, 3);
  const DeltaWeights* replaced = *cache.Acquire("a", &new_revision);
  ASSERT_NE(replaced, nullptr);
  EXPECT_NE(replaced, old);
  EXPECT_EQ(replaced->path, man_path_);
  EXPECT_EQ(cache.GetStats().num_resident, 2);  // the old one is still held
  cache.Release(old);
  EXPECT_EQ(cache.GetStats().num_resident, 1);
  cache.Release(replaced);
  // A replacement that cannot be used leaves the registration before.
  const std::string missing = TempPath("missing.delta.safetensors");
  EXPECT_FALSE(cache.Replace("a", missing).ok());
  EXPECT_EQ(cache.Revision("a"), new_revision);
  EXPECT_EQ(*cache.Acquire("a"), replaced);
  cache.Release(replaced);
  // Unregistered while its load runs: dropped when the load ends, its room given back.
  EXPECT_EQ(*cache.Acquire("b"), nullptr);
  ASSERT_TRUE(cache.Unregister("b").ok());
  s = cache.GetStats();
  EXPECT_TRUE(s.resident_ids == std::vector<std::string>{"a"});
  EXPECT_EQ(s.num_registered, 1);
  // (Registered again: a fresh load, whatever became of the dropped one.)
  ASSERT_TRUE(cache.Register("b", man_path_).ok());
  cache.Prefetch("b");
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (cache.GetStats().resident_ids.size() < 2 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(2));
  }
  s = cache.GetStats();
  EXPECT_EQ(s.resident_ids, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(s.num_resident, 2);
}

// A file renamed over a registered one loads as what it is, not under the registered revision
// (the KV cache namespace the requests were made with): ABORTED until it is registered anew.
// Registered again with the same path and revision, nothing changes.
TEST_F(DeltaCacheTest, AFileChangedSinceRegistrationIsNotLoadedUnderTheOldRevision) {
  DeltaCache cache(base_.get(), fingerprint_, 4 * delta_bytes_);
  const std::string path = TempPath("moving.delta.safetensors");
  std::filesystem::copy_file(c_path_, path, std::filesystem::copy_options::overwrite_existing);
  ASSERT_TRUE(cache.Register("m", path).ok());
  std::filesystem::copy_file(man_path_, path + ".new",
                             std::filesystem::copy_options::overwrite_existing);
  std::filesystem::rename(path + ".new", path);
  EXPECT_EQ(*cache.Acquire("m"), nullptr);
  WaitForLoads(cache, 1);
  absl::StatusOr<const DeltaWeights*> d = cache.Acquire("m");
  EXPECT_EQ(d.status().code(), absl::StatusCode::kAborted) << d.status();
  EXPECT_TRUE(absl::StrContains(d.status().message(), "changed since it was registered"))
      << d.status();
  ASSERT_TRUE(cache.Replace("m", path).ok());
  EXPECT_EQ(*cache.Acquire("m"), nullptr);
  WaitForLoads(cache, 2);
  d = cache.Acquire("m");
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_NE(*d, nullptr);
  EXPECT_EQ((*d)->revision, cache.Revision("m"));
  cache.Release(*d);
  const int64_t changes = cache.GetStats().num_registry_changes;
  ASSERT_TRUE(cache.Replace("m", path).ok());  // touched, or copied in again
  EXPECT_EQ(cache.GetStats().num_registry_changes, changes);
  EXPECT_EQ(*cache.Acquire("m"), *d);  // the same delta, still in memory
  cache.Release(*d);
}

TEST_F(DeltaCacheTest, StopsCleanlyWithLoadsInFlightAndNotifyCleared) {
  std::atomic<int> calls{0};
  {
    DeltaCache cache(base_.get(), fingerprint_, 4 * delta_bytes_);
    ASSERT_TRUE(cache.Register("a", c_path_).ok());
    ASSERT_TRUE(cache.Register("b", man_path_).ok());
    cache.SetNotify([&] { calls.fetch_add(1); });
    cache.Prefetch("a");
    cache.Prefetch("b");
    cache.SetNotify(nullptr);  // from here on no callback may run
    const int seen = calls.load();
    WaitForLoads(cache, 2);
    EXPECT_EQ(calls.load(), seen);
    cache.Prefetch("a");
  }  // destroyed, perhaps with nothing left to load: must not hang
  SUCCEED();
}

}  // namespace
}  // namespace strata
