// LoRA and other weight patches, with ComfyUI's arithmetic (comfy/lora.py calculate_weight and
// comfy/weight_adapter): LoRA (up, down, optional mid, alpha; the LoCon conv form; DoRA's
// dora_scale), LoHa, LoKr, and full diffs (diff, diff_b, set_weight), several stacked, each with
// its strength, and offset patches that land in a slice of a fused weight.
//
// Patches never touch the weights they apply to. PatchedWeights wraps a block's accessor and
// returns, for each patched weight, a new tensor: the weight as the block would see it, upcast to
// float32, every patch added in order in float32, rounded once (to nearest) back to the weight's
// dtype. Removing a patch set or changing a strength is therefore exact and needs no file read.
//
// The same functions run in fleet-run-local and on workers, so a patched distributed run is
// bit-identical to a patched single-process run on the same device type.
//
// Thread safety: a PatchSet is immutable once built and may be shared between threads.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fleet/families/lora_keys.h"
#include "fleet/formats/model_file.h"
#include "fleet/models/model.h"
#include "fleet/status/status.h"

namespace fleet::models {

/// One module of a LoRA file, as read.
struct Adapter {
  enum class Kind : uint8_t { kLora, kLoha, kLokr, kDiff, kSet };
  Kind kind = Kind::kLora;
  // The module's tensors by part suffix (".lora_up.weight", ".hada_w1_a", ".diff", ...), in
  // their stored dtype (fp8 upcast to float32), on the device patches are computed on.
  TensorMap parts;
  std::optional<double> alpha;  // ".alpha"; none: the scale is 1
  at::Tensor dora_scale;        // ".dora_scale" or undefined
};

/// One adapter applied to one weight.
struct WeightPatch {
  std::shared_ptr<const Adapter> adapter;
  double strength = 1.0;
  // See families::LoraModule.
  int64_t offset_dim = 0;
  int64_t offset_start = 0;
  int64_t offset_length = -1;
  bool swap_halves = false;
};

/// Patches by weight name (as blocks ask for weights), each weight's in application order.
using PatchSet = std::map<std::string, std::vector<WeightPatch>, std::less<>>;

/// Reads one part of a LoRA by its key: a tensor on any device (fp8 already upcast), or an
/// error naming the key.
using PartReader = std::function<StatusOr<at::Tensor>(const std::string& key)>;

/// The parts of a LoRA file (copied out of it). REQUIRES: `file` outlives the reader.
PartReader FileParts(const formats::ModelFile& file);
/// Parts given as named tensors (a patch set sent over the wire). REQUIRES: `tensors` outlives
/// the reader.
PartReader TensorParts(const TensorMap& tensors);

/// Reads `modules` (what families::MapLoraKeys found, or the part of it a worker runs) through
/// `read` and appends their patches at `strength` to `patches`, their tensors copied to
/// `device`. Nothing is added on error. Errors name `source` (the file) and the module: a
/// strength or alpha that is not finite, parts that do not fit together (an up and down of
/// different ranks, a LoHa or LoKr half missing), a patch whose size does not match its weight
/// (or the slice an offset names), a tensor that is not floating.
Status AddLoraPatches(std::string_view source, const PartReader& read,
                      const std::vector<families::LoraModule>& modules, double strength,
                      at::Device device, PatchSet& patches);

/// `base` (a weight as a block sees it) with `patches` applied: in float32, rounded once to
/// base's dtype, on base's device.
StatusOr<at::Tensor> ApplyPatches(std::string_view name, const at::Tensor& base,
                                  const std::vector<WeightPatch>& patches);

/// A block's accessor with patches: unpatched weights pass through unchanged (the same
/// tensor), patched ones are computed at each Get.
class PatchedWeights final : public WeightAccessor {
 public:
  /// REQUIRES: `base` and `patches` outlive this accessor.
  PatchedWeights(const WeightAccessor& base, const PatchSet& patches)
      : base_(base), patches_(patches) {}
  StatusOr<at::Tensor> Get(std::string_view name) const override;
  bool Has(std::string_view name) const override { return base_.Has(name); }

 private:
  const WeightAccessor& base_;
  const PatchSet& patches_;
};

/// Parses "FILE[:STRENGTH]" (fleet run-local --lora): the strength is what follows the last
/// ':' when it is a number (default 1.0). InvalidArgument for a strength that is not finite.
StatusOr<std::pair<std::string, double>> ParseLoraArgument(std::string_view text);

}  // namespace fleet::models
