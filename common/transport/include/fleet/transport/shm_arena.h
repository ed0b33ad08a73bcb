// Shared-memory arenas: the same-host bulk channel's memory.
//
// A worker owns one ShmArena: a file in /dev/shm mapped read-write, split into a *staging*
// range (pre-faulted at creation; peers copy incoming tensors into reservations there) and a
// *weights* range (pages are faulted by the loads that write them: pre-faulting a large
// capacity costs ~16 s per 4 GB on our VMs). Allocation is first-fit with coalescing and
// returns RAII ArenaBlocks. A peer maps another process's arena with ShmMapping (pre-populated
// page tables, so a copy into or out of it runs at memcpy speed).
//
// The owner unlinks the file in its destructor; a crash leaves it behind and the next worker
// with the same name replaces it.
//
// Thread safety: ShmArena and ShmMapping are safe for concurrent use; ArenaBlock is a value
// owned by one thread at a time (its destructor frees the range under the arena's lock).
#pragma once

#include <cstddef>
#include <cstdint>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "fleet/status/status.h"

namespace fleet::transport {

class ShmArena;

/// Which range of an arena a block comes from.
enum class ArenaRange { kStaging, kWeights };

/// A range of an arena; freed when destroyed. Holds the arena alive.
class ArenaBlock {
 public:
  ArenaBlock(std::shared_ptr<ShmArena> arena, ArenaRange range, uint64_t offset, uint64_t size);
  ~ArenaBlock();
  ArenaBlock(const ArenaBlock&) = delete;
  ArenaBlock& operator=(const ArenaBlock&) = delete;

  uint8_t* data() const;
  uint64_t offset() const { return offset_; }
  uint64_t size() const { return size_; }
  const std::string& arena_name() const;

 private:
  std::shared_ptr<ShmArena> arena_;
  ArenaRange range_;
  uint64_t offset_;
  uint64_t size_;
};

class ShmArena : public std::enable_shared_from_this<ShmArena> {
 public:
  /// Creates /dev/shm/<name> of staging_bytes + weights_bytes, maps it and pre-faults the
  /// staging range. An existing file of that name (left by a crash) is replaced.
  /// \param name a file name without '/', e.g. "fleet-worker-cuda1-1234".
  static StatusOr<std::shared_ptr<ShmArena>> Create(const std::string& name, uint64_t staging_bytes,
                                                    uint64_t weights_bytes);
  ~ShmArena();
  ShmArena(const ShmArena&) = delete;
  ShmArena& operator=(const ShmArena&) = delete;

  /// Unlinks the arenas /dev/shm/<prefix>* of processes that died without cleaning up (a
  /// SIGKILLed worker): those whose owner no longer holds its lock. Files younger than
  /// `min_age` are left alone (their creator may not have locked them yet). Returns their names.
  static std::vector<std::string> RemoveStale(const std::string& prefix,
                                              std::chrono::seconds min_age = std::chrono::seconds(10));

  /// Allocates `size` bytes (64-byte aligned) from `range`; ResourceExhausted with the numbers
  /// when no free range is large enough.
  StatusOr<std::unique_ptr<ArenaBlock>> Allocate(ArenaRange range, uint64_t size);

  const std::string& name() const { return name_; }
  uint8_t* base() const { return base_; }
  uint64_t size() const { return staging_bytes_ + weights_bytes_; }
  uint64_t staging_bytes() const { return staging_bytes_; }
  uint64_t weights_bytes() const { return weights_bytes_; }
  /// Bytes currently allocated in both ranges.
  uint64_t used_bytes() const;
  /// True when [offset, offset+size) lies inside the arena.
  bool Contains(const void* p, uint64_t size) const;

  ShmArena(std::string name, int fd, uint8_t* base, uint64_t staging, uint64_t weights);

 private:
  friend class ArenaBlock;
  void Free(ArenaRange range, uint64_t offset, uint64_t size);

  struct FreeList {
    uint64_t begin = 0, end = 0;
    std::map<uint64_t, uint64_t> free;  // offset -> size, coalesced
    uint64_t used = 0;
  };
  FreeList& List(ArenaRange range) { return range == ArenaRange::kStaging ? staging_ : weights_; }

  const std::string name_;
  const int fd_;
  uint8_t* const base_;
  const uint64_t staging_bytes_;
  const uint64_t weights_bytes_;
  mutable std::mutex mu_;
  FreeList staging_;  // GUARDED_BY(mu_)
  FreeList weights_;  // GUARDED_BY(mu_)
};

/// Another process's arena mapped into this one (read-write for staging copies, or read-only).
class ShmMapping {
 public:
  /// Maps /dev/shm/<name>; `writable` for copying into a peer's reservations.
  static StatusOr<std::shared_ptr<ShmMapping>> Open(const std::string& name, bool writable);
  ~ShmMapping();
  ShmMapping(const ShmMapping&) = delete;
  ShmMapping& operator=(const ShmMapping&) = delete;

  uint8_t* base() const { return base_; }
  uint64_t size() const { return size_; }
  const std::string& name() const { return name_; }
  /// Returns base()+offset, or OutOfRange when [offset, offset+bytes) is outside the mapping.
  StatusOr<uint8_t*> At(uint64_t offset, uint64_t bytes) const;

  ShmMapping(std::string name, uint8_t* base, uint64_t size);

 private:
  std::string name_;
  uint8_t* base_;
  uint64_t size_;
};

}  // namespace fleet::transport
