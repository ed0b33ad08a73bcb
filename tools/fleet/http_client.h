// A small HTTP/1.1 client (Boost.Beast) for the `fleet` commands that talk to a running
// coordinator's control API (`fleet status`, `workers`, `models`, `load`, `unload`,
// `plan --coordinator`). Plain http only; one connection per request; every step (connect,
// write, read) has a deadline, so a coordinator that does not answer gives a clear error naming
// its URL instead of a hang. Host names are resolved with the system resolver before the
// connect deadline starts (numeric addresses and /etc/hosts names resolve at once).
//
// Thread safety: a HttpClient is immutable after Create; Request may be called from several
// threads at once (each call has its own connection and I/O context).
#pragma once

#include <chrono>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "fleet/status/status.h"

namespace fleet::cli {

struct HttpReply {
  int status = 0;
  std::string body;
};

/// Percent-encodes `text` for one path segment or query value (RFC 3986 unreserved kept).
std::string UrlEncode(std::string_view text);

class HttpClient {
 public:
  /// \param url "http://HOST[:PORT][/PREFIX]" (default port 80); https is refused with a hint.
  /// \param token bearer token sent as "Authorization: Bearer <token>" (empty: none).
  /// \param timeout deadline of each step of a request unless the call gives its own.
  static StatusOr<HttpClient> Create(std::string_view url, std::string token,
                                     std::chrono::milliseconds timeout);

  /// One request. Unavailable when the coordinator cannot be reached, DeadlineExceeded when a
  /// step takes longer than `read_timeout` (0: the client's timeout); both name the URL.
  StatusOr<HttpReply> Request(std::string_view method, const std::string& target,
                              const std::string& body = "",
                              std::chrono::milliseconds read_timeout = {}) const;

  /// A JSON call: the parsed body of a 2xx reply (or of a status in `also_ok`). Otherwise an
  /// error with the coordinator's message: a 401 says the token is missing or wrong.
  StatusOr<nlohmann::ordered_json> Call(std::string_view method, const std::string& target,
                                        const std::string& body = "",
                                        std::initializer_list<int> also_ok = {},
                                        std::chrono::milliseconds read_timeout = {}) const;

  /// The URL as given, without a trailing slash.
  const std::string& url() const { return url_; }

 private:
  HttpClient() = default;
  std::string url_, host_, port_, prefix_, token_;
  std::chrono::milliseconds timeout_{0};
};

}  // namespace fleet::cli
