// Helpers shared by the model families: looking tensors up by name with shape checks that
// produce errors naming the tensor, translating libtorch exceptions into Status, and reading
// configuration JSON fields. Private to common/models.
//
// Thread safety: free functions without shared state.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <exception>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>

#include "fleet/models/attention.h"
#include "fleet/models/model.h"
#include "fleet/status/status.h"

namespace fleet::models::internal {

/// "[2, 64, 3]".
std::string ShapeString(at::IntArrayRef shape);

/// Looks up `name` in `map`. `kind` ("weight", "state") goes into the error. `shape` lists the
/// expected sizes, -1 for any; an empty list skips the check. Floating point is required.
StatusOr<at::Tensor> Find(const TensorMap& map, std::string_view kind, std::string_view name,
                          std::initializer_list<int64_t> shape = {});

/// The checks of Find on a tensor already in hand.
Status CheckTensor(const at::Tensor& t, std::string_view kind, std::string_view name,
                   std::initializer_list<int64_t> shape);

/// Reads a required integer field >= `min` from a configuration object.
StatusOr<int64_t> IntField(const nlohmann::json& config, std::string_view family,
                           std::string_view key, int64_t min);

/// Parses configuration JSON text into an object, or InvalidArgument naming the family.
StatusOr<nlohmann::json> ParseConfig(std::string_view family, std::string_view text);

/// "float32", "bfloat16", "float16", ...
std::string_view DtypeName(at::ScalarType dtype);

/// Linear layer y = x W^T + b in x's dtype. libtorch 1.13 has no fp16 GEMM on the CPU: there
/// the product is formed in float32 and rounded to fp16 once, which is what a GPU fp16 GEMM
/// with float32 accumulation does.
at::Tensor Linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

/// Applies `fn` to `x`. libtorch 1.13 implements few fp16 kernels on the CPU (no GELU, SiLU,
/// LayerNorm, softmax, rsqrt): there `fn` runs on x in float32 and its result is rounded to
/// fp16 once, as a GPU kernel that computes internally in float32 would. Elsewhere `fn(x)`.
template <typename Fn>
at::Tensor Fp16Safe(const at::Tensor& x, Fn&& fn) {
  if (x.scalar_type() == at::kHalf && x.device().is_cpu()) {
    return fn(x.to(at::kFloat)).to(at::kHalf);
  }
  return fn(x);
}

/// GELU with the tanh approximation, fp16-safe.
at::Tensor GeluTanh(const at::Tensor& x);

/// Converts a floating weight to `dtype` (contiguous); other dtypes pass through.
at::Tensor ConvertWeight(const at::Tensor& stored, at::ScalarType dtype);

/// Model::PrepareWeight of the families: a defined floating tensor converted to `dtype`, or
/// InvalidArgument "<family>: weight '<name>' ..." saying what is wrong.
StatusOr<at::Tensor> PrepareFloatingWeight(std::string_view family, std::string_view name,
                                           const at::Tensor& stored, at::ScalarType dtype);

/// A state tensor of `dtype` with the given shape (-1 = any), or InvalidArgument naming it.
StatusOr<at::Tensor> FindActivation(const TensorMap& state, std::string_view name,
                                    std::initializer_list<int64_t> shape, at::ScalarType dtype);

/// Reads one block's weights through the accessor by suffix, checking shape, dtype and device.
class BlockWeights {
 public:
  BlockWeights(const WeightAccessor& weights, std::string prefix, at::ScalarType dtype,
               at::Device device)
      : weights_(weights), prefix_(std::move(prefix)), dtype_(dtype), device_(device) {}

  StatusOr<at::Tensor> Get(std::string_view suffix, std::initializer_list<int64_t> shape) const {
    const std::string name = prefix_ + std::string(suffix);
    FLEET_ASSIGN_OR_RETURN(at::Tensor t, weights_.Get(name));
    FLEET_RETURN_IF_ERROR(CheckTensor(t, "weight", name, shape));
    if (t.scalar_type() != dtype_) {
      return InvalidArgumentError("weight '" + name + "' has dtype " +
                                  std::string(DtypeName(t.scalar_type())) + ", expected " +
                                  std::string(DtypeName(dtype_)) + " (see Model::PrepareWeight)");
    }
    if (t.device() != device_) {
      return InvalidArgumentError("weight '" + name + "' is on " + t.device().str() +
                                  " but the activations are on " + device_.str());
    }
    return t;
  }
  /// An undefined tensor when `present` is false (qkv_bias = false).
  StatusOr<at::Tensor> GetIf(bool present, std::string_view suffix,
                             std::initializer_list<int64_t> shape) const {
    if (!present) return at::Tensor();
    return Get(suffix, shape);
  }

 private:
  const WeightAccessor& weights_;
  std::string prefix_;
  at::ScalarType dtype_;
  at::Device device_;
};

// ---- Ops shared by the families (ComfyUI's formulation; fp16-safe on the CPU) ----

at::Tensor Silu(const at::Tensor& x);

/// LayerNorm over the last dimension without affine parameters.
at::Tensor LayerNorm(const at::Tensor& x, double eps = 1e-6);

/// LayerNorm over the last dimension with gain and bias (in x's dtype).
at::Tensor LayerNormAffine(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           double eps);

/// a @ b; fp16 on the CPU is formed in float32 and rounded once.
at::Tensor Matmul(const at::Tensor& a, const at::Tensor& b);

/// LN(x) * (1 + scale) + shift, as one addcmul like ComfyUI's apply_mod.
at::Tensor Modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                    double eps = 1e-6);

/// RMSNorm over the last dimension with gain, in float32, rounded to `out_dtype`.
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& gain, at::ScalarType out_dtype,
                   double eps = 1e-6);

/// Interleaved-pair rotation of x [B, H, T, d] by pe [1, 1, T, d/2, 2, 2] (float32 maths):
/// out[2j+i] = pe[j][i][0] * x[2j] + pe[j][i][1] * x[2j+1].
at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& pe);

/// Runs `fn` (returning Status), translating c10::Error and std::exception into a Status that
/// names `where`.
template <typename Fn>
Status GuardTorch(std::string_view where, Fn&& fn) {
  try {
    return fn();
  } catch (const std::exception& e) {
    std::string what = e.what();
    // c10::Error messages carry a multi-line backtrace; the first line is the useful part.
    if (auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
    return InternalError(std::string(where) + ": libtorch: " + what);
  }
}

}  // namespace fleet::models::internal
