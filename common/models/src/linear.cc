#include "linear.h"

#include <string>
#include <vector>

#include "block_util.h"

namespace fleet::models::internal {
namespace {

class LinearModel final : public Model {
 public:
  LinearModel(int64_t dim, int64_t depth, at::ScalarType dtype) : dim_(dim), dtype_(dtype) {
    for (int64_t i = 0; i < depth; ++i) names_.push_back("linear_blocks." + std::to_string(i));
  }

  std::string_view family() const override { return "linear"; }
  std::string config_json() const override {
    return nlohmann::json{{"dim", dim_}, {"depth", static_cast<int64_t>(names_.size())}}.dump();
  }
  at::ScalarType compute_dtype() const override { return dtype_; }
  const std::vector<std::string>& block_names() const override { return names_; }
  bool IsRunConstant(std::string_view) const override { return false; }

  Status RunBlock(size_t index, const WeightAccessor& weights, TensorMap& state) const override {
    if (index >= names_.size()) {
      return InvalidArgumentError("linear: block index " + std::to_string(index) +
                                  " out of range (model has " + std::to_string(names_.size()) +
                                  " blocks)");
    }
    const std::string& block = names_[index];
    return GuardTorch(block, [&]() -> Status {
      FLEET_ASSIGN_OR_RETURN(at::Tensor w, weights.Get(block + ".weight"));
      FLEET_RETURN_IF_ERROR(CheckTensor(w, "weight", block + ".weight", {dim_, dim_}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor b, weights.Get(block + ".bias"));
      FLEET_RETURN_IF_ERROR(CheckTensor(b, "weight", block + ".bias", {dim_}));
      FLEET_ASSIGN_OR_RETURN(at::Tensor x, Find(state, "state", "x"));
      if (x.dim() < 1 || x.size(-1) != dim_) {
        return InvalidArgumentError(block + ": state 'x' has shape " + ShapeString(x.sizes()) +
                                    ", expected [..., " + std::to_string(dim_) + "]");
      }
      x = x.to(dtype_);
      state["x"] = GeluTanh(Linear(x, w.to(dtype_), b.to(dtype_)));
      return Status::OK();
    });
  }

  StatusOr<at::Tensor> PrepareWeight(std::string_view name,
                                     const at::Tensor& stored) const override {
    if (!stored.defined()) {
      return InvalidArgumentError("linear: weight '" + std::string(name) + "' is undefined");
    }
    at::Tensor out;
    FLEET_RETURN_IF_ERROR(GuardTorch(name, [&]() -> Status {
      out = ConvertWeight(stored, dtype_);
      return Status::OK();
    }));
    return out;
  }

 private:
  int64_t dim_;
  at::ScalarType dtype_;
  std::vector<std::string> names_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> CreateLinearModel(std::string_view config_json,
                                                   at::ScalarType dtype) {
  FLEET_ASSIGN_OR_RETURN(nlohmann::json config, ParseConfig("linear", config_json));
  FLEET_ASSIGN_OR_RETURN(int64_t dim, IntField(config, "linear", "dim", 1));
  FLEET_ASSIGN_OR_RETURN(int64_t depth, IntField(config, "linear", "depth", 1));
  return std::unique_ptr<Model>(new LinearModel(dim, depth, dtype));
}

}  // namespace fleet::models::internal
