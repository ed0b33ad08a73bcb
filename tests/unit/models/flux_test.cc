// Flux blocks: configuration errors, block list, state hand-over between "devices" (bit-equal),
// and error messages. Numerical correctness against an independent reference is checked by
// tests/python/test_flux.py through fleet-run-local.
#include <ATen/TensorOperators.h>
#include <ATen/ops/randn.h>
#include <gtest/gtest.h>

#include <algorithm>

#include <string>

#include "fleet/models/model.h"

namespace fleet::models {
namespace {

constexpr const char* kTiny =
    R"({"in_channels":64,"hidden_size":32,"num_heads":2,"depth":2,"depth_single_blocks":2,)"
    R"("mlp_hidden_dim":128,"context_in_dim":24,"vec_in_dim":12,"guidance_embed":true,)"
    R"("axes_dim":[4,6,6],"theta":10000,"patch_size":2,"qkv_bias":true,"out_channels":64})";

// Random weights with the real names for kTiny.
TensorMap TinyWeights() {
  const int64_t d = 32, m = 128, hd = 16;
  TensorMap w;
  auto lin = [&](const std::string& n, int64_t out, int64_t in) {
    w[n + ".weight"] = at::randn({out, in}) / std::sqrt(static_cast<double>(in));
    w[n + ".bias"] = at::randn({out}) * 0.02;
  };
  lin("img_in", d, 64);
  lin("time_in.in_layer", d, 256);
  lin("time_in.out_layer", d, d);
  lin("guidance_in.in_layer", d, 256);
  lin("guidance_in.out_layer", d, d);
  lin("vector_in.in_layer", d, 12);
  lin("vector_in.out_layer", d, d);
  lin("txt_in", d, 24);
  for (int i = 0; i < 2; ++i) {
    for (std::string s : {"img", "txt"}) {
      std::string p = "double_blocks." + std::to_string(i) + "." + s;
      lin(p + "_mod.lin", 6 * d, d);
      lin(p + "_attn.qkv", 3 * d, d);
      lin(p + "_attn.proj", d, d);
      lin(p + "_mlp.0", m, d);
      lin(p + "_mlp.2", d, m);
      w[p + "_attn.norm.query_norm.scale"] = at::randn({hd}) * 0.1 + 1;
      w[p + "_attn.norm.key_norm.scale"] = at::randn({hd}) * 0.1 + 1;
    }
    std::string p = "single_blocks." + std::to_string(i) + ".";
    lin(p + "linear1", 3 * d + m, d);
    lin(p + "linear2", d, d + m);
    lin(p + "modulation.lin", 3 * d, d);
    w[p + "norm.query_norm.scale"] = at::randn({hd}) * 0.1 + 1;
    w[p + "norm.key_norm.scale"] = at::randn({hd}) * 0.1 + 1;
  }
  lin("final_layer.linear", 64, d);
  lin("final_layer.adaLN_modulation.1", 2 * d, d);
  return w;
}

TensorMap TinyInputs(int64_t batch, int64_t h, int64_t w, int64_t txt) {
  return {{"x", at::randn({batch, 16, h, w})},
          {"timestep", at::rand({batch})},
          {"context", at::randn({batch, txt, 24})},
          {"y", at::randn({batch, 12})},
          {"guidance", at::full({batch}, 3.5)}};
}

TEST(FluxModel, BlockListAndRunConstants) {
  auto model = CreateModel("flux", kTiny, at::kFloat);
  ASSERT_TRUE(model.ok()) << model.status();
  std::vector<std::string> want = {
      "stem",       "double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1",
      "final_layer"};
  EXPECT_EQ((*model)->block_names(), want);
  EXPECT_TRUE((*model)->IsRunConstant("pe"));
  EXPECT_FALSE((*model)->IsRunConstant("img"));
  // config_json round-trips through CreateModel.
  auto again = CreateModel("flux", (*model)->config_json(), at::kFloat);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->config_json(), (*model)->config_json());
}

TEST(FluxModel, HandOverBetweenDevicesIsBitExact) {
  at::manual_seed(3);
  auto model = CreateModel("flux", kTiny, at::kFloat);
  ASSERT_TRUE(model.ok());
  TensorMap weights = TinyWeights();
  TensorMap inputs = TinyInputs(2, 5, 7, 3);
  const size_t n = (*model)->block_names().size();

  TensorMap one = inputs;
  for (size_t i = 0; i < n; ++i)
    ASSERT_TRUE((*model)->RunBlock(i, ResidentWeights(weights), one).ok());
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one.at("out").sizes(), (at::IntArrayRef{2, 16, 5, 7}));

  // Every block on a "different device": the state is copied at every boundary.
  TensorMap state = inputs;
  for (size_t i = 0; i < n; ++i) {
    TensorMap copied;
    for (auto& [k, v] : state) copied[k] = v.clone();
    ASSERT_TRUE((*model)->RunBlock(i, ResidentWeights(weights), copied).ok());
    state = copied;
  }
  EXPECT_TRUE(state.at("out").equal(one.at("out")));
}

TEST(FluxModel, ConfigErrorsNameTheField) {
  auto bad = CreateModel("flux", R"({"hidden_size":32})", at::kFloat);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'num_heads'"), std::string_view::npos) << bad.status();
  std::string cfg = kTiny;
  cfg.replace(cfg.find("[4,6,6]"), 7, "[4,6,8]");
  bad = CreateModel("flux", cfg, at::kFloat);
  EXPECT_NE(bad.status().message().find("'axes_dim' sums to 18"), std::string_view::npos)
      << bad.status();
  cfg = kTiny;
  cfg.replace(cfg.find("\"num_heads\":2"), 13, "\"num_heads\":5");
  bad = CreateModel("flux", cfg, at::kFloat);
  EXPECT_NE(bad.status().message().find("not a multiple of num_heads 5"), std::string_view::npos);
}

TEST(FluxModel, MissingAndMistypedWeightsAreNamed) {
  auto model = CreateModel("flux", kTiny, at::kBFloat16);
  ASSERT_TRUE(model.ok());
  TensorMap weights = TinyWeights();  // float32: not prepared for bf16
  TensorMap state = TinyInputs(1, 4, 4, 2);
  Status s = (*model)->RunBlock(0, ResidentWeights(weights), state);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("flux stem: weight 'img_in.weight' has dtype float32, expected "
                             "bfloat16"),
            std::string_view::npos)
      << s;
  for (auto& [k, v] : weights) v = *(*model)->PrepareWeight(k, v);
  ASSERT_TRUE((*model)->RunBlock(0, ResidentWeights(weights), state).ok());
  weights.erase("double_blocks.0.txt_attn.proj.bias");
  s = (*model)->RunBlock(1, ResidentWeights(weights), state);
  EXPECT_NE(s.message().find("flux double_blocks.0: missing weight "
                             "'double_blocks.0.txt_attn.proj.bias'"),
            std::string_view::npos)
      << s;
  state.erase("pe");
  s = (*model)->RunBlock(2, ResidentWeights(weights), state);
  EXPECT_NE(s.message().find("missing state 'pe'"), std::string_view::npos) << s;
}

// Records which weights a block asks for, in order, and serves them from resident tensors.
class RecordingWeights final : public WeightAccessor {
 public:
  explicit RecordingWeights(const TensorMap& weights) : resident_(weights) {}
  StatusOr<at::Tensor> Get(std::string_view name) const override {
    asked.emplace_back(name);
    return resident_.Get(name);
  }
  bool Has(std::string_view name) const override { return resident_.Has(name); }
  mutable std::vector<std::string> asked;

 private:
  ResidentWeights resident_;
};

TEST(FluxModel, BlocksReadEveryWeightThroughTheAccessorOnceEach) {
  at::manual_seed(5);
  auto model = CreateModel("flux", kTiny, at::kFloat);
  ASSERT_TRUE(model.ok());
  TensorMap weights = TinyWeights();
  TensorMap state = TinyInputs(1, 4, 4, 2);
  std::vector<std::string> asked;
  for (size_t i = 0; i < (*model)->block_names().size(); ++i) {
    RecordingWeights w(weights);
    ASSERT_TRUE((*model)->RunBlock(i, w, state).ok());
    // Only this block's own weights, each once (one expansion per layer per step).
    const std::string& block = (*model)->block_names()[i];
    for (const auto& name : w.asked) {
      if (block != "stem") {
        EXPECT_EQ(name.rfind(block + ".", 0), 0u) << name << " in " << block;
      }
      EXPECT_EQ(std::count(w.asked.begin(), w.asked.end(), name), 1) << name;
    }
    asked.insert(asked.end(), w.asked.begin(), w.asked.end());
  }
  std::sort(asked.begin(), asked.end());
  std::vector<std::string> all;
  for (const auto& [name, t] : weights) all.push_back(name);
  EXPECT_EQ(asked, all) << "every weight is read through the accessor";

  // A weight the accessor lacks is an error naming it and the block, not a crash.
  TensorMap fewer = weights;
  fewer.erase("double_blocks.0.img_attn.proj.weight");
  TensorMap again = TinyInputs(1, 4, 4, 2);
  ASSERT_TRUE((*model)->RunBlock(0, ResidentWeights(fewer), again).ok());
  Status s = (*model)->RunBlock(1, ResidentWeights(fewer), again);
  EXPECT_NE(s.message().find("missing weight 'double_blocks.0.img_attn.proj.weight'"),
            std::string_view::npos)
      << s;
  EXPECT_NE(s.message().find("double_blocks.0"), std::string_view::npos) << s;
}

}  // namespace
}  // namespace fleet::models
