#include "fleet/metrics/metrics.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <prometheus/text_serializer.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

namespace fleet::metrics {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

}  // namespace

const prometheus::Histogram::BucketBoundaries& DurationBuckets() {
  static const prometheus::Histogram::BucketBoundaries b = {
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
      0.5,    1,     2.5,    5,     10,   30,    60,   120, 300};
  return b;
}

const prometheus::Histogram::BucketBoundaries& LoadBuckets() {
  static const prometheus::Histogram::BucketBoundaries b = {0.1, 0.25, 0.5, 1,   2.5, 5,   10,
                                                            30,  60,   120, 300, 600, 1800};
  return b;
}

const std::string& Version() {
  static const std::string v = "0.1.0";
  return v;
}

WorkerMetrics::WorkerMetrics(prometheus::Registry& r)
    : info(BuildGauge()
               .Name("fleet_worker_info")
               .Help("Identity of this worker (always 1)")
               .Register(r)),
      capacity_bytes(BuildGauge()
                         .Name("fleet_worker_capacity_bytes")
                         .Help("Weight budget enforced by this worker")
                         .Register(r)),
      total_bytes(BuildGauge()
                      .Name("fleet_worker_total_bytes")
                      .Help("Physical memory of the device (what fractions refer to)")
                      .Register(r)),
      resident_bytes(BuildGauge()
                         .Name("fleet_worker_resident_bytes")
                         .Help("Bytes of model weights held, per model")
                         .Register(r)),
      blocks_resident(BuildGauge()
                          .Name("fleet_worker_blocks_resident")
                          .Help("Blocks held, per model")
                          .Register(r)),
      activation_bytes(BuildGauge()
                           .Name("fleet_worker_activation_bytes")
                           .Help("Bytes in the per-job tensor tables and the constant-input cache")
                           .Register(r)),
      patched_bytes(BuildGauge()
                        .Name("fleet_worker_patched_bytes")
                        .Help("Bytes of LoRA-patched weight copies kept for resident blocks "
                              "(given back when a load needs the room)")
                        .Register(r)),
      shm_arena_bytes(BuildGauge()
                          .Name("fleet_worker_shm_arena_bytes")
                          .Help("Size of this worker's shared-memory arena")
                          .Register(r)),
      connections(BuildGauge()
                      .Name("fleet_worker_connections")
                      .Help("Greeted client connections open (closed ones leave the table)")
                      .Register(r)),
      transfer_bytes(BuildCounter()
                         .Name("fleet_worker_transfer_bytes_total")
                         .Help("Bytes received by this worker, by source, destination and kind")
                         .Register(r)),
      transfer_duration(BuildHistogram()
                            .Name("fleet_worker_transfer_duration_seconds")
                            .Help("Time from request to the tensor being usable on dst")
                            .Register(r)),
      block_compute_duration(BuildHistogram()
                                 .Name("fleet_worker_block_compute_duration_seconds")
                                 .Help("One block forward on this device")
                                 .Register(r)),
      prefetch_stall(BuildCounter()
                         .Name("fleet_worker_prefetch_stall_seconds_total")
                         .Help("Time compute waited for streamed weights to arrive")
                         .Register(r)),
      block_loads(BuildCounter()
                      .Name("fleet_worker_block_loads_total")
                      .Help("Block loads by outcome (ok, refused, failed)")
                      .Register(r)),
      load_bytes(BuildCounter()
                     .Name("fleet_worker_load_bytes_total")
                     .Help("Bytes loaded into blocks, by source (file, wire)")
                     .Register(r)),
      requests(BuildCounter()
                   .Name("fleet_worker_requests_total")
                   .Help("Requests served by message type and outcome (ok, error, rejected)")
                   .Register(r)) {}

CoordinatorMetrics::CoordinatorMetrics(prometheus::Registry& r)
    : info(BuildGauge().Name("fleet_coordinator_info").Help("Identity (always 1)").Register(r)),
      worker_up(BuildGauge()
                    .Name("fleet_coordinator_worker_up")
                    .Help("1 while the worker answers heartbeats, 0 once marked down")
                    .Register(r)),
      workers(
          BuildGauge().Name("fleet_coordinator_workers").Help("Registered workers").Register(r)),
      register_conflicts(BuildCounter()
                             .Name("fleet_coordinator_register_conflicts_total")
                             .Help("Registers refused because another live worker has the "
                                   "device id")
                             .Register(r)),
      queue_depth(BuildGauge()
                      .Name("fleet_coordinator_queue_depth")
                      .Help("Jobs waiting in the bounded queue")
                      .Register(r)),
      queue_capacity(BuildGauge()
                         .Name("fleet_coordinator_queue_capacity")
                         .Help("Size of the job queue")
                         .Register(r)),
      jobs(BuildCounter()
               .Name("fleet_coordinator_jobs_total")
               .Help("Jobs by type and outcome (ok, failed, rejected)")
               .Register(r)),
      step_duration(BuildHistogram()
                        .Name("fleet_coordinator_step_duration_seconds")
                        .Help("One Forward (a sampling step), end to end")
                        .Register(r)),
      prefetch_stall(BuildCounter()
                         .Name("fleet_coordinator_prefetch_stall_seconds_total")
                         .Help("Weight-stream stall time reported by compute workers")
                         .Register(r)),
      step_transfer_bytes(BuildCounter()
                              .Name("fleet_coordinator_step_transfer_bytes_total")
                              .Help("Bytes moved between workers for Forwards, by kind")
                              .Register(r)),
      model_load_duration(BuildHistogram()
                              .Name("fleet_coordinator_model_load_duration_seconds")
                              .Help("LoadModel from request to ready")
                              .Register(r)),
      model_loaded(BuildGauge()
                       .Name("fleet_coordinator_model_loaded")
                       .Help("1 while the model is ready")
                       .Register(r)),
      model_bytes(BuildGauge()
                      .Name("fleet_coordinator_model_bytes")
                      .Help("Planned bytes of the model on each device")
                      .Register(r)),
      plan_decisions(BuildCounter()
                         .Name("fleet_coordinator_plan_decisions_total")
                         .Help("Ranges placed per execution mode by plans")
                         .Register(r)),
      expected_bandwidth(BuildGauge()
                             .Name("fleet_coordinator_expected_bandwidth_bytes_per_second")
                             .Help("Link bandwidth measured by the coordinator")
                             .Register(r)),
      forwards(BuildCounter()
                   .Name("fleet_coordinator_forwards_total")
                   .Help("Forwards (sampling steps) per model by outcome (ok, failed)")
                   .Register(r)),
      queue_wait(BuildHistogram()
                     .Name("fleet_coordinator_queue_wait_seconds")
                     .Help("Time a job waited in the job queue before a job thread ran it")
                     .Register(r)) {}

namespace {
template <typename T>
std::pair<std::string, std::string> Entry(const prometheus::Family<T>& f) {
  if constexpr (std::is_same_v<T, prometheus::Gauge>) return {f.GetName(), "gauge"};
  if constexpr (std::is_same_v<T, prometheus::Counter>) return {f.GetName(), "counter"};
  if constexpr (std::is_same_v<T, prometheus::Histogram>) return {f.GetName(), "histogram"};
}
}  // namespace

std::vector<std::pair<std::string, std::string>> WorkerMetrics::Describe() const {
  return {Entry(info),           Entry(capacity_bytes),    Entry(total_bytes),
          Entry(resident_bytes), Entry(blocks_resident),   Entry(activation_bytes),
          Entry(patched_bytes),  Entry(shm_arena_bytes),   Entry(connections),
          Entry(transfer_bytes), Entry(transfer_duration), Entry(block_compute_duration),
          Entry(prefetch_stall), Entry(block_loads),       Entry(load_bytes),
          Entry(requests)};
}

std::vector<std::pair<std::string, std::string>> CoordinatorMetrics::Describe() const {
  return {Entry(info),
          Entry(worker_up),
          Entry(workers),
          Entry(register_conflicts),
          Entry(queue_depth),
          Entry(queue_capacity),
          Entry(jobs),
          Entry(step_duration),
          Entry(prefetch_stall),
          Entry(step_transfer_bytes),
          Entry(model_load_duration),
          Entry(model_loaded),
          Entry(model_bytes),
          Entry(plan_decisions),
          Entry(expected_bandwidth),
          Entry(forwards),
          Entry(queue_wait)};
}

template <typename T>
void RemoveSeries(prometheus::Family<T>& family, const std::string& label, const std::string& value) {
  // Family has no iterator; Collect() lists every series with its labels.
  std::vector<prometheus::Labels> doomed;
  for (const auto& mf : family.Collect()) {
    for (const auto& metric : mf.metric) {
      prometheus::Labels labels;
      bool match = false;
      for (const auto& l : metric.label) {
        labels[l.name] = l.value;
        match = match || (l.name == label && l.value == value);
      }
      if (match) doomed.push_back(std::move(labels));
    }
  }
  for (const auto& labels : doomed) {
    if (!family.Has(labels)) continue;  // removed concurrently
    if constexpr (std::is_same_v<T, prometheus::Histogram>) {
      family.Remove(&family.Add(labels, DurationBuckets()));  // Add returns the existing series
    } else {
      family.Remove(&family.Add(labels));
    }
  }
}

template void RemoveSeries(prometheus::Family<prometheus::Gauge>&, const std::string&, const std::string&);
template void RemoveSeries(prometheus::Family<prometheus::Counter>&, const std::string&, const std::string&);
template void RemoveSeries(prometheus::Family<prometheus::Histogram>&, const std::string&, const std::string&);

void WorkerMetrics::RemoveModel(const std::string& model) {
  RemoveSeries(resident_bytes, "model", model);
  RemoveSeries(blocks_resident, "model", model);
  RemoveSeries(patched_bytes, "model", model);
  RemoveSeries(block_compute_duration, "model", model);
  RemoveSeries(prefetch_stall, "model", model);
}

void CoordinatorMetrics::RemoveModel(const std::string& model) {
  RemoveSeries(step_duration, "model", model);
  RemoveSeries(prefetch_stall, "model", model);
  RemoveSeries(step_transfer_bytes, "model", model);
  RemoveSeries(model_load_duration, "model", model);
  RemoveSeries(model_loaded, "model", model);
  RemoveSeries(model_bytes, "model", model);
  RemoveSeries(plan_decisions, "model", model);
  RemoveSeries(forwards, "model", model);
}

// A minimal HTTP/1.0 server for GET /metrics. prometheus-cpp's Exposer (CivetWeb) cannot start
// threads in processes that load libtorch: CivetWeb asks for ~100 KiB thread stacks, less than
// the static TLS of libtorch's dependencies, so pthread_create fails with EINVAL. It also takes
// ~2 s to shut down after a scrape. One thread serving one short request at a time is plenty
// for a Prometheus scrape every few seconds.
struct MetricsServer::Impl {
  int fd = -1;
  std::shared_ptr<prometheus::Registry> registry;
  std::atomic<bool> stop{false};
  std::thread thread;

  ~Impl() {
    stop = true;
    if (thread.joinable()) thread.join();
    if (fd >= 0) close(fd);
  }

  // Waits until `client` is ready for `events` or `deadline` passes; false on timeout.
  static bool WaitFor(int client, short events, std::chrono::steady_clock::time_point deadline) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline - std::chrono::steady_clock::now())
                          .count();
    pollfd p{client, events, 0};
    return left > 0 && poll(&p, 1, static_cast<int>(left)) > 0;
  }

  void Serve(int client) {
    // The whole exchange has 2 s (a scrape takes milliseconds): a client that trickles its
    // request, or does not read the answer, cannot hold this one thread longer.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    std::string head;
    char buf[1024];
    while (head.find("\r\n\r\n") == std::string::npos && head.find("\n\n") == std::string::npos &&
           head.size() < 8192) {
      if (!WaitFor(client, POLLIN, deadline)) break;
      const ssize_t n = recv(client, buf, sizeof(buf), MSG_DONTWAIT);
      if (n <= 0) break;
      head.append(buf, static_cast<size_t>(n));
    }
    std::string status = "200 OK", type = "text/plain; version=0.0.4; charset=utf-8", body;
    if (head.rfind("GET /metrics ", 0) == 0 || head.rfind("GET /metrics?", 0) == 0) {
      body = Serialize(*registry);
    } else if (head.rfind("GET ", 0) == 0) {
      status = "404 Not Found";
      body = "only /metrics is served here\n";
    } else {
      status = "405 Method Not Allowed";
      body = "GET /metrics\n";
    }
    std::string response = "HTTP/1.0 " + status + "\r\nContent-Type: " + type +
                           "\r\nContent-Length: " + std::to_string(body.size()) +
                           "\r\nConnection: close\r\n\r\n" + body;
    size_t sent = 0;
    while (sent < response.size() && WaitFor(client, POLLOUT, deadline)) {
      const ssize_t n =
          send(client, response.data() + sent, response.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n <= 0) break;
      sent += static_cast<size_t>(n);
    }
    close(client);
  }

  void Run() {
    while (!stop) {
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      const int client = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (client >= 0) Serve(client);
    }
  }
};

MetricsServer::MetricsServer(std::unique_ptr<Impl> impl, std::string address)
    : impl_(std::move(impl)), address_(std::move(address)) {}

MetricsServer::~MetricsServer() = default;

StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& listen, std::shared_ptr<prometheus::Registry> registry) {
  const auto colon = listen.rfind(':');
  if (colon == std::string::npos) {
    return InvalidArgumentError("metrics address '" + listen + "' is not host:port");
  }
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  const std::string port = listen.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (const int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res);
      rc != 0) {
    return InvalidArgumentError("metrics address '" + listen + "': " + gai_strerror(rc));
  }
  auto impl = std::make_unique<Impl>();
  impl->registry = std::move(registry);
  impl->fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int one = 1;
  setsockopt(impl->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  const bool bound = impl->fd >= 0 && bind(impl->fd, res->ai_addr, res->ai_addrlen) == 0 &&
                     ::listen(impl->fd, 64) == 0;
  freeaddrinfo(res);
  if (!bound) {
    return UnavailableError("cannot serve /metrics on '" + listen + "': " + std::strerror(errno));
  }
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  getsockname(impl->fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int bound_port = addr.ss_family == AF_INET6
                             ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                             : ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  Impl* p = impl.get();
  impl->thread = std::thread([p] { p->Run(); });
  return std::make_unique<MetricsServer>(
      std::move(impl), listen.substr(0, colon) + ":" + std::to_string(bound_port));
}

std::string Serialize(prometheus::Registry& registry) {
  prometheus::TextSerializer serializer;
  return serializer.Serialize(registry.Collect());
}

}  // namespace fleet::metrics
