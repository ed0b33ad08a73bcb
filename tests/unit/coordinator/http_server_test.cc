#include "fleet/coordinator/http_server.h"

#include <gtest/gtest.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

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

HttpResponse Route(const HttpRequest& req) {
  if (req.path == "/v2/health/live") return {200, R"({"live":true})"};
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
