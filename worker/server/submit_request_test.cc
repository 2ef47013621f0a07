#include "worker/server/submit_request.h"

#include <functional>
#include <string>

#include "gtest/gtest.h"

namespace strata {
namespace {

SubmitLimits Limits() {
  SubmitLimits l;
  l.model_name = "tiny";
  l.vocab_size = 100;
  l.max_context_tokens = 8;
  return l;
}

v1::SubmitRequest Valid() {
  v1::SubmitRequest r;
  r.set_request_id("r1");
  r.set_model("tiny");
  r.add_prompt_token_ids(1);
  r.add_prompt_token_ids(2);
  r.mutable_sampling()->set_max_tokens(4);
  r.mutable_sampling()->set_seed(9);
  r.set_cache_salt("tenant-a");
  r.set_priority(-7);
  return r;
}

TEST(SubmitRequestTest, ParsesAValidRequest) {
  v1::SubmitRequest req = Valid();
  req.add_resume_token_ids(5);
  absl::StatusOr<ParsedSubmit> p = ParseSubmitRequest(req, Limits());
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->request_id, "r1");
  EXPECT_EQ(p->prompt, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(p->options.resume_tokens, (std::vector<int32_t>{5}));
  EXPECT_EQ(p->options.max_tokens, 4);
  EXPECT_EQ(p->options.grammar, nullptr);
  // A structured output comes compiled, from the cache when one is given.
  GrammarCache cache(4);
  SubmitLimits limits = Limits();
  limits.grammars = &cache;
  req.mutable_sampling()->mutable_structured_output()->set_regex("[a-z]+");
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<ParsedSubmit> q = ParseSubmitRequest(req, limits);
    ASSERT_TRUE(q.ok()) << q.status();
    ASSERT_NE(q->options.grammar, nullptr);
    EXPECT_TRUE(GrammarAccepts(q->options.grammar, "abc"));
  }
  EXPECT_EQ(cache.hits(), 1);
  EXPECT_EQ(p->options.sampling.seed, 9u);
  EXPECT_EQ(p->options.cache_salt, "tenant-a");
  EXPECT_EQ(p->options.priority, -7);
  // No tenant: the one tenant of every request without, at weight 1.
  EXPECT_EQ(p->options.tenant, "");
  EXPECT_EQ(p->options.tenant_weight, 1);
  req.set_tenant("acme");
  req.set_tenant_weight(2.5);
  p = ParseSubmitRequest(req, limits);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->options.tenant, "acme");
  EXPECT_EQ(p->options.tenant_weight, 2.5);
}

struct BadCase {
  std::function<void(v1::SubmitRequest*)> set;
  absl::StatusCode code;
  std::string field;
};

TEST(SubmitRequestTest, RejectsWithTheFieldNamed) {
  const BadCase cases[] = {
      {[](auto* r) { r->clear_request_id(); }, absl::StatusCode::kInvalidArgument, "request_id"},
      {[](auto* r) { r->set_request_id(std::string(129, 'a')); },
       absl::StatusCode::kInvalidArgument, "request_id"},
      {[](auto* r) { r->set_model("other"); }, absl::StatusCode::kNotFound, "model"},
      {[](auto* r) { r->set_fine_tune_id("ft"); }, absl::StatusCode::kNotFound, "fine_tune_id"},
      {[](auto* r) { r->set_cache_salt(std::string(257, 's')); },
       absl::StatusCode::kInvalidArgument, "cache_salt"},
      {[](auto* r) { r->set_priority(101); }, absl::StatusCode::kInvalidArgument, "priority"},
      {[](auto* r) { r->set_tenant(std::string(129, 't')); }, absl::StatusCode::kInvalidArgument,
       "tenant"},
      {[](auto* r) { r->set_tenant_weight(-1); }, absl::StatusCode::kInvalidArgument,
       "tenant_weight"},
      {[](auto* r) { r->set_tenant_weight(1001); }, absl::StatusCode::kInvalidArgument,
       "tenant_weight"},
      {[](auto* r) { r->clear_prompt_token_ids(); }, absl::StatusCode::kInvalidArgument,
       "prompt_token_ids"},
      {[](auto* r) {
         for (int i = 0; i < 6; ++i) r->add_prompt_token_ids(3);
       },
       absl::StatusCode::kInvalidArgument, "prompt_token_ids"},
      {[](auto* r) { r->set_prompt_token_ids(1, 100); }, absl::StatusCode::kInvalidArgument,
       "prompt_token_ids[1]"},
      {[](auto* r) { r->add_resume_token_ids(-1); }, absl::StatusCode::kInvalidArgument,
       "resume_token_ids[0]"},
      {[](auto* r) {
         for (int i = 0; i < 4; ++i) r->add_resume_token_ids(3);
       },
       absl::StatusCode::kInvalidArgument, "resume_token_ids"},
      {[](auto* r) { r->mutable_sampling()->set_top_p(2); }, absl::StatusCode::kInvalidArgument,
       "sampling.top_p"},
      {[](auto* r) { r->mutable_sampling()->add_stop("x"); }, absl::StatusCode::kInvalidArgument,
       "sampling.stop"},
      {[](auto* r) {
         r->mutable_sampling()->mutable_structured_output()->set_json_schema(
             R"({"type": "array", "uniqueItems": true})");
       },
       absl::StatusCode::kInvalidArgument, "sampling.structured_output.json_schema"},
      {[](auto* r) { r->mutable_sampling()->mutable_structured_output()->set_regex("[a-"); },
       absl::StatusCode::kInvalidArgument, "sampling.structured_output.regex"},
  };
  for (const BadCase& c : cases) {
    v1::SubmitRequest req = Valid();
    c.set(&req);
    absl::StatusOr<ParsedSubmit> p = ParseSubmitRequest(req, Limits());
    ASSERT_FALSE(p.ok()) << c.field;
    EXPECT_EQ(p.status().code(), c.code) << p.status();
    EXPECT_EQ(p.status().message().substr(0, c.field.size()), c.field) << p.status();
  }
}

}  // namespace
}  // namespace strata
