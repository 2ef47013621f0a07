#include "common/secrets.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

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
  absl::StatusOr<std::vector<std::string>> s = LoadSecretFile(path);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s, std::vector<std::string>{"0123456789abcdef0123"});
  std::ofstream(path) << "\n new-0123456789abcdef \r\n\nold-0123456789abcdef";
  s = LoadSecretFile(path);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s, (std::vector<std::string>{"new-0123456789abcdef", "old-0123456789abcdef"}));
  for (const char* bad :
       {"short", "has a space in it somewhere", "", " \n\n", "0123456789abcdef0123\nshort",
        "a-0123456789abcdef\nb-0123456789abcdef\nc-0123456789abcdef\n"
        "d-0123456789abcdef\ne-0123456789abcdef"}) {
    std::ofstream(path) << bad;
    s = LoadSecretFile(path);
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(s.status().message(), path)) << s.status();
  }
  std::ofstream(path) << "0123456789abcdef0123\nshort";
  EXPECT_TRUE(absl::StrContains(LoadSecretFile(path).status().message(), "line 2"));
  EXPECT_EQ(LoadSecretFile(path + "-missing").status().code(), absl::StatusCode::kNotFound);
}

TEST(ClusterSecretTest, SendsTheFirstAndAcceptsAny) {
  const ClusterSecret secret({"new-0123456789abcdef", "old-0123456789abcdef"});
  EXPECT_EQ(secret.Sent(), "new-0123456789abcdef");
  EXPECT_EQ(secret.Match("new-0123456789abcdef"), 0);
  EXPECT_EQ(secret.Match("old-0123456789abcdef"), 1);
  EXPECT_EQ(secret.Match("old-0123456789abcde"), -1);
  EXPECT_EQ(secret.Match(""), -1);
}

// Rotation: the file is read again while watched; a file it cannot use leaves the secrets before.
TEST(ClusterSecretTest, ReloadsTheFileAndKeepsTheSecretsBeforeOnError) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string path = std::string(tmp == nullptr ? "/tmp" : tmp) + "/rotating-secret";
  auto replace = [&](const std::string& text) {  // whole, as a Secret volume does
    std::ofstream(path + ".new") << text;
    ASSERT_EQ(std::rename((path + ".new").c_str(), path.c_str()), 0);
  };
  replace("old-0123456789abcdef\n");
  absl::StatusOr<std::unique_ptr<ClusterSecret>> secret =
      ClusterSecret::Open(path, absl::Milliseconds(20));
  ASSERT_TRUE(secret.ok()) << secret.status();
  ClusterSecret& s = **secret;
  EXPECT_EQ(s.Match("new-0123456789abcdef"), -1);
  auto await = [&](auto done) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (!done() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
    return done();
  };
  replace("old-0123456789abcdef\nnew-0123456789abcdef\n");
  ASSERT_TRUE(await([&] { return s.Match("new-0123456789abcdef") == 1; }));
  EXPECT_EQ(s.Sent(), "old-0123456789abcdef");
  replace("new-0123456789abcdef\nold-0123456789abcdef\n");
  ASSERT_TRUE(await([&] { return s.Sent() == "new-0123456789abcdef"; }));
  EXPECT_EQ(s.Match("old-0123456789abcdef"), 1);
  replace("bad secret\n");
  EXPECT_FALSE(s.Reload().ok());
  absl::SleepFor(absl::Milliseconds(100));  // the watcher has tried it too
  EXPECT_EQ(s.Sent(), "new-0123456789abcdef");
  EXPECT_EQ(s.Match("old-0123456789abcdef"), 1);
  std::remove(path.c_str());
  EXPECT_EQ(s.Reload().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s.Match("new-0123456789abcdef"), 0);
  replace("new-0123456789abcdef\n");
  ASSERT_TRUE(await([&] { return s.Match("old-0123456789abcdef") == -1; }));
  EXPECT_EQ(s.Match("new-0123456789abcdef"), 0);
}

TEST(ClusterSecretTest, FlagOpening) {
  absl::StatusOr<std::unique_ptr<ClusterSecret>> none = OpenClusterSecretFlag("", 5);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, nullptr);
  const absl::Status missing = OpenClusterSecretFlag("/nonexistent/secret", 5).status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(missing.message(), "--cluster_secret_file")) << missing;
  const absl::Status negative = OpenClusterSecretFlag("/nonexistent/secret", -1).status();
  EXPECT_EQ(negative.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(negative.message(), "--cluster_secret_reload_s")) << negative;
}

}  // namespace
}  // namespace strata
