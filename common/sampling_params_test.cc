#include "common/sampling_params.h"

#include <functional>
#include <string>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(SamplingParamsTest, DefaultsOfAnEmptyMessage) {
  absl::StatusOr<ResolvedSampling> r = ResolveSamplingParams(v1::SamplingParams(), 100);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->max_tokens, 16);
  EXPECT_EQ(r->temperature, 1.0f);
  EXPECT_EQ(r->top_p, 1.0f);
  EXPECT_EQ(r->repetition_penalty, 1.0f);
  EXPECT_FALSE(r->seed.has_value());
  EXPECT_EQ(r->logprobs, -1);
  EXPECT_EQ(r->prompt_logprobs, -1);
}

TEST(SamplingParamsTest, ExplicitValuesPassThrough) {
  v1::SamplingParams p;
  p.set_max_tokens(40);
  p.set_min_tokens(3);
  p.set_temperature(0);
  p.set_top_k(5);
  p.set_seed(7);
  p.add_stop("\n\n");
  p.add_stop_token_ids(99);
  p.set_logprobs(0);
  p.set_prompt_logprobs(20);
  absl::StatusOr<ResolvedSampling> r = ResolveSamplingParams(p, 100);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->max_tokens, 40);
  EXPECT_EQ(r->min_tokens, 3);
  EXPECT_EQ(r->temperature, 0.0f);
  EXPECT_EQ(r->top_k, 5);
  EXPECT_EQ(*r->seed, 7u);
  EXPECT_EQ(r->stop.size(), 1u);
  EXPECT_EQ(r->stop_token_ids[0], 99);
  EXPECT_EQ(r->logprobs, 0);
  EXPECT_EQ(r->prompt_logprobs, 20);
}

struct BadCase {
  std::function<void(v1::SamplingParams*)> set;
  std::string field;
};

TEST(SamplingParamsTest, EveryLimitIsEnforcedAndNamed) {
  const BadCase cases[] = {
      {[](auto* p) { p->set_max_tokens(65537); }, "sampling.max_tokens"},
      {[](auto* p) { p->set_min_tokens(17); }, "sampling.min_tokens"},
      {[](auto* p) { p->set_temperature(-0.5f); }, "sampling.temperature"},
      {[](auto* p) { p->set_temperature(101); }, "sampling.temperature"},
      {[](auto* p) { p->set_top_k(101); }, "sampling.top_k"},
      {[](auto* p) { p->set_top_p(0); }, "sampling.top_p"},
      {[](auto* p) { p->set_top_p(1.5f); }, "sampling.top_p"},
      {[](auto* p) { p->set_min_p(2); }, "sampling.min_p"},
      {[](auto* p) { p->set_repetition_penalty(0); }, "sampling.repetition_penalty"},
      {[](auto* p) { p->set_presence_penalty(3); }, "sampling.presence_penalty"},
      {[](auto* p) { p->set_frequency_penalty(-3); }, "sampling.frequency_penalty"},
      {[](auto* p) { p->add_stop(""); }, "sampling.stop[0]"},
      {[](auto* p) {
         p->add_stop("ok");
         p->add_stop(std::string(257, 'x'));
       },
       "sampling.stop[1]"},
      {[](auto* p) {
         for (int i = 0; i < 17; ++i) p->add_stop("s");
       },
       "sampling.stop"},
      {[](auto* p) { p->add_stop_token_ids(100); }, "sampling.stop_token_ids[0]"},
      {[](auto* p) {
         for (int i = 0; i < 65; ++i) p->add_stop_token_ids(1);
       },
       "sampling.stop_token_ids"},
      {[](auto* p) { p->set_logprobs(21); }, "sampling.logprobs"},
      {[](auto* p) { p->set_prompt_logprobs(21); }, "sampling.prompt_logprobs"},
      {[](auto* p) {
         auto* b = p->add_logit_bias();
         b->set_token_id(100);
         b->set_bias(1);
       },
       "sampling.logit_bias[0] token 100 is outside the vocabulary"},
      {[](auto* p) {
         auto* b = p->add_logit_bias();
         b->set_token_id(3);
         b->set_bias(-101);
       },
       "sampling.logit_bias[0] bias must be in [-100, 100]"},
      {[](auto* p) {
         for (int i = 0; i < 2; ++i) {
           auto* b = p->add_logit_bias();
           b->set_token_id(3);
           b->set_bias(1);
         }
       },
       "sampling.logit_bias[1] repeats token 3"},
      // The count is checked before the entries (these also repeat tokens).
      {[](auto* p) {
         for (int i = 0; i < 301; ++i) p->add_logit_bias()->set_token_id(i % 100);
       },
       "sampling.logit_bias holds more than 300 tokens"},
  };
  for (const BadCase& c : cases) {
    v1::SamplingParams p;
    c.set(&p);
    absl::StatusOr<ResolvedSampling> r = ResolveSamplingParams(p, 100);
    ASSERT_FALSE(r.ok()) << c.field;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(r.status().message().substr(0, c.field.size()), c.field) << r.status();
  }
}

}  // namespace
}  // namespace strata
