#include "fleet/coordinator/job_client.h"

#include "fleet/protocol/protocol.h"
#include "job_generated.h"

namespace fleet::coordinator {

namespace {

std::string Str(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

ModelInfo ReadModelInfo(const wire::ModelInfo* m) {
  ModelInfo i;
  if (m == nullptr) return i;
  i.name = Str(m->name());
  i.path = Str(m->path());
  i.family = Str(m->family());
  switch (m->state()) {
    case wire::ModelState::Loading: i.state = ModelState::kLoading; break;
    case wire::ModelState::Ready: i.state = ModelState::kReady; break;
    case wire::ModelState::Unloading: i.state = ModelState::kUnloading; break;
    default: i.state = ModelState::kFailed; break;
  }
  i.bytes_loaded = m->bytes_loaded();
  i.bytes_total = m->bytes_total();
  i.compute_device = Str(m->compute_device());
  i.mode = m->mode() == wire::ExecMode::Stream     ? ExecMode::kStream
           : m->mode() == wire::ExecMode::Pipeline ? ExecMode::kPipeline
                                                   : ExecMode::kAuto;
  i.keep_loaded = m->keep_loaded();
  i.error = Str(m->error());
  i.plan_json = Str(m->plan_json());
  return i;
}

flatbuffers::Offset<wire::ModelSpec> BuildSpec(flatbuffers::FlatBufferBuilder& fbb, const ModelSpec& s) {
  wire::ExecMode mode = wire::ExecMode::Auto;
  if (s.mode == ExecMode::kStream) mode = wire::ExecMode::Stream;
  if (s.mode == ExecMode::kPipeline) mode = wire::ExecMode::Pipeline;
  wire::DType dtype = wire::DType::Invalid;
  if (s.dtype == "float32") dtype = wire::DType::F32;
  if (s.dtype == "bfloat16") dtype = wire::DType::BF16;
  if (s.dtype == "float16") dtype = wire::DType::F16;
  return wire::CreateModelSpec(fbb, fbb.CreateString(s.path), fbb.CreateString(s.compute_device),
                               s.virtual_vram_gb, fbb.CreateString(s.donor_device),
                               fbb.CreateString(s.expert_mode_allocations), s.eject_models,
                               s.keep_loaded, mode, dtype, static_cast<uint32_t>(s.prefetch_depth),
                               s.allow_mixed, static_cast<uint32_t>(s.width),
                               static_cast<uint32_t>(s.height), static_cast<uint32_t>(s.frames),
                               static_cast<uint32_t>(s.batch), fbb.CreateString(s.weight_dtype),
                               fbb.CreateString(s.dequant_dtype));
}

}  // namespace

JobClient::JobClient(zmq::socket_t socket, std::chrono::milliseconds timeout)
    : socket_(std::move(socket)), timeout_(timeout) {}

StatusOr<std::unique_ptr<JobClient>> JobClient::Connect(const std::string& endpoint,
                                                        std::chrono::milliseconds timeout,
                                                        const transport::CurveConfig* curve) {
  zmq::socket_t socket(transport::Context(), zmq::socket_type::dealer);
  transport::SocketOptions so;
  so.curve = curve;
  FLEET_RETURN_IF_ERROR(transport::ConfigureSocket(socket, so));
  FLEET_RETURN_IF_ERROR(transport::Connect(socket, endpoint));
  auto client = std::make_unique<JobClient>(std::move(socket), timeout);
  flatbuffers::FlatBufferBuilder fbb;
  protocol::HelloInfo hello;
  hello.peer_name = "fleet-client";
  auto body = protocol::BuildHello(fbb, hello);
  wire::JobRequestBuilder b(fbb);
  b.add_id(client->next_id_);
  b.add_body_type(wire::JobRequestBody::Hello);
  b.add_body(body.Union());
  fbb.Finish(b.Finish(), "FJRQ");
  auto reply = client->Call(fbb, {});
  if (!reply.ok()) return reply.status().WithContext("coordinator at " + endpoint);
  return client;
}

StatusOr<transport::Frames> JobClient::Call(flatbuffers::FlatBufferBuilder& fbb, transport::Frames data) {
  std::lock_guard lock(mu_);
  const uint64_t id = flatbuffers::GetRoot<wire::JobRequest>(fbb.GetBufferPointer())->id();
  transport::Frames frames;
  frames.push_back(transport::MessageFromBuffer(fbb.Release()));
  for (auto& d : data) frames.push_back(std::move(d));
  FLEET_RETURN_IF_ERROR(transport::SendFrames(socket_, frames));
  auto deadline = std::chrono::steady_clock::now() + timeout_;
  while (true) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return DeadlineExceededError("no reply from the coordinator in time");
    FLEET_ASSIGN_OR_RETURN(transport::Frames reply, transport::RecvFrames(socket_, left));
    if (reply.empty()) continue;
    transport::AlignFrame(reply[0]);  // read in place here and by the callers (Root)
    auto header = transport::FrameBytes(reply[0]);
    flatbuffers::Verifier v(header.data(), header.size(), 64, 1000000);
    if (!v.VerifyBuffer<wire::JobResponse>("FJRS")) return DataLossError("malformed reply from the coordinator");
    const auto* r = flatbuffers::GetRoot<wire::JobResponse>(header.data());
    if (r->id() != id) continue;  // a late reply to an earlier request that timed out
    if (const auto* e = r->body_as_Error()) return protocol::FromWireError(e);
    return reply;
  }
}

namespace {
uint64_t Next(uint64_t& id) { return ++id; }

void FinishRequest(flatbuffers::FlatBufferBuilder& fbb, uint64_t id, wire::JobRequestBody type,
                   flatbuffers::Offset<void> body) {
  wire::JobRequestBuilder b(fbb);
  b.add_id(id);
  b.add_body_type(type);
  b.add_body(body);
  fbb.Finish(b.Finish(), "FJRQ");
}

const wire::JobResponse* Root(const transport::Frames& f) { return flatbuffers::GetRoot<wire::JobResponse>(f[0].data()); }
}  // namespace

StatusOr<ModelInfo> JobClient::LoadModel(const std::string& name, const ModelSpec& spec) {
  flatbuffers::FlatBufferBuilder fbb;
  auto body = wire::CreateLoadModelRequest(fbb, fbb.CreateString(name), BuildSpec(fbb, spec));
  FinishRequest(fbb, Next(next_id_), wire::JobRequestBody::LoadModelRequest, body.Union());
  FLEET_ASSIGN_OR_RETURN(auto reply, Call(fbb, {}));
  const auto* r = Root(reply)->body_as_LoadModelResponse();
  if (r == nullptr) return DataLossError("unexpected reply to LoadModel");
  return ReadModelInfo(r->model());
}

Status JobClient::UnloadModel(const std::string& name) {
  flatbuffers::FlatBufferBuilder fbb;
  auto body = wire::CreateUnloadModelRequest(fbb, fbb.CreateString(name));
  FinishRequest(fbb, Next(next_id_), wire::JobRequestBody::UnloadModelRequest, body.Union());
  return Call(fbb, {}).status();
}

StatusOr<std::vector<ModelInfo>> JobClient::ListModels() {
  flatbuffers::FlatBufferBuilder fbb;
  auto body = wire::CreateListModelsRequest(fbb);
  FinishRequest(fbb, Next(next_id_), wire::JobRequestBody::ListModelsRequest, body.Union());
  FLEET_ASSIGN_OR_RETURN(auto reply, Call(fbb, {}));
  const auto* r = Root(reply)->body_as_ListModelsResponse();
  if (r == nullptr) return DataLossError("unexpected reply to ListModels");
  std::vector<ModelInfo> out;
  if (r->models()) {
    for (const auto* m : *r->models()) out.push_back(ReadModelInfo(m));
  }
  return out;
}

StatusOr<PlanResult> JobClient::Plan(const ModelSpec& spec) {
  flatbuffers::FlatBufferBuilder fbb;
  auto body = wire::CreatePlanRequest(fbb, BuildSpec(fbb, spec));
  FinishRequest(fbb, Next(next_id_), wire::JobRequestBody::PlanRequest, body.Union());
  FLEET_ASSIGN_OR_RETURN(auto reply, Call(fbb, {}));
  const auto* r = Root(reply)->body_as_PlanResponse();
  if (r == nullptr) return DataLossError("unexpected reply to Plan");
  PlanResult result{Str(r->plan_json()), Str(r->text()), Str(r->expert_string()), {}};
  if (r->evicts() != nullptr) {
    for (const auto* e : *r->evicts()) result.evicts.push_back(e->str());
  }
  return result;
}

StatusOr<ForwardResult> JobClient::Forward(const std::string& model, const std::vector<HostTensor>& inputs,
                                           const std::string& run_id,
                                           const std::vector<std::string>& constant_inputs, bool end_run) {
  flatbuffers::FlatBufferBuilder fbb;
  transport::Frames data;
  std::vector<flatbuffers::Offset<wire::TensorDesc>> descs;
  for (const auto& t : inputs) {
    uint32_t frame = 0;
    if (t.nbytes > 0) {
      data.push_back(transport::ZeroCopyMessage(t.data, t.nbytes, t.owner));
      frame = static_cast<uint32_t>(data.size());
    }
    descs.push_back(wire::CreateTensorDesc(fbb, fbb.CreateString(t.name), t.dtype, fbb.CreateVector(t.shape), t.nbytes,
                                           t.nbytes ? wire::PayloadKind::Frame : wire::PayloadKind::None, frame, 0, 0));
  }
  std::vector<flatbuffers::Offset<flatbuffers::String>> constants;
  for (const auto& c : constant_inputs) constants.push_back(fbb.CreateString(c));
  auto body = wire::CreateForwardRequest(fbb, fbb.CreateString(model), fbb.CreateVector(descs),
                                         fbb.CreateString(run_id), fbb.CreateVector(constants), end_run, 0);
  FinishRequest(fbb, Next(next_id_), wire::JobRequestBody::ForwardRequest, body.Union());
  FLEET_ASSIGN_OR_RETURN(auto reply, Call(fbb, std::move(data)));
  const auto* r = Root(reply)->body_as_ForwardResponse();
  if (r == nullptr) return DataLossError("unexpected reply to Forward");
  ForwardResult result;
  result.step_seconds = r->step_seconds();
  result.weight_bytes = r->weight_bytes();
  result.activation_bytes = r->activation_bytes();
  result.prefetch_stall_seconds = r->prefetch_stall_seconds();
  auto frames = std::make_shared<transport::Frames>(std::move(reply));
  protocol::Limits limits;
  if (r->outputs()) {
    for (size_t i = 0; i < r->outputs()->size(); ++i) {
      const auto* d = r->outputs()->Get(i);
      FLEET_RETURN_IF_ERROR(protocol::CheckTensorDesc(d, limits, frames->size() - 1, "output " + std::to_string(i)));
      HostTensor t;
      t.name = Str(d->name());
      t.dtype = d->dtype();
      if (d->shape()) t.shape.assign(d->shape()->begin(), d->shape()->end());
      t.nbytes = d->nbytes();
      if (t.nbytes) {
        // Frames are [header, data 1, ...]; CheckTensorDesc validated the 1-based index.
        const zmq::message_t& m = (*frames)[d->frame()];
        if (m.size() != t.nbytes) {
          return DataLossError("output '" + t.name + "': data frame holds " + std::to_string(m.size()) +
                               " bytes, the descriptor says " + std::to_string(t.nbytes));
        }
        t.data = static_cast<const uint8_t*>(m.data());
      }
      t.owner = frames;
      result.outputs.push_back(std::move(t));
    }
  }
  return result;
}

StatusOr<ClusterStatus> JobClient::Cluster() {
  flatbuffers::FlatBufferBuilder fbb;
  auto body = wire::CreateStatusRequest(fbb);
  FinishRequest(fbb, Next(next_id_), wire::JobRequestBody::StatusRequest, body.Union());
  FLEET_ASSIGN_OR_RETURN(auto reply, Call(fbb, {}));
  const auto* r = Root(reply)->body_as_StatusResponse();
  if (r == nullptr) return DataLossError("unexpected reply to Status");
  ClusterStatus s;
  s.draining = r->draining();
  if (r->workers()) {
    for (const auto* w : *r->workers()) {
      WorkerRecord rec;
      rec.device = Str(w->device());
      rec.endpoint = Str(w->endpoint());
      rec.up = w->up();
      rec.backing = Str(w->backing());
      rec.total_bytes = w->total_bytes();
      rec.capacity_bytes = w->capacity_bytes();
      rec.resident_bytes = w->resident_bytes();
      s.workers.push_back(rec);
    }
  }
  if (r->models()) {
    for (const auto* m : *r->models()) s.models.push_back(ReadModelInfo(m));
  }
  return s;
}

}  // namespace fleet::coordinator
