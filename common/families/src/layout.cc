#include "fleet/families/layout.h"

#include <algorithm>

#include "builder.h"
#include "fleet/families/family.h"

namespace fleet::families {
namespace {

using internal::BlockIndex;
using internal::FirstComponent;
using internal::StartsWith;

// No known family: one unit per top-level name, numbered children split out ("layers.3"),
// in file order, nothing pinned.
StatusOr<Layout> Generic(const std::vector<formats::TensorInfo>& tensors,
                         const std::map<std::string, std::string>& metadata, std::string prefix,
                         const std::string& where) {
  const LayoutInput input{tensors, metadata, std::move(prefix), where};
  internal::Builder b(input, "unknown");
  Layout layout{"unknown", input.prefix, "{}", {}};
  auto classify = [](const std::string& n) -> std::string {
    const std::string first = FirstComponent(n);
    const int64_t i = BlockIndex(n, first);
    return i >= 0 ? first + "." + std::to_string(i) : first;
  };
  auto rank = [](const std::string&) { return internal::RankKey{0, 0}; };  // file order
  FLEET_RETURN_IF_ERROR(b.Group(classify, rank, nullptr, &layout.units));
  return layout;
}

}  // namespace

uint64_t Layout::total_bytes() const {
  uint64_t total = 0;
  for (const auto& u : units) total += u.bytes;
  return total;
}

StatusOr<Layout> DetectLayout(const std::vector<formats::TensorInfo>& tensors,
                              const std::map<std::string, std::string>& metadata,
                              const std::string& where) {
  if (tensors.empty()) return InvalidArgumentError(where + ": the file holds no tensors");
  for (const Family* family : AllFamilies()) {
    if (auto prefix = family->Recognise(tensors)) {
      return family->Detect(LayoutInput{tensors, metadata, *prefix, where});
    }
  }
  // A GGUF file that says it is a family we know but lacks the family's tensors.
  auto arch = metadata.find("general.architecture");
  if (arch != metadata.end()) {
    if (const Family* f = FindFamily(arch->second); f && f->name() == arch->second) {
      return InvalidArgumentError(where + ": general.architecture is '" + arch->second +
                                  "' but the tensors do not have its layout");
    }
  }
  std::string prefix;
  for (std::string_view p : {"model.diffusion_model.", "diffusion_model."}) {
    if (std::all_of(tensors.begin(), tensors.end(),
                    [&](const formats::TensorInfo& t) { return StartsWith(t.name, p); })) {
      prefix = std::string(p);
      break;
    }
  }
  return Generic(tensors, metadata, prefix, where);
}

StatusOr<Layout> DetectLayout(const formats::ModelFile& file) {
  return DetectLayout(file.tensors(), file.metadata(), file.path());
}

}  // namespace fleet::families
