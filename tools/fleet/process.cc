#include "process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

namespace fleet::cli {

StatusOr<Child> Child::Spawn(const std::vector<std::string>& argv, const std::string& log_path) {
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) return InternalError(std::string("pipe: ") + std::strerror(errno));
  int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log < 0) {
    close(out[0]);
    close(out[1]);
    return InvalidArgumentError("cannot write log file " + log_path + ": " + std::strerror(errno));
  }
  pid_t pid = fork();
  if (pid < 0) return InternalError(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    dup2(out[1], STDOUT_FILENO);
    dup2(log, STDERR_FILENO);
    setpgid(0, 0);  // a Ctrl-C in the terminal reaches `fleet up`, which stops the children in order
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    std::fprintf(stderr, "cannot run %s: %s\n", args[0], std::strerror(errno));
    _exit(127);
  }
  close(out[1]);
  close(log);
  Child c;
  c.pid_ = pid;
  c.stdout_fd_ = out[0];
  c.log_path_ = log_path;
  return c;
}

Child::Child(Child&& o) noexcept { *this = std::move(o); }

Child& Child::operator=(Child&& o) noexcept {
  std::swap(pid_, o.pid_);
  std::swap(stdout_fd_, o.stdout_fd_);
  std::swap(log_path_, o.log_path_);
  std::swap(buffered_, o.buffered_);
  std::swap(exit_status_, o.exit_status_);
  return *this;
}

Child::~Child() {
  if (pid_ > 0) Stop(std::chrono::seconds(5));
  if (stdout_fd_ >= 0) close(stdout_fd_);
}

bool Child::running() {
  if (pid_ <= 0) return false;
  int status = 0;
  pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    pid_ = -1;
    return false;
  }
  return true;
}

StatusOr<std::map<std::string, std::string>> Child::WaitReady(const std::string& prefix,
                                                             std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    size_t nl;
    while ((nl = buffered_.find('\n')) != std::string::npos) {
      std::string line = buffered_.substr(0, nl);
      buffered_.erase(0, nl + 1);
      if (line.rfind(prefix, 0) != 0) continue;
      std::map<std::string, std::string> kv;
      std::istringstream in(line.substr(prefix.size()));
      std::string item;
      while (in >> item) {
        size_t eq = item.find('=');
        if (eq != std::string::npos) kv[item.substr(0, eq)] = item.substr(eq + 1);
      }
      return kv;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return DeadlineExceededError("no '" + prefix + "' line in time (log: " + log_path_ + ")");
    pollfd p{stdout_fd_, POLLIN, 0};
    int r = poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 200)));
    if (r > 0) {
      char buf[4096];
      ssize_t n = read(stdout_fd_, buf, sizeof(buf));
      if (n > 0) {
        buffered_.append(buf, static_cast<size_t>(n));
        continue;
      }
    }
    if (!running()) {
      return UnavailableError("process exited with status " + std::to_string(exit_status_) + " before it was ready:\n" +
                              TailOfFile(log_path_, 15));
    }
  }
}

int Child::Wait(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (running()) {
    if (std::chrono::steady_clock::now() > deadline) return Stop(std::chrono::milliseconds(0));
    pollfd p{stdout_fd_, POLLIN, 0};
    if (poll(&p, 1, 100) > 0) {
      char buf[4096];
      if (read(stdout_fd_, buf, sizeof(buf)) <= 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  return exit_status_;
}

int Child::Stop(std::chrono::milliseconds grace) {
  if (pid_ <= 0) return exit_status_;
  kill(pid_, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + grace;
  while (running()) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid_, SIGKILL);
      int status = 0;
      waitpid(pid_, &status, 0);
      pid_ = -1;
      exit_status_ = -SIGKILL;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return exit_status_;
}

std::string TailOfFile(const std::string& path, int lines) {
  std::ifstream in(path);
  std::vector<std::string> all;
  std::string line;
  while (std::getline(in, line)) all.push_back(line);
  std::string out;
  for (size_t i = all.size() > static_cast<size_t>(lines) ? all.size() - lines : 0; i < all.size(); ++i) {
    out += "  " + all[i] + "\n";
  }
  return out;
}

}  // namespace fleet::cli
