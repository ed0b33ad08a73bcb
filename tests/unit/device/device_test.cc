#include "fleet/device/device.h"

#include <gtest/gtest.h>

#include <algorithm>

namespace fleet::device {
namespace {

TEST(DeviceIdTest, ParsesAndFormats) {
  struct Case {
    const char* text;
    const char* canonical;
  } cases[] = {{"cpu", "cpu"},       {" CPU ", "cpu"},        {"cuda:0", "cuda:0"},
               {"cuda", "cuda:0"},   {"CUDA:12", "cuda:12"},  {"mps", "mps"},
               {"xpu:1", "xpu:1"},   {"directml:0", "directml:0"}};
  for (const auto& c : cases) {
    auto id = DeviceId::Parse(c.text);
    ASSERT_TRUE(id.ok()) << c.text << ": " << id.status();
    EXPECT_EQ(id->ToString(), c.canonical);
  }
}

TEST(DeviceIdTest, RejectsWithReason) {
  struct Case {
    const char* text;
    const char* why;
  } cases[] = {{"", "empty"},
               {"gpu:0", "unknown device type 'gpu'"},
               {"cuda:", "missing index"},
               {"cuda:-1", "non-negative integer"},
               {"cuda:1x", "non-negative integer"},
               {"cpu:0", "takes no index"},
               {"cuda :0", "unknown device type"},
               {"cuda:99999", "too large"}};
  for (const auto& c : cases) {
    auto id = DeviceId::Parse(c.text);
    ASSERT_FALSE(id.ok()) << c.text;
    EXPECT_NE(id.status().message().find(c.why), std::string::npos) << id.status();
  }
}

TEST(DeviceIdTest, SortsNumericallyWithCpuLast) {
  std::vector<DeviceId> ids;
  for (const char* t : {"cpu", "cuda:10", "cuda:2", "mps", "cuda:0"}) ids.push_back(*DeviceId::Parse(t));
  std::sort(ids.begin(), ids.end());
  std::vector<std::string> names;
  for (const auto& id : ids) names.push_back(id.ToString());
  EXPECT_EQ(names, (std::vector<std::string>{"cuda:0", "cuda:2", "cuda:10", "mps", "cpu"}));
}

TEST(DiscoveryTest, CpuIsAlwaysThereAndCudaNeverFailsToStart) {
  std::string why;
  auto all = DiscoverAll(&why);
  ASSERT_FALSE(all.empty());
  EXPECT_TRUE(all.back().id.is_cpu());
  EXPECT_GT(all.back().total_bytes, 0u);
  EXPECT_LT(all.back().capacity_bytes, all.back().total_bytes);
  if (all.size() == 1) {
    // No GPU here (CI): both CPU-only and CUDA builds must say so, not fail.
    EXPECT_NE(why.find("no CUDA devices"), std::string::npos) << why;
  }
}

TEST(DiscoveryTest, DefaultReserve) {
  const DeviceId cpu = DeviceId::Cpu();
  EXPECT_EQ(DefaultReserve(cpu, 100ull << 30), 4ull << 30);
  EXPECT_EQ(DefaultReserve(cpu, 2ull << 30), 512ull << 20);
  EXPECT_EQ(DefaultReserve(cpu, 100), 100u);
  EXPECT_EQ(DefaultReserve(cpu, 24ull << 30), (24ull << 30) / 10);
  // A GPU keeps its fixed context and allocator reserve whatever its size: activations are
  // the plan's business.
  EXPECT_EQ(DefaultReserve(DeviceId::Cuda(0), 24ull << 30), kCudaReserve);
  EXPECT_EQ(DefaultReserve(DeviceId::Cuda(3), 80ull << 30), kCudaReserve);
  EXPECT_EQ(DefaultReserve(DeviceId::Cuda(0), 100), 100u);
}

}  // namespace
}  // namespace fleet::device
