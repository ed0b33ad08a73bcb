#include <unistd.h>

#include <algorithm>

#include "cuda_runtime_internal.h"
#include "fleet/device/device.h"

namespace fleet::device {

uint64_t DefaultReserve(const DeviceId& id, uint64_t total_bytes) {
  if (!id.is_cpu()) return std::min(total_bytes, kCudaReserve);
  constexpr uint64_t kMin = 512ull << 20;
  constexpr uint64_t kMax = 4ull << 30;
  return std::min(total_bytes, std::clamp<uint64_t>(total_bytes / 10, kMin, kMax));
}

DeviceInfo DiscoverCpu() {
  long pages = sysconf(_SC_PHYS_PAGES);
  long page_size = sysconf(_SC_PAGESIZE);
  uint64_t total = pages > 0 && page_size > 0
                       ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size)
                       : 0;
  return DeviceInfo{DeviceId::Cpu(), total, total - DefaultReserve(DeviceId::Cpu(), total), "cpu"};
}

std::vector<DeviceInfo> DiscoverCuda(std::string* why_none) {
  std::vector<internal::CudaDeviceProperties> props;
  std::string why;
  internal::QueryCudaDevices(&props, &why);
  std::vector<DeviceInfo> out;
  for (const auto& p : props) {
    out.push_back(DeviceInfo{DeviceId::Cuda(p.index), p.total_bytes,
                             p.total_bytes - DefaultReserve(DeviceId::Cuda(p.index), p.total_bytes),
                             p.name});
  }
  if (why_none) *why_none = out.empty() ? why : "";
  return out;
}

std::vector<DeviceInfo> DiscoverAll(std::string* why_no_cuda) {
  std::vector<DeviceInfo> out = DiscoverCuda(why_no_cuda);
  out.push_back(DiscoverCpu());
  return out;
}

bool CudaCompiledIn() { return internal::kCudaCompiledIn; }

}  // namespace fleet::device
