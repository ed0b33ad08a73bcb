#include "fleet/transport/bulk.h"

#include <algorithm>
#include <cstring>
#include <thread>

#include "fleet/log/log.h"

namespace fleet::transport {
namespace {

class FrameTransport final : public BulkTransport {
 public:
  std::string_view name() const override { return "frames"; }
  StatusOr<std::vector<PayloadRef>> Stage(std::span<const OutPayload> payloads,
                                          Frames& data_frames) override {
    std::vector<PayloadRef> refs(payloads.size());
    for (size_t i = 0; i < payloads.size(); ++i) {
      if (payloads[i].size == 0) continue;
      data_frames.push_back(
          ZeroCopyMessage(payloads[i].data, payloads[i].size, payloads[i].keepalive));
      refs[i].kind = wire::PayloadKind::Frame;
      refs[i].frame = static_cast<uint32_t>(data_frames.size());
    }
    return refs;
  }
};

// Copies with up to `threads` threads: one thread cannot saturate memory bandwidth (its copy
// is latency-bound at ~10-17 GB/s here), two get closer to it.
void ParallelCopy(uint8_t* dst, const uint8_t* src, uint64_t size, int threads) {
  constexpr uint64_t kMinPerThread = 4ull << 20;
  const int n =
      static_cast<int>(std::clamp<uint64_t>(size / kMinPerThread, 1, std::max(threads, 1)));
  if (n == 1) {
    std::memcpy(dst, src, size);
    return;
  }
  const uint64_t chunk = (size / n + 4095) / 4096 * 4096;
  std::vector<std::thread> helpers;
  for (int i = 1; i < n; ++i) {
    const uint64_t begin = chunk * i;
    if (begin >= size) break;
    const uint64_t len = std::min(chunk, size - begin);
    helpers.emplace_back([=] { std::memcpy(dst + begin, src + begin, len); });
  }
  std::memcpy(dst, src, std::min(chunk, size));
  for (auto& t : helpers) t.join();
}

class ShmTransport final : public BulkTransport {
 public:
  ShmTransport(std::shared_ptr<ShmMapping> peer, Reserver reserve, int copy_threads)
      : peer_(std::move(peer)), reserve_(std::move(reserve)), copy_threads_(copy_threads) {}
  std::string_view name() const override { return "shm"; }
  StatusOr<std::vector<PayloadRef>> Stage(std::span<const OutPayload> payloads,
                                          Frames& /*data_frames*/) override {
    std::vector<uint64_t> sizes;
    std::vector<size_t> which;
    for (size_t i = 0; i < payloads.size(); ++i) {
      if (payloads[i].size == 0) continue;
      sizes.push_back(payloads[i].size);
      which.push_back(i);
    }
    std::vector<PayloadRef> refs(payloads.size());
    if (sizes.empty()) return refs;
    const auto t0 = std::chrono::steady_clock::now();
    FLEET_ASSIGN_OR_RETURN(Reservation grant, reserve_(sizes));
    const auto t1 = std::chrono::steady_clock::now();
    if (grant.offsets.size() != sizes.size()) {
      return InternalError("peer granted " + std::to_string(grant.offsets.size()) + " ranges for " +
                           std::to_string(sizes.size()) + " tensors");
    }
    for (size_t k = 0; k < which.size(); ++k) {
      const OutPayload& p = payloads[which[k]];
      FLEET_ASSIGN_OR_RETURN(uint8_t * dst, peer_->At(grant.offsets[k], p.size));
      ParallelCopy(dst, static_cast<const uint8_t*>(p.data), p.size, copy_threads_);
      PayloadRef& ref = refs[which[k]];
      ref.kind = wire::PayloadKind::ShmReserved;
      ref.offset = grant.offsets[k];
      ref.reservation = grant.id;
    }
    FLEET_VLOG(1, "transport")
        << "shm stage: reserve " << std::chrono::duration<double, std::micro>(t1 - t0).count()
        << " us, copy "
        << std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t1).count()
        << " us";
    return refs;
  }

 private:
  std::shared_ptr<ShmMapping> peer_;
  Reserver reserve_;
  int copy_threads_;
};

}  // namespace

std::unique_ptr<BulkTransport> MakeFrameTransport() { return std::make_unique<FrameTransport>(); }

std::unique_ptr<BulkTransport> MakeShmTransport(std::shared_ptr<ShmMapping> peer_arena,
                                                Reserver reserve, int copy_threads) {
  return std::make_unique<ShmTransport>(std::move(peer_arena), std::move(reserve), copy_threads);
}

StatusOr<std::span<const uint8_t>> FramePayload(const wire::TensorDesc& desc,
                                                const Frames& data_frames) {
  const std::string name = desc.name() ? desc.name()->str() : "?";
  if (desc.frame() == 0 || desc.frame() > data_frames.size()) {
    return InvalidArgumentError("tensor '" + name + "' names data frame " +
                                std::to_string(desc.frame()) + " of " +
                                std::to_string(data_frames.size()));
  }
  const zmq::message_t& m = data_frames[desc.frame() - 1];
  if (m.size() != desc.nbytes()) {
    return InvalidArgumentError(
        "tensor '" + name + "': data frame " + std::to_string(desc.frame()) + " holds " +
        std::to_string(m.size()) + " bytes, the descriptor says " + std::to_string(desc.nbytes()));
  }
  return FrameBytes(m);
}

ShmReceiver::ShmReceiver(std::shared_ptr<ShmArena> arena, std::chrono::milliseconds expiry)
    : arena_(std::move(arena)), expiry_(expiry) {}

void ShmReceiver::ExpireLocked() {
  const auto now = std::chrono::steady_clock::now();
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (now - it->second.created > expiry_) {
      FLEET_LOG(WARNING, "transport") << "shm reservation " << it->first << " expired unclaimed ("
                                      << it->second.blocks.size() << " ranges freed)";
      it = pending_.erase(it);
    } else {
      ++it;
    }
  }
}

StatusOr<Reservation> ShmReceiver::Reserve(std::span<const uint64_t> sizes) {
  std::lock_guard<std::mutex> lock(mu_);
  ExpireLocked();
  Pending pending;
  pending.created = std::chrono::steady_clock::now();
  Reservation grant;
  for (uint64_t size : sizes) {
    FLEET_ASSIGN_OR_RETURN(auto block, arena_->Allocate(ArenaRange::kStaging, size));
    grant.offsets.push_back(block->offset());
    pending.blocks[block->offset()] = std::move(block);
  }
  grant.id = next_id_++;
  pending_[grant.id] = std::move(pending);
  return grant;
}

StatusOr<std::unique_ptr<ArenaBlock>> ShmReceiver::Claim(uint64_t id, uint64_t offset,
                                                         uint64_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = pending_.find(id);
  if (it == pending_.end()) {
    return OutOfRangeError("shm reservation " + std::to_string(id) +
                           " does not exist (never granted, expired or already used)");
  }
  auto b = it->second.blocks.find(offset);
  if (b == it->second.blocks.end() || b->second->size() < nbytes) {
    return OutOfRangeError("shm range [" + std::to_string(offset) + ", +" + std::to_string(nbytes) +
                           ") was not granted by reservation " + std::to_string(id));
  }
  auto block = std::move(b->second);
  it->second.blocks.erase(b);
  return block;
}

void ShmReceiver::Finish(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  pending_.erase(id);
}

size_t ShmReceiver::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_.size();
}

}  // namespace fleet::transport
