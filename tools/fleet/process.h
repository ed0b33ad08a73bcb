// Child processes for `fleet up`: spawn a binary with its stdout on a pipe and its stderr in a
// log file, wait for its one "<name> ready key=value ..." line, stop it with SIGTERM.
//
// Thread safety: a Child is owned by one thread.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "fleet/status/status.h"

namespace fleet::cli {

class Child {
 public:
  /// Starts `argv` (argv[0] is a path); stderr goes to `log_path` (appended).
  static StatusOr<Child> Spawn(const std::vector<std::string>& argv, const std::string& log_path);
  Child() = default;
  Child(Child&& other) noexcept;
  Child& operator=(Child&& other) noexcept;
  ~Child();

  /// Reads stdout until a line starting with `prefix` ("fleet-worker ready"); returns its
  /// key=value pairs. DeadlineExceeded after `timeout`, Unavailable if the child exits first
  /// (with the tail of its log).
  StatusOr<std::map<std::string, std::string>> WaitReady(const std::string& prefix,
                                                        std::chrono::milliseconds timeout);
  /// Waits for the child to exit on its own, discarding its stdout; SIGKILL after `timeout`.
  /// Returns the exit status (or -signal).
  int Wait(std::chrono::milliseconds timeout);
  /// SIGTERM, then SIGKILL after `grace`. Returns the exit status (or -signal).
  int Stop(std::chrono::milliseconds grace = std::chrono::seconds(10));
  bool running();
  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }

 private:
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  std::string log_path_;
  std::string buffered_;
  int exit_status_ = 0;
};

/// The last `lines` lines of a text file (for error messages).
std::string TailOfFile(const std::string& path, int lines);

}  // namespace fleet::cli
