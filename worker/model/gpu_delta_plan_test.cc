#include "worker/model/gpu_delta_plan.h"

#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(DeltaResidencyTest, PlacesFirstFitAndEvictsLeastRecentlyUsed) {
  DeltaResidency r(4 * 256);
  // Step 1: a (300 bytes: two 256-byte units) and b (one unit).
  absl::StatusOr<DeltaResidency::Placement> a = r.Place(1, 300, 1);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->offset, 0);
  EXPECT_TRUE(a->upload);
  absl::StatusOr<DeltaResidency::Placement> b = r.Place(2, 256, 1);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->offset, 512);
  EXPECT_EQ(r.used_bytes(), 768);
  // Step 2 uses a again: resident, no upload, same place.
  a = r.Place(1, 300, 2);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->offset, 0);
  EXPECT_FALSE(a->upload);
  // Step 3: c needs two units; only one is free, so b (last used in step 1) goes.
  absl::StatusOr<DeltaResidency::Placement> c = r.Place(3, 400, 3);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->upload);
  EXPECT_EQ(c->offset, 512);
  EXPECT_FALSE(r.resident(2));
  EXPECT_TRUE(r.resident(1));
  EXPECT_EQ(r.evictions(), 1);
  EXPECT_EQ(r.uploads(), 3);
  // Step 4: b comes back; a (step 2) is older than c (step 3) and goes, and b takes the first fit.
  b = r.Place(2, 256, 4);
  ASSERT_TRUE(b.ok());
  EXPECT_TRUE(b->upload);
  EXPECT_EQ(b->offset, 0);
  EXPECT_FALSE(r.resident(1));
  EXPECT_EQ(r.num_resident(), 2);
}

TEST(DeltaResidencyTest, RefusesWhatCannotFit) {
  DeltaResidency r(1024);
  absl::StatusOr<DeltaResidency::Placement> big = r.Place(1, 1025, 1);
  EXPECT_TRUE(absl::IsResourceExhausted(big.status())) << big.status();
  EXPECT_EQ(r.num_resident(), 0);
  // Two deltas of one step that together exceed the region: the second cannot evict the first.
  ASSERT_TRUE(r.Place(2, 600, 5).ok());
  absl::StatusOr<DeltaResidency::Placement> second = r.Place(3, 600, 5);
  EXPECT_TRUE(absl::IsResourceExhausted(second.status())) << second.status();
  EXPECT_TRUE(r.resident(2));
  // In the next step the first may go.
  EXPECT_TRUE(r.Place(3, 600, 6).ok());
  EXPECT_FALSE(r.resident(2));
}

TEST(DeltaResidencyTest, ClearLeavesOneEmptyRegion) {
  // Entry 4, used by step 2, sits at 768: a 1024-byte delta of the same step cannot be placed,
  // however many other entries go, until the region is emptied.
  DeltaResidency r(1024);
  ASSERT_TRUE(r.Place(1, 256, 1).ok());
  ASSERT_TRUE(r.Place(2, 256, 1).ok());
  ASSERT_TRUE(r.Place(3, 256, 1).ok());
  ASSERT_TRUE(r.Place(4, 256, 2).ok());    // evicts nothing: 768..1024 was free
  EXPECT_FALSE(r.Place(5, 1024, 2).ok());  // 4 is this step's
  r.Clear();
  EXPECT_EQ(r.num_resident(), 0);
  EXPECT_EQ(r.used_bytes(), 0);
  absl::StatusOr<DeltaResidency::Placement> p = r.Place(5, 1024, 2);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->offset, 0);
  EXPECT_TRUE(p->upload);
}

TEST(DeltaStepPlanTest, GroupsTokensRunsAndLogitRows) {
  DeltaWeights a, b;
  // Sequences 0 (a, tokens 0-2), 1 (base, 3-4), 2 (b, 5), 3 (a, 6-7); logits of tokens 2, 4, 5, 7.
  const std::vector<int32_t> tokens = {10, 11, 12, 13, 14, 15, 16, 17};
  const std::vector<int32_t> token_seq = {0, 0, 0, 1, 1, 2, 3, 3};
  const std::vector<const DeltaWeights*> seq_deltas = {&a, nullptr, &b, &a};
  const std::vector<int32_t> logit_tokens = {2, 4, 5, 7};
  const DeltaStepPlan plan = PlanDeltaStep(tokens, token_seq, seq_deltas, logit_tokens, 2);
  ASSERT_EQ(plan.segments.size(), 2u);
  const DeltaStepPlan::Segment& sa = plan.segments[0];
  const DeltaStepPlan::Segment& sb = plan.segments[1];
  EXPECT_EQ(sa.delta, &a);
  EXPECT_EQ(sb.delta, &b);
  auto slice = [&](int64_t at, int64_t count) {
    return std::vector<int32_t>(plan.indices.begin() + at, plan.indices.begin() + at + count);
  };
  EXPECT_EQ(slice(sa.rows_at, sa.num_rows), (std::vector<int32_t>{0, 1, 2, 6, 7}));
  EXPECT_EQ(slice(sa.ids_at, sa.num_rows), (std::vector<int32_t>{10, 11, 12, 16, 17}));
  EXPECT_EQ(sa.runs, (std::vector<std::pair<int32_t, int32_t>>{{0, 3}, {6, 8}}));
  EXPECT_EQ(sa.logit_rows, (std::vector<int32_t>{0, 3}));
  // Stored within chunks of 2 logit rows: 0 -> 0, 3 -> 1.
  EXPECT_EQ(slice(sa.logits_at, 2), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(slice(sb.rows_at, sb.num_rows), (std::vector<int32_t>{5}));
  EXPECT_EQ(sb.logit_rows, (std::vector<int32_t>{2}));
  EXPECT_EQ(slice(sb.logits_at, 1), (std::vector<int32_t>{0}));
  // The chunk [2, 4) holds a's logit row 3 and b's 2.
  EXPECT_EQ(DeltaStepPlan::LogitRange(sa, 2, 2), (std::pair<int64_t, int64_t>{1, 1}));
  EXPECT_EQ(DeltaStepPlan::LogitRange(sb, 2, 2), (std::pair<int64_t, int64_t>{0, 1}));
  EXPECT_EQ(DeltaStepPlan::LogitRange(sb, 0, 2), (std::pair<int64_t, int64_t>{0, 0}));

  EXPECT_EQ(plan.token_segment, (std::vector<int32_t>{0, 0, 0, -1, -1, 1, 0, 0}));

  EXPECT_TRUE(PlanDeltaStep(tokens, token_seq, {}, logit_tokens, 2).empty());
  const std::vector<const DeltaWeights*> none(4, nullptr);
  EXPECT_TRUE(PlanDeltaStep(tokens, token_seq, none, logit_tokens, 2).empty());
}

TEST(DeltaWeightsTest, SerialsAreUnique) {
  DeltaWeights a, b;
  EXPECT_NE(a.serial, b.serial);
  EXPECT_NE(a.serial, 0u);
}

}  // namespace
}  // namespace strata
