// `fleet plan`: where a model's blocks would live for the given DisTorch2 inputs, before
// anything loads. The model comes from a model file, a built-in example or a JSON unit list;
// the devices from --devices (what-if planning), or from a running cluster (--coordinator URL:
// the coordinator plans the file under its model roots over its workers, GET /v2/plan).
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <tuple>

#include "cluster.h"
#include "command.h"
#include "fleet/config/bytes.h"
#include "fleet/config/options.h"
#include "fleet/placement/placement.h"
#include "fleet/placement/units.h"

#include "fleet/families/layout.h"
#include "fleet/formats/model_file.h"

namespace fleet::cli {
namespace {

struct PlanFlags {
  std::string compute_device = "cuda:0";
  double virtual_vram_gb = 4.0;
  std::string donor_device = "cpu";
  std::string expert_mode_allocations;
  bool eject_models = true;
  bool keep_loaded = true;
  std::string devices;
  std::string units;
  std::string example;
  std::string family = "auto";
  ClusterFlags cluster;  // --coordinator, --token, --timeout, --json
  int64_t prefetch_depth = 2;
  InputSizeFlags sizes;
  std::string activation_bytes;  // empty: the family's estimate for the sizes (--units: 0)
  config::Bytes reserve;
  bool explain = false;
};

struct Model {
  std::vector<placement::Unit> units;
  uint64_t activation_bytes = 0;
};

StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError("cannot read '" + path + "'");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// `sizes` with the sizes the flags give (not 0).
StatusOr<families::InputSizes> WithFlags(families::InputSizes sizes, const InputSizeFlags& flags) {
  for (auto [name, value, out] : {std::tuple{"width", flags.width, &sizes.width},
                                  {"height", flags.height, &sizes.height},
                                  {"frames", flags.frames, &sizes.frames},
                                  {"batch", flags.batch, &sizes.batch}}) {
    auto checked = families::CheckInputSize(name, value);
    if (!checked.ok()) return checked.status().WithContext(std::string("--") + name);
    if (*checked > 0) *out = *checked;
  }
  return sizes;
}

StatusOr<Model> LoadModel(const PlanFlags& flags, const std::vector<std::string>& positional) {
  int sources = !flags.units.empty() + !flags.example.empty() + !positional.empty();
  if (sources != 1) {
    return InvalidArgumentError(
        "give the model as exactly one of MODEL_FILE, --example NAME or "
        "--units FILE.json");
  }
  if (positional.size() > 1) {
    return InvalidArgumentError("one MODEL_FILE expected, got " +
                                std::to_string(positional.size()));
  }
  Model model;
  const families::Family* family = nullptr;
  bool guess = flags.family == "auto";
  if (!guess) {
    FLEET_ASSIGN_OR_RETURN(family, families::ParseFamily(flags.family));
  }
  if (!flags.example.empty()) {
    FLEET_ASSIGN_OR_RETURN(placement::Example ex, placement::GetExample(flags.example));
    model.units = std::move(ex.units);
    FLEET_ASSIGN_OR_RETURN(families::InputSizes sizes, WithFlags(ex.sizes, flags.sizes));
    FLEET_ASSIGN_OR_RETURN(model.activation_bytes,
                           ex.family->ActivationBytes(ex.config_json, sizes));
    if (guess) family = ex.family;
  } else if (!flags.units.empty()) {
    FLEET_ASSIGN_OR_RETURN(std::string text, ReadFile(flags.units));
    FLEET_ASSIGN_OR_RETURN(model.units, placement::ParseUnitsJson(text, flags.units));
    if (guess) family = placement::GuessFamily(model.units);
  } else {
    FLEET_ASSIGN_OR_RETURN(auto file, formats::ModelFile::Open(positional[0]));
    FLEET_ASSIGN_OR_RETURN(families::Layout layout, families::DetectLayout(*file));
    if (const families::Family* detected = families::FindFamily(layout.family)) {
      FLEET_ASSIGN_OR_RETURN(families::InputSizes sizes,
                             WithFlags(detected->DefaultSizes(), flags.sizes));
      FLEET_ASSIGN_OR_RETURN(model.activation_bytes,
                             detected->ActivationBytes(layout.config_json, sizes));
    }
    for (const auto& u : layout.units) {
      placement::Unit unit;
      unit.name = u.name;
      unit.bytes = u.bytes;
      unit.pinned = u.pinned;  // MarkPinnedUnits below says why
      model.units.push_back(std::move(unit));
    }
    if (guess) {
      family = families::FindFamily(layout.family);
      if (family == nullptr) family = placement::GuessFamily(model.units);
    }
  }
  placement::MarkPinnedUnits(family, &model.units);
  return model;
}

int Fail(bool json, const Status& status) {
  return ReportError("fleet plan", json, status, status.code() == StatusCode::kInternal ? 1 : 2);
}

// The plan of the running cluster's coordinator (GET /v2/plan) over its real devices, with its
// capacity left after the models it keeps loaded.
int PlanOnCluster(const PlanFlags& f, const std::vector<std::string>& positional) {
  if (!f.units.empty() || !f.example.empty() || positional.size() != 1) {
    return Fail(f.cluster.json, InvalidArgumentError("--coordinator plans one MODEL file under the coordinator's "
                                                     "model roots (--example and --units need --devices)"));
  }
  auto client = ConnectCluster(f.cluster);
  if (!client.ok()) return Fail(f.cluster.json, client.status());
  auto flag = [](bool b) { return std::string(b ? "true" : "false"); };
  char vram[32];
  std::snprintf(vram, sizeof(vram), "%.17g", f.virtual_vram_gb);
  std::string query = "path=" + UrlEncode(positional[0]) + "&compute_device=" + UrlEncode(f.compute_device) +
                      "&virtual_vram_gb=" + vram + "&donor_device=" + UrlEncode(f.donor_device) +
                      "&expert_mode_allocations=" + UrlEncode(f.expert_mode_allocations) +
                      "&eject_models=" + flag(f.eject_models) + "&keep_loaded=" + flag(f.keep_loaded);
  for (const auto& [size, value] : f.sizes.Given())
    query += "&" + size + "=" + std::to_string(value);
  auto plan = client->Call("GET", "/v2/plan?" + query);
  if (!plan.ok()) {
    // The coordinator refusing the plan (a bad string, over capacity) is bad input; not
    // reaching it is a failure of the work.
    const bool refused = plan.status().code() == StatusCode::kInvalidArgument ||
                         plan.status().code() == StatusCode::kNotFound;
    return ReportError("fleet plan", f.cluster.json, plan.status(), refused ? 2 : 1);
  }
  if (f.cluster.json) {
    std::printf("%s\n", plan->dump(2).c_str());
    return 0;
  }
  std::fputs(plan->value("text", "").c_str(), stdout);
  if (f.explain) {
    const auto& deviations = (*plan)["deviations"];
    if (deviations.empty()) {
      std::printf("\nNo deviation from DisTorch2 changed this plan.\n");
    } else {
      std::printf("\nDeviations from DisTorch2 that changed this plan:\n");
      for (const auto& d : deviations) {
        std::printf("  [%s] %s\n", d.value("code", "").c_str(), d.value("sentence", "").c_str());
      }
    }
  }
  return 0;
}

int RunPlan(const std::vector<std::string>& args) {
  PlanFlags f;
  config::OptionSet set(
      "fleet plan",
      "Plan where a model's blocks live for the DisTorch2 inputs, checked against capacities.\n"
      "The model: MODEL_FILE, --example NAME or --units FILE.json; the devices: --devices.");
  set.Add("compute_device", &f.compute_device,
          "DisTorch2 compute_device: the device that runs the model");
  set.Add("virtual_vram_gb", &f.virtual_vram_gb,
          "DisTorch2 virtual_vram_gb: GiB of the model moved to the donors (0..128)");
  set.Add("donor_device", &f.donor_device, "DisTorch2 donor_device: donor(s), comma-separated");
  set.Add("expert_mode_allocations", &f.expert_mode_allocations,
          "DisTorch2 expert string, e.g. 'cuda:0,4gb;cpu,*' (overrides virtual VRAM)");
  set.Add("eject_models", &f.eject_models, "DisTorch2 eject_models: evict other models first");
  set.Add("keep_loaded", &f.keep_loaded, "Keep this model's shares resident across model switches");
  set.Add("devices", &f.devices,
          "What-if devices: id=TOTAL[/CAPACITY],... e.g. cuda:0=24gb,cuda:1=12gb,cpu=64gb");
  set.Add("units", &f.units, "JSON list of {name, bytes, pinned} in model order");
  std::string examples;
  for (const auto& n : placement::ExampleNames()) examples += (examples.empty() ? "" : ", ") + n;
  set.Add("example", &f.example, "Built-in example model: " + examples);
  set.Add("family", &f.family, "Pin rules: auto, none, flux, wan, linear, text-encoder (clip, t5)");
  set.Add("prefetch_depth", &f.prefetch_depth, "Streamed units in flight on the compute device");
  AddInputSizeFlags(set, &f.sizes);
  set.Add("activation_bytes", &f.activation_bytes,
          "Activation estimate (default: the family's for the input size; --units: 0)");
  set.Add("reserve", &f.reserve, "Extra reserve on the compute device");
  set.Add("explain", &f.explain, "List every deviation from DisTorch2 that changed this plan");
  f.cluster.coordinator.clear();  // no default: planning against a cluster is asked for
  AddClusterFlags(set, &f.cluster);

  int rc = 0;
  auto positional = ParseFlags("fleet plan", set, args, &rc);
  if (!positional) return rc;
  const bool json = f.cluster.json;
  if (f.devices.empty() && !f.cluster.coordinator.empty()) return PlanOnCluster(f, *positional);
  if (f.devices.empty()) {
    return Fail(json, InvalidArgumentError("give the devices: --devices cuda:0=24gb,cpu=64gb (what-if), or "
                                           "--coordinator http://HOST:7780 (a running cluster's)"));
  }
  auto devices = placement::ParseDeviceTable(f.devices);
  if (!devices.ok()) return Fail(json, devices.status());
  auto model = LoadModel(f, *positional);
  if (!model.ok()) return Fail(json, model.status());

  placement::Request request;
  request.compute_device = f.compute_device;
  request.virtual_vram_gb = f.virtual_vram_gb;
  request.donor_device = f.donor_device;
  request.expert_mode_allocations = f.expert_mode_allocations;
  request.eject_models = f.eject_models;
  request.keep_loaded = f.keep_loaded;
  request.headroom.prefetch_depth = f.prefetch_depth;
  request.headroom.activation_bytes = model->activation_bytes;
  if (!f.activation_bytes.empty()) {
    auto bytes = config::ParseBytes(f.activation_bytes);
    if (!bytes.ok()) {
      return Fail(json, InvalidArgumentError("--activation-bytes: " +
                                               std::string(bytes.status().message())));
    }
    request.headroom.activation_bytes = *bytes;
  }
  request.headroom.reserve_bytes = f.reserve.value;

  auto plan = placement::MakePlan(*devices, model->units, request);
  if (!plan.ok()) return Fail(json, plan.status());
  if (json) {
    std::printf("%s\n", plan->ToJson().c_str());
    return 0;
  }
  std::fputs(plan->ToText().c_str(), stdout);
  if (f.explain) std::fputs(("\n" + plan->ExplainText()).c_str(), stdout);
  return 0;
}

}  // namespace

FLEET_REGISTER_COMMAND(plan, "Plan a model's placement over devices (DisTorch2 inputs)", RunPlan);

}  // namespace fleet::cli
