// Where placement units come from and which of them are pinned to the compute device.
//
// A unit list comes from a model file (fleet::formats::DetectLayout), from a JSON file
// (`fleet plan --units FILE.json`: [{"name", "bytes", "pinned"}] in model order) or from a
// built-in example with the real sizes of a published checkpoint. MarkPinnedUnits gives all of
// them the same treatment: the family's stem and text-encoder embeddings stay on the compute
// device, and each pinned unit says why.
//
// Thread safety: pure functions.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "fleet/placement/placement.h"
#include "fleet/status/status.h"

namespace fleet::placement {

/// Model families whose pin rules we know.
enum class Family {
  kNone,         // no rule: only units pinned by their source stay pinned
  kFlux,         // stem: img_in, time_in, guidance_in, vector_in, txt_in
  kWan,          // stem: patch_embedding, time_embedding, time_projection, text_embedding, img_emb
  kTextEncoder,  // CLIP (embed/wte/wpe, as DisTorch2) and T5 (shared, which DisTorch2 misses)
};

/// "none", "flux", "wan", "text-encoder" (also "clip", "t5").
StatusOr<Family> ParseFamily(std::string_view text);
std::string_view FamilyName(Family family);

/// Guesses the family from unit names: double_blocks/single_blocks -> flux, blocks + one of
/// WAN's stem names -> wan, else none.
Family GuessFamily(const std::vector<Unit>& units);

/// Pins the units `family`'s rules name and sets their pin_reason (and upstream_pins for the
/// units DisTorch2 pins as well). Units already pinned keep their reason.
void MarkPinnedUnits(Family family, std::vector<Unit>* units);

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
  Family family;
  std::vector<Unit> units;    // real sizes of the published bf16 checkpoint
  uint64_t activation_bytes;  // activation estimate for the example's largest input
};

/// Names of the built-in examples.
std::vector<std::string> ExampleNames();

/// The example `name` with pins marked, or NotFound listing the known names.
StatusOr<Example> GetExample(std::string_view name);

}  // namespace fleet::placement
