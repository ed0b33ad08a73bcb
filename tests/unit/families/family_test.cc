// The family registry's torch-free half: lookup, the metadata `config` override with ComfyUI's
// names (translated to ours, checked against the shapes), pin rules and activation estimates,
// over the real checkpoints' key lists.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "fleet/families/attention.h"
#include "fleet/families/family.h"
#include "fleet/families/layout.h"
#include "keys.h"

namespace fleet::families {
namespace {

using ::testing::HasSubstr;

nlohmann::json Config(const Layout& layout) { return nlohmann::json::parse(layout.config_json); }

std::string Error(const StatusOr<Layout>& layout) {
  return layout.ok() ? "ok" : std::string(layout.status().message());
}

TEST(FamilyRegistryTest, LooksFamiliesUpByNameAndAlias) {
  ASSERT_GE(AllFamilies().size(), 4u);
  EXPECT_EQ(FindFamily("flux")->name(), "flux");
  EXPECT_EQ(FindFamily(" WAN ")->name(), "wan");
  EXPECT_EQ(FindFamily("linear")->name(), "linear");
  EXPECT_EQ(FindFamily("clip")->name(), "text-encoder");
  EXPECT_EQ(FindFamily("t5")->name(), "text-encoder");
  EXPECT_EQ(FindFamily("sdxl"), nullptr);
  EXPECT_EQ(FindFamily("unknown"), nullptr) << "files of no family are not a family";
  auto bad = ParseFamily("sdxl");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("flux, wan, linear, text-encoder"));
  for (const Family* f : AllFamilies()) EXPECT_EQ(FindFamily(f->name()), f);
}

TEST(FamilyRegistryTest, GuessesFamiliesFromUnitNames) {
  EXPECT_EQ(GuessFamily({"img_in", "double_blocks.0", "final_layer"})->name(), "flux");
  EXPECT_EQ(GuessFamily({"stem", "blocks.0", "head"}), nullptr) << "'stem' alone says nothing";
  EXPECT_EQ(GuessFamily({"patch_embedding", "blocks.0", "head"})->name(), "wan");
  EXPECT_EQ(GuessFamily({"linear_blocks.0", "linear_blocks.1"})->name(), "linear");
  EXPECT_EQ(GuessFamily({"layers.0"}), nullptr);
}

TEST(FluxFamilyTest, ComfyConfigIsTranslatedAndCheckedAgainstTheShapes) {
  auto keys = LoadKeys("flux-dev.tsv", "model.diffusion_model.");
  // ComfyUI's FluxParams for flux-dev: in_channels counts latent channels (16), not the
  // 64 features of a 2x2 patch; mlp_ratio instead of the MLP width.
  const std::string comfy = R"({"image_model": "flux", "in_channels": 16, "out_channels": 16,
      "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0,
      "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56],
      "theta": 10000, "qkv_bias": true, "guidance_embed": true, "patch_size": 2})";
  auto layout = DetectLayout(keys, {{"config", comfy}}, "flux1-dev.safetensors");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->family, "flux");
  EXPECT_EQ(layout->prefix, "model.diffusion_model.");
  auto c = Config(*layout);
  EXPECT_EQ(c["in_channels"], 64);
  EXPECT_EQ(c["out_channels"], 64);
  EXPECT_EQ(c["mlp_hidden_dim"], 12288);
  EXPECT_EQ(c["num_heads"], 24);
  EXPECT_EQ(c["guidance_embed"], true);
  // The same file without the override gives the same configuration: shapes say it all.
  EXPECT_EQ(DetectLayout(keys, {}, "f")->config_json, layout->config_json);

  // What shapes cannot say comes from the config: theta, the RoPE axes.
  auto theta = DetectLayout(keys, {{"config", R"({"theta": 500, "axes_dim": [32, 48, 48]})"}}, "f");
  ASSERT_TRUE(theta.ok()) << theta.status();
  EXPECT_EQ(Config(*theta)["theta"], 500.0);
  EXPECT_EQ(Config(*theta)["axes_dim"], nlohmann::json({32, 48, 48}));

  // Contradictions name the key and the tensor; typos name the key.
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"({"hidden_size": 2048})"}}, "f")),
              HasSubstr("config' hidden_size = 2048 contradicts the tensors: img_in.weight gives "
                        "3072"));
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"({"in_channels": 64})"}}, "f")),
              HasSubstr("in_channels = 64 contradicts the tensors"));
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"({"mlp_ratio": 3.0})"}}, "f")),
              HasSubstr("mlp_ratio = 3.0 contradicts"));
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"({"guidance_embed": false})"}}, "f")),
              HasSubstr("guidance_in.in_layer.weight is present"));
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"({"hiden_size": 3072})"}}, "f")),
              HasSubstr("key 'hiden_size', which flux does not know"));
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"([1, 2])"}}, "f")),
              HasSubstr("must be a JSON object"));
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"({"axes_dim": [16, 56]})"}}, "f")),
              HasSubstr("axes_dim"));
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"({"image_model": "wan2.1"})"}}, "f")),
              HasSubstr("image_model"));
}

TEST(FluxFamilyTest, LegacyAxesMetadataStaysAcceptedAndMustAgreeWithConfig) {
  auto keys = LoadKeys("flux-dev.tsv");
  auto legacy = DetectLayout(keys, {{"fleet.axes_dim", "[32,48,48]"}}, "f");
  ASSERT_TRUE(legacy.ok()) << legacy.status();
  EXPECT_EQ(Config(*legacy)["axes_dim"], nlohmann::json({32, 48, 48}));
  auto both = DetectLayout(
      keys, {{"fleet.axes_dim", "[32,48,48]"}, {"config", R"({"axes_dim": [16, 56, 56]})"}}, "f");
  EXPECT_THAT(Error(both), HasSubstr("contradicts 'config' axes_dim"));
}

TEST(WanFamilyTest, ConfigNamesTheHeadCountOfNarrowHeads) {
  auto keys = LoadKeys("wan21-1.3b.tsv");
  auto plain = DetectLayout(keys, {}, "wan.safetensors");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(Config(*plain)["num_heads"], 12);  // 1536 / 128
  auto narrow = DetectLayout(keys, {{"config", R"({"num_heads": 24, "dim": 1536,
      "model_type": "t2v", "eps": 1e-6, "text_len": 512})"}},
                             "wan.safetensors");
  ASSERT_TRUE(narrow.ok()) << narrow.status();
  EXPECT_EQ(Config(*narrow)["num_heads"], 24);
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"({"num_heads": 7})"}}, "w")),
              HasSubstr("not a multiple of num_heads 7"));
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"({"model_type": "i2v"})"}}, "w")),
              HasSubstr("img_emb.proj.0.weight is absent"));
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"({"ffn_dim": 100})"}}, "w")),
              HasSubstr("ffn_dim = 100 contradicts the tensors: blocks.0.ffn.0.weight gives 8960"));
  EXPECT_THAT(Error(DetectLayout(keys, {{"config", R"({"patch_size": [1, 4, 4]})"}}, "w")),
              HasSubstr("patch_size [1,4,4] contradicts"));
  auto i2v = DetectLayout(LoadKeys("wan21-i2v-14b.tsv"), {}, "i2v");
  ASSERT_TRUE(i2v.ok()) << i2v.status();
  EXPECT_EQ(Config(*i2v)["model_type"], "i2v");
  EXPECT_EQ(Config(*i2v)["in_dim"], 36);
}

// The full-size text encoders' key tables, as ComfyUI's files have them (clip_l.safetensors,
// t5xxl_fp16.safetensors, umt5_xxl_fp16.safetensors), in F16.
std::vector<formats::TensorInfo> TextEncoderKeys(const std::string& kind,
                                                 const std::string& prefix = "") {
  std::vector<formats::TensorInfo> out;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    formats::TensorInfo t;
    t.name = prefix + name;
    t.dtype = "F16";
    t.shape = std::move(shape);
    t.nbytes = static_cast<uint64_t>(t.numel()) * 2;
    out.push_back(t);
  };
  if (kind == "clip") {
    add("text_model.embeddings.token_embedding.weight", {49408, 768});
    add("text_model.embeddings.position_embedding.weight", {77, 768});
    for (int i = 0; i < 12; ++i) {
      const std::string p = "text_model.encoder.layers." + std::to_string(i) + ".";
      for (const char* n : {"layer_norm1", "layer_norm2"}) {
        add(p + n + ".weight", {768});
        add(p + n + ".bias", {768});
      }
      for (const char* n : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
        add(p + "self_attn." + n + ".weight", {768, 768});
        add(p + "self_attn." + n + ".bias", {768});
      }
      add(p + "mlp.fc1.weight", {3072, 768});
      add(p + "mlp.fc1.bias", {3072});
      add(p + "mlp.fc2.weight", {768, 3072});
      add(p + "mlp.fc2.bias", {768});
    }
    add("text_model.final_layer_norm.weight", {768});
    add("text_model.final_layer_norm.bias", {768});
    add("text_projection.weight", {768, 768});
    return out;
  }
  const bool umt5 = kind == "umt5";
  add("shared.weight", {umt5 ? 256384 : 32128, 4096});
  for (int i = 0; i < 24; ++i) {
    const std::string p = "encoder.block." + std::to_string(i) + ".layer.";
    for (const char* n : {"q", "k", "v"}) add(p + "0.SelfAttention." + n + ".weight", {4096, 4096});
    add(p + "0.SelfAttention.o.weight", {4096, 4096});
    if (umt5 || i == 0) add(p + "0.SelfAttention.relative_attention_bias.weight", {32, 64});
    add(p + "0.layer_norm.weight", {4096});
    add(p + "1.DenseReluDense.wi_0.weight", {10240, 4096});
    add(p + "1.DenseReluDense.wi_1.weight", {10240, 4096});
    add(p + "1.DenseReluDense.wo.weight", {4096, 10240});
    add(p + "1.layer_norm.weight", {4096});
  }
  add("encoder.final_layer_norm.weight", {4096});
  return out;
}

TEST(TextEncoderFamilyTest, ClipT5AndUmt5AreToldApartByTheirKeys) {
  auto clip = DetectLayout(TextEncoderKeys("clip"), {}, "clip_l.safetensors");
  ASSERT_TRUE(clip.ok()) << clip.status();
  EXPECT_EQ(clip->family, "text-encoder");
  EXPECT_EQ(Config(*clip), nlohmann::json::parse(R"({"model_type":"clip","dim":768,"ffn_dim":3072,
                "num_heads":12,"num_layers":12,"vocab_size":49408,"max_positions":77,
                "activation":"quick_gelu","eps":1e-5,"eos_token_id":49407,"projection":true})"));
  ASSERT_EQ(clip->units.size(), 14u);
  EXPECT_EQ(clip->units[0].name, "embeddings");
  EXPECT_TRUE(clip->units[0].pinned);
  EXPECT_EQ(clip->units[12].name, "encoder.layers.11");
  EXPECT_EQ(clip->units[13].name, "final");
  EXPECT_FALSE(clip->units[13].pinned);
  EXPECT_NEAR(static_cast<double>(clip->total_bytes()), 246e6, 2e6);  // 123 M parameters

  auto t5 = DetectLayout(TextEncoderKeys("t5"), {}, "t5xxl_fp16.safetensors");
  ASSERT_TRUE(t5.ok()) << t5.status();
  EXPECT_EQ(Config(*t5), nlohmann::json::parse(R"({"model_type":"t5","dim":4096,
      "ffn_dim":10240,"num_heads":64,"head_dim":64,"num_layers":24,"vocab_size":32128,
      "activation":"gelu_pytorch_tanh","gated":true,"eps":1e-6,"embedding":"shared.weight"})"));
  ASSERT_EQ(t5->units.size(), 26u);
  EXPECT_EQ(t5->units[0].name, "shared");
  EXPECT_TRUE(t5->units[0].pinned);
  EXPECT_EQ(t5->units[25].name, "encoder.final_layer_norm");
  EXPECT_NEAR(static_cast<double>(t5->total_bytes()), 9.52e9, 0.02e9);  // 4.76 B parameters

  auto umt5 = DetectLayout(TextEncoderKeys("umt5", "text_encoders.umt5xxl."), {}, "umt5");
  ASSERT_TRUE(umt5.ok()) << umt5.status();
  EXPECT_EQ(umt5->prefix, "text_encoders.umt5xxl.");
  EXPECT_EQ(Config(*umt5)["model_type"], "umt5");
  EXPECT_EQ(Config(*umt5)["vocab_size"], 256384);
  EXPECT_NEAR(static_cast<double>(umt5->units[0].bytes), 2.1e9, 0.01e9) << "the embedding";

  const Family* te = FindFamily("t5");
  EXPECT_EQ(te->OutputNames(clip->config_json),
            (std::vector<std::string>{"out", "pooled", "pooled_projected"}));
  EXPECT_EQ(te->OutputNames(t5->config_json), std::vector<std::string>{"out"});
  EXPECT_EQ(FindFamily("wan")->OutputNames("{}"), std::vector<std::string>{"out"});
}

TEST(TextEncoderFamilyTest, LlamaCppT5NamesAreTranslatedAsComfyUIGGUFDoes) {
  // llama.cpp's T5 converter names: enc.blk.N.{attn_q,attn_k,attn_v,attn_o,attn_rel_b,attn_norm,
  // ffn_gate,ffn_up,ffn_down,ffn_norm}.weight, enc.output_norm.weight, token_embd.weight.
  auto keys = TextEncoderKeys("umt5");
  const std::vector<std::pair<std::string, std::string>> back = {
      {"encoder.final_layer_norm", "enc.output_norm"},
      {"shared", "token_embd"},
      {"layer.0.SelfAttention.relative_attention_bias", "attn_rel_b"},
      {"layer.0.SelfAttention.q", "attn_q"},
      {"layer.0.SelfAttention.k", "attn_k"},
      {"layer.0.SelfAttention.v", "attn_v"},
      {"layer.0.SelfAttention.o", "attn_o"},
      {"layer.0.layer_norm", "attn_norm"},
      {"layer.1.DenseReluDense.wi_1", "ffn_up"},
      {"layer.1.DenseReluDense.wo", "ffn_down"},
      {"layer.1.DenseReluDense.wi_0", "ffn_gate"},
      {"layer.1.layer_norm", "ffn_norm"},
      {"encoder.block.", "enc.blk."}};
  for (auto& t : keys) {
    for (const auto& [ours, theirs] : back) {
      if (auto at = t.name.find(ours); at != std::string::npos)
        t.name.replace(at, ours.size(), theirs);
    }
  }
  auto layout = DetectLayout(keys, {{"general.architecture", "t5encoder"}}, "umt5-Q8_0.gguf");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(Config(*layout)["model_type"], "umt5");
  EXPECT_EQ(layout->units[0].name, "shared");
  EXPECT_EQ(layout->units[0].tensors, std::vector<std::string>{"token_embd.weight"});
  EXPECT_EQ(layout->WeightName("token_embd.weight"), "shared.weight");
  EXPECT_EQ(layout->WeightName("enc.blk.7.attn_rel_b.weight"),
            "encoder.block.7.layer.0.SelfAttention.relative_attention_bias.weight");
  EXPECT_EQ(layout->WeightName("enc.blk.23.ffn_gate.weight"),
            "encoder.block.23.layer.1.DenseReluDense.wi_0.weight");
  EXPECT_EQ(layout->WeightName("enc.output_norm.weight"), "encoder.final_layer_norm.weight");
  EXPECT_EQ(layout->units[1].name, "encoder.block.0");
  EXPECT_EQ(layout->units[1].tensors.front().rfind("enc.blk.0.", 0), 0u) << "file names";
  // Two names that translate to one weight are refused, not one of them dropped.
  keys.push_back(keys.back());
  keys.back().name = "enc.blk.0.layer.0.SelfAttention.q.weight";
  keys.push_back(keys.back());
  keys.back().name = "enc.blk.0.attn_q.weight";
  EXPECT_THAT(Error(DetectLayout(keys, {}, "dup.gguf")), HasSubstr("both translate to"));
  // Other files: the name without the prefix.
  auto clip = DetectLayout(TextEncoderKeys("clip", "cond_stage_model.transformer."), {}, "c");
  ASSERT_TRUE(clip.ok()) << clip.status();
  EXPECT_TRUE(clip->renamed.empty());
  EXPECT_EQ(clip->WeightName("cond_stage_model.transformer.text_projection.weight"),
            "text_projection.weight");
}

TEST(TextEncoderFamilyTest, MetadataConfigIsComfysAndMustAgreeWithTheShapes) {
  auto t5 = TextEncoderKeys("t5");
  auto ok = DetectLayout(t5, {{"config", R"({"d_model": 4096, "num_heads": 64, "d_kv": 64,
      "model_type": "t5", "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": true,
      "vocab_size": 32128, "relative_attention_num_buckets": 32})"}},
                         "t5");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_THAT(Error(DetectLayout(t5, {{"config", R"({"model_type": "umt5"})"}}, "t5")),
              HasSubstr("model_type \"umt5\" contradicts the tensors: encoder.block.1 has no "
                        "relative_attention_bias"));
  EXPECT_THAT(Error(DetectLayout(t5, {{"config", R"({"num_heads": 32})"}}, "t5")),
              HasSubstr("num_heads = 32 contradicts the tensors"));
  EXPECT_THAT(
      Error(DetectLayout(t5, {{"config", R"({"relative_attention_max_distance": 64})"}}, "t5")),
      HasSubstr("relative_attention_max_distance 64 is not 128"));
  EXPECT_THAT(Error(DetectLayout(t5, {{"config", R"({"hidden_size": 4096})"}}, "t5")),
              HasSubstr("has key 'hidden_size', which t5 does not know"));
  auto clip = TextEncoderKeys("clip");
  EXPECT_THAT(Error(DetectLayout(clip, {{"config", R"({"hidden_act": "silu"})"}}, "c")),
              HasSubstr("hidden_act \"silu\" is not one of"));
  clip.push_back(clip.back());
  clip.back().name = "text_model.pooler.weight";
  EXPECT_THAT(Error(DetectLayout(clip, {}, "c")),
              HasSubstr("1 tensor(s) match no text-encoder unit (prefix ''): "
                        "'text_model.pooler.weight'"));
  auto missing = TextEncoderKeys("t5");
  std::erase_if(missing, [](const formats::TensorInfo& t) {
    return t.name == "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
  });
  EXPECT_THAT(Error(DetectLayout(missing, {}, "t5")),
              HasSubstr("relative_attention_bias.weight' is missing"));
}

TEST(TextEncoderFamilyTest, ActivationsGrowWithTheTokensAndComeFromTheTokenShape) {
  const Family* te = FindFamily("text-encoder");
  auto t5 = DetectLayout(TextEncoderKeys("t5"), {}, "t5");
  ASSERT_TRUE(t5.ok());
  InputSizes s = te->DefaultSizes();
  EXPECT_EQ(s.text_tokens, 512);
  auto at512 = te->ActivationBytes(t5->config_json, s);
  s.text_tokens = 77;
  auto at77 = te->ActivationBytes(t5->config_json, s);
  ASSERT_TRUE(at512.ok() && at77.ok());
  EXPECT_GT(*at512, 6 * *at77);
  // 512 tokens: the gated FFN and the hidden states (~58 MB), the position bias (2 x 64 MiB),
  // one attention chunk (up to 128 MiB).
  EXPECT_GT(*at512, 180u << 20);
  EXPECT_LT(*at512, 400u << 20);
  auto sizes = te->SizesOf(t5->config_json, {{"tokens", {3, 256}}});
  ASSERT_TRUE(sizes.has_value());
  EXPECT_EQ(sizes->batch, 3);
  EXPECT_EQ(sizes->text_tokens, 256);
  EXPECT_FALSE(te->SizesOf(t5->config_json, {{"x", {1, 16, 64, 64}}}).has_value());
}

TEST(LinearFamilyTest, TheToyFamilyIsDetectedFromItsFiles) {
  auto t = ToyKeys(3, 8);
  auto layout = DetectLayout(t, {}, "toy.safetensors");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->family, "linear");
  EXPECT_EQ(Config(*layout), nlohmann::json({{"dim", 8}, {"depth", 3}}));
  ASSERT_EQ(layout->units.size(), 3u);
  EXPECT_EQ(layout->units[2].name, "linear_blocks.2");
  EXPECT_EQ(layout->units[2].bytes, 8 * 8 * 4 + 8 * 4u);
  EXPECT_FALSE(layout->units[0].pinned);
  t.pop_back();                       // linear_blocks.2.bias
  t.pop_back();                       // linear_blocks.2.weight
  t.erase(t.begin(), t.begin() + 2);  // linear_blocks.0: blocks must start at 0
  EXPECT_THAT(Error(DetectLayout(t, {}, "toy")), HasSubstr("linear_blocks.0 is missing"));
}

TEST(PinRuleTest, EachFamilyNamesItsOwnStem) {
  const Family* flux = FindFamily("flux");
  const Family* wan = FindFamily("wan");
  const Family* te = FindFamily("text-encoder");
  EXPECT_TRUE(flux->Pin("stem") && flux->Pin("img_in") && flux->Pin("txt_in"));
  EXPECT_FALSE(flux->Pin("double_blocks.0") || flux->Pin("final_layer") ||
               flux->Pin("patch_embedding"));
  EXPECT_TRUE(wan->Pin("stem") && wan->Pin("time_projection") && wan->Pin("img_emb"));
  EXPECT_FALSE(wan->Pin("blocks.3") || wan->Pin("head") || wan->Pin("img_in"));
  EXPECT_TRUE(te->Pin("text_model.embeddings")->upstream);
  EXPECT_TRUE(te->Pin("embeddings")->upstream);
  EXPECT_FALSE(te->Pin("shared")->upstream) << "DisTorch2 misses T5's token embedding";
  EXPECT_FALSE(te->Pin("encoder.block.0"));
  EXPECT_FALSE(FindFamily("linear")->Pin("linear_blocks.0"));
  // Units of a detected file carry the pins.
  auto layout = DetectLayout(LoadKeys("wan21-14b.tsv"), {}, "w");
  ASSERT_TRUE(layout.ok()) << layout.status();
  for (const auto& u : layout->units) EXPECT_EQ(u.pinned, u.name == "stem") << u.name;
}

TEST(ActivationEstimateTest, GrowsWithTheInputAsTheBlocksDo) {
  const Family* flux = FindFamily("flux");
  auto layout = DetectLayout(LoadKeys("flux-dev.tsv"), {}, "f");
  ASSERT_TRUE(layout.ok());
  InputSizes s;  // 1024x1024, 512 text tokens, bf16
  // 4096 image + 512 text tokens, each with the MLP hidden (12288) and 6 x 3072 modulated copies,
  // plus one chunk of attention scores for 24 heads.
  EXPECT_EQ(*flux->ActivationBytes(layout->config_json, s),
            4608ull * (12288 + 6 * 3072) * 2 + AttentionChunkBytes(24, 4608, 4608));
  s.batch = 2;
  EXPECT_EQ(*flux->ActivationBytes(layout->config_json, s),
            2 * 4608ull * (12288 + 6 * 3072) * 2 + AttentionChunkBytes(48, 4608, 4608));
  s = InputSizes{};
  s.width = 1000;  // rounded up to whole patches, as the model pads
  EXPECT_EQ(*flux->ActivationBytes(layout->config_json, s),
            (64 * 63 + 512ull) * 30720 * 2 + AttentionChunkBytes(24, 64 * 63 + 512, 64 * 63 + 512));
  EXPECT_LE(AttentionChunkBytes(24, 4608, 4608), kAttentionBudgetBytes);

  const Family* wan = FindFamily("wan");
  auto w = DetectLayout(LoadKeys("wan21-14b.tsv"), {}, "w");
  ASSERT_TRUE(w.ok());
  InputSizes video;
  video.width = 1280;
  video.height = 720;
  video.frames = 81;  // 21 latent frames of 45 x 80 tokens
  EXPECT_EQ(*wan->ActivationBytes(w->config_json, video),
            75600ull * (13824 + 6 * 5120) * 2 + AttentionChunkBytes(40, 75600, 75600));
  auto w5 = DetectLayout(LoadKeys("wan22-5b.tsv"), {}, "w5");
  ASSERT_TRUE(w5.ok()) << w5.status();
  // The 48-channel VAE packs 16x16 pixels into a latent: 4x fewer tokens at the same size.
  const uint64_t per_token =
      Config(*w5)["ffn_dim"].get<uint64_t>() + 6 * Config(*w5)["dim"].get<uint64_t>();
  EXPECT_EQ(*wan->ActivationBytes(w5->config_json, video),
            21ull * 23 * 40 * per_token * 2 + AttentionChunkBytes(24, 21 * 23 * 40, 21 * 23 * 40));
  EXPECT_FALSE(flux->ActivationBytes("{}", s).ok());
}

// The first-forward re-check reads the sizes back from the inputs: the latent is 8x (16x for
// the 48-channel WAN VAE) smaller than the pixels, and a WAN latent frame covers 4 frames.
TEST(ActivationEstimateTest, InputSizesComeBackFromTheForwardsShapes) {
  const Family* flux = FindFamily("flux");
  auto f = DetectLayout(LoadKeys("flux-dev.tsv"), {}, "f");
  ASSERT_TRUE(f.ok());
  auto s = flux->SizesOf(f->config_json, {{"x", {2, 16, 128, 96}}, {"context", {2, 256, 4096}}});
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->batch, 2);
  EXPECT_EQ(s->height, 1024);
  EXPECT_EQ(s->width, 768);
  EXPECT_EQ(s->text_tokens, 256);
  EXPECT_FALSE(flux->SizesOf(f->config_json, {{"x", {2, 16, 128}}}).has_value());
  EXPECT_FALSE(flux->SizesOf(f->config_json, {{"img", {2, 16, 128, 96}}}).has_value());
  EXPECT_EQ(flux->DefaultSizes().width, 1024);

  const Family* wan = FindFamily("wan");
  auto w = DetectLayout(LoadKeys("wan21-14b.tsv"), {}, "w");
  ASSERT_TRUE(w.ok());
  auto v = wan->SizesOf(w->config_json, {{"x", {1, 16, 21, 60, 104}}});
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(v->frames, 81);
  EXPECT_EQ(v->height, 480);
  EXPECT_EQ(v->width, 832);
  // A video family's default is a typical clip, not one frame.
  EXPECT_EQ(wan->DefaultSizes().frames, 81);
  EXPECT_EQ(*wan->ActivationBytes(w->config_json, *v),
            *wan->ActivationBytes(w->config_json, wan->DefaultSizes()));
  auto w5 = DetectLayout(LoadKeys("wan22-5b.tsv"), {}, "w5");
  ASSERT_TRUE(w5.ok());
  EXPECT_EQ(wan->SizesOf(w5->config_json, {{"x", {1, 48, 31, 44, 80}}})->width, 1280);

  const Family* linear = FindFamily("linear");
  EXPECT_EQ(linear->SizesOf("{}", {{"x", {4096, 64}}})->batch, 4096);
}

TEST(ActivationEstimateTest, InputSizesAreBounded) {
  EXPECT_EQ(*CheckInputSize("width", 0), 0);
  EXPECT_EQ(*CheckInputSize("width", 65536), 65536);
  EXPECT_EQ(*CheckInputSize("frames", 16384), 16384);
  for (auto [name, value] : {std::pair<const char*, int64_t>{"width", 65537},
                             {"height", -1},
                             {"frames", 16385},
                             {"batch", 4097}}) {
    auto bad = CheckInputSize(name, value);
    ASSERT_FALSE(bad.ok()) << name;
    EXPECT_NE(bad.status().message().find(name), std::string::npos) << bad.status();
  }
}

}  // namespace
}  // namespace fleet::families
