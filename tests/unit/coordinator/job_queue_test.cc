#include "fleet/coordinator/job_queue.h"

#include <gtest/gtest.h>

#include <atomic>
#include <future>

namespace fleet::coordinator {
namespace {

TEST(JobQueueTest, RunsJobsAndRefusesWhenFull) {
  JobQueue queue(/*capacity=*/2, /*threads=*/1);
  std::promise<void> release;
  std::shared_future<void> gate = release.get_future().share();
  std::atomic<int> ran{0};
  std::promise<void> started;
  ASSERT_TRUE(queue.Submit([&] { started.set_value(); gate.wait(); ++ran; }).ok());
  started.get_future().wait();  // the only thread is busy now
  ASSERT_TRUE(queue.Submit([&] { ++ran; }).ok());
  ASSERT_TRUE(queue.Submit([&] { ++ran; }).ok());
  EXPECT_EQ(queue.depth(), 2u);
  Status busy = queue.Submit([&] { ++ran; });
  EXPECT_EQ(busy.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(busy.message().find("busy"), std::string::npos);
  release.set_value();
  EXPECT_TRUE(queue.Drain(std::chrono::seconds(10)));
  EXPECT_EQ(ran.load(), 3);
  EXPECT_EQ(queue.Submit([] {}).code(), StatusCode::kUnavailable);
}

TEST(JobQueueTest, DrainAbandonsWhatCannotFinish) {
  JobQueue queue(4, 1);
  std::promise<void> release;
  std::shared_future<void> gate = release.get_future().share();
  std::promise<void> started;
  // The job holds its own copy of the gate: the test's locals are gone before the queue (declared
  // first) joins the thread that is still returning from gate.wait() (ASan: use after free).
  ASSERT_TRUE(queue.Submit([&started, gate] { started.set_value(); gate.wait(); }).ok());
  started.get_future().wait();
  std::atomic<int> abandoned{0};
  ASSERT_TRUE(queue.Submit([] {}, [&] { ++abandoned; }).ok());
  EXPECT_FALSE(queue.Drain(std::chrono::milliseconds(50)));
  EXPECT_EQ(abandoned.load(), 1);
  release.set_value();
}

}  // namespace
}  // namespace fleet::coordinator
