// libtorch tensors over model-file tensors: zero-copy views of the mapping, exact fp8 upcasts,
// and dequantised GGUF tensors.
//
// View() wraps a tensor's bytes in the file mapping with at::from_blob; the tensor's deleter
// holds a shared_ptr to the mapping, so the view stays valid after the ModelFile is destroyed.
// Views are READ-ONLY (the mapping is PROT_READ): writing to one is a SIGSEGV; clone() first.
// libtorch 1.13 has no float8 dtype, so F8_E4M3 / F8_E5M2 tensors are viewed as kByte and
// converted with UpcastF8, which is exact for f32, f64, f16 and bf16 (every fp8 value is
// representable in each of them). Load() always returns a new tensor in the dtype asked for,
// dequantising GGUF block types (bit-identical to ggml) and upcasting fp8.
//
// Thread safety: pure functions; the returned tensors are independent values (views share
// read-only memory).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "fleet/formats/dtype.h"
#include "fleet/formats/model_file.h"
#include "fleet/status/status.h"

namespace fleet::tensor {

/// The at:: dtype that holds a safetensors dtype bit-for-bit: F8_* -> kByte (raw bytes).
/// Unimplemented for U16/U32/U64 (no such dtype in libtorch 1.13).
StatusOr<at::ScalarType> ToScalarType(formats::DType dtype);
/// The safetensors dtype of an at:: dtype, or nullopt (complex, quantised, ...).
std::optional<formats::DType> FromScalarType(at::ScalarType type);

enum class F8Format { kE4M3, kE5M2 };

/// Converts fp8 bytes (a kByte tensor of any shape) to `out` (kFloat, kDouble, kHalf or
/// kBFloat16), exactly; e4m3fn NaN (0x7f/0xff) becomes NaN, e5m2 inf/NaN stay inf/NaN.
StatusOr<at::Tensor> UpcastF8(const at::Tensor& bytes, F8Format format, at::ScalarType out);

/// Converts floating values (kFloat, kDouble, kHalf or kBFloat16, via float32) to fp8 bytes
/// (kByte), rounding to nearest, ties to even, as PyTorch's `.to(torch.float8_*)` does (what
/// ComfyUI's `weight_dtype` does to a checkpoint): e4m3fn has no infinity, so magnitudes above
/// 464 (halfway past its largest value, 448) and NaN become NaN (0x7f | sign); e5m2 turns
/// magnitudes of 61440 and more into infinity and NaN into NaN (0x7f | sign).
StatusOr<at::Tensor> DowncastF8(const at::Tensor& values, F8Format format);

/// A zero-copy, read-only tensor over `info`'s bytes in `file` (which must come from
/// ModelFile::Open). Safetensors dtypes and GGUF F32/F16/BF16/I8..I64/F64 only; block-quantised
/// GGUF types and data not aligned to the element size give FailedPrecondition (use Load).
StatusOr<at::Tensor> View(const formats::ModelFile& file, const formats::TensorInfo& info);

/// `info`'s values in their stored dtype: View() when the data is aligned to its elements, else
/// a private copy (safetensors files pack tensors without alignment, and a file with odd-sized
/// byte tensors, such as ComfyUI's comfy_quant entries, has unaligned tensors after them).
StatusOr<at::Tensor> ViewOrCopy(const formats::ModelFile& file, const formats::TensorInfo& info);

/// A new tensor of dtype `out` holding `info`'s values: copied, cast, fp8-upcast or
/// dequantised as needed.
StatusOr<at::Tensor> Load(const formats::ModelFile& file, const formats::TensorInfo& info,
                          at::ScalarType out);

}  // namespace fleet::tensor
