// Flux.1 (dev / schnell): stem, double_blocks.i, single_blocks.i, final_layer. The arithmetic
// is in docs/models.md; this is the torch-free half (common/models/src/flux.cc runs it).
#include <algorithm>
#include <array>
#include <cmath>

#include "builder.h"
#include "fleet/families/attention.h"
#include "registry.h"

namespace fleet::families::internal {
namespace {

constexpr std::array<std::string_view, 5> kStem = {"img_in", "time_in", "guidance_in", "vector_in",
                                                   "txt_in"};

// ComfyUI's Flux keyword arguments (comfy/ldm/flux/model.py FluxParams) we read from `config`.
const std::vector<std::string_view> kComfyKeys = {
    "image_model", "in_channels", "out_channels", "vec_in_dim", "context_in_dim",
    "hidden_size", "mlp_ratio",   "num_heads",    "depth",      "depth_single_blocks",
    "axes_dim",    "theta",       "patch_size",   "qkv_bias",   "guidance_embed"};

StatusOr<std::vector<int64_t>> AxesFromJson(const nlohmann::json& j, int64_t head,
                                            const std::string& what) {
  std::vector<int64_t> axes;
  bool ok = j.is_array() && !j.empty();
  int64_t sum = 0;
  if (ok) {
    for (const auto& v : j) {
      if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() % 2 != 0) {
        ok = false;
        break;
      }
      axes.push_back(v.get<int64_t>());
      sum += axes.back();
    }
  }
  if (!ok || sum != head || axes.size() != 3) {
    return InvalidArgumentError(what + " = '" + j.dump() +
                                "' must be a JSON array of 3 positive even integers summing to "
                                "the head width " +
                                std::to_string(head));
  }
  return axes;
}

// Flux's proportions (16:56:56 of 128) for other head widths, every axis even.
std::vector<int64_t> DefaultAxes(int64_t head) {
  if (head == 128) return {16, 56, 56};
  int64_t a1 = (head - 2 * static_cast<int64_t>(std::llround(head / 16.0))) / 2;
  a1 -= a1 % 2;
  return {head - 2 * a1, a1, a1};
}

class Flux final : public Family {
 public:
  std::string_view name() const override { return "flux"; }

  std::optional<std::string> Recognise(
      const std::vector<formats::TensorInfo>& tensors) const override {
    return PrefixOf(tensors, "img_in.weight", "double_blocks.");
  }

  std::optional<PinRule> Pin(std::string_view unit) const override {
    if (!IsStemUnit(unit, kStem)) return std::nullopt;
    return PinRule{
        "Flux stem: its outputs (img, txt, vec) feed every block, so it stays with the compute "
        "device",
        false};
  }

  bool RecogniseUnits(const std::vector<std::string>& names) const override {
    return std::any_of(names.begin(), names.end(), [](const std::string& n) {
      const std::string first = FirstComponent(n);
      return first == "double_blocks" || first == "single_blocks";
    });
  }

  StatusOr<Layout> Detect(const LayoutInput& in) const override {
    Builder b(in, "flux");
    Layout layout{"flux", in.prefix, "", {}, {}};
    auto classify = [](const std::string& n) -> std::string {
      const std::string first = FirstComponent(n);
      if (n.size() <= first.size()) return "";
      if (std::find(kStem.begin(), kStem.end(), first) != kStem.end()) return "stem";
      for (std::string_view g : {"double_blocks", "single_blocks"}) {
        const int64_t i = BlockIndex(n, g);
        if (i >= 0) return std::string(g) + "." + std::to_string(i);
      }
      if (first == "final_layer") return "final_layer";
      return "";
    };
    auto rank = [](const std::string& u) -> RankKey {
      if (u == "stem") return {0, 0};
      if (u == "final_layer") return {3, 0};
      const int64_t i = BlockIndex(u, "double_blocks");
      if (i >= 0) return {1, i};
      return {2, BlockIndex(u, "single_blocks")};
    };
    FLEET_RETURN_IF_ERROR(b.Group(classify, rank, this, &layout.units));

    // From shapes.
    FLEET_ASSIGN_OR_RETURN(int64_t depth, b.CountBlocks("double_blocks"));
    FLEET_ASSIGN_OR_RETURN(int64_t depth_single, b.CountBlocks("single_blocks"));
    if (depth == 0) return b.Error("no double_blocks.N tensors");
    FLEET_ASSIGN_OR_RETURN(int64_t token_features, b.Dim("img_in.weight", 2, 1));
    FLEET_ASSIGN_OR_RETURN(int64_t hidden, b.Dim("img_in.weight", 2, 0));
    FLEET_ASSIGN_OR_RETURN(int64_t head,
                           b.Dim("double_blocks.0.img_attn.norm.query_norm.scale", 1, 0));
    if (head <= 0 || hidden % head != 0) {
      return b.Error("hidden size " + std::to_string(hidden) +
                     " is not a multiple of the head width " + std::to_string(head) +
                     " (double_blocks.0.img_attn.norm.query_norm.scale)");
    }
    FLEET_ASSIGN_OR_RETURN(int64_t mlp, b.Dim("double_blocks.0.img_mlp.0.weight", 2, 0));
    FLEET_ASSIGN_OR_RETURN(int64_t context, b.Dim("txt_in.weight", 2, 1));
    FLEET_ASSIGN_OR_RETURN(int64_t vec, b.Dim("vector_in.in_layer.weight", 2, 1));
    FLEET_ASSIGN_OR_RETURN(int64_t out_features, b.Dim("final_layer.linear.weight", 2, 0));
    const bool guidance = b.Get("guidance_in.in_layer.weight") != nullptr;
    const bool qkv_bias = b.Get("double_blocks.0.img_attn.qkv.bias") != nullptr;

    // The metadata `config` (ComfyUI's names) decides what shapes cannot say and must agree
    // with what they do.
    FLEET_ASSIGN_OR_RETURN(nlohmann::json cfg, MetadataConfig(in, "flux", kComfyKeys));
    if (cfg.contains("image_model") && cfg["image_model"] != "flux") {
      return InvalidArgumentError(in.where + ": metadata 'config' image_model is " +
                                  cfg["image_model"].dump() + ", expected \"flux\"");
    }
    int64_t patch = 2;
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "patch_size", 1, &patch));
    const int64_t pp = patch * patch;
    if (token_features % pp != 0 || out_features % pp != 0) {
      return b.Error("img_in.weight columns " + std::to_string(token_features) +
                     " and final_layer.linear.weight rows " + std::to_string(out_features) +
                     " must be multiples of patch_size^2 = " + std::to_string(pp));
    }
    int64_t latent_in = token_features / pp, latent_out = out_features / pp;
    FLEET_RETURN_IF_ERROR(
        OverrideInt(cfg, in, "in_channels", 1, &latent_in, latent_in, "img_in.weight / patch^2"));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "out_channels", 1, &latent_out, latent_out,
                                      "final_layer.linear.weight / patch^2"));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "hidden_size", 1, &hidden, hidden, "img_in.weight"));
    int64_t heads = hidden / head;
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "num_heads", 1, &heads, heads,
                                      "double_blocks.0.img_attn.norm.query_norm.scale"));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "depth", 1, &depth, depth, "double_blocks.N"));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "depth_single_blocks", 0, &depth_single,
                                      depth_single, "single_blocks.N"));
    FLEET_RETURN_IF_ERROR(
        OverrideInt(cfg, in, "context_in_dim", 1, &context, context, "txt_in.weight"));
    FLEET_RETURN_IF_ERROR(
        OverrideInt(cfg, in, "vec_in_dim", 1, &vec, vec, "vector_in.in_layer.weight"));
    bool guidance_embed = guidance, bias = qkv_bias;
    FLEET_RETURN_IF_ERROR(OverrideBool(cfg, in, "guidance_embed", &guidance_embed, guidance,
                                       "guidance_in.in_layer.weight"));
    FLEET_RETURN_IF_ERROR(
        OverrideBool(cfg, in, "qkv_bias", &bias, qkv_bias, "double_blocks.0.img_attn.qkv.bias"));
    if (cfg.contains("mlp_ratio")) {
      const auto& r = cfg["mlp_ratio"];
      if (!r.is_number() || r.get<double>() <= 0 ||
          std::llround(static_cast<double>(hidden) * r.get<double>()) != mlp) {
        return InvalidArgumentError(in.where + ": metadata 'config' mlp_ratio = " + r.dump() +
                                    " contradicts the tensors: double_blocks.0.img_mlp.0.weight "
                                    "has " +
                                    std::to_string(mlp) + " rows for hidden_size " +
                                    std::to_string(hidden));
      }
    }
    double theta = 10000;
    if (cfg.contains("theta")) {
      if (!cfg["theta"].is_number() || cfg["theta"].get<double>() <= 0) {
        return InvalidArgumentError(in.where +
                                    ": metadata 'config' theta must be a positive "
                                    "number, got " +
                                    cfg["theta"].dump());
      }
      theta = cfg["theta"].get<double>();
    }
    std::vector<int64_t> axes = DefaultAxes(head);
    if (cfg.contains("axes_dim")) {
      FLEET_ASSIGN_OR_RETURN(
          axes, AxesFromJson(cfg["axes_dim"], head, in.where + ": metadata 'config' axes_dim"));
    }
    // Files written before `config` existed carry only the RoPE axes.
    if (auto it = in.metadata.find("fleet.axes_dim"); it != in.metadata.end()) {
      auto j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
      FLEET_ASSIGN_OR_RETURN(auto legacy,
                             AxesFromJson(j, head, in.where + ": metadata 'fleet.axes_dim'"));
      if (cfg.contains("axes_dim") && legacy != axes) {
        return InvalidArgumentError(in.where + ": metadata 'fleet.axes_dim' " + it->second +
                                    " contradicts 'config' axes_dim " + cfg["axes_dim"].dump());
      }
      axes = legacy;
    }

    nlohmann::ordered_json c;
    c["in_channels"] = latent_in * pp;
    c["hidden_size"] = hidden;
    c["num_heads"] = heads;
    c["depth"] = depth;
    c["depth_single_blocks"] = depth_single;
    c["mlp_hidden_dim"] = mlp;
    c["context_in_dim"] = context;
    c["vec_in_dim"] = vec;
    c["guidance_embed"] = guidance_embed;
    c["axes_dim"] = axes;
    c["theta"] = theta;
    c["patch_size"] = patch;
    c["qkv_bias"] = bias;
    c["out_channels"] = latent_out * pp;
    layout.config_json = c.dump();
    return layout;
  }

  // The widest activation of a block: every token's MLP hidden plus the six modulated copies
  // of the hidden state, in the compute dtype. Latents are 8x smaller than pixels; a token
  // covers patch x patch latents.
  StatusOr<uint64_t> ActivationBytes(std::string_view config_json,
                                     const InputSizes& s) const override {
    auto c = nlohmann::json::parse(config_json, nullptr, /*allow_exceptions=*/false);
    if (!c.is_object() || !c.contains("hidden_size") || !c.contains("mlp_hidden_dim")) {
      return InvalidArgumentError("flux: configuration lacks hidden_size or mlp_hidden_dim");
    }
    const int64_t p = c.value("patch_size", 2) * 8;
    const int64_t tokens = ((s.height + p - 1) / p) * ((s.width + p - 1) / p) + s.text_tokens;
    const int64_t hidden = c["hidden_size"].get<int64_t>();
    const int64_t per_token = c["mlp_hidden_dim"].get<int64_t>() + 6 * hidden;
    const int64_t heads = c.value("num_heads", std::max<int64_t>(hidden / 128, 1));
    // Plus one chunk of attention scores (joint attention over text and image tokens).
    return static_cast<uint64_t>(s.batch * tokens * per_token * s.dtype_bytes) +
           AttentionChunkBytes(s.batch * heads, tokens, tokens);
  }

  // x is the latent [batch, 16, height / 8, width / 8]; context [batch, tokens, 4096].
  std::optional<InputSizes> SizesOf(std::string_view, const InputShapes& shapes) const override {
    auto x = shapes.find("x");
    if (x == shapes.end() || x->second.size() != 4) return std::nullopt;
    InputSizes s;
    s.batch = x->second[0];
    s.height = x->second[2] * 8;
    s.width = x->second[3] * 8;
    auto context = shapes.find("context");
    if (context != shapes.end() && context->second.size() == 3) s.text_tokens = context->second[1];
    return s;
  }
};

}  // namespace

const Family& FluxFamily() {
  static const Flux family;
  return family;
}

}  // namespace fleet::families::internal
