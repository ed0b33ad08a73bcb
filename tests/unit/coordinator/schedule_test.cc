#include "fleet/coordinator/schedule.h"

#include <gtest/gtest.h>

namespace fleet::coordinator {
namespace {

std::vector<ScheduleBlock> FluxLike(const std::vector<std::string>& holders) {
  std::vector<ScheduleBlock> blocks;
  for (size_t i = 0; i < holders.size(); ++i) {
    blocks.push_back({"b" + std::to_string(i), holders[i], 680u << 20});
  }
  return blocks;
}

std::string Sites(const Schedule& s) {
  std::string out;
  for (const auto& r : s.ranges) {
    out += std::to_string(r.first) + "-" + std::to_string(r.last) + ":" + r.holder + ":" +
           std::string(SiteName(r.site)) + "@" + r.runs_on + " ";
  }
  return out;
}

TEST(ScheduleTest, RangesAreMaximalRunsOfOneHolder) {
  auto blocks = FluxLike({"cuda:0", "cuda:1", "cuda:1", "cpu", "cpu", "cuda:0"});
  CostInputs costs;
  costs.backing_type = {{"cuda:0", "cpu"}, {"cuda:1", "cpu"}, {"cpu", "cpu"}};  // emulated
  costs.activation_bytes = 28u << 20;
  auto s = BuildSchedule(blocks, "cuda:0", ExecMode::kPipeline, costs, false);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(Sites(*s),
            "0-0:cuda:0:resident@cuda:0 1-2:cuda:1:pipeline@cuda:1 3-4:cpu:pipeline@cpu "
            "5-5:cuda:0:resident@cuda:0 ");
  EXPECT_TRUE(s->bit_identical);
}

TEST(ScheduleTest, PipelineToAnotherDeviceTypeNeedsAllowMixed) {
  auto blocks = FluxLike({"cpu", "cpu", "cuda:0"});
  auto s = BuildSchedule(blocks, "cuda:0", ExecMode::kPipeline, CostInputs{}, false);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("not be bit-identical"), std::string::npos) << s.status();
  auto mixed = BuildSchedule(blocks, "cuda:0", ExecMode::kPipeline, CostInputs{}, true);
  ASSERT_TRUE(mixed.ok());
  EXPECT_FALSE(mixed->bit_identical);
}

TEST(ScheduleTest, AutoStreamsFromAnotherDeviceType) {
  auto blocks = FluxLike({"cpu", "cpu", "cuda:0"});
  auto s = BuildSchedule(blocks, "cuda:0", ExecMode::kAuto, CostInputs{}, false);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(Sites(*s), "0-1:cpu:stream@cuda:0 2-2:cuda:0:resident@cuda:0 ");
  EXPECT_TRUE(s->bit_identical);
  EXPECT_NE(s->explanation[0].find("different device type"), std::string::npos);
}

TEST(ScheduleTest, AutoPrefersActivationsWhenWeightsDwarfThem) {
  // Emulated devices: every backing is cpu, so both choices are bit-identical.
  CostInputs costs;
  costs.backing_type = {{"cuda:0", "cpu"}, {"cuda:1", "cpu"}};
  costs.activation_bytes = 28u << 20;
  auto s = BuildSchedule(FluxLike({"cuda:0", "cuda:1", "cuda:1"}), "cuda:0", ExecMode::kAuto, costs, false);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->ranges[1].site, Site::kPipeline);
  EXPECT_NE(s->ranges[1].reason.find("moving activations is cheaper"), std::string::npos);
  EXPECT_NE(s->ranges[1].reason.find("estimated"), std::string::npos);
}

TEST(ScheduleTest, AutoStreamsWhenTheHolderIsMeasuredSlow) {
  CostInputs costs;
  costs.backing_type = {{"cuda:0", "cpu"}, {"cuda:1", "cpu"}};
  costs.activation_bytes = 1u << 20;
  costs.bandwidth["cuda:1>cuda:0"] = 20e9;
  costs.compute_seconds["cuda:0|b1"] = 0.010;
  costs.compute_seconds["cuda:1|b1"] = 0.500;  // a slow device
  auto s = BuildSchedule(FluxLike({"cuda:0", "cuda:1"}), "cuda:0", ExecMode::kAuto, costs, false);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->ranges[1].site, Site::kStream);
  EXPECT_NE(s->ranges[1].reason.find("(measured)"), std::string::npos) << s->ranges[1].reason;
}

TEST(ScheduleTest, StreamModeStreamsEverything) {
  auto s = BuildSchedule(FluxLike({"cuda:0", "cuda:1", "cpu"}), "cuda:0", ExecMode::kStream, CostInputs{}, false);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(Sites(*s), "0-0:cuda:0:resident@cuda:0 1-1:cuda:1:stream@cuda:0 2-2:cpu:stream@cuda:0 ");
  EXPECT_EQ(s->explanation.size(), 2u);
}

TEST(ScheduleTest, Errors) {
  EXPECT_FALSE(BuildSchedule({{"b0", "", 1}}, "cpu", ExecMode::kAuto, CostInputs{}, false).ok());
  EXPECT_FALSE(ParseExecMode("fast").ok());
  EXPECT_EQ(*ParseExecMode("pipeline"), ExecMode::kPipeline);
}

}  // namespace
}  // namespace fleet::coordinator
