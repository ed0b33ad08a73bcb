// ZeroMQ plumbing and the frame transport over real sockets (inproc and tcp on loopback).
#include <gtest/gtest.h>

#include <cstring>

#include "fleet/transport/bulk.h"
#include "fleet/transport/zmq_util.h"

namespace fleet::transport {
namespace {

TEST(Zmq, BindReadsBackTheEphemeralPort) {
  zmq::socket_t s(Context(), zmq::socket_type::router);
  ASSERT_TRUE(ConfigureSocket(s, {}).ok());
  auto ep = Bind(s, "tcp://127.0.0.1:*");
  ASSERT_TRUE(ep.ok()) << ep.status();
  EXPECT_EQ(ep->rfind("tcp://127.0.0.1:", 0), 0u);
  EXPECT_NE(ep->back(), '*');
  zmq::socket_t t(Context(), zmq::socket_type::router);
  auto bad = Bind(t, *ep);  // taken
  EXPECT_EQ(bad.status().code(), StatusCode::kUnavailable);
  EXPECT_FALSE(Bind(t, "nonsense").ok());
}

TEST(Zmq, FrameTransportCarriesPayloadsZeroCopy) {
  zmq::socket_t router(Context(), zmq::socket_type::router);
  zmq::socket_t dealer(Context(), zmq::socket_type::dealer);
  ASSERT_TRUE(ConfigureSocket(router, {}).ok());
  ASSERT_TRUE(ConfigureSocket(dealer, {}).ok());
  auto ep = Bind(router, "tcp://127.0.0.1:*");
  ASSERT_TRUE(ep.ok());
  ASSERT_TRUE(Connect(dealer, *ep).ok());

  auto data = std::make_shared<std::vector<uint8_t>>(3 << 20);
  for (size_t i = 0; i < data->size(); ++i) (*data)[i] = static_cast<uint8_t>(i * 7);
  std::weak_ptr<std::vector<uint8_t>> watch = data;
  auto frames_tx = MakeFrameTransport();
  Frames out;
  out.emplace_back(std::string("header"));
  Frames data_frames;
  std::vector<OutPayload> payloads = {{data->data(), data->size(), data}, {nullptr, 0, nullptr}};
  auto refs = frames_tx->Stage(payloads, data_frames);
  ASSERT_TRUE(refs.ok());
  EXPECT_EQ((*refs)[0].kind, wire::PayloadKind::Frame);
  EXPECT_EQ((*refs)[0].frame, 1u);
  EXPECT_EQ((*refs)[1].kind, wire::PayloadKind::None);
  for (auto& f : data_frames) out.push_back(std::move(f));
  data.reset();
  payloads.clear();
  ASSERT_TRUE(SendFrames(dealer, out).ok());

  auto in = RecvFrames(router, std::chrono::seconds(10));
  ASSERT_TRUE(in.ok()) << in.status();
  ASSERT_EQ(in->size(), 3u);  // routing id, header, data
  EXPECT_EQ((*in)[1].to_string(), "header");
  Frames rx_data;
  rx_data.push_back(std::move((*in)[2]));
  flatbuffers::FlatBufferBuilder fbb;
  const int64_t shape[] = {3 << 20};
  fbb.Finish(wire::CreateTensorDesc(fbb, fbb.CreateString("t"), wire::DType::U8,
                                    fbb.CreateVector(shape, 1), 3 << 20, wire::PayloadKind::Frame,
                                    1));
  const auto* desc = flatbuffers::GetRoot<wire::TensorDesc>(fbb.GetBufferPointer());
  auto bytes = FramePayload(*desc, rx_data);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  for (size_t i = 0; i < bytes->size(); i += 4099)
    ASSERT_EQ((*bytes)[i], static_cast<uint8_t>(i * 7));
  // The sender's buffer was released once ZeroMQ sent it.
  for (int i = 0; i < 100 && !watch.expired(); ++i) usleep(10000);
  EXPECT_TRUE(watch.expired());
}

TEST(Zmq, OversizedMessageDropsTheConnection) {
  zmq::socket_t router(Context(), zmq::socket_type::router);
  SocketOptions limited;
  limited.max_message_bytes = 1024;
  ASSERT_TRUE(ConfigureSocket(router, limited).ok());
  auto ep = Bind(router, "tcp://127.0.0.1:*");
  ASSERT_TRUE(ep.ok());
  zmq::socket_t dealer(Context(), zmq::socket_type::dealer);
  ASSERT_TRUE(ConfigureSocket(dealer, {}).ok());
  ASSERT_TRUE(Connect(dealer, *ep).ok());
  Frames big;
  big.emplace_back(std::string(4096, 'x'));
  ASSERT_TRUE(SendFrames(dealer, big).ok());
  EXPECT_EQ(RecvFrames(router, std::chrono::milliseconds(300)).status().code(),
            StatusCode::kDeadlineExceeded);
  // Another client still gets through.
  zmq::socket_t other(Context(), zmq::socket_type::dealer);
  ASSERT_TRUE(ConfigureSocket(other, {}).ok());
  ASSERT_TRUE(Connect(other, *ep).ok());
  Frames small;
  small.emplace_back(std::string("ok"));
  ASSERT_TRUE(SendFrames(other, small).ok());
  auto in = RecvFrames(router, std::chrono::seconds(5));
  ASSERT_TRUE(in.ok()) << in.status();
  EXPECT_EQ(in->back().to_string(), "ok");
}

}  // namespace
}  // namespace fleet::transport
