// WAN 2.1 / 2.2 video transformers: stem, blocks.i, head. Torch-free half; the layout and the
// configuration keys are in docs/models.md; the torch half is common/models/src/wan.cc.
#include <algorithm>
#include <array>

#include "builder.h"
#include "fleet/families/attention.h"
#include "registry.h"

namespace fleet::families::internal {
namespace {

constexpr std::array<std::string_view, 5> kStem = {"patch_embedding", "text_embedding",
                                                   "time_embedding", "time_projection", "img_emb"};

// ComfyUI's WanModel keyword arguments (comfy/ldm/wan/model.py) we read from `config`.
const std::vector<std::string_view> kComfyKeys = {"image_model",
                                                  "model_type",
                                                  "patch_size",
                                                  "text_len",
                                                  "in_dim",
                                                  "dim",
                                                  "ffn_dim",
                                                  "freq_dim",
                                                  "text_dim",
                                                  "out_dim",
                                                  "num_heads",
                                                  "num_layers",
                                                  "window_size",
                                                  "qk_norm",
                                                  "cross_attn_norm",
                                                  "eps",
                                                  "flf_pos_embed_token_number"};

// Every released WAN model has 128-wide heads; norm_q spans the whole width, so the head count
// is not in the shapes (a `config` num_heads says it for other widths).
constexpr int64_t kHeadDim = 128;

class Wan final : public Family {
 public:
  std::string_view name() const override { return "wan"; }

  std::optional<std::string> Recognise(
      const std::vector<formats::TensorInfo>& tensors) const override {
    return PrefixOf(tensors, "patch_embedding.weight", "blocks.");
  }

  std::optional<PinRule> Pin(std::string_view unit) const override {
    if (!IsStemUnit(unit, kStem)) return std::nullopt;
    return PinRule{
        "WAN stem: its outputs (x, e0, context) feed every block, so it stays with the compute "
        "device",
        false};
  }

  bool RecogniseUnits(const std::vector<std::string>& names) const override {
    bool blocks = false, stem = false;
    for (const auto& n : names) {
      const std::string first = FirstComponent(n);
      blocks |= first == "blocks";
      stem |= std::find(kStem.begin(), kStem.end(), first) != kStem.end();
    }
    return blocks && stem;
  }

  StatusOr<Layout> Detect(const LayoutInput& in) const override {
    Builder b(in, "wan");
    Layout layout{"wan", in.prefix, "", {}, {}};
    auto classify = [](const std::string& n) -> std::string {
      const std::string first = FirstComponent(n);
      if (n.size() <= first.size()) return "";
      if (std::find(kStem.begin(), kStem.end(), first) != kStem.end()) return "stem";
      const int64_t i = BlockIndex(n, "blocks");
      if (i >= 0) return "blocks." + std::to_string(i);
      if (first == "head") return "head";
      return "";
    };
    auto rank = [](const std::string& u) -> RankKey {
      if (u == "stem") return {0, 0};
      if (u == "head") return {2, 0};
      return {1, BlockIndex(u, "blocks")};
    };
    FLEET_RETURN_IF_ERROR(b.Group(classify, rank, this, &layout.units));

    FLEET_ASSIGN_OR_RETURN(int64_t layers, b.CountBlocks("blocks"));
    if (layers == 0) return b.Error("no blocks.N tensors");
    FLEET_ASSIGN_OR_RETURN(int64_t dim, b.Dim("patch_embedding.weight", 5, 0));
    FLEET_ASSIGN_OR_RETURN(int64_t in_dim, b.Dim("patch_embedding.weight", 5, 1));
    std::vector<int64_t> patch(3);
    for (size_t i = 0; i < 3; ++i) {
      FLEET_ASSIGN_OR_RETURN(patch[i], b.Dim("patch_embedding.weight", 5, 2 + i));
    }
    FLEET_ASSIGN_OR_RETURN(int64_t ffn, b.Dim("blocks.0.ffn.0.weight", 2, 0));
    FLEET_ASSIGN_OR_RETURN(int64_t text_dim, b.Dim("text_embedding.0.weight", 2, 1));
    FLEET_ASSIGN_OR_RETURN(int64_t freq_dim, b.Dim("time_embedding.0.weight", 2, 1));
    FLEET_ASSIGN_OR_RETURN(int64_t head_out, b.Dim("head.head.weight", 2, 0));
    const int64_t patch_volume = patch[0] * patch[1] * patch[2];
    if (patch_volume <= 0 || head_out % patch_volume != 0) {
      return b.Error("head.head.weight rows " + std::to_string(head_out) +
                     " are not a multiple of the patch volume " + std::to_string(patch_volume));
    }
    int64_t out_dim = head_out / patch_volume;
    const bool has_img_emb = b.Get("img_emb.proj.0.weight") != nullptr;

    FLEET_ASSIGN_OR_RETURN(nlohmann::json cfg, MetadataConfig(in, "wan", kComfyKeys));
    if (cfg.contains("image_model") && cfg["image_model"] != "wan2.1" &&
        cfg["image_model"] != "wan") {
      return InvalidArgumentError(in.where + ": metadata 'config' image_model is " +
                                  cfg["image_model"].dump() + ", expected \"wan2.1\"");
    }
    std::string model_type = has_img_emb ? "i2v" : "t2v";
    if (cfg.contains("model_type")) {
      const auto& t = cfg["model_type"];
      const bool image = t == "i2v" || t == "flf2v";
      if (!t.is_string() || !(image || t == "t2v" || t == "ti2v")) {
        return InvalidArgumentError(in.where + ": metadata 'config' model_type " + t.dump() +
                                    " is not one of t2v, i2v, flf2v, ti2v");
      }
      if (image != has_img_emb) {
        return InvalidArgumentError(in.where + ": metadata 'config' model_type " + t.dump() +
                                    " contradicts the tensors: img_emb.proj.0.weight is " +
                                    (has_img_emb ? "present" : "absent"));
      }
      model_type = t.get<std::string>();
    }
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "dim", 1, &dim, dim, "patch_embedding.weight"));
    FLEET_RETURN_IF_ERROR(
        OverrideInt(cfg, in, "in_dim", 1, &in_dim, in_dim, "patch_embedding.weight"));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "ffn_dim", 1, &ffn, ffn, "blocks.0.ffn.0.weight"));
    FLEET_RETURN_IF_ERROR(
        OverrideInt(cfg, in, "text_dim", 1, &text_dim, text_dim, "text_embedding.0.weight"));
    FLEET_RETURN_IF_ERROR(
        OverrideInt(cfg, in, "freq_dim", 1, &freq_dim, freq_dim, "time_embedding.0.weight"));
    FLEET_RETURN_IF_ERROR(
        OverrideInt(cfg, in, "out_dim", 1, &out_dim, out_dim, "head.head.weight / patch volume"));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "num_layers", 1, &layers, layers, "blocks.N"));
    if (cfg.contains("patch_size") && cfg["patch_size"] != nlohmann::json(patch)) {
      return InvalidArgumentError(
          in.where + ": metadata 'config' patch_size " + cfg["patch_size"].dump() +
          " contradicts the tensors: patch_embedding.weight gives " + nlohmann::json(patch).dump());
    }
    int64_t heads = dim % kHeadDim == 0 ? dim / kHeadDim : 0;
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "num_heads", 1, &heads));
    if (heads == 0 || dim % heads != 0) {
      return b.Error("dim " + std::to_string(dim) +
                     (heads == 0 ? " is not a multiple of the 128-wide heads (a metadata "
                                   "'config' num_heads names another head count)"
                                 : " is not a multiple of num_heads " + std::to_string(heads)));
    }
    double eps = 1e-6;
    if (cfg.contains("eps")) {
      if (!cfg["eps"].is_number() || cfg["eps"].get<double>() <= 0) {
        return InvalidArgumentError(in.where +
                                    ": metadata 'config' eps must be a positive "
                                    "number, got " +
                                    cfg["eps"].dump());
      }
      eps = cfg["eps"].get<double>();
    }

    nlohmann::ordered_json c;
    c["model_type"] = model_type;
    c["dim"] = dim;
    c["ffn_dim"] = ffn;
    c["num_heads"] = heads;
    c["num_layers"] = layers;
    c["in_dim"] = in_dim;
    c["out_dim"] = out_dim;
    c["text_dim"] = text_dim;
    c["freq_dim"] = freq_dim;
    c["patch_size"] = patch;
    c["i2v"] = has_img_emb;
    c["eps"] = eps;
    layout.config_json = c.dump();
    return layout;
  }

  // The widest activation of a block: every token's FFN hidden plus six modulated copies of the
  // hidden state. The VAE packs 4 frames (after the first) into one latent frame and 8x8 pixels
  // into one latent (16x16 for the 48-channel WAN 2.2 VAE); a token covers one patch.
  StatusOr<uint64_t> ActivationBytes(std::string_view config_json,
                                     const InputSizes& s) const override {
    auto c = nlohmann::json::parse(config_json, nullptr, /*allow_exceptions=*/false);
    if (!c.is_object() || !c.contains("dim") || !c.contains("ffn_dim") ||
        !c.contains("patch_size") || !c["patch_size"].is_array() || c["patch_size"].size() != 3) {
      return InvalidArgumentError("wan: configuration lacks dim, ffn_dim or patch_size");
    }
    const auto patch = c["patch_size"].get<std::vector<int64_t>>();
    const int64_t spatial = c.value("out_dim", 16) == 48 ? 16 : 8;
    const int64_t latent_frames = (std::max<int64_t>(s.frames, 1) - 1) / 4 + 1;
    const int64_t ph = spatial * patch[1], pw = spatial * patch[2];
    const int64_t tokens = ((latent_frames + patch[0] - 1) / patch[0]) *
                           ((s.height + ph - 1) / ph) * ((s.width + pw - 1) / pw);
    const int64_t dim = c["dim"].get<int64_t>();
    const int64_t per_token = c["ffn_dim"].get<int64_t>() + 6 * dim;
    const int64_t heads = c.value("num_heads", std::max<int64_t>(dim / kHeadDim, 1));
    // Plus one chunk of self-attention scores (cross-attention's, over the text, are smaller).
    return static_cast<uint64_t>(s.batch * tokens * per_token * s.dtype_bytes) +
           AttentionChunkBytes(s.batch * heads, tokens, tokens);
  }

  // ComfyUI's WAN 2.x templates: 832 x 480, 81 frames (21 latent frames).
  InputSizes DefaultSizes() const override {
    InputSizes s;
    s.width = 832;
    s.height = 480;
    s.frames = 81;
    return s;
  }

  // x is the latent [batch, channels, latent frames, height / s, width / s] (s = 16 for the
  // 48-channel VAE, else 8); context [batch, tokens, 4096].
  std::optional<InputSizes> SizesOf(std::string_view config_json,
                                    const InputShapes& shapes) const override {
    auto c = nlohmann::json::parse(config_json, nullptr, /*allow_exceptions=*/false);
    auto x = shapes.find("x");
    if (!c.is_object() || x == shapes.end() || x->second.size() != 5) return std::nullopt;
    const int64_t spatial = c.value("out_dim", 16) == 48 ? 16 : 8;
    InputSizes s;
    s.batch = x->second[0];
    s.frames = (x->second[2] - 1) * 4 + 1;
    s.height = x->second[3] * spatial;
    s.width = x->second[4] * spatial;
    auto context = shapes.find("context");
    if (context != shapes.end() && context->second.size() == 3) s.text_tokens = context->second[1];
    return s;
  }
};

}  // namespace

const Family& WanFamily() {
  static const Wan family;
  return family;
}

}  // namespace fleet::families::internal
