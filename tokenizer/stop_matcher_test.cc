#include "tokenizer/stop_matcher.h"

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(StopMatcherTest, HoldsBackPossibleStartsAndCutsAtTheMatch) {
  StopMatcher m({"\n\nUser:", "END"});
  EXPECT_EQ(m.Add("Hello"), "Hello");
  EXPECT_EQ(m.Add(" world\n"), " world");  // "\n" may start the first stop string
  EXPECT_EQ(m.Add("\nUs"), "");
  EXPECT_EQ(m.Add("ually"), "\n\nUsually");  // not a match after all
  EXPECT_EQ(m.Add(" the EN"), " the ");
  EXPECT_EQ(m.Add("D of it"), "");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.matched(), "END");
  EXPECT_EQ(m.Add("more"), "");
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopMatcherTest, EarliestMatchWinsAndFlushReturnsTheRest) {
  StopMatcher m({"bc", "abcd"});
  EXPECT_EQ(m.Add("xabcd"), "x");  // "abcd" starts before "bc"
  EXPECT_EQ(m.matched(), "abcd");
  StopMatcher n({"zz"});
  EXPECT_EQ(n.Add("abz"), "ab");
  EXPECT_EQ(n.Flush(), "z");
  EXPECT_FALSE(n.stopped());
  StopMatcher none({});
  EXPECT_EQ(none.Add("anything"), "anything");
}

}  // namespace
}  // namespace strata
