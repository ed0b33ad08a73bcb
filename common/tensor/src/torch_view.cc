#include "fleet/tensor/torch_view.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "fleet/formats/dequant.h"

namespace fleet::tensor {
namespace {

using formats::DType;
using formats::GgmlType;

std::string Where(const formats::ModelFile& file, const formats::TensorInfo& info) {
  return file.path() + ": tensor '" + info.name + "'";
}

// The dtype a GGUF non-block type maps to (F32, F16, BF16 and the plain integers).
std::optional<DType> GgufPlainDType(const std::string& name) {
  if (name == "F32" || name == "F16" || name == "BF16" || name == "F64" || name == "I8" ||
      name == "I16" || name == "I32" || name == "I64") {
    return formats::ParseDType(name);
  }
  return std::nullopt;
}

std::optional<DType> PlainDType(const formats::ModelFile& file, const formats::TensorInfo& info) {
  if (file.format() == formats::FileFormat::kGguf) return GgufPlainDType(info.dtype);
  return formats::ParseDType(info.dtype);
}

float E4M3ToFloat(uint8_t b) {
  const int sign = b >> 7, exp = (b >> 3) & 0xF, man = b & 7;
  float v;
  if (exp == 0xF && man == 7) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
  } else {
    v = std::ldexp(static_cast<float>(8 + man), exp - 7 - 3);
  }
  return sign ? -v : v;
}

float E5M2ToFloat(uint8_t b) {
  // e5m2 is the top byte of an IEEE half.
  return formats::Fp16ToFp32(static_cast<uint16_t>(b) << 8);
}

const std::array<float, 256>& F8Table(F8Format format) {
  static const std::array<float, 256> e4m3 = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[static_cast<size_t>(i)] = E4M3ToFloat(static_cast<uint8_t>(i));
    return t;
  }();
  static const std::array<float, 256> e5m2 = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[static_cast<size_t>(i)] = E5M2ToFloat(static_cast<uint8_t>(i));
    return t;
  }();
  return format == F8Format::kE4M3 ? e4m3 : e5m2;
}

std::vector<int64_t> Shape(const formats::TensorInfo& info) { return info.shape; }

}  // namespace

StatusOr<at::ScalarType> ToScalarType(DType dtype) {
  switch (dtype) {
    case DType::kBool: return at::kBool;
    case DType::kU8: return at::kByte;
    case DType::kI8: return at::kChar;
    case DType::kF8E5M2:
    case DType::kF8E4M3: return at::kByte;
    case DType::kI16: return at::kShort;
    case DType::kF16: return at::kHalf;
    case DType::kBF16: return at::kBFloat16;
    case DType::kI32: return at::kInt;
    case DType::kF32: return at::kFloat;
    case DType::kF64: return at::kDouble;
    case DType::kI64: return at::kLong;
    case DType::kU16:
    case DType::kU32:
    case DType::kU64: break;
  }
  return UnimplementedError("dtype " + std::string(formats::DTypeName(dtype)) +
                            " has no libtorch 1.13 equivalent");
}

std::optional<DType> FromScalarType(at::ScalarType type) {
  switch (type) {
    case at::kBool: return DType::kBool;
    case at::kByte: return DType::kU8;
    case at::kChar: return DType::kI8;
    case at::kShort: return DType::kI16;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    case at::kInt: return DType::kI32;
    case at::kFloat: return DType::kF32;
    case at::kDouble: return DType::kF64;
    case at::kLong: return DType::kI64;
    default: return std::nullopt;
  }
}

StatusOr<at::Tensor> UpcastF8(const at::Tensor& bytes, F8Format format, at::ScalarType out) {
  if (bytes.scalar_type() != at::kByte || !bytes.device().is_cpu()) {
    return InvalidArgumentError("UpcastF8: expected a CPU uint8 tensor of fp8 bytes");
  }
  if (out != at::kFloat && out != at::kDouble && out != at::kHalf && out != at::kBFloat16) {
    return InvalidArgumentError("UpcastF8: output must be float32, float64, float16 or bfloat16");
  }
  try {
    at::Tensor src = bytes.contiguous();
    at::Tensor f = at::empty(src.sizes(), at::TensorOptions().dtype(at::kFloat));
    const auto& table = F8Table(format);
    const uint8_t* s = src.data_ptr<uint8_t>();
    float* d = f.data_ptr<float>();
    const int64_t n = src.numel();
    for (int64_t i = 0; i < n; ++i) d[i] = table[s[i]];
    // Every fp8 value is exactly representable in the targets, so this cast is exact.
    return out == at::kFloat ? f : f.to(out);
  } catch (const c10::Error& e) {
    return InternalError(std::string("UpcastF8: libtorch: ") + e.what_without_backtrace());
  }
}

namespace {

// The fp8 code nearest to |f| (f >= 0, not NaN), ties to the even code, over the codes
// 0..`top`: `top` stands for the value one step above the largest finite one (e4m3fn 0x7f: 480,
// which is NaN there; e5m2 0x7c: 65536, which is infinity), so the rounding at the top edge is
// the IEEE one.
uint8_t NearestF8(float f, const std::array<float, 256>& table, uint8_t top, float top_value) {
  // The finite non-negative codes 0..top-1 are ascending in value.
  auto value = [&](int code) { return code == top ? top_value : table[static_cast<size_t>(code)]; };
  if (f >= top_value) return top;
  int lo = 0, hi = top;  // value(lo) <= f < value(hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (value(mid) <= f)
      lo = mid;
    else
      hi = mid;
  }
  const float below = f - value(lo), above = value(hi) - f;
  if (below < above) return static_cast<uint8_t>(lo);
  if (above < below) return static_cast<uint8_t>(hi);
  return static_cast<uint8_t>(lo % 2 == 0 ? lo : hi);
}

}  // namespace

StatusOr<at::Tensor> DowncastF8(const at::Tensor& values, F8Format format) {
  const at::ScalarType in = values.scalar_type();
  if ((in != at::kFloat && in != at::kDouble && in != at::kHalf && in != at::kBFloat16) ||
      !values.device().is_cpu()) {
    return InvalidArgumentError(
        "DowncastF8: expected a CPU float32/float64/float16/bfloat16 tensor");
  }
  try {
    at::Tensor f = values.to(at::kFloat).contiguous();
    at::Tensor out = at::empty(f.sizes(), at::TensorOptions().dtype(at::kByte));
    const auto& table = F8Table(format);
    const bool e4m3 = format == F8Format::kE4M3;
    const uint8_t top = e4m3 ? 0x7f : 0x7c;
    const float top_value = e4m3 ? 480.0f : 65536.0f;
    const float* s = f.data_ptr<float>();
    uint8_t* d = out.data_ptr<uint8_t>();
    const int64_t n = f.numel();
    for (int64_t i = 0; i < n; ++i) {
      const float x = s[i];
      const uint8_t sign = std::signbit(x) ? 0x80 : 0;
      if (std::isnan(x)) {
        d[i] = sign | 0x7f;
        continue;
      }
      uint8_t code = NearestF8(std::fabs(x), table, top, top_value);
      d[i] = sign | code;
    }
    return out;
  } catch (const c10::Error& e) {
    return InternalError(std::string("DowncastF8: libtorch: ") + e.what_without_backtrace());
  }
}

StatusOr<at::Tensor> View(const formats::ModelFile& file, const formats::TensorInfo& info) {
  auto mapping = file.mapping();
  if (!mapping) {
    return FailedPreconditionError(Where(file, info) +
                                   ": no file mapping (open the file with ModelFile::Open)");
  }
  auto dtype = PlainDType(file, info);
  if (!dtype) {
    return FailedPreconditionError(Where(file, info) + ": " + info.dtype +
                                   " is block-quantised; use Load() to dequantise it");
  }
  FLEET_ASSIGN_OR_RETURN(at::ScalarType st, ToScalarType(*dtype));
  auto data = file.Data(info);
  if (data.size() != info.nbytes) {
    return OutOfRangeError(Where(file, info) + ": byte range is outside the file");
  }
  const int elsize = formats::DTypeSize(*dtype);
  if (reinterpret_cast<uintptr_t>(data.data()) % static_cast<uintptr_t>(elsize) != 0) {
    return FailedPreconditionError(Where(file, info) + ": data at file offset " +
                                   std::to_string(info.offset) + " is not aligned to its " +
                                   std::to_string(elsize) + "-byte elements; use Load()");
  }
  try {
    // from_blob wants a non-const pointer; the pages are PROT_READ, so writes fault (documented).
    void* ptr = const_cast<uint8_t*>(data.data());
    return at::from_blob(
        ptr, Shape(info), [mapping](void*) mutable { mapping.reset(); },
        at::TensorOptions().dtype(st));
  } catch (const c10::Error& e) {
    return InternalError(Where(file, info) + ": libtorch: " + e.what_without_backtrace());
  }
}

StatusOr<at::Tensor> ViewOrCopy(const formats::ModelFile& file, const formats::TensorInfo& info) {
  auto dtype = PlainDType(file, info);
  auto data = file.Data(info);
  if (!dtype || data.size() != info.nbytes ||
      reinterpret_cast<uintptr_t>(data.data()) % static_cast<uintptr_t>(formats::DTypeSize(*dtype)) ==
          0) {
    return View(file, info);  // aligned, or an error View names
  }
  try {
    FLEET_ASSIGN_OR_RETURN(at::ScalarType st, ToScalarType(*dtype));
    at::Tensor copy = at::empty(Shape(info), at::TensorOptions().dtype(st));
    std::memcpy(copy.data_ptr(), data.data(), info.nbytes);
    return copy;
  } catch (const c10::Error& e) {
    return InternalError(Where(file, info) + ": libtorch: " + e.what_without_backtrace());
  }
}

StatusOr<at::Tensor> Load(const formats::ModelFile& file, const formats::TensorInfo& info,
                          at::ScalarType out) {
  auto data = file.Data(info);
  if (data.size() != info.nbytes) {
    return OutOfRangeError(Where(file, info) + ": byte range is outside the file");
  }
  try {
    if (auto dtype = PlainDType(file, info)) {
      FLEET_ASSIGN_OR_RETURN(at::ScalarType st, ToScalarType(*dtype));
      // A private copy in the source dtype (handles unaligned data), then the cast.
      at::Tensor raw = at::empty(Shape(info), at::TensorOptions().dtype(st));
      if (info.nbytes) std::memcpy(raw.data_ptr(), data.data(), info.nbytes);
      if (*dtype == DType::kF8E4M3 || *dtype == DType::kF8E5M2) {
        return UpcastF8(raw, *dtype == DType::kF8E4M3 ? F8Format::kE4M3 : F8Format::kE5M2, out);
      }
      return st == out ? raw : raw.to(out);
    }
    auto traits = formats::GgmlTypeByName(info.dtype);
    if (file.format() != formats::FileFormat::kGguf || !traits) {
      return InvalidArgumentError(Where(file, info) + ": unknown dtype '" + info.dtype + "'");
    }
    formats::OutType ot = formats::OutType::kF32;
    at::ScalarType produced = at::kFloat;
    if (out == at::kHalf) {
      ot = formats::OutType::kF16;
      produced = at::kHalf;
    } else if (out == at::kBFloat16) {
      ot = formats::OutType::kBF16;
      produced = at::kBFloat16;
    }
    at::Tensor t = at::empty(Shape(info), at::TensorOptions().dtype(produced));
    FLEET_RETURN_IF_ERROR(formats::Dequantize(traits->type, data, info.numel(), ot, t.data_ptr())
                              .WithContext(Where(file, info)));
    return produced == out ? t : t.to(out);
  } catch (const c10::Error& e) {
    return InternalError(Where(file, info) + ": libtorch: " + e.what_without_backtrace());
  }
}

}  // namespace fleet::tensor
