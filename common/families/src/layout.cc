#include "fleet/families/layout.h"

#include <algorithm>
#include <utility>

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
  Layout layout{"unknown", input.prefix, "{}", {}, {}};
  auto classify = [](const std::string& n) -> std::string {
    const std::string first = FirstComponent(n);
    const int64_t i = BlockIndex(n, first);
    return i >= 0 ? first + "." + std::to_string(i) : first;
  };
  auto rank = [](const std::string&) { return internal::RankKey{0, 0}; };  // file order
  FLEET_RETURN_IF_ERROR(b.Group(classify, rank, nullptr, &layout.units));
  return layout;
}

// llama.cpp's names for T5 encoders, as ComfyUI-GGUF's T5_SD_MAP translates them: each
// (from, to) replaces every occurrence, in this order.
constexpr std::pair<std::string_view, std::string_view> kLlamaCppT5[] = {
    {"enc.", "encoder."},
    {".blk.", ".block."},
    {"token_embd", "shared"},
    {"output_norm", "final_layer_norm"},
    {"attn_q", "layer.0.SelfAttention.q"},
    {"attn_k", "layer.0.SelfAttention.k"},
    {"attn_v", "layer.0.SelfAttention.v"},
    {"attn_o", "layer.0.SelfAttention.o"},
    {"attn_norm", "layer.0.layer_norm"},
    {"attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"},
    {"ffn_up", "layer.1.DenseReluDense.wi_1"},
    {"ffn_down", "layer.1.DenseReluDense.wo"},
    {"ffn_gate", "layer.1.DenseReluDense.wi_0"},
    {"ffn_norm", "layer.1.layer_norm"},
};

std::string TranslateLlamaCppT5(std::string name) {
  for (const auto& [from, to] : kLlamaCppT5) {
    for (size_t at = name.find(from); at != std::string::npos;
         at = name.find(from, at + to.size())) {
      name.replace(at, from.size(), to);
    }
  }
  return name;
}

bool HasLlamaCppT5Names(const std::vector<formats::TensorInfo>& tensors) {
  return std::any_of(tensors.begin(), tensors.end(), [](const formats::TensorInfo& t) {
    return t.name == "enc.output_norm.weight";
  });
}

}  // namespace

std::string Layout::WeightName(const std::string& file_name) const {
  if (auto it = renamed.find(file_name); it != renamed.end()) return it->second;
  return StartsWith(file_name, prefix) ? file_name.substr(prefix.size()) : file_name;
}

uint64_t Layout::total_bytes() const {
  uint64_t total = 0;
  for (const auto& u : units) total += u.bytes;
  return total;
}

StatusOr<Layout> DetectLayout(const std::vector<formats::TensorInfo>& tensors,
                              const std::map<std::string, std::string>& metadata,
                              const std::string& where) {
  if (tensors.empty()) return InvalidArgumentError(where + ": the file holds no tensors");
  if (HasLlamaCppT5Names(tensors)) {
    // Detect over the translated names, then point the units back at the file's names.
    std::vector<formats::TensorInfo> translated = tensors;
    std::map<std::string, std::string> original;
    for (auto& t : translated) {
      std::string name = TranslateLlamaCppT5(t.name);
      if (!original.emplace(name, t.name).second) {
        return InvalidArgumentError(where + ": tensors '" + original[name] + "' and '" + t.name +
                                    "' both translate to '" + name + "' (llama.cpp T5 names)");
      }
      t.name = std::move(name);
    }
    FLEET_ASSIGN_OR_RETURN(Layout layout, DetectLayout(translated, metadata, where));
    if (layout.family != "text-encoder" || !layout.prefix.empty()) {
      return InvalidArgumentError(where +
                                  ": llama.cpp T5 tensor names (enc.blk.N) that do not "
                                  "make a T5 encoder");
    }
    for (auto& unit : layout.units) {
      for (auto& name : unit.tensors) {
        std::string file_name = original.at(name);
        layout.renamed[file_name] = name;
        name = std::move(file_name);
      }
    }
    return layout;
  }
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
