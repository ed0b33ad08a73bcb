// `fleet up`: a local cluster (a coordinator and one worker per device, or emulated devices),
// and the demo behind scripts/run: a generated Flux model loaded with a DisTorch2 allocation
// string across the devices, sampling steps in stream, pipeline and auto mode, per-step times
// and bytes moved, and a bit-for-bit check against `fleet run-local`.
#include <signal.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "command.h"
#include "fleet/config/bytes.h"
#include "fleet/config/options.h"
#include "fleet/coordinator/job_client.h"
#include "fleet/device/device.h"
#include "fleet/formats/model_file.h"
#include "fleet/placement/placement.h"
#include "fleet/protocol/protocol.h"
#include "process.h"

namespace fleet::cli {
namespace {

namespace fs = std::filesystem;
using coordinator::HostTensor;

struct UpOptions {
  std::string emulate;           // "cuda:0=1gb,cuda:1=1gb,cpu=4gb"; empty: this machine's devices
  std::string dir;               // logs, the demo model
  std::string model_root;        // empty: <dir>/models
  bool ephemeral = false;        // let the OS pick every port (tests)
  bool demo = false;             // run the demo, then stop
  bool keep_running = false;     // after the demo, serve until Ctrl-C
  int64_t steps = 4;
  std::string expert = "cuda:0,40%;cuda:1,35%;cpu,*";
  std::string compute_device = "cuda:0";
  std::string worker_threads = "2";
  std::string heartbeat_timeout = "3s";
};

volatile sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }

struct Cluster {
  Child coordinator;
  std::vector<Child> workers;
  std::string listen, http, metrics, register_endpoint;
  std::vector<std::string> worker_lines;

  void Stop() {
    for (auto& w : workers) w.Stop();
    coordinator.Stop();
  }
};

StatusOr<std::vector<device::DeviceInfo>> Devices(const UpOptions& o) {
  if (o.emulate.empty()) return device::DiscoverAll();
  return placement::ParseDeviceTable(o.emulate);
}

StatusOr<Cluster> StartCluster(const UpOptions& o, const std::string& root) {
  const std::string bin = SelfDirectory();
  FLEET_ASSIGN_OR_RETURN(auto devices, Devices(o));
  Cluster c;
  std::vector<std::string> argv = {bin + "/fleet-coordinator", "--model-root", root,
                                   "--heartbeat-timeout", o.heartbeat_timeout};
  if (o.ephemeral) {
    for (std::string a : {"--listen=tcp://127.0.0.1:*", "--register-listen=tcp://127.0.0.1:*",
                          "--http-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"}) {
      argv.push_back(a);
    }
  }
  FLEET_ASSIGN_OR_RETURN(c.coordinator, Child::Spawn(argv, o.dir + "/coordinator.log"));
  FLEET_ASSIGN_OR_RETURN(auto ready, c.coordinator.WaitReady("fleet-coordinator ready", std::chrono::seconds(30)));
  c.listen = ready["listen"];
  c.http = ready["http"];
  c.metrics = ready["metrics"];
  c.register_endpoint = ready["register"];
  for (const auto& d : devices) {
    std::string id = d.id.ToString();
    std::string backing = o.emulate.empty() ? id : "cpu";
    std::string log = o.dir + "/worker-" + id + ".log";
    for (auto& ch : log) ch = ch == ':' ? '-' : ch;
    std::vector<std::string> wargv = {bin + "/fleet-worker", "--id", id, "--backing", backing,
                                      "--total", std::to_string(d.total_bytes), "--capacity",
                                      std::to_string(d.capacity_bytes), "--listen", "tcp://127.0.0.1:*",
                                      "--model-root", root, "--coordinator", c.register_endpoint,
                                      "--compute-threads", o.worker_threads};
    if (o.ephemeral) wargv.push_back("--metrics-listen=127.0.0.1:0");
    FLEET_ASSIGN_OR_RETURN(Child w, Child::Spawn(wargv, log));
    FLEET_ASSIGN_OR_RETURN(auto wready, w.WaitReady("fleet-worker ready", std::chrono::seconds(60)));
    c.worker_lines.push_back(id + " pid=" + std::to_string(w.pid()) + " listen=" + wready["listen"] +
                             " metrics=" + wready["metrics"] + " capacity=" + std::to_string(d.capacity_bytes));
    c.workers.push_back(std::move(w));
  }
  // Wait until the coordinator sees every worker.
  FLEET_ASSIGN_OR_RETURN(auto client, coordinator::JobClient::Connect(c.listen, std::chrono::seconds(10)));
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (true) {
    FLEET_ASSIGN_OR_RETURN(auto st, client->Cluster());
    size_t up = 0;
    for (const auto& w : st.workers) up += w.up ? 1 : 0;
    if (up >= devices.size()) break;
    if (std::chrono::steady_clock::now() > deadline) {
      return DeadlineExceededError("only " + std::to_string(up) + " of " + std::to_string(devices.size()) +
                                   " workers registered (logs in " + o.dir + ")");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return c;
}

// Runs a `fleet` subcommand of this same binary and waits for it.
Status RunSelf(const std::vector<std::string>& args, const std::string& log) {
  std::vector<std::string> argv = {SelfDirectory() + "/fleet"};
  argv.insert(argv.end(), args.begin(), args.end());
  FLEET_ASSIGN_OR_RETURN(Child c, Child::Spawn(argv, log));
  int rc = c.Wait(std::chrono::minutes(10));
  if (rc != 0) return InternalError("fleet " + args[0] + " failed (" + std::to_string(rc) + "):\n" + TailOfFile(log, 10));
  return Status();
}

StatusOr<std::vector<HostTensor>> ReadTensors(const std::string& path) {
  FLEET_ASSIGN_OR_RETURN(auto file, formats::ModelFile::Open(path));
  std::vector<HostTensor> out;
  for (const auto& t : file->tensors()) {
    FLEET_ASSIGN_OR_RETURN(auto dtype, protocol::ParseDType(t.dtype));
    auto bytes = file->Data(t);
    out.push_back(HostTensor::Copy(t.name, dtype, t.shape, bytes.data(), bytes.size()));
  }
  return out;
}

float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t F32ToBf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// One Euler step of a flow-matching sampler: x <- x + (sigma_next - sigma) * out, in float32,
// stored back in x's dtype (f32 or bf16).
Status EulerStep(HostTensor& x, const HostTensor& out, float dt) {
  if (x.nbytes != out.nbytes || x.dtype != out.dtype) return InvalidArgumentError("x and out differ in size or dtype");
  std::vector<uint8_t> next(x.nbytes);
  size_t n = x.dtype == wire::DType::BF16 ? x.nbytes / 2 : x.nbytes / 4;
  for (size_t i = 0; i < n; ++i) {
    if (x.dtype == wire::DType::BF16) {
      uint16_t a, b;
      std::memcpy(&a, x.data + 2 * i, 2);
      std::memcpy(&b, out.data + 2 * i, 2);
      uint16_t r = F32ToBf16(Bf16ToF32(a) + dt * Bf16ToF32(b));
      std::memcpy(next.data() + 2 * i, &r, 2);
    } else if (x.dtype == wire::DType::F32) {
      float a, b;
      std::memcpy(&a, x.data + 4 * i, 4);
      std::memcpy(&b, out.data + 4 * i, 4);
      float r = a + dt * b;
      std::memcpy(next.data() + 4 * i, &r, 4);
    } else {
      return UnimplementedError("the demo sampler handles f32 and bf16 latents");
    }
  }
  x = HostTensor::Own(x.name, x.dtype, x.shape, std::move(next));
  return Status();
}

bool SameBytes(const HostTensor& a, const HostTensor& b) {
  return a.nbytes == b.nbytes && a.shape == b.shape && a.dtype == b.dtype &&
         std::memcmp(a.data, b.data, a.nbytes) == 0;
}

struct ModeResult {
  std::string mode;
  std::vector<double> step_ms;
  uint64_t weight_bytes = 0, activation_bytes = 0;
  bool first_step_identical = false;
  std::vector<HostTensor> outputs;  // every step's "out"
  std::string plan_text;
};

Status RunDemo(const UpOptions& o, const std::string& root, Cluster& cluster) {
  const std::string model_rel = "demo-flux.safetensors";
  const std::string model_path = root + "/" + model_rel;
  std::printf("\n== generating a demo Flux model (random weights, real key names) and inputs\n");
  FLEET_RETURN_IF_ERROR(RunSelf({"gen-model", "--preset", "small", "--double", "4", "--single", "8", "--dtype",
                                 "bf16", "--seed", "7", model_path},
                                o.dir + "/gen.log"));
  const std::string inputs_path = o.dir + "/demo-inputs.safetensors";
  FLEET_RETURN_IF_ERROR(RunSelf({"gen-inputs", model_path, "--height", "64", "--width", "64", "--txt-len", "64",
                                 "--seed", "1", inputs_path},
                                o.dir + "/gen.log"));
  std::printf("   %s (%s)\n", model_path.c_str(), config::FormatBytes(fs::file_size(model_path)).c_str());
  std::printf("\n== single-process reference (fleet run-local)\n");
  const std::string ref_path = o.dir + "/demo-reference.safetensors";
  auto ref_start = std::chrono::steady_clock::now();
  FLEET_RETURN_IF_ERROR(
      RunSelf({"run-local", model_path, "--inputs", inputs_path, "--out", ref_path}, o.dir + "/run-local.log"));
  std::printf("   %.0f ms including process start\n",
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - ref_start).count());
  FLEET_ASSIGN_OR_RETURN(auto reference, ReadTensors(ref_path));
  FLEET_ASSIGN_OR_RETURN(auto inputs, ReadTensors(inputs_path));

  FLEET_ASSIGN_OR_RETURN(auto client, coordinator::JobClient::Connect(cluster.listen, std::chrono::minutes(10)));
  std::vector<ModeResult> results;
  const std::vector<std::string> constants = {"context", "y", "guidance"};
  for (coordinator::ExecMode mode :
       {coordinator::ExecMode::kStream, coordinator::ExecMode::kPipeline, coordinator::ExecMode::kAuto}) {
    ModeResult r;
    r.mode = std::string(coordinator::ExecModeName(mode));
    coordinator::ModelSpec spec;
    spec.path = model_rel;
    spec.compute_device = o.compute_device;
    spec.expert_mode_allocations = o.expert;
    spec.mode = mode;
    spec.eject_models = true;
    if (results.empty()) {
      FLEET_ASSIGN_OR_RETURN(auto plan, client->Plan(spec));
      std::printf("\n== plan for '%s' (expert_mode_allocations %s)\n%s", o.expert.c_str(), o.expert.c_str(),
                  plan.text.c_str());
    }
    FLEET_ASSIGN_OR_RETURN(auto info, client->LoadModel("demo-" + r.mode, spec));
    nlohmann::json plan = nlohmann::json::parse(info.plan_json);
    std::printf("\n== mode %s: ", r.mode.c_str());
    for (const auto& line : plan["schedule"]["explanation"]) std::printf("\n   %s", line.get<std::string>().c_str());
    std::printf("\n");
    HostTensor x;
    for (const auto& t : inputs) {
      if (t.name == "x") x = t;
    }
    std::vector<float> sigmas;
    for (int64_t s = 0; s <= o.steps; ++s) sigmas.push_back(1.0f - static_cast<float>(s) / static_cast<float>(o.steps));
    std::string run_id = "demo-" + r.mode;
    for (int64_t s = 0; s < o.steps; ++s) {
      std::vector<HostTensor> step_inputs;
      for (const auto& t : inputs) {
        if (t.name == "x") {
          step_inputs.push_back(x);
        } else if (t.name == "timestep") {
          std::vector<float> ts(static_cast<size_t>(t.nbytes / 4), sigmas[s]);
          if (s == 0) {
            step_inputs.push_back(t);  // the generated timestep, as run-local saw it
          } else {
            step_inputs.push_back(HostTensor::Copy("timestep", wire::DType::F32, t.shape, ts.data(), t.nbytes));
          }
        } else if (s == 0) {
          step_inputs.push_back(t);  // constant inputs: first step only, cached afterwards
        }
      }
      FLEET_ASSIGN_OR_RETURN(auto result, client->Forward("demo-" + r.mode, step_inputs, run_id, constants,
                                                          s + 1 == o.steps));
      r.step_ms.push_back(result.step_seconds * 1e3);
      r.weight_bytes += result.weight_bytes;
      r.activation_bytes += result.activation_bytes;
      const HostTensor* out = nullptr;
      for (const auto& t : result.outputs) {
        if (t.name == "out") out = &t;
      }
      if (out == nullptr) return InternalError("Forward returned no 'out'");
      if (s == 0) {
        for (const auto& t : reference) {
          if (t.name == "out") r.first_step_identical = SameBytes(t, *out);
        }
      }
      r.outputs.push_back(*out);
      FLEET_RETURN_IF_ERROR(EulerStep(x, *out, sigmas[s + 1] - sigmas[s]));
    }
    FLEET_RETURN_IF_ERROR(client->UnloadModel("demo-" + r.mode));
    results.push_back(std::move(r));
  }

  std::printf("\n== results (%lld sampling steps, 64x64 latent, bf16; context cached after step 1)\n",
              static_cast<long long>(o.steps));
  std::printf("%-9s %-36s %12s %12s  %s\n", "mode", "step ms", "weights", "activations", "equals run-local");
  bool all_ok = true;
  for (const auto& r : results) {
    std::string times;
    for (double ms : r.step_ms) {
      char buf[16];
      std::snprintf(buf, sizeof(buf), "%.0f ", ms);
      times += buf;
    }
    bool same_steps = true;  // every step of every mode equals the stream run, byte for byte
    for (size_t s = 0; s < r.outputs.size(); ++s) same_steps = same_steps && SameBytes(r.outputs[s], results[0].outputs[s]);
    bool ok = r.first_step_identical && same_steps;
    all_ok = all_ok && ok;
    std::printf("%-9s %-36s %12s %12s  %s\n", r.mode.c_str(), times.c_str(),
                config::FormatBytes(r.weight_bytes).c_str(), config::FormatBytes(r.activation_bytes).c_str(),
                ok ? "yes, bit for bit (every step identical across modes)" : "NO");
  }
  if (!all_ok) return InternalError("a distributed run differed from the single-process reference");
  return Status();
}

int RunUp(const std::vector<std::string>& args) {
  UpOptions o;
  config::OptionSet set("fleet up",
                        "Start a local cluster: a coordinator and one worker per device (or emulated "
                        "devices); --demo runs the Flux demo and checks it against run-local.");
  set.Add("emulate", &o.emulate, "Emulated devices, e.g. cuda:0=1gb,cuda:1=1gb,cpu=4gb (cpu-backed workers)");
  set.Add("dir", &o.dir, "Directory for logs and the demo model (default: a new one under /tmp)");
  set.Add("model_root", &o.model_root, "Model root shared by the coordinator and workers (default: DIR/models)");
  set.Add("ephemeral", &o.ephemeral, "Bind every endpoint on a free port (for tests)");
  set.Add("demo", &o.demo, "Generate a demo Flux model, run stream/pipeline/auto steps, compare with run-local");
  set.Add("keep_running", &o.keep_running, "Serve until Ctrl-C (the default without --demo)");
  set.Add("steps", &o.steps, "Sampling steps per mode in the demo");
  set.Add("expert_mode_allocations", &o.expert, "DisTorch2 allocation string used by the demo");
  set.Add("compute_device", &o.compute_device, "Compute device of the demo");
  set.Add("worker_threads", &o.worker_threads, "libtorch intra-op threads per worker (fleet-worker --compute-threads)");
  set.Add("heartbeat_timeout", &o.heartbeat_timeout, "A worker silent this long is marked down (coordinator flag)");
  int parse_rc = 0;
  // No FLEET_* environment here: those variables configure the coordinator and workers it starts.
  auto positional =
      ParseFlags("fleet up", set, args, &parse_rc, [](const std::string&) { return std::optional<std::string>(); });
  if (!positional) return parse_rc;
  if (!positional->empty()) {
    return ReportError("fleet up", false, InvalidArgumentError("unexpected argument '" + (*positional)[0] + "'"), 2);
  }
  if (o.dir.empty()) o.dir = "/tmp/fleet-up-" + std::to_string(getpid());
  std::error_code ec;
  std::string root = o.model_root.empty() ? o.dir + "/models" : o.model_root;
  for (const std::string& d : {o.dir, root}) {
    fs::create_directories(d, ec);
    if (ec) {
      std::fprintf(stderr, "fleet up: cannot create %s: %s\n", d.c_str(), ec.message().c_str());
      return 2;
    }
  }
  signal(SIGINT, OnSignal);
  signal(SIGTERM, OnSignal);
  auto cluster = StartCluster(o, root);
  if (!cluster.ok()) {
    std::fprintf(stderr, "fleet up: %s\n", std::string(cluster.status().message()).c_str());
    return 1;
  }
  std::printf("fleet up ready listen=%s http=%s metrics=%s register=%s dir=%s\n", cluster->listen.c_str(),
              cluster->http.c_str(), cluster->metrics.c_str(), cluster->register_endpoint.c_str(), o.dir.c_str());
  for (const auto& line : cluster->worker_lines) std::printf("  worker %s\n", line.c_str());
  std::fflush(stdout);
  int rc = 0;
  if (o.demo) {
    Status s = RunDemo(o, root, *cluster);
    if (!s.ok()) {
      std::fprintf(stderr, "fleet up: demo failed: %s\n(logs in %s)\n", std::string(s.message()).c_str(), o.dir.c_str());
      rc = 1;
    }
  }
  if (!o.demo || o.keep_running) {
    std::printf("serving; Ctrl-C stops the cluster (logs in %s)\n", o.dir.c_str());
    std::fflush(stdout);
    while (!g_stop) {
      bool alive = cluster->coordinator.running();
      if (!alive) {
        std::fprintf(stderr, "fleet up: the coordinator exited (log: %s)\n", cluster->coordinator.log_path().c_str());
        rc = 1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
  cluster->Stop();
  return rc;
}

}  // namespace

FLEET_REGISTER_COMMAND(up, "Start a local cluster (coordinator + workers); --demo runs the Flux demo", RunUp);

}  // namespace fleet::cli
