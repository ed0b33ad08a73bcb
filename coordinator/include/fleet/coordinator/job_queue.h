// A bounded queue of jobs run by a fixed pool of threads. A full queue refuses new work at once
// (the caller answers "busy"); nothing is dropped silently. Drain() stops accepting, lets queued
// and running jobs finish within a deadline, and reports what did not.
//
// Thread safety: all methods are safe to call from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "fleet/status/status.h"

namespace fleet::coordinator {

class JobQueue {
 public:
  using Job = std::function<void()>;
  /// Called when a queued job is discarded at shutdown instead of run (so it can reply).
  using Abandon = std::function<void()>;

  /// \param capacity jobs that may wait (running ones excluded).
  /// \param threads jobs that run at once.
  JobQueue(size_t capacity, int threads);
  ~JobQueue();
  JobQueue(const JobQueue&) = delete;
  JobQueue& operator=(const JobQueue&) = delete;

  /// Queues `job`. ResourceExhausted ("busy: N jobs queued") when full, Unavailable when draining.
  Status Submit(Job job, Abandon abandon = nullptr);

  size_t depth() const;     // jobs waiting
  size_t running() const;   // jobs running now
  size_t capacity() const { return capacity_; }

  /// Stops accepting; waits up to `timeout` for queued and running jobs. Jobs still queued at
  /// the deadline are abandoned (their Abandon callback runs). Returns true when all finished.
  bool Drain(std::chrono::milliseconds timeout);

 private:
  void Loop();

  const size_t capacity_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  std::deque<std::pair<Job, Abandon>> queue_;  // guarded by mu_
  size_t running_ = 0;                         // guarded by mu_
  bool draining_ = false;                      // guarded by mu_
  bool stopping_ = false;                      // guarded by mu_
  std::vector<std::thread> threads_;
};

}  // namespace fleet::coordinator
