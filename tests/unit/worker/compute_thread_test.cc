// The worker's compute thread: one thread runs every job, with its own OpenMP team size.
#include "compute_thread.h"

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <stdexcept>
#include <thread>
#include <vector>

namespace fleet::worker::internal {
namespace {

TEST(ComputeThread, RunsEveryJobOnOneThreadWithItsOwnTeamSize) {
  at::set_num_threads(1);  // as the worker does for every other thread
  ComputeThread compute(2);
  const auto id = compute.Run([] { return std::this_thread::get_id(); });
  EXPECT_NE(id, std::this_thread::get_id());
  std::vector<std::thread> callers;
  std::vector<std::thread::id> seen(4);
  for (int i = 0; i < 4; ++i) {
    callers.emplace_back([&, i] { seen[i] = compute.Run([] { return std::this_thread::get_id(); }); });
  }
  for (auto& c : callers) c.join();
  for (const auto& s : seen) EXPECT_EQ(s, id);
  EXPECT_EQ(compute.Run([] { return at::get_num_threads(); }), 2);
  EXPECT_EQ(at::get_num_threads(), 1);  // the caller's count is untouched
}

TEST(ComputeThread, PropagatesExceptionsAndRunsNestedCallsInline) {
  ComputeThread compute(1);
  EXPECT_THROW(compute.Run([]() -> int { throw std::runtime_error("boom"); }), std::runtime_error);
  EXPECT_EQ(compute.Run([&] { return compute.Run([] { return 7; }); }), 7);  // no deadlock
  EXPECT_EQ(compute.Run([] { return 3; }), 3);  // still serving after a throw
}

}  // namespace
}  // namespace fleet::worker::internal
