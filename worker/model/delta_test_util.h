// Helpers shared by the fine-tune delta tests of both runners (testonly): a scratch path, a base
// loaded with its fingerprint, and a stand-in fine-tune that changes every tensor.
#ifndef STRATA_WORKER_MODEL_DELTA_TEST_UTIL_H_
#define STRATA_WORKER_MODEL_DELTA_TEST_UTIL_H_

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "worker/model/config.h"
#include "worker/model/delta.h"
#include "worker/model/safetensors.h"
#include "worker/model/weights.h"

namespace strata::delta_test {

// The bundled base and its two fine-tunes (models/strata-tiny).
inline constexpr char kBase[] = "models/strata-tiny/base";
inline constexpr char kCHeaders[] = "models/strata-tiny/ft-c-headers";
inline constexpr char kMan[] = "models/strata-tiny/ft-man";

// `name` under the test's scratch directory (TEST_TMPDIR, else /tmp).
inline std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir == nullptr ? "/tmp" : dir) + "/" + name;
}

struct Base {
  std::unique_ptr<ModelWeights> weights;
  std::string fingerprint;
};

inline Base LoadBase(const std::string& dir) {
  Base b;
  absl::StatusOr<ModelConfig> config = LoadModelConfig(dir);
  EXPECT_TRUE(config.ok()) << config.status();
  absl::StatusOr<std::unique_ptr<ModelWeights>> w = LoadModelWeights(dir, *config, 0, 1);
  EXPECT_TRUE(w.ok()) << w.status();
  b.weights = *std::move(w);
  b.fingerprint = BaseFingerprint(*b.weights->files);
  return b;
}

// Writes `dir`'s model with every tensor perturbed (a stand-in fine-tune that changes everything:
// biases, per-head q/k norms and an untied LM head included) to `out`, in F32.
inline void WritePerturbedCopy(const std::string& dir, const std::string& out) {
  std::filesystem::create_directories(out);
  std::filesystem::copy_file(dir + "/config.json", out + "/config.json",
                             std::filesystem::copy_options::overwrite_existing);
  absl::StatusOr<SafetensorsModel> model = SafetensorsModel::Open(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  std::mt19937 rng(17);
  std::normal_distribution<float> noise(0.0f, 0.02f);
  std::vector<std::vector<float>> values;
  std::vector<TensorToWrite> tensors;
  for (const std::string& name : model->Names()) {
    const TensorView* t = model->Find(name);
    std::vector<float> v(t->NumElements());
    for (int64_t i = 0; i < t->NumElements(); ++i) {
      v[i] = ElementAsFloat(t->data.data(), t->dtype, i) + noise(rng);
    }
    values.push_back(std::move(v));
    tensors.push_back(
        {name, DType::kF32, t->shape,
         absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(values.back().data()),
                                   values.back().size() * sizeof(float))});
  }
  ASSERT_TRUE(WriteSafetensors(out + "/model.safetensors", tensors).ok());
}

}  // namespace strata::delta_test

#endif  // STRATA_WORKER_MODEL_DELTA_TEST_UTIL_H_
