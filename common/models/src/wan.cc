// WAN 2.1 / 2.2 video transformers as blocks: stem, blocks.i, head. The maths follows
// ComfyUI's comfy/ldm/wan/model.py (WanModel); docs/models.md, "WAN as ComfyUI computes it",
// lists the state names and every arithmetic choice.
#include "wan.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/fmod.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/linspace.h>
#include <ATen/ops/pad.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/stack.h>

#include <array>
#include <string>
#include <utility>
#include <vector>

#include "block_util.h"

namespace fleet::models::internal {
namespace {

constexpr int64_t kClipDim = 1280;   // CLIP-H vision features of WAN 2.1 I2V (img_emb's input)
constexpr double kImgEmbEps = 1e-5;  // img_emb's LayerNorms use torch's default eps

struct WanConfig {
  std::string model_type = "t2v";
  int64_t dim = 0, ffn = 0, heads = 0, layers = 0;
  int64_t in_dim = 16, out_dim = 16, text_dim = 4096, freq_dim = 256;
  std::array<int64_t, 3> patch = {1, 2, 2};
  bool i2v = false;
  double eps = 1e-6;

  int64_t head_dim() const { return dim / heads; }
  int64_t patch_volume() const { return patch[0] * patch[1] * patch[2]; }
  // RoPE widths of the (t, h, w) axes, as WanModel splits the head width.
  std::array<int64_t, 3> axes() const {
    const int64_t s = head_dim() / 6;
    return {head_dim() - 4 * s, 2 * s, 2 * s};
  }
};

StatusOr<WanConfig> ParseWanConfig(std::string_view text) {
  FLEET_ASSIGN_OR_RETURN(nlohmann::json j, ParseConfig("wan", text));
  WanConfig c;
  FLEET_ASSIGN_OR_RETURN(c.dim, IntField(j, "wan", "dim", 1));
  FLEET_ASSIGN_OR_RETURN(c.ffn, IntField(j, "wan", "ffn_dim", 1));
  FLEET_ASSIGN_OR_RETURN(c.heads, IntField(j, "wan", "num_heads", 1));
  FLEET_ASSIGN_OR_RETURN(c.layers, IntField(j, "wan", "num_layers", 1));
  FLEET_ASSIGN_OR_RETURN(c.in_dim, IntField(j, "wan", "in_dim", 1));
  FLEET_ASSIGN_OR_RETURN(c.out_dim, IntField(j, "wan", "out_dim", 1));
  FLEET_ASSIGN_OR_RETURN(c.text_dim, IntField(j, "wan", "text_dim", 1));
  FLEET_ASSIGN_OR_RETURN(c.freq_dim, IntField(j, "wan", "freq_dim", 2));
  if (j.contains("model_type")) {
    if (!j["model_type"].is_string()) {
      return InvalidArgumentError("wan config: 'model_type' must be a string");
    }
    c.model_type = j["model_type"].get<std::string>();
  }
  if (j.contains("i2v")) {
    if (!j["i2v"].is_boolean()) return InvalidArgumentError("wan config: 'i2v' must be a bool");
    c.i2v = j["i2v"].get<bool>();
  }
  if (j.contains("eps")) {
    if (!j["eps"].is_number() || j["eps"].get<double>() <= 0) {
      return InvalidArgumentError("wan config: 'eps' must be a positive number, got " +
                                  j["eps"].dump());
    }
    c.eps = j["eps"].get<double>();
  }
  if (j.contains("patch_size")) {
    const auto& p = j["patch_size"];
    if (!p.is_array() || p.size() != 3) {
      return InvalidArgumentError("wan config: 'patch_size' must be 3 integers, got " + p.dump());
    }
    for (size_t i = 0; i < 3; ++i) {
      if (!p[i].is_number_integer() || p[i].get<int64_t>() < 1) {
        return InvalidArgumentError("wan config: 'patch_size' must be 3 positive integers, got " +
                                    p.dump());
      }
      c.patch[i] = p[i].get<int64_t>();
    }
  }
  if (c.dim % c.heads != 0) {
    return InvalidArgumentError("wan config: dim " + std::to_string(c.dim) +
                                " is not a multiple of num_heads " + std::to_string(c.heads));
  }
  if (c.head_dim() < 6 || c.head_dim() % 2 != 0) {
    return InvalidArgumentError("wan config: the head width " + std::to_string(c.head_dim()) +
                                " must be even and at least 6 (RoPE splits it over t, h, w)");
  }
  if (c.freq_dim % 2 != 0) {
    return InvalidArgumentError("wan config: freq_dim must be even, got " +
                                std::to_string(c.freq_dim));
  }
  return c;
}

at::Tensor GeluErf(const at::Tensor& x) {
  return Fp16Safe(x, [](const at::Tensor& v) { return at::gelu(v); });
}

// x + y * gate as one addcmul, like WanAttentionBlock.
at::Tensor AddGated(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate) {
  return Fp16Safe(x, [&](const at::Tensor& v) {
    return at::addcmul(v, y.to(v.scalar_type()), gate.to(v.scalar_type()));
  });
}

// A per-step vector [B, S, D] for tokens [B, N, D]: S = 1 broadcasts, else each of the S
// values (one per latent frame) covers N / S consecutive tokens, as ComfyUI's repeat_e.
at::Tensor PerToken(const at::Tensor& m, int64_t n) {
  const int64_t s = m.size(1);
  if (s == 1) return m;
  return m.unsqueeze(2).expand({m.size(0), s, n / s, m.size(2)}).reshape({m.size(0), n, m.size(2)});
}

// [B, N, D] -> [B, H, N, d].
at::Tensor SplitHeads(const at::Tensor& x, int64_t heads) {
  return x.view({x.size(0), x.size(1), heads, -1}).permute({0, 2, 1, 3});
}

// WanModel's sinusoidal_embedding_1d: [S] -> [S, dim] float32, cosines first, with
// f_k = 10000^(-k / half) formed in float32.
at::Tensor SinusoidalEmbedding(const at::Tensor& t, int64_t dim) {
  const int64_t half = dim / 2;
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(t.device());
  at::Tensor freqs = at::pow(10000.0, at::arange(0, half, f32).div(half).neg());
  at::Tensor args = t.to(at::kFloat).unsqueeze(1) * freqs.unsqueeze(0);
  return at::cat({at::cos(args), at::sin(args)}, 1);
}

// RoPE table [1, 1, N, d/2, 2, 2] float32 for the (t, h, w) ids of a tn x hn x wn token grid,
// as ComfyUI's EmbedND/rope: omega = 1 / theta^linspace(0, (a-2)/a, a/2) per axis of width a,
// angles and their cosines in float64, then float32.
at::Tensor RopeTable(int64_t tn, int64_t hn, int64_t wn, const std::array<int64_t, 3>& axes,
                     at::Device device) {
  constexpr double kTheta = 10000.0;
  auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  const int64_t n = tn * hn * wn;
  at::Tensor tok = at::arange(0, n, f64);
  at::Tensor w = at::fmod(tok, static_cast<double>(wn));
  at::Tensor h = at::fmod(at::floor_divide(tok, static_cast<double>(wn)), static_cast<double>(hn));
  at::Tensor t = at::floor_divide(tok, static_cast<double>(hn * wn));
  const at::Tensor* ids[3] = {&t, &h, &w};
  std::vector<at::Tensor> parts;
  for (size_t a = 0; a < 3; ++a) {
    const int64_t width = axes[a];
    at::Tensor scale = at::linspace(
        0.0, static_cast<double>(width - 2) / static_cast<double>(width), width / 2, f64);
    at::Tensor omega = at::reciprocal(at::pow(kTheta, scale));
    at::Tensor angle = ids[a]->unsqueeze(1) * omega.unsqueeze(0);  // [N, width/2]
    at::Tensor c = at::cos(angle), s = at::sin(angle);
    parts.push_back(at::stack({c, -s, s, c}, -1).view({n, width / 2, 2, 2}));
  }
  return at::cat(parts, 1).to(at::kFloat).view({1, 1, n, -1, 2, 2});
}

class WanModel final : public Model {
 public:
  WanModel(WanConfig config, at::ScalarType dtype) : c_(std::move(config)), dtype_(dtype) {
    names_.push_back("stem");
    for (int64_t i = 0; i < c_.layers; ++i) names_.push_back("blocks." + std::to_string(i));
    names_.push_back("head");
  }

  std::string_view family() const override { return "wan"; }
  at::ScalarType compute_dtype() const override { return dtype_; }
  const std::vector<std::string>& block_names() const override { return names_; }
  bool IsRunConstant(std::string_view name) const override {
    return name == "pe" || name == "grid";
  }

  std::string config_json() const override {
    nlohmann::ordered_json j;
    j["model_type"] = c_.model_type;
    j["dim"] = c_.dim;
    j["ffn_dim"] = c_.ffn;
    j["num_heads"] = c_.heads;
    j["num_layers"] = c_.layers;
    j["in_dim"] = c_.in_dim;
    j["out_dim"] = c_.out_dim;
    j["text_dim"] = c_.text_dim;
    j["freq_dim"] = c_.freq_dim;
    j["patch_size"] = c_.patch;
    j["i2v"] = c_.i2v;
    j["eps"] = c_.eps;
    return j.dump();
  }

  Status RunBlock(size_t index, const WeightAccessor& weights, TensorMap& state) const override {
    if (index >= names_.size()) {
      return InvalidArgumentError("wan: block index " + std::to_string(index) +
                                  " out of range (model has " + std::to_string(names_.size()) +
                                  " blocks)");
    }
    const std::string& name = names_[index];
    Status s = GuardTorch("wan " + name, [&]() -> Status {
      if (index == 0) return Stem(weights, state);
      if (index == names_.size() - 1) return Head(weights, state);
      return Block(name, weights, state);
    });
    if (!s.ok() && s.code() != StatusCode::kInternal) s = s.WithContext("wan " + name);
    return s;
  }

  // The patch embedding stays float32 (WanModel creates it so and runs it on x.float());
  // every other floating weight is converted to the compute dtype.
  StatusOr<at::Tensor> PrepareWeight(std::string_view name,
                                     const at::Tensor& stored) const override {
    return PrepareFloatingWeight("wan", name, stored, IsPatchEmbedding(name) ? at::kFloat : dtype_);
  }

 private:
  static bool IsPatchEmbedding(std::string_view name) {
    return name.substr(0, name.find('.')) == "patch_embedding";
  }

  StatusOr<at::Tensor> Activation(const TensorMap& state, std::string_view name,
                                  std::initializer_list<int64_t> shape) const {
    return FindActivation(state, name, shape, dtype_);
  }

  // The grid state: T, H, W of the input latent, then the token grid tn, hn, wn.
  StatusOr<std::array<int64_t, 6>> Grid(const TensorMap& state) const {
    auto it = state.find("grid");
    if (it == state.end() || !it->second.defined() || it->second.numel() != 6 ||
        it->second.scalar_type() != at::kLong) {
      return InvalidArgumentError("missing state 'grid' (int64 [6]: T, H, W, tn, hn, wn)");
    }
    at::Tensor g = it->second.to(at::kCPU).contiguous();
    std::array<int64_t, 6> out;
    for (size_t i = 0; i < 6; ++i) {
      out[i] = g.data_ptr<int64_t>()[i];
      if (out[i] <= 0) return InvalidArgumentError("state 'grid' holds a non-positive size");
    }
    if (out[3] != (out[0] + c_.patch[0] - 1) / c_.patch[0] ||
        out[4] != (out[1] + c_.patch[1] - 1) / c_.patch[1] ||
        out[5] != (out[2] + c_.patch[2] - 1) / c_.patch[2]) {
      return InvalidArgumentError("state 'grid' token grid does not match its T, H, W");
    }
    return out;
  }

  // Inputs as ComfyUI's WanModel takes them: x [B, C, T, H, W], timestep [B] (or [B, S], one
  // value per latent frame, WAN 2.2 5B), context [B, L, text_dim], clip_fea [B, 257, 1280]
  // (WAN 2.1 I2V). Outputs tokens, e, e0, context_emb (+ context_img), pe, grid.
  Status Stem(const WeightAccessor& weights, TensorMap& state) const {
    FLEET_ASSIGN_OR_RETURN(at::Tensor x, Find(state, "state", "x", {-1, c_.in_dim, -1, -1, -1}));
    const int64_t batch = x.size(0), T = x.size(2), H = x.size(3), W = x.size(4);
    if (batch < 1 || T < 1 || H < 1 || W < 1) {
      return InvalidArgumentError("state 'x' has shape " + ShapeString(x.sizes()) +
                                  ": batch, frames, height and width must be at least 1");
    }
    FLEET_ASSIGN_OR_RETURN(at::Tensor timestep, Find(state, "state", "timestep"));
    if (timestep.dim() < 1 || timestep.dim() > 2 || timestep.size(0) != batch ||
        (timestep.dim() == 2 && timestep.size(1) < 1)) {
      return InvalidArgumentError("state 'timestep' has shape " + ShapeString(timestep.sizes()) +
                                  ", expected [" + std::to_string(batch) + "] or [" +
                                  std::to_string(batch) + ", latent frames]");
    }
    FLEET_ASSIGN_OR_RETURN(at::Tensor context,
                           Find(state, "state", "context", {batch, -1, c_.text_dim}));
    at::Tensor clip;
    if (c_.i2v && state.count("clip_fea")) {
      FLEET_ASSIGN_OR_RETURN(clip, Find(state, "state", "clip_fea", {batch, -1, kClipDim}));
    }
    const at::Device device = x.device();
    for (const at::Tensor* t : {&timestep, &context, &clip}) {
      if (t->defined() && t->device() != device) {
        return InvalidArgumentError("inputs must be on one device: x is on " + device.str() +
                                    ", another input on " + t->device().str());
      }
    }
    const int64_t d = c_.dim;
    BlockWeights wt(weights, "", dtype_, device);
    BlockWeights wt32(weights, "", at::kFloat, device);
    if (weights.Has("img_emb.emb_pos")) {
      return UnimplementedError("weight 'img_emb.emb_pos' (WAN 2.1 FLF2V) is not supported");
    }

    // Patchify in float32: circular pad at the end of T, H, W to whole patches, then
    // [B, C, T, H, W] -> [B, N, C*pt*ph*pw] with features (c, pt, ph, pw), tokens (t, h, w).
    const auto& p = c_.patch;
    const int64_t pad_t = (p[0] - T % p[0]) % p[0], pad_h = (p[1] - H % p[1]) % p[1],
                  pad_w = (p[2] - W % p[2]) % p[2];
    at::Tensor xf = x.to(at::kFloat);
    if (pad_t || pad_h || pad_w) xf = at::pad(xf, {0, pad_w, 0, pad_h, 0, pad_t}, "circular");
    const int64_t tn = (T + pad_t) / p[0], hn = (H + pad_h) / p[1], wn = (W + pad_w) / p[2];
    const int64_t n = tn * hn * wn, features = c_.in_dim * c_.patch_volume();
    at::Tensor patches = xf.view({batch, c_.in_dim, tn, p[0], hn, p[1], wn, p[2]})
                             .permute({0, 2, 4, 6, 1, 3, 5, 7})
                             .reshape({batch, n, features});
    FLEET_ASSIGN_OR_RETURN(at::Tensor kernel,
                           wt32.Get("patch_embedding.weight", {d, c_.in_dim, p[0], p[1], p[2]}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor pb, wt32.Get("patch_embedding.bias", {d}));
    at::Tensor tokens = Linear(patches, kernel.reshape({d, features}), pb).to(dtype_);

    // Time: e = time_embedding(sinusoid(t)) [B, S, D], e0 = time_projection(e) [B, S, 6, D].
    at::Tensor t = timestep.to(at::kFloat).reshape({batch, -1});
    const int64_t steps = t.size(1);
    if (n % steps != 0) {
      return InvalidArgumentError("state 'timestep' has " + std::to_string(steps) +
                                  " values per sample, which do not divide the " +
                                  std::to_string(n) + " tokens (one value per latent frame)");
    }
    at::Tensor emb = SinusoidalEmbedding(t.reshape({-1}), c_.freq_dim).to(dtype_);
    FLEET_ASSIGN_OR_RETURN(at::Tensor t0w, wt.Get("time_embedding.0.weight", {d, c_.freq_dim}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor t0b, wt.Get("time_embedding.0.bias", {d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor t2w, wt.Get("time_embedding.2.weight", {d, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor t2b, wt.Get("time_embedding.2.bias", {d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor pjw, wt.Get("time_projection.1.weight", {6 * d, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor pjb, wt.Get("time_projection.1.bias", {6 * d}));
    at::Tensor e = Linear(Silu(Linear(emb, t0w, t0b)), t2w, t2b);
    at::Tensor e0 = Linear(Silu(e), pjw, pjb);

    // Text: text_embedding(context); I2V: img_emb(clip_fea), kept apart for the blocks.
    FLEET_ASSIGN_OR_RETURN(at::Tensor x0w, wt.Get("text_embedding.0.weight", {d, c_.text_dim}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor x0b, wt.Get("text_embedding.0.bias", {d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor x2w, wt.Get("text_embedding.2.weight", {d, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor x2b, wt.Get("text_embedding.2.bias", {d}));
    at::Tensor ctx = Linear(GeluTanh(Linear(context.to(dtype_), x0w, x0b)), x2w, x2b);
    at::Tensor img;
    if (clip.defined()) {
      FLEET_ASSIGN_OR_RETURN(at::Tensor n0w, wt.Get("img_emb.proj.0.weight", {kClipDim}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor n0b, wt.Get("img_emb.proj.0.bias", {kClipDim}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor l1w, wt.Get("img_emb.proj.1.weight", {kClipDim, kClipDim}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor l1b, wt.Get("img_emb.proj.1.bias", {kClipDim}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor l3w, wt.Get("img_emb.proj.3.weight", {d, kClipDim}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor l3b, wt.Get("img_emb.proj.3.bias", {d}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor n4w, wt.Get("img_emb.proj.4.weight", {d}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor n4b, wt.Get("img_emb.proj.4.bias", {d}));
      img = LayerNormAffine(clip.to(dtype_), n0w, n0b, kImgEmbEps);
      img = Linear(GeluErf(Linear(img, l1w, l1b)), l3w, l3b);
      img = LayerNormAffine(img, n4w, n4b, kImgEmbEps);
    }

    at::Tensor grid = at::empty({6}, at::TensorOptions().dtype(at::kLong));
    const int64_t sizes[6] = {T, H, W, tn, hn, wn};
    for (int i = 0; i < 6; ++i) grid.data_ptr<int64_t>()[i] = sizes[i];

    for (const char* input : {"x", "timestep", "context", "clip_fea"}) state.erase(input);
    state["tokens"] = tokens;
    state["e"] = e.view({batch, steps, d});
    state["e0"] = e0.view({batch, steps, 6, d});
    state["context_emb"] = ctx;
    if (img.defined()) state["context_img"] = img;
    state["pe"] = RopeTable(tn, hn, wn, c_.axes(), device);
    state["grid"] = grid;
    return Status::OK();
  }

  // q, k, v projections with WAN's RMSNorm over the whole width, split into heads.
  StatusOr<at::Tensor> NormedProjection(const BlockWeights& w, const std::string& proj,
                                        const std::string& norm, const at::Tensor& x) const {
    const int64_t d = c_.dim;
    FLEET_ASSIGN_OR_RETURN(at::Tensor pw, w.Get(proj + ".weight", {d, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor pb, w.Get(proj + ".bias", {d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor gain, w.Get(norm + ".weight", {d}));
    return SplitHeads(RmsNorm(Linear(x, pw, pb), gain, dtype_, c_.eps), c_.heads);
  }
  StatusOr<at::Tensor> Projection(const BlockWeights& w, const std::string& proj,
                                  const at::Tensor& x) const {
    FLEET_ASSIGN_OR_RETURN(at::Tensor pw, w.Get(proj + ".weight", {c_.dim, c_.dim}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor pb, w.Get(proj + ".bias", {c_.dim}));
    return Linear(x, pw, pb);
  }

  Status Block(const std::string& name, const WeightAccessor& weights, TensorMap& state) const {
    const int64_t d = c_.dim;
    FLEET_ASSIGN_OR_RETURN(at::Tensor x, Activation(state, "tokens", {-1, -1, d}));
    const int64_t batch = x.size(0), n = x.size(1);
    FLEET_ASSIGN_OR_RETURN(at::Tensor e0, Activation(state, "e0", {batch, -1, 6, d}));
    if (n % e0.size(1) != 0) {
      return InvalidArgumentError("state 'e0' has " + std::to_string(e0.size(1)) +
                                  " steps, which do not divide the " + std::to_string(n) +
                                  " tokens");
    }
    FLEET_ASSIGN_OR_RETURN(at::Tensor ctx, Activation(state, "context_emb", {batch, -1, d}));
    at::Tensor img = ctx;  // an I2V model without clip_fea attends the text twice, as ComfyUI
    if (c_.i2v && state.count("context_img")) {
      FLEET_ASSIGN_OR_RETURN(img, Activation(state, "context_img", {batch, -1, d}));
    }
    FLEET_ASSIGN_OR_RETURN(at::Tensor pe,
                           Find(state, "state", "pe", {1, 1, n, c_.head_dim() / 2, 2, 2}));
    if (pe.scalar_type() != at::kFloat) return InvalidArgumentError("state 'pe' must be float32");
    BlockWeights w(weights, name + ".", dtype_, x.device());

    // m0..m5: shift, scale, gate of self-attention, then of the FFN, each [B, S, D].
    FLEET_ASSIGN_OR_RETURN(at::Tensor modulation, w.Get("modulation", {1, 6, d}));
    at::Tensor m = modulation.unsqueeze(0) + e0;  // [B, S, 6, D]
    std::vector<at::Tensor> mod;
    for (int64_t i = 0; i < 6; ++i) mod.push_back(PerToken(m.select(2, i), n));

    at::Tensor a = Modulate(x, mod[0], mod[1], c_.eps);
    FLEET_ASSIGN_OR_RETURN(at::Tensor q, NormedProjection(w, "self_attn.q", "self_attn.norm_q", a));
    FLEET_ASSIGN_OR_RETURN(at::Tensor k, NormedProjection(w, "self_attn.k", "self_attn.norm_k", a));
    FLEET_ASSIGN_OR_RETURN(at::Tensor v, Projection(w, "self_attn.v", a));
    at::Tensor y = ScaledDotAttention(ApplyRope(q, pe), ApplyRope(k, pe), SplitHeads(v, c_.heads));
    FLEET_ASSIGN_OR_RETURN(at::Tensor o, Projection(w, "self_attn.o", y));
    x = AddGated(x, o, mod[2]);

    FLEET_ASSIGN_OR_RETURN(at::Tensor n3w, w.Get("norm3.weight", {d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor n3b, w.Get("norm3.bias", {d}));
    at::Tensor c = LayerNormAffine(x, n3w, n3b, c_.eps);
    FLEET_ASSIGN_OR_RETURN(q, NormedProjection(w, "cross_attn.q", "cross_attn.norm_q", c));
    FLEET_ASSIGN_OR_RETURN(k, NormedProjection(w, "cross_attn.k", "cross_attn.norm_k", ctx));
    FLEET_ASSIGN_OR_RETURN(v, Projection(w, "cross_attn.v", ctx));
    y = ScaledDotAttention(q, k, SplitHeads(v, c_.heads));
    if (c_.i2v) {
      FLEET_ASSIGN_OR_RETURN(k,
                             NormedProjection(w, "cross_attn.k_img", "cross_attn.norm_k_img", img));
      FLEET_ASSIGN_OR_RETURN(v, Projection(w, "cross_attn.v_img", img));
      y = y + ScaledDotAttention(q, k, SplitHeads(v, c_.heads));
    }
    FLEET_ASSIGN_OR_RETURN(o, Projection(w, "cross_attn.o", y));
    x = x + o;

    FLEET_ASSIGN_OR_RETURN(at::Tensor f0w, w.Get("ffn.0.weight", {c_.ffn, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor f0b, w.Get("ffn.0.bias", {c_.ffn}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor f2w, w.Get("ffn.2.weight", {d, c_.ffn}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor f2b, w.Get("ffn.2.bias", {d}));
    at::Tensor f =
        Linear(GeluTanh(Linear(Modulate(x, mod[3], mod[4], c_.eps), f0w, f0b)), f2w, f2b);
    state["tokens"] = AddGated(x, f, mod[5]);
    return Status::OK();
  }

  Status Head(const WeightAccessor& weights, TensorMap& state) const {
    const int64_t d = c_.dim;
    FLEET_ASSIGN_OR_RETURN(auto grid, Grid(state));
    const int64_t tn = grid[3], hn = grid[4], wn = grid[5], n = tn * hn * wn;
    FLEET_ASSIGN_OR_RETURN(at::Tensor x, Activation(state, "tokens", {-1, n, d}));
    const int64_t batch = x.size(0);
    FLEET_ASSIGN_OR_RETURN(at::Tensor e, Activation(state, "e", {batch, -1, d}));
    if (n % e.size(1) != 0) {
      return InvalidArgumentError("state 'e' has " + std::to_string(e.size(1)) +
                                  " steps, which do not divide the " + std::to_string(n) +
                                  " tokens");
    }
    BlockWeights w(weights, "head.", dtype_, x.device());
    const int64_t features = c_.patch_volume() * c_.out_dim;
    FLEET_ASSIGN_OR_RETURN(at::Tensor modulation, w.Get("modulation", {1, 2, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor hw, w.Get("head.weight", {features, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor hb, w.Get("head.bias", {features}));
    at::Tensor m = modulation.unsqueeze(0) + e.unsqueeze(2);  // [B, S, 2, D]
    at::Tensor shift = PerToken(m.select(2, 0), n), scale = PerToken(m.select(2, 1), n);
    // Not an addcmul here: WanModel's Head multiplies and adds in two steps.
    at::Tensor normed = LayerNorm(x, c_.eps);
    at::Tensor out =
        Linear(Fp16Safe(normed,
                        [&](const at::Tensor& v) {
                          return v * (scale.to(v.scalar_type()) + 1) + shift.to(v.scalar_type());
                        }),
               hw, hb);
    // Unpatchify: features (pt, ph, pw, c), c fastest -> [B, C, T, H, W], cropped.
    const auto& p = c_.patch;
    out = out.view({batch, tn, hn, wn, p[0], p[1], p[2], c_.out_dim})
              .permute({0, 7, 1, 4, 2, 5, 3, 6})
              .reshape({batch, c_.out_dim, tn * p[0], hn * p[1], wn * p[2]});
    out = out.narrow(2, 0, grid[0]).narrow(3, 0, grid[1]).narrow(4, 0, grid[2]).contiguous();
    state.clear();
    state["out"] = out;
    return Status::OK();
  }

  WanConfig c_;
  at::ScalarType dtype_;
  std::vector<std::string> names_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> CreateWanModel(std::string_view config_json,
                                                at::ScalarType dtype) {
  FLEET_ASSIGN_OR_RETURN(WanConfig config, ParseWanConfig(config_json));
  return std::unique_ptr<Model>(new WanModel(std::move(config), dtype));
}

}  // namespace fleet::models::internal
