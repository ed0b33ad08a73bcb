// ZeroMQ CURVE for fleet sockets: key files and the ZAP handler that admits only known keys.
//
// Key files hold one Z85 key (40 characters) on a line; blank lines and lines starting with '#'
// are ignored, so `zmq_curve_keypair` output or a comment header both work. A cluster shares one
// server key pair by default: each process's sockets accept clients whose public key is in the
// authorized set (by default just the cluster's own public key) and connect to servers with
// the configured server key. A peer with any other key is refused and logged (ZAP), a peer
// that uses the wrong server key fails the handshake (fleet-worker logs it from a socket monitor).
//
// Thread safety: LoadCurveConfig and GenerateKeyPair are reentrant. A ZapAuthenticator runs one
// thread and must be destroyed before the context terminates (Context() never does).
#pragma once

#include <atomic>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "fleet/status/status.h"
#include "fleet/transport/zmq_util.h"

namespace fleet::transport {

/// Reads one Z85 key from `path`; errors name the file and what is wrong (line, length).
StatusOr<std::string> ReadKeyFile(const std::string& path);
/// Reads every key of `path` (one per line).
StatusOr<std::set<std::string>> ReadKeyListFile(const std::string& path);

/// Builds a CurveConfig from key files. All empty = CURVE off. A secret key without a server
/// key uses the secret's own public key as the server key (one shared cluster key pair).
StatusOr<CurveConfig> LoadCurveConfig(const std::string& secret_key_file,
                                      const std::string& server_key_file);

/// A new key pair as Z85 {public, secret}.
StatusOr<std::pair<std::string, std::string>> GenerateKeyPair();

/// Writes `key` to `path` with mode 0600 and a comment line.
Status WriteKeyFile(const std::string& path, const std::string& key, const std::string& comment);

/// The ZAP handler of Context(): admits CURVE clients whose public key is in `authorized` and
/// refuses (and logs, with the peer address) every other. Other mechanisms pass.
class ZapAuthenticator {
 public:
  static StatusOr<std::unique_ptr<ZapAuthenticator>> Start(std::set<std::string> authorized);
  ~ZapAuthenticator();
  ZapAuthenticator(const ZapAuthenticator&) = delete;
  ZapAuthenticator& operator=(const ZapAuthenticator&) = delete;

  /// Clients refused so far.
  uint64_t refused() const { return refused_.load(); }

  explicit ZapAuthenticator(std::set<std::string> authorized);

 private:
  void Run(zmq::socket_t socket);

  const std::set<std::string> authorized_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> refused_{0};
  std::thread thread_;
};

}  // namespace fleet::transport
