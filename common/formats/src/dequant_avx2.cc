// AVX2 dequantisers, compiled with -mavx2 -mfma -mf16c and chosen at run time. Each one performs
// the scalar reference's float operations in the same order (multiplies and adds are separate:
// no FMA), so results are bit-identical.
#include <immintrin.h>

#include "dequant_internal.h"

namespace fleet::formats::internal {

bool CpuHasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

void ConvertF16Avx2(const float* x, int64_t n, uint16_t* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // F16C keeps NaN payloads; ggml writes 0x7e00 (with the sign). Fix the rare NaN lanes.
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), h);
    if (_mm256_movemask_ps(nan)) {
      for (int k = 0; k < 8; ++k) y[i + k] = FloatToHalf(x[i + k]);
    }
  }
  for (; i < n; ++i) y[i] = FloatToHalf(x[i]);
}

void ConvertBf16Avx2(const float* x, int64_t n, uint16_t* y) {
  const __m256i bias = _mm256_set1_epi32(0x7fff);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf = _mm256_set1_epi32(0x7f800000);
  const __m256i quiet = _mm256_set1_epi32(64);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i r[2];
    for (int h = 0; h < 2; ++h) {
      __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8 * h));
      __m256i rounded = _mm256_srli_epi32(
          _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))),
          16);
      __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
      __m256i nan_val = _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet);
      r[h] = _mm256_blendv_epi8(rounded, nan_val, is_nan);
    }
    // Pack 2 x 8 uint32 (all < 2^16) to 16 x uint16 in order.
    __m256i packed = _mm256_packus_epi32(r[0], r[1]);
    packed = _mm256_permute4x64_epi64(packed, 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), packed);
  }
  for (; i < n; ++i) y[i] = FloatToBf16(x[i]);
}

RowFn Avx2RowFn(GgmlType) { return nullptr; }

}  // namespace fleet::formats::internal
