// libFuzzer target: the GGUF parser, then layout detection and dequantisation of every accepted
// tensor of a supported type (small ones), so the dequantisers see arbitrary block bytes too.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "fleet/families/layout.h"
#include "fleet/formats/dequant.h"
#include "fleet/formats/model_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> bytes(data, size);
  auto contents = fleet::formats::ParseGguf(bytes, "fuzz.gguf");
  if (!contents.ok()) return 0;
  auto file = fleet::formats::ModelFile::Parse(bytes, "fuzz.gguf");
  FLEET_CHECK(file.ok());
  std::vector<float> out;
  for (const auto& t : (*file)->tensors()) {
    FLEET_CHECK(t.offset <= size && t.nbytes <= size - t.offset);
    auto traits = fleet::formats::GgmlTypeByName(t.dtype);
    FLEET_CHECK(traits.has_value());
    if (!traits->dequantizable || t.numel() > (1 << 16)) continue;
    out.resize(static_cast<size_t>(t.numel()));
    auto s = fleet::formats::Dequantize(traits->type, (*file)->Data(t), t.numel(),
                                        fleet::formats::OutType::kF32, out.data());
    FLEET_CHECK(s.ok());
  }
  (void)fleet::families::DetectLayout(**file);
  return 0;
}
