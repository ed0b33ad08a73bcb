#include "fleet/config/options.h"

#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>

namespace fleet::config {
namespace {

// A small table in the same X-macro form the binaries use.
#define TEST_OPTIONS(X)                                                    \
  X(std::string, listen, "tcp://127.0.0.1:0", "Endpoint to bind")          \
  X(fleet::config::Bytes, capacity, {4ull << 30}, "Weight budget")         \
  X(int64_t, threads, 2, "Compute threads")                                \
  X(double, ratio, 0.5, "A ratio")                                         \
  X(bool, verbose_errors, false, "Detailed errors")                        \
  X(fleet::config::Duration, heartbeat_timeout, {std::chrono::seconds(3)}, "Down after") \
  X(std::vector<std::string>, model_root, {}, "Model roots")

struct TestOptions {
  TEST_OPTIONS(FLEET_OPTION_FIELD)
};

void Register(TestOptions* options, OptionSet* set) { TEST_OPTIONS(FLEET_OPTION_ADD) }

EnvLookup FakeEnv(std::map<std::string, std::string> vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

TEST(OptionsTest, DefaultsFromTheTable) {
  TestOptions o;
  EXPECT_EQ(o.listen, "tcp://127.0.0.1:0");
  EXPECT_EQ(o.capacity.value, 4ull << 30);
  EXPECT_EQ(o.heartbeat_timeout.value, std::chrono::seconds(3));
  EXPECT_TRUE(o.model_root.empty());
}

TEST(OptionsTest, FlagsOverrideEnvironmentOverridesDefaults) {
  TestOptions o;
  OptionSet set("test", "a test");
  Register(&o, &set);
  auto r = set.Parse({"--capacity", "2gb", "positional", "--verbose-errors", "--heartbeat-timeout=500ms",
                      "--model-root", "/a", "--model-root=/b,/c"},
                     FakeEnv({{"FLEET_THREADS", "8"}, {"FLEET_CAPACITY", "1gb"},
                              {"FLEET_MODEL_ROOT", "/env"}}));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(o.capacity.value, 2ull << 30);
  EXPECT_EQ(o.threads, 8);
  EXPECT_TRUE(o.verbose_errors);
  EXPECT_EQ(o.heartbeat_timeout.value, std::chrono::milliseconds(500));
  EXPECT_EQ(o.model_root, (std::vector<std::string>{"/a", "/b", "/c"}));
  EXPECT_EQ(r->positional, (std::vector<std::string>{"positional"}));
}

TEST(OptionsTest, ErrorsNameTheFlagOrVariable) {
  struct Case {
    std::vector<std::string> args;
    std::map<std::string, std::string> env;
    const char* expect;
  } cases[] = {
      {{"--capacity", "4tbx"}, {}, "--capacity='4tbx': invalid size '4tbx'"},
      {{"--threads=two"}, {}, "--threads='two': expected an integer"},
      {{"--ratio=nan"}, {}, "--ratio='nan': expected a number"},
      {{"--verbose-errors=maybe"}, {}, "expected true or false"},
      {{"--nope"}, {}, "unknown flag '--nope'"},
      {{"--listen"}, {}, "flag --listen needs a value"},
      {{}, {{"FLEET_CAPACITY", "-1"}}, "FLEET_CAPACITY='-1': invalid size"},
      {{"--heartbeat-timeout=3 weeks"}, {}, "unknown unit 'weeks'"},
      {{"--dump-config=yaml"}, {}, "--dump-config takes env, json or table"},
  };
  for (const auto& c : cases) {
    TestOptions o;
    OptionSet set("test", "a test");
    Register(&o, &set);
    auto r = set.Parse(c.args, FakeEnv(c.env));
    ASSERT_FALSE(r.ok()) << c.expect;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.expect), std::string::npos) << r.status();
  }
}

TEST(OptionsTest, DumpsRoundTripThroughTheEnvironment) {
  TestOptions a;
  OptionSet sa("test", "");
  Register(&a, &sa);
  ASSERT_TRUE(sa.Parse({"--capacity=3gb", "--model-root=/x,/y", "--ratio=0.25",
                        "--heartbeat-timeout=1500ms"}, FakeEnv({})).ok());
  // Feed the env dump back in as an environment: the values must come back unchanged.
  std::map<std::string, std::string> env;
  std::string dump = sa.DumpEnv();
  size_t pos = 0;
  while (pos < dump.size()) {
    size_t nl = dump.find('\n', pos);
    std::string line = dump.substr(pos, nl - pos);
    pos = nl + 1;
    env[line.substr(0, line.find('='))] = line.substr(line.find('=') + 1);
  }
  EXPECT_EQ(env.at("FLEET_CAPACITY"), std::to_string(3ull << 30));
  TestOptions b;
  OptionSet sb("test", "");
  Register(&b, &sb);
  ASSERT_TRUE(sb.Parse({}, FakeEnv(env)).ok());
  EXPECT_EQ(b.capacity, a.capacity);
  EXPECT_EQ(b.model_root, a.model_root);
  EXPECT_EQ(b.ratio, a.ratio);
  EXPECT_EQ(b.heartbeat_timeout, a.heartbeat_timeout);
  auto json = nlohmann::json::parse(sa.DumpJson());
  EXPECT_EQ(json["listen"], "tcp://127.0.0.1:0");
  auto table = nlohmann::json::parse(sa.DescribeJson());
  ASSERT_EQ(table.size(), 7u);
  EXPECT_EQ(table[1]["flag"], "--capacity");
  EXPECT_EQ(table[1]["env"], "FLEET_CAPACITY");
  EXPECT_EQ(table[1]["type"], "bytes");
  EXPECT_EQ(table[1]["default"], std::to_string(4ull << 30));
}

TEST(OptionsTest, HelpAndDumpAreReported) {
  TestOptions o;
  OptionSet set("test", "a test");
  Register(&o, &set);
  auto r = set.Parse({"--help", "--dump-config=json"}, FakeEnv({}));
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->help);
  EXPECT_EQ(r->dump, "json");
  std::string usage = set.Usage();
  EXPECT_NE(usage.find("--heartbeat-timeout <duration>   (env FLEET_HEARTBEAT_TIMEOUT, default '3s')"),
            std::string::npos)
      << usage;
}

TEST(OptionsTest, ShortHelpAndVersionAreReported) {
  TestOptions o;
  OptionSet set("test", "a test");
  Register(&o, &set);
  auto r = set.Parse({"-h"}, FakeEnv({}));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->help);
  EXPECT_FALSE(r->version);
  r = set.Parse({"--version", "pos"}, FakeEnv({}));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->version);
  EXPECT_FALSE(r->help);
  EXPECT_EQ(r->positional, std::vector<std::string>{"pos"});
  EXPECT_EQ(OptionSet::Version(), FLEET_VERSION);
  EXPECT_NE(set.Usage().find("--help, -h"), std::string::npos);
  EXPECT_NE(set.Usage().find("--version"), std::string::npos);
}

TEST(DurationTest, Grammar) {
  EXPECT_EQ(*ParseDuration("3"), std::chrono::seconds(3));
  EXPECT_EQ(*ParseDuration("250ms"), std::chrono::milliseconds(250));
  EXPECT_EQ(*ParseDuration("1.5s"), std::chrono::milliseconds(1500));
  EXPECT_EQ(*ParseDuration("2m"), std::chrono::minutes(2));
  EXPECT_FALSE(ParseDuration("").ok());
  EXPECT_FALSE(ParseDuration("-1s").ok());
  EXPECT_FALSE(ParseDuration("5 fortnights").ok());
}

}  // namespace
}  // namespace fleet::config
