// The GGUF v2/v3 reader (little-endian): header, key-values of every type (nested arrays
// included), tensor infos (ggml ne[] order, reversed into torch order), general.alignment and
// the data section. Every count and length is checked against the bytes that remain before
// anything is allocated, so a hostile header cannot make us allocate or loop absurdly.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include "fleet/formats/dtype.h"
#include "fleet/formats/model_file.h"

namespace fleet::formats {
namespace {

enum GgufValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};
constexpr int kMaxArrayDepth = 8;
// ggml itself stops at 4 (GGML_MAX_DIMS), but gguf-py writes any rank, and ComfyUI-GGUF's
// WAN and HunyuanVideo files carry a 5-D patch_embedding.weight (its tools/fix_5d_tensors.py).
constexpr uint32_t kMaxDims = 8;

// Fixed encoded size of a scalar type, 0 for string/array.
uint64_t ScalarSize(uint32_t t) {
  switch (t) {
    case kU8: case kI8: case kBool: return 1;
    case kU16: case kI16: return 2;
    case kU32: case kI32: case kF32: return 4;
    case kU64: case kI64: case kF64: return 8;
    default: return 0;
  }
}

const char* TypeName(uint32_t t) {
  static const char* kNames[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32",
                                 "bool", "string", "array", "u64", "i64", "f64"};
  return t <= kF64 ? kNames[t] : "?";
}

class Reader {
 public:
  Reader(std::span<const uint8_t> bytes, const std::string& name) : b_(bytes), name_(name) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return b_.size() - pos_; }
  void set_context(std::string c) { context_ = std::move(c); }

  Status Error(std::string_view field, uint64_t at, std::string_view what) const {
    std::string msg = name_ + ": gguf: ";
    if (!context_.empty()) msg += context_ + ": ";
    if (!field.empty()) msg += "field '" + std::string(field) + "' ";
    msg += "at byte " + std::to_string(at) + ": " + std::string(what);
    return InvalidArgumentError(msg);
  }
  Status Truncated(std::string_view field, uint64_t need) const {
    return DataLossError(name_ + ": gguf: " + (context_.empty() ? "" : context_ + ": ") +
                         "field '" + std::string(field) + "' at byte " + std::to_string(pos_) +
                         ": needs " + std::to_string(need) + " bytes, the file ends after " +
                         std::to_string(remaining()) + " (truncated)");
  }

  template <typename T>
  Status Read(std::string_view field, T* out) {
    if (remaining() < sizeof(T)) return Truncated(field, sizeof(T));
    std::memcpy(out, b_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return Status::OK();
  }

  Status String(std::string_view field, std::string* out) {
    uint64_t at = pos_;
    uint64_t len = 0;
    FLEET_RETURN_IF_ERROR(Read(field, &len));
    if (len > remaining()) {
      pos_ = at;
      return Truncated(field, 8 + len);
    }
    out->assign(reinterpret_cast<const char*>(b_.data() + pos_), len);
    pos_ += len;
    return Status::OK();
  }

  // Reads one value of type `t` as JSON (for the metadata map).
  Status Value(std::string_view field, uint32_t t, int depth, nlohmann::ordered_json* out) {
    switch (t) {
      case kU8: { uint8_t v{}; FLEET_RETURN_IF_ERROR(Read(field, &v)); *out = v; return Status::OK(); }
      case kI8: { int8_t v{}; FLEET_RETURN_IF_ERROR(Read(field, &v)); *out = v; return Status::OK(); }
      case kU16: { uint16_t v{}; FLEET_RETURN_IF_ERROR(Read(field, &v)); *out = v; return Status::OK(); }
      case kI16: { int16_t v{}; FLEET_RETURN_IF_ERROR(Read(field, &v)); *out = v; return Status::OK(); }
      case kU32: { uint32_t v{}; FLEET_RETURN_IF_ERROR(Read(field, &v)); *out = v; return Status::OK(); }
      case kI32: { int32_t v{}; FLEET_RETURN_IF_ERROR(Read(field, &v)); *out = v; return Status::OK(); }
      case kU64: { uint64_t v{}; FLEET_RETURN_IF_ERROR(Read(field, &v)); *out = v; return Status::OK(); }
      case kI64: { int64_t v{}; FLEET_RETURN_IF_ERROR(Read(field, &v)); *out = v; return Status::OK(); }
      case kF32: { float v{}; FLEET_RETURN_IF_ERROR(Read(field, &v)); *out = Float(v); return Status::OK(); }
      case kF64: { double v{}; FLEET_RETURN_IF_ERROR(Read(field, &v)); *out = Float(v); return Status::OK(); }
      case kBool: {
        uint64_t at = pos_;
        uint8_t v = 0;
        FLEET_RETURN_IF_ERROR(Read(field, &v));
        if (v > 1) return Error(field, at, "bool value " + std::to_string(v) + " is not 0 or 1");
        *out = v == 1;
        return Status::OK();
      }
      case kString: {
        std::string s;
        FLEET_RETURN_IF_ERROR(String(field, &s));
        // nlohmann refuses invalid UTF-8 when dumping; keep the bytes readable instead.
        *out = s;
        return Status::OK();
      }
      case kArray: {
        if (depth >= kMaxArrayDepth) {
          return Error(field, pos_, "arrays nested deeper than " + std::to_string(kMaxArrayDepth));
        }
        uint64_t at = pos_;
        uint32_t et = 0;
        uint64_t count = 0;
        FLEET_RETURN_IF_ERROR(Read(field, &et));
        if (et > kF64) {
          return Error(field, at, "unknown array element type " + std::to_string(et));
        }
        uint64_t count_at = pos_;
        FLEET_RETURN_IF_ERROR(Read(field, &count));
        // Each element takes at least 1 byte (scalars), 8 (strings) or 12 (arrays).
        uint64_t min = et == kString ? 8 : et == kArray ? 12 : ScalarSize(et);
        if (count > remaining() / min) {
          return Error(field, count_at, "array of " + std::to_string(count) + " " +
                                            TypeName(et) + " elements cannot fit in the " +
                                            std::to_string(remaining()) + " bytes left");
        }
        *out = nlohmann::ordered_json::array();
        for (uint64_t i = 0; i < count; ++i) {
          nlohmann::ordered_json item;
          FLEET_RETURN_IF_ERROR(Value(field, et, depth + 1, &item));
          out->push_back(std::move(item));
        }
        return Status::OK();
      }
      default:
        return Error(field, pos_ - 4, "unknown value type " + std::to_string(t));
    }
  }

 private:
  static nlohmann::ordered_json Float(double v) {
    if (std::isfinite(v)) return v;
    return std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf");  // JSON has no inf/nan
  }

  std::span<const uint8_t> b_;
  const std::string& name_;
  uint64_t pos_ = 0;
  std::string context_;
};

std::string Render(const nlohmann::ordered_json& v) {
  if (v.is_string()) return v.get<std::string>();
  return v.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

}  // namespace

StatusOr<ModelFile::Contents> ParseGguf(std::span<const uint8_t> bytes, const std::string& name) {
  Reader r(bytes, name);
  ModelFile::Contents out;
  out.format = FileFormat::kGguf;
  uint8_t magic[4] = {};
  FLEET_RETURN_IF_ERROR(r.Read("magic", &magic));
  if (std::memcmp(magic, "GGUF", 4) != 0) return r.Error("magic", 0, "not a GGUF file");
  uint32_t version = 0;
  FLEET_RETURN_IF_ERROR(r.Read("version", &version));
  if (version != 2 && version != 3) {
    std::string why = "version " + std::to_string(version) + " is not supported (2 and 3 are)";
    if (version == 1) why += "; v1 files predate 64-bit counts, convert them with llama.cpp";
    if ((version & 0xffff) == 0 && version != 0) why += "; the file looks big-endian";
    return r.Error("version", 4, why);
  }
  out.version = version;
  uint64_t n_tensors = 0, n_kv = 0;
  FLEET_RETURN_IF_ERROR(r.Read("tensor_count", &n_tensors));
  FLEET_RETURN_IF_ERROR(r.Read("metadata_kv_count", &n_kv));
  // A key-value pair takes at least 8 + 4 + 1 bytes, a tensor info 8 + 4 + 4 + 8.
  if (n_kv > r.remaining() / 13) {
    return r.Error("metadata_kv_count", 16,
                   std::to_string(n_kv) + " key-value pairs cannot fit in a " +
                       std::to_string(bytes.size()) + "-byte file");
  }
  if (n_tensors > r.remaining() / 24) {
    return r.Error("tensor_count", 8,
                   std::to_string(n_tensors) + " tensors cannot fit in a " +
                       std::to_string(bytes.size()) + "-byte file");
  }

  std::unordered_set<std::string> keys;
  uint64_t alignment = 32;
  std::map<std::string, std::vector<int64_t>> orig_shapes;
  for (uint64_t i = 0; i < n_kv; ++i) {
    r.set_context("key-value " + std::to_string(i));
    uint64_t key_at = r.pos();
    std::string key;
    FLEET_RETURN_IF_ERROR(r.String("key", &key));
    if (!keys.insert(key).second) return r.Error("key", key_at, "duplicate key '" + key + "'");
    r.set_context("key '" + key + "'");
    uint64_t type_at = r.pos();
    uint32_t type = 0;
    FLEET_RETURN_IF_ERROR(r.Read("type", &type));
    if (type > kF64) return r.Error("type", type_at, "unknown value type " + std::to_string(type));
    uint64_t value_at = r.pos();
    nlohmann::ordered_json value;
    FLEET_RETURN_IF_ERROR(r.Value("value", type, 0, &value));
    if (key == "general.alignment") {
      if (type != kU32) {
        return r.Error("value", value_at,
                       std::string("general.alignment must be a u32, found ") + TypeName(type));
      }
      alignment = value.get<uint32_t>();
      if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
        return r.Error("value", value_at,
                       "general.alignment " + std::to_string(alignment) +
                           " is not a power of two");
      }
    }
    // ComfyUI-GGUF stores the torch shape of tensors it had to reshape (5-D convolutions).
    static constexpr std::string_view kOrig = "comfy.gguf.orig_shape.";
    if (key.rfind(kOrig, 0) == 0) {
      bool ok = value.is_array();
      std::vector<int64_t> shape;
      if (ok) {
        for (const auto& d : value) {
          if (!d.is_number_integer() || d.get<int64_t>() < 0) {
            ok = false;
            break;
          }
          shape.push_back(d.get<int64_t>());
        }
      }
      if (!ok) return r.Error("value", value_at, "must be an array of non-negative integers");
      orig_shapes[key.substr(kOrig.size())] = std::move(shape);
    }
    out.metadata[key] = Render(value);
  }

  std::unordered_set<std::string> names;
  std::vector<uint64_t> rel_offsets;
  std::vector<uint64_t> info_at;
  out.tensors.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    r.set_context("tensor info " + std::to_string(i));
    uint64_t start = r.pos();
    TensorInfo t;
    FLEET_RETURN_IF_ERROR(r.String("name", &t.name));
    if (!names.insert(t.name).second) {
      return r.Error("name", start, "duplicate tensor name '" + t.name + "'");
    }
    r.set_context("tensor '" + t.name + "'");
    uint64_t dims_at = r.pos();
    uint32_t n_dims = 0;
    FLEET_RETURN_IF_ERROR(r.Read("n_dims", &n_dims));
    if (n_dims > kMaxDims) {
      return r.Error("n_dims", dims_at,
                     std::to_string(n_dims) + " dimensions (at most 8)");
    }
    std::vector<uint64_t> ne(n_dims);
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t at = r.pos();
      FLEET_RETURN_IF_ERROR(r.Read("ne", &ne[d]));
      if (ne[d] > static_cast<uint64_t>(INT64_MAX)) {
        return r.Error("ne[" + std::to_string(d) + "]", at, "dimension exceeds 2^63");
      }
    }
    uint64_t type_at = r.pos();
    uint32_t type_id = 0;
    FLEET_RETURN_IF_ERROR(r.Read("type", &type_id));
    auto traits = GgmlTypeInfo(type_id);
    if (!traits) {
      return r.Error("type", type_at, "unknown ggml type " + std::to_string(type_id));
    }
    uint64_t offset_at = r.pos();
    uint64_t rel = 0;
    FLEET_RETURN_IF_ERROR(r.Read("offset", &rel));
    if (rel % alignment != 0) {
      return r.Error("offset", offset_at,
                     "offset " + std::to_string(rel) + " is not a multiple of the alignment " +
                         std::to_string(alignment));
    }
    if (n_dims == 0 && traits->block_size != 1) {
      return r.Error("n_dims", dims_at, "a 0-d tensor cannot be of block type " +
                                            std::string(traits->name));
    }
    // Size: rows of ne[0] elements, ne[0] a whole number of blocks; overflow-checked.
    if (n_dims > 0 && ne[0] % static_cast<uint64_t>(traits->block_size) != 0) {
      return r.Error("ne[0]", dims_at + 4,
                     "row length " + std::to_string(ne[0]) + " is not a multiple of " +
                         std::string(traits->name) + "'s block size " +
                         std::to_string(traits->block_size));
    }
    unsigned __int128 nbytes = static_cast<unsigned __int128>(traits->type_size);
    bool zero = false;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t dim = d == 0 ? ne[0] / static_cast<uint64_t>(traits->block_size) : ne[d];
      if (ne[d] == 0) zero = true;
      nbytes *= dim;
      if (nbytes > static_cast<unsigned __int128>(INT64_MAX)) {
        return r.Error("ne", dims_at + 4, "tensor size overflows 64 bits");
      }
    }
    // As for safetensors: the product of the non-zero dims must fit in int64.
    unsigned __int128 nonzero = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      if (ne[d] == 0) continue;
      nonzero *= ne[d];
      if (nonzero > static_cast<unsigned __int128>(INT64_MAX)) {
        return r.Error("ne", dims_at + 4, "element count overflows 64 bits");
      }
    }
    const unsigned __int128 numel = zero ? 0 : nonzero;
    if (zero) nbytes = 0;
    t.dtype = std::string(traits->name);
    t.nbytes = static_cast<uint64_t>(nbytes);
    for (uint32_t d = n_dims; d-- > 0;) t.shape.push_back(static_cast<int64_t>(ne[d]));
    auto orig = orig_shapes.find(t.name);
    if (orig != orig_shapes.end()) {
      unsigned __int128 n = 1;
      for (int64_t d : orig->second) {
        n *= static_cast<uint64_t>(d);
        if (n > static_cast<unsigned __int128>(INT64_MAX)) break;
      }
      if (n != numel) {
        return r.Error("ne", dims_at + 4,
                       "comfy.gguf.orig_shape." + t.name + " does not have the tensor's " +
                           "element count");
      }
      t.shape = orig->second;
    }
    rel_offsets.push_back(rel);
    info_at.push_back(offset_at);
    out.tensors.push_back(std::move(t));
  }
  r.set_context("");

  const uint64_t data_start = (r.pos() + alignment - 1) / alignment * alignment;
  if (data_start > bytes.size() && n_tensors > 0) {
    return DataLossError(name + ": gguf: the data section would start at byte " +
                         std::to_string(data_start) + ", past the end of the file (" +
                         std::to_string(bytes.size()) + " bytes; truncated)");
  }
  const uint64_t data_len = data_start <= bytes.size() ? bytes.size() - data_start : 0;
  for (size_t i = 0; i < out.tensors.size(); ++i) {
    TensorInfo& t = out.tensors[i];
    if (rel_offsets[i] > data_len || t.nbytes > data_len - rel_offsets[i]) {
      return DataLossError(name + ": gguf: tensor '" + t.name + "': field 'offset' at byte " +
                           std::to_string(info_at[i]) + ": data [" +
                           std::to_string(rel_offsets[i]) + ", +" + std::to_string(t.nbytes) +
                           ") runs past the end of the data section (" +
                           std::to_string(data_len) + " bytes; truncated?)");
    }
    t.offset = data_start + rel_offsets[i];
  }
  // No two tensors may share bytes.
  std::vector<size_t> order(out.tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return out.tensors[a].offset < out.tensors[b].offset;
  });
  const TensorInfo* prev = nullptr;
  for (size_t i : order) {
    const TensorInfo& t = out.tensors[i];
    if (t.nbytes == 0) continue;
    if (prev && t.offset < prev->offset + prev->nbytes) {
      return InvalidArgumentError(name + ": gguf: tensor '" + t.name + "': field 'offset' at byte " +
                                  std::to_string(info_at[i]) + ": data at file byte " +
                                  std::to_string(t.offset) + " overlaps tensor '" + prev->name +
                                  "' [" + std::to_string(prev->offset) + ", " +
                                  std::to_string(prev->offset + prev->nbytes) + ")");
    }
    prev = &t;
  }
  out.alignment = alignment;
  return out;
}

}  // namespace fleet::formats
