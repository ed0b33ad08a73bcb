// GGUF and fp8 expansion with libtorch ops, on whatever device the stored bytes are: a CUDA
// worker expands on the GPU instead of copying the bytes to the host and back. The float
// operations are ggml's own, one op at a time in ggml's order (products rounded to float32
// separately, never fused), so the values equal formats::Dequantize's bit for bit on every
// device (tests/unit/models/stored_weights_test checks it on the CPU).
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/bitwise_and.h>
#include <ATen/ops/bitwise_left_shift.h>
#include <ATen/ops/bitwise_or.h>
#include <ATen/ops/bitwise_right_shift.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/stack.h>

#include "fleet/models/stored_weights.h"
#include "fleet/tensor/torch_view.h"

namespace fleet::models {
namespace {

// Columns [from, from + n) of the blocks, as a contiguous byte tensor.
at::Tensor Bytes(const at::Tensor& blocks, int64_t from, int64_t n) {
  return blocks.narrow(1, from, n).contiguous();
}

// An fp16 field of every block as float32 [blocks, 1].
at::Tensor Half(const at::Tensor& blocks, int64_t at) {
  return Bytes(blocks, at, 2).view(at::kHalf).to(at::kFloat);
}

at::Tensor Int(const at::Tensor& bytes) { return bytes.to(at::kInt); }

// Q8_0: y = q * d.
at::Tensor Q8_0(const at::Tensor& b) {
  at::Tensor q = Bytes(b, 2, 32).view(at::kChar).to(at::kFloat);
  return q * Half(b, 0);
}

// Q4_0: y[j] = ((qs[j] & 15) - 8) * d, y[j + 16] = ((qs[j] >> 4) - 8) * d.
at::Tensor Q4_0(const at::Tensor& b) {
  at::Tensor qs = Int(Bytes(b, 2, 16));
  at::Tensor q = at::cat({at::bitwise_and(qs, 15), at::bitwise_right_shift(qs, 4)}, 1) - 8;
  return q.to(at::kFloat) * Half(b, 0);
}

// Q4_K: eight sub-blocks of 32 with 6-bit scales and mins; y = (d * sc) * q - (dmin * m).
at::Tensor Q4_K(const at::Tensor& b) {
  const int64_t n = b.size(0);
  at::Tensor s = Int(Bytes(b, 4, 12));
  at::Tensor lo = s.narrow(1, 0, 4), mid = s.narrow(1, 4, 4), hi = s.narrow(1, 8, 4);
  at::Tensor sc =
      at::cat({at::bitwise_and(lo, 63),
               at::bitwise_or(at::bitwise_and(hi, 15),
                              at::bitwise_left_shift(at::bitwise_right_shift(lo, 6), 4))},
              1);
  at::Tensor m =
      at::cat({at::bitwise_and(mid, 63),
               at::bitwise_or(at::bitwise_right_shift(hi, 4),
                              at::bitwise_left_shift(at::bitwise_right_shift(mid, 6), 4))},
              1);
  at::Tensor d1 = Half(b, 0) * sc.to(at::kFloat);  // [n, 8]
  at::Tensor m1 = Half(b, 2) * m.to(at::kFloat);   // [n, 8]
  at::Tensor qs = Int(Bytes(b, 16, 128)).view({n, 4, 32});
  // Sub-block 2g is the low nibbles of bytes [32g, 32g + 32), 2g + 1 their high nibbles.
  at::Tensor q = at::stack({at::bitwise_and(qs, 15), at::bitwise_right_shift(qs, 4)}, 2)
                     .view({n, 8, 32})
                     .to(at::kFloat);
  return (d1.unsqueeze(2) * q - m1.unsqueeze(2)).view({n, 256});
}

// Q6_K: two halves of 128; y = (d * sc) * q with q 6-bit from ql (low 4) and qh (high 2).
at::Tensor Q6_K(const at::Tensor& b) {
  const int64_t n = b.size(0);
  at::Tensor ql = Int(Bytes(b, 0, 128)).view({n, 2, 64});
  at::Tensor qh = Int(Bytes(b, 128, 64)).view({n, 2, 1, 32});
  at::Tensor sc = Bytes(b, 192, 16).view(at::kChar).to(at::kFloat).view({n, 2, 8});
  at::Tensor low = at::cat({at::bitwise_and(ql, 15), at::bitwise_right_shift(ql, 4)}, 2)
                       .view({n, 2, 4, 32});  // quarters k: (l & 15), (l+32 & 15), (l >> 4), ...
  at::Tensor shifts = at::arange(0, 8, 2, at::TensorOptions().dtype(at::kInt).device(b.device()))
                          .view({1, 1, 4, 1});
  at::Tensor high = at::bitwise_and(at::bitwise_right_shift(qh, shifts), 3);  // [n, 2, 4, 32]
  at::Tensor q = (at::bitwise_or(low, at::bitwise_left_shift(high, 4)) - 32).to(at::kFloat);
  // Value l of quarter k uses scale 2k + l / 16 of its half.
  at::Tensor scale = (Half(b, 208).view({n, 1, 1}) * sc).view({n, 2, 4, 2, 1});
  return (scale * q.view({n, 2, 4, 2, 16})).view({n, 256});
}

// The 256 values of an fp8 format, by code, as float32 on the CPU.
StatusOr<at::Tensor> Fp8Table(bool e5m2) {
  at::Tensor codes = at::arange(0, 256, at::TensorOptions().dtype(at::kInt)).to(at::kByte);
  return tensor::UpcastF8(codes, e5m2 ? tensor::F8Format::kE5M2 : tensor::F8Format::kE4M3,
                          at::kFloat);
}

}  // namespace

bool ExpandsWithTorchOps(formats::GgmlType type) {
  using T = formats::GgmlType;
  return type == T::kQ8_0 || type == T::kQ4_0 || type == T::kQ4_K || type == T::kQ6_K;
}

at::Tensor DequantizeWithTorchOps(formats::GgmlType type, const at::Tensor& bytes,
                                  const std::vector<int64_t>& shape) {
  using T = formats::GgmlType;
  const auto traits = *formats::GgmlTypeInfo(static_cast<uint32_t>(type));
  const at::Tensor blocks = bytes.view({-1, traits.type_size});
  at::Tensor out;
  switch (type) {
    case T::kQ8_0:
      out = Q8_0(blocks);
      break;
    case T::kQ4_0:
      out = Q4_0(blocks);
      break;
    case T::kQ4_K:
      out = Q4_K(blocks);
      break;
    case T::kQ6_K:
      out = Q6_K(blocks);
      break;
    default:
      TORCH_CHECK(false, "no libtorch expansion for this GGUF type");
  }
  return out.reshape(shape);
}

StatusOr<at::Tensor> UpcastF8WithTorchOps(const at::Tensor& bytes, bool e5m2) {
  // Every fp8 value, exactly, from the host decoder, made once per format (this runs for every
  // fp8 weight a block reads); then a gather on the bytes' device.
  static const StatusOr<at::Tensor> kTables[2] = {Fp8Table(false), Fp8Table(true)};
  const StatusOr<at::Tensor>& table = kTables[e5m2 ? 1 : 0];
  if (!table.ok()) return table.status();
  return at::index_select(table->to(bytes.device()), 0, bytes.reshape({-1}).to(at::kLong))
      .view(bytes.sizes());
}

}  // namespace fleet::models
