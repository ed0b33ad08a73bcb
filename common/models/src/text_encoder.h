// The text-encoder family (CLIP, T5, UMT5); see docs/models.md. Private to common/models.
#pragma once

#include <memory>
#include <string_view>

#include "fleet/models/model.h"

namespace fleet::models::internal {

StatusOr<std::unique_ptr<Model>> CreateTextEncoderModel(std::string_view config_json,
                                                        at::ScalarType dtype);

}  // namespace fleet::models::internal
