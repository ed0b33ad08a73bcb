// Scalar reference dequantisers: ggml-quants.c's `dequantize_row_*` (the to_float of every
// type) with its block layouts (ggml-common.h) and its float operations in its order (the build
// uses -ffp-contract=off, so nothing is fused). The IQ / FP4 lookup tables are in iq_grids.h,
// generated from ggml's library by tests/unit/formats/gen_iq_grids.py.
#include <algorithm>
#include <cmath>
#include <string>

#include "dequant_internal.h"
#include "iq_grids.h"

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
  return F32FromBits(sign |
                     (two_w < denormalized_cutoff ? F32Bits(denormalized) : F32Bits(normalized)));
}

namespace {

void RowF32(const uint8_t* src, int64_t nb, float* y) {
  std::memcpy(y, src, static_cast<size_t>(nb) * 4);
}
void RowF16(const uint8_t* src, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i) y[i] = HalfToFloat(Load16(src + 2 * i));
}
void RowBf16(const uint8_t* src, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i)
    y[i] = F32FromBits(static_cast<uint32_t>(Load16(src + 2 * i)) << 16);
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

// ---- 1- and 2-bit linear and ternary types --------------------------------------------------

// block_q1_0 (128 values): d, qs[16]; bit j (LSB first) picks +d or -d.
void RowQ1_0(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 18, y += 128) {
    const float d = HalfToFloat(Load16(x));
    const float minus_d = -d;
    const uint8_t* bits = x + 2;
    for (int j = 0; j < 128; ++j) y[j] = ((bits[j / 8] >> (j % 8)) & 1) ? d : minus_d;
  }
}

// block_q2_0 (64 values): d, qs[16]; 2-bit codes, 4 per byte from the low bits: (q - 1) * d.
void RowQ2_0(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 18, y += 64) {
    const float d = HalfToFloat(Load16(x));
    const uint8_t* qs = x + 2;
    for (int j = 0; j < 64; ++j) {
      const int q = (qs[j / 4] >> (2 * (j % 4))) & 3;
      y[j] = static_cast<float>(q - 1) * d;
    }
  }
}

// One base-3 digit of a TQ1_0 byte: the byte is a fixed-point fraction of 3^5 (or 3^4), so
// multiplying by 3^n (mod 256) brings digit n to the top and (q * 3) >> 8 reads it (0, 1, 2).
inline float Trit(uint8_t byte, uint8_t pow3, float d) {
  const uint8_t q = static_cast<uint8_t>(byte * pow3);
  const int digit = (q * 3) >> 8;
  return static_cast<float>(digit - 1) * d;
}

// block_tq1_0 (256 values): qs[48] (5 trits a byte), qh[4] (4 trits a byte), d. Output order:
// qs[0..31] digit by digit (5 x 32), qs[32..47] (5 x 16), then qh digit by digit (4 x 4).
void RowTQ1_0(const uint8_t* x, int64_t nb, float* y) {
  static constexpr uint8_t kPow3[5] = {1, 3, 9, 27, 81};
  for (int64_t i = 0; i < nb; ++i, x += 54) {
    const float d = HalfToFloat(Load16(x + 52));
    const uint8_t* qs = x;
    const uint8_t* qh = x + 48;
    for (int n = 0; n < 5; ++n) {
      for (int m = 0; m < 32; ++m) *y++ = Trit(qs[m], kPow3[n], d);
    }
    for (int n = 0; n < 5; ++n) {
      for (int m = 0; m < 16; ++m) *y++ = Trit(qs[32 + m], kPow3[n], d);
    }
    for (int n = 0; n < 4; ++n) {
      for (int m = 0; m < 4; ++m) *y++ = Trit(qh[m], kPow3[n], d);
    }
  }
}

// block_tq2_0 (256 values): qs[64], d. Two 32-byte halves, each giving 4 x 32 values (2-bit
// fields from the low bits up): (q - 1) * d.
void RowTQ2_0(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 66) {
    const float d = HalfToFloat(Load16(x + 64));
    for (int half = 0; half < 2; ++half) {
      const uint8_t* qs = x + 32 * half;
      for (int shift = 0; shift < 8; shift += 2) {
        for (int m = 0; m < 32; ++m) {
          const int q = (qs[m] >> shift) & 3;
          *y++ = static_cast<float>(q - 1) * d;
        }
      }
    }
  }
}

// ---- FP4 (e2m1 values from kFp4Values, doubled) ---------------------------------------------

// E8M0 scale e as 2^(e-127) / 2 (kFp4Values are doubled): 2^(e-128), subnormal for e < 2.
inline float E8m0Half(uint8_t e) {
  return F32FromBits(e < 2 ? (0x00200000u << e) : (static_cast<uint32_t>(e - 1) << 23));
}

// UE4M3 (NVFP4 sub-block scale) / 2: 4 exponent bits (bias 7), 3 mantissa bits; bit 7 is not
// read; 0x7F (the NaN code) counts as 0.
inline float Ue4m3Half(uint8_t u) {
  if (u == 0 || u == 0x7F) return 0.0f;
  const int exponent = (u >> 3) & 0xF;
  const int mantissa = u & 7;
  // exponent 0: mantissa * 2^-9; else (1 + mantissa/8) * 2^(exponent-7); halved. All exact.
  return exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -10)
                       : std::ldexp(static_cast<float>(8 + mantissa), exponent - 11);
}

// block_mxfp4 (32 values): e (E8M0), qs[16]; low nibbles are values 0..15, high 16..31.
void RowMxfp4(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 17, y += 32) {
    const float d = E8m0Half(x[0]);
    const uint8_t* qs = x + 1;
    for (int j = 0; j < 16; ++j) {
      y[j] = kFp4Values[qs[j] & 0xF] * d;
      y[j + 16] = kFp4Values[qs[j] >> 4] * d;
    }
  }
}

// block_nvfp4 (64 values): d[4] (UE4M3, one per 16 values), qs[32]; each 16-value sub-block
// takes 8 bytes: low nibbles first, then high.
void RowNvfp4(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 36) {
    for (int s = 0; s < 4; ++s, y += 16) {
      const float d = Ue4m3Half(x[s]);
      const uint8_t* qs = x + 4 + 8 * s;
      for (int j = 0; j < 8; ++j) {
        y[j] = kFp4Values[qs[j] & 0xF] * d;
        y[j + 8] = kFp4Values[qs[j] >> 4] * d;
      }
    }
  }
}

// ---- non-linear 4-bit -----------------------------------------------------------------------

// block_iq4_nl (32 values): d, qs[16]; d * kIq4nlValues[nibble], low nibbles first.
void RowIQ4_NL(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 18, y += 32) {
    const float d = HalfToFloat(Load16(x));
    const uint8_t* qs = x + 2;
    for (int j = 0; j < 16; ++j) {
      y[j] = d * kIq4nlValues[qs[j] & 0xF];
      y[j + 16] = d * kIq4nlValues[qs[j] >> 4];
    }
  }
}

// block_iq4_xs (256 values): d, scales_h (u16), scales_l[4], qs[128]. Sub-block ib (32 values)
// has a 6-bit scale: nibble ib of scales_l, high bits 2*ib of scales_h; d * (scale - 32).
void RowIQ4_XS(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 136) {
    const float d = HalfToFloat(Load16(x));
    const uint16_t scales_h = Load16(x + 2);
    const uint8_t* scales_l = x + 4;
    const uint8_t* qs = x + 8;
    for (int ib = 0; ib < 8; ++ib, y += 32, qs += 16) {
      const int low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
      const int high = (scales_h >> (2 * ib)) & 3;
      const float dl = d * ((low | (high << 4)) - 32);
      for (int j = 0; j < 16; ++j) {
        y[j] = dl * kIq4nlValues[qs[j] & 0xF];
        y[j + 16] = dl * kIq4nlValues[qs[j] >> 4];
      }
    }
  }
}

// ---- grid types: 8 (or 4) values from a grid entry, one byte each, times a scale and a sign --

inline uint8_t GridByte(uint64_t entry, int j) { return static_cast<uint8_t>(entry >> (8 * j)); }
inline float Sign(uint8_t signs, int j) { return ((signs >> j) & 1) ? -1.f : 1.f; }
inline uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// 8 values: (scale * grid byte) * sign.
inline void Grid8(float scale, uint64_t entry, uint8_t signs, float* y) {
  for (int j = 0; j < 8; ++j) y[j] = scale * GridByte(entry, j) * Sign(signs, j);
}
// 8 values from two 4-value entries, the signs shared.
inline void Grid4x2(float scale, uint32_t first, uint32_t second, uint8_t signs, float* y) {
  for (int j = 0; j < 4; ++j) {
    y[j] = scale * GridByte(first, j) * Sign(signs, j);
    y[j + 4] = scale * GridByte(second, j) * Sign(signs, j + 4);
  }
}

// block_iq2_xxs (256 values): d, then per 32 values 8 bytes: 4 grid indices (kIq2xxsGrid) and a
// u32 with four 7-bit sign indices (kIqSigns) and a 4-bit scale in its top bits.
void RowIQ2_XXS(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 66) {
    const float d = HalfToFloat(Load16(x));
    for (int ib = 0; ib < 8; ++ib) {
      const uint8_t* group = x + 2 + 8 * ib;
      const uint32_t signs_scale = Load32(group + 4);
      const float db = d * (0.5f + (signs_scale >> 28)) * 0.25f;
      for (int l = 0; l < 4; ++l, y += 8) {
        Grid8(db, kIq2xxsGrid[group[l]], kIqSigns[(signs_scale >> (7 * l)) & 127], y);
      }
    }
  }
}

// block_iq2_xs (256 values): d, qs[32] (u16: 9-bit index into kIq2xsGrid, 7-bit sign index),
// scales[8] (two 4-bit scales per 32 values, one per 16).
void RowIQ2_XS(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 74) {
    const float d = HalfToFloat(Load16(x));
    const uint8_t* scales = x + 66;
    for (int ib = 0; ib < 8; ++ib) {
      const float db[2] = {d * (0.5f + (scales[ib] & 0xF)) * 0.25f,
                           d * (0.5f + (scales[ib] >> 4)) * 0.25f};
      for (int l = 0; l < 4; ++l, y += 8) {
        const uint16_t q = Load16(x + 2 + 2 * (4 * ib + l));
        Grid8(db[l / 2], kIq2xsGrid[q & 511], kIqSigns[q >> 9], y);
      }
    }
  }
}

// block_iq2_s (256 values): d, qs[32] (index low bits), signs[32] (one byte per 8 values),
// qh[8] (2 more index bits per 8 values), scales[8] (as IQ2_XS).
void RowIQ2_S(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 82) {
    const float d = HalfToFloat(Load16(x));
    const uint8_t* qs = x + 2;
    const uint8_t* signs = x + 34;
    const uint8_t* qh = x + 66;
    const uint8_t* scales = x + 74;
    for (int ib = 0; ib < 8; ++ib) {
      const float db[2] = {d * (0.5f + (scales[ib] & 0xF)) * 0.25f,
                           d * (0.5f + (scales[ib] >> 4)) * 0.25f};
      for (int l = 0; l < 4; ++l, y += 8) {
        const int k = 4 * ib + l;
        const int index = qs[k] | (((qh[ib] >> (2 * l)) & 3) << 8);
        Grid8(db[l / 2], kIq2sGrid[index], signs[k], y);
      }
    }
  }
}

// block_iq3_xxs (256 values): d, qs[64] (indices into kIq3xxsGrid, 4 values each), then per 32
// values a u32 with four 7-bit sign indices and a 4-bit scale in its top bits.
void RowIQ3_XXS(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 98) {
    const float d = HalfToFloat(Load16(x));
    const uint8_t* qs = x + 2;
    for (int ib = 0; ib < 8; ++ib, qs += 8) {
      const uint32_t signs_scale = Load32(x + 66 + 4 * ib);
      const float db = d * (0.5f + (signs_scale >> 28)) * 0.5f;
      for (int l = 0; l < 4; ++l, y += 8) {
        Grid4x2(db, kIq3xxsGrid[qs[2 * l]], kIq3xxsGrid[qs[2 * l + 1]],
                kIqSigns[(signs_scale >> (7 * l)) & 127], y);
      }
    }
  }
}

// block_iq3_s (256 values): d, qs[64] (index low bits), qh[8] (index bit 8, one bit per qs
// byte), signs[32] (one byte per 8 values), scales[4] (a 4-bit scale per 32 values: 1 + 2 s).
void RowIQ3_S(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 110) {
    const float d = HalfToFloat(Load16(x));
    const uint8_t* qs = x + 2;
    const uint8_t* qh = x + 66;
    const uint8_t* signs = x + 74;
    const uint8_t* scales = x + 106;
    for (int ib = 0; ib < 8; ++ib) {
      const float db = d * (1 + 2 * ((scales[ib / 2] >> (4 * (ib % 2))) & 0xF));
      for (int l = 0; l < 4; ++l, y += 8) {
        const int k = 8 * ib + 2 * l;
        const int first = qs[k] | (((qh[ib] >> (2 * l)) & 1) << 8);
        const int second = qs[k + 1] | (((qh[ib] >> (2 * l + 1)) & 1) << 8);
        Grid4x2(db, kIq3sGrid[first], kIq3sGrid[second], signs[4 * ib + l], y);
      }
    }
  }
}

// 8 values of an IQ1 grid entry (bytes are int8 -1, 0, 1): scale * (value + delta).
inline void Grid1(float scale, uint64_t entry, float delta, float* y) {
  for (int j = 0; j < 8; ++j) y[j] = scale * (static_cast<int8_t>(GridByte(entry, j)) + delta);
}
inline constexpr float kIq1Delta = 0.125f;

// block_iq1_s (256 values): d, qs[32] (index low bits), qh[8] (u16 per 32 values: 3 index bits
// per 8 values, a 3-bit scale in bits 12..14, the delta's sign in bit 15).
void RowIQ1_S(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 50) {
    const float d = HalfToFloat(Load16(x));
    const uint8_t* qs = x + 2;
    for (int ib = 0; ib < 8; ++ib) {
      const uint16_t h = Load16(x + 34 + 2 * ib);
      const float dl = d * (2 * ((h >> 12) & 7) + 1);
      const float delta = (h & 0x8000) ? -kIq1Delta : kIq1Delta;
      for (int l = 0; l < 4; ++l, y += 8) {
        const int index = qs[4 * ib + l] | (((h >> (3 * l)) & 7) << 8);
        Grid1(dl, kIq1sGrid[index], delta, y);
      }
    }
  }
}

// block_iq1_m (256 values): qs[32] (index low bits), qh[16] (per 8 values a nibble: 3 index
// bits and the delta's sign), scales[8] (u16 sc[4]: 3-bit scales, 4 per u16, one per 16 values;
// the block's f16 scale is the four top nibbles sc[0]>>12 .. sc[3]>>12, lowest first).
void RowIQ1_M(const uint8_t* x, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, x += 56) {
    const uint8_t* qs = x;
    const uint8_t* qh = x + 32;
    uint16_t sc[4];
    for (int k = 0; k < 4; ++k) sc[k] = Load16(x + 48 + 2 * k);
    const uint16_t half_bits = static_cast<uint16_t>((sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) |
                                                     ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000));
    const float d = HalfToFloat(half_bits);
    for (int ib = 0; ib < 8; ++ib) {
      const int shift = 6 * (ib % 2);
      const float dl[2] = {d * (2 * ((sc[ib / 2] >> shift) & 7) + 1),
                           d * (2 * ((sc[ib / 2] >> (shift + 3)) & 7) + 1)};
      for (int l = 0; l < 4; ++l, y += 8) {
        const uint8_t nibble = (qh[2 * ib + l / 2] >> (4 * (l % 2))) & 0xF;
        const int index = qs[4 * ib + l] | ((nibble & 7) << 8);
        const float delta = (nibble & 8) ? -kIq1Delta : kIq1Delta;
        Grid1(dl[l / 2], kIq1sGrid[index], delta, y);
      }
    }
  }
}

}  // namespace

RowFn ScalarRowFn(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return RowF32;
    case GgmlType::kF16:
      return RowF16;
    case GgmlType::kBF16:
      return RowBf16;
    case GgmlType::kQ4_0:
      return RowQ4_0;
    case GgmlType::kQ4_1:
      return RowQ4_1;
    case GgmlType::kQ5_0:
      return RowQ5_0;
    case GgmlType::kQ5_1:
      return RowQ5_1;
    case GgmlType::kQ8_0:
      return RowQ8_0;
    case GgmlType::kQ2_K:
      return RowQ2_K;
    case GgmlType::kQ3_K:
      return RowQ3_K;
    case GgmlType::kQ4_K:
      return RowQ4_K;
    case GgmlType::kQ5_K:
      return RowQ5_K;
    case GgmlType::kQ6_K:
      return RowQ6_K;
    case GgmlType::kQ1_0:
      return RowQ1_0;
    case GgmlType::kQ2_0:
      return RowQ2_0;
    case GgmlType::kTQ1_0:
      return RowTQ1_0;
    case GgmlType::kTQ2_0:
      return RowTQ2_0;
    case GgmlType::kMXFP4:
      return RowMxfp4;
    case GgmlType::kNVFP4:
      return RowNvfp4;
    case GgmlType::kIQ4_NL:
      return RowIQ4_NL;
    case GgmlType::kIQ4_XS:
      return RowIQ4_XS;
    case GgmlType::kIQ2_XXS:
      return RowIQ2_XXS;
    case GgmlType::kIQ2_XS:
      return RowIQ2_XS;
    case GgmlType::kIQ2_S:
      return RowIQ2_S;
    case GgmlType::kIQ3_XXS:
      return RowIQ3_XXS;
    case GgmlType::kIQ3_S:
      return RowIQ3_S;
    case GgmlType::kIQ1_S:
      return RowIQ1_S;
    case GgmlType::kIQ1_M:
      return RowIQ1_M;
    default:
      return nullptr;
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

// "F32 F16 Q4_0 ...": every type ScalarRowFn has, in id order.
std::string SupportedTypeNames() {
  std::string names;
  for (uint32_t id = 0; id < 64; ++id) {
    auto traits = GgmlTypeInfo(id);
    if (traits && internal::ScalarRowFn(traits->type)) {
      if (!names.empty()) names += ' ';
      names += traits->name;
    }
  }
  return names;
}

Status Run(GgmlType type, std::span<const uint8_t> src, int64_t n, OutType out, void* dst,
           bool allow_simd) {
  auto traits = GgmlTypeInfo(static_cast<uint32_t>(type));
  if (!traits) {
    return InvalidArgumentError("dequantize: unknown ggml type id " +
                                std::to_string(static_cast<uint32_t>(type)));
  }
  internal::RowFn row = internal::ScalarRowFn(type);
  if (!row) {
    // Q8_1 and Q8_K (ggml's dot-product operand formats, which it cannot dequantise either)
    // and the integer / F64 types.
    return InvalidArgumentError("dequantize: ggml type " + std::string(traits->name) +
                                " is not supported (supported: " + SupportedTypeNames() + ")");
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
                                std::to_string(src.size()) + " source bytes, " + std::to_string(n) +
                                " elements need " + std::to_string(nb * traits->type_size));
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

Status Dequantize(GgmlType type, std::span<const uint8_t> src, int64_t n, OutType out, void* dst) {
  return Run(type, src, n, out, dst, /*allow_simd=*/true);
}

Status DequantizeReference(GgmlType type, std::span<const uint8_t> src, int64_t n, OutType out,
                           void* dst) {
  return Run(type, src, n, out, dst, /*allow_simd=*/false);
}

bool DequantUsesAvx2() { return internal::CpuHasAvx2(); }

}  // namespace fleet::formats
