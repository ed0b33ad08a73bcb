#include "fleet/coordinator/schedule.h"

#include <cstdio>

namespace fleet::coordinator {

std::string_view ExecModeName(ExecMode mode) {
  switch (mode) {
    case ExecMode::kAuto: return "auto";
    case ExecMode::kStream: return "stream";
    case ExecMode::kPipeline: return "pipeline";
  }
  return "auto";
}

StatusOr<ExecMode> ParseExecMode(std::string_view text) {
  if (text == "auto" || text.empty()) return ExecMode::kAuto;
  if (text == "stream") return ExecMode::kStream;
  if (text == "pipeline") return ExecMode::kPipeline;
  return InvalidArgumentError("unknown mode '" + std::string(text) +
                              "' (use stream, pipeline or auto)");
}

std::string_view SiteName(Site site) {
  switch (site) {
    case Site::kResident: return "resident";
    case Site::kStream: return "stream";
    case Site::kPipeline: return "pipeline";
  }
  return "resident";
}

namespace {

std::string Fmt(const char* fmt, double a, double b = 0) {
  char buf[128];
  std::snprintf(buf, sizeof(buf), fmt, a, b);
  return buf;
}

double Bandwidth(const CostInputs& c, const std::string& src, const std::string& dst) {
  auto it = c.bandwidth.find(src + ">" + dst);
  return it != c.bandwidth.end() && it->second > 0 ? it->second : c.default_bandwidth;
}

// Seconds to compute blocks [first, last] on `device`; unknown blocks take the time measured on
// any device for that block, else the default.
double ComputeSeconds(const CostInputs& c, const std::vector<ScheduleBlock>& blocks, size_t first,
                      size_t last, const std::string& device, bool* measured) {
  double total = 0;
  for (size_t i = first; i <= last; ++i) {
    auto it = c.compute_seconds.find(device + "|" + blocks[i].name);
    if (it != c.compute_seconds.end()) {
      *measured = true;
      total += it->second;
      continue;
    }
    bool found = false;
    for (const auto& [key, seconds] : c.compute_seconds) {
      if (key.size() > blocks[i].name.size() &&
          key.compare(key.size() - blocks[i].name.size(), std::string::npos, blocks[i].name) == 0 &&
          key[key.size() - blocks[i].name.size() - 1] == '|') {
        total += seconds;
        found = true;
        break;
      }
    }
    if (!found) total += c.default_block_seconds;
  }
  return total;
}

std::string BackingType(const CostInputs& c, const std::string& device) {
  auto it = c.backing_type.find(device);
  if (it != c.backing_type.end()) return it->second;
  return device.rfind("cpu", 0) == 0 ? "cpu" : "cuda";
}

}  // namespace

StatusOr<Schedule> BuildSchedule(const std::vector<ScheduleBlock>& blocks,
                                 const std::string& compute_device, ExecMode mode,
                                 const CostInputs& costs, bool allow_mixed) {
  Schedule schedule;
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (blocks[i].holder.empty()) {
      return InvalidArgumentError("block '" + blocks[i].name + "' has no device");
    }
    if (!schedule.ranges.empty() && schedule.ranges.back().holder == blocks[i].holder) {
      schedule.ranges.back().last = i;
      schedule.ranges.back().bytes += blocks[i].bytes;
      continue;
    }
    schedule.ranges.push_back(Range{i, i, blocks[i].holder, Site::kResident, compute_device, "",
                                    blocks[i].bytes});
  }
  const std::string compute_type = BackingType(costs, compute_device);
  for (Range& r : schedule.ranges) {
    std::string span = blocks[r.first].name + (r.first == r.last ? "" : ".." + blocks[r.last].name);
    if (r.holder == compute_device) {
      r.site = Site::kResident;
      r.reason = "held by the compute device";
      continue;
    }
    bool same_type = BackingType(costs, r.holder) == compute_type;
    double bw_in = Bandwidth(costs, r.holder, compute_device);
    double bw_act = Bandwidth(costs, compute_device, r.holder);
    bool measured = false;
    double compute_here = ComputeSeconds(costs, blocks, r.first, r.last, compute_device, &measured);
    double compute_there = ComputeSeconds(costs, blocks, r.first, r.last, r.holder, &measured);
    double stream_s = std::max(compute_here, static_cast<double>(r.bytes) / bw_in);
    double pipeline_s = compute_there + 2.0 * static_cast<double>(costs.activation_bytes) / bw_act;
    std::string estimate = Fmt("stream ~%.1f ms vs pipeline ~%.1f ms", stream_s * 1e3, pipeline_s * 1e3) +
                           (measured ? " (measured)" : " (estimated: no measurements yet)");
    switch (mode) {
      case ExecMode::kStream:
        r.site = Site::kStream;
        r.reason = "mode stream";
        break;
      case ExecMode::kPipeline:
        if (!same_type && !allow_mixed) {
          return InvalidArgumentError(
              "pipeline would compute " + span + " on " + r.holder + " (" +
              BackingType(costs, r.holder) + ") while " + compute_device + " (" + compute_type +
              ") computes the rest: the result would not be bit-identical; use mode stream or auto, "
              "or allow mixed devices");
        }
        r.site = Site::kPipeline;
        r.reason = "mode pipeline";
        break;
      case ExecMode::kAuto:
        if (!same_type && !allow_mixed) {
          r.site = Site::kStream;
          r.reason = r.holder + " is a different device type than " + compute_device +
                     ": streaming keeps the result bit-identical";
        } else if (pipeline_s <= stream_s) {
          r.site = Site::kPipeline;
          r.reason = "moving activations is cheaper: " + estimate;
        } else {
          r.site = Site::kStream;
          r.reason = "streaming weights is cheaper: " + estimate;
        }
        break;
    }
    if (r.site == Site::kPipeline) {
      r.runs_on = r.holder;
      if (!same_type) schedule.bit_identical = false;
    }
    schedule.explanation.push_back(span + " on " + r.holder + ": " + std::string(SiteName(r.site)) +
                                   " (" + r.reason + ")");
  }
  return schedule;
}

}  // namespace fleet::coordinator
