// fleet-worker end to end: real worker processes on loopback, a real model file, real shm.
//
// The model is fleet::models' "linear" family: block i computes x = gelu_tanh(x W_i^T + b_i).
// The test computes the reference itself (no torch here) and checks that resident, pipelined
// (activations sent worker to worker) and streamed (weights fetched from a donor) runs are
// bit-identical to each other.
#include <openssl/evp.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <zmq.hpp>

#include "fleet/protocol/protocol.h"
#include "fleet/transport/curve.h"
#include "fleet/transport/zmq_util.h"
#include "fleet/worker/client.h"
#include "fleet/worker/process.h"

namespace fleet::worker {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kDim = 64;
constexpr int kDepth = 4;

std::string BuildDir() {
  const char* env = std::getenv("FLEET_BUILD_DIR");
  return env ? env : FLEET_BUILD_DIR_DEFAULT;
}
std::string WorkerBinary() { return BuildDir() + "/bin/fleet-worker"; }

std::string Sha256Hex(const void* data, size_t size) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data, size, md, &len, EVP_sha256(), nullptr);
  char hex[3];
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    std::snprintf(hex, sizeof(hex), "%02x", md[i]);
    out += hex;
  }
  return out;
}

// A model file: for each block, W [dim, dim] then b [dim], f32, back to back after a header.
struct ModelFixture {
  fs::path root;
  std::string file = "linear/model.bin";
  std::vector<std::vector<float>> w, b;
  std::vector<FileTensorSpec> specs[kDepth];

  ModelFixture() {
    root = fs::temp_directory_path() / ("fleet-worker-test-" + std::to_string(getpid()) + "-" +
                                        std::to_string(std::random_device{}()));
    fs::create_directories(root / "linear");
    std::mt19937 rng(7);
    std::normal_distribution<float> dist(0.f, 0.2f);
    std::ofstream out(root / file, std::ios::binary);
    uint64_t offset = 0;
    const std::string header = "not a real format: raw tensors follow";
    out.write(header.data(), header.size());
    offset += header.size();
    for (int i = 0; i < kDepth; ++i) {
      w.emplace_back(kDim * kDim);
      b.emplace_back(kDim);
      for (auto& v : w[i]) v = dist(rng);
      for (auto& v : b[i]) v = dist(rng);
      const std::string name = "linear_blocks." + std::to_string(i);
      specs[i].push_back({name + ".weight",
                          wire::DType::F32,
                          {kDim, kDim},
                          offset,
                          uint64_t(kDim * kDim * 4),
                          Sha256Hex(w[i].data(), w[i].size() * 4),
                          ""});
      out.write(reinterpret_cast<const char*>(w[i].data()), w[i].size() * 4);
      offset += w[i].size() * 4;
      specs[i].push_back(
          {name + ".bias", wire::DType::F32, {kDim}, offset, uint64_t(kDim * 4), "", ""});
      out.write(reinterpret_cast<const char*>(b[i].data()), b[i].size() * 4);
      offset += b[i].size() * 4;
    }
  }
  ~ModelFixture() { fs::remove_all(root); }

  static ModelSpec Spec() { return {"toy", "linear", R"({"dim":64,"depth":4})", wire::DType::F32}; }
  std::string Block(int i) const { return "linear_blocks." + std::to_string(i); }
  std::vector<HostTensor> WireTensors(int i) const {
    return {HostTensor::Copy(Block(i) + ".weight", wire::DType::F32, {kDim, kDim}, w[i].data(),
                             w[i].size() * 4),
            HostTensor::Copy(Block(i) + ".bias", wire::DType::F32, {kDim}, b[i].data(),
                             b[i].size() * 4)};
  }
  // Reference forward of blocks [first, last) in double precision.
  std::vector<double> Reference(std::vector<double> x, int rows, int first, int last) const {
    for (int i = first; i < last; ++i) {
      std::vector<double> y(x.size());
      for (int r = 0; r < rows; ++r) {
        for (int o = 0; o < kDim; ++o) {
          double acc = b[i][o];
          for (int k = 0; k < kDim; ++k) acc += x[r * kDim + k] * w[i][o * kDim + k];
          const double c = std::sqrt(2.0 / M_PI);
          y[r * kDim + o] = 0.5 * acc * (1.0 + std::tanh(c * (acc + 0.044715 * acc * acc * acc)));
        }
      }
      x = std::move(y);
    }
    return x;
  }
};

const ModelFixture& Model() {
  static ModelFixture m;  // destroyed at exit: removes its temporary model root
  return m;
}

std::unique_ptr<WorkerProcess> StartWorker(std::vector<std::string> args) {
  std::vector<std::string> all = {"--model-root",        Model().root.string(),
                                  "--shm-staging-bytes", "64mb",
                                  "--threads",           "4",
                                  "--compute-threads",   "1"};
  all.insert(all.end(), args.begin(), args.end());
  auto w = WorkerProcess::Start(WorkerBinary(), all);
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? std::move(*w) : nullptr;
}

std::unique_ptr<WorkerClient> ConnectTo(const WorkerProcess& w, ClientOptions o = {}) {
  auto c = WorkerClient::Connect(w.endpoint(), o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

// The value of one series of the worker's /metrics (-1 when it is not there).
double MetricValue(const WorkerProcess& w, const std::string& series) {
  auto text = HttpGet(w.metrics(), "/metrics");
  EXPECT_TRUE(text.ok());
  const std::string key = series + " ";
  const auto at = text.ok() ? text->find(key) : std::string::npos;
  return at == std::string::npos ? -1.0 : std::stod(text->substr(at + key.size()));
}

HostTensor Input(int rows, std::vector<double>* as_double = nullptr) {
  std::vector<float> x(rows * kDim);
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  for (auto& v : x) v = d(rng);
  if (as_double) as_double->assign(x.begin(), x.end());
  return HostTensor::Copy("x", wire::DType::F32, {rows, kDim}, x.data(), x.size() * 4);
}

std::vector<float> Floats(const HostTensor& t) {
  std::vector<float> v(t.nbytes / 4);
  std::memcpy(v.data(), t.data, t.nbytes);
  return v;
}

StatusOr<std::vector<float>> GetX(WorkerClient& c, const std::string& job) {
  FLEET_ASSIGN_OR_RETURN(auto got, c.GetTensors(job, {"x"}));
  if (got.size() != 1) return InternalError("expected one tensor");
  return Floats(got[0]);
}

// ---------------------------------------------------------------------------------------------

TEST(Worker, LoadsFromFileAndWireRunsAndEvicts) {
  const auto& m = Model();
  auto w = StartWorker({"--id", "cuda:1", "--backing", "cpu", "--capacity", "1mb"});
  ASSERT_TRUE(w);
  EXPECT_NE(w->arena(), "off");
  auto c = ConnectTo(*w);
  ASSERT_TRUE(c);
  EXPECT_TRUE(c->uses_shm());
  EXPECT_EQ(c->peer().device, "cuda:1");

  ASSERT_TRUE(c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, m.specs[0]).ok());
  ASSERT_TRUE(c->LoadBlockFromWire(m.Spec(), m.Block(1), m.WireTensors(1)).ok());
  EXPECT_EQ(c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, m.specs[0]).code(),
            StatusCode::kAlreadyExists);
  EXPECT_EQ(c->LoadBlockFromFile(m.Spec(), "linear_blocks.9", m.file, m.specs[0]).code(),
            StatusCode::kNotFound);

  auto stats = c->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->device, "cuda:1");
  EXPECT_EQ(stats->capacity_bytes, 1u << 20);
  const uint64_t block_bytes = (kDim * kDim + kDim) * 4;
  EXPECT_EQ(stats->resident_bytes, 2 * block_bytes);
  ASSERT_EQ(stats->models.size(), 1u);
  EXPECT_EQ(stats->models[0].blocks, (std::vector<std::string>{m.Block(0), m.Block(1)}));
  EXPECT_GE(stats->arena_used_bytes, 2 * block_bytes);  // weights live in the arena

  std::vector<double> x;
  ASSERT_TRUE(c->PutTensors("job1", {Input(3, &x)}).ok());
  auto run = c->RunBlocks("job1", "toy", {{m.Block(0), ""}, {m.Block(1), ""}});
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_EQ(run->blocks_run, 2u);
  auto y = GetX(*c, "job1");
  ASSERT_TRUE(y.ok()) << y.status();
  const auto ref = m.Reference(x, 3, 0, 2);
  ASSERT_EQ(y->size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR((*y)[i], ref[i], 1e-5) << i;

  ASSERT_TRUE(c->EvictBlock("toy", m.Block(0)).ok());
  EXPECT_EQ(c->EvictBlock("toy", m.Block(0)).code(), StatusCode::kNotFound);
  stats = c->Stats();
  EXPECT_EQ(stats->resident_bytes, block_bytes);
  auto missing = c->RunBlocks("job1", "toy", {{m.Block(0), ""}});
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("not resident on cuda:1"), std::string_view::npos)
      << missing.status();
  EXPECT_EQ(c->GetTensors("job1", {"nope"}).status().code(), StatusCode::kNotFound);
  ASSERT_TRUE(c->DropJob("job1").ok());
  EXPECT_EQ(c->GetTensors("job1", {"x"}).status().code(), StatusCode::kNotFound);
  ASSERT_TRUE(c->EvictModel("toy").ok());
  EXPECT_EQ(c->Stats()->resident_bytes, 0u);
  EXPECT_EQ(w->Terminate(), 0);
}

TEST(Worker, RefusesLoadsPastCapacityWithTheNumbers) {
  const auto& m = Model();
  const uint64_t block_bytes = (kDim * kDim + kDim) * 4;  // 16640
  auto w = StartWorker({"--id", "cuda:2", "--capacity", std::to_string(2 * block_bytes + 100)});
  ASSERT_TRUE(w);
  auto c = ConnectTo(*w);
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, m.specs[0]).ok());
  ASSERT_TRUE(c->LoadBlockFromWire(m.Spec(), m.Block(1), m.WireTensors(1)).ok());
  Status s = c->LoadBlockFromFile(m.Spec(), m.Block(2), m.file, m.specs[2]);
  ASSERT_EQ(s.code(), StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("16640 bytes"), std::string_view::npos) << s;
  EXPECT_NE(s.message().find("cuda:2"), std::string_view::npos) << s;
  EXPECT_EQ(c->Stats()->resident_bytes, 2 * block_bytes);
  // Evicting makes room again.
  ASSERT_TRUE(c->EvictBlock("toy", m.Block(0)).ok());
  EXPECT_TRUE(c->LoadBlockFromFile(m.Spec(), m.Block(2), m.file, m.specs[2]).ok());

  auto text = HttpGet(w->metrics(), "/metrics");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_NE(text->find("fleet_worker_block_loads_total{device=\"cuda:2\",outcome=\"refused\"} 1"),
            std::string::npos)
      << *text;
  EXPECT_NE(text->find("fleet_worker_capacity_bytes{device=\"cuda:2\"} " +
                       std::to_string(2 * block_bytes + 100)),
            std::string::npos);
  EXPECT_NE(text->find("fleet_worker_resident_bytes{device=\"cuda:2\",model=\"toy\"} " +
                       std::to_string(2 * block_bytes)),
            std::string::npos);
  EXPECT_NE(text->find("fleet_worker_load_bytes_total{device=\"cuda:2\",source=\"file\"}"),
            std::string::npos);
}

// A LoRA on block 0 (sent with SetPatches as tensors, as the ComfyUI node's patches are): the
// run equals the double-precision reference on the patched weight; the patched copy is kept while
// the capacity has room (fleet_worker_patched_bytes), read back bit for bit, and given back when a
// load needs the room; dropping the set restores the plain model.
TEST(Worker, PatchedCopiesAreKeptWhileThereIsRoomAndGivenBackToLoads) {
  const auto& m = Model();
  const uint64_t block_bytes = (kDim * kDim + kDim) * 4;  // 16640
  const uint64_t copy_bytes = kDim * kDim * 4;            // the patched weight, 16384
  auto w = StartWorker({"--id", "cuda:3", "--capacity", std::to_string(4 * block_bytes + 100)});
  ASSERT_TRUE(w);
  auto c = ConnectTo(*w);
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, m.specs[0]).ok());
  ASSERT_TRUE(c->LoadBlockFromFile(m.Spec(), m.Block(1), m.file, m.specs[1]).ok());

  constexpr int64_t kRank = 2;
  const double strength = 0.75, alpha = 1.0;
  std::vector<float> up(kDim * kRank), down(kRank * kDim);
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.f, 0.3f);
  for (auto& v : up) v = dist(rng);
  for (auto& v : down) v = dist(rng);
  const float alpha_value = static_cast<float>(alpha);
  families::LoraModule module;
  module.prefix = "p0";
  module.target = m.Block(0) + ".weight";
  module.shape = {kDim, kDim};
  module.parts = {{".lora_up.weight", "p0.lora_up.weight"},
                  {".lora_down.weight", "p0.lora_down.weight"},
                  {".alpha", "p0.alpha"}};
  const std::vector<HostTensor> parts = {
      HostTensor::Copy("p0.lora_up.weight", wire::DType::F32, {kDim, kRank}, up.data(),
                       up.size() * 4),
      HostTensor::Copy("p0.lora_down.weight", wire::DType::F32, {kRank, kDim}, down.data(),
                       down.size() * 4),
      HostTensor::Copy("p0.alpha", wire::DType::F32, {}, &alpha_value, 4)};
  ASSERT_TRUE(c->SetPatches("toy", "s1", {{"", strength, {module}}}, parts, {}).ok());

  // The reference: W0 + strength * alpha / rank * up @ down, in double.
  ModelFixture patched_model;
  for (int64_t o = 0; o < kDim; ++o) {
    for (int64_t k = 0; k < kDim; ++k) {
      double d = 0;
      for (int64_t r = 0; r < kRank; ++r) d += double(up[o * kRank + r]) * down[r * kDim + k];
      patched_model.w[0][o * kDim + k] =
          static_cast<float>(m.w[0][o * kDim + k] + strength * alpha / kRank * d);
    }
  }
  auto run = [&](const std::string& job, const std::string& patches) {
    std::vector<double> x;
    EXPECT_TRUE(c->PutTensors(job, {Input(3, &x)}).ok());
    auto ran = c->RunBlocks(job, "toy", {{m.Block(0), ""}, {m.Block(1), ""}}, 1, "", patches);
    EXPECT_TRUE(ran.ok()) << ran.status();
    auto y = GetX(*c, job);
    EXPECT_TRUE(y.ok()) << y.status();
    return std::make_pair(x, y.ok() ? *y : std::vector<float>{});
  };
  auto patched_bytes = [&] {
    return MetricValue(*w, "fleet_worker_patched_bytes{device=\"cuda:3\",model=\"toy\"}");
  };

  const auto [x1, computed] = run("j1", "s1");
  const auto ref = patched_model.Reference(x1, 3, 0, 2);
  for (size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(computed[i], ref[i], 1e-5) << i;
  const auto plain_ref = m.Reference(x1, 3, 0, 2);
  double moved = 0;
  for (size_t i = 0; i < ref.size(); ++i) moved = std::max(moved, std::abs(ref[i] - plain_ref[i]));
  EXPECT_GT(moved, 1e-2) << "the LoRA must change the output";
  EXPECT_EQ(patched_bytes(), double(copy_bytes));  // kept: 2 blocks + the copy fit
  EXPECT_EQ(run("j2", "s1").second, computed);     // read back: the same bits

  // Block 2 still fits beside the copy; block 3 does not, so the copy is given back first.
  ASSERT_TRUE(c->LoadBlockFromFile(m.Spec(), m.Block(2), m.file, m.specs[2]).ok());
  EXPECT_EQ(patched_bytes(), double(copy_bytes));
  ASSERT_TRUE(c->LoadBlockFromFile(m.Spec(), m.Block(3), m.file, m.specs[3]).ok());
  EXPECT_EQ(patched_bytes(), 0.0);
  EXPECT_EQ(run("j3", "s1").second, computed);  // computed again: the same bits, not kept
  EXPECT_EQ(patched_bytes(), 0.0);

  // Unknown sets are refused by name; dropping the set gives the plain model back.
  auto unknown = c->RunBlocks("j4", "toy", {{m.Block(0), ""}}, 1, "", "nope");
  EXPECT_EQ(unknown.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(unknown.status().message().find("patch set 'nope'"), std::string_view::npos);
  ASSERT_TRUE(c->SetPatches("toy", "", {}, {}, {"s1"}).ok());
  EXPECT_EQ(c->RunBlocks("j5", "toy", {{m.Block(0), ""}}, 1, "", "s1").status().code(),
            StatusCode::kFailedPrecondition);  // s1 is gone
  const auto [x6, plain] = run("j6", "");
  const auto ref6 = m.Reference(x6, 3, 0, 2);
  for (size_t i = 0; i < ref6.size(); ++i) ASSERT_NEAR(plain[i], ref6[i], 1e-5) << i;

  // A patch that does not fit its weight is refused naming it, and nothing is kept.
  module.offset_length = kDim + 1;
  Status bad = c->SetPatches("toy", "s2", {{"", 1.0, {module}}}, parts, {});
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument) << bad;
  EXPECT_NE(bad.message().find("p0"), std::string_view::npos) << bad;
  EXPECT_EQ(c->RunBlocks("j7", "toy", {{m.Block(0), ""}}, 1, "", "s2").status().code(),
            StatusCode::kFailedPrecondition);

  // A module that claims another shape than its weight has fails when it applies; a diff of
  // one row must not broadcast over the whole weight.
  families::LoraModule row;
  row.prefix = "q0";
  row.target = m.Block(0) + ".weight";
  row.shape = {1, kDim};
  row.parts = {{".diff", "q0.diff"}};
  const std::vector<float> diff(kDim, 0.5f);
  ASSERT_TRUE(c->SetPatches("toy", "s3", {{"", 1.0, {row}}},
                            {HostTensor::Copy("q0.diff", wire::DType::F32, {1, kDim}, diff.data(),
                                              diff.size() * 4)},
                            {})
                  .ok());
  std::vector<double> x8;
  ASSERT_TRUE(c->PutTensors("j8", {Input(3, &x8)}).ok());
  auto lied = c->RunBlocks("j8", "toy", {{m.Block(0), ""}}, 1, "", "s3");
  EXPECT_EQ(lied.status().code(), StatusCode::kInvalidArgument) << lied.status();
  EXPECT_NE(lied.status().message().find(m.Block(0) + ".weight"), std::string_view::npos)
      << lied.status();
  EXPECT_EQ(w->Terminate(), 0);
}

TEST(Worker, ModelFilesStayInsideTheRootsAndAreVerified) {
  const auto& m = Model();
  auto w = StartWorker({"--id", "cpu", "--capacity", "1mb"});
  ASSERT_TRUE(w);
  auto c = ConnectTo(*w);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->LoadBlockFromFile(m.Spec(), m.Block(0), "../etc/passwd", m.specs[0]).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(
      c->LoadBlockFromFile(m.Spec(), m.Block(0), "linear/../linear/model.bin", m.specs[0]).code(),
      StatusCode::kInvalidArgument);
  EXPECT_EQ(
      c->LoadBlockFromFile(m.Spec(), m.Block(0), (m.root / m.file).string(), m.specs[0]).code(),
      StatusCode::kInvalidArgument);
  EXPECT_EQ(c->LoadBlockFromFile(m.Spec(), m.Block(0), "linear/missing.bin", m.specs[0]).code(),
            StatusCode::kNotFound);
  fs::create_symlink("/etc", m.root / "escape");
  Status link = c->LoadBlockFromFile(m.Spec(), m.Block(0), "escape/hostname", m.specs[0]);
  EXPECT_EQ(link.code(), StatusCode::kInvalidArgument) << link;
  fs::remove(m.root / "escape");

  auto bad_hash = m.specs[0];
  bad_hash[0].sha256 = std::string(64, '0');
  Status s = c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, bad_hash);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s;
  auto past_end = m.specs[0];
  past_end[1].offset = 1 << 30;
  s = c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, past_end);
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange) << s;
  auto wrong_bytes = m.specs[0];
  wrong_bytes[1].nbytes = 4;
  EXPECT_EQ(c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, wrong_bytes).code(),
            StatusCode::kInvalidArgument);
  auto bad_dtype = m.specs[0];
  bad_dtype[1].dtype = static_cast<wire::DType>(200);
  EXPECT_EQ(c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, bad_dtype).code(),
            StatusCode::kInvalidArgument);
  // Block-quantised bytes: the byte count must be what the blocks of the shape take, the type
  // one we dequantise, the output a float dtype.
  auto quant = m.specs[0];
  quant[0].quant = "Q8_0";  // a [kDim, kDim] weight: kDim * kDim / 32 blocks of 34 bytes
  s = c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, quant);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("Q8_0 blocks of its shape take"), std::string_view::npos) << s;
  quant[0].quant = "Q9_9";
  s = c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, quant);
  EXPECT_NE(s.message().find("not a block type this worker dequantises"), std::string_view::npos) << s;
  quant[0].quant = "Q8_0";
  quant[0].dtype = wire::DType::I32;
  s = c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, quant);
  EXPECT_NE(s.message().find("dequantises to F32, F16 or BF16"), std::string_view::npos) << s;
  ModelSpec other = m.Spec();
  other.family = "nonexistent";
  EXPECT_FALSE(c->LoadBlockFromFile(other, m.Block(0), m.file, m.specs[0]).ok());
  // Nothing above left bytes behind.
  EXPECT_EQ(c->Stats()->resident_bytes, 0u);
  EXPECT_TRUE(c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, m.specs[0]).ok());
}

void SendBetweenWorkers(bool shm) {
  std::vector<std::string> extra =
      shm ? std::vector<std::string>{} : std::vector<std::string>{"--shm=false"};
  auto a_args = extra, b_args = extra;
  a_args.insert(a_args.end(), {"--id", "cuda:0", "--capacity", "1mb"});
  b_args.insert(b_args.end(), {"--id", "cuda:1", "--capacity", "1mb"});
  auto a = StartWorker(a_args);
  auto b = StartWorker(b_args);
  ASSERT_TRUE(a && b);
  auto ca = ConnectTo(*a);
  auto cb = ConnectTo(*b);
  ASSERT_TRUE(ca && cb);
  // 8 MiB of bytes plus a small int tensor and an empty one.
  std::vector<uint8_t> big(8 << 20);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<uint8_t>(i * 31 + 7);
  std::vector<int64_t> ids = {1, -2, 3};
  ASSERT_TRUE(
      ca->PutTensors("j", {HostTensor::Own("big", wire::DType::U8, {int64_t(big.size())}, big),
                           HostTensor::Copy("ids", wire::DType::I64, {3}, ids.data(), 24),
                           HostTensor::Copy("empty", wire::DType::F32, {0, 4}, nullptr, 0)})
          .ok());
  auto sent = ca->SendTensors("j", {"big", "ids", "empty"}, b->endpoint(), "k");
  ASSERT_TRUE(sent.ok()) << sent.status();
  EXPECT_EQ(sent->transport, shm ? "shm" : "frames");
  EXPECT_EQ(sent->bytes, big.size() + 24);
  auto got = cb->GetTensors("k", {"big", "ids", "empty"});
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 3u);
  ASSERT_EQ((*got)[0].nbytes, big.size());
  EXPECT_EQ(std::memcmp((*got)[0].data, big.data(), big.size()), 0);
  EXPECT_EQ((*got)[1].dtype, wire::DType::I64);
  EXPECT_EQ(std::memcmp((*got)[1].data, ids.data(), 24), 0);
  EXPECT_EQ((*got)[2].shape, (std::vector<int64_t>{0, 4}));
  // No names: the job's whole table moves.
  auto all = ca->SendTensors("j", {}, b->endpoint(), "k2");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->bytes, big.size() + 24);
  auto got_all = cb->GetTensors("k2", {"big", "empty", "ids"});
  ASSERT_TRUE(got_all.ok()) << got_all.status();
  EXPECT_EQ(std::memcmp((*got_all)[2].data, ids.data(), 24), 0);
  EXPECT_EQ(ca->SendTensors("j", {"nope"}, b->endpoint(), "k").status().code(),
            StatusCode::kNotFound);
  EXPECT_EQ(ca->SendTensors("j", {"big"}, "tcp://127.0.0.1:1", "k").status().code(),
            StatusCode::kDeadlineExceeded);

  auto text = HttpGet(b->metrics(), "/metrics");
  ASSERT_TRUE(text.ok());
  EXPECT_NE(
      text->find(
          "fleet_worker_transfer_bytes_total{dst=\"cuda:1\",kind=\"activations\",src=\"cuda:0\"} " +
          std::to_string(2 * (big.size() + 24))),  // two sends
      std::string::npos)
      << *text;
  EXPECT_EQ(a->Terminate(), 0);
  EXPECT_EQ(b->Terminate(), 0);
}

TEST(Worker, SendsTensorsToAPeerOverShm) { SendBetweenWorkers(true); }
TEST(Worker, SendsTensorsToAPeerOverTcp) { SendBetweenWorkers(false); }

// A peer that dies while a worker waits on it fails the request at once (the connection
// dropped) instead of waiting out the 10-minute peer timeout; the error names the peer.
TEST(Worker, APeerThatDiesMidSendFailsTheSendInsteadOfHanging) {
  auto a = StartWorker({"--id", "cuda:1", "--capacity", "1mb"});
  auto b = StartWorker({"--id", "cuda:2", "--capacity", "1mb"});
  ASSERT_TRUE(a && b);
  ClientOptions o;
  o.timeout = std::chrono::seconds(60);  // far below the peer timeout, far above a clean failure
  auto ca = ConnectTo(*a, o);
  ASSERT_TRUE(ca);
  ASSERT_TRUE(ca->PutTensors("j", {Input(5)}).ok());
  ASSERT_TRUE(ca->SendTensors("j", {"x"}, b->endpoint(), "j").ok());  // a now knows b
  ClientOptions quick;
  quick.connect_timeout = std::chrono::seconds(2);
  auto cb = ConnectTo(*b, quick);  // idle while b dies
  ASSERT_TRUE(cb);
  kill(b->pid(), SIGSTOP);  // b keeps its connections but answers nothing
  auto sent = std::async(std::launch::async,
                         [&] { return ca->SendTensors("j", {"x"}, b->endpoint(), "j2"); });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // a waits on b
  kill(b->pid(), SIGKILL);
  auto s = sent.get();
  EXPECT_EQ(s.status().code(), StatusCode::kUnavailable) << s.status();
  EXPECT_NE(s.status().message().find("worker cuda:2"), std::string_view::npos) << s.status();
  EXPECT_NE(s.status().message().find("dropped"), std::string_view::npos) << s.status();
  // a is fine and serves on.
  EXPECT_TRUE(ca->GetTensors("j", {"x"}).ok());
  // A call on a connection that dropped while idle waits connect_timeout for it, then fails.
  Status idle = cb->Stats().status();
  EXPECT_EQ(idle.code(), StatusCode::kUnavailable) << idle;
  EXPECT_NE(idle.message().find("is down"), std::string_view::npos) << idle;
}

TEST(Worker, PipelinedAndStreamedRunsAreBitIdenticalToOneWorker) {
  const auto& m = Model();
  auto single = StartWorker({"--id", "cuda:0", "--capacity", "1mb"});
  auto a = StartWorker({"--id", "cuda:1", "--capacity", "1mb"});
  auto b = StartWorker({"--id", "cuda:2", "--capacity", "1mb"});
  ASSERT_TRUE(single && a && b);
  auto cs = ConnectTo(*single), ca = ConnectTo(*a), cb = ConnectTo(*b);
  ASSERT_TRUE(cs && ca && cb);
  std::vector<BlockStep> all;
  for (int i = 0; i < kDepth; ++i) {
    ASSERT_TRUE(cs->LoadBlockFromFile(m.Spec(), m.Block(i), m.file, m.specs[i]).ok());
    all.push_back({m.Block(i), ""});
  }
  // a holds blocks 0-1, b holds 2-3.
  for (int i = 0; i < 2; ++i)
    ASSERT_TRUE(ca->LoadBlockFromFile(m.Spec(), m.Block(i), m.file, m.specs[i]).ok());
  for (int i = 2; i < 4; ++i)
    ASSERT_TRUE(cb->LoadBlockFromWire(m.Spec(), m.Block(i), m.WireTensors(i)).ok());
  std::vector<double> x;
  const HostTensor in = Input(5, &x);

  ASSERT_TRUE(cs->PutTensors("s", {in}).ok());
  ASSERT_TRUE(cs->RunBlocks("s", "toy", all).ok());
  auto expected = GetX(*cs, "s");
  ASSERT_TRUE(expected.ok());
  const auto ref = m.Reference(x, 5, 0, kDepth);
  for (size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR((*expected)[i], ref[i], 1e-5);

  // Pipeline: activations cross from a to b.
  ASSERT_TRUE(ca->PutTensors("p", {in}).ok());
  ASSERT_TRUE(ca->RunBlocks("p", "toy", {{m.Block(0), ""}, {m.Block(1), ""}}).ok());
  ASSERT_TRUE(ca->SendTensors("p", {"x"}, b->endpoint(), "p").ok());
  ASSERT_TRUE(cb->RunBlocks("p", "toy", {{m.Block(2), ""}, {m.Block(3), ""}}).ok());
  auto piped = GetX(*cb, "p");
  ASSERT_TRUE(piped.ok());
  EXPECT_EQ(std::memcmp(piped->data(), expected->data(), expected->size() * 4), 0);

  // Stream: b pulls blocks 0-1 from a (shm, zero copy), prefetching while it computes.
  ASSERT_TRUE(cb->PutTensors("st", {in}).ok());
  auto run = cb->RunBlocks("st", "toy",
                           {{m.Block(0), a->endpoint()},
                            {m.Block(1), a->endpoint()},
                            {m.Block(2), ""},
                            {m.Block(3), ""}},
                           /*prefetch_depth=*/2);
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_EQ(run->blocks_run, 4u);
  EXPECT_EQ(run->streamed_bytes, 2u * (kDim * kDim + kDim) * 4);
  auto streamed = GetX(*cb, "st");
  ASSERT_TRUE(streamed.ok());
  EXPECT_EQ(std::memcmp(streamed->data(), expected->data(), expected->size() * 4), 0);
  // Leases were released: a can evict what it streamed.
  auto bad = cb->RunBlocks("st", "toy", {{m.Block(3), a->endpoint()}});
  EXPECT_EQ(bad.status().code(), StatusCode::kNotFound) << bad.status();

  // A lease pins the donor's block until released.
  auto fetched = cb->FetchWeights("toy", m.Block(2));
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  ASSERT_TRUE(fetched->lease != 0);  // shm: zero copy into b's arena
  ASSERT_EQ(fetched->tensors.size(), 2u);
  EXPECT_EQ(std::memcmp(fetched->tensors[0].data, m.b[2].data(), kDim * 4),
            0);  // ".bias" sorts first
  EXPECT_EQ(cb->EvictBlock("toy", m.Block(2)).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(cb->ReleaseWeights(fetched->lease).ok());
  EXPECT_TRUE(cb->EvictBlock("toy", m.Block(2)).ok());
  auto text = HttpGet(b->metrics(), "/metrics");
  ASSERT_TRUE(text.ok());
  EXPECT_NE(
      text->find(
          "fleet_worker_transfer_bytes_total{dst=\"cuda:2\",kind=\"weights\",src=\"cuda:1\"}"),
      std::string::npos);
  EXPECT_NE(text->find("fleet_worker_block_compute_duration_seconds_count{block=\"linear_blocks."
                       "0\",device=\"cuda:2\",model=\"toy\"} 1"),
            std::string::npos);
}

TEST(Worker, RunConstantInputsAreCachedUntilEndRun) {
  const auto& m = Model();
  auto w = StartWorker({"--id", "cpu", "--capacity", "1mb"});
  ASSERT_TRUE(w);
  auto c = ConnectTo(*w);
  ASSERT_TRUE(c->LoadBlockFromFile(m.Spec(), m.Block(0), m.file, m.specs[0]).ok());
  std::vector<double> x;
  HostTensor in = Input(2, &x);
  // "x" is cached for run r1; job j2 never receives it but finds it through the run.
  ASSERT_TRUE(c->PutTensors("j1", {in}, "r1", {"x"}).ok());
  ASSERT_TRUE(
      c->PutTensors("j2", {HostTensor::Copy("other", wire::DType::F32, {1}, &x[0], 0)}, "r1")
          .ok() == false);
  float one = 1.f;
  ASSERT_TRUE(
      c->PutTensors("j2", {HostTensor::Copy("other", wire::DType::F32, {1}, &one, 4)}).ok());
  ASSERT_TRUE(c->RunBlocks("j2", "toy", {{m.Block(0), ""}}, 1, "r1").ok());
  auto y = GetX(*c, "j2");
  ASSERT_TRUE(y.ok()) << y.status();
  const auto ref = m.Reference(x, 2, 0, 1);
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR((*y)[i], ref[i], 1e-5);
  ASSERT_TRUE(c->EndRun("r1").ok());
  ASSERT_TRUE(
      c->PutTensors("j3", {HostTensor::Copy("other", wire::DType::F32, {1}, &one, 4)}).ok());
  EXPECT_EQ(c->RunBlocks("j3", "toy", {{m.Block(0), ""}}, 1, "r1").status().code(),
            StatusCode::kInvalidArgument);
}

// Garbage of every kind; after each the worker still answers a well-behaved client.
// Closed connections leave the worker's table of greeted connections (it used to forget every
// connection, the coordinator's included, once a Hello storm filled it), and a Hello past
// --max-connections is refused while established clients keep working.
TEST(Worker, ClosedConnectionsLeaveTheTableAndEstablishedOnesStay) {
  auto w = StartWorker({"--id", "cuda:3", "--capacity", "1mb", "--max-connections", "8"});
  ASSERT_TRUE(w);
  auto established = ConnectTo(*w);
  ASSERT_TRUE(established);
  auto connections = [&] { return MetricValue(*w, "fleet_worker_connections{device=\"cuda:3\"}"); };
  auto settles_at = [&](double want) {
    for (int i = 0; i < 100 && connections() != want; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return connections();
  };
  for (int i = 0; i < 40; ++i) {  // five times the table's size, one connection at a time
    auto churn = ConnectTo(*w);
    ASSERT_TRUE(churn) << i;
  }
  EXPECT_EQ(settles_at(1), 1) << "every closed connection left the table";
  auto stats = established->Stats();
  EXPECT_TRUE(stats.ok()) << stats.status();

  std::vector<std::unique_ptr<WorkerClient>> open;
  for (int i = 0; i < 7; ++i) {
    open.push_back(ConnectTo(*w));
    ASSERT_TRUE(open.back()) << i;
  }
  EXPECT_EQ(connections(), 8);
  auto refused = WorkerClient::Connect(w->endpoint(), {});
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("--max-connections"), std::string_view::npos);
  stats = established->Stats();
  EXPECT_TRUE(stats.ok()) << stats.status();
  open.clear();
  EXPECT_EQ(settles_at(1), 1);
  EXPECT_TRUE(ConnectTo(*w)) << "room again once connections closed";
}

// Jobs and run constants a client left behind are dropped after --job-ttl, and a dropped job's
// id cannot be brought back (a RunBlocks finishing after DropJob used to recreate its job).
TEST(Worker, IdleJobsExpireAndDroppedJobsStayDropped) {
  auto w = StartWorker({"--id", "cuda:3", "--capacity", "1mb", "--job-ttl", "1s"});
  ASSERT_TRUE(w);
  auto c = ConnectTo(*w);
  ASSERT_TRUE(c);
  auto activations = [&] { return MetricValue(*w, "fleet_worker_activation_bytes{device=\"cuda:3\"}"); };
  ASSERT_TRUE(c->PutTensors("left-behind", {Input(3)}, "run-1", {"x"}).ok());
  EXPECT_GT(activations(), 0);
  for (int i = 0; i < 100 && activations() != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(activations(), 0) << "the job and its run constant expired";
  EXPECT_EQ(c->GetTensors("left-behind", {"x"}).status().code(), StatusCode::kNotFound);

  // A job in use stays: every request touches it.
  ASSERT_TRUE(c->PutTensors("busy", {Input(3)}).ok());
  for (int i = 0; i < 6; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    ASSERT_TRUE(c->PutTensors("busy", {Input(3)}).ok()) << i;
  }
  EXPECT_TRUE(c->GetTensors("busy", {"x"}).ok());

  ASSERT_TRUE(c->DropJob("busy").ok());
  Status late = c->PutTensors("busy", {Input(3)});
  EXPECT_EQ(late.code(), StatusCode::kFailedPrecondition) << late;
  EXPECT_NE(late.message().find("was dropped"), std::string_view::npos) << late;
  EXPECT_EQ(c->GetTensors("busy", {"x"}).status().code(), StatusCode::kNotFound);
}

TEST(Worker, SurvivesGarbageAndKeepsServing) {
  auto w = StartWorker({"--id", "cuda:3", "--capacity", "1mb", "--max-message-bytes", "1mb"});
  ASSERT_TRUE(w);
  auto good = ConnectTo(*w);
  ASSERT_TRUE(good);
  auto healthy = [&] {
    auto s = good->Stats();
    EXPECT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->device, "cuda:3");
  };
  auto error_reply = [](const transport::Frames& frames) -> Status {
    if (frames.empty()) return InternalError("no frames");
    std::vector<uint64_t> aligned((frames[0].size() + 7) / 8);
    std::memcpy(aligned.data(), frames[0].data(), frames[0].size());
    auto r = protocol::VerifyWorkerResponse(
        {reinterpret_cast<const uint8_t*>(aligned.data()), frames[0].size()}, {});
    if (!r.ok()) return r.status();
    if ((*r)->body_type() != wire::WorkerResponseBody::Error) return Status::OK();
    return protocol::FromWireError((*r)->body_as_Error());
  };
  auto garbage = ConnectTo(*w);
  ASSERT_TRUE(garbage);
  std::mt19937_64 rng(3);
  for (int i = 0; i < 50; ++i) {
    std::string junk(rng() % 300, '\0');
    for (auto& ch : junk) ch = static_cast<char>(rng());
    transport::Frames f;
    f.emplace_back(junk);
    auto reply = garbage->TEST_RawCall(std::move(f));
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_FALSE(error_reply(*reply).ok());
  }
  healthy();
  // A truncated LoadBlockRequest.
  {
    flatbuffers::FlatBufferBuilder fbb;
    auto body = wire::CreateLoadBlockRequest(fbb, fbb.CreateString("toy"),
                                             fbb.CreateString("linear"), fbb.CreateString("{}"),
                                             wire::DType::F32, fbb.CreateString("b"));
    protocol::FinishRequest(fbb, 5, wire::WorkerRequestBody::LoadBlockRequest, body.Union());
    for (size_t cut : {size_t{8}, size_t{fbb.GetSize() / 2}, size_t{fbb.GetSize() - 12}}) {
      transport::Frames f;
      f.emplace_back(fbb.GetBufferPointer(), cut);
      auto reply = garbage->TEST_RawCall(std::move(f));
      ASSERT_TRUE(reply.ok());
      Status s = error_reply(*reply);
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
    }
  }
  healthy();
  // A descriptor that names a data frame the message does not have, and one that lies about nbytes.
  {
    flatbuffers::FlatBufferBuilder fbb;
    const int64_t shape[] = {4};
    auto d = wire::CreateTensorDesc(fbb, fbb.CreateString("x"), wire::DType::F32,
                                    fbb.CreateVector(shape, 1), 16, wire::PayloadKind::Frame, 3);
    auto body = wire::CreatePutTensorsRequest(fbb, fbb.CreateString("j"), fbb.CreateVector(&d, 1));
    protocol::FinishRequest(fbb, 6, wire::WorkerRequestBody::PutTensorsRequest, body.Union());
    transport::Frames f;
    f.emplace_back(fbb.GetBufferPointer(), fbb.GetSize());
    f.emplace_back(std::string(16, 'x'));
    auto reply = garbage->TEST_RawCall(std::move(f));
    ASSERT_TRUE(reply.ok());
    Status s = error_reply(*reply);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find("data frame 3"), std::string_view::npos) << s;
  }
  // More data frames than a request may have: the worker keeps the first ones only, drops the
  // rest as they arrive and says so (a million empty frames would otherwise be a million
  // allocations held until the message is complete).
  {
    flatbuffers::FlatBufferBuilder fbb;
    auto body = wire::CreatePutTensorsRequest(fbb, fbb.CreateString("j"));
    protocol::FinishRequest(fbb, 8, wire::WorkerRequestBody::PutTensorsRequest, body.Union());
    transport::Frames f;
    f.emplace_back(fbb.GetBufferPointer(), fbb.GetSize());
    for (int i = 0; i < 70000; ++i) f.emplace_back();  // max_tensors is 65536
    auto reply = garbage->TEST_RawCall(std::move(f));
    ASSERT_TRUE(reply.ok());
    Status s = error_reply(*reply);
    EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s;
    EXPECT_NE(s.message().find("more than 65536 data frames"), std::string_view::npos) << s;
  }
  healthy();
  // A shm reservation this client was never granted.
  {
    flatbuffers::FlatBufferBuilder fbb;
    const int64_t shape[] = {4};
    auto d = wire::CreateTensorDesc(fbb, fbb.CreateString("x"), wire::DType::F32,
                                    fbb.CreateVector(shape, 1), 16, wire::PayloadKind::ShmReserved,
                                    0, 4096, 999);
    auto body = wire::CreatePutTensorsRequest(fbb, fbb.CreateString("j"), fbb.CreateVector(&d, 1));
    protocol::FinishRequest(fbb, 7, wire::WorkerRequestBody::PutTensorsRequest, body.Union());
    transport::Frames f;
    f.emplace_back(fbb.GetBufferPointer(), fbb.GetSize());
    auto reply = garbage->TEST_RawCall(std::move(f));
    ASSERT_TRUE(reply.ok());
    EXPECT_EQ(error_reply(*reply).code(), StatusCode::kOutOfRange);
  }
  healthy();
  // Wrong protocol version and a request before Hello, on raw sockets.
  {
    zmq::socket_t raw(transport::Context(), zmq::socket_type::dealer);
    ASSERT_TRUE(transport::ConfigureSocket(raw, {}).ok());
    ASSERT_TRUE(transport::Connect(raw, w->endpoint()).ok());
    flatbuffers::FlatBufferBuilder fbb;
    protocol::FinishRequest(fbb, 1, wire::WorkerRequestBody::StatsRequest,
                            wire::CreateStatsRequest(fbb).Union());
    transport::Frames f;
    f.emplace_back(fbb.GetBufferPointer(), fbb.GetSize());
    ASSERT_TRUE(transport::SendFrames(raw, f).ok());
    auto reply = transport::RecvFrames(raw, std::chrono::seconds(10));
    ASSERT_TRUE(reply.ok());
    Status s = error_reply(*reply);
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s;
    EXPECT_NE(s.message().find("Hello"), std::string_view::npos);

    protocol::HelloInfo future;
    future.major = protocol::kMajor + 1;
    future.peer_name = "from the future";
    flatbuffers::FlatBufferBuilder hb;
    protocol::FinishRequest(hb, 2, wire::WorkerRequestBody::Hello,
                            protocol::BuildHello(hb, future).Union());
    transport::Frames h;
    h.emplace_back(hb.GetBufferPointer(), hb.GetSize());
    ASSERT_TRUE(transport::SendFrames(raw, h).ok());
    reply = transport::RecvFrames(raw, std::chrono::seconds(10));
    ASSERT_TRUE(reply.ok());
    s = error_reply(*reply);
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s;
    EXPECT_NE(s.message().find("version mismatch"), std::string_view::npos) << s;
  }
  healthy();
  // Oversized: a 2 MiB frame to a worker that accepts 1 MiB closes that connection only.
  {
    transport::Frames f;
    f.emplace_back(std::string(2 << 20, 'x'));
    auto r = ConnectTo(*w);
    ASSERT_TRUE(r);
    ClientOptions quick;
    quick.timeout = std::chrono::milliseconds(500);
    auto reply = r->TEST_RawCall(std::move(f));
    EXPECT_FALSE(reply.ok());
  }
  healthy();
  auto text = HttpGet(w->metrics(), "/metrics");
  ASSERT_TRUE(text.ok());
  EXPECT_NE(
      text->find(
          "fleet_worker_requests_total{device=\"cuda:3\",outcome=\"rejected\",type=\"Unknown\"}"),
      std::string::npos);
  EXPECT_EQ(w->Terminate(), 0);
}

TEST(Worker, SigtermExitsCleanlyAndUnlinksTheArena) {
  auto w = StartWorker({"--id", "cpu", "--capacity", "1mb"});
  ASSERT_TRUE(w);
  const std::string arena = "/dev/shm/" + w->arena();
  struct stat st {};
  EXPECT_EQ(stat(arena.c_str(), &st), 0);
  EXPECT_EQ(w->Terminate(), 0);
  EXPECT_NE(stat(arena.c_str(), &st), 0);
}

TEST(Worker, RegistersAndSendsHeartbeats) {
  zmq::socket_t coordinator(transport::Context(), zmq::socket_type::router);
  ASSERT_TRUE(transport::ConfigureSocket(coordinator, {}).ok());
  auto ep = transport::Bind(coordinator, "tcp://127.0.0.1:*");
  ASSERT_TRUE(ep.ok());
  auto w = StartWorker({"--id", "cuda:5", "--capacity", "1mb", "--coordinator", *ep,
                        "--heartbeat-interval", "100ms"});
  ASSERT_TRUE(w);
  auto next = [&]() -> const wire::WorkerEvent* {
    static std::vector<uint64_t> buf;
    auto frames = transport::RecvFrames(coordinator, std::chrono::seconds(10));
    if (!frames.ok() || frames->size() != 2) return nullptr;
    buf.assign(((*frames)[1].size() + 7) / 8, 0);
    std::memcpy(buf.data(), (*frames)[1].data(), (*frames)[1].size());
    auto e = protocol::VerifyWorkerEvent(
        {reinterpret_cast<const uint8_t*>(buf.data()), (*frames)[1].size()}, {});
    return e.ok() ? *e : nullptr;
  };
  const auto* reg = next();
  ASSERT_NE(reg, nullptr);
  ASSERT_EQ(reg->body_type(), wire::WorkerEventBody::Register);
  EXPECT_EQ(reg->body_as_Register()->listen()->str(), w->endpoint());
  EXPECT_EQ(reg->body_as_Register()->device()->str(), "cuda:5");
  EXPECT_EQ(reg->body_as_Register()->capacity_bytes(), 1u << 20);
  EXPECT_EQ(reg->body_as_Register()->hello()->major(), protocol::kMajor);
  EXPECT_EQ(reg->body_as_Register()->metrics()->str(), w->metrics());
  uint64_t last = 0;
  for (int i = 0; i < 3; ++i) {
    const auto* beat = next();
    ASSERT_NE(beat, nullptr);
    ASSERT_EQ(beat->body_type(), wire::WorkerEventBody::Heartbeat);
    EXPECT_GT(beat->body_as_Heartbeat()->sequence(), last);
    last = beat->body_as_Heartbeat()->sequence();
    EXPECT_EQ(beat->body_as_Heartbeat()->stats()->device()->str(), "cuda:5");
  }
  // Every 5th beat is followed by a Register again, so a restarted coordinator finds the worker.
  bool registered_again = false;
  for (int i = 0; i < 4 && !registered_again; ++i) {
    const auto* event = next();
    ASSERT_NE(event, nullptr);
    registered_again = event->body_type() == wire::WorkerEventBody::Register;
  }
  EXPECT_TRUE(registered_again);
}

TEST(Worker, CurveAdmitsTheClusterKeyAndRefusesOthers) {
  const fs::path dir = fs::temp_directory_path() / ("fleet-curve-w-" + std::to_string(getpid()));
  fs::create_directories(dir);
  auto cluster = transport::GenerateKeyPair();
  auto stranger = transport::GenerateKeyPair();
  ASSERT_TRUE(cluster.ok() && stranger.ok());
  ASSERT_TRUE(
      transport::WriteKeyFile((dir / "cluster.key").string(), cluster->second, "cluster secret")
          .ok());
  auto w = StartWorker({"--id", "cpu", "--capacity", "1mb", "--curve-secret-key-file",
                        (dir / "cluster.key").string()});
  ASSERT_TRUE(w);
  transport::CurveConfig good{cluster->second, cluster->first, cluster->first};
  ClientOptions o;
  o.curve = &good;
  o.timeout = std::chrono::seconds(3);
  auto c = WorkerClient::Connect(w->endpoint(), o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(((*c)->capabilities() & protocol::kCapCurve) != 0);
  EXPECT_TRUE((*c)->Stats().ok());

  transport::CurveConfig wrong{stranger->second, stranger->first, cluster->first};
  o.curve = &wrong;
  // Refused handshakes fail the call at once, saying so (not a wait for the timeout).
  auto refused = WorkerClient::Connect(w->endpoint(), o);
  EXPECT_EQ(refused.status().code(), StatusCode::kUnavailable) << refused.status();
  EXPECT_NE(refused.status().message().find("handshake"), std::string_view::npos) << refused.status();
  ClientOptions plain;
  plain.timeout = std::chrono::seconds(60);
  refused = WorkerClient::Connect(w->endpoint(), plain);
  EXPECT_EQ(refused.status().code(), StatusCode::kUnavailable) << refused.status();
  EXPECT_NE(refused.status().message().find("handshake"), std::string_view::npos) << refused.status();
  // Still serving the right key.
  EXPECT_TRUE((*c)->Stats().ok());
  fs::remove_all(dir);
}

}  // namespace
}  // namespace fleet::worker
