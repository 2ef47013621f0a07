#include "worker/engine/ngram_draft.h"

#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

std::vector<int32_t> Draft(const std::vector<int32_t>& tokens, int min_n, int max_n,
                           int64_t max_draft) {
  std::vector<int32_t> d;
  const int64_t n = NgramDraft(tokens, min_n, max_n, max_draft, &d);
  EXPECT_EQ(n, static_cast<int64_t>(d.size()));
  return d;
}

TEST(NgramDraftTest, ProposesWhatFollowedTheSuffixBefore) {
  // "1 2 3 4 5 ... 1 2 3": the suffix 1 2 3 was followed by 4 5 6.
  const std::vector<int32_t> t = {9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3};
  EXPECT_EQ(Draft(t, 2, 4, 3), (std::vector<int32_t>{4, 5, 6}));
  EXPECT_EQ(Draft(t, 1, 1, 2), (std::vector<int32_t>{4, 5}));
}

TEST(NgramDraftTest, PrefersTheLongestMatchThenTheMostRecent) {
  // "2 3" occurs twice before; only the first occurrence is preceded by 1, like the suffix.
  const std::vector<int32_t> t = {1, 2, 3, 10, 11, 7, 2, 3, 20, 21, 1, 2, 3};
  EXPECT_EQ(Draft(t, 1, 3, 2), (std::vector<int32_t>{10, 11}));
  // Capped at two tokens, both occurrences match as long: the most recent wins.
  EXPECT_EQ(Draft(t, 1, 2, 2), (std::vector<int32_t>{20, 21}));
}

TEST(NgramDraftTest, NothingBelowTheMinimumMatch) {
  const std::vector<int32_t> t = {5, 1, 2, 7, 1, 3, 1};
  // The suffix "1" occurs before, "3 1" does not.
  EXPECT_TRUE(Draft(t, 2, 4, 3).empty());
  EXPECT_EQ(Draft(t, 1, 4, 1), (std::vector<int32_t>{3}));
  EXPECT_TRUE(Draft({}, 1, 2, 3).empty());
  EXPECT_TRUE(Draft({4}, 1, 2, 3).empty());
  EXPECT_TRUE(Draft({4, 4}, 0, 2, 3).empty());  // min_n < 1
  EXPECT_TRUE(Draft({4, 4}, 2, 1, 3).empty());  // max_n < min_n
  EXPECT_TRUE(Draft({4, 4}, 1, 2, 0).empty());
}

TEST(NgramDraftTest, APeriodicTextContinuesThroughTheDraft) {
  // Period 3: the latest earlier "a b c" is followed by just the suffix; the draft repeats it.
  const std::vector<int32_t> t = {7, 1, 2, 3, 1, 2, 3};
  EXPECT_EQ(Draft(t, 2, 3, 7), (std::vector<int32_t>{1, 2, 3, 1, 2, 3, 1}));
  // A run of one token.
  EXPECT_EQ(Draft({8, 8, 8}, 2, 4, 4), (std::vector<int32_t>{8, 8, 8, 8}));
}

TEST(NgramDraftTest, AppendsAfterWhatTheDraftHeld) {
  std::vector<int32_t> d = {42};
  EXPECT_EQ(NgramDraft(std::vector<int32_t>{1, 2, 1, 2}, 2, 2, 3, &d), 3);
  EXPECT_EQ(d, (std::vector<int32_t>{42, 1, 2, 1}));
}

// Against a direct reading of the definition, on random texts over small alphabets (many repeats).
TEST(NgramDraftTest, MatchesABruteForceSearch) {
  std::mt19937 rng(7);
  for (int iter = 0; iter < 3000; ++iter) {
    const int alphabet = 2 + static_cast<int>(rng() % 4);
    std::vector<int32_t> t(rng() % 40);
    for (auto& x : t) x = static_cast<int32_t>(rng() % alphabet);
    const int min_n = 1 + static_cast<int>(rng() % 3);
    const int max_n = min_n + static_cast<int>(rng() % 3);
    const int64_t k = 1 + static_cast<int64_t>(rng() % 6);
    const int64_t len = static_cast<int64_t>(t.size());
    // The longest n in [min_n, max_n] whose suffix occurs ending at some e < len - 1; the largest
    // such e.
    int best_n = 0;
    int64_t best_e = -1;
    for (int n = max_n; n >= min_n && best_e < 0; --n) {
      if (n > len - 1) continue;
      for (int64_t e = len - 2; e >= n - 1; --e) {
        bool eq = true;
        for (int i = 0; i < n && eq; ++i) eq = t[e - i] == t[len - 1 - i];
        if (eq) {
          best_n = n;
          best_e = e;
          break;
        }
      }
    }
    std::vector<int32_t> want;
    if (best_e >= 0) {
      std::vector<int32_t> ext = t;
      for (int64_t i = 0; i < k; ++i) ext.push_back(ext[best_e + 1 + i]);
      want.assign(ext.begin() + len, ext.end());
    }
    ASSERT_EQ(Draft(t, min_n, max_n, k), want) << "iter " << iter << " best_n " << best_n;
  }
}

// The index drafts what NgramDraft drafts, step by step as a sequence grows.
TEST(NgramDraftTest, TheIndexDraftsWhatTheScanDrafts) {
  std::mt19937 rng(9);
  for (int iter = 0; iter < 200; ++iter) {
    const int alphabet = 2 + static_cast<int>(rng() % 6);
    const int min_n = 1 + static_cast<int>(rng() % 3);
    const int max_n = min_n + static_cast<int>(rng() % 3);
    NgramIndex index;
    std::vector<int32_t> t;
    for (int step = 0; step < 80; ++step) {
      // One to three tokens a step, as kept drafts add several.
      for (int k = 1 + static_cast<int>(rng() % 3); k > 0; --k) {
        t.push_back(static_cast<int32_t>(rng() % alphabet));
      }
      std::vector<int32_t> want, got;
      const int64_t n = NgramDraft(t, min_n, max_n, 5, &want);
      ASSERT_EQ(index.Draft(t, min_n, max_n, 5, &got), n) << "iter " << iter << " step " << step;
      ASSERT_EQ(got, want) << "iter " << iter << " step " << step;
    }
  }
}

}  // namespace
}  // namespace strata
