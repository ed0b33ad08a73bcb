// The coordinator with real workers: `fleet up --ephemeral --emulate ...` starts a coordinator
// and cpu-backed emulated devices on loopback; a C++ JobClient drives it. Every computing device
// is a CPU here (as in CI), so every Forward must equal `fleet run-local` bit for bit.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <future>
#include <nlohmann/json.hpp>
#include <thread>

#include "fleet/coordinator/job_client.h"
#include "fleet/formats/model_file.h"
#include "fleet/protocol/protocol.h"
#include "process.h"



namespace fleet::coordinator {
namespace {

namespace fs = std::filesystem;
using cli::Child;

std::string BuildDir() {
  const char* b = std::getenv("FLEET_BUILD_DIR");
  return b ? b : "build";
}

std::string Fleet() { return BuildDir() + "/bin/fleet"; }

// METHOD http://HOST:PORT/path with `body` over a plain socket (the control API closes after
// each answer). Returns "<status code> <body>", or "" when the server cannot be reached.
std::string HttpCall(const std::string& method, const std::string& host_port,
                     const std::string& path, const std::string& body = "") {
  const auto colon = host_port.rfind(':');
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::stoi(host_port.substr(colon + 1))));
  inet_pton(AF_INET, host_port.substr(0, colon).c_str(), &addr.sin_addr);
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (fd >= 0) close(fd);
    return "";
  }
  std::string request = method + " " + path + " HTTP/1.1\r\nHost: " + host_port +
                        "\r\nConnection: close\r\n";
  if (!body.empty()) {
    request += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
               "\r\n";
  }
  request += "\r\n" + body;
  for (size_t sent = 0; sent < request.size();) {
    const ssize_t n = write(fd, request.data() + sent, request.size() - sent);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  std::string response;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) response.append(buf, static_cast<size_t>(n));
  close(fd);
  const auto at = response.find("\r\n\r\n");
  if (response.size() < 12 || at == std::string::npos) return "";
  return response.substr(9, 3) + " " + response.substr(at + 4);
}

std::string HttpGet(const std::string& host_port, const std::string& path) {
  return HttpCall("GET", host_port, path);
}

// Runs `fleet ARGS...` to completion; returns its exit status.
int RunFleet(const std::vector<std::string>& args, const std::string& log) {
  std::vector<std::string> argv = {Fleet()};
  argv.insert(argv.end(), args.begin(), args.end());
  auto child = Child::Spawn(argv, log);
  if (!child.ok()) return -1;
  return child->Wait(std::chrono::minutes(5));
}

std::vector<HostTensor> ReadTensors(const std::string& path) {
  auto file = formats::ModelFile::Open(path);
  EXPECT_TRUE(file.ok()) << file.status();
  std::vector<HostTensor> out;
  for (const auto& t : (*file)->tensors()) {
    auto bytes = (*file)->Data(t);
    out.push_back(HostTensor::Copy(t.name, *protocol::ParseDType(t.dtype), t.shape, bytes.data(), bytes.size()));
  }
  return out;
}

const HostTensor* Find(const std::vector<HostTensor>& ts, const std::string& name) {
  for (const auto& t : ts) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

bool SameBytes(const HostTensor& a, const HostTensor& b) {
  return a.nbytes == b.nbytes && a.shape == b.shape && a.dtype == b.dtype && std::memcmp(a.data, b.data, a.nbytes) == 0;
}

// One cluster for the whole suite (starting libtorch workers costs seconds); tests that kill or
// restart processes start their own.
class Cluster {
 public:
  static StatusOr<std::unique_ptr<Cluster>> Start(const std::string& emulate, const std::string& name) {
    auto c = std::make_unique<Cluster>();
    c->dir = fs::temp_directory_path() / ("fleet-it-" + name + "-" + std::to_string(getpid()));
    fs::remove_all(c->dir);
    fs::create_directories(c->dir + "/models");
    FLEET_ASSIGN_OR_RETURN(
        c->up, Child::Spawn({Fleet(), "up", "--ephemeral", "--emulate", emulate, "--dir", c->dir,
                             // Generous: several clusters share 2 cores in ctest -j.
                             "--heartbeat-timeout", "10s"},
                            c->dir + "/up.log"));
    FLEET_ASSIGN_OR_RETURN(auto ready, c->up.WaitReady("fleet up ready", std::chrono::seconds(120)));
    c->listen = ready["listen"];
    c->http = ready["http"];
    return c;
  }
  ~Cluster() { up.Stop(std::chrono::seconds(20)); }

  // Worker pids from fleet up's log lines ("  worker cuda:1 pid=123 ...").
  Child up;
  std::string dir, listen, http;
};

class CoordinatorIntegration : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto c = Cluster::Start("cuda:0=1gb,cuda:1=1gb,cpu=2gb", "suite");
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = c->release();
    models_ = cluster_->dir + "/models";
    ASSERT_EQ(RunFleet({"gen-model", "--preset", "tiny", "--double", "3", "--single", "4", "--dtype", "f32", "--seed",
                        "3", models_ + "/tiny.safetensors"},
                       cluster_->dir + "/gen.log"),
              0);
    ASSERT_EQ(RunFleet({"gen-inputs", models_ + "/tiny.safetensors", "--batch", "2", "--height", "10", "--width", "14",
                        "--txt-len", "7", "--seed", "5", cluster_->dir + "/in.safetensors"},
                       cluster_->dir + "/gen.log"),
              0);
    ASSERT_EQ(RunFleet({"run-local", models_ + "/tiny.safetensors", "--inputs", cluster_->dir + "/in.safetensors",
                        "--out", cluster_->dir + "/ref.safetensors"},
                       cluster_->dir + "/run-local.log"),
              0);
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }

  std::unique_ptr<JobClient> Client() {
    auto c = JobClient::Connect(cluster_->listen, std::chrono::minutes(2));
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  static ModelSpec Spec(const std::string& expert, ExecMode mode) {
    ModelSpec s;
    s.path = "tiny.safetensors";
    s.compute_device = "cuda:0";
    s.expert_mode_allocations = expert;
    s.mode = mode;
    s.eject_models = false;
    return s;
  }

  static Cluster* cluster_;
  static std::string models_;
};

Cluster* CoordinatorIntegration::cluster_ = nullptr;
std::string CoordinatorIntegration::models_;

TEST_F(CoordinatorIntegration, ForwardIsBitIdenticalToRunLocalInEveryModeAndAllocation) {
  auto client = Client();
  ASSERT_TRUE(client);
  auto inputs = ReadTensors(cluster_->dir + "/in.safetensors");
  auto reference = ReadTensors(cluster_->dir + "/ref.safetensors");
  const HostTensor* ref = Find(reference, "out");
  ASSERT_NE(ref, nullptr);
  const std::vector<std::string> allocations = {
      "cuda:0,40%;cuda:1,35%;cpu,*",  // ratio, three devices
      "cuda:1,*",                      // wildcard only: everything but the stem on cuda:1
      "cuda:0,0.0002;cuda:1,0.0002;cpu,*",  // fractions of total memory
      "cuda:1,1mb;cpu,*",              // bytes
  };
  int n = 0;
  for (const auto& allocation : allocations) {
    for (ExecMode mode : {ExecMode::kStream, ExecMode::kPipeline, ExecMode::kAuto}) {
      std::string name = "m" + std::to_string(n++);
      auto info = client->LoadModel(name, Spec(allocation, mode));
      ASSERT_TRUE(info.ok()) << allocation << " " << ExecModeName(mode) << ": " << info.status();
      auto result = client->Forward(name, inputs);
      ASSERT_TRUE(result.ok()) << allocation << " " << ExecModeName(mode) << ": " << result.status();
      const HostTensor* out = Find(result->outputs, "out");
      ASSERT_NE(out, nullptr);
      EXPECT_TRUE(SameBytes(*out, *ref)) << allocation << " mode " << ExecModeName(mode) << " differs from run-local";
      ASSERT_TRUE(client->UnloadModel(name).ok());
    }
  }
}

// A GGUF checkpoint (2-D weights in Q8_0, as ComfyUI users run Flux): each worker reads its
// blocks' quantised bytes and dequantises them itself; the result is run-local's bit for bit.
TEST_F(CoordinatorIntegration, GgufModelIsDequantisedByTheWorkersBitIdenticalToRunLocal) {
  const std::string gguf = models_ + "/tiny.gguf";
  ASSERT_EQ(RunFleet({"quantize", models_ + "/tiny.safetensors", gguf}, cluster_->dir + "/gen.log"), 0);
  // Bad input is exit 2, a file it cannot write is exit 1; neither leaves a file behind.
  EXPECT_EQ(RunFleet({"quantize", cluster_->dir + "/gen.log", models_ + "/bad.gguf"}, cluster_->dir + "/q.log"), 2);
  EXPECT_FALSE(fs::exists(models_ + "/bad.gguf"));
  EXPECT_EQ(RunFleet({"quantize", models_ + "/tiny.safetensors", "/nonexistent/x.gguf"}, cluster_->dir + "/q.log"), 1);
  ASSERT_EQ(RunFleet({"run-local", gguf, "--inputs", cluster_->dir + "/in.safetensors", "--out",
                      cluster_->dir + "/ref-gguf.safetensors"},
                     cluster_->dir + "/run-local.log"),
            0);
  auto client = Client();
  ASSERT_TRUE(client);
  auto inputs = ReadTensors(cluster_->dir + "/in.safetensors");
  auto reference = ReadTensors(cluster_->dir + "/ref-gguf.safetensors");
  const HostTensor* ref = Find(reference, "out");
  ASSERT_NE(ref, nullptr);
  EXPECT_EQ(ref->dtype, wire::DType::BF16);  // quantised weights compute in bf16 by default
  for (ExecMode mode : {ExecMode::kStream, ExecMode::kPipeline, ExecMode::kAuto}) {
    ModelSpec spec = Spec("cuda:0,40%;cuda:1,35%;cpu,*", mode);
    spec.path = "tiny.gguf";
    auto info = client->LoadModel("gguf", spec);
    ASSERT_TRUE(info.ok()) << ExecModeName(mode) << ": " << info.status();
    // Resident as stored: Q8_0 blocks (34 bytes per 32 values) are not widened to bf16 (64
    // bytes), so the cluster holds no more than the file (whose f32 vectors become bf16).
    const uint64_t file_bytes = fs::file_size(gguf);
    EXPECT_LE(info->bytes_total, file_bytes) << ExecModeName(mode);
    auto result = client->Forward("gguf", inputs);
    ASSERT_TRUE(result.ok()) << ExecModeName(mode) << ": " << result.status();
    if (mode == ExecMode::kStream) {  // streaming moves the stored bytes
      EXPECT_GT(result->weight_bytes, 0u);
      EXPECT_LE(result->weight_bytes, file_bytes);
    }
    const HostTensor* out = Find(result->outputs, "out");
    ASSERT_NE(out, nullptr);
    EXPECT_TRUE(SameBytes(*out, *ref)) << "mode " << ExecModeName(mode) << " differs from run-local";
    ASSERT_TRUE(client->UnloadModel("gguf").ok());
  }
}

// ComfyUI's weight_dtype: the f32 weights are kept as fp8 (a quarter of the bytes) and expanded
// at use, bit-identical to run-local with the same weight dtype.
TEST_F(CoordinatorIntegration, WeightDtypeFp8KeepsFloatingWeightsAsFp8) {
  auto client = Client();
  ASSERT_TRUE(client);
  auto inputs = ReadTensors(cluster_->dir + "/in.safetensors");
  const std::string f32 = models_ + "/tiny.safetensors";
  for (const std::string weight_dtype : {"fp8_e4m3fn", "fp8_e5m2"}) {
    const std::string ref = cluster_->dir + "/ref-" + weight_dtype + ".safetensors";
    ASSERT_EQ(RunFleet({"run-local", f32, "--weight-dtype", weight_dtype, "--inputs",
                        cluster_->dir + "/in.safetensors", "--out", ref},
                       cluster_->dir + "/run-local.log"),
              0);
    auto reference = ReadTensors(ref);
    const HostTensor* want = Find(reference, "out");
    ASSERT_NE(want, nullptr);
    for (ExecMode mode : {ExecMode::kStream, ExecMode::kPipeline}) {
      ModelSpec spec = Spec("cuda:0,40%;cuda:1,35%;cpu,*", mode);
      spec.weight_dtype = weight_dtype;
      auto info = client->LoadModel("fp8", spec);
      ASSERT_TRUE(info.ok()) << weight_dtype << ": " << info.status();
      EXPECT_LT(info->bytes_total, fs::file_size(f32) / 3) << "fp8 is a quarter of f32";
      auto result = client->Forward("fp8", inputs);
      ASSERT_TRUE(result.ok()) << result.status();
      const HostTensor* out = Find(result->outputs, "out");
      ASSERT_NE(out, nullptr);
      EXPECT_TRUE(SameBytes(*out, *want)) << weight_dtype << " " << ExecModeName(mode);
      ASSERT_TRUE(client->UnloadModel("fp8").ok());
    }
  }
  ModelSpec bad = Spec("cpu,*", ExecMode::kAuto);
  bad.weight_dtype = "fp4";
  auto refused = client->LoadModel("fp8", bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("weight_dtype 'fp4'"), std::string::npos)
      << refused.status();
}

TEST_F(CoordinatorIntegration, SamplingRunReusesCachedConstantInputs) {
  auto client = Client();
  ASSERT_TRUE(client);
  auto inputs = ReadTensors(cluster_->dir + "/in.safetensors");
  auto reference = ReadTensors(cluster_->dir + "/ref.safetensors");
  ASSERT_TRUE(client->LoadModel("run", Spec("cuda:0,50%;cuda:1,*", ExecMode::kPipeline)).ok());
  const std::vector<std::string> constants = {"context", "y", "guidance"};
  // Step 1 sends everything; steps 2-3 send only x and timestep.
  auto first = client->Forward("run", inputs, "sampling-1", constants);
  ASSERT_TRUE(first.ok()) << first.status();
  std::vector<HostTensor> varying;
  for (const auto& t : inputs) {
    if (t.name == "x" || t.name == "timestep") varying.push_back(t);
  }
  for (int step = 0; step < 2; ++step) {
    auto r = client->Forward("run", varying, "sampling-1", constants, step == 1);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(SameBytes(*Find(r->outputs, "out"), *Find(reference, "out")));
  }
  // The run ended: its constants are gone, and the coordinator says so in a way clients act on.
  auto miss = client->Forward("run", varying, "sampling-1", constants);
  ASSERT_FALSE(miss.ok());
  EXPECT_EQ(miss.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(miss.status().message().find("run cache miss"), std::string::npos) << miss.status();
  ASSERT_TRUE(client->UnloadModel("run").ok());
}

TEST_F(CoordinatorIntegration, BadInputsGetClearErrorsAndTheModelStaysUsable) {
  auto client = Client();
  ASSERT_TRUE(client);
  auto inputs = ReadTensors(cluster_->dir + "/in.safetensors");
  // Names that would break URLs, job ids or metric labels are refused before any work.
  for (const std::string& name : {std::string("a/b"), std::string("tab\there"), std::string(300, 'n')}) {
    auto refused = client->LoadModel(name, Spec("cuda:0,50%;cuda:1,*", ExecMode::kPipeline));
    EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument) << refused.status();
    EXPECT_NE(refused.status().message().find("model name"), std::string::npos) << refused.status();
  }
  ASSERT_TRUE(client->LoadModel("bad", Spec("cuda:0,50%;cuda:1,*", ExecMode::kPipeline)).ok());
  // Wrong name.
  auto renamed = inputs;
  for (auto& t : renamed) {
    if (t.name == "context") t.name = "ctx";
  }
  auto r1 = client->Forward("bad", renamed);
  ASSERT_FALSE(r1.ok());
  EXPECT_NE(r1.status().message().find("context"), std::string::npos) << r1.status();
  // Wrong shape: x with 3 channels.
  auto reshaped = inputs;
  for (auto& t : reshaped) {
    if (t.name == "x") t = HostTensor::Copy("x", t.dtype, {2, 3, 10, 14}, t.data, 2 * 3 * 10 * 14 * 4);
  }
  auto r2 = client->Forward("bad", reshaped);
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.status().code(), StatusCode::kInvalidArgument) << r2.status();
  // Wrong dtype: timestep as int64.
  auto retyped = inputs;
  for (auto& t : retyped) {
    if (t.name == "timestep") {
      std::vector<int64_t> v(2, 1);
      t = HostTensor::Copy("timestep", wire::DType::I64, {2}, v.data(), 16);
    }
  }
  auto r3 = client->Forward("bad", retyped);
  ASSERT_FALSE(r3.ok());
  EXPECT_NE(r3.status().message().find("timestep"), std::string::npos) << r3.status();
  // Unknown model.
  EXPECT_EQ(client->Forward("nope", inputs).status().code(), StatusCode::kNotFound);
  // Still usable.
  auto ok = client->Forward("bad", inputs);
  ASSERT_TRUE(ok.ok()) << ok.status();
  ASSERT_TRUE(client->UnloadModel("bad").ok());
}

TEST_F(CoordinatorIntegration, TwoClientsAtOnce) {
  auto inputs = ReadTensors(cluster_->dir + "/in.safetensors");
  auto reference = ReadTensors(cluster_->dir + "/ref.safetensors");
  {
    auto client = Client();
    ASSERT_TRUE(client->LoadModel("shared", Spec("cuda:0,50%;cuda:1,*", ExecMode::kAuto)).ok());
  }
  auto work = [&](int) {
    auto client = Client();
    int same = 0;
    for (int i = 0; i < 3; ++i) {
      auto r = client->Forward("shared", inputs);
      if (r.ok() && SameBytes(*Find(r->outputs, "out"), *Find(reference, "out"))) ++same;
    }
    return same;
  };
  auto a = std::async(std::launch::async, work, 0);
  auto b = std::async(std::launch::async, work, 1);
  EXPECT_EQ(a.get(), 3);
  EXPECT_EQ(b.get(), 3);
  ASSERT_TRUE(Client()->UnloadModel("shared").ok());
}

TEST_F(CoordinatorIntegration, BadAllocationStringsAreRefusedAtPlanTime) {
  auto client = Client();
  struct Case {
    const char* expert;
    const char* why;
  } cases[] = {
      {"cuda:0,4tbx;cpu,*", "4tbx"}, {"cuda:0,50%;cuda:0,1gb", "cuda:0"}, {"gpu:0,1gb", "gpu"}};
  for (const auto& c : cases) {
    auto plan = client->Plan(Spec(c.expert, ExecMode::kAuto));
    ASSERT_FALSE(plan.ok()) << c.expert;
    EXPECT_NE(plan.status().message().find(c.why), std::string::npos) << plan.status();
  }
  auto traversal = Spec("cpu,*", ExecMode::kAuto);
  traversal.path = "../etc/passwd";
  EXPECT_EQ(client->Plan(traversal).status().code(), StatusCode::kInvalidArgument);
}

// The plan keeps room on the compute device for the activations of the workflow's input size,
// and the first forward with larger inputs is checked again, refused with the sizes instead of
// running out of memory.
TEST(CoordinatorHeadroom, ActivationsOfTheInputSizeArePlannedAndRecheckedOnTheFirstLargerForward) {
  // One 16 MB device: the tiny model's weights take ~2 MB, the rest is room for activations
  // (at 64 x 64 with 512 text tokens, mostly one chunk of attention scores).
  auto cluster = Cluster::Start("cuda:0=1gb/16mb", "headroom");
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  const std::string models = c.dir + "/models";
  ASSERT_EQ(RunFleet({"gen-model", "--preset", "tiny", "--double", "2", "--single", "2", "--dtype",
                      "f32", "--seed", "4", models + "/tiny.safetensors"},
                     c.dir + "/gen.log"),
            0);
  for (const auto& [file, side] :
       {std::pair<const char*, const char*>{"small", "8"}, {"large", "128"}}) {
    ASSERT_EQ(RunFleet({"gen-inputs", models + "/tiny.safetensors", "--height", side, "--width",
                        side, "--txt-len", "8", "--seed", "2", c.dir + "/" + file + ".safetensors"},
                       c.dir + "/gen.log"),
              0);
  }
  auto client = JobClient::Connect(c.listen, std::chrono::minutes(2));
  ASSERT_TRUE(client.ok()) << client.status();
  ModelSpec spec;
  spec.path = "tiny.safetensors";
  spec.compute_device = "cuda:0";
  spec.virtual_vram_gb = 0;
  spec.eject_models = false;
  // The family's default input (1024 x 1024) needs more than the device has beside the weights.
  auto refused = (*client)->LoadModel("m", spec);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("activations"), std::string::npos) << refused.status();
  // A 64 x 64 workflow fits.
  spec.width = spec.height = 64;
  auto loaded = (*client)->LoadModel("m", spec);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto small = (*client)->Forward("m", ReadTensors(c.dir + "/small.safetensors"));
  ASSERT_TRUE(small.ok()) << small.status();
  // 1024 x 1024 latents (128 x 128) on the same model: refused before any block runs, naming
  // the size and what the device has left; the model stays usable.
  auto large = (*client)->Forward("m", ReadTensors(c.dir + "/large.safetensors"));
  ASSERT_FALSE(large.ok());
  EXPECT_EQ(large.status().code(), StatusCode::kFailedPrecondition) << large.status();
  EXPECT_NE(large.status().message().find("1024x1024"), std::string::npos) << large.status();
  EXPECT_NE(large.status().message().find("cuda:0"), std::string::npos) << large.status();
  EXPECT_TRUE((*client)->Forward("m", ReadTensors(c.dir + "/small.safetensors")).ok());
}

// Hostile control-API bodies: a deeply nested one (well under the size limit; nlohmann's dump
// recursed on it and crashed the coordinator) and structured values where the loader inputs are
// scalars get a 400 naming the problem, and the coordinator keeps serving.
TEST(CoordinatorControlApi, NestedAndStructuredBodiesAreRefusedAndTheCoordinatorStaysUp) {
  auto cluster = Cluster::Start("cuda:0=1gb", "hostile");
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  const std::string load = "/v2/repository/models/m/load";
  for (const std::string& body :
       {R"({"path": "m.safetensors", "virtual_vram_gb": )" + deep + "}", deep,
        std::string(R"({"path": "m.safetensors", "x": )") + std::string(100000, '{') + "}"}) {
    const std::string answer = HttpCall("POST", c.http, load, body);
    EXPECT_EQ(answer.substr(0, 3), "400") << answer.substr(0, 200);
    EXPECT_NE(answer.find("nests deeper than 32 levels"), std::string::npos) << answer.substr(0, 200);
  }
  const std::string index = HttpCall("POST", c.http, "/v2/repository/index", deep);
  EXPECT_NE(index.find("nests deeper than 32 levels"), std::string::npos) << index.substr(0, 200);
  const std::string array =
      HttpCall("POST", c.http, load, R"({"path": "m.safetensors", "virtual_vram_gb": [1, 2]})");
  EXPECT_EQ(array.substr(0, 3), "400") << array;
  EXPECT_NE(array.find("field 'virtual_vram_gb' must be a string, number or boolean, got an array"),
            std::string::npos)
      << array;
  EXPECT_EQ(HttpGet(c.http, "/v2/health/live").substr(0, 3), "200");
}

// Models that fit together stay together; one that does not makes room by evicting others,
// least recently used first and only as far as needed: models without keep_loaded, and with
// eject_models the keep_loaded ones too. cuda:1 holds two copies of the tiny model, not three.
TEST(CoordinatorModels, KeepLoadedEjectAndLru) {
  auto cluster = Cluster::Start("cuda:0=1gb,cuda:1=1gb/7mb,cpu=2gb", "evict");
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  ASSERT_EQ(RunFleet({"gen-model", "--preset", "tiny", "--double", "3", "--single", "4", "--dtype",
                      "f32", "--seed", "4", c.dir + "/models/tiny.safetensors"},
                     c.dir + "/gen.log"),
            0);
  auto client = JobClient::Connect(c.listen, std::chrono::minutes(2));
  ASSERT_TRUE(client.ok()) << client.status();
  auto spec = [](bool keep_loaded, bool eject_models) {
    ModelSpec s;
    s.path = "tiny.safetensors";
    s.compute_device = "cuda:0";
    s.expert_mode_allocations = "cuda:0,10%;cuda:1,*";
    s.mode = ExecMode::kStream;
    s.width = s.height = 64;
    s.keep_loaded = keep_loaded;
    s.eject_models = eject_models;
    return s;
  };
  auto names = [&] {
    std::set<std::string> out;
    auto models = (*client)->ListModels();
    if (models.ok()) {
      for (const auto& m : *models) out.insert(m.name);
    }
    return out;
  };
  auto kept = (*client)->LoadModel("keep", spec(true, true));
  ASSERT_TRUE(kept.ok()) << kept.status();
  auto lru = (*client)->LoadModel("lru", spec(false, true));
  ASSERT_TRUE(lru.ok()) << lru.status();
  EXPECT_EQ(names(), (std::set<std::string>{"keep", "lru"}));  // eject_models evicted nothing
  // Without eject_models, the keep_loaded model stays: "lru" goes.
  auto plan = (*client)->Plan(spec(false, false));
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->evicts, std::vector<std::string>{"lru"});
  ASSERT_TRUE((*client)->LoadModel("third", spec(false, false)).ok());
  EXPECT_EQ(names(), (std::set<std::string>{"keep", "third"}));
  // With eject_models the keep_loaded one may go too, and goes first: used least recently.
  plan = (*client)->Plan(spec(true, true));
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->evicts, std::vector<std::string>{"keep"});
  ASSERT_TRUE((*client)->LoadModel("ejector", spec(true, true)).ok());
  EXPECT_EQ(names(), (std::set<std::string>{"third", "ejector"}));
  // Two keep_loaded models and a load without eject_models: nothing may go, nothing goes.
  ASSERT_TRUE((*client)->UnloadModel("third").ok());
  ASSERT_TRUE((*client)->LoadModel("kept2", spec(true, false)).ok());
  auto refused = (*client)->LoadModel("fourth", spec(false, false));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted) << refused.status();
  EXPECT_EQ(names(), (std::set<std::string>{"ejector", "kept2"}));
  // A model that fits beside the others evicts nothing, eject_models or not.
  ModelSpec cpu_only = spec(false, true);
  cpu_only.compute_device = "cpu";
  cpu_only.expert_mode_allocations = "cpu,*";
  ASSERT_TRUE((*client)->LoadModel("cpu-only", cpu_only).ok());
  EXPECT_EQ(names(), (std::set<std::string>{"ejector", "kept2", "cpu-only"}));
}

// Killing a worker mid-run fails the job with an error naming it, within the heartbeat timeout,
// and the coordinator keeps serving.
TEST(CoordinatorFailure, KilledWorkerFailsTheJobQuicklyAndTheCoordinatorStaysUp) {
  auto cluster = Cluster::Start("cuda:0=1gb,cuda:1=1gb", "kill");
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  std::string models = c.dir + "/models";
  ASSERT_EQ(RunFleet({"gen-model", "--preset", "small", "--double", "2", "--single", "6", "--seed", "1",
                      models + "/m.safetensors"},
                     c.dir + "/gen.log"),
            0);
  ASSERT_EQ(RunFleet({"gen-inputs", models + "/m.safetensors", "--height", "64", "--width", "64", "--txt-len", "64",
                      c.dir + "/in.safetensors"},
                     c.dir + "/gen.log"),
            0);
  auto client = JobClient::Connect(c.listen, std::chrono::minutes(2));
  ASSERT_TRUE(client.ok());
  ModelSpec spec;
  spec.path = "m.safetensors";
  spec.compute_device = "cuda:0";
  spec.expert_mode_allocations = "cuda:0,30%;cuda:1,*";
  spec.mode = ExecMode::kPipeline;
  ASSERT_TRUE((*client)->LoadModel("m", spec).ok());
  EXPECT_EQ(HttpGet(c.http, "/v2/health/ready").substr(0, 3), "200");
  auto inputs = ReadTensors(c.dir + "/in.safetensors");
  // fleet up printed "  worker cuda:1 pid=N ..." after its ready line.
  auto line = c.up.WaitReady("  worker cuda:1", std::chrono::seconds(5));
  ASSERT_TRUE(line.ok()) << line.status();
  pid_t victim = static_cast<pid_t>(std::stol((*line)["pid"]));
  ASSERT_GT(victim, 0);
  auto job = std::async(std::launch::async, [&] {
    std::vector<StatusOr<ForwardResult>> results;
    for (int i = 0; i < 50; ++i) {
      auto r = (*client)->Forward("m", inputs);
      bool ok = r.ok();
      results.push_back(std::move(r));
      if (!ok) break;
    }
    return results;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  kill(victim, SIGKILL);
  auto results = job.get();
  ASSERT_FALSE(results.empty());
  ASSERT_FALSE(results.back().ok()) << "Forwards kept succeeding after the worker died";
  const Status& failed = results.back().status();
  EXPECT_NE(failed.message().find("cuda:1"), std::string::npos) << failed;
  // The job failed because the worker is gone (Unavailable): the heartbeat timeout marked it
  // down, or, sooner, a peer's connection to it dropped mid-send. Not because the request timed
  // out (which would be DeadlineExceeded after --request-timeout).
  EXPECT_EQ(failed.code(), StatusCode::kUnavailable) << failed;
  // The coordinator is still up and answers, and marks the worker down within the heartbeat
  // timeout (10 s under `fleet up`; waited for loosely, 3 times that).
  auto after = JobClient::Connect(c.listen, std::chrono::seconds(10));
  ASSERT_TRUE(after.ok()) << after.status();
  bool cuda1_down = false;
  for (int i = 0; i < 300 && !cuda1_down; ++i) {
    auto st = (*after)->Cluster();
    ASSERT_TRUE(st.ok());
    for (const auto& w : st->workers) cuda1_down |= (w.device == "cuda:1" && !w.up);
    if (!cuda1_down) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(cuda1_down);
  // Not ready: a loaded model needs the dead worker; the answer says which.
  std::string ready = HttpGet(c.http, "/v2/health/ready");
  EXPECT_EQ(ready.substr(0, 3), "503") << ready;
  EXPECT_NE(ready.find("worker cuda:1, which model 'm' needs, is down"), std::string::npos) << ready;
  // Unloading the model that needs it makes the coordinator ready again (cuda:0 is up).
  ASSERT_TRUE((*after)->UnloadModel("m").ok());
  EXPECT_EQ(HttpGet(c.http, "/v2/health/ready").substr(0, 3), "200");
}

}  // namespace
}  // namespace fleet::coordinator
