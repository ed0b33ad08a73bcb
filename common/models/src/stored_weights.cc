#include "fleet/models/stored_weights.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>

#include <nlohmann/json.hpp>

#include <span>

#include "fleet/formats/dequant.h"
#include "fleet/tensor/torch_view.h"

namespace fleet::models {
namespace {

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string Where(std::string_view name) { return "weight '" + std::string(name) + "'"; }

// Shapes from files and peers: at most 8 dimensions, none negative, a product that fits.
Status CheckShape(std::string_view name, const std::vector<int64_t>& shape) {
  if (shape.size() > 8) return InvalidArgumentError(Where(name) + ": more than 8 dimensions");
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return InvalidArgumentError(Where(name) + ": negative dimension");
    if (__builtin_mul_overflow(n, d, &n)) {
      return InvalidArgumentError(Where(name) + ": the shape's element count overflows");
    }
  }
  return Status::OK();
}

// GGUF blocks to `compute` through `dequant`: ggml's dequantisation, rounded once to f16/bf16
// with ggml's rounding when `dequant` is one of them (f32 keeps f32), then converted to
// `compute`; on the CPU (the result goes where the bytes were), or with libtorch ops on the
// bytes' GPU for the types ExpandsWithTorchOps names (the same values).
StatusOr<at::Tensor> ExpandGguf(std::string_view name, const StoredWeight& w,
                                at::ScalarType dequant, at::ScalarType compute) {
  formats::OutType out = formats::OutType::kF32;
  at::ScalarType produced = at::kFloat;
  if (dequant == at::kHalf) {
    out = formats::OutType::kF16;
    produced = at::kHalf;
  } else if (dequant == at::kBFloat16) {
    out = formats::OutType::kBF16;
    produced = at::kBFloat16;
  }
  if (!w.data.is_cpu() && ExpandsWithTorchOps(w.gguf_type)) {  // on the GPU, where the bytes are
    return DequantizeWithTorchOps(w.gguf_type, w.data, w.shape).to(produced).to(compute);
  }
  const at::Tensor bytes = w.data.is_cpu() ? w.data : w.data.cpu();
  at::Tensor t = at::empty(w.shape, at::TensorOptions().dtype(produced));
  std::span<const uint8_t> src(static_cast<const uint8_t*>(bytes.data_ptr()),
                               static_cast<size_t>(bytes.numel()));
  FLEET_RETURN_IF_ERROR(
      formats::Dequantize(w.gguf_type, src, t.numel(), out, t.data_ptr()).WithContext(Where(name)));
  if (produced != compute) t = t.to(compute);
  return w.data.is_cpu() ? t : t.to(w.data.device());
}

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() > suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// "<layer><suffix>" -> "<layer>.weight".
std::string WeightOf(std::string_view name, std::string_view suffix) {
  return std::string(name.substr(0, name.size() - suffix.size())) + ".weight";
}

bool IsFp8(const StoredWeight& w) {
  return w.form == StoredWeight::Form::kF8E4M3 || w.form == StoredWeight::Form::kF8E5M2;
}

// `<layer>.scale_weight` (older form) or `<layer>.weight_scale` (newer form) onto its weight.
Status AttachScale(WeightStore& store, const std::string& name, const StoredWeight& scale,
                   bool in_f32) {
  const std::string weight_name = WeightOf(name, in_f32 ? ".weight_scale" : ".scale_weight");
  if (!scale.data.defined() || scale.data.numel() != 1 ||
      scale.form != StoredWeight::Form::kResident ||
      !at::isFloatingType(scale.data.scalar_type())) {
    return InvalidArgumentError(
        "scale '" + name + "' must be one floating value (a per-tensor scale), not " +
        (scale.data.defined() ? std::to_string(scale.data.numel()) + " values" : "none"));
  }
  auto it = store.find(weight_name);
  if (it == store.end()) {
    return InvalidArgumentError("scale '" + name + "' has no weight '" + weight_name + "'");
  }
  StoredWeight& w = it->second;
  if (!IsFp8(w)) {
    return InvalidArgumentError("scale '" + name + "' scales '" + weight_name +
                                "', which is not fp8");
  }
  w.scale = scale.data.reshape({});
  w.scale_in_f32 = in_f32;
  return Status::OK();
}

// `<layer>.comfy_quant`: the layer's format as UTF-8 JSON bytes; only the fp8 formats expand.
Status CheckQuantConfig(const WeightStore& store, const std::string& name,
                        const StoredWeight& config) {
  if (!config.data.defined() || config.data.scalar_type() != at::kByte || config.data.dim() != 1 ||
      config.form != StoredWeight::Form::kResident) {
    return InvalidArgumentError("'" + name + "' must be the bytes of a JSON object");
  }
  const at::Tensor bytes = config.data.cpu().contiguous();
  const std::string text(static_cast<const char*>(bytes.data_ptr()),
                         static_cast<size_t>(bytes.numel()));
  const auto json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object() || !json.contains("format") ||
      !json["format"].is_string()) {
    return InvalidArgumentError("'" + name + "' is not a JSON object with a string 'format'");
  }
  const std::string format = json["format"].get<std::string>();
  const std::string layer = name.substr(0, name.size() - std::string_view(".comfy_quant").size());
  StoredWeight::Form want;
  if (format == "float8_e4m3fn") {
    want = StoredWeight::Form::kF8E4M3;
  } else if (format == "float8_e5m2") {
    want = StoredWeight::Form::kF8E5M2;
  } else {
    return UnimplementedError("layer '" + layer + "' is in ComfyUI's quantised format '" + format +
                              "', which Tensorfleet cannot expand (it reads float8_e4m3fn and "
                              "float8_e5m2; use a GGUF or fp8 checkpoint)");
  }
  auto it = store.find(layer + ".weight");
  if (it == store.end() || it->second.form != want) {
    return InvalidArgumentError("'" + name + "' says " + format + ", but '" + layer +
                                ".weight' is " + (it == store.end() ? "missing" : "not " + format));
  }
  return Status::OK();
}

}  // namespace

uint64_t StoredWeight::resident_bytes() const {
  return data.defined() ? static_cast<uint64_t>(data.nbytes()) : 0;
}

uint64_t StoredWeight::expanded_bytes(at::ScalarType compute) const {
  if (form == Form::kResident) return resident_bytes();
  return static_cast<uint64_t>(Numel(shape)) * c10::elementSize(compute);
}

StatusOr<StoredWeight> MakeStoredGguf(std::string_view name, at::Tensor bytes,
                                      formats::GgmlType type, std::vector<int64_t> shape) {
  auto traits = formats::GgmlTypeInfo(static_cast<uint32_t>(type));
  if (!traits || !traits->dequantizable) {
    return UnimplementedError(
        Where(name) + ": GGUF type " +
        (traits ? std::string(traits->name) : "#" + std::to_string(static_cast<uint32_t>(type))) +
        " cannot be expanded by this build");
  }
  FLEET_RETURN_IF_ERROR(CheckShape(name, shape));
  const int64_t n = Numel(shape);
  if (n % traits->block_size != 0) {
    return InvalidArgumentError(Where(name) + ": " + std::to_string(n) + " values are not whole " +
                                std::string(traits->name) + " blocks of " +
                                std::to_string(traits->block_size));
  }
  const int64_t need = n / traits->block_size * traits->type_size;
  if (bytes.scalar_type() != at::kByte || bytes.numel() != need || !bytes.is_contiguous()) {
    return InvalidArgumentError(Where(name) + ": " + std::string(traits->name) + " of " +
                                std::to_string(n) + " values needs " + std::to_string(need) +
                                " contiguous bytes, got " + std::to_string(bytes.nbytes()));
  }
  StoredWeight w;
  w.form = StoredWeight::Form::kGguf;
  w.data = std::move(bytes);
  w.gguf_type = type;
  w.shape = std::move(shape);
  return w;
}

StatusOr<StoredWeight> MakeStoredF8(std::string_view name, at::Tensor bytes, bool e5m2) {
  if (bytes.scalar_type() != at::kByte) {
    return InvalidArgumentError(Where(name) + ": fp8 bytes must be a byte tensor");
  }
  std::vector<int64_t> shape(bytes.sizes().begin(), bytes.sizes().end());
  StoredWeight w;
  w.form = e5m2 ? StoredWeight::Form::kF8E5M2 : StoredWeight::Form::kF8E4M3;
  w.data = std::move(bytes);
  w.shape = std::move(shape);
  return w;
}

StatusOr<at::Tensor> StoredWeights::Expand(const Model& model, std::string_view name,
                                           const StoredWeight& w,
                                           std::optional<at::ScalarType> dequant) {
  try {
    switch (w.form) {
      case StoredWeight::Form::kResident:
        return w.data;
      case StoredWeight::Form::kGguf: {
        const at::ScalarType compute = model.compute_dtype();
        FLEET_ASSIGN_OR_RETURN(at::Tensor t,
                               ExpandGguf(name, w, dequant.value_or(compute), compute));
        return model.PrepareWeight(name, t);
      }
      case StoredWeight::Form::kF8E4M3:
      case StoredWeight::Form::kF8E5M2: {
        const auto format = w.form == StoredWeight::Form::kF8E5M2 ? tensor::F8Format::kE5M2
                                                                  : tensor::F8Format::kE4M3;
        // Exact in f32 (on the GPU by a table gather when the bytes are there); PrepareWeight
        // rounds once to the compute dtype.
        at::Tensor wide;
        if (w.data.is_cpu()) {
          FLEET_ASSIGN_OR_RETURN(wide, tensor::UpcastF8(w.data, format, at::kFloat));
        } else {
          FLEET_ASSIGN_OR_RETURN(wide,
                                 UpcastF8WithTorchOps(w.data, format == tensor::F8Format::kE5M2));
        }
        if (w.scale.defined() && w.scale_in_f32) {
          wide = at::mul(wide, w.scale.to(wide.device(), at::kFloat));
        }
        FLEET_ASSIGN_OR_RETURN(at::Tensor weight, model.PrepareWeight(name, wide));
        if (!w.scale.defined() || w.scale_in_f32) return weight;
        return at::mul(weight, w.scale.to(weight.device(), weight.scalar_type()));
      }
    }
  } catch (const c10::Error& e) {
    return InternalError(Where(name) + ": expanding: " + e.what_without_backtrace());
  }
  return InternalError(Where(name) + ": unknown stored form");
}

Status AttachScales(WeightStore& store) {
  for (auto& [name, entry] : store) {
    if (EndsWith(name, ".comfy_quant")) {
      FLEET_RETURN_IF_ERROR(CheckQuantConfig(store, name, entry));
    } else if (EndsWith(name, ".scale_weight")) {
      FLEET_RETURN_IF_ERROR(AttachScale(store, name, entry, /*in_f32=*/false));
    } else if (EndsWith(name, ".weight_scale")) {
      FLEET_RETURN_IF_ERROR(AttachScale(store, name, entry, /*in_f32=*/true));
    }
  }
  return Status::OK();
}

StatusOr<at::Tensor> StoredWeights::Get(std::string_view name) const {
  auto it = store_.find(name);
  if (it == store_.end() || !it->second.data.defined()) {
    return InvalidArgumentError("missing " + Where(name));
  }
  return Expand(model_, name, it->second, dequant_);
}

bool StoredWeights::Has(std::string_view name) const {
  auto it = store_.find(name);
  return it != store_.end() && it->second.data.defined();
}

}  // namespace fleet::models
