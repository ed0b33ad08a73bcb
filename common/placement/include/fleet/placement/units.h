// Where placement units come from and which of them are pinned to the compute device.
//
// A unit list comes from a model file (fleet::formats::DetectLayout), from a JSON file
// (`fleet plan --units FILE.json`: [{"name", "bytes", "pinned"}] in model order) or from a
// built-in example with the real sizes of a published checkpoint. MarkPinnedUnits gives all of
// them the same treatment: the family's pin rules (fleet::families; the stems, text-encoder
// embeddings) keep units on the compute device, and each pinned unit says why.
//
// Thread safety: pure functions.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "fleet/families/family.h"
#include "fleet/placement/placement.h"
#include "fleet/status/status.h"

namespace fleet::placement {

/// Pins the units `family`'s rules name (fleet::families::Family::Pin) and sets their
/// pin_reason (and upstream_pins for the units DisTorch2 pins as well). Units already pinned
/// keep their reason. A null family pins nothing.
void MarkPinnedUnits(const families::Family* family, std::vector<Unit>* units);

/// The family of a unit list by its names (fleet::families::GuessFamily), or null.
const families::Family* GuessFamily(const std::vector<Unit>& units);

/// Parses a JSON unit list: [{"name": "img_in", "bytes": 399360, "pinned": true}, ...].
/// "bytes" is an integer or a size string ("680mb"); "pinned" is optional (false).
/// \param source the file name, for messages.
/// \return the units, or InvalidArgument naming the source, element index, field and (for
/// syntax errors) the byte offset.
StatusOr<std::vector<Unit>> ParseUnitsJson(std::string_view text, std::string_view source);

/// A built-in example model.
struct Example {
  std::string name;  // "flux-dev"
  std::string description;
  const families::Family* family;
  std::vector<Unit> units;    // real sizes of the published bf16 checkpoint
  std::string config_json;    // the family configuration of the checkpoint
  families::InputSizes sizes;  // the example's input (Flux 1024 x 1024, WAN 720p x 81 frames)
  uint64_t activation_bytes;   // the family's activation estimate for `sizes`
};

/// Names of the built-in examples.
std::vector<std::string> ExampleNames();

/// The example `name` with pins marked, or NotFound listing the known names.
StatusOr<Example> GetExample(std::string_view name);

}  // namespace fleet::placement
