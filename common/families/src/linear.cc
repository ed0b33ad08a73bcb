// The "linear" toy family, the worked example of docs/models.md ("Adding a family"):
// `depth` blocks linear_blocks.N, each x = gelu_tanh(x W^T + b) with W [dim, dim], b [dim].
// Torch-free half; common/models/src/linear.cc runs it.
#include <algorithm>

#include "builder.h"
#include "registry.h"

namespace fleet::families::internal {
namespace {

class Linear final : public Family {
 public:
  std::string_view name() const override { return "linear"; }

  std::optional<std::string> Recognise(
      const std::vector<formats::TensorInfo>& tensors) const override {
    for (const auto& t : tensors) {  // any numbered block names the family
      const size_t at = t.name.find("linear_blocks.");
      if (at != std::string::npos && (at == 0 || t.name[at - 1] == '.') &&
          BlockIndex(std::string_view(t.name).substr(at), "linear_blocks") >= 0) {
        return t.name.substr(0, at);
      }
    }
    return std::nullopt;
  }

  // Nothing is pinned: every block reads only the activation x.
  std::optional<PinRule> Pin(std::string_view) const override { return std::nullopt; }

  bool RecogniseUnits(const std::vector<std::string>& names) const override {
    return !names.empty() && std::all_of(names.begin(), names.end(), [](const std::string& n) {
      return BlockIndex(n, "linear_blocks") >= 0;
    });
  }

  StatusOr<Layout> Detect(const LayoutInput& in) const override {
    Builder b(in, "linear");
    Layout layout{"linear", in.prefix, "", {}, {}};
    auto classify = [](const std::string& n) -> std::string {
      const int64_t i = BlockIndex(n, "linear_blocks");
      return i >= 0 ? "linear_blocks." + std::to_string(i) : "";
    };
    auto rank = [](const std::string& u) -> RankKey { return {0, BlockIndex(u, "linear_blocks")}; };
    FLEET_RETURN_IF_ERROR(b.Group(classify, rank, this, &layout.units));
    FLEET_ASSIGN_OR_RETURN(int64_t depth, b.CountBlocks("linear_blocks"));
    FLEET_ASSIGN_OR_RETURN(int64_t dim, b.Dim("linear_blocks.0.weight", 2, 0));
    FLEET_ASSIGN_OR_RETURN(nlohmann::json cfg, MetadataConfig(in, "linear", {"dim", "depth"}));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "dim", 1, &dim, dim, "linear_blocks.0.weight"));
    FLEET_RETURN_IF_ERROR(OverrideInt(cfg, in, "depth", 1, &depth, depth, "linear_blocks.N"));
    layout.config_json = nlohmann::json{{"dim", dim}, {"depth", depth}}.dump();
    return layout;
  }

  // x and the block's output, one row per batch element.
  StatusOr<uint64_t> ActivationBytes(std::string_view config_json,
                                     const InputSizes& s) const override {
    auto c = nlohmann::json::parse(config_json, nullptr, /*allow_exceptions=*/false);
    if (!c.is_object() || !c.contains("dim")) {
      return InvalidArgumentError("linear: configuration lacks dim");
    }
    return static_cast<uint64_t>(2 * s.batch * c["dim"].get<int64_t>() * s.dtype_bytes);
  }

  // x is [batch, dim].
  std::optional<InputSizes> SizesOf(std::string_view, const InputShapes& shapes) const override {
    auto x = shapes.find("x");
    if (x == shapes.end() || x->second.size() != 2) return std::nullopt;
    InputSizes s;
    s.batch = x->second[0];
    return s;
  }
};

}  // namespace

const Family& LinearFamily() {
  static const Linear family;
  return family;
}

}  // namespace fleet::families::internal
