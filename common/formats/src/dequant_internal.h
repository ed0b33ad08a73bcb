// Private to dequant*.cc: block layouts (ggml-common.h) and the per-type row kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include "fleet/formats/dequant.h"

namespace fleet::formats::internal {

inline float F32FromBits(uint32_t w) {
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
inline uint32_t F32Bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, 4);
  return w;
}
inline uint16_t Load16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

float HalfToFloat(uint16_t h);    // ggml_compute_fp16_to_fp32
uint16_t FloatToHalf(float f);    // ggml_compute_fp32_to_fp16
uint16_t FloatToBf16(float f);    // ggml_compute_fp32_to_bf16

// Block sizes in bytes (ggml-common.h).
inline constexpr int kQK = 32;
inline constexpr int kQKK = 256;

// f32 row kernels: `nb` blocks from `src` to `y`. Scalar reference versions.
using RowFn = void (*)(const uint8_t* src, int64_t nb, float* y);
RowFn ScalarRowFn(GgmlType type);
// AVX2 versions; nullptr when the type has none (or the build lacks them).
RowFn Avx2RowFn(GgmlType type);
bool CpuHasAvx2();
// f32 -> f16 / bf16 conversions of n values (ggml rounding).
void ConvertF16Scalar(const float* x, int64_t n, uint16_t* y);
void ConvertBf16Scalar(const float* x, int64_t n, uint16_t* y);
void ConvertF16Avx2(const float* x, int64_t n, uint16_t* y);
void ConvertBf16Avx2(const float* x, int64_t n, uint16_t* y);

}  // namespace fleet::formats::internal
