#include "common/utf8.h"

#include <string>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(Utf8Test, SequenceLengthsAndValidity) {
  EXPECT_EQ(ValidUtf8SequenceLength("a"), 1u);
  EXPECT_EQ(ValidUtf8SequenceLength("\xc3\xa9"), 2u);          // é
  EXPECT_EQ(ValidUtf8SequenceLength("\xe4\xb8\xad"), 3u);      // 中
  EXPECT_EQ(ValidUtf8SequenceLength("\xf0\x9f\x98\x80"), 4u);  // 😀
  EXPECT_EQ(ValidUtf8SequenceLength("\xc0\xaf"), 0u);          // overlong
  EXPECT_EQ(ValidUtf8SequenceLength("\xed\xa0\x80"), 0u);      // surrogate
  EXPECT_EQ(ValidUtf8SequenceLength("\xf4\x90\x80\x80"), 0u);  // > U+10FFFF
  EXPECT_EQ(ValidUtf8SequenceLength("\xe4\xb8"), 0u);          // truncated
  EXPECT_TRUE(IsValidUtf8("h\xc3\xa9llo \xe4\xb8\xad"));
  EXPECT_FALSE(IsValidUtf8("abc\xff"));
  char32_t cp;
  EXPECT_EQ(DecodeUtf8("\xf0\x9f\x98\x80", &cp), 4u);
  EXPECT_EQ(cp, 0x1F600u);
  std::string s;
  AppendUtf8(0x1F600, &s);
  AppendUtf8(0xE9, &s);
  EXPECT_EQ(s, "\xf0\x9f\x98\x80\xc3\xa9");
}

TEST(Utf8Test, LossyReplacesMaximalInvalidSubsequences) {
  EXPECT_EQ(Utf8Lossy("ok"), "ok");
  EXPECT_EQ(Utf8Lossy("a\xff"
                      "b"),
            "a\xef\xbf\xbd"
            "b");
  // A truncated 3-byte sequence followed by ASCII is one replacement.
  EXPECT_EQ(Utf8Lossy("\xe4\xb8"
                      "x"),
            "\xef\xbf\xbd"
            "x");
  EXPECT_EQ(Utf8Lossy("\xe4\xb8"), "\xef\xbf\xbd");
}

TEST(Utf8Test, EmittablePrefixHoldsBackOnlyIncompleteTails) {
  EXPECT_EQ(EmittableUtf8Prefix("abc"), 3u);
  EXPECT_EQ(EmittableUtf8Prefix("ab\xe4\xb8"), 2u);  // 中 waits for its last byte
  EXPECT_EQ(EmittableUtf8Prefix("ab\xe4\xb8\xad"), 5u);
  EXPECT_EQ(EmittableUtf8Prefix("\xf0\x9f"), 0u);
  EXPECT_EQ(EmittableUtf8Prefix("\xff"), 1u);  // never valid: emit (as U+FFFD)
  EXPECT_EQ(EmittableUtf8Prefix("\xe4\xb8"
                                "a"),
            3u);  // broken by 'a': emit all
}

}  // namespace
}  // namespace strata
