// The coordinator: owns the worker registry, the loaded models and their execution schedules,
// and runs Forwards across workers. The job API (ZeroMQ), the control API (HTTP) and tests all
// call this one class, so every entry point behaves the same.
//
//   LoadModel:   file under a model root + DisTorch2 inputs + mode -> layout -> placement plan
//                (capacity-checked, evicting LRU or ejected models) -> workers load their units
//                from the file themselves -> ready. Progress (bytes loaded) is visible meanwhile.
//   Forward:     inputs -> the compute worker; each range of the schedule runs where it was placed
//                (resident, streamed with prefetch, or pipelined on its holder); "out" comes back.
//   Constant inputs of a sampling run (context, ...) are kept on the compute worker per run id.
//
// Thread safety: all public methods are safe to call concurrently. Forwards of one model may
// run concurrently (each has its own job id on the workers).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "fleet/config/options.h"
#include "fleet/metrics/metrics.h"
#include "fleet/coordinator/registry.h"
#include "fleet/coordinator/schedule.h"
#include "fleet/status/status.h"
#include "fleet/worker/client.h"

namespace fleet::coordinator {

struct CoordinatorOptions {
#define FLEET_OPTION FLEET_OPTION_FIELD
#include "fleet/coordinator/options.def"
#undef FLEET_OPTION
};
void RegisterOptions(CoordinatorOptions* options, config::OptionSet* set);

/// The inputs of a DisTorch2 loader node, plus ours.
struct ModelSpec {
  std::string path;                     // relative to a model root
  std::string compute_device;           // empty: the first GPU id known, else cpu
  double virtual_vram_gb = 0.0;
  std::string donor_device = "cpu";
  std::string expert_mode_allocations;
  bool eject_models = false;
  bool keep_loaded = false;
  std::optional<ExecMode> mode;         // empty: --default-mode
  std::string dtype;                    // "", "float32", "bfloat16", "float16"
  int prefetch_depth = 0;               // 0: --prefetch-depth
  bool allow_mixed = false;
  // The workflow's input size, for the activation estimate in the plan's headroom (0: the
  // family's default, 1024 x 1024, 1 frame, batch 1). The first forward with larger inputs
  // re-checks the estimate against the compute device's room.
  int64_t width = 0;
  int64_t height = 0;
  int64_t frames = 0;
  int64_t batch = 0;
  // ComfyUI's weight_dtype: "" or "default" (as stored), "fp8_e4m3fn", "fp8_e4m3fn_fast" (the
  // same here), "fp8_e5m2": the floating weights are kept as fp8 (ParseWeightDtype).
  std::string weight_dtype;
  // ComfyUI-GGUF's dequant_dtype: "" / "default" / "target" (the compute dtype), "float32",
  // "float16", "bfloat16": what GGUF weights expand into before the compute dtype.
  std::string dequant_dtype;
};

/// The worker's weight dtype for a ModelSpec::weight_dtype (Invalid: as stored), or
/// InvalidArgument listing the accepted names.
StatusOr<wire::DType> ParseWeightDtype(std::string_view name);

/// The worker's dequant dtype for a ModelSpec::dequant_dtype (Invalid: the compute dtype), or
/// InvalidArgument listing the accepted names.
StatusOr<wire::DType> ParseDequantDtype(std::string_view name);

enum class ModelState { kLoading, kReady, kFailed, kUnloading };
std::string_view ModelStateName(ModelState state);

struct ModelInfo {
  std::string name;
  std::string path;
  std::string family;
  ModelState state = ModelState::kLoading;
  uint64_t bytes_loaded = 0;
  uint64_t bytes_total = 0;
  std::string compute_device;
  ExecMode mode = ExecMode::kAuto;
  bool keep_loaded = false;
  std::string error;
  std::string plan_json;  // placement + schedule + explanations
};

struct PlanResult {
  std::string json;
  std::string text;
  std::string expert_string;
  // Models a load with this spec would evict first to make room (Coordinator::LoadModel).
  std::vector<std::string> evicts;
};

/// A tensor handed in or out: contiguous little-endian bytes that `owner` keeps alive.
using HostTensor = worker::HostTensor;

/// A LoRA to patch a model with for one Forward.
struct LoraRef {
  std::string path;  // relative to a model root
  double strength = 1.0;
};

/// At most this many LoRAs stacked on one Forward.
inline constexpr size_t kMaxLoras = 32;

struct ForwardRequest {
  std::string model;
  std::vector<HostTensor> inputs;
  std::string run_id;
  std::vector<std::string> constant_inputs;
  bool end_run = false;
  std::chrono::milliseconds timeout{0};  // 0: --request-timeout
  std::shared_ptr<std::atomic<bool>> cancelled;  // set to abort between ranges
  std::vector<LoraRef> loras;                    // stacked in order; empty: the model as loaded
  std::string patches;  // a patch set given by PutPatches (not with `loras`)
};

struct ForwardResult {
  std::vector<HostTensor> outputs;
  double step_seconds = 0;
  uint64_t weight_bytes = 0;
  uint64_t activation_bytes = 0;
  double prefetch_stall_seconds = 0;
};

/// One row of the repository index (Triton's POST /v2/repository/index).
struct RepositoryEntry {
  std::string name;   // the loaded model's name, or a file's path relative to its model root
  std::string path;   // the file, relative to a model root
  std::string state;  // Triton's states: READY, LOADING, UNLOADING, UNAVAILABLE
  std::string reason; // why not READY ("not loaded", the load error)
};

struct ClusterStatus {
  std::vector<WorkerRecord> workers;
  std::vector<ModelInfo> models;
  bool draining = false;
};

class Coordinator {
 public:
  /// Binds the register endpoint and starts the registry. Does not serve the job or HTTP API.
  static StatusOr<std::unique_ptr<Coordinator>> Create(const CoordinatorOptions& options);
  ~Coordinator();

  /// Loads `spec` as `name` (empty: the file's stem). When `cancelled` turns true the load
  /// stops before its next unit, evicts what it loaded and returns Cancelled.
  StatusOr<ModelInfo> LoadModel(const std::string& name, const ModelSpec& spec,
                                std::shared_ptr<std::atomic<bool>> cancelled = nullptr);
  Status UnloadModel(const std::string& name);
  std::vector<ModelInfo> ListModels() const;
  StatusOr<ModelInfo> GetModel(const std::string& name) const;
  StatusOr<PlanResult> Plan(const ModelSpec& spec) const;
  /// Runs one Forward; counts it in fleet_coordinator_forwards_total when the model is loaded.
  StatusOr<ForwardResult> Forward(const ForwardRequest& request);
  /// Keeps client-computed weight patches (ComfyUI's LoRA patches) for model `model` as patch
  /// set `id`, which Forwards then name. Each of `loras` has an empty path, its strength and
  /// modules whose keys name `tensors`; module shapes are taken from the model. An id held
  /// already is kept as it is. InvalidArgument naming what is wrong (a target the model does
  /// not have, a key with no tensor, a strength that is not finite), NotFound for a model that
  /// is not loaded.
  Status PutPatches(const std::string& model, const std::string& id,
                    std::vector<worker::LoraFileRef> loras, std::vector<HostTensor> tensors);
  ClusterStatus Cluster() const;
  /// OK when model `name` is ready and every worker it needs is up; else Unavailable (or
  /// NotFound) saying why.
  Status ModelReady(const std::string& name) const;
  /// Loaded models with their state, then every .safetensors / .gguf file under the model roots
  /// that no loaded model uses (state UNAVAILABLE, "not loaded"). At most kMaxIndexFiles files.
  std::vector<RepositoryEntry> RepositoryIndex() const;
  static constexpr size_t kMaxIndexFiles = 10000;

  /// Live: always true once created. Ready (OK): not draining, at least one worker up, and
  /// every worker a loaded model needs is up; otherwise Unavailable saying what is missing.
  Status Ready() const;
  /// Refuses new loads and forwards from now on (SIGTERM).
  void BeginDrain();
  bool draining() const { return draining_.load(); }

  WorkerRegistry& registry() { return *registry_; }
  const CoordinatorOptions& options() const { return options_; }
  /// The process's metric families (docs/metrics.md) and their registry.
  metrics::CoordinatorMetrics& metrics() { return *metrics_; }
  std::shared_ptr<prometheus::Registry> metrics_registry() { return metrics_registry_; }
  /// Refreshes the gauges that mirror state (workers up, loaded models, bytes per device).
  void UpdateGauges();

 private:
  struct Impl;
  explicit Coordinator(const CoordinatorOptions& options);
  StatusOr<ForwardResult> ForwardLoaded(const ForwardRequest& request);

  const CoordinatorOptions options_;
  std::shared_ptr<prometheus::Registry> metrics_registry_;
  std::unique_ptr<metrics::CoordinatorMetrics> metrics_;
  std::unique_ptr<WorkerRegistry> registry_;
  std::unique_ptr<Impl> impl_;
  std::atomic<bool> draining_{false};
};

}  // namespace fleet::coordinator
