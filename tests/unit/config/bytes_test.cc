#include "fleet/config/bytes.h"

#include <gtest/gtest.h>

namespace fleet::config {
namespace {

struct Good {
  const char* text;
  uint64_t bytes;
};

class ParseBytesGood : public ::testing::TestWithParam<Good> {};

TEST_P(ParseBytesGood, Parses) {
  auto r = ParseBytes(GetParam().text);
  ASSERT_TRUE(r.ok()) << GetParam().text << ": " << r.status();
  EXPECT_EQ(*r, GetParam().bytes) << GetParam().text;
}

constexpr uint64_t kKiB = 1ull << 10, kMiB = 1ull << 20, kGiB = 1ull << 30, kTiB = 1ull << 40;

INSTANTIATE_TEST_SUITE_P(
    Grammar, ParseBytesGood,
    ::testing::Values(Good{"0", 0}, Good{"512", 512}, Good{"512b", 512}, Good{"512 B", 512},
                      Good{"1k", kKiB}, Good{"1kb", kKiB}, Good{"1KiB", kKiB},
                      Good{"1.5k", 1536}, Good{"4m", 4 * kMiB}, Good{"4 MB", 4 * kMiB},
                      Good{"4mib", 4 * kMiB}, Good{"4gb", 4 * kGiB}, Good{" 4 GB ", 4 * kGiB},
                      Good{"4gib", 4 * kGiB}, Good{"4G", 4 * kGiB}, Good{"2tb", 2 * kTiB},
                      Good{"2TiB", 2 * kTiB}, Good{"1t", kTiB}, Good{"0.1gb", 107374182},
                      Good{".5g", kGiB / 2}, Good{"7.", 7}, Good{"8388607.99t", 9223372025859659530ull}),
    [](const auto& info) { return "case" + std::to_string(info.index); });

class ParseBytesBad : public ::testing::TestWithParam<std::pair<const char*, const char*>> {};

TEST_P(ParseBytesBad, ExplainsWhy) {
  auto r = ParseBytes(GetParam().first);
  ASSERT_FALSE(r.ok()) << GetParam().first;
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  std::string msg(r.status().message());
  EXPECT_NE(msg.find(std::string("'") + GetParam().first + "'"), std::string::npos) << msg;
  EXPECT_NE(msg.find(GetParam().second), std::string::npos) << msg;
}

INSTANTIATE_TEST_SUITE_P(
    Errors, ParseBytesBad,
    ::testing::Values(std::pair{"", "empty"}, std::pair{"  ", "empty"},
                      std::pair{"-1gb", "negative"}, std::pair{"+1gb", "sign"},
                      std::pair{"abc", "expected a number"}, std::pair{"nan", "expected a number"},
                      std::pair{"inf", "expected a number"}, std::pair{"1e3gb", "unknown unit 'e3gb'"},
                      std::pair{"4xb", "unknown unit 'xb'"}, std::pair{"4gb x", "unknown unit"},
                      std::pair{"4 g b", "unknown unit"}, std::pair{"1.2.3", "unknown unit"},
                      std::pair{"8388608t", "below 8 EiB"},
                      std::pair{"99999999999999999999999999999999", "too many digits"}),
    [](const auto& info) { return "case" + std::to_string(info.index); });

TEST(FormatBytesTest, HumanReadable) {
  EXPECT_EQ(FormatBytes(5), "5 B");
  EXPECT_EQ(FormatBytes(1536), "1.50 KiB");
  EXPECT_EQ(FormatBytes(4ull << 30), "4.00 GiB");
}

TEST(IsPlainNumberTest, Numbers) {
  EXPECT_TRUE(IsPlainNumber("0.5"));
  EXPECT_TRUE(IsPlainNumber(" 12 "));
  EXPECT_FALSE(IsPlainNumber("12gb"));
  EXPECT_FALSE(IsPlainNumber("*"));
  EXPECT_FALSE(IsPlainNumber(""));
}

}  // namespace
}  // namespace fleet::config
