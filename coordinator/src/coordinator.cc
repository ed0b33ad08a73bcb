#include "fleet/coordinator/coordinator.h"

#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "fleet/config/bytes.h"
#include "fleet/device/device.h"
#include "fleet/families/family.h"
#include "fleet/families/layout.h"
#include "fleet/families/lora_keys.h"
#include "fleet/formats/dtype.h"
#include "fleet/formats/model_file.h"
#include "fleet/log/log.h"
#include "fleet/placement/placement.h"
#include "fleet/placement/units.h"
#include "fleet/protocol/protocol.h"
#include "fleet/transport/curve.h"

namespace fleet::coordinator {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

void RegisterOptions(CoordinatorOptions* options, config::OptionSet* set) {
#define FLEET_OPTION FLEET_OPTION_ADD
#include "fleet/coordinator/options.def"
#undef FLEET_OPTION
}

std::string_view ModelStateName(ModelState state) {
  switch (state) {
    case ModelState::kLoading: return "loading";
    case ModelState::kReady: return "ready";
    case ModelState::kFailed: return "failed";
    case ModelState::kUnloading: return "unloading";
  }
  return "failed";
}

namespace {

constexpr size_t kMaxRunsPerModel = 8;  // sampling runs whose constant inputs stay cached
constexpr size_t kMaxPatchSetsPerModel = 4;  // LoRA combinations kept mapped and on workers

// Bytes a worker keeps of `t`: GGUF blocks, fp8 and the scales of scaled-fp8 layers as stored
// (expanded at use), F32/F16/BF16 as fp8 when the weight dtype says so, other floating weights
// in the compute dtype.
uint64_t ResidentBytes(const formats::TensorInfo& t, const std::string& compute_dtype, bool fp8) {
  static const std::set<std::string> kConverted = {"F64", "F32", "F16", "BF16"};
  if (!kConverted.count(t.dtype) || formats::IsQuantParameter(t.name)) return t.nbytes;
  if (fp8 && t.dtype != "F64") return static_cast<uint64_t>(t.numel());
  auto dt = protocol::ParseDType(compute_dtype);
  return static_cast<uint64_t>(t.numel()) * protocol::DTypeSize(*dt);
}

// The stored floating dtype of most of the model's bytes, as a protocol dtype name.
std::string StoredDtype(const formats::ModelFile& file) {
  std::map<std::string, uint64_t> bytes;
  // Block-quantised GGUF weights run in bf16 by default (as ComfyUI-GGUF dequantises them).
  for (const auto& t : file.tensors()) bytes[formats::IsBlockQuantised(t.dtype) ? "BF16" : t.dtype] += t.nbytes;
  std::string best = "F32";
  uint64_t most = 0;
  for (const auto& [dtype, n] : bytes) {
    if ((dtype == "BF16" || dtype == "F16" || dtype == "F32") && n > most) {
      best = dtype;
      most = n;
    }
  }
  return best == "BF16" ? "bf16" : best == "F16" ? "f16" : "f32";
}

StatusOr<std::string> ComputeDtype(const std::string& requested, const formats::ModelFile& file) {
  if (requested.empty()) return StoredDtype(file);
  if (requested == "float32" || requested == "f32") return std::string("f32");
  if (requested == "bfloat16" || requested == "bf16") return std::string("bf16");
  if (requested == "float16" || requested == "f16") return std::string("f16");
  return InvalidArgumentError("dtype '" + requested + "' is not float32, bfloat16 or float16");
}

std::string DefaultName(const std::string& path) { return fs::path(path).stem().string(); }

// A model name travels in URLs (/v2/models/{name}), job ids and metric labels: at most 256
// bytes, no '/' and no control characters. File stems with spaces or non-ASCII letters pass.
Status CheckModelName(const std::string& name) {
  if (name.empty() || name.size() > 256) {
    return InvalidArgumentError("model name of " + std::to_string(name.size()) + " bytes: expected 1 to 256");
  }
  for (unsigned char ch : name) {
    if (ch < 0x20 || ch == 0x7f || ch == '/') {
      return InvalidArgumentError("model name '" + name + "' contains '/' or a control character");
    }
  }
  return Status::OK();
}

// Asks a static (--worker) worker who it is and what it holds.
StatusOr<WorkerRecord> ProbeWorker(const std::string& endpoint, const transport::CurveConfig* curve) {
  worker::ClientOptions o;
  o.name = "coordinator";
  o.curve = curve;
  o.timeout = std::chrono::seconds(2);
  FLEET_ASSIGN_OR_RETURN(auto client, worker::WorkerClient::Connect(endpoint, o));
  FLEET_ASSIGN_OR_RETURN(worker::WorkerStats stats, client->Stats());
  WorkerRecord r;
  r.device = stats.device;
  r.endpoint = endpoint;
  r.backing = stats.backing;
  r.total_bytes = stats.total_bytes;
  r.capacity_bytes = stats.capacity_bytes;
  r.resident_bytes = stats.resident_bytes;
  r.activation_bytes = stats.activation_bytes;
  r.instance = client->peer().instance;
  for (const auto& m : stats.models) r.models.push_back({m.model, m.blocks, m.resident_bytes});
  return r;
}

}  // namespace

StatusOr<wire::DType> ParseWeightDtype(std::string_view name) {
  if (name.empty() || name == "default") return wire::DType::Invalid;
  if (name == "fp8_e4m3fn" || name == "fp8_e4m3fn_fast") return wire::DType::F8E4M3;
  if (name == "fp8_e5m2") return wire::DType::F8E5M2;
  return InvalidArgumentError("weight_dtype '" + std::string(name) +
                              "' is not one of default, fp8_e4m3fn, fp8_e4m3fn_fast, fp8_e5m2");
}

StatusOr<wire::DType> ParseDequantDtype(std::string_view name) {
  if (name.empty() || name == "default" || name == "target") return wire::DType::Invalid;
  if (name == "float32") return wire::DType::F32;
  if (name == "float16") return wire::DType::F16;
  if (name == "bfloat16") return wire::DType::BF16;
  return InvalidArgumentError("dequant_dtype '" + std::string(name) +
                              "' is not one of default, target, float32, float16, bfloat16");
}

struct LoadedModel {
  // Immutable after the load started.
  std::string name;
  ModelSpec spec;
  ExecMode mode = ExecMode::kAuto;
  std::string rel_path;
  families::Layout layout;
  std::map<std::string, std::vector<worker::FileTensorSpec>> unit_tensors;
  std::string compute_dtype;  // protocol dtype name: "bf16", "f32", "f16"
  placement::Plan plan;
  std::string compute_device;
  std::vector<ScheduleBlock> blocks;
  std::map<std::string, uint64_t> generations;  // device -> worker generation at load time

  // Mutable, guarded by Impl::mu.
  ModelState state = ModelState::kLoading;
  std::string error;
  std::atomic<uint64_t> bytes_loaded{0};
  uint64_t bytes_total = 0;
  Clock::time_point last_used = Clock::now();
  int active = 0;                      // Forwards running
  std::vector<std::string> runs;       // cached sampling runs, most recent last
  std::string last_schedule_json;
  uint64_t checked_activation_bytes = 0;  // the largest activation estimate known to fit
  // LoRA combinations (patch sets) by id, most recently used last, and which workers have them.
  struct PatchSetEntry {
    std::string id;
    std::shared_ptr<const std::vector<worker::LoraFileRef>> loras;
    std::shared_ptr<const std::vector<HostTensor>> tensors;  // PutPatches' parts
  };
  std::vector<PatchSetEntry> patch_sets;
  std::map<std::string, std::set<std::string>> patches_on;          // device -> ids it holds
  std::map<std::string, std::vector<std::string>> patches_to_drop;  // device -> ids to drop
};

// FNV-1a over `text`: a patch set's id (stable across coordinator restarts and processes).
std::string Fnv1aHex(std::string_view text) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;
  }
  char out[17];
  std::snprintf(out, sizeof(out), "%016llx", static_cast<unsigned long long>(h));
  return out;
}

// Eight random hex digits naming this coordinator process.
std::string RandomInstance() {
  std::random_device rd;
  char out[9];
  std::snprintf(out, sizeof(out), "%08x", static_cast<unsigned>(rd()));
  return out;
}

struct Coordinator::Impl {
  Coordinator* self = nullptr;
  transport::CurveConfig curve;
  std::unique_ptr<transport::ZapAuthenticator> zap;

  mutable std::mutex mu;
  std::map<std::string, std::shared_ptr<LoadedModel>> models;  // guarded by mu
  uint64_t next_job = 1;                                        // guarded by mu
  // Job ids are "<model>#<instance>-<n>": a restarted coordinator never names a job as its
  // predecessor did, so workers (which refuse a dropped job's id) and stale tensors of an old
  // job never meet a new one.
  const std::string instance = RandomInstance();

  // Link cost measurements for the auto schedule, guarded by costs_mu.
  mutable std::mutex costs_mu;
  CostInputs costs;

  std::mutex links_mu;
  std::map<std::string, std::shared_ptr<worker::WorkerClient>> links;  // guarded by links_mu

  // The connection to `device`'s worker; requests to it fail fast once the registry marks it down.
  StatusOr<std::shared_ptr<worker::WorkerClient>> Link(const std::string& device) {
    FLEET_ASSIGN_OR_RETURN(WorkerRecord rec, self->registry().Get(device));
    auto key = device + "@" + rec.endpoint + "#" + std::to_string(rec.generation);
    {
      std::lock_guard lock(links_mu);
      auto it = links.find(key);
      if (it != links.end()) return it->second;
    }
    worker::ClientOptions o;
    o.name = "coordinator";
    o.curve = curve.enabled() ? &curve : nullptr;
    o.timeout = self->options_.request_timeout.value;
    WorkerRegistry* registry = &self->registry();
    o.alive = [registry, device] { return registry->Get(device).ok(); };
    auto client = worker::WorkerClient::Connect(rec.endpoint, o);
    if (!client.ok()) return client.status().WithContext("worker " + device);
    std::shared_ptr<worker::WorkerClient> link = std::move(*client);
    std::lock_guard lock(links_mu);
    return links.emplace(key, link).first->second;
  }

  StatusOr<std::string> ResolvePath(const std::string& path) const {
    if (path.empty()) return InvalidArgumentError("no model path given");
    fs::path p(path);
    if (p.is_absolute()) {
      return InvalidArgumentError("model path '" + path + "' must be relative to a model root, not absolute");
    }
    for (const auto& part : p) {
      if (part == "..") return InvalidArgumentError("model path '" + path + "' may not contain '..'");
    }
    const auto& roots = self->options_.model_root;
    if (roots.empty()) return FailedPreconditionError("no --model-root configured: cannot load '" + path + "'");
    for (const auto& root : roots) {
      std::error_code ec;
      fs::path full = fs::weakly_canonical(fs::path(root) / p, ec);
      fs::path canon_root = fs::weakly_canonical(fs::path(root), ec);
      if (ec) continue;
      auto rel = full.lexically_relative(canon_root);
      if (rel.empty() || *rel.begin() == "..") continue;  // a symlink pointing outside the root
      if (fs::is_regular_file(full, ec)) return full.string();
    }
    std::string where;
    for (const auto& r : roots) where += (where.empty() ? "" : ", ") + r;
    return NotFoundError("model '" + path + "' not found under the model roots (" + where + ")");
  }

  // The patch set for `loras` on model `m`: mapped once per combination (the LoRA files' keys onto
  // the model's weights) and kept, most recent last, up to kMaxPatchSetsPerModel. The id covers
  // each file's path, size and modification time and its strength, so an edited file is a new set.
  StatusOr<LoadedModel::PatchSetEntry> PatchSetFor(LoadedModel& m,
                                                   const std::vector<LoraRef>& loras) {
    std::string key;
    std::vector<std::string> full_paths;
    for (const LoraRef& l : loras) {
      if (!std::isfinite(l.strength)) {
        return InvalidArgumentError("LoRA '" + l.path + "': strength " +
                                    std::to_string(l.strength) + " is not finite");
      }
      FLEET_ASSIGN_OR_RETURN(std::string full, ResolvePath(l.path));
      std::error_code ec;
      const auto size = fs::file_size(full, ec);
      const auto mtime = fs::last_write_time(full, ec).time_since_epoch().count();
      char strength[32];
      std::snprintf(strength, sizeof(strength), "%a", l.strength);
      key += l.path + '\0' + std::to_string(size) + '\0' + std::to_string(mtime) + '\0' + strength +
             '\0';
      full_paths.push_back(full);
    }
    const std::string id = Fnv1aHex(key);
    {
      std::lock_guard lock(mu);
      if (auto held = TouchPatchSetLocked(m, id)) return *held;
    }
    const families::WeightShapes shapes = WeightShapes(m);
    auto refs = std::make_shared<std::vector<worker::LoraFileRef>>();
    for (size_t i = 0; i < loras.size(); ++i) {
      FLEET_ASSIGN_OR_RETURN(auto file, formats::ModelFile::Open(full_paths[i]));
      std::vector<std::string> keys;
      for (const auto& info : file->tensors()) keys.push_back(info.name);
      FLEET_ASSIGN_OR_RETURN(families::LoraMapping mapping,
                             families::MapLoraKeys(m.layout.family, m.layout.config_json, shapes,
                                                   keys, loras[i].path));
      if (!mapping.unmatched.empty() || !mapping.text_encoder.empty()) {
        FLEET_LOG(WARNING, "lora")
            << loras[i].path << " on '" << m.name << "': " << mapping.modules.size()
            << " modules patch the model; " << mapping.unmatched.size() << " match no weight, "
            << mapping.text_encoder.size() << " are for a text encoder (not applied)";
      }
      refs->push_back({loras[i].path, loras[i].strength, std::move(mapping.modules)});
    }
    std::lock_guard lock(mu);
    return KeepPatchSetLocked(m, {id, refs, nullptr});
  }

  // Adds `set` as the model's most recent patch set, dropping the least recent past
  // kMaxPatchSetsPerModel (from the workers too, with their next SetPatches). REQUIRES: mu.
  LoadedModel::PatchSetEntry KeepPatchSetLocked(LoadedModel& m, LoadedModel::PatchSetEntry set) {
    // Two Forwards may have mapped the same new set at once: keep the first.
    if (auto held = TouchPatchSetLocked(m, set.id)) return *held;
    m.patch_sets.push_back(std::move(set));
    while (m.patch_sets.size() > kMaxPatchSetsPerModel) {
      const std::string old = m.patch_sets.front().id;
      m.patch_sets.erase(m.patch_sets.begin());
      for (auto& [device, ids] : m.patches_on) {
        if (ids.erase(old) != 0) m.patches_to_drop[device].push_back(old);
      }
    }
    return m.patch_sets.back();
  }

  // The model's patch set `id`, made the most recent; nullopt when the model has none.
  // REQUIRES: mu.
  std::optional<LoadedModel::PatchSetEntry> TouchPatchSetLocked(LoadedModel& m,
                                                                const std::string& id) {
    auto it = std::find_if(m.patch_sets.begin(), m.patch_sets.end(),
                           [&](const auto& e) { return e.id == id; });
    if (it == m.patch_sets.end()) return std::nullopt;
    LoadedModel::PatchSetEntry e = *it;
    m.patch_sets.erase(it);
    m.patch_sets.push_back(e);
    return e;
  }

  // The model's patch set `id` (PutPatches'), made the most recent.
  StatusOr<LoadedModel::PatchSetEntry> FindPatchSet(LoadedModel& m, const std::string& id) {
    std::lock_guard lock(mu);
    if (auto held = TouchPatchSetLocked(m, id)) return *held;
    return NotFoundError("patch set '" + id + "' of model '" + m.name +
                         "' is not on this coordinator (PutPatches first)");
  }

  // The model's weight shapes by name (quantisation parameters left out): what LoRA modules
  // target.
  static families::WeightShapes WeightShapes(const LoadedModel& m) {
    families::WeightShapes shapes;
    for (const auto& [unit, tensors] : m.unit_tensors) {
      for (const auto& t : tensors) {
        if (!formats::IsQuantParameter(t.name)) shapes[t.name] = t.shape;
      }
    }
    return shapes;
  }

  // Gives `device` the patch set (and drops the sets the model no longer keeps there).
  Status EnsurePatches(LoadedModel& m, const std::string& device,
                       const LoadedModel::PatchSetEntry& set) {
    std::vector<std::string> drop;
    {
      std::lock_guard lock(mu);
      if (m.patches_on[device].count(set.id) != 0) return Status::OK();
      drop = std::move(m.patches_to_drop[device]);
      m.patches_to_drop.erase(device);
    }
    FLEET_ASSIGN_OR_RETURN(auto link, Link(device));
    static const std::vector<HostTensor> kNone;
    FLEET_RETURN_IF_ERROR(
        (*link).SetPatches(m.name, set.id, *set.loras, set.tensors ? *set.tensors : kNone, drop));
    std::lock_guard lock(mu);
    m.patches_on[device].insert(set.id);
    return Status::OK();
  }

  // Devices of the cluster, with capacity left once `keep` models stay resident.
  std::vector<device::DeviceInfo> Devices(const std::string& except_model) const {
    return Devices(std::set<std::string>{except_model});
  }

  // The devices as they would be without the models in `except`. REQUIRES: mu held.
  std::vector<device::DeviceInfo> Devices(const std::set<std::string>& except) const {
    std::map<std::string, uint64_t> used;
    for (const auto& [name, m] : models) {
      if (except.count(name) || m->state == ModelState::kFailed) continue;
      for (const auto& a : m->plan.assignments) used[a.device.ToString()] += a.bytes;
    }
    std::vector<device::DeviceInfo> out;
    for (const auto& w : self->registry().Snapshot()) {
      if (!w.up) continue;
      auto id = device::DeviceId::Parse(w.device);
      if (!id.ok()) continue;
      uint64_t taken = used[w.device];
      uint64_t cap = w.capacity_bytes > taken ? w.capacity_bytes - taken : 0;
      out.push_back(device::DeviceInfo{*id, w.total_bytes, cap, w.device_name});
    }
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
    return out;
  }

  std::string DefaultComputeDevice() const {
    std::string best;
    for (const auto& w : self->registry().Snapshot()) {
      if (w.up && w.device.rfind("cuda:", 0) == 0 && (best.empty() || device::DeviceId::Parse(w.device).value() <
                                                                        device::DeviceId::Parse(best).value())) {
        best = w.device;
      }
    }
    return best.empty() ? "cpu" : best;
  }

  placement::Request MakeRequest(const ModelSpec& spec, int prefetch_depth) const {
    placement::Request r;
    r.compute_device = spec.compute_device.empty() ? DefaultComputeDevice() : spec.compute_device;
    r.virtual_vram_gb = spec.virtual_vram_gb;
    r.donor_device = spec.donor_device;
    r.expert_mode_allocations = spec.expert_mode_allocations;
    r.eject_models = spec.eject_models;
    r.keep_loaded = spec.keep_loaded;
    r.headroom.prefetch_depth = prefetch_depth;
    return r;
  }

  // The input sizes of `spec` with the family's defaults where it gives none.
  static families::InputSizes SizesOf(const families::Family& family, const ModelSpec& spec,
                                      const std::string& compute_dtype) {
    families::InputSizes s = family.DefaultSizes();
    if (spec.width > 0) s.width = spec.width;
    if (spec.height > 0) s.height = spec.height;
    if (spec.frames > 0) s.frames = spec.frames;
    if (spec.batch > 0) s.batch = spec.batch;
    s.dtype_bytes = compute_dtype == "f32" ? 4 : 2;
    return s;
  }

  // The first forward with inputs larger than the plan assumed: does their activation estimate
  // still fit the compute device's room (capacity less weights, prefetch and reserve)? A model
  // that cannot run is refused here, naming the sizes, instead of running out of memory.
  Status CheckActivations(LoadedModel& m, const ForwardRequest& request) {
    const families::Family* family = families::FindFamily(m.layout.family);
    if (family == nullptr) return Status::OK();
    families::InputShapes shapes;
    for (const auto& t : request.inputs) shapes[t.name] = t.shape;
    auto sizes = family->SizesOf(m.layout.config_json, shapes);
    if (!sizes) return Status::OK();  // the blocks report malformed inputs
    sizes->dtype_bytes = m.compute_dtype == "f32" ? 4 : 2;
    auto need = family->ActivationBytes(m.layout.config_json, *sizes);
    if (!need.ok()) return Status::OK();
    std::lock_guard lock(mu);
    if (*need <= m.checked_activation_bytes) return Status::OK();
    const placement::DevicePlan* compute = m.plan.Device(m.plan.compute_device);
    if (compute == nullptr) return Status::OK();
    const uint64_t used = compute->weight_bytes + m.plan.prefetch_bytes + m.plan.reserve_bytes;
    const uint64_t room = compute->capacity_bytes > used ? compute->capacity_bytes - used : 0;
    std::string what = std::to_string(sizes->width) + "x" + std::to_string(sizes->height) +
                       (sizes->frames > 1 ? "x" + std::to_string(sizes->frames) + " frames" : "") +
                       ", batch " + std::to_string(sizes->batch);
    if (*need > room) {
      return FailedPreconditionError(
          "model '" + m.name + "': inputs of " + what + " need about " +
          config::FormatBytes(*need) + " of activations on " + m.compute_device + ", which has " +
          config::FormatBytes(room) + " left after its weights (the plan assumed " +
          config::FormatBytes(m.checked_activation_bytes) +
          "); load it with these sizes (width, height, frames, batch) so the plan makes room, "
          "or move more of it off " +
          m.compute_device);
    }
    FLEET_LOG(INFO, "models") << m.name << ": inputs of " << what << " need about "
                              << config::FormatBytes(*need) << " of activations; "
                              << m.compute_device << " has " << config::FormatBytes(room);
    m.checked_activation_bytes = *need;
    return Status::OK();
  }

  // What LoadModel and Plan share: open the file, find its layout, plan it.
  struct Prepared {
    std::string full_path;
    std::unique_ptr<formats::ModelFile> file;
    families::Layout layout;
    std::string compute_dtype;
    std::vector<placement::Unit> units;
    placement::Request request;
  };

  // The plan of a load of `name`, and the models it has to evict first (`victims`, empty when
  // it fits beside everything loaded). A model that does not fit makes room by evicting others,
  // least recently used first: those loaded without keep_loaded, and the keep_loaded ones too
  // when this load has eject_models (DisTorch2's "eject the other models", here only as far as
  // needed, so models that fit together, such as WAN 2.2's two experts, stay resident). None is
  // evicted when evicting all of them would still not make room. REQUIRES: mu held.
  StatusOr<placement::Plan> PlanMakingRoom(const std::string& name, const ModelSpec& spec,
                                           const Prepared& p,
                                           std::vector<std::shared_ptr<LoadedModel>>* victims) const {
    std::vector<std::shared_ptr<LoadedModel>> candidates;
    for (const auto& [other, m] : models) {
      if (other == name || m->active > 0 || m->state != ModelState::kReady) continue;
      if (m->spec.keep_loaded && !spec.eject_models) continue;
      candidates.push_back(m);
    }
    std::sort(candidates.begin(), candidates.end(),
              [](const auto& a, const auto& b) { return a->last_used < b->last_used; });
    std::set<std::string> gone = {name};
    StatusOr<placement::Plan> first = InvalidArgumentError("no plan");
    for (size_t i = 0;; ++i) {
      auto devices = Devices(gone);
      if (devices.empty()) return UnavailableError("no workers are up: cannot place '" + name + "'");
      auto plan = placement::MakePlan(devices, p.units, p.request);
      if (i == 0) first = plan;
      if (plan.ok()) {
        victims->assign(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(i));
        return plan;
      }
      if (plan.status().code() != StatusCode::kResourceExhausted) return plan.status();
      if (i == candidates.size()) {
        if (candidates.empty()) return first;
        return first.status().WithContext(
            "evicting the " + std::to_string(candidates.size()) + " other model(s) that may go (" +
            (spec.eject_models ? "eject_models" : "those without keep_loaded") +
            ") would not make room either; nothing was evicted");
      }
      gone.insert(candidates[i]->name);
    }
  }


  StatusOr<Prepared> Prepare(const ModelSpec& spec) const {
    Prepared p;
    FLEET_ASSIGN_OR_RETURN(p.full_path, ResolvePath(spec.path));
    FLEET_ASSIGN_OR_RETURN(p.file, formats::ModelFile::Open(p.full_path));
    for (const auto& t : p.file->tensors()) {
      if (formats::IsBlockQuantised(t.dtype) && !formats::GgmlTypeByName(t.dtype)->dequantizable) {
        return UnimplementedError(spec.path + ": tensor '" + t.name + "' is " + t.dtype +
                                  ", a GGUF type Tensorfleet cannot dequantise yet");
      }
    }
    FLEET_ASSIGN_OR_RETURN(p.layout, families::DetectLayout(*p.file));
    const families::Family* family = families::FindFamily(p.layout.family);
    if (family == nullptr) {
      return InvalidArgumentError(spec.path + ": not a model family Tensorfleet knows (" +
                                  families::FamilyNames() + ")");
    }
    FLEET_ASSIGN_OR_RETURN(p.compute_dtype, ComputeDtype(spec.dtype, *p.file));
    std::map<std::string, const formats::TensorInfo*> by_name;
    for (const auto& t : p.file->tensors()) by_name[t.name] = &t;
    FLEET_ASSIGN_OR_RETURN(wire::DType weight_dtype, ParseWeightDtype(spec.weight_dtype));
    FLEET_ASSIGN_OR_RETURN(wire::DType dequant_dtype, ParseDequantDtype(spec.dequant_dtype));
    const bool fp8 = weight_dtype != wire::DType::Invalid;
    uint64_t largest_expanded = 0;  // scratch for the largest stored-form weight at use
    // An expanded weight exists in the dequant dtype and the compute dtype at once, briefly.
    uint64_t compute_size = protocol::DTypeSize(*protocol::ParseDType(p.compute_dtype));
    if (dequant_dtype != wire::DType::Invalid) compute_size += protocol::DTypeSize(dequant_dtype);
    for (const auto& u : p.layout.units) {
      placement::Unit unit{u.name, 0, u.pinned, "", false};
      for (const auto& tn : u.tensors) {
        const formats::TensorInfo& t = *by_name.at(tn);
        const uint64_t resident = ResidentBytes(t, p.compute_dtype, fp8);
        unit.bytes += resident;
        if (formats::IsBlockQuantised(t.dtype) || t.dtype == "F8_E4M3" || t.dtype == "F8_E5M2" ||
            (fp8 && (t.dtype == "F32" || t.dtype == "F16" || t.dtype == "BF16"))) {
          largest_expanded =
              std::max(largest_expanded, static_cast<uint64_t>(t.numel()) * compute_size);
        }
      }
      p.units.push_back(unit);
    }
    placement::MarkPinnedUnits(family, &p.units);  // says why each pinned unit is pinned
    int depth = spec.prefetch_depth > 0 ? spec.prefetch_depth : static_cast<int>(self->options_.prefetch_depth);
    p.request = MakeRequest(spec, depth);
    auto activation =
        family->ActivationBytes(p.layout.config_json, SizesOf(*family, spec, p.compute_dtype));
    if (!activation.ok()) return activation.status().WithContext(spec.path);
    p.request.headroom.activation_bytes = *activation;
    p.request.headroom.reserve_bytes = largest_expanded;
    return p;
  }

  std::string ScheduleJson(const Schedule& s, const std::vector<ScheduleBlock>& blocks) const {
    nlohmann::ordered_json ranges = nlohmann::ordered_json::array();
    for (const auto& r : s.ranges) {
      ranges.push_back({{"first", blocks[r.first].name},
                        {"last", blocks[r.last].name},
                        {"holder", r.holder},
                        {"site", SiteName(r.site)},
                        {"runs_on", r.runs_on},
                        {"bytes", r.bytes},
                        {"reason", r.reason}});
    }
    nlohmann::ordered_json j = {{"ranges", ranges}, {"bit_identical", s.bit_identical}, {"explanation", s.explanation}};
    return j.dump();
  }

  CostInputs CurrentCosts(const LoadedModel& m) const {
    std::lock_guard lock(costs_mu);
    CostInputs c = costs;
    for (const auto& w : self->registry().Snapshot()) {
      c.backing_type[w.device] = w.backing.rfind("cuda", 0) == 0 ? "cuda" : "cpu";
    }
    c.activation_bytes = m.plan.activation_bytes;
    return c;
  }

  StatusOr<Schedule> ScheduleFor(const LoadedModel& m) const {
    return BuildSchedule(m.blocks, m.compute_device, m.mode, CurrentCosts(m), m.spec.allow_mixed);
  }

  std::string PlanJson(const LoadedModel& m, const Schedule* schedule) const {
    nlohmann::ordered_json j = nlohmann::ordered_json::parse(m.plan.ToJson());
    j["family"] = m.layout.family;
    j["config"] = nlohmann::json::parse(m.layout.config_json);
    j["compute_dtype"] = m.compute_dtype;
    j["mode"] = ExecModeName(m.mode);
    if (schedule) j["schedule"] = nlohmann::json::parse(ScheduleJson(*schedule, m.blocks));
    return j.dump();
  }

  ModelInfo Info(const LoadedModel& m) const {
    ModelInfo i;
    i.name = m.name;
    i.path = m.rel_path;
    i.family = m.layout.family;
    i.state = m.state;
    i.bytes_loaded = m.bytes_loaded.load();
    i.bytes_total = m.bytes_total;
    i.compute_device = m.compute_device;
    i.mode = m.mode;
    i.keep_loaded = m.spec.keep_loaded;
    i.error = m.error;
    i.plan_json = m.last_schedule_json;
    return i;
  }

  // Evicts, from every worker up, the models this coordinator does not know: a previous
  // coordinator process loaded them (this one restarted). Done before a load, so the room the
  // plan counts as free really is, and a reload under the same name does not meet AlreadyExists.
  void EvictOrphans() {
    for (const auto& w : self->registry().Snapshot()) {
      if (!w.up) continue;
      auto link = Link(w.device);
      if (!link.ok()) continue;
      auto stats = (*link)->Stats();
      if (!stats.ok()) continue;  // the load reports a worker that does not answer
      for (const auto& held : stats->models) {
        {
          std::lock_guard lock(mu);
          if (models.count(held.model) != 0) continue;
        }
        Status s = (*link)->EvictModel(held.model);
        FLEET_LOG(INFO, "models") << "evicted '" << held.model << "' (" << held.resident_bytes
                                  << " bytes) from " << w.device
                                  << ": no model of this coordinator owns it (left by a previous "
                                     "coordinator process)"
                                  << (s.ok() ? "" : ": " + s.ToString());
      }
    }
  }

  void EvictEverywhere(const LoadedModel& m) {
    std::set<std::string> devices;
    for (const auto& a : m.plan.assignments) devices.insert(a.device.ToString());
    for (const auto& d : devices) {
      auto link = Link(d);
      if (!link.ok()) continue;  // a down worker lost the blocks anyway
      Status s = (*link)->EvictModel(m.name);
      if (!s.ok()) FLEET_LOG(WARNING, "models") << "evicting " << m.name << " from " << d << ": " << s;
    }
  }

  // Loads every unit on its device, one thread per device. Returns the first error, or
  // Cancelled once `cancelled` turned true (checked before each unit).
  Status LoadUnits(LoadedModel& m, const std::shared_ptr<std::atomic<bool>>& cancelled) {
    std::map<std::string, std::vector<std::string>> per_device;
    for (const auto& a : m.plan.assignments) per_device[a.device.ToString()].push_back(a.unit);
    std::mutex err_mu;
    Status first_error;
    std::vector<std::thread> threads;
    std::map<std::string, uint64_t> unit_bytes;
    for (const auto& a : m.plan.assignments) unit_bytes[a.unit] = a.bytes;
    for (const auto& [device, units] : per_device) {
      threads.emplace_back([&, device = device, units = units] {
        auto link = Link(device);
        if (!link.ok()) {
          std::lock_guard lock(err_mu);
          if (first_error.ok()) first_error = link.status();
          return;
        }
        for (const auto& unit : units) {
          {
            std::lock_guard lock(err_mu);
            if (!first_error.ok()) return;
            if (cancelled && cancelled->load()) {
              first_error = CancelledError("load of '" + m.name + "' cancelled by the client after " +
                                           config::FormatBytes(m.bytes_loaded.load()) + " of " +
                                           config::FormatBytes(m.bytes_total));
              return;
            }
          }
          worker::ModelSpec spec{m.name, m.layout.family, m.layout.config_json,
                                 *protocol::ParseDType(m.compute_dtype),
                                 *ParseWeightDtype(m.spec.weight_dtype),
                                 *ParseDequantDtype(m.spec.dequant_dtype)};
          Status s = (*link)->LoadBlockFromFile(spec, unit, m.rel_path, m.unit_tensors.at(unit));
          if (!s.ok()) {
            std::lock_guard lock(err_mu);
            if (first_error.ok()) first_error = s.WithContext("loading " + unit + " on " + device);
            return;
          }
          uint64_t done = m.bytes_loaded.fetch_add(unit_bytes[unit]) + unit_bytes[unit];
          FLEET_VLOG(1, "models") << m.name << ": " << unit << " loaded on " << device << " (" << done << "/"
                                  << m.bytes_total << " bytes)";
        }
      });
    }
    // Report progress in the log while the loads run (the API reads bytes_loaded directly).
    std::mutex done_mu;
    std::condition_variable done_cv;
    bool done = false;
    std::thread progress([&] {
      uint64_t last = 0;
      std::unique_lock lock(done_mu);
      while (!done_cv.wait_for(lock, std::chrono::seconds(2), [&] { return done; })) {
        uint64_t now = m.bytes_loaded.load();
        if (now != last) {
          FLEET_LOG(INFO, "models") << m.name << ": loaded " << config::FormatBytes(now) << " of "
                                    << config::FormatBytes(m.bytes_total);
          last = now;
        }
      }
    });
    for (auto& t : threads) t.join();
    {
      std::lock_guard lock(done_mu);
      done = true;
    }
    done_cv.notify_all();
    progress.join();
    return first_error;
  }
};

Coordinator::Coordinator(const CoordinatorOptions& options)
    : options_(options),
      metrics_registry_(std::make_shared<prometheus::Registry>()),
      metrics_(std::make_unique<metrics::CoordinatorMetrics>(*metrics_registry_)),
      impl_(std::make_unique<Impl>()) {
  impl_->self = this;
  metrics_->info.Add({{"version", metrics::Version()}}).Set(1);
}

void Coordinator::UpdateGauges() {
  int workers = 0;
  for (const auto& w : registry_->Snapshot()) {
    if (w.device.rfind("?", 0) == 0) continue;  // a static worker that never answered
    ++workers;
    metrics_->worker_up.Add({{"worker", w.endpoint}, {"device", w.device}}).Set(w.up ? 1 : 0);
    // At 0 from the device's first registration, so increase() sees the first conflict.
    metrics_->register_conflicts.Add({{"device", w.device}});
  }
  metrics_->workers.Add({}).Set(workers);
  for (const auto& [device, refused] : registry_->RegisterConflicts()) {
    auto& counter = metrics_->register_conflicts.Add({{"device", device}});
    if (static_cast<double>(refused) > counter.Value()) {
      counter.Increment(static_cast<double>(refused) - counter.Value());
    }
  }
  std::lock_guard lock(impl_->mu);
  for (const auto& [name, m] : impl_->models) {
    metrics_->model_loaded.Add({{"model", name}}).Set(m->state == ModelState::kReady ? 1 : 0);
  }
}

Coordinator::~Coordinator() {
  if (registry_) registry_->Stop();
}

StatusOr<std::unique_ptr<Coordinator>> Coordinator::Create(const CoordinatorOptions& options) {
  std::unique_ptr<Coordinator> c(new Coordinator(options));
  if (options.default_mode != "auto" && options.default_mode != "stream" && options.default_mode != "pipeline") {
    return InvalidArgumentError("--default-mode must be stream, pipeline or auto, got '" + options.default_mode + "'");
  }
  if (options.prefetch_depth < 1 || options.prefetch_depth > 64) {
    return InvalidArgumentError("--prefetch-depth must be between 1 and 64");
  }
  FLEET_ASSIGN_OR_RETURN(c->impl_->curve,
                         transport::LoadCurveConfig(options.curve_secret_key_file, options.curve_server_key_file));
  const transport::CurveConfig* curve = c->impl_->curve.enabled() ? &c->impl_->curve : nullptr;
  if (curve) {
    FLEET_ASSIGN_OR_RETURN(c->impl_->zap, transport::ZapAuthenticator::Start({c->impl_->curve.public_key}));
  }
  RegistryOptions ro;
  ro.register_listen = options.register_listen;
  ro.static_workers = options.worker;
  ro.heartbeat_timeout = options.heartbeat_timeout.value;
  ro.curve = curve;
  Impl* impl = c->impl_.get();
  FLEET_ASSIGN_OR_RETURN(
      c->registry_,
      WorkerRegistry::Start(
          ro, [curve](const std::string& endpoint) { return ProbeWorker(endpoint, curve); },
          [impl](const WorkerRecord& w) {
            // A worker that restarted lost its blocks: the models that used it must be reloaded.
            std::lock_guard lock(impl->mu);
            for (auto& [name, m] : impl->models) {
              auto g = m->generations.find(w.device);
              if (g != m->generations.end() && w.up && g->second != w.generation && m->state == ModelState::kReady) {
                m->state = ModelState::kFailed;
                m->error = "worker " + w.device + " restarted and lost this model's blocks: load it again";
                FLEET_LOG(WARNING, "models") << name << ": " << m->error;
              }
            }
          }));
  return c;
}

Status Coordinator::Ready() const {
  if (draining_.load()) return UnavailableError("draining: the coordinator is shutting down");
  std::set<std::string> up;
  for (const auto& w : registry_->Snapshot()) {
    if (w.up) up.insert(w.device);
  }
  if (up.empty()) return UnavailableError("no worker is up");
  std::lock_guard lock(impl_->mu);
  for (const auto& [name, m] : impl_->models) {
    if (m->state != ModelState::kReady) continue;
    std::set<std::string> needed = {m->compute_device};
    for (const auto& b : m->blocks) needed.insert(b.holder);
    for (const auto& d : needed) {
      if (!up.count(d)) return UnavailableError("worker " + d + ", which model '" + name + "' needs, is down");
    }
  }
  return Status::OK();
}

Status Coordinator::ModelReady(const std::string& name) const {
  if (draining_.load()) return UnavailableError("draining: the coordinator is shutting down");
  std::set<std::string> up;
  for (const auto& w : registry_->Snapshot()) {
    if (w.up) up.insert(w.device);
  }
  std::lock_guard lock(impl_->mu);
  auto it = impl_->models.find(name);
  if (it == impl_->models.end()) return NotFoundError("no model named '" + name + "' is loaded");
  const LoadedModel& m = *it->second;
  if (m.state == ModelState::kLoading) {
    return UnavailableError("model '" + name + "' is loading (" + config::FormatBytes(m.bytes_loaded.load()) +
                            " of " + config::FormatBytes(m.bytes_total) + ")");
  }
  if (m.state != ModelState::kReady) {
    return UnavailableError("model '" + name + "' is " + std::string(ModelStateName(m.state)) +
                            (m.error.empty() ? "" : ": " + m.error));
  }
  std::set<std::string> needed = {m.compute_device};
  for (const auto& b : m.blocks) needed.insert(b.holder);
  for (const auto& d : needed) {
    if (!up.count(d)) return UnavailableError("worker " + d + ", which model '" + name + "' needs, is down");
  }
  return Status::OK();
}

std::vector<RepositoryEntry> Coordinator::RepositoryIndex() const {
  std::vector<RepositoryEntry> out;
  std::set<std::string> used;  // files of loaded models
  {
    std::lock_guard lock(impl_->mu);
    for (const auto& [name, m] : impl_->models) {
      RepositoryEntry e{name, m->rel_path, "", ""};
      switch (m->state) {
        case ModelState::kReady: e.state = "READY"; break;
        case ModelState::kLoading: e.state = "LOADING"; break;
        case ModelState::kUnloading: e.state = "UNLOADING"; break;
        case ModelState::kFailed: e.state = "UNAVAILABLE"; e.reason = m->error; break;
      }
      used.insert(m->rel_path);
      out.push_back(std::move(e));
    }
  }
  std::set<std::string> files;  // sorted, unique across roots
  for (const auto& root : options_.model_root) {
    std::error_code ec;
    // Symlinked directories are not followed (no cycles); symlinked files are listed.
    fs::recursive_directory_iterator it(root, fs::directory_options::skip_permission_denied, ec), end;
    for (; !ec && it != end && files.size() < kMaxIndexFiles; it.increment(ec)) {
      if (it.depth() >= 8) it.disable_recursion_pending();
      std::error_code fec;
      if (!it->is_regular_file(fec)) continue;
      const std::string ext = it->path().extension().string();
      if (ext != ".safetensors" && ext != ".gguf") continue;
      files.insert(it->path().lexically_relative(root).generic_string());
    }
  }
  for (const auto& f : files) {
    if (!used.count(f)) out.push_back(RepositoryEntry{f, f, "UNAVAILABLE", "not loaded"});
  }
  return out;
}

void Coordinator::BeginDrain() { draining_.store(true); }

std::vector<ModelInfo> Coordinator::ListModels() const {
  std::lock_guard lock(impl_->mu);
  std::vector<ModelInfo> out;
  for (const auto& [name, m] : impl_->models) out.push_back(impl_->Info(*m));
  return out;
}

StatusOr<ModelInfo> Coordinator::GetModel(const std::string& name) const {
  std::lock_guard lock(impl_->mu);
  auto it = impl_->models.find(name);
  if (it == impl_->models.end()) return NotFoundError("no model named '" + name + "' is loaded");
  return impl_->Info(*it->second);
}

ClusterStatus Coordinator::Cluster() const {
  return ClusterStatus{registry_->Snapshot(), ListModels(), draining_.load()};
}

StatusOr<PlanResult> Coordinator::Plan(const ModelSpec& spec) const {
  FLEET_ASSIGN_OR_RETURN(Impl::Prepared p, impl_->Prepare(spec));
  // As a load would place it (no name: every loaded model counts, as for a new name).
  std::vector<std::shared_ptr<LoadedModel>> victims;
  StatusOr<placement::Plan> planned = InvalidArgumentError("no plan");
  {
    std::lock_guard lock(impl_->mu);
    planned = impl_->PlanMakingRoom("", spec, p, &victims);
  }
  FLEET_ASSIGN_OR_RETURN(placement::Plan plan, std::move(planned));
  LoadedModel m;
  m.spec = spec;
  m.mode = spec.mode.value_or(*ParseExecMode(options_.default_mode));
  m.layout = p.layout;
  m.compute_dtype = p.compute_dtype;
  m.plan = plan;
  m.compute_device = plan.compute_device.ToString();
  for (const auto& a : plan.assignments) m.blocks.push_back({a.unit, a.device.ToString(), a.bytes});
  auto schedule = impl_->ScheduleFor(m);
  if (!schedule.ok()) return schedule.status();
  std::string text = plan.ToText() + "\nexecution (" + std::string(ExecModeName(m.mode)) + "):\n";
  for (const auto& line : schedule->explanation) text += "  " + line + "\n";
  if (schedule->explanation.empty()) text += "  every block runs on " + m.compute_device + "\n";
  text += "\n" + plan.ExplainText();
  PlanResult result{impl_->PlanJson(m, &*schedule), text, plan.expert_string, {}};
  for (const auto& v : victims) result.evicts.push_back(v->name);
  if (!victims.empty()) {
    std::string names;
    for (const auto& n : result.evicts) names += (names.empty() ? "" : ", ") + n;
    result.text += "\nloading it evicts (least recently used first): " + names + "\n";
  }
  return result;
}

StatusOr<ModelInfo> Coordinator::LoadModel(const std::string& requested_name, const ModelSpec& spec,
                                           std::shared_ptr<std::atomic<bool>> cancelled) {
  if (draining_.load()) return UnavailableError("the coordinator is shutting down: not loading models");
  std::string name = requested_name.empty() ? DefaultName(spec.path) : requested_name;
  FLEET_RETURN_IF_ERROR(CheckModelName(name));
  auto start = Clock::now();
  FLEET_ASSIGN_OR_RETURN(Impl::Prepared p, impl_->Prepare(spec));
  auto model = std::make_shared<LoadedModel>();
  model->name = name;
  model->spec = spec;
  model->mode = spec.mode.value_or(*ParseExecMode(options_.default_mode));
  model->rel_path = spec.path;
  model->layout = p.layout;
  model->compute_dtype = p.compute_dtype;
  for (const auto& u : p.layout.units) {
    auto& refs = model->unit_tensors[u.name];
    for (const auto& tn : u.tensors) {
      const formats::TensorInfo* t = p.file->Find(tn);
      // Workers key weights as blocks ask for them: by name without the file's prefix.
      const std::string name = p.layout.WeightName(tn);
      if (formats::IsBlockQuantised(t->dtype)) {  // dequantised by the worker that loads it
        refs.push_back({name, *protocol::ParseDType(p.compute_dtype), t->shape, t->offset,
                        t->nbytes, "", t->dtype});
        continue;
      }
      auto wire_dtype = protocol::ParseDType(t->dtype);
      if (!wire_dtype.ok()) return wire_dtype.status().WithContext(spec.path + ": tensor '" + tn + "'");
      refs.push_back({name, *wire_dtype, t->shape, t->offset, t->nbytes, "", ""});
    }
  }

  impl_->EvictOrphans();
  std::vector<std::string> evicted;
  {
    std::unique_lock lock(impl_->mu);
    auto existing = impl_->models.find(name);
    if (existing != impl_->models.end()) {
      LoadedModel& e = *existing->second;
      bool same = e.rel_path == spec.path && e.spec.compute_device == spec.compute_device &&
                  e.spec.virtual_vram_gb == spec.virtual_vram_gb &&
                  e.spec.donor_device == spec.donor_device &&
                  e.spec.expert_mode_allocations == spec.expert_mode_allocations &&
                  e.mode == model->mode && e.spec.dtype == spec.dtype &&
                  e.spec.allow_mixed == spec.allow_mixed &&
                  *ParseWeightDtype(e.spec.weight_dtype) == *ParseWeightDtype(spec.weight_dtype) &&
                  *ParseDequantDtype(e.spec.dequant_dtype) ==
                      *ParseDequantDtype(spec.dequant_dtype);
      if (same && e.state == ModelState::kReady) {
        e.spec.keep_loaded = spec.keep_loaded;
        e.last_used = Clock::now();
        return impl_->Info(e);
      }
      if (e.state == ModelState::kLoading) {
        return FailedPreconditionError("model '" + name + "' is being loaded by another request");
      }
      if (e.active > 0) return FailedPreconditionError("model '" + name + "' is running a Forward; unload it later");
      auto old = existing->second;
      impl_->models.erase(existing);
      lock.unlock();
      impl_->EvictEverywhere(*old);
      lock.lock();
    }
    // Plan against what is free, making room by evicting other models as far as needed.
    while (true) {
      std::vector<std::shared_ptr<LoadedModel>> victims;
      FLEET_ASSIGN_OR_RETURN(model->plan, impl_->PlanMakingRoom(name, spec, p, &victims));
      if (victims.empty()) break;
      for (const auto& v : victims) impl_->models.erase(v->name);
      lock.unlock();
      for (const auto& v : victims) {
        FLEET_LOG(INFO, "models") << "evicting " << v->name << " (used least recently) to make room for "
                                  << name;
        impl_->EvictEverywhere(*v);
        evicted.push_back(v->name);
      }
      lock.lock();  // re-plan: the cluster may have changed meanwhile
    }
    model->checked_activation_bytes = model->plan.activation_bytes;
    model->compute_device = model->plan.compute_device.ToString();
    for (const auto& a : model->plan.assignments) {
      model->blocks.push_back({a.unit, a.device.ToString(), a.bytes});
      model->bytes_total += a.bytes;
    }
    for (const auto& w : registry_->Snapshot()) model->generations[w.device] = w.generation;
    auto schedule = impl_->ScheduleFor(*model);
    if (!schedule.ok()) return schedule.status();
    model->last_schedule_json = impl_->PlanJson(*model, &*schedule);
    impl_->models[name] = model;
  }
  FLEET_LOG(INFO, "models") << "loading " << name << " (" << model->layout.family << ", "
                            << config::FormatBytes(model->bytes_total) << " as " << model->compute_dtype << ") on "
                            << model->plan.devices.size() << " devices, compute " << model->compute_device;
  Status loaded = impl_->LoadUnits(*model, cancelled);
  if (!loaded.ok()) {
    {
      std::lock_guard lock(impl_->mu);
      model->state = ModelState::kFailed;
      model->error = std::string(loaded.message());
      impl_->models.erase(name);
    }
    impl_->EvictEverywhere(*model);  // the units that did load must not stay resident
    metrics_->RemoveModel(name);     // the gauges showed it loading
    if (loaded.code() == StatusCode::kCancelled) {
      FLEET_LOG(INFO, "models") << loaded.message() << "; what was loaded is evicted";
    } else {
      FLEET_LOG(ERROR, "models") << "loading " << name << " failed: " << loaded;
    }
    return loaded;
  }
  std::lock_guard lock(impl_->mu);
  model->state = ModelState::kReady;
  model->last_used = Clock::now();
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  metrics_->model_load_duration.Add({{"model", name}}, metrics::LoadBuckets()).Observe(seconds);
  metrics_->model_loaded.Add({{"model", name}}).Set(1);
  for (const auto& d : model->plan.devices) {
    metrics_->model_bytes.Add({{"model", name}, {"device", d.id.ToString()}}).Set(static_cast<double>(d.weight_bytes));
  }
  if (auto schedule = impl_->ScheduleFor(*model); schedule.ok()) {
    for (const auto& r : schedule->ranges) {
      metrics_->plan_decisions.Add({{"model", name}, {"mode", std::string(SiteName(r.site))}}).Increment();
    }
  }
  FLEET_LOG(INFO, "models") << name << " ready in " << seconds << " s";
  return impl_->Info(*model);
}

Status Coordinator::UnloadModel(const std::string& name) {
  std::shared_ptr<LoadedModel> m;
  {
    std::lock_guard lock(impl_->mu);
    auto it = impl_->models.find(name);
    if (it == impl_->models.end()) return NotFoundError("no model named '" + name + "' is loaded");
    if (it->second->state == ModelState::kLoading) return FailedPreconditionError("model '" + name + "' is still loading");
    if (it->second->active > 0) return FailedPreconditionError("model '" + name + "' is running a Forward");
    m = it->second;
    impl_->models.erase(it);
  }
  impl_->EvictEverywhere(*m);
  // Removed, not zeroed: an unloaded model has no series (docs/metrics.md, "After an unload").
  metrics_->RemoveModel(name);
  FLEET_LOG(INFO, "models") << "unloaded " << name;
  return Status();
}

StatusOr<ForwardResult> Coordinator::Forward(const ForwardRequest& request) {
  auto result = ForwardLoaded(request);
  // Under mu, and only for a model that is loaded: an unload removes the model's series after
  // taking it out of `models`, so a late count cannot bring them back, and names of models that
  // are not loaded never become series.
  std::lock_guard lock(impl_->mu);
  if (impl_->models.count(request.model)) {
    metrics_->forwards.Add({{"model", request.model}, {"outcome", result.ok() ? "ok" : "failed"}}).Increment();
  }
  return result;
}

Status Coordinator::PutPatches(const std::string& model, const std::string& id,
                               std::vector<worker::LoraFileRef> loras,
                               std::vector<HostTensor> tensors) {
  if (id.empty() || id.size() > 128) {
    return InvalidArgumentError("a patch set id has 1 to 128 characters, not " +
                                std::to_string(id.size()));
  }
  if (loras.empty() || loras.size() > 64) {
    return InvalidArgumentError("patch set '" + id + "' needs 1 to 64 groups of patches, not " +
                                std::to_string(loras.size()));
  }
  std::shared_ptr<LoadedModel> m;
  {
    std::lock_guard lock(impl_->mu);
    auto it = impl_->models.find(model);
    if (it == impl_->models.end()) return NotFoundError("no model named '" + model + "' is loaded");
    m = it->second;
    for (const auto& e : m->patch_sets) {
      if (e.id == id) return Status::OK();  // held already
    }
  }
  std::map<std::string, const HostTensor*, std::less<>> by_name;
  for (const HostTensor& t : tensors) {
    if (!by_name.emplace(t.name, &t).second) {
      return InvalidArgumentError("patch set '" + id + "': tensor '" + t.name + "' is sent twice");
    }
  }
  const families::WeightShapes shapes = Impl::WeightShapes(*m);
  for (worker::LoraFileRef& group : loras) {
    if (!group.path.empty()) {
      return InvalidArgumentError("patch set '" + id + "': PutPatches takes tensors, not files ('" +
                                  group.path + "'); name LoRA files in a Forward's loras");
    }
    if (!std::isfinite(group.strength)) {
      return InvalidArgumentError("patch set '" + id + "': strength " +
                                  std::to_string(group.strength) + " is not finite");
    }
    for (families::LoraModule& module : group.modules) {
      auto shape = shapes.find(module.target);
      if (shape == shapes.end()) {
        return InvalidArgumentError("patch set '" + id + "': module '" + module.prefix +
                                    "' patches '" + module.target + "', which model '" + model +
                                    "' does not have");
      }
      module.shape = shape->second;
      for (const auto& [suffix, key] : module.parts) {
        if (by_name.count(key) == 0) {
          return InvalidArgumentError("patch set '" + id + "': module '" + module.prefix +
                                      "' names tensor '" + key + "', which was not sent");
        }
      }
    }
  }
  std::lock_guard lock(impl_->mu);
  impl_->KeepPatchSetLocked(
      *m, {id, std::make_shared<const std::vector<worker::LoraFileRef>>(std::move(loras)),
           std::make_shared<const std::vector<HostTensor>>(std::move(tensors))});
  return Status::OK();
}

StatusOr<ForwardResult> Coordinator::ForwardLoaded(const ForwardRequest& request) {
  if (draining_.load())
    return UnavailableError("the coordinator is shutting down: not starting new Forwards");
  auto start = Clock::now();
  std::shared_ptr<LoadedModel> m;
  std::string job;
  bool run_cached = false;
  {
    std::lock_guard lock(impl_->mu);
    auto it = impl_->models.find(request.model);
    if (it == impl_->models.end()) return NotFoundError("no model named '" + request.model + "' is loaded");
    m = it->second;
    if (m->state == ModelState::kLoading) {
      return FailedPreconditionError("model '" + request.model + "' is still loading (" +
                                     std::to_string(m->bytes_loaded.load()) + " of " +
                                     std::to_string(m->bytes_total) + " bytes)");
    }
    if (m->state != ModelState::kReady) {
      return FailedPreconditionError("model '" + request.model + "' is not ready: " + m->error);
    }
    ++m->active;
    m->last_used = Clock::now();
    job = request.model + "#" + impl_->instance + "-" + std::to_string(impl_->next_job++);
    if (!request.run_id.empty()) {
      run_cached = std::find(m->runs.begin(), m->runs.end(), request.run_id) != m->runs.end();
    }
  }
  struct ActiveGuard {
    Impl* impl;
    LoadedModel* m;
    ~ActiveGuard() {
      std::lock_guard lock(impl->mu);
      --m->active;
    }
  } guard{impl_.get(), m.get()};
  FLEET_RETURN_IF_ERROR(impl_->CheckActivations(*m, request));

  // Constant inputs that the client left out must be in the run's cache on the compute worker.
  std::set<std::string> given;
  for (const auto& t : request.inputs) given.insert(t.name);
  std::vector<std::string> missing;
  for (const auto& c : request.constant_inputs) {
    if (!given.count(c)) missing.push_back(c);
  }
  if (!missing.empty() && (request.run_id.empty() || !run_cached)) {
    std::string names;
    for (const auto& n : missing) names += (names.empty() ? "'" : ", '") + n + "'";
    return FailedPreconditionError("run cache miss: run '" + request.run_id + "' has no cached " + names +
                                   " on this coordinator; send the constant inputs again");
  }

  std::optional<LoadedModel::PatchSetEntry> patches;
  if (!request.loras.empty() && !request.patches.empty()) {
    return InvalidArgumentError("a Forward names LoRA files or a patch set, not both");
  }
  if (!request.loras.empty()) {
    auto set = impl_->PatchSetFor(*m, request.loras);
    if (!set.ok()) return set.status().WithContext("model '" + m->name + "'");
    patches = std::move(*set);
  } else if (!request.patches.empty()) {
    FLEET_ASSIGN_OR_RETURN(patches, impl_->FindPatchSet(*m, request.patches));
  }

  auto schedule = impl_->ScheduleFor(*m);
  if (!schedule.ok()) return schedule.status();
  {
    // Publish the bandwidth the cost model assumes for every link this step uses.
    std::lock_guard lock(impl_->costs_mu);
    for (const auto& r : schedule->ranges) {
      if (r.site == Site::kResident) continue;
      std::string src = r.site == Site::kStream ? r.holder : m->compute_device;
      std::string dst = r.site == Site::kStream ? m->compute_device : r.holder;
      auto it = impl_->costs.bandwidth.find(src + ">" + dst);
      double bw = it != impl_->costs.bandwidth.end() && it->second > 0 ? it->second : impl_->costs.default_bandwidth;
      metrics_->expected_bandwidth.Add({{"src", src}, {"dst", dst}}).Set(bw);
    }
  }
  const int depth = m->spec.prefetch_depth > 0 ? m->spec.prefetch_depth : static_cast<int>(options_.prefetch_depth);

  // Every worker the schedule touches must be up and the same process that loaded the blocks.
  std::set<std::string> needed;
  for (const auto& b : m->blocks) needed.insert(b.holder);
  needed.insert(m->compute_device);
  std::map<std::string, std::string> endpoints;
  for (const auto& d : needed) {
    auto rec = registry_->Get(d);
    if (!rec.ok()) return rec.status().WithContext("model '" + m->name + "' needs it");
    auto g = m->generations.find(d);
    if (g != m->generations.end() && g->second != rec->generation) {
      return FailedPreconditionError("worker " + d + " restarted and lost the blocks of '" + m->name +
                                     "': load the model again");
    }
    endpoints[d] = rec->endpoint;
  }

  ForwardResult result;
  std::set<std::string> touched;
  auto fail = [&](const Status& s, const std::string& device) -> Status {
    // Unavailable may come from the worker's own peer (a send target, a weight donor) while the
    // worker itself is fine: mark it down only when it does not answer a probe either.
    if ((s.code() == StatusCode::kUnavailable || s.code() == StatusCode::kDeadlineExceeded) &&
        !ProbeWorker(endpoints[device], impl_->curve.enabled() ? &impl_->curve : nullptr).ok()) {
      registry_->MarkDown(device, std::string(s.message()));
    }
    return s.WithContext("Forward on '" + m->name + "' failed at worker " + device);
  };
  // With FLEET_VERBOSE=forward=1, one line per step says where its time went.
  std::string timeline;
  auto mark = [&, last = Clock::now()](const std::string& what) mutable {
    if (log::Verbosity("forward") < 1) return;
    auto now = Clock::now();
    char ms[32];
    std::snprintf(ms, sizeof(ms), " %.2f ms", std::chrono::duration<double, std::milli>(now - last).count());
    timeline += (timeline.empty() ? "" : ", ") + what + ms;
    last = now;
  };
  auto body = [&]() -> Status {
    std::string here = m->compute_device;
    FLEET_ASSIGN_OR_RETURN(auto compute, impl_->Link(here));
    touched.insert(here);
    std::vector<std::string> constant;
    for (const auto& c : request.constant_inputs) {
      if (given.count(c)) constant.push_back(c);
    }
    Status put = compute->PutTensors(job, request.inputs, request.run_id, constant);
    if (!put.ok()) return fail(put, here);
    mark("put " + here);
    // Group consecutive ranges computed by the same device into one RunBlocks.
    size_t i = 0;
    const auto& ranges = schedule->ranges;
    while (i < ranges.size()) {
      if (request.cancelled && request.cancelled->load()) return CancelledError("cancelled by the client");
      std::string runs_on = ranges[i].runs_on;
      std::vector<worker::BlockStep> steps;
      for (; i < ranges.size() && ranges[i].runs_on == runs_on; ++i) {
        for (size_t b = ranges[i].first; b <= ranges[i].last; ++b) {
          bool stream = ranges[i].site == Site::kStream;
          steps.push_back({m->blocks[b].name, stream ? endpoints[ranges[i].holder] : ""});
        }
      }
      if (runs_on != here) {
        FLEET_ASSIGN_OR_RETURN(auto from, impl_->Link(here));
        auto sent = from->SendTensors(job, {}, endpoints[runs_on], job);
        if (!sent.ok()) return fail(sent.status(), here);
        result.activation_bytes += sent->bytes;
        mark("send " + here + ">" + runs_on + " " + std::to_string(sent->bytes) + " B");
        if (sent->seconds > 0 && sent->bytes > (1u << 20)) {
          std::lock_guard lock(impl_->costs_mu);
          double& bw = impl_->costs.bandwidth[here + ">" + runs_on];
          double measured = static_cast<double>(sent->bytes) / sent->seconds;
          bw = bw > 0 ? 0.7 * bw + 0.3 * measured : measured;
          metrics_->expected_bandwidth.Add({{"src", here}, {"dst", runs_on}}).Set(bw);
        }
        here = runs_on;
        touched.insert(here);
      }
      if (patches) {
        Status given = impl_->EnsurePatches(*m, here, *patches);
        if (!given.ok()) return fail(given, here);
      }
      FLEET_ASSIGN_OR_RETURN(auto worker, impl_->Link(here));
      auto ran = worker->RunBlocks(job, m->name, steps, static_cast<uint32_t>(depth),
                                   request.run_id, patches ? patches->id : "");
      if (!ran.ok()) return fail(ran.status(), here);
      mark("run " + std::to_string(steps.size()) + " blocks on " + here + " (compute " +
           std::to_string(static_cast<int>(ran->compute_seconds * 1e3)) + " ms)");
      result.weight_bytes += ran->streamed_bytes;
      result.prefetch_stall_seconds += ran->prefetch_stall_seconds;
      if (!steps.empty()) {
        std::lock_guard lock(impl_->costs_mu);
        double per_block = ran->compute_seconds / static_cast<double>(steps.size());
        for (const auto& st : steps) {
          double& c = impl_->costs.compute_seconds[here + "|" + st.block];
          c = c > 0 ? 0.7 * c + 0.3 * per_block : per_block;
        }
      }
    }
    FLEET_ASSIGN_OR_RETURN(auto last, impl_->Link(here));
    const families::Family* family = families::FindFamily(m->layout.family);
    std::vector<std::string> names =
        family ? family->OutputNames(m->layout.config_json) : std::vector<std::string>{"out"};
    auto outputs = last->GetTensors(job, names);
    if (!outputs.ok()) return fail(outputs.status(), here);
    result.outputs = std::move(*outputs);
    mark("get " + here);
    return Status();
  };
  Status status = body();
  for (const auto& d : touched) {
    auto link = impl_->Link(d);
    if (link.ok()) (*link)->DropJob(job).IgnoreError();  // best effort: a down worker dropped it anyway
  }
  {
    std::lock_guard lock(impl_->mu);
    if (status.ok() && !request.run_id.empty()) {
      auto& runs = m->runs;
      runs.erase(std::remove(runs.begin(), runs.end(), request.run_id), runs.end());
      if (!request.end_run) runs.push_back(request.run_id);
    }
  }
  // End runs that are over or pushed out of the per-model cache (LRU).
  std::vector<std::string> ended;
  {
    std::lock_guard lock(impl_->mu);
    if (request.end_run && !request.run_id.empty()) ended.push_back(request.run_id);
    while (m->runs.size() > kMaxRunsPerModel) {
      ended.push_back(m->runs.front());
      m->runs.erase(m->runs.begin());
    }
  }
  for (const auto& run : ended) {
    for (const auto& d : needed) {  // every worker may hold run-constant tensors of the run
      auto link = impl_->Link(d);
      if (link.ok()) (*link)->EndRun(run).IgnoreError();
    }
  }
  mark("drop");
  FLEET_VLOG(1, "forward") << job << ": " << timeline;
  if (!status.ok()) {
    FLEET_LOG(WARNING, "forward") << job << ": " << status;
    return status;
  }
  result.step_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  std::string mode(ExecModeName(m->mode));
  metrics_->step_duration.Add({{"model", m->name}, {"mode", mode}}, metrics::DurationBuckets()).Observe(result.step_seconds);
  metrics_->prefetch_stall.Add({{"model", m->name}}).Increment(result.prefetch_stall_seconds);
  metrics_->step_transfer_bytes.Add({{"model", m->name}, {"kind", "weights"}}).Increment(static_cast<double>(result.weight_bytes));
  metrics_->step_transfer_bytes.Add({{"model", m->name}, {"kind", "activations"}})
      .Increment(static_cast<double>(result.activation_bytes));
  return result;
}

}  // namespace fleet::coordinator
