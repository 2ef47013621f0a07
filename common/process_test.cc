#include "common/process.h"

#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(ProcessTest, WaitReturnsTheBlockedSignalOrTimesOut) {
  BlockTerminationSignals();
  EXPECT_EQ(WaitForTerminationSignal(absl::Milliseconds(10)), 0);
  ASSERT_EQ(kill(getpid(), SIGTERM), 0);
  EXPECT_EQ(WaitForTerminationSignal(absl::Seconds(5)), SIGTERM);
}

TEST(ProcessTest, WriteFileAtomicallyReplacesContents) {
  const std::string path = std::string(getenv("TEST_TMPDIR")) + "/port";
  ASSERT_TRUE(WriteFileAtomically(path, "123\n").ok());
  ASSERT_TRUE(WriteFileAtomically(path, "456\n").ok());
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), "456\n");
  EXPECT_EQ(WriteFileAtomically("/nonexistent-dir/x", "1").code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace strata
