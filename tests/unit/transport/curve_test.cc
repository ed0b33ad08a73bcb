// CURVE on real tcp sockets: the right keys talk, a wrong client key is refused by ZAP, a wrong
// server key never completes the handshake.
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>

#include "fleet/transport/curve.h"

namespace fleet::transport {
namespace {

struct Pair {
  std::string pub, sec;
};
Pair NewPair() {
  auto kp = GenerateKeyPair();
  EXPECT_TRUE(kp.ok()) << kp.status();
  return {kp->first, kp->second};
}

bool RoundTrip(const std::string& endpoint, const CurveConfig& client, zmq::socket_t& server) {
  zmq::socket_t dealer(Context(), zmq::socket_type::dealer);
  SocketOptions o;
  o.curve = &client;
  EXPECT_TRUE(ConfigureSocket(dealer, o).ok());
  EXPECT_TRUE(Connect(dealer, endpoint).ok());
  Frames f;
  f.emplace_back(std::string("ping"));
  EXPECT_TRUE(SendFrames(dealer, f).ok());
  auto in = RecvFrames(server, std::chrono::milliseconds(1500));
  return in.ok() && in->back().to_string() == "ping";
}

TEST(Curve, KeyFilesAndAuthorization) {
  const Pair cluster = NewPair(), stranger = NewPair();
  const std::string dir =
      std::filesystem::temp_directory_path() / ("fleet-curve-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  ASSERT_TRUE(WriteKeyFile(dir + "/cluster.key", cluster.sec, "secret").ok());
  ASSERT_TRUE(WriteKeyFile(dir + "/cluster.pub", cluster.pub, "public").ok());
  auto config = LoadCurveConfig(dir + "/cluster.key", "");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->public_key, cluster.pub);
  EXPECT_EQ(config->server_key, cluster.pub);  // shared cluster pair by default
  EXPECT_EQ(*ReadKeyFile(dir + "/cluster.pub"), cluster.pub);

  {
    std::FILE* f = std::fopen((dir + "/bad.key").c_str(), "w");
    std::fputs("# comment\nshort\n", f);
    std::fclose(f);
    auto bad = ReadKeyFile(dir + "/bad.key");
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.status().message().find("bad.key:2"), std::string_view::npos) << bad.status();
    EXPECT_FALSE(ReadKeyFile(dir + "/missing.key").ok());
  }

  auto zap = ZapAuthenticator::Start({cluster.pub});
  ASSERT_TRUE(zap.ok()) << zap.status();
  zmq::socket_t server(Context(), zmq::socket_type::router);
  SocketOptions so;
  so.curve = &*config;
  so.server = true;
  ASSERT_TRUE(ConfigureSocket(server, so).ok());
  auto ep = Bind(server, "tcp://127.0.0.1:*");
  ASSERT_TRUE(ep.ok());

  EXPECT_TRUE(RoundTrip(*ep, *config, server));

  CurveConfig wrong_client{stranger.sec, stranger.pub, cluster.pub};
  EXPECT_FALSE(RoundTrip(*ep, wrong_client, server));
  EXPECT_GE((*zap)->refused(), 1u);

  CurveConfig wrong_server{cluster.sec, cluster.pub, stranger.pub};
  EXPECT_FALSE(RoundTrip(*ep, wrong_server, server));

  // A plain client gets nothing through a CURVE server.
  EXPECT_FALSE(RoundTrip(*ep, CurveConfig{}, server));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fleet::transport
