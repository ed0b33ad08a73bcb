#include "fleet/worker/server.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <unordered_set>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "compute_thread.h"
#include "fleet/config/bytes.h"
#include "fleet/device/device.h"
#include "fleet/formats/dequant.h"
#include "fleet/formats/dtype.h"
#include "fleet/formats/model_file.h"
#include "fleet/log/log.h"
#include "fleet/metrics/metrics.h"
#include "fleet/models/lora.h"
#include "fleet/models/model.h"
#include "fleet/models/stored_weights.h"
#include "fleet/protocol/protocol.h"
#include "fleet/tensor/torch_view.h"
#include "fleet/transport/bulk.h"
#include "fleet/transport/curve.h"
#include "fleet/transport/shm_arena.h"
#include "fleet/worker/client.h"
#include "torch_tensors.h"

namespace fleet::worker {

using transport::Frames;
using Clock = std::chrono::steady_clock;

namespace {

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string Sha256Hex(const uint8_t* data, size_t size) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data, size, md, &len, EVP_sha256(), nullptr);
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out += kHex[md[i] >> 4];
    out += kHex[md[i] & 15];
  }
  return out;
}

std::string Str(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

std::vector<std::string> Strs(
    const flatbuffers::Vector<flatbuffers::Offset<flatbuffers::String>>* v) {
  std::vector<std::string> out;
  if (v) {
    for (const auto* s : *v) out.push_back(s->str());
  }
  return out;
}

Status CheckName(const std::string& value, const char* what) {
  if (value.empty()) return InvalidArgumentError(std::string(what) + " is empty");
  if (value.size() > 4096)
    return InvalidArgumentError(std::string(what) + " is longer than 4096 bytes");
  return Status::OK();
}

// A file tensor whose bytes are GGUF blocks: a type we dequantise, into F32/F16/BF16, a whole
// number of blocks (not per row: ComfyUI-GGUF's orig_shape gives some tensors a logical shape
// other than the stored rows), and exactly the bytes those blocks take.
Status CheckQuantised(const wire::FileTensor& t, std::span<const int64_t> shape) {
  const std::string quant = t.quant()->str();
  auto traits = formats::GgmlTypeByName(quant);
  if (!traits || !traits->dequantizable || traits->block_size == 1) {
    return InvalidArgumentError("GGUF type '" + quant + "' is not a block type this worker dequantises");
  }
  if (t.dtype() != wire::DType::F32 && t.dtype() != wire::DType::F16 && t.dtype() != wire::DType::BF16) {
    return InvalidArgumentError(quant + " dequantises to F32, F16 or BF16, not dtype " +
                                std::to_string(static_cast<int>(t.dtype())));
  }
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  if (numel % traits->block_size != 0) {
    return InvalidArgumentError(quant + " needs whole blocks of " + std::to_string(traits->block_size) +
                                " values, the shape has " + std::to_string(numel));
  }
  const uint64_t want = static_cast<uint64_t>(numel / traits->block_size) * traits->type_size;
  if (t.nbytes() != want) {
    return InvalidArgumentError("declares " + std::to_string(t.nbytes()) + " bytes, " + quant +
                                " blocks of its shape take " + std::to_string(want));
  }
  return Status::OK();
}

// A weight read from a file as the worker keeps it: GGUF blocks and fp8 bytes as stored
// (expanded at use), other floating weights prepared in the compute dtype.
StatusOr<models::StoredWeight> StoreWeight(const models::Model& model, const std::string& name,
                                           const at::Tensor& bytes, wire::DType dtype,
                                           const std::string& quant, std::vector<int64_t> shape,
                                           wire::DType weight_dtype) {
  // Scales and layer formats of a scaled-fp8 checkpoint stay as stored (models::AttachScales).
  if (formats::IsQuantParameter(name)) return models::StoredWeight::Resident(bytes);
  const bool to_fp8 = weight_dtype == wire::DType::F8E4M3 || weight_dtype == wire::DType::F8E5M2;
  if (to_fp8 &&
      (dtype == wire::DType::F32 || dtype == wire::DType::F16 || dtype == wire::DType::BF16)) {
    const bool e5m2 = weight_dtype == wire::DType::F8E5M2;
    FLEET_ASSIGN_OR_RETURN(
        at::Tensor fp8,
        tensor::DowncastF8(bytes, e5m2 ? tensor::F8Format::kE5M2 : tensor::F8Format::kE4M3));
    return models::MakeStoredF8(name, fp8, e5m2);
  }
  if (!quant.empty()) {
    return models::MakeStoredGguf(name, bytes, formats::GgmlTypeByName(quant)->type,
                                  std::move(shape));
  }
  if (dtype == wire::DType::F8E4M3 || dtype == wire::DType::F8E5M2) {
    return models::MakeStoredF8(name, bytes, dtype == wire::DType::F8E5M2);
  }
  FLEET_ASSIGN_OR_RETURN(at::Tensor prepared, model.PrepareWeight(name, bytes));
  return models::StoredWeight::Resident(std::move(prepared));
}

// The descriptor of a weight as this worker keeps it, for a peer that streams it: GGUF blocks
// as U8 bytes with their type and logical shape, fp8 bytes under their fp8 dtype.
flatbuffers::Offset<wire::TensorDesc> WeightDesc(flatbuffers::FlatBufferBuilder& fbb,
                                                 const std::string& name,
                                                 const models::StoredWeight& w,
                                                 wire::PayloadKind payload, uint32_t frame,
                                                 uint64_t offset) {
  using Form = models::StoredWeight::Form;
  wire::DType dtype = internal::FromScalarType(w.data.scalar_type());
  if (w.form == Form::kF8E4M3) dtype = wire::DType::F8E4M3;
  if (w.form == Form::kF8E5M2) dtype = wire::DType::F8E5M2;
  flatbuffers::Offset<flatbuffers::String> quant;
  flatbuffers::Offset<flatbuffers::Vector<int64_t>> logical;
  if (w.form == Form::kGguf) {
    quant = fbb.CreateString(
        std::string(formats::GgmlTypeInfo(static_cast<uint32_t>(w.gguf_type))->name));
    logical = fbb.CreateVector(w.shape);
  }
  return wire::CreateTensorDesc(
      fbb, fbb.CreateString(name), dtype, fbb.CreateVector(internal::ShapeOf(w.data)),
      internal::TensorBytes(w.data), payload, frame, offset, 0, quant, logical);
}

// A weight fetched from a donor, as the donor keeps it (HandleFetchWeights): GGUF blocks
// (TensorDesc.quant), fp8 bytes, or prepared. The sizes are checked again here.
StatusOr<models::StoredWeight> ReceivedWeight(const HostTensor& t) {
  if (!t.quant.empty()) {
    auto traits = formats::GgmlTypeByName(t.quant);
    if (!traits)
      return InvalidArgumentError("weight '" + t.name + "': unknown GGUF type '" + t.quant + "'");
    at::Tensor bytes =
        internal::WrapBytes(t.data, wire::DType::U8, {static_cast<int64_t>(t.nbytes)}, t.owner);
    return models::MakeStoredGguf(t.name, bytes, traits->type, t.logical_shape);
  }
  at::Tensor data = internal::WrapBytes(t.data, t.dtype, t.shape, t.owner);
  if (t.dtype == wire::DType::F8E4M3 || t.dtype == wire::DType::F8E5M2) {
    return models::MakeStoredF8(t.name, data, t.dtype == wire::DType::F8E5M2);
  }
  return models::StoredWeight::Resident(std::move(data));
}

// Resolves a client-given model path inside one of the roots: relative, no "..", and the real
// path (after symlinks) still inside the root.
StatusOr<std::string> ResolveModelPath(const std::vector<std::string>& roots,
                                       const std::string& path) {
  if (roots.empty()) {
    return FailedPreconditionError("this worker has no --model-root, so it cannot read '" + path +
                                   "' itself; send the weights over the wire");
  }
  if (path.empty() || path[0] == '/' || path.find('\0') != std::string::npos) {
    return InvalidArgumentError("model path '" + path + "' must be relative to a model root");
  }
  for (const auto& part : std::filesystem::path(path)) {
    if (part == "..") {
      return InvalidArgumentError("model path '" + path + "' may not contain '..'");
    }
  }
  for (const auto& root : roots) {
    std::error_code ec;
    const auto real_root = std::filesystem::canonical(root, ec);
    if (ec) continue;
    const auto real = std::filesystem::canonical(real_root / path, ec);
    if (ec) continue;
    const std::string r = real_root.string() + "/";
    if (real.string().rfind(r, 0) != 0) {
      return InvalidArgumentError("model path '" + path + "' leaves model root '" + root +
                                  "' (through a symlink)");
    }
    return real.string();
  }
  std::string list;
  for (const auto& r : roots) list += (list.empty() ? "" : ", ") + r;
  return NotFoundError("model file '" + path + "' is not under any model root (" + list + ")");
}

}  // namespace

// ---------------------------------------------------------------------------------------------

struct WorkerServer::Impl {
  struct Block {
    models::WeightStore weights;  // GGUF and fp8 as stored, the rest prepared
    std::map<std::string, uint64_t, std::less<>> arena_offsets;  // tensors in the shm arena
    uint64_t bytes = 0;
    int pins = 0;  // leases + running computations
  };
  // A patch set and the patched copies of resident weights it made: kept while the device has
  // capacity to spare (counted in `patched`), dropped first when a load needs the room.
  struct PatchSetState {
    std::shared_ptr<const models::PatchSet> patches;
    std::map<std::string, at::Tensor, std::less<>> patched;  // guarded by mu
    uint64_t patched_bytes = 0;                              // guarded by mu
  };
  struct ModelEntry {
    std::string family, config_json;
    wire::DType dtype = wire::DType::F32;
    std::optional<at::ScalarType> dequant;  // LoadBlockRequest.dequant_dtype; none: compute
    std::shared_ptr<models::Model> model;
    std::unordered_map<std::string, size_t> index;  // block name -> index
    std::map<std::string, Block> blocks;
    uint64_t bytes = 0;
    // SetPatches' patch sets by id; RunBlocks names one. The coordinator drops what it no longer
    // uses; a set past kMaxPatchSets is refused.
    std::map<std::string, std::shared_ptr<PatchSetState>> patch_sets;
  };
  static constexpr size_t kMaxPatchSets = 16;
  static constexpr size_t kMaxLoraFiles = 64;             // per patch set
  static constexpr uint64_t kMaxLoraBytes = 16ull << 30;  // the tensors of one patch set
  struct Job {
    models::TensorMap tensors;
    Clock::time_point touched = Clock::now();  // the last request that used it
  };
  // Remembered dropped job ids, so a RunBlocks that finishes after DropJob (or a late
  // PutTensors) cannot bring a job back.
  static constexpr size_t kDroppedJobsKept = 4096;
  struct Lease {
    std::string model, block;
    Clock::time_point created;
  };
  // A consumer that dies holding a lease would pin the block forever; leases older than this
  // are dropped when an eviction needs the block (no block computes for this long).
  static constexpr std::chrono::minutes kLeaseTimeout{10};
  struct Conn {
    bool hello = false;
    protocol::HelloInfo peer;
    uint64_t caps = 0;
    int fd = -1;  // the connection's socket (ZMQ_SRCFD), to forget it when it closes
  };
  struct Task {
    zmq::message_t rid;
    std::shared_ptr<protocol::AlignedBuffer> header;
    Frames data;  // data frames (after the header)
    Conn conn;
    Clock::time_point received;
  };

  WorkerConfig config;
  protocol::Limits limits;
  protocol::HelloInfo hello;
  std::shared_ptr<transport::ShmArena> arena;
  std::unique_ptr<transport::ShmReceiver> receiver;
  std::unique_ptr<transport::ZapAuthenticator> zap;
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<metrics::WorkerMetrics> m;
  std::unique_ptr<metrics::MetricsServer> metrics_server;
  at::Device device{at::kCPU};

  zmq::socket_t router;
  zmq::socket_t replies_pull;
  // Events of the router: closed connections, and handshake failures when CURVE is on.
  zmq::socket_t monitor;
  std::string endpoint;
  std::string replies_endpoint;
  // Greeted connections by routing id, and their sockets: a closed connection's entry goes when
  // the monitor reports the close, so the table holds live connections only. IO thread only.
  std::unordered_map<std::string, Conn> conns;
  std::unordered_map<int, std::string> conn_by_fd;

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> in_flight{0};

  // Handler pool.
  std::mutex queue_mu;
  std::condition_variable queue_cv;
  std::deque<Task> queue;
  bool queue_closed = false;
  std::vector<std::thread> pool;
  std::thread heartbeat;
  std::unique_ptr<internal::ComputeThread> compute;  // runs every RunBlocks

  // State.
  std::mutex mu;
  std::map<std::string, ModelEntry> models_;
  std::map<std::string, Job> jobs;
  std::map<std::string, models::TensorMap> runs;  // run id -> run-constant tensors
  std::map<std::string, Clock::time_point> run_touched;  // run id -> its last use
  std::unordered_set<std::string> dropped_jobs;          // the last kDroppedJobsKept dropped
  std::deque<std::string> dropped_order;
  std::map<uint64_t, Lease> leases;
  uint64_t next_lease = 1;
  uint64_t resident = 0;
  uint64_t pending = 0;  // capacity reserved by loads in progress
  uint64_t patched = 0;  // patched weight copies (PatchSetState), given back on demand

  // Clients of peer workers (SendTensors targets, weight donors), by endpoint.
  std::mutex peers_mu;
  std::map<std::string, std::shared_ptr<WorkerClient>> peers;

  // ---- helpers ----
  std::string Src(const Conn& c) const { return c.peer.device.empty() ? "client" : c.peer.device; }

  StatusOr<std::shared_ptr<WorkerClient>> Peer(const std::string& endpoint_) {
    std::lock_guard<std::mutex> lock(peers_mu);
    auto it = peers.find(endpoint_);
    if (it != peers.end()) return it->second;
    ClientOptions o;
    o.name = "worker " + config.id;
    o.device = config.id;
    o.curve = config.curve.enabled() ? &config.curve : nullptr;
    o.allow_shm = config.shm;
    o.shm_copy_threads = config.shm_copy_threads;
    o.limits = limits;
    o.timeout = std::chrono::minutes(10);
    o.connect_timeout = std::chrono::seconds(5);
    FLEET_ASSIGN_OR_RETURN(std::unique_ptr<WorkerClient> c, WorkerClient::Connect(endpoint_, o));
    std::shared_ptr<WorkerClient> shared = std::move(c);
    peers[endpoint_] = shared;
    return shared;
  }
  void DropPeer(const std::string& endpoint_) {
    std::lock_guard<std::mutex> lock(peers_mu);
    peers.erase(endpoint_);
  }

  uint64_t ActivationBytesLocked() const {
    uint64_t total = 0;
    for (const auto& [name, job] : jobs) {
      for (const auto& [n, t] : job.tensors) total += internal::TensorBytes(t);
    }
    for (const auto& [id, run] : runs) {
      for (const auto& [n, t] : run) total += internal::TensorBytes(t);
    }
    return total;
  }

  void ExpireLeasesLocked() {
    const auto now = Clock::now();
    for (auto it = leases.begin(); it != leases.end();) {
      if (now - it->second.created < kLeaseTimeout) {
        ++it;
        continue;
      }
      FLEET_LOG(WARNING, "worker") << "weight lease " << it->first << " on block '"
                                   << it->second.block << "' expired unreleased";
      auto model = models_.find(it->second.model);
      if (model != models_.end()) {
        auto b = model->second.blocks.find(it->second.block);
        if (b != model->second.blocks.end()) --b->second.pins;
      }
      it = leases.erase(it);
    }
  }

  // A model this worker no longer holds loses every series (removed, not zeroed: dashboards and
  // alerts see no model=... series after an unload; docs/metrics.md).
  void UpdateModelGaugesLocked(const std::string& model) {
    auto it = models_.find(model);
    if (it == models_.end()) {
      m->RemoveModel(model);
      return;
    }
    m->resident_bytes.Add({{"device", config.id}, {"model", model}})
        .Set(static_cast<double>(it->second.bytes));
    m->blocks_resident.Add({{"device", config.id}, {"model", model}})
        .Set(static_cast<double>(it->second.blocks.size()));
  }
  void UpdateActivationGaugeLocked() {
    m->activation_bytes.Add({{"device", config.id}})
        .Set(static_cast<double>(ActivationBytesLocked()));
  }
  Status DroppedJobError(const std::string& job) const {
    return FailedPreconditionError("job '" + job + "' was dropped on " + config.id +
                                   " (DropJob); job ids are not reused");
  }
  // Drops jobs and run constants untouched for config.job_ttl: what a client that died
  // mid-job, or a sampling run that never ended, left behind.
  void ExpireIdleLocked(Clock::time_point now) {
    size_t expired_jobs = 0, expired_runs = 0;
    for (auto it = jobs.begin(); it != jobs.end();) {
      if (now - it->second.touched < config.job_ttl) {
        ++it;
        continue;
      }
      it = jobs.erase(it);
      ++expired_jobs;
    }
    for (auto it = run_touched.begin(); it != run_touched.end();) {
      if (now - it->second < config.job_ttl) {
        ++it;
        continue;
      }
      runs.erase(it->first);
      it = run_touched.erase(it);
      ++expired_runs;
    }
    if (expired_jobs + expired_runs == 0) return;
    FLEET_LOG(INFO, "worker") << "dropped " << expired_jobs << " job(s) and " << expired_runs
                              << " run(s) untouched for "
                              << std::chrono::duration_cast<std::chrono::seconds>(config.job_ttl)
                                     .count()
                              << " s (--job-ttl)";
    UpdateActivationGaugeLocked();
  }
  // Forgets patched copies: of the weights in `names` (a block leaving), or all (names null).
  void DropPatchedLocked(const std::string& model, const models::WeightStore* names = nullptr) {
    auto it = models_.find(model);
    if (it == models_.end()) return;
    for (auto& [id, state] : it->second.patch_sets) {
      for (auto w = state->patched.begin(); w != state->patched.end();) {
        if (names != nullptr && names->count(w->first) == 0) {
          ++w;
          continue;
        }
        const uint64_t bytes = static_cast<uint64_t>(w->second.nbytes());
        state->patched_bytes -= bytes;
        patched -= bytes;
        w = state->patched.erase(w);
      }
    }
    UpdatePatchedGaugeLocked(model);
  }
  void DropAllPatchedLocked() {
    for (const auto& [name, e] : models_) DropPatchedLocked(name);
  }
  void ErasePatchSetLocked(const std::string& model, ModelEntry& e, const std::string& id) {
    auto it = e.patch_sets.find(id);
    if (it == e.patch_sets.end()) return;
    patched -= it->second->patched_bytes;
    it->second->patched.clear();
    it->second->patched_bytes = 0;
    e.patch_sets.erase(it);
    UpdatePatchedGaugeLocked(model);
  }
  // True while `state` is still one of `model`'s patch sets (not dropped meanwhile).
  bool HoldsPatchSetLocked(const std::string& model,
                           const std::shared_ptr<PatchSetState>& state) const {
    auto it = models_.find(model);
    if (it == models_.end()) return false;
    for (const auto& [id, s] : it->second.patch_sets) {
      if (s == state) return true;
    }
    return false;
  }
  void UpdatePatchedGaugeLocked(const std::string& model) {
    auto it = models_.find(model);
    if (it == models_.end()) return;
    uint64_t bytes = 0;
    for (const auto& [id, state] : it->second.patch_sets) bytes += state->patched_bytes;
    m->patched_bytes.Add({{"device", config.id}, {"model", model}}).Set(static_cast<double>(bytes));
  }

  // ---- request handlers ----
  Status Reply(Task& task, flatbuffers::FlatBufferBuilder& fbb, wire::WorkerResponseBody type,
               flatbuffers::Offset<void> body, Frames data, Frames& out) {
    const auto* req = flatbuffers::GetRoot<wire::WorkerRequest>(task.header->data());
    protocol::FinishResponse(fbb, req->id(), type, body);
    out.push_back(transport::MessageFromBuffer(fbb.Release()));
    for (auto& f : data) out.push_back(std::move(f));
    return Status::OK();
  }

  Status Ack(Task& task, Frames& out) {
    flatbuffers::FlatBufferBuilder fbb;
    return Reply(task, fbb, wire::WorkerResponseBody::Ack, wire::CreateAck(fbb).Union(), {}, out);
  }

  Status Dispatch(Task& task, Frames& out);
  Status HandleLoadBlock(Task& task, const wire::LoadBlockRequest& r, Frames& out);
  Status HandleEvictBlock(Task& task, const wire::EvictBlockRequest& r, Frames& out);
  Status HandleEvictModel(Task& task, const wire::EvictModelRequest& r, Frames& out);
  Status HandleStats(Task& task, Frames& out);
  Status HandleReserve(Task& task, const wire::ReserveRequest& r, Frames& out);
  Status HandlePutTensors(Task& task, const wire::PutTensorsRequest& r, Frames& out);
  Status HandleGetTensors(Task& task, const wire::GetTensorsRequest& r, Frames& out);
  Status HandleRunBlocks(Task& task, const wire::RunBlocksRequest& r, Frames& out);
  Status HandleSendTensors(Task& task, const wire::SendTensorsRequest& r, Frames& out);
  Status HandleFetchWeights(Task& task, const wire::FetchWeightsRequest& r, Frames& out);
  Status HandleReleaseWeights(Task& task, const wire::ReleaseWeightsRequest& r, Frames& out);
  Status HandleDropJob(Task& task, const wire::DropJobRequest& r, Frames& out);
  Status HandleEndRun(Task& task, const wire::EndRunRequest& r, Frames& out);
  Status HandleSetPatches(Task& task, const wire::SetPatchesRequest& r, Frames& out);
  class KeptPatches;

  flatbuffers::Offset<wire::StatsResponse> BuildStats(flatbuffers::FlatBufferBuilder& fbb);

  // Reads inbound tensor descriptors (frames or shm reservations) into CPU tensors.
  StatusOr<std::vector<std::pair<std::string, at::Tensor>>> ReadInbound(
      Task& task, const flatbuffers::Vector<flatbuffers::Offset<wire::TensorDesc>>* descs,
      const char* what);
  // Places one weight (in the arena on CPU backing when it fits, on the GPU on CUDA backing).
  // Resident weights come prepared (Model::PrepareWeight); stored forms keep their bytes.
  Status PlaceWeight(const std::string& name, models::StoredWeight weight, Block& block);

  StatusOr<std::shared_ptr<models::Model>> GetOrCreateModelLocked(const wire::LoadBlockRequest& r);

  // ---- threads ----
  Frames Execute(Task& task);
  void HandlerLoop();
  void HeartbeatLoop();
  void IoLoop();
  // `too_many_frames`: the message had more frames than a request may (the rest were dropped).
  void OnRequest(Frames frames, bool too_many_frames);
  // Handles every monitor event queued (closed connections leave `conns`).
  void DrainMonitor();
  void ForgetConn(const std::string& rid_key);
  void SendError(zmq::message_t& rid, uint64_t id, const Status& status);
};

// ---------------------------------------------------------------------------------------------
// I/O thread

void WorkerServer::Impl::SendError(zmq::message_t& rid, uint64_t id, const Status& status) {
  flatbuffers::FlatBufferBuilder fbb;
  protocol::FinishErrorResponse(fbb, id, status);
  Frames out;
  out.push_back(std::move(rid));
  out.push_back(transport::MessageFromBuffer(fbb.Release()));
  transport::SendFrames(router, out).IgnoreError();
}

void WorkerServer::Impl::OnRequest(Frames frames, bool too_many_frames) {
  if (frames.size() < 2) {
    m->requests.Add({{"device", config.id}, {"type", "Unknown"}, {"outcome", "rejected"}})
        .Increment();
    if (!frames.empty())
      SendError(frames[0], 0,
                InvalidArgumentError("empty message: a request is [header][data frames...]"));
    return;
  }
  auto header = std::make_shared<protocol::AlignedBuffer>(frames[1].data(), frames[1].size());
  auto request = protocol::VerifyWorkerRequest(header->bytes(), limits);
  const std::string rid_key = frames[0].to_string();
  if (!request.ok()) {
    m->requests.Add({{"device", config.id}, {"type", "Unknown"}, {"outcome", "rejected"}})
        .Increment();
    auto known = conns.find(rid_key);
    FLEET_LOG(WARNING, "worker") << "rejected a message from '"
                                 << (known != conns.end() ? known->second.peer.peer_name : "?")
                                 << "': " << request.status();
    SendError(frames[0], 0, request.status());
    return;
  }
  const auto type = (*request)->body_type();
  const std::string type_name(protocol::RequestTypeName(type));
  if (too_many_frames) {
    m->requests.Add({{"device", config.id}, {"type", type_name}, {"outcome", "rejected"}})
        .Increment();
    SendError(frames[0], (*request)->id(),
              ResourceExhaustedError(type_name + " came with more than " +
                                     std::to_string(limits.max_tensors) +
                                     " data frames; the rest were dropped unread"));
    return;
  }
  Conn& conn = conns[rid_key];
  if (type == wire::WorkerRequestBody::Hello) {
    protocol::HelloInfo peer = protocol::ReadHello(*(*request)->body_as_Hello());
    auto caps = protocol::Negotiate(hello, peer);
    if (!caps.ok()) {
      m->requests.Add({{"device", config.id}, {"type", type_name}, {"outcome", "rejected"}})
          .Increment();
      FLEET_LOG(WARNING, "worker")
          << "refused Hello from '" << peer.peer_name << "': " << caps.status();
      ForgetConn(rid_key);
      SendError(frames[0], (*request)->id(), caps.status());
      return;
    }
    if (!conn.hello && conns.size() > config.max_connections) {
      m->requests.Add({{"device", config.id}, {"type", type_name}, {"outcome", "rejected"}})
          .Increment();
      ForgetConn(rid_key);
      SendError(frames[0], (*request)->id(),
                ResourceExhaustedError("this worker has " + std::to_string(config.max_connections) +
                                       " connections open (--max-connections); close one first"));
      return;
    }
    conn.hello = true;
    conn.peer = peer;
    conn.caps = *caps;
    const int fd = zmq_msg_get(frames[1].handle(), ZMQ_SRCFD);
    if (fd >= 0 && fd != conn.fd) {
      // A socket number is reused only after its connection closed; drop what it named.
      if (auto old = conn_by_fd.find(fd); old != conn_by_fd.end() && old->second != rid_key) {
        conns.erase(old->second);
      }
      if (conn.fd >= 0) conn_by_fd.erase(conn.fd);
      conn.fd = fd;
      conn_by_fd[fd] = rid_key;
    }
    m->connections.Add({{"device", config.id}}).Set(static_cast<double>(conns.size()));
    protocol::HelloInfo reply = hello;
    reply.capabilities = *caps;
    flatbuffers::FlatBufferBuilder fbb;
    protocol::FinishResponse(fbb, (*request)->id(), wire::WorkerResponseBody::Hello,
                             protocol::BuildHello(fbb, reply).Union());
    Frames out;
    out.push_back(std::move(frames[0]));
    out.push_back(transport::MessageFromBuffer(fbb.Release()));
    transport::SendFrames(router, out).IgnoreError();
    m->requests.Add({{"device", config.id}, {"type", type_name}, {"outcome", "ok"}}).Increment();
    return;
  }
  if (!conn.hello) {
    m->requests.Add({{"device", config.id}, {"type", type_name}, {"outcome", "rejected"}})
        .Increment();
    ForgetConn(rid_key);
    SendError(frames[0], (*request)->id(),
              FailedPreconditionError(type_name + " before Hello: the first message on a "
                                                  "connection must be Hello"));
    return;
  }
  Task task;
  task.rid = std::move(frames[0]);
  task.header = std::move(header);
  for (size_t i = 2; i < frames.size(); ++i) task.data.push_back(std::move(frames[i]));
  task.conn = conn;
  task.received = Clock::now();
  // Requests that never block (no file I/O, no compute, no call to a peer) run right here:
  // each hop to a handler thread costs a wake-up, which adds up on the shm fast path.
  const bool blocks = type == wire::WorkerRequestBody::LoadBlockRequest ||
                      type == wire::WorkerRequestBody::SetPatchesRequest ||
                      type == wire::WorkerRequestBody::RunBlocksRequest ||
                      type == wire::WorkerRequestBody::SendTensorsRequest;
  if (!blocks) {
    Frames out = Execute(task);
    transport::SendFrames(router, out).IgnoreError();
    FLEET_VLOG(2, "worker")
        << type_name << " served inline in "
        << std::chrono::duration<double, std::micro>(Clock::now() - task.received).count() << " us";
    return;
  }
  ++in_flight;
  {
    std::lock_guard<std::mutex> lock(queue_mu);
    queue.push_back(std::move(task));
  }
  queue_cv.notify_one();
}

void WorkerServer::Impl::IoLoop() {
  bool accepting = true;
  auto next_sweep = Clock::now();
  while (true) {
    if (stop && accepting) accepting = false;
    if (const auto now = Clock::now(); now >= next_sweep) {
      std::lock_guard<std::mutex> lock(mu);
      ExpireIdleLocked(now);
      next_sweep = now + std::chrono::seconds(1);
    }
    if (!accepting && in_flight == 0) break;
    zmq::pollitem_t items[] = {{replies_pull.handle(), 0, ZMQ_POLLIN, 0},
                               {monitor.handle(), 0, ZMQ_POLLIN, 0},
                               {router.handle(), 0, ZMQ_POLLIN, 0}};
    try {
      zmq::poll(items, accepting ? 3 : 2, std::chrono::milliseconds(100));
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;
      FLEET_LOG(ERROR, "worker") << "poll failed: " << e.what();
      break;
    }
    if (items[0].revents & ZMQ_POLLIN) {
      auto reply = transport::RecvFrames(replies_pull, std::chrono::milliseconds(0));
      if (reply.ok()) {
        transport::SendFrames(router, *reply).IgnoreError();
        --in_flight;
      }
    }
    if (items[1].revents & ZMQ_POLLIN) DrainMonitor();
    if (accepting && (items[2].revents & ZMQ_POLLIN)) {
      // Closes reported before this message was read are handled first, so a socket number
      // reused by a new connection never finds its predecessor's entry.
      DrainMonitor();
      bool dropped = false;
      auto frames = transport::RecvFrames(router, std::chrono::milliseconds(0),
                                          limits.max_tensors + 2, &dropped);
      if (frames.ok()) OnRequest(std::move(*frames), dropped);
    }
  }
}

void WorkerServer::Impl::ForgetConn(const std::string& rid_key) {
  auto it = conns.find(rid_key);
  if (it == conns.end()) return;
  if (it->second.fd >= 0) conn_by_fd.erase(it->second.fd);
  conns.erase(it);
  m->connections.Add({{"device", config.id}}).Set(static_cast<double>(conns.size()));
}

void WorkerServer::Impl::DrainMonitor() {
  while (true) {
    // Monitor event: [uint16 event, uint32 value][peer address].
    auto event = transport::RecvFrames(monitor, std::chrono::milliseconds(0));
    if (!event.ok() || event->empty()) return;
    if (event->size() != 2 || (*event)[0].size() < 6) continue;
    uint16_t id = 0;
    uint32_t value = 0;
    std::memcpy(&id, (*event)[0].data(), 2);
    std::memcpy(&value, static_cast<const uint8_t*>((*event)[0].data()) + 2, 4);
    if (id == ZMQ_EVENT_DISCONNECTED) {
      auto it = conn_by_fd.find(static_cast<int>(value));
      if (it != conn_by_fd.end()) ForgetConn(std::string(it->second));
      continue;
    }
    FLEET_LOG(WARNING, "worker") << "refused a connection from " << (*event)[1].to_string() << ": "
                                 << (id == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH
                                         ? "authentication failed"
                                         : "CURVE handshake failed")
                                 << " (event 0x" << std::hex << id << ", code 0x" << value
                                 << std::dec << "; wrong or missing CURVE keys?)";
  }
}

// Runs one request and returns the reply frames ([routing id][header][data...]).
Frames WorkerServer::Impl::Execute(Task& task) {
  const auto* req = flatbuffers::GetRoot<wire::WorkerRequest>(task.header->data());
  const std::string type_name(protocol::RequestTypeName(req->body_type()));
  Frames out;
  out.push_back(std::move(task.rid));
  Status status;
  try {
    status = Dispatch(task, out);
  } catch (const std::exception& e) {  // c10::Error and friends must not kill the worker
    status = InternalError(type_name + ": " + e.what());
  }
  if (!status.ok()) {
    FLEET_LOG(INFO, "worker") << type_name << " from '" << task.conn.peer.peer_name
                              << "' failed: " << status;
    zmq::message_t rid = std::move(out[0]);
    out.clear();
    out.push_back(std::move(rid));
    flatbuffers::FlatBufferBuilder fbb;
    protocol::FinishErrorResponse(fbb, req->id(), status);
    out.push_back(transport::MessageFromBuffer(fbb.Release()));
  }
  m->requests
      .Add({{"device", config.id}, {"type", type_name}, {"outcome", status.ok() ? "ok" : "error"}})
      .Increment();
  return out;
}

void WorkerServer::Impl::HandlerLoop() {
  zmq::socket_t push(transport::Context(), zmq::socket_type::push);
  push.set(zmq::sockopt::linger, 0);
  push.connect(replies_endpoint);
  while (true) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(queue_mu);
      queue_cv.wait(lock, [&] { return queue_closed || !queue.empty(); });
      if (queue.empty()) return;
      task = std::move(queue.front());
      queue.pop_front();
    }
    Frames out = Execute(task);
    transport::SendFrames(push, out).IgnoreError();
  }
}

Status WorkerServer::Impl::Dispatch(Task& task, Frames& out) {
  const auto* req = flatbuffers::GetRoot<wire::WorkerRequest>(task.header->data());
  switch (req->body_type()) {
    case wire::WorkerRequestBody::LoadBlockRequest:
      return HandleLoadBlock(task, *req->body_as_LoadBlockRequest(), out);
    case wire::WorkerRequestBody::EvictBlockRequest:
      return HandleEvictBlock(task, *req->body_as_EvictBlockRequest(), out);
    case wire::WorkerRequestBody::EvictModelRequest:
      return HandleEvictModel(task, *req->body_as_EvictModelRequest(), out);
    case wire::WorkerRequestBody::StatsRequest:
      return HandleStats(task, out);
    case wire::WorkerRequestBody::ReserveRequest:
      return HandleReserve(task, *req->body_as_ReserveRequest(), out);
    case wire::WorkerRequestBody::PutTensorsRequest:
      return HandlePutTensors(task, *req->body_as_PutTensorsRequest(), out);
    case wire::WorkerRequestBody::GetTensorsRequest:
      return HandleGetTensors(task, *req->body_as_GetTensorsRequest(), out);
    case wire::WorkerRequestBody::RunBlocksRequest:
      return compute->Run([&] { return HandleRunBlocks(task, *req->body_as_RunBlocksRequest(), out); });
    case wire::WorkerRequestBody::SendTensorsRequest:
      return HandleSendTensors(task, *req->body_as_SendTensorsRequest(), out);
    case wire::WorkerRequestBody::FetchWeightsRequest:
      return HandleFetchWeights(task, *req->body_as_FetchWeightsRequest(), out);
    case wire::WorkerRequestBody::ReleaseWeightsRequest:
      return HandleReleaseWeights(task, *req->body_as_ReleaseWeightsRequest(), out);
    case wire::WorkerRequestBody::DropJobRequest:
      return HandleDropJob(task, *req->body_as_DropJobRequest(), out);
    case wire::WorkerRequestBody::EndRunRequest:
      return HandleEndRun(task, *req->body_as_EndRunRequest(), out);
    case wire::WorkerRequestBody::SetPatchesRequest:
      return HandleSetPatches(task, *req->body_as_SetPatchesRequest(), out);
    default:
      return UnimplementedError(
          "request type " + std::to_string(static_cast<int>(req->body_type())) +
          " is not known to this worker (protocol " + std::to_string(protocol::kMajor) + "." +
          std::to_string(protocol::kMinor) + ")");
  }
}

// ---------------------------------------------------------------------------------------------
// Inbound tensors and weight placement

StatusOr<std::vector<std::pair<std::string, at::Tensor>>> WorkerServer::Impl::ReadInbound(
    Task& task, const flatbuffers::Vector<flatbuffers::Offset<wire::TensorDesc>>* descs,
    const char* what) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  if (descs == nullptr) return out;
  if (descs->size() > limits.max_tensors) {
    return ResourceExhaustedError(std::string(what) + " carries " + std::to_string(descs->size()) +
                                  " tensors (at most " + std::to_string(limits.max_tensors) + ")");
  }
  auto frames = std::make_shared<Frames>(std::move(task.data));
  // Whatever happens, reservations named here are finished: unclaimed ranges go back.
  std::set<uint64_t> reservations;
  struct Finish {
    transport::ShmReceiver* receiver;
    std::set<uint64_t>* ids;
    ~Finish() {
      if (receiver) {
        for (uint64_t id : *ids) receiver->Finish(id);
      }
    }
  } finish{receiver.get(), &reservations};
  uint64_t total = 0;
  std::set<std::string> names;
  for (size_t i = 0; i < descs->size(); ++i) {
    const wire::TensorDesc* d = descs->Get(i);
    if (d && d->payload() == wire::PayloadKind::ShmReserved) reservations.insert(d->reservation());
  }
  for (size_t i = 0; i < descs->size(); ++i) {
    const wire::TensorDesc* d = descs->Get(i);
    FLEET_RETURN_IF_ERROR(protocol::CheckTensorDesc(
        d, limits, frames->size(), std::string(what) + " tensor " + std::to_string(i)));
    const std::string name = d->name()->str();
    if (!names.insert(name).second) {
      return InvalidArgumentError(std::string(what) + ": tensor '" + name + "' appears twice");
    }
    total += d->nbytes();
    if (total > limits.max_message_bytes) {
      return ResourceExhaustedError(std::string(what) + " carries more than " +
                                    std::to_string(limits.max_message_bytes) + " bytes");
    }
    std::vector<int64_t> shape;
    if (d->shape()) shape.assign(d->shape()->begin(), d->shape()->end());
    at::Tensor t;
    switch (d->payload()) {
      case wire::PayloadKind::None:
        t = at::empty(shape, at::TensorOptions().dtype(internal::ToScalarType(d->dtype())));
        break;
      case wire::PayloadKind::Frame: {
        FLEET_ASSIGN_OR_RETURN(auto bytes, transport::FramePayload(*d, *frames));
        t = internal::WrapBytes(bytes.data(), d->dtype(), shape, frames);
        break;
      }
      case wire::PayloadKind::ShmReserved: {
        if (receiver == nullptr) {
          return FailedPreconditionError("tensor '" + name +
                                         "' names a shm reservation but shm "
                                         "is off on worker " +
                                         config.id);
        }
        FLEET_ASSIGN_OR_RETURN(auto block,
                               receiver->Claim(d->reservation(), d->offset(), d->nbytes()));
        std::shared_ptr<transport::ArenaBlock> shared = std::move(block);
        t = internal::WrapBytes(shared->data(), d->dtype(), shape, shared);
        break;
      }
      default:
        return InvalidArgumentError("tensor '" + name + "': payload kind " +
                                    std::to_string(static_cast<int>(d->payload())) +
                                    " is only valid in replies");
    }
    out.emplace_back(name, std::move(t));
  }
  return out;
}

Status WorkerServer::Impl::PlaceWeight(const std::string& name, models::StoredWeight weight,
                                       Block& block) {
  at::Tensor data = weight.data.contiguous();
  const uint64_t bytes = internal::TensorBytes(data);
  if (device.is_cuda()) {
    data = data.to(device);
  } else if (arena != nullptr && arena->Contains(data.data_ptr(), bytes) &&
             static_cast<uint8_t*>(data.data_ptr()) >= arena->base() + arena->staging_bytes()) {
    // Read straight into the arena and kept as read (or prepared in place): nothing to copy.
    block.arena_offsets[name] = static_cast<uint8_t*>(data.data_ptr()) - arena->base();
  } else if (arena != nullptr && bytes > 0) {
    auto dest = arena->Allocate(transport::ArenaRange::kWeights, bytes);
    if (dest.ok()) {
      std::shared_ptr<transport::ArenaBlock> shared = std::move(*dest);
      std::memcpy(shared->data(), data.data_ptr(), bytes);
      block.arena_offsets[name] = shared->offset();
      data = internal::WrapBytes(shared->data(), internal::FromScalarType(data.scalar_type()),
                                 internal::ShapeOf(data), shared);
    } else {
      FLEET_VLOG(1, "worker") << "weight '" << name << "' stays in the heap: " << dest.status();
    }
  }
  block.bytes += bytes;
  weight.data = std::move(data);
  block.weights[name] = std::move(weight);
  return Status::OK();
}

StatusOr<std::shared_ptr<models::Model>> WorkerServer::Impl::GetOrCreateModelLocked(
    const wire::LoadBlockRequest& r) {
  const std::string name = Str(r.model());
  const std::string family = Str(r.family());
  const std::string config_json = Str(r.config_json());
  std::optional<at::ScalarType> dequant;
  switch (r.dequant_dtype()) {
    case wire::DType::Invalid:
      break;
    case wire::DType::F32:
    case wire::DType::F16:
    case wire::DType::BF16:
      dequant = internal::ToScalarType(r.dequant_dtype());
      break;
    default:
      return InvalidArgumentError("dequant dtype " +
                                  std::string(protocol::DTypeName(r.dequant_dtype())) +
                                  " of model '" + name + "' is not f32, f16 or bf16");
  }
  auto it = models_.find(name);
  if (it != models_.end()) {
    const ModelEntry& e = it->second;
    if (e.family != family || e.config_json != config_json || e.dtype != r.compute_dtype() ||
        e.dequant != dequant) {
      return AlreadyExistsError("model '" + name + "' is loaded here as family '" + e.family +
                                "' dtype " + std::string(protocol::DTypeName(e.dtype)) +
                                " with another configuration; evict it before loading a "
                                "different model under that name");
    }
    return e.model;
  }
  switch (r.compute_dtype()) {
    case wire::DType::F32:
    case wire::DType::F16:
    case wire::DType::BF16:
    case wire::DType::F64:
      break;
    default:
      return InvalidArgumentError("compute dtype " +
                                  std::string(protocol::DTypeName(r.compute_dtype())) +
                                  " of model '" + name + "' is not a floating type");
  }
  FLEET_ASSIGN_OR_RETURN(
      std::unique_ptr<models::Model> created,
      models::CreateModel(family, config_json, internal::ToScalarType(r.compute_dtype())));
  ModelEntry e;
  e.family = family;
  e.config_json = config_json;
  e.dtype = r.compute_dtype();
  e.dequant = dequant;
  e.model = std::move(created);
  for (size_t i = 0; i < e.model->block_names().size(); ++i) e.index[e.model->block_names()[i]] = i;
  auto model = e.model;
  models_.emplace(name, std::move(e));
  return model;
}

// ---------------------------------------------------------------------------------------------
// Handlers

Status WorkerServer::Impl::HandleLoadBlock(Task& task, const wire::LoadBlockRequest& r,
                                           Frames& out) {
  const std::string model_name = Str(r.model());
  const std::string block_name = Str(r.block());
  FLEET_RETURN_IF_ERROR(CheckName(model_name, "LoadBlock: model name"));
  FLEET_RETURN_IF_ERROR(CheckName(block_name, "LoadBlock: block name"));
  const std::string what = "block '" + block_name + "' of model '" + model_name + "'";
  auto fail = [&](const Status& s) {
    m->block_loads
        .Add({{"device", config.id},
              {"outcome", s.code() == StatusCode::kResourceExhausted ? "refused" : "failed"}})
        .Increment();
    return s;
  };

  // Estimate the prepared size (floating weights become the compute dtype) to reserve capacity.
  const size_t compute_size = protocol::DTypeSize(r.compute_dtype());
  auto prepared_size = [&](wire::DType dtype, uint64_t nbytes) -> uint64_t {
    const size_t size = protocol::DTypeSize(dtype);
    // fp8 stays as stored (expanded at use); other floating weights take the compute dtype.
    const bool floating = dtype == wire::DType::F32 || dtype == wire::DType::F16 ||
                          dtype == wire::DType::BF16 || dtype == wire::DType::F64;
    if (!floating || size == 0 || compute_size == 0) return nbytes;
    if (r.weight_dtype() == wire::DType::F8E4M3 || r.weight_dtype() == wire::DType::F8E5M2) {
      return nbytes / size;  // kept as fp8
    }
    return std::max(nbytes, nbytes / size * compute_size);
  };
  if (r.weight_dtype() != wire::DType::Invalid && r.weight_dtype() != wire::DType::F8E4M3 &&
      r.weight_dtype() != wire::DType::F8E5M2) {
    return fail(InvalidArgumentError("LoadBlock of " + what + ": weight dtype " +
                                     std::string(protocol::DTypeName(r.weight_dtype())) +
                                     " is not F8E4M3 or F8E5M2"));
  }
  uint64_t estimate = 0;
  const wire::FileSource* file = r.source_as_FileSource();
  const wire::WireSource* wire_source = r.source_as_WireSource();
  if (file == nullptr && wire_source == nullptr) {
    return fail(InvalidArgumentError("LoadBlock of " + what + " has no source (file or wire)"));
  }
  if (file != nullptr) {
    if (file->tensors() == nullptr || file->tensors()->size() == 0) {
      return fail(InvalidArgumentError("LoadBlock of " + what + " lists no tensors"));
    }
    if (file->tensors()->size() > limits.max_tensors) {
      return fail(ResourceExhaustedError("LoadBlock of " + what + " lists too many tensors"));
    }
    for (const auto* t : *file->tensors()) {
      const std::string tname = Str(t->name());
      if (tname.empty()) return fail(InvalidArgumentError(what + ": a file tensor has no name"));
      std::span<const int64_t> shape;
      if (t->shape()) shape = {t->shape()->data(), t->shape()->size()};
      if (shape.size() > limits.max_rank) {
        return fail(
            InvalidArgumentError(what + ": tensor '" + tname + "' has too many dimensions"));
      }
      auto need = protocol::TensorBytes(t->dtype(), shape);
      if (!need.ok()) return fail(need.status().WithContext(what + ": tensor '" + tname + "'"));
      if (t->quant() != nullptr && t->quant()->size() > 0) {
        Status q = CheckQuantised(*t, shape);
        if (!q.ok()) return fail(q.WithContext(what + ": tensor '" + tname + "'"));
        estimate += t->nbytes();  // held as stored, expanded at use
        continue;
      }
      if (*need != t->nbytes()) {
        return fail(InvalidArgumentError(
            what + ": tensor '" + tname + "' declares " + std::to_string(t->nbytes()) +
            " bytes, its dtype and shape need " + std::to_string(*need)));
      }
      estimate += prepared_size(t->dtype(), t->nbytes());
    }
  } else if (wire_source->tensors() != nullptr) {
    for (const auto* d : *wire_source->tensors()) {
      estimate += prepared_size(d->dtype(), d->nbytes());
    }
  }

  std::shared_ptr<models::Model> model;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto created = GetOrCreateModelLocked(r);
    if (!created.ok()) return fail(created.status());
    model = *created;
    ModelEntry& e = models_.at(model_name);
    if (e.index.count(block_name) == 0) {
      return fail(NotFoundError("model '" + model_name + "' (" + e.family + ") has no block '" +
                                block_name + "' (it has " + std::to_string(e.index.size()) +
                                " blocks)"));
    }
    if (e.blocks.count(block_name) != 0) {
      return fail(AlreadyExistsError(what + " is already resident on " + config.id));
    }
    const uint64_t capacity = config.capacity_bytes;
    if (resident + pending + patched + estimate > capacity) DropAllPatchedLocked();
    if (resident + pending + estimate > capacity) {
      return fail(ResourceExhaustedError(
          "loading " + what + " needs " + config::FormatBytes(estimate) + " (" +
          std::to_string(estimate) + " bytes) but " + config.id + " has only " +
          config::FormatBytes(capacity - std::min(capacity, resident + pending)) + " of its " +
          config::FormatBytes(capacity) + " capacity free (" + config::FormatBytes(resident) +
          " resident, " + config::FormatBytes(pending) + " being loaded)"));
    }
    pending += estimate;
  }
  struct Unreserve {
    Impl* impl;
    uint64_t bytes;
    ~Unreserve() {
      std::lock_guard<std::mutex> lock(impl->mu);
      impl->pending -= bytes;
    }
  } unreserve{this, estimate};

  Block block;
  uint64_t stored_bytes = 0;
  const char* source = file != nullptr ? "file" : "wire";
  if (file != nullptr) {
    auto path = ResolveModelPath(config.model_roots, Str(file->path()));
    if (!path.ok()) return fail(path.status());
    const int fd = open(path->c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail(NotFoundError("cannot open '" + *path + "': " + std::strerror(errno)));
    struct Closer {
      int fd;
      ~Closer() { close(fd); }
    } closer{fd};
    struct stat st {};
    fstat(fd, &st);
    const auto file_size = static_cast<uint64_t>(st.st_size);
    for (const auto* t : *file->tensors()) {
      const std::string tname = Str(t->name());
      if (t->offset() > file_size || t->nbytes() > file_size - t->offset()) {
        return fail(OutOfRangeError(
            "'" + Str(file->path()) + "': tensor '" + tname + "' bytes [" +
            std::to_string(t->offset()) + ", " + std::to_string(t->offset() + t->nbytes()) +
            ") end past the file (" + std::to_string(file_size) + " bytes)"));
      }
      // Read straight into the arena's weights range when we can, else into the heap. GGUF
      // blocks are kept as bytes (shape [nbytes]) and expanded at use.
      const std::string quant = Str(t->quant());
      std::vector<int64_t> shape;
      if (t->shape()) shape.assign(t->shape()->begin(), t->shape()->end());
      const wire::DType held_dtype = quant.empty() ? t->dtype() : wire::DType::U8;
      const std::vector<int64_t> held_shape =
          quant.empty() ? shape : std::vector<int64_t>{static_cast<int64_t>(t->nbytes())};
      std::shared_ptr<transport::ArenaBlock> dest;
      if (arena != nullptr && !device.is_cuda() && t->nbytes() > 0) {
        auto a = arena->Allocate(transport::ArenaRange::kWeights, t->nbytes());
        if (a.ok()) dest = std::move(*a);
      }
      at::Tensor stored;
      uint8_t* p;
      if (dest) {
        p = dest->data();
        stored = internal::WrapBytes(p, held_dtype, held_shape, dest);
      } else {
        stored =
            at::empty(held_shape, at::TensorOptions().dtype(internal::ToScalarType(held_dtype)));
        p = static_cast<uint8_t*>(stored.data_ptr());
      }
      uint8_t* read_to = p;
      uint64_t done = 0;
      while (done < t->nbytes()) {
        const ssize_t n = pread(fd, read_to + done, t->nbytes() - done,
                                static_cast<off_t>(t->offset() + done));
        if (n <= 0) {
          return fail(
              DataLossError("'" + Str(file->path()) + "': reading tensor '" + tname +
                            "' failed at byte " + std::to_string(t->offset() + done) +
                            (n < 0 ? std::string(": ") + std::strerror(errno) : ": end of file")));
        }
        done += static_cast<uint64_t>(n);
      }
      if (t->sha256() != nullptr && t->sha256()->size() > 0) {
        const std::string got = Sha256Hex(read_to, t->nbytes());
        if (got != t->sha256()->str()) {
          return fail(DataLossError("'" + Str(file->path()) + "': tensor '" + tname +
                                    "' has sha256 " + got + ", expected " + t->sha256()->str() +
                                    " (file changed or corrupt)"));
        }
      }
      stored_bytes += t->nbytes();
      auto weight = StoreWeight(*model, tname, stored, t->dtype(), quant, shape, r.weight_dtype());
      if (!weight.ok()) return fail(weight.status().WithContext(what));
      Status placed = PlaceWeight(tname, std::move(*weight), block);
      if (!placed.ok()) return fail(placed.WithContext(what));
    }
  } else {
    auto inbound = ReadInbound(task, wire_source->tensors(), "LoadBlock");
    if (!inbound.ok()) return fail(inbound.status().WithContext(what));
    if (inbound->empty())
      return fail(InvalidArgumentError("LoadBlock of " + what + " carries no tensors"));
    for (auto& [name, stored] : *inbound) {
      stored_bytes += internal::TensorBytes(stored);
      auto prepared = model->PrepareWeight(name, stored);
      if (!prepared.ok()) return fail(prepared.status().WithContext(what));
      at::Tensor resident = *prepared;
      if (resident.data_ptr() == stored.data_ptr()) resident = resident.clone();  // not the frames
      Status placed = PlaceWeight(name, models::StoredWeight::Resident(resident), block);
      if (!placed.ok()) return fail(placed.WithContext(what));
    }
    m->transfer_bytes.Add({{"src", Src(task.conn)}, {"dst", config.id}, {"kind", "weights"}})
        .Increment(static_cast<double>(stored_bytes));
  }
  Status scaled = models::AttachScales(block.weights);
  if (!scaled.ok()) return fail(scaled.WithContext(what));

  {
    std::lock_guard<std::mutex> lock(mu);
    if (resident + pending - estimate + block.bytes > config.capacity_bytes) {
      return fail(ResourceExhaustedError("prepared " + what + " takes " +
                                         config::FormatBytes(block.bytes) +
                                         ", more than the capacity left on " + config.id));
    }
    auto it = models_.find(model_name);
    if (it == models_.end()) {
      return fail(
          CancelledError("model '" + model_name + "' was evicted while " + what + " loaded"));
    }
    it->second.bytes += block.bytes;
    resident += block.bytes;
    it->second.blocks.emplace(block_name, std::move(block));
    UpdateModelGaugesLocked(model_name);
  }
  m->block_loads.Add({{"device", config.id}, {"outcome", "ok"}}).Increment();
  m->load_bytes.Add({{"device", config.id}, {"source", source}})
      .Increment(static_cast<double>(stored_bytes));
  FLEET_VLOG(1, "worker") << "loaded " << what << " from " << source;
  return Ack(task, out);
}

Status WorkerServer::Impl::HandleEvictBlock(Task& task, const wire::EvictBlockRequest& r,
                                            Frames& out) {
  const std::string model_name = Str(r.model()), block_name = Str(r.block());
  {
    std::lock_guard<std::mutex> lock(mu);
    ExpireLeasesLocked();
    auto it = models_.find(model_name);
    if (it == models_.end())
      return NotFoundError("model '" + model_name + "' is not loaded on " + config.id);
    auto b = it->second.blocks.find(block_name);
    if (b == it->second.blocks.end()) {
      return NotFoundError("block '" + block_name + "' of model '" + model_name +
                           "' is not resident on " + config.id);
    }
    if (b->second.pins > 0) {
      return FailedPreconditionError("block '" + block_name + "' of model '" + model_name +
                                     "' is in use (" + std::to_string(b->second.pins) +
                                     " weight leases or computations); retry once they finish");
    }
    DropPatchedLocked(model_name, &b->second.weights);
    resident -= b->second.bytes;
    it->second.bytes -= b->second.bytes;
    it->second.blocks.erase(b);
    UpdateModelGaugesLocked(model_name);
  }
  return Ack(task, out);
}

Status WorkerServer::Impl::HandleEvictModel(Task& task, const wire::EvictModelRequest& r,
                                            Frames& out) {
  const std::string model_name = Str(r.model());
  {
    std::lock_guard<std::mutex> lock(mu);
    ExpireLeasesLocked();
    auto it = models_.find(model_name);
    if (it == models_.end())
      return NotFoundError("model '" + model_name + "' is not loaded on " + config.id);
    for (const auto& [name, b] : it->second.blocks) {
      if (b.pins > 0) {
        return FailedPreconditionError("block '" + name + "' of model '" + model_name +
                                       "' is in use; retry once its leases are released");
      }
    }
    while (!it->second.patch_sets.empty()) {
      ErasePatchSetLocked(model_name, it->second, it->second.patch_sets.begin()->first);
    }
    resident -= it->second.bytes;
    models_.erase(it);
    UpdateModelGaugesLocked(model_name);
  }
  return Ack(task, out);
}

flatbuffers::Offset<wire::StatsResponse> WorkerServer::Impl::BuildStats(
    flatbuffers::FlatBufferBuilder& fbb) {
  std::lock_guard<std::mutex> lock(mu);
  std::vector<flatbuffers::Offset<wire::ModelStats>> ms;
  for (const auto& [name, e] : models_) {
    std::vector<std::string> blocks;
    for (const auto& [b, _] : e.blocks) blocks.push_back(b);
    ms.push_back(wire::CreateModelStats(fbb, fbb.CreateString(name),
                                        fbb.CreateVectorOfStrings(blocks), e.bytes));
  }
  return wire::CreateStatsResponse(
      fbb, fbb.CreateString(config.id), fbb.CreateString(config.backing), config.capacity_bytes,
      config.total_bytes, resident, fbb.CreateVector(ms), arena ? arena->size() : 0,
      arena ? arena->used_bytes() : 0, ActivationBytesLocked(), static_cast<uint32_t>(jobs.size()));
}

Status WorkerServer::Impl::HandleStats(Task& task, Frames& out) {
  flatbuffers::FlatBufferBuilder fbb;
  auto stats = BuildStats(fbb);
  return Reply(task, fbb, wire::WorkerResponseBody::StatsResponse, stats.Union(), {}, out);
}

Status WorkerServer::Impl::HandleReserve(Task& task, const wire::ReserveRequest& r, Frames& out) {
  if (receiver == nullptr || (task.conn.caps & protocol::kCapShm) == 0) {
    return FailedPreconditionError("Reserve: shm was not negotiated on this connection");
  }
  std::vector<uint64_t> sizes;
  if (r.sizes()) sizes.assign(r.sizes()->begin(), r.sizes()->end());
  if (sizes.size() > limits.max_tensors) {
    return ResourceExhaustedError("Reserve of " + std::to_string(sizes.size()) + " ranges");
  }
  uint64_t total = 0;
  for (uint64_t s : sizes) {
    if (s > limits.max_message_bytes || total + s > limits.max_message_bytes) {
      return ResourceExhaustedError("Reserve asks for more than the message limit of " +
                                    std::to_string(limits.max_message_bytes) + " bytes");
    }
    total += s;
  }
  FLEET_ASSIGN_OR_RETURN(transport::Reservation grant, receiver->Reserve(sizes));
  flatbuffers::FlatBufferBuilder fbb;
  auto body = wire::CreateReserveResponse(fbb, grant.id, fbb.CreateString(arena->name()),
                                          fbb.CreateVector(grant.offsets));
  return Reply(task, fbb, wire::WorkerResponseBody::ReserveResponse, body.Union(), {}, out);
}

Status WorkerServer::Impl::HandlePutTensors(Task& task, const wire::PutTensorsRequest& r,
                                            Frames& out) {
  const std::string job = Str(r.job());
  FLEET_RETURN_IF_ERROR(CheckName(job, "PutTensors: job"));
  FLEET_ASSIGN_OR_RETURN(auto tensors, ReadInbound(task, r.tensors(), "PutTensors"));
  const std::vector<std::string> constant = Strs(r.run_constant());
  const std::string run_id = Str(r.run_id());
  for (const auto& c : constant) {
    if (run_id.empty())
      return InvalidArgumentError("PutTensors: run-constant tensors need a run id");
    bool found = false;
    for (const auto& [n, t] : tensors) found = found || n == c;
    if (!found)
      return InvalidArgumentError("PutTensors: run-constant '" + c +
                                  "' is not among the tensors sent");
  }
  uint64_t bytes = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (dropped_jobs.count(job) != 0) return DroppedJobError(job);
    Job& j = jobs[job];
    j.touched = Clock::now();
    if (!constant.empty()) run_touched[run_id] = j.touched;
    for (auto& [name, t] : tensors) {
      bytes += internal::TensorBytes(t);
      if (device.is_cuda()) t = t.to(device);
      if (std::find(constant.begin(), constant.end(), name) != constant.end())
        runs[run_id][name] = t;
      j.tensors[name] = t;
    }
    UpdateActivationGaugeLocked();
  }
  const std::string src = Src(task.conn);
  m->transfer_bytes.Add({{"src", src}, {"dst", config.id}, {"kind", "activations"}})
      .Increment(static_cast<double>(bytes));
  m->transfer_duration
      .Add({{"src", src}, {"dst", config.id}, {"kind", "activations"}}, metrics::DurationBuckets())
      .Observe(Seconds(Clock::now() - task.received));
  return Ack(task, out);
}

namespace {
// Descriptors plus zero-copy frames for tensors going out in a reply.
flatbuffers::Offset<flatbuffers::Vector<flatbuffers::Offset<wire::TensorDesc>>> FrameTensors(
    flatbuffers::FlatBufferBuilder& fbb,
    const std::vector<std::pair<std::string, at::Tensor>>& tensors, Frames& data) {
  std::vector<flatbuffers::Offset<wire::TensorDesc>> descs;
  for (const auto& [name, t0] : tensors) {
    at::Tensor t = t0.to(at::kCPU).contiguous();
    const uint64_t bytes = internal::TensorBytes(t);
    uint32_t frame = 0;
    auto kind = wire::PayloadKind::None;
    if (bytes > 0) {
      data.push_back(
          transport::ZeroCopyMessage(t.data_ptr(), bytes, std::make_shared<at::Tensor>(t)));
      frame = static_cast<uint32_t>(data.size());
      kind = wire::PayloadKind::Frame;
    }
    descs.push_back(wire::CreateTensorDesc(
        fbb, fbb.CreateString(name), internal::FromScalarType(t.scalar_type()),
        fbb.CreateVector(internal::ShapeOf(t)), bytes, kind, frame));
  }
  return fbb.CreateVector(descs);
}
}  // namespace

Status WorkerServer::Impl::HandleGetTensors(Task& task, const wire::GetTensorsRequest& r,
                                            Frames& out) {
  const std::string job = Str(r.job());
  std::vector<std::pair<std::string, at::Tensor>> found;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = jobs.find(job);
    if (it == jobs.end()) return NotFoundError("job '" + job + "' has no tensors on " + config.id);
    // No names: the whole state of the job moves (a pipelined range boundary).
    std::vector<std::string> names = Strs(r.names());
    if (names.empty()) {
      for (const auto& [name, tensor] : it->second.tensors) names.push_back(name);
    }
    for (const auto& name : names) {
      auto t = it->second.tensors.find(name);
      if (t == it->second.tensors.end()) {
        std::string have;
        for (const auto& [n, _] : it->second.tensors) have += (have.empty() ? "" : ", ") + n;
        return NotFoundError("job '" + job + "' has no tensor '" + name + "' on " + config.id +
                             " (it has: " + have + ")");
      }
      found.emplace_back(name, t->second);
    }
  }
  for (const auto& [name, t] : found) {
    if (internal::FromScalarType(t.scalar_type()) == wire::DType::Invalid) {
      return UnimplementedError("tensor '" + name + "' has a dtype the wire format cannot carry");
    }
  }
  flatbuffers::FlatBufferBuilder fbb;
  Frames data;
  auto descs = FrameTensors(fbb, found, data);
  auto body = wire::CreateTensorsResponse(fbb, descs, 0);
  return Reply(task, fbb, wire::WorkerResponseBody::TensorsResponse, body.Union(), std::move(data),
               out);
}

// The accessor of a resident block under a patch set: a patched weight is computed once and
// kept while the device has capacity to spare (LoadBlock takes the room back first), so steady
// steps read it like any resident weight. The bits are those PatchedWeights computes.
class WorkerServer::Impl::KeptPatches final : public models::WeightAccessor {
 public:
  KeptPatches(Impl& impl, std::string model, std::shared_ptr<PatchSetState> state,
              const models::WeightAccessor& base)
      : impl_(impl), model_(std::move(model)), state_(std::move(state)), base_(base) {}

  StatusOr<at::Tensor> Get(std::string_view name) const override {
    auto p = state_->patches->find(name);
    if (p == state_->patches->end() || p->second.empty()) return base_.Get(name);
    {
      std::lock_guard<std::mutex> lock(impl_.mu);
      auto kept = state_->patched.find(name);
      if (kept != state_->patched.end()) return kept->second;
    }
    FLEET_ASSIGN_OR_RETURN(at::Tensor w, base_.Get(name));
    FLEET_ASSIGN_OR_RETURN(at::Tensor patched, models::ApplyPatches(name, w, p->second));
    const auto bytes = static_cast<uint64_t>(patched.nbytes());
    std::lock_guard<std::mutex> lock(impl_.mu);
    if (impl_.HoldsPatchSetLocked(model_, state_) &&
        impl_.resident + impl_.pending + impl_.patched + bytes <= impl_.config.capacity_bytes &&
        state_->patched.emplace(std::string(name), patched).second) {
      state_->patched_bytes += bytes;
      impl_.patched += bytes;
      impl_.UpdatePatchedGaugeLocked(model_);
    }
    return patched;
  }
  bool Has(std::string_view name) const override { return base_.Has(name); }

 private:
  Impl& impl_;
  const std::string model_;
  const std::shared_ptr<PatchSetState> state_;
  const models::WeightAccessor& base_;
};

Status WorkerServer::Impl::HandleRunBlocks(Task& task, const wire::RunBlocksRequest& r,
                                           Frames& out) {
  const std::string job = Str(r.job()), model_name = Str(r.model()), run_id = Str(r.run_id());
  const uint32_t depth = std::clamp<uint32_t>(r.prefetch_depth(), 1, 16);
  struct Step {
    std::string block;
    size_t index = 0;
    std::string donor;
  };
  std::vector<Step> steps;
  std::shared_ptr<models::Model> model;
  std::optional<at::ScalarType> dequant;
  models::TensorMap state;
  std::set<std::string> from_cache;
  static const models::PatchSet kNoPatches;
  std::shared_ptr<PatchSetState> patches;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = models_.find(model_name);
    if (it == models_.end())
      return NotFoundError("model '" + model_name + "' is not loaded on " + config.id);
    model = it->second.model;
    dequant = it->second.dequant;
    if (const std::string id = Str(r.patches()); !id.empty()) {
      auto p = it->second.patch_sets.find(id);
      if (p == it->second.patch_sets.end()) {
        return FailedPreconditionError("patch set '" + id + "' of model '" + model_name +
                                       "' is not on " + config.id + " (SetPatches first)");
      }
      patches = p->second;
    }
    auto j = jobs.find(job);
    if (j == jobs.end())
      return NotFoundError("job '" + job + "' has no tensors on " + config.id +
                           " (PutTensors first)");
    j->second.touched = Clock::now();
    state = j->second.tensors;
    if (!run_id.empty()) {
      auto run = runs.find(run_id);
      if (run != runs.end()) {
        run_touched[run_id] = j->second.touched;
        for (const auto& [n, t] : run->second) {
          if (state.emplace(n, t).second) from_cache.insert(n);
        }
      }
    }
    if (r.steps()) {
      for (const auto* s : *r.steps()) {
        Step step;
        step.block = Str(s->block());
        auto idx = it->second.index.find(step.block);
        if (idx == it->second.index.end()) {
          return NotFoundError("model '" + model_name + "' has no block '" + step.block + "'");
        }
        step.index = idx->second;
        if (s->site() == wire::WeightSite::Stream) {
          step.donor = Str(s->donor());
          if (step.donor.empty())
            return InvalidArgumentError("streamed block '" + step.block + "' names no donor");
        } else if (it->second.blocks.count(step.block) == 0) {
          return NotFoundError("block '" + step.block + "' of model '" + model_name +
                               "' is not resident on " + config.id +
                               "; load it here or stream it from a donor");
        }
        steps.push_back(std::move(step));
      }
    }
    // Pin resident blocks for the duration of the run.
    for (const auto& step : steps) {
      if (step.donor.empty()) ++it->second.blocks.at(step.block).pins;
    }
  }
  auto unpin = [&] {
    std::lock_guard<std::mutex> lock(mu);
    auto it = models_.find(model_name);
    if (it == models_.end()) return;
    for (const auto& step : steps) {
      if (!step.donor.empty()) continue;
      auto b = it->second.blocks.find(step.block);
      if (b != it->second.blocks.end()) --b->second.pins;
    }
  };
  struct Unpin {
    std::function<void()> f;
    ~Unpin() { f(); }
  } unpin_guard{unpin};

  // Prefetch thread: pulls the weights of the next `depth` streamed blocks while we compute.
  struct Fetched {
    Status status;
    models::WeightStore weights;
    uint64_t lease = 0;
    uint64_t bytes = 0;
    std::shared_ptr<WorkerClient> donor;
  };
  std::mutex pm;
  std::condition_variable pcv;
  std::deque<Fetched> ready;
  bool cancel = false;
  const bool streams = std::any_of(steps.begin(), steps.end(),
                                   [](const Step& s) { return !s.donor.empty(); });
  std::thread prefetch;  // only when a step streams its weights
  if (streams) prefetch = std::thread([&] {
    for (const auto& step : steps) {
      if (step.donor.empty()) continue;
      {
        std::unique_lock<std::mutex> lock(pm);
        pcv.wait(lock, [&] { return cancel || ready.size() < depth; });
        if (cancel) return;
      }
      Fetched f;
      const auto t0 = Clock::now();
      // An exception here (a CUDA out-of-memory moving the weights to the device) must fail this
      // RunBlocks, not reach std::terminate and take every resident block with the process.
      try {
        auto donor = Peer(step.donor);
        if (!donor.ok()) {
          f.status = donor.status().WithContext("weight donor " + step.donor);
        } else {
          f.donor = *donor;
          auto w = (*donor)->FetchWeights(model_name, step.block);
          if (!w.ok()) {
            f.status =
                w.status().WithContext("fetching block '" + step.block + "' from " + step.donor);
            if (w.status().code() == StatusCode::kUnavailable ||
                w.status().code() == StatusCode::kDeadlineExceeded) {
              DropPeer(step.donor);
            }
          } else {
            f.lease = w->lease;
            f.bytes = w->bytes;
            for (auto& t : w->tensors) {
              auto weight = ReceivedWeight(t);
              if (!weight.ok()) {
                f.status =
                    weight.status().WithContext("block '" + step.block + "' from " + step.donor);
                break;
              }
              if (device.is_cuda()) weight->data = weight->data.to(device);
              f.weights[t.name] = std::move(*weight);
            }
            if (f.status.ok()) {
              f.status = models::AttachScales(f.weights).WithContext("block '" + step.block +
                                                                     "' from " + step.donor);
            }
            const std::string src =
                f.donor->peer().device.empty() ? step.donor : f.donor->peer().device;
            m->transfer_bytes.Add({{"src", src}, {"dst", config.id}, {"kind", "weights"}})
                .Increment(static_cast<double>(f.bytes));
            m->transfer_duration
                .Add({{"src", src}, {"dst", config.id}, {"kind", "weights"}},
                     metrics::DurationBuckets())
                .Observe(Seconds(Clock::now() - t0));
          }
        }
      } catch (const std::exception& e) {
        f.weights.clear();
        f.status = InternalError("fetching block '" + step.block + "' from " + step.donor + ": " +
                                 e.what());
      }
      const bool failed = !f.status.ok();
      {
        std::lock_guard<std::mutex> lock(pm);
        ready.push_back(std::move(f));
      }
      pcv.notify_all();
      if (failed) return;
    }
  });
  auto release = [&](Fetched& f) {
    if (f.lease != 0 && f.donor) {
      f.weights.clear();
      Status s = f.donor->ReleaseWeights(f.lease);
      if (!s.ok())
        FLEET_LOG(WARNING, "worker") << "releasing weight lease " << f.lease << ": " << s;
    }
  };
  auto stop_prefetch = [&] {
    {
      std::lock_guard<std::mutex> lock(pm);
      cancel = true;
    }
    pcv.notify_all();
    if (prefetch.joinable()) prefetch.join();
    for (auto& f : ready) release(f);
    ready.clear();
  };

  RunBlocksResult result;
  Status status;
  for (const auto& step : steps) {
    models::WeightStore weights;
    Fetched fetched;
    if (step.donor.empty()) {
      std::lock_guard<std::mutex> lock(mu);
      weights = models_.at(model_name).blocks.at(step.block).weights;
    } else {
      const auto t0 = Clock::now();
      {
        std::unique_lock<std::mutex> lock(pm);
        pcv.wait(lock, [&] { return !ready.empty(); });
        fetched = std::move(ready.front());
        ready.pop_front();
      }
      pcv.notify_all();
      result.prefetch_stall_seconds += Seconds(Clock::now() - t0);
      if (!fetched.status.ok()) {
        status = fetched.status;
        release(fetched);  // a lease taken before the failure goes back to the donor
        break;
      }
      result.streamed_bytes += fetched.bytes;
      weights = std::move(fetched.weights);
    }
    const auto t0 = Clock::now();
    const models::StoredWeights stored(*model, weights, dequant);
    if (patches && step.donor.empty()) {  // resident: patched copies may be kept
      status = model->RunBlock(step.index, KeptPatches(*this, model_name, patches, stored), state);
    } else {
      status = model->RunBlock(
          step.index, models::PatchedWeights(stored, patches ? *patches->patches : kNoPatches),
          state);
    }
    const double dt = Seconds(Clock::now() - t0);
    weights.clear();
    if (!step.donor.empty()) release(fetched);
    if (!status.ok()) break;
    result.compute_seconds += dt;
    ++result.blocks_run;
    m->block_compute_duration
        .Add({{"device", config.id}, {"model", model_name}, {"block", step.block}},
             metrics::DurationBuckets())
        .Observe(dt);
  }
  stop_prefetch();
  m->prefetch_stall.Add({{"device", config.id}, {"model", model_name}})
      .Increment(result.prefetch_stall_seconds);
  FLEET_RETURN_IF_ERROR(status.WithContext("RunBlocks of job '" + job + "'"));
  {
    std::lock_guard<std::mutex> lock(mu);
    if (dropped_jobs.count(job) != 0) {
      return CancelledError("job '" + job + "' was dropped while its RunBlocks ran on " +
                            config.id + "; the results are discarded");
    }
    Job& j = jobs[job];
    j.touched = Clock::now();
    for (auto& [name, t] : state) {
      if (from_cache.count(name) != 0 && runs.count(run_id) != 0) {
        auto c = runs[run_id].find(name);
        if (c != runs[run_id].end() && c->second.is_same(t)) continue;  // unchanged constant
      }
      j.tensors[name] = t;
    }
    UpdateActivationGaugeLocked();
  }
  flatbuffers::FlatBufferBuilder fbb;
  auto body = wire::CreateRunBlocksResponse(fbb, result.blocks_run, result.compute_seconds,
                                            result.prefetch_stall_seconds, result.streamed_bytes);
  return Reply(task, fbb, wire::WorkerResponseBody::RunBlocksResponse, body.Union(), {}, out);
}

Status WorkerServer::Impl::HandleSendTensors(Task& task, const wire::SendTensorsRequest& r,
                                             Frames& out) {
  const std::string job = Str(r.job()), peer = Str(r.peer()), peer_job = Str(r.peer_job());
  FLEET_RETURN_IF_ERROR(CheckName(peer, "SendTensors: peer endpoint"));
  FLEET_RETURN_IF_ERROR(CheckName(peer_job, "SendTensors: peer job"));
  std::vector<HostTensor> hosts;
  uint64_t bytes = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = jobs.find(job);
    if (it == jobs.end()) return NotFoundError("job '" + job + "' has no tensors on " + config.id);
    // No names: the whole state of the job moves (a pipelined range boundary).
    std::vector<std::string> names = Strs(r.names());
    if (names.empty()) {
      for (const auto& [name, tensor] : it->second.tensors) names.push_back(name);
    }
    for (const auto& name : names) {
      auto t = it->second.tensors.find(name);
      if (t == it->second.tensors.end()) {
        return NotFoundError("job '" + job + "' has no tensor '" + name + "' on " + config.id);
      }
      at::Tensor c = t->second.to(at::kCPU).contiguous();
      HostTensor h;
      h.name = name;
      h.dtype = internal::FromScalarType(c.scalar_type());
      if (h.dtype == wire::DType::Invalid) {
        return UnimplementedError("tensor '" + name + "' has a dtype the wire format cannot carry");
      }
      h.shape = internal::ShapeOf(c);
      h.nbytes = internal::TensorBytes(c);
      h.data = static_cast<const uint8_t*>(c.data_ptr());
      h.owner = std::make_shared<at::Tensor>(c);
      bytes += h.nbytes;
      hosts.push_back(std::move(h));
    }
  }
  FLEET_ASSIGN_OR_RETURN(auto client, Peer(peer));
  const auto t0 = Clock::now();
  Status s = client->PutTensors(peer_job, hosts);
  if (!s.ok()) {
    if (s.code() == StatusCode::kUnavailable || s.code() == StatusCode::kDeadlineExceeded)
      DropPeer(peer);
    return s.WithContext("sending to " + peer);
  }
  flatbuffers::FlatBufferBuilder fbb;
  auto body = wire::CreateSendTensorsResponse(
      fbb, bytes, fbb.CreateString(client->uses_shm() ? "shm" : "frames"),
      Seconds(Clock::now() - t0));
  return Reply(task, fbb, wire::WorkerResponseBody::SendTensorsResponse, body.Union(), {}, out);
}

Status WorkerServer::Impl::HandleFetchWeights(Task& task, const wire::FetchWeightsRequest& r,
                                              Frames& out) {
  const std::string model_name = Str(r.model()), block_name = Str(r.block());
  flatbuffers::FlatBufferBuilder fbb;
  Frames data;
  uint64_t lease = 0;
  flatbuffers::Offset<flatbuffers::Vector<flatbuffers::Offset<wire::TensorDesc>>> descs;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = models_.find(model_name);
    if (it == models_.end())
      return NotFoundError("model '" + model_name + "' is not loaded on " + config.id);
    auto b = it->second.blocks.find(block_name);
    if (b == it->second.blocks.end()) {
      return NotFoundError("block '" + block_name + "' of model '" + model_name +
                           "' is not resident on " + config.id);
    }
    Block& block = b->second;
    const bool shm = (task.conn.caps & protocol::kCapShm) != 0 && arena != nullptr &&
                     block.arena_offsets.size() == block.weights.size();
    if (shm) {
      lease = next_lease++;
      leases[lease] = {model_name, block_name, Clock::now()};
      ++block.pins;
      std::vector<flatbuffers::Offset<wire::TensorDesc>> v;
      for (const auto& [name, w] : block.weights) {
        v.push_back(
            WeightDesc(fbb, name, w, wire::PayloadKind::ShmDonor, 0, block.arena_offsets.at(name)));
      }
      descs = fbb.CreateVector(v);
    } else {
      std::vector<flatbuffers::Offset<wire::TensorDesc>> v;
      for (const auto& [name, w] : block.weights) {
        at::Tensor t = w.data.to(at::kCPU).contiguous();
        const uint64_t bytes = internal::TensorBytes(t);
        uint32_t frame = 0;
        if (bytes > 0) {
          data.push_back(
              transport::ZeroCopyMessage(t.data_ptr(), bytes, std::make_shared<at::Tensor>(t)));
          frame = static_cast<uint32_t>(data.size());
        }
        v.push_back(WeightDesc(fbb, name, w,
                               bytes > 0 ? wire::PayloadKind::Frame : wire::PayloadKind::None,
                               frame, 0));
      }
      descs = fbb.CreateVector(v);
    }
  }
  auto body = wire::CreateTensorsResponse(fbb, descs, lease);
  return Reply(task, fbb, wire::WorkerResponseBody::TensorsResponse, body.Union(), std::move(data),
               out);
}

Status WorkerServer::Impl::HandleReleaseWeights(Task& task, const wire::ReleaseWeightsRequest& r,
                                                Frames& out) {
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = leases.find(r.lease());
    if (it == leases.end())
      return NotFoundError("weight lease " + std::to_string(r.lease()) + " is not held");
    auto model = models_.find(it->second.model);
    if (model != models_.end()) {
      auto b = model->second.blocks.find(it->second.block);
      if (b != model->second.blocks.end()) --b->second.pins;
    }
    leases.erase(it);
  }
  return Ack(task, out);
}

Status WorkerServer::Impl::HandleDropJob(Task& task, const wire::DropJobRequest& r, Frames& out) {
  {
    std::lock_guard<std::mutex> lock(mu);
    const std::string job = Str(r.job());
    jobs.erase(job);  // idempotent: dropping an unknown job is fine
    if (dropped_jobs.insert(job).second) {
      dropped_order.push_back(job);
      if (dropped_order.size() > kDroppedJobsKept) {
        dropped_jobs.erase(dropped_order.front());
        dropped_order.pop_front();
      }
    }
    UpdateActivationGaugeLocked();
  }
  return Ack(task, out);
}

Status WorkerServer::Impl::HandleEndRun(Task& task, const wire::EndRunRequest& r, Frames& out) {
  {
    std::lock_guard<std::mutex> lock(mu);
    runs.erase(Str(r.run_id()));
    run_touched.erase(Str(r.run_id()));
    UpdateActivationGaugeLocked();
  }
  return Ack(task, out);
}

Status WorkerServer::Impl::HandleSetPatches(Task& task, const wire::SetPatchesRequest& r,
                                            Frames& out) {
  const std::string model_name = Str(r.model()), id = Str(r.id());
  // First, whatever happens: it hands back the shm ranges the tensors came in.
  FLEET_ASSIGN_OR_RETURN(auto inbound, ReadInbound(task, r.tensors(), "SetPatches"));
  models::TensorMap sent(std::make_move_iterator(inbound.begin()),
                         std::make_move_iterator(inbound.end()));
  at::Device at_device = at::kCPU;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = models_.find(model_name);
    if (it == models_.end()) {
      return NotFoundError("model '" + model_name + "' is not loaded on " + config.id);
    }
    if (r.drop()) {
      for (const auto* d : *r.drop()) ErasePatchSetLocked(model_name, it->second, d->str());
    }
    if (id.empty() || it->second.patch_sets.count(id) != 0) return Ack(task, out);
    if (it->second.patch_sets.size() >= kMaxPatchSets) {
      return ResourceExhaustedError("model '" + model_name + "' has " +
                                    std::to_string(kMaxPatchSets) + " patch sets on " + config.id +
                                    " already; drop one first");
    }
    at_device = device;
  }
  if (r.loras() == nullptr || r.loras()->size() == 0 || r.loras()->size() > kMaxLoraFiles) {
    return InvalidArgumentError("patch set '" + id + "' needs 1 to " +
                                std::to_string(kMaxLoraFiles) + " LoRA files");
  }
  auto patches = std::make_shared<models::PatchSet>();
  uint64_t bytes = 0;
  for (const auto* lora : *r.loras()) {
    const std::string rel = Str(lora->path());
    std::unique_ptr<formats::ModelFile> file;
    if (!rel.empty()) {
      FLEET_ASSIGN_OR_RETURN(std::string path, ResolveModelPath(config.model_roots, rel));
      FLEET_ASSIGN_OR_RETURN(file, formats::ModelFile::Open(path));
    }
    const std::string source = rel.empty() ? "patch set '" + id + "'" : rel;
    // The bytes of part `key`, or nullopt when the file (or the request) has no such tensor.
    auto part_bytes = [&](const std::string& key) -> std::optional<uint64_t> {
      if (file) {
        const formats::TensorInfo* info = file->Find(key);
        return info ? std::optional<uint64_t>(info->nbytes) : std::nullopt;
      }
      auto t = sent.find(key);
      return t != sent.end() ? std::optional<uint64_t>(t->second.nbytes()) : std::nullopt;
    };
    std::vector<families::LoraModule> modules;
    if (lora->modules() != nullptr) {
      for (const auto* m : *lora->modules()) {
        FLEET_ASSIGN_OR_RETURN(families::LoraModule module, LoraModuleFromWire(*m));
        for (const auto& [suffix, key] : module.parts) {
          const auto n = part_bytes(key);
          if (!n) return InvalidArgumentError(source + ": no tensor '" + key + "' there");
          bytes += *n;
        }
        modules.push_back(std::move(module));
      }
    }
    if (bytes > kMaxLoraBytes) {
      return ResourceExhaustedError("patch set '" + id + "': " + std::to_string(bytes) +
                                    " bytes of LoRA tensors, more than a set may hold (" +
                                    std::to_string(kMaxLoraBytes) + ")");
    }
    const models::PartReader read = file ? models::FileParts(*file) : models::TensorParts(sent);
    FLEET_RETURN_IF_ERROR(
        models::AddLoraPatches(source, read, modules, lora->strength(), at_device, *patches));
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = models_.find(model_name);
    if (it == models_.end()) {
      return NotFoundError("model '" + model_name + "' was evicted from " + config.id);
    }
    auto state = std::make_shared<PatchSetState>();
    state->patches = std::move(patches);
    it->second.patch_sets.emplace(id, std::move(state));
  }
  return Ack(task, out);
}

// ---------------------------------------------------------------------------------------------
// Heartbeats

void WorkerServer::Impl::HeartbeatLoop() {
  zmq::socket_t dealer(transport::Context(), zmq::socket_type::dealer);
  transport::SocketOptions so;
  so.curve = config.curve.enabled() ? &config.curve : nullptr;
  so.sndhwm = 4;  // never queue more than a few beats for a coordinator that is away
  if (!transport::ConfigureSocket(dealer, so).ok() ||
      !transport::Connect(dealer, config.coordinator).ok()) {
    FLEET_LOG(ERROR, "worker") << "cannot connect to coordinator " << config.coordinator;
    return;
  }
  auto send = [&](flatbuffers::FlatBufferBuilder& fbb) {
    zmq::message_t msg(fbb.GetBufferPointer(), fbb.GetSize());
    try {
      (void)dealer.send(msg, zmq::send_flags::dontwait);
    } catch (const zmq::error_t& e) {
      FLEET_VLOG(1, "worker") << "heartbeat not sent: " << e.what();
    }
  };
  // Register again every few beats, so a coordinator that restarted finds this worker.
  auto send_register = [&] {
    flatbuffers::FlatBufferBuilder fbb;
    const auto info = config.backing == "cpu" ? device::DiscoverCpu() : device::DeviceInfo{};
    auto reg = wire::CreateRegister(
        fbb, protocol::BuildHello(fbb, hello), fbb.CreateString(endpoint),
        fbb.CreateString(config.id), fbb.CreateString(config.backing), config.total_bytes,
        config.capacity_bytes, fbb.CreateString(info.name.empty() ? config.backing : info.name),
        fbb.CreateString(metrics_server ? metrics_server->address() : ""));
    fbb.Finish(wire::CreateWorkerEvent(fbb, wire::WorkerEventBody::Register, reg.Union()),
               protocol::kEventIdentifier);
    send(fbb);
  };
  send_register();
  uint64_t sequence = 0;
  auto next = Clock::now() + config.heartbeat_interval;
  while (!stop) {
    if (Clock::now() < next) {
      std::this_thread::sleep_for(
          std::min<Clock::duration>(next - Clock::now(), std::chrono::milliseconds(50)));
      continue;
    }
    next += config.heartbeat_interval;
    flatbuffers::FlatBufferBuilder fbb;
    auto stats = BuildStats(fbb);
    auto beat = wire::CreateHeartbeat(fbb, ++sequence, stats);
    fbb.Finish(wire::CreateWorkerEvent(fbb, wire::WorkerEventBody::Heartbeat, beat.Union()),
               protocol::kEventIdentifier);
    send(fbb);
    if (sequence % 5 == 0) send_register();
  }
}

// ---------------------------------------------------------------------------------------------
// WorkerServer

WorkerServer::WorkerServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

WorkerServer::~WorkerServer() {
  Stop();
  if (impl_->heartbeat.joinable()) impl_->heartbeat.join();
  {
    std::lock_guard<std::mutex> lock(impl_->queue_mu);
    impl_->queue_closed = true;
  }
  impl_->queue_cv.notify_all();
  for (auto& t : impl_->pool) {
    if (t.joinable()) t.join();
  }
}

const std::string& WorkerServer::endpoint() const { return impl_->endpoint; }

const std::string& WorkerServer::metrics_address() const {
  static const std::string kNone;
  return impl_->metrics_server ? impl_->metrics_server->address() : kNone;
}

std::string WorkerServer::arena_name() const { return impl_->arena ? impl_->arena->name() : ""; }

std::string WorkerServer::ReadyLine() const {
  return "fleet-worker ready id=" + impl_->config.id + " listen=" + endpoint() +
         " metrics=" + (metrics_address().empty() ? "off" : metrics_address()) +
         " shm=" + (arena_name().empty() ? "off" : arena_name());
}

void WorkerServer::Stop() { impl_->stop = true; }

void WorkerServer::Run() {
  impl_->IoLoop();
  {
    std::lock_guard<std::mutex> lock(impl_->queue_mu);
    impl_->queue_closed = true;
  }
  impl_->queue_cv.notify_all();
  for (auto& t : impl_->pool) {
    if (t.joinable()) t.join();
  }
  if (impl_->heartbeat.joinable()) impl_->heartbeat.join();
}

StatusOr<std::unique_ptr<WorkerServer>> WorkerServer::Create(WorkerConfig config) {
  auto impl = std::make_unique<Impl>();
  FLEET_ASSIGN_OR_RETURN(device::DeviceId id, device::DeviceId::Parse(config.id));
  config.id = id.ToString();
  if (config.backing != "cpu") {
    FLEET_ASSIGN_OR_RETURN(device::DeviceId backing, device::DeviceId::Parse(config.backing));
    if (backing.kind != device::Kind::kCuda) {
      return InvalidArgumentError("--backing '" + config.backing + "': expected cpu or cuda:N");
    }
    if (!at::hasCUDA()) {
      return FailedPreconditionError("--backing " + config.backing +
                                     " needs a CUDA build of libtorch; this one is CPU-only "
                                     "(emulate the device with --backing cpu)");
    }
    config.backing = backing.ToString();
    impl->device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(backing.index));
  }
  if (config.total_bytes == 0) {
    if (config.backing == "cpu") {
      config.total_bytes = device::DiscoverCpu().total_bytes;
    } else {
      for (const auto& d : device::DiscoverCuda()) {
        if (d.id.ToString() == config.backing) config.total_bytes = d.total_bytes;
      }
      if (config.total_bytes == 0) {
        return NotFoundError("backing " + config.backing +
                             " is not a visible CUDA device; give --total");
      }
    }
  }
  if (config.capacity_bytes == 0)
    config.capacity_bytes = config.total_bytes - device::DefaultReserve(id, config.total_bytes);
  if (config.capacity_bytes > config.total_bytes) {
    return InvalidArgumentError("--capacity " + config::FormatBytes(config.capacity_bytes) +
                                " exceeds --total " + config::FormatBytes(config.total_bytes));
  }
  if (config.threads < 2) config.threads = 2;  // a peer request may arrive while we wait on a peer
  if (config.max_message_bytes == 0)
    return InvalidArgumentError("--max-message-bytes must be positive");
  impl->limits.max_message_bytes = config.max_message_bytes;
  at::set_num_threads(1);  // every thread but the compute thread (compute_thread.h)

  if (config.shm) {
    static std::atomic<int> counter{0};
    std::string safe_id = config.id;
    for (char& c : safe_id) {
      if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
    }
    // Arenas of workers that were SIGKILLed (or crashed) would hold /dev/shm memory forever.
    transport::ShmArena::RemoveStale("fleet-worker-");
    const std::string name = "fleet-worker-" + safe_id + "-" + std::to_string(getpid()) + "-" +
                             std::to_string(counter++);
    const uint64_t weights = impl->device.is_cuda()   ? 0
                             : config.shm_arena_bytes ? config.shm_arena_bytes
                                                      : config.capacity_bytes;
    FLEET_ASSIGN_OR_RETURN(impl->arena,
                           transport::ShmArena::Create(name, config.shm_staging_bytes, weights));
    impl->receiver =
        std::make_unique<transport::ShmReceiver>(impl->arena, std::chrono::seconds(60));
  }
  if (config.curve.enabled()) {
    if (config.curve_authorized.empty()) config.curve_authorized.insert(config.curve.public_key);
    FLEET_ASSIGN_OR_RETURN(impl->zap, transport::ZapAuthenticator::Start(config.curve_authorized));
  }

  impl->router = zmq::socket_t(transport::Context(), zmq::socket_type::router);
  transport::SocketOptions so;
  so.curve = &config.curve;
  so.server = true;
  so.max_message_bytes = config.max_message_bytes;
  so.rcvhwm = transport::kRouterRcvHwm;
  FLEET_RETURN_IF_ERROR(transport::ConfigureSocket(impl->router, so));
  {
    const std::string monitor_endpoint =
        "inproc://fleet-worker-monitor-" + std::to_string(reinterpret_cast<uintptr_t>(impl.get()));
    int events = ZMQ_EVENT_DISCONNECTED;
    if (config.curve.enabled()) {
      events |= ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                ZMQ_EVENT_HANDSHAKE_FAILED_AUTH;
    }
    if (zmq_socket_monitor(impl->router.handle(), monitor_endpoint.c_str(), events) != 0) {
      return InternalError("cannot monitor the request socket");
    }
    impl->monitor = zmq::socket_t(transport::Context(), zmq::socket_type::pair);
    impl->monitor.set(zmq::sockopt::linger, 0);
    impl->monitor.connect(monitor_endpoint);
  }
  FLEET_ASSIGN_OR_RETURN(impl->endpoint, transport::Bind(impl->router, config.listen));
  impl->replies_pull = zmq::socket_t(transport::Context(), zmq::socket_type::pull);
  impl->replies_pull.set(zmq::sockopt::linger, 0);
  impl->replies_endpoint =
      "inproc://fleet-worker-replies-" + std::to_string(reinterpret_cast<uintptr_t>(impl.get()));
  FLEET_RETURN_IF_ERROR(transport::Bind(impl->replies_pull, impl->replies_endpoint).status());

  impl->hello.peer_name = "worker " + config.id;
  impl->hello.device = config.id;
  impl->hello.instance = protocol::NewInstanceId();
  impl->hello.host_id = protocol::HostId();
  impl->hello.shm_arena = impl->arena ? impl->arena->name() : "";
  impl->hello.max_message_bytes = config.max_message_bytes;
  impl->hello.capabilities =
      (impl->arena ? protocol::kCapShm : 0) | (config.curve.enabled() ? protocol::kCapCurve : 0);

  impl->m = std::make_unique<metrics::WorkerMetrics>(*impl->registry);
  impl->m->info
      .Add({{"device", config.id}, {"backing", config.backing}, {"version", metrics::Version()}})
      .Set(1);
  impl->m->capacity_bytes.Add({{"device", config.id}})
      .Set(static_cast<double>(config.capacity_bytes));
  impl->m->total_bytes.Add({{"device", config.id}}).Set(static_cast<double>(config.total_bytes));
  impl->m->shm_arena_bytes.Add({{"device", config.id}})
      .Set(impl->arena ? static_cast<double>(impl->arena->size()) : 0);
  impl->m->activation_bytes.Add({{"device", config.id}}).Set(0);
  impl->m->connections.Add({{"device", config.id}}).Set(0);
  if (!config.metrics_listen.empty()) {
    FLEET_ASSIGN_OR_RETURN(impl->metrics_server,
                           metrics::MetricsServer::Start(config.metrics_listen, impl->registry));
  }
  impl->compute = std::make_unique<internal::ComputeThread>(config.compute_threads);
  impl->config = std::move(config);
  Impl* p = impl.get();
  for (int i = 0; i < p->config.threads; ++i) p->pool.emplace_back([p] { p->HandlerLoop(); });
  if (!p->config.coordinator.empty()) p->heartbeat = std::thread([p] { p->HeartbeatLoop(); });
  return std::make_unique<WorkerServer>(std::move(impl));
}

}  // namespace fleet::worker
