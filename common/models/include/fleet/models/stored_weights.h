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

/// ComfyUI's scaled-fp8 checkpoints: every `<layer>.scale_weight` (one value) becomes the scale
/// of the fp8 `<layer>.weight`, which then expands to (weight in the compute dtype) x (scale in
/// the compute dtype), as comfy.ops does. The scale entries stay in the store (a donor streams
/// them with the weight; call this again on the receiving side). `<layer>.scale_input` is for
/// fp8 matmuls and is not used. InvalidArgument naming the tensor for a scale of more than one
/// value, or one whose weight is missing or not fp8.
Status AttachScales(WeightStore& store);

/// True for the scale tensors of a scaled-fp8 checkpoint (`.scale_weight`, `.scale_input`),
/// which a weight_dtype conversion leaves as they are.
bool IsFp8Scale(std::string_view name);

/// The accessor over a block's WeightStore: resident weights as they are, stored forms expanded
/// at each Get into `model`'s compute dtype on the device their bytes are on.
class StoredWeights final : public WeightAccessor {
 public:
  /// REQUIRES: `model` and `store` outlive this accessor.
  StoredWeights(const Model& model, const WeightStore& store) : model_(model), store_(store) {}
  StatusOr<at::Tensor> Get(std::string_view name) const override;
  bool Has(std::string_view name) const override;

  /// Expands one stored weight (what Get does), for callers that keep expanded copies.
  static StatusOr<at::Tensor> Expand(const Model& model, std::string_view name,
                                     const StoredWeight& weight);

 private:
  const Model& model_;
  const WeightStore& store_;
};

}  // namespace fleet::models
