// Pin rules per family, the JSON unit list and the built-in example models.
#include "fleet/placement/units.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <nlohmann/json.hpp>

#include "fleet/config/bytes.h"
#include "fleet/config/text.h"

namespace fleet::placement {
namespace {

std::string_view FirstComponent(std::string_view name) { return name.substr(0, name.find('.')); }

bool HasComponent(std::string_view name, std::string_view component) {
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('.', start);
    if (end == std::string_view::npos) end = name.size();
    if (name.substr(start, end - start) == component) return true;
    start = end + 1;
  }
  return false;
}

constexpr std::array<std::string_view, 5> kFluxStem = {"img_in", "time_in", "guidance_in",
                                                       "vector_in", "txt_in"};
constexpr std::array<std::string_view, 5> kWanStem = {
    "patch_embedding", "time_embedding", "time_projection", "text_embedding", "img_emb"};

}  // namespace

StatusOr<Family> ParseFamily(std::string_view text) {
  std::string t = config::AsciiLower(text);
  if (t == "none") return Family::kNone;
  if (t == "flux") return Family::kFlux;
  if (t == "wan") return Family::kWan;
  if (t == "text-encoder" || t == "clip" || t == "t5") return Family::kTextEncoder;
  return InvalidArgumentError("unknown family '" + std::string(text) +
                              "' (known: none, flux, wan, text-encoder, clip, t5)");
}

std::string_view FamilyName(Family family) {
  switch (family) {
    case Family::kNone:
      return "none";
    case Family::kFlux:
      return "flux";
    case Family::kWan:
      return "wan";
    case Family::kTextEncoder:
      return "text-encoder";
  }
  return "none";
}

Family GuessFamily(const std::vector<Unit>& units) {
  bool flux = false, blocks = false, wan_stem = false;
  for (const auto& u : units) {
    std::string_view first = FirstComponent(u.name);
    flux |= first == "double_blocks" || first == "single_blocks";
    blocks |= first == "blocks";
    wan_stem |= std::find(kWanStem.begin(), kWanStem.end(), first) != kWanStem.end();
  }
  if (flux) return Family::kFlux;
  if (blocks && wan_stem) return Family::kWan;
  return Family::kNone;
}

void MarkPinnedUnits(Family family, std::vector<Unit>* units) {
  for (auto& u : *units) {
    std::string_view first = FirstComponent(u.name);
    std::string reason;
    bool upstream = false;
    switch (family) {
      case Family::kNone:
        break;
      case Family::kFlux:
        if (std::find(kFluxStem.begin(), kFluxStem.end(), first) != kFluxStem.end()) {
          reason =
              "Flux stem: its outputs (img, txt, vec) feed every block, so it stays with "
              "the compute device";
        }
        break;
      case Family::kWan:
        if (std::find(kWanStem.begin(), kWanStem.end(), first) != kWanStem.end()) {
          reason =
              "WAN stem: its outputs (x, e0, context) feed every block, so it stays with "
              "the compute device";
        }
        break;
      case Family::kTextEncoder: {
        std::string lower = config::AsciiLower(u.name);
        if (lower.find("embed") != std::string::npos || lower.find("wte") != std::string::npos ||
            lower.find("wpe") != std::string::npos) {
          reason =
              "text-encoder embedding: the encoder runs where its embedding lives "
              "(DisTorch2's CLIP head rule)";
          upstream = true;
        } else if (HasComponent(u.name, "shared")) {
          reason =
              "T5 token embedding 'shared': the encoder runs where its embedding lives "
              "(DisTorch2's CLIP head rule misses T5)";
        }
        break;
      }
    }
    if (reason.empty()) continue;
    if (!u.pinned) {
      u.pinned = true;
      u.pin_reason = reason;
      u.upstream_pins = upstream;
    } else if (u.pin_reason.empty()) {
      u.pin_reason = reason;
      u.upstream_pins = upstream;
    }
  }
}

StatusOr<std::vector<Unit>> ParseUnitsJson(std::string_view text, std::string_view source) {
  const std::string where(source);
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::parse_error& e) {
    return InvalidArgumentError(where + ": not valid JSON at byte offset " +
                                std::to_string(e.byte) + ": " + e.what());
  }
  if (!doc.is_array()) {
    return InvalidArgumentError(where +
                                ": expected a JSON list of {name, bytes, pinned} "
                                "objects in model order, got a " +
                                std::string(doc.type_name()));
  }
  std::vector<Unit> units;
  for (size_t i = 0; i < doc.size(); ++i) {
    const auto& e = doc[i];
    std::string at = where + ": element " + std::to_string(i);
    if (!e.is_object()) {
      return InvalidArgumentError(at + ": expected an object {name, bytes, pinned}, got a " +
                                  std::string(e.type_name()));
    }
    for (const auto& [key, value] : e.items()) {
      if (key != "name" && key != "bytes" && key != "pinned" && key != "pin_reason") {
        return InvalidArgumentError(at + ": unknown field '" + key +
                                    "' (known: name, bytes, pinned, pin_reason)");
      }
    }
    Unit u;
    auto name = e.find("name");
    if (name == e.end() || !name->is_string() || name->get<std::string>().empty()) {
      return InvalidArgumentError(at + ": 'name' must be a non-empty string");
    }
    u.name = name->get<std::string>();
    at += " ('" + u.name + "')";
    auto bytes = e.find("bytes");
    if (bytes == e.end()) return InvalidArgumentError(at + ": 'bytes' is missing");
    if (bytes->is_number_unsigned()) {
      u.bytes = bytes->get<uint64_t>();
    } else if (bytes->is_string()) {
      auto parsed = config::ParseBytes(bytes->get<std::string>());
      if (!parsed.ok())
        return InvalidArgumentError(at + ": 'bytes': " + std::string(parsed.status().message()));
      u.bytes = *parsed;
    } else {
      return InvalidArgumentError(at +
                                  ": 'bytes' must be a non-negative integer or a size "
                                  "string such as \"680mb\", got " +
                                  bytes->dump());
    }
    if (auto pinned = e.find("pinned"); pinned != e.end()) {
      if (!pinned->is_boolean()) {
        return InvalidArgumentError(at + ": 'pinned' must be true or false, got " + pinned->dump());
      }
      u.pinned = pinned->get<bool>();
    }
    if (auto reason = e.find("pin_reason"); reason != e.end()) {
      if (!reason->is_string()) return InvalidArgumentError(at + ": 'pin_reason' must be a string");
      u.pin_reason = reason->get<std::string>();
    }
    if (u.pinned && u.pin_reason.empty()) u.pin_reason = "pinned in " + where;
    for (const auto& prev : units) {
      if (prev.name == u.name) return InvalidArgumentError(at + ": the name appears twice");
    }
    units.push_back(std::move(u));
  }
  if (units.empty()) return InvalidArgumentError(where + ": the unit list is empty");
  return units;
}

// Unit sizes of the published bf16 checkpoints, summed from their tensor shapes
// (../shared/reference/keys/*.tsv; tests/unit/placement checks them against the key lists).
std::vector<std::string> ExampleNames() { return {"flux-dev", "wan21-14b"}; }

StatusOr<Example> GetExample(std::string_view name) {
  Example ex;
  auto add = [&](std::string unit, uint64_t bytes) {
    Unit u;
    u.name = std::move(unit);
    u.bytes = bytes;
    ex.units.push_back(std::move(u));
  };
  if (name == "flux-dev") {
    ex.name = "flux-dev";
    ex.description =
        "FLUX.1-dev transformer, bf16: stem, 19 double + 38 single blocks, final layer";
    ex.family = Family::kFlux;
    add("img_in", 399360);
    add("time_in", 20459520);
    add("vector_in", 23605248);
    add("guidance_in", 20459520);
    add("txt_in", 25171968);
    for (int i = 0; i < 19; ++i) add("double_blocks." + std::to_string(i), 679662592);
    for (int i = 0; i < 38; ++i) add("single_blocks." + std::to_string(i), 283183616);
    add("final_layer", 38154368);
    // 1024x1024: 4096 image + 512 text tokens; MLP hidden (12288) + 6 x D (3072) in bf16.
    ex.activation_bytes = 4608ull * (12288 + 6 * 3072) * 2;
  } else if (name == "wan21-14b") {
    ex.name = "wan21-14b";
    ex.description = "Wan 2.1 T2V 14B transformer, bf16: stem, 40 blocks, head";
    ex.family = Family::kWan;
    add("patch_embedding", 665600);
    add("text_embedding", 94392320);
    add("time_embedding", 55070720);
    add("time_projection", 314634240);
    for (int i = 0; i < 40; ++i) add("blocks." + std::to_string(i), 702788608);
    add("head", 675968);
    // 720p, 81 frames: 75600 tokens; FFN hidden (13824) + 6 x D (5120) in bf16.
    ex.activation_bytes = 75600ull * (13824 + 6 * 5120) * 2;
  } else {
    std::string known;
    for (const auto& n : ExampleNames()) known += (known.empty() ? "" : ", ") + n;
    return NotFoundError("unknown example '" + std::string(name) + "' (known: " + known + ")");
  }
  MarkPinnedUnits(ex.family, &ex.units);
  return ex;
}

}  // namespace fleet::placement
