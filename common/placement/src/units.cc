// Pin rules per family, the JSON unit list and the built-in example models.
#include "fleet/placement/units.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <nlohmann/json.hpp>

#include "fleet/config/bytes.h"
#include "fleet/config/text.h"

namespace fleet::placement {
void MarkPinnedUnits(const families::Family* family, std::vector<Unit>* units) {
  if (family == nullptr) return;
  for (auto& u : *units) {
    auto rule = family->Pin(u.name);
    if (!rule) continue;
    if (!u.pinned) {
      u.pinned = true;
      u.pin_reason = rule->reason;
      u.upstream_pins = rule->upstream;
    } else if (u.pin_reason.empty()) {
      u.pin_reason = rule->reason;
      u.upstream_pins = rule->upstream;
    }
  }
}

const families::Family* GuessFamily(const std::vector<Unit>& units) {
  std::vector<std::string> names;
  names.reserve(units.size());
  for (const auto& u : units) names.push_back(u.name);
  return families::GuessFamily(names);
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
// (tests/unit/formats/keys/*.tsv; tests/unit/placement checks them against the key lists).
std::vector<std::string> ExampleNames() { return {"flux-dev", "wan21-14b", "wan22-a14b-q6k"}; }

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
    ex.family = families::FindFamily("flux");
    add("img_in", 399360);
    add("time_in", 20459520);
    add("vector_in", 23605248);
    add("guidance_in", 20459520);
    add("txt_in", 25171968);
    for (int i = 0; i < 19; ++i) add("double_blocks." + std::to_string(i), 679662592);
    for (int i = 0; i < 38; ++i) add("single_blocks." + std::to_string(i), 283183616);
    add("final_layer", 38154368);
    // 1024x1024 with 512 text tokens: 4608 tokens of MLP hidden (12288) + 6 x D (3072), bf16.
    ex.config_json = R"({"hidden_size": 3072, "mlp_hidden_dim": 12288, "patch_size": 2})";
    ex.sizes.width = ex.sizes.height = 1024;
  } else if (name == "wan21-14b") {
    ex.name = "wan21-14b";
    ex.description = "Wan 2.1 T2V 14B transformer, bf16: stem, 40 blocks, head";
    ex.family = families::FindFamily("wan");
    add("patch_embedding", 665600);
    add("text_embedding", 94392320);
    add("time_embedding", 55070720);
    add("time_projection", 314634240);
    for (int i = 0; i < 40; ++i) add("blocks." + std::to_string(i), 702788608);
    add("head", 675968);
    // 720p, 81 frames: 75600 tokens of FFN hidden (13824) + 6 x D (5120), bf16.
    ex.config_json = R"({"dim": 5120, "ffn_dim": 13824, "patch_size": [1, 2, 2], "out_dim": 16})";
    ex.sizes.width = 1280;
    ex.sizes.height = 720;
    ex.sizes.frames = 81;
  } else if (name == "wan22-a14b-q6k") {
    // One expert of WAN 2.2 A14B (the 14B layout) as ComfyUI-GGUF's Q6_K files store it: every
    // 2-D weight with rows of whole 256-value blocks in Q6_K (210 bytes per 256), the 5-D
    // patch embedding in F16, norms, biases and modulations in F32: 11.7 GB, not 28.6 GB.
    ex.name = "wan22-a14b-q6k";
    ex.description =
        "Wan 2.2 A14B, one expert (high- or low-noise), Q6_K GGUF: stem, 40 blocks, head";
    ex.family = families::FindFamily("wan");
    add("patch_embedding", 675840);
    add("text_embedding", 38748160);
    add("time_embedding", 22620160);
    add("time_projection", 129146880);
    for (int i = 0; i < 40; ++i) add("blocks." + std::to_string(i), 288638976);
    add("head", 310016);
    // ComfyUI's WAN 2.2 template: 832 x 480, 81 frames (21 latent frames of 30 x 52 tokens).
    ex.config_json =
        R"({"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "patch_size": [1, 2, 2], "out_dim": 16})";
    ex.sizes = ex.family->DefaultSizes();
  } else {
    std::string known;
    for (const auto& n : ExampleNames()) known += (known.empty() ? "" : ", ") + n;
    return NotFoundError("unknown example '" + std::string(name) + "' (known: " + known + ")");
  }
  FLEET_ASSIGN_OR_RETURN(ex.activation_bytes, ex.family->ActivationBytes(ex.config_json, ex.sizes));
  MarkPinnedUnits(ex.family, &ex.units);
  return ex;
}

}  // namespace fleet::placement
