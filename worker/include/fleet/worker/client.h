// WorkerClient: the torch-free C++ client of one fleet-worker (docs/protocol.md, "Worker
// channel"). The coordinator, peer workers (SendTensors, weight streaming), the benchmarks and
// the integration tests all talk to workers through it: one method per request.
//
// Connect() opens a DEALER to the worker's ROUTER and exchanges Hello; when both sides share a
// host and offer shm, tensor bytes sent by this client (PutTensors, LoadBlockFromWire) are
// copied straight into the worker's pre-faulted staging arena and only descriptors travel
// over ZeroMQ; otherwise they travel as zero-copy data frames. Weights fetched over shm point
// into the donor's arena (zero copy) and stay valid until ReleaseWeights(lease).
//
// Errors are the worker's typed errors (Status codes are wire-stable) or Unavailable /
// DeadlineExceeded when the worker cannot be reached; a malformed reply is an error, never a
// crash.
//
// Thread safety: all methods are safe to call from several threads; calls are serialised (one
// request in flight per client). Use one client per thread for parallel requests.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "fleet/families/lora_keys.h"
#include "fleet/protocol/protocol.h"
#include "fleet/status/status.h"
#include "fleet/transport/bulk.h"
#include "fleet/transport/zmq_util.h"

namespace fleet::worker {

/// A tensor in host memory: descriptor plus bytes that `owner` keeps alive.
struct HostTensor {
  std::string name;
  wire::DType dtype = wire::DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  uint64_t nbytes = 0;
  std::shared_ptr<const void> owner;
  std::string quant;                   // a stored GGUF weight: its ggml type (TensorDesc.quant)
  std::vector<int64_t> logical_shape;  // ... and the shape it expands to

  /// A tensor owning a copy of `bytes`.
  static HostTensor Copy(std::string name, wire::DType dtype, std::vector<int64_t> shape,
                         const void* bytes, uint64_t nbytes);
  /// A tensor owning `bytes` (moved in).
  static HostTensor Own(std::string name, wire::DType dtype, std::vector<int64_t> shape,
                        std::vector<uint8_t> bytes);
};

/// Which model a block belongs to; the worker creates the model once per name.
struct ModelSpec {
  std::string name;         // the coordinator's name for the model
  std::string family;       // "linear", "flux"
  std::string config_json;  // fleet::models config
  wire::DType compute_dtype = wire::DType::F32;
  wire::DType weight_dtype = wire::DType::Invalid;  // F8E4M3/F8E5M2: keep floating weights as fp8
  wire::DType dequant_dtype = wire::DType::Invalid;  // F32/F16/BF16: GGUF expands via this dtype
};

/// One tensor of a model file the worker reads itself.
struct FileTensorSpec {
  std::string name;
  wire::DType dtype = wire::DType::F32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // absolute offset in the file
  uint64_t nbytes = 0;
  std::string sha256;  // optional lowercase hex
  std::string quant;   // GGUF block type of the bytes ("Q8_0"); dequantised to `dtype`
};

/// One block of a RunBlocks: resident on the worker, or streamed from a donor worker.
struct BlockStep {
  std::string block;
  std::string donor;  // empty = resident; else the donor worker's endpoint
};

/// A LoRA file for SetPatches: the file (relative to a model root), its strength and the
/// modules of it that patch the model (families::MapLoraKeys's). An empty path: the modules'
/// keys name tensors sent along (SetPatches' `tensors`).
struct LoraFileRef {
  std::string path;
  double strength = 1.0;
  std::vector<families::LoraModule> modules;
};

/// A module as SetPatches and PutPatches carry it: parts by the suffix of each key (a key that
/// is not "<prefix><part>" is InvalidArgument naming it), at most 8 dimensions, one part at least.
StatusOr<families::LoraModule> LoraModuleFromWire(const wire::LoraModuleRef& m);

struct RunBlocksResult {
  uint32_t blocks_run = 0;
  double compute_seconds = 0;
  double prefetch_stall_seconds = 0;
  uint64_t streamed_bytes = 0;
};

struct SendResult {
  uint64_t bytes = 0;
  std::string transport;  // "shm" or "frames"
  double seconds = 0;
};

struct ModelStats {
  std::string model;
  std::vector<std::string> blocks;
  uint64_t resident_bytes = 0;
};

struct WorkerStats {
  std::string device, backing;
  uint64_t capacity_bytes = 0, total_bytes = 0, resident_bytes = 0;
  std::vector<ModelStats> models;
  uint64_t arena_bytes = 0, arena_used_bytes = 0, activation_bytes = 0;
  uint32_t jobs = 0;
};

/// A block's weights served by a donor. With a lease (shm), the tensors point into the donor's
/// arena; call ReleaseWeights(lease) once done with them.
struct FetchedWeights {
  std::vector<HostTensor> tensors;
  uint64_t lease = 0;
  uint64_t bytes = 0;
};

struct ClientOptions {
  std::string name = "fleet-client";  // peer_name in Hello (logs)
  std::string device;                 // the device id of a worker acting as client (metrics)
  const transport::CurveConfig* curve = nullptr;
  bool allow_shm = true;     // offer the shm capability
  int shm_copy_threads = 2;  // threads per large copy into the worker's arena
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};          // per request
  std::chrono::milliseconds connect_timeout{std::chrono::seconds(10)};  // for the Hello
  protocol::Limits limits;
  /// Polled (every 100 ms) while waiting for a reply: when it returns false the call fails at
  /// once with Unavailable, e.g. because the coordinator's registry marked the worker down.
  std::function<bool()> alive;
};

class WorkerClient {
 public:
  /// Connects and exchanges Hello. DeadlineExceeded when nobody answers within
  /// options.connect_timeout, FailedPrecondition on a version mismatch.
  static StatusOr<std::unique_ptr<WorkerClient>> Connect(const std::string& endpoint,
                                                         const ClientOptions& options);
  ~WorkerClient();

  const std::string& endpoint() const { return endpoint_; }
  const protocol::HelloInfo& peer() const { return peer_; }
  /// Negotiated capabilities (protocol::kCapShm, ...).
  uint64_t capabilities() const { return caps_; }
  bool uses_shm() const { return (caps_ & protocol::kCapShm) != 0; }

  Status LoadBlockFromFile(const ModelSpec& model, const std::string& block,
                           const std::string& path, const std::vector<FileTensorSpec>& tensors);
  Status LoadBlockFromWire(const ModelSpec& model, const std::string& block,
                           const std::vector<HostTensor>& tensors);
  Status EvictBlock(const std::string& model, const std::string& block);
  Status EvictModel(const std::string& model);
  StatusOr<WorkerStats> Stats();

  /// Puts tensors into job `job`'s table (replacing same names). Tensors named in
  /// `run_constant` are also cached for sampling run `run_id` until EndRun.
  Status PutTensors(const std::string& job, const std::vector<HostTensor>& tensors,
                    const std::string& run_id = "",
                    const std::vector<std::string>& run_constant = {});
  StatusOr<std::vector<HostTensor>> GetTensors(const std::string& job,
                                               const std::vector<std::string>& names);
  StatusOr<RunBlocksResult> RunBlocks(const std::string& job, const std::string& model,
                                      const std::vector<BlockStep>& steps,
                                      uint32_t prefetch_depth = 1, const std::string& run_id = "",
                                      const std::string& patches = "");
  /// Gives the worker patch set `id` of `model` (the LoRAs stacked in order, with `tensors`
  /// for those without a path) and drops the sets in `drop`; an `id` the worker holds already
  /// is kept as it is.
  Status SetPatches(const std::string& model, const std::string& id,
                    const std::vector<LoraFileRef>& loras, const std::vector<HostTensor>& tensors,
                    const std::vector<std::string>& drop);
  /// Asks the worker to push `names` of `job` to the worker at `peer` (as `peer_job`).
  StatusOr<SendResult> SendTensors(const std::string& job, const std::vector<std::string>& names,
                                   const std::string& peer, const std::string& peer_job);
  StatusOr<FetchedWeights> FetchWeights(const std::string& model, const std::string& block);
  Status ReleaseWeights(uint64_t lease);
  Status DropJob(const std::string& job);
  Status EndRun(const std::string& run_id);

  /// Sends raw frames (as the header and data frames of a request) and returns the raw reply
  /// frames: for tests that send garbage.
  StatusOr<transport::Frames> TEST_RawCall(transport::Frames frames);

  WorkerClient(std::string endpoint, ClientOptions options, zmq::socket_t socket,
               zmq::socket_t monitor);

 private:
  struct Reply {
    transport::Frames frames;                         // header first
    std::shared_ptr<protocol::AlignedBuffer> header;  // aligned copy of frames[0]
    const wire::WorkerResponse* response = nullptr;
  };
  // Sends a finished request plus data frames and waits for the matching response. An Error
  // reply becomes its Status.
  StatusOr<Reply> Call(flatbuffers::FlatBufferBuilder& fbb, transport::Frames data_frames,
                       std::chrono::milliseconds timeout);
  StatusOr<Reply> CallLocked(flatbuffers::FlatBufferBuilder& fbb, transport::Frames data_frames,
                             std::chrono::milliseconds timeout);
  Status Hello();
  // Stages tensors (shm when negotiated and the peer has room, else frames) and builds their
  // descriptors into `fbb`. REQUIRES: mu_ held.
  StatusOr<flatbuffers::Offset<flatbuffers::Vector<flatbuffers::Offset<wire::TensorDesc>>>>
  StageTensors(flatbuffers::FlatBufferBuilder& fbb, const std::vector<HostTensor>& tensors,
               transport::Frames& data_frames);
  StatusOr<transport::Reservation> ReserveLocked(std::span<const uint64_t> sizes);
  StatusOr<std::vector<HostTensor>> ReadTensors(
      const flatbuffers::Vector<flatbuffers::Offset<wire::TensorDesc>>* descs,
      transport::Frames& frames, bool donor_shm);

  const std::string endpoint_;
  const ClientOptions options_;
  std::mutex mu_;
  zmq::socket_t socket_;  // GUARDED_BY(mu_)
  // Connection events of socket_ (ZeroMQ monitor). A request in flight when the connection
  // drops fails at once: its reply cannot come (the worker exited, or would answer a connection
  // that no longer exists). A call made while the connection is down waits connect_timeout for
  // it to come back, then fails.
  enum class Link { kNew, kUp, kDown };
  // Reads pending events; returns a handshake failure as Unavailable. REQUIRES: mu_ held.
  Status PollEvents(bool* dropped);
  zmq::socket_t monitor_;     // GUARDED_BY(mu_)
  Link link_ = Link::kNew;    // GUARDED_BY(mu_)
  uint64_t next_id_ = 1;  // GUARDED_BY(mu_)
  protocol::HelloInfo peer_;
  uint64_t caps_ = 0;
  std::shared_ptr<transport::ShmMapping> peer_arena_rw_;  // for shm puts
  std::shared_ptr<transport::ShmMapping> peer_arena_ro_;  // for donor weights
  std::unique_ptr<transport::BulkTransport> frames_;
  std::unique_ptr<transport::BulkTransport> shm_;
};

}  // namespace fleet::worker
