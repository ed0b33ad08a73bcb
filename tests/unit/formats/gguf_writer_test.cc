// The GGUF writer read back by our own reader, and Q8_0 encoding checked against its definition
// and against our (ggml-exact) dequantiser.
#include "fleet/formats/gguf_writer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "fleet/formats/dequant.h"
#include "fleet/formats/model_file.h"

namespace fleet::formats {
namespace {

TEST(GgufWriter, WritesWhatTheReaderReadsBack) {
  GgufWriter w;
  w.SetMetadata("general.architecture", "flux");
  w.SetMetadata("fleet.axes_dim", "[16,56,56]");
  std::vector<float> values(2 * 64);
  for (size_t i = 0; i < values.size(); ++i) values[i] = std::sin(static_cast<float>(i)) * 3;
  auto q8 = EncodeQ8_0(values);
  ASSERT_TRUE(q8.ok()) << q8.status();
  ASSERT_TRUE(w.Add("w.weight", GgmlType::kQ8_0, {2, 64}, *q8).ok());
  std::vector<uint8_t> bias(3 * 4, 0);
  ASSERT_TRUE(w.Add("w.bias", GgmlType::kF32, {3}, bias).ok());
  // Wrong sizes and partial blocks are refused with the numbers.
  Status bad = w.Add("x", GgmlType::kQ8_0, {2, 64}, std::vector<uint8_t>(10));
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("expected 136"), std::string_view::npos) << bad;
  EXPECT_FALSE(w.Add("y", GgmlType::kQ8_0, {4, 16}, std::vector<uint8_t>(68)).ok());
  EXPECT_FALSE(w.Add("w.bias", GgmlType::kF32, {3}, bias).ok());  // duplicate

  const std::string path = ::testing::TempDir() + "/writer-" + std::to_string(getpid()) + ".gguf";
  ASSERT_TRUE(w.Write(path).ok());
  auto file = ModelFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->format(), FileFormat::kGguf);
  EXPECT_EQ((*file)->metadata().at("general.architecture"), "flux");
  EXPECT_EQ((*file)->metadata().at("fleet.axes_dim"), "[16,56,56]");
  const TensorInfo* t = (*file)->Find("w.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, "Q8_0");
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 64}));  // torch order back
  auto data = (*file)->Data(*t);
  ASSERT_EQ(data.size(), q8->size());
  EXPECT_EQ(std::memcmp(data.data(), q8->data(), q8->size()), 0);
  EXPECT_EQ((*file)->Find("w.bias")->shape, (std::vector<int64_t>{3}));
  std::filesystem::remove(path);
}

TEST(GgufWriter, Q8_0IsScaleAndRoundedIntegers) {
  std::vector<float> values(32);
  for (int i = 0; i < 32; ++i) values[i] = static_cast<float>(i - 16) * 0.5f;  // max |x| = 8
  auto q8 = EncodeQ8_0(values);
  ASSERT_TRUE(q8.ok());
  ASSERT_EQ(q8->size(), 34u);
  const float d = 8.0f / 127.0f;
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(static_cast<int8_t>((*q8)[2 + i]), static_cast<int8_t>(std::roundf(values[i] / d))) << i;
  }
  // Dequantised again, every value is within half a step of the original.
  std::vector<float> back(32);
  ASSERT_TRUE(Dequantize(GgmlType::kQ8_0, *q8, 32, OutType::kF32, back.data()).ok());
  for (int i = 0; i < 32; ++i) EXPECT_NEAR(back[i], values[i], d / 2 * 1.01f) << i;
  EXPECT_FALSE(EncodeQ8_0(std::vector<float>(31)).ok());
  auto zeros = EncodeQ8_0(std::vector<float>(32, 0.0f));  // scale 0, no division by zero
  ASSERT_TRUE(zeros.ok());
  for (uint8_t b : *zeros) EXPECT_EQ(b, 0);
}

}  // namespace
}  // namespace fleet::formats
