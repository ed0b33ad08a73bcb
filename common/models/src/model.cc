#include "fleet/models/model.h"

#include <string>

#include "block_util.h"
#include "flux.h"
#include "linear.h"
#include "text_encoder.h"
#include "wan.h"

namespace fleet::models {
namespace {

// The torch half of every family, by the name its descriptor (fleet::families) has. To add a
// family: its file here and one line below (docs/models.md).
struct Implementation {
  std::string_view family;
  StatusOr<std::unique_ptr<Model>> (*create)(std::string_view config_json, at::ScalarType dtype);
};
constexpr Implementation kImplementations[] = {
    {"flux", internal::CreateFluxModel},
    {"linear", internal::CreateLinearModel},
    {"wan", internal::CreateWanModel},
    {"text-encoder", internal::CreateTextEncoderModel},
};

}  // namespace

StatusOr<at::Tensor> ResidentWeights::Get(std::string_view name) const {
  return internal::Find(weights_, "weight", name);
}

bool ResidentWeights::Has(std::string_view name) const {
  auto it = weights_.find(name);
  return it != weights_.end() && it->second.defined();
}

std::vector<std::string_view> ImplementedFamilies() {
  std::vector<std::string_view> out;
  for (const auto& i : kImplementations) out.push_back(i.family);
  return out;
}

StatusOr<std::unique_ptr<Model>> CreateModel(std::string_view family, std::string_view config_json,
                                             at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) {
    return InvalidArgumentError("model compute dtype must be float32, bfloat16 or float16, got " +
                                std::string(internal::DtypeName(dtype)));
  }
  std::string known;
  for (const auto& i : kImplementations) {
    if (i.family == family) return i.create(config_json, dtype);
    known += (known.empty() ? "" : ", ") + std::string(i.family);
  }
  return InvalidArgumentError("unknown model family '" + std::string(family) +
                              "' (known: " + known + ")");
}

}  // namespace fleet::models
