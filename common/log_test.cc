#include "common/log.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

class CaptureSink : public LogSink {
 public:
  void Send(const LogEntry& e) override {
    severities.push_back(e.severity);
    messages.emplace_back(e.message);
    files.emplace_back(e.file);
  }
  std::vector<LogSeverity> severities;
  std::vector<std::string> messages;
  std::vector<std::string> files;
};

class LogTest : public ::testing::Test {
 protected:
  void SetUp() override { AddLogSink(&sink_); }
  void TearDown() override {
    RemoveLogSink(&sink_);
    SetMinLogSeverity(LogSeverity::kInfo);
    SetVLogLevel(0);
  }
  CaptureSink sink_;
};

TEST_F(LogTest, SeverityFilterDropsLessSevereMessages) {
  SetMinLogSeverity(LogSeverity::kWarning);
  LOG(INFO) << "dropped";
  LOG(WARNING) << "kept " << 1;
  LOG(ERROR) << "kept " << 2;
  ASSERT_EQ(sink_.messages.size(), 2u);
  EXPECT_EQ(sink_.messages[0], "kept 1");
  EXPECT_EQ(sink_.severities[0], LogSeverity::kWarning);
  EXPECT_EQ(sink_.messages[1], "kept 2");
  EXPECT_EQ(sink_.files[1], "log_test.cc");
}

TEST_F(LogTest, VlogFollowsItsLevelAndSkipsEvaluation) {
  int evaluated = 0;
  auto count = [&evaluated] { return ++evaluated; };
  VLOG(1) << "off " << count();
  EXPECT_EQ(evaluated, 0);
  SetVLogLevel(2);
  VLOG(1) << "on " << count();
  VLOG(3) << "off " << count();
  EXPECT_EQ(evaluated, 1);
  ASSERT_EQ(sink_.messages.size(), 1u);
  EXPECT_EQ(sink_.messages[0], "on 1");
}

TEST_F(LogTest, StderrLineHasPrefixAndLocation) {
  ::testing::internal::CaptureStderr();
  LOG(WARNING) << "disk tier full";
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err.front(), 'W');
  EXPECT_NE(err.find(" log_test.cc:"), std::string::npos) << err;
  EXPECT_NE(err.find("] disk tier full\n"), std::string::npos) << err;
}

TEST_F(LogTest, ParseLogSeverity) {
  LogSeverity s = LogSeverity::kInfo;
  ASSERT_TRUE(ParseLogSeverity("WARNING", &s).ok());
  EXPECT_EQ(s, LogSeverity::kWarning);
  ASSERT_TRUE(ParseLogSeverity("error", &s).ok());
  EXPECT_EQ(s, LogSeverity::kError);
  const absl::Status bad = ParseLogSeverity("loud", &s);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("loud"), absl::string_view::npos);
}

TEST(LogDeathTest, CheckFailuresAbortWithTheirOperands) {
  const int slot = 9;
  EXPECT_DEATH(CHECK_LT(slot, 4) << "slot out of range",
               "Check failed: slot < 4 \\(9 vs. 4\\) slot out of range");
  EXPECT_DEATH(CHECK(slot == 3) << "why", "Check failed: slot == 3 why");
  EXPECT_DEATH(CHECK_OK(absl::InternalError("broken")), "Check failed: .* is OK .*broken");
  EXPECT_DEATH(LOG(FATAL) << "fatal " << 5, "fatal 5");
}

TEST(LogTest2, PassingChecksDoNothing) {
  CHECK(true);
  CHECK_EQ(2, 2) << "never printed";
  CHECK_OK(absl::OkStatus());
  CHECK_OK(absl::StatusOr<int>(3));
  int evaluated = 0;
  // In optimized builds DCHECK's condition is not evaluated; in debug builds it is.
  DCHECK(++evaluated > 0);
#ifdef NDEBUG
  EXPECT_EQ(evaluated, 0);
#else
  EXPECT_EQ(evaluated, 1);
#endif
}

}  // namespace
}  // namespace strata
