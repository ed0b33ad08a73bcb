// LoRA key mapping over the real checkpoints' key lists: every convention trainers use lands on
// the same weight (and the diffusers q/k/v of Flux on the right rows of the fused weight), and
// files that cannot apply are refused naming what is wrong.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "fleet/families/layout.h"
#include "fleet/families/lora_keys.h"
#include "keys.h"

namespace fleet::families {
namespace {

using ::testing::HasSubstr;

struct Model {
  std::string family, config;
  WeightShapes weights;
};

Model Load(const std::string& keys_file) {
  auto keys = LoadKeys(keys_file);
  auto layout = DetectLayout(keys, {}, keys_file);
  EXPECT_TRUE(layout.ok()) << layout.status().message();
  Model m{layout->family, layout->config_json, {}};
  for (const auto& t : keys) m.weights[t.name] = t.shape;
  return m;
}

const LoraModule* Find(const LoraMapping& m, const std::string& prefix) {
  for (const auto& module : m.modules) {
    if (module.prefix == prefix) return &module;
  }
  return nullptr;
}

TEST(LoraKeysTest, FluxConventionsLandOnTheSameWeights) {
  Model flux = Load("flux-dev.tsv");
  const std::vector<std::string> keys = {
      // native (ComfyUI / ai-toolkit), kohya, diffusers (PEFT), OneTrainer, lycoris
      "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
      "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight",
      "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight",
      "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight",
      "lora_unet_double_blocks_1_img_attn_qkv.alpha",
      "transformer.transformer_blocks.2.attn.to_k.lora_A.weight",
      "transformer.transformer_blocks.2.attn.to_k.lora_B.weight",
      "transformer.transformer_blocks.2.attn.add_v_proj.lora_A.weight",
      "transformer.single_transformer_blocks.3.proj_mlp.lora_A.weight",
      "lora_transformer_single_transformer_blocks_3_attn_to_q.lora_down.weight",
      "lycoris_transformer_blocks_4_ff_net_0_proj.lokr_w1",
      "transformer.norm_out.linear.lora_A.weight",
      "diffusion_model.single_blocks.5.linear1_qkv.lora_A.weight",
      "diffusion_model.double_blocks.6.img_mlp.0.diff_b",
      "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
  };
  auto mapping = MapLoraKeys(flux.family, flux.config, flux.weights, keys, "test.safetensors");
  ASSERT_TRUE(mapping.ok()) << mapping.status().message();
  const int64_t h = 3072;
  auto expect = [&](const std::string& prefix, const std::string& target, int64_t start,
                    int64_t length) {
    const LoraModule* m = Find(*mapping, prefix);
    ASSERT_NE(m, nullptr) << prefix;
    EXPECT_EQ(m->target, target) << prefix;
    EXPECT_EQ(m->offset_start, start) << prefix;
    EXPECT_EQ(m->offset_length, length) << prefix;
    EXPECT_EQ(m->shape, flux.weights.at(target)) << prefix;
  };
  expect("diffusion_model.double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.qkv.weight", 0,
         -1);
  expect("lora_unet_double_blocks_1_img_attn_qkv", "double_blocks.1.img_attn.qkv.weight", 0, -1);
  expect("transformer.transformer_blocks.2.attn.to_k", "double_blocks.2.img_attn.qkv.weight", h, h);
  expect("transformer.transformer_blocks.2.attn.add_v_proj", "double_blocks.2.txt_attn.qkv.weight",
         2 * h, h);
  expect("transformer.single_transformer_blocks.3.proj_mlp", "single_blocks.3.linear1.weight",
         3 * h, 4 * h);
  expect("lora_transformer_single_transformer_blocks_3_attn_to_q", "single_blocks.3.linear1.weight",
         0, h);
  expect("lycoris_transformer_blocks_4_ff_net_0_proj", "double_blocks.4.img_mlp.0.weight", 0, -1);
  expect("diffusion_model.single_blocks.5.linear1_qkv", "single_blocks.5.linear1.weight", 0, 3 * h);
  expect("diffusion_model.double_blocks.6.img_mlp.0", "double_blocks.6.img_mlp.0.bias", 0, -1);
  const LoraModule* norm_out = Find(*mapping, "transformer.norm_out.linear");
  ASSERT_NE(norm_out, nullptr);
  EXPECT_EQ(norm_out->target, "final_layer.adaLN_modulation.1.weight");
  EXPECT_TRUE(norm_out->swap_halves);
  // The kohya module's three parts stay together.
  EXPECT_EQ(Find(*mapping, "lora_unet_double_blocks_1_img_attn_qkv")->parts.size(), 3u);
  EXPECT_EQ(mapping->text_encoder,
            std::vector<std::string>{"lora_te1_text_model_encoder_layers_0_mlp_fc1"});
  EXPECT_TRUE(mapping->unmatched.empty());
}

TEST(LoraKeysTest, WanNativeKohyaAndDiffusersNames) {
  Model wan = Load("wan21-14b.tsv");
  const std::vector<std::string> keys = {
      "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
      "diffusion_model.blocks.0.self_attn.q.diff_b",
      "diffusion_model.blocks.0.norm3.diff",
      "lora_unet_blocks_1_cross_attn_k.lora_down.weight",
      "transformer.blocks.2.attn2.to_out.0.lora_A.weight",
      "transformer.blocks.2.norm2.diff",
      "transformer.blocks.3.ffn.net.0.proj.lora_A.weight",
      "transformer.condition_embedder.time_proj.lora_A.weight",
      "diffusion_model.blocks.4.modulation.diff",
  };
  auto mapping = MapLoraKeys(wan.family, wan.config, wan.weights, keys, "wan.safetensors");
  ASSERT_TRUE(mapping.ok()) << mapping.status().message();
  std::map<std::string, std::string> targets;
  for (const auto& m : mapping->modules)
    targets[m.prefix + (m.parts.count(".diff_b") ? "#b" : "")] = m.target;
  EXPECT_EQ(targets["diffusion_model.blocks.0.self_attn.q"], "blocks.0.self_attn.q.weight");
  EXPECT_EQ(targets["diffusion_model.blocks.0.self_attn.q#b"], "blocks.0.self_attn.q.bias");
  EXPECT_EQ(targets["diffusion_model.blocks.0.norm3"], "blocks.0.norm3.weight");
  EXPECT_EQ(targets["lora_unet_blocks_1_cross_attn_k"], "blocks.1.cross_attn.k.weight");
  EXPECT_EQ(targets["transformer.blocks.2.attn2.to_out.0"], "blocks.2.cross_attn.o.weight");
  EXPECT_EQ(targets["transformer.blocks.2.norm2"], "blocks.2.norm3.weight");  // swapped names
  EXPECT_EQ(targets["transformer.blocks.3.ffn.net.0.proj"], "blocks.3.ffn.0.weight");
  EXPECT_EQ(targets["transformer.condition_embedder.time_proj"], "time_projection.1.weight");
  EXPECT_EQ(targets["diffusion_model.blocks.4.modulation"], "blocks.4.modulation");
}

TEST(LoraKeysTest, TextEncoderModulesLandOnClipAndT5Weights) {
  WeightShapes clip = {{"text_model.encoder.layers.3.self_attn.q_proj.weight", {768, 768}},
                       {"text_model.encoder.layers.3.mlp.fc1.weight", {3072, 768}}};
  auto mapping = MapLoraKeys(
      "text-encoder", "{}", clip,
      {"lora_te1_text_model_encoder_layers_3_self_attn_q_proj.lora_up.weight",
       "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_up.weight",
       "text_encoders.clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.lora_down.weight",
       "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"},
      "flux_lora.safetensors");
  ASSERT_TRUE(mapping.ok()) << mapping.status();
  ASSERT_EQ(mapping->modules.size(), 3u);
  EXPECT_EQ(Find(*mapping, "lora_te1_text_model_encoder_layers_3_self_attn_q_proj")->target,
            "text_model.encoder.layers.3.self_attn.q_proj.weight");
  EXPECT_EQ(Find(*mapping, "text_encoders.clip_l.transformer.text_model.encoder.layers.3.mlp.fc1")
                ->target,
            "text_model.encoder.layers.3.mlp.fc1.weight");
  EXPECT_EQ(mapping->text_encoder.size(), 1u) << "the T5 module matches no CLIP weight";
  WeightShapes t5 = {{"encoder.block.0.layer.0.SelfAttention.q.weight", {4096, 4096}}};
  mapping = MapLoraKeys("text-encoder", "{}", t5,
                        {"lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight",
                         "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"},
                        "flux_lora.safetensors");
  ASSERT_TRUE(mapping.ok()) << mapping.status();
  ASSERT_EQ(mapping->modules.size(), 1u);
  EXPECT_EQ(mapping->modules[0].target, "encoder.block.0.layer.0.SelfAttention.q.weight");
  EXPECT_EQ(mapping->unmatched.size(), 1u) << "the diffusion model's module";
}

TEST(LoraKeysTest, AFileThatMatchesNothingSaysWhatItHas) {
  Model flux = Load("flux-dev.tsv");
  auto mapping = MapLoraKeys(
      flux.family, flux.config, flux.weights,
      {"lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.alpha",
       "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", "something_else"},
      "wan_lora.safetensors");
  ASSERT_FALSE(mapping.ok());
  const std::string msg(mapping.status().message());
  EXPECT_THAT(msg, HasSubstr("wan_lora.safetensors"));
  EXPECT_THAT(msg, HasSubstr("0 of 2 matched"));
  EXPECT_THAT(msg, HasSubstr("lora_unet_blocks_0_self_attn_q"));
  EXPECT_THAT(msg, HasSubstr("1 are for a text encoder"));
  EXPECT_THAT(msg, HasSubstr("something_else"));
}

TEST(LoraKeysTest, AdaptersTensorfleetDoesNotApplyAreRefusedByName) {
  Model flux = Load("flux-dev.tsv");
  for (const auto& [key, name] : std::vector<std::pair<std::string, std::string>>{
           {"lora_unet_double_blocks_0_img_attn_qkv.oft_blocks", "OFT"},
           {"lora_unet_double_blocks_0_img_attn_qkv.a1.weight", "GLoRA"},
           {"diffusion_model.img_in.reshape_weight", "reshape_weight"}}) {
    auto mapping = MapLoraKeys(flux.family, flux.config, flux.weights, {key}, "x.safetensors");
    ASSERT_FALSE(mapping.ok()) << key;
    EXPECT_EQ(mapping.status().code(), StatusCode::kUnimplemented) << key;
    EXPECT_THAT(std::string(mapping.status().message()), HasSubstr(name));
  }
}

TEST(LoraKeysTest, SplitsKeysByTheLongestPartSuffix) {
  std::string prefix, suffix;
  ASSERT_TRUE(SplitLoraKey("a.b.lora_B.default.weight", &prefix, &suffix));
  EXPECT_EQ(prefix, "a.b");
  EXPECT_EQ(suffix, ".lora_B.default.weight");
  ASSERT_TRUE(SplitLoraKey("x_lora.up.weight", &prefix, &suffix));
  EXPECT_EQ(prefix, "x");
  ASSERT_TRUE(SplitLoraKey("m.diff_b", &prefix, &suffix));
  EXPECT_EQ(suffix, ".diff_b");
  EXPECT_FALSE(SplitLoraKey("double_blocks.0.img_attn.qkv.weight", &prefix, &suffix));
}

}  // namespace
}  // namespace fleet::families
