#include "fleet/status/status.h"

#include <gtest/gtest.h>

#include <memory>

namespace fleet {
namespace {

TEST(StatusTest, DefaultIsOkAndCheap) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.message(), "");
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_EQ(sizeof(Status), sizeof(void*));
}

TEST(StatusTest, EveryFactoryCarriesItsCodeAndMessage) {
  struct Case {
    Status s;
    StatusCode code;
    const char* name;
  } cases[] = {
      {InvalidArgumentError("m"), StatusCode::kInvalidArgument, "InvalidArgument"},
      {NotFoundError("m"), StatusCode::kNotFound, "NotFound"},
      {AlreadyExistsError("m"), StatusCode::kAlreadyExists, "AlreadyExists"},
      {OutOfRangeError("m"), StatusCode::kOutOfRange, "OutOfRange"},
      {ResourceExhaustedError("m"), StatusCode::kResourceExhausted, "ResourceExhausted"},
      {FailedPreconditionError("m"), StatusCode::kFailedPrecondition, "FailedPrecondition"},
      {UnavailableError("m"), StatusCode::kUnavailable, "Unavailable"},
      {DeadlineExceededError("m"), StatusCode::kDeadlineExceeded, "DeadlineExceeded"},
      {DataLossError("m"), StatusCode::kDataLoss, "DataLoss"},
      {CancelledError("m"), StatusCode::kCancelled, "Cancelled"},
      {UnimplementedError("m"), StatusCode::kUnimplemented, "Unimplemented"},
      {InternalError("m"), StatusCode::kInternal, "Internal"},
  };
  EXPECT_EQ(std::size(cases) + 1, static_cast<size_t>(kStatusCodeCount));
  for (const auto& c : cases) {
    EXPECT_FALSE(c.s.ok());
    EXPECT_EQ(c.s.code(), c.code);
    EXPECT_EQ(c.s.message(), "m");
    EXPECT_EQ(c.s.ToString(), std::string(c.name) + ": m");
    EXPECT_EQ(StatusCodeName(c.code), c.name);
  }
}

TEST(StatusTest, CodesAreWireStable) {
  // These numbers go on the wire: renumbering breaks every deployed peer.
  EXPECT_EQ(static_cast<int>(StatusCode::kInvalidArgument), 1);
  EXPECT_EQ(static_cast<int>(StatusCode::kResourceExhausted), 5);
  EXPECT_EQ(static_cast<int>(StatusCode::kUnavailable), 7);
  EXPECT_EQ(static_cast<int>(StatusCode::kInternal), 12);
}

TEST(StatusTest, CopyMoveAndContext) {
  Status a = NotFoundError("model 'flux' is not loaded");
  Status b = a;
  EXPECT_EQ(a, b);
  Status c = std::move(b);
  EXPECT_EQ(c, a);
  Status d = c.WithContext("Forward");
  EXPECT_EQ(d.message(), "Forward: model 'flux' is not loaded");
  EXPECT_EQ(d.code(), StatusCode::kNotFound);
  EXPECT_TRUE(Status().WithContext("x").ok());
  Status e;
  e = d;
  EXPECT_EQ(e, d);
  e = Status();
  EXPECT_TRUE(e.ok());
}

StatusOr<int> Half(int x) {
  if (x % 2) return InvalidArgumentError("odd");
  return x / 2;
}

Status Quarter(int x, int* out) {
  FLEET_ASSIGN_OR_RETURN(int h, Half(x));
  FLEET_ASSIGN_OR_RETURN(*out, Half(h));
  return Status();
}

TEST(StatusOrTest, ValueOrError) {
  auto v = Half(8);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 4);
  auto e = Half(3);
  EXPECT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument);
  int q = 0;
  EXPECT_TRUE(Quarter(8, &q).ok());
  EXPECT_EQ(q, 2);
  EXPECT_EQ(Quarter(6, &q).message(), "odd");
}

TEST(StatusOrTest, OkStatusWithoutValueBecomesInternal) {
  StatusOr<int> v{Status()};
  EXPECT_EQ(v.status().code(), StatusCode::kInternal);
}

TEST(StatusOrTest, MoveOnlyValues) {
  StatusOr<std::unique_ptr<int>> v = std::make_unique<int>(7);
  ASSERT_TRUE(v.ok());
  std::unique_ptr<int> p = std::move(v).value();
  EXPECT_EQ(*p, 7);
}

Status ReturnIfError(bool fail) {
  FLEET_RETURN_IF_ERROR(fail ? DataLossError("truncated") : Status());
  return UnavailableError("reached the end");
}

TEST(StatusTest, ReturnIfError) {
  EXPECT_EQ(ReturnIfError(true).code(), StatusCode::kDataLoss);
  EXPECT_EQ(ReturnIfError(false).code(), StatusCode::kUnavailable);
}

TEST(StatusDeathTest, CheckAbortsWithTheCondition) {
  EXPECT_DEATH(FLEET_CHECK(1 + 1 == 3), "check failed: 1 \\+ 1 == 3");
}

}  // namespace
}  // namespace fleet
