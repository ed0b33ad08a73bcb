// The "linear" toy family: `depth` blocks "linear_blocks.N", each x = gelu_tanh(x W^T + b)
// with weights "linear_blocks.N.weight" [dim, dim] and "linear_blocks.N.bias" [dim]. State:
// {"x"} of shape [..., dim]. Config JSON: {"dim": D, "depth": N}. It exists so block
// execution, placement and transport can be tested without Flux. Private to common/models.
#pragma once

#include <memory>
#include <string_view>

#include "fleet/models/model.h"

namespace fleet::models::internal {

StatusOr<std::unique_ptr<Model>> CreateLinearModel(std::string_view config_json,
                                                   at::ScalarType dtype);

}  // namespace fleet::models::internal
