// fleet-worker: parses options and runs a WorkerServer (all the work is in fleet::worker).
//
// Two settings are read only at process start, so unless FLEET_WORKER_NO_REEXEC is set the
// worker re-executes itself once with them added to its environment (one exec, ~1 ms):
// * GLIBC_TUNABLES=glibc.malloc.hugetlb=1: ZeroMQ allocates a fresh buffer for every large
//   inbound message, and a fresh 4 KiB page costs ~10 us on our VMs; huge pages make those
//   buffers 6-8x cheaper.
// * GOMP_SPINCOUNT=10000 (unless GOMP_SPINCOUNT or OMP_WAIT_POLICY is set): an OpenMP thread
//   that ran out of work spins ~300000 times (~7 ms here) before it sleeps. Workers that share
//   CPUs take turns in pipeline mode, and the spinners of the worker that just finished took a
//   core from the next one (~5 ms per hop, bench/step); 10000 (~0.25 ms) still bridges the gaps
//   between a forward's parallel regions.
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "fleet/config/options.h"
#include "fleet/log/log.h"
#include "fleet/models/host_allocator.h"
#include "fleet/transport/curve.h"
#include "fleet/worker/server.h"

namespace {

struct WorkerOptions {
#define FLEET_OPTION FLEET_OPTION_FIELD
#include "fleet/worker/options.def"
#undef FLEET_OPTION
};

void MaybeReexecWithTunedEnvironment(char** argv) {
  if (std::getenv("FLEET_WORKER_NO_REEXEC") != nullptr) return;
  bool changed = false;
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  std::string value = tunables ? tunables : "";
  if (value.find("glibc.malloc.hugetlb") == std::string::npos) {
    value = value.empty() ? "glibc.malloc.hugetlb=1" : value + ":glibc.malloc.hugetlb=1";
    setenv("GLIBC_TUNABLES", value.c_str(), 1);
    changed = true;
  }
  if (std::getenv("GOMP_SPINCOUNT") == nullptr && std::getenv("OMP_WAIT_POLICY") == nullptr) {
    setenv("GOMP_SPINCOUNT", "10000", 1);
    changed = true;
  }
  if (!changed) return;
  setenv("FLEET_WORKER_NO_REEXEC", "1", 1);  // never loop
  execv("/proc/self/exe", argv);
  // exec failed: carry on without them.
}

}  // namespace

int main(int argc, char** argv) {
  MaybeReexecWithTunedEnvironment(argv);
  WorkerOptions o;
  fleet::config::OptionSet option_set("fleet-worker",
                                      "Serve one device's share of a model's blocks.");
  {
    auto* options = &o;
    auto* set = &option_set;
#define FLEET_OPTION FLEET_OPTION_ADD
#include "fleet/worker/options.def"
#undef FLEET_OPTION
  }
  auto positional = option_set.ParseOrExit(argc, argv);
  if (!positional.empty()) {
    std::fprintf(stderr, "fleet-worker: unexpected argument '%s'\n", positional[0].c_str());
    return 2;
  }
  if (!fleet::log::SetFormatByName(o.log_format)) {
    std::fprintf(stderr, "fleet-worker: --log-format: expected text or json, got '%s'\n",
                 o.log_format.c_str());
    return 2;
  }
  fleet::log::SetProcessTag("worker[" + o.id + "]");
  fleet::models::TuneHostAllocator();
  // One malloc arena: ZeroMQ's I/O threads allocate the big inbound messages, and a per-thread
  // arena (at most 64 MiB per heap) would map fresh, unfaulted memory for each of them instead
  // of reusing what the main heap already holds.
  mallopt(M_ARENA_MAX, 1);

  fleet::worker::WorkerConfig c;
  c.id = o.id;
  c.backing = o.backing;
  c.capacity_bytes = o.capacity.value;
  c.total_bytes = o.total.value;
  c.listen = o.listen;
  c.model_roots = o.model_root;
  c.coordinator = o.coordinator;
  c.heartbeat_interval = o.heartbeat_interval.value;
  c.metrics_listen = o.metrics_listen;
  c.shm = o.shm;
  c.shm_arena_bytes = o.shm_arena_bytes.value;
  c.shm_staging_bytes = o.shm_staging_bytes.value;
  c.shm_copy_threads = static_cast<int>(o.shm_copy_threads);
  c.max_message_bytes = o.max_message_bytes.value;
  if (o.max_connections < 1) {
    std::fprintf(stderr, "fleet-worker: --max-connections must be at least 1\n");
    return 2;
  }
  c.max_connections = static_cast<size_t>(o.max_connections);
  if (o.job_ttl.value.count() <= 0) {
    std::fprintf(stderr, "fleet-worker: --job-ttl must be positive\n");
    return 2;
  }
  c.job_ttl = o.job_ttl.value;
  c.threads = static_cast<int>(o.threads);
  c.compute_threads = static_cast<int>(o.compute_threads);
  auto curve = fleet::transport::LoadCurveConfig(o.curve_secret_key_file, o.curve_server_key_file);
  if (!curve.ok()) {
    std::fprintf(stderr, "fleet-worker: %s\n", curve.status().ToString().c_str());
    return 2;
  }
  c.curve = *curve;
  if (!o.curve_authorized_keys_file.empty()) {
    auto keys = fleet::transport::ReadKeyListFile(o.curve_authorized_keys_file);
    if (!keys.ok()) {
      std::fprintf(stderr, "fleet-worker: %s\n", keys.status().ToString().c_str());
      return 2;
    }
    c.curve_authorized = *keys;
  }

  // SIGTERM/SIGINT are taken by a watcher thread: finish the current requests, then exit 0.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto server = fleet::worker::WorkerServer::Create(std::move(c));
  if (!server.ok()) {
    std::fprintf(stderr, "fleet-worker: %s\n", server.status().ToString().c_str());
    return 1;
  }
  std::printf("%s\n", (*server)->ReadyLine().c_str());
  std::fflush(stdout);
  FLEET_LOG(INFO, "worker") << (*server)->ReadyLine();

  fleet::worker::WorkerServer* s = server->get();
  std::thread watcher([&signals, s] {
    int sig = 0;
    sigwait(&signals, &sig);
    FLEET_LOG(INFO, "worker") << "signal " << sig << ": finishing current requests";
    s->Stop();
  });
  s->Run();
  // Run returned (after a signal): wake the watcher if Run ended for another reason.
  pthread_kill(watcher.native_handle(), SIGTERM);
  watcher.join();
  server->reset();  // unlinks the shm arena
  return 0;
}
