// JobClient: the C++ client of the coordinator's job API (schemas/job.fbs), used by `fleet up`,
// `fleet plan --coordinator`, the benchmarks and the integration tests. The Python client in
// comfyui/ speaks the same protocol.
//
// Thread safety: one request at a time per client (calls are serialised by a mutex).
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "fleet/coordinator/coordinator.h"
#include "fleet/status/status.h"
#include "fleet/transport/zmq_util.h"

namespace fleet::coordinator {

class JobClient {
 public:
  /// Connects and exchanges Hello (FailedPrecondition on a protocol major mismatch).
  static StatusOr<std::unique_ptr<JobClient>> Connect(const std::string& endpoint,
                                                      std::chrono::milliseconds timeout,
                                                      const transport::CurveConfig* curve = nullptr);

  StatusOr<ModelInfo> LoadModel(const std::string& name, const ModelSpec& spec);
  Status UnloadModel(const std::string& name);
  StatusOr<std::vector<ModelInfo>> ListModels();
  StatusOr<PlanResult> Plan(const ModelSpec& spec);
  /// Sends the inputs (as data frames) and returns the outputs and the step's statistics.
  StatusOr<ForwardResult> Forward(const std::string& model, const std::vector<HostTensor>& inputs,
                                  const std::string& run_id = "",
                                  const std::vector<std::string>& constant_inputs = {},
                                  bool end_run = false);
  /// The workers and models the coordinator knows.
  StatusOr<ClusterStatus> Cluster();

  JobClient(zmq::socket_t socket, std::chrono::milliseconds timeout);

 private:
  StatusOr<transport::Frames> Call(flatbuffers::FlatBufferBuilder& fbb, transport::Frames data);

  std::mutex mu_;
  zmq::socket_t socket_;
  std::chrono::milliseconds timeout_;
  uint64_t next_id_ = 1;
};

}  // namespace fleet::coordinator
