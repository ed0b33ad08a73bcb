// The Tensorfleet wire protocol (docs/protocol.md): version, Hello negotiation, typed errors,
// tensor descriptors, and verification of every inbound FlatBuffer.
//
// A message is a ZeroMQ multipart message: one header frame holding a FlatBuffer (a
// WorkerRequest, WorkerResponse or WorkerEvent of schemas/*.fbs, told apart by their
// file_identifier) followed by zero or more data frames that carry tensor bytes. Nothing from
// the wire is used before VerifyX() has run the FlatBuffers Verifier on it and checked our own
// bounds (sizes, ranks, byte counts, frame indices).
//
// Thread safety: all functions are pure or read-only; safe to call from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common_generated.h"
#include "control_generated.h"
#include "fleet/status/status.h"
#include "worker_generated.h"

namespace fleet::protocol {

/// Protocol version. Majors must match; minors are negotiated (a peer ignores fields it does
/// not know, and the lower minor decides which requests may be sent).
inline constexpr uint16_t kMajor = 1;
inline constexpr uint16_t kMinor = 0;

/// file_identifiers of the three root tables (the schemas declare the request's).
inline constexpr char kRequestIdentifier[] = "FWRQ";
inline constexpr char kResponseIdentifier[] = "FWRS";
inline constexpr char kEventIdentifier[] = "FWEV";

/// Capability bits (wire::Capability).
inline constexpr uint64_t kCapShm = static_cast<uint64_t>(wire::Capability::Shm);
inline constexpr uint64_t kCapCudaIpc = static_cast<uint64_t>(wire::Capability::CudaIpc);
inline constexpr uint64_t kCapCurve = static_cast<uint64_t>(wire::Capability::Curve);

/// Bounds applied to every inbound message on top of the FlatBuffers Verifier.
struct Limits {
  /// Largest header frame (FlatBuffer) accepted.
  uint64_t max_header_bytes = 16ull << 20;
  /// Largest whole message (header plus data frames), and largest single tensor.
  uint64_t max_message_bytes = 8ull << 30;
  /// Most tensors in one message, most dimensions of one tensor.
  uint32_t max_tensors = 65536;
  uint32_t max_rank = 8;
};

/// StatusCode <-> wire::ErrorCode (identical numbers, pinned by static_asserts).
wire::ErrorCode ToWireCode(StatusCode code);
/// A Status from an Error table; a null table or an unknown code is Internal.
Status FromWireError(const wire::Error* error);

/// "f32", "bf16", ... ; "invalid" for unknown values.
std::string_view DTypeName(wire::DType dtype);
/// Bytes per element; 0 for Invalid or values this build does not know.
size_t DTypeSize(wire::DType dtype);
/// Parses DTypeName() output (any case) and the safetensors names ("F32", "BF16", "F8_E4M3").
StatusOr<wire::DType> ParseDType(std::string_view text);

/// numel(shape) * DTypeSize(dtype), or InvalidArgument on a negative dimension, an unknown
/// dtype or overflow.
StatusOr<uint64_t> TensorBytes(wire::DType dtype, std::span<const int64_t> shape);

/// Checks one descriptor: a non-empty name, a known dtype, rank <= limits.max_rank,
/// nbytes == numel * element size <= limits.max_message_bytes, and a payload frame index
/// within [1, data_frames] when the payload is a Frame. `where` prefixes the error.
Status CheckTensorDesc(const wire::TensorDesc* desc, const Limits& limits, size_t data_frames,
                       std::string_view where);

/// Verifies a header frame and returns the root table; errors say which check failed.
StatusOr<const wire::WorkerRequest*> VerifyWorkerRequest(std::span<const uint8_t> header,
                                                         const Limits& limits);
StatusOr<const wire::WorkerResponse*> VerifyWorkerResponse(std::span<const uint8_t> header,
                                                           const Limits& limits);
StatusOr<const wire::WorkerEvent*> VerifyWorkerEvent(std::span<const uint8_t> header,
                                                     const Limits& limits);

/// A frame's bytes copied into 8-byte aligned memory. FlatBuffers reads scalars in place and
/// verifies their alignment; ZeroMQ keeps small frames inline at any alignment, so every
/// inbound header is copied (headers are small) before it is verified.
class AlignedBuffer {
 public:
  AlignedBuffer(const void* data, size_t size);
  const uint8_t* data() const { return reinterpret_cast<const uint8_t*>(words_.data()); }
  size_t size() const { return size_; }
  std::span<const uint8_t> bytes() const { return {data(), size_}; }

 private:
  std::vector<uint64_t> words_;
  size_t size_;
};

/// What a Hello says, as plain values.
struct HelloInfo {
  uint16_t major = kMajor;
  uint16_t minor = kMinor;
  uint64_t capabilities = 0;
  std::string peer_name;
  std::string host_id;
  std::string shm_arena;
  uint64_t max_message_bytes = 0;
  std::string device;
  std::string instance;  // random per process start (NewInstanceId); empty from old peers
};

/// A random id for this process's Hello.instance (16 hex digits).
std::string NewInstanceId();

flatbuffers::Offset<wire::Hello> BuildHello(flatbuffers::FlatBufferBuilder& fbb,
                                            const HelloInfo& hello);
HelloInfo ReadHello(const wire::Hello& hello);

/// Checks the peer's Hello against ours. Majors must be equal (FailedPrecondition naming both
/// versions otherwise). \return the capabilities both sides offer; Shm only when the host ids
/// are equal and non-empty and one side (the server) has an arena.
StatusOr<uint64_t> Negotiate(const HelloInfo& local, const HelloInfo& remote);

/// An id equal for processes that share /dev/shm: the kernel boot id plus the hostname.
std::string HostId();

/// Finishes `fbb` as a WorkerRequest / WorkerResponse / WorkerEvent buffer.
void FinishRequest(flatbuffers::FlatBufferBuilder& fbb, uint64_t id, wire::WorkerRequestBody type,
                   flatbuffers::Offset<void> body);
void FinishResponse(flatbuffers::FlatBufferBuilder& fbb, uint64_t id, wire::WorkerResponseBody type,
                    flatbuffers::Offset<void> body);
/// Finishes an Error response carrying `status` (REQUIRES: !status.ok()).
void FinishErrorResponse(flatbuffers::FlatBufferBuilder& fbb, uint64_t id, const Status& status);

/// Name of a request type ("LoadBlockRequest"), for logs and metric labels.
std::string_view RequestTypeName(wire::WorkerRequestBody type);

}  // namespace fleet::protocol
