#include "cuda_runtime_internal.h"

namespace fleet::device::internal {

const bool kCudaCompiledIn = false;

void QueryCudaDevices(std::vector<CudaDeviceProperties>* out, std::string* why) {
  out->clear();
  *why = "no CUDA devices: this build has no CUDA support (configure with -DFLEET_ENABLE_CUDA=ON)";
}

}  // namespace fleet::device::internal
