// The Flux.1 family (dev and schnell); see docs/models.md. Private to common/models.
#pragma once

#include <memory>
#include <string_view>

#include "fleet/models/model.h"

namespace fleet::models::internal {

StatusOr<std::unique_ptr<Model>> CreateFluxModel(std::string_view config_json,
                                                 at::ScalarType dtype);

}  // namespace fleet::models::internal
