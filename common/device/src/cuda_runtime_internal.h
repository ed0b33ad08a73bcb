// The seam between device discovery and the CUDA runtime. cuda_runtime.cu implements it in
// FLEET_ENABLE_CUDA builds; cuda_runtime_stub.cc in CPU-only builds.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fleet::device::internal {

struct CudaDeviceProperties {
  int index = 0;
  uint64_t total_bytes = 0;
  std::string name;
};

extern const bool kCudaCompiledIn;

/// Fills `out` with the visible devices. Never fails: with no driver or GPU, `out` stays empty
/// and `why` says why ("no CUDA devices: ...").
void QueryCudaDevices(std::vector<CudaDeviceProperties>* out, std::string* why);

}  // namespace fleet::device::internal
