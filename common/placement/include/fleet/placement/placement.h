// Placement: turns the DisTorch2 loader inputs (compute_device, virtual_vram_gb, donor_device,
// expert_mode_allocations, eject_models) into a Plan that says on which device every placement
// unit (a block of the model) lives, checked against each device's capacity before anything
// loads.
//
// The allocation language is ComfyUI-MultiGPU DisTorch2's: virtual VRAM with one or more donors,
// or an expert string of `device,value` entries whose values are bytes (`4gb`), ratios (`25%`),
// fractions of the device's total memory (`0.25`) or the wildcard `*`. Where DisTorch2 has bugs
// (../../../../docs/placement.md lists them) we deviate, and every deviation that changed a plan
// is listed in Plan::deviations, so `fleet plan --explain` can show it.
//
// The algorithm in one paragraph: each device gets a quota in integer bytes; pinned units (model
// stems, text-encoder embeddings) go to the compute device and count against its quota; the
// compute device then takes units from the model's tail while they fit its quota, and every other
// device (numeric order, cpu last, the wildcard device after the others) takes the next
// contiguous range towards the head; what fits no quota stays on the compute device (DisTorch2's
// "orphans"). An expert string with no wildcard and no cpu entry is GPU-only: the part of the
// model its quotas leave is first spread over its GPUs and the compute device in proportion to
// their quotas, up to their capacities. Then weights plus inference headroom are checked
// against every capacity.
//
// Thread safety: everything here is a pure function of its arguments or a plain value type.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fleet/device/device.h"
#include "fleet/status/status.h"

namespace fleet::placement {

/// One placement unit of a model, in model (execution) order.
struct Unit {
  std::string name;            // "double_blocks.7"
  uint64_t bytes = 0;          // weight bytes of the unit
  bool pinned = false;         // must live on the compute device
  std::string pin_reason;      // why it is pinned (shown by `fleet plan`)
  bool upstream_pins = false;  // DisTorch2 also keeps it on the compute device (CLIP head rule)

  friend bool operator==(const Unit&, const Unit&) = default;
};

/// Memory the compute device needs beyond the weights it holds, reserved by every plan.
struct Headroom {
  int64_t prefetch_depth = 2;     // streamed units in flight: depth x the largest streamed unit
  uint64_t activation_bytes = 0;  // activation estimate for the largest input of the model
  uint64_t reserve_bytes = 0;     // configurable extra reserve
};

/// The inputs of a DisTorch2 loader node, with the same names and defaults.
struct Request {
  std::string compute_device = "cuda:0";  // device that runs the model
  double virtual_vram_gb = 4.0;           // GiB moved off the compute device (0..128)
  std::string donor_device = "cpu";       // donor(s) for virtual VRAM, comma-separated
  std::string expert_mode_allocations;    // "cuda:0,4gb;cpu,*"; overrides virtual VRAM
  bool eject_models = true;               // evict other models from these devices first
  bool keep_loaded = true;                // keep this model's shares resident across switches
  Headroom headroom;
};

/// How the quotas were derived.
enum class Mode {
  kComputeOnly,   // virtual_vram_gb == 0 and no expert string: everything on the compute device
  kVirtualVram,   // virtual_vram_gb > 0 and donors
  kBytes,         // expert string with byte values (and/or fractions, wildcards)
  kRatio,         // expert string with % values
  kFraction,      // expert string with fractions of total memory
  kWildcardOnly,  // expert string of only wildcards
};
std::string_view ModeName(Mode mode);

/// A difference from DisTorch2's behaviour that changed this plan.
struct Deviation {
  std::string code;      // stable identifier, e.g. "numeric-order" (docs/placement.md)
  std::string sentence;  // what DisTorch2 would have done and what we did instead
};

/// One device of the plan. Every device of the table appears, in numeric order (cpu last).
struct DevicePlan {
  device::DeviceId id;
  std::string role;  // "compute", "donor" (named or wildcard), "unused"
  uint64_t total_bytes = 0;
  uint64_t capacity_bytes = 0;
  std::optional<uint64_t> quota_bytes;  // requested quota; nullopt = wildcard / rest
  uint64_t weight_bytes = 0;            // bytes of the units assigned (pinned included)
  uint64_t pinned_bytes = 0;
  uint64_t headroom_bytes = 0;  // prefetch + activations + reserve (compute device only)
  std::vector<size_t> units;    // indices into Plan::assignments, model order
};

struct Assignment {
  std::string unit;
  uint64_t bytes = 0;
  device::DeviceId device;
  bool pinned = false;
  std::string pin_reason;
};

/// The result of MakePlan: a plain value the coordinator, the CLI and the ComfyUI node share.
struct Plan {
  Mode mode = Mode::kComputeOnly;
  device::DeviceId compute_device;
  uint64_t model_bytes = 0;
  std::vector<DevicePlan> devices;
  std::vector<Assignment> assignments;  // model order
  uint64_t prefetch_bytes = 0;          // depth x largest streamed unit
  uint64_t activation_bytes = 0;
  uint64_t reserve_bytes = 0;
  uint64_t orphan_bytes = 0;  // bytes that fit no quota and stayed on compute
  std::string expert_string;  // DisTorch's "v2 Expert String": dev,f.ffff;...
  // Where the rest of the model went, in DisTorch2's log wording ("GPU-ONLY MODE: Distributed
  // remaining X MB across N GPUs (no CPU fallback)", "Assigning remaining X MB of model to
  // wildcard device 'cpu'"); X in MiB.
  std::vector<std::string> notes;
  std::vector<std::string> warnings;
  std::vector<Deviation> deviations;  // only those that changed this plan
  bool eject_models = true;
  bool keep_loaded = true;

  /// The device a unit was assigned to, or nullptr if there is no such unit.
  const device::DeviceId* DeviceOf(std::string_view unit) const;
  /// The plan of one device, or nullptr.
  const DevicePlan* Device(const device::DeviceId& id) const;

  /// {mode, compute_device, model_bytes, devices: [{id, role, total_bytes, capacity_bytes,
  ///  quota_bytes, bytes, pinned_bytes, headroom_bytes, units}], assignments: [{unit, device,
  ///  bytes, pinned, pin_reason}], headroom, orphan_bytes, expert_string, notes, warnings,
  ///  deviations, eject_models, keep_loaded}, indented by 2.
  std::string ToJson() const;
  /// Readable tables: devices, per-device assignment summary, pinned units, headroom, the v2
  /// expert string, notes and warnings.
  std::string ToText() const;
  /// One paragraph per deviation ("no deviation ..." when there is none).
  std::string ExplainText() const;
};

/// Plans `units` over `devices` as `request` asks.
/// \return the plan; InvalidArgument for malformed inputs (naming the field, token and
/// position), NotFound for a device that is not in the table, ResourceExhausted when the plan
/// does not fit the capacities (with the numbers).
StatusOr<Plan> MakePlan(const std::vector<device::DeviceInfo>& devices,
                        const std::vector<Unit>& units, const Request& request);

/// Parses a what-if device table: "cuda:0=24gb,cuda:1=12gb/10gb,cpu=64gb". Each entry is
/// id=TOTAL[/CAPACITY]; without a capacity, capacity = total - device::DefaultReserve(total).
/// \return devices in numeric order, or InvalidArgument naming the entry and its position.
StatusOr<std::vector<device::DeviceInfo>> ParseDeviceTable(std::string_view text);

}  // namespace fleet::placement
