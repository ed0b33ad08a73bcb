#include "fleet/formats/model_file.h"

namespace fleet::formats {

StatusOr<ModelFile::Contents> ParseGguf(std::span<const uint8_t>, const std::string& name) {
  return UnimplementedError(name + ": GGUF reader not implemented yet");
}

}  // namespace fleet::formats
