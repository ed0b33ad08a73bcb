#include "fleet/models/host_allocator.h"

#include <malloc.h>

#include <algorithm>
#include <climits>

namespace fleet::models {

bool TuneHostAllocator(size_t max_reuse_bytes) {
  // glibc caps M_MMAP_THRESHOLD at HEAP_MAX/2 (32 MiB on 64-bit) and rejects larger values, so
  // allocations above the cap are still mmapped; mallopt(M_MMAP_MAX, 0) stops mmap for malloc
  // altogether so every block comes from the (reused, pre-faulted) heap.
  const int trim = static_cast<int>(std::min<size_t>(max_reuse_bytes, INT_MAX));
  bool ok = mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1;
  ok = (mallopt(M_MMAP_MAX, 0) == 1) && ok;
  ok = (mallopt(M_TRIM_THRESHOLD, trim) == 1) && ok;
  ok = (mallopt(M_TOP_PAD, 64 << 20) == 1) && ok;
  return ok;
}

}  // namespace fleet::models
