// `fleet devices`: what this machine offers (CUDA devices when built with CUDA, and the CPU).
#include <cstdio>
#include <nlohmann/json.hpp>

#include "command.h"
#include "fleet/config/bytes.h"
#include "fleet/config/options.h"
#include "fleet/device/device.h"

namespace fleet::cli {
namespace {

int RunDevices(const std::vector<std::string>& args) {
  bool json = false;
  config::OptionSet set("fleet devices", "List the devices of this machine with their memory.");
  set.Add("json", &json, "Print JSON instead of a table");
  int rc = 0;
  auto positional = ParseFlags("fleet devices", set, args, &rc);
  if (!positional) return rc;
  if (!positional->empty()) {
    return ReportError("fleet devices", json, InvalidArgumentError("unexpected argument '" + (*positional)[0] + "'"), 2);
  }
  std::string why;
  auto devices = device::DiscoverAll(&why);
  if (json) {
    nlohmann::ordered_json out = nlohmann::ordered_json::array();
    for (const auto& d : devices) {
      out.push_back({{"id", d.id.ToString()},
                     {"name", d.name},
                     {"total_bytes", d.total_bytes},
                     {"capacity_bytes", d.capacity_bytes}});
    }
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  std::printf("%-10s %-28s %14s %14s\n", "device", "name", "total", "capacity");
  for (const auto& d : devices) {
    std::printf("%-10s %-28s %14s %14s\n", d.id.ToString().c_str(), d.name.c_str(),
                config::FormatBytes(d.total_bytes).c_str(),
                config::FormatBytes(d.capacity_bytes).c_str());
  }
  if (!why.empty()) std::printf("(%s)\n", why.c_str());
  return 0;
}

}  // namespace

FLEET_REGISTER_COMMAND(devices, "List this machine's devices and their memory", RunDevices);

}  // namespace fleet::cli
