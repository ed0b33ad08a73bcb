// The safetensors reader and writer: round trips through real files, a file written by torch
// in Python, sparse real-size files, and every class of bad input.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "fleet/formats/dtype.h"
#include "fleet/formats/model_file.h"
#include "fleet/formats/safetensors_writer.h"
#include "test_util.h"

namespace fleet::formats {
namespace {

using ::testing::HasSubstr;
using testing::ScratchDir;

std::vector<uint8_t> Iota(size_t n, uint8_t start = 0) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(start + i);
  return v;
}

TEST(DTypeTest, NamesAndSizesRoundTrip) {
  int count = 0;
  for (std::string_view name : {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16",
                                "BF16", "I32", "U32", "F32", "F64", "I64", "U64"}) {
    auto dt = ParseDType(name);
    ASSERT_TRUE(dt.has_value()) << name;
    EXPECT_EQ(DTypeName(*dt), name);
    ++count;
  }
  EXPECT_EQ(count, kDTypeCount);
  EXPECT_EQ(DTypeSize(*ParseDType("F8_E4M3")), 1);
  EXPECT_EQ(DTypeSize(*ParseDType("BF16")), 2);
  EXPECT_EQ(DTypeSize(*ParseDType("F64")), 8);
  EXPECT_FALSE(ParseDType("bf16").has_value());
  EXPECT_FALSE(ParseDType("F4").has_value());
}

TEST(GgmlTypeTest, KnownIdsAndGaps) {
  EXPECT_EQ(GgmlTypeInfo(12)->name, "Q4_K");
  EXPECT_EQ(GgmlTypeInfo(12)->type_size, 144);
  EXPECT_EQ(GgmlTypeByName("Q8_0")->block_size, 32);
  EXPECT_FALSE(GgmlTypeInfo(4).has_value());   // removed Q4_2
  EXPECT_FALSE(GgmlTypeInfo(31).has_value());  // removed Q4_0_4_4
  EXPECT_FALSE(GgmlTypeInfo(1000).has_value());
}

TEST(SafetensorsTest, WriterRoundTripThroughFile) {
  ScratchDir dir;
  SafetensorsWriter w;
  auto a = Iota(8 * 4 * 2);
  auto b = Iota(3 * 4, 100);
  auto c = Iota(5, 7);
  ASSERT_TRUE(w.Add("img_in.weight", DType::kBF16, {8, 4}, a).ok());
  ASSERT_TRUE(w.Add("fp8", DType::kF8E4M3, {3, 4}, b).ok());
  ASSERT_TRUE(w.Add("e5m2", DType::kF8E5M2, {5}, c).ok());
  ASSERT_TRUE(w.Add("scalar", DType::kF32, {}, Iota(4)).ok());
  ASSERT_TRUE(w.Add("empty", DType::kF16, {0, 3}, {}).ok());
  w.SetMetadata("format", "pt");
  w.SetMetadata("fleet.axes_dim", "[16,56,56]");
  const std::string path = dir.File("m.safetensors");
  ASSERT_TRUE(w.Write(path).ok());

  auto file = ModelFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const ModelFile& f = **file;
  EXPECT_EQ(f.format(), FileFormat::kSafetensors);
  EXPECT_EQ(f.path(), path);
  ASSERT_EQ(f.tensors().size(), 5u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("fleet.axes_dim"), "[16,56,56]");

  const TensorInfo* t = f.Find("img_in.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, "BF16");
  EXPECT_EQ(t->shape, (std::vector<int64_t>{8, 4}));
  EXPECT_EQ(t->nbytes, 64u);
  EXPECT_EQ(t->offset % 8, 0u);  // the header is padded to 8
  auto data = f.Data(*t);
  EXPECT_EQ(std::vector<uint8_t>(data.begin(), data.end()), a);
  auto fp8 = f.Data(*f.Find("fp8"));
  EXPECT_EQ(std::vector<uint8_t>(fp8.begin(), fp8.end()), b);
  EXPECT_EQ(f.Find("fp8")->dtype, "F8_E4M3");
  EXPECT_EQ(f.Find("e5m2")->dtype, "F8_E5M2");
  EXPECT_TRUE(f.Find("scalar")->shape.empty());
  EXPECT_EQ(f.Find("scalar")->numel(), 1);
  EXPECT_EQ(f.Find("empty")->nbytes, 0u);
  EXPECT_EQ(f.Find("missing"), nullptr);
  EXPECT_EQ(f.total_tensor_bytes(), 64u + 12 + 5 + 4);
  // The mapping outlives the ModelFile for whoever holds it.
  auto mapping = f.mapping();
  const uint8_t* p = data.data();
  file = Status(InternalError("dropped"));
  EXPECT_EQ(std::memcmp(p, a.data(), a.size()), 0);
  EXPECT_GT(mapping.use_count(), 0);
}

TEST(SafetensorsTest, SerializeMatchesWrite) {
  ScratchDir dir;
  SafetensorsWriter w;
  ASSERT_TRUE(w.Add("x", DType::kI32, {2}, Iota(8)).ok());
  ASSERT_TRUE(w.AddZeros("z", DType::kF32, {3}).ok());
  ASSERT_TRUE(w.Write(dir.File("a.safetensors")).ok());
  std::string on_disk = testing::ReadText(dir.File("a.safetensors"));
  auto image = w.Serialize();
  EXPECT_EQ(on_disk, std::string(image.begin(), image.end()));
}

TEST(SafetensorsTest, WriterRejectsBadInput) {
  SafetensorsWriter w;
  EXPECT_EQ(w.Add("a", DType::kF32, {2}, Iota(7)).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(w.Add("a", DType::kF32, {2}, Iota(8)).ok());
  EXPECT_THAT(std::string(w.Add("a", DType::kF32, {2}, Iota(8)).message()),
              HasSubstr("duplicate"));
  EXPECT_FALSE(w.Add("__metadata__", DType::kU8, {1}, Iota(1)).ok());
  EXPECT_FALSE(w.Add("", DType::kU8, {1}, Iota(1)).ok());
  EXPECT_FALSE(w.AddZeros("neg", DType::kU8, {-1}).ok());
  EXPECT_FALSE(w.AddZeros("huge", DType::kF64, {1ll << 40, 1ll << 30}).ok());
  EXPECT_FALSE(w.Write("/nonexistent-dir/x.safetensors").ok());
}

TEST(SafetensorsTest, ReadsFileWrittenByTorch) {
  ScratchDir dir;
  const std::string path = dir.File("torch.safetensors");
  const std::string sidecar = dir.File("torch.json");
  const std::string cmd = "/usr/bin/python3 " + testing::SourceDir() +
                          "/tests/unit/formats/make_safetensors.py " + path + " " + sidecar;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto file = ModelFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto expected = nlohmann::json::parse(testing::ReadText(sidecar));
  ASSERT_EQ((*file)->tensors().size(), expected.size());
  for (auto& [name, e] : expected.items()) {
    const TensorInfo* t = (*file)->Find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->dtype, e["dtype"].get<std::string>()) << name;
    EXPECT_EQ(t->shape, e["shape"].get<std::vector<int64_t>>()) << name;
    auto data = (*file)->Data(*t);
    std::string hex;
    for (uint8_t byte : data) {
      char buf[3];
      std::snprintf(buf, sizeof(buf), "%02x", byte);
      hex += buf;
    }
    EXPECT_EQ(hex, e["hex"].get<std::string>()) << name;
  }
  EXPECT_EQ((*file)->metadata().at("fleet.note"), "written by torch");
}

TEST(SafetensorsTest, SparseRealSizeFile) {
  // 6 GiB of zero tensors written as holes: mapping and validation must not touch the data.
  ScratchDir dir;
  SafetensorsWriter w;
  ASSERT_TRUE(w.Add("first", DType::kF32, {4}, Iota(16)).ok());
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(w.AddZeros("blocks." + std::to_string(i) + ".w", DType::kBF16, {16384, 32768}).ok());
  }
  const std::string path = dir.File("big.safetensors");
  ASSERT_TRUE(w.Write(path).ok());
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_GT(static_cast<uint64_t>(st.st_size), 6ull << 30);
  EXPECT_LT(static_cast<uint64_t>(st.st_blocks) * 512, 1ull << 20);  // a hole, not data
  auto file = ModelFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors().size(), 7u);
  auto last = (*file)->Data(*(*file)->Find("blocks.5.w"));
  EXPECT_EQ(last.size(), 1ull << 30);
  EXPECT_EQ(last[last.size() - 1], 0);
}

// ---- bad input: every error names the file, the field and the byte offset -----------------

std::vector<uint8_t> Image(const std::string& header, size_t data_bytes) {
  std::vector<uint8_t> out(8 + header.size() + data_bytes, 0xab);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<uint8_t>(n >> (8 * i));
  std::copy(header.begin(), header.end(), out.begin() + 8);
  return out;
}

Status ParseHeader(const std::string& header, size_t data_bytes) {
  auto image = Image(header, data_bytes);
  return ModelFile::Parse(image, "bad.safetensors").status();
}

struct BadCase {
  std::string label;
  std::string header;
  size_t data;
  std::vector<std::string> expect;  // substrings of the message
};

class SafetensorsBadInputTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(SafetensorsBadInputTest, ClearError) {
  const BadCase& c = GetParam();
  Status s = ParseHeader(c.header, c.data);
  ASSERT_FALSE(s.ok()) << c.label;
  std::string msg(s.message());
  EXPECT_THAT(msg, HasSubstr("bad.safetensors")) << msg;
  for (const auto& e : c.expect) EXPECT_THAT(msg, HasSubstr(e)) << c.label << ": " << msg;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, SafetensorsBadInputTest,
    ::testing::Values(
        BadCase{"not_json", "{nope}", 0, {"bad JSON", "at byte 9"}},
        BadCase{"trailing_garbage", R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}x)",
                1, {"at byte 61", "after the JSON"}},
        BadCase{"not_object", "[1,2]", 0, {"must start with '{'"}},
        BadCase{"unknown_dtype", R"({"w":{"dtype":"F4","shape":[2],"data_offsets":[0,2]}})", 2,
                {"tensor 'w'", "field 'dtype'", "at byte 22", "unknown dtype 'F4'"}},
        BadCase{"lowercase_dtype", R"({"w":{"dtype":"bf16","shape":[1],"data_offsets":[0,2]}})",
                2, {"unknown dtype 'bf16'"}},
        BadCase{"end_past_data", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                8, {"field 'data_offsets'", "end 16 is past the data section (8 bytes)"}},
        BadCase{"size_mismatch", R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8,
                {"holds 8 bytes", "needs 12"}},
        BadCase{"begin_after_end", R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}})", 8,
                {"begin 4 is after end 2"}},
        BadCase{"overlap",
                R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
                8, {"overlaps tensor 'a'", "tensor 'b'"}},
        BadCase{"negative_dim", R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})", 0,
                {"field 'shape'", "non-negative integer"}},
        BadCase{"float_dim", R"({"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,0]}})", 0,
                {"field 'shape'"}},
        BadCase{"dim_overflow",
                R"({"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}})",
                0, {"overflows 64 bits"}},
        // Fuzzer finding: an empty tensor whose other dims overflow int64 when multiplied.
        BadCase{"zero_dim_overflow",
                R"({"w":{"dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}})",
                0, {"element count overflows 64 bits"}},
        BadCase{"offset_overflow",
                R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,99999999999999999999]}})", 0,
                {"end must be a non-negative integer"}},
        BadCase{"missing_field", R"({"w":{"dtype":"U8","shape":[1]}})", 1,
                {"field 'data_offsets'", "missing"}},
        BadCase{"unknown_field",
                R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1}})", 1,
                {"field 'extra'", "unknown field"}},
        BadCase{"entry_not_object", R"({"w":3})", 0, {"tensor 'w'", "must be an object"}},
        BadCase{"metadata_not_string", R"({"__metadata__":{"k":1}})", 0,
                {"__metadata__.k", "must be strings"}},
        BadCase{"duplicate_key",
                R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"w":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})",
                0, {"duplicate key"}},
        BadCase{"offsets_shape", R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", 1,
                {"[begin, end]"}},
        BadCase{"deep_nesting", "{\"__metadata__\":" + std::string(200, '[') + "}", 0,
                {"nested too deeply"}},
        BadCase{"bad_utf8", "{\"\xff\":1}", 0, {"invalid UTF-8"}},
        BadCase{"unterminated", R"({"w":{"dtype":"U8")", 0, {"unterminated"}}),
    [](const auto& info) { return info.param.label; });

TEST(SafetensorsTest, TruncatedAndTinyFiles) {
  std::vector<uint8_t> tiny = {1, 2, 3};
  auto s = ModelFile::Parse(tiny, "tiny.safetensors").status();
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("too short for the 8-byte header length"));

  auto image = Image(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", 4);
  image.resize(image.size() - 10);  // header cut short
  s = ModelFile::Parse(image, "cut.safetensors").status();
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("runs past the end of the file"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("at byte 0"));

  std::vector<uint8_t> huge(16, 0);
  huge[7] = 0x7f;  // header length ~2^62
  s = ModelFile::Parse(huge, "huge.safetensors").status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("runs past the end"));

  ScratchDir dir;
  testing::WriteFile(dir.File("empty"), {});
  s = ModelFile::Open(dir.File("empty")).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("too short"));
  s = ModelFile::Open(dir.File("nope")).status();
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  s = ModelFile::Open(testing::SourceDir()).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("not a regular file"));
}

TEST(SafetensorsTest, HeaderLengthLimit) {
  std::string header = "{\"__metadata__\":{\"pad\":\"" + std::string((100u << 20), 'x') + "\"}}";
  Status s = ParseHeader(header, 0);
  EXPECT_THAT(std::string(s.message()), HasSubstr("exceeds the 100 MiB limit"));
}

TEST(SafetensorsTest, EscapesAndUnicodeNames) {
  std::string header =
      R"({"a\u00e9\ud83d\ude00\n":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  auto image = Image(header, 1);
  auto file = ModelFile::Parse(image, "u.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_NE((*file)->Find("a\xc3\xa9\xf0\x9f\x98\x80\n"), nullptr);
}

}  // namespace
}  // namespace fleet::formats
