#include "builder.h"

#include <algorithm>

namespace fleet::families::internal {

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

int64_t BlockIndex(std::string_view name, std::string_view group) {
  if (!StartsWith(name, group) || name.size() <= group.size() || name[group.size()] != '.') {
    return -1;
  }
  size_t i = group.size() + 1;
  const size_t start = i;
  int64_t v = 0;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') {
    if (v > 100000000) return -1;
    v = v * 10 + (name[i] - '0');
    ++i;
  }
  if (i == start || (i < name.size() && name[i] != '.')) return -1;
  return v;
}

std::string FirstComponent(std::string_view name) {
  return std::string(name.substr(0, name.find('.')));
}

std::optional<std::string> PrefixOf(const std::vector<formats::TensorInfo>& tensors,
                                    std::string_view anchor, std::string_view also) {
  for (const auto& t : tensors) {
    if (!EndsWith(t.name, anchor)) continue;
    std::string p = t.name.substr(0, t.name.size() - anchor.size());
    if (!p.empty() && p.back() != '.') continue;
    const std::string want = p + std::string(also);
    for (const auto& u : tensors) {
      if (StartsWith(u.name, want)) return p;
    }
  }
  return std::nullopt;
}

Builder::Builder(const LayoutInput& input, std::string family)
    : input_(input), family_(std::move(family)) {
  for (const auto& t : input_.tensors) {
    if (StartsWith(t.name, input_.prefix)) by_short_[t.name.substr(input_.prefix.size())] = &t;
  }
}

const formats::TensorInfo* Builder::Get(const std::string& short_name) const {
  auto it = by_short_.find(short_name);
  return it == by_short_.end() ? nullptr : it->second;
}

Status Builder::Error(const std::string& what) const {
  return InvalidArgumentError(input_.where + ": " + family_ + " layout: " + what);
}

StatusOr<int64_t> Builder::Dim(const std::string& short_name, size_t rank, size_t dim) const {
  const formats::TensorInfo* t = Get(short_name);
  if (!t) return Error("required tensor '" + input_.prefix + short_name + "' is missing");
  if (t->shape.size() != rank) {
    return Error("tensor '" + t->name + "' has " + std::to_string(t->shape.size()) +
                 " dimensions, expected " + std::to_string(rank));
  }
  return t->shape[dim];
}

// ComfyUI's newer quantised layers (`<layer>.weight_scale`): only the per-tensor fp8 form can be
// expanded; the block-scaled and integer forms are refused here, before their packed shapes
// confuse configuration detection. (The layer's comfy_quant format is checked again at load.)
Status Builder::CheckScaledLayer(const std::string& short_name,
                                 const formats::TensorInfo& t) const {
  std::string_view layer = short_name;
  if (EndsWith(layer, ".weight_scale_2")) {
    layer.remove_suffix(std::string_view(".weight_scale_2").size());
  } else if (EndsWith(layer, ".weight_scale")) {
    layer.remove_suffix(std::string_view(".weight_scale").size());
  } else {
    return Status::OK();
  }
  if (Get(std::string(layer) + ".weight_scale_2") != nullptr) {
    return InvalidArgumentError(input_.where + ": layer '" + input_.prefix + std::string(layer) +
                                "' is in ComfyUI's nvfp4 format (it has a weight_scale_2), which "
                                "Tensorfleet cannot expand; use a GGUF or fp8 checkpoint");
  }
  const formats::TensorInfo* w = Get(std::string(layer) + ".weight");
  const bool fp8 = w && (w->dtype == "F8_E4M3" || w->dtype == "F8_E5M2");
  if (!fp8 || t.numel() != 1) {
    return InvalidArgumentError(
        input_.where + ": layer '" + input_.prefix + std::string(layer) +
        "' is quantised with a weight_scale of " + std::to_string(t.numel()) + " value(s) over " +
        (w ? w->dtype : std::string("no")) +
        " weights (ComfyUI's block-scaled or integer formats), which Tensorfleet cannot "
        "expand; it reads fp8 layers with one scale per tensor");
  }
  return Status::OK();
}

Status Builder::Group(const std::function<std::string(const std::string&)>& classify,
                      const std::function<RankKey(const std::string&)>& rank, const Family* family,
                      std::vector<Unit>* units) const {
  std::unordered_map<std::string, size_t> index;
  std::vector<std::string> stray;
  size_t stray_count = 0;
  for (const auto& t : input_.tensors) {
    const std::string short_name =
        StartsWith(t.name, input_.prefix) ? t.name.substr(input_.prefix.size()) : t.name;
    // ComfyUI's scaled-fp8 checkpoints mark themselves with an empty `scaled_fp8` tensor: a
    // marker, not a weight (the per-layer `scale_weight`s are what matter).
    if (short_name == "scaled_fp8") continue;
    FLEET_RETURN_IF_ERROR(CheckScaledLayer(short_name, t));
    std::string unit;
    if (StartsWith(t.name, input_.prefix)) unit = classify(short_name);
    if (unit.empty()) {
      if (stray.size() < 5) stray.push_back(t.name);
      ++stray_count;
      continue;
    }
    auto [it, inserted] = index.emplace(unit, units->size());
    if (inserted) units->push_back(Unit{unit, 0, false, {}});
    Unit& u = (*units)[it->second];
    u.bytes += t.nbytes;
    u.tensors.push_back(t.name);
  }
  if (stray_count > 0) {
    std::string list;
    for (const auto& s : stray) list += (list.empty() ? "'" : ", '") + s + "'";
    if (stray_count > stray.size()) list += ", ...";
    return InvalidArgumentError(input_.where + ": " + std::to_string(stray_count) +
                                " tensor(s) match no " + family_ + " unit (prefix '" +
                                input_.prefix + "'): " + list);
  }
  std::stable_sort(units->begin(), units->end(),
                   [&](const Unit& a, const Unit& b) { return rank(a.name) < rank(b.name); });
  for (auto& u : *units) u.pinned = family && family->Pin(u.name).has_value();
  return Status::OK();
}

StatusOr<int64_t> Builder::CountBlocks(std::string_view group) const {
  std::vector<bool> seen;
  for (const auto& [short_name, t] : by_short_) {
    const int64_t i = BlockIndex(short_name, group);
    if (i < 0) continue;
    if (static_cast<size_t>(i) >= seen.size()) seen.resize(static_cast<size_t>(i) + 1);
    seen[static_cast<size_t>(i)] = true;
  }
  for (size_t i = 0; i < seen.size(); ++i) {
    if (!seen[i]) {
      return Error(std::string(group) + "." + std::to_string(i) + " is missing (blocks up to " +
                   std::to_string(seen.size() - 1) + " exist)");
    }
  }
  return static_cast<int64_t>(seen.size());
}

StatusOr<nlohmann::json> MetadataConfig(const LayoutInput& input, std::string_view family,
                                        const std::vector<std::string_view>& known) {
  auto it = input.metadata.find("config");
  if (it == input.metadata.end()) return nlohmann::json::object();
  auto j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) {
    return InvalidArgumentError(input.where + ": metadata 'config' must be a JSON object of " +
                                std::string(family) + " keyword arguments, got '" +
                                it->second.substr(0, 80) + "'");
  }
  for (const auto& [key, value] : j.items()) {
    if (std::find(known.begin(), known.end(), key) == known.end()) {
      std::string list;
      for (auto k : known) list += (list.empty() ? "" : ", ") + std::string(k);
      return InvalidArgumentError(input.where + ": metadata 'config' has key '" + key +
                                  "', which " + std::string(family) +
                                  " does not know (known: " + list + ")");
    }
  }
  return j;
}

namespace {

Status ConfigError(const LayoutInput& input, std::string_view key, const std::string& what) {
  return InvalidArgumentError(input.where + ": metadata 'config' " + std::string(key) + " " + what);
}

}  // namespace

Status OverrideInt(const nlohmann::json& config, const LayoutInput& input, std::string_view key,
                   int64_t min, int64_t* value, std::optional<int64_t> from_shapes,
                   std::string_view tensor) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return Status::OK();
  if (!it->is_number_integer() || it->get<int64_t>() < min) {
    return ConfigError(input, key,
                       "must be an integer >= " + std::to_string(min) + ", got " + it->dump());
  }
  const int64_t v = it->get<int64_t>();
  if (from_shapes && *from_shapes != v) {
    return ConfigError(input, key,
                       "= " + std::to_string(v) + " contradicts the tensors: " +
                           std::string(tensor) + " gives " + std::to_string(*from_shapes));
  }
  *value = v;
  return Status::OK();
}

Status OverrideBool(const nlohmann::json& config, const LayoutInput& input, std::string_view key,
                    bool* value, std::optional<bool> from_shapes, std::string_view tensor) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return Status::OK();
  if (!it->is_boolean()) return ConfigError(input, key, "must be true or false, got " + it->dump());
  const bool v = it->get<bool>();
  if (from_shapes && *from_shapes != v) {
    return ConfigError(input, key,
                       std::string("= ") + (v ? "true" : "false") + " contradicts the tensors: " +
                           std::string(tensor) + (*from_shapes ? " is present" : " is absent"));
  }
  *value = v;
  return Status::OK();
}

}  // namespace fleet::families::internal
