// Which weight of a model each module of a LoRA file patches: the torch-free half of LoRA
// support (the arithmetic is fleet::models::PatchSet, which needs libtorch).
//
// A LoRA file names its modules in one of several conventions; each module is a key prefix with
// parts ("<module>.lora_up.weight", "<module>.alpha", ...). ComfyUI's comfy.lora decides the
// mapping; this is the same mapping for the families Tensorfleet runs:
//
//   native     diffusion_model.double_blocks.0.img_attn.qkv   (also without "diffusion_model.")
//   kohya      lora_unet_double_blocks_0_img_attn_qkv
//   diffusers  transformer.transformer_blocks.0.attn.to_q     (Flux: lands in rows [0, h) of
//              img_attn.qkv; also lycoris_ and lora_transformer_ spellings; WAN:
//              blocks.0.attn1.to_q)
//
// The coordinator maps a LoRA once for the whole model (it has the layout) and tells each worker
// which modules patch which weights; fleet-run-local maps it the same way.
//
// Thread safety: pure functions.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "fleet/status/status.h"

namespace fleet::families {

/// One module of a LoRA file and the weight it patches.
struct LoraModule {
  std::string prefix;  // the file's key prefix ("lora_unet_double_blocks_0_img_attn_qkv")
  std::string target;  // the model weight, without the file prefix ("...img_attn.qkv.weight")
  std::vector<int64_t> shape;  // the target's shape
  // ComfyUI's offset patches: the patch lands in target.narrow(offset_dim, offset_start,
  // offset_length); offset_length < 0 means the whole weight.
  int64_t offset_dim = 0;
  int64_t offset_start = 0;
  int64_t offset_length = -1;
  // Diffusers' norm_out.linear stores (scale, shift) where Flux stores (shift, scale): the
  // patch's two halves along dim 0 are swapped before it is added (ComfyUI's swap_scale_shift).
  bool swap_halves = false;
  // The parts present, by suffix (".lora_up.weight", ".alpha", ...) -> full key. A module's
  // bias diffs (".diff_b", ".b_norm") are a module of their own whose target is the bias.
  std::map<std::string, std::string, std::less<>> parts;
};

/// A LoRA file mapped onto a model.
struct LoraMapping {
  std::vector<LoraModule> modules;        // in file key order
  std::vector<std::string> unmatched;     // module prefixes that name no weight of the model
  std::vector<std::string> text_encoder;  // modules for a text encoder (lora_te*, text_encoders.*)
  std::vector<std::string> unknown;       // keys that are no LoRA part at all
};

/// Weight shapes by name (without the file prefix, as blocks ask for them).
using WeightShapes = std::map<std::string, std::vector<int64_t>, std::less<>>;

/// Maps the keys of a LoRA file (`lora_keys`) onto a model of `family` whose weights are
/// `weights`. `config_json` is the
/// family's configuration (Flux's hidden_size places the diffusers q/k/v patches).
/// InvalidArgument when no module matches (saying how many did, naming a few that did not),
/// and Unimplemented naming the adapter for GLoRA, OFT, BOFT and reshape_weight (ComfyUI's
/// Flux control LoRAs, which change the model's shape).
StatusOr<LoraMapping> MapLoraKeys(std::string_view family, std::string_view config_json,
                                  const WeightShapes& weights,
                                  const std::vector<std::string>& lora_keys,
                                  std::string_view where);

/// Splits a LoRA key into (module prefix, part suffix) by the longest known part suffix;
/// false when the key has none.
bool SplitLoraKey(std::string_view key, std::string* prefix, std::string* suffix);

}  // namespace fleet::families
