#include "fleet/formats/model_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace fleet::formats {

std::string_view FileFormatName(FileFormat format) {
  return format == FileFormat::kGguf ? "gguf" : "safetensors";
}

int64_t TensorInfo::numel() const {
  // Parsers guarantee the product of the non-zero dims fits; a zero dim anywhere means empty.
  for (int64_t d : shape) {
    if (d == 0) return 0;
  }
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

StatusOr<std::shared_ptr<const MappedFile>> MappedFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    std::string msg = path + ": cannot open: " + std::strerror(err);
    return err == ENOENT ? NotFoundError(msg) : FailedPreconditionError(msg);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    std::string msg = path + ": cannot stat: " + std::strerror(errno);
    ::close(fd);
    return FailedPreconditionError(msg);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return InvalidArgumentError(path + ": not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const uint8_t* data = nullptr;
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      std::string msg = path + ": cannot mmap " + std::to_string(size) + " bytes: " +
                        std::strerror(errno);
      ::close(fd);
      return ResourceExhaustedError(msg);
    }
    data = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // the mapping keeps the file alive
  return std::shared_ptr<const MappedFile>(new MappedFile(data, size));
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

ModelFile::ModelFile(std::string path, std::shared_ptr<const MappedFile> mapping,
                     std::span<const uint8_t> bytes, Contents contents)
    : path_(std::move(path)),
      mapping_(std::move(mapping)),
      bytes_(bytes),
      format_(contents.format),
      tensors_(std::move(contents.tensors)),
      metadata_(std::move(contents.metadata)),
      version_(contents.version),
      alignment_(contents.alignment) {
  index_.reserve(tensors_.size());
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

StatusOr<std::unique_ptr<ModelFile>> ModelFile::Parse(std::span<const uint8_t> bytes,
                                                      const std::string& name) {
  const bool gguf = bytes.size() >= 4 && std::memcmp(bytes.data(), "GGUF", 4) == 0;
  StatusOr<Contents> contents = gguf ? ParseGguf(bytes, name) : ParseSafetensors(bytes, name);
  if (!contents.ok()) return contents.status();
  return std::make_unique<ModelFile>(name, nullptr, bytes, std::move(contents).value());
}

StatusOr<std::unique_ptr<ModelFile>> ModelFile::Open(const std::string& path) {
  FLEET_ASSIGN_OR_RETURN(auto mapping, MappedFile::Open(path));
  FLEET_ASSIGN_OR_RETURN(auto file, Parse(mapping->bytes(), path));
  file->mapping_ = std::move(mapping);
  return file;
}

std::unique_ptr<ModelFile> ModelFile::FromTensorInfos(std::vector<TensorInfo> tensors,
                                                      std::map<std::string, std::string> metadata,
                                                      FileFormat format, const std::string& name) {
  Contents c;
  c.format = format;
  c.tensors = std::move(tensors);
  c.metadata = std::move(metadata);
  return std::make_unique<ModelFile>(name, nullptr, std::span<const uint8_t>(), std::move(c));
}

const TensorInfo* ModelFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

std::span<const uint8_t> ModelFile::Data(const TensorInfo& info) const {
  // Parsed ranges are inside bytes_; a data-less file (or a foreign TensorInfo) gives nothing.
  if (info.offset > bytes_.size() || info.nbytes > bytes_.size() - info.offset) return {};
  return bytes_.subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.nbytes));
}

uint64_t ModelFile::total_tensor_bytes() const {
  uint64_t total = 0;
  for (const auto& t : tensors_) total += t.nbytes;
  return total;
}

}  // namespace fleet::formats
