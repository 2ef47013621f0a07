// Fine-tunes from untrusted files: a tenant's PEFT LoRA adapter (adapter_config.json and
// adapter_model.safetensors) or Strata delta file, as a worker loads them from its fine-tune
// directory, over the bundled model; one that loads is then run for a step of two sequences, one
// on the base and one on it.
//
// Input: one option byte (bit 0: a LoRA adapter, else a delta file), two bytes giving the length
// of adapter_config.json, that text, then the safetensors file's bytes. Written to a fresh
// directory for each input.
//
// Checks: a file that does not load is refused with INVALID_ARGUMENT, NOT_FOUND,
// FAILED_PRECONDITION or DATA_LOSS (SafetensorsFile, ReadLoraAdapterInfo, LoadLoraAdapter,
// ReadDeltaFileInfo, LoadDelta); one that loads has the base's layers and runs. A delta file is
// given the fingerprint it claims (the fingerprint check has its own tests), so that inputs reach
// the tensors.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tests/fuzz/fuzz_target.h"
#include "worker/comm/collectives.h"
#include "worker/model/config.h"
#include "worker/model/delta.h"
#include "worker/model/lora.h"
#include "worker/model/model_runner.h"
#include "worker/model/safetensors.h"
#include "worker/model/test_util.h"
#include "worker/model/weights.h"

namespace {

constexpr char kModelDir[] = "models/strata-tiny/base";

struct Base {
  std::unique_ptr<strata::ModelWeights> weights;
  strata::SingleRankCollectives comm;
  std::unique_ptr<strata::ModelRunner> runner;
  std::unique_ptr<strata::KvCacheStorage> cache;
  std::string dir;  // scratch, one input at a time
};

Base& TheBase() {
  static Base* const b = [] {
    auto* base = new Base;
    auto config = strata::LoadModelConfig(kModelDir);
    FUZZ_CHECK(config.ok(), "%s", config.status().ToString().c_str());
    auto weights = strata::LoadModelWeights(kModelDir, *config, 0, 1);
    FUZZ_CHECK(weights.ok(), "%s", weights.status().ToString().c_str());
    base->weights = *std::move(weights);
    base->runner = std::make_unique<strata::ModelRunner>(base->weights.get(), &base->comm, 1);
    base->cache = std::make_unique<strata::KvCacheStorage>(*base->weights, 4, 16);
    const char* tmp = std::getenv("TEST_TMPDIR");
    base->dir =
        std::string(tmp != nullptr ? tmp : "/tmp") + "/fine_tune_fuzz." + std::to_string(getpid());
    return base;
  }();
  return *b;
}

// How many inputs loaded (said at exit, to show how far the inputs reach).
struct Counts {
  int64_t inputs = 0, loaded = 0;
  ~Counts() {
    std::fprintf(stderr, "fine_tune_fuzz: %lld inputs, %lld fine-tunes loaded and run\n",
                 static_cast<long long>(inputs), static_cast<long long>(loaded));
  }
} counts;

bool Refusal(const absl::Status& s) {
  return absl::IsInvalidArgument(s) || absl::IsNotFound(s) || absl::IsFailedPrecondition(s) ||
         absl::IsDataLoss(s);
}

void Write(const std::string& path, absl::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  // (A failed write would read back as a refusal of the file, and hide it.)
  FUZZ_CHECK(!out.fail(), "writing %s failed", path.c_str());
}

// A step of two sequences of three tokens, the first on the base and the second on `delta`.
void RunStep(Base& b, const strata::DeltaWeights* delta) {
  strata::TestBatch t;
  t.block_tables = {0, 1};
  t.num_seqs = 2;
  t.max_blocks_per_seq = 1;
  t.seq_deltas = {nullptr, delta};
  for (int32_t seq = 0; seq < 2; ++seq) {
    for (int32_t p = 0; p < 3; ++p) t.Add(5 + 3 * seq + p, seq, p, 16, /*logits=*/p == 2);
  }
  std::vector<float> logits(2 * static_cast<size_t>(b.weights->config.vocab_size));
  const absl::Status s = b.runner->Forward(t.View(), b.cache->layers(), absl::MakeSpan(logits));
  FUZZ_CHECK(s.ok(), "a loaded fine-tune's step failed: %s", s.ToString().c_str());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  TheBase();
  return 0;
}

STRATA_FUZZ_TARGET(data, size) {
  Base& b = TheBase();
  ++counts.inputs;
  strata::fuzz::FuzzInput in(data, size);
  const bool lora = (in.Byte() & 1) != 0;
  const size_t config_bytes = static_cast<size_t>(in.Byte()) << 8 | in.Byte();
  const absl::string_view config = in.Take(config_bytes);
  const absl::string_view tensors = in.Rest();
  std::filesystem::remove_all(b.dir);
  std::filesystem::create_directories(b.dir);

  absl::StatusOr<std::unique_ptr<strata::DeltaWeights>> loaded;
  if (lora) {
    Write(b.dir + "/adapter_config.json", config);
    Write(b.dir + "/adapter_model.safetensors", tensors);
    for (auto access :
         {strata::SafetensorsFile::Access::kMap, strata::SafetensorsFile::Access::kRead}) {
      auto f = strata::SafetensorsFile::Open(b.dir + "/adapter_model.safetensors", access);
      if (!f.ok()) FUZZ_CHECK(Refusal(f.status()), "%s", f.status().ToString().c_str());
    }
    auto info =
        strata::ReadLoraAdapterInfo(b.dir, b.weights->config, strata::LoraFactorType(*b.weights));
    if (!info.ok()) FUZZ_CHECK(Refusal(info.status()), "%s", info.status().ToString().c_str());
    loaded = strata::LoadLoraAdapter(b.dir, *b.weights);
  } else {
    const std::string path = b.dir + "/ft.delta";
    Write(path, tensors);
    auto info = strata::ReadDeltaFileInfo(path);
    if (!info.ok()) {
      FUZZ_CHECK(Refusal(info.status()), "%s", info.status().ToString().c_str());
      return 0;
    }
    loaded = strata::LoadDelta(path, *b.weights, info->base_fingerprint);
  }
  if (!loaded.ok()) {
    FUZZ_CHECK(Refusal(loaded.status()), "%s", loaded.status().ToString().c_str());
    return 0;
  }
  ++counts.loaded;
  RunStep(b, loaded->get());
  return 0;
}
