#include "worker/server/kv_fetcher.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/grpc_status.h"
#include "common/log.h"

namespace strata {

KvFetcher::KvFetcher(KvFetcherOptions options) : options_(std::move(options)) {
  for (int i = 0; i < std::max(1, options_.threads); ++i) threads_.emplace_back([this] { Run(); });
}

KvFetcher::~KvFetcher() { Stop(); }

void KvFetcher::Stop() {
  std::deque<Job> left;
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    left.swap(queue_);
    for (auto& [ticket, active] : active_) {
      if (active.context != nullptr) active.context->TryCancel();
      if (active.call != nullptr) active.call->Cancel();
    }
    threads.swap(threads_);
  }
  cv_.notify_all();
  for (std::thread& t : threads) t.join();
  for (Job& job : left) {
    KvFetchResult result;
    result.status = absl::CancelledError("the worker is shutting down");
    std::move(job.done)(std::move(result));
  }
}

uint64_t KvFetcher::Fetch(std::string address, v1::FetchKvBlocksRequest request, Done done,
                          Part part) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stop_) {
      const uint64_t ticket = next_ticket_++;
      const absl::Time now = absl::Now();
      queue_.push_back({ticket, std::move(address), std::move(request), std::move(done),
                        std::move(part), now, now + options_.timeout});
      cv_.notify_one();
      return ticket;
    }
  }
  KvFetchResult result;
  result.status = absl::CancelledError("the worker is shutting down");
  std::move(done)(std::move(result));
  return 0;
}

void KvFetcher::Cancel(uint64_t ticket) {
  Done done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = active_.find(ticket); it != active_.end()) {
      cancelled_.insert(ticket);
      if (it->second.context != nullptr) it->second.context->TryCancel();
      if (it->second.call != nullptr) it->second.call->Cancel();
      return;
    }
    auto it = std::find_if(queue_.begin(), queue_.end(),
                           [ticket](const Job& j) { return j.ticket == ticket; });
    if (it == queue_.end()) return;
    done = std::move(it->done);
    queue_.erase(it);
  }
  KvFetchResult result;
  result.status = absl::CancelledError("the request went away");
  std::move(done)(std::move(result));
}

void KvFetcher::Run() {
  while (true) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;  // Stop finishes what is queued
      job = std::move(queue_.front());
      queue_.pop_front();
      active_[job.ticket] = Active{};
    }
    KvFetchResult result;
    // It waited (nearly) its whole time behind others (a slow source): the request computes
    // instead. A call with only a few milliseconds left would copy next to nothing, so a tenth of
    // the timeout counts as the deadline too.
    if (job.deadline - absl::Now() <= std::max(absl::Milliseconds(5), options_.timeout / 10)) {
      result.status = absl::DeadlineExceededError(absl::StrCat(
          "copying KV blocks from worker ", job.address, ": still queued at the deadline"));
      result.took = absl::Now() - job.queued;
    } else {
      result = Copy(job);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      active_.erase(job.ticket);
      cancelled_.erase(job.ticket);
    }
    std::move(job.done)(std::move(result));
  }
}

std::shared_ptr<v1::Worker::Stub> KvFetcher::StubFor(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = stubs_.begin(); it != stubs_.end(); ++it) {
    if (it->first == address) {
      stubs_.splice(stubs_.begin(), stubs_, it);
      return stubs_.front().second;
    }
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);  // a block of a large model is several MiB
  std::shared_ptr<v1::Worker::Stub> stub =
      v1::Worker::NewStub(options_.credentials.NewChannel(address, args));
  stubs_.emplace_front(address, stub);
  if (stubs_.size() > kMaxChannels) stubs_.pop_back();
  return stub;
}

std::string KvFetcher::TransferAddressFor(uint64_t ticket, const std::string& address,
                                          v1::Worker::Stub& stub, absl::Time deadline) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = transfer_addresses_.find(address);
        it != transfer_addresses_.end() && absl::Now() - it->second.asked < kTransferAddressTtl) {
      return it->second.address;
    }
  }
  const absl::Time asked = absl::Now();
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(std::min(deadline, asked + absl::Milliseconds(500))));
  if (options_.cluster_secret != nullptr) {
    context.AddMetadata(kClusterSecretMetadata, options_.cluster_secret->Sent());
  }
  {
    // Cancel and Stop cut the question short too.
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ || cancelled_.contains(ticket)) return "";
    active_[ticket] = Active{&context, nullptr};
  }
  v1::WorkerInfo info;
  const bool answered = stub.GetInfo(&context, v1::GetInfoRequest(), &info).ok();
  {
    std::lock_guard<std::mutex> lock(mu_);
    active_[ticket] = Active{};
    if (stop_ || cancelled_.contains(ticket)) return "";  // not remembered: it was not answered
  }
  std::string transfer;
  // A source that does not answer is copied from over gRPC until it is asked again.
  if (answered && info.kv_transfer_port() != 0) {
    // The same host as the gRPC address (a "scheme:///" prefix dropped).
    std::string host = address;
    if (const size_t scheme = host.find(":///"); scheme != std::string::npos) {
      host = host.substr(scheme + 4);
    }
    host = host.substr(0, host.rfind(':'));
    transfer = absl::StrCat(host, ":", info.kv_transfer_port());
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (transfer_addresses_.size() >= kMaxChannels) transfer_addresses_.clear();
  transfer_addresses_[address] = {transfer, asked};
  return transfer;
}

void KvFetcher::ForgetTransferAddress(const std::string& address, bool ask_again) {
  std::lock_guard<std::mutex> lock(mu_);
  if (ask_again) {
    transfer_addresses_.erase(address);
  } else {
    transfer_addresses_[address] = {"", absl::Now()};
  }
}

KvFetchResult KvFetcher::Copy(Job& job) {
  v1::FetchKvBlocksRequest& request = job.request;
  KvFetchResult result;
  const uint64_t ticket = job.ticket;
  const std::string& address = job.address;
  const absl::Time deadline = job.deadline;
  std::shared_ptr<v1::Worker::Stub> stub = StubFor(address);
  const std::vector<uint64_t> hashes(request.block_hashes().begin(), request.block_hashes().end());
  request.set_max_bytes(static_cast<uint64_t>(options_.max_bytes_per_call));
  const std::string secret =
      options_.cluster_secret != nullptr ? options_.cluster_secret->Sent() : std::string();
  // Never in plaintext beside calls made over TLS: with TLS, only over the port's TLS.
  std::string transfer =
      options_.use_kv_transfer && (!options_.credentials.tls() || options_.transfer_tls != nullptr)
          ? TransferAddressFor(ticket, address, *stub, deadline)
          : std::string();
  // Each block as it arrives: counted, and handed over in parts when the job takes them.
  int64_t received = 0, bytes = 0, unhanded = 0;
  auto take = [&](Engine::KvBlockCopy copy) {
    ++received;
    bytes += static_cast<int64_t>(copy.payload.size());
    unhanded += static_cast<int64_t>(copy.payload.size());
    result.blocks.push_back(std::move(copy));
    if (job.part != nullptr && unhanded >= options_.part_bytes) {
      job.part(std::move(result.blocks));
      result.blocks.clear();
      unhanded = 0;
    }
  };
  size_t next = 0;
  while (next < hashes.size()) {
    request.clear_block_hashes();
    for (size_t i = next; i < hashes.size(); ++i) request.add_block_hashes(hashes[i]);
    received = 0;
    bytes = 0;
    absl::Status status;
    bool over_tcp = false;
    if (!transfer.empty()) {
      KvTransferCall call;
      if (options_.transfer_tls != nullptr) {
        call.UseTls(options_.transfer_tls, options_.transfer_server_name);
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_ || cancelled_.contains(ticket)) {
          result.status = absl::CancelledError("the copy was cancelled");
          break;
        }
        active_[ticket] = Active{nullptr, &call};
      }
      status = call.Run(transfer, secret, request, deadline, take);
      {
        std::lock_guard<std::mutex> lock(mu_);
        active_[ticket] = Active{};
      }
      over_tcp = true;
      if (!call.connected() && !absl::IsCancelled(status)) {
        // Nothing reached the source: this call and later ones go over gRPC. A port refused
        // outright is gone (the source restarted on another): asked for again on the next copy.
        // One that does not answer (a firewall) or cannot be resolved: not for a while.
        LOG(WARNING) << "KV copies from " << address << ": " << status
                     << "; using FetchKvBlocks instead";
        ForgetTransferAddress(address, /*ask_again=*/call.refused());
        transfer.clear();
        over_tcp = false;
      }
    }
    if (!over_tcp) {
      grpc::ClientContext context;
      context.set_deadline(absl::ToChronoTime(deadline));
      if (options_.cluster_secret != nullptr) {
        context.AddMetadata(kClusterSecretMetadata, secret);
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_ || cancelled_.contains(ticket)) {
          result.status = absl::CancelledError("the copy was cancelled");
          break;
        }
        active_[ticket] = Active{&context, nullptr};
      }
      std::unique_ptr<grpc::ClientReader<v1::KvBlockData>> reader =
          stub->FetchKvBlocks(&context, request);
      v1::KvBlockData data;
      while (reader->Read(&data)) take(FromKvBlockData(data));
      status = FromGrpcStatus(reader->Finish());
      std::lock_guard<std::mutex> lock(mu_);
      active_[ticket] = Active{};
    }
    ++result.calls;
    result.bytes += bytes;
    if (over_tcp) {
      ++result.transfer_calls;
      result.transfer_bytes += bytes;
    }
    if (!status.ok()) {
      result.status = absl::Status(
          status.code(),
          absl::StrCat("copying KV blocks from worker ", address, over_tcp ? " (TCP " : "",
                       over_tcp ? transfer : "", over_tcp ? ")" : "", ": ", status.message()));
      break;
    }
    next += static_cast<size_t>(received);
    // The source sends what it holds up to max_bytes: a call that stopped short of that found no
    // more.
    if (received == 0 || bytes + bytes / received <= options_.max_bytes_per_call) break;
  }
  result.took = absl::Now() - job.queued;  // the request's whole wait
  return result;
}

}  // namespace strata
