// ModelFile: a read-only, memory-mapped model file (safetensors or GGUF) and its tensor table.
//
// Open() maps the whole file (PROT_READ, MAP_SHARED: pages come from the page cache, nothing is
// copied) and validates its header strictly; after that, every TensorInfo's [offset, offset +
// nbytes) range is inside the file, ranges do not overlap, and nbytes matches the element count
// and type. Data() hands out spans over the mapping; they stay valid while the ModelFile or any
// holder of mapping() lives. The mapping is read-only: writing through it is a SIGSEGV.
//
// Formats and rules: docs/formats.md. Errors name the file, the field and the byte offset.
//
// Thread safety: a ModelFile is immutable after Open(); all const methods may be called
// concurrently.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "fleet/status/status.h"

namespace fleet::formats {

enum class FileFormat { kSafetensors, kGguf };

/// "safetensors" or "gguf".
std::string_view FileFormatName(FileFormat format);

/// One tensor of a model file.
struct TensorInfo {
  std::string name;            // full name in the file, e.g. "model.diffusion_model.img_in.weight"
  std::string dtype;           // safetensors DType name ("BF16", "F8_E4M3") or GGUF type ("Q4_K")
  std::vector<int64_t> shape;  // row-major, torch order (GGUF's ne[] reversed)
  uint64_t offset = 0;         // absolute byte offset in the file
  uint64_t nbytes = 0;         // bytes on disk (quantised size for GGUF block types)

  /// Product of shape (1 for a 0-d tensor).
  int64_t numel() const;
};

/// A read-only memory mapping of a whole file; shared so that views can outlive the ModelFile.
class MappedFile {
 public:
  /// Maps `path` read-only. An empty file gives an empty mapping.
  static StatusOr<std::shared_ptr<const MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  std::span<const uint8_t> bytes() const { return {data_, static_cast<size_t>(size_)}; }

 private:
  MappedFile(const uint8_t* data, uint64_t size) : data_(data), size_(size) {}
  const uint8_t* data_;
  uint64_t size_;
};

class ModelFile {
 public:
  /// Opens `path`, detecting the format from its content ("GGUF" magic, else safetensors).
  /// \return the file, or an error naming the path, the field and the byte offset.
  static StatusOr<std::unique_ptr<ModelFile>> Open(const std::string& path);

  /// Parses an in-memory image (used by fuzzers and tests); `name` is used in messages.
  /// The bytes must outlive the result.
  static StatusOr<std::unique_ptr<ModelFile>> Parse(std::span<const uint8_t> bytes,
                                                    const std::string& name);

  /// Builds a data-less ModelFile from a tensor table (layout tests over real key lists).
  /// Data() of such a file returns empty spans.
  static std::unique_ptr<ModelFile> FromTensorInfos(std::vector<TensorInfo> tensors,
                                                    std::map<std::string, std::string> metadata,
                                                    FileFormat format, const std::string& name);

  FileFormat format() const { return format_; }
  const std::string& path() const { return path_; }
  uint64_t file_size() const { return bytes_.size(); }
  /// Tensors in file order (safetensors: by data offset; GGUF: as listed in the header).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  /// \return the tensor named `name`, or nullptr.
  const TensorInfo* Find(const std::string& name) const;
  /// \return the tensor's bytes inside the mapping (empty for a data-less file).
  std::span<const uint8_t> Data(const TensorInfo& info) const;
  /// safetensors: `__metadata__`; GGUF: every key-value pair, values rendered as text (strings
  /// as-is, numbers in decimal, bools as true/false, arrays as JSON).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// GGUF only: the format version (2 or 3); 0 for safetensors.
  uint32_t version() const { return version_; }
  /// GGUF only: the tensor data alignment (general.alignment, default 32); 0 for safetensors.
  uint64_t alignment() const { return alignment_; }
  /// The mapping (null for Parse()d and data-less files). Hold it to keep Data() valid.
  std::shared_ptr<const MappedFile> mapping() const { return mapping_; }

  /// Sum of nbytes over all tensors.
  uint64_t total_tensor_bytes() const;

  // The parsers fill these (src/safetensors.cc, src/gguf.cc).
  struct Contents {
    FileFormat format = FileFormat::kSafetensors;
    std::vector<TensorInfo> tensors;
    std::map<std::string, std::string> metadata;
    uint32_t version = 0;
    uint64_t alignment = 0;
  };
  ModelFile(std::string path, std::shared_ptr<const MappedFile> mapping,
            std::span<const uint8_t> bytes, Contents contents);

 private:
  std::string path_;
  std::shared_ptr<const MappedFile> mapping_;
  std::span<const uint8_t> bytes_;
  FileFormat format_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  uint32_t version_;
  uint64_t alignment_;
};

/// Parses a safetensors image. Exposed for fuzzing; ModelFile::Parse dispatches here.
StatusOr<ModelFile::Contents> ParseSafetensors(std::span<const uint8_t> bytes,
                                               const std::string& name);
/// Parses a GGUF v2/v3 image. Exposed for fuzzing; ModelFile::Parse dispatches here.
StatusOr<ModelFile::Contents> ParseGguf(std::span<const uint8_t> bytes, const std::string& name);

}  // namespace fleet::formats
