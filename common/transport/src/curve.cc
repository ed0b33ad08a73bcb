#include "fleet/transport/curve.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "fleet/log/log.h"
#include "fleet/config/text.h"

namespace fleet::transport {
namespace {

Status CheckKey(const std::string& key, const std::string& where) {
  if (key.size() != 40) {
    return InvalidArgumentError(where + ": a CURVE key is 40 Z85 characters, this one has " +
                                std::to_string(key.size()));
  }
  std::array<uint8_t, 32> raw{};
  if (zmq_z85_decode(raw.data(), key.c_str()) == nullptr) {
    return InvalidArgumentError(where + ": not valid Z85 text");
  }
  return Status::OK();
}

}  // namespace

StatusOr<std::set<std::string>> ReadKeyListFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFoundError("cannot read key file '" + path + "': " + std::strerror(errno));
  std::set<std::string> keys;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    line = std::string(config::TrimSpace(line));
    if (line.empty() || line[0] == '#') continue;
    FLEET_RETURN_IF_ERROR(CheckKey(line, path + ":" + std::to_string(n)));
    keys.insert(line);
  }
  if (keys.empty()) return InvalidArgumentError("key file '" + path + "' holds no key");
  return keys;
}

StatusOr<std::string> ReadKeyFile(const std::string& path) {
  FLEET_ASSIGN_OR_RETURN(auto keys, ReadKeyListFile(path));
  if (keys.size() != 1) {
    return InvalidArgumentError("key file '" + path + "' holds " + std::to_string(keys.size()) +
                                " keys, expected one");
  }
  return *keys.begin();
}

StatusOr<CurveConfig> LoadCurveConfig(const std::string& secret_key_file,
                                      const std::string& server_key_file) {
  CurveConfig config;
  if (secret_key_file.empty()) {
    if (!server_key_file.empty()) {
      return InvalidArgumentError("--curve-server-key-file needs --curve-secret-key-file too");
    }
    return config;
  }
  FLEET_ASSIGN_OR_RETURN(config.secret_key, ReadKeyFile(secret_key_file));
  char pub[41] = {};
  if (zmq_curve_public(pub, config.secret_key.c_str()) != 0) {
    return InvalidArgumentError("'" + secret_key_file + "' is not a CURVE secret key");
  }
  config.public_key = pub;
  if (server_key_file.empty()) {
    config.server_key = config.public_key;
  } else {
    FLEET_ASSIGN_OR_RETURN(config.server_key, ReadKeyFile(server_key_file));
  }
  return config;
}

StatusOr<std::pair<std::string, std::string>> GenerateKeyPair() {
  char pub[41] = {}, sec[41] = {};
  if (zmq_curve_keypair(pub, sec) != 0) {
    return UnimplementedError("this libzmq was built without CURVE (libsodium)");
  }
  return std::make_pair(std::string(pub), std::string(sec));
}

Status WriteKeyFile(const std::string& path, const std::string& key, const std::string& comment) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) return UnavailableError("cannot write '" + path + "': " + std::strerror(errno));
  const std::string text = "# " + comment + "\n" + key + "\n";
  const bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  close(fd);
  if (!ok) return UnavailableError("short write to '" + path + "'");
  return Status::OK();
}

ZapAuthenticator::ZapAuthenticator(std::set<std::string> authorized)
    : authorized_(std::move(authorized)) {}

StatusOr<std::unique_ptr<ZapAuthenticator>> ZapAuthenticator::Start(
    std::set<std::string> authorized) {
  zmq::socket_t socket(Context(), zmq::socket_type::rep);
  socket.set(zmq::sockopt::linger, 0);
  try {
    socket.bind("inproc://zeromq.zap.01");
  } catch (const zmq::error_t& e) {
    return FailedPreconditionError(std::string("cannot start the ZAP handler: ") + e.what());
  }
  auto zap = std::make_unique<ZapAuthenticator>(std::move(authorized));
  zap->thread_ = std::thread(&ZapAuthenticator::Run, zap.get(), std::move(socket));
  return zap;
}

ZapAuthenticator::~ZapAuthenticator() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void ZapAuthenticator::Run(zmq::socket_t socket) {
  while (!stop_) {
    auto frames = RecvFrames(socket, std::chrono::milliseconds(100));
    if (!frames.ok()) continue;
    // ZAP/1.0 request: version, request id, domain, address, identity, mechanism, credentials.
    auto& f = *frames;
    auto text = [&](size_t i) { return i < f.size() ? f[i].to_string() : std::string(); };
    const std::string mechanism = text(5);
    std::string status = "200", reason = "OK", user;
    if (mechanism == "CURVE") {
      char z85[41] = {};
      if (f.size() < 7 || f[6].size() != 32 ||
          zmq_z85_encode(z85, static_cast<const uint8_t*>(f[6].data()), 32) == nullptr) {
        status = "400";
        reason = "malformed CURVE credentials";
      } else if (authorized_.count(z85) == 0) {
        status = "400";
        reason = "public key not authorized";
        ++refused_;
        FLEET_LOG(WARNING, "transport") << "refused CURVE client from " << text(3)
                                        << ": public key " << z85 << " is not authorized";
      } else {
        user = z85;
      }
    }
    Frames reply;
    reply.emplace_back(std::string("1.0"));
    reply.emplace_back(text(1));
    reply.emplace_back(status);
    reply.emplace_back(reason);
    reply.emplace_back(user);
    reply.emplace_back();
    SendFrames(socket, reply).IgnoreError();
  }
}

}  // namespace fleet::transport
