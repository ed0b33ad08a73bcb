#include "fleet/coordinator/http_server.h"

#include <poll.h>
#include <sys/socket.h>

#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <condition_variable>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "fleet/log/log.h"

namespace fleet::coordinator {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

int HttpStatusFor(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return 200;
    case StatusCode::kInvalidArgument:
    case StatusCode::kOutOfRange: return 400;
    case StatusCode::kNotFound: return 404;
    case StatusCode::kAlreadyExists:
    case StatusCode::kFailedPrecondition: return 409;
    case StatusCode::kResourceExhausted: return 429;
    case StatusCode::kUnimplemented: return 501;
    case StatusCode::kUnavailable: return 503;
    case StatusCode::kDeadlineExceeded: return 504;
    case StatusCode::kCancelled: return 499;
    case StatusCode::kDataLoss:
    case StatusCode::kInternal: return 500;
  }
  return 500;
}

HttpResponse ErrorResponse(const Status& status) {
  nlohmann::json j = {{"error", std::string(status.message())},
                      {"code", std::string(StatusCodeName(status.code()))}};
  return HttpResponse{HttpStatusFor(status.code()), j.dump(), "application/json"};
}

std::string PercentDecode(std::string_view raw, bool plus_is_space) {
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out;
  for (size_t i = 0; i < raw.size(); ++i) {
    if (raw[i] == '+' && plus_is_space) {
      out += ' ';
    } else if (raw[i] == '%' && i + 2 < raw.size() &&
               hex(raw[i + 1]) >= 0 && hex(raw[i + 2]) >= 0) {
      out += static_cast<char>(hex(raw[i + 1]) * 16 + hex(raw[i + 2]));
      i += 2;
    } else {
      out += raw[i];
    }
  }
  return out;
}

std::string QueryParam(std::string_view query, std::string_view name) {
  while (!query.empty()) {
    size_t amp = query.find('&');
    std::string_view item = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    size_t eq = item.find('=');
    if (item.substr(0, eq) != name) continue;
    return PercentDecode(eq == std::string_view::npos ? std::string_view() : item.substr(eq + 1), true);
  }
  return "";
}

namespace {

using Clock = std::chrono::steady_clock;

// Waits until `socket` is readable (or writable) or `deadline` passes; false on timeout.
bool WaitFor(tcp::socket& socket, short events, Clock::time_point deadline) {
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  if (left <= 0) return false;
  pollfd p{socket.native_handle(), events, 0};
  return poll(&p, 1, static_cast<int>(std::min<long long>(left, 1 << 30))) > 0;
}

// Reads one request into `parser` by `deadline` (a whole request, not each read: a client that
// sends a byte now and then is cut off too). False when the client closed, sent something
// malformed or too large, or was too slow.
bool ReadRequest(tcp::socket& socket, beast::flat_buffer& buffer,
                 http::request_parser<http::string_body>& parser, Clock::time_point deadline) {
  parser.eager(true);
  beast::error_code ec;
  while (true) {
    if (buffer.size() > 0) {
      const size_t used = parser.put(buffer.data(), ec);
      buffer.consume(used);
      if (ec == http::error::need_more) {
        ec = {};
      } else if (ec) {
        return false;
      }
      if (parser.is_done()) return true;
      if (used > 0) continue;
    }
    if (!WaitFor(socket, POLLIN, deadline)) return false;
    const size_t n = socket.read_some(buffer.prepare(16 * 1024), ec);
    if (ec) return false;
    buffer.commit(n);
  }
}

// Writes `res` by `deadline`; false when the client stopped reading or went away.
bool WriteResponse(tcp::socket& socket, http::response<http::string_body>& res,
                   Clock::time_point deadline) {
  http::serializer<false, http::string_body> serializer{res};
  beast::error_code ec;
  while (!serializer.is_done()) {
    if (!WaitFor(socket, POLLOUT, deadline)) return false;
    http::write_some(socket, serializer, ec);
    if (ec) return false;
  }
  return true;
}

bool IsHealthPath(std::string_view path) { return path.rfind("/v2/health/", 0) == 0; }

}  // namespace

struct HttpServer::Impl {
  HttpServerOptions options;
  HttpHandler handler;
  asio::io_context io;
  tcp::acceptor acceptor{io};
  std::thread accept_thread;
  std::atomic<bool> stopping{false};
  std::mutex mu;
  std::condition_variable cv;
  std::set<std::shared_ptr<tcp::socket>> connections;  // guarded by mu
  int active = 0;                                       // guarded by mu
  int probes = 0;  // of `active`, connections past max_connections; guarded by mu

  void AcceptLoop() {
    while (!stopping.load()) {
      auto socket = std::make_shared<tcp::socket>(io);
      beast::error_code ec;
      acceptor.accept(*socket, ec);
      if (ec) {
        if (stopping.load()) break;
        FLEET_LOG(WARNING, "http") << "accept failed: " << ec.message();
        continue;
      }
      std::unique_lock lock(mu);
      const bool probe_only = active - probes >= options.max_connections;
      if (probe_only && probes >= options.probe_connections) {
        lock.unlock();
        Reject(*socket);
        continue;
      }
      ++active;
      if (probe_only) ++probes;
      connections.insert(socket);
      std::thread([this, socket, probe_only] { Serve(socket, probe_only); }).detach();
    }
  }

  static http::response<http::string_body> TooManyConnections(unsigned version) {
    http::response<http::string_body> res{http::status::service_unavailable, version};
    res.set(http::field::content_type, "application/json");
    res.body() = R"({"error":"too many connections","code":"ResourceExhausted"})";
    res.keep_alive(false);
    res.prepare_payload();
    return res;
  }

  void Reject(tcp::socket& socket) {
    auto res = TooManyConnections(11);
    WriteResponse(socket, res, Clock::now() + std::chrono::milliseconds(100));
    beast::error_code ec;
    socket.shutdown(tcp::socket::shutdown_both, ec);
  }

  bool Authorized(const http::request<http::string_body>& req, std::string_view path) const {
    if (options.bearer_token.empty()) return true;
    if (IsHealthPath(path)) return true;
    auto it = req.find(http::field::authorization);
    if (it == req.end()) return false;
    return it->value() == "Bearer " + options.bearer_token;
  }

  void Serve(std::shared_ptr<tcp::socket> socket, bool probe_only) {
    beast::flat_buffer buffer;
    beast::error_code ec;
    const auto timeout = probe_only ? std::min<std::chrono::milliseconds>(options.io_timeout,
                                                                          std::chrono::seconds(2))
                                    : options.io_timeout;
    while (!stopping.load()) {
      http::request_parser<http::string_body> parser;
      parser.body_limit(options.max_body_bytes);
      parser.header_limit(16 * 1024);
      // Closed, malformed, too large or too slow: drop the connection.
      if (!ReadRequest(*socket, buffer, parser, Clock::now() + timeout)) break;
      auto& req = parser.get();
      std::string target(req.target());
      size_t q = target.find('?');
      HttpRequest request{std::string(req.method_string()), PercentDecode(target.substr(0, q), false),
                          q == std::string::npos ? "" : target.substr(q + 1), req.body()};
      if (probe_only && !IsHealthPath(request.path)) {
        auto res = TooManyConnections(req.version());
        WriteResponse(*socket, res, Clock::now() + timeout);
        break;
      }
      HttpResponse response;
      if (!Authorized(req, request.path)) {
        response = ErrorResponse(Status(StatusCode::kFailedPrecondition, "missing or wrong bearer token"));
        response.status = 401;
      } else {
        try {
          response = handler(request);
        } catch (const std::exception& e) {  // a handler bug must not take the server down
          response = ErrorResponse(InternalError(std::string("handler failed: ") + e.what()));
        }
      }
      http::response<http::string_body> res{static_cast<http::status>(response.status), req.version()};
      res.set(http::field::server, "tensorfleet");
      res.set(http::field::content_type, response.content_type);
      if (response.status == 401) res.set(http::field::www_authenticate, "Bearer");
      res.keep_alive(req.keep_alive() && !probe_only);
      res.body() = std::move(response.body);
      res.prepare_payload();
      if (!WriteResponse(*socket, res, Clock::now() + timeout) || !res.keep_alive()) break;
    }
    socket->shutdown(tcp::socket::shutdown_both, ec);
    socket->close(ec);
    std::lock_guard lock(mu);
    connections.erase(socket);
    --active;
    if (probe_only) --probes;
    cv.notify_all();
  }
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const HttpServerOptions& options,
                                                        HttpHandler handler) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->handler = std::move(handler);
  beast::error_code ec;
  auto address = asio::ip::make_address(options.address, ec);
  if (ec) return InvalidArgumentError("http: bad listen address '" + options.address + "': " + ec.message());
  tcp::endpoint endpoint(address, options.port);
  impl->acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(endpoint, ec);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return UnavailableError("http: cannot listen on " + options.address + ":" +
                            std::to_string(options.port) + ": " + ec.message());
  }
  Impl* raw = impl.get();
  impl->accept_thread = std::thread([raw] { raw->AcceptLoop(); });
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

HttpServer::~HttpServer() { Stop(); }

uint16_t HttpServer::port() const {
  beast::error_code ec;
  auto ep = impl_->acceptor.local_endpoint(ec);
  return ec ? 0 : ep.port();
}

void HttpServer::Stop() {
  if (impl_->stopping.exchange(true)) return;
  beast::error_code ec;
  // shutdown() wakes a thread blocked in accept() on Linux; close() alone does not.
  ::shutdown(impl_->acceptor.native_handle(), SHUT_RDWR);
  if (impl_->accept_thread.joinable()) impl_->accept_thread.join();
  impl_->acceptor.close(ec);
  std::unique_lock lock(impl_->mu);
  for (auto& s : impl_->connections) s->shutdown(tcp::socket::shutdown_receive, ec);
  impl_->cv.wait(lock, [&] { return impl_->active == 0; });
}

}  // namespace fleet::coordinator
