#include "fleet/models/model.h"

#include <string>

#include "block_util.h"
#include "flux.h"
#include "linear.h"

namespace fleet::models {

StatusOr<std::unique_ptr<Model>> CreateModel(std::string_view family, std::string_view config_json,
                                             at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) {
    return InvalidArgumentError("model compute dtype must be float32, bfloat16 or float16, got " +
                                std::string(internal::DtypeName(dtype)));
  }
  if (family == "linear") return internal::CreateLinearModel(config_json, dtype);
  if (family == "flux") return internal::CreateFluxModel(config_json, dtype);
  return InvalidArgumentError("unknown model family '" + std::string(family) +
                              "' (known: flux, linear)");
}

}  // namespace fleet::models
