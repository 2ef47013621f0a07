// FineTuneDirWatcher over a real DeltaCache and the bundled model's fine-tunes: files put in,
// replaced in and taken out of the directory while serving, with unreadable and half-written ones.
#include "worker/server/fine_tune_dir.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "worker/engine/delta_cache.h"
#include "worker/model/delta.h"
#include "worker/model/delta_test_util.h"

namespace strata {
namespace {

using delta_test::kBase;
using delta_test::TempPath;

// Copies `from` to `to` as a finished file appears: written beside it, then renamed over it.
void MoveIn(const std::string& from, const std::string& to) {
  std::filesystem::copy_file(from, to + ".part", std::filesystem::copy_options::overwrite_existing);
  std::filesystem::rename(to + ".part", to);
}

TEST(FineTuneDirTest, FilesComeAndGoWhileServing) {
  const delta_test::Base base = delta_test::LoadBase(kBase);
  ASSERT_NE(base.weights, nullptr);
  const std::string c = TempPath("c.src"), man = TempPath("man.src");
  ASSERT_TRUE(CompressDelta(kBase, delta_test::kCHeaders, c, {}).ok());
  ASSERT_TRUE(CompressDelta(kBase, delta_test::kMan, man, {}).ok());
  DeltaCache cache(base.weights.get(), base.fingerprint, int64_t{1} << 30);

  const std::string dir = TempPath("fine-tunes");
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  MoveIn(c, dir + "/at-start.delta.safetensors");
  absl::StatusOr<std::vector<FineTuneFile>> at_start = ScanFineTuneDir(dir);
  ASSERT_TRUE(at_start.ok()) << at_start.status();
  ASSERT_EQ(at_start->size(), 1u);
  EXPECT_EQ((*at_start)[0].id, "at-start");
  ASSERT_TRUE(cache.Register("at-start", (*at_start)[0].path).ok());
  MetricsRegistry metrics;
  FineTuneDirWatcher watcher(dir, *at_start,
                             {[&](const std::string& id, const std::string& path, bool replace) {
                                return replace ? cache.Replace(id, path) : cache.Register(id, path);
                              },
                              [&](const std::string& id) { return cache.Unregister(id); }},
                             &metrics);
  auto rescan = [&] {
    const FineTuneDirWatcher::Changes ch = watcher.Rescan();
    return absl::StrCat(ch.added, " added, ", ch.replaced, " replaced, ", ch.removed, " removed, ",
                        ch.refused, " refused");
  };
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");

  // A new file: registered at the second look that finds it unchanged.
  MoveIn(c, dir + "/c.delta.safetensors");
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");
  EXPECT_FALSE(cache.Has("c"));
  EXPECT_EQ(rescan(), "1 added, 0 replaced, 0 removed, 0 refused");
  EXPECT_TRUE(cache.Has("c"));
  EXPECT_EQ(cache.Revision("c"), cache.Revision("at-start"));
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");

  // The first scan at start takes new entries at once.
  MoveIn(c, dir + "/now.delta.safetensors");
  const FineTuneDirWatcher::Changes first = watcher.Rescan(/*at_once=*/true);
  EXPECT_EQ(first.added, 1);
  EXPECT_TRUE(cache.Has("now"));

  // One still being written is left until it stops changing.
  {
    std::ifstream in(man, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream out(dir + "/growing.delta.safetensors", std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
    out.flush();
    EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");
    out.write(bytes.data() + bytes.size() / 2,
              static_cast<std::streamsize>(bytes.size() - bytes.size() / 2));
  }
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");  // changed since
  EXPECT_EQ(rescan(), "1 added, 0 replaced, 0 removed, 0 refused");
  EXPECT_TRUE(cache.Has("growing"));

  // A file that is not a delta is refused once (logged), not at every rescan; nor are names
  // starting with "." looked at.
  std::ofstream(dir + "/bad.delta.safetensors") << "not a safetensors file";
  std::filesystem::create_directories(dir + "/..data");
  MoveIn(c, dir + "/.hidden.delta.safetensors");
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 1 refused");
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");
  EXPECT_FALSE(cache.Has("bad"));
  EXPECT_FALSE(cache.Has(".hidden"));

  // Replaced by another delta under the same name: the new revision.
  const std::string c_revision = cache.Revision("c");
  MoveIn(man, dir + "/c.delta.safetensors");
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");
  EXPECT_EQ(rescan(), "0 added, 1 replaced, 0 removed, 0 refused");
  EXPECT_NE(cache.Revision("c"), c_revision);
  EXPECT_EQ(cache.Revision("c"), cache.Revision("growing"));
  // Replaced by a file that cannot be used: refused, and the one before stays.
  const std::string man_revision = cache.Revision("c");
  std::ofstream(dir + "/c.delta.safetensors", std::ios::trunc) << "truncated";
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 1 refused");
  EXPECT_EQ(cache.Revision("c"), man_revision);

  // A LoRA adapter's directory, under its own name.
  const std::string lora = dir + "/lora-c";
  std::filesystem::copy("models/strata-tiny/lora-c-headers", lora + ".part",
                        std::filesystem::copy_options::recursive);
  std::filesystem::rename(lora + ".part", lora);
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");
  EXPECT_EQ(rescan(), "1 added, 0 replaced, 0 removed, 0 refused");
  EXPECT_TRUE(cache.Has("lora-c"));

  // Taken out: removed at once (the broken c with it: it was registered).
  std::filesystem::remove(dir + "/c.delta.safetensors");
  std::filesystem::remove_all(lora);
  std::filesystem::remove(dir + "/at-start.delta.safetensors");
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");  // gone at one look
  EXPECT_TRUE(cache.Has("c"));
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 3 removed, 0 refused");
  EXPECT_FALSE(cache.Has("c"));
  EXPECT_FALSE(cache.Has("lora-c"));
  EXPECT_FALSE(cache.Has("at-start"));
  EXPECT_EQ(cache.Ids(), (std::vector<std::string>{"growing", "now"}));

  const std::string text = metrics.Render();
  for (const char* line : {"strata_worker_fine_tune_changes_total{change=\"added\"} 4",
                           "strata_worker_fine_tune_changes_total{change=\"replaced\"} 1",
                           "strata_worker_fine_tune_changes_total{change=\"removed\"} 3",
                           "strata_worker_fine_tune_changes_total{change=\"refused\"} 2"}) {
    EXPECT_NE(text.find(line), std::string::npos) << line << "\n" << text;
  }
  // An unreadable directory changes nothing.
  std::filesystem::remove_all(dir);
  EXPECT_EQ(rescan(), "0 added, 0 replaced, 0 removed, 0 refused");
  EXPECT_EQ(cache.Ids(), (std::vector<std::string>{"growing", "now"}));
  EXPECT_FALSE(ScanFineTuneDir(dir).ok());
}

}  // namespace
}  // namespace strata
