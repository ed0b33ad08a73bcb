// libtorch views and loads over real files written by our writer: zero copy, lifetime, exact
// fp8 upcasts, alignment fallback and dtype mapping.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/isnan.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>

#include "fleet/formats/safetensors_writer.h"
#include "fleet/tensor/torch_view.h"
#include "../formats/gguf_builder.h"
#include <fstream>

namespace fleet::tensor {
namespace {

using formats::DType;
using formats::ModelFile;
using ::testing::HasSubstr;

class TorchViewTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (std::filesystem::temp_directory_path() / "fleet-tensor-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

template <typename T>
std::span<const uint8_t> Bytes(const std::vector<T>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(T)};
}

// e4m3fn decoded from its definition, independently of the library's table.
double E4M3(uint8_t b) {
  int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return NAN;
  double v = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -v : v;
}
double E5M2(uint8_t b) {
  int s = b >> 7, e = (b >> 2) & 31, m = b & 3;
  double v;
  if (e == 31) v = m == 0 ? INFINITY : NAN;
  else v = e == 0 ? std::ldexp(m / 4.0, -14) : std::ldexp(1.0 + m / 4.0, e - 15);
  return s ? -v : v;
}

TEST_F(TorchViewTest, ZeroCopyViewOutlivesModelFile) {
  std::vector<float> values = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, 8.5f};
  formats::SafetensorsWriter w;
  ASSERT_TRUE(w.Add("w", DType::kF32, {2, 3}, Bytes(values)).ok());
  std::vector<int64_t> ints = {1, -2, 1ll << 40};
  ASSERT_TRUE(w.Add("i", DType::kI64, {3}, Bytes(ints)).ok());
  ASSERT_TRUE(w.Write(dir_ + "/m.safetensors").ok());
  auto file = ModelFile::Open(dir_ + "/m.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const auto* info = (*file)->Find("w");
  auto view = View(**file, *info);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->data_ptr(), (*file)->Data(*info).data());  // no copy
  EXPECT_EQ(view->sizes(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(view->scalar_type(), at::kFloat);
  auto iv = View(**file, *(*file)->Find("i"));
  ASSERT_TRUE(iv.ok());
  EXPECT_EQ(iv->data_ptr<int64_t>()[2], 1ll << 40);
  file.value().reset();  // drop the ModelFile: the view keeps the mapping
  for (size_t k = 0; k < values.size(); ++k) EXPECT_EQ(view->data_ptr<float>()[k], values[k]);
}

TEST_F(TorchViewTest, LoadCastsAndCopies) {
  std::vector<uint16_t> bf16 = {0x3f80, 0xc000, 0x4049};  // 1, -2, 3.140625
  formats::SafetensorsWriter w;
  ASSERT_TRUE(w.Add("b", DType::kBF16, {3}, Bytes(bf16)).ok());
  ASSERT_TRUE(w.Write(dir_ + "/b.safetensors").ok());
  auto file = ModelFile::Open(dir_ + "/b.safetensors");
  ASSERT_TRUE(file.ok());
  auto t = Load(**file, *(*file)->Find("b"), at::kFloat);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->data_ptr<float>()[0], 1.0f);
  EXPECT_EQ(t->data_ptr<float>()[1], -2.0f);
  EXPECT_EQ(t->data_ptr<float>()[2], 3.140625f);
  auto same = Load(**file, *(*file)->Find("b"), at::kBFloat16);
  ASSERT_TRUE(same.ok());
  EXPECT_NE(same->data_ptr(), (*file)->Data(*(*file)->Find("b")).data());  // a private copy
  same->mul_(2);                                                            // and writable
}

TEST_F(TorchViewTest, UnalignedDataNeedsLoad) {
  std::vector<uint8_t> one = {9};
  std::vector<float> f = {1.0f, 2.0f};
  formats::SafetensorsWriter w;
  ASSERT_TRUE(w.Add("a_byte", DType::kU8, {1}, one).ok());
  ASSERT_TRUE(w.Add("b_f32", DType::kF32, {2}, Bytes(f)).ok());
  ASSERT_TRUE(w.Write(dir_ + "/u.safetensors").ok());
  auto file = ModelFile::Open(dir_ + "/u.safetensors");
  ASSERT_TRUE(file.ok());
  const auto* info = (*file)->Find("b_f32");
  auto view = View(**file, *info);
  ASSERT_FALSE(view.ok());
  EXPECT_THAT(std::string(view.status().message()), HasSubstr("not aligned"));
  auto t = Load(**file, *info, at::kFloat);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->data_ptr<float>()[1], 2.0f);
}

TEST_F(TorchViewTest, Fp8UpcastIsExactForEveryByte) {
  std::vector<uint8_t> all(256);
  for (int i = 0; i < 256; ++i) all[static_cast<size_t>(i)] = static_cast<uint8_t>(i);
  formats::SafetensorsWriter w;
  ASSERT_TRUE(w.Add("e4m3", DType::kF8E4M3, {16, 16}, all).ok());
  ASSERT_TRUE(w.Add("e5m2", DType::kF8E5M2, {256}, all).ok());
  ASSERT_TRUE(w.Write(dir_ + "/f8.safetensors").ok());
  auto file = ModelFile::Open(dir_ + "/f8.safetensors");
  ASSERT_TRUE(file.ok());
  for (const char* name : {"e4m3", "e5m2"}) {
    const auto* info = (*file)->Find(name);
    auto bytes = View(**file, *info);
    ASSERT_TRUE(bytes.ok());
    EXPECT_EQ(bytes->scalar_type(), at::kByte);
    for (auto st : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
      auto t = Load(**file, *info, st);
      ASSERT_TRUE(t.ok()) << t.status();
      EXPECT_EQ(t->scalar_type(), st);
      at::Tensor d = t->to(at::kDouble).reshape({256});
      for (int i = 0; i < 256; ++i) {
        double want = std::string(name) == "e4m3" ? E4M3(static_cast<uint8_t>(i))
                                                  : E5M2(static_cast<uint8_t>(i));
        double got = d.data_ptr<double>()[i];
        if (std::isnan(want)) {
          EXPECT_TRUE(std::isnan(got)) << name << " byte " << i;
        } else {
          EXPECT_EQ(got, want) << name << " byte " << i << " as " << at::toString(st);
        }
      }
    }
  }
  EXPECT_EQ(E4M3(0x7e), 448.0);
  EXPECT_EQ(E5M2(0x7b), 57344.0);
}

TEST_F(TorchViewTest, GgufQuantisedLoadAndPlainView) {
  formats::testing::GgufBuilder g;
  g.KvStr("general.architecture", "test");
  std::vector<uint8_t> q8 = {0x00, 0x3c};  // d = 1.0 (f16)
  for (int i = 0; i < 32; ++i) q8.push_back(static_cast<uint8_t>(static_cast<int8_t>(i - 3)));
  g.Tensor("q", 8, {32, 1}, q8);
  std::vector<uint8_t> h;
  for (int i = 0; i < 4; ++i) {  // f16 1, 2, 3, 4
    uint16_t v[] = {0x3c00, 0x4000, 0x4200, 0x4400};
    h.push_back(static_cast<uint8_t>(v[i]));
    h.push_back(static_cast<uint8_t>(v[i] >> 8));
  }
  g.Tensor("h", 1, {2, 2}, h);
  auto image = g.Build();
  {
    std::ofstream f(dir_ + "/m.gguf", std::ios::binary);
    f.write(reinterpret_cast<const char*>(image.data()), static_cast<std::streamsize>(image.size()));
  }
  auto file = ModelFile::Open(dir_ + "/m.gguf");
  ASSERT_TRUE(file.ok()) << file.status();
  const auto* q = (*file)->Find("q");
  auto view = View(**file, *q);
  ASSERT_FALSE(view.ok());
  EXPECT_THAT(std::string(view.status().message()), HasSubstr("block-quantised"));
  for (auto st : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    auto t = Load(**file, *q, st);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->scalar_type(), st);
    EXPECT_EQ(t->sizes(), (std::vector<int64_t>{1, 32}));
    at::Tensor d = t->to(at::kDouble);
    for (int i = 0; i < 32; ++i) EXPECT_EQ(d.data_ptr<double>()[i], i - 3);
  }
  auto hv = View(**file, *(*file)->Find("h"));
  ASSERT_TRUE(hv.ok()) << hv.status();
  EXPECT_EQ(hv->scalar_type(), at::kHalf);
  EXPECT_EQ(hv->data_ptr(), (*file)->Data(*(*file)->Find("h")).data());
  EXPECT_EQ(hv->to(at::kFloat).data_ptr<float>()[3], 4.0f);
}

TEST(DTypeMappingTest, RoundTripAndGaps) {
  for (DType dt : {DType::kBool, DType::kU8, DType::kI8, DType::kI16, DType::kF16, DType::kBF16,
                   DType::kI32, DType::kF32, DType::kF64, DType::kI64}) {
    auto st = ToScalarType(dt);
    ASSERT_TRUE(st.ok());
    EXPECT_EQ(FromScalarType(*st), dt);
  }
  EXPECT_EQ(*ToScalarType(DType::kF8E4M3), at::kByte);
  EXPECT_EQ(ToScalarType(DType::kU32).status().code(), StatusCode::kUnimplemented);
  EXPECT_FALSE(FromScalarType(at::kComplexFloat).has_value());
  auto bad = UpcastF8(at::Tensor(), F8Format::kE4M3, at::kFloat);
  EXPECT_FALSE(bad.ok());
}

}  // namespace
}  // namespace fleet::tensor

namespace fleet::tensor {
namespace {

// ComfyUI's weight_dtype casts with PyTorch's rounding: every fp8 value comes back as itself,
// values between two codes go to the nearer (ties to the even code), past the top NaN (e4m3fn)
// or infinity (e5m2).
TEST(Fp8DowncastTest, RoundsToNearestEvenAsPyTorchDoes) {
  for (F8Format format : {F8Format::kE4M3, F8Format::kE5M2}) {
    at::Tensor codes = at::empty({256}, at::kByte);
    for (int i = 0; i < 256; ++i) codes.data_ptr<uint8_t>()[i] = static_cast<uint8_t>(i);
    auto values = UpcastF8(codes, format, at::kFloat);
    ASSERT_TRUE(values.ok());
    auto back = DowncastF8(*values, format);
    ASSERT_TRUE(back.ok()) << back.status();
    for (int i = 0; i < 256; ++i) {
      const float v = values->data_ptr<float>()[i];
      if (std::isnan(v)) {
        EXPECT_EQ(back->data_ptr<uint8_t>()[i] & 0x7f, 0x7f) << i;
      } else {
        EXPECT_EQ(back->data_ptr<uint8_t>()[i], i) << "code " << i << " value " << v;
      }
    }
  }
  auto one = [](float x, F8Format f) {
    at::Tensor t = at::empty({1}, at::kFloat);
    t.data_ptr<float>()[0] = x;
    return DowncastF8(t, f)->data_ptr<uint8_t>()[0];
  };
  // e4m3fn: 1.0 is 0x38, the next value 1.125 is 0x39; 1.0625 is the tie -> even 0x38;
  // 1.1875 is the tie between 0x39 and 0x3a -> 0x3a.
  EXPECT_EQ(one(1.0625f, F8Format::kE4M3), 0x38);
  EXPECT_EQ(one(1.07f, F8Format::kE4M3), 0x39);
  EXPECT_EQ(one(1.1875f, F8Format::kE4M3), 0x3a);
  EXPECT_EQ(one(-1.0f, F8Format::kE4M3), 0xb8);
  EXPECT_EQ(one(460.0f, F8Format::kE4M3), 0x7e);  // 448
  EXPECT_EQ(one(464.0f, F8Format::kE4M3), 0x7e);  // the tie, to even 448
  EXPECT_EQ(one(470.0f, F8Format::kE4M3), 0x7f);  // NaN: no infinity
  EXPECT_EQ(one(-1e9f, F8Format::kE4M3), 0xff);
  EXPECT_EQ(one(1e-5f, F8Format::kE4M3), 0x00);  // below half the smallest subnormal (2^-9)
  EXPECT_EQ(one(0.0015f, F8Format::kE4M3), 0x01);
  EXPECT_EQ(one(60000.0f, F8Format::kE5M2), 0x7b);  // 57344
  EXPECT_EQ(one(61440.0f, F8Format::kE5M2), 0x7c);  // the tie rounds to even: infinity
  EXPECT_EQ(one(std::numeric_limits<float>::infinity(), F8Format::kE5M2), 0x7c);
  EXPECT_EQ(one(std::nanf(""), F8Format::kE5M2) & 0x7f, 0x7f);
  EXPECT_FALSE(DowncastF8(at::empty({2}, at::kLong), F8Format::kE4M3).ok());
}

}  // namespace
}  // namespace fleet::tensor
