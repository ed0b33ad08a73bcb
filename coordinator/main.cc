// fleet-coordinator: parses options, wires the coordinator to its three endpoints (job API,
// control API, metrics) and drains on SIGTERM. All logic lives in the fleet::coordinator library.
#include <signal.h>

#include <cstdio>
#include <iostream>
#include <thread>

#include "fleet/coordinator/control_api.h"
#include "fleet/coordinator/coordinator.h"
#include "fleet/coordinator/http_server.h"
#include "fleet/coordinator/job_server.h"
#include "fleet/log/log.h"
#include "fleet/transport/curve.h"

using namespace fleet;
using namespace fleet::coordinator;

namespace {

StatusOr<std::pair<std::string, uint16_t>> SplitHostPort(const std::string& text, const char* flag) {
  size_t colon = text.rfind(':');
  if (colon == std::string::npos) return InvalidArgumentError(std::string(flag) + ": expected HOST:PORT, got '" + text + "'");
  std::string port = text.substr(colon + 1);
  char* end = nullptr;
  long p = std::strtol(port.c_str(), &end, 10);
  if (port.empty() || *end != '\0' || p < 0 || p > 65535) {
    return InvalidArgumentError(std::string(flag) + ": bad port in '" + text + "'");
  }
  return std::make_pair(text.substr(0, colon), static_cast<uint16_t>(p));
}

StatusOr<std::string> ReadToken(const std::string& path) {
  if (path.empty()) return std::string();
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return NotFoundError("--http-token-file: cannot read '" + path + "'");
  char buf[512];
  size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  std::string token(buf, n);
  while (!token.empty() && (token.back() == '\n' || token.back() == '\r' || token.back() == ' ')) token.pop_back();
  if (token.empty()) return InvalidArgumentError("--http-token-file: '" + path + "' is empty");
  return token;
}

int Fail(const Status& s) {
  std::fprintf(stderr, "fleet-coordinator: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CoordinatorOptions options;
  config::OptionSet set("fleet-coordinator",
                        "Runs models across fleet-worker processes; serves the job API (ZeroMQ), the "
                        "control API (HTTP) and /metrics.");
  RegisterOptions(&options, &set);
  auto positional = set.ParseOrExit(argc, argv);
  if (!positional.empty()) {
    std::fprintf(stderr, "fleet-coordinator: unexpected argument '%s'\n", positional[0].c_str());
    return 2;
  }
  if (!log::SetFormatByName(options.log_format)) {
    std::fprintf(stderr, "fleet-coordinator: --log-format: expected text or json, got '%s'\n",
                 options.log_format.c_str());
    return 2;
  }
  log::SetProcessTag("coordinator");

  // Signals are taken by sigwait below, never by a random thread.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto coordinator = Coordinator::Create(options);
  if (!coordinator.ok()) return Fail(coordinator.status());
  Coordinator* c = coordinator->get();

  auto curve = transport::LoadCurveConfig(options.curve_secret_key_file, options.curve_server_key_file);
  if (!curve.ok()) return Fail(curve.status());
  auto jobs = JobServer::Start(c, options.listen, curve->enabled() ? &*curve : nullptr);
  if (!jobs.ok()) return Fail(jobs.status().WithContext("--listen"));

  std::unique_ptr<HttpServer> http;
  std::string http_address = "-";
  if (!options.http_listen.empty()) {
    auto hp = SplitHostPort(options.http_listen, "--http-listen");
    if (!hp.ok()) return Fail(hp.status());
    auto token = ReadToken(options.http_token_file);
    if (!token.ok()) return Fail(token.status());
    HttpServerOptions ho;
    ho.address = hp->first;
    ho.port = hp->second;
    ho.bearer_token = *token;
    auto server = HttpServer::Start(ho, MakeControlApi(c));
    if (!server.ok()) return Fail(server.status());
    http = std::move(*server);
    http_address = hp->first + ":" + std::to_string(http->port());
  }
  std::unique_ptr<metrics::MetricsServer> metrics_server;
  std::string metrics_address = "-";
  if (!options.metrics_listen.empty()) {
    auto server = metrics::MetricsServer::Start(options.metrics_listen, c->metrics_registry());
    if (!server.ok()) return Fail(server.status().WithContext("--metrics-listen"));
    metrics_server = std::move(*server);
    metrics_address = metrics_server->address();
  }

  std::atomic<bool> stop{false};
  std::thread gauges([&] {
    while (!stop.load()) {
      c->UpdateGauges();
      for (int i = 0; i < 10 && !stop.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });

  std::cout << "fleet-coordinator ready listen=" << (*jobs)->endpoint()
            << " register=" << c->registry().register_endpoint() << " http=" << http_address
            << " metrics=" << metrics_address << std::endl;
  FLEET_LOG(INFO, "main") << "serving jobs on " << (*jobs)->endpoint() << ", control API on " << http_address
                          << ", metrics on " << metrics_address;

  int sig = 0;
  sigwait(&signals, &sig);
  FLEET_LOG(INFO, "main") << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ": draining (up to "
                          << options.drain_timeout.value.count() << " ms)";
  c->BeginDrain();
  (*jobs)->Drain(options.drain_timeout.value);
  stop.store(true);
  gauges.join();
  if (http) http->Stop();
  FLEET_LOG(INFO, "main") << "stopped";
  return 0;
}
