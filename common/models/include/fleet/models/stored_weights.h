// Weights kept in the form they are stored in, expanded only when a block asks for them.
//
// A GGUF tensor stays as its quantised blocks and an fp8 tensor as its bytes; StoredWeights
// expands one of them into a new tensor in the model's compute dtype each time a block's
// WeightAccessor::Get asks for it, so a block never holds more than the layer it is computing
// expanded (the caching allocators reuse the memory from layer to layer). The expansion is the
// one loading used to do, in the same order (GGUF: ggml's dequantisation rounded once to the
// compute dtype; fp8: exact upcast to f32), followed by Model::PrepareWeight, so the bits a block
// sees are the same as those of a weight expanded at load.
//
// Thread safety: a WeightStore is immutable once built; StoredWeights is used by one RunBlock.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fleet/formats/dtype.h"
#include "fleet/models/model.h"
#include "fleet/status/status.h"

namespace fleet::models {

/// One weight as a worker or fleet-run-local keeps it.
struct StoredWeight {
  enum class Form : uint8_t {
    kResident,  // `data` is already what RunBlock expects (Model::PrepareWeight's output)
    kGguf,      // `data` holds `gguf_type` blocks (kByte), `shape` is the logical shape
    kF8E4M3,    // `data` holds e4m3fn bytes (kByte) of `shape`
    kF8E5M2,    // `data` holds e5m2 bytes (kByte) of `shape`
  };
  Form form = Form::kResident;
  at::Tensor data;
  formats::GgmlType gguf_type = formats::GgmlType::kF32;
  std::vector<int64_t> shape;
  at::Tensor scale;  // fp8 forms: the per-tensor scale of a scaled-fp8 checkpoint, or undefined
  // How `scale` applies: false for the older scaled_fp8 form (weight and scale each rounded to
  // the compute dtype, then multiplied), true for the newer comfy_quant form (multiplied in f32,
  // then rounded once).
  bool scale_in_f32 = false;

  /// A weight already in compute form.
  static StoredWeight Resident(at::Tensor prepared) {
    StoredWeight w;
    w.data = std::move(prepared);
    return w;
  }

  /// Bytes it keeps resident.
  uint64_t resident_bytes() const;
  /// Bytes of it expanded to `compute` (what it would take resident in compute form).
  uint64_t expanded_bytes(at::ScalarType compute) const;
};

using WeightStore = std::map<std::string, StoredWeight, std::less<>>;

/// A weight kept in its stored form: `bytes` (kByte, on any device) of GGUF `type` or of an fp8
/// type, with logical `shape`. InvalidArgument naming `name` when the bytes are not exactly what
/// the type and shape need, or when the type cannot be expanded.
StatusOr<StoredWeight> MakeStoredGguf(std::string_view name, at::Tensor bytes,
                                      formats::GgmlType type, std::vector<int64_t> shape);
StatusOr<StoredWeight> MakeStoredF8(std::string_view name, at::Tensor bytes, bool e5m2);

/// ComfyUI's scaled-fp8 checkpoints, in both forms, give each fp8 `<layer>.weight` its scale:
/// - older: a `scaled_fp8` marker and `<layer>.scale_weight` (one value); the weight expands to
///   (weight in the compute dtype) x (scale in the compute dtype), as comfy.ops does;
/// - newer: `<layer>.comfy_quant` (UTF-8 JSON {"format": "float8_e4m3fn" | "float8_e5m2"}, as
///   bytes) and `<layer>.weight_scale` (one value); the weight expands to (weight x scale) in
///   f32 rounded once to the compute dtype, as comfy.quant_ops does. Other comfy_quant formats
///   (nvfp4, mxfp8, int8, ...) are Unimplemented naming the format and the layer.
/// The scale entries stay in the store (a donor streams them with the weight; call this again on
/// the receiving side). `scale_input` / `input_scale` are for fp8 matmuls and are not used.
/// InvalidArgument naming the tensor for a scale of more than one value, one whose weight is
/// missing or not fp8, or a comfy_quant whose format does not match the weight's dtype.
Status AttachScales(WeightStore& store);

/// True for the GGUF types DequantizeWithTorchOps expands (Q8_0, Q4_0, Q4_K, Q6_K); weights of
/// other types on a GPU are expanded on the host and copied back.
bool ExpandsWithTorchOps(formats::GgmlType type);

/// ggml's dequantisation of `bytes` (kByte blocks of `type`, on any device) into float32 of
/// `shape` on the same device, with libtorch ops in ggml's order: bit-identical to
/// formats::Dequantize. REQUIRES: ExpandsWithTorchOps(type); the bytes already checked.
at::Tensor DequantizeWithTorchOps(formats::GgmlType type, const at::Tensor& bytes,
                                  const std::vector<int64_t>& shape);

/// fp8 bytes (any device) as float32 on the same device, exactly (a 256-entry table gather).
StatusOr<at::Tensor> UpcastF8WithTorchOps(const at::Tensor& bytes, bool e5m2);

/// The accessor over a block's WeightStore: resident weights as they are, stored forms expanded
/// at each Get into `model`'s compute dtype on the device their bytes are on. `dequant` is
/// ComfyUI-GGUF's dequant_dtype: GGUF weights expand to ggml's f32 values rounded once to it,
/// then converted to the compute dtype; none (default, target) rounds straight to the compute
/// dtype. It does not apply to fp8 weights (neither does ComfyUI-GGUF's).
class StoredWeights final : public WeightAccessor {
 public:
  /// REQUIRES: `model` and `store` outlive this accessor.
  StoredWeights(const Model& model, const WeightStore& store,
                std::optional<at::ScalarType> dequant = std::nullopt)
      : model_(model), store_(store), dequant_(dequant) {}
  StatusOr<at::Tensor> Get(std::string_view name) const override;
  bool Has(std::string_view name) const override;

  /// Expands one stored weight (what Get does), for callers that keep expanded copies.
  static StatusOr<at::Tensor> Expand(const Model& model, std::string_view name,
                                     const StoredWeight& weight,
                                     std::optional<at::ScalarType> dequant = std::nullopt);

 private:
  const Model& model_;
  const WeightStore& store_;
  std::optional<at::ScalarType> dequant_;
};

}  // namespace fleet::models
