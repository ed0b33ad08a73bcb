#include "fleet/worker/client.h"

#include <atomic>
#include <cstring>

#include "fleet/log/log.h"

namespace fleet::worker {

using transport::Frames;

HostTensor HostTensor::Copy(std::string name, wire::DType dtype, std::vector<int64_t> shape,
                            const void* bytes, uint64_t nbytes) {
  const auto* p = static_cast<const uint8_t*>(bytes);
  return Own(std::move(name), dtype, std::move(shape), std::vector<uint8_t>(p, p + nbytes));
}

HostTensor HostTensor::Own(std::string name, wire::DType dtype, std::vector<int64_t> shape,
                           std::vector<uint8_t> bytes) {
  auto owned = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  HostTensor t;
  t.name = std::move(name);
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data = owned->data();
  t.nbytes = owned->size();
  t.owner = owned;
  return t;
}

WorkerClient::WorkerClient(std::string endpoint, ClientOptions options, zmq::socket_t socket,
                           zmq::socket_t monitor)
    : endpoint_(std::move(endpoint)),
      options_(std::move(options)),
      socket_(std::move(socket)),
      monitor_(std::move(monitor)) {}

WorkerClient::~WorkerClient() = default;

StatusOr<std::unique_ptr<WorkerClient>> WorkerClient::Connect(const std::string& endpoint,
                                                              const ClientOptions& options) {
  zmq::socket_t socket(transport::Context(), zmq::socket_type::dealer);
  transport::SocketOptions so;
  so.curve = options.curve;
  so.max_message_bytes = options.limits.max_message_bytes;
  FLEET_RETURN_IF_ERROR(transport::ConfigureSocket(socket, so));
  static std::atomic<uint64_t> monitors{0};
  const std::string monitor_endpoint = "inproc://fleet-worker-client-monitor-" + std::to_string(monitors++);
  if (zmq_socket_monitor(socket.handle(), monitor_endpoint.c_str(),
                         ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED |
                             ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                             ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) != 0) {
    return InternalError("cannot monitor the connection to worker " + endpoint);
  }
  zmq::socket_t monitor(transport::Context(), zmq::socket_type::pair);
  monitor.set(zmq::sockopt::linger, 0);
  monitor.connect(monitor_endpoint);
  FLEET_RETURN_IF_ERROR(transport::Connect(socket, endpoint));
  auto client = std::make_unique<WorkerClient>(endpoint, options, std::move(socket), std::move(monitor));
  FLEET_RETURN_IF_ERROR(client->Hello().WithContext("worker at " + endpoint));
  return client;
}

Status WorkerClient::Hello() {
  protocol::HelloInfo mine;
  mine.peer_name = options_.name;
  mine.device = options_.device;
  mine.host_id = protocol::HostId();
  mine.capabilities = (options_.allow_shm ? protocol::kCapShm : 0) |
                      (options_.curve && options_.curve->enabled() ? protocol::kCapCurve : 0);
  mine.max_message_bytes = options_.limits.max_message_bytes;
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::Hello,
                          protocol::BuildHello(fbb, mine).Union());
  std::lock_guard<std::mutex> lock(mu_);
  FLEET_ASSIGN_OR_RETURN(Reply reply,
                         CallLocked(fbb, {}, std::min(options_.timeout, options_.connect_timeout)));
  const auto* hello = reply.response->body_as_Hello();
  if (hello == nullptr) return InternalError("worker answered Hello with another message");
  peer_ = protocol::ReadHello(*hello);
  FLEET_ASSIGN_OR_RETURN(caps_, protocol::Negotiate(mine, peer_));
  frames_ = transport::MakeFrameTransport();
  if (uses_shm()) {
    auto rw = transport::ShmMapping::Open(peer_.shm_arena, /*writable=*/true);
    auto ro = transport::ShmMapping::Open(peer_.shm_arena, /*writable=*/false);
    if (rw.ok() && ro.ok()) {
      peer_arena_rw_ = *rw;
      peer_arena_ro_ = *ro;
      shm_ = transport::MakeShmTransport(
          peer_arena_rw_, [this](std::span<const uint64_t> sizes) { return ReserveLocked(sizes); },
          options_.shm_copy_threads);
    } else {
      FLEET_LOG(WARNING, "client")
          << "worker " << endpoint_ << " offers shm but its arena '" << peer_.shm_arena
          << "' cannot be mapped (" << (rw.ok() ? ro.status() : rw.status()) << "); using frames";
      caps_ &= ~protocol::kCapShm;
    }
  }
  return Status::OK();
}

Status WorkerClient::PollEvents(bool* dropped) {
  while (true) {
    auto event = transport::RecvFrames(monitor_, std::chrono::milliseconds(0));
    if (!event.ok()) return Status::OK();
    // Monitor events are [uint16 event, uint32 value][peer address].
    uint16_t what = 0;
    if (!event->empty() && (*event)[0].size() >= 2) std::memcpy(&what, (*event)[0].data(), 2);
    if (what == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
      link_ = Link::kUp;
    } else if (what == ZMQ_EVENT_DISCONNECTED) {
      if (link_ == Link::kUp) *dropped = true;
      link_ = Link::kDown;
    } else {
      return UnavailableError("the security handshake with worker at " + endpoint_ +
                              " failed (wrong or missing CURVE keys on one side?)");
    }
  }
}

StatusOr<WorkerClient::Reply> WorkerClient::Call(flatbuffers::FlatBufferBuilder& fbb,
                                                 Frames data_frames,
                                                 std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> lock(mu_);
  return CallLocked(fbb, std::move(data_frames), timeout);
}

StatusOr<WorkerClient::Reply> WorkerClient::CallLocked(flatbuffers::FlatBufferBuilder& fbb,
                                                       Frames data_frames,
                                                       std::chrono::milliseconds timeout) {
  // The request id was written as 0 by the builders; patch in ours through the root table.
  auto* request = flatbuffers::GetMutableRoot<wire::WorkerRequest>(fbb.GetBufferPointer());
  const uint64_t id = next_id_++;
  request->mutate_id(id);
  Frames frames;
  frames.reserve(1 + data_frames.size());
  frames.push_back(transport::MessageFromBuffer(fbb.Release()));
  for (auto& f : data_frames) frames.push_back(std::move(f));
  const std::string worker =
      "worker " + (peer_.device.empty() ? "at " + endpoint_ : peer_.device + " at " + endpoint_);
  bool dropped = false;
  FLEET_RETURN_IF_ERROR(PollEvents(&dropped));
  if (link_ == Link::kDown) {
    // Dropped since the last call: give a restarting worker connect_timeout to come back.
    const auto until = std::chrono::steady_clock::now() + std::min(timeout, options_.connect_timeout);
    while (link_ == Link::kDown && std::chrono::steady_clock::now() < until) {
      zmq::pollitem_t item{monitor_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, std::chrono::milliseconds(50));
      FLEET_RETURN_IF_ERROR(PollEvents(&dropped));
    }
    if (link_ == Link::kDown) {
      return UnavailableError("the connection to " + worker + " is down (did the worker exit?)");
    }
  }
  dropped = false;  // only drops from here on concern this request
  FLEET_RETURN_IF_ERROR(transport::SendFrames(socket_, frames));
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    // Wait in slices: a dropped connection, or a worker the `alive` check declares dead, fails
    // the call at once.
    const auto slice = std::min(left, std::chrono::milliseconds(100));
    FLEET_RETURN_IF_ERROR(PollEvents(&dropped));
    if (dropped) {
      return UnavailableError("the connection to " + worker + " dropped while request " +
                              std::to_string(id) + " was in flight (did the worker exit?)");
    }
    auto in = transport::RecvFrames(socket_, std::max(slice, std::chrono::milliseconds(0)));
    if (!in.ok() && in.status().code() == StatusCode::kDeadlineExceeded && left > slice) {
      if (options_.alive && !options_.alive()) {
        return UnavailableError("worker " + endpoint_ + " went down while request " +
                                std::to_string(id) + " was in flight");
      }
      continue;
    }
    if (!in.ok()) {
      if (in.status().code() == StatusCode::kDeadlineExceeded) {
        return DeadlineExceededError("worker " + endpoint_ + " did not answer request " +
                                     std::to_string(id) + " within " +
                                     std::to_string(timeout.count()) + " ms");
      }
      return in.status();
    }
    Reply reply;
    reply.frames = std::move(*in);
    if (reply.frames.empty()) continue;
    reply.header =
        std::make_shared<protocol::AlignedBuffer>(reply.frames[0].data(), reply.frames[0].size());
    auto response = protocol::VerifyWorkerResponse(reply.header->bytes(), options_.limits);
    if (!response.ok()) {
      return InternalError("malformed reply from worker " + endpoint_ + ": " +
                           std::string(response.status().message()));
    }
    if ((*response)->id() != id && (*response)->id() != 0) continue;  // late reply to a timeout
    reply.response = *response;
    if (reply.response->body_type() == wire::WorkerResponseBody::Error) {
      return protocol::FromWireError(reply.response->body_as_Error());
    }
    return reply;
  }
}

StatusOr<transport::Reservation> WorkerClient::ReserveLocked(std::span<const uint64_t> sizes) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  auto body = wire::CreateReserveRequest(fbb, 0, fbb.CreateVector(sizes.data(), sizes.size()));
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::ReserveRequest, body.Union());
  FLEET_ASSIGN_OR_RETURN(Reply reply, CallLocked(fbb, {}, options_.timeout));
  const auto* r = reply.response->body_as_ReserveResponse();
  if (r == nullptr || r->offsets() == nullptr || r->offsets()->size() != sizes.size()) {
    return InternalError("worker " + endpoint_ + " answered Reserve with a malformed grant");
  }
  transport::Reservation grant;
  grant.id = r->reservation();
  grant.offsets.assign(r->offsets()->begin(), r->offsets()->end());
  return grant;
}

StatusOr<flatbuffers::Offset<flatbuffers::Vector<flatbuffers::Offset<wire::TensorDesc>>>>
WorkerClient::StageTensors(flatbuffers::FlatBufferBuilder& fbb,
                           const std::vector<HostTensor>& tensors, Frames& data_frames) {
  std::vector<transport::OutPayload> payloads;
  payloads.reserve(tensors.size());
  for (const auto& t : tensors) payloads.push_back({t.data, t.nbytes, t.owner});
  StatusOr<std::vector<transport::PayloadRef>> refs = Status(StatusCode::kUnavailable, "no shm");
  if (shm_ != nullptr) {
    refs = shm_->Stage(payloads, data_frames);
    if (!refs.ok() && refs.status().code() == StatusCode::kResourceExhausted) {
      FLEET_VLOG(1, "client") << "shm staging of " << endpoint_
                              << " full, using frames: " << refs.status();
    } else if (!refs.ok()) {
      return refs.status();
    }
  }
  if (!refs.ok()) {
    FLEET_ASSIGN_OR_RETURN(refs, frames_->Stage(payloads, data_frames));
  }
  std::vector<flatbuffers::Offset<wire::TensorDesc>> descs;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    const auto& r = (*refs)[i];
    descs.push_back(wire::CreateTensorDesc(fbb, fbb.CreateString(t.name), t.dtype,
                                           fbb.CreateVector(t.shape), t.nbytes, r.kind, r.frame,
                                           r.offset, r.reservation));
  }
  return fbb.CreateVector(descs);
}

StatusOr<std::vector<HostTensor>> WorkerClient::ReadTensors(
    const flatbuffers::Vector<flatbuffers::Offset<wire::TensorDesc>>* descs, Frames& frames,
    bool donor_shm) {
  std::vector<HostTensor> out;
  if (descs == nullptr) return out;
  // frames[0] is the header; data frames follow. Share them so tensors can alias them.
  auto held = std::make_shared<Frames>(std::move(frames));
  Frames& all = *held;
  for (size_t i = 0; i < descs->size(); ++i) {
    const wire::TensorDesc* d = descs->Get(i);
    FLEET_RETURN_IF_ERROR(protocol::CheckTensorDesc(d, options_.limits, all.size() - 1,
                                                    "reply tensor " + std::to_string(i)));
    HostTensor t;
    t.name = d->name()->str();
    t.dtype = d->dtype();
    if (d->shape()) t.shape.assign(d->shape()->begin(), d->shape()->end());
    t.nbytes = d->nbytes();
    if (d->quant() != nullptr && d->quant()->size() > 0) {
      t.quant = d->quant()->str();
      if (d->logical_shape()) {
        t.logical_shape.assign(d->logical_shape()->begin(), d->logical_shape()->end());
      }
    }
    switch (d->payload()) {
      case wire::PayloadKind::None:
        break;
      case wire::PayloadKind::Frame: {
        const zmq::message_t& m = all[d->frame()];
        if (m.size() != d->nbytes()) {
          return InternalError("reply tensor '" + t.name + "' frame holds " +
                               std::to_string(m.size()) + " bytes, expected " +
                               std::to_string(d->nbytes()));
        }
        t.data = static_cast<const uint8_t*>(m.data());
        t.owner = held;
        break;
      }
      case wire::PayloadKind::ShmDonor: {
        if (!donor_shm || peer_arena_ro_ == nullptr) {
          return InternalError("reply tensor '" + t.name +
                               "' points into a shm arena this "
                               "client did not negotiate");
        }
        FLEET_ASSIGN_OR_RETURN(uint8_t * p, peer_arena_ro_->At(d->offset(), d->nbytes()));
        t.data = p;
        t.owner = peer_arena_ro_;
        break;
      }
      default:
        return InternalError("reply tensor '" + t.name + "' has an unexpected payload kind");
    }
    out.push_back(std::move(t));
  }
  return out;
}

namespace {
flatbuffers::Offset<flatbuffers::Vector<flatbuffers::Offset<flatbuffers::String>>> Strings(
    flatbuffers::FlatBufferBuilder& fbb, const std::vector<std::string>& v) {
  return fbb.CreateVectorOfStrings(v);
}
}  // namespace

Status WorkerClient::LoadBlockFromFile(const ModelSpec& model, const std::string& block,
                                       const std::string& path,
                                       const std::vector<FileTensorSpec>& tensors) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  std::vector<flatbuffers::Offset<wire::FileTensor>> ft;
  for (const auto& t : tensors) {
    ft.push_back(wire::CreateFileTensor(fbb, fbb.CreateString(t.name), t.dtype,
                                        fbb.CreateVector(t.shape), t.offset, t.nbytes,
                                        t.sha256.empty() ? 0 : fbb.CreateString(t.sha256),
                                        t.quant.empty() ? 0 : fbb.CreateString(t.quant)));
  }
  auto source = wire::CreateFileSource(fbb, fbb.CreateString(path), fbb.CreateVector(ft));
  auto body = wire::CreateLoadBlockRequest(
      fbb, fbb.CreateString(model.name), fbb.CreateString(model.family),
      fbb.CreateString(model.config_json), model.compute_dtype, fbb.CreateString(block),
      wire::BlockSource::FileSource, source.Union(), model.weight_dtype,
      model.dequant_dtype);
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::LoadBlockRequest, body.Union());
  return Call(fbb, {}, options_.timeout).status();
}

Status WorkerClient::LoadBlockFromWire(const ModelSpec& model, const std::string& block,
                                       const std::vector<HostTensor>& tensors) {
  std::lock_guard<std::mutex> lock(mu_);
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  Frames data;
  FLEET_ASSIGN_OR_RETURN(auto descs, StageTensors(fbb, tensors, data));
  auto source = wire::CreateWireSource(fbb, descs);
  auto body = wire::CreateLoadBlockRequest(
      fbb, fbb.CreateString(model.name), fbb.CreateString(model.family),
      fbb.CreateString(model.config_json), model.compute_dtype, fbb.CreateString(block),
      wire::BlockSource::WireSource, source.Union(), model.weight_dtype,
      model.dequant_dtype);
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::LoadBlockRequest, body.Union());
  return CallLocked(fbb, std::move(data), options_.timeout).status();
}

Status WorkerClient::EvictBlock(const std::string& model, const std::string& block) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  auto body = wire::CreateEvictBlockRequest(fbb, fbb.CreateString(model), fbb.CreateString(block));
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::EvictBlockRequest, body.Union());
  return Call(fbb, {}, options_.timeout).status();
}

Status WorkerClient::EvictModel(const std::string& model) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  auto body = wire::CreateEvictModelRequest(fbb, fbb.CreateString(model));
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::EvictModelRequest, body.Union());
  return Call(fbb, {}, options_.timeout).status();
}

StatusOr<WorkerStats> WorkerClient::Stats() {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::StatsRequest,
                          wire::CreateStatsRequest(fbb).Union());
  FLEET_ASSIGN_OR_RETURN(Reply reply, Call(fbb, {}, options_.timeout));
  const auto* s = reply.response->body_as_StatsResponse();
  if (s == nullptr) return InternalError("worker answered Stats with another message");
  WorkerStats out;
  if (s->device()) out.device = s->device()->str();
  if (s->backing()) out.backing = s->backing()->str();
  out.capacity_bytes = s->capacity_bytes();
  out.total_bytes = s->total_bytes();
  out.resident_bytes = s->resident_bytes();
  if (s->models()) {
    for (const auto* m : *s->models()) {
      ModelStats ms;
      if (m->model()) ms.model = m->model()->str();
      if (m->blocks()) {
        for (const auto* b : *m->blocks()) ms.blocks.push_back(b->str());
      }
      ms.resident_bytes = m->resident_bytes();
      out.models.push_back(std::move(ms));
    }
  }
  out.arena_bytes = s->arena_bytes();
  out.arena_used_bytes = s->arena_used_bytes();
  out.activation_bytes = s->activation_bytes();
  out.jobs = s->jobs();
  return out;
}

Status WorkerClient::PutTensors(const std::string& job, const std::vector<HostTensor>& tensors,
                                const std::string& run_id,
                                const std::vector<std::string>& run_constant) {
  std::lock_guard<std::mutex> lock(mu_);
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  Frames data;
  FLEET_ASSIGN_OR_RETURN(auto descs, StageTensors(fbb, tensors, data));
  auto body = wire::CreatePutTensorsRequest(fbb, fbb.CreateString(job), descs,
                                            fbb.CreateString(run_id), Strings(fbb, run_constant));
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::PutTensorsRequest, body.Union());
  return CallLocked(fbb, std::move(data), options_.timeout).status();
}

StatusOr<std::vector<HostTensor>> WorkerClient::GetTensors(const std::string& job,
                                                           const std::vector<std::string>& names) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  auto body = wire::CreateGetTensorsRequest(fbb, fbb.CreateString(job), Strings(fbb, names));
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::GetTensorsRequest, body.Union());
  FLEET_ASSIGN_OR_RETURN(Reply reply, Call(fbb, {}, options_.timeout));
  const auto* r = reply.response->body_as_TensorsResponse();
  if (r == nullptr) return InternalError("worker answered GetTensors with another message");
  return ReadTensors(r->tensors(), reply.frames, /*donor_shm=*/false);
}

StatusOr<RunBlocksResult> WorkerClient::RunBlocks(const std::string& job, const std::string& model,
                                                  const std::vector<BlockStep>& steps,
                                                  uint32_t prefetch_depth,
                                                  const std::string& run_id,
                                                  const std::string& patches) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  std::vector<flatbuffers::Offset<wire::BlockStep>> s;
  for (const auto& step : steps) {
    s.push_back(wire::CreateBlockStep(
        fbb, fbb.CreateString(step.block),
        step.donor.empty() ? wire::WeightSite::Resident : wire::WeightSite::Stream,
        fbb.CreateString(step.donor)));
  }
  auto body = wire::CreateRunBlocksRequest(fbb, fbb.CreateString(job), fbb.CreateString(model),
                                           fbb.CreateVector(s), prefetch_depth,
                                           fbb.CreateString(run_id), fbb.CreateString(patches));
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::RunBlocksRequest, body.Union());
  FLEET_ASSIGN_OR_RETURN(Reply reply, Call(fbb, {}, options_.timeout));
  const auto* r = reply.response->body_as_RunBlocksResponse();
  if (r == nullptr) return InternalError("worker answered RunBlocks with another message");
  return RunBlocksResult{r->blocks_run(), r->compute_seconds(), r->prefetch_stall_seconds(),
                         r->streamed_bytes()};
}

StatusOr<SendResult> WorkerClient::SendTensors(const std::string& job,
                                               const std::vector<std::string>& names,
                                               const std::string& peer,
                                               const std::string& peer_job) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  auto body = wire::CreateSendTensorsRequest(fbb, fbb.CreateString(job), Strings(fbb, names),
                                             fbb.CreateString(peer), fbb.CreateString(peer_job));
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::SendTensorsRequest, body.Union());
  FLEET_ASSIGN_OR_RETURN(Reply reply, Call(fbb, {}, options_.timeout));
  const auto* r = reply.response->body_as_SendTensorsResponse();
  if (r == nullptr) return InternalError("worker answered SendTensors with another message");
  return SendResult{r->bytes(), r->transport() ? r->transport()->str() : "", r->seconds()};
}

StatusOr<FetchedWeights> WorkerClient::FetchWeights(const std::string& model,
                                                    const std::string& block) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  auto body =
      wire::CreateFetchWeightsRequest(fbb, fbb.CreateString(model), fbb.CreateString(block));
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::FetchWeightsRequest, body.Union());
  FLEET_ASSIGN_OR_RETURN(Reply reply, Call(fbb, {}, options_.timeout));
  const auto* r = reply.response->body_as_TensorsResponse();
  if (r == nullptr) return InternalError("worker answered FetchWeights with another message");
  FetchedWeights out;
  out.lease = r->lease();
  FLEET_ASSIGN_OR_RETURN(out.tensors, ReadTensors(r->tensors(), reply.frames, /*donor_shm=*/true));
  for (const auto& t : out.tensors) out.bytes += t.nbytes;
  return out;
}

Status WorkerClient::ReleaseWeights(uint64_t lease) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  auto body = wire::CreateReleaseWeightsRequest(fbb, lease);
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::ReleaseWeightsRequest, body.Union());
  return Call(fbb, {}, options_.timeout).status();
}

StatusOr<families::LoraModule> LoraModuleFromWire(const wire::LoraModuleRef& m) {
  families::LoraModule module;
  module.prefix = m.prefix() ? m.prefix()->str() : "";
  module.target = m.target() ? m.target()->str() : "";
  if (m.shape()) module.shape.assign(m.shape()->begin(), m.shape()->end());
  module.offset_dim = m.offset_dim();
  module.offset_start = m.offset_start();
  module.offset_length = m.offset_length();
  module.swap_halves = m.swap_halves();
  if (m.keys()) {
    for (const auto* k : *m.keys()) {
      std::string prefix, suffix;
      if (!families::SplitLoraKey(k->str(), &prefix, &suffix) || prefix != module.prefix) {
        return InvalidArgumentError("patch key '" + k->str() + "' is not a part of module '" +
                                    module.prefix + "' (docs/models.md)");
      }
      module.parts[suffix] = k->str();
    }
  }
  if (module.parts.empty() || module.shape.size() > 8) {
    return InvalidArgumentError("module '" + module.prefix +
                                "' names no tensors or a shape of more than 8 dimensions");
  }
  int64_t numel = 1;
  for (int64_t d : module.shape) {
    if (d < 0 || __builtin_mul_overflow(numel, d, &numel)) {
      return InvalidArgumentError("module '" + module.prefix +
                                  "': a negative dimension or a shape whose size overflows");
    }
  }
  return module;
}

Status WorkerClient::SetPatches(const std::string& model, const std::string& id,
                                const std::vector<LoraFileRef>& loras,
                                const std::vector<HostTensor>& tensors,
                                const std::vector<std::string>& drop) {
  std::lock_guard<std::mutex> lock(mu_);
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  std::vector<flatbuffers::Offset<wire::LoraFile>> files;
  for (const LoraFileRef& lora : loras) {
    std::vector<flatbuffers::Offset<wire::LoraModuleRef>> modules;
    for (const families::LoraModule& m : lora.modules) {
      std::vector<std::string> keys;
      for (const auto& [suffix, key] : m.parts) keys.push_back(key);
      modules.push_back(wire::CreateLoraModuleRef(
          fbb, fbb.CreateString(m.prefix), fbb.CreateString(m.target), fbb.CreateVector(m.shape),
          Strings(fbb, keys), m.offset_dim, m.offset_start, m.offset_length, m.swap_halves));
    }
    files.push_back(wire::CreateLoraFile(fbb, fbb.CreateString(lora.path), lora.strength,
                                         fbb.CreateVector(modules)));
  }
  Frames data;
  FLEET_ASSIGN_OR_RETURN(auto descs, StageTensors(fbb, tensors, data));
  auto body =
      wire::CreateSetPatchesRequest(fbb, fbb.CreateString(model), fbb.CreateString(id),
                                    fbb.CreateVector(files), Strings(fbb, drop), descs);
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::SetPatchesRequest, body.Union());
  return CallLocked(fbb, std::move(data), options_.timeout).status();
}

Status WorkerClient::DropJob(const std::string& job) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  auto body = wire::CreateDropJobRequest(fbb, fbb.CreateString(job));
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::DropJobRequest, body.Union());
  return Call(fbb, {}, options_.timeout).status();
}

Status WorkerClient::EndRun(const std::string& run_id) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.ForceDefaults(true);  // CallLocked patches the id in place
  auto body = wire::CreateEndRunRequest(fbb, fbb.CreateString(run_id));
  protocol::FinishRequest(fbb, 0, wire::WorkerRequestBody::EndRunRequest, body.Union());
  return Call(fbb, {}, options_.timeout).status();
}

StatusOr<Frames> WorkerClient::TEST_RawCall(Frames frames) {
  std::lock_guard<std::mutex> lock(mu_);
  FLEET_RETURN_IF_ERROR(transport::SendFrames(socket_, frames));
  return transport::RecvFrames(socket_, std::chrono::seconds(10));
}

}  // namespace fleet::worker
