#include "flux.h"

namespace fleet::models::internal {

StatusOr<std::unique_ptr<Model>> CreateFluxModel(std::string_view, at::ScalarType) {
  return UnimplementedError("flux: not implemented yet");
}

}  // namespace fleet::models::internal
