// Single-process execution of a whole model file: the reference that distributed runs must
// match bit for bit. Loads the file (memory-mapped; weights already in the compute dtype are
// used in place, others converted once on load, fp8 kept as stored and upcast when their
// block runs), creates the model from the detected layout, and runs every block in order.
//
// Thread safety: a LocalRunner is used by one thread.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fleet/formats/model_file.h"
#include "fleet/models/lora.h"
#include "fleet/models/model.h"
#include "fleet/models/stored_weights.h"
#include "fleet/status/status.h"

namespace fleet::run_local {

/// Reads every tensor of a safetensors file into CPU tensors (copies; fp8 is upcast to float32).
StatusOr<models::TensorMap> ReadTensors(const std::string& path);

/// Writes `tensors` (CPU or not; any of f32/f16/bf16/f64/i64/i32/u8/bool) as safetensors.
Status WriteTensors(const models::TensorMap& tensors, const std::string& path);

class LocalRunner {
 public:
  /// Opens `model_path`, detects its layout and prepares the weights.
  /// \param dtype compute dtype; nullopt means the stored dtype of the model's weights.
  /// \param device where weights live and blocks run ("cpu", "cuda:0"; CUDA needs a CUDA
  /// build of libtorch). Run() moves the input state there.
  /// \param weight_dtype ComfyUI's weight_dtype ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast",
  /// "fp8_e5m2"): F32/F16/BF16 weights are kept as fp8, as a worker keeps them.
  /// \param dequant_dtype ComfyUI-GGUF's dequant_dtype ("default", "target", "float32",
  /// "float16", "bfloat16"): the dtype GGUF weights expand into before the compute dtype.
  static StatusOr<std::unique_ptr<LocalRunner>> Create(
      const std::string& model_path, std::optional<at::ScalarType> dtype,
      const std::string& device = "cpu", const std::string& weight_dtype = "default",
      const std::string& dequant_dtype = "default");

  const models::Model& model() const { return *model_; }

  /// Applies the LoRA file at `path` at `strength` on top of those added before (the order
  /// ComfyUI's LoRA loaders stack them in). Modules that match no weight are logged; a file
  /// none of whose modules match, or a bad module, is an error and adds nothing.
  Status AddLora(const std::string& path, double strength);

  /// Every weight as blocks see it (patched, in the compute dtype), by name.
  StatusOr<models::TensorMap> Weights() const;

  /// Runs every block on `state`. When `trace` is given, it receives "<block>/<name>" copies of
  /// the state after each block (the run-constant "pe" only after the stem).
  Status Run(models::TensorMap& state, models::TensorMap* trace = nullptr) const;

 private:
  LocalRunner() = default;

  std::unique_ptr<formats::ModelFile> file_;
  std::unique_ptr<models::Model> model_;
  // Per block (parallel to model_->block_names()), keyed without the file prefix: floating
  // weights prepared, GGUF and fp8 weights in their stored form, expanded at use.
  std::vector<models::WeightStore> blocks_;
  models::PatchSet patches_;  // AddLora's
  at::Device device_ = at::kCPU;
  std::optional<at::ScalarType> dequant_;  // none: GGUF expands straight to the compute dtype
};

}  // namespace fleet::run_local
