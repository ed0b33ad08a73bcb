// The worker registry: which workers exist, where they listen, what they hold, whether they are up.
//
// Workers started with --coordinator register themselves on the register endpoint (a ZeroMQ
// ROUTER) and send heartbeats; workers named with --worker are polled instead (the registry asks
// each for Stats at the poll interval on a thread of its own, so a dead or slow one delays
// neither the others nor the heartbeats). A worker silent for longer than the heartbeat timeout
// is marked down: jobs that need it fail at once with an error naming it, instead of hanging.
// A worker that comes back (same device id) is marked up again; if it restarted, it lost its
// blocks, which `generation` tells the model manager.
//
// Thread safety: all public methods are safe to call from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "fleet/status/status.h"
#include "fleet/transport/zmq_util.h"

namespace fleet::coordinator {

struct ModelResidency {
  std::string model;
  std::vector<std::string> blocks;
  uint64_t resident_bytes = 0;
};

struct WorkerRecord {
  std::string device;       // "cuda:1"
  std::string endpoint;     // its request endpoint
  std::string backing;      // "cpu", "cuda:0"
  std::string device_name;
  std::string metrics;      // host:port of its /metrics
  std::string instance;     // random id of the worker process (Hello.instance); new per start
  uint64_t total_bytes = 0;
  uint64_t capacity_bytes = 0;
  uint64_t resident_bytes = 0;
  uint64_t activation_bytes = 0;
  std::vector<ModelResidency> models;
  bool up = false;
  bool registered = false;  // true: it registers itself; false: a static --worker entry
  uint64_t generation = 0;  // bumps each time the worker (re)starts
  std::chrono::steady_clock::time_point last_seen{};
};

struct RegistryOptions {
  std::string register_listen;               // empty: no self-registration
  std::vector<std::string> static_workers;   // endpoints polled with Stats
  std::chrono::milliseconds heartbeat_timeout{3000};
  std::chrono::milliseconds poll_interval{1000};
  const transport::CurveConfig* curve = nullptr;
};

/// How the registry asks a static worker for its state: returns a filled record (device,
/// backing, sizes, models) or an error when the worker does not answer. Called for every static
/// worker on a thread of its own, so it must be thread-safe and bound its own time.
using StatsProbe = std::function<StatusOr<WorkerRecord>(const std::string& endpoint)>;

class WorkerRegistry {
 public:
  /// Called when a worker goes down or comes back: on the registry thread, or for a static
  /// worker on the thread that probed it (so possibly concurrently).
  using Listener = std::function<void(const WorkerRecord& record)>;

  static StatusOr<std::unique_ptr<WorkerRegistry>> Start(const RegistryOptions& options,
                                                         StatsProbe probe, Listener listener);
  ~WorkerRegistry();

  /// The register endpoint actually bound (port read back).
  std::string register_endpoint() const { return register_endpoint_; }

  std::vector<WorkerRecord> Snapshot() const;
  /// Registers refused so far because the device id was up under another live worker, by
  /// device id.
  std::map<std::string, uint64_t> RegisterConflicts() const;
  /// The record of `device`: NotFound when unknown, Unavailable when down (naming how long it has
  /// been silent).
  StatusOr<WorkerRecord> Get(const std::string& device) const;
  /// Marks `device` down now (a request to it failed), with `why` in the log.
  void MarkDown(const std::string& device, const std::string& why);
  /// Waits until at least `count` workers are up or `timeout` passes.
  bool WaitForWorkers(size_t count, std::chrono::milliseconds timeout) const;

  void Stop();

 private:
  WorkerRegistry(const RegistryOptions& options, StatsProbe probe, Listener listener);
  void Loop();
  void HandleEvent(const std::string& identity, transport::Frames& frames);
  void Upsert(WorkerRecord record, const std::string& identity);
  void CheckTimeouts();
  void ProbeLoop(const std::string& endpoint);
  void FileProbe(const std::string& endpoint, StatusOr<WorkerRecord> answer);

  const RegistryOptions options_;
  const StatsProbe probe_;
  const Listener listener_;
  std::string register_endpoint_;
  std::unique_ptr<zmq::socket_t> socket_;  // used by the registry thread only
  std::thread thread_;
  std::vector<std::thread> probe_threads_;  // one per static worker (ProbeLoop)
  std::atomic<bool> stop_{false};

  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  std::map<std::string, WorkerRecord> workers_;         // by device; guarded by mu_
  std::map<std::string, std::string> identity_device_;  // ROUTER identity -> device; guarded by mu_
  uint64_t next_generation_ = 1;                        // guarded by mu_
  std::map<std::string, uint64_t> conflicts_;           // device -> refused; guarded by mu_
};

}  // namespace fleet::coordinator
