#include "common/status_macros.h"

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

absl::Status Fails() { return absl::NotFoundError("no block"); }
absl::StatusOr<int> Seven() { return 7; }
absl::StatusOr<int> NoInt() { return absl::DataLossError("checksum"); }
absl::StatusOr<std::unique_ptr<int>> Owned() { return std::make_unique<int>(3); }

absl::Status ReturnIfError(bool fail, int* reached) {
  RETURN_IF_ERROR(fail ? Fails() : absl::OkStatus());
  *reached = 1;
  RETURN_IF_ERROR(Seven());  // a StatusOr works too
  *reached = 2;
  return absl::OkStatus();
}

TEST(StatusMacrosTest, ReturnIfErrorReturnsTheErrorAndOnlyTheError) {
  int reached = 0;
  const absl::Status s = ReturnIfError(true, &reached);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s.message(), "no block");
  EXPECT_EQ(reached, 0);
  EXPECT_TRUE(ReturnIfError(false, &reached).ok());
  EXPECT_EQ(reached, 2);
}

absl::StatusOr<int> AddOne(bool fail) {
  ASSIGN_OR_RETURN(int v, fail ? NoInt() : Seven());
  return v + 1;
}

TEST(StatusMacrosTest, AssignOrReturnDeclaresAndAssigns) {
  EXPECT_EQ(*AddOne(false), 8);
  EXPECT_EQ(AddOne(true).status().code(), absl::StatusCode::kDataLoss);
}

absl::Status AssignExisting(int* out) {
  int v = 0;
  ASSIGN_OR_RETURN(v, Seven());
  ASSIGN_OR_RETURN(std::unique_ptr<int> p, Owned());  // move-only values
  *out = v + *p;
  return absl::OkStatus();
}

TEST(StatusMacrosTest, AssignOrReturnAssignsExistingAndMoveOnly) {
  int out = 0;
  ASSERT_TRUE(AssignExisting(&out).ok());
  EXPECT_EQ(out, 10);
}

absl::Status WithPrefix() {
  ASSIGN_OR_RETURN(int v, NoInt(), _.Prepend("reading block 4"));
  (void)v;
  return absl::OkStatus();
}

TEST(StatusMacrosTest, AssignOrReturnErrorExpressionAddsContext) {
  const absl::Status s = WithPrefix();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(s.message(), "reading block 4: checksum");
}

TEST(StatusMacrosTest, WithContextKeepsCodeAndPayloads) {
  absl::Status s = absl::UnavailableError("peer gone");
  s.SetPayload("type.strata/worker", absl::Cord("w1"));
  const absl::Status c = WithContext(s, "submit");
  EXPECT_EQ(c.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(c.message(), "submit: peer gone");
  ASSERT_TRUE(c.GetPayload("type.strata/worker").has_value());
  EXPECT_EQ(*c.GetPayload("type.strata/worker"), "w1");
  EXPECT_TRUE(WithContext(absl::OkStatus(), "x").ok());
}

}  // namespace
}  // namespace strata
