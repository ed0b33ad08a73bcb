// The execution schedule of a placed model: which device runs each block and where its weights
// come from. Pure logic (no I/O), so every decision is unit-tested and explainable.
//
// Blocks are cut into ranges: maximal runs of consecutive blocks held by one device. A range
// held by the compute device is `resident`. Any other range is either
//   `stream`   - its weights are pulled to the compute device, block by block, with prefetch
//                (DisTorch's behaviour; cost ~ max(compute there, bytes / link bandwidth)), or
//   `pipeline` - it runs on the device that holds it; only the activations cross the range's
//                boundaries (cost ~ compute on the holder + 2 x activation bytes / bandwidth).
// Mode stream or pipeline forces one choice for every range; auto compares the costs per range
// from measured bandwidth and per-block compute time (defaults until measured), and the
// explanation says what it chose and why.
//
// Result contract (docs/ARCHITECTURE.md section 5): a range computes on another device only when
// that device's backing has the same type as the compute device's (all CPU, or all CUDA), unless
// allow_mixed is set; otherwise auto streams it and pipeline is an error that says so.
//
// Thread safety: pure functions over values.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "fleet/status/status.h"

namespace fleet::coordinator {

enum class ExecMode { kAuto, kStream, kPipeline };
std::string_view ExecModeName(ExecMode mode);
StatusOr<ExecMode> ParseExecMode(std::string_view text);

enum class Site { kResident, kStream, kPipeline };
std::string_view SiteName(Site site);

struct ScheduleBlock {
  std::string name;
  std::string holder;  // device id of the worker that holds the weights ("cuda:1", "cpu")
  uint64_t bytes = 0;  // weight bytes
};

/// What the cost model knows. Unknown values fall back to the defaults below.
struct CostInputs {
  /// Backing type per device id ("cpu" or "cuda"): decides bit-identity.
  std::map<std::string, std::string> backing_type;
  /// Measured bytes per second from src to dst (keys "src>dst").
  std::map<std::string, double> bandwidth;
  /// Measured seconds per block on a device (keys "device|block").
  std::map<std::string, double> compute_seconds;
  /// Bytes of the state that crosses a range boundary (largest expected input).
  uint64_t activation_bytes = 0;
  double default_bandwidth = 8e9;        // same-host shared memory, conservative
  double default_block_seconds = 0.0;    // unknown compute: assume the same everywhere
};

struct Range {
  size_t first = 0;  // index of the first block
  size_t last = 0;   // index of the last block (inclusive)
  std::string holder;
  Site site = Site::kResident;
  std::string runs_on;  // device that computes the range
  std::string reason;   // one sentence: why this site
  uint64_t bytes = 0;
};

struct Schedule {
  std::vector<Range> ranges;
  bool bit_identical = true;  // false only when allow_mixed put a range on another device type
  /// One line per non-resident range, for plan explanations and logs.
  std::vector<std::string> explanation;
};

/// Builds the schedule. InvalidArgument when a block has no holder, or when mode is pipeline and a
/// range would compute on another device type without allow_mixed.
StatusOr<Schedule> BuildSchedule(const std::vector<ScheduleBlock>& blocks,
                                 const std::string& compute_device, ExecMode mode,
                                 const CostInputs& costs, bool allow_mixed);

}  // namespace fleet::coordinator
