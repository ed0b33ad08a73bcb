// GGUF dequantisation: ggml block formats to f32, f16 or bf16.
//
// Supported: every type ggml can dequantise (ggml's type_traits has a to_float for it), plus
// F32: F32 F16 BF16, Q4_0 Q4_1 Q5_0 Q5_1 Q8_0, Q1_0 Q2_0, Q2_K Q3_K Q4_K Q5_K Q6_K, IQ1_S IQ1_M
// IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ4_NL IQ4_XS, TQ1_0 TQ2_0, MXFP4 NVFP4
// (GgmlTypeTraits::dequantizable). Q8_1, Q8_K (which ggml cannot dequantise either) and the
// integer / F64 types are refused.
//
// Results are bit-identical to ggml's reference dequantisers (`dequantize_row_*` in
// ggml-quants.c, `ggml_fp16_to_fp32_row`, `ggml_bf16_to_fp32_row`) followed, for f16/bf16
// output, by ggml's own rounding (`ggml_fp32_to_fp16_row`, `ggml_fp32_to_bf16_row`: round to
// nearest even, NaN kept NaN). Dequantize() picks an AVX2 path at run time when the CPU has
// AVX2+FMA+F16C and the type has an AVX2 kernel (F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K..Q6_K;
// the other types use the scalar code); it computes the same operations in the same order (no
// fused multiply-add), so it is bit-identical to the scalar reference. tests/unit/formats checks
// both against libggml-base.so for every type, and the IQ lookup tables (src/iq_grids.h,
// generated from ggml by tests/unit/formats/gen_iq_grids.py) against ggml.
//
// Thread safety: pure functions; concurrent calls on distinct outputs are safe.
#pragma once

#include <cstdint>
#include <span>

#include "fleet/formats/dtype.h"
#include "fleet/status/status.h"

namespace fleet::formats {

enum class OutType { kF32, kF16, kBF16 };

/// Dequantises `n` elements of `type` from `src` into `dst` (n elements of `out`).
/// REQUIRES: dst holds n elements. InvalidArgument when n is not a multiple of the block size,
/// src is not exactly n / block_size * type_size bytes, or the type is not supported (the
/// message names it).
Status Dequantize(GgmlType type, std::span<const uint8_t> src, int64_t n, OutType out, void* dst);

/// The same with the portable scalar reference only (tests and the benchmark baseline).
Status DequantizeReference(GgmlType type, std::span<const uint8_t> src, int64_t n, OutType out,
                           void* dst);

/// True when Dequantize() uses the AVX2 path on this CPU.
bool DequantUsesAvx2();

/// Bit-exact scalar conversions, as ggml does them.
float Fp16ToFp32(uint16_t h);
uint16_t Fp32ToFp16(float f);
float Bf16ToFp32(uint16_t h);
uint16_t Fp32ToBf16(float f);

}  // namespace fleet::formats
