#include "fleet/protocol/protocol.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <random>

namespace fleet::protocol {

// The wire codes are StatusCode's numbers; a renumbering on either side breaks the protocol.
static_assert(static_cast<int>(wire::ErrorCode::Ok) == static_cast<int>(StatusCode::kOk));
static_assert(static_cast<int>(wire::ErrorCode::InvalidArgument) ==
              static_cast<int>(StatusCode::kInvalidArgument));
static_assert(static_cast<int>(wire::ErrorCode::NotFound) ==
              static_cast<int>(StatusCode::kNotFound));
static_assert(static_cast<int>(wire::ErrorCode::AlreadyExists) ==
              static_cast<int>(StatusCode::kAlreadyExists));
static_assert(static_cast<int>(wire::ErrorCode::OutOfRange) ==
              static_cast<int>(StatusCode::kOutOfRange));
static_assert(static_cast<int>(wire::ErrorCode::ResourceExhausted) ==
              static_cast<int>(StatusCode::kResourceExhausted));
static_assert(static_cast<int>(wire::ErrorCode::FailedPrecondition) ==
              static_cast<int>(StatusCode::kFailedPrecondition));
static_assert(static_cast<int>(wire::ErrorCode::Unavailable) ==
              static_cast<int>(StatusCode::kUnavailable));
static_assert(static_cast<int>(wire::ErrorCode::DeadlineExceeded) ==
              static_cast<int>(StatusCode::kDeadlineExceeded));
static_assert(static_cast<int>(wire::ErrorCode::DataLoss) ==
              static_cast<int>(StatusCode::kDataLoss));
static_assert(static_cast<int>(wire::ErrorCode::Cancelled) ==
              static_cast<int>(StatusCode::kCancelled));
static_assert(static_cast<int>(wire::ErrorCode::Unimplemented) ==
              static_cast<int>(StatusCode::kUnimplemented));
static_assert(static_cast<int>(wire::ErrorCode::Internal) ==
              static_cast<int>(StatusCode::kInternal));
static_assert(static_cast<int>(wire::ErrorCode::MAX) + 1 == kStatusCodeCount,
              "schemas/common.fbs ErrorCode and fleet::StatusCode differ");
// The union values are permanent: appending is fine, reordering is not.
static_assert(static_cast<int>(wire::WorkerRequestBody::Hello) == 1);
static_assert(static_cast<int>(wire::WorkerRequestBody::EndRunRequest) == 14);
static_assert(static_cast<int>(wire::WorkerResponseBody::Error) == 2);
static_assert(static_cast<int>(wire::DType::F8E5M2) == 12);

AlignedBuffer::AlignedBuffer(const void* data, size_t size) : words_((size + 7) / 8), size_(size) {
  if (size > 0) std::memcpy(words_.data(), data, size);
}

wire::ErrorCode ToWireCode(StatusCode code) { return static_cast<wire::ErrorCode>(code); }

Status FromWireError(const wire::Error* error) {
  if (error == nullptr) return InternalError("error reply without an Error table");
  const auto code = static_cast<int>(error->code());
  const std::string message = error->message() ? error->message()->str() : "";
  if (code <= 0 || code >= kStatusCodeCount) {
    return InternalError("error reply with unknown code " + std::to_string(code) + ": " + message);
  }
  return Status(static_cast<StatusCode>(code), message);
}

namespace {

struct DTypeEntry {
  wire::DType dtype;
  std::string_view name;
  std::string_view safetensors;
  size_t size;
};
constexpr std::array<DTypeEntry, 12> kDTypes = {{
    {wire::DType::F32, "f32", "F32", 4},
    {wire::DType::F16, "f16", "F16", 2},
    {wire::DType::BF16, "bf16", "BF16", 2},
    {wire::DType::F64, "f64", "F64", 8},
    {wire::DType::I64, "i64", "I64", 8},
    {wire::DType::I32, "i32", "I32", 4},
    {wire::DType::I16, "i16", "I16", 2},
    {wire::DType::I8, "i8", "I8", 1},
    {wire::DType::U8, "u8", "U8", 1},
    {wire::DType::Bool, "bool", "BOOL", 1},
    {wire::DType::F8E4M3, "f8e4m3", "F8_E4M3", 1},
    {wire::DType::F8E5M2, "f8e5m2", "F8_E5M2", 1},
}};

const DTypeEntry* FindDType(wire::DType dtype) {
  for (const auto& e : kDTypes) {
    if (e.dtype == dtype) return &e;
  }
  return nullptr;
}

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

// Verifier depth/table limits generous enough for our messages, small enough to bound work.
flatbuffers::Verifier MakeVerifier(std::span<const uint8_t> header, const Limits& limits) {
  return flatbuffers::Verifier(header.data(), header.size(), /*max_depth=*/64,
                               /*max_tables=*/std::max<uint32_t>(1000000, limits.max_tensors * 4));
}

Status CheckHeaderSize(std::span<const uint8_t> header, const Limits& limits, const char* what) {
  if (header.size() < 8) {
    return InvalidArgumentError(std::string(what) + " header frame of " +
                                std::to_string(header.size()) +
                                " bytes is too short to be a FlatBuffer (at least 8)");
  }
  if (header.size() > limits.max_header_bytes) {
    return ResourceExhaustedError(std::string(what) + " header frame of " +
                                  std::to_string(header.size()) + " bytes exceeds the limit of " +
                                  std::to_string(limits.max_header_bytes));
  }
  return Status::OK();
}

Status CheckIdentifier(std::span<const uint8_t> header, const char* expected, const char* what) {
  if (!flatbuffers::BufferHasIdentifier(header.data(), expected)) {
    std::string got(reinterpret_cast<const char*>(header.data()) + 4, 4);
    for (char& c : got) {
      if (!std::isprint(static_cast<unsigned char>(c))) c = '?';
    }
    return InvalidArgumentError(std::string(what) + ": file identifier '" + got +
                                "' at byte offset 4, expected '" + expected + "'");
  }
  return Status::OK();
}

}  // namespace

std::string_view DTypeName(wire::DType dtype) {
  const DTypeEntry* e = FindDType(dtype);
  return e ? e->name : "invalid";
}

size_t DTypeSize(wire::DType dtype) {
  const DTypeEntry* e = FindDType(dtype);
  return e ? e->size : 0;
}

StatusOr<wire::DType> ParseDType(std::string_view text) {
  for (const auto& e : kDTypes) {
    if (EqualsIgnoreCase(text, e.name) || EqualsIgnoreCase(text, e.safetensors)) return e.dtype;
  }
  return InvalidArgumentError("unknown dtype '" + std::string(text) +
                              "' (known: f32 f16 bf16 f64 i64 i32 i16 i8 u8 bool f8e4m3 f8e5m2)");
}

StatusOr<uint64_t> TensorBytes(wire::DType dtype, std::span<const int64_t> shape) {
  const size_t size = DTypeSize(dtype);
  if (size == 0) {
    return InvalidArgumentError("unknown dtype value " + std::to_string(static_cast<int>(dtype)));
  }
  uint64_t total = size;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) {
      return InvalidArgumentError("dimension " + std::to_string(i) + " is negative (" +
                                  std::to_string(shape[i]) + ")");
    }
    const auto d = static_cast<uint64_t>(shape[i]);
    if (d != 0 && total > UINT64_MAX / d) {
      return InvalidArgumentError("shape overflows 64-bit byte counts at dimension " +
                                  std::to_string(i));
    }
    total *= d;
  }
  return total;
}

Status CheckTensorDesc(const wire::TensorDesc* desc, const Limits& limits, size_t data_frames,
                       std::string_view where) {
  const std::string at(where);
  if (desc == nullptr) return InvalidArgumentError(at + ": null tensor descriptor");
  if (desc->name() == nullptr || desc->name()->size() == 0) {
    return InvalidArgumentError(at + ": tensor without a name");
  }
  const std::string name = at + ": tensor '" + desc->name()->str() + "'";
  const size_t rank = desc->shape() ? desc->shape()->size() : 0;
  if (rank > limits.max_rank) {
    return InvalidArgumentError(name + " has rank " + std::to_string(rank) + " (at most " +
                                std::to_string(limits.max_rank) + ")");
  }
  std::span<const int64_t> shape;
  if (desc->shape()) shape = {desc->shape()->data(), rank};
  auto bytes = TensorBytes(desc->dtype(), shape);
  if (!bytes.ok()) return bytes.status().WithContext(name);
  if (*bytes != desc->nbytes()) {
    return InvalidArgumentError(name + " declares nbytes " + std::to_string(desc->nbytes()) +
                                " but dtype " + std::string(DTypeName(desc->dtype())) +
                                " and its shape need " + std::to_string(*bytes));
  }
  if (*bytes > limits.max_message_bytes) {
    return ResourceExhaustedError(name + " of " + std::to_string(*bytes) +
                                  " bytes exceeds the message limit of " +
                                  std::to_string(limits.max_message_bytes));
  }
  switch (desc->payload()) {
    case wire::PayloadKind::None:
      if (*bytes != 0)
        return InvalidArgumentError(name + " has " + std::to_string(*bytes) +
                                    " bytes but no payload");
      break;
    case wire::PayloadKind::Frame:
      if (desc->frame() == 0 || desc->frame() > data_frames) {
        return InvalidArgumentError(name + " names data frame " + std::to_string(desc->frame()) +
                                    " but the message has " + std::to_string(data_frames));
      }
      break;
    case wire::PayloadKind::ShmReserved:
    case wire::PayloadKind::ShmDonor:
      if (desc->offset() > UINT64_MAX - *bytes) {
        return InvalidArgumentError(name + " shm offset overflows");
      }
      break;
    default:
      return InvalidArgumentError(name + " has unknown payload kind " +
                                  std::to_string(static_cast<int>(desc->payload())));
  }
  return Status::OK();
}

StatusOr<const wire::WorkerRequest*> VerifyWorkerRequest(std::span<const uint8_t> header,
                                                         const Limits& limits) {
  FLEET_RETURN_IF_ERROR(CheckHeaderSize(header, limits, "request"));
  FLEET_RETURN_IF_ERROR(CheckIdentifier(header, kRequestIdentifier, "request"));
  auto verifier = MakeVerifier(header, limits);
  if (!verifier.VerifyBuffer<wire::WorkerRequest>(kRequestIdentifier)) {
    return InvalidArgumentError("request header of " + std::to_string(header.size()) +
                                " bytes failed FlatBuffers verification (truncated or corrupt)");
  }
  const auto* request = flatbuffers::GetRoot<wire::WorkerRequest>(header.data());
  if (request->body_type() == wire::WorkerRequestBody::NONE || request->body() == nullptr) {
    return InvalidArgumentError("request " + std::to_string(request->id()) + " has no body");
  }
  return request;
}

StatusOr<const wire::WorkerResponse*> VerifyWorkerResponse(std::span<const uint8_t> header,
                                                           const Limits& limits) {
  FLEET_RETURN_IF_ERROR(CheckHeaderSize(header, limits, "response"));
  FLEET_RETURN_IF_ERROR(CheckIdentifier(header, kResponseIdentifier, "response"));
  auto verifier = MakeVerifier(header, limits);
  if (!verifier.VerifyBuffer<wire::WorkerResponse>(kResponseIdentifier)) {
    return InvalidArgumentError("response header of " + std::to_string(header.size()) +
                                " bytes failed FlatBuffers verification (truncated or corrupt)");
  }
  const auto* response = flatbuffers::GetRoot<wire::WorkerResponse>(header.data());
  if (response->body_type() == wire::WorkerResponseBody::NONE || response->body() == nullptr) {
    return InvalidArgumentError("response " + std::to_string(response->id()) + " has no body");
  }
  return response;
}

StatusOr<const wire::WorkerEvent*> VerifyWorkerEvent(std::span<const uint8_t> header,
                                                     const Limits& limits) {
  FLEET_RETURN_IF_ERROR(CheckHeaderSize(header, limits, "event"));
  FLEET_RETURN_IF_ERROR(CheckIdentifier(header, kEventIdentifier, "event"));
  auto verifier = MakeVerifier(header, limits);
  if (!verifier.VerifyBuffer<wire::WorkerEvent>(kEventIdentifier)) {
    return InvalidArgumentError("event of " + std::to_string(header.size()) +
                                " bytes failed FlatBuffers verification (truncated or corrupt)");
  }
  const auto* event = flatbuffers::GetRoot<wire::WorkerEvent>(header.data());
  if (event->body_type() == wire::WorkerEventBody::NONE || event->body() == nullptr) {
    return InvalidArgumentError("event has no body");
  }
  return event;
}

flatbuffers::Offset<wire::Hello> BuildHello(flatbuffers::FlatBufferBuilder& fbb,
                                            const HelloInfo& hello) {
  return wire::CreateHello(
      fbb, hello.major, hello.minor, static_cast<wire::Capability>(hello.capabilities),
      fbb.CreateString(hello.peer_name), fbb.CreateString(hello.host_id),
      fbb.CreateString(hello.shm_arena), hello.max_message_bytes, fbb.CreateString(hello.device),
      fbb.CreateString(hello.instance));
}

std::string NewInstanceId() {
  std::random_device rd;
  const uint64_t id = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(id));
  return hex;
}

HelloInfo ReadHello(const wire::Hello& hello) {
  HelloInfo info;
  info.major = hello.major();
  info.minor = hello.minor();
  info.capabilities = static_cast<uint64_t>(hello.capabilities());
  if (hello.peer_name()) info.peer_name = hello.peer_name()->str();
  if (hello.host_id()) info.host_id = hello.host_id()->str();
  if (hello.shm_arena()) info.shm_arena = hello.shm_arena()->str();
  info.max_message_bytes = hello.max_message_bytes();
  if (hello.device()) info.device = hello.device()->str();
  if (hello.instance()) info.instance = hello.instance()->str();
  return info;
}

StatusOr<uint64_t> Negotiate(const HelloInfo& local, const HelloInfo& remote) {
  if (remote.major != local.major) {
    return FailedPreconditionError("protocol version mismatch: peer '" + remote.peer_name +
                                   "' speaks " + std::to_string(remote.major) + "." +
                                   std::to_string(remote.minor) + ", this side " +
                                   std::to_string(local.major) + "." + std::to_string(local.minor) +
                                   " (major versions must be equal: upgrade the older side)");
  }
  uint64_t caps = local.capabilities & remote.capabilities;
  if ((caps & kCapShm) != 0 && (local.host_id.empty() || local.host_id != remote.host_id ||
                                (local.shm_arena.empty() && remote.shm_arena.empty()))) {
    caps &= ~kCapShm;
  }
  return caps;
}

std::string HostId() {
  std::string boot;
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::getline(in, boot);
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) host[0] = '\0';
  return boot + "/" + host;
}

void FinishRequest(flatbuffers::FlatBufferBuilder& fbb, uint64_t id, wire::WorkerRequestBody type,
                   flatbuffers::Offset<void> body) {
  fbb.Finish(wire::CreateWorkerRequest(fbb, id, type, body), kRequestIdentifier);
}

void FinishResponse(flatbuffers::FlatBufferBuilder& fbb, uint64_t id, wire::WorkerResponseBody type,
                    flatbuffers::Offset<void> body) {
  fbb.Finish(wire::CreateWorkerResponse(fbb, id, type, body), kResponseIdentifier);
}

void FinishErrorResponse(flatbuffers::FlatBufferBuilder& fbb, uint64_t id, const Status& status) {
  auto error =
      wire::CreateError(fbb, ToWireCode(status.ok() ? StatusCode::kInternal : status.code()),
                        fbb.CreateString(status.message()));
  FinishResponse(fbb, id, wire::WorkerResponseBody::Error, error.Union());
}

std::string_view RequestTypeName(wire::WorkerRequestBody type) {
  const char* name = wire::EnumNameWorkerRequestBody(type);
  return name && *name ? std::string_view(name) : std::string_view("Unknown");
}

}  // namespace fleet::protocol
