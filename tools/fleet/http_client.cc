#include "http_client.h"

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cctype>
#include <cstdio>

#include "fleet/config/text.h"

namespace fleet::cli {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

constexpr size_t kMaxReplyBytes = 64u << 20;  // a plan or index of a big cluster fits easily

std::string Seconds(std::chrono::milliseconds ms) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g s", static_cast<double>(ms.count()) / 1e3);
  return buf;
}

}  // namespace

std::string UrlEncode(std::string_view text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : text) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

StatusOr<HttpClient> HttpClient::Create(std::string_view url, std::string token,
                                        std::chrono::milliseconds timeout) {
  HttpClient c;
  std::string u(config::TrimSpace(url));
  while (!u.empty() && u.back() == '/') u.pop_back();
  c.url_ = u;
  const std::string lower = config::AsciiLower(u);
  if (lower.rfind("https://", 0) == 0) {
    return InvalidArgumentError("--coordinator '" + u +
                                "': https is not supported; reach the control API over http "
                                "(a port-forward or a TLS-terminating proxy in front of it)");
  }
  if (lower.rfind("http://", 0) != 0) {
    return InvalidArgumentError("--coordinator '" + u +
                                "': expected the control API's URL, http://HOST:PORT (the "
                                "coordinator's --http-listen, default http://127.0.0.1:7780)");
  }
  std::string rest = u.substr(7);
  size_t slash = rest.find('/');
  std::string authority = rest.substr(0, slash);
  c.prefix_ = slash == std::string::npos ? "" : rest.substr(slash);
  if (authority.empty()) return InvalidArgumentError("--coordinator '" + u + "': no host");
  if (authority.front() == '[') {  // [::1]:7780
    size_t close = authority.find(']');
    if (close == std::string::npos) return InvalidArgumentError("--coordinator '" + u + "': unclosed '['");
    c.host_ = authority.substr(1, close - 1);
    c.port_ = close + 1 < authority.size() && authority[close + 1] == ':' ? authority.substr(close + 2) : "80";
  } else {
    size_t colon = authority.rfind(':');
    c.host_ = authority.substr(0, colon);
    c.port_ = colon == std::string::npos ? "80" : authority.substr(colon + 1);
  }
  char* end = nullptr;
  long port = std::strtol(c.port_.c_str(), &end, 10);
  if (c.host_.empty() || c.port_.empty() || *end != '\0' || port < 1 || port > 65535) {
    return InvalidArgumentError("--coordinator '" + u + "': expected http://HOST:PORT with a port 1-65535");
  }
  c.token_ = std::move(token);
  c.timeout_ = timeout;
  return c;
}

StatusOr<HttpReply> HttpClient::Request(std::string_view method, const std::string& target,
                                        const std::string& body,
                                        std::chrono::milliseconds read_timeout) const {
  const auto read_deadline = read_timeout.count() > 0 ? read_timeout : timeout_;
  const std::string where = std::string(method) + " " + url_ + target;
  asio::io_context io;
  beast::tcp_stream stream(io);
  beast::error_code ec;
  tcp::resolver resolver(io);
  auto endpoints = resolver.resolve(host_, port_, ec);
  if (ec) {
    return UnavailableError("cannot reach the coordinator at " + url_ + ": cannot resolve '" + host_ +
                            "': " + ec.message());
  }
  // Each asynchronous step runs to completion (or to the stream's deadline) before the next.
  auto run = [&io] {
    io.restart();
    io.run();
  };
  stream.expires_after(timeout_);
  stream.async_connect(endpoints, [&](beast::error_code e, const tcp::endpoint&) { ec = e; });
  run();
  if (ec == beast::error::timeout) {
    return DeadlineExceededError("the coordinator at " + url_ + " did not accept a connection within " +
                                 Seconds(timeout_) + " (is it running? is --coordinator right?)");
  }
  if (ec) {
    return UnavailableError("cannot reach the coordinator at " + url_ + ": " + ec.message() +
                            " (is it running? is --coordinator right?)");
  }
  http::verb verb = http::string_to_verb(method);
  http::request<http::string_body> req{verb, prefix_ + target, 11};
  req.set(http::field::host, host_ + ":" + port_);
  req.set(http::field::user_agent, "fleet/" FLEET_VERSION);
  req.set(http::field::connection, "close");
  if (!token_.empty()) req.set(http::field::authorization, "Bearer " + token_);
  if (verb == http::verb::post || !body.empty()) {
    req.set(http::field::content_type, "application/json");
    req.body() = body;
    req.prepare_payload();
  }
  stream.expires_after(read_deadline);
  http::async_write(stream, req, [&](beast::error_code e, size_t) { ec = e; });
  run();
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(kMaxReplyBytes);
  if (!ec) {
    http::async_read(stream, buffer, parser, [&](beast::error_code e, size_t) { ec = e; });
    run();
  }
  beast::error_code ignored;
  stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
  if (ec == beast::error::timeout) {
    return DeadlineExceededError("the coordinator at " + url_ + " did not answer " + std::string(method) + " " +
                                 target + " within " + Seconds(read_deadline));
  }
  if (ec) return UnavailableError(where + ": " + ec.message());
  return HttpReply{static_cast<int>(parser.get().result_int()), parser.get().body()};
}

StatusOr<nlohmann::ordered_json> HttpClient::Call(std::string_view method, const std::string& target,
                                                  const std::string& body, std::initializer_list<int> also_ok,
                                                  std::chrono::milliseconds read_timeout) const {
  FLEET_ASSIGN_OR_RETURN(HttpReply reply, Request(method, target, body, read_timeout));
  const std::string where = std::string(method) + " " + url_ + target;
  auto parsed = nlohmann::ordered_json::parse(reply.body, nullptr, false);
  bool ok = reply.status / 100 == 2;
  for (int s : also_ok) ok = ok || reply.status == s;
  if (reply.status == 401) {
    return FailedPreconditionError("the coordinator at " + url_ +
                                   " refused the request: missing or wrong bearer token (give "
                                   "--token or FLEET_TOKEN, the content of its --http-token-file)");
  }
  if (!ok) {
    std::string message = parsed.is_object() && parsed.contains("error") && parsed["error"].is_string()
                              ? parsed["error"].get<std::string>()
                              : reply.body.substr(0, 500);
    const std::string text = where + ": HTTP " + std::to_string(reply.status) + ": " + message;
    if (reply.status == 404) return NotFoundError(text);
    if (reply.status / 100 == 4) return InvalidArgumentError(text);
    return UnavailableError(text);
  }
  if (parsed.is_discarded()) {
    return DataLossError(where + ": the reply is not JSON: " + reply.body.substr(0, 200));
  }
  return parsed;
}

}  // namespace fleet::cli
