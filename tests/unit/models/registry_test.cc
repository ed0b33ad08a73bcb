// The two halves of every family agree: each implementation (fleet::models) has a descriptor
// (fleet::families) of the same name, and the implementation's blocks are the descriptor's
// placement units, in the same order, for a real checkpoint layout.
#include <gtest/gtest.h>

#include "../families/keys.h"
#include "fleet/families/family.h"
#include "fleet/families/layout.h"
#include "fleet/models/model.h"

namespace fleet::models {
namespace {

TEST(FamilyRegistry, EveryImplementationHasADescriptor) {
  ASSERT_FALSE(ImplementedFamilies().empty());
  for (std::string_view name : ImplementedFamilies()) {
    const families::Family* f = families::FindFamily(name);
    ASSERT_NE(f, nullptr) << name << " has blocks but no descriptor";
    EXPECT_EQ(f->name(), name);
  }
  auto unknown = CreateModel("qwen-image", "{}", at::kFloat);
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find(
                "unknown model family 'qwen-image' (known: flux, linear, wan, text-encoder)"),
            std::string_view::npos)
      << unknown.status();
  auto encoder = CreateModel("text-encoder", "{}", at::kFloat);
  ASSERT_FALSE(encoder.ok());
  EXPECT_NE(encoder.status().message().find("missing string field 'model_type'"),
            std::string_view::npos)
      << encoder.status();
  auto t5 = CreateModel("text-encoder",
                        R"({"model_type":"t5","dim":64,"ffn_dim":96,"num_heads":4,"head_dim":16,
                            "num_layers":2,"vocab_size":100,"activation":"gelu_pytorch_tanh"})",
                        at::kBFloat16);
  ASSERT_TRUE(t5.ok()) << t5.status();
  EXPECT_EQ((*t5)->block_names(),
            (std::vector<std::string>{"shared", "encoder.block.0", "encoder.block.1",
                                      "encoder.final_layer_norm"}));
}

TEST(FamilyRegistry, BlocksAreTheDescriptorsUnitsInOrder) {
  for (const std::string prefix : {"", "model.diffusion_model."}) {
    for (const char* keys :
         {"flux-dev.tsv", "wan21-14b.tsv", "wan21-i2v-14b.tsv", "wan22-5b.tsv", "wan21-1.3b.tsv"}) {
      auto layout = families::DetectLayout(families::LoadKeys(keys, prefix), {}, keys);
      ASSERT_TRUE(layout.ok()) << layout.status();
      auto model = CreateModel(layout->family, layout->config_json, at::kBFloat16);
      ASSERT_TRUE(model.ok()) << model.status();
      std::vector<std::string> units;
      for (const auto& u : layout->units) units.push_back(u.name);
      EXPECT_EQ((*model)->block_names(), units) << keys;
    }
  }
  auto toy = families::ToyKeys(4, 6);
  auto layout = families::DetectLayout(toy, {}, "toy");
  ASSERT_TRUE(layout.ok()) << layout.status();
  auto model = CreateModel(layout->family, layout->config_json, at::kFloat);
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_EQ((*model)->block_names().size(), layout->units.size());
  for (size_t i = 0; i < layout->units.size(); ++i) {
    EXPECT_EQ((*model)->block_names()[i], layout->units[i].name);
  }
}

}  // namespace
}  // namespace fleet::models
