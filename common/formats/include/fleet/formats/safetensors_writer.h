// SafetensorsWriter: builds a .safetensors file for tests and tools.
//
// Tensors are laid out contiguously in the order they were added (the reference implementation
// rejects gaps), after a JSON header padded with spaces to a multiple of 8 bytes. Write() goes
// to a temporary file beside the target and renames it into place, so readers never see a
// half-written file. AddZeros() reserves a zero-filled tensor without holding its bytes: it is
// written as a hole, so a 23 GB model with the real layout costs almost no disk.
//
// Thread safety: not thread-safe; use one writer per thread.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "fleet/formats/dtype.h"
#include "fleet/status/status.h"

namespace fleet::formats {

class SafetensorsWriter {
 public:
  /// Adds a tensor with its bytes (row-major). InvalidArgument on an empty or duplicate name or a
  /// byte count that does not match shape x element size.
  Status Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
             std::span<const uint8_t> bytes);
  /// Adds a tensor whose bytes are all zero, written as a file hole.
  Status AddZeros(const std::string& name, DType dtype, std::vector<int64_t> shape);
  /// Sets a `__metadata__` entry.
  void SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// Writes the file atomically (temp file + rename).
  Status Write(const std::string& path) const;
  /// The complete file image in memory (for tests and fuzz seeds).
  std::vector<uint8_t> Serialize() const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    uint64_t nbytes;
    std::vector<uint8_t> bytes;  // empty for AddZeros
    bool zeros;
  };
  Status Check(const std::string& name, std::span<const int64_t> shape, DType dtype,
               uint64_t* nbytes) const;
  std::string Header() const;

  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace fleet::formats
