// libFuzzer target: the safetensors header parser, then layout detection on what it accepted.
// Any crash, sanitizer report or broken invariant (FLEET_CHECK) is a finding.
#include <cstddef>
#include <cstdint>
#include <span>

#include "fleet/families/layout.h"
#include "fleet/formats/model_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> bytes(data, size);
  auto file = fleet::formats::ModelFile::Parse(bytes, "fuzz.safetensors");
  if (!file.ok()) return 0;
  for (const auto& t : (*file)->tensors()) {
    FLEET_CHECK(t.offset <= size && t.nbytes <= size - t.offset);
    FLEET_CHECK((*file)->Data(t).size() == t.nbytes);
  }
  auto layout = fleet::families::DetectLayout(**file);
  if (layout.ok()) FLEET_CHECK(layout->total_bytes() == (*file)->total_tensor_bytes());
  return 0;
}
