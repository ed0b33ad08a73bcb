// ParseDeviceTable: the what-if device table of `fleet plan --devices`.
#include <algorithm>
#include <cctype>

#include "fleet/config/bytes.h"
#include "fleet/placement/placement.h"

namespace fleet::placement {

StatusOr<std::vector<device::DeviceInfo>> ParseDeviceTable(std::string_view text) {
  std::vector<device::DeviceInfo> out;
  auto fail = [&](size_t index, size_t position, std::string_view entry, std::string_view why) {
    return InvalidArgumentError("devices: entry " + std::to_string(index) + " '" +
                                std::string(entry) + "' at character " + std::to_string(position) +
                                ": " + std::string(why));
  };
  size_t start = 0;
  size_t index = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view entry = text.substr(start, end - start);
    size_t position = start + 1;
    start = end + 1;
    ++index;
    bool blank = std::all_of(entry.begin(), entry.end(),
                             [](char c) { return std::isspace(static_cast<unsigned char>(c)); });
    if (blank) {
      return fail(index, position, entry, "empty (expected id=TOTAL[/CAPACITY], e.g. cuda:0=24gb)");
    }
    size_t eq = entry.find('=');
    if (eq == std::string_view::npos) {
      return fail(index, position, entry,
                  "no '=' (expected id=TOTAL[/CAPACITY], e.g. cuda:0=24gb)");
    }
    auto id = device::DeviceId::Parse(entry.substr(0, eq));
    if (!id.ok()) return fail(index, position, entry, id.status().message());
    std::string_view sizes = entry.substr(eq + 1);
    std::string_view total_text = sizes;
    std::string_view capacity_text;
    size_t slash = sizes.find('/');
    if (slash != std::string_view::npos) {
      total_text = sizes.substr(0, slash);
      capacity_text = sizes.substr(slash + 1);
    }
    auto total = config::ParseBytes(total_text);
    if (!total.ok())
      return fail(index, position, entry, "total: " + std::string(total.status().message()));
    if (*total == 0) return fail(index, position, entry, "total must be above 0");
    device::DeviceInfo info;
    info.id = *id;
    info.name = id->ToString();
    info.total_bytes = *total;
    if (slash != std::string_view::npos) {
      auto capacity = config::ParseBytes(capacity_text);
      if (!capacity.ok()) {
        return fail(index, position, entry,
                    "capacity: " + std::string(capacity.status().message()));
      }
      if (*capacity > *total) {
        return fail(index, position, entry,
                    "capacity " + config::FormatBytes(*capacity) + " is above the total " +
                        config::FormatBytes(*total));
      }
      info.capacity_bytes = *capacity;
    } else {
      info.capacity_bytes = *total - device::DefaultReserve(info.id, *total);
    }
    for (const auto& prev : out) {
      if (prev.id == info.id) {
        return fail(index, position, entry, info.id.ToString() + " is listed twice");
      }
    }
    out.push_back(info);
  }
  std::sort(out.begin(), out.end(),
            [](const device::DeviceInfo& a, const device::DeviceInfo& b) { return a.id < b.id; });
  return out;
}

}  // namespace fleet::placement
