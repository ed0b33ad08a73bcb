#include "fleet/coordinator/job_queue.h"

#include <string>

namespace fleet::coordinator {

JobQueue::JobQueue(size_t capacity, int threads) : capacity_(capacity) {
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Loop(); });
}

JobQueue::~JobQueue() {
  Drain(std::chrono::milliseconds(0));
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

Status JobQueue::Submit(Job job, Abandon abandon) {
  {
    std::lock_guard lock(mu_);
    if (draining_) return UnavailableError("shutting down: not accepting new jobs");
    if (queue_.size() >= capacity_) {
      return ResourceExhaustedError("busy: " + std::to_string(queue_.size()) +
                                    " jobs queued (queue capacity " + std::to_string(capacity_) +
                                    "); retry later");
    }
    queue_.emplace_back(std::move(job), std::move(abandon));
  }
  cv_.notify_one();
  return Status();
}

size_t JobQueue::depth() const {
  std::lock_guard lock(mu_);
  return queue_.size();
}

size_t JobQueue::running() const {
  std::lock_guard lock(mu_);
  return running_;
}

void JobQueue::Loop() {
  while (true) {
    Job job;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and nothing left
      job = std::move(queue_.front().first);
      queue_.pop_front();
      ++running_;
    }
    job();
    {
      std::lock_guard lock(mu_);
      --running_;
    }
    idle_cv_.notify_all();
  }
}

bool JobQueue::Drain(std::chrono::milliseconds timeout) {
  std::deque<std::pair<Job, Abandon>> abandoned;
  bool finished;
  {
    std::unique_lock lock(mu_);
    draining_ = true;
    finished = idle_cv_.wait_for(lock, timeout, [&] { return queue_.empty() && running_ == 0; });
    abandoned.swap(queue_);
  }
  for (auto& [job, abandon] : abandoned) {
    if (abandon) abandon();
  }
  return finished && abandoned.empty();
}

}  // namespace fleet::coordinator
