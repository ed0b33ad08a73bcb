// A small HTTP/1.1 server (Boost.Beast) for the coordinator's control API.
//
// Each connection is served on its own thread with keep-alive; at most `max_connections` at once,
// so a slow model load never blocks /v2/health/live. A request must arrive whole, and its
// response leave, within `io_timeout` (a keep-alive connection idle that long is closed), so a
// stalled or slow client holds a thread and a slot for a bounded time and never blocks Stop().
// Past `max_connections`, up to `probe_connections` more are served one request each, for the
// health endpoints only (a kubelet probe must not see 503 because clients hold every slot);
// anything else there, and connections past both, get 503.
// When a bearer token is configured, every request must carry `Authorization: Bearer <token>`
// except the health endpoints (probes carry no secrets). Errors are JSON: {"error": "..."}.
//
// Thread safety: the handler is called concurrently from connection threads. Stop() may be
// called from any thread and waits for connection threads to finish their current request.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "fleet/status/status.h"

namespace fleet::coordinator {

struct HttpRequest {
  std::string method;  // "GET", "POST"
  std::string path;    // without the query string, percent-decoded, e.g. "/v2/models"
  std::string query;   // after '?', undecoded
  std::string body;
};

struct HttpResponse {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
};

/// A JSON error response {"error": message} with the HTTP status that fits the Status code.
HttpResponse ErrorResponse(const Status& status);
/// The HTTP status for a Status code (InvalidArgument -> 400, NotFound -> 404, ...).
int HttpStatusFor(StatusCode code);
/// Decodes %XX escapes (and '+' as a space when `plus_is_space`, as in query strings).
std::string PercentDecode(std::string_view raw, bool plus_is_space);
/// Decodes one query parameter ("a=1&b=x%20y", "b" -> "x y"); empty when absent.
std::string QueryParam(std::string_view query, std::string_view name);

using HttpHandler = std::function<HttpResponse(const HttpRequest&)>;

struct HttpServerOptions {
  std::string address = "127.0.0.1";  // bind address; 0.0.0.0 only when asked
  uint16_t port = 0;                   // 0 picks a free port (read it back with port())
  std::string bearer_token;            // empty: no authentication
  int max_connections = 64;
  int probe_connections = 8;
  size_t max_body_bytes = 1 << 20;
  std::chrono::milliseconds io_timeout{10000};
};

class HttpServer {
 public:
  /// Binds and starts serving on a background thread.
  static StatusOr<std::unique_ptr<HttpServer>> Start(const HttpServerOptions& options,
                                                     HttpHandler handler);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  uint16_t port() const;
  /// Stops accepting and closes idle connections; returns when every connection thread ended.
  void Stop();

 private:
  struct Impl;
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace fleet::coordinator
