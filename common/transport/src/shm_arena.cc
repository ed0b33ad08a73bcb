#include "fleet/transport/shm_arena.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "fleet/log/log.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace fleet::transport {
namespace {

constexpr uint64_t kAlign = 64;
constexpr uint64_t kPage = 4096;

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

Status CheckName(const std::string& name) {
  if (name.empty() || name.size() > 200 || name.find('/') != std::string::npos || name == "." ||
      name == "..") {
    return InvalidArgumentError("shm arena name '" + name +
                                "' must be a non-empty file name without '/'");
  }
  return Status::OK();
}

// Writes every page of [p, p+size) so later copies do not fault (~10 us per fresh page here).
void Prefault(uint8_t* p, uint64_t size) {
  if (size == 0) return;
  if (madvise(p, size, MADV_POPULATE_WRITE) == 0) return;
  for (uint64_t off = 0; off < size; off += kPage) p[off] = 0;
}

}  // namespace

ArenaBlock::ArenaBlock(std::shared_ptr<ShmArena> arena, ArenaRange range, uint64_t offset,
                       uint64_t size)
    : arena_(std::move(arena)), range_(range), offset_(offset), size_(size) {}

ArenaBlock::~ArenaBlock() { arena_->Free(range_, offset_, size_); }

uint8_t* ArenaBlock::data() const { return arena_->base() + offset_; }

const std::string& ArenaBlock::arena_name() const { return arena_->name(); }

ShmArena::ShmArena(std::string name, int fd, uint8_t* base, uint64_t staging, uint64_t weights)
    : name_(std::move(name)),
      fd_(fd),
      base_(base),
      staging_bytes_(staging),
      weights_bytes_(weights) {
  staging_.begin = 0;
  staging_.end = staging;
  if (staging > 0) staging_.free[0] = staging;
  weights_.begin = staging;
  weights_.end = staging + weights;
  if (weights > 0) weights_.free[staging] = weights;
}

StatusOr<std::shared_ptr<ShmArena>> ShmArena::Create(const std::string& name,
                                                     uint64_t staging_bytes,
                                                     uint64_t weights_bytes) {
  FLEET_RETURN_IF_ERROR(CheckName(name));
  staging_bytes = AlignUp(staging_bytes, kPage);
  weights_bytes = AlignUp(weights_bytes, kPage);
  const uint64_t total = staging_bytes + weights_bytes;
  if (total == 0) return InvalidArgumentError("shm arena '" + name + "' of 0 bytes");
  shm_unlink(("/" + name).c_str());  // a leftover of a crashed worker with the same name
  const int fd = shm_open(("/" + name).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return UnavailableError(Errno("shm_open /dev/shm/" + name));
  // Held while the arena lives (the kernel drops it when the process dies, however it dies):
  // RemoveStale tells a leftover from a live arena by whether it can take this lock.
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    Status s = UnavailableError(Errno("flock /dev/shm/" + name));
    close(fd);
    shm_unlink(("/" + name).c_str());
    return s;
  }
  if (ftruncate(fd, static_cast<off_t>(total)) != 0) {
    Status s = ResourceExhaustedError(
        Errno("ftruncate /dev/shm/" + name + " to " + std::to_string(total) + " bytes"));
    close(fd);
    shm_unlink(("/" + name).c_str());
    return s;
  }
  // Reserve tmpfs pages for the staging range now, so a full /dev/shm fails here and not with
  // SIGBUS during a copy.
  if (staging_bytes > 0 && posix_fallocate(fd, 0, static_cast<off_t>(staging_bytes)) != 0) {
    close(fd);
    shm_unlink(("/" + name).c_str());
    return ResourceExhaustedError("/dev/shm has no room for a staging area of " +
                                  std::to_string(staging_bytes) + " bytes");
  }
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    Status s = ResourceExhaustedError(Errno("mmap /dev/shm/" + name));
    close(fd);
    shm_unlink(("/" + name).c_str());
    return s;
  }
  auto* base = static_cast<uint8_t*>(p);
  Prefault(base, staging_bytes);
  return std::make_shared<ShmArena>(name, fd, base, staging_bytes, weights_bytes);
}

std::vector<std::string> ShmArena::RemoveStale(const std::string& prefix,
                                               std::chrono::seconds min_age) {
  std::vector<std::string> removed;
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return removed;
  const time_t now = time(nullptr);
  while (dirent* e = readdir(dir)) {
    const std::string name = e->d_name;
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    const int fd = shm_open(("/" + name).c_str(), O_RDONLY, 0);
    if (fd < 0) continue;
    struct stat st {};
    // A file seconds old may be an arena whose creator has not taken its lock yet.
    const bool old = fstat(fd, &st) == 0 && now - st.st_ctime >= min_age.count();
    if (old && flock(fd, LOCK_EX | LOCK_NB) == 0) {
      shm_unlink(("/" + name).c_str());
      FLEET_LOG(WARNING, "shm") << "removed /dev/shm/" << name << " (" << st.st_blocks * 512
                                << " bytes in use), left by a process that died without "
                                   "cleaning up";
      removed.push_back(name);
    }
    close(fd);
  }
  closedir(dir);
  return removed;
}

ShmArena::~ShmArena() {
  munmap(base_, size());
  close(fd_);
  shm_unlink(("/" + name_).c_str());
}

StatusOr<std::unique_ptr<ArenaBlock>> ShmArena::Allocate(ArenaRange range, uint64_t size) {
  const uint64_t want = AlignUp(std::max<uint64_t>(size, 1), kAlign);
  uint64_t offset = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    FreeList& list = List(range);
    auto it = list.free.begin();
    while (it != list.free.end() && it->second < want) ++it;
    if (it == list.free.end()) {
      uint64_t largest = 0;
      for (const auto& [off, sz] : list.free) largest = std::max(largest, sz);
      return ResourceExhaustedError(
          "shm arena '" + name_ + "' " + (range == ArenaRange::kStaging ? "staging" : "weights") +
          " range cannot fit " + std::to_string(size) + " bytes: " + std::to_string(list.used) +
          " of " + std::to_string(list.end - list.begin) + " used, largest free range " +
          std::to_string(largest));
    }
    offset = it->first;
    const uint64_t rest = it->second - want;
    list.free.erase(it);
    if (rest > 0) list.free[offset + want] = rest;
    list.used += want;
  }
  auto block = std::make_unique<ArenaBlock>(shared_from_this(), range, offset, want);
  // Weights pages are allocated now (outside the lock), so a full /dev/shm fails here rather
  // than with SIGBUS when the load writes them.
  if (range == ArenaRange::kWeights &&
      fallocate(fd_, 0, static_cast<off_t>(offset), static_cast<off_t>(want)) != 0) {
    return ResourceExhaustedError(Errno("/dev/shm cannot hold " + std::to_string(want) +
                                        " more bytes for arena '" + name_ + "'"));
  }
  return block;
}

void ShmArena::Free(ArenaRange range, uint64_t offset, uint64_t size) {
  if (range == ArenaRange::kWeights) {
    // Evicted weights give their memory back to the system (the staging range stays faulted).
    fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
              static_cast<off_t>(size));
  }
  std::lock_guard<std::mutex> lock(mu_);
  FreeList& list = List(range);
  list.used -= size;
  auto next = list.free.lower_bound(offset);
  if (next != list.free.end() && offset + size == next->first) {
    size += next->second;
    next = list.free.erase(next);
  }
  if (next != list.free.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      prev->second += size;
      return;
    }
  }
  list.free[offset] = size;
}

uint64_t ShmArena::used_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return staging_.used + weights_.used;
}

bool ShmArena::Contains(const void* p, uint64_t size) const {
  const auto* b = static_cast<const uint8_t*>(p);
  return b >= base_ && size <= this->size() &&
         static_cast<uint64_t>(b - base_) <= this->size() - size;
}

ShmMapping::ShmMapping(std::string name, uint8_t* base, uint64_t size)
    : name_(std::move(name)), base_(base), size_(size) {}

ShmMapping::~ShmMapping() { munmap(base_, size_); }

StatusOr<std::shared_ptr<ShmMapping>> ShmMapping::Open(const std::string& name, bool writable) {
  FLEET_RETURN_IF_ERROR(CheckName(name));
  const int fd = shm_open(("/" + name).c_str(), writable ? O_RDWR : O_RDONLY, 0);
  if (fd < 0) return UnavailableError(Errno("shm_open /dev/shm/" + name));
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size <= 0) {
    close(fd);
    return UnavailableError("peer arena /dev/shm/" + name + " is empty or unreadable");
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  // No MAP_POPULATE: on a shared tmpfs mapping it allocates every page of the file, and an
  // arena's weights range is as large as the worker's capacity. Pages are mapped as they are
  // first touched (minor faults: the owner allocated them); populating the range before each
  // copy measured slower than those faults (bench/transfer).
  void* p = mmap(nullptr, size, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return UnavailableError(Errno("mmap /dev/shm/" + name));
  return std::make_shared<ShmMapping>(name, static_cast<uint8_t*>(p), size);
}

StatusOr<uint8_t*> ShmMapping::At(uint64_t offset, uint64_t bytes) const {
  if (offset > size_ || bytes > size_ - offset) {
    return OutOfRangeError("range [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
                           ") is outside peer arena '" + name_ + "' of " + std::to_string(size_) +
                           " bytes");
  }
  return base_ + offset;
}

}  // namespace fleet::transport
