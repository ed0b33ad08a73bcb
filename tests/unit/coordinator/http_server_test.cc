#include "fleet/coordinator/http_server.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <thread>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>
#include <optional>

namespace fleet::coordinator {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
using tcp = boost::asio::ip::tcp;

struct Reply {
  int status;
  std::string body;
};

Reply Fetch(uint16_t port, http::verb verb, const std::string& target, const std::string& token = "",
            const std::string& body = "") {
  boost::asio::io_context io;
  tcp::socket socket(io);
  socket.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), port));
  http::request<http::string_body> req{verb, target, 11};
  req.set(http::field::host, "127.0.0.1");
  if (!token.empty()) req.set(http::field::authorization, "Bearer " + token);
  req.body() = body;
  req.prepare_payload();
  http::write(socket, req);
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  http::read(socket, buffer, res);
  return {static_cast<int>(res.result_int()), res.body()};
}

// A raw TCP client: what a stalled, slow or non-reading peer does. Reads give up after 30 s so a
// server that never closes fails the test instead of hanging it.
struct RawClient {
  int fd = -1;
  explicit RawClient(uint16_t port) {
    fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    timeval tv{30, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }
  ~RawClient() { close(fd); }
  bool Send(std::string_view bytes) {
    return send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size());
  }
  // Everything until the server closes; nullopt when it did not close within 30 s.
  std::optional<std::string> ReadToClose() {
    std::string out;
    char buf[4096];
    while (true) {
      const ssize_t n = recv(fd, buf, sizeof(buf), 0);
      if (n == 0) return out;
      if (n < 0) return std::nullopt;
      out.append(buf, static_cast<size_t>(n));
    }
  }
};

HttpResponse Route(const HttpRequest& req) {
  if (req.path == "/v2/health/live") return {200, R"({"live":true})"};
  if (req.path == "/big") return {200, std::string(1 << 20, 'x')};
  if (req.path == "/echo") return {200, nlohmann::json{{"q", QueryParam(req.query, "name")}, {"body", req.body}}.dump()};
  if (req.path == "/throw") throw std::runtime_error("boom");
  return ErrorResponse(NotFoundError("no route " + req.path));
}

TEST(HttpServerTest, ServesRoutesAndJsonErrors) {
  auto server = HttpServer::Start(HttpServerOptions{}, Route);
  ASSERT_TRUE(server.ok()) << server.status();
  uint16_t port = (*server)->port();
  ASSERT_NE(port, 0);
  auto live = Fetch(port, http::verb::get, "/v2/health/live");
  EXPECT_EQ(live.status, 200);
  auto echo = Fetch(port, http::verb::post, "/echo?name=flux%20dev&x=1", "", "payload");
  EXPECT_EQ(nlohmann::json::parse(echo.body)["q"], "flux dev");
  EXPECT_EQ(nlohmann::json::parse(echo.body)["body"], "payload");
  auto missing = Fetch(port, http::verb::get, "/nope");
  EXPECT_EQ(missing.status, 404);
  EXPECT_EQ(nlohmann::json::parse(missing.body)["error"], "no route /nope");
  auto thrown = Fetch(port, http::verb::get, "/throw");
  EXPECT_EQ(thrown.status, 500);
  (*server)->Stop();
}

TEST(HttpServerTest, BearerTokenGuardsAllButHealth) {
  HttpServerOptions options;
  options.bearer_token = "s3cret";
  auto server = HttpServer::Start(options, Route);
  ASSERT_TRUE(server.ok());
  uint16_t port = (*server)->port();
  EXPECT_EQ(Fetch(port, http::verb::get, "/v2/health/live").status, 200);
  EXPECT_EQ(Fetch(port, http::verb::get, "/echo").status, 401);
  EXPECT_EQ(Fetch(port, http::verb::get, "/echo", "wrong").status, 401);
  EXPECT_EQ(Fetch(port, http::verb::get, "/echo", "s3cret").status, 200);
}

TEST(HttpServerTest, ClientsHoldingEverySlotDoNotStarveHealthProbes) {
  HttpServerOptions options;
  options.max_connections = 3;
  options.probe_connections = 2;
  auto server = HttpServer::Start(options, Route);
  ASSERT_TRUE(server.ok());
  const uint16_t port = (*server)->port();
  std::vector<std::unique_ptr<RawClient>> idle;
  for (int i = 0; i < 3; ++i) idle.push_back(std::make_unique<RawClient>(port));
  // Until the server has taken them, a probe might still get a regular slot; wait for that.
  for (int i = 0; i < 100 && Fetch(port, http::verb::get, "/echo").status != 503; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(Fetch(port, http::verb::get, "/echo").status, 503);  // only probes get through
  EXPECT_EQ(Fetch(port, http::verb::get, "/v2/health/live").status, 200);
  EXPECT_EQ(Fetch(port, http::verb::get, "/v2/health/live").status, 200);
  (*server)->Stop();
}

TEST(HttpServerTest, StalledAndSlowClientsAreCutOffAtTheDeadline) {
  HttpServerOptions options;
  options.io_timeout = std::chrono::milliseconds(300);
  auto server = HttpServer::Start(options, Route);
  ASSERT_TRUE(server.ok());
  const uint16_t port = (*server)->port();
  {  // half a request, then nothing: the server closes without answering
    RawClient c(port);
    ASSERT_TRUE(c.Send("GET /echo HTTP/1.1\r\nHost: x\r\n"));
    auto got = c.ReadToClose();
    ASSERT_TRUE(got.has_value()) << "the server held a stalled request past its deadline";
    EXPECT_EQ(*got, "");
  }
  {  // one byte every 50 ms: each read is quick, the whole request is not
    RawClient c(port);
    const std::string header =
        "GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: " + std::string(200, 'a') + "\r\n\r\n";
    size_t sent = 0;
    while (sent < header.size() && c.Send(header.substr(sent, 1))) {
      ++sent;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    EXPECT_LT(sent, header.size()) << "the server read a 10 s trickle to the end";
    EXPECT_TRUE(c.ReadToClose().has_value());
  }
  // A keep-alive connection that goes idle is closed too; the server still serves.
  EXPECT_EQ(Fetch(port, http::verb::get, "/v2/health/live").status, 200);
  (*server)->Stop();
}

TEST(HttpServerTest, AClientThatNeverReadsDoesNotBlockStop) {
  HttpServerOptions options;
  options.io_timeout = std::chrono::milliseconds(300);
  auto server = HttpServer::Start(options, Route);
  ASSERT_TRUE(server.ok());
  RawClient c((*server)->port());
  std::string requests;
  for (int i = 0; i < 64; ++i) requests += "GET /big HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_TRUE(c.Send(requests));  // 64 MiB of answers that nobody reads
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto stopped = std::async(std::launch::async, [&] { (*server)->Stop(); });
  EXPECT_EQ(stopped.wait_for(std::chrono::seconds(30)), std::future_status::ready)
      << "Stop() is stuck behind a client that does not read";
}

TEST(HttpServerTest, BadAddressIsAnError) {
  HttpServerOptions options;
  options.address = "not-an-ip";
  auto server = HttpServer::Start(options, Route);
  EXPECT_EQ(server.status().code(), StatusCode::kInvalidArgument);
}

TEST(HttpServerTest, PercentDecoding) {
  EXPECT_EQ(PercentDecode("/v2/models/my%20model%2Fx", false), "/v2/models/my model/x");
  EXPECT_EQ(PercentDecode("a+b%2", false), "a+b%2");  // '+' kept in paths, a cut escape kept
  EXPECT_EQ(PercentDecode("a+b%41", true), "a bA");
  EXPECT_EQ(QueryParam("path=x%2By.gguf&q=1", "path"), "x+y.gguf");
}

TEST(HttpStatusTest, Mapping) {
  EXPECT_EQ(HttpStatusFor(StatusCode::kInvalidArgument), 400);
  EXPECT_EQ(HttpStatusFor(StatusCode::kNotFound), 404);
  EXPECT_EQ(HttpStatusFor(StatusCode::kResourceExhausted), 429);
  EXPECT_EQ(HttpStatusFor(StatusCode::kUnavailable), 503);
}

}  // namespace
}  // namespace fleet::coordinator
