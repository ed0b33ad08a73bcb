// Flags shared by the `fleet` commands that talk to a running coordinator (cluster.cc, and
// `fleet plan --coordinator`), and the client they make. Thread safety: main thread only.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "fleet/config/options.h"
#include "http_client.h"

namespace fleet::cli {

struct ClusterFlags {
  std::string coordinator = "http://127.0.0.1:7780";
  std::string token;
  config::Duration timeout{std::chrono::seconds(5)};
  bool json = false;
};

/// Adds --coordinator, --token, --timeout and --json (env FLEET_COORDINATOR, FLEET_TOKEN, ...).
void AddClusterFlags(config::OptionSet& set, ClusterFlags* flags);

/// The workflow's input size, for the activation memory a plan keeps free (the node's width,
/// height, frames and batch inputs); 0 is the model family's default.
struct InputSizeFlags {
  int64_t width = 0;
  int64_t height = 0;
  int64_t frames = 0;
  int64_t batch = 0;

  /// name=value pairs of the sizes given (not 0), as the control API takes them.
  std::vector<std::pair<std::string, int64_t>> Given() const;
};

/// Adds --width, --height, --frames and --batch.
void AddInputSizeFlags(config::OptionSet& set, InputSizeFlags* flags);

/// The control API client for `flags` (InvalidArgument for a URL that is not http://HOST:PORT).
StatusOr<HttpClient> ConnectCluster(const ClusterFlags& flags);

}  // namespace fleet::cli
