// WorkerProcess: starts a fleet-worker child process and reads its ready line, for `fleet up`,
// integration tests and benchmarks.
//
//   auto w = WorkerProcess::Start(bin + "/fleet-worker", {"--id", "cuda:1", "--capacity", "2gb"});
//   WorkerClient::Connect(w->endpoint(), {});
//
// The child's stdout is read until "fleet-worker ready id=... listen=... metrics=... shm=...";
// its stderr is inherited. The destructor sends SIGTERM and waits. The child also gets SIGTERM
// when the thread that started it exits (PR_SET_PDEATHSIG), so a crashed or killed parent
// leaves no orphan worker (and no shm arena) behind: start workers from a long-lived thread.
//
// Thread safety: one thread owns a WorkerProcess.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "fleet/status/status.h"

namespace fleet::worker {

class WorkerProcess {
 public:
  /// Starts `binary` with `args` and waits up to `timeout` for its ready line. An early exit
  /// is Unavailable with the exit status.
  static StatusOr<std::unique_ptr<WorkerProcess>> Start(
      const std::string& binary, const std::vector<std::string>& args,
      std::chrono::milliseconds timeout = std::chrono::seconds(60));
  ~WorkerProcess();
  WorkerProcess(const WorkerProcess&) = delete;
  WorkerProcess& operator=(const WorkerProcess&) = delete;

  const std::string& endpoint() const { return endpoint_; }
  const std::string& metrics() const { return metrics_; }  // "host:port" or "off"
  const std::string& arena() const { return arena_; }      // shm arena name or "off"
  const std::string& ready_line() const { return ready_line_; }
  pid_t pid() const { return pid_; }

  /// SIGTERM, then waits up to `timeout` (SIGKILL after). \return the exit status (128+signal
  /// when killed by a signal).
  int Terminate(std::chrono::milliseconds timeout = std::chrono::seconds(30));

  WorkerProcess(pid_t pid, int stdout_fd);

 private:
  pid_t pid_;
  int stdout_fd_;
  bool exited_ = false;
  int exit_status_ = 0;
  std::string endpoint_, metrics_, arena_, ready_line_;
};

/// A GET of http://<host:port><path>; the body, or an error. For scraping /metrics in tests.
StatusOr<std::string> HttpGet(const std::string& host_port, const std::string& path);

}  // namespace fleet::worker
