// One thread for a worker's multi-threaded libtorch compute.
//
// Measured with bench/step (three CPU-backed workers on two cores, against fleet-run-local):
// * libgomp gives every thread that opens a parallel region an OpenMP team of its own; once a
//   process holds more OpenMP threads than CPUs it stops spinning between regions, and each of
//   the thousands of regions in a forward pays a futex wake-up. RunBlocks on whichever handler
//   was free: 1.13x run-local in every mode. So every RunBlocks runs on this one thread.
// * at::set_num_threads(n) also sizes libtorch's pthreadpool, whose idle workers spin for
//   milliseconds; in pipeline mode the idle workers' spinners took the cores of the worker
//   computing (1.43x). The worker sets libtorch to one thread (every other thread of the worker
//   computes alone) and only this thread gets an OpenMP team of `threads`.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <type_traits>

namespace fleet::worker::internal {

class ComputeThread {
 public:
  /// Starts the thread; its libtorch ops use `threads` intra-op threads.
  explicit ComputeThread(int threads);
  ~ComputeThread();
  ComputeThread(const ComputeThread&) = delete;
  ComputeThread& operator=(const ComputeThread&) = delete;

  /// Runs f on the compute thread and returns its result (or rethrows its exception). Callers
  /// wait in turn: one device computes one thing at a time. Re-entrant calls run inline.
  template <class F>
  std::invoke_result_t<F> Run(F f) {
    if (std::this_thread::get_id() == thread_.get_id()) return f();
    std::packaged_task<std::invoke_result_t<F>()> task(std::move(f));
    auto result = task.get_future();
    Post([&task] { task(); });
    return result.get();
  }

 private:
  void Post(std::function<void()> job);
  void Loop(int threads);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool closed_ = false;
  std::thread thread_;
};

}  // namespace fleet::worker::internal
