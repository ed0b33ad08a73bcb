// Flags shared by the `fleet` commands that talk to a running coordinator (cluster.cc, and
// `fleet plan --coordinator`), and the client they make. Thread safety: main thread only.
#pragma once

#include <string>

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

/// The control API client for `flags` (InvalidArgument for a URL that is not http://HOST:PORT).
StatusOr<HttpClient> ConnectCluster(const ClusterFlags& flags);

}  // namespace fleet::cli
