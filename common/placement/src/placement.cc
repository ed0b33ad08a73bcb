// MakePlan: quotas from the DisTorch2 inputs, the contiguous tail-first assignment, the headroom
// and capacity check, and the list of deviations from DisTorch2 that changed the plan.
#include "fleet/placement/placement.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <set>

#include "expert_string.h"
#include "fleet/config/bytes.h"
#include "fleet/config/text.h"

namespace fleet::placement {
namespace {

using device::DeviceId;
using device::DeviceInfo;
using internal::TokenKind;

constexpr uint64_t kUnbounded = std::numeric_limits<uint64_t>::max();
constexpr uint64_t kMaxModelBytes = 1ull << 62;
constexpr int64_t kMaxPrefetchDepth = 64;

std::string Size(uint64_t bytes) { return config::FormatBytes(bytes); }
std::string SizeExact(uint64_t bytes) {
  return config::FormatBytes(bytes) + " (" + std::to_string(bytes) + " bytes)";
}

uint64_t SatSub(uint64_t a, uint64_t b) { return a > b ? a - b : 0; }
uint64_t SatAdd(uint64_t a, uint64_t b) { return a > kUnbounded - b ? kUnbounded : a + b; }

std::string DeviceList(const std::vector<DeviceInfo>& devices) {
  std::string out;
  for (const auto& d : devices) out += (out.empty() ? "" : ", ") + d.id.ToString();
  return out;
}

// A list of names, shortened after `max` items.
std::string NameList(const std::vector<std::string>& names, size_t max = 6) {
  std::string out;
  for (size_t i = 0; i < names.size() && i < max; ++i) out += (i ? ", " : "") + names[i];
  if (names.size() > max) out += ", ... (" + std::to_string(names.size()) + " in all)";
  return out;
}

// How the non-pinned units are walked onto devices.
struct Walk {
  std::vector<size_t> order;    // device indices; the first takes the model's tail
  std::vector<uint64_t> quota;  // per device index, for the units the walk places
  bool first_fit = false;       // DisTorch2's fill (a later unit may fill an earlier gap)
};

struct WalkResult {
  std::vector<size_t> device;  // per unit: device index
  std::vector<bool> orphan;    // per unit: placed on compute because no quota had room
};

WalkResult RunWalk(const std::vector<Unit>& units, size_t compute, const Walk& walk) {
  WalkResult r{std::vector<size_t>(units.size(), compute), std::vector<bool>(units.size(), false)};
  std::vector<size_t> free;
  for (size_t i = 0; i < units.size(); ++i) {
    if (!units[i].pinned) free.push_back(i);
  }
  std::vector<bool> placed(units.size(), false);
  if (!walk.first_fit) {
    size_t pos = free.size();
    for (size_t d : walk.order) {
      uint64_t left = walk.quota[d];
      while (pos > 0 && units[free[pos - 1]].bytes <= left) {
        left -= units[free[pos - 1]].bytes;
        r.device[free[pos - 1]] = d;
        placed[free[pos - 1]] = true;
        --pos;
      }
    }
  } else {
    std::vector<uint64_t> left = walk.quota;
    for (size_t k = free.size(); k-- > 0;) {
      for (size_t d : walk.order) {
        if (left[d] >= units[free[k]].bytes) {
          left[d] -= units[free[k]].bytes;
          r.device[free[k]] = d;
          placed[free[k]] = true;
          break;
        }
      }
    }
  }
  for (size_t i : free) r.orphan[i] = !placed[i];
  return r;
}

// Per device: what the request asked for.
struct Quota {
  bool named = false;     // listed in the expert string or a virtual-VRAM donor / compute share
  bool wildcard = false;  // takes the rest
  uint64_t bytes = 0;     // the quota when named and not a wildcard (pinned units included)
};

Status ValidateDevices(std::vector<DeviceInfo>* devices) {
  if (devices->empty()) return InvalidArgumentError("the device table is empty");
  std::sort(devices->begin(), devices->end(),
            [](const DeviceInfo& a, const DeviceInfo& b) { return a.id < b.id; });
  for (size_t i = 0; i < devices->size(); ++i) {
    const auto& d = (*devices)[i];
    if (i > 0 && (*devices)[i - 1].id == d.id) {
      return InvalidArgumentError("device table: " + d.id.ToString() +
                                  " appears twice; each device may appear once");
    }
    if (d.capacity_bytes > d.total_bytes) {
      return InvalidArgumentError("device table: capacity of " + d.id.ToString() + " (" +
                                  SizeExact(d.capacity_bytes) + ") is above its total (" +
                                  SizeExact(d.total_bytes) + ")");
    }
  }
  return Status::OK();
}

Status ValidateUnits(const std::vector<Unit>& units, uint64_t* total) {
  if (units.empty()) return InvalidArgumentError("the model has no placement units");
  std::map<std::string_view, size_t> seen;
  *total = 0;
  for (size_t i = 0; i < units.size(); ++i) {
    const auto& u = units[i];
    if (u.name.empty()) {
      return InvalidArgumentError("unit " + std::to_string(i) + " has an empty name");
    }
    auto [it, inserted] = seen.emplace(u.name, i);
    if (!inserted) {
      return InvalidArgumentError("unit '" + u.name + "' appears twice (units " +
                                  std::to_string(it->second) + " and " + std::to_string(i) + ")");
    }
    if (u.bytes > kMaxModelBytes || *total + u.bytes > kMaxModelBytes) {
      return InvalidArgumentError("unit '" + u.name + "': the model is larger than 4 EiB");
    }
    *total += u.bytes;
  }
  return Status::OK();
}

StatusOr<std::vector<DeviceId>> ParseDonors(std::string_view text) {
  std::vector<DeviceId> donors;
  size_t start = 0;
  size_t index = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view item = text.substr(start, end - start);
    ++index;
    if (config::TrimSpace(item).empty()) {
      return InvalidArgumentError("donor_device '" + std::string(text) + "': entry " +
                                  std::to_string(index) + " at character " +
                                  std::to_string(start + 1) + " is empty");
    }
    auto id = DeviceId::Parse(item);
    if (!id.ok()) {
      return InvalidArgumentError("donor_device '" + std::string(text) + "': entry " +
                                  std::to_string(index) + ": " +
                                  std::string(id.status().message()));
    }
    if (std::find(donors.begin(), donors.end(), *id) != donors.end()) {
      return InvalidArgumentError("donor_device '" + std::string(text) + "': " + id->ToString() +
                                  " is listed twice; each donor may appear once");
    }
    donors.push_back(*id);
    start = end + 1;
  }
  return donors;
}

// DisTorch2's quota after its round trip through a 4-decimal fraction of total memory.
uint64_t UpstreamRounded(uint64_t quota, uint64_t total) {
  if (total == 0) return quota;
  double fraction = std::round(static_cast<double>(quota) / static_cast<double>(total) * 1e4) / 1e4;
  double bytes = fraction * static_cast<double>(total);
  return bytes <= 0 ? 0 : static_cast<uint64_t>(bytes);
}

// DisTorch2's device order: every non-cpu name sorted as a string, then cpu.
std::vector<size_t> UpstreamOrder(const std::vector<DeviceInfo>& devices,
                                  const std::vector<size_t>& ours) {
  std::vector<size_t> order = ours;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    bool ca = devices[a].id.is_cpu(), cb = devices[b].id.is_cpu();
    if (ca != cb) return cb;
    return devices[a].id.ToString() < devices[b].id.ToString();
  });
  return order;
}

// The most weight bytes the walk may give the compute device besides its pinned units: its
// capacity minus pinned units and headroom, the prefetch estimated from the largest free unit.
uint64_t ComputeWeightRoom(const DeviceInfo& compute, uint64_t pinned_bytes,
                           const Headroom& headroom, uint64_t largest_free) {
  uint64_t need = SatAdd(
      SatAdd(pinned_bytes, headroom.activation_bytes),
      SatAdd(headroom.reserve_bytes,
             internal::MulDiv(largest_free, static_cast<uint64_t>(headroom.prefetch_depth), 1)));
  return SatSub(compute.capacity_bytes, need);
}

// GPU-only mode: `rest` bytes that the quotas leave go to the devices of the walk (the GPUs of
// the string and the compute device) in proportion to their quotas, each up to its room (its
// capacity minus its quota; `compute_room` for the compute device). Water filling: a device
// whose share would exceed its room gets its room and the others share the rest again. What
// the devices with a quota cannot hold goes to a compute device with no quota of its own, as
// DisTorch2's orphans do. Integer bytes; a byte left over by rounding goes to the first devices
// of the walk. Adds the shares to walk->quota and *spread.
Status SpreadGpuOnly(const std::vector<DeviceInfo>& devices, const std::vector<Quota>& quota,
                     size_t compute, uint64_t rest, uint64_t compute_room, Walk* walk,
                     std::vector<uint64_t>* spread) {
  auto room = [&](size_t d) {
    uint64_t cap = d == compute ? compute_room : devices[d].capacity_bytes;
    return SatSub(cap, SatAdd(walk->quota[d], (*spread)[d]));
  };
  auto weight = [&](size_t d) { return quota[d].named ? quota[d].bytes : 0; };
  uint64_t left = rest;
  std::vector<size_t> active;
  for (size_t d : walk->order) {
    if (weight(d) > 0 && room(d) > 0) active.push_back(d);
  }
  while (left > 0 && !active.empty()) {
    unsigned __int128 total = 0;
    for (size_t d : active) total += weight(d);
    std::vector<size_t> capped;
    std::vector<uint64_t> share(active.size());
    for (size_t i = 0; i < active.size(); ++i) {
      share[i] = static_cast<uint64_t>(static_cast<unsigned __int128>(left) * weight(active[i]) /
                                       total);
      if (share[i] >= room(active[i])) capped.push_back(active[i]);
    }
    if (!capped.empty()) {  // the capped devices take their room; the others share again
      for (size_t d : capped) {
        uint64_t r = room(d);
        (*spread)[d] += r;
        left -= r;
      }
      std::erase_if(active, [&](size_t d) { return room(d) == 0; });
      continue;
    }
    uint64_t given = 0;
    for (size_t i = 0; i < active.size(); ++i) {
      (*spread)[active[i]] += share[i];
      given += share[i];
    }
    left -= given;
    for (size_t i = 0; left > 0 && i < active.size(); ++i) {  // rounding: fewer than |active|
      ++(*spread)[active[i]];
      --left;
    }
  }
  if (left > 0 && weight(compute) == 0) {
    uint64_t r = std::min(left, room(compute));
    (*spread)[compute] += r;
    left -= r;
  }
  if (left > 0) {
    std::string tried;
    for (size_t d : walk->order) {
      if (!tried.empty()) tried += ", ";
      tried += devices[d].id.ToString() + " " + Size((*spread)[d]) + " more than its quota of " +
               Size(weight(d));
    }
    return ResourceExhaustedError(
        "expert_mode_allocations: GPU-only mode (no '*' and no cpu entry): the quotas leave " +
        SizeExact(rest) + " of the model, and the devices it tried can hold only " +
        SizeExact(rest - left) + " of it (" + tried +
        "; each up to its capacity, the compute device's less pinned units and headroom): " +
        SizeExact(left) + " missing; add cpu,* to let the rest go to CPU RAM, or add a device");
  }
  for (size_t d : walk->order) walk->quota[d] += (*spread)[d];
  return Status::OK();
}

std::string OrderText(const std::vector<DeviceInfo>& devices, const std::vector<size_t>& order) {
  std::string out;
  for (size_t d : order) out += (out.empty() ? "" : ", ") + devices[d].id.ToString();
  return out;
}

}  // namespace

std::string_view ModeName(Mode mode) {
  switch (mode) {
    case Mode::kComputeOnly:
      return "compute-only";
    case Mode::kVirtualVram:
      return "virtual-vram";
    case Mode::kBytes:
      return "bytes";
    case Mode::kRatio:
      return "ratio";
    case Mode::kFraction:
      return "fraction";
    case Mode::kWildcardOnly:
      return "wildcard";
  }
  return "unknown";
}

const DeviceId* Plan::DeviceOf(std::string_view unit) const {
  for (const auto& a : assignments) {
    if (a.unit == unit) return &a.device;
  }
  return nullptr;
}

const DevicePlan* Plan::Device(const DeviceId& id) const {
  for (const auto& d : devices) {
    if (d.id == id) return &d;
  }
  return nullptr;
}

StatusOr<Plan> MakePlan(const std::vector<DeviceInfo>& devices_in, const std::vector<Unit>& units,
                        const Request& request) {
  std::vector<DeviceInfo> devices = devices_in;
  FLEET_RETURN_IF_ERROR(ValidateDevices(&devices));
  uint64_t model_bytes = 0;
  FLEET_RETURN_IF_ERROR(ValidateUnits(units, &model_bytes));
  const Headroom& headroom = request.headroom;
  if (headroom.prefetch_depth < 0 || headroom.prefetch_depth > kMaxPrefetchDepth) {
    return InvalidArgumentError("prefetch depth " + std::to_string(headroom.prefetch_depth) +
                                " is outside 0.." + std::to_string(kMaxPrefetchDepth));
  }
  auto index_of = [&](const DeviceId& id) -> std::optional<size_t> {
    for (size_t i = 0; i < devices.size(); ++i) {
      if (devices[i].id == id) return i;
    }
    return std::nullopt;
  };
  auto compute_id = DeviceId::Parse(request.compute_device);
  if (!compute_id.ok()) {
    return InvalidArgumentError("compute_device: " + std::string(compute_id.status().message()));
  }
  auto compute_index = index_of(*compute_id);
  if (!compute_index) {
    return NotFoundError("compute_device " + compute_id->ToString() +
                         " is not in the device table (devices: " + DeviceList(devices) + ")");
  }
  const size_t compute = *compute_index;
  const double vvram = request.virtual_vram_gb;
  if (!std::isfinite(vvram) || vvram < 0 || vvram > 128) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%g", vvram);
    return InvalidArgumentError(std::string("virtual_vram_gb ") + buf +
                                " is outside 0..128 (GiB, as the DisTorch2 node)");
  }
  FLEET_ASSIGN_OR_RETURN(std::vector<DeviceId> donors, ParseDonors(request.donor_device));

  Plan plan;
  plan.compute_device = *compute_id;
  plan.model_bytes = model_bytes;
  plan.eject_models = request.eject_models;
  plan.keep_loaded = request.keep_loaded;
  plan.activation_bytes = headroom.activation_bytes;
  plan.reserve_bytes = headroom.reserve_bytes;

  uint64_t pinned_bytes = 0;
  for (const auto& u : units) {
    if (u.pinned) pinned_bytes += u.bytes;
  }
  const uint64_t free_bytes = model_bytes - pinned_bytes;

  std::vector<Quota> quota(devices.size());
  std::string_view expert = config::TrimSpace(request.expert_mode_allocations);
  bool upstream_bytes_mode = false;
  bool gpu_only = false;
  if (expert.empty() && !request.expert_mode_allocations.empty()) {
    plan.deviations.push_back(
        {"whitespace-expert",
         "expert_mode_allocations holds only whitespace: DisTorch2 treats it as a fraction "
         "string with no entries (everything on the compute device, ignoring virtual_vram_gb); "
         "we treat it as empty"});
  }
  if (!expert.empty()) {
    FLEET_ASSIGN_OR_RETURN(internal::ExpertString parsed,
                           internal::ParseExpert(request.expert_mode_allocations));
    plan.mode = parsed.mode;
    if (vvram > 0) {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "%g", vvram);
      plan.warnings.push_back(std::string("virtual_vram_gb (") + buf +
                              ") is ignored for placement because expert_mode_allocations is "
                              "set (as in DisTorch2)");
    }
    if (!parsed.upstream_difference.empty()) {
      plan.deviations.push_back({"mode-by-token", parsed.upstream_difference});
    }
    if (parsed.has_tb_unit) {
      plan.deviations.push_back({"tb-terabytes",
                                 "a value with a t/tb/tib unit is terabytes (2^40) here; "
                                 "DisTorch2 did not know the unit and read '4tb' as 4 bytes"});
    }
    if (!parsed.normalised_devices.empty()) {
      plan.deviations.push_back({"device-names", "read " + parsed.normalised_devices +
                                                     " (trimmed, any case); DisTorch2 passed "
                                                     "the text to torch, which raised"});
    }
    if (!parsed.duplicates.empty()) {
      plan.deviations.push_back(
          {"duplicate-devices",
           "a device named twice, " + parsed.duplicates +
               ", gets the sum of its values; DisTorch2 kept only the last value (in bytes "
               "mode after taking both from the model, so the difference went missing)"});
    }
    for (const auto& w : parsed.warnings) plan.warnings.push_back(w);
    std::string lower(expert);
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    upstream_bytes_mode = lower.find_first_of("gmkb") != std::string::npos;

    // Ratios: without a wildcard they share the whole model (as DisTorch2); with one they are
    // percentages of the model and the wildcard takes the rest.
    bool any_wildcard = false;
    unsigned __int128 ratio_sum = 0;
    auto ratio_units = [](internal::Decimal d) -> uint64_t {  // percent x 10^6
      uint64_t v = d.mantissa;
      for (int i = d.scale; i < 6; ++i) v *= 10;
      return v;
    };
    for (const auto& e : parsed.entries) {
      any_wildcard |= e.kind == TokenKind::kWildcard;
      if (e.kind == TokenKind::kRatio) {
        uint64_t pow10 = 1;
        for (int i = 0; i < e.number.scale && i < 7; ++i) pow10 *= 10;
        if (e.number.scale > 6 || e.number.mantissa / pow10 >= 1000000000ull) {
          return InvalidArgumentError("expert_mode_allocations: " + e.Where() +
                                      ": ratio has too many digits (at most 9 before and 6 "
                                      "after the point)");
        }
        ratio_sum += ratio_units(e.number);
        if (ratio_sum >= 1000000000000000000ull) {  // keeps every sum below in 64 bits
          return InvalidArgumentError("expert_mode_allocations: " + e.Where() +
                                      ": the ratios add up to 10^12% or more");
        }
      }
    }
    if (parsed.mode == Mode::kRatio) {
      if (any_wildcard && ratio_sum > 100ull * 1000000) {
        return InvalidArgumentError(
            "expert_mode_allocations: the percentages add up to more "
            "than 100% next to a '*' entry, which takes the rest");
      }
      if (!any_wildcard && ratio_sum == 0) {
        return InvalidArgumentError(
            "expert_mode_allocations: the ratios add up to 0%, so "
            "they give no share to any device");
      }
    }
    uint64_t ratio_den = any_wildcard ? 100ull * 1000000 : static_cast<uint64_t>(ratio_sum);
    std::vector<uint64_t> ratio_of(devices.size(), 0);  // percent x 10^6, duplicates added
    for (const auto& e : parsed.entries) {
      auto d = index_of(e.id);
      if (!d) {
        return NotFoundError("expert_mode_allocations: " + e.Where() + ": " + e.id.ToString() +
                             " is not in the device table (devices: " + DeviceList(devices) + ")");
      }
      Quota& q = quota[*d];
      q.named = true;
      switch (e.kind) {  // a device named twice: the entries are of one kind, added
        case TokenKind::kBytes:
          q.bytes = SatAdd(q.bytes, e.bytes);
          break;
        case TokenKind::kFraction:
          q.bytes = SatAdd(q.bytes, internal::MulDecimal(devices[*d].total_bytes, e.number));
          break;
        case TokenKind::kRatio:
          ratio_of[*d] += ratio_units(e.number);
          q.bytes = internal::MulDiv(model_bytes, ratio_of[*d], ratio_den);
          break;
        case TokenKind::kWildcard:
          q.wildcard = true;
          break;
      }
    }
    if (parsed.mode == Mode::kRatio && !any_wildcard) {
      // Largest remainder: the shares add up to the model exactly.
      uint64_t given = 0;
      for (const auto& q : quota) given += q.named ? q.bytes : 0;
      for (size_t i = 0; i < quota.size() && given < model_bytes; ++i) {
        if (quota[i].named) {
          ++quota[i].bytes;
          ++given;
        }
      }
    }
    if (!any_wildcard) {
      auto cpu = index_of(DeviceId::Cpu());
      if (parsed.mode == Mode::kBytes && cpu && quota[*cpu].named) {
        quota[*cpu].wildcard = true;
        plan.warnings.push_back(
            "no '*' entry: cpu takes the rest of the model, as DisTorch2's "
            "default wildcard in bytes mode (write cpu,* to say so)");
      } else if (!(cpu && quota[*cpu].named)) {
        gpu_only = true;
      }
    }
  } else if (vvram > 0) {
    plan.mode = Mode::kVirtualVram;
    uint64_t need = static_cast<uint64_t>(std::llround(vvram * static_cast<double>(1ull << 30)));
    const uint64_t asked = need;
    uint64_t given = 0;
    for (const auto& id : donors) {
      if (id == *compute_id) {
        plan.warnings.push_back("donor_device " + id.ToString() +
                                " is the compute device and cannot donate to itself; ignored");
        continue;
      }
      auto d = index_of(id);
      if (!d) {
        return NotFoundError("donor_device " + id.ToString() +
                             " is not in the device table (devices: " + DeviceList(devices) + ")");
      }
      uint64_t donation = std::min(need, devices[*d].capacity_bytes);
      if (donation < std::min(need, devices[*d].total_bytes)) {
        plan.deviations.push_back(
            {"donor-capacity", "DisTorch2 lets a donor give up to 100% of its total memory; " +
                                   id.ToString() + " gives at most its capacity here (" +
                                   Size(devices[*d].capacity_bytes) + ", not " +
                                   Size(std::min(need, devices[*d].total_bytes)) + ")"});
      }
      quota[*d] = {true, false, donation};
      need -= donation;
      given += donation;
    }
    if (need > 0) {
      plan.warnings.push_back("virtual_vram_gb asks for " + Size(asked) +
                              " but the donors can hold only " + Size(given) +
                              "; the rest stays on the compute device (DisTorch2 dropped it "
                              "silently)");
    }
    quota[compute] = {true, false, SatSub(model_bytes, given)};
    if (given == 0) plan.mode = Mode::kComputeOnly;
  } else {
    plan.mode = Mode::kComputeOnly;
  }
  if (plan.mode == Mode::kComputeOnly) quota[compute] = {true, true, 0};

  // The walk: compute first (it keeps the tail), then the named devices in numeric order, then
  // the wildcard devices; each takes the next contiguous range towards the head.
  Walk walk;
  walk.quota.assign(devices.size(), 0);
  walk.order.push_back(compute);
  std::vector<size_t> wildcards;
  for (size_t i = 0; i < devices.size(); ++i) {
    if (i == compute || !quota[i].named) continue;
    if (quota[i].wildcard) {
      wildcards.push_back(i);
    } else {
      walk.order.push_back(i);
      walk.quota[i] = quota[i].bytes;
    }
  }
  uint64_t largest_free = 0;
  for (const auto& u : units) {
    if (!u.pinned) largest_free = std::max(largest_free, u.bytes);
  }
  if (quota[compute].wildcard) {
    uint64_t others = 0;
    for (size_t i = 1; i < walk.order.size(); ++i)
      others = SatAdd(others, walk.quota[walk.order[i]]);
    uint64_t rest = SatSub(free_bytes, others);
    if (!wildcards.empty()) {
      // Several wildcards: each but the last takes what fits its capacity.
      uint64_t need_est = SatAdd(
          SatAdd(pinned_bytes, headroom.activation_bytes),
          SatAdd(
              headroom.reserve_bytes,
              internal::MulDiv(largest_free, static_cast<uint64_t>(headroom.prefetch_depth), 1)));
      rest = std::min(rest, SatSub(devices[compute].capacity_bytes, need_est));
    }
    walk.quota[compute] = rest;
  } else if (quota[compute].named) {
    walk.quota[compute] = SatSub(quota[compute].bytes, pinned_bytes);
  }
  for (size_t k = 0; k < wildcards.size(); ++k) {
    walk.order.push_back(wildcards[k]);
    walk.quota[wildcards[k]] =
        k + 1 == wildcards.size() ? kUnbounded : devices[wildcards[k]].capacity_bytes;
  }
  std::vector<uint64_t> spread(devices.size(), 0);  // GPU-only: bytes added to each quota
  if (gpu_only) {
    // A quota beyond what its device can hold would only fail the capacity check (upstream runs
    // out of memory): in GPU-only mode each device's quota is capped at its room, the compute
    // device's less pinned units and headroom, and the other GPUs of the walk take the rest
    // (`cuda:0,12gb;cuda:1,16gb` with a 11.7 GB model: cuda:0 keeps room for activations).
    const uint64_t compute_room = ComputeWeightRoom(devices[compute], pinned_bytes, headroom,
                                                    largest_free);
    for (size_t d : walk.order) {
      const uint64_t room = d == compute ? compute_room : devices[d].capacity_bytes;
      if (walk.quota[d] > room) {
        char buf[200];
        std::snprintf(buf, sizeof(buf),
                      "GPU-only mode: %s holds at most %.2f MB of weights, less than its quota of "
                      "%.2f MB; the other GPUs take the rest",
                      devices[d].id.ToString().c_str(), static_cast<double>(room) / (1 << 20),
                      static_cast<double>(walk.quota[d]) / (1 << 20));
        plan.notes.push_back(buf);
        walk.quota[d] = room;
      }
    }
    uint64_t quotas = 0;
    for (size_t d : walk.order) quotas = SatAdd(quotas, walk.quota[d]);
    const uint64_t rest = SatSub(free_bytes, quotas);
    if (rest > 0) {
      FLEET_RETURN_IF_ERROR(SpreadGpuOnly(devices, quota, compute, rest,
                                          ComputeWeightRoom(devices[compute], pinned_bytes,
                                                            headroom, largest_free),
                                          &walk, &spread));
      size_t receivers = 0;
      for (uint64_t b : spread) receivers += b > 0 ? 1 : 0;
      char buf[160];
      std::snprintf(buf, sizeof(buf),
                    "GPU-ONLY MODE: Distributed remaining %.2f MB across %zu GPUs (no CPU "
                    "fallback)",
                    static_cast<double>(rest) / (1 << 20), receivers);
      plan.notes.push_back(buf);
    }
  }
  WalkResult result = RunWalk(units, compute, walk);
  for (size_t w : walk.order) {  // what each wildcard took beyond its own quota (DisTorch2's log)
    if (!quota[w].wildcard || plan.mode == Mode::kComputeOnly) continue;
    uint64_t took = 0;
    for (size_t u = 0; u < units.size(); ++u) {
      if (result.device[u] == w && !units[u].pinned) took += units[u].bytes;
    }
    took = SatSub(took, quota[w].bytes);
    if (took == 0) continue;
    char buf[160];
    std::snprintf(buf, sizeof(buf), "Assigning remaining %.2f MB of model to wildcard device '%s'",
                  static_cast<double>(took) / (1 << 20), devices[w].id.ToString().c_str());
    plan.notes.push_back(buf);
  }

  // The plan's tables.
  for (size_t i = 0; i < devices.size(); ++i) {
    DevicePlan dp;
    dp.id = devices[i].id;
    dp.total_bytes = devices[i].total_bytes;
    dp.capacity_bytes = devices[i].capacity_bytes;
    if (quota[i].named && !quota[i].wildcard) dp.quota_bytes = quota[i].bytes;
    plan.devices.push_back(dp);
  }
  std::vector<std::string> orphan_names;
  for (size_t u = 0; u < units.size(); ++u) {
    size_t d = result.device[u];
    plan.assignments.push_back(
        {units[u].name, units[u].bytes, devices[d].id, units[u].pinned, units[u].pin_reason});
    DevicePlan& dp = plan.devices[d];
    dp.units.push_back(u);
    dp.weight_bytes += units[u].bytes;
    if (units[u].pinned) dp.pinned_bytes += units[u].bytes;
    if (result.orphan[u] && !quota[compute].wildcard) {
      plan.orphan_bytes += units[u].bytes;
      orphan_names.push_back(units[u].name);
    }
  }
  for (size_t i = 0; i < devices.size(); ++i) {
    DevicePlan& dp = plan.devices[i];
    dp.role =
        i == compute ? "compute" : (quota[i].named || dp.weight_bytes > 0 ? "donor" : "unused");
  }

  // Headroom on the compute device.
  uint64_t largest_streamed = 0;
  for (size_t u = 0; u < units.size(); ++u) {
    if (result.device[u] != compute) largest_streamed = std::max(largest_streamed, units[u].bytes);
  }
  plan.prefetch_bytes =
      internal::MulDiv(largest_streamed, static_cast<uint64_t>(headroom.prefetch_depth), 1);
  plan.devices[compute].headroom_bytes =
      SatAdd(SatAdd(plan.prefetch_bytes, headroom.activation_bytes), headroom.reserve_bytes);

  // Capacity check of the whole plan.
  std::string over;
  for (const auto& dp : plan.devices) {
    uint64_t need = SatAdd(dp.weight_bytes, dp.headroom_bytes);
    if (need <= dp.capacity_bytes) continue;
    uint64_t missing = need - dp.capacity_bytes;
    if (!over.empty()) over += "; ";
    over += dp.id.ToString() + " needs " + Size(need) + " (weights " + Size(dp.weight_bytes);
    if (dp.pinned_bytes > 0) over += " incl. pinned " + Size(dp.pinned_bytes);
    if (dp.headroom_bytes > 0) {
      over += ", prefetch " + std::to_string(headroom.prefetch_depth) + " x " +
              Size(largest_streamed) + ", activations " + Size(headroom.activation_bytes) +
              ", reserve " + Size(headroom.reserve_bytes);
    }
    over +=
        ") but its capacity is " + Size(dp.capacity_bytes) + ": " + SizeExact(missing) + " missing";
    if (dp.id == plan.compute_device) {
      char hint[160];
      double gib = std::ceil(static_cast<double>(missing) / (1ull << 30) * 10) / 10;
      if (plan.mode == Mode::kComputeOnly || plan.mode == Mode::kVirtualVram) {
        std::snprintf(hint, sizeof(hint),
                      " (raise virtual_vram_gb by at least %.1f or add a donor)", gib);
      } else {
        std::snprintf(hint, sizeof(hint), " (move at least %.1f GiB to another device)", gib);
      }
      over += hint;
    }
  }
  if (!over.empty()) {
    return ResourceExhaustedError("the plan does not fit: " + over);
  }

  // The v2 expert string: the share of each device's total memory the plan uses.
  std::vector<size_t> listed = {compute};
  for (size_t i = 0; i < devices.size(); ++i) {
    if (i != compute && plan.devices[i].role == "donor") listed.push_back(i);
  }
  for (size_t i : listed) {
    if (devices[i].total_bytes == 0) continue;
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.4f",
                  static_cast<double>(plan.devices[i].weight_bytes) /
                      static_cast<double>(devices[i].total_bytes));
    if (!plan.expert_string.empty()) plan.expert_string += ";";
    plan.expert_string += devices[i].id.ToString() + "," + buf;
  }

  // Warnings and the deviations that changed this plan.
  if (plan.orphan_bytes > 0 && plan.mode != Mode::kVirtualVram && !gpu_only) {
    plan.warnings.push_back(std::to_string(orphan_names.size()) + " unit(s) (" +
                            Size(plan.orphan_bytes) + ": " + NameList(orphan_names, 3) +
                            ") fit no device's remaining quota and stay on the compute device " +
                            plan.compute_device.ToString() +
                            " (DisTorch2's orphans); raise a quota or add a '*' entry");
  }
  uint64_t spread_bytes = 0;
  std::string spread_to;
  for (size_t d : walk.order) {
    if (spread[d] == 0) continue;
    spread_bytes += spread[d];
    spread_to += (spread_to.empty() ? "" : ", ") + devices[d].id.ToString() + " " +
                 Size(spread[d]);
  }
  if (spread_bytes > 0) {
    plan.deviations.push_back(
        {"gpu-only",
         "no '*' and no cpu entry: the " + Size(spread_bytes) +
             " that the quotas leave are spread over the GPUs in proportion to their quotas (" +
             spread_to + "); DisTorch2 would have " +
             (upstream_bytes_mode ? "put them on cpu, its default wildcard in bytes mode"
                                  : "left them on the compute device " +
                                        plan.compute_device.ToString() + " (orphans)")});
  }
  bool has_donor = false;
  for (size_t i = 0; i < devices.size(); ++i) has_donor |= i != compute && quota[i].named;
  std::vector<std::string> pinned_here;
  uint64_t pinned_here_bytes = 0;
  std::string first_reason;
  for (const auto& u : units) {
    if (u.pinned && !u.upstream_pins) {
      pinned_here.push_back(u.name);
      pinned_here_bytes += u.bytes;
      if (first_reason.empty()) first_reason = u.pin_reason;
    }
  }
  if (has_donor && !pinned_here.empty()) {
    plan.deviations.push_back(
        {"pinned-units", "DisTorch2 would let " + NameList(pinned_here) + " (" +
                             Size(pinned_here_bytes) + ") move to donors; they stay on " +
                             plan.compute_device.ToString() +
                             (first_reason.empty() ? "" : ": " + first_reason)});
  }
  if (has_donor) {
    // What DisTorch2's name order (compute device without priority) would have placed.
    Walk upstream = walk;
    upstream.order = UpstreamOrder(devices, walk.order);
    uint64_t explicit_sum = 0;
    for (size_t d : walk.order) {
      if (walk.quota[d] != kUnbounded) explicit_sum = SatAdd(explicit_sum, walk.quota[d]);
    }
    for (size_t d : upstream.order) {
      if (upstream.quota[d] == kUnbounded) upstream.quota[d] = SatSub(free_bytes, explicit_sum);
    }
    if (upstream.order != walk.order && RunWalk(units, compute, upstream).device != result.device) {
      plan.deviations.push_back(
          {"numeric-order",
           "DisTorch2 walks devices in name order (" + OrderText(devices, upstream.order) +
               ") with no priority for the compute device, so " +
               devices[upstream.order.front()].id.ToString() +
               " would have taken the model's tail; here the compute device keeps the tail and "
               "the others follow in numeric order (" +
               OrderText(devices, walk.order) + ")"});
    }
    Walk first_fit = walk;
    first_fit.first_fit = true;
    WalkResult ff = RunWalk(units, compute, first_fit);
    if (ff.device != result.device) {
      std::string example;
      for (size_t u = 0; u < units.size(); ++u) {
        if (ff.device[u] != result.device[u]) {
          example = "'" + units[u].name + "' would have gone to " +
                    devices[ff.device[u]].id.ToString() + " instead of " +
                    devices[result.device[u]].id.ToString();
          break;
        }
      }
      plan.deviations.push_back(
          {"contiguous-ranges",
           "DisTorch2 fills first-fit, so a later unit may fill a gap on an earlier device (" +
               example +
               "); here every device gets one contiguous range, so a pipelined step "
               "crosses each device boundary once"});
    }
    if (plan.mode == Mode::kBytes || plan.mode == Mode::kRatio || plan.mode == Mode::kVirtualVram) {
      Walk rounded = walk;
      std::string example;
      for (size_t d = 0; d < devices.size(); ++d) {
        if (!quota[d].named || quota[d].wildcard) continue;
        uint64_t exact = SatAdd(quota[d].bytes, spread[d]);
        uint64_t r = UpstreamRounded(exact, devices[d].total_bytes);
        rounded.quota[d] = d == compute ? SatSub(r, pinned_bytes) : r;
        if (r != exact && example.empty()) {
          example = devices[d].id.ToString() + "'s quota of " + SizeExact(exact) +
                    " would have been " + SizeExact(r);
        }
      }
      if (RunWalk(units, compute, rounded).device != result.device) {
        plan.deviations.push_back({"integer-quotas",
                                   "DisTorch2 rounds quotas through 4-decimal fractions of total "
                                   "memory (" +
                                       example +
                                       "), which moves units; quotas here are "
                                       "exact integer bytes"});
      }
    }
  }
  bool upstream_evicts = vvram > 0;  // DisTorch2: a donor list in the string means evict all
  if (request.eject_models != upstream_evicts) {
    plan.deviations.push_back(
        {"eject-models",
         std::string("eject_models=") + (request.eject_models ? "true" : "false") +
             " is honoured: DisTorch2 ignores the input and evicts other models exactly when "
             "virtual_vram_gb > 0, so it would " +
             (upstream_evicts ? "" : "not ") + "have evicted them"});
  }
  return plan;
}

}  // namespace fleet::placement
