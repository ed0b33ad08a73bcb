// Conversions between wire tensors and libtorch tensors for the worker (private).
//
// Thread safety: pure functions.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

#include "fleet/protocol/protocol.h"
#include "fleet/status/status.h"

namespace fleet::worker::internal {

/// The at:: dtype holding a wire dtype bit for bit (fp8 -> kByte: raw bytes).
at::ScalarType ToScalarType(wire::DType dtype);
/// The wire dtype of an at:: dtype; Invalid for types without one.
wire::DType FromScalarType(at::ScalarType type);

/// A CPU tensor over `data` (no copy) whose storage keeps `owner` alive. When `data` is not
/// aligned to the element size, the bytes are copied into a new tensor instead.
at::Tensor WrapBytes(const void* data, wire::DType dtype, const std::vector<int64_t>& shape,
                     std::shared_ptr<const void> owner);

/// Shape as a vector.
std::vector<int64_t> ShapeOf(const at::Tensor& t);
/// t.numel() * element size.
uint64_t TensorBytes(const at::Tensor& t);

}  // namespace fleet::worker::internal
