// The "linear" toy family: results checked against a scalar float64 loop, errors by message.
#include <ATen/TensorOperators.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <gtest/gtest.h>

#include <cmath>

#include "fleet/models/host_allocator.h"
#include "fleet/models/model.h"

namespace fleet::models {
namespace {

double GeluTanh(double x) {
  const double k = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}

TEST(LinearModel, ForwardMatchesScalarLoop) {
  const int64_t dim = 5, depth = 3, rows = 4;
  auto model = CreateModel("linear", R"({"dim": 5, "depth": 3})", at::kFloat);
  ASSERT_TRUE(model.ok()) << model.status();
  const Model& m = **model;
  EXPECT_EQ(m.family(), "linear");
  ASSERT_EQ(m.block_names().size(), 3u);
  EXPECT_EQ(m.block_names()[2], "linear_blocks.2");
  EXPECT_FALSE(m.IsRunConstant("x"));

  at::manual_seed(7);
  TensorMap weights;
  for (int64_t i = 0; i < depth; ++i) {
    std::string p = "linear_blocks." + std::to_string(i);
    weights[p + ".weight"] = at::randn({dim, dim}) * 0.5;
    weights[p + ".bias"] = at::randn({dim});
  }
  at::Tensor x0 = at::randn({rows, dim});

  // Reference: plain loops in double.
  std::vector<double> x(x0.data_ptr<float>(), x0.data_ptr<float>() + rows * dim);
  for (int64_t i = 0; i < depth; ++i) {
    std::string p = "linear_blocks." + std::to_string(i);
    const float* w = weights[p + ".weight"].data_ptr<float>();
    const float* b = weights[p + ".bias"].data_ptr<float>();
    std::vector<double> y(rows * dim);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t o = 0; o < dim; ++o) {
        double acc = b[o];
        for (int64_t k = 0; k < dim; ++k) acc += x[r * dim + k] * w[o * dim + k];
        y[r * dim + o] = GeluTanh(acc);
      }
    }
    x = y;
  }

  TensorMap state{{"x", x0}};
  for (size_t i = 0; i < m.block_names().size(); ++i) {
    ASSERT_TRUE(m.RunBlock(i, ResidentWeights(weights), state).ok());
  }
  at::Tensor out = state.at("x");
  ASSERT_EQ(out.sizes(), x0.sizes());
  for (int64_t j = 0; j < rows * dim; ++j) {
    EXPECT_NEAR(out.data_ptr<float>()[j], x[j], 1e-5) << "element " << j;
  }
}

TEST(LinearModel, SameBlocksSameBitsWhetherSplitOrNot) {
  auto model = CreateModel("linear", R"({"dim": 16, "depth": 4})", at::kBFloat16);
  ASSERT_TRUE(model.ok()) << model.status();
  TensorMap weights;
  for (int i = 0; i < 4; ++i) {
    std::string p = "linear_blocks." + std::to_string(i);
    auto w = (*model)->PrepareWeight(p + ".weight", at::randn({16, 16}) * 0.25);
    auto b = (*model)->PrepareWeight(p + ".bias", at::randn({16}));
    ASSERT_TRUE(w.ok() && b.ok());
    EXPECT_EQ(w->scalar_type(), at::kBFloat16);
    weights[p + ".weight"] = *w;
    weights[p + ".bias"] = *b;
  }
  at::Tensor x = at::randn({3, 16});
  TensorMap a{{"x", x}}, b{{"x", x.clone()}};
  for (size_t i = 0; i < 4; ++i)
    ASSERT_TRUE((*model)->RunBlock(i, ResidentWeights(weights), a).ok());
  // The same blocks with the state handed over in between (as a worker boundary would).
  for (size_t i = 0; i < 2; ++i)
    ASSERT_TRUE((*model)->RunBlock(i, ResidentWeights(weights), b).ok());
  TensorMap handed{{"x", b.at("x").clone()}};
  for (size_t i = 2; i < 4; ++i)
    ASSERT_TRUE((*model)->RunBlock(i, ResidentWeights(weights), handed).ok());
  EXPECT_EQ(a.at("x").scalar_type(), at::kBFloat16);
  EXPECT_TRUE(a.at("x").equal(handed.at("x")));
}

TEST(LinearModel, PrepareWeightConvertsDtype) {
  auto model = CreateModel("linear", R"({"dim": 2, "depth": 1})", at::kHalf);
  ASSERT_TRUE(model.ok());
  at::Tensor stored = at::randn({2, 2}).to(at::kBFloat16);
  auto w = (*model)->PrepareWeight("linear_blocks.0.weight", stored);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->scalar_type(), at::kHalf);
  EXPECT_TRUE(w->to(at::kFloat).equal(stored.to(at::kFloat)));  // bf16 -> f16 exact here
}

TEST(LinearModel, Float16RunsOnCpu) {
  auto model = CreateModel("linear", R"({"dim": 4, "depth": 1})", at::kHalf);
  ASSERT_TRUE(model.ok());
  TensorMap weights{{"linear_blocks.0.weight", at::eye(4).to(at::kHalf)},
                    {"linear_blocks.0.bias", at::zeros({4}).to(at::kHalf)}};
  TensorMap state{{"x", at::ones({1, 4})}};
  ASSERT_TRUE((*model)->RunBlock(0, ResidentWeights(weights), state).ok());
  EXPECT_EQ(state.at("x").scalar_type(), at::kHalf);
  EXPECT_NEAR(state.at("x")[0][0].item<float>(), 0.8412, 1e-3);
}

TEST(LinearModel, ErrorsNameTheProblem) {
  auto bad = CreateModel("linear", R"({"dim": 4})", at::kFloat);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'depth'"), std::string_view::npos) << bad.status();
  bad = CreateModel("linear", R"({"dim": "4", "depth": 1})", at::kFloat);
  EXPECT_NE(bad.status().message().find("'dim' must be an integer"), std::string_view::npos);
  bad = CreateModel("linear", "{not json", at::kFloat);
  EXPECT_NE(bad.status().message().find("not valid JSON"), std::string_view::npos);
  bad = CreateModel("resnet", "{}", at::kFloat);
  EXPECT_NE(bad.status().message().find("unknown model family 'resnet'"), std::string_view::npos);
  bad = CreateModel("linear", R"({"dim": 4, "depth": 1})", at::kLong);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);

  auto model = CreateModel("linear", R"({"dim": 4, "depth": 1})", at::kFloat);
  ASSERT_TRUE(model.ok());
  TensorMap weights{{"linear_blocks.0.weight", at::zeros({4, 3})},
                    {"linear_blocks.0.bias", at::zeros({4})}};
  TensorMap state{{"x", at::zeros({2, 4})}};
  Status s = (*model)->RunBlock(0, ResidentWeights(weights), state);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'linear_blocks.0.weight' has shape [4, 3], expected [4, 4]"),
            std::string_view::npos)
      << s;
  weights["linear_blocks.0.weight"] = at::zeros({4, 4});
  weights.erase("linear_blocks.0.bias");
  s = (*model)->RunBlock(0, ResidentWeights(weights), state);
  EXPECT_NE(s.message().find("missing weight 'linear_blocks.0.bias'"), std::string_view::npos);
  weights["linear_blocks.0.weight"] = at::zeros({4, 4});
  weights["linear_blocks.0.bias"] = at::zeros({4});
  state["x"] = at::zeros({2, 5});
  s = (*model)->RunBlock(0, ResidentWeights(weights), state);
  EXPECT_NE(s.message().find("state 'x' has shape [2, 5]"), std::string_view::npos) << s;
  state.clear();
  s = (*model)->RunBlock(0, ResidentWeights(weights), state);
  EXPECT_NE(s.message().find("missing state 'x'"), std::string_view::npos) << s;
  s = (*model)->RunBlock(1, ResidentWeights(weights), state);
  EXPECT_NE(s.message().find("out of range"), std::string_view::npos) << s;
}

TEST(HostAllocator, TuneSucceeds) { EXPECT_TRUE(TuneHostAllocator()); }

}  // namespace
}  // namespace fleet::models
