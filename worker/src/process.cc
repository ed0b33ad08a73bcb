#include "fleet/worker/process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>
#include <thread>

namespace fleet::worker {

WorkerProcess::WorkerProcess(pid_t pid, int stdout_fd) : pid_(pid), stdout_fd_(stdout_fd) {}

WorkerProcess::~WorkerProcess() {
  Terminate();
  if (stdout_fd_ >= 0) close(stdout_fd_);
}

StatusOr<std::unique_ptr<WorkerProcess>> WorkerProcess::Start(const std::string& binary,
                                                              const std::vector<std::string>& args,
                                                              std::chrono::milliseconds timeout) {
  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC) != 0)
    return UnavailableError(std::string("pipe: ") + std::strerror(errno));
  std::vector<std::string> argv_s = {binary};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid < 0) return UnavailableError(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    dup2(pipefd[1], STDOUT_FILENO);
    // If the parent dies without stopping us (a test killed by its timeout), stop too: SIGTERM
    // lets the worker unlink its shm arena instead of leaving an orphan behind.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    // Signals blocked by the parent (a test runner) must not stay blocked in the worker.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    execv(binary.c_str(), argv.data());
    _exit(127);
  }
  close(pipefd[1]);
  auto proc = std::make_unique<WorkerProcess>(pid, pipefd[0]);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string out;
  while (true) {
    const auto nl = out.find('\n');
    if (nl != std::string::npos) {
      const std::string line = out.substr(0, nl);
      out.erase(0, nl + 1);
      if (line.rfind("fleet-worker ready ", 0) != 0) continue;
      proc->ready_line_ = line;
      std::istringstream in(line);
      std::string word;
      while (in >> word) {
        const auto eq = word.find('=');
        if (eq == std::string::npos) continue;
        const std::string key = word.substr(0, eq), value = word.substr(eq + 1);
        if (key == "listen") proc->endpoint_ = value;
        if (key == "metrics") proc->metrics_ = value;
        if (key == "shm") proc->arena_ = value;
      }
      return proc;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return DeadlineExceededError(binary + " printed no ready line within " +
                                   std::to_string(timeout.count()) + " ms");
    }
    pollfd p{pipefd[0], POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    char buf[4096];
    const ssize_t n = read(pipefd[0], buf, sizeof(buf));
    if (n <= 0) {
      const int status = proc->Terminate(std::chrono::seconds(5));
      return UnavailableError(binary + " exited (status " + std::to_string(status) +
                              ") before it was ready");
    }
    out.append(buf, static_cast<size_t>(n));
  }
}

int WorkerProcess::Terminate(std::chrono::milliseconds timeout) {
  if (exited_) return exit_status_;
  kill(pid_, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  while (true) {
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) break;
    if (r < 0) {
      status = 0;
      break;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  exited_ = true;
  exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return exit_status_;
}

StatusOr<std::string> HttpGet(const std::string& host_port, const std::string& path) {
  const auto colon = host_port.rfind(':');
  if (colon == std::string::npos)
    return InvalidArgumentError("'" + host_port + "' is not host:port");
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host_port.substr(0, colon).c_str(), host_port.substr(colon + 1).c_str(), &hints,
                  &res) != 0) {
    return InvalidArgumentError("cannot resolve '" + host_port + "'");
  }
  const int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const bool ok = fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0;
  freeaddrinfo(res);
  if (!ok) {
    if (fd >= 0) close(fd);
    return UnavailableError("cannot connect to " + host_port + ": " + std::strerror(errno));
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: " + host_port + "\r\n\r\n";
  if (write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return UnavailableError("short write to " + host_port);
  }
  std::string resp;
  char buf[8192];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) resp.append(buf, static_cast<size_t>(n));
  close(fd);
  const auto body = resp.find("\r\n\r\n");
  if (resp.rfind("HTTP/1.", 0) != 0 || body == std::string::npos) {
    return InternalError("malformed HTTP response from " + host_port);
  }
  if (resp.find(" 200 ") > resp.find("\r\n")) {
    return NotFoundError("GET " + path + ": " + resp.substr(0, resp.find("\r\n")));
  }
  return resp.substr(body + 4);
}

}  // namespace fleet::worker
