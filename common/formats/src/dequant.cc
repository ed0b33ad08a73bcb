// Scalar reference dequantisers: transcriptions of ggml-quants.c `dequantize_row_*` that keep
// its operation order exactly (the build uses -ffp-contract=off, so nothing is fused).
#include <algorithm>
#include <cmath>
#include <string>

#include "dequant_internal.h"

namespace fleet::formats {
namespace internal {

// ggml_compute_fp16_to_fp32 (ggml-impl.h, from the FP16 library): exact, NaN payload kept.
float HalfToFloat(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = F32FromBits((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = F32FromBits((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  return F32FromBits(sign | (two_w < denormalized_cutoff ? F32Bits(denormalized)
                                                         : F32Bits(normalized)));
}

namespace {

void RowF32(const uint8_t* src, int64_t nb, float* y) {
  std::memcpy(y, src, static_cast<size_t>(nb) * 4);
}
void RowF16(const uint8_t* src, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i) y[i] = HalfToFloat(Load16(src + 2 * i));
}
void RowBf16(const uint8_t* src, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i) y[i] = F32FromBits(static_cast<uint32_t>(Load16(src + 2 * i)) << 16);
}

void RowQ4_0(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 18, y += kQK) {
    const float d = HalfToFloat(Load16(x));
    const uint8_t* qs = x + 2;
    for (int j = 0; j < 16; ++j) {
      const int x0 = (qs[j] & 0x0F) - 8;
      const int x1 = (qs[j] >> 4) - 8;
      y[j] = x0 * d;
      y[j + 16] = x1 * d;
    }
  }
}

void RowQ4_1(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 20, y += kQK) {
    const float d = HalfToFloat(Load16(x));
    const float m = HalfToFloat(Load16(x + 2));
    const uint8_t* qs = x + 4;
    for (int j = 0; j < 16; ++j) {
      const int x0 = qs[j] & 0x0F;
      const int x1 = qs[j] >> 4;
      y[j] = x0 * d + m;
      y[j + 16] = x1 * d + m;
    }
  }
}

void RowQ5_0(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 22, y += kQK) {
    const float d = HalfToFloat(Load16(x));
    uint32_t qh;
    std::memcpy(&qh, x + 2, 4);
    const uint8_t* qs = x + 6;
    for (int j = 0; j < 16; ++j) {
      const uint8_t xh_0 = static_cast<uint8_t>(((qh >> (j + 0)) << 4) & 0x10);
      const uint8_t xh_1 = static_cast<uint8_t>(((qh >> (j + 12))) & 0x10);
      const int32_t x0 = ((qs[j] & 0x0F) | xh_0) - 16;
      const int32_t x1 = ((qs[j] >> 4) | xh_1) - 16;
      y[j] = x0 * d;
      y[j + 16] = x1 * d;
    }
  }
}

void RowQ5_1(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 24, y += kQK) {
    const float d = HalfToFloat(Load16(x));
    const float m = HalfToFloat(Load16(x + 2));
    uint32_t qh;
    std::memcpy(&qh, x + 4, 4);
    const uint8_t* qs = x + 8;
    for (int j = 0; j < 16; ++j) {
      const uint8_t xh_0 = static_cast<uint8_t>(((qh >> (j + 0)) << 4) & 0x10);
      const uint8_t xh_1 = static_cast<uint8_t>(((qh >> (j + 12))) & 0x10);
      const int x0 = (qs[j] & 0x0F) | xh_0;
      const int x1 = (qs[j] >> 4) | xh_1;
      y[j] = x0 * d + m;
      y[j + 16] = x1 * d + m;
    }
  }
}

void RowQ8_0(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 34, y += kQK) {
    const float d = HalfToFloat(Load16(x));
    const int8_t* qs = reinterpret_cast<const int8_t*>(x + 2);
    for (int j = 0; j < kQK; ++j) y[j] = qs[j] * d;
  }
}

// block_q2_K: scales[16], qs[64], d, dmin.
void RowQ2_K(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 84) {
    const uint8_t* scales = x;
    const uint8_t* q = x + 16;
    const float d = HalfToFloat(Load16(x + 80));
    const float min = HalfToFloat(Load16(x + 82));
    int is = 0;
    for (int n = 0; n < kQKK; n += 128) {
      int shift = 0;
      for (int j = 0; j < 4; ++j) {
        uint8_t sc = scales[is++];
        float dl = d * (sc & 0xF), ml = min * (sc >> 4);
        for (int l = 0; l < 16; ++l) *y++ = dl * static_cast<int8_t>((q[l] >> shift) & 3) - ml;
        sc = scales[is++];
        dl = d * (sc & 0xF);
        ml = min * (sc >> 4);
        for (int l = 0; l < 16; ++l) {
          *y++ = dl * static_cast<int8_t>((q[l + 16] >> shift) & 3) - ml;
        }
        shift += 2;
      }
      q += 32;
    }
  }
}

// block_q3_K: hmask[32], qs[64], scales[12], d.
void RowQ3_K(const uint8_t* x, int64_t nb, float* y) {
  const uint32_t kmask1 = 0x03030303;
  const uint32_t kmask2 = 0x0f0f0f0f;
  uint32_t aux[4];
  const int8_t* scales = reinterpret_cast<const int8_t*>(aux);
  for (int64_t i = 0; i < nb; ++i, x += 110) {
    const float d_all = HalfToFloat(Load16(x + 108));
    const uint8_t* q = x + 32;
    const uint8_t* hm = x;
    uint8_t m = 1;
    std::memcpy(aux, x + 96, 12);
    uint32_t tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    int is = 0;
    for (int n = 0; n < kQKK; n += 128) {
      int shift = 0;
      for (int j = 0; j < 4; ++j) {
        float dl = d_all * (scales[is++] - 32);
        for (int l = 0; l < 16; ++l) {
          *y++ = dl * (static_cast<int8_t>((q[l + 0] >> shift) & 3) - ((hm[l + 0] & m) ? 0 : 4));
        }
        dl = d_all * (scales[is++] - 32);
        for (int l = 0; l < 16; ++l) {
          *y++ = dl * (static_cast<int8_t>((q[l + 16] >> shift) & 3) - ((hm[l + 16] & m) ? 0 : 4));
        }
        shift += 2;
        m = static_cast<uint8_t>(m << 1);
      }
      q += 32;
    }
  }
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

// block_q4_K: d, dmin, scales[12], qs[128].
void RowQ4_K(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 144) {
    const float d = HalfToFloat(Load16(x));
    const float min = HalfToFloat(Load16(x + 2));
    const uint8_t* scales = x + 4;
    const uint8_t* q = x + 16;
    int is = 0;
    uint8_t sc, m;
    for (int j = 0; j < kQKK; j += 64) {
      ScaleMinK4(is + 0, scales, &sc, &m);
      const float d1 = d * sc, m1 = min * m;
      ScaleMinK4(is + 1, scales, &sc, &m);
      const float d2 = d * sc, m2 = min * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
      q += 32;
      is += 2;
    }
  }
}

// block_q5_K: d, dmin, scales[12], qh[32], qs[128].
void RowQ5_K(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 176) {
    const float d = HalfToFloat(Load16(x));
    const float min = HalfToFloat(Load16(x + 2));
    const uint8_t* scales = x + 4;
    const uint8_t* qh = x + 16;
    const uint8_t* ql = x + 48;
    int is = 0;
    uint8_t sc, m;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0; j < kQKK; j += 64) {
      ScaleMinK4(is + 0, scales, &sc, &m);
      const float d1 = d * sc, m1 = min * m;
      ScaleMinK4(is + 1, scales, &sc, &m);
      const float d2 = d * sc, m2 = min * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
      ql += 32;
      is += 2;
      u1 = static_cast<uint8_t>(u1 << 2);
      u2 = static_cast<uint8_t>(u2 << 2);
    }
  }
}

// block_q6_K: ql[128], qh[64], scales[16] (int8), d.
void RowQ6_K(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 210) {
    const float d = HalfToFloat(Load16(x + 208));
    const uint8_t* ql = x;
    const uint8_t* qh = x + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(x + 192);
    for (int n = 0; n < kQKK; n += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int8_t q1 = static_cast<int8_t>((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int8_t q2 = static_cast<int8_t>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int8_t q3 = static_cast<int8_t>((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int8_t q4 = static_cast<int8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l + 0] = d * sc[is + 0] * q1;
        y[l + 32] = d * sc[is + 2] * q2;
        y[l + 64] = d * sc[is + 4] * q3;
        y[l + 96] = d * sc[is + 6] * q4;
      }
      y += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
  }
}

}  // namespace

RowFn ScalarRowFn(GgmlType type) {
  switch (type) {
    case GgmlType::kF32: return RowF32;
    case GgmlType::kF16: return RowF16;
    case GgmlType::kBF16: return RowBf16;
    case GgmlType::kQ4_0: return RowQ4_0;
    case GgmlType::kQ4_1: return RowQ4_1;
    case GgmlType::kQ5_0: return RowQ5_0;
    case GgmlType::kQ5_1: return RowQ5_1;
    case GgmlType::kQ8_0: return RowQ8_0;
    case GgmlType::kQ2_K: return RowQ2_K;
    case GgmlType::kQ3_K: return RowQ3_K;
    case GgmlType::kQ4_K: return RowQ4_K;
    case GgmlType::kQ5_K: return RowQ5_K;
    case GgmlType::kQ6_K: return RowQ6_K;
    default: return nullptr;
  }
}

// ggml_compute_fp32_to_fp16 (ggml-impl.h): round to nearest even; NaN -> 0x7e00 with the sign.
uint16_t FloatToHalf(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = F32Bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = F32FromBits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = F32Bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// ggml_compute_fp32_to_bf16: round to nearest even; NaN forced quiet.
uint16_t FloatToBf16(float f) {
  const uint32_t u = F32Bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 64);
  return static_cast<uint16_t>((u + (0x7fffu + ((u >> 16) & 1))) >> 16);
}

void ConvertF16Scalar(const float* x, int64_t n, uint16_t* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = FloatToHalf(x[i]);
}
void ConvertBf16Scalar(const float* x, int64_t n, uint16_t* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = FloatToBf16(x[i]);
}

}  // namespace internal

float Fp16ToFp32(uint16_t h) { return internal::HalfToFloat(h); }
uint16_t Fp32ToFp16(float f) { return internal::FloatToHalf(f); }
float Bf16ToFp32(uint16_t h) { return internal::F32FromBits(static_cast<uint32_t>(h) << 16); }
uint16_t Fp32ToBf16(float f) { return internal::FloatToBf16(f); }

namespace {

Status Run(GgmlType type, std::span<const uint8_t> src, int64_t n, OutType out, void* dst,
           bool allow_simd) {
  auto traits = GgmlTypeInfo(static_cast<uint32_t>(type));
  if (!traits) {
    return InvalidArgumentError("dequantize: unknown ggml type id " +
                                std::to_string(static_cast<uint32_t>(type)));
  }
  internal::RowFn row = internal::ScalarRowFn(type);
  if (!row) {
    return InvalidArgumentError("dequantize: ggml type " + std::string(traits->name) +
                                " is not supported (supported: F32 F16 BF16 Q8_0 Q4_0 Q4_1 "
                                "Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K)");
  }
  const int64_t block = traits->block_size;
  if (n < 0 || n % block != 0) {
    return InvalidArgumentError("dequantize " + std::string(traits->name) + ": " +
                                std::to_string(n) + " elements is not a multiple of the block " +
                                "size " + std::to_string(block));
  }
  const int64_t nb = n / block;
  if (static_cast<uint64_t>(nb) * static_cast<uint64_t>(traits->type_size) != src.size()) {
    return InvalidArgumentError("dequantize " + std::string(traits->name) + ": " +
                                std::to_string(src.size()) + " source bytes, " +
                                std::to_string(n) + " elements need " +
                                std::to_string(nb * traits->type_size));
  }
  if (nb == 0) return Status::OK();  // nothing to write (and dst may be null)
  const bool simd = allow_simd && internal::CpuHasAvx2();
  if (simd) {
    if (auto fast = internal::Avx2RowFn(type)) row = fast;
  }
  if (out == OutType::kF32) {
    row(src.data(), nb, static_cast<float*>(dst));
    return Status::OK();
  }
  // Through an L1-sized f32 buffer, then ggml's rounding to 16 bits.
  constexpr int64_t kChunk = 4096;  // a multiple of every block size
  alignas(64) float buf[kChunk];
  const int64_t blocks_per_chunk = kChunk / block;
  uint16_t* y = static_cast<uint16_t*>(dst);
  const uint8_t* x = src.data();
  for (int64_t b = 0; b < nb; b += blocks_per_chunk) {
    const int64_t cb = std::min(blocks_per_chunk, nb - b);
    const int64_t cn = cb * block;
    row(x + b * traits->type_size, cb, buf);
    if (out == OutType::kF16) {
      simd ? internal::ConvertF16Avx2(buf, cn, y) : internal::ConvertF16Scalar(buf, cn, y);
    } else {
      simd ? internal::ConvertBf16Avx2(buf, cn, y) : internal::ConvertBf16Scalar(buf, cn, y);
    }
    y += cn;
  }
  return Status::OK();
}

}  // namespace

Status Dequantize(GgmlType type, std::span<const uint8_t> src, int64_t n, OutType out,
                  void* dst) {
  return Run(type, src, n, out, dst, /*allow_simd=*/true);
}

Status DequantizeReference(GgmlType type, std::span<const uint8_t> src, int64_t n, OutType out,
                           void* dst) {
  return Run(type, src, n, out, dst, /*allow_simd=*/false);
}

bool DequantUsesAvx2() { return internal::CpuHasAvx2(); }

}  // namespace fleet::formats
