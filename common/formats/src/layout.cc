#include "fleet/formats/layout.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <optional>
#include <unordered_map>

namespace fleet::formats {
namespace {

bool StartsWith(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool EndsWith(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}

// "double_blocks.12.img_mod.lin.weight" with group "double_blocks" -> 12; -1 if not numbered.
int64_t BlockIndex(std::string_view name, std::string_view group) {
  if (!StartsWith(name, group) || name.size() <= group.size() || name[group.size()] != '.') {
    return -1;
  }
  size_t i = group.size() + 1;
  size_t start = i;
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

class Builder {
 public:
  Builder(const std::vector<TensorInfo>& tensors, std::string prefix, std::string where)
      : tensors_(tensors), prefix_(std::move(prefix)), where_(std::move(where)) {
    for (const auto& t : tensors_) {
      if (StartsWith(t.name, prefix_)) by_short_[t.name.substr(prefix_.size())] = &t;
    }
  }

  const TensorInfo* Get(const std::string& short_name) const {
    auto it = by_short_.find(short_name);
    return it == by_short_.end() ? nullptr : it->second;
  }

  // The dimension `dim` of a required tensor with `rank` dims.
  StatusOr<int64_t> Dim(const std::string& short_name, size_t rank, size_t dim) const {
    const TensorInfo* t = Get(short_name);
    if (!t) {
      return InvalidArgumentError(where_ + ": " + family_ + " layout: required tensor '" +
                                  prefix_ + short_name + "' is missing");
    }
    if (t->shape.size() != rank) {
      return InvalidArgumentError(where_ + ": " + family_ + " layout: tensor '" + t->name +
                                  "' has " + std::to_string(t->shape.size()) +
                                  " dimensions, expected " + std::to_string(rank));
    }
    return t->shape[dim];
  }

  // Assigns every tensor a unit through `classify` (short name -> unit name, "" = none) and
  // orders units with `rank` (unit name -> sort key).
  template <typename Classify, typename Rank>
  Status Group(Classify classify, Rank rank, std::vector<Unit>* units) {
    std::unordered_map<std::string, size_t> index;
    std::vector<std::string> stray;
    size_t stray_count = 0;
    for (const auto& t : tensors_) {
      std::string unit;
      if (StartsWith(t.name, prefix_)) unit = classify(t.name.substr(prefix_.size()));
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
      return InvalidArgumentError(where_ + ": " + std::to_string(stray_count) + " tensor(s) match no " +
                                  family_ + " unit (prefix '" + prefix_ + "'): " + list);
    }
    std::stable_sort(units->begin(), units->end(),
                     [&](const Unit& a, const Unit& b) { return rank(a.name) < rank(b.name); });
    return Status::OK();
  }

  // Numbered blocks group.0 .. group.(n-1) must all be present.
  StatusOr<int64_t> CountBlocks(std::string_view group) const {
    std::vector<bool> seen;
    for (const auto& [short_name, t] : by_short_) {
      int64_t i = BlockIndex(short_name, group);
      if (i < 0) continue;
      if (static_cast<size_t>(i) >= seen.size()) seen.resize(static_cast<size_t>(i) + 1);
      seen[static_cast<size_t>(i)] = true;
    }
    for (size_t i = 0; i < seen.size(); ++i) {
      if (!seen[i]) {
        return InvalidArgumentError(where_ + ": " + family_ + " layout: " + std::string(group) +
                                    "." + std::to_string(i) + " is missing (blocks up to " +
                                    std::to_string(seen.size() - 1) + " exist)");
      }
    }
    return static_cast<int64_t>(seen.size());
  }

  void set_family(std::string f) { family_ = std::move(f); }
  const std::string& where() const { return where_; }

 private:
  const std::vector<TensorInfo>& tensors_;
  std::string prefix_;
  std::string where_;
  std::string family_ = "unknown";
  std::unordered_map<std::string, const TensorInfo*> by_short_;
};

// Sort key: (section, block index).
using RankKey = std::pair<int, int64_t>;

StatusOr<std::vector<int64_t>> FluxAxes(const std::map<std::string, std::string>& metadata,
                                        int64_t head, const std::string& where) {
  auto it = metadata.find("fleet.axes_dim");
  if (it != metadata.end()) {
    auto j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
    std::vector<int64_t> axes;
    bool ok = j.is_array() && !j.empty();
    int64_t sum = 0;
    if (ok) {
      for (const auto& v : j) {
        if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() % 2 != 0) {
          ok = false;
          break;
        }
        axes.push_back(v.get<int64_t>());
        sum += axes.back();
      }
    }
    if (!ok || sum != head) {
      return InvalidArgumentError(where + ": metadata 'fleet.axes_dim' = '" + it->second +
                                  "' must be a JSON array of positive even integers summing to "
                                  "the head width " + std::to_string(head));
    }
    return axes;
  }
  if (head == 128) return std::vector<int64_t>{16, 56, 56};
  // Flux's proportions (16:56:56 of 128) for other head widths, every axis even.
  int64_t a1 = (head - 2 * static_cast<int64_t>(std::llround(head / 16.0))) / 2;
  a1 -= a1 % 2;
  return std::vector<int64_t>{head - 2 * a1, a1, a1};
}

StatusOr<Layout> Flux(const std::vector<TensorInfo>& tensors,
                      const std::map<std::string, std::string>& metadata, std::string prefix,
                      const std::string& where) {
  Builder b(tensors, prefix, where);
  b.set_family("flux");
  Layout layout{"flux", prefix, "", {}};
  static const std::vector<std::string> kStem = {"img_in", "time_in", "guidance_in", "vector_in",
                                                 "txt_in"};
  auto classify = [](const std::string& n) -> std::string {
    std::string first = FirstComponent(n);
    if (std::find(kStem.begin(), kStem.end(), first) != kStem.end() && n.size() > first.size()) {
      return "stem";
    }
    for (std::string_view g : {"double_blocks", "single_blocks"}) {
      int64_t i = BlockIndex(n, g);
      if (i >= 0) return std::string(g) + "." + std::to_string(i);
    }
    if (first == "final_layer" && n.size() > first.size()) return "final_layer";
    return "";
  };
  auto rank = [](const std::string& u) -> RankKey {
    if (u == "stem") return {0, 0};
    if (u == "final_layer") return {3, 0};
    int64_t i = BlockIndex(u, "double_blocks");
    if (i >= 0) return {1, i};
    return {2, BlockIndex(u, "single_blocks")};
  };
  FLEET_RETURN_IF_ERROR(b.Group(classify, rank, &layout.units));
  for (auto& u : layout.units) u.pinned = (u.name == "stem");

  FLEET_ASSIGN_OR_RETURN(int64_t depth, b.CountBlocks("double_blocks"));
  FLEET_ASSIGN_OR_RETURN(int64_t depth_single, b.CountBlocks("single_blocks"));
  if (depth == 0) {
    return InvalidArgumentError(where + ": flux layout: no double_blocks.N tensors");
  }
  FLEET_ASSIGN_OR_RETURN(int64_t in_channels, b.Dim("img_in.weight", 2, 1));
  FLEET_ASSIGN_OR_RETURN(int64_t hidden, b.Dim("img_in.weight", 2, 0));
  FLEET_ASSIGN_OR_RETURN(int64_t head,
                         b.Dim("double_blocks.0.img_attn.norm.query_norm.scale", 1, 0));
  if (head <= 0 || hidden % head != 0) {
    return InvalidArgumentError(where + ": flux layout: hidden size " + std::to_string(hidden) +
                                " is not a multiple of the head width " + std::to_string(head) +
                                " (double_blocks.0.img_attn.norm.query_norm.scale)");
  }
  FLEET_ASSIGN_OR_RETURN(int64_t mlp, b.Dim("double_blocks.0.img_mlp.0.weight", 2, 0));
  FLEET_ASSIGN_OR_RETURN(int64_t context, b.Dim("txt_in.weight", 2, 1));
  FLEET_ASSIGN_OR_RETURN(int64_t vec, b.Dim("vector_in.in_layer.weight", 2, 1));
  FLEET_ASSIGN_OR_RETURN(int64_t out_channels, b.Dim("final_layer.linear.weight", 2, 0));
  FLEET_ASSIGN_OR_RETURN(auto axes, FluxAxes(metadata, head, where));
  nlohmann::ordered_json c;
  c["in_channels"] = in_channels;
  c["hidden_size"] = hidden;
  c["num_heads"] = hidden / head;
  c["depth"] = depth;
  c["depth_single_blocks"] = depth_single;
  c["mlp_hidden_dim"] = mlp;
  c["context_in_dim"] = context;
  c["vec_in_dim"] = vec;
  c["guidance_embed"] = b.Get("guidance_in.in_layer.weight") != nullptr;
  c["axes_dim"] = axes;
  c["theta"] = 10000;
  c["patch_size"] = 2;
  c["qkv_bias"] = b.Get("double_blocks.0.img_attn.qkv.bias") != nullptr;
  c["out_channels"] = out_channels;
  layout.config_json = c.dump();
  return layout;
}

StatusOr<Layout> Wan(const std::vector<TensorInfo>& tensors, std::string prefix,
                     const std::string& where) {
  Builder b(tensors, prefix, where);
  b.set_family("wan");
  Layout layout{"wan", prefix, "", {}};
  static const std::vector<std::string> kStem = {"patch_embedding", "text_embedding",
                                                 "time_embedding", "time_projection", "img_emb"};
  auto classify = [](const std::string& n) -> std::string {
    std::string first = FirstComponent(n);
    if (n.size() <= first.size()) return "";
    if (std::find(kStem.begin(), kStem.end(), first) != kStem.end()) return "stem";
    int64_t i = BlockIndex(n, "blocks");
    if (i >= 0) return "blocks." + std::to_string(i);
    if (first == "head") return "head";
    return "";
  };
  auto rank = [](const std::string& u) -> RankKey {
    if (u == "stem") return {0, 0};
    if (u == "head") return {2, 0};
    return {1, BlockIndex(u, "blocks")};
  };
  FLEET_RETURN_IF_ERROR(b.Group(classify, rank, &layout.units));
  for (auto& u : layout.units) u.pinned = (u.name == "stem");

  FLEET_ASSIGN_OR_RETURN(int64_t layers, b.CountBlocks("blocks"));
  if (layers == 0) return InvalidArgumentError(where + ": wan layout: no blocks.N tensors");
  FLEET_ASSIGN_OR_RETURN(int64_t dim, b.Dim("patch_embedding.weight", 5, 0));
  FLEET_ASSIGN_OR_RETURN(int64_t in_dim, b.Dim("patch_embedding.weight", 5, 1));
  std::vector<int64_t> patch(3);
  for (size_t i = 0; i < 3; ++i) {
    FLEET_ASSIGN_OR_RETURN(patch[i], b.Dim("patch_embedding.weight", 5, 2 + i));
  }
  FLEET_ASSIGN_OR_RETURN(int64_t ffn, b.Dim("blocks.0.ffn.0.weight", 2, 0));
  FLEET_ASSIGN_OR_RETURN(int64_t text_dim, b.Dim("text_embedding.0.weight", 2, 1));
  FLEET_ASSIGN_OR_RETURN(int64_t freq_dim, b.Dim("time_embedding.0.weight", 2, 1));
  FLEET_ASSIGN_OR_RETURN(int64_t head_out, b.Dim("head.head.weight", 2, 0));
  const int64_t patch_volume = patch[0] * patch[1] * patch[2];
  if (patch_volume <= 0 || head_out % patch_volume != 0) {
    return InvalidArgumentError(where + ": wan layout: head.head.weight rows " +
                                std::to_string(head_out) + " are not a multiple of the patch " +
                                "volume " + std::to_string(patch_volume));
  }
  // Every released WAN model uses 128-wide heads; norm_q spans the whole width, so the head
  // count is not in the shapes.
  constexpr int64_t kHeadDim = 128;
  if (dim % kHeadDim != 0) {
    return InvalidArgumentError(where + ": wan layout: dim " + std::to_string(dim) +
                                " is not a multiple of the 128-wide heads");
  }
  const bool i2v = b.Get("img_emb.proj.0.weight") != nullptr;
  nlohmann::ordered_json c;
  c["model_type"] = i2v ? "i2v" : "t2v";
  c["dim"] = dim;
  c["ffn_dim"] = ffn;
  c["num_heads"] = dim / kHeadDim;
  c["num_layers"] = layers;
  c["in_dim"] = in_dim;
  c["out_dim"] = head_out / patch_volume;
  c["text_dim"] = text_dim;
  c["freq_dim"] = freq_dim;
  c["patch_size"] = patch;
  c["i2v"] = i2v;
  c["eps"] = 1e-6;
  layout.config_json = c.dump();
  return layout;
}

// No known family: one unit per top-level name, numbered children split out ("layers.3").
StatusOr<Layout> Generic(const std::vector<TensorInfo>& tensors, std::string prefix,
                         const std::string& where) {
  Builder b(tensors, prefix, where);
  Layout layout{"unknown", prefix, "{}", {}};
  auto classify = [](const std::string& n) -> std::string {
    std::string first = FirstComponent(n);
    int64_t i = BlockIndex(n, first);
    return i >= 0 ? first + "." + std::to_string(i) : first;
  };
  auto rank = [](const std::string&) { return 0; };  // file order
  FLEET_RETURN_IF_ERROR(b.Group(classify, rank, &layout.units));
  return layout;
}

// The prefix before `anchor` in the first name that ends with it ("" or "...."), or nullopt.
std::optional<std::string> PrefixOf(const std::vector<TensorInfo>& tensors,
                                    std::string_view anchor) {
  for (const auto& t : tensors) {
    if (EndsWith(t.name, anchor)) {
      std::string p = t.name.substr(0, t.name.size() - anchor.size());
      if (p.empty() || p.back() == '.') return p;
    }
  }
  return std::nullopt;
}

}  // namespace

uint64_t Layout::total_bytes() const {
  uint64_t total = 0;
  for (const auto& u : units) total += u.bytes;
  return total;
}

StatusOr<Layout> DetectLayout(const std::vector<TensorInfo>& tensors,
                              const std::map<std::string, std::string>& metadata,
                              const std::string& where) {
  if (tensors.empty()) return InvalidArgumentError(where + ": the file holds no tensors");
  auto flux = PrefixOf(tensors, "img_in.weight");
  if (flux) {
    bool has_double = false;
    for (const auto& t : tensors) has_double |= StartsWith(t.name, *flux + "double_blocks.");
    if (has_double) return Flux(tensors, metadata, *flux, where);
  }
  auto wan = PrefixOf(tensors, "patch_embedding.weight");
  if (wan) {
    bool has_blocks = false;
    for (const auto& t : tensors) has_blocks |= StartsWith(t.name, *wan + "blocks.");
    if (has_blocks) return Wan(tensors, *wan, where);
  }
  auto arch = metadata.find("general.architecture");
  if (arch != metadata.end() && (arch->second == "flux" || arch->second == "wan")) {
    return InvalidArgumentError(where + ": general.architecture is '" + arch->second +
                                "' but the tensors do not have its layout (" +
                                (arch->second == "flux" ? "img_in.weight + double_blocks.N"
                                                        : "patch_embedding.weight + blocks.N") +
                                ")");
  }
  std::string prefix;
  for (std::string_view p : {"model.diffusion_model.", "diffusion_model."}) {
    bool all = std::all_of(tensors.begin(), tensors.end(),
                           [&](const TensorInfo& t) { return StartsWith(t.name, p); });
    if (all) {
      prefix = std::string(p);
      break;
    }
  }
  return Generic(tensors, prefix, where);
}

StatusOr<Layout> DetectLayout(const ModelFile& file) {
  return DetectLayout(file.tensors(), file.metadata(), file.path());
}

}  // namespace fleet::formats
