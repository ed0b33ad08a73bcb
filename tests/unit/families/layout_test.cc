// Placement units over the real key lists of flux-dev and WAN 2.1 / 2.2 (tests/unit/formats/
// keys/*.tsv, copied from the reference checkpoints), with and without container prefixes, and
// a sparse full-size flux file written by our writer.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "../formats/test_util.h"
#include "fleet/families/layout.h"
#include "fleet/formats/safetensors_writer.h"
#include "keys.h"

namespace fleet::families {
namespace {

using formats::DType;
using formats::ModelFile;
using formats::SafetensorsWriter;
using formats::TensorInfo;
namespace testing = formats::testing;

using ::testing::HasSubstr;

uint64_t Sum(const std::vector<TensorInfo>& ts) {
  uint64_t s = 0;
  for (const auto& t : ts) s += t.nbytes;
  return s;
}

TEST(LayoutTest, FluxDevRealKeys) {
  auto keys = LoadKeys("flux-dev.tsv");
  ASSERT_EQ(keys.size(), 780u);
  auto layout = DetectLayout(keys, {}, "flux-dev");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->family, "flux");
  EXPECT_EQ(layout->prefix, "");
  ASSERT_EQ(layout->units.size(), 1u + 19 + 38 + 1);
  EXPECT_EQ(layout->units[0].name, "stem");
  EXPECT_TRUE(layout->units[0].pinned);
  EXPECT_EQ(layout->units[0].tensors.size(),
            16u);  // img_in 2, time_in 4, vector_in 4, guidance_in 4, txt_in 2
  EXPECT_EQ(layout->units[1].name, "double_blocks.0");
  EXPECT_FALSE(layout->units[1].pinned);
  EXPECT_EQ(layout->units[19].name, "double_blocks.18");
  EXPECT_EQ(layout->units[20].name, "single_blocks.0");
  EXPECT_EQ(layout->units[57].name, "single_blocks.37");
  EXPECT_EQ(layout->units[58].name, "final_layer");
  EXPECT_EQ(layout->units[1].tensors.size(), 24u);
  EXPECT_EQ(layout->total_bytes(), Sum(keys));
  // A double block is 679.7 MB in bf16 (339.8 M params, docs/models.md); a single one 283.2 MB.
  EXPECT_EQ(layout->units[1].bytes, 679662592u);
  EXPECT_EQ(layout->units[20].bytes, 283183616u);
  auto c = nlohmann::json::parse(layout->config_json);
  EXPECT_EQ(c["in_channels"], 64);
  EXPECT_EQ(c["hidden_size"], 3072);
  EXPECT_EQ(c["num_heads"], 24);
  EXPECT_EQ(c["depth"], 19);
  EXPECT_EQ(c["depth_single_blocks"], 38);
  EXPECT_EQ(c["mlp_hidden_dim"], 12288);
  EXPECT_EQ(c["context_in_dim"], 4096);
  EXPECT_EQ(c["vec_in_dim"], 768);
  EXPECT_EQ(c["guidance_embed"], true);
  EXPECT_EQ(c["axes_dim"], nlohmann::json::parse("[16,56,56]"));
  EXPECT_EQ(c["theta"], 10000);
  EXPECT_EQ(c["patch_size"], 2);
  EXPECT_EQ(c["qkv_bias"], true);
  EXPECT_EQ(c["out_channels"], 64);
}

TEST(LayoutTest, FluxWithComfyPrefixAndNoGuidance) {
  auto keys = LoadKeys("flux-dev.tsv", "model.diffusion_model.");
  std::erase_if(
      keys, [](const TensorInfo& t) { return t.name.find("guidance_in") != std::string::npos; });
  auto layout = DetectLayout(keys, {}, "schnell");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->prefix, "model.diffusion_model.");
  EXPECT_EQ(layout->units[0].tensors[0], "model.diffusion_model.img_in.weight");
  EXPECT_EQ(nlohmann::json::parse(layout->config_json)["guidance_embed"], false);
}

TEST(LayoutTest, StrayTensorsAreAnErrorListingThem) {
  auto keys = LoadKeys("flux-dev.tsv", "model.diffusion_model.");
  keys.push_back({"first_stage_model.decoder.conv_in.weight", "F32", {4}, 0, 16});
  keys.push_back({"model.diffusion_model.lora_unet.x", "F32", {4}, 0, 16});
  auto layout = DetectLayout(keys, {}, "ckpt.safetensors");
  ASSERT_FALSE(layout.ok());
  std::string msg(layout.status().message());
  EXPECT_THAT(msg, HasSubstr("ckpt.safetensors: 2 tensor(s) match no flux unit"));
  EXPECT_THAT(msg, HasSubstr("'first_stage_model.decoder.conv_in.weight'"));
  EXPECT_THAT(msg, HasSubstr("'model.diffusion_model.lora_unet.x'"));
}

TEST(LayoutTest, MissingBlockIsAnError) {
  auto keys = LoadKeys("flux-dev.tsv");
  std::erase_if(keys, [](const TensorInfo& t) { return t.name.rfind("double_blocks.7.", 0) == 0; });
  auto layout = DetectLayout(keys, {}, "f");
  ASSERT_FALSE(layout.ok());
  EXPECT_THAT(std::string(layout.status().message()), HasSubstr("double_blocks.7 is missing"));
}

TEST(LayoutTest, FluxAxesFromMetadataOrDerived) {
  auto keys = LoadKeys("flux-dev.tsv");
  auto layout = DetectLayout(keys, {{"fleet.axes_dim", "[32,48,48]"}}, "f");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(nlohmann::json::parse(layout->config_json)["axes_dim"],
            nlohmann::json::parse("[32,48,48]"));
  auto bad = DetectLayout(keys, {{"fleet.axes_dim", "[16,56]"}}, "f");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("fleet.axes_dim"));

  // A narrow test model: head width 64 -> Flux's proportions, all even, summing to 64.
  std::vector<TensorInfo> tiny = {
      {"img_in.weight", "F32", {256, 64}, 0, 0},
      {"txt_in.weight", "F32", {256, 32}, 0, 0},
      {"vector_in.in_layer.weight", "F32", {256, 16}, 0, 0},
      {"time_in.in_layer.weight", "F32", {256, 256}, 0, 0},
      {"double_blocks.0.img_attn.norm.query_norm.scale", "F32", {64}, 0, 0},
      {"double_blocks.0.img_mlp.0.weight", "F32", {1024, 256}, 0, 0},
      {"final_layer.linear.weight", "F32", {64, 256}, 0, 0},
  };
  layout = DetectLayout(tiny, {}, "tiny");
  ASSERT_TRUE(layout.ok()) << layout.status();
  auto c = nlohmann::json::parse(layout->config_json);
  EXPECT_EQ(c["num_heads"], 4);
  EXPECT_EQ(c["axes_dim"], nlohmann::json::parse("[8,28,28]"));
  EXPECT_EQ(c["depth_single_blocks"], 0);
  EXPECT_EQ(c["guidance_embed"], false);
  EXPECT_EQ(c["qkv_bias"], false);
}

struct WanCase {
  std::string file;
  int dim, ffn, heads, layers, in_dim, out_dim;
  bool i2v;
  size_t stem_tensors;
};

class WanLayoutTest : public ::testing::TestWithParam<WanCase> {};

TEST_P(WanLayoutTest, RealKeys) {
  const WanCase& w = GetParam();
  auto keys = LoadKeys(w.file);
  auto layout = DetectLayout(keys, {{"general.architecture", "wan"}}, w.file);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->family, "wan");
  ASSERT_EQ(layout->units.size(), static_cast<size_t>(w.layers) + 2);
  EXPECT_EQ(layout->units.front().name, "stem");
  EXPECT_TRUE(layout->units.front().pinned);
  EXPECT_EQ(layout->units.front().tensors.size(), w.stem_tensors);
  EXPECT_EQ(layout->units[1].name, "blocks.0");
  EXPECT_EQ(layout->units[static_cast<size_t>(w.layers)].name,
            "blocks." + std::to_string(w.layers - 1));
  EXPECT_EQ(layout->units.back().name, "head");
  EXPECT_EQ(layout->units.back().tensors.size(), 3u);
  EXPECT_EQ(layout->total_bytes(), Sum(keys));
  auto c = nlohmann::json::parse(layout->config_json);
  EXPECT_EQ(c["dim"], w.dim);
  EXPECT_EQ(c["ffn_dim"], w.ffn);
  EXPECT_EQ(c["num_heads"], w.heads);
  EXPECT_EQ(c["num_layers"], w.layers);
  EXPECT_EQ(c["in_dim"], w.in_dim);
  EXPECT_EQ(c["out_dim"], w.out_dim);
  EXPECT_EQ(c["text_dim"], 4096);
  EXPECT_EQ(c["freq_dim"], 256);
  EXPECT_EQ(c["i2v"], w.i2v);
  EXPECT_EQ(c["model_type"], w.i2v ? "i2v" : "t2v");
  EXPECT_EQ(c["patch_size"], nlohmann::json::parse("[1,2,2]"));
}

INSTANTIATE_TEST_SUITE_P(
    Variants, WanLayoutTest,
    ::testing::Values(WanCase{"wan21-1.3b.tsv", 1536, 8960, 12, 30, 16, 16, false, 12},
                      WanCase{"wan21-14b.tsv", 5120, 13824, 40, 40, 16, 16, false, 12},
                      WanCase{"wan21-i2v-14b.tsv", 5120, 13824, 40, 40, 36, 16, true, 20},
                      WanCase{"wan22-5b.tsv", 3072, 14336, 24, 30, 48, 48, false, 12}),
    [](const auto& info) {
      std::string n = info.param.file.substr(0, info.param.file.find(".tsv"));
      for (char& ch : n)
        if (ch == '-' || ch == '.') ch = '_';
      return n;
    });

TEST(LayoutTest, ArchitectureMismatchAndUnknownFamily) {
  std::vector<TensorInfo> t = {{"model.diffusion_model.layers.0.w", "F32", {4}, 0, 16},
                               {"model.diffusion_model.layers.1.w", "F32", {4}, 16, 16},
                               {"model.diffusion_model.norm.w", "F32", {4}, 32, 16}};
  auto bad = DetectLayout(t, {{"general.architecture", "flux"}}, "x.gguf");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("general.architecture is 'flux' but the tensors do not have its layout"));
  auto layout = DetectLayout(t, {}, "x");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->family, "unknown");
  EXPECT_EQ(layout->prefix, "model.diffusion_model.");
  ASSERT_EQ(layout->units.size(), 3u);
  EXPECT_EQ(layout->units[0].name, "layers.0");
  EXPECT_EQ(layout->units[2].name, "norm");
  EXPECT_EQ(layout->config_json, "{}");
  EXPECT_FALSE(DetectLayout({}, {}, "empty").ok());
}

TEST(LayoutTest, SparseFullSizeFluxFile) {
  // The real flux-dev layout at full size (23.8 GB of holes), read back through ModelFile.
  testing::ScratchDir dir;
  SafetensorsWriter w;
  auto keys = LoadKeys("flux-dev.tsv");
  for (const auto& k : keys) ASSERT_TRUE(w.AddZeros(k.name, DType::kBF16, k.shape).ok());
  w.SetMetadata("format", "pt");
  ASSERT_TRUE(w.Write(dir.File("flux1-dev.safetensors")).ok());
  auto file = ModelFile::Open(dir.File("flux1-dev.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  auto layout = DetectLayout(**file);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->total_bytes(), Sum(keys));
  EXPECT_EQ(layout->total_bytes(), 23802816640u);
  EXPECT_EQ(layout->units.size(), 59u);
}

}  // namespace
}  // namespace fleet::families
