#include "bench/workload.h"

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(WorkloadTest, LengthRanges) {
  EXPECT_EQ(ParseLengthRange("128")->max, 128);
  EXPECT_EQ(ParseLengthRange("64:512")->min, 64);
  EXPECT_FALSE(ParseLengthRange("0").ok());
  EXPECT_FALSE(ParseLengthRange("9:3").ok());
  EXPECT_FALSE(ParseLengthRange("x").ok());
}

TEST(WorkloadTest, PercentilesInterpolate) {
  EXPECT_EQ(Percentile({}, 50), 0);
  EXPECT_EQ(Percentile({3, 1, 2}, 50), 2);
  EXPECT_EQ(Percentile({1, 2, 3, 4}, 50), 2.5);
  EXPECT_EQ(Percentile({1, 2, 3, 4}, 100), 4);
  EXPECT_DOUBLE_EQ(Percentile({0, 10}, 90), 9);
}

TEST(WorkloadTest, PoissonArrivalsAtTheRequestedRate) {
  WorkloadOptions o;
  o.num_requests = 4000;
  o.rate_per_s = 20;
  auto w = MakeWorkload(o);
  ASSERT_TRUE(w.ok());
  const double span_s = absl::ToDoubleSeconds(w->back().start);
  EXPECT_NEAR(4000 / span_s, 20, 1.0);
  for (size_t i = 1; i < w->size(); ++i) EXPECT_GE((*w)[i].start, (*w)[i - 1].start);
}

TEST(WorkloadTest, SharedPrefixAndLengths) {
  WorkloadOptions o;
  o.kind = "shared-prefix";
  o.num_requests = 1000;
  o.shared_prefix_tokens = 100;
  o.shared_fraction = 0.9;
  o.prompt_tokens = {10, 20};
  o.output_tokens = {4, 8};
  auto w = MakeWorkload(o);
  ASSERT_TRUE(w.ok());
  const std::vector<int32_t> prefix((*w)[0].turns[0].prompt.begin(),
                                    (*w)[0].turns[0].prompt.begin() + 100);
  int shared = 0;
  for (const Conversation& c : *w) {
    const Turn& t = c.turns[0];
    EXPECT_GE(t.output_tokens, 4);
    EXPECT_LE(t.output_tokens, 8);
    if (t.prompt.size() >= 110 && std::equal(prefix.begin(), prefix.end(), t.prompt.begin())) {
      ++shared;
      EXPECT_LE(t.prompt.size(), 120u);
    } else {
      EXPECT_GE(t.prompt.size(), 10u);
      EXPECT_LE(t.prompt.size(), 20u);
    }
  }
  EXPECT_NEAR(shared / 1000.0, 0.9, 0.05);
}

TEST(WorkloadTest, MultiTurnResendsTheGrowingHistory) {
  WorkloadOptions o;
  o.kind = "multi-turn";
  o.num_requests = 12;
  o.turns = 3;
  o.prompt_tokens = {50, 50};
  o.turn_tokens = {10, 10};
  auto w = MakeWorkload(o);
  ASSERT_TRUE(w.ok());
  ASSERT_EQ(w->size(), 4u);
  for (const Conversation& c : *w) {
    ASSERT_EQ(c.turns.size(), 3u);
    EXPECT_EQ(c.turns[0].think_time, absl::ZeroDuration());
    for (int k = 1; k < 3; ++k) {
      const auto& prev = c.turns[k - 1].prompt;
      const auto& cur = c.turns[k].prompt;
      EXPECT_EQ(cur.size(), prev.size() + 10);
      EXPECT_TRUE(std::equal(prev.begin(), prev.end(), cur.begin()));
    }
  }
  // Same seed, same workload.
  EXPECT_EQ((*MakeWorkload(o))[2].turns[1].prompt, (*w)[2].turns[1].prompt);
}

TEST(WorkloadTest, ChatHistoryPutsRepliesBetweenTurns) {
  WorkloadOptions o;
  o.kind = "multi-turn";
  o.num_requests = 3;
  o.turns = 3;
  o.prompt_tokens = {5, 5};
  o.turn_tokens = {2, 2};
  auto w = MakeWorkload(o);
  ASSERT_TRUE(w.ok());
  const std::vector<Turn>& t = (*w)[0].turns;
  auto slice = [&](size_t k, size_t from, size_t to) {
    return std::vector<int32_t>(t[k].prompt.begin() + from, t[k].prompt.begin() + to);
  };
  ChatHistory chat(/*with_replies=*/true);
  EXPECT_EQ(chat.Prompt(t[0]), t[0].prompt);
  chat.Reply({900, 901, 902});
  std::vector<int32_t> want = t[0].prompt;
  want.insert(want.end(), {900, 901, 902});
  const std::vector<int32_t> new1 = slice(1, 5, 7);
  want.insert(want.end(), new1.begin(), new1.end());
  EXPECT_EQ(chat.Prompt(t[1]), want);
  chat.Reply({});  // a failed turn: nothing to add
  const std::vector<int32_t> new2 = slice(2, 7, 9);
  want.insert(want.end(), new2.begin(), new2.end());
  EXPECT_EQ(chat.Prompt(t[2]), want);

  ChatHistory plain(/*with_replies=*/false);
  for (const Turn& turn : t) {
    EXPECT_EQ(plain.Prompt(turn), turn.prompt);
    plain.Reply({7, 7});
  }
}

TEST(WorkloadTest, FineTunesFollowZipfWithoutChangingPrompts) {
  WorkloadOptions o;
  o.num_requests = 4000;
  const auto base = MakeWorkload(o);
  o.fine_tunes = 10;
  o.fine_tune_zipf = 1.0;
  o.base_fraction = 0.25;
  const auto w = MakeWorkload(o);
  ASSERT_TRUE(base.ok() && w.ok());
  std::vector<int> counts(10, 0);
  int on_base = 0;
  for (size_t i = 0; i < w->size(); ++i) {
    EXPECT_EQ((*w)[i].turns[0].prompt, (*base)[i].turns[0].prompt);
    EXPECT_EQ((*base)[i].fine_tune, -1);
    const int t = (*w)[i].fine_tune;
    ASSERT_GE(t, -1);
    ASSERT_LT(t, 10);
    (t < 0 ? on_base : counts[t]) += 1;
  }
  EXPECT_NEAR(on_base / 4000.0, 0.25, 0.03);
  // Zipf(1) over 10: the first has weight 1 / H(10) = 0.341 of the fine-tuned share, the second
  // half of that.
  EXPECT_NEAR(counts[0] / 3000.0, 0.341, 0.03);
  EXPECT_NEAR(static_cast<double>(counts[1]) / counts[0], 0.5, 0.1);
  o.fine_tunes = -1;
  EXPECT_FALSE(MakeWorkload(o).ok());
}

}  // namespace
}  // namespace strata
