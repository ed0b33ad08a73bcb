#include "fleet/formats/gguf_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "dequant_internal.h"

namespace fleet::formats {
namespace {

constexpr uint64_t kAlignment = 32;  // GGUF's default general.alignment
constexpr uint32_t kTypeString = 8;  // gguf_type GGUF_TYPE_STRING

void Put(std::vector<uint8_t>& b, const void* p, size_t n) {
  const auto* c = static_cast<const uint8_t*>(p);
  b.insert(b.end(), c, c + n);
}
template <typename T>
void PutPod(std::vector<uint8_t>& b, T v) {
  Put(b, &v, sizeof(T));
}
void PutString(std::vector<uint8_t>& b, const std::string& s) {
  PutPod<uint64_t>(b, s.size());
  Put(b, s.data(), s.size());
}
uint64_t AlignUp(uint64_t v) { return (v + kAlignment - 1) / kAlignment * kAlignment; }

}  // namespace

StatusOr<std::vector<uint8_t>> EncodeQ8_0(std::span<const float> values) {
  if (values.size() % internal::kQK != 0) {
    return InvalidArgumentError("Q8_0 needs a multiple of 32 values, got " +
                                std::to_string(values.size()));
  }
  std::vector<uint8_t> out;
  out.reserve(values.size() / internal::kQK * 34);
  for (size_t b = 0; b < values.size(); b += internal::kQK) {
    float amax = 0;
    for (int i = 0; i < internal::kQK; ++i) amax = std::max(amax, std::fabs(values[b + i]));
    const float d = amax / 127.0f;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    PutPod<uint16_t>(out, internal::FloatToHalf(d));
    for (int i = 0; i < internal::kQK; ++i) {
      PutPod<int8_t>(out, static_cast<int8_t>(std::roundf(values[b + i] * id)));
    }
  }
  return out;
}

StatusOr<std::vector<float>> ToFloat32(DType dtype, std::span<const uint8_t> bytes) {
  const size_t size = static_cast<size_t>(DTypeSize(dtype));
  if (dtype != DType::kF32 && dtype != DType::kF16 && dtype != DType::kBF16) {
    return InvalidArgumentError("cannot read " + std::string(DTypeName(dtype)) + " as float32");
  }
  std::vector<float> out(bytes.size() / size);
  for (size_t i = 0; i < out.size(); ++i) {
    const uint8_t* p = bytes.data() + i * size;
    if (dtype == DType::kF32) {
      std::memcpy(&out[i], p, 4);
    } else if (dtype == DType::kF16) {
      out[i] = internal::HalfToFloat(internal::Load16(p));
    } else {
      const uint32_t bits = static_cast<uint32_t>(internal::Load16(p)) << 16;
      std::memcpy(&out[i], &bits, 4);
    }
  }
  return out;
}

Status GgufWriter::Add(const std::string& name, GgmlType type, std::vector<int64_t> shape,
                       std::vector<uint8_t> bytes) {
  auto traits = GgmlTypeInfo(static_cast<uint32_t>(type));
  if (name.empty() || !traits) return InvalidArgumentError("gguf writer: bad tensor '" + name + "'");
  for (const auto& e : entries_) {
    if (e.name == name) return InvalidArgumentError("gguf writer: duplicate tensor '" + name + "'");
  }
  int64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0) return InvalidArgumentError("gguf writer: '" + name + "': negative dim");
    numel *= d;
  }
  const bool whole_blocks = numel % traits->block_size == 0 &&
                            (shape.empty() || shape.back() % traits->block_size == 0);
  const uint64_t want = static_cast<uint64_t>(numel / traits->block_size) * traits->type_size;
  if (!whole_blocks || bytes.size() != want) {
    return InvalidArgumentError("gguf writer: '" + name + "' (" + std::string(traits->name) +
                                "): " + std::to_string(bytes.size()) + " bytes for " +
                                std::to_string(numel) + " values, expected " + std::to_string(want) +
                                (whole_blocks ? "" : " (rows must be whole blocks)"));
  }
  entries_.push_back({name, type, std::move(shape), std::move(bytes)});
  return Status::OK();
}

std::vector<uint8_t> GgufWriter::Serialize() const {
  std::vector<uint8_t> b = {'G', 'G', 'U', 'F'};
  PutPod<uint32_t>(b, 3);
  PutPod<uint64_t>(b, entries_.size());
  PutPod<uint64_t>(b, metadata_.size());
  for (const auto& [key, value] : metadata_) {
    PutString(b, key);
    PutPod<uint32_t>(b, kTypeString);
    PutString(b, value);
  }
  uint64_t offset = 0;
  for (const auto& e : entries_) {
    PutString(b, e.name);
    PutPod<uint32_t>(b, static_cast<uint32_t>(e.shape.size()));
    for (auto d = e.shape.rbegin(); d != e.shape.rend(); ++d) PutPod<uint64_t>(b, static_cast<uint64_t>(*d));
    PutPod<uint32_t>(b, static_cast<uint32_t>(e.type));
    PutPod<uint64_t>(b, offset);
    offset = AlignUp(offset + e.bytes.size());
  }
  b.resize(AlignUp(b.size()));
  const size_t data = b.size();
  b.resize(data + offset);
  offset = 0;
  for (const auto& e : entries_) {
    if (!e.bytes.empty()) std::memcpy(b.data() + data + offset, e.bytes.data(), e.bytes.size());
    offset = AlignUp(offset + e.bytes.size());
  }
  return b;
}

Status GgufWriter::Write(const std::string& path) const {
  const std::vector<uint8_t> image = Serialize();
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return FailedPreconditionError(tmp + ": cannot create: " + std::strerror(errno));
  size_t done = 0;
  while (done < image.size()) {
    const ssize_t n = ::write(fd, image.data() + done, image.size() - done);
    if (n <= 0) {
      Status s = DataLossError(tmp + ": write failed: " + std::strerror(errno));
      ::close(fd);
      ::unlink(tmp.c_str());
      return s;
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) {
    Status s = DataLossError(path + ": cannot finish the file: " + std::strerror(errno));
    ::unlink(tmp.c_str());
    return s;
  }
  return Status::OK();
}

}  // namespace fleet::formats
