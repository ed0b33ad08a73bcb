// Helpers the family descriptors share: looking tensors up by their short name (without the
// container prefix), reading dimensions with errors that name the tensor, grouping every tensor
// into units, counting numbered blocks, and reading the metadata `config` override.
// Private to common/families.
//
// Thread safety: a Builder is used by one thread; the free functions are pure.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fleet/families/family.h"

namespace fleet::families::internal {

bool StartsWith(std::string_view s, std::string_view prefix);
bool EndsWith(std::string_view s, std::string_view suffix);

/// "double_blocks.12.img_mod.lin.weight" with group "double_blocks" -> 12; -1 if not numbered.
int64_t BlockIndex(std::string_view name, std::string_view group);

/// "double_blocks" of "double_blocks.12.img_mod.lin.weight".
std::string FirstComponent(std::string_view name);

/// True for the unit "stem" and for units named after one of the stem's parts (a `--units`
/// list or a built-in example may list them separately: "img_in", "txt_in").
template <size_t N>
bool IsStemUnit(std::string_view unit, const std::array<std::string_view, N>& parts) {
  const std::string first = FirstComponent(unit);
  return first == "stem" || std::find(parts.begin(), parts.end(), first) != parts.end();
}

/// The prefix before `anchor` in the first tensor name that ends with it ("" or "....") when
/// some name also starts with that prefix + `also` (e.g. "double_blocks."), else nullopt.
std::optional<std::string> PrefixOf(const std::vector<formats::TensorInfo>& tensors,
                                    std::string_view anchor, std::string_view also);

/// Sort key of a unit: (section, block index).
using RankKey = std::pair<int, int64_t>;

class Builder {
 public:
  Builder(const LayoutInput& input, std::string family);

  const formats::TensorInfo* Get(const std::string& short_name) const;

  /// Dimension `dim` of a required tensor of `rank` dimensions.
  StatusOr<int64_t> Dim(const std::string& short_name, size_t rank, size_t dim) const;

  /// Assigns every tensor a unit through `classify` (short name -> unit name, "" = none),
  /// orders units by `rank` and marks those `family` pins (none when it is null).
  Status Group(const std::function<std::string(const std::string&)>& classify,
               const std::function<RankKey(const std::string&)>& rank, const Family* family,
               std::vector<Unit>* units) const;

  /// Numbered blocks group.0 .. group.(n-1) must all be present; returns n.
  StatusOr<int64_t> CountBlocks(std::string_view group) const;

  /// An InvalidArgument "<where>: <family> layout: <what>".
  Status Error(const std::string& what) const;

  const LayoutInput& input() const { return input_; }
  const std::string& family() const { return family_; }

 private:
  Status CheckScaledLayer(const std::string& short_name, const formats::TensorInfo& t) const;

  const LayoutInput& input_;
  std::string family_;
  std::unordered_map<std::string, const formats::TensorInfo*> by_short_;
};

/// The metadata `config` (ComfyUI's keyword arguments for the model class, as JSON text in
/// safetensors `__metadata__["config"]` or the GGUF string key `config`): an empty object when
/// absent, InvalidArgument naming the file when it is not a JSON object or holds a key that is
/// not in `known`.
StatusOr<nlohmann::json> MetadataConfig(const LayoutInput& input, std::string_view family,
                                        const std::vector<std::string_view>& known);

/// Reads an integer override `key` (>= min) from `config` into `*value` when present. When
/// `from_shapes` is set, the override must agree with it (it came from `tensor`).
Status OverrideInt(const nlohmann::json& config, const LayoutInput& input, std::string_view key,
                   int64_t min, int64_t* value, std::optional<int64_t> from_shapes = std::nullopt,
                   std::string_view tensor = "");

/// The same for a boolean.
Status OverrideBool(const nlohmann::json& config, const LayoutInput& input, std::string_view key,
                    bool* value, std::optional<bool> from_shapes = std::nullopt,
                    std::string_view tensor = "");

}  // namespace fleet::families::internal
