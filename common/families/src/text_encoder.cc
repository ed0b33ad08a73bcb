// Text encoders (CLIP, T5): for now only their pin rules, which `fleet plan --family` and the
// placement tests use. Recognising their files and running them is future work.
#include "builder.h"
#include "fleet/config/text.h"
#include "registry.h"

namespace fleet::families::internal {
namespace {

bool HasComponent(std::string_view name, std::string_view component) {
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('.', start);
    if (end == std::string_view::npos) end = name.size();
    if (name.substr(start, end - start) == component) return true;
    start = end + 1;
  }
  return false;
}

class TextEncoder final : public Family {
 public:
  std::string_view name() const override { return "text-encoder"; }

  std::optional<std::string> Recognise(const std::vector<formats::TensorInfo>&) const override {
    return std::nullopt;
  }

  std::optional<PinRule> Pin(std::string_view unit) const override {
    const std::string lower = config::AsciiLower(unit);
    if (lower.find("embed") != std::string::npos || lower.find("wte") != std::string::npos ||
        lower.find("wpe") != std::string::npos) {
      return PinRule{
          "text-encoder embedding: the encoder runs where its embedding lives (DisTorch2's CLIP "
          "head rule)",
          true};
    }
    if (HasComponent(unit, "shared")) {
      return PinRule{
          "T5 token embedding 'shared': the encoder runs where its embedding lives (DisTorch2's "
          "CLIP head rule misses T5)",
          false};
    }
    return std::nullopt;
  }

  bool RecogniseUnits(const std::vector<std::string>&) const override { return false; }

  StatusOr<Layout> Detect(const LayoutInput& in) const override {
    return UnimplementedError(in.where + ": text encoders cannot be loaded yet");
  }

  StatusOr<uint64_t> ActivationBytes(std::string_view, const InputSizes&) const override {
    return UnimplementedError("text encoders have no activation estimate yet");
  }

  std::optional<InputSizes> SizesOf(std::string_view, const InputShapes&) const override {
    return std::nullopt;
  }
};

}  // namespace

const Family& TextEncoderFamily() {
  static const TextEncoder family;
  return family;
}

}  // namespace fleet::families::internal
