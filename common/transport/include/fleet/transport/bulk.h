// The bulk transport interface: how a message's tensor bytes travel to a peer.
//
// A sender describes each tensor's bytes as an OutPayload and asks a BulkTransport to Stage
// them for one message; the transport returns where each one will be (a PayloadRef that goes
// into the tensor's descriptor in the header) and may append data frames. Two implementations:
//
//  * frames (ZeroMQ, any host): each payload becomes a zero-copy data frame after the header.
//  * shm (same host, negotiated in Hello): the receiver reserves room in its pre-faulted
//    staging arena (Reserver: one small round trip), the sender copies each payload straight
//    into the receiver's arena (one memcpy, no page faults), and the header carries offsets.
//
// The receiving side resolves PayloadRefs: FramePayload() for frames, ShmReceiver::Claim() for
// its own reservations (verifying that the sender only names ranges it was granted).
//
// Thread safety: a BulkTransport is used by one thread at a time; ShmReceiver is thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>
#include <vector>

#include "fleet/protocol/protocol.h"
#include "fleet/status/status.h"
#include "fleet/transport/shm_arena.h"
#include "fleet/transport/zmq_util.h"

namespace fleet::transport {

/// Bytes to send; `keepalive` owns them until the transport is done.
struct OutPayload {
  const void* data = nullptr;
  uint64_t size = 0;
  std::shared_ptr<const void> keepalive;
};

/// Where a payload is, as written into a TensorDesc.
struct PayloadRef {
  wire::PayloadKind kind = wire::PayloadKind::None;
  uint32_t frame = 0;        // Frame: 1-based index among the data frames
  uint64_t offset = 0;       // ShmReserved / ShmDonor: offset in the arena
  uint64_t reservation = 0;  // ShmReserved
};

/// Room granted in a receiver's staging arena, one offset per requested size.
struct Reservation {
  uint64_t id = 0;
  std::vector<uint64_t> offsets;
};
/// Asks the receiver for a Reservation of `sizes` (a ReserveRequest round trip).
using Reserver = std::function<StatusOr<Reservation>(std::span<const uint64_t> sizes)>;

class BulkTransport {
 public:
  virtual ~BulkTransport() = default;
  /// "frames" or "shm".
  virtual std::string_view name() const = 0;
  /// Places `payloads` for one message, appending data frames to `data_frames` as needed.
  /// \return one PayloadRef per payload (kind None for empty payloads).
  virtual StatusOr<std::vector<PayloadRef>> Stage(std::span<const OutPayload> payloads,
                                                  Frames& data_frames) = 0;
};

/// ZeroMQ data frames (zero-copy on the sending side).
std::unique_ptr<BulkTransport> MakeFrameTransport();
/// Copies into the peer's staging arena (`peer_arena` mapped writable), reserving through
/// `reserve`. Stage fails with ResourceExhausted when the peer has no room (callers then fall
/// back to frames).
/// Payloads of 8 MiB and more are copied by up to `copy_threads` threads.
std::unique_ptr<BulkTransport> MakeShmTransport(std::shared_ptr<ShmMapping> peer_arena,
                                                Reserver reserve, int copy_threads = 2);

/// The bytes of a Frame payload. REQUIRES: protocol::CheckTensorDesc passed for `desc`
/// (so the frame index is valid); checks that the frame holds exactly desc.nbytes().
StatusOr<std::span<const uint8_t>> FramePayload(const wire::TensorDesc& desc,
                                                const Frames& data_frames);

/// The receiving side of the shm channel: grants reservations in the staging range of this
/// process's arena and hands reserved blocks to the message that fills them.
class ShmReceiver {
 public:
  /// \param expiry reservations not claimed within this time are freed (a sender that died).
  ShmReceiver(std::shared_ptr<ShmArena> arena, std::chrono::milliseconds expiry);

  /// Allocates one block per size; ResourceExhausted (nothing kept) when they do not fit.
  StatusOr<Reservation> Reserve(std::span<const uint64_t> sizes);
  /// Takes the block at `offset` of reservation `id`; its size must fit `nbytes`. Any other
  /// range (not granted, already claimed, another reservation) is OutOfRange.
  StatusOr<std::unique_ptr<ArenaBlock>> Claim(uint64_t id, uint64_t offset, uint64_t nbytes);
  /// Frees what is left of reservation `id` (after a message's tensors were claimed).
  void Finish(uint64_t id);
  /// Reservations not yet finished.
  size_t pending() const;

  ShmArena& arena() const { return *arena_; }

 private:
  struct Pending {
    std::chrono::steady_clock::time_point created;
    std::map<uint64_t, std::unique_ptr<ArenaBlock>> blocks;  // offset -> block
  };
  void ExpireLocked();

  const std::shared_ptr<ShmArena> arena_;
  const std::chrono::milliseconds expiry_;
  mutable std::mutex mu_;
  uint64_t next_id_ = 1;                 // GUARDED_BY(mu_)
  std::map<uint64_t, Pending> pending_;  // GUARDED_BY(mu_)
};

}  // namespace fleet::transport
