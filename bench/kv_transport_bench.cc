// kv_transport_bench: how fast KV block payloads move between two workers' transports over
// loopback, without the engines: gRPC as Worker.FetchKvBlocks moves them (KvBlockData messages
// written through QueuedServerWriter, read by a blocking ClientReader) against the KV transfer
// port (KvTransferServer and KvTransferCall, worker/server/kv_transfer.h). On each side a thread
// stands in for the worker's loop: it copies each block's payload out of a buffer (as the engine
// copies it out of its cache) and queues it, keeping at most 16 MiB unsent, as the loop does.
//
//   kv_transport_bench [--block_kib 64,2048] [--total_mib 256] [--reps 5] [--json_out FILE]
//       [--worker_heap=false] [--tls_dir DIR]
//
// With --tls_dir (ca.crt, tls.crt, tls.key, as tools/make_dev_certs.sh writes them) gRPC is also
// measured over mutual TLS ("grpc-tls"), and so is the transfer port ("transfer-tls"), as
// workers given --tls_cert copy KV blocks.
//
// Reports GB/s (10^9 bytes per second) per transport and block size, medians over reps.
#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/grpc_stream.h"
#include "common/init.h"
#include "common/log.h"
#include "common/tls.h"
#include "grpcpp/grpcpp.h"
#include "proto/strata/v1/worker.grpc.pb.h"
#include "worker/server/kv_transfer.h"

ABSL_FLAG(std::vector<std::string>, block_kib, std::vector<std::string>({"64", "2048"}),
          "Payload bytes per block, KiB (64: the bundled model's 16-token block; 2048: "
          "Llama-3-8B's in 16-bit).");
ABSL_FLAG(int64_t, total_mib, 256, "Payload bytes per copy, MiB.");
ABSL_FLAG(int, reps, 5, "Copies per transport and block size.");
ABSL_FLAG(std::string, json_out, "", "Append one JSON line per transport and block size here.");
ABSL_FLAG(bool, worker_heap, true,
          "Set glibc's heap up as strata-worker does (worker_main.cc: buffers up to 64 MiB stay "
          "in the heap, 256 MiB of it kept free); false: glibc's defaults.");
ABSL_FLAG(std::string, tls_dir, "",
          "Also measure gRPC over mutual TLS with DIR/ca.crt, DIR/tls.crt, DIR/tls.key "
          "(tools/make_dev_certs.sh DIR).");

namespace strata {
namespace {

// The block size and count of the copy being asked for, from the request: one hash per block,
// the block's bytes in its layout's head_dim (a stand-in: the bench's own convention).
void Produce(const v1::FetchKvBlocksRequest& r, KvExportSink* sink) {
  const size_t bytes = static_cast<size_t>(r.layout().head_dim());
  const std::string cache(bytes, 'k');
  for (int i = 0; i < r.block_hashes_size(); ++i) {
    Engine::KvBlockCopy copy;
    copy.key.hash = r.block_hashes(i);
    copy.key.cache_namespace = 7;
    copy.payload = cache;  // the copy out of the cache
    // At most 16 MiB unsent (the worker's loop: two 8 MiB slices).
    while (static_cast<size_t>(sink->num_queued()) * bytes >= (size_t{16} << 20) &&
           !sink->cancelled()) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    if (!sink->Write(std::move(copy))) break;
  }
  sink->Finish(absl::OkStatus());
}

class Stream final : public QueuedServerWriter<v1::KvBlockData> {};

// A FetchKvBlocks stream as a sink (as WorkerService wraps it).
class StreamSink final : public KvExportSink {
 public:
  explicit StreamSink(Stream* s) : s_(s) {}
  bool Write(Engine::KvBlockCopy copy) override {
    return s_->Write(ToKvBlockData(std::move(copy)));
  }
  size_t num_queued() override { return s_->num_queued(); }
  bool cancelled() override { return false; }
  void Finish(absl::Status) override { s_->RequestFinish(grpc::Status::OK); }
  void Abort(absl::Status) override { s_->Abort(grpc::Status::CANCELLED); }
  void WakeWhenBelow(size_t, std::function<void()> wake) override { wake(); }

 private:
  Stream* s_;
};

class Service final : public v1::Worker::CallbackService {
 public:
  grpc::ServerWriteReactor<v1::KvBlockData>* FetchKvBlocks(
      grpc::CallbackServerContext*, const v1::FetchKvBlocksRequest* request) override {
    auto* stream = new Stream();
    std::thread([stream, r = *request] {
      StreamSink sink(stream);
      Produce(r, &sink);
    }).detach();
    return stream;
  }
};

v1::FetchKvBlocksRequest Request(int64_t block, int64_t total) {
  v1::FetchKvBlocksRequest r;
  for (int64_t i = 0; i < total / block; ++i) r.add_block_hashes(static_cast<uint64_t>(i));
  r.mutable_layout()->set_head_dim(static_cast<uint32_t>(block));
  r.set_max_bytes(static_cast<uint64_t>(total));
  return r;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Main() {
  if (absl::GetFlag(FLAGS_worker_heap)) {
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
  }
  const int64_t total = absl::GetFlag(FLAGS_total_mib) << 20;
  const int reps = absl::GetFlag(FLAGS_reps);
  Service service;
  // The gRPC servers (plaintext; TLS with --tls_dir), each with a stub that calls it as a worker
  // does.
  std::vector<std::string> transports = {"grpc"};
  std::vector<GrpcCredentials> credentials = {GrpcCredentials()};
  TlsOptions tls;
  std::unique_ptr<TlsContextSource> server_tls, client_tls;  // the transfer port's, with TLS
  if (const std::string dir = absl::GetFlag(FLAGS_tls_dir); !dir.empty()) {
    tls.cert_file = dir + "/tls.crt";
    tls.key_file = dir + "/tls.key";
    tls.ca_file = dir + "/ca.crt";
    tls.server_name = "strata.internal";
    tls.client_auth = TlsClientAuth::kRequire;
    absl::StatusOr<GrpcCredentials> c = GrpcCredentials::Load(tls);
    CHECK(c.ok()) << c.status();
    transports.push_back("grpc-tls");
    credentials.push_back(*c);
    auto s = TlsContextSource::Create(tls, TlsRole::kServer);
    auto cl = TlsContextSource::Create(tls, TlsRole::kClient);
    CHECK(s.ok() && cl.ok());
    server_tls = *std::move(s);
    client_tls = *std::move(cl);
  }
  std::vector<std::unique_ptr<grpc::Server>> servers;
  std::vector<std::unique_ptr<v1::Worker::Stub>> stubs;
  for (const GrpcCredentials& c : credentials) {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", *c.ServerCredentials(), &port);
    builder.SetMaxSendMessageSize(-1);
    builder.RegisterService(&service);
    servers.push_back(builder.BuildAndStart());
    CHECK(servers.back() != nullptr && port != 0);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);  // as KvFetcher's channels
    stubs.push_back(v1::Worker::NewStub(c.NewChannel(absl::StrFormat("127.0.0.1:%d", port), args)));
  }
  // The transfer port, plain and (with --tls_dir) in TLS.
  std::mutex mu;
  std::vector<std::thread> producers;  // guarded by mu
  std::vector<std::unique_ptr<KvTransferServer>> transfers;
  std::vector<std::string> transfer_addresses;
  for (TlsContextSource* server : {static_cast<TlsContextSource*>(nullptr), server_tls.get()}) {
    if (server == nullptr && !transfers.empty()) break;
    KvTransferServerOptions to;
    to.listen_address = "127.0.0.1:0";
    to.tls = server;
    to.on_request = [&](const v1::FetchKvBlocksRequest& r, std::shared_ptr<KvExportSink> sink) {
      std::lock_guard<std::mutex> lock(mu);
      producers.emplace_back([r, sink] { Produce(r, sink.get()); });
    };
    auto transfer = KvTransferServer::Start(std::move(to));
    CHECK(transfer.ok()) << transfer.status();
    transfer_addresses.push_back(absl::StrCat("127.0.0.1:", (*transfer)->port()));
    transfers.push_back(*std::move(transfer));
    transports.push_back(server == nullptr ? "transfer" : "transfer-tls");
  }

  FILE* json = nullptr;
  if (!absl::GetFlag(FLAGS_json_out).empty()) {
    json = std::fopen(absl::GetFlag(FLAGS_json_out).c_str(), "a");
    CHECK(json != nullptr);
  }
  std::printf("%-9s %10s %10s %10s\n", "transport", "block_kib", "GB/s", "min-max");
  for (const std::string& kib : absl::GetFlag(FLAGS_block_kib)) {
    const int64_t block = std::stoll(kib) << 10;
    const v1::FetchKvBlocksRequest request = Request(block, total);
    for (size_t t = 0; t < transports.size(); ++t) {
      const char* transport = transports[t].c_str();
      std::vector<double> gbps;
      for (int rep = 0; rep < reps; ++rep) {
        int64_t bytes = 0;
        const absl::Time start = absl::Now();
        if (t < stubs.size()) {
          grpc::ClientContext context;
          auto reader = stubs[t]->FetchKvBlocks(&context, request);
          v1::KvBlockData data;
          std::vector<std::string> kept;  // held, as KvFetcher holds them until stored
          while (reader->Read(&data)) {
            bytes += static_cast<int64_t>(data.payload().size());
            kept.push_back(std::move(*data.mutable_payload()));
          }
          CHECK(reader->Finish().ok());
        } else {
          KvTransferCall call;
          const size_t which = t - stubs.size();
          if (which == 1) call.UseTls(client_tls.get(), tls.server_name);
          std::vector<Engine::KvBlockCopy> blocks;
          const absl::Status st = call.Run(transfer_addresses[which], "", request,
                                           absl::Now() + absl::Seconds(60), &blocks);
          CHECK(st.ok()) << st;
          for (const auto& b : blocks) bytes += static_cast<int64_t>(b.payload.size());
        }
        const double s = absl::ToDoubleSeconds(absl::Now() - start);
        CHECK_EQ(bytes, request.block_hashes_size() * block);
        gbps.push_back(static_cast<double>(bytes) / s / 1e9);
      }
      const double median = Median(gbps);
      std::printf("%-9s %10s %10.2f %5.2f-%.2f\n", transport, kib.c_str(), median,
                  *std::min_element(gbps.begin(), gbps.end()),
                  *std::max_element(gbps.begin(), gbps.end()));
      if (json != nullptr) {
        std::fprintf(json,
                     "{\"transport\":\"%s\",\"block_kib\":%s,\"total_mib\":%lld,\"reps\":%d,"
                     "\"gbps_median\":%.3f}\n",
                     transport, kib.c_str(), static_cast<long long>(total >> 20), reps, median);
      }
    }
  }
  if (json != nullptr) std::fclose(json);
  for (auto& transfer : transfers) transfer->Stop();
  std::lock_guard<std::mutex> lock(mu);
  for (std::thread& t : producers) t.join();
  for (auto& server : servers) server->Shutdown();
  return 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv, "kv_transport_bench [--block_kib 64,2048] [--total_mib 256]");
  return strata::Main();
}
