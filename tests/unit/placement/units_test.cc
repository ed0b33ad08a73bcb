// Device tables, JSON unit lists, pin rules, the built-in examples and the JSON/text output.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "fleet/placement/placement.h"
#include "fleet/placement/units.h"

namespace fleet::placement {
namespace {

constexpr uint64_t kGiB = 1ull << 30;

TEST(DeviceTableTest, ParsesTotalsCapacitiesAndSortsNumerically) {
  auto t = ParseDeviceTable("cpu=64gb, cuda:10=24gb,cuda:2=12gb/10gb");
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ(t->size(), 3u);
  EXPECT_EQ((*t)[0].id.ToString(), "cuda:2");
  EXPECT_EQ((*t)[0].total_bytes, 12 * kGiB);
  EXPECT_EQ((*t)[0].capacity_bytes, 10 * kGiB);
  EXPECT_EQ((*t)[1].id.ToString(), "cuda:10");
  EXPECT_EQ((*t)[1].capacity_bytes, 24 * kGiB - device::kCudaReserve);
  EXPECT_EQ((*t)[2].id.ToString(), "cpu");
}

TEST(DeviceTableTest, RejectsWithEntryAndPosition) {
  struct Case {
    const char* text;
    const char* has;
  } cases[] = {
      {"", "entry 1 '' at character 1: empty"},
      {"cuda:0=24gb,", "entry 2 '' at character 13: empty"},
      {"cuda:0", "no '='"},
      {"gpu:0=24gb", "unknown device type 'gpu'"},
      {"cuda:0=24xb", "total: invalid size '24xb'"},
      {"cuda:0=0", "total must be above 0"},
      {"cuda:0=24gb/30gb", "capacity 30.00 GiB is above the total 24.00 GiB"},
      {"cuda:0=24gb/-1", "capacity: invalid size '-1'"},
      {"cuda:0=24gb,CUDA:0=12gb", "entry 2 'CUDA:0=12gb' at character 13: cuda:0 is listed twice"},
  };
  for (const auto& c : cases) {
    auto t = ParseDeviceTable(c.text);
    ASSERT_FALSE(t.ok()) << c.text;
    EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(t.status().message().find(c.has), std::string::npos) << t.status();
  }
}

TEST(UnitsJsonTest, ParsesIntegersSizeStringsAndPins) {
  auto u = ParseUnitsJson(
      R"([{"name": "stem", "bytes": 1024, "pinned": true},
          {"name": "blocks.0", "bytes": "680mb"}, {"name": "head", "bytes": 0}])",
      "m.json");
  ASSERT_TRUE(u.ok()) << u.status();
  ASSERT_EQ(u->size(), 3u);
  EXPECT_TRUE((*u)[0].pinned);
  EXPECT_EQ((*u)[0].pin_reason, "pinned in m.json");
  EXPECT_EQ((*u)[1].bytes, 680ull << 20);
  EXPECT_FALSE((*u)[1].pinned);
}

TEST(UnitsJsonTest, RejectsWithElementFieldAndOffset) {
  struct Case {
    const char* text;
    const char* has;
  } cases[] = {
      {"[{\"name\": \"a\", \"bytes\": 1},", "m.json: not valid JSON at byte offset"},
      {"{}", "expected a JSON list"},
      {"[]", "the unit list is empty"},
      {"[1]", "element 0: expected an object"},
      {"[{\"bytes\": 1}]", "element 0: 'name' must be a non-empty string"},
      {"[{\"name\": \"a\"}]", "element 0 ('a'): 'bytes' is missing"},
      {"[{\"name\": \"a\", \"bytes\": -5}]", "'bytes' must be a non-negative integer"},
      {"[{\"name\": \"a\", \"bytes\": 1.5}]", "'bytes' must be a non-negative integer"},
      {"[{\"name\": \"a\", \"bytes\": \"4tx\"}]", "element 0 ('a'): 'bytes': invalid size '4tx'"},
      {"[{\"name\": \"a\", \"bytes\": 1, \"pinned\": \"yes\"}]", "'pinned' must be true or false"},
      {"[{\"name\": \"a\", \"bytes\": 1, \"pined\": true}]", "unknown field 'pined'"},
      {"[{\"name\": \"a\", \"bytes\": 1}, {\"name\": \"a\", \"bytes\": 2}]",
       "element 1 ('a'): the name appears twice"},
  };
  for (const auto& c : cases) {
    auto u = ParseUnitsJson(c.text, "m.json");
    ASSERT_FALSE(u.ok()) << c.text;
    EXPECT_NE(u.status().message().find(c.has), std::string::npos) << u.status();
  }
}

TEST(PinRulesTest, FamiliesPinTheirStemsAndHeads) {
  auto units_of = [](std::vector<std::string> names) {
    std::vector<Unit> out;
    for (auto& n : names) {
      Unit u;
      u.name = n;
      u.bytes = 1;
      out.push_back(u);
    }
    return out;
  };
  auto flux = units_of({"img_in", "txt_in", "double_blocks.0", "single_blocks.0", "final_layer"});
  MarkPinnedUnits(families::FindFamily("flux"), &flux);
  EXPECT_TRUE(flux[0].pinned && flux[1].pinned);
  EXPECT_FALSE(flux[2].pinned || flux[3].pinned || flux[4].pinned);
  EXPECT_FALSE(flux[0].upstream_pins);
  EXPECT_NE(flux[0].pin_reason.find("Flux stem"), std::string::npos);

  auto wan = units_of({"patch_embedding", "text_embedding", "time_embedding", "time_projection",
                       "img_emb", "blocks.0", "head"});
  MarkPinnedUnits(families::FindFamily("wan"), &wan);
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(wan[i].pinned) << wan[i].name;
  EXPECT_FALSE(wan[5].pinned || wan[6].pinned);

  auto te = units_of({"text_model.embeddings", "transformer.wte", "transformer.wpe", "shared",
                      "encoder.block.0", "text_model.encoder.layers.0"});
  MarkPinnedUnits(families::FindFamily("text-encoder"), &te);
  EXPECT_TRUE(te[0].pinned && te[0].upstream_pins);
  EXPECT_TRUE(te[1].pinned && te[2].pinned);
  EXPECT_TRUE(te[3].pinned);
  EXPECT_FALSE(te[3].upstream_pins) << "DisTorch2 misses T5 'shared'";
  EXPECT_NE(te[3].pin_reason.find("T5"), std::string::npos);
  EXPECT_FALSE(te[4].pinned || te[5].pinned);

  // A WAN stem name is not a pin for Flux, and `none` pins nothing.
  auto none = units_of({"img_in", "patch_embedding"});
  MarkPinnedUnits(nullptr, &none);
  EXPECT_FALSE(none[0].pinned || none[1].pinned);
  // A unit pinned by its source keeps its reason.
  auto own = units_of({"img_in"});
  own[0].pinned = true;
  own[0].pin_reason = "from the file";
  MarkPinnedUnits(families::FindFamily("flux"), &own);
  EXPECT_EQ(own[0].pin_reason, "from the file");
}

TEST(PinRulesTest, FamilyNamesAndGuess) {
  EXPECT_EQ((*families::ParseFamily("FLUX"))->name(), "flux");
  EXPECT_EQ((*families::ParseFamily("t5"))->name(), "text-encoder");
  EXPECT_EQ((*families::ParseFamily("clip"))->name(), "text-encoder");
  EXPECT_EQ(*families::ParseFamily("none"), nullptr);
  EXPECT_FALSE(families::ParseFamily("sdxl").ok());
  EXPECT_EQ(GuessFamily(GetExample("flux-dev")->units)->name(), "flux");
  EXPECT_EQ(GuessFamily(GetExample("wan21-14b")->units)->name(), "wan");
  EXPECT_EQ(GuessFamily({Unit{"blocks.0", 1, false, "", false}}), nullptr);
}

// The examples' unit sizes are the sums of the real checkpoints' tensor shapes (bf16).
// Bytes of a tensor in a ComfyUI-GGUF Q6_K file: 2-D weights with rows of whole 256-value
// blocks in Q6_K (210 bytes per block), 5-D (patch embedding) F16, the rest F32.
uint64_t Q6kBytes(const nlohmann::json& shape) {
  uint64_t n = 1;
  for (auto& d : shape) n *= d.get<uint64_t>();
  if (shape.size() == 2 && shape[1].get<uint64_t>() % 256 == 0) return n / 256 * 210;
  return shape.size() == 5 ? 2 * n : 4 * n;
}

// Unit sizes from a key list: bf16, or as the Q6_K GGUF stores them.
std::map<std::string, uint64_t> UnitsFromKeyList(const std::string& path, bool q6k = false) {
  std::ifstream in(path);
  std::map<std::string, uint64_t> out;
  std::string line;
  while (std::getline(in, line)) {
    std::string name = line.substr(0, line.find('\t'));
    std::string shape = line.substr(line.find('\t') + 1);
    uint64_t n = 1;
    for (auto& d : nlohmann::json::parse(shape)) n *= d.get<uint64_t>();
    std::string first = name.substr(0, name.find('.'));
    std::string unit = first;
    if (first == "blocks" || first == "double_blocks" || first == "single_blocks") {
      size_t dot = name.find('.');
      unit = name.substr(0, name.find('.', dot + 1));
    }
    out[unit] += q6k ? Q6kBytes(nlohmann::json::parse(shape)) : 2 * n;
  }
  return out;
}

TEST(ExamplesTest, SizesMatchTheCheckpointKeyLists) {
  std::string keys = FLEET_PLACEMENT_KEYS_DIR;
  struct Case {
    const char* example;
    const char* file;
    bool q6k;
  };
  for (auto [example, file, q6k] : {Case{"flux-dev", "flux-dev.tsv", false},
                                    Case{"wan21-14b", "wan21-14b.tsv", false},
                                    Case{"wan22-a14b-q6k", "wan21-14b.tsv", true}}) {
    ASSERT_TRUE(std::ifstream(keys + file).good()) << "no key list at " << keys + file;
    auto expected = UnitsFromKeyList(keys + file, q6k);
    auto ex = GetExample(example);
    ASSERT_TRUE(ex.ok());
    ASSERT_EQ(ex->units.size(), expected.size()) << example;
    for (const auto& u : ex->units)
      EXPECT_EQ(u.bytes, expected[u.name]) << example << " " << u.name;
  }
  EXPECT_EQ(GetExample("sd15").status().code(), StatusCode::kNotFound);
}

TEST(PlanOutputTest, JsonHasTheDocumentedShape) {
  auto devices = *ParseDeviceTable("cuda:0=24gb,cuda:1=12gb,cpu=64gb");
  Request r;
  r.expert_mode_allocations = "cuda:0,12gb;cuda:1,6gb;cpu,*";
  auto plan = MakePlan(devices, GetExample("flux-dev")->units, r);
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto j = nlohmann::json::parse(plan->ToJson());
  ASSERT_EQ(j["devices"].size(), 3u);
  uint64_t sum = 0;
  size_t units = 0;
  for (const auto& d : j["devices"]) {
    sum += d["bytes"].get<uint64_t>();
    units += d["units"].size();
    EXPECT_TRUE(d.contains("id"));
  }
  EXPECT_EQ(sum, j["model_bytes"].get<uint64_t>());
  EXPECT_EQ(units, 63u);
  ASSERT_EQ(j["assignments"].size(), 63u);
  EXPECT_EQ(j["assignments"][0]["unit"], "img_in");
  EXPECT_EQ(j["assignments"][0]["device"], "cuda:0");
  EXPECT_EQ(j["assignments"][0]["pinned"], true);
  EXPECT_EQ(j["expert_string"], plan->expert_string);
  EXPECT_TRUE(j["warnings"].is_array());
  EXPECT_TRUE(j["deviations"].is_array());
  std::string text = plan->ToText();
  EXPECT_NE(text.find("v2 Expert String: " + plan->expert_string), std::string::npos);
  EXPECT_NE(text.find("img_in..txt_in (5, pinned)"), std::string::npos) << text;
  EXPECT_NE(plan->ExplainText().find("[pinned-units]"), std::string::npos);
}

}  // namespace
}  // namespace fleet::placement
