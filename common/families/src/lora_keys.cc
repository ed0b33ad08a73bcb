#include "fleet/families/lora_keys.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <regex>
#include <set>

namespace fleet::families {
namespace {

// Every part a LoRA module may have (ComfyUI's comfy.lora.load_lora and weight adapters).
constexpr std::array<std::string_view, 37> kParts = {
    // LoRA / LoCon / DoRA, in each spelling trainers use
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", "_lora.up.weight",
    "_lora.down.weight", ".lora_B.weight", ".lora_A.weight", ".lora.up.weight", ".lora.down.weight",
    ".lora_B", ".lora_A", ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
    ".lora_B.default.weight", ".lora_A.default.weight", ".alpha", ".dora_scale",
    // LoHa
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    // LoKr
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    // full diffs
    ".diff", ".diff_b", ".set_weight", ".w_norm", ".b_norm",
    // refused below, recognised so the error names them
    ".oft_blocks", ".reshape_weight"};

// GLoRA's parts end in ".weight" like a plain tensor, so they are checked by name.
constexpr std::array<std::string_view, 4> kGloraParts = {".a1.weight", ".a2.weight", ".b1.weight",
                                                         ".b2.weight"};

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() > suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

std::string Underscored(std::string_view s) {
  std::string out(s);
  std::replace(out.begin(), out.end(), '.', '_');
  return out;
}

struct Target {
  std::string weight;
  int64_t start = 0, length = -1;
  bool swap = false;
};

using Aliases = std::map<std::string, Target, std::less<>>;

// ComfyUI's generic mapping, for every family: diffusion_model.<name> and kohya's
// lora_unet_<name with underscores> for weights; the bare name too (trainers that drop the
// prefix); non-".weight" tensors (modulation, scale) by their own name.
void AddGeneric(const WeightShapes& weights, Aliases& aliases) {
  for (const auto& [w, shape] : weights) {
    if (EndsWith(w, ".weight")) {
      const std::string stem = w.substr(0, w.size() - 7);
      aliases.emplace("diffusion_model." + stem, Target{w});
      aliases.emplace("lora_unet_" + Underscored(stem), Target{w});
      aliases.emplace(stem, Target{w});
    } else {
      aliases.emplace("diffusion_model." + w, Target{w});
      aliases.emplace(w, Target{w});
    }
  }
}

// Adds a diffusers name (without ".weight") for a weight, in the spellings ComfyUI accepts for
// Flux: transformer.<name>, lycoris_<name_>, lora_transformer_<name_>.
void AddDiffusers(const std::string& name, const Target& t, Aliases& aliases) {
  aliases.emplace("transformer." + name, t);
  aliases.emplace("lycoris_" + Underscored(name), t);
  aliases.emplace("lora_transformer_" + Underscored(name), t);
}

// ComfyUI's flux_to_diffusers: per-block renames, q/k/v into the fused qkv (and linear1)
// weights at row offsets, and the top-level renames.
void AddFlux(const WeightShapes& weights, int64_t hidden, int64_t mlp_hidden, Aliases& aliases) {
  static const std::regex kDouble(R"(double_blocks\.(\d+)\.(.+)\.weight)");
  static const std::regex kSingle(R"(single_blocks\.(\d+)\.(.+)\.weight)");
  static const std::regex kSingleScale(R"(single_blocks\.(\d+)\.norm\.(query|key)_norm\.scale)");
  static const std::regex kDoubleScale(
      R"(double_blocks\.(\d+)\.(img|txt)_attn\.norm\.(query|key)_norm\.scale)");
  static const std::map<std::string, std::string, std::less<>> kDoubleRenames = {
      {"img_attn.proj", "attn.to_out.0"},      {"img_mod.lin", "norm1.linear"},
      {"txt_mod.lin", "norm1_context.linear"}, {"txt_attn.proj", "attn.to_add_out"},
      {"img_mlp.0", "ff.net.0.proj"},          {"img_mlp.2", "ff.net.2"},
      {"txt_mlp.0", "ff_context.net.0.proj"},  {"txt_mlp.2", "ff_context.net.2"}};
  static const std::map<std::string, std::string, std::less<>> kSingleRenames = {
      {"modulation.lin", "norm.linear"}, {"linear2", "proj_out"}};
  static const std::map<std::string, std::string, std::less<>> kTopRenames = {
      {"final_layer.linear", "proj_out"},
      {"img_in", "x_embedder"},
      {"time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"},
      {"time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"},
      {"txt_in", "context_embedder"},
      {"vector_in.in_layer", "time_text_embed.text_embedder.linear_1"},
      {"vector_in.out_layer", "time_text_embed.text_embedder.linear_2"},
      {"guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"},
      {"guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"}};
  for (const auto& [w, shape] : weights) {
    std::smatch m;
    if (std::regex_match(w, m, kDouble)) {
      const std::string block = "transformer_blocks." + m[1].str();
      const std::string inner = m[2].str();
      if (inner == "img_attn.qkv" || inner == "txt_attn.qkv") {
        const bool img = inner[0] == 'i';
        const std::array<std::string, 3> names =
            img ? std::array<std::string, 3>{"to_q", "to_k", "to_v"}
                : std::array<std::string, 3>{"add_q_proj", "add_k_proj", "add_v_proj"};
        for (int i = 0; i < 3; ++i) {
          AddDiffusers(block + ".attn." + names[i], Target{w, i * hidden, hidden}, aliases);
        }
      } else if (auto r = kDoubleRenames.find(inner); r != kDoubleRenames.end()) {
        AddDiffusers(block + "." + r->second, Target{w}, aliases);
      }
    } else if (std::regex_match(w, m, kSingle)) {
      const std::string block = "single_transformer_blocks." + m[1].str();
      const std::string inner = m[2].str();
      if (inner == "linear1") {
        const std::array<std::string, 3> names = {"to_q", "to_k", "to_v"};
        for (int i = 0; i < 3; ++i) {
          AddDiffusers(block + ".attn." + names[i], Target{w, i * hidden, hidden}, aliases);
        }
        AddDiffusers(block + ".proj_mlp", Target{w, 3 * hidden, mlp_hidden}, aliases);
        // ComfyUI: diffusion_model.single_blocks.N.linear1_qkv -> rows [0, 3h) of linear1.
        aliases.emplace("diffusion_model.single_blocks." + m[1].str() + ".linear1_qkv",
                        Target{w, 0, 3 * hidden});
      } else if (auto r = kSingleRenames.find(inner); r != kSingleRenames.end()) {
        AddDiffusers(block + "." + r->second, Target{w}, aliases);
      }
    } else if (std::regex_match(w, m, kSingleScale)) {
      AddDiffusers("single_transformer_blocks." + m[1].str() + ".attn.norm_" +
                       (m[2].str() == "query" ? "q" : "k"),
                   Target{w}, aliases);
    } else if (std::regex_match(w, m, kDoubleScale)) {
      const bool img = m[2].str() == "img";
      const std::string qk = m[3].str() == "query" ? "q" : "k";
      AddDiffusers("transformer_blocks." + m[1].str() + ".attn.norm_" + (img ? "" : "added_") + qk,
                   Target{w}, aliases);
    } else if (EndsWith(w, ".weight")) {
      const std::string stem = w.substr(0, w.size() - 7);
      if (auto r = kTopRenames.find(stem); r != kTopRenames.end()) {
        AddDiffusers(r->second, Target{w}, aliases);
      } else if (stem == "final_layer.adaLN_modulation.1") {
        AddDiffusers("norm_out.linear", Target{w, 0, -1, /*swap=*/true}, aliases);
      }
    }
  }
}

// Diffusers' names for WAN (its conversion script's renames; norm2 and norm3 are swapped).
void AddWan(const WeightShapes& weights, Aliases& aliases) {
  static const std::regex kBlock(R"(blocks\.(\d+)\.(.+)\.weight)");
  static const std::map<std::string, std::string, std::less<>> kBlockRenames = {
      {"self_attn.q", "attn1.to_q"},
      {"self_attn.k", "attn1.to_k"},
      {"self_attn.v", "attn1.to_v"},
      {"self_attn.o", "attn1.to_out.0"},
      {"self_attn.norm_q", "attn1.norm_q"},
      {"self_attn.norm_k", "attn1.norm_k"},
      {"cross_attn.q", "attn2.to_q"},
      {"cross_attn.k", "attn2.to_k"},
      {"cross_attn.v", "attn2.to_v"},
      {"cross_attn.o", "attn2.to_out.0"},
      {"cross_attn.norm_q", "attn2.norm_q"},
      {"cross_attn.norm_k", "attn2.norm_k"},
      {"cross_attn.k_img", "attn2.add_k_proj"},
      {"cross_attn.v_img", "attn2.add_v_proj"},
      {"cross_attn.norm_k_img", "attn2.norm_added_k"},
      {"ffn.0", "ffn.net.0.proj"},
      {"ffn.2", "ffn.net.2"},
      {"norm3", "norm2"}};
  static const std::map<std::string, std::string, std::less<>> kTopRenames = {
      {"time_embedding.0", "condition_embedder.time_embedder.linear_1"},
      {"time_embedding.2", "condition_embedder.time_embedder.linear_2"},
      {"text_embedding.0", "condition_embedder.text_embedder.linear_1"},
      {"text_embedding.2", "condition_embedder.text_embedder.linear_2"},
      {"time_projection.1", "condition_embedder.time_proj"},
      {"img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"},
      {"img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"},
      {"head.head", "proj_out"},
      {"patch_embedding", "patch_embedding"}};
  for (const auto& [w, shape] : weights) {
    if (!EndsWith(w, ".weight")) continue;
    std::smatch m;
    if (std::regex_match(w, m, kBlock)) {
      if (auto r = kBlockRenames.find(m[2].str()); r != kBlockRenames.end()) {
        aliases.emplace("transformer.blocks." + m[1].str() + "." + r->second, Target{w});
      }
    } else if (auto r = kTopRenames.find(w.substr(0, w.size() - 7)); r != kTopRenames.end()) {
      aliases.emplace("transformer." + r->second, Target{w});
    }
  }
}

// ComfyUI's model_lora_keys_clip for one text encoder: its generic `text_encoders.<encoder>.`
// names, kohya's lora_te[N]_ names (CLIP-L is te or te1; T5 is te1, te2 or te3 depending on
// the encoders beside it, so every index is accepted: the module names tell CLIP's layers from
// T5's blocks) and diffusers' text_encoder.text_model names.
void AddTextEncoder(const WeightShapes& weights, Aliases& aliases) {
  for (const auto& [w, shape] : weights) {
    if (!EndsWith(w, ".weight")) continue;
    const std::string stem = w.substr(0, w.size() - 7);
    const bool clip = StartsWith(stem, "text_model.") || stem == "text_projection";
    const std::vector<std::string_view> encoders =
        clip ? std::vector<std::string_view>{"clip_l", "clip_g"}
             : std::vector<std::string_view>{"t5xxl", "umt5xxl"};
    for (std::string_view encoder : encoders) {
      aliases.emplace("text_encoders." + std::string(encoder) + ".transformer." + stem, Target{w});
    }
    const std::vector<std::string_view> kohya =
        clip ? std::vector<std::string_view>{"lora_te_", "lora_te1_"}
             : std::vector<std::string_view>{"lora_te1_", "lora_te2_", "lora_te3_"};
    for (std::string_view te : kohya)
      aliases.emplace(std::string(te) + Underscored(stem), Target{w});
    if (clip) aliases.emplace("text_encoder." + stem, Target{w});
  }
}

bool IsTextEncoderModule(std::string_view prefix) {
  return prefix.rfind("lora_te", 0) == 0 || prefix.rfind("text_encoders.", 0) == 0 ||
         prefix.rfind("text_encoder.", 0) == 0 || prefix.rfind("text_encoder_2.", 0) == 0;
}

std::string FewOf(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size() && i < 3; ++i) out += (i ? "', '" : "'") + names[i];
  if (!names.empty()) out += "'";
  if (names.size() > 3) out += ", ...";
  return out;
}

}  // namespace

bool SplitLoraKey(std::string_view key, std::string* prefix, std::string* suffix) {
  std::string_view best;
  for (std::string_view part : kParts) {
    if (part.size() > best.size() && EndsWith(key, part)) best = part;
  }
  for (std::string_view part : kGloraParts) {
    if (part.size() > best.size() && EndsWith(key, part)) best = part;
  }
  if (best.empty()) return false;
  *prefix = std::string(key.substr(0, key.size() - best.size()));
  *suffix = std::string(best);
  return true;
}

StatusOr<LoraMapping> MapLoraKeys(std::string_view family, std::string_view config_json,
                                  const WeightShapes& weights,
                                  const std::vector<std::string>& lora_keys,
                                  std::string_view where) {
  const std::string at(where);
  Aliases aliases;
  AddGeneric(weights, aliases);
  if (family == "flux") {
    const auto config = nlohmann::json::parse(config_json, nullptr, /*allow_exceptions=*/false);
    if (!config.is_object() || !config.contains("hidden_size") ||
        !config["hidden_size"].is_number_integer() || !config.contains("mlp_hidden_dim") ||
        !config["mlp_hidden_dim"].is_number_integer()) {
      return InvalidArgumentError(at +
                                  ": the flux configuration lacks hidden_size or mlp_hidden_dim");
    }
    AddFlux(weights, config["hidden_size"].get<int64_t>(), config["mlp_hidden_dim"].get<int64_t>(),
            aliases);
  } else if (family == "wan") {
    AddWan(weights, aliases);
  } else if (family == "text-encoder") {
    AddTextEncoder(weights, aliases);
  }

  LoraMapping mapping;
  std::map<std::string, size_t, std::less<>> module_index;  // prefix -> index in modules
  std::set<std::string, std::less<>> unmatched, text_encoder;
  for (const std::string& key : lora_keys) {
    std::string prefix, suffix;
    if (!SplitLoraKey(key, &prefix, &suffix)) {
      mapping.unknown.push_back(key);
      continue;
    }
    if (suffix == ".oft_blocks") {
      return UnimplementedError(at + ": module '" + prefix +
                                "' is an OFT/BOFT adapter, which Tensorfleet does not apply "
                                "(it applies LoRA, LoCon, DoRA, LoHa, LoKr and full diffs)");
    }
    if (std::find(kGloraParts.begin(), kGloraParts.end(), suffix) != kGloraParts.end()) {
      return UnimplementedError(at + ": module '" + prefix +
                                "' is a GLoRA adapter, which Tensorfleet does not apply "
                                "(it applies LoRA, LoCon, DoRA, LoHa, LoKr and full diffs)");
    }
    if (suffix == ".reshape_weight") {
      return UnimplementedError(
          at + ": module '" + prefix +
          "' has a reshape_weight (a Flux control LoRA that changes the model's input "
          "channels); Tensorfleet cannot change a loaded model's shape");
    }
    const bool bias = suffix == ".diff_b" || suffix == ".b_norm";
    const std::string id = bias ? prefix + "#bias" : prefix;
    auto found = module_index.find(id);
    if (found != module_index.end()) {
      mapping.modules[found->second].parts[suffix] = key;
      continue;
    }
    auto alias = aliases.find(prefix);
    std::string target = alias == aliases.end() ? "" : alias->second.weight;
    if (bias && EndsWith(target, ".weight")) target = target.substr(0, target.size() - 7) + ".bias";
    auto shape = weights.find(target);
    if (alias == aliases.end() || shape == weights.end()) {
      (IsTextEncoderModule(prefix) ? text_encoder : unmatched).insert(id);
      continue;
    }
    LoraModule module;
    module.prefix = prefix;
    module.target = target;
    module.shape = shape->second;
    module.offset_start = alias->second.start;
    module.offset_length = alias->second.length;
    module.swap_halves = alias->second.swap;
    module.parts[suffix] = key;
    module_index.emplace(id, mapping.modules.size());
    mapping.modules.push_back(std::move(module));
  }
  mapping.unmatched.assign(unmatched.begin(), unmatched.end());
  mapping.text_encoder.assign(text_encoder.begin(), text_encoder.end());
  if (mapping.modules.empty()) {
    std::string why = at + ": no module of this LoRA matches a weight of the " +
                      std::string(family) + " model (0 of " +
                      std::to_string(unmatched.size() + text_encoder.size()) + " matched";
    if (!mapping.unmatched.empty()) why += "; not matched: " + FewOf(mapping.unmatched);
    if (!mapping.text_encoder.empty()) {
      why += "; " + std::to_string(mapping.text_encoder.size()) +
             " are for a text encoder: " + FewOf(mapping.text_encoder);
    }
    if (!mapping.unknown.empty()) {
      why += "; " + std::to_string(mapping.unknown.size()) +
             " keys are no LoRA part: " + FewOf(mapping.unknown);
    }
    return InvalidArgumentError(why + ")");
  }
  return mapping;
}

}  // namespace fleet::families
