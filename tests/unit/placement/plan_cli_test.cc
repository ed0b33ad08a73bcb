// `fleet plan` end to end: runs the real `fleet` binary on built-in examples, a --units file and
// a small safetensors model file, and checks tables, JSON, --explain and the exit status 2 with
// one clear stderr line for invalid input.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Outcome {
  int status = -1;
  std::string out;
  std::string err;
};

class PlanCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* build = std::getenv("FLEET_BUILD_DIR");
    ASSERT_NE(build, nullptr) << "FLEET_BUILD_DIR is not set (run through ctest)";
    fleet_ = std::string(build) + "/bin/fleet";
    ASSERT_EQ(access(fleet_.c_str(), X_OK), 0) << fleet_ << " is missing: build target fleet";
    char tmpl[] = "/tmp/fleet_plan_cli_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    if (!dir_.empty()) std::system(("rm -rf '" + dir_ + "'").c_str());
  }

  static std::string Slurp(const std::string& path) {
    std::ifstream in(path);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

  std::string Write(const std::string& name, const std::string& bytes) {
    std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }

  // Runs `fleet plan <args>`; arguments are single-quoted for the shell.
  Outcome Plan(const std::vector<std::string>& args) {
    std::string cmd = "'" + fleet_ + "' plan";
    for (const auto& a : args) cmd += " '" + a + "'";
    cmd += " >'" + dir_ + "/out' 2>'" + dir_ + "/err'";
    Outcome r;
    int raw = std::system(cmd.c_str());
    r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
    r.out = Slurp(dir_ + "/out");
    r.err = Slurp(dir_ + "/err");
    return r;
  }

  std::string fleet_;
  std::string dir_;
};

TEST_F(PlanCliTest, ExampleTablesAndExplain) {
  Outcome r = Plan({"--example", "flux-dev", "--devices", "cuda:0=24gb,cuda:1=12gb,cpu=64gb",
                    "--expert-mode-allocations", "cuda:0,8gb;cuda:1,8gb;cpu,*", "--explain"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;
  EXPECT_NE(r.out.find("Plan: bytes mode, compute device cuda:0"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("img_in..txt_in (5, pinned)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("v2 Expert String: cuda:0,"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[pinned-units]"), std::string::npos) << r.out;
}

TEST_F(PlanCliTest, JsonForPrograms) {
  Outcome r = Plan({"--example", "wan21-14b", "--devices", "cuda:0=24gb,cuda:1=24gb,cpu=64gb",
                    "--virtual-vram-gb", "14", "--donor-device", "cuda:1", "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["devices"].size(), 3u);
  EXPECT_EQ(j["devices"][0]["id"], "cuda:0");
  EXPECT_EQ(j["assignments"].size(), 45u);
  uint64_t sum = 0;
  for (const auto& d : j["devices"]) sum += d["bytes"].get<uint64_t>();
  EXPECT_EQ(sum, j["model_bytes"].get<uint64_t>());
  EXPECT_EQ(j["devices"][2]["bytes"], 0) << "nothing on cpu with a GPU donor";
  EXPECT_EQ(j["assignments"][0]["unit"], "patch_embedding");
  EXPECT_EQ(j["assignments"][0]["device"], "cuda:0");
  EXPECT_TRUE(j["expert_string"].is_string());
  EXPECT_TRUE(j["warnings"].is_array());
}

TEST_F(PlanCliTest, UnitsFileGetsTheFamilyPins) {
  std::string units = Write("units.json", R"([
    {"name": "img_in", "bytes": "1mb"}, {"name": "txt_in", "bytes": 1048576},
    {"name": "double_blocks.0", "bytes": "2gb"}, {"name": "double_blocks.1", "bytes": "2gb"},
    {"name": "final_layer", "bytes": "16mb"}])");
  Outcome r = Plan({"--units", units, "--devices", "cuda:0=8gb,cpu=16gb",
                    "--expert-mode-allocations", "cpu,*", "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["assignments"][0]["device"], "cuda:0");
  EXPECT_EQ(j["assignments"][0]["pinned"], true);
  EXPECT_EQ(j["assignments"][2]["device"], "cpu");
  Outcome none = Plan({"--units", units, "--devices", "cuda:0=8gb,cpu=16gb",
                       "--expert-mode-allocations", "cpu,*", "--family", "none", "--json"});
  ASSERT_EQ(none.status, 0) << none.err;
  EXPECT_EQ(nlohmann::json::parse(none.out)["assignments"][0]["device"], "cpu");
}

// A small Flux-layout safetensors file (names as ComfyUI saves them), read by fleet::formats.
TEST_F(PlanCliTest, ModelFile) {
  struct T {
    const char* name;
    std::vector<int> shape;
  } tensors[] = {{"model.diffusion_model.img_in.weight", {12, 8}},
                 {"model.diffusion_model.txt_in.weight", {12, 2}},
                 {"model.diffusion_model.vector_in.in_layer.weight", {12, 2}},
                 {"model.diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale", {6}},
                 {"model.diffusion_model.double_blocks.0.img_mlp.0.weight", {48, 12}},
                 {"model.diffusion_model.single_blocks.0.linear1.weight", {84, 12}},
                 {"model.diffusion_model.final_layer.linear.weight", {8, 12}}};
  nlohmann::ordered_json header;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t n = 4;
    for (int d : t.shape) n *= static_cast<uint64_t>(d);
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  header["__metadata__"] = {{"config", R"({"axes_dim": [2, 2, 2]})"}};
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((h.size() >> (8 * i)) & 0xff);
  file += h + std::string(offset, '\0');
  std::string path = Write("tiny-flux.safetensors", file);
  Outcome r = Plan({path, "--devices", "cuda:0=24gb,cpu=64gb", "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["assignments"][0]["unit"], "stem");
  EXPECT_EQ(j["assignments"][0]["device"], "cuda:0");
  EXPECT_EQ(j["assignments"][0]["pinned"], true);
  EXPECT_EQ(j["model_bytes"], offset);

  Outcome bad = Plan({Write("garbage.safetensors", "not a model"), "--devices", "cpu=1gb",
                      "--compute-device", "cpu"});
  EXPECT_EQ(bad.status, 2);
  EXPECT_NE(bad.err.find("garbage.safetensors"), std::string::npos) << bad.err;
}

// The WAN 2.2 two-GPU guide's GPU-only string: a 33.6 GiB model (84 blocks of 0.4 GiB) ends up
// 43% / 57% on the two GPUs, and the plan says so in DisTorch2's words.
TEST_F(PlanCliTest, GpuOnlyStringSpreadsTheRestOverTheGpus) {
  std::string units = "[";
  for (int i = 0; i < 84; ++i) {
    units += (i ? "," : "") + std::string("{\"name\": \"blocks.") + std::to_string(i) +
             "\", \"bytes\": 429496729}";
  }
  std::string path = Write("wan.json", units + "]");
  const std::string devices = "cuda:0=24gb,cuda:1=24gb,cpu=64gb";
  Outcome r = Plan({"--units", path, "--devices", devices, "--expert-mode-allocations",
                    "cuda:0,12gb;cuda:1,16gb", "--explain"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("GPU-ONLY MODE: Distributed remaining 5734.40 MB across 2 GPUs (no CPU "
                       "fallback)"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("42.9%  blocks.48..blocks.83 (36)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("57.1%  blocks.0..blocks.47 (48)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[gpu-only] no '*' and no cpu entry"), std::string::npos) << r.out;

  Outcome j = Plan({"--units", path, "--devices", devices, "--expert-mode-allocations",
                    "cuda:0,12gb;cuda:1,16gb;cpu,*", "--json"});
  ASSERT_EQ(j.status, 0) << j.err;
  auto plan = nlohmann::json::parse(j.out);
  ASSERT_EQ(plan["notes"].size(), 1u) << j.out;
  EXPECT_EQ(plan["notes"][0], "Assigning remaining 5734.40 MB of model to wildcard device 'cpu'");

  Outcome full = Plan({"--units", path, "--devices", "cuda:0=16gb,cuda:1=16gb,cpu=64gb",
                       "--expert-mode-allocations", "cuda:0,12gb;cuda:1,16gb"});
  EXPECT_EQ(full.status, 2) << full.out;
  EXPECT_NE(full.err.find("GPU-only mode"), std::string::npos) << full.err;
  EXPECT_NE(full.err.find("missing"), std::string::npos) << full.err;
}

// An example from DisTorch2's README: a number next to '*' is ignored, with a warning.
TEST_F(PlanCliTest, UpstreamReadmeWildcardWithNumberIsAccepted) {
  Outcome r = Plan({"--example", "flux-dev", "--devices", "cuda:0=24gb,cuda:1=12gb,cpu=64gb",
                    "--expert-mode-allocations", "cuda:0,500mb;cuda:1,3.0g;cpu,5gb*"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("warning: expert_mode_allocations: entry 3 'cpu,5gb*' at character 26: "
                       "'5gb*' makes cpu the wildcard"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("of model to wildcard device 'cpu'"), std::string::npos) << r.out;
}

// What DisTorch2 runs on one card runs here: FLUX.1-dev in bf16 (23.8 GB) on a 25.4 GB GPU,
// whole, leaves room for a 1024 x 1024 image's activations beside the CUDA reserve; a 2048 x 2048
// workflow does not fit, and the refusal says by how much.
TEST_F(PlanCliTest, ActivationRoomIsForTheWorkflowsInputSize) {
  const std::string devices = "cuda:0=25400000000,cpu=64gb";
  Outcome fits =
      Plan({"--example", "flux-dev", "--devices", devices, "--virtual-vram-gb", "0", "--json"});
  ASSERT_EQ(fits.status, 0) << fits.err;
  auto plan = nlohmann::json::parse(fits.out);
  // The blocks' activations plus one 128 MiB-budget chunk of attention scores (101 query rows).
  EXPECT_EQ(plan["headroom"]["activation_bytes"], 4608ull * (12288 + 6 * 3072) * 2 + 134037504ull)
      << fits.out;
  EXPECT_EQ(plan["devices"][0]["bytes"], 23802816640ull);

  Outcome large = Plan({"--example", "flux-dev", "--devices", devices, "--virtual-vram-gb", "0",
                        "--width", "2048", "--height", "2048"});
  EXPECT_EQ(large.status, 2) << large.out;
  EXPECT_NE(large.err.find("activations 1.09 GiB"), std::string::npos) << large.err;
  EXPECT_NE(large.err.find("(377596544 bytes) missing"), std::string::npos) << large.err;
}

TEST_F(PlanCliTest, InvalidInputExitsTwoWithOneLine) {
  const std::string devices = "cuda:0=24gb,cpu=64gb";
  struct Case {
    std::vector<std::string> args;
    const char* has;
  } cases[] = {
      {{"--example", "flux-dev", "--devices", devices, "--expert-mode-allocations",
        "cuda:0,4tbx;cpu,*"},
       "entry 1 'cuda:0,4tbx' at character 1"},
      {{"--example", "flux-dev", "--devices", devices, "--expert-mode-allocations",
        "cuda:0,4gb;cpu,5*gb"},
       "entry 2 'cpu,5*gb' at character 12: a wildcard is '*'"},
      {{"--example", "flux-dev", "--devices", devices, "--expert-mode-allocations",
        "cuda:0,4gb;cpu,*;cuda:0,25%"},
       "entry 3 'cuda:0,25%' at character 18 names cuda:0 again"},
      {{"--example", "flux-dev", "--devices", devices, "--virtual-vram-gb", "0", "--width", "4096",
        "--height", "4096"},
       "missing"},
      {{"--example", "flux-dev", "--devices", devices, "--width", "-8"},
       "--width: width -8 is outside 0..65536"},
      {{"--example", "flux-dev", "--coordinator", "http://127.0.0.1:1"},
       "--coordinator plans one MODEL file under the coordinator's model roots"},
      {{"flux.safetensors", "--coordinator", "tcp://127.0.0.1:1"},
       "expected the control API's URL, http://HOST:PORT"},
      {{"--example", "flux-dev"}, "give the devices: --devices"},
      {{"--example", "flux-dev", "--devices", "cuda:0=24gb,cuda:0=8gb"}, "listed twice"},
      {{"--example", "sd15", "--devices", devices}, "unknown example 'sd15'"},
      {{"--example", "flux-dev", "--units", "x.json", "--devices", devices}, "exactly one of"},
      {{"--units", "/nonexistent/units.json", "--devices", devices}, "cannot read"},
      {{"--example", "flux-dev", "--devices", devices, "--bogus"}, "unknown flag '--bogus'"},
      {{"--example", "flux-dev", "--devices", devices, "--virtual-vram-gb", "lots"},
       "expected a number"},
      {{"--example", "flux-dev", "--devices", devices, "--family", "sdxl"}, "unknown family"},
  };
  for (const auto& c : cases) {
    Outcome r = Plan(c.args);
    EXPECT_EQ(r.status, 2) << c.has << "\n" << r.out << r.err;
    EXPECT_NE(r.err.find(c.has), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "one line expected: " << r.err;
  }
  std::string units = Write("bad.json", "[{\"name\": \"a\", \"bytes\": 1},");
  Outcome r = Plan({"--units", units, "--devices", devices, "--json"});
  EXPECT_EQ(r.status, 2);
  auto j = nlohmann::json::parse(r.out);
  EXPECT_NE(j["error"].get<std::string>().find("byte offset"), std::string::npos) << r.out;
}

}  // namespace
