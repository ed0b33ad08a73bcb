// Devices: the ids used in allocation strings ("cuda:0", "cpu"), their memory, and discovery.
//
// A DeviceId names a device the way ComfyUI/DisTorch2 users write it. Ids sort numerically
// (cuda:2 before cuda:10), with cpu last, which is the donor order of every plan.
// Discovery reports the CPU (physical RAM) and, in FLEET_ENABLE_CUDA builds, each visible CUDA
// device. A CUDA build on a machine without a GPU or driver reports no CUDA devices and carries on.
//
// Thread safety: all functions are safe to call concurrently.
#pragma once

#include <compare>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fleet/status/status.h"

namespace fleet::device {

/// Device types that ComfyUI exposes. Order is the sort order of ids (cpu last).
enum class Kind : uint8_t { kCuda, kXpu, kNpu, kMlu, kMps, kDirectml, kCorex, kCpu };

std::string_view KindName(Kind kind);

struct DeviceId {
  Kind kind = Kind::kCpu;
  int index = 0;  // 0 for devices without an index (cpu, mps)

  /// Parses "cuda:0", "cuda" (= cuda:0), "cpu", "mps", "xpu:1"... Surrounding spaces are
  /// trimmed and the type is case-insensitive ("CPU" is cpu): DisTorch2 raised for both.
  static StatusOr<DeviceId> Parse(std::string_view text);
  static DeviceId Cpu() { return DeviceId{Kind::kCpu, 0}; }
  static DeviceId Cuda(int index) { return DeviceId{Kind::kCuda, index}; }

  bool is_cpu() const { return kind == Kind::kCpu; }
  /// "cuda:0", "cpu", "mps".
  std::string ToString() const;

  friend auto operator<=>(const DeviceId&, const DeviceId&) = default;
};

/// What a worker or a what-if plan knows about one device.
struct DeviceInfo {
  DeviceId id;
  uint64_t total_bytes = 0;     // physical memory: what fractions and virtual VRAM refer to
  uint64_t capacity_bytes = 0;  // budget for model weights (total minus a reserve by default)
  std::string name;             // "NVIDIA H100 80GB HBM3", "cpu"
};

/// What a CUDA device needs besides our weights and activations: the CUDA context libtorch
/// creates (cuBLAS and cuDNN handles, kernels loaded lazily) and the caching allocator's slack.
/// Activations are not in it: plans add the family's estimate for the workflow's input sizes.
inline constexpr uint64_t kCudaReserve = 768ull << 20;

/// The part of a device kept out of the weights' capacity when no capacity is given (never
/// more than total): kCudaReserve on a CUDA device; on the CPU, which also runs the OS and the
/// client (ComfyUI), 10% of total, at least 512 MiB, at most 4 GiB.
uint64_t DefaultReserve(const DeviceId& id, uint64_t total_bytes);

/// Physical RAM of this machine (sysconf), as a DeviceInfo with the default reserve.
DeviceInfo DiscoverCpu();

/// CUDA devices visible to this process; empty without FLEET_ENABLE_CUDA, without a driver
/// or without a GPU (`why_none` then says which, e.g. "no CUDA devices: driver not found").
std::vector<DeviceInfo> DiscoverCuda(std::string* why_none = nullptr);

/// All devices of this machine: CUDA devices in index order, then the CPU.
std::vector<DeviceInfo> DiscoverAll(std::string* why_no_cuda = nullptr);

/// True when this binary was built with FLEET_ENABLE_CUDA.
bool CudaCompiledIn();

}  // namespace fleet::device
