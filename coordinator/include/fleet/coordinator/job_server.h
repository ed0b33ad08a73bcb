// The job API: a ZeroMQ ROUTER speaking schemas/job.fbs for the ComfyUI node and clients.
//
// One thread owns the socket: it verifies every inbound message (FlatBuffers Verifier, size
// limits, Hello first per connection), answers cheap requests (Hello, ListModels, Status,
// Cancel) at once and queues the rest (LoadModel, UnloadModel, Plan, Forward) on a bounded
// JobQueue; a full queue answers ResourceExhausted ("busy") immediately. Job threads hand their
// replies back through an outbox and an inproc wake-up socket, so the ROUTER is only ever used by
// its own thread. Malformed messages get an Error reply and the server carries on.
//
// Thread safety: Start/Stop from one thread; everything else is internal.
#pragma once

#include <memory>
#include <string>

#include "fleet/coordinator/coordinator.h"
#include "fleet/coordinator/job_queue.h"
#include "fleet/status/status.h"
#include "fleet/transport/zmq_util.h"

namespace fleet::coordinator {

class JobServer {
 public:
  static StatusOr<std::unique_ptr<JobServer>> Start(Coordinator* coordinator,
                                                    const std::string& listen,
                                                    const transport::CurveConfig* curve);
  ~JobServer();

  /// The bound endpoint ("tcp://127.0.0.1:41234").
  const std::string& endpoint() const;
  JobQueue& queue();
  /// Stops taking jobs, lets running ones finish within `timeout` (others get an error reply),
  /// then stops the socket thread.
  void Drain(std::chrono::milliseconds timeout);

 private:
  struct Impl;
  explicit JobServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace fleet::coordinator
