// Host allocator tuning for processes that compute with libtorch on the CPU.
//
// glibc returns large freed blocks to the OS (mmap threshold, heap trimming), so a forward
// pass that frees and re-allocates its activations pays a fresh page fault for every 4 KiB
// page each time; on the VMs we run on that is ~10 us per page. Raising the mmap and trim
// thresholds keeps freed activation buffers in the heap, pre-faulted, for the next block.
// docs/models.md has the measured effect.
//
// Thread safety: call once at process start, before other threads allocate.
#pragma once

#include <cstddef>

namespace fleet::models {

/// Keeps freed buffers of up to `max_reuse_bytes` in the process heap instead of unmapping
/// them (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD). Idempotent. Returns false when the C
/// library refused a setting (the process still works, only slower).
bool TuneHostAllocator(size_t max_reuse_bytes = size_t{1} << 30);

}  // namespace fleet::models
