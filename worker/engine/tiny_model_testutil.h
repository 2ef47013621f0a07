// The bundled strata-tiny model with its tokenizer, for engine tests that give text prompts.
#ifndef STRATA_WORKER_ENGINE_TINY_MODEL_TESTUTIL_H_
#define STRATA_WORKER_ENGINE_TINY_MODEL_TESTUTIL_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"
#include "gtest/gtest.h"
#include "tokenizer/tokenizer.h"
#include "worker/model/config.h"
#include "worker/model/weights.h"

namespace strata {

inline constexpr char kTinyModelDir[] = "models/strata-tiny/base";

struct TinyModel {
  std::unique_ptr<ModelWeights> weights;
  std::unique_ptr<Tokenizer> tokenizer;
};

// Loads it (a test's data must include //models:strata_tiny); a fatal failure when it cannot
// (ASSERT_NO_FATAL_FAILURE around the call).
inline void LoadTinyModel(TinyModel* m) {
  auto config = LoadModelConfig(kTinyModelDir);
  ASSERT_TRUE(config.ok()) << config.status();
  auto weights = LoadModelWeights(kTinyModelDir, *config, 0, 1);
  ASSERT_TRUE(weights.ok()) << weights.status();
  m->weights = std::move(*weights);
  auto tokenizer = Tokenizer::FromModelDir(kTinyModelDir);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  m->tokenizer = std::move(*tokenizer);
}

// `text` encoded as a prompt (special tokens added); a test failure when it cannot be.
inline std::vector<int32_t> EncodePrompt(const Tokenizer& tokenizer, absl::string_view text) {
  auto ids = tokenizer.Encode(text, /*add_special_tokens=*/true);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *std::move(ids) : std::vector<int32_t>{};
}

}  // namespace strata

#endif  // STRATA_WORKER_ENGINE_TINY_MODEL_TESTUTIL_H_
