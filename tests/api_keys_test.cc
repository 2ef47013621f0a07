// End-to-end: a real coordinator with --api_keys_file in front of a real worker serving the
// bundled model and a LoRA adapter. The OpenAI-compatible API asks for a tenant's key, lists and
// serves only the models the tenant may use, holds it to its concurrent requests, and keeps an
// isolated tenant's prefix cache its own; /health asks for nothing. The gRPC services ask for the
// same keys (as "authorization" metadata), and the Admin service for an admin tenant's.
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/json.h"
#include "common/secrets.h"
#include "grpcpp/client_context.h"
#include "gtest/gtest.h"
#include "proto/strata/v1/admin.grpc.pb.h"
#include "proto/strata/v1/serving.grpc.pb.h"
#include "proto/strata/v1/worker.grpc.pb.h"
#include "tests/cluster_client.h"
#include "tests/http_client.h"
#include "tests/local_cluster.h"

namespace strata {
namespace {

constexpr char kAcme[] = "sk-acme-0123456789";
constexpr char kGlobex[] = "sk-globex-abcdefgh";
constexpr char kShared[] = "sk-shared-zyxwvuts";
constexpr char kOps[] = "sk-ops-admin-000000";
constexpr char kLimited[] = "sk-limited-00000000";
constexpr char kMetered[] = "sk-metered-00000000";
constexpr char kCapped[] = "sk-capped-000000000";
constexpr char kClusterSecret[] = "cluster-secret-0123456789abcdef";

class ApiKeysTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const std::string root = absl::StrCat(tmp == nullptr ? "/tmp" : tmp, "/api-keys");
    CopyBundledLoraAdapter(root + "/fine-tunes/lora-c");
    keys_file_ = root + "/keys.json";
    std::ofstream(keys_file_) << absl::StrCat(
        R"({"tenants": [
          {"name": "acme", "keys": [")",
        kAcme, R"("], "models": ["strata-tiny", "lora-c"],
           "max_concurrent_requests": 1},
          {"name": "globex", "keys": [")",
        kGlobex, R"("], "models": ["lora-c"]},
          {"name": "shared", "keys": [")",
        kShared, R"("], "isolate_cache": false, "scheduling_weight": 2.5, "max_priority": 10},
          {"name": "ops", "keys": [")",
        kOps, R"("], "models": [], "admin": true},
          {"name": "limited", "keys": [")",
        kLimited, R"("], "requests_per_minute": 2},
          {"name": "metered", "keys": [")",
        kMetered, R"("], "tokens_per_minute": 60},
          {"name": "capped", "keys": [")",
        kCapped, R"("], "requests_per_minute": 3, "tokens_per_minute": 40}]})");
    LocalClusterOptions o;
    o.num_workers = 1;
    o.name = "api-keys";
    o.admin_api_key = kOps;
    http_port_ = FreePort();
    metrics_port_ = FreePort();
    worker_metrics_port_ = FreePort();
    // The workers answer only their coordinator, which carries the cluster secret (each reading
    // a file of its own, to rotate it step by step).
    access_log_ = root + "/access.log";
    worker_secret_file_ = root + "/worker-cluster-secret";
    coordinator_secret_file_ = root + "/coordinator-cluster-secret";
    std::ofstream(worker_secret_file_) << kClusterSecret << "\n";
    std::ofstream(coordinator_secret_file_) << kClusterSecret << "\n";
    o.worker_flags = {absl::StrCat("--fine_tune_dir=", root, "/fine-tunes"), "--delta_cache_mb=16",
                      absl::StrCat("--metrics_listen=127.0.0.1:", worker_metrics_port_),
                      absl::StrCat("--cluster_secret_file=", worker_secret_file_),
                      "--cluster_secret_reload_s=0.1"};
    o.coordinator_flags = {absl::StrCat("--http_listen=127.0.0.1:", http_port_),
                           absl::StrCat("--metrics_listen=127.0.0.1:", metrics_port_),
                           absl::StrCat("--api_keys_file=", root, "/keys.json"),
                           "--api_keys_reload_s=0.2",
                           absl::StrCat("--cluster_secret_file=", coordinator_secret_file_),
                           "--cluster_secret_reload_s=0.1",
                           absl::StrCat("--access_log=", access_log_)};
    auto c = LocalCluster::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = c->release();
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }

  static HttpReply Call(const std::string& method, const std::string& path, const std::string& key,
                        const std::string& body = "") {
    return HttpRaw(
        http_port_,
        HttpRequestText(method, path, body, /*close=*/true,
                        key.empty() ? "" : absl::StrCat("Authorization: ", key, "\r\n")));
  }
  static HttpReply Complete(const std::string& key, const std::string& model,
                            const std::string& prompt, int max_tokens = 4) {
    return Call("POST", "/v1/completions", absl::StrCat("Bearer ", key),
                absl::StrCat(R"({"model": ")", model, R"(", "prompt": ")", prompt,
                             R"(", "max_tokens": )", max_tokens, R"(, "temperature": 0})"));
  }
  // usage.prompt_tokens_details.cached_tokens of a completion.
  static int64_t CachedTokens(const HttpReply& r) {
    absl::StatusOr<JsonDocument> d = JsonDocument::Parse(r.body, "response");
    if (!d.ok()) return -1;
    absl::StatusOr<JsonValue> usage = d->root().Field("usage");
    if (!usage.ok()) return -1;
    absl::StatusOr<JsonValue> details = usage->Field("prompt_tokens_details");
    return details.ok() ? details->IntFieldOr("cached_tokens", -1).value_or(-1) : -1;
  }

  static LocalCluster* cluster_;
  static int http_port_, metrics_port_, worker_metrics_port_;
  static std::string keys_file_, worker_secret_file_, coordinator_secret_file_, access_log_;
};
std::string ApiKeysTest::access_log_;
std::string ApiKeysTest::keys_file_;
std::string ApiKeysTest::worker_secret_file_;
std::string ApiKeysTest::coordinator_secret_file_;
LocalCluster* ApiKeysTest::cluster_ = nullptr;
int ApiKeysTest::http_port_ = 0;
int ApiKeysTest::metrics_port_ = 0;
int ApiKeysTest::worker_metrics_port_ = 0;

TEST_F(ApiKeysTest, KeysAreAskedForEverywhereButHealth) {
  EXPECT_EQ(Call("GET", "/health", "").status, 200);
  for (const char* auth : {"", "Bearer sk-not-a-key-at-all", "Basic c2stYWNtZQ==", kAcme}) {
    SCOPED_TRACE(auth);
    const HttpReply models = Call("GET", "/v1/models", auth);
    EXPECT_EQ(models.status, 401) << models.body;
    EXPECT_TRUE(absl::StrContains(models.body, "authentication_error")) << models.body;
    EXPECT_EQ(
        Call("POST", "/v1/completions", auth, R"({"model": "strata-tiny", "prompt": "x"})").status,
        401);
    EXPECT_EQ(Call("POST", "/tokenize", auth, R"({"model": "strata-tiny", "prompt": "x"})").status,
              401);
  }
  const HttpReply keyless = Call("GET", "/v1/models", "");
  EXPECT_TRUE(absl::StrContains(keyless.body, "Authorization: Bearer KEY"));
  EXPECT_TRUE(absl::StrContains(keyless.head, "WWW-Authenticate: Bearer")) << keyless.head;
  // A keyless POST is answered before its body is read: a body announced but never sent does not
  // hold the answer up.
  {
    const int fd = ConnectLoopback(http_port_);
    ASSERT_GE(fd, 0);
    const std::string head =
        "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: 8000000\r\n\r\n";
    ASSERT_EQ(send(fd, head.data(), head.size(), MSG_NOSIGNAL), static_cast<ssize_t>(head.size()));
    std::string text;
    ReadToClose(fd, &text);
    close(fd);
    EXPECT_EQ(ParseHttpReply(text).status, 401) << text;
  }
  // Two Authorization headers are refused, whatever they hold.
  const HttpReply twice = HttpRaw(
      http_port_, HttpRequestText("GET", "/v1/models", "", /*close=*/true,
                                  absl::StrCat("Authorization: Bearer ", kAcme,
                                               "\r\nAuthorization: Bearer ", kShared, "\r\n")));
  EXPECT_EQ(twice.status, 400) << twice.body;
  // And with a key, as OpenAI's clients send it.
  const HttpReply ok = Complete(kAcme, "strata-tiny", "int main(");
  EXPECT_EQ(ok.status, 200) << ok.body;
  EXPECT_EQ(Call("POST", "/tokenize", absl::StrCat("Bearer ", kShared),
                 R"({"model": "strata-tiny", "prompt": "x"})")
                .status,
            200);
}

TEST_F(ApiKeysTest, TenantsSeeAndUseOnlyTheirModels) {
  const HttpReply acme = Call("GET", "/v1/models", absl::StrCat("Bearer ", kAcme));
  ASSERT_EQ(acme.status, 200) << acme.body;
  EXPECT_TRUE(absl::StrContains(acme.body, "\"id\":\"strata-tiny\"")) << acme.body;
  EXPECT_TRUE(absl::StrContains(acme.body, "\"id\":\"lora-c\"")) << acme.body;
  const HttpReply globex = Call("GET", "/v1/models", absl::StrCat("Bearer ", kGlobex));
  ASSERT_EQ(globex.status, 200) << globex.body;
  EXPECT_FALSE(absl::StrContains(globex.body, "\"id\":\"strata-tiny\"")) << globex.body;
  EXPECT_TRUE(absl::StrContains(globex.body, "\"id\":\"lora-c\"")) << globex.body;
  // And one at a time.
  EXPECT_EQ(Call("GET", "/v1/models/lora-c", absl::StrCat("Bearer ", kGlobex)).status, 200);
  EXPECT_EQ(Call("GET", "/v1/models/strata-tiny", absl::StrCat("Bearer ", kGlobex)).status, 404);
  EXPECT_EQ(Call("GET", "/v1/models/strata-tiny", absl::StrCat("Bearer ", kAcme)).status, 200);

  // A model it may not use reads as one that does not exist.
  const HttpReply refused = Complete(kGlobex, "strata-tiny", "int main(");
  EXPECT_EQ(refused.status, 404) << refused.body;
  EXPECT_TRUE(absl::StrContains(refused.body, "\"param\":\"model\"")) << refused.body;
  const HttpReply base_plus_id =
      Call("POST", "/v1/completions", absl::StrCat("Bearer ", kGlobex),
           R"({"model": "strata-tiny", "fine_tune_id": "lora-c", "prompt": "x", "max_tokens": 2})");
  EXPECT_EQ(base_plus_id.status, 200)
      << base_plus_id.body;  // the fine-tune is what it runs
                             // A made-up base with a fine-tune it may use, or a made-up model: the
                             // same 404, which names no
  // model the tenant may not see.
  for (const char* body : {R"({"model": "bogus", "fine_tune_id": "lora-c", "prompt": "x"})",
                           R"({"model": "bogus", "prompt": "x"})"}) {
    const HttpReply r = Call("POST", "/v1/completions", absl::StrCat("Bearer ", kGlobex), body);
    EXPECT_EQ(r.status, 404) << r.body;
    EXPECT_FALSE(absl::StrContains(r.body, "strata-tiny")) << r.body;
  }
  // Tokenizers: of a model it may use (here through its fine-tune), not of one it may not see.
  EXPECT_EQ(Call("POST", "/tokenize", absl::StrCat("Bearer ", kGlobex),
                 R"({"model": "lora-c", "prompt": "x"})")
                .status,
            200);
  const HttpReply hidden = Call("POST", "/tokenize", absl::StrCat("Bearer ", kOps),
                                R"({"model": "strata-tiny", "prompt": "x"})");
  EXPECT_EQ(hidden.status, 404) << hidden.body;
  const HttpReply lora = Complete(kGlobex, "lora-c", "int main(");
  EXPECT_EQ(lora.status, 200) << lora.body;
  // A tenant without a list uses everything.
  EXPECT_EQ(Complete(kShared, "strata-tiny", "x").status, 200);
  EXPECT_EQ(Complete(kShared, "lora-c", "x").status, 200);
}

TEST_F(ApiKeysTest, ATenantIsHeldToItsConcurrentRequests) {
  // acme may run one request: a long stream holds it.
  const int fd = ConnectLoopback(http_port_);
  ASSERT_GE(fd, 0);
  const std::string stream =
      HttpRequestText("POST", "/v1/completions",
                      R"({"model": "strata-tiny", "prompt": "x", "max_tokens": 1500, "stream": true,
          "ignore_eos": true})",
                      /*close=*/true, absl::StrCat("Authorization: Bearer ", kAcme, "\r\n"));
  ASSERT_EQ(send(fd, stream.data(), stream.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(stream.size()));
  char first[64];
  ASSERT_GT(recv(fd, first, sizeof(first), 0), 0);  // the stream has started
  const HttpReply second = Complete(kAcme, "strata-tiny", "y");
  EXPECT_EQ(second.status, 429) << second.body;
  EXPECT_TRUE(absl::StrContains(second.body, "rate_limit_error")) << second.body;
  EXPECT_TRUE(absl::StrContains(second.body, "max_concurrent_requests")) << second.body;
  // Other tenants are not held back by it.
  EXPECT_EQ(Complete(kShared, "strata-tiny", "y").status, 200);
  std::string rest;
  ReadToClose(fd, &rest);
  close(fd);
  EXPECT_TRUE(absl::StrContains(rest, "[DONE]"));
  // Its slot is back once the stream has ended.
  HttpReply third;
  for (int i = 0; i < 50 && (third = Complete(kAcme, "strata-tiny", "y")).status == 429; ++i) {
    usleep(100 * 1000);
  }
  EXPECT_EQ(third.status, 200) << third.body;
  // Choices are generations: two of them are over a limit of one.
  const HttpReply two = Call("POST", "/v1/completions", absl::StrCat("Bearer ", kAcme),
                             R"({"model": "strata-tiny", "prompt": "x", "max_tokens": 2, "n": 2})");
  EXPECT_EQ(two.status, 429) << two.body;
  EXPECT_TRUE(absl::StrContains(two.body, "fewer choices")) << two.body;
}

// requests_per_minute: a minute's worth at once, then 429 until the bucket refills.
TEST_F(ApiKeysTest, ATenantIsHeldToItsRate) {
  EXPECT_EQ(Complete(kLimited, "strata-tiny", "x").status, 200);
  EXPECT_EQ(Complete(kLimited, "strata-tiny", "x").status, 200);
  const HttpReply third = Complete(kLimited, "strata-tiny", "x");
  EXPECT_EQ(third.status, 429) << third.body;
  EXPECT_TRUE(absl::StrContains(third.body, "requests_per_minute (2)")) << third.body;
  EXPECT_TRUE(absl::StrContains(third.body, "retry in")) << third.body;
  // Other tenants are not held back by it.
  EXPECT_EQ(Complete(kShared, "strata-tiny", "x").status, 200);
}

// tokens_per_minute: each generation takes its prompt plus max_tokens, and gives back what it did
// not use; the same bucket over both APIs.
TEST_F(ApiKeysTest, ATenantIsHeldToItsTokens) {
  auto body = [](int max_tokens) {
    return absl::StrCat(
        R"({"model": "strata-tiny", "prompt": "x", "temperature": 0, "max_tokens": )", max_tokens,
        R"(, "ignore_eos": true})");
  };
  const std::string key = absl::StrCat("Bearer ", kMetered);
  // "x" and its BOS, and 50 tokens: 52 of the 60, all used.
  HttpReply r = Call("POST", "/v1/completions", key, body(50));
  ASSERT_EQ(r.status, 200) << r.body;
  r = Call("POST", "/v1/completions", key, body(50));
  EXPECT_EQ(r.status, 429) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "tokens_per_minute (60)")) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "retry in")) << r.body;
  // About 44 s at a token a second (the 8 left, plus any second that passed): as Retry-After too.
  const size_t at = r.head.find("Retry-After: ");
  ASSERT_NE(at, std::string::npos) << r.head;
  const int wait = std::atoi(r.head.c_str() + at + 13);
  EXPECT_GE(wait, 10) << r.head;  // (less if the first request was slow)
  EXPECT_LE(wait, 45) << r.head;
  // A smaller request fits in what is left.
  r = Call("POST", "/v1/completions", key, body(4));
  EXPECT_EQ(r.status, 200) << r.body;
  v1::GenerateRequest req;
  req.set_model("strata-tiny");
  req.set_text("x");
  req.mutable_sampling()->set_max_tokens(50);
  const grpc::Status s = GenerateWith(cluster_->serving(), req, {{"authorization", key}}).status;
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "tokens_per_minute")) << s.error_message();
  const std::map<std::string, double> m = ParseMetrics(Http(metrics_port_, "GET", "/metrics").body);
  for (const char* api : {"http", "grpc"}) {
    EXPECT_EQ(m.at(absl::StrCat("strata_coordinator_tenant_refused_total{tenant=\"metered\",api=\"",
                                api, "\",reason=\"tokens\"}")),
              1)
        << api;
  }
  // Other tenants are not held back by it.
  EXPECT_EQ(Complete(kShared, "strata-tiny", "x").status, 200);
}

// The workers answer only calls with the cluster secret (every other test here goes through the
// coordinator, which sends it); their health service stays open.
TEST_F(ApiKeysTest, WorkersAnswerOnlyTheClusterSecret) {
  v1::Worker::Stub* worker = cluster_->worker(0);
  auto unauthenticated = [&] {
    return ParseMetrics(
        Http(worker_metrics_port_, "GET", "/metrics").body)["strata_worker_unauthenticated_total"];
  };
  const double before = unauthenticated();  // (the tests share the cluster)
  for (const char* secret : {"", "cluster-secret-0123456789abcdeX"}) {
    grpc::ClientContext ctx;
    if (*secret != '\0') ctx.AddMetadata(kClusterSecretMetadata, secret);
    v1::WorkerInfo info;
    const grpc::Status s = worker->GetInfo(&ctx, {}, &info);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << secret;
    EXPECT_TRUE(absl::StrContains(s.error_message(), "cluster secret")) << s.error_message();
  }
  {
    grpc::ClientContext ctx;
    v1::SubmitRequest req;
    req.set_request_id("around-the-coordinator");
    req.set_model("strata-tiny");
    req.add_prompt_token_ids(1);
    auto reader = worker->Submit(&ctx, req);
    v1::SubmitResponse chunk;
    EXPECT_FALSE(reader->Read(&chunk));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  grpc::ClientContext ctx;
  ctx.AddMetadata(kClusterSecretMetadata, kClusterSecret);
  v1::WorkerInfo info;
  const grpc::Status s = worker->GetInfo(&ctx, {}, &info);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(info.model(), "strata-tiny");
  EXPECT_EQ(unauthenticated() - before, 3);
}

// A tenant asks for no higher priority than its max_priority (0 unless set), over both APIs.
TEST_F(ApiKeysTest, ATenantsPriorityIsCapped) {
  auto body = [](int priority) {
    return absl::StrCat(R"({"model": "strata-tiny", "prompt": "x", "max_tokens": 2, "priority": )",
                        priority, "}");
  };
  HttpReply r = Call("POST", "/v1/completions", absl::StrCat("Bearer ", kAcme), body(1));
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "priority must be at most 0 for tenant")) << r.body;
  EXPECT_EQ(Call("POST", "/v1/completions", absl::StrCat("Bearer ", kAcme), body(-5)).status, 200);
  EXPECT_EQ(Call("POST", "/v1/completions", absl::StrCat("Bearer ", kShared), body(10)).status,
            200);
  v1::GenerateRequest req;
  req.set_model("strata-tiny");
  req.set_text("x");
  req.set_priority(11);
  const grpc::Status s =
      GenerateWith(cluster_->serving(), req, {{"authorization", absl::StrCat("Bearer ", kShared)}})
          .status;
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "max_priority")) << s.error_message();
}

TEST_F(ApiKeysTest, AnIsolatedTenantsPrefixCacheIsItsOwn) {
  std::string prompt;
  for (int i = 0; i < 40; ++i) absl::StrAppend(&prompt, "static int value_", i, " = ", i, "; ");
  // A tenant that shares the cache fills it.
  ASSERT_EQ(Complete(kShared, "strata-tiny", prompt).status, 200);
  const HttpReply shared_again = Complete(kShared, "strata-tiny", prompt);
  ASSERT_EQ(shared_again.status, 200);
  EXPECT_GT(CachedTokens(shared_again), 0) << shared_again.body;
  // An isolated tenant finds none of it, only what it sent itself.
  const HttpReply acme = Complete(kAcme, "strata-tiny", prompt);
  ASSERT_EQ(acme.status, 200) << acme.body;
  EXPECT_EQ(CachedTokens(acme), 0) << acme.body;
  const HttpReply acme_again = Complete(kAcme, "strata-tiny", prompt);
  ASSERT_EQ(acme_again.status, 200) << acme_again.body;
  EXPECT_GT(CachedTokens(acme_again), 0) << acme_again.body;
  // A sharing tenant cannot name an isolated tenant's namespace as its salt.
  const HttpReply spoof =
      Call("POST", "/v1/completions", absl::StrCat("Bearer ", kShared),
           absl::StrCat(R"({"model": "strata-tiny", "max_tokens": 2, "cache_salt": "tenant:acme",
                           "prompt": ")",
                        prompt, R"("})"));
  ASSERT_EQ(spoof.status, 200) << spoof.body;
  EXPECT_EQ(CachedTokens(spoof), 0) << spoof.body;
}

// Over gRPC: the same keys as "authorization" metadata; the Admin service for admins only.
TEST_F(ApiKeysTest, TheGrpcServicesAskForKeysToo) {
  v1::Serving::Stub* serving = cluster_->serving();
  v1::Admin::Stub* admin = cluster_->admin();
  auto context = [](const std::string& key) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (!key.empty()) ctx->AddMetadata("authorization", absl::StrCat("Bearer ", key));
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return ctx;
  };
  // No key, or a wrong one.
  for (const std::string& key : {std::string(), std::string("sk-not-a-key-at-all")}) {
    v1::ListModelsResponse models;
    EXPECT_EQ(serving->ListModels(context(key).get(), {}, &models).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    v1::TokenizeRequest tr;
    tr.set_model("strata-tiny");
    tr.set_text("x");
    v1::TokenizeResponse tokens;
    EXPECT_EQ(serving->Tokenize(context(key).get(), tr, &tokens).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  // The gateway's metadata with a guessed secret is no key either.
  {
    auto ctx = context("");
    ctx->AddMetadata("x-strata-gateway-secret", "0000000000000000");
    v1::ListModelsResponse models;
    EXPECT_EQ(serving->ListModels(ctx.get(), {}, &models).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  // ListModels lists what the tenant may use: globex sees strata-tiny only for its lora-c.
  v1::ListModelsResponse models;
  ASSERT_TRUE(serving->ListModels(context(kGlobex).get(), {}, &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).name(), "strata-tiny");
  ASSERT_EQ(models.models(0).fine_tune_ids_size(), 1);
  EXPECT_EQ(models.models(0).fine_tune_ids(0), "lora-c");
  models.Clear();
  ASSERT_TRUE(serving->ListModels(context(kOps).get(), {}, &models).ok());
  EXPECT_EQ(models.models_size(), 0);  // an empty list: no model at all
  // Generate: the tenant's models only.
  v1::GenerateRequest req;
  req.set_model("strata-tiny");
  req.set_text("int main(");
  req.mutable_sampling()->set_max_tokens(3);
  v1::GenerateResponse chunk;
  // A Generate call's status, its tokens counted into `tokens` (may be null).
  auto generate = [&](const v1::GenerateRequest& r, int* tokens) {
    auto ctx = context(kGlobex);
    auto reader = serving->Generate(ctx.get(), r);
    while (reader->Read(&chunk)) {
      if (tokens != nullptr) *tokens += chunk.token_ids_size();
    }
    return reader->Finish();
  };
  grpc::Status s = generate(req, nullptr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "may not use")) << s.error_message();
  v1::GenerateRequest bogus = req;
  bogus.set_model("bogus");
  s = generate(bogus, nullptr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  EXPECT_FALSE(absl::StrContains(s.error_message(), "strata-tiny")) << s.error_message();
  req.set_fine_tune_id("lora-c");
  int tokens = 0;
  s = generate(req, &tokens);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(tokens, 3);
  // The Admin service: an admin tenant's key only.
  v1::ClusterStatus status;
  EXPECT_EQ(admin->GetClusterStatus(context(kShared).get(), {}, &status).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(admin->GetClusterStatus(context("").get(), {}, &status).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  v1::DrainWorkerRequest drain;
  drain.set_worker("w0");
  v1::DrainWorkerResponse drained;
  EXPECT_EQ(admin->DrainWorker(context(kShared).get(), drain, &drained).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  ASSERT_TRUE(admin->GetClusterStatus(context(kOps).get(), {}, &status).ok());
  EXPECT_EQ(status.workers_size(), 1);
}

// The keys file is read again while the coordinator runs: a key added works within moments, one
// removed stops working, and a file that does not parse changes nothing.
TEST_F(ApiKeysTest, KeysChangeWithoutARestart) {
  std::string text;
  {
    std::ifstream in(keys_file_);
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const std::string original = text;
  auto write = [&](const std::string& t) {
    const std::string tmp = keys_file_ + ".tmp";
    std::ofstream(tmp, std::ios::trunc) << t;
    std::filesystem::rename(tmp, keys_file_);  // as a Secret's volume swaps its files
  };
  auto status_within = [&](const std::string& key, int want) {
    int got = 0;
    for (int i = 0; i < 100 && (got = Call("GET", "/v1/models", key).status) != want; ++i) {
      usleep(100 * 1000);
    }
    return got;
  };
  constexpr char kLate[] = "Bearer sk-late-key-0000000";
  ASSERT_EQ(Call("GET", "/v1/models", kLate).status, 401);
  // Added: the "ops" tenant gets a second key.
  text.replace(text.find(kOps), std::string(kOps).size(),
               absl::StrCat(kOps, "\", \"", std::string(kLate).substr(7)));
  write(text);
  EXPECT_EQ(status_within(kLate, 200), 200);
  // Broken: nothing changes.
  write("{\"tenants\": [");
  usleep(600 * 1000);
  EXPECT_EQ(Call("GET", "/v1/models", kLate).status, 200);
  EXPECT_EQ(Call("GET", "/v1/models", absl::StrCat("Bearer ", kAcme)).status, 200);
  // Removed again.
  write(original);
  EXPECT_EQ(status_within(kLate, 401), 401);
  EXPECT_EQ(Call("GET", "/v1/models", absl::StrCat("Bearer ", kAcme)).status, 200);
}

// The coordinator counts each tenant's requests and refusals, and the calls without a valid key.
TEST_F(ApiKeysTest, TenantsAreCountedInTheMetrics) {
  ASSERT_EQ(Call("GET", "/v1/models", "Bearer sk-not-a-key-at-all").status, 401);
  ASSERT_EQ(Complete(kAcme, "strata-tiny", "x").status, 200);
  ASSERT_EQ(Complete(kGlobex, "strata-tiny", "x").status, 404);
  // And over gRPC: a call without a key, one refused, one taken.
  v1::Serving::Stub* serving = cluster_->serving();
  {
    grpc::ClientContext ctx;
    v1::ListModelsResponse models;
    ASSERT_EQ(serving->ListModels(&ctx, {}, &models).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  for (const char* fine_tune : {"", "lora-c"}) {
    v1::GenerateRequest req;
    req.set_model("strata-tiny");
    req.set_fine_tune_id(fine_tune);
    req.set_text("x");
    req.mutable_sampling()->set_max_tokens(2);
    const Generated g =
        GenerateWith(serving, req, {{"authorization", absl::StrCat("Bearer ", kGlobex)}});
    ASSERT_EQ(g.status.ok(), *fine_tune != '\0') << fine_tune;
  }
  // (A call's running count drops just after its answer is sent: scrape until both have.)
  std::string text;
  std::map<std::string, double> m = WaitForMetrics(
      metrics_port_,
      [](auto& now) {
        return now["strata_coordinator_tenant_running_requests{tenant=\"globex\",api=\"grpc\"}"] ==
                   0 &&
               now["strata_coordinator_tenant_running_requests{tenant=\"acme\",api=\"http\"}"] == 0;
      },
      absl::Seconds(5), &text);
  // Each API's series: at least one of each event above, and nothing running now (every lease
  // was given back).
  for (const std::string api : {"http", "grpc"}) {
    const std::string tenant = api == "http" ? "acme" : "globex";
    const std::string labels = absl::StrCat("tenant=\"", tenant, "\",api=\"", api, "\"");
    EXPECT_GE(m[absl::StrCat("strata_coordinator_unauthenticated_total{api=\"", api, "\"}")], 1)
        << text;
    EXPECT_GE(m[absl::StrCat("strata_coordinator_tenant_requests_total{", labels, "}")], 1) << text;
    EXPECT_GE(m[absl::StrCat("strata_coordinator_tenant_refused_total{tenant=\"globex\",api=\"",
                             api, "\",reason=\"model\"}")],
              1)
        << text;
    // Its usage: the completed generation's tokens.
    EXPECT_GE(
        m[absl::StrCat("strata_coordinator_tenant_tokens_total{", labels, ",kind=\"prompt\"}")], 1)
        << text;
    EXPECT_GE(
        m[absl::StrCat("strata_coordinator_tenant_tokens_total{", labels, ",kind=\"completion\"}")],
        1)
        << text;
    EXPECT_TRUE(m.count(absl::StrCat("strata_coordinator_tenant_tokens_total{", labels,
                                     ",kind=\"cached_prompt\"}")))
        << text;
    const std::string running =
        absl::StrCat("strata_coordinator_tenant_running_requests{", labels, "}");
    EXPECT_TRUE(m.count(running)) << text;
    EXPECT_EQ(m[running], 0) << text;
  }
  // The worker knows whose tokens it computed, from either API (for its fair sharing), and
  // counts them by tenant; the unnamed tenant of requests without a key is left out.
  const std::string acme = "strata_worker_tenant_tokens_total{tenant=\"acme\",kind=\"generated\"}";
  const std::string globex =
      "strata_worker_tenant_tokens_total{tenant=\"globex\",kind=\"generated\"}";
  // (And the KV blocks kept for each, by tier: this worker has the device tier only.)
  const std::string acme_blocks = "strata_worker_tenant_kv_blocks{tenant=\"acme\",tier=\"device\"}";
  m = WaitForMetrics(
      worker_metrics_port_, [&](auto& now) { return now[acme] >= 1 && now[globex] >= 1; },
      absl::Seconds(5), &text);
  EXPECT_GE(m[acme], 1) << text;
  EXPECT_GE(m[globex], 1) << text;
  EXPECT_GE(m["strata_worker_tenant_tokens_total{tenant=\"acme\",kind=\"computed\"}"], 1);
  EXPECT_EQ(m["strata_worker_tenant_sequences{tenant=\"acme\",state=\"running\"}"], 0);
  EXPECT_TRUE(m.count(acme_blocks)) << text;
  EXPECT_FALSE(m.count("strata_worker_tenant_kv_blocks{tenant=\"acme\",tier=\"host\"}"));
  for (const auto& [series, value] : m) {
    EXPECT_EQ(series.find("tenant=\"\""), std::string::npos) << series;
  }
}

// The cluster secret rotates without a restart. The coordinator and the worker read files of
// their own (as pods see a Secret's update at different times) every 0.1 s, and through each
// step of the rotation in common/secrets.h requests go on being served.
TEST_F(ApiKeysTest, TheClusterSecretRotatesWithoutARestart) {
  auto replace = [](const std::string& path, const std::string& text) {
    std::ofstream(path + ".new") << text;
    ASSERT_EQ(std::rename((path + ".new").c_str(), path.c_str()), 0);
  };
  auto worker_takes = [&](const std::string& secret) {
    grpc::ClientContext ctx;
    ctx.AddMetadata(kClusterSecretMetadata, secret);
    v1::WorkerInfo info;
    return cluster_->worker(0)->GetInfo(&ctx, {}, &info).ok();
  };
  auto other_secret_calls = [&] {
    return ParseMetrics(Http(worker_metrics_port_, "GET", "/metrics")
                            .body)["strata_worker_calls_with_other_secret_total"];
  };
  auto served = [&] { return Complete(kShared, "strata-tiny", "x").status == 200; };
  auto await = [](auto done) {
    for (int i = 0; i < 200 && !done(); ++i) usleep(50 * 1000);
    return done();
  };
  auto rotate = [&](const std::string& from, const std::string& to) {
    // 1. Every worker accepts the new secret; the old one is still sent.
    replace(worker_secret_file_, absl::StrCat(from, "\n", to, "\n"));
    ASSERT_TRUE(await([&] { return worker_takes(to); })) << to;
    EXPECT_TRUE(worker_takes(from));
    EXPECT_TRUE(served());
    // 2. The coordinators send the new one (the worker's second yet: it counts those calls)...
    double before = other_secret_calls();
    replace(coordinator_secret_file_, absl::StrCat(to, "\n", from, "\n"));
    ASSERT_TRUE(await([&] { return served() && other_secret_calls() > before; }));
    // ... and so does every worker's file.
    replace(worker_secret_file_, absl::StrCat(to, "\n", from, "\n"));
    ASSERT_TRUE(await([&] {
      const double calls = other_secret_calls();
      return served() && other_secret_calls() == calls;
    }));
    // 3. The old secret goes.
    replace(coordinator_secret_file_, absl::StrCat(to, "\n"));
    replace(worker_secret_file_, absl::StrCat(to, "\n"));
    ASSERT_TRUE(await([&] { return !worker_takes(from); }));
    EXPECT_TRUE(served());
    EXPECT_TRUE(worker_takes(to));
  };
  // How many times every worker has refused its file so far (the fewest).
  auto refusals = [&] {
    size_t fewest = std::numeric_limits<size_t>::max();
    for (int i = 0; i < cluster_->num_workers(); ++i) {
      std::ifstream in(cluster_->worker_process(i).log_path());
      const std::string log((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      size_t n = 0;
      for (size_t p = log.find("cluster secret not reloaded"); p != std::string::npos;
           p = log.find("cluster secret not reloaded", p + 1)) {
        ++n;
      }
      fewest = std::min(fewest, n);
    }
    return fewest;
  };
  const std::string next = "rotated-secret-fedcba9876543210";
  ASSERT_NO_FATAL_FAILURE(rotate(kClusterSecret, next));
  EXPECT_FALSE(worker_takes(kClusterSecret));
  // An unusable file leaves the secret before in force (once every worker has read it).
  const size_t refused = refusals();
  replace(worker_secret_file_, "too short\n");
  ASSERT_TRUE(await([&] { return refusals() > refused; }));
  EXPECT_TRUE(served());
  EXPECT_TRUE(worker_takes(next));
  ASSERT_NO_FATAL_FAILURE(rotate(next, kClusterSecret));  // and back, for the other tests
  EXPECT_FALSE(worker_takes(next));
}

// --access_log: a JSON line for each HTTP request and each Generate call (either API), linked by
// the gateway's request id, with the tenant, sizes, timings, worker and W3C trace id, and never
// the prompt or the output.
TEST_F(ApiKeysTest, TheAccessLogRecordsEachRequestAndCall) {
  const std::string trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  const std::string secret_prompt = "zebra quartz lantern";
  HttpReply ok = HttpRaw(
      http_port_,
      HttpRequestText(
          "POST", "/v1/completions?x=1",
          absl::StrCat(R"({"model": "strata-tiny", "prompt": ")", secret_prompt,
                       R"(", "max_tokens": 3, "request_id": "logged-1"})"),
          /*close=*/true,
          absl::StrCat("Authorization: Bearer ", kShared, "\r\ntraceparent: ", trace, "\r\n")));
  ASSERT_EQ(ok.status, 200) << ok.body;
  ASSERT_EQ(Call("GET", "/v1/models", "Bearer sk-not-a-key-at-all").status, 401);
  {
    v1::GenerateRequest req;
    req.set_request_id("logged-2");
    req.set_model("no-such-model");
    req.set_text("x");
    const Generated g = GenerateWith(cluster_->serving(), req,
                                     {{"authorization", absl::StrCat("Bearer ", kShared)},
                                      {"traceparent", "not a traceparent"}});
    ASSERT_EQ(g.status.error_code(), grpc::StatusCode::NOT_FOUND);
  }
  // The records, as the writer thread gets to them.
  std::map<std::string, JsonDocument> by_kind;  // "http 200", "http 401", "generate logged-1", ...
  std::string text;
  for (int i = 0; i < 100 && by_kind.size() < 4; ++i) {
    usleep(50 * 1000);
    std::ifstream in(access_log_);
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    by_kind.clear();
    for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
      absl::StatusOr<JsonDocument> d = JsonDocument::Parse(line, "access log line");
      ASSERT_TRUE(d.ok()) << d.status() << "\n" << line;
      const std::string event = d->root().StringFieldOr("event", "").value_or("");
      std::string key;
      if (event == "http") {
        // This test's own requests: the one with its trace, the 401 on /v1/models after it.
        const std::string path = d->root().StringFieldOr("path", "").value_or("");
        const int64_t status = d->root().IntFieldOr("status", 0).value_or(0);
        const std::string trace_id = d->root().StringFieldOr("trace_id", "").value_or("");
        if (path == "/v1/completions" && trace_id == "0af7651916cd43dd8448eb211c80319c") {
          key = absl::StrCat("http ", status);
        } else if (path == "/v1/models" && status == 401 && by_kind.count("http 200") > 0) {
          key = "http 401";
        }
      } else if (event == "generate") {
        const std::string id = d->root().StringFieldOr("request_id", "").value_or("");
        if (id == "logged-1" || id == "logged-2") key = "generate " + id;
      }
      if (!key.empty()) by_kind.insert_or_assign(key, *std::move(d));
    }
  }
  ASSERT_EQ(by_kind.size(), 4u) << text;
  EXPECT_FALSE(absl::StrContains(text, secret_prompt)) << text;
  auto str = [](const JsonDocument& d, const char* field) {
    return d.root().StringFieldOr(field, "").value_or("");
  };
  auto num = [](const JsonDocument& d, const char* field) {
    return d.root().IntFieldOr(field, -1).value_or(-1);
  };
  const JsonDocument& http = by_kind.at("http 200");
  EXPECT_EQ(str(http, "method"), "POST");
  EXPECT_TRUE(absl::StartsWith(str(http, "peer"), "ipv4:127.0.0.1:")) << str(http, "peer");
  EXPECT_EQ(str(http, "tenant"), "shared");
  EXPECT_EQ(str(http, "trace_id"), "0af7651916cd43dd8448eb211c80319c");
  EXPECT_FALSE(str(http, "id").empty());
  const JsonDocument& call = by_kind.at("generate logged-1");
  EXPECT_EQ(str(call, "api"), "http");
  EXPECT_EQ(str(call, "http_request"), str(http, "id"));  // the two records linked
  EXPECT_EQ(str(call, "peer"), str(http, "peer"));
  EXPECT_EQ(str(call, "trace_id"), "0af7651916cd43dd8448eb211c80319c");
  EXPECT_EQ(str(call, "tenant"), "shared");
  EXPECT_EQ(str(call, "model"), "strata-tiny");
  EXPECT_EQ(str(call, "status"), "OK");
  EXPECT_FALSE(str(call, "finish_reason").empty());
  EXPECT_GT(num(call, "prompt_tokens"), 0);
  EXPECT_GE(num(call, "completion_tokens"), 1);
  EXPECT_LE(num(call, "completion_tokens"), 3);
  absl::StatusOr<JsonValue> workers = call.root().Field("workers");
  ASSERT_TRUE(workers.ok());
  absl::StatusOr<std::vector<JsonValue>> list = workers->AsArray();
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->size(), 1u);
  const JsonDocument& refused = by_kind.at("http 401");
  EXPECT_EQ(str(refused, "tenant"), "");  // no valid key, no tenant
  const JsonDocument& grpc_call = by_kind.at("generate logged-2");
  EXPECT_EQ(str(grpc_call, "api"), "grpc");
  EXPECT_EQ(str(grpc_call, "status"), "NOT_FOUND");
  EXPECT_TRUE(absl::StrContains(str(grpc_call, "error"), "no-such-model"))
      << str(grpc_call, "error");
  EXPECT_EQ(str(grpc_call, "trace_id"), "");  // not a traceparent
  EXPECT_EQ(str(grpc_call, "http_request"), "");
  EXPECT_TRUE(absl::StartsWith(str(grpc_call, "peer"), "ipv4:127.0.0.1:") ||
              absl::StartsWith(str(grpc_call, "peer"), "ipv6:"))
      << str(grpc_call, "peer");
  const std::map<std::string, double> m = ParseMetrics(Http(metrics_port_, "GET", "/metrics").body);
  EXPECT_GE(m.at("strata_coordinator_access_log_records_total{outcome=\"written\"}"), 4);
  EXPECT_EQ(m.at("strata_coordinator_access_log_records_total{outcome=\"dropped\"}"), 0);
}

// A key removed from the keys file ends the requests running with it, over both APIs (their
// sequences cancelled on the worker); the tenant's other keys go on.
TEST_F(ApiKeysTest, ARevokedKeyEndsItsRunningRequests) {
  std::string original;
  {
    std::ifstream in(keys_file_);
    original.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  auto write = [&](const std::string& t) {
    const std::string tmp = keys_file_ + ".tmp";
    std::ofstream(tmp, std::ios::trunc) << t;
    std::filesystem::rename(tmp, keys_file_);
  };
  constexpr char kSpare[] = "sk-shared-spare-0000000";
  std::string with_spare = original;
  with_spare.replace(with_spare.find(kShared), std::string(kShared).size(),
                     absl::StrCat(kShared, "\", \"", kSpare));
  write(with_spare);
  for (int i = 0;
       i < 100 && Call("GET", "/v1/models", absl::StrCat("Bearer ", kSpare)).status != 200; ++i) {
    usleep(100 * 1000);
  }
  ASSERT_EQ(Call("GET", "/v1/models", absl::StrCat("Bearer ", kSpare)).status, 200);

  // A long generation over each API with the spare key.
  v1::Serving::Stub* serving = cluster_->serving();
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", absl::StrCat("Bearer ", kSpare));
  v1::GenerateRequest req;
  req.set_model("strata-tiny");
  req.set_text("x");
  req.mutable_sampling()->set_max_tokens(2000);
  req.mutable_sampling()->set_ignore_eos(true);
  auto reader = serving->Generate(&ctx, req);
  v1::GenerateResponse chunk;
  ASSERT_TRUE(reader->Read(&chunk));  // running
  HttpReply streamed;
  std::jthread http([&] {  // joined on the way out, whatever fails below
    // (A tab after "Bearer": the gateway passes the key on as metadata, which must be printable.)
    streamed = Call("POST", "/v1/completions", absl::StrCat("Bearer \t", kSpare),
                    R"({"model": "strata-tiny", "prompt": "y", "max_tokens": 2000,
                        "ignore_eos": true, "stream": true})");
  });
  // And one with the tenant's own key, which goes on.
  grpc::ClientContext own_ctx;
  own_ctx.AddMetadata("authorization", absl::StrCat("Bearer ", kShared));
  v1::GenerateRequest own = req;
  own.mutable_sampling()->set_max_tokens(600);
  auto own_reader = serving->Generate(&own_ctx, own);
  v1::GenerateResponse own_chunk;
  ASSERT_TRUE(own_reader->Read(&own_chunk));
  // All three running (the HTTP one too) before the key goes.
  ASSERT_GE(WaitForMetrics(metrics_port_,
                           [](auto& now) {
                             return now["strata_coordinator_inflight_requests"] >= 3;
                           })["strata_coordinator_inflight_requests"],
            3);
  write(original);  // the spare key revoked
  int64_t tokens = chunk.token_ids_size();
  while (reader->Read(&chunk)) tokens += chunk.token_ids_size();
  const grpc::Status s = reader->Finish();
  http.join();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "revoked")) << s.error_message();
  EXPECT_LT(tokens, 2000);
  EXPECT_EQ(streamed.status, 200);  // the stream had begun: its error is its last event
  EXPECT_TRUE(absl::StrContains(streamed.body, "revoked")) << streamed.body.substr(0, 400);
  int64_t own_tokens = own_chunk.token_ids_size();
  while (own_reader->Read(&own_chunk)) own_tokens += own_chunk.token_ids_size();
  const grpc::Status own_status = own_reader->Finish();
  EXPECT_TRUE(own_status.ok()) << own_status.error_message();
  EXPECT_EQ(own_tokens, 600);
  // The tenant's own key goes on, and the revoked one is refused.
  EXPECT_EQ(Complete(kShared, "strata-tiny", "x").status, 200);
  EXPECT_EQ(Call("GET", "/v1/models", absl::StrCat("Bearer ", kSpare)).status, 401);
}

// A generation refused for the tenant's tokens_per_minute never ran, so over HTTP it gives back
// what it took of the tenant's requests_per_minute (the gateway takes that first), and over
// either API it is counted as refused, not taken.
TEST_F(ApiKeysTest, ATokensRefusalDoesNotSpendTheRequestRate) {
  const std::string key = absl::StrCat("Bearer ", kCapped);
  auto counts = [&] {
    std::map<std::string, double> m = ParseMetrics(Http(metrics_port_, "GET", "/metrics").body);
    std::map<std::string, double> out;
    for (const char* api : {"http", "grpc"}) {
      const std::string labels = absl::StrCat("tenant=\"capped\",api=\"", api, "\"");
      out[absl::StrCat(api, " taken")] =
          m[absl::StrCat("strata_coordinator_tenant_requests_total{", labels, "}")];
      out[absl::StrCat(api, " refused")] = m[absl::StrCat(
          "strata_coordinator_tenant_refused_total{", labels, ",reason=\"tokens\"}")];
    }
    return out;
  };
  std::map<std::string, double> before = counts();
  auto body = [](int max_tokens) {
    return absl::StrCat(R"({"model": "strata-tiny", "prompt": "x", "max_tokens": )", max_tokens,
                        R"(, "ignore_eos": true})");
  };
  // One request takes the minute's 40 tokens (and owes the rest): 1 of the 3 requests a minute.
  const HttpReply first = Call("POST", "/v1/completions", key, body(60));
  ASSERT_EQ(first.status, 200) << first.body;
  // Five more, each refused for tokens: had each spent a request, the third would be refused
  // for the request rate instead.
  for (int i = 0; i < 5; ++i) {
    const HttpReply r = Call("POST", "/v1/completions", key, body(2));
    EXPECT_EQ(r.status, 429) << r.body;
    EXPECT_TRUE(absl::StrContains(r.body, "tokens_per_minute")) << i << ": " << r.body;
  }
  // And over gRPC.
  for (int i = 0; i < 5; ++i) {
    v1::GenerateRequest req;
    req.set_model("strata-tiny");
    req.set_text("x");
    req.mutable_sampling()->set_max_tokens(2);
    const grpc::Status s = GenerateWith(cluster_->serving(), req, {{"authorization", key}}).status;
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << i;
    EXPECT_TRUE(absl::StrContains(s.error_message(), "tokens_per_minute"))
        << i << ": " << s.error_message();
  }
  const std::map<std::string, double> after = counts();
  EXPECT_EQ(after.at("http taken") - before["http taken"], 1);
  EXPECT_EQ(after.at("http refused") - before["http refused"], 5);
  EXPECT_EQ(after.at("grpc taken") - before["grpc taken"], 0);
  EXPECT_EQ(after.at("grpc refused") - before["grpc refused"], 5);
}

}  // namespace
}  // namespace strata
