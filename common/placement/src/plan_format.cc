// Plan::ToJson, Plan::ToText and Plan::ExplainText.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "fleet/config/bytes.h"
#include "fleet/placement/placement.h"

namespace fleet::placement {
namespace {

std::string Size(uint64_t bytes) { return config::FormatBytes(bytes); }

std::string Format(const char* fmt, auto... args) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), fmt, args...);
  return buf;
}

// "double_blocks.5..final_layer (52)" for each run of consecutive unit indices.
std::string Ranges(const Plan& plan, const std::vector<size_t>& units) {
  std::string out;
  for (size_t i = 0; i < units.size();) {
    size_t j = i;
    while (j + 1 < units.size() && units[j + 1] == units[j] + 1) ++j;
    bool pinned = true;
    for (size_t k = i; k <= j; ++k) pinned &= plan.assignments[units[k]].pinned;
    if (!out.empty()) out += ", ";
    out += plan.assignments[units[i]].unit;
    if (j > i) out += ".." + plan.assignments[units[j]].unit;
    out += " (" + std::to_string(j - i + 1) + (pinned ? ", pinned)" : ")");
    i = j + 1;
  }
  return out.empty() ? "-" : out;
}

}  // namespace

std::string Plan::ToJson() const {
  nlohmann::ordered_json out;
  out["mode"] = std::string(ModeName(mode));
  out["compute_device"] = compute_device.ToString();
  out["model_bytes"] = model_bytes;
  out["devices"] = nlohmann::ordered_json::array();
  for (const auto& d : devices) {
    nlohmann::ordered_json names = nlohmann::ordered_json::array();
    for (size_t u : d.units) names.push_back(assignments[u].unit);
    nlohmann::ordered_json dj;
    dj["id"] = d.id.ToString();
    dj["role"] = d.role;
    dj["total_bytes"] = d.total_bytes;
    dj["capacity_bytes"] = d.capacity_bytes;
    dj["quota_bytes"] = d.quota_bytes ? nlohmann::ordered_json(*d.quota_bytes) : nullptr;
    dj["bytes"] = d.weight_bytes;
    dj["pinned_bytes"] = d.pinned_bytes;
    dj["headroom_bytes"] = d.headroom_bytes;
    dj["units"] = std::move(names);
    out["devices"].push_back(std::move(dj));
  }
  out["assignments"] = nlohmann::ordered_json::array();
  for (const auto& a : assignments) {
    nlohmann::ordered_json aj;
    aj["unit"] = a.unit;
    aj["device"] = a.device.ToString();
    aj["bytes"] = a.bytes;
    aj["pinned"] = a.pinned;
    if (a.pinned) aj["pin_reason"] = a.pin_reason;
    out["assignments"].push_back(std::move(aj));
  }
  out["headroom"] = {{"prefetch_bytes", prefetch_bytes},
                     {"activation_bytes", activation_bytes},
                     {"reserve_bytes", reserve_bytes}};
  out["orphan_bytes"] = orphan_bytes;
  out["expert_string"] = expert_string;
  out["notes"] = notes;
  out["warnings"] = warnings;
  out["deviations"] = nlohmann::ordered_json::array();
  for (const auto& d : deviations) {
    out["deviations"].push_back({{"code", d.code}, {"sentence", d.sentence}});
  }
  out["eject_models"] = eject_models;
  out["keep_loaded"] = keep_loaded;
  return out.dump(2);
}

std::string Plan::ToText() const {
  std::string out;
  out += Format("Plan: %s mode, compute device %s, model %s in %zu units\n\n",
                std::string(ModeName(mode)).c_str(), compute_device.ToString().c_str(),
                Size(model_bytes).c_str(), assignments.size());
  out += Format("%-10s %-8s %12s %12s %12s %12s %12s %12s\n", "device", "role", "total", "capacity",
                "quota", "weights", "headroom", "free");
  for (const auto& d : devices) {
    uint64_t used = d.weight_bytes + d.headroom_bytes;
    std::string quota = d.quota_bytes ? Size(*d.quota_bytes) : (d.role == "unused" ? "-" : "rest");
    out += Format("%-10s %-8s %12s %12s %12s %12s %12s %12s\n", d.id.ToString().c_str(),
                  d.role.c_str(), Size(d.total_bytes).c_str(), Size(d.capacity_bytes).c_str(),
                  quota.c_str(), Size(d.weight_bytes).c_str(), Size(d.headroom_bytes).c_str(),
                  Size(d.capacity_bytes >= used ? d.capacity_bytes - used : 0).c_str());
  }
  out += Format("\n%-10s %6s %12s %8s  %s\n", "device", "units", "bytes", "% model", "ranges");
  for (const auto& d : devices) {
    if (d.units.empty()) continue;
    double pct =
        model_bytes ? 100.0 * static_cast<double>(d.weight_bytes) / static_cast<double>(model_bytes)
                    : 0.0;
    out += Format("%-10s %6zu %12s %7.1f%%  ", d.id.ToString().c_str(), d.units.size(),
                  Size(d.weight_bytes).c_str(), pct);
    out += Ranges(*this, d.units) + "\n";
  }
  bool any_pinned = false;
  for (const auto& a : assignments) any_pinned |= a.pinned;
  if (any_pinned) {
    out += "\nPinned to " + compute_device.ToString() + ":\n";
    for (const auto& a : assignments) {
      if (!a.pinned) continue;
      out +=
          Format("  %-24s %12s  %s\n", a.unit.c_str(), Size(a.bytes).c_str(), a.pin_reason.c_str());
    }
  }
  out += "\nHeadroom on " + compute_device.ToString() + ": prefetch " + Size(prefetch_bytes) +
         ", activations " + Size(activation_bytes) + ", reserve " + Size(reserve_bytes) + "\n";
  if (orphan_bytes > 0) out += "Orphans on the compute device: " + Size(orphan_bytes) + "\n";
  out += "eject_models: " +
         std::string(eject_models ? "yes (if it does not fit, other models are evicted, least "
                                    "recently used first, keep_loaded ones too)"
                                  : "no (if it does not fit, only models without keep_loaded "
                                    "are evicted)") +
         "; keep loaded: " + (keep_loaded ? "yes" : "no") + "\n";
  out += "\nv2 Expert String: " + expert_string + "\n";
  for (const auto& n : notes) out += n + "\n";
  for (const auto& w : warnings) out += "warning: " + w + "\n";
  if (!deviations.empty()) {
    out += std::to_string(deviations.size()) +
           " deviation(s) from DisTorch2 changed this plan (--explain lists them)\n";
  }
  return out;
}

std::string Plan::ExplainText() const {
  if (deviations.empty()) return "No deviation from DisTorch2 changed this plan.\n";
  std::string out = "Deviations from DisTorch2 that changed this plan:\n";
  for (const auto& d : deviations) out += "  [" + d.code + "] " + d.sentence + "\n";
  return out;
}

}  // namespace fleet::placement
