// Client helpers for end-to-end tests: run a Generate call to the end, build a text request, read
// the cluster status.
#ifndef STRATA_TESTS_CLUSTER_CLIENT_H_
#define STRATA_TESTS_CLUSTER_CLIENT_H_

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/strata/v1/admin.grpc.pb.h"
#include "proto/strata/v1/serving.grpc.pb.h"
#include "proto/strata/v1/worker.grpc.pb.h"
#include "tests/local_cluster.h"
#include "tests/process.h"

namespace strata {

struct Generated {
  grpc::Status status;
  std::vector<v1::GenerateResponse> chunks;
  std::vector<int32_t> tokens;
  std::string text;
  bool contiguous = true;  // every chunk's first_token_index continues the previous chunk
};

inline Generated Collect(grpc::ClientReader<v1::GenerateResponse>* reader) {
  Generated g;
  v1::GenerateResponse chunk;
  while (reader->Read(&chunk)) {
    if (chunk.first_token_index() != g.tokens.size()) g.contiguous = false;
    g.tokens.insert(g.tokens.end(), chunk.token_ids().begin(), chunk.token_ids().end());
    g.text += chunk.text();
    g.chunks.push_back(chunk);
  }
  g.status = reader->Finish();
  return g;
}

// The rest of a stream whose first chunk was read already, with that chunk in front.
inline Generated CollectAfter(const v1::GenerateResponse& first,
                              grpc::ClientReader<v1::GenerateResponse>* reader) {
  Generated rest = Collect(reader);
  Generated g;
  g.status = rest.status;
  g.tokens.assign(first.token_ids().begin(), first.token_ids().end());
  g.text = first.text();
  g.chunks.push_back(first);
  g.contiguous = first.first_token_index() == 0;
  for (const auto& chunk : rest.chunks) {
    if (chunk.first_token_index() != g.tokens.size()) g.contiguous = false;
    g.tokens.insert(g.tokens.end(), chunk.token_ids().begin(), chunk.token_ids().end());
    g.text += chunk.text();
    g.chunks.push_back(chunk);
  }
  return g;
}

// Failover checks: every request finished, its chunks contiguous, with exactly the tokens an
// undisturbed run produced.
inline void ExpectExactlyTheUndisturbedTokens(const std::vector<Generated>& results,
                                              const std::vector<std::vector<int32_t>>& expected) {
  ASSERT_EQ(results.size(), expected.size());
  for (size_t i = 0; i < results.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "request " << i);
    ASSERT_TRUE(results[i].status.ok()) << results[i].status.error_message();
    EXPECT_TRUE(results[i].contiguous);
    EXPECT_EQ(results[i].tokens, expected[i]);
  }
}

// Requests streaming at once, each with its first chunk read (so each is running on a worker).
struct OpenStreams {
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>>> readers;
  std::vector<v1::GenerateResponse> first;
  bool ok = true;  // every stream delivered its first chunk

  // Reads every stream to its end, one thread each, joined to its first chunk.
  std::vector<Generated> CollectAll() {
    std::vector<Generated> results(readers.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < readers.size(); ++i) {
      threads.emplace_back([&, i] { results[i] = CollectAfter(first[i], readers[i].get()); });
    }
    for (std::thread& t : threads) t.join();
    return results;
  }
};

inline OpenStreams StartStreams(v1::Serving::Stub* stub,
                                const std::vector<v1::GenerateRequest>& requests) {
  OpenStreams s;
  for (const v1::GenerateRequest& r : requests) {
    s.contexts.push_back(std::make_unique<grpc::ClientContext>());
    s.readers.push_back(stub->Generate(s.contexts.back().get(), r));
  }
  s.first.resize(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) s.ok = s.readers[i]->Read(&s.first[i]) && s.ok;
  return s;
}

inline Generated Generate(v1::Serving::Stub* stub, const v1::GenerateRequest& req,
                          absl::Duration deadline = absl::Seconds(120)) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  auto reader = stub->Generate(&ctx, req);
  return Collect(reader.get());
}

// The same call sent with `metadata` (e.g. {{"authorization", "Bearer sk-..."}}).
inline Generated GenerateWith(v1::Serving::Stub* stub, const v1::GenerateRequest& req,
                              const std::vector<std::pair<std::string, std::string>>& metadata,
                              absl::Duration deadline = absl::Seconds(120)) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  for (const auto& [key, value] : metadata) ctx.AddMetadata(key, value);
  auto reader = stub->Generate(&ctx, req);
  return Collect(reader.get());
}

inline v1::GenerateRequest TextRequest(const std::string& text, int max_tokens, uint64_t seed) {
  v1::GenerateRequest r;
  r.set_model(kTinyModel);
  r.set_text(text);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_seed(seed);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

inline v1::ClusterStatus Status(v1::Admin::Stub* admin) {
  grpc::ClientContext ctx;
  v1::ClusterStatus s;
  EXPECT_TRUE(admin->GetClusterStatus(&ctx, v1::GetClusterStatusRequest(), &s).ok());
  return s;
}

// Admin.DrainWorker; the call must succeed.
inline v1::DrainWorkerResponse Drain(v1::Admin::Stub* admin, const std::string& worker, bool resume,
                                     bool wait) {
  grpc::ClientContext ctx;
  v1::DrainWorkerRequest req;
  req.set_worker(worker);
  req.set_resume(resume);
  req.set_wait(wait);
  v1::DrainWorkerResponse resp;
  const grpc::Status s = admin->DrainWorker(&ctx, req, &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return resp;
}

// A directory holding only the bundled model's config.json (for --random_weights workers).
inline std::string ConfigOnlyModelDir(const std::string& name) {
  const std::string dir = TestOutputDir() + "/" + name;
  const std::string cmd =
      "mkdir -p '" + dir + "' && cp " + std::string(kTinyModelDir) + "/config.json '" + dir + "/'";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  return dir;
}

// Submits prompt 5..9 straight to a worker for `max_tokens` tokens, ignoring EOS; the number of
// tokens that came back, or -1 when the stream failed.
inline int64_t SubmitAndCountTokens(v1::Worker::Stub* worker, int max_tokens) {
  v1::SubmitRequest sub;
  sub.set_request_id("count");
  sub.set_model(kTinyModel);
  for (int32_t t : {5, 6, 7, 8, 9}) sub.add_prompt_token_ids(t);
  sub.mutable_sampling()->set_max_tokens(max_tokens);
  sub.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  auto reader = worker->Submit(&ctx, sub);
  int64_t tokens = 0;
  v1::SubmitResponse chunk;
  while (reader->Read(&chunk)) tokens += chunk.token_ids_size();
  return reader->Finish().ok() ? tokens : -1;
}

// The index (in `cluster`) of the worker the coordinator reports with the most requests in flight;
// -1 when none has any.
inline int BusiestWorker(LocalCluster& cluster) {
  const v1::ClusterStatus st = Status(cluster.admin());
  int best = -1;
  uint32_t most = 0;
  for (const auto& w : st.workers()) {
    for (int i = 0; i < cluster.num_workers(); ++i) {
      if (cluster.worker_address(i) == w.address() && w.num_inflight_requests() > most) {
        most = w.num_inflight_requests();
        best = i;
      }
    }
  }
  return best;
}

}  // namespace strata

#endif  // STRATA_TESTS_CLUSTER_CLIENT_H_
