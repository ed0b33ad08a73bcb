// Element types of model files.
//
// DType is the safetensors dtype vocabulary ("F32", "BF16", "F8_E4M3", ...): every element has a
// whole number of bytes. GgmlType is GGUF's tensor type, numbered exactly as ggml numbers it on
// disk (ggml.h `enum ggml_type`); most of those are block-quantised: `block_size` elements are
// stored in `type_size` bytes. TensorInfo carries the type as its name string ("BF16", "Q4_K")
// so that both families fit one field; these tables convert names, ids and sizes.
//
// Thread safety: everything here is immutable data and pure functions.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace fleet::formats {

/// A safetensors element type. The numeric values are ours (not on disk); the names are the
/// safetensors spelling.
enum class DType : uint8_t {
  kBool,
  kU8,
  kI8,
  kF8E5M2,  // "F8_E5M2": 1 sign, 5 exponent (bias 15), 2 mantissa bits; has inf and NaN
  kF8E4M3,  // "F8_E4M3": e4m3fn, 1 sign, 4 exponent (bias 7), 3 mantissa; no inf, NaN = 0x7f/0xff
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
};
inline constexpr int kDTypeCount = 15;

/// \return the safetensors name, e.g. "BF16", "F8_E4M3".
std::string_view DTypeName(DType dtype);
/// \return the dtype for a safetensors name (exact, case-sensitive), or nullopt.
std::optional<DType> ParseDType(std::string_view name);
/// \return bytes per element (1 for BOOL and the fp8 types).
int DTypeSize(DType dtype);

/// A GGUF tensor type; values are ggml's on-disk ids and must never be renumbered.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
  kNVFP4 = 40,
  kQ1_0 = 41,
  kQ2_0 = 42,
};

/// Storage traits of a ggml type.
struct GgmlTypeTraits {
  GgmlType type;
  std::string_view name;  // "Q4_K", "F16", ...
  int block_size;         // elements per block (1 for plain types)
  int type_size;          // bytes per block
  bool dequantizable;     // fleet::formats::Dequantize supports it
};

/// \return the traits for an on-disk type id, or nullopt for ids ggml does not define
/// (4, 5, 31..33 and 36..38 were removed from ggml; anything past 42 is unknown).
std::optional<GgmlTypeTraits> GgmlTypeInfo(uint32_t id);
/// \return the traits for a type name such as "Q4_K", or nullopt.
std::optional<GgmlTypeTraits> GgmlTypeByName(std::string_view name);
/// True for a GGUF block type name ("Q8_0", "Q4_K", ...): values stored in blocks with scales,
/// which a loader dequantises to the compute dtype. False for plain types ("F16") and others.
bool IsBlockQuantised(std::string_view dtype_name);

/// True for the tensors of ComfyUI's scaled-fp8 checkpoints that describe a quantised weight
/// rather than being one (`<layer>.scale_weight`, `.scale_input`, `.weight_scale`,
/// `.input_scale`, `.comfy_quant`): loaders keep them as stored, never in the compute dtype.
bool IsQuantParameter(std::string_view tensor_name);

}  // namespace fleet::formats
