// A GGUF v3 writer: string metadata and tensors of plain or block-quantised ggml types, as the
// GGUF Flux checkpoints ComfyUI users run (city96's: 2-D weights quantised, the rest F32/F16).
// `fleet quantize` converts a safetensors model with it; the tests read the result back.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "fleet/formats/dtype.h"
#include "fleet/status/status.h"

namespace fleet::formats {

/// Q8_0 blocks of `values` (ggml's quantize_row_q8_0_ref: per 32 values an fp16 scale
/// max|x| / 127 and int8 round(x / scale)). InvalidArgument unless values.size() % 32 == 0.
StatusOr<std::vector<uint8_t>> EncodeQ8_0(std::span<const float> values);

/// The values of F32, F16 or BF16 bytes as floats (exact); InvalidArgument for other dtypes.
StatusOr<std::vector<float>> ToFloat32(DType dtype, std::span<const uint8_t> bytes);

class GgufWriter {
 public:
  /// Adds a tensor; `shape` in torch order (the file stores it reversed, as ggml's ne[]).
  /// `bytes` must be exactly the type's size for that shape (InvalidArgument otherwise).
  Status Add(const std::string& name, GgmlType type, std::vector<int64_t> shape,
             std::vector<uint8_t> bytes);
  /// A string key-value pair ("general.architecture" = "flux").
  void SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// Writes the file atomically (temp file + rename).
  Status Write(const std::string& path) const;
  std::vector<uint8_t> Serialize() const;

 private:
  struct Entry {
    std::string name;
    GgmlType type;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace fleet::formats
