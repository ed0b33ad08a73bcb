#include "torch_tensors.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstring>

namespace fleet::worker::internal {

at::ScalarType ToScalarType(wire::DType dtype) {
  switch (dtype) {
    case wire::DType::F32:
      return at::kFloat;
    case wire::DType::F16:
      return at::kHalf;
    case wire::DType::BF16:
      return at::kBFloat16;
    case wire::DType::F64:
      return at::kDouble;
    case wire::DType::I64:
      return at::kLong;
    case wire::DType::I32:
      return at::kInt;
    case wire::DType::I16:
      return at::kShort;
    case wire::DType::I8:
      return at::kChar;
    case wire::DType::Bool:
      return at::kBool;
    case wire::DType::U8:
    case wire::DType::F8E4M3:
    case wire::DType::F8E5M2:
    default:
      return at::kByte;
  }
}

wire::DType FromScalarType(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return wire::DType::F32;
    case at::kHalf:
      return wire::DType::F16;
    case at::kBFloat16:
      return wire::DType::BF16;
    case at::kDouble:
      return wire::DType::F64;
    case at::kLong:
      return wire::DType::I64;
    case at::kInt:
      return wire::DType::I32;
    case at::kShort:
      return wire::DType::I16;
    case at::kChar:
      return wire::DType::I8;
    case at::kByte:
      return wire::DType::U8;
    case at::kBool:
      return wire::DType::Bool;
    default:
      return wire::DType::Invalid;
  }
}

at::Tensor WrapBytes(const void* data, wire::DType dtype, const std::vector<int64_t>& shape,
                     std::shared_ptr<const void> owner) {
  const auto options = at::TensorOptions().dtype(ToScalarType(dtype)).device(at::kCPU);
  const size_t elem = protocol::DTypeSize(dtype);
  if (data == nullptr || reinterpret_cast<uintptr_t>(data) % elem != 0) {
    at::Tensor t = at::empty(shape, options);
    if (t.numel() > 0) std::memcpy(t.data_ptr(), data, t.numel() * elem);
    return t;
  }
  return at::from_blob(
      const_cast<void*>(data), shape, [owner = std::move(owner)](void*) mutable { owner.reset(); },
      options);
}

std::vector<int64_t> ShapeOf(const at::Tensor& t) {
  return std::vector<int64_t>(t.sizes().begin(), t.sizes().end());
}

uint64_t TensorBytes(const at::Tensor& t) {
  return static_cast<uint64_t>(t.numel()) * t.element_size();
}

}  // namespace fleet::worker::internal
