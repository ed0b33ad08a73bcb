#include "fleet/transport/zmq_util.h"

#include <limits>

#include <cstring>

namespace fleet::transport {
namespace {

Status ZmqError(const std::string& what, const zmq::error_t& e) {
  return UnavailableError(what + ": " + e.what());
}

}  // namespace

zmq::context_t& Context() {
  static auto* context = new zmq::context_t(2);
  return *context;
}

Status ConfigureSocket(zmq::socket_t& socket, const SocketOptions& options) {
  try {
    socket.set(zmq::sockopt::linger, 0);
    if (options.max_message_bytes > 0) {
      socket.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(options.max_message_bytes));
    }
    socket.set(zmq::sockopt::sndhwm, options.sndhwm);
    socket.set(zmq::sockopt::rcvhwm, options.rcvhwm);
    if (options.curve != nullptr && options.curve->enabled()) {
      const CurveConfig& c = *options.curve;
      if (options.server) {
        socket.set(zmq::sockopt::curve_server, true);
        socket.set(zmq::sockopt::curve_secretkey, c.secret_key);
      } else {
        if (c.server_key.empty()) {
          return InvalidArgumentError(
              "CURVE is on but no server public key is configured "
              "(--curve-server-key-file)");
        }
        socket.set(zmq::sockopt::curve_serverkey, c.server_key);
        socket.set(zmq::sockopt::curve_publickey, c.public_key);
        socket.set(zmq::sockopt::curve_secretkey, c.secret_key);
      }
    }
  } catch (const zmq::error_t& e) {
    return InvalidArgumentError(std::string("setting socket options: ") + e.what());
  }
  return Status::OK();
}

StatusOr<std::string> Bind(zmq::socket_t& socket, const std::string& endpoint) {
  try {
    socket.bind(endpoint);
    return socket.get(zmq::sockopt::last_endpoint);
  } catch (const zmq::error_t& e) {
    return UnavailableError("cannot bind '" + endpoint + "': " + e.what());
  }
}

Status Connect(zmq::socket_t& socket, const std::string& endpoint) {
  try {
    socket.connect(endpoint);
  } catch (const zmq::error_t& e) {
    return InvalidArgumentError("cannot connect to '" + endpoint + "': " + e.what());
  }
  return Status::OK();
}

Status SendFrames(zmq::socket_t& socket, Frames& frames) {
  try {
    for (size_t i = 0; i < frames.size(); ++i) {
      const auto flags = i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::none;
      if (!socket.send(frames[i], flags)) return UnavailableError("send would block");
    }
  } catch (const zmq::error_t& e) {
    return ZmqError("send", e);
  }
  return Status::OK();
}

StatusOr<Frames> RecvFrames(zmq::socket_t& socket, std::chrono::milliseconds timeout) {
  bool dropped = false;
  return RecvFrames(socket, timeout, std::numeric_limits<size_t>::max(), &dropped);
}

StatusOr<Frames> RecvFrames(zmq::socket_t& socket, std::chrono::milliseconds timeout,
                            size_t max_frames, bool* dropped) {
  *dropped = false;
  try {
    if (timeout.count() >= 0) {
      zmq::pollitem_t item{socket.handle(), 0, ZMQ_POLLIN, 0};
      if (zmq::poll(&item, 1, timeout) == 0) {
        return DeadlineExceededError("no reply within " + std::to_string(timeout.count()) + " ms");
      }
    }
    Frames frames;
    bool more = true;
    while (more) {
      zmq::message_t m;
      if (!socket.recv(m, zmq::recv_flags::none)) return UnavailableError("receive interrupted");
      more = m.more();
      if (frames.size() < max_frames) {
        frames.push_back(std::move(m));
      } else {
        *dropped = true;  // `m` goes now
      }
    }
    return frames;
  } catch (const zmq::error_t& e) {
    return ZmqError("receive", e);
  }
}

zmq::message_t MessageFromBuffer(flatbuffers::DetachedBuffer buffer) {
  auto* owned = new flatbuffers::DetachedBuffer(std::move(buffer));
  return zmq::message_t(
      owned->data(), owned->size(),
      [](void*, void* hint) { delete static_cast<flatbuffers::DetachedBuffer*>(hint); }, owned);
}

zmq::message_t ZeroCopyMessage(const void* data, size_t size,
                               std::shared_ptr<const void> keepalive) {
  if (size == 0) return zmq::message_t();
  auto* hold = new std::shared_ptr<const void>(std::move(keepalive));
  return zmq::message_t(
      const_cast<void*>(data), size,
      [](void*, void* hint) { delete static_cast<std::shared_ptr<const void>*>(hint); }, hold);
}

}  // namespace fleet::transport
