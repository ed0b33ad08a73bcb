// A model family's torch-free half: everything the coordinator, placement and `fleet` need to
// know about a family without running it.
//
// A family (Flux, WAN, the toy "linear" chain, text encoders) is one registry entry in two
// halves. This half, the descriptor, recognises the family's tensors (with or without a
// container prefix such as "model.diffusion_model."), derives its configuration from shapes
// (overridden by the file's metadata `config`, ComfyUI's keyword arguments), groups the tensors
// into ordered placement units, names the units pinned to the compute device and why, and
// estimates activation memory for given input sizes. The other half, the torch implementation of
// the blocks, lives in common/models (fleet::models::CreateModel) and is looked up by the same
// name. How to add a family: docs/models.md.
//
// Thread safety: descriptors are immutable singletons; every function here is safe to call
// from any thread.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fleet/families/layout.h"
#include "fleet/formats/model_file.h"
#include "fleet/status/status.h"

namespace fleet::families {

/// The input sizes an activation estimate is for, in pixels and frames as a user gives them.
struct InputSizes {
  int64_t batch = 1;
  int64_t width = 1024;
  int64_t height = 1024;
  int64_t frames = 1;         // video frames (1 for images)
  int64_t text_tokens = 512;  // conditioning length (T5's 512)
  int64_t dtype_bytes = 2;    // bytes per activation element (bf16)
};

/// `value` as the input size `name` ("width", "height", "frames", "batch"; 0 = the family's
/// default), or InvalidArgument when it is negative or above its limit (65536 pixels, 16384
/// frames, batch 4096: larger inputs would overflow the estimate, and no workflow runs them).
StatusOr<int64_t> CheckInputSize(std::string_view name, int64_t value);

/// A forward's input shapes by input name ("x" -> {1, 16, 128, 128}).
using InputShapes = std::map<std::string, std::vector<int64_t>, std::less<>>;

/// Why a unit stays on the compute device.
struct PinRule {
  std::string reason;
  bool upstream = false;  // DisTorch2 pins it too
};

/// What Detect works on: a file's tensor table and metadata, and the prefix Recognise found.
struct LayoutInput {
  const std::vector<formats::TensorInfo>& tensors;
  const std::map<std::string, std::string>& metadata;
  std::string prefix;  // "" or "model.diffusion_model." etc., stripped from every name
  std::string where;   // the file, for messages
};

class Family {
 public:
  virtual ~Family() = default;

  /// "flux", "wan", "linear", "text-encoder": the name models::CreateModel takes.
  virtual std::string_view name() const = 0;

  /// The container prefix ("" or e.g. "model.diffusion_model.") when `tensors` have this
  /// family's anchor tensors, nullopt when they are not this family's.
  virtual std::optional<std::string> Recognise(
      const std::vector<formats::TensorInfo>& tensors) const = 0;

  /// Units in execution order (every tensor in exactly one unit, pins marked) and the
  /// configuration as JSON with our keys (docs/models.md): from shapes, then overridden by the
  /// metadata `config` (ComfyUI's keyword arguments, translated). A missing or misshapen
  /// tensor, or a `config` that contradicts the shapes, is InvalidArgument naming it.
  virtual StatusOr<Layout> Detect(const LayoutInput& input) const = 0;

  /// Why unit `unit` must stay with the compute device, or nullopt.
  virtual std::optional<PinRule> Pin(std::string_view unit) const = 0;

  /// True when a bare list of unit names (`fleet plan --units`) looks like this family's.
  virtual bool RecogniseUnits(const std::vector<std::string>& unit_names) const = 0;

  /// Peak activation bytes of running the model on inputs of `sizes`, for the plan's headroom.
  /// \param config_json the configuration Detect produced.
  virtual StatusOr<uint64_t> ActivationBytes(std::string_view config_json,
                                             const InputSizes& sizes) const = 0;

  /// The input sizes a plan assumes when the workflow gives none (InputSizes' defaults: one
  /// 1024 x 1024 image; video families a typical clip).
  virtual InputSizes DefaultSizes() const { return InputSizes{}; }

  /// The input sizes of a forward whose inputs have these shapes (name -> shape), for the
  /// first-forward re-check of the plan's headroom; nullopt when the shapes do not say (the
  /// block code reports wrong inputs). dtype_bytes is left at its default.
  /// \param config_json the configuration Detect produced.
  virtual std::optional<InputSizes> SizesOf(std::string_view config_json,
                                            const InputShapes& shapes) const = 0;

  /// The state entries a forward returns (what the last block leaves): "out" for every family,
  /// plus "pooled" for a CLIP text encoder.
  /// \param config_json the configuration Detect produced.
  virtual std::vector<std::string> OutputNames(std::string_view /*config_json*/) const {
    return {"out"};
  }
};

/// Every registered family, in the order layout detection tries them.
const std::vector<const Family*>& AllFamilies();

/// The family called `name` (any case; "clip" and "t5" are "text-encoder"), or nullptr.
const Family* FindFamily(std::string_view name);

/// `name` as a family for pin rules: "none" is nullptr, an unknown name is InvalidArgument
/// listing the known ones.
StatusOr<const Family*> ParseFamily(std::string_view name);

/// "flux, wan, linear, text-encoder": the registered names, for messages.
std::string FamilyNames();

/// The family whose units these are (RecogniseUnits), or nullptr.
const Family* GuessFamily(const std::vector<std::string>& unit_names);

}  // namespace fleet::families
