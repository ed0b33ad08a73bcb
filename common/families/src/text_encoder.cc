// Text encoders: CLIP text models (CLIP-L, CLIP-G), T5 v1.1 encoders (T5-XXL) and UMT5
// encoders (UMT5-XXL). Torch-free half: recognition, units, configuration, pins, activation
// estimate; the keys and the arithmetic are in docs/models.md, the torch half is
// common/models/src/text_encoder.cc.
//
// Units, in execution order:
//   CLIP: embeddings (token + position embedding), encoder.layers.i, final (final_layer_norm
//         and text_projection)
//   T5:   shared (the token embedding), encoder.block.i, encoder.final_layer_norm
#include <algorithm>
#include <array>

#include "builder.h"
#include "fleet/config/text.h"
#include "fleet/families/attention.h"
#include "registry.h"

namespace fleet::families::internal {
namespace {

bool HasComponent(std::string_view name, std::string_view component) {
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('.', start);
    if (end == std::string_view::npos) end = name.size();
    if (name.substr(start, end - start) == component) return true;
    start = end + 1;
  }
  return false;
}

// The keys of the model configurations ComfyUI reads (comfy/sd1_clip_config.json,
// comfy/text_encoders/t5_config_xxl.json, umt5_config_xxl.json), accepted in a file's metadata
// `config`. Keys that do not change the arithmetic are accepted and ignored.
const std::vector<std::string_view> kClipKeys = {
    "hidden_size",        "intermediate_size", "num_attention_heads",
    "num_hidden_layers",  "vocab_size",        "max_position_embeddings",
    "hidden_act",         "eos_token_id",      "layer_norm_eps",
    "projection_dim",     "model_type",        "bos_token_id",
    "pad_token_id",       "architectures",     "_name_or_path",
    "torch_dtype",        "dropout",           "attention_dropout",
    "initializer_factor", "initializer_range", "transformers_version"};
const std::vector<std::string_view> kT5Keys = {"d_model",
                                               "d_ff",
                                               "d_kv",
                                               "num_heads",
                                               "num_layers",
                                               "vocab_size",
                                               "dense_act_fn",
                                               "is_gated_act",
                                               "model_type",
                                               "layer_norm_epsilon",
                                               "relative_attention_num_buckets",
                                               "relative_attention_max_distance",
                                               "eos_token_id",
                                               "pad_token_id",
                                               "decoder_start_token_id",
                                               "num_decoder_layers",
                                               "dropout_rate",
                                               "initializer_factor",
                                               "is_encoder_decoder",
                                               "output_past",
                                               "tie_word_embeddings"};

constexpr int64_t kClipHeadDim = 64;  // every released CLIP text model has 64-wide heads
constexpr int64_t kClipEndToken = 49407;
constexpr int64_t kT5Buckets = 32;  // relative_attention_num_buckets of every T5
constexpr int64_t kT5MaxDistance = 128;

// The anchors: CLIP's token embedding, T5's final norm (the token embedding is `shared` or,
// in some exports, `encoder.embed_tokens`).
constexpr std::string_view kClipAnchor = "text_model.embeddings.token_embedding.weight";
constexpr std::string_view kT5Anchor = "encoder.final_layer_norm.weight";

bool IsClip(const nlohmann::json& config) { return config.value("model_type", "") == "clip"; }

class TextEncoder final : public Family {
 public:
  std::string_view name() const override { return "text-encoder"; }

  std::optional<std::string> Recognise(
      const std::vector<formats::TensorInfo>& tensors) const override {
    if (auto p = PrefixOf(tensors, kClipAnchor, "text_model.encoder.layers.")) return p;
    return PrefixOf(tensors, kT5Anchor, "encoder.block.");
  }

  std::optional<PinRule> Pin(std::string_view unit) const override {
    const std::string lower = config::AsciiLower(unit);
    if (lower.find("embed") != std::string::npos || lower.find("wte") != std::string::npos ||
        lower.find("wpe") != std::string::npos) {
      return PinRule{
          "text-encoder embedding: the encoder runs where its embedding lives (DisTorch2's CLIP "
          "head rule)",
          true};
    }
    if (HasComponent(unit, "shared")) {
      return PinRule{
          "T5 token embedding 'shared': the encoder runs where its embedding lives (DisTorch2's "
          "CLIP head rule misses T5)",
          false};
    }
    return std::nullopt;
  }

  bool RecogniseUnits(const std::vector<std::string>& names) const override {
    bool layers = false, embedding = false;
    for (const auto& n : names) {
      layers |= n.rfind("encoder.layers.", 0) == 0 || n.rfind("encoder.block.", 0) == 0;
      embedding |= n == "embeddings" || n == "shared";
    }
    return layers && embedding;
  }

  StatusOr<Layout> Detect(const LayoutInput& in) const override {
    Builder b(in, "text-encoder");
    if (b.Get(std::string(kClipAnchor))) return DetectClip(in, b);
    return DetectT5(in, b);
  }

  // The widest activation of a layer, float32 (the encoders compute in float32 whatever their
  // weights are, as ComfyUI's do): the FFN hidden (twice for T5's gate) plus four copies of the
  // hidden state, plus one chunk of attention scores and, for T5, the position bias
  // [heads, L, L] that travels with the hidden state.
  StatusOr<uint64_t> ActivationBytes(std::string_view config_json,
                                     const InputSizes& s) const override {
    auto c = nlohmann::json::parse(config_json, nullptr, /*allow_exceptions=*/false);
    if (!c.is_object() || !c.contains("dim") || !c.contains("ffn_dim") ||
        !c.contains("num_heads")) {
      return InvalidArgumentError("text-encoder: configuration lacks dim, ffn_dim or num_heads");
    }
    const int64_t tokens = std::max<int64_t>(s.text_tokens, 1), batch = s.batch;
    const int64_t heads = c["num_heads"].get<int64_t>();
    const int64_t ffn = c["ffn_dim"].get<int64_t>() * (c.value("gated", false) ? 2 : 1);
    const uint64_t per_token = static_cast<uint64_t>(ffn + 4 * c["dim"].get<int64_t>()) * 4;
    uint64_t bytes = static_cast<uint64_t>(batch * tokens) * per_token +
                     AttentionChunkBytes(batch * heads, tokens, tokens);
    if (!IsClip(c)) bytes += static_cast<uint64_t>(heads * tokens * tokens) * 4 * 2;
    return bytes;
  }

  // One prompt: CLIP's 77-token chunk, T5's 512 tokens (ComfyUI pads T5 to at most that).
  InputSizes DefaultSizes() const override {
    InputSizes s;
    s.width = s.height = 0;
    s.text_tokens = 512;
    s.dtype_bytes = 4;
    return s;
  }

  // tokens [batch, length].
  std::optional<InputSizes> SizesOf(std::string_view, const InputShapes& shapes) const override {
    auto t = shapes.find("tokens");
    if (t == shapes.end() || t->second.size() != 2) return std::nullopt;
    InputSizes s;
    s.batch = t->second[0];
    s.text_tokens = t->second[1];
    s.dtype_bytes = 4;
    return s;
  }

  std::vector<std::string> OutputNames(std::string_view config_json) const override {
    auto c = nlohmann::json::parse(config_json, nullptr, /*allow_exceptions=*/false);
    if (c.is_object() && IsClip(c)) {
      if (c.value("projection", false)) return {"out", "pooled", "pooled_projected"};
      return {"out", "pooled"};
    }
    return {"out"};
  }

 private:
  static StatusOr<Layout> DetectClip(const LayoutInput& in, const Builder& b) {
    Layout layout{"text-encoder", in.prefix, "", {}, {}};
    auto classify = [](const std::string& n) -> std::string {
      if (n.rfind("text_model.embeddings.", 0) == 0) return "embeddings";
      const int64_t i = BlockIndex(n, "text_model.encoder.layers");
      if (i >= 0) return "encoder.layers." + std::to_string(i);
      // (Prefix matches: a scaled-fp8 file adds `<layer>.scale_weight` beside each weight.)
      if (n.rfind("text_model.final_layer_norm.", 0) == 0 || n.rfind("text_projection.", 0) == 0 ||
          n == "logit_scale") {
        return "final";
      }
      return "";
    };
    auto rank = [](const std::string& u) -> RankKey {
      if (u == "embeddings") return {0, 0};
      if (u == "final") return {2, 0};
      return {1, BlockIndex(u, "encoder.layers")};
    };
    FLEET_RETURN_IF_ERROR(b.Group(classify, rank, &TextEncoderFamily(), &layout.units));
    FLEET_ASSIGN_OR_RETURN(int64_t layers, b.CountBlocks("text_model.encoder.layers"));
    if (layers == 0) return b.Error("no text_model.encoder.layers.N tensors");
    FLEET_ASSIGN_OR_RETURN(int64_t vocab, b.Dim(std::string(kClipAnchor), 2, 0));
    FLEET_ASSIGN_OR_RETURN(int64_t dim, b.Dim(std::string(kClipAnchor), 2, 1));
    FLEET_ASSIGN_OR_RETURN(int64_t positions,
                           b.Dim("text_model.embeddings.position_embedding.weight", 2, 0));
    FLEET_ASSIGN_OR_RETURN(int64_t ffn, b.Dim("text_model.encoder.layers.0.mlp.fc1.weight", 2, 0));
    FLEET_RETURN_IF_ERROR(b.Dim("text_model.final_layer_norm.weight", 1, 0).status());
    const bool projection = b.Get("text_projection.weight") != nullptr;

    FLEET_ASSIGN_OR_RETURN(nlohmann::json cfg, MetadataConfig(in, "clip", kClipKeys));
    FLEET_RETURN_IF_ERROR(
        OverrideInt(cfg, in, "hidden_size", 1, &dim, dim, std::string(kClipAnchor)));
    FLEET_RETURN_IF_ERROR(
        OverrideInt(cfg, in, "vocab_size", 1, &vocab, vocab, std::string(kClipAnchor)));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "intermediate_size", 1, &ffn, ffn,
                                      "text_model.encoder.layers.0.mlp.fc1.weight"));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "num_hidden_layers", 1, &layers, layers,
                                      "text_model.encoder.layers.N"));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "max_position_embeddings", 1, &positions, positions,
                                      "text_model.embeddings.position_embedding.weight"));
    int64_t heads = dim % kClipHeadDim == 0 ? dim / kClipHeadDim : 0;
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "num_attention_heads", 1, &heads));
    if (heads == 0 || dim % heads != 0) {
      return b.Error("hidden size " + std::to_string(dim) +
                     " is not a multiple of the heads (64 wide unless a metadata 'config' "
                     "num_attention_heads says otherwise)");
    }
    int64_t eos = kClipEndToken;
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "eos_token_id", 0, &eos));
    // CLIP-L (768 wide) uses quick_gelu, CLIP-G (1280, SDXL) the erf GELU, as ComfyUI's configs.
    std::string act = dim == 1280 ? "gelu" : "quick_gelu";
    if (cfg.contains("hidden_act")) {
      const auto& a = cfg["hidden_act"];
      if (a != "quick_gelu" && a != "gelu" && a != "gelu_pytorch_tanh") {
        return InvalidArgumentError(in.where + ": metadata 'config' hidden_act " + a.dump() +
                                    " is not one of quick_gelu, gelu, gelu_pytorch_tanh");
      }
      act = a.get<std::string>();
    }
    double eps = 1e-5;  // ComfyUI's LayerNorms use torch's default
    if (cfg.contains("layer_norm_eps")) {
      if (!cfg["layer_norm_eps"].is_number() || cfg["layer_norm_eps"].get<double>() <= 0) {
        return InvalidArgumentError(in.where +
                                    ": metadata 'config' layer_norm_eps must be a positive number");
      }
      eps = cfg["layer_norm_eps"].get<double>();
    }
    nlohmann::ordered_json c;
    c["model_type"] = "clip";
    c["dim"] = dim;
    c["ffn_dim"] = ffn;
    c["num_heads"] = heads;
    c["num_layers"] = layers;
    c["vocab_size"] = vocab;
    c["max_positions"] = positions;
    c["activation"] = act;
    c["eps"] = eps;
    c["eos_token_id"] = eos;
    c["projection"] = projection;
    layout.config_json = c.dump();
    return layout;
  }

  static StatusOr<Layout> DetectT5(const LayoutInput& in, const Builder& b) {
    Layout layout{"text-encoder", in.prefix, "", {}, {}};
    auto classify = [](const std::string& n) -> std::string {
      if (n.rfind("shared.", 0) == 0 || n.rfind("encoder.embed_tokens.", 0) == 0) return "shared";
      const int64_t i = BlockIndex(n, "encoder.block");
      if (i >= 0) return "encoder.block." + std::to_string(i);
      if (n.rfind("encoder.final_layer_norm.", 0) == 0) return "encoder.final_layer_norm";
      return "";
    };
    auto rank = [](const std::string& u) -> RankKey {
      if (u == "shared") return {0, 0};
      if (u == "encoder.final_layer_norm") return {2, 0};
      return {1, BlockIndex(u, "encoder.block")};
    };
    FLEET_RETURN_IF_ERROR(b.Group(classify, rank, &TextEncoderFamily(), &layout.units));
    FLEET_ASSIGN_OR_RETURN(int64_t layers, b.CountBlocks("encoder.block"));
    if (layers == 0) return b.Error("no encoder.block.N tensors");
    const std::string embedding =
        b.Get("shared.weight") ? "shared.weight" : "encoder.embed_tokens.weight";
    FLEET_ASSIGN_OR_RETURN(int64_t vocab, b.Dim(embedding, 2, 0));
    FLEET_ASSIGN_OR_RETURN(int64_t dim, b.Dim(embedding, 2, 1));
    const std::string q = "encoder.block.0.layer.0.SelfAttention.q.weight";
    FLEET_ASSIGN_OR_RETURN(int64_t inner, b.Dim(q, 2, 0));
    const std::string bias0 =
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
    FLEET_ASSIGN_OR_RETURN(int64_t buckets, b.Dim(bias0, 2, 0));
    FLEET_ASSIGN_OR_RETURN(int64_t heads, b.Dim(bias0, 2, 1));
    if (buckets != kT5Buckets) {
      return b.Error("tensor '" + in.prefix + bias0 + "' has " + std::to_string(buckets) +
                     " buckets, expected " + std::to_string(kT5Buckets));
    }
    bool gated = b.Get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight") != nullptr;
    FLEET_ASSIGN_OR_RETURN(int64_t ffn,
                           b.Dim(std::string("encoder.block.0.layer.1.DenseReluDense.") +
                                     (gated ? "wi_0" : "wi") + ".weight",
                                 2, 0));
    // UMT5 has a relative position bias in every layer, T5 in the first only.
    const bool per_layer_bias =
        layers > 1 &&
        b.Get("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight") != nullptr;

    FLEET_ASSIGN_OR_RETURN(nlohmann::json cfg, MetadataConfig(in, "t5", kT5Keys));
    std::string type = per_layer_bias ? "umt5" : "t5";
    if (cfg.contains("model_type")) {
      const auto& t = cfg["model_type"];
      if (t != "t5" && t != "umt5") {
        return InvalidArgumentError(in.where + ": metadata 'config' model_type " + t.dump() +
                                    " is not t5 or umt5");
      }
      if ((t == "umt5") != per_layer_bias) {
        return InvalidArgumentError(in.where + ": metadata 'config' model_type " + t.dump() +
                                    " contradicts the tensors: encoder.block.1 " +
                                    (per_layer_bias ? "has" : "has no") +
                                    " relative_attention_bias (UMT5 has one per layer)");
      }
      type = t.get<std::string>();
    }
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "d_model", 1, &dim, dim, embedding));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "vocab_size", 1, &vocab, vocab, embedding));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "num_heads", 1, &heads, heads, bias0));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "d_ff", 1, &ffn, ffn, "DenseReluDense.wi"));
    FLEET_RETURN_IF_ERROR(
        OverrideInt(cfg, in, "num_layers", 1, &layers, layers, "encoder.block.N"));
    FLEET_RETURN_IF_ERROR(OverrideBool(cfg, in, "is_gated_act", &gated, gated,
                                       "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"));
    if (inner % heads != 0) {
      return b.Error("tensor '" + in.prefix + q + "' has " + std::to_string(inner) +
                     " rows, not a multiple of the " + std::to_string(heads) + " heads");
    }
    int64_t head_dim = inner / heads;
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "d_kv", 1, &head_dim, head_dim, q + " / heads"));
    for (const auto& [key, want] :
         {std::pair<const char*, int64_t>{"relative_attention_num_buckets", kT5Buckets},
          {"relative_attention_max_distance", kT5MaxDistance}}) {
      if (cfg.contains(key) && cfg[key] != want) {
        return InvalidArgumentError(in.where + ": metadata 'config' " + key + " " +
                                    cfg[key].dump() + " is not " + std::to_string(want) +
                                    " (ComfyUI's T5 fixes it)");
      }
    }
    // T5 v1.1 and UMT5 gate a tanh GELU; the original T5 has a plain ReLU FFN.
    std::string act = gated ? "gelu_pytorch_tanh" : "relu";
    if (cfg.contains("dense_act_fn")) {
      const auto& a = cfg["dense_act_fn"];
      if (a != "gelu_pytorch_tanh" && a != "relu") {
        return InvalidArgumentError(in.where + ": metadata 'config' dense_act_fn " + a.dump() +
                                    " is not gelu_pytorch_tanh or relu");
      }
      act = a.get<std::string>();
    }
    nlohmann::ordered_json c;
    c["model_type"] = type;
    c["dim"] = dim;
    c["ffn_dim"] = ffn;
    c["num_heads"] = heads;
    c["head_dim"] = head_dim;
    c["num_layers"] = layers;
    c["vocab_size"] = vocab;
    c["activation"] = act;
    c["gated"] = gated;
    c["eps"] = 1e-6;  // ComfyUI's T5LayerNorm default (layer_norm_epsilon is not read)
    c["embedding"] = embedding;
    layout.config_json = c.dump();
    return layout;
  }
};

}  // namespace

const Family& TextEncoderFamily() {
  static const TextEncoder family;
  return family;
}

}  // namespace fleet::families::internal
