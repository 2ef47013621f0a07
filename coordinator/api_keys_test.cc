#include "coordinator/api_keys.h"

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

constexpr char kFile[] = R"({"tenants": [
  {"name": "acme", "keys": ["sk-acme-0123456789", "sk-acme-second-key"],
   "models": ["strata-tiny", "c-headers"], "max_concurrent_requests": 2},
  {"name": "globex", "keys": ["sk-globex-abcdefgh"], "isolate_cache": false,
   "scheduling_weight": 0.5, "max_priority": 5}]})";

std::shared_ptr<const ApiKeys> Keys() {
  absl::StatusOr<std::shared_ptr<const ApiKeys>> k = ApiKeys::Parse(kFile, "keys.json");
  EXPECT_TRUE(k.ok()) << k.status();
  return k.ok() ? *k : nullptr;
}

TEST(ApiKeysTest, AuthenticatesBearerKeys) {
  auto keys = Keys();
  ASSERT_NE(keys, nullptr);
  absl::StatusOr<const Tenant*> t = keys->Authenticate("Bearer sk-acme-second-key");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->name, "acme");
  t = keys->Authenticate("bearer   sk-globex-abcdefgh ");  // the scheme is case-insensitive
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->name, "globex");
  for (const char* bad :
       {"", "sk-acme-0123456789", "Basic c2stYWNtZQ==", "Bearer ", "Bearer sk-acme-012345678",
        "Bearer sk-acme-01234567890", "Bearer SK-ACME-0123456789"}) {
    SCOPED_TRACE(bad);
    t = keys->Authenticate(bad);
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), absl::StatusCode::kUnauthenticated);
  }
  EXPECT_TRUE(absl::StrContains(keys->Authenticate("").status().message(), "Authorization"));
  // By name (the gateway's tenant), with its scheduling weight (1 unless set).
  ASSERT_NE(keys->Find("globex"), nullptr);
  EXPECT_EQ(keys->Find("globex")->scheduling_weight, 0.5);
  EXPECT_EQ(keys->Find("acme")->scheduling_weight, 1);
  EXPECT_EQ(keys->Find("globex")->max_priority, 5);
  EXPECT_EQ(keys->Find("acme")->max_priority, 0);
  EXPECT_EQ(keys->Find("initech"), nullptr);
}

TEST(ApiKeysTest, RetryAfterSecondsReadsTheWait) {
  EXPECT_EQ(RetryAfterSeconds("tenant \"a\" is over its requests_per_minute (2): retry in 19.2 s"),
            20);
  EXPECT_EQ(RetryAfterSeconds("retry in 0.0 s"), 1);
  EXPECT_EQ(RetryAfterSeconds("has 2 requests running: retry when one ends"), std::nullopt);
  EXPECT_EQ(RetryAfterSeconds("retry in soon s"), std::nullopt);
  EXPECT_EQ(RetryAfterSeconds("retry in 5"), std::nullopt);
}

TEST(ApiKeysTest, ModelsAndCacheSalts) {
  auto keys = Keys();
  ASSERT_NE(keys, nullptr);
  const Tenant& acme = *keys->tenants()[0];
  const Tenant& globex = *keys->tenants()[1];
  EXPECT_TRUE(ApiKeys::Allows(acme, "strata-tiny", ""));
  EXPECT_TRUE(ApiKeys::Allows(acme, "strata-tiny", "c-headers"));
  EXPECT_FALSE(ApiKeys::Allows(acme, "strata-tiny", "man"));  // the base listed, not its others
  EXPECT_FALSE(ApiKeys::Allows(acme, "other", ""));
  EXPECT_TRUE(ApiKeys::Allows(globex, "anything", "at-all"));
  // A fine-tune bound to its base, "BASE/FINE_TUNE".
  absl::StatusOr<std::shared_ptr<const ApiKeys>> bound = ApiKeys::Parse(
      R"({"tenants": [{"name": "b", "keys": ["sk-bound-000000000"],
                       "models": ["strata-tiny/c-headers"]}]})",
      "bound.json");
  ASSERT_TRUE(bound.ok()) << bound.status();
  const Tenant& bt = *(*bound)->tenants()[0];
  EXPECT_TRUE(ApiKeys::Allows(bt, "strata-tiny", "c-headers"));
  EXPECT_FALSE(ApiKeys::Allows(bt, "strata-big", "c-headers"));
  EXPECT_FALSE(ApiKeys::Allows(bt, "strata-tiny", ""));
  EXPECT_TRUE(ApiKeys::AllowsAny(bt, "strata-tiny", {"man", "c-headers"}));
  EXPECT_FALSE(ApiKeys::AllowsAny(bt, "strata-tiny", {"man"}));
  // Isolated: the tenant's own namespace, the request's salt within it; not isolated: as asked.
  EXPECT_EQ(ApiKeys::CacheSalt(acme, ""), "tenant:acme");
  EXPECT_EQ(ApiKeys::CacheSalt(acme, "user-7"), "tenant:acme/user-7");
  EXPECT_EQ(ApiKeys::CacheSalt(globex, ""), "");
  EXPECT_EQ(ApiKeys::CacheSalt(globex, "user-7"), "salt/user-7");
  // No salt a sharing tenant asks for is an isolated tenant's namespace.
  EXPECT_NE(ApiKeys::CacheSalt(globex, "tenant:acme"), ApiKeys::CacheSalt(acme, ""));
  EXPECT_NE(ApiKeys::CacheSalt(globex, "tenant:acme/user-7"), ApiKeys::CacheSalt(acme, "user-7"));
  // A hashed long salt is never one written out.
  EXPECT_NE(ApiKeys::CacheSalt(acme, std::string(256, 'a')).find('#'), std::string::npos);
  // A salt as long as a request may give still fits, as a hash, and stays distinct.
  const std::string a(256, 'a'), b = std::string(255, 'a') + "b";
  EXPECT_LE(ApiKeys::CacheSalt(acme, a).size(), 256u);
  EXPECT_NE(ApiKeys::CacheSalt(acme, a), ApiKeys::CacheSalt(acme, b));
  EXPECT_GT(ApiKeys::CacheSalt(acme, std::string(300, 'a')).size(), 256u);  // refused later
}

TEST(ApiKeysTest, ConcurrencyLeases) {
  auto keys = Keys();
  ASSERT_NE(keys, nullptr);
  const Tenant& acme = *keys->tenants()[0];
  {
    absl::StatusOr<ApiKeys::Lease> one = ApiKeys::Acquire(acme);
    absl::StatusOr<ApiKeys::Lease> two = ApiKeys::Acquire(acme);
    ASSERT_TRUE(one.ok() && two.ok());
    absl::StatusOr<ApiKeys::Lease> three = ApiKeys::Acquire(acme);
    ASSERT_FALSE(three.ok());
    EXPECT_EQ(three.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_TRUE(absl::StrContains(three.status().message(), "max_concurrent_requests"));
    EXPECT_EQ(acme.running->load(), 2);
    ApiKeys::Lease moved = std::move(*one);  // a move holds one slot, not two
    EXPECT_EQ(acme.running->load(), 2);
  }
  EXPECT_EQ(acme.running->load(), 0);
  // Several generations in one request take as many units, all or none.
  {
    absl::StatusOr<ApiKeys::Lease> two = ApiKeys::Acquire(acme, 2);
    ASSERT_TRUE(two.ok());
    EXPECT_EQ(acme.running->load(), 2);
    EXPECT_EQ(ApiKeys::Acquire(acme).status().code(), absl::StatusCode::kResourceExhausted);
  }
  EXPECT_EQ(acme.running->load(), 0);
  absl::StatusOr<ApiKeys::Lease> too_many = ApiKeys::Acquire(acme, 3);
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(too_many.status().message(), "fewer choices"));
  EXPECT_EQ(acme.running->load(), 0);
  // No limit.
  const Tenant& globex = *keys->tenants()[1];
  std::vector<ApiKeys::Lease> many;
  for (int i = 0; i < 100; ++i) many.push_back(*ApiKeys::Acquire(globex));
  EXPECT_EQ(globex.running->load(), 100);
}

// Across coordinators (PeerSync): what this one's requests took, net of what they gave back, is
// what peers charge to their buckets; a peer's use charged here drains this one's buckets (even
// below zero) and what it gives back refills them, up to full; peers' running requests count
// against max_concurrent_requests.
TEST(ApiKeysTest, PeersUseIsChargedAndOwnUseCounted) {
  absl::StatusOr<std::shared_ptr<const ApiKeys>> keys = ApiKeys::Parse(
      R"({"tenants": [{"name": "p", "keys": ["sk-peer-0000000000"], "requests_per_minute": 6,
                       "tokens_per_minute": 600, "max_concurrent_requests": 3}]})",
      "peers.json");
  ASSERT_TRUE(keys.ok()) << keys.status();
  const Tenant& p = *(*keys)->tenants()[0];
  const absl::Time t0 = absl::FromUnixSeconds(1000000);
  ASSERT_TRUE(ApiKeys::Admit(p, 2, t0).ok());
  ApiKeys::Unadmit(p, 1);
  EXPECT_EQ(ApiKeys::RequestsTaken(p), 1);
  absl::StatusOr<ApiKeys::TokenGrant> g = ApiKeys::TakeTokens(p, 400, t0);
  ASSERT_TRUE(g.ok());
  g->Settle(150, t0);
  EXPECT_EQ(ApiKeys::TokensTaken(p), 150);
  // A peer's 4 requests and 500 tokens: 1 request and -50 tokens left here.
  ApiKeys::ChargePeerUse(p, 4, 500, t0);
  EXPECT_EQ(ApiKeys::RequestsAvailable(p, t0), 1);
  EXPECT_EQ(ApiKeys::TokensAvailable(p, t0), -50);
  EXPECT_EQ(ApiKeys::RequestsTaken(p), 1);  // a peer's use is not this coordinator's
  EXPECT_EQ(ApiKeys::TokensTaken(p), 150);
  EXPECT_TRUE(ApiKeys::Admit(p, 1, t0).ok());
  EXPECT_FALSE(ApiKeys::Admit(p, 1, t0).ok());
  EXPECT_FALSE(ApiKeys::TakeTokens(p, 1, t0).ok());
  // It gives back 1000 tokens: full, no more. A burst of 5000 leaves a minute's debt, no more.
  ApiKeys::ChargePeerUse(p, 0, -1000, t0);
  EXPECT_EQ(ApiKeys::TokensAvailable(p, t0), 600);
  ApiKeys::ChargePeerUse(p, 0, 5000, t0);
  EXPECT_EQ(ApiKeys::TokensAvailable(p, t0), -600);
  EXPECT_EQ(ApiKeys::TokensAvailable(p, t0 + absl::Minutes(2)), 600);
  // Two of its requests run elsewhere: one more fits here.
  p.peer_running->store(2);
  absl::StatusOr<ApiKeys::Lease> one = ApiKeys::Acquire(p);
  ASSERT_TRUE(one.ok());
  const absl::StatusOr<ApiKeys::Lease> two = ApiKeys::Acquire(p);
  EXPECT_EQ(two.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(two.status().message(), "3 requests running (2 through other"))
      << two.status();
}

// The store reads its file again: keys added and revoked take effect, a file that does not parse
// leaves the keys before it, and a tenant's running requests count across a reload.
// requests_per_minute: a minute's requests at once, then as the bucket refills.
TEST(ApiKeysTest, RequestsPerMinute) {
  absl::StatusOr<std::shared_ptr<const ApiKeys>> keys = ApiKeys::Parse(
      R"({"tenants": [{"name": "r", "keys": ["sk-rate-0000000000"], "requests_per_minute": 3},
                      {"name": "free", "keys": ["sk-free-0000000000"]}]})",
      "rate.json");
  ASSERT_TRUE(keys.ok()) << keys.status();
  const Tenant& r = *(*keys)->tenants()[0];
  const absl::Time t0 = absl::FromUnixSeconds(1000000);
  EXPECT_TRUE(ApiKeys::Admit(r, 2, t0).ok());
  EXPECT_TRUE(ApiKeys::Admit(r, 1, t0).ok());
  const absl::Status over = ApiKeys::Admit(r, 1, t0 + absl::Seconds(1));
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(over.message(), "requests_per_minute (3)")) << over;
  EXPECT_TRUE(absl::StrContains(over.message(), "retry in 19.0 s")) << over;  // 20 s a request
  EXPECT_TRUE(ApiKeys::Admit(r, 1, t0 + absl::Seconds(20)).ok());
  EXPECT_FALSE(ApiKeys::Admit(r, 1, t0 + absl::Seconds(21)).ok());
  EXPECT_TRUE(ApiKeys::Admit(r, 3, t0 + absl::Seconds(200)).ok());  // full again, no more
  EXPECT_EQ(ApiKeys::Admit(r, 4, t0 + absl::Seconds(400)).code(),
            absl::StatusCode::kResourceExhausted);
  for (int i = 0; i < 1000; ++i) EXPECT_TRUE(ApiKeys::Admit(*(*keys)->tenants()[1], 1, t0).ok());
}

// tokens_per_minute: a generation takes its prompt plus max_tokens, gives back what it did not
// use, and pays for what it used past what it took (a request larger than a minute's tokens
// takes a full bucket) even below zero.
TEST(ApiKeysTest, TokensPerMinute) {
  absl::StatusOr<std::shared_ptr<const ApiKeys>> keys = ApiKeys::Parse(
      R"({"tenants": [{"name": "t", "keys": ["sk-tokens-00000000"], "tokens_per_minute": 600},
                      {"name": "free", "keys": ["sk-free-0000000000"]}]})",
      "tokens.json");
  ASSERT_TRUE(keys.ok()) << keys.status();
  const Tenant& t = *(*keys)->tenants()[0];
  const absl::Time t0 = absl::FromUnixSeconds(1000000);
  absl::StatusOr<ApiKeys::TokenGrant> a = ApiKeys::TakeTokens(t, 400, t0);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->taken(), 400);
  absl::StatusOr<ApiKeys::TokenGrant> b = ApiKeys::TakeTokens(t, 300, t0);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(b.status().message(), "tokens_per_minute (600)")) << b.status();
  EXPECT_TRUE(absl::StrContains(b.status().message(), "retry in 10.0 s")) << b.status();  // 10/s
  EXPECT_EQ(RetryAfterSeconds(b.status().message()), 10);
  // The first used 100 of its 400: 300 come back, and 300 fit now.
  a->Settle(100, t0);
  b = ApiKeys::TakeTokens(t, 300, t0);
  ASSERT_TRUE(b.ok()) << b.status();
  b->Settle(300, t0);
  // 200 left. A request past a minute's takes the whole bucket: it waits for a full one.
  absl::StatusOr<ApiKeys::TokenGrant> big = ApiKeys::TakeTokens(t, 5000, t0);
  EXPECT_TRUE(absl::StrContains(big.status().message(), "at most a minute's")) << big.status();
  EXPECT_TRUE(absl::StrContains(big.status().message(), "retry in 40.0 s")) << big.status();
  big = ApiKeys::TakeTokens(t, 5000, t0 + absl::Seconds(40));
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(big->taken(), 600);
  // It used 900: 300 past the bucket, owed before anything else is taken.
  big->Settle(900, t0 + absl::Seconds(40));
  EXPECT_FALSE(ApiKeys::TakeTokens(t, 1, t0 + absl::Seconds(60)).ok());
  EXPECT_TRUE(ApiKeys::TakeTokens(t, 1, t0 + absl::Seconds(71)).ok());
  // Settled once only; no limit, no grant.
  big->Settle(0, t0 + absl::Seconds(71));
  EXPECT_FALSE(ApiKeys::TakeTokens(t, 600, t0 + absl::Seconds(72)).ok());
  absl::StatusOr<ApiKeys::TokenGrant> free =
      ApiKeys::TakeTokens(*(*keys)->tenants()[1], 1000000, t0);
  ASSERT_TRUE(free.ok());
  EXPECT_EQ(free->taken(), 0);
}

TEST(ApiKeyStoreTest, ReloadsItsFile) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string path = absl::StrCat(tmp == nullptr ? "/tmp" : tmp, "/reload-keys.json");
  auto write = [&](const std::string& text) { std::ofstream(path, std::ios::trunc) << text; };
  write(R"({"tenants": [{"name": "acme", "keys": ["sk-acme-old-000000"],
                          "max_concurrent_requests": 1}]})");
  absl::StatusOr<std::unique_ptr<ApiKeyStore>> store = ApiKeyStore::Open(path);
  ASSERT_TRUE(store.ok()) << store.status();
  std::shared_ptr<const ApiKeys> before = (*store)->Current();
  absl::StatusOr<const Tenant*> acme = before->Authenticate("Bearer sk-acme-old-000000");
  ASSERT_TRUE(acme.ok());
  absl::StatusOr<ApiKeys::Lease> lease = ApiKeys::Acquire(**acme);
  ASSERT_TRUE(lease.ok());
  // Unchanged bytes: the same keys.
  ASSERT_TRUE((*store)->Reload().ok());
  EXPECT_EQ((*store)->Current(), before);
  // Rotated: the new key works, the old one no longer does; the running request still counts.
  write(R"({"tenants": [{"name": "acme", "keys": ["sk-acme-new-000000"],
                          "max_concurrent_requests": 1}]})");
  ASSERT_TRUE((*store)->Reload().ok());
  std::shared_ptr<const ApiKeys> after = (*store)->Current();
  EXPECT_FALSE(after->Authenticate("Bearer sk-acme-old-000000").ok());
  absl::StatusOr<const Tenant*> rotated = after->Authenticate("Bearer sk-acme-new-000000");
  ASSERT_TRUE(rotated.ok());
  EXPECT_EQ(ApiKeys::Acquire(**rotated).status().code(), absl::StatusCode::kResourceExhausted);
  *lease = ApiKeys::Lease();  // the request before the reload ends
  EXPECT_TRUE(ApiKeys::Acquire(**rotated).ok());
  // A broken file: an error, and the keys before stay.
  write(R"({"tenants": [{"name": "acme", "keys": ["short"]}]})");
  EXPECT_EQ((*store)->Reload().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*store)->Current(), after);
  EXPECT_TRUE((*store)->Current()->Authenticate("Bearer sk-acme-new-000000").ok());
  // Watched: a change is taken up within a few periods.
  (*store)->Watch(absl::Milliseconds(20));
  write(R"({"tenants": [{"name": "acme", "keys": ["sk-acme-third-0000"]}]})");
  bool seen = false;
  for (int i = 0; i < 250 && !seen; ++i) {
    seen = (*store)->Current()->Authenticate("Bearer sk-acme-third-0000").ok();
    if (!seen) absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_TRUE(seen);
}

TEST(ApiKeysTest, BadFilesNameTheField) {
  struct Case {
    const char* json;
    const char* want;
  };
  for (const Case& c : {
           Case{"{}", "tenants"},
           Case{R"({"tenants": []})", "at least one tenant"},
           Case{R"({"tenants": [{"keys": ["sk-0123456789abcdef"]}]})", "name"},
           Case{R"({"tenants": [{"name": "a b", "keys": ["sk-0123456789abcdef"]}]})",
                "[A-Za-z0-9._-]"},
           Case{R"({"tenants": [{"name": "a", "keys": []}]})", "at least one key"},
           Case{R"({"tenants": [{"name": "a", "keys": ["short"]}]})", "16 to 256"},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk with spaces inside"]}]})", "16 to 256"},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk-0123456789abcdef"]},
                                {"name": "b", "keys": ["sk-0123456789abcdef"]}]})",
                "is given twice"},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk-0123456789abcdef"]},
                                {"name": "a", "keys": ["sk-0123456789abcdeg"]}]})",
                "names a tenant twice"},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk-0123456789abcdef"],
                                 "max_concurrent_requests": -1}]})",
                "max_concurrent_requests"},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk-0123456789abcdef"],
                                 "requests_per_minute": -5}]})",
                "requests_per_minute"},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk-0123456789abcdef"],
                                 "max_priority": 101}]})",
                "max_priority"},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk-0123456789abcdef"],
                                 "max_priority": -1}]})",
                "max_priority"},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk-0123456789abcdef"],
                                 "tokens_per_minute": -1}]})",
                "tokens_per_minute"},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk-0123456789abcdef"],
                                 "scheduling_weight": 0}]})",
                "scheduling_weight"},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk-0123456789abcdef"],
                                 "scheduling_weight": "high"}]})",
                "scheduling_weight"},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk-0123456789abcdef"], "quota": 5}]})",
                "\"quota\""},
           Case{R"({"tenants": [{"name": "a", "keys": ["sk-0123456789abcdef"], "models": [""]}]})",
                "must not be empty"},
       }) {
    SCOPED_TRACE(c.json);
    absl::StatusOr<std::shared_ptr<const ApiKeys>> k = ApiKeys::Parse(c.json, "keys.json");
    ASSERT_FALSE(k.ok());
    EXPECT_EQ(k.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(k.status().message(), c.want)) << k.status();
    EXPECT_TRUE(absl::StrContains(k.status().message(), "keys.json")) << k.status();
  }
  EXPECT_EQ(ApiKeys::Load("/nonexistent/keys.json").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace strata
