#include "fleet/coordinator/job_server.h"

#include <deque>
#include <list>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "fleet/families/family.h"
#include "fleet/families/lora_keys.h"
#include "fleet/log/log.h"
#include "fleet/protocol/protocol.h"
#include "job_generated.h"

namespace fleet::coordinator {

namespace {

using transport::Frames;

constexpr char kJobRequestId[] = "FJRQ";
constexpr char kJobResponseId[] = "FJRS";

std::string Str(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

zmq::message_t Finish(flatbuffers::FlatBufferBuilder& fbb, uint64_t id, wire::JobResponseBody type,
                      flatbuffers::Offset<void> body) {
  wire::JobResponseBuilder b(fbb);
  b.add_id(id);
  b.add_body_type(type);
  b.add_body(body);
  fbb.Finish(b.Finish(), kJobResponseId);
  return transport::MessageFromBuffer(fbb.Release());
}

Frames ErrorReply(uint64_t id, const Status& status) {
  flatbuffers::FlatBufferBuilder fbb;
  auto error = wire::CreateError(fbb, protocol::ToWireCode(status.code()),
                                 fbb.CreateString(std::string(status.message())));
  Frames out;
  out.push_back(Finish(fbb, id, wire::JobResponseBody::Error, error.Union()));
  return out;
}

Frames AckReply(uint64_t id) {
  flatbuffers::FlatBufferBuilder fbb;
  auto ack = wire::CreateAck(fbb);
  Frames out;
  out.push_back(Finish(fbb, id, wire::JobResponseBody::Ack, ack.Union()));
  return out;
}

wire::ExecMode ToWire(ExecMode m) {
  switch (m) {
    case ExecMode::kAuto: return wire::ExecMode::Auto;
    case ExecMode::kStream: return wire::ExecMode::Stream;
    case ExecMode::kPipeline: return wire::ExecMode::Pipeline;
  }
  return wire::ExecMode::Auto;
}

wire::ModelState ToWire(ModelState s) {
  switch (s) {
    case ModelState::kLoading: return wire::ModelState::Loading;
    case ModelState::kReady: return wire::ModelState::Ready;
    case ModelState::kFailed: return wire::ModelState::Failed;
    case ModelState::kUnloading: return wire::ModelState::Unloading;
  }
  return wire::ModelState::Failed;
}

flatbuffers::Offset<wire::ModelInfo> BuildModelInfo(flatbuffers::FlatBufferBuilder& fbb,
                                                    const ModelInfo& m) {
  return wire::CreateModelInfo(fbb, fbb.CreateString(m.name), fbb.CreateString(m.path),
                               fbb.CreateString(m.family), ToWire(m.state), m.bytes_loaded,
                               m.bytes_total, fbb.CreateString(m.compute_device), ToWire(m.mode),
                               m.keep_loaded, fbb.CreateString(m.error),
                               fbb.CreateString(m.plan_json));
}

StatusOr<ModelSpec> ReadSpec(const wire::ModelSpec* s) {
  if (s == nullptr) return InvalidArgumentError("missing model spec");
  ModelSpec spec;
  spec.path = Str(s->path());
  spec.compute_device = Str(s->compute_device());
  spec.virtual_vram_gb = s->virtual_vram_gb();
  spec.donor_device = s->donor_device() ? s->donor_device()->str() : "cpu";
  spec.expert_mode_allocations = Str(s->expert_mode_allocations());
  spec.eject_models = s->eject_models();
  spec.keep_loaded = s->keep_loaded();
  switch (s->mode()) {
    case wire::ExecMode::Auto: spec.mode = ExecMode::kAuto; break;
    case wire::ExecMode::Stream: spec.mode = ExecMode::kStream; break;
    case wire::ExecMode::Pipeline: spec.mode = ExecMode::kPipeline; break;
    default: return InvalidArgumentError("unknown execution mode " + std::to_string(static_cast<int>(s->mode())));
  }
  switch (s->dtype()) {
    case wire::DType::Invalid: break;
    case wire::DType::F32: spec.dtype = "float32"; break;
    case wire::DType::BF16: spec.dtype = "bfloat16"; break;
    case wire::DType::F16: spec.dtype = "float16"; break;
    default: return InvalidArgumentError("compute dtype must be f32, bf16 or f16");
  }
  spec.prefetch_depth = static_cast<int>(std::min<uint32_t>(s->prefetch_depth(), 64));
  spec.allow_mixed = s->allow_mixed();
  FLEET_ASSIGN_OR_RETURN(spec.width, families::CheckInputSize("width", s->width()));
  FLEET_ASSIGN_OR_RETURN(spec.height, families::CheckInputSize("height", s->height()));
  FLEET_ASSIGN_OR_RETURN(spec.frames, families::CheckInputSize("frames", s->frames()));
  FLEET_ASSIGN_OR_RETURN(spec.batch, families::CheckInputSize("batch", s->batch()));
  if (s->weight_dtype() != nullptr) spec.weight_dtype = s->weight_dtype()->str();
  FLEET_RETURN_IF_ERROR(ParseWeightDtype(spec.weight_dtype).status());
  if (s->dequant_dtype() != nullptr) spec.dequant_dtype = s->dequant_dtype()->str();
  FLEET_RETURN_IF_ERROR(ParseDequantDtype(spec.dequant_dtype).status());
  return spec;
}

}  // namespace

struct JobServer::Impl {
  Coordinator* coordinator = nullptr;
  protocol::Limits limits;
  zmq::socket_t router{transport::Context(), zmq::socket_type::router};
  zmq::socket_t wake_pull{transport::Context(), zmq::socket_type::pull};
  std::string endpoint;
  std::string wake_endpoint;
  std::unique_ptr<JobQueue> queue;
  std::thread thread;
  std::atomic<bool> stop{false};

  std::mutex out_mu;
  zmq::socket_t wake_push{transport::Context(), zmq::socket_type::push};  // guarded by out_mu
  std::deque<std::pair<std::string, Frames>> outbox;                      // guarded by out_mu

  // Identities that sent Hello, most recently used first; socket thread only. Bounded: a client
  // that reconnects forever would otherwise grow it without end. An identity idle while
  // kMaxGreeted others were used is forgotten and must say Hello again.
  static constexpr size_t kMaxGreeted = 65536;
  std::list<std::string> greeted_lru;
  std::unordered_map<std::string, std::list<std::string>::iterator> greeted;

  // True when `identity` said Hello (and marks it used).
  bool Greeted(const std::string& identity) {
    auto it = greeted.find(identity);
    if (it == greeted.end()) return false;
    greeted_lru.splice(greeted_lru.begin(), greeted_lru, it->second);
    return true;
  }
  void Greet(const std::string& identity) {
    if (Greeted(identity)) return;
    greeted_lru.push_front(identity);
    greeted[identity] = greeted_lru.begin();
    if (greeted.size() > kMaxGreeted) {
      greeted.erase(greeted_lru.back());
      greeted_lru.pop_back();
    }
  }

  std::mutex inflight_mu;
  std::map<std::pair<std::string, uint64_t>, std::shared_ptr<std::atomic<bool>>> inflight;

  static const char* TypeName(wire::JobRequestBody t) {
    switch (t) {
      case wire::JobRequestBody::Hello: return "hello";
      case wire::JobRequestBody::LoadModelRequest: return "load";
      case wire::JobRequestBody::UnloadModelRequest: return "unload";
      case wire::JobRequestBody::ListModelsRequest: return "list";
      case wire::JobRequestBody::PlanRequest: return "plan";
      case wire::JobRequestBody::ForwardRequest: return "forward";
      case wire::JobRequestBody::CancelRequest: return "cancel";
      case wire::JobRequestBody::StatusRequest: return "status";
      case wire::JobRequestBody::PutPatchesRequest: return "put_patches";
      default: return "unknown";
    }
  }

  void Count(const char* type, const char* outcome) {
    coordinator->metrics().jobs.Add({{"type", type}, {"outcome", outcome}}).Increment();
  }

  // ok or failed, from a reply we built.
  void CountReply(const char* type, const Frames& reply) {
    const auto* r = flatbuffers::GetRoot<wire::JobResponse>(reply[0].data());
    Count(type, r->body_type() == wire::JobResponseBody::Error ? "failed" : "ok");
  }

  void UpdateQueueGauges() {
    coordinator->metrics().queue_depth.Add({}).Set(static_cast<double>(queue->depth()));
    coordinator->metrics().queue_capacity.Add({}).Set(static_cast<double>(queue->capacity()));
  }

  // Queues a reply from any thread and wakes the socket thread.
  void Post(const std::string& identity, Frames frames) {
    std::lock_guard lock(out_mu);
    outbox.emplace_back(identity, std::move(frames));
    zmq::message_t one(1);
    (void)wake_push.send(one, zmq::send_flags::dontwait);
  }

  void Send(const std::string& identity, Frames& frames) {
    Frames out;
    out.emplace_back(identity.data(), identity.size());
    for (auto& f : frames) out.push_back(std::move(f));
    Status s = transport::SendFrames(router, out);
    if (!s.ok()) FLEET_VLOG(1, "jobs") << "reply dropped: " << s;
  }

  void Loop() {
    zmq::pollitem_t items[] = {{router.handle(), 0, ZMQ_POLLIN, 0}, {wake_pull.handle(), 0, ZMQ_POLLIN, 0}};
    while (!stop.load()) {
      try {
        zmq::poll(items, 2, std::chrono::milliseconds(200));
      } catch (const zmq::error_t& e) {
        FLEET_LOG(WARNING, "jobs") << "poll: " << e.what();
        continue;
      }
      if (items[1].revents & ZMQ_POLLIN) {
        zmq::message_t m;
        while (wake_pull.recv(m, zmq::recv_flags::dontwait)) {
        }
      }
      std::deque<std::pair<std::string, Frames>> ready;
      {
        std::lock_guard lock(out_mu);
        ready.swap(outbox);
      }
      for (auto& [identity, frames] : ready) Send(identity, frames);
      if (items[0].revents & ZMQ_POLLIN) {
        bool dropped = false;
        auto frames = transport::RecvFrames(router, std::chrono::milliseconds(0),
                                            limits.max_tensors + 2, &dropped);
        if (!frames.ok() || frames->size() < 2) continue;
        std::string identity(static_cast<const char*>((*frames)[0].data()), (*frames)[0].size());
        frames->erase(frames->begin());
        Handle(identity, std::move(*frames), dropped);
      }
    }
  }

  // `too_many_frames`: the message had more frames than a request may (the rest were dropped).
  void Handle(const std::string& identity, Frames frames, bool too_many_frames) {
    transport::AlignFrame(frames[0]);  // read in place here and by the job thread
    auto header = transport::FrameBytes(frames[0]);
    if (header.size() > limits.max_header_bytes) {
      Frames reply = ErrorReply(0, ResourceExhaustedError("request header of " + std::to_string(header.size()) +
                                                         " bytes exceeds the limit"));
      return Send(identity, reply);
    }
    flatbuffers::Verifier verifier(header.data(), header.size(), 64, 1000000);
    if (!verifier.VerifyBuffer<wire::JobRequest>(kJobRequestId)) {
      Frames reply = ErrorReply(0, InvalidArgumentError("malformed request: not a verified JobRequest "
                                                        "(file identifier FJRQ)"));
      Count("unknown", "rejected");
      return Send(identity, reply);
    }
    const auto* req = flatbuffers::GetRoot<wire::JobRequest>(header.data());
    uint64_t id = req->id();
    auto type = req->body_type();
    if (too_many_frames) {
      Frames reply = ErrorReply(
          id, ResourceExhaustedError(std::string(TypeName(type)) + " came with more than " +
                                     std::to_string(limits.max_tensors) +
                                     " data frames; the rest were dropped unread"));
      Count(TypeName(type), "rejected");
      return Send(identity, reply);
    }
    if (type == wire::JobRequestBody::Hello) return HandleHello(identity, id, req->body_as_Hello());
    if (!Greeted(identity)) {
      Frames reply = ErrorReply(id, FailedPreconditionError("send Hello first on a new connection"));
      Count(TypeName(type), "rejected");
      return Send(identity, reply);
    }
    if (type != wire::JobRequestBody::LoadModelRequest && type != wire::JobRequestBody::UnloadModelRequest &&
        type != wire::JobRequestBody::PlanRequest && type != wire::JobRequestBody::ForwardRequest &&
        type != wire::JobRequestBody::PutPatchesRequest) {
      Frames reply = Immediate(identity, id, req);
      CountReply(TypeName(type), reply);
      return Send(identity, reply);
    }
    Enqueue(identity, id, TypeName(type), std::move(frames));
  }

  // Requests answered on the socket thread: cheap and never blocking.
  Frames Immediate(const std::string& identity, uint64_t id, const wire::JobRequest* req) {
    auto type = req->body_type();
    switch (type) {
      case wire::JobRequestBody::ListModelsRequest: {
        flatbuffers::FlatBufferBuilder fbb;
        std::vector<flatbuffers::Offset<wire::ModelInfo>> models;
        for (const auto& m : coordinator->ListModels()) models.push_back(BuildModelInfo(fbb, m));
        auto body = wire::CreateListModelsResponse(fbb, fbb.CreateVector(models));
        Frames out;
        out.push_back(Finish(fbb, id, wire::JobResponseBody::ListModelsResponse, body.Union()));
        return out;
      }
      case wire::JobRequestBody::StatusRequest:
        return StatusReply(id);
      case wire::JobRequestBody::CancelRequest: {
        uint64_t target = req->body_as_CancelRequest()->request_id();
        std::lock_guard lock(inflight_mu);
        auto it = inflight.find({identity, target});
        if (it != inflight.end()) it->second->store(true);
        return it != inflight.end() ? AckReply(id)
                                    : ErrorReply(id, NotFoundError("no request " + std::to_string(target) +
                                                                   " in flight on this connection"));
      }
      default:
        return ErrorReply(id, UnimplementedError("unknown request type " + std::to_string(static_cast<int>(type))));
    }
  }

  void HandleHello(const std::string& identity, uint64_t id, const wire::Hello* hello) {
    if (hello == nullptr) {
      Frames reply = ErrorReply(id, InvalidArgumentError("Hello without a body"));
      return Send(identity, reply);
    }
    protocol::HelloInfo mine;
    mine.peer_name = "coordinator";
    mine.max_message_bytes = limits.max_message_bytes;
    auto negotiated = protocol::Negotiate(mine, protocol::ReadHello(*hello));
    if (!negotiated.ok()) {
      Frames reply = ErrorReply(id, negotiated.status());
      return Send(identity, reply);
    }
    Greet(identity);
    flatbuffers::FlatBufferBuilder fbb;
    mine.capabilities = 0;
    auto body = protocol::BuildHello(fbb, mine);
    Frames out;
    out.push_back(Finish(fbb, id, wire::JobResponseBody::Hello, body.Union()));
    Send(identity, out);
  }

  Frames StatusReply(uint64_t id) {
    ClusterStatus st = coordinator->Cluster();
    flatbuffers::FlatBufferBuilder fbb;
    std::vector<flatbuffers::Offset<wire::WorkerInfo>> workers;
    auto now = std::chrono::steady_clock::now();
    for (const auto& w : st.workers) {
      auto since = std::chrono::duration_cast<std::chrono::milliseconds>(now - w.last_seen).count();
      workers.push_back(wire::CreateWorkerInfo(fbb, fbb.CreateString(w.device), fbb.CreateString(w.endpoint),
                                               w.up, fbb.CreateString(w.backing), w.total_bytes,
                                               w.capacity_bytes, w.resident_bytes,
                                               static_cast<uint64_t>(std::max<int64_t>(0, since))));
    }
    std::vector<flatbuffers::Offset<wire::ModelInfo>> models;
    for (const auto& m : st.models) models.push_back(BuildModelInfo(fbb, m));
    auto body = wire::CreateStatusResponse(fbb, fbb.CreateString(FLEET_VERSION), fbb.CreateVector(workers),
                                           fbb.CreateVector(models), static_cast<uint32_t>(queue->depth()),
                                           static_cast<uint32_t>(queue->capacity()), st.draining);
    Frames out;
    out.push_back(Finish(fbb, id, wire::JobResponseBody::StatusResponse, body.Union()));
    return out;
  }

  void Enqueue(const std::string& identity, uint64_t id, const char* type, Frames frames) {
    auto cancelled = std::make_shared<std::atomic<bool>>(false);
    {
      std::lock_guard lock(inflight_mu);
      inflight[{identity, id}] = cancelled;
    }
    auto shared = std::make_shared<Frames>(std::move(frames));
    const auto queued_at = std::chrono::steady_clock::now();
    Status queued = queue->Submit(
        [this, identity, id, type, shared, cancelled, queued_at] {
          coordinator->metrics()
              .queue_wait.Add({{"type", type}}, metrics::DurationBuckets())
              .Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - queued_at).count());
          UpdateQueueGauges();
          Frames reply = Run(id, shared, cancelled);
          CountReply(type, reply);
          {
            std::lock_guard lock(inflight_mu);
            inflight.erase({identity, id});
          }
          Post(identity, std::move(reply));
        },
        [this, identity, id, type] {
          Count(type, "rejected");
          {
            std::lock_guard lock(inflight_mu);
            inflight.erase({identity, id});
          }
          Post(identity, ErrorReply(id, UnavailableError("the coordinator is shutting down; request not run")));
        });
    UpdateQueueGauges();
    if (!queued.ok()) {
      {
        std::lock_guard lock(inflight_mu);
        inflight.erase({identity, id});
      }
      Count(type, "rejected");
      Frames reply = ErrorReply(id, queued);
      Send(identity, reply);
    }
  }

  // Runs one queued request on a job thread and builds its reply.
  Frames Run(uint64_t id, const std::shared_ptr<Frames>& frames, const std::shared_ptr<std::atomic<bool>>& cancelled) {
    const auto* req = flatbuffers::GetRoot<wire::JobRequest>((*frames)[0].data());
    switch (req->body_type()) {
      case wire::JobRequestBody::LoadModelRequest: {
        const auto* r = req->body_as_LoadModelRequest();
        auto spec = ReadSpec(r->spec());
        if (!spec.ok()) return ErrorReply(id, spec.status());
        auto info = coordinator->LoadModel(Str(r->name()), *spec, cancelled);  // CancelRequest stops it
        if (!info.ok()) return ErrorReply(id, info.status());
        flatbuffers::FlatBufferBuilder fbb;
        auto body = wire::CreateLoadModelResponse(fbb, BuildModelInfo(fbb, *info));
        Frames out;
        out.push_back(Finish(fbb, id, wire::JobResponseBody::LoadModelResponse, body.Union()));
        return out;
      }
      case wire::JobRequestBody::UnloadModelRequest: {
        Status s = coordinator->UnloadModel(Str(req->body_as_UnloadModelRequest()->name()));
        return s.ok() ? AckReply(id) : ErrorReply(id, s);
      }
      case wire::JobRequestBody::PlanRequest: {
        auto spec = ReadSpec(req->body_as_PlanRequest()->spec());
        if (!spec.ok()) return ErrorReply(id, spec.status());
        auto plan = coordinator->Plan(*spec);
        if (!plan.ok()) return ErrorReply(id, plan.status());
        flatbuffers::FlatBufferBuilder fbb;
        std::vector<flatbuffers::Offset<flatbuffers::String>> evicts;
        for (const auto& e : plan->evicts) evicts.push_back(fbb.CreateString(e));
        auto body = wire::CreatePlanResponse(fbb, fbb.CreateString(plan->json), fbb.CreateString(plan->text),
                                             fbb.CreateString(plan->expert_string), fbb.CreateVector(evicts));
        Frames out;
        out.push_back(Finish(fbb, id, wire::JobResponseBody::PlanResponse, body.Union()));
        return out;
      }
      case wire::JobRequestBody::ForwardRequest:
        return RunForward(id, frames, cancelled);
      case wire::JobRequestBody::PutPatchesRequest:
        return RunPutPatches(id, frames);
      default:
        return ErrorReply(id, InternalError("unexpected queued request"));
    }
  }

  // Tensors of a job request: descriptors of data frames (Frame payloads), checked against the
  // limits and the frames; each keeps `frames` alive.
  StatusOr<std::vector<HostTensor>> FrameTensors(
      const flatbuffers::Vector<flatbuffers::Offset<wire::TensorDesc>>* descs,
      const std::shared_ptr<Frames>& frames, const std::string& what) const {
    std::vector<HostTensor> out;
    if (descs == nullptr) return out;
    if (descs->size() > limits.max_tensors) {
      return InvalidArgumentError("too many " + what + " tensors (" +
                                  std::to_string(descs->size()) + ")");
    }
    const size_t data_frames = frames->size() - 1;
    for (size_t i = 0; i < descs->size(); ++i) {
      const auto* d = descs->Get(i);
      const std::string where = what + " " + std::to_string(i);
      FLEET_RETURN_IF_ERROR(protocol::CheckTensorDesc(d, limits, data_frames, where));
      if (d->payload() != wire::PayloadKind::Frame && d->nbytes() > 0) {
        return InvalidArgumentError(where + " ('" + Str(d->name()) +
                                    "'): tensors must travel in data frames on the job channel");
      }
      HostTensor t;
      t.name = Str(d->name());
      t.dtype = d->dtype();
      if (d->shape()) t.shape.assign(d->shape()->begin(), d->shape()->end());
      if (d->nbytes() > 0) {
        // Frames are [header, data 1, data 2, ...]: the descriptor's frame index is 1-based.
        const zmq::message_t& m = (*frames)[d->frame()];
        if (m.size() != d->nbytes()) {
          return InvalidArgumentError(where + " ('" + t.name + "'): data frame holds " +
                                      std::to_string(m.size()) + " bytes, descriptor says " +
                                      std::to_string(d->nbytes()));
        }
        t.data = static_cast<const uint8_t*>(m.data());
        t.nbytes = m.size();
      }
      t.owner = frames;
      out.push_back(std::move(t));
    }
    return out;
  }

  Frames RunPutPatches(uint64_t id, const std::shared_ptr<Frames>& frames) {
    const auto* r =
        flatbuffers::GetRoot<wire::JobRequest>((*frames)[0].data())->body_as_PutPatchesRequest();
    auto tensors = FrameTensors(r->tensors(), frames, "patch");
    if (!tensors.ok()) return ErrorReply(id, tensors.status());
    std::vector<worker::LoraFileRef> loras;
    if (r->loras()) {
      for (const auto* l : *r->loras()) {
        worker::LoraFileRef ref{Str(l->path()), l->strength(), {}};
        if (l->modules()) {
          for (const auto* m : *l->modules()) {
            auto module = worker::LoraModuleFromWire(*m);
            if (!module.ok()) return ErrorReply(id, module.status());
            ref.modules.push_back(std::move(*module));
          }
        }
        loras.push_back(std::move(ref));
      }
    }
    Status s = coordinator->PutPatches(Str(r->model()), Str(r->id()), std::move(loras),
                                       std::move(*tensors));
    return s.ok() ? AckReply(id) : ErrorReply(id, s);
  }

  Frames RunForward(uint64_t id, const std::shared_ptr<Frames>& frames,
                    const std::shared_ptr<std::atomic<bool>>& cancelled) {
    const auto* f = flatbuffers::GetRoot<wire::JobRequest>((*frames)[0].data())->body_as_ForwardRequest();
    ForwardRequest request;
    request.model = Str(f->model());
    request.run_id = Str(f->run_id());
    request.end_run = f->end_run();
    request.timeout = std::chrono::milliseconds(f->timeout_ms());
    request.cancelled = cancelled;
    if (f->constant_inputs()) {
      for (const auto* s : *f->constant_inputs()) request.constant_inputs.push_back(s->str());
    }
    if (f->loras()) {
      if (f->loras()->size() > kMaxLoras) {
        return ErrorReply(
            id, InvalidArgumentError("a Forward may stack at most " + std::to_string(kMaxLoras) +
                                     " LoRAs, not " + std::to_string(f->loras()->size())));
      }
      for (const auto* l : *f->loras()) request.loras.push_back({Str(l->path()), l->strength()});
    }
    request.patches = Str(f->patches());
    auto inputs = FrameTensors(f->inputs(), frames, "input");
    if (!inputs.ok()) return ErrorReply(id, inputs.status());
    request.inputs = std::move(*inputs);
    auto result = coordinator->Forward(request);
    if (!result.ok()) return ErrorReply(id, result.status());
    flatbuffers::FlatBufferBuilder fbb;
    Frames out(1);
    std::vector<flatbuffers::Offset<wire::TensorDesc>> descs;
    for (const auto& t : result->outputs) {
      wire::PayloadKind kind = t.nbytes == 0 ? wire::PayloadKind::None : wire::PayloadKind::Frame;
      uint32_t frame = 0;
      if (t.nbytes > 0) {
        out.push_back(transport::ZeroCopyMessage(t.data, t.nbytes, t.owner));
        frame = static_cast<uint32_t>(out.size() - 1);
      }
      descs.push_back(wire::CreateTensorDesc(fbb, fbb.CreateString(t.name), t.dtype, fbb.CreateVector(t.shape),
                                             t.nbytes, kind, frame, 0, 0));
    }
    auto body = wire::CreateForwardResponse(fbb, fbb.CreateVector(descs), result->step_seconds, result->weight_bytes,
                                            result->activation_bytes, result->prefetch_stall_seconds);
    out[0] = Finish(fbb, id, wire::JobResponseBody::ForwardResponse, body.Union());
    return out;
  }
};

JobServer::JobServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

StatusOr<std::unique_ptr<JobServer>> JobServer::Start(Coordinator* coordinator, const std::string& listen,
                                                      const transport::CurveConfig* curve) {
  auto impl = std::make_unique<Impl>();
  impl->coordinator = coordinator;
  const auto& o = coordinator->options();
  impl->queue = std::make_unique<JobQueue>(static_cast<size_t>(std::max<int64_t>(1, o.queue_capacity)),
                                           static_cast<int>(std::max<int64_t>(1, o.job_threads)));
  transport::SocketOptions so;
  so.max_message_bytes = impl->limits.max_message_bytes;
  so.curve = curve;
  so.server = true;
  so.rcvhwm = transport::kRouterRcvHwm;
  FLEET_RETURN_IF_ERROR(transport::ConfigureSocket(impl->router, so));
  FLEET_ASSIGN_OR_RETURN(impl->endpoint, transport::Bind(impl->router, listen));
  impl->wake_endpoint = "inproc://fleet-jobs-wake-" + std::to_string(reinterpret_cast<uintptr_t>(impl.get()));
  FLEET_RETURN_IF_ERROR(transport::Bind(impl->wake_pull, impl->wake_endpoint).status());
  FLEET_RETURN_IF_ERROR(transport::Connect(impl->wake_push, impl->wake_endpoint));
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Loop(); });
  return std::unique_ptr<JobServer>(new JobServer(std::move(impl)));
}

JobServer::~JobServer() { Drain(std::chrono::milliseconds(0)); }

const std::string& JobServer::endpoint() const { return impl_->endpoint; }
JobQueue& JobServer::queue() { return *impl_->queue; }

void JobServer::Drain(std::chrono::milliseconds timeout) {
  if (impl_->stop.load()) return;
  impl_->queue->Drain(timeout);
  // Give the socket thread a moment to flush the replies of the jobs that just finished.
  for (int i = 0; i < 50; ++i) {
    {
      std::lock_guard lock(impl_->out_mu);
      if (impl_->outbox.empty()) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  impl_->stop.store(true);
  if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace fleet::coordinator
