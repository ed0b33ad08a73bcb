// The safetensors reader: 8-byte little-endian header length N, N bytes of JSON, then the data
// section. Every rule it enforces is listed in docs/formats.md.
#include <algorithm>
#include <cstring>
#include <string>

#include "fleet/formats/dtype.h"
#include "fleet/formats/model_file.h"
#include "json_lite.h"

namespace fleet::formats {
namespace {

using internal::JsonValue;

// The reference implementation (huggingface/safetensors) refuses headers above 100 MB too.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

std::string Quote(std::string_view s) {
  std::string out = "'";
  for (char c : s) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "'";
}

class HeaderChecker {
 public:
  HeaderChecker(const std::string& name, uint64_t data_begin, uint64_t data_len)
      : name_(name), data_begin_(data_begin), data_len_(data_len) {}

  Status Error(std::string_view tensor, std::string_view field, uint64_t offset,
               std::string_view what) const {
    std::string msg = name_ + ": safetensors header: ";
    if (!tensor.empty()) msg += "tensor " + Quote(tensor) + ": ";
    if (!field.empty()) msg += "field '" + std::string(field) + "' ";
    msg += "at byte " + std::to_string(offset) + ": " + std::string(what);
    return InvalidArgumentError(msg);
  }

  Status Metadata(const JsonValue& v, std::map<std::string, std::string>* out) const {
    if (v.kind != JsonValue::Kind::kObject) {
      return Error("", "__metadata__", v.offset,
                   "must be an object of strings, found " + std::string(JsonKindName(v.kind)));
    }
    for (const auto& [key, value] : v.members) {
      if (value.kind != JsonValue::Kind::kString) {
        return Error("", "__metadata__." + key, value.offset,
                     "metadata values must be strings, found " +
                         std::string(JsonKindName(value.kind)));
      }
      (*out)[key] = value.string;
    }
    return Status::OK();
  }

  Status Tensor(const std::string& tname, const JsonValue& v, TensorInfo* out) const {
    if (v.kind != JsonValue::Kind::kObject) {
      return Error(tname, "", v.offset,
                   "entry must be an object, found " + std::string(JsonKindName(v.kind)));
    }
    for (const auto& [key, value] : v.members) {
      if (key != "dtype" && key != "shape" && key != "data_offsets") {
        return Error(tname, key, value.offset,
                     "unknown field (expected dtype, shape, data_offsets)");
      }
    }
    const JsonValue* dtype = v.Get("dtype");
    const JsonValue* shape = v.Get("shape");
    const JsonValue* offsets = v.Get("data_offsets");
    if (!dtype) return Error(tname, "dtype", v.offset, "missing");
    if (!shape) return Error(tname, "shape", v.offset, "missing");
    if (!offsets) return Error(tname, "data_offsets", v.offset, "missing");

    if (dtype->kind != JsonValue::Kind::kString) {
      return Error(tname, "dtype", dtype->offset, "must be a string");
    }
    auto dt = ParseDType(dtype->string);
    if (!dt) {
      return Error(tname, "dtype", dtype->offset,
                   "unknown dtype " + Quote(dtype->string) +
                       " (known: BOOL U8 I8 F8_E5M2 F8_E4M3 I16 U16 F16 BF16 I32 U32 F32 F64 I64 "
                       "U64)");
    }

    if (shape->kind != JsonValue::Kind::kArray) {
      return Error(tname, "shape", shape->offset, "must be an array of non-negative integers");
    }
    if (shape->items.size() > 64) {
      return Error(tname, "shape", shape->offset,
                   std::to_string(shape->items.size()) + " dimensions (at most 64)");
    }
    // numel * element size must fit in the data section, itself < 2^63: check as we multiply.
    uint64_t numel = 1;
    bool zero = false;
    for (const auto& d : shape->items) {
      if (d.kind != JsonValue::Kind::kNumber || !d.is_uint || d.uint_value > INT64_MAX) {
        return Error(tname, "shape", d.offset, "dimension must be a non-negative integer < 2^63");
      }
      out->shape.push_back(static_cast<int64_t>(d.uint_value));
      if (d.uint_value == 0) zero = true;
    }
    const uint64_t elsize = static_cast<uint64_t>(DTypeSize(*dt));
    // The product of the non-zero dims must fit even when a zero dim makes the tensor empty,
    // so that every consumer can multiply shapes safely.
    for (size_t i = 0; i < out->shape.size(); ++i) {
      uint64_t dim = static_cast<uint64_t>(out->shape[i]);
      if (dim == 0) continue;
      if (numel > INT64_MAX / dim) {
        return Error(tname, "shape", shape->items[i].offset, "element count overflows 64 bits");
      }
      numel *= dim;
    }
    if (numel > INT64_MAX / elsize) {
      return Error(tname, "shape", shape->offset, "byte size overflows 64 bits");
    }
    const uint64_t expected = zero ? 0 : numel * elsize;

    if (offsets->kind != JsonValue::Kind::kArray || offsets->items.size() != 2) {
      return Error(tname, "data_offsets", offsets->offset,
                   "must be an array [begin, end] of two integers");
    }
    const JsonValue& b = offsets->items[0];
    const JsonValue& e = offsets->items[1];
    if (b.kind != JsonValue::Kind::kNumber || !b.is_uint) {
      return Error(tname, "data_offsets", b.offset, "begin must be a non-negative integer");
    }
    if (e.kind != JsonValue::Kind::kNumber || !e.is_uint) {
      return Error(tname, "data_offsets", e.offset, "end must be a non-negative integer");
    }
    if (b.uint_value > e.uint_value) {
      return Error(tname, "data_offsets", offsets->offset,
                   "begin " + std::to_string(b.uint_value) + " is after end " +
                       std::to_string(e.uint_value));
    }
    if (e.uint_value > data_len_) {
      return Error(tname, "data_offsets", e.offset,
                   "end " + std::to_string(e.uint_value) + " is past the data section (" +
                       std::to_string(data_len_) + " bytes)");
    }
    uint64_t nbytes = e.uint_value - b.uint_value;
    if (nbytes != expected) {
      return Error(tname, "data_offsets", offsets->offset,
                   "holds " + std::to_string(nbytes) + " bytes but shape " + ShapeText(*out) +
                       " of " + std::string(DTypeName(*dt)) + " needs " +
                       std::to_string(expected));
    }
    out->name = tname;
    out->dtype = std::string(DTypeName(*dt));
    out->offset = data_begin_ + b.uint_value;
    out->nbytes = nbytes;
    return Status::OK();
  }

  static std::string ShapeText(const TensorInfo& t) {
    std::string s = "[";
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (i) s += ", ";
      s += std::to_string(t.shape[i]);
    }
    return s + "]";
  }

 private:
  const std::string& name_;
  uint64_t data_begin_;
  uint64_t data_len_;
};

}  // namespace

StatusOr<ModelFile::Contents> ParseSafetensors(std::span<const uint8_t> bytes,
                                               const std::string& name) {
  const uint64_t size = bytes.size();
  if (size < 8) {
    return DataLossError(name + ": safetensors: file is " + std::to_string(size) +
                         " bytes, too short for the 8-byte header length at byte 0");
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<size_t>(i)];
  if (n > size - 8) {
    return DataLossError(name + ": safetensors: header length " + std::to_string(n) +
                         " at byte 0 runs past the end of the file (" + std::to_string(size) +
                         " bytes; truncated or not a safetensors file)");
  }
  if (n > kMaxHeaderBytes) {
    return InvalidArgumentError(name + ": safetensors: header length " + std::to_string(n) +
                                " at byte 0 exceeds the 100 MiB limit");
  }
  if (n < 2 || bytes[8] != '{') {
    return InvalidArgumentError(name + ": safetensors header at byte 8: must start with '{' " +
                                "(not a safetensors file?)");
  }
  std::string_view text(reinterpret_cast<const char*>(bytes.data() + 8), n);
  auto parsed = internal::ParseJson(text, 8);
  if (!parsed.ok()) {
    return InvalidArgumentError(name + ": safetensors header: bad JSON " +
                                std::string(parsed.status().message()));
  }
  const JsonValue& root = *parsed;
  if (root.kind != JsonValue::Kind::kObject) {
    return InvalidArgumentError(name + ": safetensors header at byte 8: must be a JSON object");
  }
  const uint64_t data_begin = 8 + n;
  HeaderChecker check(name, data_begin, size - data_begin);
  ModelFile::Contents out;
  out.format = FileFormat::kSafetensors;
  out.tensors.reserve(root.members.size());
  for (const auto& [key, value] : root.members) {
    if (key == "__metadata__") {
      FLEET_RETURN_IF_ERROR(check.Metadata(value, &out.metadata));
      continue;
    }
    TensorInfo info;
    FLEET_RETURN_IF_ERROR(check.Tensor(key, value, &info));
    out.tensors.push_back(std::move(info));
  }
  // File order, then no two non-empty ranges may overlap.
  std::stable_sort(out.tensors.begin(), out.tensors.end(),
                   [](const TensorInfo& a, const TensorInfo& b) {
                     return a.offset != b.offset ? a.offset < b.offset : a.nbytes < b.nbytes;
                   });
  const TensorInfo* prev = nullptr;
  for (const auto& t : out.tensors) {
    if (t.nbytes == 0) continue;
    if (prev && t.offset < prev->offset + prev->nbytes) {
      return InvalidArgumentError(
          name + ": safetensors header: tensor " + Quote(t.name) +
          ": field 'data_offsets': range [" + std::to_string(t.offset - data_begin) + ", " +
          std::to_string(t.offset - data_begin + t.nbytes) + ") overlaps tensor " +
          Quote(prev->name) + " [" + std::to_string(prev->offset - data_begin) + ", " +
          std::to_string(prev->offset - data_begin + prev->nbytes) + ") (file bytes " +
          std::to_string(t.offset) + ")");
    }
    prev = &t;
  }
  return out;
}

}  // namespace fleet::formats
