#include "coordinator/access_log.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "common/json.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

std::string TmpPath(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  return std::string(tmp == nullptr ? "/tmp" : tmp) + "/" + name;
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

TEST(AccessRecordTest, BuildsOneJsonObject) {
  const std::string line = AccessRecord(absl::FromUnixMillis(1764331200123), "generate")
                               .Str("request_id", "r\"1\n")
                               .StrIfSet("tenant", "")
                               .Int("prompt_tokens", 12)
                               .Ms("ttft_ms", absl::Microseconds(1500))
                               .StrList("workers", {"127.0.0.1:1", "127.0.0.1:2"})
                               .Raw("cached_tokens", "{\"device\":3}")
                               .Done();
  EXPECT_EQ(line,
            "{\"time\":\"2025-11-28T12:00:00.123Z\",\"event\":\"generate\",\"request_id\":"
            "\"r\\\"1\\n\",\"prompt_tokens\":12,\"ttft_ms\":1.500,\"workers\":[\"127.0.0.1:1\","
            "\"127.0.0.1:2\"],\"cached_tokens\":{\"device\":3}}");
  absl::StatusOr<JsonDocument> d = JsonDocument::Parse(line, "record");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->root().StringFieldOr("request_id", "").value_or(""), "r\"1\n");
}

TEST(AccessLogTest, AppendsWholeLinesAndFollowsARotatedFile) {
  const std::string path = TmpPath("access.log");
  std::remove(path.c_str());
  std::remove((path + ".1").c_str());
  {
    absl::StatusOr<std::unique_ptr<AccessLog>> log =
        AccessLog::Open(path, {.writer_thread = false});
    ASSERT_TRUE(log.ok()) << log.status();
    (*log)->Append("{\"n\":1}");
    (*log)->Append("{\"n\":2}");
    EXPECT_EQ(Slurp(path), "");  // not yet written
    (*log)->Flush();
    EXPECT_EQ(Slurp(path), "{\"n\":1}\n{\"n\":2}\n");
    // logrotate moves the file away: the next records go to a new one at the path.
    ASSERT_EQ(std::rename(path.c_str(), (path + ".1").c_str()), 0);
    (*log)->Append("{\"n\":3}");
    (*log)->Flush();
    EXPECT_EQ(Slurp(path + ".1"), "{\"n\":1}\n{\"n\":2}\n");
    EXPECT_EQ(Slurp(path), "{\"n\":3}\n");
    (*log)->Append("{\"n\":4}");
    EXPECT_EQ((*log)->written(), 3);
  }  // the rest is written as the log closes
  EXPECT_EQ(Slurp(path), "{\"n\":3}\n{\"n\":4}\n");
}

TEST(AccessLogTest, DropsPastItsBoundAndCountsThem) {
  const std::string path = TmpPath("bounded.log");
  std::remove(path.c_str());
  absl::StatusOr<std::unique_ptr<AccessLog>> log =
      AccessLog::Open(path, {.max_pending_bytes = 20, .writer_thread = false});
  ASSERT_TRUE(log.ok()) << log.status();
  for (int i = 0; i < 5; ++i) (*log)->Append("{\"n\":12345}");  // 12 bytes a line
  EXPECT_EQ((*log)->dropped(), 4);
  (*log)->Flush();
  EXPECT_EQ(Slurp(path), "{\"n\":12345}\n");
  (*log)->Append("{\"n\":6}");  // room again
  (*log)->Flush();
  EXPECT_EQ((*log)->written(), 2);
}

TEST(AccessLogTest, TheWriterThreadWritesWithoutAFlush) {
  const std::string path = TmpPath("threaded.log");
  std::remove(path.c_str());
  absl::StatusOr<std::unique_ptr<AccessLog>> log = AccessLog::Open(path);
  ASSERT_TRUE(log.ok()) << log.status();
  for (int i = 0; i < 1000; ++i) (*log)->Append(absl::StrCat("{\"n\":", i, "}"));
  for (int i = 0; i < 500 && (*log)->written() < 1000; ++i) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ((*log)->written(), 1000);
  const std::vector<std::string> lines = absl::StrSplit(Slurp(path), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 1000u);
  EXPECT_EQ(lines[999], "{\"n\":999}");
  // Moved away: within about a second the thread writes to a new file at the path.
  ASSERT_EQ(std::rename(path.c_str(), (path + ".1").c_str()), 0);
  for (int i = 0; i < 500 && Slurp(path).empty(); ++i) {
    (*log)->Append("{\"after\":1}");
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_TRUE(absl::StartsWith(Slurp(path), "{\"after\":1}\n")) << Slurp(path);
  const std::vector<std::string> moved =
      absl::StrSplit(Slurp(path + ".1"), '\n', absl::SkipEmpty());
  EXPECT_GE(moved.size(), 1000u);
}

TEST(AccessLogTest, ACannotOpenErrorNamesThePath) {
  const absl::Status s = AccessLog::Open("/nonexistent-dir/access.log").status();
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(absl::StrContains(s.message(), "/nonexistent-dir/access.log")) << s;
}

TEST(TraceIdTest, ReadsW3cTraceparent) {
  EXPECT_EQ(TraceIdOf("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_EQ(TraceIdOf(" 01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later "),
            "4bf92f3577b34da6a3ce929d0e0e4736");
  for (const char* bad : {"", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                          "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                          "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                          "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                          "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                          "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                          "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}) {
    EXPECT_EQ(TraceIdOf(bad), "") << bad;
  }
}

}  // namespace
}  // namespace strata
