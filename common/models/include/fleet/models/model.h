// A model family (Flux, WAN, a toy linear chain) as an ordered list of blocks, each a forward
// over named tensors. The same block code runs in one process (fleet-run-local) and on workers,
// which is what makes a distributed run bit-identical to a single-process one: every device
// runs exactly these functions on exactly these inputs, in the same order.
//
// Block names are the placement unit names ("stem", "double_blocks.7", "final_layer"). A block
// reads its inputs from `state`, replaces them with its outputs and leaves the rest alone:
//
//   inputs (x, timestep, context, y, guidance)  --stem-->  img, txt, vec, pe, ...
//   --double_blocks.i-->  ...  --final_layer-->  out
//
// Weights are keyed by their checkpoint names without the file's prefix
// ("double_blocks.0.img_mod.lin.weight"), already converted by PrepareWeight.
//
// Thread safety: a Model is immutable after creation; RunBlock may be called concurrently
// on different states.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fleet/status/status.h"

namespace fleet::models {

/// Named tensors: a block's weights, or the activations flowing between blocks.
using TensorMap = std::map<std::string, at::Tensor, std::less<>>;

class Model {
 public:
  virtual ~Model() = default;

  /// "flux", "linear", ...
  virtual std::string_view family() const = 0;
  /// The configuration as JSON (what CreateModel takes back), e.g. {"hidden_size":3072,...}.
  virtual std::string config_json() const = 0;
  /// The dtype blocks compute in (weights are converted to it by PrepareWeight).
  virtual at::ScalarType compute_dtype() const = 0;

  /// Blocks in execution order.
  virtual const std::vector<std::string>& block_names() const = 0;

  /// Runs block `index` with `weights` on `state` (on the device the tensors are on).
  /// REQUIRES: index < block_names().size(). Missing or mis-shaped inputs or weights are
  /// InvalidArgument errors naming the tensor, never a crash.
  virtual Status RunBlock(size_t index, const TensorMap& weights, TensorMap& state) const = 0;

  /// True for state entries that are the same on every step of one sampling run (for Flux the
  /// RoPE table "pe"), so workers may cache them per run instead of receiving them per step.
  virtual bool IsRunConstant(std::string_view state_name) const = 0;

  /// Converts one stored tensor (as read from the file, any dtype) into what RunBlock expects:
  /// the compute dtype for floating weights; fp8 is upcast here.
  virtual StatusOr<at::Tensor> PrepareWeight(std::string_view name, const at::Tensor& stored) const = 0;
};

/// Creates a model of `family` from its configuration JSON, computing in `dtype`.
StatusOr<std::unique_ptr<Model>> CreateModel(std::string_view family, std::string_view config_json,
                                             at::ScalarType dtype);

}  // namespace fleet::models
