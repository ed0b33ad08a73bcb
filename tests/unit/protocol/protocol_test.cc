// Verification, negotiation and descriptor checks of the wire protocol.
#include "fleet/protocol/protocol.h"

#include <gtest/gtest.h>

#include <random>

namespace fleet::protocol {
namespace {

flatbuffers::DetachedBuffer StatsRequestBuffer(uint64_t id) {
  flatbuffers::FlatBufferBuilder fbb;
  FinishRequest(fbb, id, wire::WorkerRequestBody::StatsRequest,
                wire::CreateStatsRequest(fbb).Union());
  return fbb.Release();
}

std::span<const uint8_t> Bytes(const flatbuffers::DetachedBuffer& b) {
  return {b.data(), b.size()};
}

TEST(Protocol, VerifiesAWellFormedRequest) {
  auto buf = StatsRequestBuffer(7);
  auto req = VerifyWorkerRequest(Bytes(buf), Limits{});
  ASSERT_TRUE(req.ok()) << req.status();
  EXPECT_EQ((*req)->id(), 7u);
  EXPECT_EQ((*req)->body_type(), wire::WorkerRequestBody::StatsRequest);
}

TEST(Protocol, RejectsEveryTruncation) {
  flatbuffers::FlatBufferBuilder fbb;
  auto load = wire::CreateLoadBlockRequest(fbb, fbb.CreateString("m"), fbb.CreateString("linear"),
                                           fbb.CreateString("{}"), wire::DType::F32,
                                           fbb.CreateString("blocks.0"));
  FinishRequest(fbb, 1, wire::WorkerRequestBody::LoadBlockRequest, load.Union());
  auto buf = fbb.Release();
  ASSERT_TRUE(VerifyWorkerRequest(Bytes(buf), Limits{}).ok());
  // A cut through any field is refused; a cut through trailing alignment padding may verify,
  // but then every field still reads back intact.
  for (size_t n = 0; n < buf.size(); ++n) {
    std::vector<uint8_t> cut(buf.data(), buf.data() + n);
    auto r = VerifyWorkerRequest(cut, Limits{});
    if (!r.ok()) continue;
    EXPECT_GE(n, buf.size() - 8) << "truncated to " << n << " bytes was accepted";
    const auto* load = (*r)->body_as_LoadBlockRequest();
    ASSERT_NE(load, nullptr);
    EXPECT_EQ(load->block()->str(), "blocks.0");
    EXPECT_EQ(load->config_json()->str(), "{}");
  }
}

TEST(Protocol, RejectsRandomBytesWithoutCrashing) {
  std::mt19937_64 rng(42);
  int accepted = 0;
  for (int i = 0; i < 2000; ++i) {
    std::vector<uint8_t> junk(rng() % 512);
    for (auto& b : junk) b = static_cast<uint8_t>(rng());
    if (junk.size() >= 8) std::memcpy(junk.data() + 4, kRequestIdentifier, 4);  // get past the id
    if (VerifyWorkerRequest(junk, Limits{}).ok()) ++accepted;
  }
  EXPECT_EQ(accepted, 0);
}

TEST(Protocol, RejectsWrongIdentifierAndNamesIt) {
  auto buf = StatsRequestBuffer(1);
  auto r = VerifyWorkerResponse(Bytes(buf), Limits{});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("'FWRQ'"), std::string_view::npos) << r.status();
  EXPECT_NE(r.status().message().find("'FWRS'"), std::string_view::npos) << r.status();
}

TEST(Protocol, RejectsOversizedHeader) {
  auto buf = StatsRequestBuffer(1);
  Limits limits;
  limits.max_header_bytes = 8;
  auto r = VerifyWorkerRequest(Bytes(buf), limits);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
}

TEST(Protocol, ErrorCodesRoundTrip) {
  for (int c = 1; c < kStatusCodeCount; ++c) {
    Status s(static_cast<StatusCode>(c), "message " + std::to_string(c));
    flatbuffers::FlatBufferBuilder fbb;
    FinishErrorResponse(fbb, 3, s);
    auto buf = fbb.Release();
    auto resp = VerifyWorkerResponse(Bytes(buf), Limits{});
    ASSERT_TRUE(resp.ok()) << resp.status();
    EXPECT_EQ(FromWireError((*resp)->body_as_Error()), s);
  }
  EXPECT_EQ(FromWireError(nullptr).code(), StatusCode::kInternal);
}

flatbuffers::DetachedBuffer Desc(const char* name, wire::DType dtype, std::vector<int64_t> shape,
                                 uint64_t nbytes, wire::PayloadKind kind, uint32_t frame) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.Finish(wire::CreateTensorDesc(fbb, fbb.CreateString(name), dtype, fbb.CreateVector(shape),
                                    nbytes, kind, frame));
  return fbb.Release();
}

TEST(Protocol, ChecksTensorDescriptors) {
  Limits limits;
  auto ok = Desc("x", wire::DType::BF16, {2, 3}, 12, wire::PayloadKind::Frame, 1);
  EXPECT_TRUE(
      CheckTensorDesc(flatbuffers::GetRoot<wire::TensorDesc>(ok.data()), limits, 1, "t").ok());

  auto wrong_bytes = Desc("x", wire::DType::F32, {2, 3}, 12, wire::PayloadKind::Frame, 1);
  Status s =
      CheckTensorDesc(flatbuffers::GetRoot<wire::TensorDesc>(wrong_bytes.data()), limits, 1, "t");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("need 24"), std::string_view::npos) << s;

  auto negative = Desc("x", wire::DType::F32, {-1, 3}, 0, wire::PayloadKind::None, 0);
  EXPECT_FALSE(
      CheckTensorDesc(flatbuffers::GetRoot<wire::TensorDesc>(negative.data()), limits, 0, "t")
          .ok());

  auto overflow =
      Desc("x", wire::DType::F64, {1ll << 40, 1ll << 40}, 0, wire::PayloadKind::None, 0);
  EXPECT_FALSE(
      CheckTensorDesc(flatbuffers::GetRoot<wire::TensorDesc>(overflow.data()), limits, 0, "t")
          .ok());

  auto bad_frame = Desc("x", wire::DType::U8, {4}, 4, wire::PayloadKind::Frame, 2);
  s = CheckTensorDesc(flatbuffers::GetRoot<wire::TensorDesc>(bad_frame.data()), limits, 1, "t");
  EXPECT_NE(s.message().find("data frame 2"), std::string_view::npos) << s;

  auto huge = Desc("x", wire::DType::U8, {1 << 20}, 1 << 20, wire::PayloadKind::Frame, 1);
  limits.max_message_bytes = 1000;
  EXPECT_EQ(
      CheckTensorDesc(flatbuffers::GetRoot<wire::TensorDesc>(huge.data()), limits, 1, "t").code(),
      StatusCode::kResourceExhausted);
}

TEST(Protocol, NegotiatesVersionsAndCapabilities) {
  HelloInfo a;
  a.capabilities = kCapShm | kCapCurve;
  a.peer_name = "a";
  a.host_id = "h1";
  a.shm_arena = "arena-a";
  HelloInfo b = a;
  b.peer_name = "b";
  auto caps = Negotiate(a, b);
  ASSERT_TRUE(caps.ok());
  EXPECT_EQ(*caps, kCapShm | kCapCurve);

  b.host_id = "h2";  // another host: no shm
  EXPECT_EQ(*Negotiate(a, b), kCapCurve);

  b.host_id = "h1";
  b.minor = kMinor + 5;  // newer minor is fine
  EXPECT_TRUE(Negotiate(a, b).ok());

  b.major = kMajor + 1;
  auto bad = Negotiate(a, b);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(bad.status().message().find("version mismatch"), std::string_view::npos);
}

TEST(Protocol, HelloRoundTrips) {
  HelloInfo h;
  h.capabilities = kCapShm;
  h.peer_name = "worker cuda:1";
  h.host_id = HostId();
  h.shm_arena = "x";
  h.max_message_bytes = 99;
  h.device = "cuda:1";
  flatbuffers::FlatBufferBuilder fbb;
  fbb.Finish(BuildHello(fbb, h));
  HelloInfo back = ReadHello(*flatbuffers::GetRoot<wire::Hello>(fbb.GetBufferPointer()));
  EXPECT_EQ(back.peer_name, h.peer_name);
  EXPECT_EQ(back.host_id, h.host_id);
  EXPECT_EQ(back.capabilities, h.capabilities);
  EXPECT_EQ(back.max_message_bytes, 99u);
  EXPECT_EQ(back.device, "cuda:1");
  EXPECT_FALSE(HostId().empty());
}

TEST(Protocol, DTypes) {
  EXPECT_EQ(*ParseDType("BF16"), wire::DType::BF16);
  EXPECT_EQ(*ParseDType("f8_e4m3"), wire::DType::F8E4M3);
  EXPECT_EQ(DTypeSize(wire::DType::I64), 8u);
  EXPECT_EQ(DTypeSize(wire::DType::Invalid), 0u);
  EXPECT_FALSE(ParseDType("float128").ok());
  const int64_t shape[] = {3, 0};
  EXPECT_EQ(*TensorBytes(wire::DType::F32, shape), 0u);
}

}  // namespace
}  // namespace fleet::protocol
