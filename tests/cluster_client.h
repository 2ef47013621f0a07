// Client helpers for end-to-end tests: run a Generate call to the end, build a text request, read
// the cluster status.
#ifndef STRATA_TESTS_CLUSTER_CLIENT_H_
#define STRATA_TESTS_CLUSTER_CLIENT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/strata/v1/admin.grpc.pb.h"
#include "proto/strata/v1/serving.grpc.pb.h"
#include "tests/local_cluster.h"

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

inline Generated Generate(v1::Serving::Stub* stub, const v1::GenerateRequest& req,
                          absl::Duration deadline = absl::Seconds(120)) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
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

}  // namespace strata

#endif  // STRATA_TESTS_CLUSTER_CLIENT_H_
