// ZeroMQ plumbing shared by every fleet socket: the process context, socket options (message
// size limit, CURVE), bind/connect with endpoint read-back, and multipart send/receive that
// report failures as Status instead of zmq::error_t.
//
// Thread safety: Context() is safe from any thread; a zmq::socket_t belongs to one thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <flatbuffers/flatbuffers.h>
#include <zmq.hpp>

#include "fleet/status/status.h"

namespace fleet::transport {

/// One message: frame 0 is the FlatBuffer header, the rest carry tensor bytes.
using Frames = std::vector<zmq::message_t>;

/// The process-wide ZeroMQ context (2 I/O threads). Never destroyed: sockets owned by static
/// objects may outlive main.
zmq::context_t& Context();

/// CURVE keys as Z85 text (40 characters each). Empty secret_key = CURVE off.
struct CurveConfig {
  std::string secret_key;  // this process's secret key
  std::string public_key;  // derived from secret_key
  std::string server_key;  // public key of the servers this process connects to
  bool enabled() const { return !secret_key.empty(); }
};

/// The receive high-water mark of server sockets, in messages per connection: a client has one
/// request in flight (a Cancel, a progress poll beside it), so a peer that queues more is pushed
/// back by TCP instead of filling the server's memory (0 would be unlimited).
inline constexpr int kRouterRcvHwm = 16;

struct SocketOptions {
  /// ZMQ_MAXMSGSIZE: a peer sending a larger frame is disconnected. 0 = no limit.
  uint64_t max_message_bytes = 0;
  /// CURVE keys; null or disabled = plain.
  const CurveConfig* curve = nullptr;
  /// True for sockets that accept connections (CURVE server side).
  bool server = false;
  /// High-water marks in messages (0 = unlimited).
  int sndhwm = 0;
  int rcvhwm = 0;
};

/// Applies `options` to `socket` (before bind/connect).
Status ConfigureSocket(zmq::socket_t& socket, const SocketOptions& options);

/// Binds and returns the concrete endpoint ("tcp://127.0.0.1:*" -> "tcp://127.0.0.1:41234").
StatusOr<std::string> Bind(zmq::socket_t& socket, const std::string& endpoint);
Status Connect(zmq::socket_t& socket, const std::string& endpoint);

/// Sends all frames as one multipart message (frames are moved out).
Status SendFrames(zmq::socket_t& socket, Frames& frames);
/// Receives one multipart message; DeadlineExceeded after `timeout` (negative = wait forever).
StatusOr<Frames> RecvFrames(zmq::socket_t& socket, std::chrono::milliseconds timeout);
/// RecvFrames keeping at most `max_frames` frames: the parts past them are received and dropped
/// one at a time (a peer cannot make a server hold millions of frames), and `*dropped` says so.
StatusOr<Frames> RecvFrames(zmq::socket_t& socket, std::chrono::milliseconds timeout,
                            size_t max_frames, bool* dropped);

/// A frame that owns a finished FlatBuffer without copying it.
zmq::message_t MessageFromBuffer(flatbuffers::DetachedBuffer buffer);
/// A frame pointing at `data` (no copy); `keepalive` is released when ZeroMQ is done with it.
zmq::message_t ZeroCopyMessage(const void* data, size_t size,
                               std::shared_ptr<const void> keepalive);

/// The bytes of a frame.
inline std::span<const uint8_t> FrameBytes(const zmq::message_t& m) {
  return {static_cast<const uint8_t*>(m.data()), m.size()};
}

/// Makes `m`'s bytes 8-byte aligned (a copy when they are not) so that a FlatBuffer in it can be
/// verified and read in place: received frames may point anywhere into ZeroMQ's input buffer.
inline void AlignFrame(zmq::message_t& m) {
  if (reinterpret_cast<uintptr_t>(m.data()) % 8 != 0) m = zmq::message_t(m.data(), m.size());
}

}  // namespace fleet::transport
