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
