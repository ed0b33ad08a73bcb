// Weights kept in their stored form (GGUF blocks, fp8 bytes) and expanded at each use: the
// values, the bytes they keep, their errors, and a block computing on them bit for bit as on
// the same weights expanded beforehand.
#include "fleet/models/stored_weights.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/equal.h>
#include <ATen/Context.h>
#include <ATen/ops/randn.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "fleet/formats/dequant.h"
#include "fleet/tensor/torch_view.h"

namespace fleet::models {
namespace {

// Q8_0 blocks (f16 scale, 32 int8 values) of `rows` x `cols` random values, with one block of
// zeros and one with an outlier scale.
at::Tensor Q8Blocks(int64_t rows, int64_t cols, uint32_t seed) {
  const int64_t blocks = rows * cols / 32;
  at::Tensor bytes = at::empty({blocks * 34}, at::kByte);
  auto* p = bytes.data_ptr<uint8_t>();
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> q(-127, 127);
  for (int64_t b = 0; b < blocks; ++b) {
    const float scale = b == 0 ? 0.0f : b == 1 ? 900.0f : 0.01f * static_cast<float>(1 + b % 7);
    uint16_t h = formats::Fp32ToFp16(scale);
    std::memcpy(p + b * 34, &h, 2);
    for (int i = 0; i < 32; ++i)
      p[b * 34 + 2 + i] = static_cast<uint8_t>(static_cast<int8_t>(q(rng)));
  }
  return bytes;
}

TEST(StoredWeights, GgufIsExpandedAtUseToGgmlsValuesInTheComputeDtype) {
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    auto model = CreateModel("linear", R"({"dim": 64, "depth": 1})", dtype);
    ASSERT_TRUE(model.ok()) << model.status();
    at::Tensor bytes = Q8Blocks(64, 64, 3);
    auto w = MakeStoredGguf("linear_blocks.0.weight", bytes, formats::GgmlType::kQ8_0, {64, 64});
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ(w->resident_bytes(), 64u * 64 / 32 * 34);  // stored, not widened
    EXPECT_EQ(w->expanded_bytes(dtype), 64u * 64 * c10::elementSize(dtype));
    WeightStore store{{"linear_blocks.0.weight", *w}};
    auto t = StoredWeights(**model, store).Get("linear_blocks.0.weight");
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->scalar_type(), dtype);
    EXPECT_EQ(t->sizes(), (std::vector<int64_t>{64, 64}));
    // ggml's values, rounded once with ggml's rounding.
    const auto out = dtype == at::kFloat  ? formats::OutType::kF32
                     : dtype == at::kHalf ? formats::OutType::kF16
                                          : formats::OutType::kBF16;
    at::Tensor want = at::empty({64, 64}, dtype);
    ASSERT_TRUE(formats::DequantizeReference(
                    formats::GgmlType::kQ8_0,
                    {bytes.data_ptr<uint8_t>(), static_cast<size_t>(bytes.numel())}, 64 * 64, out,
                    want.data_ptr())
                    .ok());
    EXPECT_TRUE(at::equal(*t, want));
  }
}

TEST(StoredWeights, Fp8IsExpandedExactly) {
  auto model = CreateModel("linear", R"({"dim": 2, "depth": 1})", at::kBFloat16);
  ASSERT_TRUE(model.ok());
  at::Tensor bytes = at::empty({2, 2}, at::kByte);
  const uint8_t e4m3[] = {0x38, 0x40, 0xb8, 0x7e};  // 1, 2, -1, 448
  std::memcpy(bytes.data_ptr(), e4m3, 4);
  auto w = MakeStoredF8("linear_blocks.0.weight", bytes, /*e5m2=*/false);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->resident_bytes(), 4u);
  WeightStore store{{"linear_blocks.0.weight", *w}};
  auto t = StoredWeights(**model, store).Get("linear_blocks.0.weight");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->scalar_type(), at::kBFloat16);
  at::Tensor f = t->to(at::kFloat);
  EXPECT_EQ(f.data_ptr<float>()[0], 1.0f);
  EXPECT_EQ(f.data_ptr<float>()[1], 2.0f);
  EXPECT_EQ(f.data_ptr<float>()[2], -1.0f);
  EXPECT_EQ(f.data_ptr<float>()[3], 448.0f);
}

TEST(StoredWeights, ABlockComputesBitIdenticallyOnStoredAndPreExpandedWeights) {
  auto model = CreateModel("linear", R"({"dim": 64, "depth": 2})", at::kBFloat16);
  ASSERT_TRUE(model.ok());
  const Model& m = **model;
  at::manual_seed(1);
  WeightStore store;
  TensorMap expanded;
  for (int i = 0; i < 2; ++i) {
    const std::string p = "linear_blocks." + std::to_string(i);
    auto w =
        MakeStoredGguf(p + ".weight", Q8Blocks(64, 64, 10 + i), formats::GgmlType::kQ8_0, {64, 64});
    ASSERT_TRUE(w.ok());
    store[p + ".weight"] = *w;
    auto bias = m.PrepareWeight(p + ".bias", at::randn({64}));
    ASSERT_TRUE(bias.ok());
    store[p + ".bias"] = StoredWeight::Resident(*bias);
    expanded[p + ".bias"] = *bias;
    auto e = StoredWeights::Expand(m, p + ".weight", store[p + ".weight"]);
    ASSERT_TRUE(e.ok());
    expanded[p + ".weight"] = *e;
  }
  TensorMap a{{"x", at::randn({8, 64}).to(at::kBFloat16)}};
  TensorMap b = a;
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(m.RunBlock(i, StoredWeights(m, store), a).ok());
    ASSERT_TRUE(m.RunBlock(i, ResidentWeights(expanded), b).ok());
  }
  EXPECT_TRUE(at::equal(a.at("x"), b.at("x")));
}

// ComfyUI's scaled fp8: the weight expands to (fp8 value in the compute dtype) x (scale in the
// compute dtype); scales of more than one value, or of a weight that is not fp8, are refused.
TEST(StoredWeights, ScaledFp8WeightsExpandTimesTheirScale) {
  auto model = CreateModel("linear", R"({"dim": 2, "depth": 1})", at::kFloat);
  ASSERT_TRUE(model.ok());
  at::Tensor bytes = at::empty({2, 2}, at::kByte);
  const uint8_t e4m3[] = {0x38, 0x40, 0xb8, 0x7e};  // 1, 2, -1, 448
  std::memcpy(bytes.data_ptr(), e4m3, 4);
  WeightStore store;
  store["linear_blocks.0.weight"] = *MakeStoredF8("linear_blocks.0.weight", bytes, false);
  at::Tensor scale = at::empty({1}, at::kFloat);
  scale.data_ptr<float>()[0] = 0.25f;
  store["linear_blocks.0.scale_weight"] = StoredWeight::Resident(scale);
  ASSERT_TRUE(AttachScales(store).ok());
  auto t = StoredWeights(**model, store).Get("linear_blocks.0.weight");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->data_ptr<float>()[0], 0.25f);
  EXPECT_EQ(t->data_ptr<float>()[1], 0.5f);
  EXPECT_EQ(t->data_ptr<float>()[2], -0.25f);
  EXPECT_EQ(t->data_ptr<float>()[3], 112.0f);
  EXPECT_TRUE(formats::IsQuantParameter("linear_blocks.0.scale_weight"));
  EXPECT_TRUE(formats::IsQuantParameter("x.scale_input"));
  EXPECT_TRUE(formats::IsQuantParameter("x.weight_scale"));
  EXPECT_TRUE(formats::IsQuantParameter("x.comfy_quant"));
  EXPECT_FALSE(formats::IsQuantParameter("linear_blocks.0.weight"));

  store["linear_blocks.0.scale_weight"] = StoredWeight::Resident(at::empty({2}, at::kFloat));
  Status wide = AttachScales(store);
  ASSERT_FALSE(wide.ok());
  EXPECT_NE(wide.message().find("linear_blocks.0.scale_weight' must be one floating value"),
            std::string::npos)
      << wide;
  WeightStore plain;
  plain["a.weight"] = StoredWeight::Resident(at::empty({2, 2}, at::kFloat));
  plain["a.scale_weight"] = StoredWeight::Resident(scale);
  Status not_fp8 = AttachScales(plain);
  ASSERT_FALSE(not_fp8.ok());
  EXPECT_NE(not_fp8.message().find("not fp8"), std::string::npos) << not_fp8;
}

StoredWeight Bytes(std::string_view text) {
  at::Tensor t = at::empty({static_cast<int64_t>(text.size())}, at::kByte);
  std::memcpy(t.data_ptr(), text.data(), text.size());
  return StoredWeight::Resident(t);
}

// ComfyUI's newer form: `comfy_quant` names the layer's format and `weight_scale` multiplies the
// weight in f32 before the one rounding to the compute dtype. With bf16 compute and a scale bf16
// cannot hold, 1.875 x s rounds to 1.8828125 this way and to 1.875 the older form's way.
TEST(StoredWeights, ComfyQuantFp8LayersExpandWithTheirScaleInF32) {
  auto model = CreateModel("linear", R"({"dim": 2, "depth": 1})", at::kBFloat16);
  ASSERT_TRUE(model.ok());
  at::Tensor bytes = at::empty({2, 2}, at::kByte);
  const uint8_t e4m3[] = {0x38, 0x3f, 0xb8, 0x7e};  // 1, 1.875, -1, 448
  std::memcpy(bytes.data_ptr(), e4m3, 4);
  WeightStore store;
  store["linear_blocks.0.weight"] = *MakeStoredF8("linear_blocks.0.weight", bytes, false);
  store["linear_blocks.0.comfy_quant"] = Bytes(R"({"format": "float8_e4m3fn"})");
  at::Tensor scale = at::empty({}, at::kFloat);
  const float s = 1.0f + 18.0f / 8192;  // not a bf16 value
  scale.data_ptr<float>()[0] = s;
  store["linear_blocks.0.weight_scale"] = StoredWeight::Resident(scale);
  ASSERT_TRUE(AttachScales(store).ok());
  auto t = StoredWeights(**model, store).Get("linear_blocks.0.weight");
  ASSERT_TRUE(t.ok()) << t.status();
  const float want[] = {1.0f * s, 1.875f * s, -1.0f * s, 448.0f * s};
  at::Tensor expect = at::empty({2, 2}, at::kFloat);
  std::memcpy(expect.data_ptr(), want, sizeof(want));
  EXPECT_TRUE(at::equal(*t, expect.to(at::kBFloat16)));
  EXPECT_EQ(static_cast<float>(t->data_ptr<at::BFloat16>()[1]), 1.8828125f);

  store["linear_blocks.0.comfy_quant"] = Bytes(R"({"format": "nvfp4"})");
  Status nvfp4 = AttachScales(store);
  EXPECT_EQ(nvfp4.code(), StatusCode::kUnimplemented);
  EXPECT_NE(nvfp4.message().find("layer 'linear_blocks.0' is in ComfyUI's quantised format "
                                 "'nvfp4'"),
            std::string::npos)
      << nvfp4;
  store["linear_blocks.0.comfy_quant"] = Bytes(R"({"format": "float8_e5m2"})");
  Status mismatch = AttachScales(store);
  EXPECT_NE(mismatch.message().find("says float8_e5m2, but 'linear_blocks.0.weight' is not"),
            std::string::npos)
      << mismatch;
  store["linear_blocks.0.comfy_quant"] = Bytes("{\"format\": ");
  Status broken = AttachScales(store);
  EXPECT_NE(broken.message().find("not a JSON object with a string 'format'"), std::string::npos)
      << broken;
  // Formats only in the header's _quantization_metadata: the fp8 weight says the format.
  store.erase("linear_blocks.0.comfy_quant");
  store["linear_blocks.0.weight"].scale = at::Tensor();
  ASSERT_TRUE(AttachScales(store).ok());
  auto again = StoredWeights(**model, store).Get("linear_blocks.0.weight");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(at::equal(*again, *t));
}

TEST(StoredWeights, WrongBytesAndTypesAreRefusedNamingTheWeight) {
  auto short_bytes =
      MakeStoredGguf("blocks.0.w", at::empty({33}, at::kByte), formats::GgmlType::kQ8_0, {32});
  ASSERT_FALSE(short_bytes.ok());
  EXPECT_NE(short_bytes.status().message().find("blocks.0.w"), std::string::npos);
  EXPECT_NE(short_bytes.status().message().find("needs 34"), std::string::npos)
      << short_bytes.status();
  auto partial =
      MakeStoredGguf("blocks.0.w", at::empty({34}, at::kByte), formats::GgmlType::kQ8_0, {31});
  ASSERT_FALSE(partial.ok());
  EXPECT_NE(partial.status().message().find("whole Q8_0 blocks"), std::string::npos)
      << partial.status();
  auto overflow = MakeStoredGguf("blocks.0.w", at::empty({34}, at::kByte), formats::GgmlType::kQ8_0,
                                 {int64_t{1} << 62, 32});
  ASSERT_FALSE(overflow.ok());
  EXPECT_NE(overflow.status().message().find("overflows"), std::string::npos) << overflow.status();
  auto q8_1 =
      MakeStoredGguf("blocks.0.w", at::empty({36}, at::kByte), formats::GgmlType::kQ8_1, {32});
  ASSERT_FALSE(q8_1.ok());
  EXPECT_EQ(q8_1.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(q8_1.status().message().find("Q8_1"), std::string::npos) << q8_1.status();
  auto model = CreateModel("linear", R"({"dim": 2, "depth": 1})", at::kFloat);
  ASSERT_TRUE(model.ok());
  WeightStore empty;
  auto missing = StoredWeights(**model, empty).Get("linear_blocks.0.weight");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("linear_blocks.0.weight"), std::string::npos);
}

}  // namespace
}  // namespace fleet::models

namespace fleet::models {
namespace {

// The libtorch-op expansion (what a CUDA worker runs on the GPU) gives formats::Dequantize's
// values bit for bit: random blocks with finite fp16 scales, every type it covers; fp8 by table.
TEST(DeviceExpansion, TorchOpsEqualTheCpuKernelsBitForBit) {
  std::mt19937 rng(7);
  for (auto type : {formats::GgmlType::kQ8_0, formats::GgmlType::kQ4_0, formats::GgmlType::kQ4_K,
                    formats::GgmlType::kQ6_K}) {
    ASSERT_TRUE(ExpandsWithTorchOps(type));
    const auto traits = *formats::GgmlTypeInfo(static_cast<uint32_t>(type));
    const int64_t blocks = 64, n = blocks * traits.block_size;
    at::Tensor bytes = at::empty({blocks * traits.type_size}, at::kByte);
    auto* p = bytes.data_ptr<uint8_t>();
    for (int64_t i = 0; i < bytes.numel(); ++i) p[i] = static_cast<uint8_t>(rng());
    // fp16 scale fields finite and of ordinary size (exponent bits 0b01xxx).
    std::vector<int64_t> halves;
    if (type == formats::GgmlType::kQ6_K) halves = {208};
    else if (type == formats::GgmlType::kQ4_K) halves = {0, 2};
    else halves = {0};
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t at_byte : halves) {
        p[b * traits.type_size + at_byte + 1] = static_cast<uint8_t>(0x30 | (rng() & 0x8f));
      }
    }
    std::vector<float> want(static_cast<size_t>(n));
    ASSERT_TRUE(formats::Dequantize(type,
                                    std::span<const uint8_t>(p, static_cast<size_t>(bytes.numel())),
                                    n, formats::OutType::kF32, want.data())
                    .ok());
    at::Tensor got = DequantizeWithTorchOps(type, bytes, {n});
    ASSERT_EQ(got.scalar_type(), at::kFloat);
    EXPECT_EQ(std::memcmp(got.data_ptr<float>(), want.data(), want.size() * 4), 0)
        << formats::GgmlTypeInfo(static_cast<uint32_t>(type))->name;
    if (at::hasCUDA()) {  // a CUDA libtorch: the same ops on the GPU
      at::Tensor gpu = DequantizeWithTorchOps(type, bytes.to(at::Device("cuda:0")), {n}).cpu();
      EXPECT_EQ(std::memcmp(gpu.data_ptr<float>(), want.data(), want.size() * 4), 0)
          << "on cuda:0: " << formats::GgmlTypeInfo(static_cast<uint32_t>(type))->name;
    }
  }
  EXPECT_FALSE(ExpandsWithTorchOps(formats::GgmlType::kIQ2_XXS));
  at::Tensor codes = at::empty({256}, at::kByte);
  for (int i = 0; i < 256; ++i) codes.data_ptr<uint8_t>()[i] = static_cast<uint8_t>(i);
  for (bool e5m2 : {false, true}) {
    auto table = UpcastF8WithTorchOps(codes, e5m2);
    auto host = tensor::UpcastF8(codes, e5m2 ? tensor::F8Format::kE5M2 : tensor::F8Format::kE4M3,
                                 at::kFloat);
    ASSERT_TRUE(table.ok() && host.ok());
    EXPECT_EQ(std::memcmp(table->data_ptr<float>(), host->data_ptr<float>(), 256 * 4), 0);
  }
}

}  // namespace
}  // namespace fleet::models
