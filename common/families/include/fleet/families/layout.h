// Placement units: a model file's tensors grouped the way the model family executes them.
//
// A unit is what a worker holds and runs (a transformer block, the stem, the final layer), never
// a single Linear layer. DetectLayout asks each registered family (fleet/families/family.h)
// whether the tensors are its own (from tensor names and shapes, and GGUF's
// `general.architecture`), strips a container prefix such as "model.diffusion_model.", derives
// the configuration the model code needs, and assigns every tensor to exactly one unit; a tensor
// no unit claims is an error. Files of no known family get one unit per top-level name. This is
// the planner's input. Rules: docs/formats.md and docs/models.md.
//
// Thread safety: pure functions over immutable inputs.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "fleet/formats/model_file.h"
#include "fleet/status/status.h"

namespace fleet::families {

struct Unit {
  std::string name;     // "stem", "double_blocks.7", "blocks.12", "final_layer", "head"
  uint64_t bytes = 0;   // sum of the tensors' bytes in the file
  bool pinned = false;  // must stay on the compute device (the stem)
  std::vector<std::string> tensors;  // full names in the file, in file order
};

struct Layout {
  std::string family;       // "flux", "wan", "linear", ..., or "unknown"
  std::string prefix;       // stripped from every name, e.g. "model.diffusion_model." or ""
  std::string config_json;  // family configuration (keys in docs/models.md); "{}" for unknown
  std::vector<Unit> units;  // in model execution order
  // File name -> weight name for files whose names are translated (llama.cpp's T5 GGUF names,
  // "enc.blk.0.attn_q.weight" -> "encoder.block.0.layer.0.SelfAttention.q.weight", as
  // ComfyUI-GGUF's CLIP loader maps them); empty for every other file.
  std::map<std::string, std::string> renamed;

  uint64_t total_bytes() const;

  /// The name blocks ask for the file's tensor `file_name` by: translated, or without the
  /// prefix.
  std::string WeightName(const std::string& file_name) const;
};

/// Detects the layout of `file`'s tensors (shapes and metadata only; no data is read).
StatusOr<Layout> DetectLayout(const formats::ModelFile& file);

/// The same over a bare tensor table; `where` names the source in error messages.
StatusOr<Layout> DetectLayout(const std::vector<formats::TensorInfo>& tensors,
                              const std::map<std::string, std::string>& metadata,
                              const std::string& where);

}  // namespace fleet::families
