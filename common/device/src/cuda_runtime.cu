// CUDA runtime queries, compiled by nvcc when FLEET_ENABLE_CUDA=ON. Uses the runtime API only
// (cudart), so binaries start on hosts without a driver and simply see no devices.
#include <cuda_runtime.h>

#include <string>

#include "cuda_runtime_internal.h"

static_assert(__cplusplus >= 202002L, "our CUDA code is C++20: nvcc must get -std=c++20");

namespace fleet::device::internal {
namespace {

// Writes a marker to device memory: proves a device really executes our kernels.
__global__ void ProbeKernel(int* out) { *out = 0x7e50f1ee; }

bool Probe(int device, std::string* why) {
  if (cudaSetDevice(device) != cudaSuccess) return false;
  int* d = nullptr;
  if (cudaMalloc(&d, sizeof(int)) != cudaSuccess) {
    *why = "cudaMalloc failed on device " + std::to_string(device);
    return false;
  }
  ProbeKernel<<<1, 1>>>(d);
  int h = 0;
  cudaError_t err = cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(d);
  if (err != cudaSuccess || h != 0x7e50f1ee) {
    *why = std::string("probe kernel failed on device ") + std::to_string(device) + ": " +
           cudaGetErrorString(err);
    return false;
  }
  return true;
}

}  // namespace

const bool kCudaCompiledIn = true;

void QueryCudaDevices(std::vector<CudaDeviceProperties>* out, std::string* why) {
  out->clear();
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    *why = std::string("no CUDA devices: ") + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return;
  }
  if (count == 0) {
    *why = "no CUDA devices: the driver reports none";
    return;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    std::string probe_error;
    if (!Probe(i, &probe_error)) {
      *why = probe_error;
      continue;
    }
    out->push_back(CudaDeviceProperties{i, static_cast<uint64_t>(prop.totalGlobalMem), prop.name});
  }
}

}  // namespace fleet::device::internal
