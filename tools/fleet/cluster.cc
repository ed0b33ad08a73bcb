// The operator's commands against a running coordinator's control API (HTTP):
//
//   fleet status     health (live, ready and why not), version, workers up/down, models
//   fleet workers    one row per worker: device, backing, capacity, resident, up, heartbeat
//   fleet models     one row per model: name, family, state, bytes per device, mode
//   fleet load MODEL [--name N] [DisTorch2 inputs] [--mode M]   load, with progress and the plan
//   fleet unload NAME
//
// Each takes --coordinator URL (default http://127.0.0.1:7780, env FLEET_COORDINATOR), --token
// (env FLEET_TOKEN: the bearer token of the coordinator's --http-token-file), --json and
// --timeout (deadline of each connect and reply). Exit status: 0 done, 1 the coordinator could
// not be reached or refused, 2 bad flags. `fleet plan --coordinator` is in plan.cc.
#include <chrono>
#include <cstdio>
#include <future>
#include <nlohmann/json.hpp>
#include <thread>

#include "cluster.h"
#include "command.h"
#include "fleet/config/bytes.h"

namespace fleet::cli {

using json = nlohmann::ordered_json;

void AddClusterFlags(config::OptionSet& set, ClusterFlags* f) {
  set.Add("coordinator", &f->coordinator, "The coordinator's control API URL (its --http-listen)");
  set.Add("token", &f->token, "Bearer token the control API requires (its --http-token-file)");
  set.Add("timeout", &f->timeout, "Deadline for connecting and for each reply");
  set.Add("json", &f->json, "Print JSON instead of text");
}

std::vector<std::pair<std::string, int64_t>> InputSizeFlags::Given() const {
  std::vector<std::pair<std::string, int64_t>> out;
  for (auto [name, value] : {std::pair<const char*, int64_t>{"width", width},
                             {"height", height},
                             {"frames", frames},
                             {"batch", batch}}) {
    if (value != 0) out.emplace_back(name, value);
  }
  return out;
}

void AddInputSizeFlags(config::OptionSet& set, InputSizeFlags* f) {
  set.Add("width", &f->width,
          "Width of the images or video, for the activation estimate (0: the family's default)");
  set.Add("height", &f->height, "Height of the images or video (0: the family's default)");
  set.Add("frames", &f->frames, "Video frames (0: the family's default)");
  set.Add("batch", &f->batch, "Batch size (0: 1)");
}

StatusOr<HttpClient> ConnectCluster(const ClusterFlags& f) {
  return HttpClient::Create(f.coordinator, f.token, f.timeout.value);
}

namespace {

std::string Bytes(const json& v) { return config::FormatBytes(v.is_number() ? v.get<uint64_t>() : 0); }

int Print(const json& j) {
  std::printf("%s\n", j.dump(2).c_str());
  return 0;
}

// Parses flags and connects; nullopt with *rc set when the command must return.
struct Session {
  std::vector<std::string> positional;
  std::optional<HttpClient> client;
};

std::optional<Session> Open(const std::string& command, config::OptionSet& set, ClusterFlags& flags,
                            const std::vector<std::string>& args, size_t positional_count, const char* what,
                            int* rc) {
  auto positional = ParseFlags(command, set, args, rc);
  if (!positional) return std::nullopt;
  if (positional->size() != positional_count) {
    *rc = ReportError(command, flags.json,
                      InvalidArgumentError(positional_count == 0
                                               ? "unexpected argument '" + (*positional)[0] + "'"
                                               : std::string("expected ") + what + " (see " + command + " --help)"),
                      2);
    return std::nullopt;
  }
  auto client = ConnectCluster(flags);
  if (!client.ok()) {
    *rc = ReportError(command, flags.json, client.status(), 2);
    return std::nullopt;
  }
  return Session{std::move(*positional), std::move(*client)};
}

std::string Ago(double seconds) {
  char buf[32];
  if (seconds < 60) std::snprintf(buf, sizeof(buf), "%.1fs ago", seconds);
  else if (seconds < 3600) std::snprintf(buf, sizeof(buf), "%.0fm ago", seconds / 60);
  else std::snprintf(buf, sizeof(buf), "%.1fh ago", seconds / 3600);
  return buf;
}

std::string PerDevice(const json& bytes_per_device) {
  std::string out;
  for (const auto& [device, bytes] : bytes_per_device.items()) {
    out += (out.empty() ? "" : " ") + device + "=" + Bytes(bytes);
  }
  return out.empty() ? "-" : out;
}

std::string StateText(const json& m) {
  std::string state = m.value("state", "?");
  if (state == "loading" && m.value("bytes_total", 0ull) > 0) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), " %.0f%%", 100.0 * m.value("progress", 0.0));
    state += buf;
  }
  return state;
}

int RunStatus(const std::vector<std::string>& args) {
  ClusterFlags f;
  config::OptionSet set("fleet status", "Health, version, workers and models of a running coordinator.");
  AddClusterFlags(set, &f);
  int rc = 0;
  auto s = Open("fleet status", set, f, args, 0, "", &rc);
  if (!s) return rc;
  const HttpClient& c = *s->client;
  auto server = c.Call("GET", "/v2");
  if (!server.ok()) return ReportError("fleet status", f.json, server.status(), 1);
  auto live = c.Call("GET", "/v2/health/live", "", {503});
  auto ready = c.Call("GET", "/v2/health/ready", "", {503});
  auto workers = c.Call("GET", "/v2/workers");
  auto models = c.Call("GET", "/v2/models");
  for (const auto* r : {&live, &ready, &workers, &models}) {
    if (!r->ok()) return ReportError("fleet status", f.json, r->status(), 1);
  }
  int up = 0, down = 0;
  for (const auto& w : (*workers)["workers"]) (w.value("up", false) ? up : down) += 1;
  json out = {{"coordinator", c.url()},
              {"version", (*server).value("version", "")},
              {"live", (*live).value("live", false)},
              {"ready", (*ready).value("ready", false)}};
  if (ready->contains("reason")) out["reason"] = (*ready)["reason"];
  out["draining"] = (*ready).value("draining", false);
  out["workers"] = {{"up", up}, {"down", down}};
  json ms = json::array();
  for (const auto& m : (*models)["models"]) ms.push_back({{"name", m["name"]}, {"state", m["state"]}});
  out["models"] = ms;
  if (f.json) return Print(out);
  std::printf("coordinator  %s (tensorfleet %s)\n", c.url().c_str(), out["version"].get<std::string>().c_str());
  std::printf("live         %s\n", out["live"].get<bool>() ? "yes" : "no");
  std::printf("ready        %s%s%s\n", out["ready"].get<bool>() ? "yes" : "no",
              out.contains("reason") ? ": " : "",
              out.contains("reason") ? out["reason"].get<std::string>().c_str() : "");
  if (out["draining"].get<bool>()) std::printf("draining     yes (shutting down)\n");
  std::printf("workers      %d up, %d down\n", up, down);
  std::string names;
  for (const auto& m : (*models)["models"]) {
    names += (names.empty() ? "" : ", ") + m["name"].get<std::string>() + " (" + StateText(m) + ")";
  }
  std::printf("models       %zu loaded%s%s\n", ms.size(), names.empty() ? "" : ": ", names.c_str());
  return 0;
}

int RunWorkers(const std::vector<std::string>& args) {
  ClusterFlags f;
  config::OptionSet set("fleet workers", "The workers a running coordinator knows, one per row.");
  AddClusterFlags(set, &f);
  int rc = 0;
  auto s = Open("fleet workers", set, f, args, 0, "", &rc);
  if (!s) return rc;
  auto workers = s->client->Call("GET", "/v2/workers");
  if (!workers.ok()) return ReportError("fleet workers", f.json, workers.status(), 1);
  if (f.json) return Print((*workers)["workers"]);
  std::printf("%-10s %-8s %12s %12s %-5s %-14s %s\n", "id", "backing", "capacity", "resident", "state",
              "heartbeat", "endpoint");
  for (const auto& w : (*workers)["workers"]) {
    std::printf("%-10s %-8s %12s %12s %-5s %-14s %s\n", w.value("device", "?").c_str(),
                w.value("backing", "?").c_str(), Bytes(w["capacity_bytes"]).c_str(),
                Bytes(w["resident_bytes"]).c_str(), w.value("up", false) ? "up" : "down",
                Ago(w.value("last_seen_seconds", 0.0)).c_str(), w.value("endpoint", "").c_str());
  }
  return 0;
}

int RunModels(const std::vector<std::string>& args) {
  ClusterFlags f;
  config::OptionSet set("fleet models", "The models a running coordinator has loaded, one per row.");
  AddClusterFlags(set, &f);
  int rc = 0;
  auto s = Open("fleet models", set, f, args, 0, "", &rc);
  if (!s) return rc;
  auto models = s->client->Call("GET", "/v2/models");
  if (!models.ok()) return ReportError("fleet models", f.json, models.status(), 1);
  if (f.json) return Print((*models)["models"]);
  std::printf("%-24s %-8s %-12s %-9s %s\n", "name", "family", "state", "mode", "bytes per device");
  for (const auto& m : (*models)["models"]) {
    std::printf("%-24s %-8s %-12s %-9s %s\n", m.value("name", "?").c_str(), m.value("family", "?").c_str(),
                StateText(m).c_str(), m.value("mode", "?").c_str(), PerDevice(m["bytes_per_device"]).c_str());
  }
  return 0;
}

// The plan a load produced, as a table: where the bytes went and how each range runs.
void PrintLoadedPlan(const json& model) {
  const json& plan = model.contains("plan") ? model["plan"] : json::object();
  std::printf("%s: %s, %s, %s mode, compute device %s\n", model.value("name", "?").c_str(),
              model.value("family", "?").c_str(), model.value("state", "?").c_str(), model.value("mode", "?").c_str(),
              model.value("compute_device", "?").c_str());
  if (plan.empty()) return;
  std::printf("\n%-10s %-8s %12s %12s %6s\n", "device", "role", "weights", "capacity", "units");
  for (const auto& d : plan["devices"]) {
    std::printf("%-10s %-8s %12s %12s %6zu\n", d.value("id", "?").c_str(), d.value("role", "?").c_str(),
                Bytes(d["bytes"]).c_str(), Bytes(d["capacity_bytes"]).c_str(), d["units"].size());
  }
  if (plan.contains("expert_string")) std::printf("\nv2 Expert String: %s\n", plan["expert_string"].get<std::string>().c_str());
  if (plan.contains("schedule")) {
    std::printf("\nschedule:\n");
    for (const auto& line : plan["schedule"]["explanation"]) std::printf("  %s\n", line.get<std::string>().c_str());
  }
  for (const auto& w : plan.value("warnings", json::array())) std::printf("warning: %s\n", w.get<std::string>().c_str());
}

int RunLoad(const std::vector<std::string>& args) {
  ClusterFlags f;
  std::string name, compute_device = "cuda:0", donor_device = "cpu", expert, mode = "auto", dtype;
  std::string weight_dtype = "default", dequant_dtype = "default";
  double virtual_vram_gb = 4.0;
  bool eject_models = true, keep_loaded = true, progress = true;
  config::Duration load_timeout{std::chrono::minutes(30)};
  InputSizeFlags sizes;
  config::OptionSet set("fleet load MODEL",
                        "Load MODEL (a .safetensors or .gguf path under the coordinator's model roots) with "
                        "the DisTorch2 loader inputs (names and defaults of the ComfyUI node).");
  set.Add("name", &name, "Name of the loaded model (default: the file name without its extension)");
  set.Add("compute_device", &compute_device, "DisTorch2 compute_device: the device that runs the model");
  set.Add("virtual_vram_gb", &virtual_vram_gb, "DisTorch2 virtual_vram_gb: GiB of the model moved to the donors (0..128)");
  set.Add("donor_device", &donor_device, "DisTorch2 donor_device: donor(s), comma-separated");
  set.Add("expert_mode_allocations", &expert, "DisTorch2 expert string, e.g. 'cuda:0,4gb;cpu,*' (overrides virtual VRAM)");
  set.Add("eject_models", &eject_models, "DisTorch2 eject_models: evict other models first");
  set.Add("keep_loaded", &keep_loaded, "Keep this model's shares resident across model switches");
  set.Add("mode", &mode, "Execution: stream, pipeline or auto");
  set.Add("dtype", &dtype, "Compute dtype: float32, bfloat16, float16 (default: as stored)");
  set.Add("weight_dtype", &weight_dtype,
          "ComfyUI's weight_dtype: default, fp8_e4m3fn, fp8_e4m3fn_fast or fp8_e5m2 (keep the "
          "floating weights as fp8)");
  set.Add("dequant_dtype", &dequant_dtype,
          "ComfyUI-GGUF's dequant_dtype: default, target, float32, float16 or bfloat16 (the dtype "
          "GGUF weights expand into before the compute dtype)");
  set.Add("load_timeout", &load_timeout, "How long the load may take");
  set.Add("progress", &progress, "Show bytes loaded on stderr while the load runs");
  AddInputSizeFlags(set, &sizes);
  AddClusterFlags(set, &f);
  int rc = 0;
  auto s = Open("fleet load", set, f, args, 1, "one MODEL path", &rc);
  if (!s) return rc;
  const std::string& path = s->positional[0];
  if (name.empty()) {  // the coordinator's default name: the file's stem
    size_t slash = path.rfind('/');
    name = path.substr(slash == std::string::npos ? 0 : slash + 1);
    size_t dot = name.rfind('.');
    if (dot != std::string::npos && dot > 0) name = name.substr(0, dot);
  }
  json body = {{"path", path},
               {"compute_device", compute_device},
               {"virtual_vram_gb", virtual_vram_gb},
               {"donor_device", donor_device},
               {"expert_mode_allocations", expert},
               {"eject_models", eject_models},
               {"keep_loaded", keep_loaded},
               {"mode", mode}};
  if (!dtype.empty()) body["dtype"] = dtype;
  body["weight_dtype"] = weight_dtype;
  body["dequant_dtype"] = dequant_dtype;
  for (const auto& [size, value] : sizes.Given()) body[size] = value;
  const HttpClient& c = *s->client;
  const std::string target = "/v2/repository/models/" + UrlEncode(name) + "/load";
  auto start = std::chrono::steady_clock::now();
  auto load = std::async(std::launch::async, [&] { return c.Call("POST", target, body.dump(), {}, load_timeout.value); });
  // Progress: the model is listed (state loading, bytes_loaded) while the POST runs.
  const bool show = progress && !f.json;
  bool printed = false;
  while (load.wait_for(std::chrono::milliseconds(500)) != std::future_status::ready) {
    if (!show) continue;
    auto m = c.Call("GET", "/v2/models/" + UrlEncode(name));
    if (!m.ok() || m->value("state", "") != "loading") continue;
    std::fprintf(stderr, "\rloading %s: %s of %s (%.0f%%)   ", name.c_str(), Bytes((*m)["bytes_loaded"]).c_str(),
                 Bytes((*m)["bytes_total"]).c_str(), 100.0 * m->value("progress", 0.0));
    std::fflush(stderr);
    printed = true;
  }
  if (printed) std::fprintf(stderr, "\n");
  auto loaded = load.get();
  if (!loaded.ok()) return ReportError("fleet load", f.json, loaded.status(), 1);
  if (f.json) return Print(*loaded);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("loaded %s in %.1f s\n", name.c_str(), seconds);
  PrintLoadedPlan(*loaded);
  return 0;
}

int RunUnload(const std::vector<std::string>& args) {
  ClusterFlags f;
  config::OptionSet set("fleet unload NAME", "Unload model NAME from every worker.");
  AddClusterFlags(set, &f);
  int rc = 0;
  auto s = Open("fleet unload", set, f, args, 1, "one model NAME", &rc);
  if (!s) return rc;
  const std::string& name = s->positional[0];
  auto r = s->client->Call("POST", "/v2/repository/models/" + UrlEncode(name) + "/unload");
  if (!r.ok()) return ReportError("fleet unload", f.json, r.status(), 1);
  if (f.json) return Print(*r);
  std::printf("unloaded %s\n", name.c_str());
  return 0;
}

}  // namespace

FLEET_REGISTER_COMMAND(status, "Health, version, workers and models of a running coordinator", RunStatus);
FLEET_REGISTER_COMMAND(workers, "The workers of a running cluster (table or --json)", RunWorkers);
FLEET_REGISTER_COMMAND(models, "The models loaded on a running cluster (table or --json)", RunModels);
FLEET_REGISTER_COMMAND(load, "Load a model on a running cluster with DisTorch2 allocation inputs", RunLoad);
FLEET_REGISTER_COMMAND(unload, "Unload a model from a running cluster", RunUnload);

}  // namespace fleet::cli
