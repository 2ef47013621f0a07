#include "cli/args.h"

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(ArgsTest, ParsesValuedBooleanAndPositional) {
  auto a = Args::Parse({"ppl", "--model", "m", "--max-tokens=5", "--json", "--stop", "a",
                        "--stop=b", "--prompt-ids", "1, 2,3"},
                       {"json"}, {"model", "max-tokens", "stop", "prompt-ids"});
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(*a->Get("model"), "m");
  EXPECT_EQ(*a->GetInt("max-tokens", 0), 5);
  EXPECT_TRUE(a->Has("json"));
  EXPECT_EQ(a->GetAll("stop"), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(*a->GetIntList("prompt-ids"), (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(a->positional(), (std::vector<std::string>{"ppl"}));
  EXPECT_EQ(*a->GetDouble("top-p", 0.5), 0.5);
}

TEST(ArgsTest, ErrorsNameTheFlag) {
  EXPECT_EQ(Args::Parse({"--nope"}, {}, {}).status().message(), "unknown flag --nope");
  EXPECT_EQ(Args::Parse({"--model"}, {}, {"model"}).status().message(), "--model needs a value");
  auto a =
      Args::Parse({"--max-tokens", "x", "--prompt-ids", "1,z"}, {}, {"max-tokens", "prompt-ids"});
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->GetInt("max-tokens", 0).status().message(),
            "--max-tokens must be an integer, not \"x\"");
  EXPECT_NE(a->GetIntList("prompt-ids").status().message().find("\"z\" is not one"),
            std::string::npos);
}

}  // namespace
}  // namespace strata
