// Every metric name of docs/metrics.md is declared, with its type; /metrics serves them.
#include "fleet/metrics/metrics.h"

#include <arpa/inet.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

namespace fleet::metrics {
namespace {

// Names and types from the tables of docs/metrics.md (the source of truth for dashboards).
std::map<std::string, std::string> DocumentedMetrics() {
  const char* src = std::getenv("FLEET_SOURCE_DIR");
  std::ifstream in(std::string(src ? src : FLEET_SOURCE_DIR_DEFAULT) + "/docs/metrics.md");
  std::map<std::string, std::string> out;
  std::string line;
  // Table rows: | `fleet_name` | type | labels | meaning |
  // (plain string parsing: std::regex trips GCC 12's -Wmaybe-uninitialized under ASan)
  while (std::getline(in, line)) {
    if (line.rfind("| `fleet_", 0) != 0) continue;
    const auto end = line.find('`', 3);
    if (end == std::string::npos) continue;
    const std::string name = line.substr(3, end - 3);
    const auto type_begin = line.find("| ", end) + 2;
    const std::string type = line.substr(type_begin, line.find(' ', type_begin) - type_begin);
    if (type == "gauge" || type == "counter" || type == "histogram") out[name] = type;
  }
  return out;
}

TEST(Metrics, EveryDocumentedFamilyIsDeclaredWithItsType) {
  auto documented = DocumentedMetrics();
  ASSERT_GE(documented.size(), 25u) << "docs/metrics.md not found or changed format";
  auto registry = std::make_shared<prometheus::Registry>();
  WorkerMetrics worker(*registry);
  CoordinatorMetrics coordinator(*registry);
  std::map<std::string, std::string> declared;
  for (const auto& [name, type] : worker.Describe()) declared[name] = type;
  for (const auto& [name, type] : coordinator.Describe()) declared[name] = type;
  for (const auto& [name, type] : documented) {
    auto it = declared.find(name);
    ASSERT_NE(it, declared.end()) << name << " is documented but not declared";
    EXPECT_EQ(it->second, type) << name;
  }
  EXPECT_EQ(declared.size(), documented.size()) << "a declared family is not documented";
}

int ConnectLocal(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
  timeval tv{30, 0};  // a server that never closes fails the test instead of hanging it
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

// One thread serves every scrape, so a client that trickles its request (each byte within any
// per-read timeout) must be cut off by a deadline on the whole exchange.
TEST(Metrics, ATricklingClientIsCutOffAndScrapesGoOn) {
  auto registry = std::make_shared<prometheus::Registry>();
  WorkerMetrics m(*registry);
  auto server = MetricsServer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string addr = (*server)->address();
  const int port = std::stoi(addr.substr(addr.rfind(':') + 1));
  const int slow = ConnectLocal(port);
  const std::string request = "GET /metrics HTTP/1.0\r\nX-Slow: " + std::string(200, 'a');
  size_t sent = 0;
  while (sent < request.size() &&
         send(slow, request.data() + sent, 1, MSG_NOSIGNAL) == 1) {  // 20 s at this pace
    ++sent;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_LT(sent, request.size()) << "the server read a 20 s trickle to the end";
  close(slow);
  const int fd = ConnectLocal(port);
  const std::string req = "GET /metrics HTTP/1.0\r\n\r\n";
  ASSERT_EQ(write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
  std::string body;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) body.append(buf, n);
  close(fd);
  EXPECT_NE(body.find("200 OK"), std::string::npos) << body;
}

TEST(Metrics, ServerExposesTheRegistry) {
  auto registry = std::make_shared<prometheus::Registry>();
  WorkerMetrics m(*registry);
  m.transfer_bytes.Add({{"src", "cuda:0"}, {"dst", "cuda:1"}, {"kind", "activations"}})
      .Increment(42);
  auto server = MetricsServer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string addr = (*server)->address();
  const int port = std::stoi(addr.substr(addr.rfind(':') + 1));
  ASSERT_GT(port, 0);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
  const std::string req = "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n";
  ASSERT_EQ(write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
  std::string body;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) body.append(buf, n);
  close(fd);
  EXPECT_NE(body.find("fleet_worker_transfer_bytes_total{dst=\"cuda:1\",kind=\"activations\",src="
                      "\"cuda:0\"} 42"),
            std::string::npos)
      << body;
  EXPECT_FALSE(MetricsServer::Start("256.0.0.1:0", registry).ok());
}

TEST(Metrics, RemoveModelDropsEverySeriesOfThatModelOnly) {
  prometheus::Registry registry;
  CoordinatorMetrics c(registry);
  for (const std::string model : {"gone", "kept"}) {
    c.model_loaded.Add({{"model", model}}).Set(1);
    c.model_bytes.Add({{"model", model}, {"device", "cuda:0"}}).Set(5);
    c.model_bytes.Add({{"model", model}, {"device", "cpu"}}).Set(7);
    c.step_duration.Add({{"model", model}, {"mode", "stream"}}, DurationBuckets()).Observe(0.1);
    c.model_load_duration.Add({{"model", model}}, LoadBuckets()).Observe(2);
    c.forwards.Add({{"model", model}, {"outcome", "ok"}}).Increment();
    c.forwards.Add({{"model", model}, {"outcome", "failed"}}).Increment();
    c.plan_decisions.Add({{"model", model}, {"mode", "pipeline"}}).Increment();
  }
  c.queue_wait.Add({{"type", "forward"}}, DurationBuckets()).Observe(0.01);
  c.RemoveModel("gone");
  const std::string text = Serialize(registry);
  EXPECT_EQ(text.find("model=\"gone\""), std::string::npos) << text;
  EXPECT_NE(text.find("fleet_coordinator_forwards_total{model=\"kept\",outcome=\"failed\"} 1"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("fleet_coordinator_model_bytes{device=\"cpu\",model=\"kept\"} 7"), std::string::npos)
      << text;
  EXPECT_NE(text.find("fleet_coordinator_queue_wait_seconds_count{type=\"forward\"} 1"), std::string::npos)
      << text;

  WorkerMetrics w(registry);
  w.resident_bytes.Add({{"device", "cpu"}, {"model", "gone"}}).Set(3);
  w.block_compute_duration.Add({{"device", "cpu"}, {"model", "gone"}, {"block", "b0"}}, DurationBuckets())
      .Observe(1);
  w.resident_bytes.Add({{"device", "cpu"}, {"model", "kept"}}).Set(4);
  w.RemoveModel("gone");
  const std::string wtext = Serialize(registry);
  EXPECT_EQ(wtext.find("model=\"gone\""), std::string::npos) << wtext;
  EXPECT_NE(wtext.find("fleet_worker_resident_bytes{device=\"cpu\",model=\"kept\"} 4"), std::string::npos)
      << wtext;
}

}  // namespace
}  // namespace fleet::metrics
