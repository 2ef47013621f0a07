#include "common/secrets.h"

#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(SecretsTest, CompareWhole) {
  EXPECT_TRUE(SecretsEqual("sk-0123456789", "sk-0123456789"));
  EXPECT_FALSE(SecretsEqual("sk-0123456789", "sk-012345678"));    // a prefix
  EXPECT_FALSE(SecretsEqual("sk-0123456789", "sk-01234567890"));  // longer
  EXPECT_FALSE(SecretsEqual("sk-0123456789", std::string("sk-0123456789\0", 14)));
  EXPECT_FALSE(SecretsEqual("sk-0123456789", ""));
  EXPECT_FALSE(SecretsEqual("sk-0123456789", "sk-0123456788"));
}

TEST(SecretsTest, NewSecretsDiffer) {
  const std::string a = NewSecret(), b = NewSecret();
  EXPECT_EQ(a.size(), 64u);
  EXPECT_NE(a, b);
}

TEST(SecretsTest, LoadsAFileAndRefusesAWeakOne) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string path = std::string(tmp == nullptr ? "/tmp" : tmp) + "/secret";
  std::ofstream(path) << "  0123456789abcdef0123\n";
  absl::StatusOr<std::string> s = LoadSecretFile(path);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s, "0123456789abcdef0123");
  for (const char* bad : {"short", "has a space in it somewhere", ""}) {
    std::ofstream(path) << bad;
    s = LoadSecretFile(path);
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(s.status().message(), path)) << s.status();
  }
  EXPECT_EQ(LoadSecretFile(path + "-missing").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace strata
