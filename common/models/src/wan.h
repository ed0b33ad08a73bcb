// The WAN 2.1 / 2.2 family; see docs/models.md. Private to common/models.
#pragma once

#include <memory>
#include <string_view>

#include "fleet/models/model.h"

namespace fleet::models::internal {

StatusOr<std::unique_ptr<Model>> CreateWanModel(std::string_view config_json,
                                                at::ScalarType dtype);

}  // namespace fleet::models::internal
