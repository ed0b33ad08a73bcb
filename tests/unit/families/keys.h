// The real checkpoints' key lists (tests/unit/formats/keys/*.tsv) as tensor tables, for the
// layout and family tests.
#pragma once

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "../formats/test_util.h"
#include "fleet/formats/model_file.h"

namespace fleet::families {

/// name \t [d0, d1, ...]  ->  BF16 tensors laid out back to back, names prefixed by `prefix`.
inline std::vector<formats::TensorInfo> LoadKeys(const std::string& file,
                                                 const std::string& prefix = "") {
  std::ifstream in(formats::testing::SourceDir() + "/tests/unit/formats/keys/" + file);
  EXPECT_TRUE(in.good()) << file;
  std::vector<formats::TensorInfo> out;
  std::string line;
  uint64_t offset = 0;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    formats::TensorInfo t;
    const auto tab = line.find('\t');
    t.name = prefix + line.substr(0, tab);
    t.dtype = "BF16";
    t.shape = nlohmann::json::parse(line.substr(tab + 1)).get<std::vector<int64_t>>();
    t.nbytes = static_cast<uint64_t>(t.numel()) * 2;
    t.offset = offset;
    offset += t.nbytes;
    out.push_back(std::move(t));
  }
  return out;
}

/// A toy `linear` model's tensors: `depth` blocks of weight [dim, dim] and bias [dim], F32.
inline std::vector<formats::TensorInfo> ToyKeys(int depth, int64_t dim) {
  std::vector<formats::TensorInfo> out;
  uint64_t offset = 0;
  for (int i = 0; i < depth; ++i) {
    for (auto [suffix, shape] : {std::pair{".weight", std::vector<int64_t>{dim, dim}},
                                 std::pair{".bias", std::vector<int64_t>{dim}}}) {
      formats::TensorInfo t;
      t.name = "linear_blocks." + std::to_string(i) + suffix;
      t.dtype = "F32";
      t.shape = shape;
      t.nbytes = static_cast<uint64_t>(t.numel()) * 4;
      t.offset = offset;
      offset += t.nbytes;
      out.push_back(std::move(t));
    }
  }
  return out;
}

}  // namespace fleet::families
