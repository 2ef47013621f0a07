#include "tests/local_cluster.h"

#include <unistd.h>

#include <atomic>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"

namespace strata {
namespace {

std::atomic<int> next_instance{0};

}  // namespace

absl::StatusOr<std::pair<ChildProcess, std::string>> StartServer(const std::string& binary,
                                                                 std::vector<std::string> flags,
                                                                 const std::string& name) {
  const std::string base =
      absl::StrCat(TestOutputDir(), "/", name, "-", getpid(), "-", next_instance.fetch_add(1));
  const std::string port_file = base + ".port";
  unlink(port_file.c_str());
  std::vector<std::string> argv = {binary, "--listen=127.0.0.1:0", "--port_file=" + port_file};
  argv.insert(argv.end(), flags.begin(), flags.end());
  absl::StatusOr<ChildProcess> p = ChildProcess::Start(argv, base + ".log");
  if (!p.ok()) return p.status();
  absl::StatusOr<int> port = WaitForPortFile(port_file, absl::Seconds(60));
  if (!port.ok()) {
    return absl::Status(port.status().code(), absl::StrCat(name, " did not start (log: ", base,
                                                           ".log): ", port.status().message()));
  }
  return std::make_pair(*std::move(p), absl::StrCat("127.0.0.1:", *port));
}

void CopyBundledLoraAdapter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  for (const char* file : {"adapter_config.json", "adapter_model.safetensors"}) {
    std::filesystem::copy_file(absl::StrCat("models/strata-tiny/lora-c-headers/", file),
                               absl::StrCat(dir, "/", file),
                               std::filesystem::copy_options::overwrite_existing);
  }
}

absl::StatusOr<std::unique_ptr<LocalCluster>> LocalCluster::Start(LocalClusterOptions options) {
  std::unique_ptr<LocalCluster> c(new LocalCluster());
  c->options_ = options;
  for (int i = 0; i < options.num_workers; ++i) {
    std::vector<std::string> flags = {absl::StrCat("--model=", kTinyModelDir),
                                      absl::StrCat("--model_name=", kTinyModel),
                                      absl::StrCat("--worker_id=worker-", i), "--threads=1"};
    for (const std::string& f : options.worker_flags) {
      flags.push_back(absl::StrReplaceAll(f, {{"{i}", absl::StrCat(i)}}));
    }
    if (static_cast<size_t>(i) < options.per_worker_flags.size()) {
      for (const std::string& f : options.per_worker_flags[i]) flags.push_back(f);
    }
    auto started = StartServer(kWorkerBinary, flags, absl::StrCat(options.name, "-worker-", i));
    if (!started.ok()) return started.status();
    Worker w;
    w.flags = flags;
    w.process = std::move(started->first);
    w.address = started->second;
    w.stub = v1::Worker::NewStub(options.credentials.NewChannel(w.address));
    c->workers_.push_back(std::move(w));
  }
  if (!options.coordinator) return c;
  absl::StatusOr<std::string> address =
      c->StartExtraCoordinator(options.coordinator_flags, options.name + "-coordinator");
  if (!address.ok()) return address.status();
  c->coordinator_address_ = *address;
  auto channel = options.credentials.NewChannel(*address);
  c->serving_ = v1::Serving::NewStub(channel);
  c->admin_ = v1::Admin::NewStub(channel);
  if (absl::Status s =
          c->WaitForServingWorkers(c->admin_.get(), options.num_workers, absl::Seconds(60));
      !s.ok()) {
    return s;
  }
  return c;
}

absl::Status LocalCluster::RestartWorker(int i) {
  Worker& w = workers_[i];
  w.process.Kill();
  std::vector<std::string> flags = w.flags;
  flags.push_back(absl::StrCat("--listen=", w.address));  // the last --listen wins
  auto started = StartServer(kWorkerBinary, flags,
                             absl::StrCat(options_.name, "-worker-", i, "-restart-", ++w.restarts));
  if (!started.ok()) return started.status();
  w.process = std::move(started->first);
  return absl::OkStatus();
}

std::string LocalCluster::workers_flag() const {
  std::vector<std::string> addrs;
  for (const Worker& w : workers_) addrs.push_back(w.address);
  return absl::StrCat("--workers=", absl::StrJoin(addrs, ","));
}

absl::StatusOr<std::string> LocalCluster::StartExtraCoordinator(
    const std::vector<std::string>& flags, const std::string& name) {
  std::vector<std::string> all = {absl::StrCat("--model=", kTinyModel, "=", kTinyModelDir),
                                  workers_flag(), "--resolve_interval_s=0.5"};
  all.insert(all.end(), flags.begin(), flags.end());
  auto started = StartServer(kCoordinatorBinary, all, name);
  if (!started.ok()) return started.status();
  coordinators_.push_back(std::move(started->first));
  return started->second;
}

absl::Status LocalCluster::WaitForServingWorkers(v1::Admin::Stub* admin, int n,
                                                 absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  int serving = 0;
  while (absl::Now() < give_up) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
    if (!options_.admin_api_key.empty()) {
      ctx.AddMetadata("authorization", absl::StrCat("Bearer ", options_.admin_api_key));
    }
    v1::ClusterStatus status;
    if (admin->GetClusterStatus(&ctx, v1::GetClusterStatusRequest(), &status).ok()) {
      serving = 0;
      for (const auto& w : status.workers()) serving += w.state() == v1::WORKER_STATE_SERVING;
      if (serving >= n) return absl::OkStatus();
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "only ", serving, " of ", n, " workers serving after ", absl::FormatDuration(timeout)));
}

LocalCluster::~LocalCluster() {
  for (ChildProcess& c : coordinators_) c.Stop(absl::Seconds(5));
  // Side by side: each drains on its own (and may wait a moment for peers copying its KV blocks).
  for (Worker& w : workers_) w.process.Terminate();
  for (Worker& w : workers_) w.process.Stop(absl::Seconds(5));
}

}  // namespace strata
