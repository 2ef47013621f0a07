#include "coordinator/discovery.h"

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(DiscoveryTest, ParsesStaticLists) {
  auto t = ParseWorkerTargets(" b:2, a:1,[::1]:3,a:1 ");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE(t->uses_dns());
  EXPECT_EQ(t->static_addresses, (std::vector<std::string>{"[::1]:3", "a:1", "b:2"}));
}

TEST(DiscoveryTest, ParsesDnsTargets) {
  for (const char* spec : {"dns:workers.default.svc:50061", "dns:///workers.default.svc:50061"}) {
    auto t = ParseWorkerTargets(spec);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_TRUE(t->uses_dns());
    EXPECT_EQ(t->dns_name, "workers.default.svc");
    EXPECT_EQ(t->dns_port, 50061);
  }
}

TEST(DiscoveryTest, RejectsMalformedEntriesByName) {
  for (const char* spec : {"", "a", "a:0", "a:70000", "a:1,b", "dns:name", "[::1:5"}) {
    auto t = ParseWorkerTargets(spec);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << spec;
  }
  EXPECT_NE(ParseWorkerTargets("a:1,bad").status().message().find("\"bad\""), std::string::npos);
}

TEST(DiscoveryTest, ResolvesLocalhostToEveryAddress) {
  auto addrs = ResolveAll("localhost", 7);
  ASSERT_TRUE(addrs.ok()) << addrs.status();
  ASSERT_FALSE(addrs->empty());
  EXPECT_NE(std::find(addrs->begin(), addrs->end(), "127.0.0.1:7"), addrs->end());
  EXPECT_EQ(ResolveAll("no-such-host.invalid", 7).status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace strata
