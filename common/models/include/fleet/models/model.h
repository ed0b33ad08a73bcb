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
// A block reads its weights through a WeightAccessor, one layer's weight at a time, at the
// moment it needs it. Weights are named by their checkpoint names without the file's prefix
// ("double_blocks.0.img_mod.lin.weight"). Workers and fleet-run-local hand blocks the same
// accessor, so what a weight is made of (resident tensor today; an expanded stored form or a
// patched copy later) is decided in one place for both.
//
// A family is one registry entry in two halves: its torch-free descriptor (fleet::families:
// layout, configuration, pins, activation estimate) and this torch implementation, found by the
// same name through CreateModel. docs/models.md says how to add one.
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

/// Named tensors: the activations flowing between blocks, or a block's resident weights.
using TensorMap = std::map<std::string, at::Tensor, std::less<>>;

/// How a block gets its weights. A block asks for each weight just before the op that uses it
/// and keeps it no longer than that op needs, so an implementation may produce weights on
/// demand (into reusable scratch memory) instead of holding every weight of the block expanded.
///
/// Thread safety: one accessor serves one RunBlock at a time.
class WeightAccessor {
 public:
  virtual ~WeightAccessor() = default;

  /// The weight `name` in the model's compute dtype on the computation's device, or
  /// InvalidArgument naming it when the block has no such weight.
  virtual StatusOr<at::Tensor> Get(std::string_view name) const = 0;

  /// True when the block has weight `name` (for optional weights such as biases).
  virtual bool Has(std::string_view name) const = 0;
};

/// The accessor over weights already resident in compute form (Model::PrepareWeight's output).
class ResidentWeights final : public WeightAccessor {
 public:
  /// REQUIRES: `weights` outlives this accessor.
  explicit ResidentWeights(const TensorMap& weights) : weights_(weights) {}
  StatusOr<at::Tensor> Get(std::string_view name) const override;
  bool Has(std::string_view name) const override;

 private:
  const TensorMap& weights_;
};

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

  /// Runs block `index` on `state` (on the device the tensors are on), reading its weights
  /// through `weights`. Missing or mis-shaped inputs or weights are InvalidArgument errors
  /// naming the tensor, never a crash; so is an index out of range.
  virtual Status RunBlock(size_t index, const WeightAccessor& weights, TensorMap& state) const = 0;

  /// True for state entries that are the same on every step of one sampling run (for Flux the
  /// RoPE table "pe"), so workers may cache them per run instead of receiving them per step.
  virtual bool IsRunConstant(std::string_view state_name) const = 0;

  /// Converts one stored tensor (as read from the file, any dtype) into what RunBlock expects:
  /// the compute dtype for floating weights; fp8 is upcast here.
  virtual StatusOr<at::Tensor> PrepareWeight(std::string_view name, const at::Tensor& stored) const = 0;
};

/// Creates a model of `family` from its configuration JSON (what the family's descriptor
/// detected), computing in `dtype`. An unknown family is InvalidArgument listing the known ones.
StatusOr<std::unique_ptr<Model>> CreateModel(std::string_view family, std::string_view config_json,
                                             at::ScalarType dtype);

/// The families CreateModel can create, in registry order.
std::vector<std::string_view> ImplementedFamilies();

}  // namespace fleet::models
