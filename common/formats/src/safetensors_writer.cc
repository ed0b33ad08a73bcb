#include "fleet/formats/safetensors_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

namespace fleet::formats {

Status SafetensorsWriter::Check(const std::string& name, std::span<const int64_t> shape,
                                DType dtype, uint64_t* nbytes) const {
  if (name.empty() || name == "__metadata__") {
    return InvalidArgumentError("safetensors writer: invalid tensor name '" + name + "'");
  }
  for (const auto& e : entries_) {
    if (e.name == name) {
      return InvalidArgumentError("safetensors writer: duplicate tensor '" + name + "'");
    }
  }
  unsigned __int128 n = static_cast<unsigned __int128>(DTypeSize(dtype));
  for (int64_t d : shape) {
    if (d < 0) return InvalidArgumentError("safetensors writer: '" + name + "': negative dim");
    n *= static_cast<uint64_t>(d);
    if (n > static_cast<unsigned __int128>(INT64_MAX)) {
      return InvalidArgumentError("safetensors writer: '" + name + "': size overflows");
    }
  }
  *nbytes = static_cast<uint64_t>(n);
  return Status::OK();
}

Status SafetensorsWriter::Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                              std::span<const uint8_t> bytes) {
  uint64_t nbytes = 0;
  FLEET_RETURN_IF_ERROR(Check(name, shape, dtype, &nbytes));
  if (nbytes != bytes.size()) {
    return InvalidArgumentError("safetensors writer: '" + name + "': " +
                                std::to_string(bytes.size()) + " bytes given, shape needs " +
                                std::to_string(nbytes));
  }
  entries_.push_back(Entry{name, dtype, std::move(shape), nbytes,
                           std::vector<uint8_t>(bytes.begin(), bytes.end()), false});
  return Status::OK();
}

Status SafetensorsWriter::AddZeros(const std::string& name, DType dtype,
                                   std::vector<int64_t> shape) {
  uint64_t nbytes = 0;
  FLEET_RETURN_IF_ERROR(Check(name, shape, dtype, &nbytes));
  entries_.push_back(Entry{name, dtype, std::move(shape), nbytes, {}, true});
  return Status::OK();
}

std::string SafetensorsWriter::Header() const {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!metadata_.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata_) m[k] = v;
    h["__metadata__"] = m;
  }
  uint64_t off = 0;
  for (const auto& e : entries_) {
    h[e.name] = {{"dtype", std::string(DTypeName(e.dtype))},
                 {"shape", e.shape},
                 {"data_offsets", {off, off + e.nbytes}}};
    off += e.nbytes;
  }
  std::string text = h.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
  return text;
}

std::vector<uint8_t> SafetensorsWriter::Serialize() const {
  std::string header = Header();
  std::vector<uint8_t> out(8);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<uint8_t>(n >> (8 * i));
  out.insert(out.end(), header.begin(), header.end());
  for (const auto& e : entries_) {
    if (e.zeros) out.resize(out.size() + e.nbytes, 0);
    else out.insert(out.end(), e.bytes.begin(), e.bytes.end());
  }
  return out;
}

namespace {
Status WriteAll(int fd, const uint8_t* p, uint64_t n, uint64_t offset, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::pwrite(fd, p, n > (1u << 30) ? (1u << 30) : n, static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      return DataLossError(path + ": write failed: " + std::strerror(errno));
    }
    p += w;
    n -= static_cast<uint64_t>(w);
    offset += static_cast<uint64_t>(w);
  }
  return Status::OK();
}
}  // namespace

Status SafetensorsWriter::Write(const std::string& path) const {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return FailedPreconditionError(tmp + ": cannot create: " + std::strerror(errno));
  }
  auto fail = [&](Status s) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  };
  std::string header = Header();
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(header.size() >> (8 * i));
  Status s = WriteAll(fd, len, 8, 0, tmp);
  if (s.ok()) {
    s = WriteAll(fd, reinterpret_cast<const uint8_t*>(header.data()), header.size(), 8, tmp);
  }
  uint64_t off = 8 + header.size();
  for (const auto& e : entries_) {
    if (!s.ok()) break;
    if (!e.zeros) s = WriteAll(fd, e.bytes.data(), e.nbytes, off, tmp);
    off += e.nbytes;
  }
  if (!s.ok()) return fail(s);
  if (::ftruncate(fd, static_cast<off_t>(off)) != 0) {  // trailing zero tensors become a hole
    return fail(DataLossError(tmp + ": ftruncate failed: " + std::strerror(errno)));
  }
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    return DataLossError(tmp + ": close failed: " + std::strerror(errno));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    std::string msg = path + ": rename from " + tmp + " failed: " + std::strerror(errno);
    ::unlink(tmp.c_str());
    return FailedPreconditionError(msg);
  }
  return Status::OK();
}

}  // namespace fleet::formats
