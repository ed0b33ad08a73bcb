// AVX2 dequantisers, compiled with -mavx2 -mfma -mf16c and chosen at run time. Each one performs
// the scalar reference's float operations in the same order (multiplies and adds are separate:
// no FMA), so results are bit-identical.
#include <cpuid.h>
#include <immintrin.h>

#include <cstring>

#include "dequant_internal.h"

namespace fleet::formats::internal {

bool CpuHasAvx2() {
  // cpuid directly: clang 14's __builtin_cpu_supports does not know "f16c".
  static const bool has = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    const bool fma = c & (1u << 12), osxsave = c & (1u << 27), f16c = c & (1u << 29);
    if (!fma || !osxsave || !f16c) return false;
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 6) != 6) return false;  // the OS saves xmm and ymm state
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return (b & (1u << 5)) != 0;  // AVX2
  }();
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

namespace {

inline __m256 Half8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// y[0..7] = float(i32) * d
inline void MulStore(float* y, __m256i i32, __m256 d) {
  _mm256_storeu_ps(y, _mm256_mul_ps(_mm256_cvtepi32_ps(i32), d));
}
// y[0..7] = float(i32) * d + m  (two roundings, as the scalar code)
inline void MulAddStore(float* y, __m256i i32, __m256 d, __m256 m) {
  _mm256_storeu_ps(y, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i32), d), m));
}
// y[0..7] = float(i32) * d - m
inline void MulSubStore(float* y, __m256i i32, __m256 d, __m256 m) {
  _mm256_storeu_ps(y, _mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i32), d), m));
}
// Signed bytes 8*k .. 8*k+7 of a 128-bit vector as int32.
template <int k>
inline __m256i I8x8(__m128i v) {
  return _mm256_cvtepi8_epi32(_mm_srli_si128(v, 8 * k));
}
template <int k>
inline __m256i U8x8(__m128i v) {
  return _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8 * k));
}

void RowF16(const uint8_t* src, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, Half8(src + 2 * i));
  for (; i < n; ++i) y[i] = HalfToFloat(Load16(src + 2 * i));
}

void RowBf16(const uint8_t* src, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), w);
  }
  for (; i < n; ++i) y[i] = F32FromBits(static_cast<uint32_t>(Load16(src + 2 * i)) << 16);
}

void RowQ8_0(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 34, y += kQK) {
    const __m256 d = _mm256_set1_ps(HalfToFloat(Load16(x)));
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 2));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 18));
    MulStore(y + 0, I8x8<0>(a), d);
    MulStore(y + 8, I8x8<1>(a), d);
    MulStore(y + 16, I8x8<0>(b), d);
    MulStore(y + 24, I8x8<1>(b), d);
  }
}

// Low and high nibbles of 16 bytes, each minus `bias`, as int8.
inline void Nibbles(const uint8_t* qs, int bias, __m128i* lo, __m128i* hi) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i b = _mm_set1_epi8(static_cast<char>(bias));
  *lo = _mm_sub_epi8(_mm_and_si128(q, mask), b);
  *hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), mask), b);
}

void RowQ4_0(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 18, y += kQK) {
    const __m256 d = _mm256_set1_ps(HalfToFloat(Load16(x)));
    __m128i lo, hi;
    Nibbles(x + 2, 8, &lo, &hi);
    MulStore(y + 0, I8x8<0>(lo), d);
    MulStore(y + 8, I8x8<1>(lo), d);
    MulStore(y + 16, I8x8<0>(hi), d);
    MulStore(y + 24, I8x8<1>(hi), d);
  }
}

void RowQ4_1(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 20, y += kQK) {
    const __m256 d = _mm256_set1_ps(HalfToFloat(Load16(x)));
    const __m256 m = _mm256_set1_ps(HalfToFloat(Load16(x + 2)));
    __m128i lo, hi;
    Nibbles(x + 4, 0, &lo, &hi);
    MulAddStore(y + 0, U8x8<0>(lo), d, m);
    MulAddStore(y + 8, U8x8<1>(lo), d, m);
    MulAddStore(y + 16, U8x8<0>(hi), d, m);
    MulAddStore(y + 24, U8x8<1>(hi), d, m);
  }
}

// The fifth bits of Q5_0/Q5_1: element j (0..31) gets bit j of qh, as 0 or 16, 8 at a time.
inline __m256i HighBits(uint32_t qh, int first) {
  const __m256i idx = _mm256_setr_epi32(first, first + 1, first + 2, first + 3, first + 4,
                                        first + 5, first + 6, first + 7);
  const __m256i bits = _mm256_and_si256(
      _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(qh)), idx), _mm256_set1_epi32(1));
  return _mm256_slli_epi32(bits, 4);
}

template <bool kHasMin>
void RowQ5(const uint8_t* x, int64_t nb, float* y) {
  constexpr int kBlock = kHasMin ? 24 : 22;
  constexpr int kQh = kHasMin ? 4 : 2;
  const __m256i sixteen = _mm256_set1_epi32(16);
  for (int64_t i = 0; i < nb; ++i, x += kBlock, y += kQK) {
    const __m256 d = _mm256_set1_ps(HalfToFloat(Load16(x)));
    const __m256 m = kHasMin ? _mm256_set1_ps(HalfToFloat(Load16(x + 2))) : _mm256_setzero_ps();
    uint32_t qh;
    std::memcpy(&qh, x + kQh, 4);
    __m128i lo, hi;
    Nibbles(x + kQh + 4, 0, &lo, &hi);
    __m256i v[4] = {_mm256_or_si256(U8x8<0>(lo), HighBits(qh, 0)),
                    _mm256_or_si256(U8x8<1>(lo), HighBits(qh, 8)),
                    _mm256_or_si256(U8x8<0>(hi), HighBits(qh, 16)),
                    _mm256_or_si256(U8x8<1>(hi), HighBits(qh, 24))};
    for (int k = 0; k < 4; ++k) {
      if constexpr (kHasMin) {
        MulAddStore(y + 8 * k, v[k], d, m);
      } else {
        MulStore(y + 8 * k, _mm256_sub_epi32(v[k], sixteen), d);
      }
    }
  }
}

// 32 bytes as four groups of 8 int32 (unsigned bytes).
inline void Expand32(__m256i bytes, __m256i out[4]) {
  const __m128i a = _mm256_castsi256_si128(bytes);
  const __m128i b = _mm256_extracti128_si256(bytes, 1);
  out[0] = U8x8<0>(a);
  out[1] = U8x8<1>(a);
  out[2] = U8x8<0>(b);
  out[3] = U8x8<1>(b);
}

inline void ScaleMinK4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
  }
}

// Q4_K (kFive = false) and Q5_K (kFive = true).
template <bool kFive>
void RowK45(const uint8_t* x, int64_t nb, float* y) {
  constexpr int kBlock = kFive ? 176 : 144;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i one = _mm256_set1_epi8(1);
  for (int64_t i = 0; i < nb; ++i, x += kBlock) {
    const float d = HalfToFloat(Load16(x));
    const float min = HalfToFloat(Load16(x + 2));
    const uint8_t* scales = x + 4;
    const uint8_t* q = x + (kFive ? 48 : 16);
    const __m256i qh = kFive ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))
                             : _mm256_setzero_si256();
    int is = 0;
    for (int j = 0; j < kQKK; j += 64) {
      uint8_t sc, m;
      ScaleMinK4(is + 0, scales, &sc, &m);
      const float d1 = d * sc, m1 = min * m;
      ScaleMinK4(is + 1, scales, &sc, &m);
      const float d2 = d * sc, m2 = min * m;
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      __m256i lo = _mm256_and_si256(qv, mask);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qv, 4), mask);
      if constexpr (kFive) {
        // (ql & 0xF) + (qh & u1 ? 16 : 0), u1 = 1 << is, u2 = 2 << is.
        __m256i b1 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(is)), one);
        __m256i b2 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(is + 1)), one);
        lo = _mm256_add_epi8(lo, _mm256_slli_epi16(b1, 4));
        hi = _mm256_add_epi8(hi, _mm256_slli_epi16(b2, 4));
      }
      __m256i v[4];
      const __m256 vd1 = _mm256_set1_ps(d1), vm1 = _mm256_set1_ps(m1);
      const __m256 vd2 = _mm256_set1_ps(d2), vm2 = _mm256_set1_ps(m2);
      Expand32(lo, v);
      for (int k = 0; k < 4; ++k) MulSubStore(y + 8 * k, v[k], vd1, vm1);
      Expand32(hi, v);
      for (int k = 0; k < 4; ++k) MulSubStore(y + 32 + 8 * k, v[k], vd2, vm2);
      y += 64;
      q += 32;
      is += 2;
    }
  }
}

void RowQ6_K(const uint8_t* x, int64_t nb, float* y) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m256i m32 = _mm256_set1_epi8(32);
  for (int64_t i = 0; i < nb; ++i, x += 210) {
    const float d = HalfToFloat(Load16(x + 208));
    const uint8_t* ql = x;
    const uint8_t* qh = x + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(x + 192);
    for (int n = 0; n < kQKK; n += 128) {
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
      auto hb = [&](int shift) {
        return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, shift), m3), 4);
      };
      const __m256i q[4] = {
          _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(l0, m4), hb(0)), m32),
          _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(l1, m4), hb(2)), m32),
          _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), hb(4)), m32),
          _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), hb(6)), m32)};
      for (int r = 0; r < 4; ++r) {
        const __m128i a = _mm256_castsi256_si128(q[r]);
        const __m128i b = _mm256_extracti128_si256(q[r], 1);
        // l 0..15 use sc[2r], l 16..31 use sc[2r + 1]: (d * sc) * q as the scalar code.
        const __m256 s0 = _mm256_set1_ps(d * sc[2 * r]);
        const __m256 s1 = _mm256_set1_ps(d * sc[2 * r + 1]);
        MulStore(y + 32 * r + 0, I8x8<0>(a), s0);
        MulStore(y + 32 * r + 8, I8x8<1>(a), s0);
        MulStore(y + 32 * r + 16, I8x8<0>(b), s1);
        MulStore(y + 32 * r + 24, I8x8<1>(b), s1);
      }
      y += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
  }
}

void RowQ2_K(const uint8_t* x, int64_t nb, float* y) {
  const __m256i m3 = _mm256_set1_epi8(3);
  for (int64_t i = 0; i < nb; ++i, x += 84) {
    const uint8_t* scales = x;
    const uint8_t* q = x + 16;
    const float d = HalfToFloat(Load16(x + 80));
    const float min = HalfToFloat(Load16(x + 82));
    int is = 0;
    for (int n = 0; n < kQKK; n += 128) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      for (int shift = 0; shift < 8; shift += 2) {
        const __m256i v = _mm256_and_si256(_mm256_srl_epi16(qv, _mm_cvtsi32_si128(shift)), m3);
        const uint8_t sa = scales[is++], sb = scales[is++];
        const __m256 da = _mm256_set1_ps(d * (sa & 0xF)), ma = _mm256_set1_ps(min * (sa >> 4));
        const __m256 db = _mm256_set1_ps(d * (sb & 0xF)), mb = _mm256_set1_ps(min * (sb >> 4));
        __m256i e[4];
        Expand32(v, e);
        MulSubStore(y + 0, e[0], da, ma);
        MulSubStore(y + 8, e[1], da, ma);
        MulSubStore(y + 16, e[2], db, mb);
        MulSubStore(y + 24, e[3], db, mb);
        y += 32;
      }
      q += 32;
    }
  }
}

void RowQ3_K(const uint8_t* x, int64_t nb, float* y) {
  const uint32_t kmask1 = 0x03030303;
  const uint32_t kmask2 = 0x0f0f0f0f;
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m256i four = _mm256_set1_epi8(4);
  for (int64_t i = 0; i < nb; ++i, x += 110) {
    const float d_all = HalfToFloat(Load16(x + 108));
    const uint8_t* q = x + 32;
    const __m256i hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    uint32_t aux[4];
    std::memcpy(aux, x + 96, 12);
    const uint32_t tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    int8_t scales[16];
    std::memcpy(scales, aux, 16);
    int is = 0;
    int mbit = 0;
    for (int n = 0; n < kQKK; n += 128) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      for (int shift = 0; shift < 8; shift += 2, ++mbit) {
        const __m256i v = _mm256_and_si256(_mm256_srl_epi16(qv, _mm_cvtsi32_si128(shift)), m3);
        // Subtract 4 where the hmask bit is clear.
        const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << mbit));
        const __m256i clear = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), _mm256_setzero_si256());
        const __m256i s = _mm256_sub_epi8(v, _mm256_and_si256(clear, four));
        const __m256 da = _mm256_set1_ps(d_all * (scales[is++] - 32));
        const __m256 db = _mm256_set1_ps(d_all * (scales[is++] - 32));
        const __m128i a = _mm256_castsi256_si128(s);
        const __m128i b = _mm256_extracti128_si256(s, 1);
        MulStore(y + 0, I8x8<0>(a), da);
        MulStore(y + 8, I8x8<1>(a), da);
        MulStore(y + 16, I8x8<0>(b), db);
        MulStore(y + 24, I8x8<1>(b), db);
        y += 32;
      }
      q += 32;
    }
  }
}

}  // namespace

RowFn Avx2RowFn(GgmlType type) {
  switch (type) {
    case GgmlType::kF16: return RowF16;
    case GgmlType::kBF16: return RowBf16;
    case GgmlType::kQ4_0: return RowQ4_0;
    case GgmlType::kQ4_1: return RowQ4_1;
    case GgmlType::kQ5_0: return RowQ5<false>;
    case GgmlType::kQ5_1: return RowQ5<true>;
    case GgmlType::kQ8_0: return RowQ8_0;
    case GgmlType::kQ2_K: return RowQ2_K;
    case GgmlType::kQ3_K: return RowQ3_K;
    case GgmlType::kQ4_K: return RowK45<false>;
    case GgmlType::kQ5_K: return RowK45<true>;
    case GgmlType::kQ6_K: return RowQ6_K;
    default: return nullptr;  // F32 is a memcpy already
  }
}

}  // namespace fleet::formats::internal
