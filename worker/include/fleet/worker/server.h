// WorkerServer: the fleet-worker process minus its flag parsing (docs/ARCHITECTURE.md section 3).
//
// One worker serves one device. It holds blocks of models under a hard capacity budget
// (weights live in the shm arena's weights range on CPU backing, so peers can read them
// without copies), keeps a tensor table per job and a constant-input cache per sampling run,
// runs block forwards through fleet::models, pushes tensors to peers, serves weights to peers,
// sends heartbeats to a coordinator, and exports Prometheus metrics.
//
// Requests arrive on a ROUTER socket (one I/O thread); Hello is answered there, everything else
// runs on a pool of handler threads. Every inbound message is verified; a malformed, oversized,
// wrong-version or out-of-order message gets an error reply (or, above the size limit, a closed
// connection) and the worker goes on serving everyone else.
//
// Thread safety: Create/Run/Stop from one thread; Stop may be called from another thread (or a
// signal-watching thread) while Run is running.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "fleet/status/status.h"
#include "fleet/transport/zmq_util.h"

namespace fleet::worker {

struct WorkerConfig {
  std::string id = "cpu";       // device id ("cuda:1")
  std::string backing = "cpu";  // "cpu" or "cuda:N"
  uint64_t capacity_bytes = 0;  // 0 = total minus the default reserve
  uint64_t total_bytes = 0;     // 0 = physical memory of the backing
  std::string listen = "tcp://127.0.0.1:*";
  std::vector<std::string> model_roots;
  std::string coordinator;  // empty = no heartbeats
  std::chrono::milliseconds heartbeat_interval{1000};
  std::string metrics_listen = "127.0.0.1:0";  // empty = no /metrics
  bool shm = true;
  uint64_t shm_arena_bytes = 0;  // weights range; 0 = capacity
  uint64_t shm_staging_bytes = 256ull << 20;
  int shm_copy_threads = 2;                // threads per large copy into a peer's arena
  transport::CurveConfig curve;            // disabled = plain
  std::set<std::string> curve_authorized;  // empty with CURVE on = {curve.public_key}
  uint64_t max_message_bytes = 8ull << 30;
  size_t max_connections = 100000;  // greeted connections kept; closed ones leave the table
  std::chrono::milliseconds job_ttl{std::chrono::minutes(10)};  // idle jobs and runs dropped
  int threads = 4;
  int compute_threads = 2;
};

class WorkerServer {
 public:
  /// Validates `config`, creates the arena, binds the sockets and the /metrics server.
  static StatusOr<std::unique_ptr<WorkerServer>> Create(WorkerConfig config);
  ~WorkerServer();
  WorkerServer(const WorkerServer&) = delete;
  WorkerServer& operator=(const WorkerServer&) = delete;

  /// The bound request endpoint ("tcp://127.0.0.1:41234").
  const std::string& endpoint() const;
  /// "127.0.0.1:39001", or empty when /metrics is off.
  const std::string& metrics_address() const;
  /// The shm arena's name in /dev/shm, or empty.
  std::string arena_name() const;
  /// "fleet-worker ready id=... listen=... metrics=..." (the line main prints).
  std::string ReadyLine() const;

  /// Serves until Stop(); then finishes the requests in progress and returns.
  void Run();
  /// Asks Run to return after the current requests. Safe from any thread.
  void Stop();

  struct Impl;
  explicit WorkerServer(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace fleet::worker
