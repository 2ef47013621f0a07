// The coordinator's WorkerPool against real worker processes: discovery picks up and drops workers
// as the resolved address set changes, a restarted worker is reconnected under its new epoch, and a
// real DNS name (localhost) resolves to workers.
#include "coordinator/worker_pool.h"

#include <signal.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/local_cluster.h"

namespace strata {
namespace {

// Waits until `pred(pool.Status())` holds.
template <typename Pred>
bool WaitFor(WorkerPool& pool, Pred pred, absl::Duration timeout = absl::Seconds(30)) {
  const absl::Time give_up = absl::Now() + timeout;
  while (absl::Now() < give_up) {
    if (pred(pool.Status())) return true;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return false;
}

const v1::WorkerStatus* Find(const std::vector<v1::WorkerStatus>& s, const std::string& address) {
  for (const auto& w : s) {
    if (w.address() == address) return &w;
  }
  return nullptr;
}

// `n` worker processes and no coordinator: the pool under test is the coordinator's part.
absl::StatusOr<std::unique_ptr<LocalCluster>> StartWorkers(int n, const std::string& name) {
  LocalClusterOptions o;
  o.num_workers = n;
  o.coordinator = false;
  o.name = name;
  return LocalCluster::Start(o);
}

// Whether one worker can copy another's KV blocks, judged from the infos real workers report: the
// same model, weights and block layout, and a receiver that copies at all (--kv_fetch).
TEST(WorkerPoolTest, KvCopiesAreCreditedOnlyBetweenWorkersWhoseBlocksFit) {
  LocalClusterOptions o;
  o.num_workers = 2;
  o.coordinator = false;
  o.name = "can-copy";
  o.per_worker_flags = {{}, {"--kv_fetch=false"}};
  auto c = LocalCluster::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<v1::WorkerInfo> info(2);
  for (int i = 0; i < 2; ++i) {
    grpc::ClientContext ctx;
    ASSERT_TRUE((*c)->worker(i)->GetInfo(&ctx, v1::GetInfoRequest(), &info[i]).ok());
  }
  const v1::WorkerInfo& copies = info[0];
  const v1::WorkerInfo& computes = info[1];
  EXPECT_TRUE(copies.kv_fetch());
  EXPECT_FALSE(computes.kv_fetch());
  EXPECT_FALSE(copies.model_fingerprint().empty());
  EXPECT_EQ(copies.model_fingerprint(), computes.model_fingerprint());
  EXPECT_EQ(copies.kv_layout().block_tokens(), copies.block_tokens());
  EXPECT_GT(copies.kv_layout().num_kv_heads(), 0u);
  EXPECT_FALSE(copies.kv_layout().dtype().empty());
  EXPECT_TRUE(CanCopyKvBlocks(computes, copies));
  EXPECT_FALSE(CanCopyKvBlocks(copies, computes));  // it computes what it lacks
  auto changed = [&](auto edit) {
    v1::WorkerInfo other = computes;
    edit(other);
    return CanCopyKvBlocks(other, copies);
  };
  EXPECT_FALSE(changed([](v1::WorkerInfo& w) { w.set_model_fingerprint("other weights"); }));
  EXPECT_FALSE(changed([](v1::WorkerInfo& w) { w.mutable_kv_layout()->set_dtype("f16"); }));
  EXPECT_FALSE(changed([](v1::WorkerInfo& w) { w.mutable_kv_layout()->set_num_kv_heads(1); }));
  EXPECT_FALSE(changed([](v1::WorkerInfo& w) { w.set_tensor_parallel_size(2); }));
  EXPECT_FALSE(changed([](v1::WorkerInfo& w) { w.set_model("other"); }));
  EXPECT_FALSE(changed([](v1::WorkerInfo& w) { w.clear_kv_layout(); }));  // no prefix cache
  EXPECT_TRUE(changed([](v1::WorkerInfo& w) { w.set_role(v1::WORKER_ROLE_PREFILL); }));
}

bool Serving(const std::vector<v1::WorkerStatus>& s, const std::string& address) {
  const v1::WorkerStatus* w = Find(s, address);
  return w != nullptr && w->state() == v1::WORKER_STATE_SERVING;
}

TEST(WorkerPoolTest, WorkersThatComeAndGoArePickedUpAndDropped) {
  auto cluster = StartWorkers(3, "pool");
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const std::string a = (*cluster)->worker_address(0);
  const std::string b = (*cluster)->worker_address(1);
  const std::string c = (*cluster)->worker_address(2);

  absl::Mutex mu;
  std::vector<std::string> resolved = {a, b};
  bool fail = false;
  WorkerPoolOptions po;
  po.resolve_interval = absl::Milliseconds(50);
  po.resolver = [&]() -> absl::StatusOr<std::vector<std::string>> {
    absl::MutexLock lock(&mu);
    if (fail) return absl::UnavailableError("DNS is down");
    return resolved;
  };
  WorkerPool pool(po);
  pool.Start();
  ASSERT_TRUE(WaitFor(pool, [&](const auto& s) { return Serving(s, a) && Serving(s, b); }));
  EXPECT_EQ(pool.Status().size(), 2u);
  EXPECT_TRUE(pool.WaitForWorkers(kTinyModel, 2, absl::Seconds(1)));

  // The name now resolves to b and c: a is dropped, c is picked up.
  {
    absl::MutexLock lock(&mu);
    resolved = {b, c};
  }
  ASSERT_TRUE(WaitFor(pool, [&](const auto& s) {
    return Find(s, a) == nullptr && Serving(s, b) && Serving(s, c);
  }));
  // Routing only reaches current workers.
  for (int i = 0; i < 8; ++i) {
    auto assigned = pool.Assign(kTinyModel, {}, 1, {});
    ASSERT_TRUE(assigned.ok()) << assigned.status();
    EXPECT_NE(assigned->address, a);
    pool.Release(&*assigned);
  }
  // A failed resolution keeps the workers we have.
  {
    absl::MutexLock lock(&mu);
    fail = true;
  }
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_TRUE(Serving(pool.Status(), b) && Serving(pool.Status(), c));
  // And a is welcome back.
  {
    absl::MutexLock lock(&mu);
    fail = false;
    resolved = {a};
  }
  ASSERT_TRUE(WaitFor(pool, [&](const auto& s) { return Serving(s, a) && s.size() == 1; }));
  pool.Stop();
}

// A worker that stops answering (SIGSTOP: its connections stay open) does not hold the pool's
// Stop up for the RPC timeout: the GetInfo calls in flight to it are cancelled.
TEST(WorkerPoolTest, StopDoesNotWaitForAWorkerThatHangs) {
  auto cluster = StartWorkers(1, "pool-hang");
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const std::string a = (*cluster)->worker_address(0);
  WorkerPoolOptions po;
  po.resolve_interval = absl::Milliseconds(20);  // refreshes its info this often
  po.rpc_timeout = absl::Seconds(60);
  po.resolver = [&]() -> absl::StatusOr<std::vector<std::string>> {
    return std::vector<std::string>{a};
  };
  WorkerPool pool(po);
  pool.Start();
  ASSERT_TRUE(WaitFor(pool, [&](const auto& s) { return Serving(s, a); }));
  const pid_t pid = (*cluster)->worker_process(0).pid();
  ASSERT_EQ(kill(pid, SIGSTOP), 0);
  absl::SleepFor(absl::Milliseconds(300));  // a refresh is waiting on it now
  const absl::Time start = absl::Now();
  pool.Stop();
  const absl::Duration took = absl::Now() - start;
  kill(pid, SIGCONT);
  EXPECT_LT(took, absl::Seconds(20)) << "Stop waited for the hung worker";
}

TEST(WorkerPoolTest, ARestartedWorkerIsReconnectedWithItsNewEpoch) {
  auto cluster = StartWorkers(1, "restart");
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const std::string address = (*cluster)->worker_address(0);
  absl::StatusOr<WorkerTargets> targets = ParseWorkerTargets(address);
  ASSERT_TRUE(targets.ok());
  WorkerPoolOptions po;
  po.targets = *targets;
  po.max_reconnect_backoff = absl::Milliseconds(200);
  WorkerPool pool(po);
  pool.Start();
  ASSERT_TRUE(WaitFor(pool, [&](const auto& s) { return Serving(s, address); }));
  const uint64_t epoch = pool.Status()[0].info().worker_epoch();

  (*cluster)->worker_process(0).Kill();
  ASSERT_TRUE(
      WaitFor(pool, [&](const auto& s) { return s[0].state() == v1::WORKER_STATE_UNAVAILABLE; }));
  EXPECT_FALSE(pool.Assign(kTinyModel, {}, 1, {}).ok());

  // The same address comes back as a new process.
  ChildProcess restarted;
  {
    const std::string base = absl::StrCat(TestOutputDir(), "/restarted-worker");
    auto p = ChildProcess::Start({kWorkerBinary, absl::StrCat("--model=", kTinyModelDir),
                                  absl::StrCat("--model_name=", kTinyModel),
                                  absl::StrCat("--listen=", address), "--threads=1"},
                                 base + ".log");
    ASSERT_TRUE(p.ok()) << p.status();
    restarted = *std::move(p);
  }
  ASSERT_TRUE(WaitFor(pool, [&](const auto& s) { return Serving(s, address); }));
  EXPECT_NE(pool.Status()[0].info().worker_epoch(), epoch);
  EXPECT_TRUE(pool.Assign(kTinyModel, {}, 1, {}).ok());
  pool.Stop();
}

TEST(WorkerPoolTest, ADnsNameResolvesToItsWorkers) {
  auto cluster = StartWorkers(1, "dns");
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const std::string address = (*cluster)->worker_address(0);  // 127.0.0.1:PORT
  const std::string port = address.substr(address.rfind(':') + 1);
  absl::StatusOr<WorkerTargets> targets = ParseWorkerTargets(absl::StrCat("dns:localhost:", port));
  ASSERT_TRUE(targets.ok());
  WorkerPoolOptions po;
  po.targets = *targets;
  po.resolve_interval = absl::Milliseconds(100);
  WorkerPool pool(po);
  pool.Start();
  // localhost may also resolve to ::1, where nothing listens: that one stays unavailable.
  ASSERT_TRUE(WaitFor(pool, [&](const auto& s) { return Serving(s, address); }));
  EXPECT_TRUE(pool.WaitForWorkers(kTinyModel, 1, absl::Seconds(1)));
  pool.Stop();
}

}  // namespace
}  // namespace strata
