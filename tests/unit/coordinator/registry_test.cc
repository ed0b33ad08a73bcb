// The worker registry over a real register endpoint: workers are DEALER sockets sending the
// Register events fleet-worker sends. What a restart is, and what a reconnect is.
#include "fleet/coordinator/registry.h"

#include <gtest/gtest.h>

#include <thread>

#include "fleet/protocol/protocol.h"
#include "fleet/transport/zmq_util.h"
#include "worker_generated.h"

namespace fleet::coordinator {
namespace {

using namespace std::chrono_literals;

// One connection of a worker process to the register endpoint.
class FakeWorkerConnection {
 public:
  explicit FakeWorkerConnection(const std::string& endpoint)
      : socket_(transport::Context(), zmq::socket_type::dealer) {
    socket_.set(zmq::sockopt::linger, 0);
    socket_.connect(endpoint);
  }
  void Register(const std::string& device, const std::string& listen, const std::string& instance) {
    flatbuffers::FlatBufferBuilder fbb;
    protocol::HelloInfo hello;
    hello.peer_name = "worker " + device;
    hello.device = device;
    hello.instance = instance;
    auto reg = wire::CreateRegister(fbb, protocol::BuildHello(fbb, hello), fbb.CreateString(listen),
                                    fbb.CreateString(device), fbb.CreateString("cpu"), 1 << 30,
                                    1 << 29, fbb.CreateString("test"), fbb.CreateString(""));
    fbb.Finish(wire::CreateWorkerEvent(fbb, wire::WorkerEventBody::Register, reg.Union()),
               protocol::kEventIdentifier);
    socket_.send(zmq::buffer(fbb.GetBufferPointer(), fbb.GetSize()));
  }

 private:
  zmq::socket_t socket_;
};

// Waits until `device` is known with a generation other than `not_this`.
uint64_t GenerationOf(WorkerRegistry& r, const std::string& device, uint64_t not_this = 0) {
  for (int i = 0; i < 200; ++i) {
    auto rec = r.Get(device);
    if (rec.ok() && rec->generation != not_this) return rec->generation;
    std::this_thread::sleep_for(10ms);
  }
  return not_this;
}

TEST(WorkerRegistry, AReconnectKeepsTheGenerationARestartBumpsIt) {
  RegistryOptions o;
  o.register_listen = "tcp://127.0.0.1:*";
  o.heartbeat_timeout = 10s;
  auto registry = WorkerRegistry::Start(o, nullptr, nullptr);
  ASSERT_TRUE(registry.ok()) << registry.status();
  WorkerRegistry& r = **registry;

  auto first = std::make_unique<FakeWorkerConnection>(r.register_endpoint());
  first->Register("cuda:1", "tcp://127.0.0.1:5001", "aaaa");
  const uint64_t g1 = GenerationOf(r, "cuda:1");
  ASSERT_NE(g1, 0u);

  // The same process on a new connection (the old socket closed): not a restart.
  first.reset();
  FakeWorkerConnection second(r.register_endpoint());
  second.Register("cuda:1", "tcp://127.0.0.1:5001", "aaaa");
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(r.Get("cuda:1")->generation, g1);

  // Another process (new instance id) at the same endpoint: a restart, its blocks are gone.
  FakeWorkerConnection third(r.register_endpoint());
  third.Register("cuda:1", "tcp://127.0.0.1:5001", "bbbb");
  EXPECT_NE(GenerationOf(r, "cuda:1", g1), g1);
}

// Two live workers with one device id (two Kubernetes nodes' cuda:0): the second is refused
// and counted, instead of taking the id over and failing the first one's models; once the first
// has gone quiet, the same Register is a restart and is accepted.
TEST(WorkerRegistry, ADeviceIdUpElsewhereIsRefusedNotTakenOver) {
  RegistryOptions o;
  o.register_listen = "tcp://127.0.0.1:*";
  o.heartbeat_timeout = 600ms;
  auto registry = WorkerRegistry::Start(o, nullptr, nullptr);
  ASSERT_TRUE(registry.ok()) << registry.status();
  WorkerRegistry& r = **registry;
  FakeWorkerConnection node_a(r.register_endpoint());
  node_a.Register("cuda:0", "tcp://10.0.0.1:7001", "aaaa");
  const uint64_t g1 = GenerationOf(r, "cuda:0");
  ASSERT_NE(g1, 0u);

  FakeWorkerConnection node_b(r.register_endpoint());
  node_b.Register("cuda:0", "tcp://10.0.0.2:7001", "bbbb");
  for (int i = 0; i < 100 && r.RegisterConflicts()["cuda:0"] == 0; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(r.RegisterConflicts()["cuda:0"], 1u);
  auto held = r.Get("cuda:0");
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_EQ(held->endpoint, "tcp://10.0.0.1:7001");
  EXPECT_EQ(held->generation, g1) << "the first worker's models stay valid";

  // Node A stops (no more heartbeats); after the timeout B's periodic re-register wins.
  std::this_thread::sleep_for(800ms);
  node_b.Register("cuda:0", "tcp://10.0.0.2:7001", "bbbb");
  EXPECT_NE(GenerationOf(r, "cuda:0", g1), g1);
  EXPECT_EQ(r.Get("cuda:0")->endpoint, "tcp://10.0.0.2:7001");
}

TEST(WorkerRegistry, AStaticWorkerThatRestartedIsNoticed) {
  RegistryOptions o;
  o.static_workers = {"tcp://127.0.0.1:5002"};
  o.poll_interval = 20ms;
  o.heartbeat_timeout = 10s;
  std::atomic<int> polls{0};
  std::string instance = "aaaa";
  std::mutex mu;
  auto probe = [&](const std::string& endpoint) -> StatusOr<WorkerRecord> {
    std::lock_guard lock(mu);
    ++polls;
    WorkerRecord rec;
    rec.device = "cuda:2";
    rec.endpoint = endpoint;
    rec.instance = instance;
    return rec;
  };
  std::atomic<int> restarts{0};
  auto registry = WorkerRegistry::Start(o, probe, [&](const WorkerRecord&) { ++restarts; });
  ASSERT_TRUE(registry.ok()) << registry.status();
  const uint64_t g1 = GenerationOf(**registry, "cuda:2");
  ASSERT_NE(g1, 0u);
  const int before = polls.load();
  while (polls.load() < before + 3) std::this_thread::sleep_for(10ms);
  EXPECT_EQ((*registry)->Get("cuda:2")->generation, g1);  // polls of the same process
  {
    std::lock_guard lock(mu);
    instance = "bbbb";  // the process behind the endpoint was replaced
  }
  EXPECT_NE(GenerationOf(**registry, "cuda:2", g1), g1);
}

// A static worker that stops answering (its probe waits out a long timeout) delays neither the
// other static workers' answers nor the registered workers' heartbeats: before, one probe after
// another ran on the registry thread, and healthy workers were marked down meanwhile.
TEST(WorkerRegistry, ADeadStaticWorkerDoesNotMakeHealthyOnesLookDown) {
  RegistryOptions o;
  o.register_listen = "tcp://127.0.0.1:*";
  o.static_workers = {"tcp://127.0.0.1:5003", "tcp://127.0.0.1:5004"};
  o.poll_interval = 20ms;
  o.heartbeat_timeout = 400ms;
  auto probe = [&](const std::string& endpoint) -> StatusOr<WorkerRecord> {
    if (endpoint.ends_with("5003")) {  // hangs, then fails, as a stopped process does
      std::this_thread::sleep_for(1500ms);
      return DeadlineExceededError("no answer from " + endpoint);
    }
    WorkerRecord rec;
    rec.device = "cuda:4";
    rec.endpoint = endpoint;
    rec.instance = "live";
    return rec;
  };
  auto registry = WorkerRegistry::Start(o, probe, nullptr);
  ASSERT_TRUE(registry.ok()) << registry.status();
  WorkerRegistry& r = **registry;
  FakeWorkerConnection registered(r.register_endpoint());
  registered.Register("cuda:5", "tcp://127.0.0.1:5005", "reg");
  ASSERT_NE(GenerationOf(r, "cuda:4"), 0u);
  ASSERT_NE(GenerationOf(r, "cuda:5"), 0u);
  // Two dead-probe rounds: the live static worker stays up throughout, and a registered worker
  // re-registering (as its heartbeats do) is heard at once.
  const auto end = std::chrono::steady_clock::now() + 3s;
  int samples = 0;
  while (std::chrono::steady_clock::now() < end) {
    auto live = r.Get("cuda:4");
    ASSERT_TRUE(live.ok()) << "after " << samples << " samples: " << live.status();
    registered.Register("cuda:5", "tcp://127.0.0.1:5005", "reg");
    ++samples;
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_TRUE(r.Get("cuda:5").ok());
  EXPECT_FALSE(r.Get("?tcp://127.0.0.1:5003").ok()) << "the dead one is down";
}

}  // namespace
}  // namespace fleet::coordinator
