// Flux.1 (dev / schnell) as blocks: stem, double_blocks.i, single_blocks.i, final_layer.
// The maths follows ComfyUI's comfy/ldm/flux (docs/models.md, "Flux as ComfyUI computes it");
// the state names and the few deliberate choices are in docs/models.md too.
#include "flux.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/nan_to_num.h>
#include <ATen/ops/pad.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "block_util.h"

namespace fleet::models::internal {
namespace {

struct FluxConfig {
  int64_t in_channels = 64;  // features per token = latent channels * patch^2 (img_in width)
  int64_t hidden = 0;
  int64_t heads = 0;
  int64_t depth = 0;
  int64_t depth_single = 0;
  int64_t mlp_hidden = 0;
  int64_t context_in = 0;
  int64_t vec_in = 0;
  bool guidance_embed = false;
  std::vector<int64_t> axes;
  double theta = 10000;
  int64_t patch = 2;
  bool qkv_bias = true;
  int64_t out_channels = 64;

  int64_t head_dim() const { return hidden / heads; }
  int64_t latent_in() const { return in_channels / (patch * patch); }
  int64_t latent_out() const { return out_channels / (patch * patch); }
};

StatusOr<FluxConfig> ParseFluxConfig(std::string_view text) {
  FLEET_ASSIGN_OR_RETURN(nlohmann::json j, ParseConfig("flux", text));
  FluxConfig c;
  FLEET_ASSIGN_OR_RETURN(c.hidden, IntField(j, "flux", "hidden_size", 1));
  FLEET_ASSIGN_OR_RETURN(c.heads, IntField(j, "flux", "num_heads", 1));
  FLEET_ASSIGN_OR_RETURN(c.depth, IntField(j, "flux", "depth", 0));
  FLEET_ASSIGN_OR_RETURN(c.depth_single, IntField(j, "flux", "depth_single_blocks", 0));
  FLEET_ASSIGN_OR_RETURN(c.context_in, IntField(j, "flux", "context_in_dim", 1));
  FLEET_ASSIGN_OR_RETURN(c.vec_in, IntField(j, "flux", "vec_in_dim", 1));
  // Optional fields default to Flux.1's values.
  auto optional_int = [&](const char* key, int64_t def, int64_t min) -> StatusOr<int64_t> {
    if (!j.contains(key)) return def;
    return IntField(j, "flux", key, min);
  };
  FLEET_ASSIGN_OR_RETURN(c.in_channels, optional_int("in_channels", 64, 1));
  FLEET_ASSIGN_OR_RETURN(c.out_channels, optional_int("out_channels", c.in_channels, 1));
  FLEET_ASSIGN_OR_RETURN(c.patch, optional_int("patch_size", 2, 1));
  FLEET_ASSIGN_OR_RETURN(c.mlp_hidden, optional_int("mlp_hidden_dim", 4 * c.hidden, 1));
  for (const char* key : {"guidance_embed", "qkv_bias"}) {
    if (j.contains(key) && !j[key].is_boolean()) {
      return InvalidArgumentError(std::string("flux config: field '") + key +
                                  "' must be true or false, got " + j[key].dump());
    }
  }
  c.guidance_embed = j.value("guidance_embed", false);
  c.qkv_bias = j.value("qkv_bias", true);
  if (j.contains("theta")) {
    if (!j["theta"].is_number() || j["theta"].get<double>() <= 0) {
      return InvalidArgumentError("flux config: field 'theta' must be a positive number, got " +
                                  j["theta"].dump());
    }
    c.theta = j["theta"].get<double>();
  }
  if (c.hidden % c.heads != 0) {
    return InvalidArgumentError("flux config: hidden_size " + std::to_string(c.hidden) +
                                " is not a multiple of num_heads " + std::to_string(c.heads));
  }
  const int64_t pp = c.patch * c.patch;
  if (c.in_channels % pp != 0 || c.out_channels % pp != 0) {
    return InvalidArgumentError("flux config: in_channels " + std::to_string(c.in_channels) +
                                " and out_channels " + std::to_string(c.out_channels) +
                                " must be multiples of patch_size^2 = " + std::to_string(pp));
  }
  int64_t axes_sum = 0;
  if (!j.contains("axes_dim")) {
    if (c.head_dim() != 128) {
      return InvalidArgumentError("flux config: 'axes_dim' is required when the head width (" +
                                  std::to_string(c.head_dim()) + ") is not 128");
    }
    c.axes = {16, 56, 56};
    axes_sum = 128;
  } else {
    const auto& a = j["axes_dim"];
    if (!a.is_array() || a.empty()) {
      return InvalidArgumentError("flux config: 'axes_dim' must be a non-empty array, got " +
                                  a.dump());
    }
    for (const auto& v : a) {
      if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() % 2 != 0) {
        return InvalidArgumentError(
            "flux config: 'axes_dim' entries must be positive even "
            "integers, got " +
            a.dump());
      }
      c.axes.push_back(v.get<int64_t>());
      axes_sum += c.axes.back();
    }
  }
  if (axes_sum != c.head_dim()) {
    return InvalidArgumentError(
        "flux config: 'axes_dim' sums to " + std::to_string(axes_sum) +
        ", must equal the head width hidden_size/num_heads = " + std::to_string(c.head_dim()));
  }
  if (c.axes.size() != 3) {
    return InvalidArgumentError("flux config: 'axes_dim' must have 3 entries (index, row, column)");
  }
  return c;
}

// fp16 activations are clamped like ComfyUI does after each block.
at::Tensor ClampFp16(const at::Tensor& x) {
  if (x.scalar_type() != at::kHalf) return x;
  return at::nan_to_num(x, 0.0, 65504.0, -65504.0);
}

// Sinusoidal embedding of an already x1000-scaled timestep, 256 dims, cosines first, in float32
// exactly as ComfyUI's timestep_embedding forms it.
at::Tensor TimestepEmbedding(const at::Tensor& scaled_t) {
  constexpr int64_t kHalf = 128;
  at::Tensor freqs =
      at::exp(at::arange(0, kHalf, at::TensorOptions().dtype(at::kFloat).device(scaled_t.device()))
                  .mul(-std::log(10000.0))
                  .div(kHalf));
  at::Tensor args = scaled_t.to(at::kFloat).unsqueeze(1) * freqs.unsqueeze(0);
  return at::cat({at::cos(args), at::sin(args)}, -1);
}

// MLPEmbedder: out_layer(silu(in_layer(x))).
StatusOr<at::Tensor> MlpEmbedder(const BlockWeights& w, const std::string& name,
                                 const at::Tensor& x, int64_t in_dim, int64_t hidden) {
  FLEET_ASSIGN_OR_RETURN(at::Tensor w1, w.Get(name + ".in_layer.weight", {hidden, in_dim}));
  FLEET_ASSIGN_OR_RETURN(at::Tensor b1, w.Get(name + ".in_layer.bias", {hidden}));
  FLEET_ASSIGN_OR_RETURN(at::Tensor w2, w.Get(name + ".out_layer.weight", {hidden, hidden}));
  FLEET_ASSIGN_OR_RETURN(at::Tensor b2, w.Get(name + ".out_layer.bias", {hidden}));
  return Linear(Silu(Linear(x, w1, b1)), w2, b2);
}

// RoPE table for text length `txt_len` and an hp x wp token grid: [1, 1, L+N, d/2, 2, 2] float32.
// ids: text (0,0,0); image token (r,c) -> (0,r,c). Angles in float64 as torch 1.13's einsum of
// float32 ids with float64 omegas gives.
at::Tensor RopeTable(int64_t txt_len, int64_t hp, int64_t wp, const std::vector<int64_t>& axes,
                     double theta, at::Device device) {
  const int64_t n = hp * wp;
  auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor tok = at::arange(0, n, f64);
  at::Tensor rows = at::cat({at::zeros({txt_len}, f64), at::floor_divide(tok, wp)});
  at::Tensor cols = at::cat({at::zeros({txt_len}, f64), tok - at::floor_divide(tok, wp) * wp});
  at::Tensor zeros = at::zeros({txt_len + n}, f64);
  const at::Tensor* pos[3] = {&zeros, &rows, &cols};
  std::vector<at::Tensor> parts;
  for (size_t a = 0; a < axes.size(); ++a) {
    const int64_t dim = axes[a];
    at::Tensor scale = at::arange(0, dim, 2, f64).div(static_cast<double>(dim));
    at::Tensor omega = at::pow(theta, scale).reciprocal();
    at::Tensor angle = pos[a]->unsqueeze(1) * omega.unsqueeze(0);  // [T, dim/2]
    at::Tensor c = at::cos(angle), s = at::sin(angle);
    parts.push_back(at::stack({c, -s, s, c}, -1).view({txt_len + n, dim / 2, 2, 2}));
  }
  return at::cat(parts, 1).to(at::kFloat).view({1, 1, txt_len + n, -1, 2, 2});
}

// softmax(q k^T / sqrt(d)) v with RoPE on q, k; q, k, v [B, H, T, d] -> [B, T, H*d].
at::Tensor Attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& pe) {
  return ScaledDotAttention(ApplyRope(q, pe), ApplyRope(k, pe), v);
}

class FluxModel final : public Model {
 public:
  FluxModel(FluxConfig config, at::ScalarType dtype) : c_(std::move(config)), dtype_(dtype) {
    names_.push_back("stem");
    for (int64_t i = 0; i < c_.depth; ++i) names_.push_back("double_blocks." + std::to_string(i));
    for (int64_t i = 0; i < c_.depth_single; ++i) {
      names_.push_back("single_blocks." + std::to_string(i));
    }
    names_.push_back("final_layer");
  }

  std::string_view family() const override { return "flux"; }
  at::ScalarType compute_dtype() const override { return dtype_; }
  const std::vector<std::string>& block_names() const override { return names_; }
  bool IsRunConstant(std::string_view name) const override { return name == "pe"; }

  std::string config_json() const override {
    nlohmann::ordered_json j;
    j["in_channels"] = c_.in_channels;
    j["hidden_size"] = c_.hidden;
    j["num_heads"] = c_.heads;
    j["depth"] = c_.depth;
    j["depth_single_blocks"] = c_.depth_single;
    j["mlp_hidden_dim"] = c_.mlp_hidden;
    j["context_in_dim"] = c_.context_in;
    j["vec_in_dim"] = c_.vec_in;
    j["guidance_embed"] = c_.guidance_embed;
    j["axes_dim"] = c_.axes;
    j["theta"] = c_.theta;
    j["patch_size"] = c_.patch;
    j["qkv_bias"] = c_.qkv_bias;
    j["out_channels"] = c_.out_channels;
    return j.dump();
  }

  Status RunBlock(size_t index, const WeightAccessor& weights, TensorMap& state) const override {
    if (index >= names_.size()) {
      return InvalidArgumentError("flux: block index " + std::to_string(index) +
                                  " out of range (model has " + std::to_string(names_.size()) +
                                  " blocks)");
    }
    const std::string& name = names_[index];
    Status s = GuardTorch("flux " + name, [&]() -> Status {
      if (index == 0) return Stem(weights, state);
      if (index == names_.size() - 1) return FinalLayer(weights, state);
      if (static_cast<int64_t>(index) <= c_.depth) return DoubleBlock(name, weights, state);
      return SingleBlock(name, weights, state);
    });
    // libtorch errors come back already named; our own checks get the block name here.
    if (!s.ok() && s.code() != StatusCode::kInternal) s = s.WithContext("flux " + name);
    return s;
  }

  StatusOr<at::Tensor> PrepareWeight(std::string_view name,
                                     const at::Tensor& stored) const override {
    return PrepareFloatingWeight("flux", name, stored, dtype_);
  }

 private:
  BlockWeights Weights(const WeightAccessor& weights, const std::string& prefix,
                       at::Device device) const {
    return BlockWeights(weights, prefix, dtype_, device);
  }

  // Takes a state tensor of the compute dtype with the given shape (-1 = any).
  StatusOr<at::Tensor> Activation(const TensorMap& state, std::string_view name,
                                  std::initializer_list<int64_t> shape) const {
    return FindActivation(state, name, shape, dtype_);
  }

  // vec [B, D] and pe [1, 1, T, d/2, 2, 2] shared by every transformer block.
  Status Common(const TensorMap& state, int64_t batch, int64_t tokens, at::Tensor* vec,
                at::Tensor* pe) const {
    FLEET_ASSIGN_OR_RETURN(*vec, Activation(state, "vec", {batch, c_.hidden}));
    FLEET_ASSIGN_OR_RETURN(*pe,
                           Find(state, "state", "pe", {-1, 1, tokens, c_.head_dim() / 2, 2, 2}));
    if (pe->scalar_type() != at::kFloat) {
      return InvalidArgumentError("state 'pe' must be float32");
    }
    return Status::OK();
  }

  Status Stem(const WeightAccessor& weights, TensorMap& state) const {
    FLEET_ASSIGN_OR_RETURN(at::Tensor x, Find(state, "state", "x", {-1, c_.latent_in(), -1, -1}));
    const int64_t batch = x.size(0), h = x.size(2), w = x.size(3);
    FLEET_ASSIGN_OR_RETURN(at::Tensor timestep, Find(state, "state", "timestep", {batch}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor context,
                           Find(state, "state", "context", {batch, -1, c_.context_in}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor y, Find(state, "state", "y", {batch, -1}));
    if (y.size(1) < c_.vec_in) {
      return InvalidArgumentError("state 'y' has shape " + ShapeString(y.sizes()) +
                                  ", expected at least " + std::to_string(c_.vec_in) + " columns");
    }
    at::Tensor guidance;
    if (c_.guidance_embed && state.count("guidance")) {
      FLEET_ASSIGN_OR_RETURN(guidance, Find(state, "state", "guidance", {batch}));
    }
    const at::Device device = x.device();
    for (const at::Tensor* t : {&timestep, &context, &y}) {
      if (t->device() != device) {
        return InvalidArgumentError("inputs must be on one device: x is on " + device.str() +
                                    ", another input on " + t->device().str());
      }
    }
    const int64_t p = c_.patch, txt_len = context.size(1), d = c_.hidden;
    BlockWeights wt = Weights(weights, "", device);

    // Patchify: circular pad bottom/right to a multiple of the patch, then
    // [B,C,H,W] -> [B, (H/p)(W/p), C*p*p] with features ordered (c, row, col).
    at::Tensor img = x.to(dtype_);
    const int64_t pad_h = (p - h % p) % p, pad_w = (p - w % p) % p;
    if (pad_h || pad_w) img = at::pad(img, {0, pad_w, 0, pad_h}, "circular");
    const int64_t hp = (h + pad_h) / p, wp = (w + pad_w) / p;
    img = img.view({batch, c_.latent_in(), hp, p, wp, p})
              .permute({0, 2, 4, 1, 3, 5})
              .reshape({batch, hp * wp, c_.in_channels});
    FLEET_ASSIGN_OR_RETURN(at::Tensor img_w, wt.Get("img_in.weight", {d, c_.in_channels}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor img_b, wt.Get("img_in.bias", {d}));
    img = Linear(img, img_w, img_b);

    // vec = time_in(emb(1000 t)) [+ guidance_in(emb(1000 g))] + vector_in(y).
    // 1000*t is formed in float32, 1000*g in the compute dtype (bf16: 3.5 -> 3504).
    at::Tensor t_emb = TimestepEmbedding(timestep.to(at::kFloat) * 1000.0).to(dtype_);
    FLEET_ASSIGN_OR_RETURN(at::Tensor vec, MlpEmbedder(wt, "time_in", t_emb, 256, d));
    if (c_.guidance_embed && guidance.defined()) {
      at::Tensor g_emb = TimestepEmbedding(guidance.to(device).to(dtype_) * 1000.0).to(dtype_);
      FLEET_ASSIGN_OR_RETURN(at::Tensor g, MlpEmbedder(wt, "guidance_in", g_emb, 256, d));
      vec = vec + g;
    }
    FLEET_ASSIGN_OR_RETURN(
        at::Tensor yv,
        MlpEmbedder(wt, "vector_in", y.narrow(1, 0, c_.vec_in).to(dtype_), c_.vec_in, d));
    vec = vec + yv;

    FLEET_ASSIGN_OR_RETURN(at::Tensor txt_w, wt.Get("txt_in.weight", {d, c_.context_in}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor txt_b, wt.Get("txt_in.bias", {d}));
    at::Tensor txt = Linear(context.to(dtype_), txt_w, txt_b);

    at::Tensor hw = at::empty({2}, at::TensorOptions().dtype(at::kLong));
    hw.data_ptr<int64_t>()[0] = h;
    hw.data_ptr<int64_t>()[1] = w;

    for (const char* input : {"x", "timestep", "context", "y", "guidance"}) state.erase(input);
    state["img"] = img;
    state["txt"] = txt;
    state["vec"] = vec;
    state["pe"] = RopeTable(txt_len, hp, wp, c_.axes, c_.theta, device);
    state["hw"] = hw;
    return Status::OK();
  }

  // q, k, v [B, H, T, d] from a fused qkv projection output [B, T, 3D], with QK RMSNorm.
  StatusOr<std::vector<at::Tensor>> Heads(const BlockWeights& w, const std::string& norm_prefix,
                                          const at::Tensor& qkv) const {
    const int64_t hd = c_.head_dim();
    FLEET_ASSIGN_OR_RETURN(at::Tensor qs, w.Get(norm_prefix + "query_norm.scale", {hd}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor ks, w.Get(norm_prefix + "key_norm.scale", {hd}));
    at::Tensor split =
        qkv.view({qkv.size(0), qkv.size(1), 3, c_.heads, hd}).permute({2, 0, 3, 1, 4});
    at::Tensor v = split[2];
    return std::vector<at::Tensor>{RmsNorm(split[0], qs, v.scalar_type()),
                                   RmsNorm(split[1], ks, v.scalar_type()), v};
  }

  // One stream of a double block up to attention: modulation and q, k, v.
  struct Stream {
    std::vector<at::Tensor> mod;  // shift1, scale1, gate1, shift2, scale2, gate2: [B,1,D]
    std::vector<at::Tensor> qkv;  // q, k, v [B,H,T,d]
  };
  StatusOr<Stream> PrepareStream(const BlockWeights& w, const std::string& s, const at::Tensor& x,
                                 const at::Tensor& silu_vec) const {
    const int64_t d = c_.hidden;
    Stream out;
    FLEET_ASSIGN_OR_RETURN(at::Tensor mw, w.Get(s + "_mod.lin.weight", {6 * d, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor mb, w.Get(s + "_mod.lin.bias", {6 * d}));
    out.mod = Linear(silu_vec, mw, mb).chunk(6, -1);
    FLEET_ASSIGN_OR_RETURN(at::Tensor qw, w.Get(s + "_attn.qkv.weight", {3 * d, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor qb, w.GetIf(c_.qkv_bias, s + "_attn.qkv.bias", {3 * d}));
    at::Tensor qkv = Linear(Modulate(x, out.mod[0], out.mod[1]), qw, qb);
    FLEET_ASSIGN_OR_RETURN(out.qkv, Heads(w, s + "_attn.norm.", qkv));
    return out;
  }

  // x + gate1 * proj(attn), then x + gate2 * mlp(modulate(x)).
  StatusOr<at::Tensor> FinishStream(const BlockWeights& w, const std::string& s, at::Tensor x,
                                    const at::Tensor& attn, const Stream& st) const {
    const int64_t d = c_.hidden, m = c_.mlp_hidden;
    FLEET_ASSIGN_OR_RETURN(at::Tensor pw, w.Get(s + "_attn.proj.weight", {d, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor pb, w.Get(s + "_attn.proj.bias", {d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor w0, w.Get(s + "_mlp.0.weight", {m, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor b0, w.Get(s + "_mlp.0.bias", {m}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor w2, w.Get(s + "_mlp.2.weight", {d, m}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor b2, w.Get(s + "_mlp.2.bias", {d}));
    x = x + Linear(attn, pw, pb) * st.mod[2];
    at::Tensor h = GeluTanh(Linear(Modulate(x, st.mod[3], st.mod[4]), w0, b0));
    return x + Linear(h, w2, b2) * st.mod[5];
  }

  Status DoubleBlock(const std::string& name, const WeightAccessor& weights,
                     TensorMap& state) const {
    FLEET_ASSIGN_OR_RETURN(at::Tensor img, Activation(state, "img", {-1, -1, c_.hidden}));
    const int64_t batch = img.size(0), n = img.size(1);
    FLEET_ASSIGN_OR_RETURN(at::Tensor txt, Activation(state, "txt", {batch, -1, c_.hidden}));
    const int64_t txt_len = txt.size(1);
    at::Tensor vec, pe;
    FLEET_RETURN_IF_ERROR(Common(state, batch, txt_len + n, &vec, &pe));
    BlockWeights w = Weights(weights, name + ".", img.device());
    at::Tensor silu_vec = Silu(vec.unsqueeze(1));
    FLEET_ASSIGN_OR_RETURN(Stream is, PrepareStream(w, "img", img, silu_vec));
    FLEET_ASSIGN_OR_RETURN(Stream ts, PrepareStream(w, "txt", txt, silu_vec));
    at::Tensor attn =
        Attention(at::cat({ts.qkv[0], is.qkv[0]}, 2), at::cat({ts.qkv[1], is.qkv[1]}, 2),
                  at::cat({ts.qkv[2], is.qkv[2]}, 2), pe);
    at::Tensor txt_attn = attn.narrow(1, 0, txt_len);
    at::Tensor img_attn = attn.narrow(1, txt_len, n);
    FLEET_ASSIGN_OR_RETURN(img, FinishStream(w, "img", img, img_attn, is));
    FLEET_ASSIGN_OR_RETURN(txt, FinishStream(w, "txt", txt, txt_attn, ts));
    state["img"] = img;
    state["txt"] = ClampFp16(txt);  // ComfyUI clamps only the text stream here
    return Status::OK();
  }

  // Single blocks run on "hidden" = cat(txt, img); the first one forms it.
  Status SingleBlock(const std::string& name, const WeightAccessor& weights,
                     TensorMap& state) const {
    if (!state.count("hidden") && state.count("img") && state.count("txt")) {
      FLEET_ASSIGN_OR_RETURN(at::Tensor img, Activation(state, "img", {-1, -1, c_.hidden}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor txt,
                             Activation(state, "txt", {img.size(0), -1, c_.hidden}));
      state["hidden"] = at::cat({txt, img}, 1);
      state.erase("img");
      state.erase("txt");
    }
    FLEET_ASSIGN_OR_RETURN(at::Tensor x, Activation(state, "hidden", {-1, -1, c_.hidden}));
    const int64_t batch = x.size(0), tokens = x.size(1), d = c_.hidden, m = c_.mlp_hidden;
    at::Tensor vec, pe;
    FLEET_RETURN_IF_ERROR(Common(state, batch, tokens, &vec, &pe));
    BlockWeights w = Weights(weights, name + ".", x.device());
    FLEET_ASSIGN_OR_RETURN(at::Tensor mw, w.Get("modulation.lin.weight", {3 * d, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor mb, w.Get("modulation.lin.bias", {3 * d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor w1, w.Get("linear1.weight", {3 * d + m, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor b1, w.Get("linear1.bias", {3 * d + m}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor w2, w.Get("linear2.weight", {d, d + m}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor b2, w.Get("linear2.bias", {d}));
    std::vector<at::Tensor> mod = Linear(Silu(vec.unsqueeze(1)), mw, mb).chunk(3, -1);
    at::Tensor lin1 = Linear(Modulate(x, mod[0], mod[1]), w1, b1);
    at::Tensor qkv = lin1.narrow(-1, 0, 3 * d);
    at::Tensor mlp = lin1.narrow(-1, 3 * d, m);
    FLEET_ASSIGN_OR_RETURN(std::vector<at::Tensor> h, Heads(w, "norm.", qkv));
    at::Tensor attn = Attention(h[0], h[1], h[2], pe);
    at::Tensor out = Linear(at::cat({attn, GeluTanh(mlp)}, 2), w2, b2);
    state["hidden"] = ClampFp16(x + out * mod[2]);
    return Status::OK();
  }

  Status FinalLayer(const WeightAccessor& weights, TensorMap& state) const {
    auto hw_it = state.find("hw");
    if (hw_it == state.end() || !hw_it->second.defined() || hw_it->second.numel() != 2 ||
        hw_it->second.scalar_type() != at::kLong) {
      return InvalidArgumentError("missing state 'hw' (int64 [2]: latent height and width)");
    }
    at::Tensor hw = hw_it->second.to(at::kCPU);
    const int64_t h = hw.data_ptr<int64_t>()[0], w = hw.data_ptr<int64_t>()[1];
    const int64_t p = c_.patch, hp = (h + p - 1) / p, wp = (w + p - 1) / p, n = hp * wp;
    if (h <= 0 || w <= 0) return InvalidArgumentError("state 'hw' holds a non-positive size");
    at::Tensor x;
    if (state.count("hidden")) {
      FLEET_ASSIGN_OR_RETURN(at::Tensor hidden, Activation(state, "hidden", {-1, -1, c_.hidden}));
      if (hidden.size(1) < n) {
        return InvalidArgumentError("state 'hidden' has " + std::to_string(hidden.size(1)) +
                                    " tokens, fewer than the " + std::to_string(n) +
                                    " image tokens of 'hw'");
      }
      x = hidden.narrow(1, hidden.size(1) - n, n);  // drop the text tokens
    } else {
      FLEET_ASSIGN_OR_RETURN(x, Activation(state, "img", {-1, n, c_.hidden}));
    }
    const int64_t batch = x.size(0), d = c_.hidden;
    FLEET_ASSIGN_OR_RETURN(at::Tensor vec, Activation(state, "vec", {batch, d}));
    BlockWeights wt = Weights(weights, "final_layer.", x.device());
    FLEET_ASSIGN_OR_RETURN(at::Tensor aw, wt.Get("adaLN_modulation.1.weight", {2 * d, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor ab, wt.Get("adaLN_modulation.1.bias", {2 * d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor lw, wt.Get("linear.weight", {c_.out_channels, d}));
    FLEET_ASSIGN_OR_RETURN(at::Tensor lb, wt.Get("linear.bias", {c_.out_channels}));
    std::vector<at::Tensor> mod = Linear(Silu(vec.unsqueeze(1)), aw, ab).chunk(2, -1);
    at::Tensor out = Linear(Modulate(x, mod[0], mod[1]), lw, lb);  // shift first
    // Unpatchify: [B, N, C*p*p] (c, row, col) -> [B, C, hp*p, wp*p], then crop to h, w.
    out = out.view({batch, hp, wp, c_.latent_out(), p, p})
              .permute({0, 3, 1, 4, 2, 5})
              .reshape({batch, c_.latent_out(), hp * p, wp * p});
    out = out.narrow(2, 0, h).narrow(3, 0, w).contiguous();
    state.clear();
    state["out"] = out;
    return Status::OK();
  }

  FluxConfig c_;
  at::ScalarType dtype_;
  std::vector<std::string> names_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> CreateFluxModel(std::string_view config_json,
                                                 at::ScalarType dtype) {
  FLEET_ASSIGN_OR_RETURN(FluxConfig config, ParseFluxConfig(config_json));
  return std::unique_ptr<Model>(new FluxModel(std::move(config), dtype));
}

}  // namespace fleet::models::internal
