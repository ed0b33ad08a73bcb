// The GGUF reader and the dequantisers, with ggml's own library (libggml-base.so from the npm
// package @node-llama-cpp/linux-x64) as the oracle: tests/unit/formats/ggml_oracle.py writes a
// GGUF file with a tensor of every dequantisable type, quantised by ggml, and ggml's outputs;
// tests/unit/formats/gen_iq_grids.py re-derives the IQ lookup tables (iq_grids.h) from ggml.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "fleet/families/layout.h"
#include "fleet/formats/dequant.h"
#include "fleet/formats/dtype.h"
#include "fleet/formats/model_file.h"
#include "gguf_builder.h"
#include "test_util.h"

namespace fleet::formats {
namespace {

using ::testing::HasSubstr;
using testing::GgufBuilder;

std::vector<uint8_t> ReadBytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

class GgmlOracleTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // ggml comes from npm (package.json), which needs the machine's Node.js >= 20.
    const std::string lib = testing::SourceDir() + "/" + kGgmlLibrary;
    if (!std::ifstream(lib)) {
      skip_reason_ = "SKIPPED: ggml's library " + lib +
                     " is missing (scripts/bootstrap installs it with npm when Node.js >= 20 is "
                     "present)";
      return;
    }
    dir_ = new testing::ScratchDir();
    const std::string cmd = "/usr/bin/python3 " + testing::SourceDir() +
                            "/tests/unit/formats/ggml_oracle.py " + testing::SourceDir() + " " +
                            dir_->File("");
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    oracle_ = nlohmann::json::parse(testing::ReadText(dir_->File("ggml.json")));
  }
  static void TearDownTestSuite() { delete dir_; }
  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
  }
  static constexpr const char* kGgmlLibrary =
      "node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libggml-base.so";
  static testing::ScratchDir* dir_;
  static nlohmann::json oracle_;
  static std::string skip_reason_;
};
testing::ScratchDir* GgmlOracleTest::dir_ = nullptr;
nlohmann::json GgmlOracleTest::oracle_;
std::string GgmlOracleTest::skip_reason_;

TEST_F(GgmlOracleTest, TypeTableMatchesGgml) {
  int known = 0;
  for (auto& [id, t] : oracle_["types"].items()) {
    auto traits = GgmlTypeInfo(static_cast<uint32_t>(std::stoul(id)));
    if (t["type_size"].get<int64_t>() == 0) {  // removed from ggml
      EXPECT_FALSE(traits.has_value()) << id;
      continue;
    }
    ASSERT_TRUE(traits.has_value()) << "ggml type " << id << " " << t["name"];
    EXPECT_EQ(traits->block_size, t["blck_size"].get<int>()) << id;
    EXPECT_EQ(traits->type_size, t["type_size"].get<int>()) << id;
    std::string ours(traits->name), theirs = t["name"].get<std::string>();
    for (char& c : ours) c = static_cast<char>(std::tolower(c));
    for (char& c : theirs) c = static_cast<char>(std::tolower(c));
    EXPECT_EQ(ours, theirs);
    // We dequantise exactly what ggml can: the types with a to_float, and F32 (which needs none).
    EXPECT_EQ(traits->dequantizable, t["to_float"].get<bool>() || id == "0") << traits->name;
    ++known;
  }
  EXPECT_EQ(known, 35);  // ids 0..42 less the 8 ggml removed
}

// common/formats/src/iq_grids.h is what tests/unit/formats/gen_iq_grids.py derives from ggml.
TEST_F(GgmlOracleTest, IqGridsHeaderMatchesGgml) {
  const std::string cmd = "/usr/bin/python3 " + testing::SourceDir() +
                          "/tests/unit/formats/gen_iq_grids.py " + testing::SourceDir() +
                          " --check";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
}

TEST_F(GgmlOracleTest, ReaderAgreesWithGgmlParser) {
  auto file = ModelFile::Open(dir_->File("oracle.gguf"));
  ASSERT_TRUE(file.ok()) << file.status();
  const auto& parsed = oracle_["parsed"];
  EXPECT_EQ((*file)->format(), FileFormat::kGguf);
  EXPECT_EQ((*file)->version(), parsed["version"].get<uint32_t>());
  EXPECT_EQ((*file)->alignment(), parsed["alignment"].get<uint64_t>());
  EXPECT_EQ((*file)->metadata().size(), parsed["n_kv"].get<size_t>());
  ASSERT_EQ((*file)->tensors().size(), parsed["tensors"].size());
  const uint64_t data_offset = parsed["data_offset"].get<uint64_t>();
  for (size_t i = 0; i < parsed["tensors"].size(); ++i) {
    const auto& want = parsed["tensors"][i];
    const TensorInfo& t = (*file)->tensors()[i];
    EXPECT_EQ(t.name, want["name"].get<std::string>());
    EXPECT_EQ(t.dtype, GgmlTypeInfo(want["type"].get<uint32_t>())->name);
    EXPECT_EQ(t.offset, data_offset + want["offset"].get<uint64_t>()) << t.name;
    EXPECT_EQ(t.shape, (std::vector<int64_t>{8, 512}));  // ne = [512, 8] reversed
  }
  const auto& md = (*file)->metadata();
  EXPECT_EQ(md.at("general.architecture"), "oracle");
  EXPECT_EQ(md.at("general.alignment"), "64");
  EXPECT_EQ(md.at("u8"), "200");
  EXPECT_EQ(md.at("i8"), "-5");
  EXPECT_EQ(md.at("u16"), "65535");
  EXPECT_EQ(md.at("i16"), "-32768");
  EXPECT_EQ(md.at("u32"), "4000000000");
  EXPECT_EQ(md.at("i32"), "-7");
  EXPECT_EQ(md.at("f32"), "0.5");
  EXPECT_EQ(md.at("bool"), "true");
  EXPECT_EQ(md.at("u64"), "18446744073709551615");
  EXPECT_EQ(md.at("i64"), "-9223372036854775808");
  EXPECT_EQ(md.at("f64"), "0.25");
  EXPECT_EQ(md.at("str"), "h\xc3\xa9llo");
  EXPECT_EQ(md.at("arr.i32"), "[1,-2,3]");
  EXPECT_EQ(md.at("arr.str"), R"(["a","b"])");
  EXPECT_EQ(md.at("arr.empty"), "[]");
}

// Every type, every output, scalar reference and the runtime-selected (AVX2) path: byte-equal to
// ggml's dequantize_row_* (+ ggml_fp32_to_fp16_row / ggml_fp32_to_bf16_row).
TEST_F(GgmlOracleTest, DequantizeIsBitIdenticalToGgml) {
  auto file = ModelFile::Open(dir_->File("oracle.gguf"));
  ASSERT_TRUE(file.ok()) << file.status();
  std::set<std::string> want_types, seen_types;
  for (uint32_t id = 0; id < 64; ++id) {
    auto traits = GgmlTypeInfo(id);
    if (traits && traits->dequantizable) want_types.insert(std::string(traits->name));
  }
  int checked = 0;
  for (const TensorInfo& t : (*file)->tensors()) {
    auto traits = GgmlTypeByName(t.dtype);
    ASSERT_TRUE(traits && traits->dequantizable) << t.dtype;
    seen_types.insert(t.dtype);
    const int64_t n = t.numel();
    for (auto [out, ext, size] : {std::tuple{OutType::kF32, ".f32", 4},
                                  std::tuple{OutType::kF16, ".f16", 2},
                                  std::tuple{OutType::kBF16, ".bf16", 2}}) {
      auto want = ReadBytes(dir_->File(t.name + ext));
      ASSERT_EQ(want.size(), static_cast<size_t>(n * size));
      for (bool reference : {true, false}) {
        std::vector<uint8_t> got(want.size(), 0xcd);
        Status s = reference ? DequantizeReference(traits->type, (*file)->Data(t), n, out, got.data())
                             : Dequantize(traits->type, (*file)->Data(t), n, out, got.data());
        ASSERT_TRUE(s.ok()) << s;
        size_t first_diff = 0;
        while (first_diff < got.size() && got[first_diff] == want[first_diff]) ++first_diff;
        EXPECT_EQ(first_diff, got.size())
            << t.dtype << ext << (reference ? " reference" : " dispatched")
            << ": first differing byte " << first_diff << " (element " << first_diff / size << ")";
        ++checked;
      }
    }
  }
  EXPECT_EQ(seen_types, want_types);  // the oracle covers every type we dequantise
  EXPECT_EQ(want_types.size(), 28u);
  EXPECT_EQ(checked, 28 * 3 * 2);
}

TEST(DequantTest, RejectsBadSizesAndTypes) {
  std::vector<uint8_t> src(34);
  float out[64];
  EXPECT_THAT(std::string(Dequantize(GgmlType::kQ8_0, src, 31, OutType::kF32, out).message()),
              HasSubstr("not a multiple of the block size 32"));
  EXPECT_THAT(std::string(Dequantize(GgmlType::kQ8_0, src, 64, OutType::kF32, out).message()),
              HasSubstr("64 elements need 68"));
  // ggml has no to_float for Q8_1 / Q8_K (its dot-product operands) or the integer types.
  EXPECT_THAT(std::string(Dequantize(GgmlType::kQ8_1, src, 32, OutType::kF32, out).message()),
              HasSubstr("Q8_1 is not supported"));
  EXPECT_THAT(
      std::string(DequantizeReference(GgmlType::kQ8_K, src, 256, OutType::kF32, out).message()),
      HasSubstr("Q8_K is not supported (supported: F32 F16 Q4_0 "));
  EXPECT_THAT(std::string(Dequantize(GgmlType::kI32, src, 1, OutType::kF32, out).message()),
              HasSubstr("I32 is not supported"));
  EXPECT_THAT(
      std::string(Dequantize(static_cast<GgmlType>(4), src, 32, OutType::kF32, out).message()),
      HasSubstr("unknown ggml type id 4"));
  EXPECT_THAT(std::string(Dequantize(GgmlType::kIQ2_XS, src, 256, OutType::kF32, out).message()),
              HasSubstr("34 source bytes, 256 elements need 74"));
  EXPECT_TRUE(Dequantize(GgmlType::kQ8_0, src, 32, OutType::kF32, out).ok());
  // Fuzzer finding: an empty tensor with a null destination is fine (no memcpy(nullptr)).
  EXPECT_TRUE(Dequantize(GgmlType::kF32, {}, 0, OutType::kF32, nullptr).ok());
}

// The type table's `dequantizable` is what the dispatcher accepts, on both paths, for every id;
// any bytes decode without reading past the block (indices into the IQ grids are masked).
TEST(DequantTest, TableAgreesWithDispatcher) {
  int supported = 0;
  for (uint32_t id = 0; id < 64; ++id) {
    auto traits = GgmlTypeInfo(id);
    if (!traits) continue;
    for (uint8_t fill : {0x00, 0xff, 0x5a}) {
      const std::vector<uint8_t> src(static_cast<size_t>(traits->type_size), fill);
      std::vector<float> out(static_cast<size_t>(traits->block_size));
      const Status fast =
          Dequantize(traits->type, src, traits->block_size, OutType::kF32, out.data());
      const Status ref =
          DequantizeReference(traits->type, src, traits->block_size, OutType::kF32, out.data());
      EXPECT_EQ(fast.ok(), traits->dequantizable) << traits->name << " " << fast;
      EXPECT_EQ(ref.ok(), traits->dequantizable) << traits->name << " " << ref;
    }
    supported += traits->dequantizable;
  }
  EXPECT_EQ(supported, 28);
}

// ---- the reader on files from our builder ---------------------------------------------------

std::vector<uint8_t> Floats(int n) {
  std::vector<uint8_t> b(static_cast<size_t>(n) * 4);
  for (int i = 0; i < n; ++i) {
    float f = static_cast<float>(i);
    std::memcpy(b.data() + 4 * i, &f, 4);
  }
  return b;
}

TEST(GgufTest, NestedArraysV2AndComfyOrigShape) {
  GgufBuilder g(/*version=*/2);
  g.KvStr("general.architecture", "wan");
  std::vector<uint8_t> nested;
  GgufBuilder::PutPod<uint32_t>(&nested, GgufBuilder::ARR);
  GgufBuilder::PutPod<uint64_t>(&nested, 2);
  for (int k = 0; k < 2; ++k) {
    GgufBuilder::PutPod<uint32_t>(&nested, GgufBuilder::STR);
    GgufBuilder::PutPod<uint64_t>(&nested, 1);
    GgufBuilder::PutStr(&nested, k ? "y" : "x");
  }
  g.KvRaw("nested", GgufBuilder::ARR, nested);
  g.KvArr<int32_t>("comfy.gguf.orig_shape.patch_embedding.weight", GgufBuilder::I32,
                   {8, 4, 1, 2, 2});
  g.Tensor("patch_embedding.weight", 0, {16, 8}, Floats(128));  // stored 2-D
  g.Tensor("bias", 0, {8}, Floats(8));
  auto image = g.Build();
  auto file = ModelFile::Parse(image, "w.gguf");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->version(), 2u);
  EXPECT_EQ((*file)->metadata().at("nested"), R"([["x"],["y"]])");
  EXPECT_EQ((*file)->Find("patch_embedding.weight")->shape,
            (std::vector<int64_t>{8, 4, 1, 2, 2}));
  EXPECT_EQ((*file)->Find("bias")->offset % 32, 0u);
  auto data = (*file)->Data(*(*file)->Find("bias"));
  float f7;
  std::memcpy(&f7, data.data() + 28, 4);
  EXPECT_EQ(f7, 7.0f);
}

TEST(GgufTest, ComfyGgufFluxLayout) {
  // A tiny quantised flux with ComfyUI-GGUF's key names and architecture key.
  GgufBuilder g;
  g.KvStr("general.architecture", "flux");
  g.Kv<uint32_t>("general.quantization_version", GgufBuilder::U32, 2);
  auto q8 = [](int rows, int cols) { return std::vector<uint8_t>(static_cast<size_t>(rows * cols / 32 * 34)); };
  g.Tensor("img_in.weight", 8, {64, 64}, q8(64, 64));
  g.Tensor("txt_in.weight", 8, {32, 64}, q8(64, 32));
  g.Tensor("vector_in.in_layer.weight", 8, {32, 64}, q8(64, 32));
  g.Tensor("time_in.in_layer.weight", 8, {256, 64}, q8(64, 256));
  g.Tensor("double_blocks.0.img_attn.norm.query_norm.scale", 0, {16}, Floats(16));
  g.Tensor("double_blocks.0.img_mlp.0.weight", 12, {256, 256}, std::vector<uint8_t>(256 * 144));
  g.Tensor("single_blocks.0.linear1.weight", 14, {256, 64}, std::vector<uint8_t>(64 * 210));
  g.Tensor("final_layer.linear.weight", 1, {64, 64}, std::vector<uint8_t>(64 * 64 * 2));
  auto image = g.Build();
  auto file = ModelFile::Parse(image, "flux-q8.gguf");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Find("double_blocks.0.img_mlp.0.weight")->nbytes, 256u * 144);
  EXPECT_EQ((*file)->Find("double_blocks.0.img_mlp.0.weight")->dtype, "Q4_K");
  auto layout = families::DetectLayout(**file);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->family, "flux");
  ASSERT_EQ(layout->units.size(), 4u);
  EXPECT_EQ(layout->units[1].bytes, 16u * 4 + 256 * 144);
  auto c = nlohmann::json::parse(layout->config_json);
  EXPECT_EQ(c["num_heads"], 4);
  EXPECT_EQ(c["mlp_hidden_dim"], 256);
}

struct BadGguf {
  std::string label;
  std::vector<uint8_t> image;
  std::vector<std::string> expect;
};

std::vector<BadGguf> BadCases() {
  std::vector<BadGguf> cases;
  auto base = [] {
    GgufBuilder g;
    g.KvStr("general.architecture", "flux");
    return g;
  };
  {
    auto g = base();
    g.Tensor("t", 0, {4}, Floats(4));
    auto img = g.Build();
    img[4] = 1;  // version 1
    cases.push_back({"version1", img, {"field 'version' at byte 4", "version 1 is not supported"}});
    img[4] = 0;
    img[7] = 3;  // big-endian 3
    cases.push_back({"big_endian", img, {"looks big-endian"}});
  }
  {
    auto g = base();
    g.set_counts(1ull << 60, 1);
    cases.push_back({"absurd_tensor_count", g.Build(), {"field 'tensor_count' at byte 8", "cannot fit"}});
  }
  {
    auto g = base();
    g.set_counts(0, 1ull << 40);
    cases.push_back({"absurd_kv_count", g.Build(), {"metadata_kv_count", "cannot fit"}});
  }
  {
    GgufBuilder g;
    std::vector<uint8_t> v;
    GgufBuilder::PutPod<uint64_t>(&v, 1ull << 50);  // string length
    g.KvRaw("k", GgufBuilder::STR, v);
    cases.push_back({"string_past_end", g.Build(), {"key 'k'", "field 'value' at byte 37", "truncated"}});
  }
  {
    GgufBuilder g;
    g.Kv<uint8_t>("k", 13, 0);
    cases.push_back({"unknown_value_type", g.Build(), {"key 'k'", "field 'type' at byte 33", "unknown value type 13"}});
  }
  {
    GgufBuilder g;
    g.Kv<uint8_t>("k", GgufBuilder::BOOL, 7);
    cases.push_back({"bad_bool", g.Build(), {"bool value 7"}});
  }
  {
    GgufBuilder g;
    std::vector<uint8_t> v;
    GgufBuilder::PutPod<uint32_t>(&v, GgufBuilder::U64);
    GgufBuilder::PutPod<uint64_t>(&v, 1ull << 61);
    g.KvRaw("arr", GgufBuilder::ARR, v);
    cases.push_back({"absurd_array", g.Build(), {"key 'arr'", "cannot fit"}});
  }
  {
    GgufBuilder g;
    std::vector<uint8_t> v;
    for (int i = 0; i < 20; ++i) {
      GgufBuilder::PutPod<uint32_t>(&v, GgufBuilder::ARR);
      GgufBuilder::PutPod<uint64_t>(&v, 1);
    }
    GgufBuilder::PutPod<uint32_t>(&v, GgufBuilder::U8);
    GgufBuilder::PutPod<uint64_t>(&v, 0);
    // v is the payload of an array whose elements are arrays...; wrap it as the value.
    g.KvRaw("deep", GgufBuilder::ARR, v);
    cases.push_back({"deep_nesting", g.Build(), {"nested deeper"}});
  }
  {
    GgufBuilder g;
    g.Kv<uint32_t>("general.alignment", GgufBuilder::U32, 48);
    cases.push_back({"alignment_not_pow2", g.Build(), {"general.alignment 48 is not a power of two"}});
  }
  {
    GgufBuilder g;
    g.KvStr("a", "x");
    g.KvStr("a", "y");
    cases.push_back({"duplicate_key", g.Build(), {"duplicate key 'a'"}});
  }
  {
    auto g = base();
    g.Tensor("t", 99, {4}, Floats(4));
    cases.push_back({"unknown_ggml_type", g.Build(), {"tensor 't'", "field 'type'", "unknown ggml type 99"}});
  }
  {
    auto g = base();
    g.Tensor("t", 0, {1, 1, 1, 1, 1, 1, 1, 1, 4}, Floats(4));  // 5-D is fine (WAN files)
    cases.push_back({"nine_dims", g.Build(), {"9 dimensions (at most 8)"}});
  }
  {
    auto g = base();
    g.Tensor("t", 8, {48}, std::vector<uint8_t>(34));
    cases.push_back({"row_not_blocks", g.Build(), {"row length 48 is not a multiple of Q8_0's block size 32"}});
  }
  {
    auto g = base();
    g.Tensor("t", 0, {1ull << 40, 1ull << 40}, {});
    cases.push_back({"size_overflow", g.Build(), {"overflows 64 bits"}});
  }
  {
    // Fuzzer finding (tests/fuzz/corpus/gguf/regress-numel-overflow-zero-dim).
    auto g = base();
    g.Tensor("t", 0, {0, 1ull << 40, 1ull << 40}, {});
    cases.push_back({"zero_dim_overflow", g.Build(), {"element count overflows 64 bits"}});
  }
  {
    auto g = base();
    g.Tensor("t", 0, {1ull << 20}, {});
    cases.push_back({"data_past_end", g.Build(), {"tensor 't'", "field 'offset'", "runs past the end"}});
  }
  {
    auto g = base();
    g.Tensor("a", 0, {16}, Floats(16));
    g.Tensor("b", 0, {16}, Floats(16), /*offset=*/32);
    cases.push_back({"overlap", g.Build(), {"tensor 'b'", "overlaps tensor 'a'"}});
  }
  {
    auto g = base();
    g.Tensor("a", 0, {4}, Floats(4), /*offset=*/8);
    cases.push_back({"misaligned_offset", g.Build(), {"not a multiple of the alignment 32"}});
  }
  {
    auto g = base();
    g.Tensor("a", 0, {4}, Floats(4));
    g.Tensor("a", 0, {4}, Floats(4));
    cases.push_back({"duplicate_tensor", g.Build(), {"duplicate tensor name 'a'"}});
  }
  return cases;
}

TEST(GgufTest, BadInputGivesClearErrors) {
  for (const auto& c : BadCases()) {
    auto file = ModelFile::Parse(c.image, "bad.gguf");
    ASSERT_FALSE(file.ok()) << c.label;
    std::string msg(file.status().message());
    EXPECT_THAT(msg, HasSubstr("bad.gguf: gguf")) << c.label;
    for (const auto& e : c.expect) EXPECT_THAT(msg, HasSubstr(e)) << c.label << ": " << msg;
  }
}

TEST(GgufTest, EveryTruncationIsAnErrorNotACrash) {
  GgufBuilder g;
  g.KvStr("general.architecture", "flux");
  g.KvArr<float>("arr", GgufBuilder::F32, {1, 2, 3});
  g.Tensor("a", 0, {8}, Floats(8));
  g.Tensor("b", 8, {32}, std::vector<uint8_t>(34, 1));
  auto image = g.Build();
  ASSERT_TRUE(ModelFile::Parse(image, "ok.gguf").ok());
  for (size_t n = 0; n < image.size(); ++n) {
    std::vector<uint8_t> cut(image.begin(), image.begin() + static_cast<long>(n));
    auto file = ModelFile::Parse(cut, "cut.gguf");
    // Cutting only alignment padding after the last tensor's data can still be valid.
    if (file.ok()) continue;
    EXPECT_THAT(std::string(file.status().message()), HasSubstr("cut.gguf")) << n;
  }
}

}  // namespace
}  // namespace fleet::formats
