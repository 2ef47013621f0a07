// prefix_restore_bench: time to first token of a long prompt whose KV comes from each tier, against
// computing it, end to end through a coordinator (a client of Serving.Generate).
//
//   prefix_restore_bench --target=HOST:PORT --phase=warm|disk|copy [--lengths=1024,4096,16384]
//       [--reps=3] [--filler_tokens=N] [--json_out=FILE]
//
// Prompts are random token ids, the same for a (length, rep) in every phase. Phase "warm", per
// length and rep: the prompt cold (recompute), again (device hit), then after a filler prompt of
// filler_tokens, sent twice, has pushed it out of the device cache (host hit). Phase "disk", after
// the worker restarted on the same disk file: the prompt again (disk hit). Each request generates
// one token; TTFT is measured at the client. The usage each response reports says which tier served
// it. Phase "copy", with two workers behind the coordinator: the prompt cold (recompute, on one of
// them), then with that worker drained (Admin.DrainWorker), so that the other serves it by copying
// the blocks from it (copied, Worker.FetchKvBlocks), then again with both (device); the drained
// worker is resumed after each prompt. With --filler_tokens, before the drain the other worker is
// drained while the filler (twice) pushes the prompt out of the holder's device and host tiers,
// so that the copy comes from the holder's disk tier (copied-disk).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/init.h"
#include "common/log.h"
#include "common/tls.h"
#include "common/tls_flags.h"
#include "grpcpp/grpcpp.h"
#include "proto/strata/v1/admin.grpc.pb.h"
#include "proto/strata/v1/serving.grpc.pb.h"

ABSL_FLAG(std::string, target, "127.0.0.1:50051", "Coordinator.");
ABSL_FLAG(std::string, model, "strata-tiny", "Model name.");
ABSL_FLAG(std::string, phase, "warm",
          "warm (recompute, device, host), disk, or copy (recompute, copied, device).");
ABSL_FLAG(std::string, lengths, "1024,4096,16384", "Prompt lengths in tokens.");
ABSL_FLAG(int, reps, 3, "Prompts per length; medians are reported.");
ABSL_FLAG(int64_t, filler_tokens, 0, "Tokens of the prompt that evicts the device cache.");
ABSL_FLAG(int, vocab_size, 2048, "Token ids are drawn from [3, vocab_size).");
ABSL_FLAG(std::string, json_out, "", "Append one JSON line per measurement here.");

namespace strata {
namespace {

std::vector<int32_t> Prompt(int64_t length, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> id(3, absl::GetFlag(FLAGS_vocab_size) - 1);
  std::vector<int32_t> p(length);
  for (int32_t& t : p) t = id(rng);
  return p;
}

struct Result {
  double ttft_ms = 0;
  v1::Usage usage;
};

Result Send(v1::Serving::Stub* stub, const std::vector<int32_t>& prompt) {
  v1::GenerateRequest req;
  req.set_model(absl::GetFlag(FLAGS_model));
  req.mutable_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
  req.mutable_sampling()->set_max_tokens(1);
  req.mutable_sampling()->set_temperature(0.0f);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(10));
  const auto start = std::chrono::steady_clock::now();
  auto reader = stub->Generate(&ctx, req);
  Result r;
  v1::GenerateResponse chunk;
  bool first = true;
  while (reader->Read(&chunk)) {
    if (first && chunk.token_ids_size() > 0) {
      r.ttft_ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count();
      first = false;
    }
    if (chunk.has_usage()) r.usage = chunk.usage();
  }
  const grpc::Status s = reader->Finish();
  CHECK(s.ok()) << "Generate: " << s.error_message();
  return r;
}

void Report(FILE* json, const char* what, int64_t length, int rep, const Result& r) {
  const v1::CachedTokens& c = r.usage.cached();
  std::printf("%-10s %7lld %4d %10.1f %8u %8u %8u\n", what, static_cast<long long>(length), rep,
              r.ttft_ms, c.num_device_tokens(), c.num_host_tokens(), c.num_disk_tokens());
  std::fflush(stdout);
  if (json != nullptr) {
    std::fprintf(json,
                 "{\"case\":\"%s\",\"prompt_tokens\":%lld,\"rep\":%d,\"ttft_ms\":%.3f,"
                 "\"device_tokens\":%u,\"host_tokens\":%u,\"disk_tokens\":%u}\n",
                 what, static_cast<long long>(length), rep, r.ttft_ms, c.num_device_tokens(),
                 c.num_host_tokens(), c.num_disk_tokens());
    std::fflush(json);
  }
}

// Requests routed to each worker so far, by worker id.
std::map<std::string, uint64_t> Routed(v1::Admin::Stub* admin) {
  grpc::ClientContext ctx;
  v1::ClusterStatus status;
  const grpc::Status s = admin->GetClusterStatus(&ctx, v1::GetClusterStatusRequest(), &status);
  CHECK(s.ok()) << "GetClusterStatus: " << s.error_message();
  std::map<std::string, uint64_t> out;
  for (const auto& w : status.workers()) out[w.info().worker_id()] = w.num_routed_requests();
  return out;
}

void Drain(v1::Admin::Stub* admin, const std::string& worker, bool resume) {
  grpc::ClientContext ctx;
  v1::DrainWorkerRequest req;
  req.set_worker(worker);
  req.set_resume(resume);
  req.set_wait(!resume);
  v1::DrainWorkerResponse resp;
  const grpc::Status s = admin->DrainWorker(&ctx, req, &resp);
  CHECK(s.ok()) << "DrainWorker: " << s.error_message();
}

void Run() {
  // --tls_ca (and --tls_server_name) for a coordinator serving TLS.
  absl::StatusOr<TlsOptions> tls = TlsOptionsFromFlags(TlsClientAuth::kNone);
  absl::StatusOr<GrpcCredentials> credentials =
      tls.ok() ? GrpcCredentials::Load(*tls) : tls.status();
  CHECK(credentials.ok()) << credentials.status();
  auto channel = credentials->NewChannel(absl::GetFlag(FLAGS_target));
  auto stub = v1::Serving::NewStub(channel);
  auto admin = v1::Admin::NewStub(channel);
  FILE* json = absl::GetFlag(FLAGS_json_out).empty()
                   ? nullptr
                   : std::fopen(absl::GetFlag(FLAGS_json_out).c_str(), "a");
  const std::string phase = absl::GetFlag(FLAGS_phase);
  std::printf("%-10s %7s %4s %10s %8s %8s %8s\n", "case", "tokens", "rep", "ttft_ms", "device",
              "host", "disk");
  for (absl::string_view l : absl::StrSplit(absl::GetFlag(FLAGS_lengths), ',')) {
    const int64_t length = std::stoll(std::string(l));
    for (int rep = 0; rep < absl::GetFlag(FLAGS_reps); ++rep) {
      const std::vector<int32_t> prompt = Prompt(length, length * 1000 + rep);
      if (phase == "disk") {
        Report(json, "disk", length, rep, Send(stub.get(), prompt));
        continue;
      }
      if (phase == "copy") {
        const std::map<std::string, uint64_t> before = Routed(admin.get());
        Report(json, "recompute", length, rep, Send(stub.get(), prompt));
        std::string holder;
        for (const auto& [id, n] : Routed(admin.get())) {
          // (A worker the coordinator had not reached yet before counts from 0.)
          const auto it = before.find(id);
          if (n > (it == before.end() ? 0 : it->second)) holder = id;
        }
        CHECK(!holder.empty());
        const int64_t filler = absl::GetFlag(FLAGS_filler_tokens);
        if (filler > 0) {
          std::string other;
          for (const auto& [id, n] : Routed(admin.get())) {
            if (id != holder) other = id;
          }
          CHECK(!other.empty());
          Drain(admin.get(), other, /*resume=*/false);
          for (uint64_t round : {7777777, 8888888}) {
            for (int64_t done = 0, k = 0; done < filler; done += 1024, ++k) {
              Send(stub.get(), Prompt(std::min<int64_t>(1024, filler - done),
                                      round + length * 1000 + rep * 100 + k));
            }
          }
          Drain(admin.get(), other, /*resume=*/true);
        }
        Drain(admin.get(), holder, /*resume=*/false);
        Report(json, filler > 0 ? "copied-disk" : "copied", length, rep, Send(stub.get(), prompt));
        Drain(admin.get(), holder, /*resume=*/true);
        Report(json, "device", length, rep, Send(stub.get(), prompt));
        continue;
      }
      Report(json, "recompute", length, rep, Send(stub.get(), prompt));
      Report(json, "device", length, rep, Send(stub.get(), prompt));
      const int64_t filler = absl::GetFlag(FLAGS_filler_tokens);
      if (filler > 0) {
        // Two fillers: the first leaves the most recently used blocks (the prompt's head, released
        // last) cached; the second pushes those out too.
        // Each filler goes as prompts of at most 1024 tokens (prefill cost grows with length).
        for (uint64_t round : {7777777, 8888888}) {
          for (int64_t done = 0, k = 0; done < filler; done += 1024, ++k) {
            Send(stub.get(), Prompt(std::min<int64_t>(1024, filler - done),
                                    round + length * 1000 + rep * 100 + k));
          }
        }
        Report(json, "host", length, rep, Send(stub.get(), prompt));
      }
    }
  }
  if (json != nullptr) std::fclose(json);
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv, "Prefix restore time per KV tier, through a coordinator");
  strata::Run();
  return 0;
}
