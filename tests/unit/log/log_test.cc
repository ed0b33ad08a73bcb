#include "fleet/log/log.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <stdlib.h>

#include <string>
#include <vector>

namespace fleet::log {
namespace {

class LogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SetSink([this](const Record& r) {
      lines_.push_back(std::string(r.subsystem) + "|" + std::string(r.function) + "|" +
                       std::string(r.message));
    });
    SetMinLevel(Level::kInfo);
    SetVerbosity("*", 0);
  }
  void TearDown() override {
    SetSink(nullptr);
    unsetenv("FLEET_LOG_LEVEL");
    unsetenv("FLEET_VERBOSE");
  }
  std::vector<std::string> lines_;
};

TEST_F(LogTest, LevelsFilter) {
  FLEET_LOG(DEBUG, "worker") << "hidden";
  FLEET_LOG(INFO, "worker") << "loaded " << 3 << " blocks";
  FLEET_LOG(ERROR, "worker") << "failed";
  ASSERT_EQ(lines_.size(), 2u);
  EXPECT_EQ(lines_[0], "worker|TestBody|loaded 3 blocks");
  SetMinLevel(Level::kError);
  FLEET_LOG(WARNING, "worker") << "hidden too";
  EXPECT_EQ(lines_.size(), 2u);
}

TEST_F(LogTest, ArgumentsAreNotEvaluatedWhenOff) {
  int calls = 0;
  auto expensive = [&] { return ++calls; };
  FLEET_LOG(DEBUG, "x") << expensive();
  FLEET_VLOG(3, "x") << expensive();
  EXPECT_EQ(calls, 0);
}

TEST_F(LogTest, PerSubsystemVerbosityFromEnvironment) {
  setenv("FLEET_VERBOSE", "transport=2, worker=1,bogus=x,*=0", 1);
  setenv("FLEET_LOG_LEVEL", "warning", 1);
  ConfigureFromEnv();
  EXPECT_EQ(Verbosity("transport"), 2);
  EXPECT_EQ(Verbosity("worker"), 1);
  EXPECT_EQ(Verbosity("coordinator"), 0);
  EXPECT_EQ(MinLevel(), Level::kWarning);
  FLEET_VLOG(2, "transport") << "frame";
  FLEET_VLOG(2, "worker") << "hidden";
  ASSERT_EQ(lines_.size(), 1u);
  EXPECT_EQ(lines_[0], "transport|TestBody|frame");
}

TEST_F(LogTest, MalformedLevelIsIgnored) {
  setenv("FLEET_LOG_LEVEL", "loud", 1);
  ConfigureFromEnv();
  EXPECT_EQ(MinLevel(), Level::kInfo);
}

TEST(LogFormatTest, LineCarriesLevelTagSubsystemAndFunction) {
  SetProcessTag("worker[cuda:1]");
  std::string line = FormatRecord(Record{Level::kWarning, "worker", "LoadBlock", "over capacity"});
  SetProcessTag("");
  EXPECT_EQ(line[0], 'W');
  EXPECT_NE(line.find(" worker[cuda:1] worker LoadBlock] over capacity"), std::string::npos) << line;
}

TEST(LogFormatTest, JsonLineIsOneObjectWithEveryField) {
  SetProcessTag("worker[cuda:1]");
  ASSERT_TRUE(SetFormatByName(" JSON "));
  std::string line = FormatRecord(
      Record{Level::kError, "worker", "LoadBlock", "bad \"name\"\\path\nline2\x01 caf\xc3\xa9"});
  SetFormat(Format::kText);
  SetProcessTag("");
  EXPECT_EQ(line.find('\n'), std::string::npos) << line;
  auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j["level"], "error");
  EXPECT_EQ(j["process"], "worker[cuda:1]");
  EXPECT_EQ(j["subsystem"], "worker");
  EXPECT_EQ(j["function"], "LoadBlock");
  EXPECT_EQ(j["message"], "bad \"name\"\\path\nline2\x01 caf\xc3\xa9");
  const std::string time = j["time"];
  ASSERT_EQ(time.size(), 27u) << time;  // 2026-12-02T22:01:03.123456Z
  EXPECT_EQ(time[10], 'T');
  EXPECT_EQ(time.back(), 'Z');
}

TEST(LogFormatTest, UnknownFormatNameChangesNothing) {
  SetFormat(Format::kText);
  EXPECT_FALSE(SetFormatByName("yaml"));
  EXPECT_EQ(GetFormat(), Format::kText);
}

TEST(LogParseTest, Levels) {
  Level l;
  EXPECT_TRUE(ParseLevel(" DEBUG ", &l));
  EXPECT_EQ(l, Level::kDebug);
  EXPECT_TRUE(ParseLevel("warn", &l));
  EXPECT_EQ(l, Level::kWarning);
  EXPECT_FALSE(ParseLevel("verbose", &l));
}

}  // namespace
}  // namespace fleet::log
