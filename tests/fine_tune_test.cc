// End-to-end: serving fine-tunes as deltas. A coordinator and two workers as real processes on
// loopback; worker 1 serves two fine-tunes of the bundled base (delta files made by the same code
// as `stratactl delta compress`), worker 0 serves the base alone. Requests for a fine-tune go only
// to the worker that has it, the coordinator lists it, and its output is the fine-tune's.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/json.h"
#include "gtest/gtest.h"
#include "tests/cluster_client.h"
#include "tests/http_client.h"
#include "tests/local_cluster.h"
#include "worker/model/delta.h"

namespace strata {
namespace {

std::string TempDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir == nullptr ? "/tmp" : dir;
}

// The text of a completion response's one choice; "<...>" saying what is wrong otherwise.
std::string OnlyChoiceText(const std::string& body) {
  absl::StatusOr<JsonDocument> d = JsonDocument::Parse(body, "response");
  if (!d.ok()) return absl::StrCat("<", d.status().message(), ">");
  const absl::StatusOr<std::vector<JsonValue>> choices =
      d->root().Field("choices").value_or(d->root()).AsArray();
  if (!choices.ok() || choices->size() != 1) return "<not one choice>";
  return std::string((*choices)[0].StringField("text").value_or("<no text>"));
}

class FineTuneTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Worker {i} serves the deltas in <tmp>/fine-tunes/{i}: none for worker 0.
    const std::string root = TempDir() + "/fine-tunes";
    std::filesystem::create_directories(root + "/0");
    std::filesystem::create_directories(root + "/1");
    for (const auto& [id, dir] : {std::pair{"c-headers", "ft-c-headers"}, {"man", "ft-man"}}) {
      absl::StatusOr<DeltaCompressReport> r =
          CompressDelta(kTinyModelDir, absl::StrCat("models/strata-tiny/", dir),
                        absl::StrCat(root, "/1/", id, ".delta.safetensors"), {});
      ASSERT_TRUE(r.ok()) << r.status();
    }
    // And a LoRA adapter, as a directory in PEFT's format.
    CopyBundledLoraAdapter(root + "/1/lora-c");
    // A file no worker can serve: refused and logged, and worker 0 starts all the same (it
    // rescans its directory, so one bad file must not keep it down).
    std::ofstream(root + "/0/broken.delta.safetensors") << "not a delta";
    LocalClusterOptions o;
    o.num_workers = 2;
    o.name = "fine-tunes";
    // Each worker reads its directory again every 0.2 s; the coordinator refreshes a worker's
    // fine-tunes when its load reports say they changed (its periodic refresh, 30 s, is too slow
    // for the test below).
    o.worker_flags = {absl::StrCat("--fine_tune_dir=", root, "/{i}"), "--delta_cache_mb=64",
                      "--fine_tune_rescan_s=0.2"};
    http_port_ = FreePort();
    o.coordinator_flags = {absl::StrCat("--http_listen=127.0.0.1:", http_port_),
                           "--resolve_interval_s=30"};
    auto c = LocalCluster::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = c->release();
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }

  static v1::GenerateRequest Greedy(const std::string& text, const std::string& fine_tune) {
    v1::GenerateRequest req = TextRequest(text, 24, 7);
    req.mutable_sampling()->set_temperature(0);
    req.mutable_sampling()->set_ignore_eos(true);
    req.set_fine_tune_id(fine_tune);
    return req;
  }

  static uint64_t Routed(int worker) {
    const v1::ClusterStatus s = Status(cluster_->admin());
    for (const auto& w : s.workers()) {
      if (w.address() == cluster_->worker_address(worker)) return w.num_routed_requests();
    }
    ADD_FAILURE() << "worker " << worker << " missing from the status";
    return 0;
  }

  static std::vector<std::string> ListedFineTunes() {
    grpc::ClientContext ctx;
    v1::ListModelsResponse models;
    if (!cluster_->serving()->ListModels(&ctx, v1::ListModelsRequest(), &models).ok() ||
        models.models_size() != 1) {
      return {"<ListModels failed>"};
    }
    return {models.models(0).fine_tune_ids().begin(), models.models(0).fine_tune_ids().end()};
  }

  static inline LocalCluster* cluster_ = nullptr;
  static inline int http_port_ = 0;
};

TEST_F(FineTuneTest, ListModelsNamesTheFineTunes) {
  grpc::ClientContext ctx;
  v1::ListModelsResponse models;
  ASSERT_TRUE(cluster_->serving()->ListModels(&ctx, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(std::vector<std::string>(models.models(0).fine_tune_ids().begin(),
                                     models.models(0).fine_tune_ids().end()),
            (std::vector<std::string>{"c-headers", "lora-c", "man"}));
}

// A LoRA adapter is served like a delta: routed to its worker, in its own cache namespace (the
// worker's revision of the adapter, which the coordinator's routing hashes with), by name over
// HTTP too.
TEST_F(FineTuneTest, LoraAdaptersServeLikeDeltas) {
  const uint64_t before0 = Routed(0), before1 = Routed(1);
  const std::string prompt = std::string(200, 'x') + "#include <stdio.h>\n#include <";
  Generated lora = Generate(cluster_->serving(), Greedy(prompt, "lora-c"));
  ASSERT_TRUE(lora.status.ok()) << lora.status.error_message();
  EXPECT_EQ(lora.tokens.size(), 24u);
  Generated again = Generate(cluster_->serving(), Greedy(prompt, "lora-c"));
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.tokens, lora.tokens);
  EXPECT_GT(again.chunks.back().usage().cached().num_device_tokens(), 0u);
  EXPECT_EQ(Routed(0), before0);
  EXPECT_EQ(Routed(1), before1 + 2);
  Generated base = Generate(cluster_->serving(), Greedy(prompt, ""));
  ASSERT_TRUE(base.status.ok());
  EXPECT_NE(base.tokens, lora.tokens);

  const HttpReply r = Http(http_port_, "POST", "/v1/completions",
                           absl::StrCat(R"({"model": "lora-c", "prompt": )", JsonQuote(prompt),
                                        R"(, "max_tokens": 24, "temperature": 0, )"
                                        R"("ignore_eos": true})"));
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(OnlyChoiceText(r.body), lora.text) << r.body;
}

TEST_F(FineTuneTest, FineTuneRequestsGoToTheWorkerThatServesThem) {
  const uint64_t before0 = Routed(0), before1 = Routed(1);
  const std::string prompt = "#include <stdio.h>\n#include <";
  Generated c = Generate(cluster_->serving(), Greedy(prompt, "c-headers"));
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  EXPECT_EQ(c.tokens.size(), 24u);
  for (int i = 0; i < 5; ++i) {
    Generated again = Generate(cluster_->serving(), Greedy(prompt, i % 2 ? "man" : "c-headers"));
    ASSERT_TRUE(again.status.ok()) << again.status.error_message();
    if (i % 2 == 0) {
      EXPECT_EQ(again.tokens, c.tokens);  // greedy: the same every time
    }
  }
  EXPECT_EQ(Routed(0), before0);
  EXPECT_EQ(Routed(1), before1 + 6);
  // The worker publishes the fine-tune's blocks under the namespace the coordinator computes (id
  // and the delta's revision): a repeated prompt is a prefix hit.
  v1::GenerateRequest longer = Greedy(std::string(200, 'x') + prompt, "c-headers");
  longer.mutable_sampling()->set_max_tokens(2);
  ASSERT_TRUE(Generate(cluster_->serving(), longer).status.ok());
  Generated hit = Generate(cluster_->serving(), longer);
  ASSERT_TRUE(hit.status.ok());
  EXPECT_GT(hit.chunks.back().usage().cached().num_device_tokens(), 0u);

  // The fine-tune's output is not the base's, and the two fine-tunes differ from each other.
  Generated base = Generate(cluster_->serving(), Greedy(prompt, ""));
  Generated man = Generate(cluster_->serving(), Greedy(prompt, "man"));
  ASSERT_TRUE(base.status.ok() && man.status.ok());
  EXPECT_NE(base.tokens, c.tokens);
  EXPECT_NE(man.tokens, c.tokens);
}

// The OpenAI-compatible API lists each fine-tune as a model whose parent is the base, and takes
// a fine-tune's name as the model (or the base with fine_tune_id): the gRPC API's tokens.
TEST_F(FineTuneTest, TheHttpApiServesFineTunesByName) {
  const HttpReply models = Http(http_port_, "GET", "/v1/models");
  ASSERT_EQ(models.status, 200) << models.body;
  EXPECT_NE(models.body.find(R"("id":"man","object":"model")"), std::string::npos) << models.body;
  EXPECT_NE(models.body.find(R"("parent":"strata-tiny")"), std::string::npos) << models.body;

  const Generated want = Generate(cluster_->serving(), Greedy("The manual page says", "man"));
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  for (const std::string& model :
       {std::string(R"("model": "man")"),
        std::string(R"("model": "strata-tiny", "fine_tune_id": "man")")}) {
    SCOPED_TRACE(model);
    const HttpReply r =
        Http(http_port_, "POST", "/v1/completions",
             absl::StrCat("{", model,
                          R"(, "prompt": "The manual page says", "max_tokens": 24, "seed": 7, )"
                          R"("temperature": 0, "ignore_eos": true})"));
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(OnlyChoiceText(r.body), want.text) << r.body;
  }
  const HttpReply unknown =
      Http(http_port_, "POST", "/v1/completions", R"({"model": "no-such-tune", "prompt": "x"})");
  EXPECT_EQ(unknown.status, 404) << unknown.body;
  // This coordinator found no chat template for the bundled model: chat completions say so.
  const HttpReply chat =
      Http(http_port_, "POST", "/v1/chat/completions",
           R"({"model": "man", "messages": [{"role": "user", "content": "x"}]})");
  EXPECT_EQ(chat.status, 400) << chat.body;
  EXPECT_NE(chat.body.find("no chat template"), std::string::npos) << chat.body;
  EXPECT_NE(chat.body.find(R"("param":"model")"), std::string::npos) << chat.body;
}

TEST_F(FineTuneTest, UnknownFineTunesAreNotFoundAndTheClusterKeepsServing) {
  Generated bad = Generate(cluster_->serving(), Greedy("hello", "no-such-tune"));
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(bad.status.error_message().find("fine_tune_id"), std::string::npos)
      << bad.status.error_message();
  // Straight to the worker without it: NOT_FOUND from the worker too.
  v1::SubmitRequest sub;
  sub.set_request_id("direct-ft");
  sub.set_model(kTinyModel);
  sub.set_fine_tune_id("c-headers");
  sub.mutable_prompt_token_ids()->Add(2047);
  sub.mutable_prompt_token_ids()->Add(35);
  sub.mutable_sampling()->set_max_tokens(2);
  grpc::ClientContext ctx;
  auto reader = cluster_->worker(0)->Submit(&ctx, sub);
  v1::SubmitResponse chunk;
  while (reader->Read(&chunk)) {
  }
  const grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  Generated ok = Generate(cluster_->serving(), Greedy("hello", "man"));
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
}

// Fine-tunes put in, replaced in and taken out of a worker's --fine_tune_dir while it serves: the
// worker picks them up, the coordinator lists and routes them, no restart.
TEST_F(FineTuneTest, FineTunesComeAndGoWithTheirFilesWithoutARestart) {
  const std::string root = TempDir() + "/fine-tunes";
  auto move_in = [&](const std::string& from, const std::string& to) {
    std::filesystem::copy_file(from, to + ".part",
                               std::filesystem::copy_options::overwrite_existing);
    std::filesystem::rename(to + ".part", to);
  };
  auto await = [](auto done) {
    for (int i = 0; i < 200 && !done(); ++i) absl::SleepFor(absl::Milliseconds(50));
    return done();
  };
  auto listed = [](const std::string& id) {
    const std::vector<std::string> ids = ListedFineTunes();
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  const std::string prompt = "NAME\n       ls - list directory contents\n";
  const Generated man = Generate(cluster_->serving(), Greedy(prompt, "man"));
  const Generated c = Generate(cluster_->serving(), Greedy(prompt, "c-headers"));
  ASSERT_TRUE(man.status.ok() && c.status.ok());
  ASSERT_NE(man.tokens, c.tokens);

  // Added to worker 0's (empty) directory: listed, and served there with the delta's output.
  const std::string added = root + "/0/team-x.delta.safetensors";
  move_in(root + "/1/man.delta.safetensors", added);
  ASSERT_TRUE(await([&] { return listed("team-x"); })) << absl::StrJoin(ListedFineTunes(), ",");
  const uint64_t before0 = Routed(0);
  Generated x = Generate(cluster_->serving(), Greedy(prompt, "team-x"));
  ASSERT_TRUE(x.status.ok()) << x.status.error_message();
  EXPECT_EQ(x.tokens, man.tokens);
  EXPECT_EQ(Routed(0), before0 + 1);

  // Replaced by another delta under the same name: its output from then on.
  move_in(root + "/1/c-headers.delta.safetensors", added);
  ASSERT_TRUE(await([&] {
    const Generated g = Generate(cluster_->serving(), Greedy(prompt, "team-x"));
    return g.status.ok() && g.tokens == c.tokens;
  }));

  // Served by both workers, then taken out of worker 0's directory while requests keep coming:
  // each is served (one that reaches worker 0 after it let go, before the coordinator heard, is
  // tried on worker 1; the window is short, so this does not always reach that path).
  move_in(root + "/1/man.delta.safetensors", root + "/1/team-y.delta.safetensors");
  move_in(root + "/1/man.delta.safetensors", root + "/0/team-y.delta.safetensors");
  ASSERT_TRUE(await([&] {
    const v1::ClusterStatus s = Status(cluster_->admin());
    int serving = 0;
    for (const auto& w : s.workers()) {
      for (const std::string& ft : w.info().fine_tune_ids()) serving += ft == "team-y";
    }
    return serving == 2;
  }));
  std::filesystem::remove(root + "/0/team-y.delta.safetensors");
  for (const absl::Time end = absl::Now() + absl::Seconds(1.5); absl::Now() < end;) {
    Generated y = Generate(cluster_->serving(), Greedy(prompt, "team-y"));
    ASSERT_TRUE(y.status.ok()) << y.status.error_message();
    EXPECT_EQ(y.tokens, man.tokens);
  }
  std::filesystem::remove(root + "/1/team-y.delta.safetensors");
  ASSERT_TRUE(await([&] { return !listed("team-y"); }));

  // Taken out: no longer listed, and NOT_FOUND naming the field.
  std::filesystem::remove(added);
  ASSERT_TRUE(await([&] { return !listed("team-x"); }));
  Generated gone = Generate(cluster_->serving(), Greedy(prompt, "team-x"));
  EXPECT_EQ(gone.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(gone.status.error_message().find("fine_tune_id"), std::string::npos)
      << gone.status.error_message();
  EXPECT_EQ(ListedFineTunes(), (std::vector<std::string>{"c-headers", "lora-c", "man"}));
}

}  // namespace
}  // namespace strata
