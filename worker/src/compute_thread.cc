#include "compute_thread.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>

namespace fleet::worker::internal {

ComputeThread::ComputeThread(int threads) : thread_([this, threads] { Loop(threads); }) {}

ComputeThread::~ComputeThread() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void ComputeThread::Post(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back(std::move(job));
  }
  cv_.notify_one();
}

void ComputeThread::Loop(int threads) {
  // libtorch sets a thread's OpenMP thread count from at::set_num_threads on its first parallel
  // op; do that first, then raise it for this thread only.
  at::internal::lazy_init_num_threads();
  omp_set_num_threads(std::max(1, threads));
  while (true) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return closed_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    job();
  }
}

}  // namespace fleet::worker::internal
