// Text encoders as blocks: CLIP text models (embeddings, encoder.layers.i, final) and T5 / UMT5
// encoders (shared, encoder.block.i, encoder.final_layer_norm). The maths follows ComfyUI's
// comfy/clip_model.py and comfy/text_encoders/t5.py; docs/models.md, "Text encoders as ComfyUI
// computes them", lists the state names and every arithmetic choice.
//
// As in ComfyUI, activations are float32 whatever the weights are: each weight is kept in the
// model's dtype and upcast to float32 at the op that uses it (comfy.ops casts weights to the
// input's dtype), so a float16 T5 here computes what ComfyUI's float16 T5 computes.
#include "text_encoder.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/log.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/nan_to_num.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/where.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "block_util.h"

namespace fleet::models::internal {
namespace {

constexpr int64_t kBuckets = 32;       // T5's relative_attention_num_buckets
constexpr int64_t kMaxDistance = 128;  // and relative_attention_max_distance

struct TextConfig {
  std::string type;  // "clip", "t5", "umt5"
  int64_t dim = 0, ffn = 0, heads = 0, head_dim = 0, layers = 0, vocab = 0;
  int64_t max_positions = 0;  // CLIP
  int64_t eos = 49407;        // CLIP's end token (the pooled position without num_tokens)
  std::string activation;
  bool gated = false;       // T5 v1.1 / UMT5 gated FFN
  bool projection = false;  // CLIP text_projection present
  double eps = 1e-6;
  std::string embedding = "shared.weight";  // T5: the token embedding's name

  bool clip() const { return type == "clip"; }
};

StatusOr<TextConfig> ParseTextConfig(std::string_view text) {
  constexpr std::string_view kName = "text-encoder";
  FLEET_ASSIGN_OR_RETURN(nlohmann::json j, ParseConfig(kName, text));
  TextConfig c;
  if (!j.contains("model_type") || !j["model_type"].is_string()) {
    return InvalidArgumentError("text-encoder config: missing string field 'model_type'");
  }
  c.type = j["model_type"].get<std::string>();
  if (c.type != "clip" && c.type != "t5" && c.type != "umt5") {
    return InvalidArgumentError("text-encoder config: model_type '" + c.type +
                                "' is not clip, t5 or umt5");
  }
  FLEET_ASSIGN_OR_RETURN(c.dim, IntField(j, kName, "dim", 1));
  FLEET_ASSIGN_OR_RETURN(c.ffn, IntField(j, kName, "ffn_dim", 1));
  FLEET_ASSIGN_OR_RETURN(c.heads, IntField(j, kName, "num_heads", 1));
  FLEET_ASSIGN_OR_RETURN(c.layers, IntField(j, kName, "num_layers", 1));
  FLEET_ASSIGN_OR_RETURN(c.vocab, IntField(j, kName, "vocab_size", 1));
  if (!j.contains("activation") || !j["activation"].is_string()) {
    return InvalidArgumentError("text-encoder config: missing string field 'activation'");
  }
  c.activation = j["activation"].get<std::string>();
  if (j.contains("eps")) {
    if (!j["eps"].is_number() || j["eps"].get<double>() <= 0) {
      return InvalidArgumentError("text-encoder config: 'eps' must be a positive number");
    }
    c.eps = j["eps"].get<double>();
  }
  if (c.clip()) {
    if (c.dim % c.heads != 0) {
      return InvalidArgumentError("text-encoder config: dim " + std::to_string(c.dim) +
                                  " is not a multiple of num_heads " + std::to_string(c.heads));
    }
    c.head_dim = c.dim / c.heads;
    FLEET_ASSIGN_OR_RETURN(c.max_positions, IntField(j, kName, "max_positions", 1));
    FLEET_ASSIGN_OR_RETURN(c.eos, IntField(j, kName, "eos_token_id", 0));
    c.projection = j.value("projection", false);
    if (c.activation != "quick_gelu" && c.activation != "gelu" &&
        c.activation != "gelu_pytorch_tanh") {
      return InvalidArgumentError("text-encoder config: CLIP activation '" + c.activation +
                                  "' is not quick_gelu, gelu or gelu_pytorch_tanh");
    }
  } else {
    FLEET_ASSIGN_OR_RETURN(c.head_dim, IntField(j, kName, "head_dim", 1));
    c.gated = j.value("gated", true);
    c.embedding = j.value("embedding", std::string("shared.weight"));
    if (c.embedding != "shared.weight" && c.embedding != "encoder.embed_tokens.weight") {
      return InvalidArgumentError("text-encoder config: embedding '" + c.embedding +
                                  "' is not shared.weight or encoder.embed_tokens.weight");
    }
    if (c.activation != "gelu_pytorch_tanh" && c.activation != "relu") {
      return InvalidArgumentError("text-encoder config: T5 activation '" + c.activation +
                                  "' is not gelu_pytorch_tanh or relu");
    }
  }
  return c;
}

// [B, L, H*d] -> [B, H, L, d].
at::Tensor SplitHeads(const at::Tensor& x, int64_t heads) {
  return x.view({x.size(0), x.size(1), heads, -1}).permute({0, 2, 1, 3});
}

// ComfyUI's additive padding mask from a [B, L] attention mask (1 = attend): [B, 1, L, L] with
// -float32 max where the key is masked, 0 elsewhere.
at::Tensor PaddingMask(const at::Tensor& attention_mask) {
  const int64_t b = attention_mask.size(0), l = attention_mask.size(1);
  at::Tensor m = 1.0 - attention_mask.to(at::kFloat).reshape({b, 1, 1, l}).expand({b, 1, l, l});
  return m.masked_fill(m.to(at::kBool), -std::numeric_limits<float>::max());
}

// Embedding lookup in float32, as comfy.ops.Embedding with out_dtype=float32.
at::Tensor Embed(const at::Tensor& table, const at::Tensor& ids) {
  auto sizes = ids.sizes().vec();
  sizes.push_back(table.size(1));
  return at::index_select(table, 0, ids.reshape({-1})).to(at::kFloat).view(sizes);
}

// T5's relative position bucket of memory - query positions (bidirectional, 32 buckets,
// max distance 128), the exact float32 arithmetic of ComfyUI's _relative_position_bucket.
at::Tensor RelativeBuckets(int64_t length, at::Device device) {
  auto i64 = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor pos = at::arange(length, i64);
  at::Tensor rel = pos.unsqueeze(0) - pos.unsqueeze(1);  // [query, key]: key - query
  const int64_t half = kBuckets / 2, exact = half / 2;
  at::Tensor buckets = rel.gt(0).to(at::kLong) * half;
  rel = at::abs(rel);
  at::Tensor large = (at::log(rel.to(at::kFloat) / static_cast<double>(exact)) /
                      std::log(static_cast<double>(kMaxDistance) / static_cast<double>(exact)) *
                      static_cast<double>(half - exact))
                         .to(at::kLong) +
                     exact;
  large = at::minimum(large, at::full_like(large, half - 1));
  return buckets + at::where(rel.lt(exact), rel, large);
}

class TextEncoderModel final : public Model {
 public:
  TextEncoderModel(TextConfig config, at::ScalarType dtype) : c_(std::move(config)), dtype_(dtype) {
    if (c_.clip()) {
      names_.push_back("embeddings");
      for (int64_t i = 0; i < c_.layers; ++i)
        names_.push_back("encoder.layers." + std::to_string(i));
      names_.push_back("final");
    } else {
      names_.push_back("shared");
      for (int64_t i = 0; i < c_.layers; ++i)
        names_.push_back("encoder.block." + std::to_string(i));
      names_.push_back("encoder.final_layer_norm");
    }
  }

  std::string_view family() const override { return "text-encoder"; }
  at::ScalarType compute_dtype() const override { return dtype_; }
  const std::vector<std::string>& block_names() const override { return names_; }
  bool IsRunConstant(std::string_view) const override { return false; }

  std::string config_json() const override {
    nlohmann::ordered_json j;
    j["model_type"] = c_.type;
    j["dim"] = c_.dim;
    j["ffn_dim"] = c_.ffn;
    j["num_heads"] = c_.heads;
    j["num_layers"] = c_.layers;
    j["vocab_size"] = c_.vocab;
    j["activation"] = c_.activation;
    j["eps"] = c_.eps;
    if (c_.clip()) {
      j["max_positions"] = c_.max_positions;
      j["eos_token_id"] = c_.eos;
      j["projection"] = c_.projection;
    } else {
      j["head_dim"] = c_.head_dim;
      j["gated"] = c_.gated;
      j["embedding"] = c_.embedding;
    }
    return j.dump();
  }

  Status RunBlock(size_t index, const WeightAccessor& weights, TensorMap& state) const override {
    if (index >= names_.size()) {
      return InvalidArgumentError("text-encoder: block index " + std::to_string(index) +
                                  " out of range (model has " + std::to_string(names_.size()) +
                                  " blocks)");
    }
    const std::string& name = names_[index];
    Status s = GuardTorch(c_.type + " " + name, [&]() -> Status {
      if (index == 0) return Embeddings(weights, state);
      if (index == names_.size() - 1) return Final(weights, state);
      const int64_t layer = static_cast<int64_t>(index) - 1;
      FLEET_RETURN_IF_ERROR(c_.clip() ? ClipLayer(name, weights, state)
                                      : T5Block(name, layer, weights, state));
      // The hidden state CLIPSetLastLayer (or an intermediate_output) asked for.
      auto chosen = state.find("layer");
      if (chosen != state.end() && chosen->second.item<int64_t>() == layer) {
        state["intermediate"] = state["hidden"].clone();
      }
      return Status::OK();
    });
    if (!s.ok() && s.code() != StatusCode::kInternal) s = s.WithContext(c_.type + " " + name);
    return s;
  }

  // Weights stay in the model's dtype (converted once at load); blocks upcast them at use.
  // Non-floating tensors (a CLIP file's position_ids) are kept as stored and never read.
  StatusOr<at::Tensor> PrepareWeight(std::string_view name,
                                     const at::Tensor& stored) const override {
    if (stored.defined() && !at::isFloatingType(stored.scalar_type())) return stored;
    return PrepareFloatingWeight("text-encoder", name, stored, dtype_);
  }

 private:
  // A weight upcast to float32, the dtype every activation has.
  StatusOr<at::Tensor> Weight(const BlockWeights& w, std::string_view name,
                              std::initializer_list<int64_t> shape) const {
    FLEET_ASSIGN_OR_RETURN(at::Tensor t, w.Get(name, shape));
    return t.to(at::kFloat);
  }

  StatusOr<at::Tensor> Hidden(const TensorMap& state) const {
    return FindActivation(state, "hidden", {-1, -1, c_.dim}, at::kFloat);
  }

  // An optional int64 scalar input ("layer", "layer_norm_hidden_state").
  static StatusOr<std::optional<int64_t>> ScalarInput(const TensorMap& state,
                                                      std::string_view name) {
    auto it = state.find(name);
    if (it == state.end() || !it->second.defined()) return std::optional<int64_t>();
    const at::Tensor& t = it->second;
    if (t.numel() != 1 || at::isFloatingType(t.scalar_type())) {
      return InvalidArgumentError(
          "state '" + std::string(name) + "' has shape " + ShapeString(t.sizes()) + " and dtype " +
          std::string(DtypeName(t.scalar_type())) + ", expected one integer");
    }
    return std::optional<int64_t>(t.to(at::kCPU).to(at::kLong).item<int64_t>());
  }

  // Inputs: tokens int64 [B, L]; optional attention_mask [B, L] (1 = attend), layer (one
  // integer, negative from the end), layer_norm_hidden_state (one integer, default 1) and, for
  // CLIP, num_tokens int64 [B] (the pooled position is num_tokens - 1). Outputs hidden
  // (float32 [B, L, D]), mask (float32, additive) where there is one, layer as an index from
  // the front, and CLIP's pool_index [B].
  Status Embeddings(const WeightAccessor& weights, TensorMap& state) const {
    auto it = state.find("tokens");
    if (it == state.end() || !it->second.defined()) {
      return InvalidArgumentError("missing state 'tokens' (int64 [batch, length] token ids)");
    }
    const at::Tensor tokens = it->second;
    if (tokens.scalar_type() != at::kLong || tokens.dim() != 2 || tokens.size(0) < 1 ||
        tokens.size(1) < 1) {
      return InvalidArgumentError("state 'tokens' has shape " + ShapeString(tokens.sizes()) +
                                  " and dtype " + std::string(DtypeName(tokens.scalar_type())) +
                                  ", expected int64 [batch >= 1, length >= 1]");
    }
    const int64_t b = tokens.size(0), l = tokens.size(1);
    FLEET_RETURN_IF_ERROR(CheckVocabulary(tokens));
    if (c_.clip() && l > c_.max_positions) {
      return InvalidArgumentError("state 'tokens' has " + std::to_string(l) +
                                  " tokens, more than CLIP's " + std::to_string(c_.max_positions) +
                                  " positions (ComfyUI splits prompts into 77-token chunks)");
    }
    const at::Device device = tokens.device();
    at::Tensor mask;
    if (auto m = state.find("attention_mask"); m != state.end() && m->second.defined()) {
      const at::Tensor& am = m->second;
      if (am.dim() != 2 || am.size(0) != b || am.size(1) != l || am.device() != device) {
        return InvalidArgumentError("state 'attention_mask' has shape " + ShapeString(am.sizes()) +
                                    ", expected [" + std::to_string(b) + ", " + std::to_string(l) +
                                    "] like 'tokens'");
      }
      mask = PaddingMask(am);
    }
    FLEET_ASSIGN_OR_RETURN(std::optional<int64_t> layer, ScalarInput(state, "layer"));
    FLEET_ASSIGN_OR_RETURN(std::optional<int64_t> norm,
                           ScalarInput(state, "layer_norm_hidden_state"));
    if (layer && (*layer < -c_.layers || *layer >= c_.layers)) {
      return InvalidArgumentError("state 'layer' is " + std::to_string(*layer) +
                                  ", outside the model's " + std::to_string(c_.layers) +
                                  " layers (-" + std::to_string(c_.layers) + ".." +
                                  std::to_string(c_.layers - 1) + ")");
    }
    at::Tensor x, pool;
    if (c_.clip()) {
      BlockWeights w(weights, "text_model.embeddings.", dtype_, device);
      FLEET_ASSIGN_OR_RETURN(at::Tensor table, w.Get("token_embedding.weight", {c_.vocab, c_.dim}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor positions,
                             Weight(w, "position_embedding.weight", {c_.max_positions, c_.dim}));
      x = Embed(table, tokens) + positions.narrow(0, 0, l);
      // Causal: key j > query i is masked (-float32 max), added to the padding mask.
      at::Tensor causal = at::full({l, l}, -std::numeric_limits<float>::max(),
                                   at::TensorOptions().dtype(at::kFloat).device(device))
                              .triu_(1);
      mask = mask.defined() ? mask + causal : causal.view({1, 1, l, l});
      FLEET_ASSIGN_OR_RETURN(pool, PoolIndex(state, tokens));
    } else {
      BlockWeights w(weights, "", dtype_, device);
      FLEET_ASSIGN_OR_RETURN(at::Tensor table, w.Get(c_.embedding, {c_.vocab, c_.dim}));
      // ComfyUI cleans an fp8 T5's embeddings (fp8 e4m3fn has NaN codes): NaN -> 0. Done for
      // every T5 here; a float file with NaN in its embedding is the only case that differs.
      x = at::nan_to_num(Embed(table, tokens));
    }
    for (const char* input : {"tokens", "attention_mask", "num_tokens", "layer"}) {
      state.erase(input);
    }
    state["hidden"] = x;
    if (mask.defined()) state["mask"] = mask;
    if (pool.defined()) state["pool_index"] = pool;
    if (layer) {
      state["layer"] = at::full({1}, *layer < 0 ? c_.layers + *layer : *layer,
                                at::TensorOptions().dtype(at::kLong));
    }
    if (norm) {
      state["layer_norm_hidden_state"] =
          at::full({1}, *norm ? 1 : 0, at::TensorOptions().dtype(at::kLong));
    }
    return Status::OK();
  }

  Status CheckVocabulary(const at::Tensor& tokens) const {
    at::Tensor bad = (tokens < 0) | (tokens >= c_.vocab);
    if (!bad.any().item<bool>()) return Status::OK();
    const int64_t flat = at::argmax(bad.reshape({-1}).to(at::kInt)).item<int64_t>();
    const int64_t row = flat / tokens.size(1), col = flat % tokens.size(1);
    return InvalidArgumentError(
        "state 'tokens' holds id " + std::to_string(tokens[row][col].item<int64_t>()) + " at [" +
        std::to_string(row) + ", " + std::to_string(col) + "], outside the vocabulary of " +
        std::to_string(c_.vocab) + " tokens");
  }

  // CLIP's pooled position per row: num_tokens - 1 when given (ComfyUI passes it), else the
  // first end token (argmax of tokens == eos, 0 when a row has none).
  StatusOr<at::Tensor> PoolIndex(const TensorMap& state, const at::Tensor& tokens) const {
    const int64_t b = tokens.size(0), l = tokens.size(1);
    auto it = state.find("num_tokens");
    if (it == state.end() || !it->second.defined()) {
      return at::argmax(tokens.eq(c_.eos).to(at::kInt), -1);
    }
    const at::Tensor& n = it->second;
    if (n.scalar_type() != at::kLong || n.dim() != 1 || n.size(0) != b) {
      return InvalidArgumentError("state 'num_tokens' has shape " + ShapeString(n.sizes()) +
                                  ", expected int64 [" + std::to_string(b) + "]");
    }
    if ((n < 1).any().item<bool>() || (n > l).any().item<bool>()) {
      return InvalidArgumentError("state 'num_tokens' holds a count outside 1.." +
                                  std::to_string(l));
    }
    return n.to(tokens.device()) - 1;
  }

  StatusOr<at::Tensor> Mask(const TensorMap& state, int64_t b, int64_t l) const {
    auto it = state.find("mask");
    if (it == state.end()) return at::Tensor();
    FLEET_ASSIGN_OR_RETURN(at::Tensor m, FindActivation(state, "mask", {-1, 1, l, l}, at::kFloat));
    if (m.size(0) != 1 && m.size(0) != b) {
      return InvalidArgumentError("state 'mask' has shape " + ShapeString(m.sizes()) +
                                  ", which does not match batch " + std::to_string(b));
    }
    return m;
  }

  StatusOr<at::Tensor> Projection(const BlockWeights& w, const std::string& name, int64_t out,
                                  int64_t in, bool bias, const at::Tensor& x) const {
    FLEET_ASSIGN_OR_RETURN(at::Tensor weight, Weight(w, name + ".weight", {out, in}));
    at::Tensor b;
    if (bias) {
      FLEET_ASSIGN_OR_RETURN(b, Weight(w, name + ".bias", {out}));
    }
    return Linear(x, weight, b);
  }

  at::Tensor ClipActivation(const at::Tensor& x) const {
    if (c_.activation == "quick_gelu") return x * at::sigmoid(1.702 * x);
    if (c_.activation == "gelu") return at::gelu(x);
    return at::gelu(x, "tanh");
  }

  Status ClipLayer(const std::string& name, const WeightAccessor& weights, TensorMap& state) const {
    FLEET_ASSIGN_OR_RETURN(at::Tensor x, Hidden(state));
    const int64_t b = x.size(0), l = x.size(1), d = c_.dim;
    FLEET_ASSIGN_OR_RETURN(at::Tensor mask, Mask(state, b, l));
    BlockWeights w(weights, "text_model." + name + ".", dtype_, x.device());
    FLEET_ASSIGN_OR_RETURN(at::Tensor n1w, Weight(w, "layer_norm1.weight", {d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor n1b, Weight(w, "layer_norm1.bias", {d}));
    at::Tensor h = LayerNormAffine(x, n1w, n1b, c_.eps);
    FLEET_ASSIGN_OR_RETURN(at::Tensor q, Projection(w, "self_attn.q_proj", d, d, true, h));
    FLEET_ASSIGN_OR_RETURN(at::Tensor k, Projection(w, "self_attn.k_proj", d, d, true, h));
    FLEET_ASSIGN_OR_RETURN(at::Tensor v, Projection(w, "self_attn.v_proj", d, d, true, h));
    at::Tensor y = ScaledDotAttention(SplitHeads(q, c_.heads), SplitHeads(k, c_.heads),
                                      SplitHeads(v, c_.heads), 0, mask);
    FLEET_ASSIGN_OR_RETURN(at::Tensor o, Projection(w, "self_attn.out_proj", d, d, true, y));
    x = x + o;
    FLEET_ASSIGN_OR_RETURN(at::Tensor n2w, Weight(w, "layer_norm2.weight", {d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor n2b, Weight(w, "layer_norm2.bias", {d}));
    h = LayerNormAffine(x, n2w, n2b, c_.eps);
    FLEET_ASSIGN_OR_RETURN(at::Tensor f, Projection(w, "mlp.fc1", c_.ffn, d, true, h));
    FLEET_ASSIGN_OR_RETURN(f, Projection(w, "mlp.fc2", d, c_.ffn, true, ClipActivation(f)));
    state["hidden"] = x + f;
    return Status::OK();
  }

  // T5LayerNorm: x * rsqrt(mean(x^2) + eps), times the gain.
  at::Tensor T5Norm(const at::Tensor& x, const at::Tensor& gain) const {
    at::Tensor variance = at::mean(x.pow(2), {-1}, /*keepdim=*/true);
    return gain * (x * at::rsqrt(variance + c_.eps));
  }

  // The relative position bias [1, H, L, L] of the block whose table `table` [32, H] is.
  static at::Tensor PositionBias(const at::Tensor& table, int64_t length) {
    at::Tensor values = Embed(table, RelativeBuckets(length, table.device()));  // [L, L, H]
    return values.permute({2, 0, 1}).unsqueeze(0).contiguous();
  }

  Status T5Block(const std::string& name, int64_t layer, const WeightAccessor& weights,
                 TensorMap& state) const {
    FLEET_ASSIGN_OR_RETURN(at::Tensor x, Hidden(state));
    const int64_t b = x.size(0), l = x.size(1), d = c_.dim, inner = c_.heads * c_.head_dim;
    FLEET_ASSIGN_OR_RETURN(at::Tensor mask, Mask(state, b, l));
    BlockWeights w(weights, name + ".layer.", dtype_, x.device());

    // T5 forms its position bias in the first block and hands it on; UMT5 has one per block.
    at::Tensor bias;
    if (layer == 0 || c_.type == "umt5") {
      FLEET_ASSIGN_OR_RETURN(
          at::Tensor table,
          Weight(w, "0.SelfAttention.relative_attention_bias.weight", {kBuckets, c_.heads}));
      bias = PositionBias(table, l);
      if (c_.type == "t5") state["position_bias"] = bias;
    } else {
      FLEET_ASSIGN_OR_RETURN(
          bias, FindActivation(state, "position_bias", {1, c_.heads, l, l}, at::kFloat));
    }
    at::Tensor attn_mask = mask.defined() ? mask + bias : bias;

    FLEET_ASSIGN_OR_RETURN(at::Tensor n0, Weight(w, "0.layer_norm.weight", {d}));
    at::Tensor h = T5Norm(x, n0);
    FLEET_ASSIGN_OR_RETURN(at::Tensor q, Projection(w, "0.SelfAttention.q", inner, d, false, h));
    FLEET_ASSIGN_OR_RETURN(at::Tensor k, Projection(w, "0.SelfAttention.k", inner, d, false, h));
    FLEET_ASSIGN_OR_RETURN(at::Tensor v, Projection(w, "0.SelfAttention.v", inner, d, false, h));
    // T5 does not scale its logits: ComfyUI multiplies k by sqrt(head_dim) before an attention
    // that divides by it.
    k = k * std::sqrt(static_cast<double>(inner / c_.heads));
    at::Tensor y = ScaledDotAttention(SplitHeads(q, c_.heads), SplitHeads(k, c_.heads),
                                      SplitHeads(v, c_.heads), 0, attn_mask);
    FLEET_ASSIGN_OR_RETURN(at::Tensor o, Projection(w, "0.SelfAttention.o", d, inner, false, y));
    x = x + o;

    FLEET_ASSIGN_OR_RETURN(at::Tensor n1, Weight(w, "1.layer_norm.weight", {d}));
    h = T5Norm(x, n1);
    at::Tensor f;
    if (c_.gated) {
      FLEET_ASSIGN_OR_RETURN(at::Tensor g,
                             Projection(w, "1.DenseReluDense.wi_0", c_.ffn, d, false, h));
      FLEET_ASSIGN_OR_RETURN(at::Tensor u,
                             Projection(w, "1.DenseReluDense.wi_1", c_.ffn, d, false, h));
      f = FfnActivation(g) * u;
    } else {
      FLEET_ASSIGN_OR_RETURN(f, Projection(w, "1.DenseReluDense.wi", c_.ffn, d, false, h));
      f = FfnActivation(f);
    }
    FLEET_ASSIGN_OR_RETURN(f, Projection(w, "1.DenseReluDense.wo", d, c_.ffn, false, f));
    state["hidden"] = x + f;
    return Status::OK();
  }

  at::Tensor FfnActivation(const at::Tensor& x) const {
    return c_.activation == "relu" ? at::relu(x) : at::gelu(x, "tanh");
  }

  // The final norm; "out" is the normed last hidden state, or the chosen layer's (normed unless
  // layer_norm_hidden_state is 0). CLIP also returns "pooled", the normed last hidden state at
  // the pooled position, and "pooled_projected" (times text_projection) when the file has one.
  Status Final(const WeightAccessor& weights, TensorMap& state) const {
    FLEET_ASSIGN_OR_RETURN(at::Tensor x, Hidden(state));
    const int64_t d = c_.dim;
    std::function<at::Tensor(const at::Tensor&)> norm;
    at::Tensor pooled, projected;
    if (c_.clip()) {
      BlockWeights w(weights, "", dtype_, x.device());
      FLEET_ASSIGN_OR_RETURN(at::Tensor nw, Weight(w, "text_model.final_layer_norm.weight", {d}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor nb, Weight(w, "text_model.final_layer_norm.bias", {d}));
      norm = [&, nw, nb](const at::Tensor& t) { return LayerNormAffine(t, nw, nb, c_.eps); };
      auto it = state.find("pool_index");
      if (it == state.end() || it->second.scalar_type() != at::kLong ||
          it->second.numel() != x.size(0)) {
        return InvalidArgumentError("missing state 'pool_index' (int64 [batch])");
      }
      at::Tensor normed = norm(x);
      const int64_t b = x.size(0), l = x.size(1);
      at::Tensor rows = at::arange(b, it->second.options()) * l + it->second;
      pooled = at::index_select(normed.reshape({b * l, d}), 0, rows);
      if (c_.projection) {
        FLEET_ASSIGN_OR_RETURN(at::Tensor pw, Weight(w, "text_projection.weight", {d, d}));
        projected = Linear(pooled, pw, at::Tensor());
      }
      x = normed;
    } else {
      BlockWeights w(weights, "", dtype_, x.device());
      FLEET_ASSIGN_OR_RETURN(at::Tensor nw, Weight(w, "encoder.final_layer_norm.weight", {d}));
      norm = [this, nw](const at::Tensor& t) { return T5Norm(t, nw); };
      x = norm(x);
    }
    at::Tensor out = x;
    if (auto it = state.find("intermediate"); it != state.end()) {
      FLEET_ASSIGN_OR_RETURN(std::optional<int64_t> n,
                             ScalarInput(state, "layer_norm_hidden_state"));
      out = n.value_or(1) ? norm(it->second) : it->second;
    }
    state.clear();
    state["out"] = out.contiguous();
    if (pooled.defined()) state["pooled"] = pooled.contiguous();
    if (projected.defined()) state["pooled_projected"] = projected.contiguous();
    return Status::OK();
  }

  TextConfig c_;
  at::ScalarType dtype_;
  std::vector<std::string> names_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> CreateTextEncoderModel(std::string_view config_json,
                                                        at::ScalarType dtype) {
  FLEET_ASSIGN_OR_RETURN(TextConfig config, ParseTextConfig(config_json));
  return std::unique_ptr<Model>(new TextEncoderModel(std::move(config), dtype));
}

}  // namespace fleet::models::internal
