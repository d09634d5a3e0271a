// NcclCommunicator's failure handling that runs without a GPU (distributed/nccl_supervision.h).
#include <chrono>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "distributed/nccl_supervision.h"

namespace rmoe::distributed {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

const SteadyClock::time_point kT0 = SteadyClock::time_point() + std::chrono::hours(1);

TEST(DeadlineTest, PassesOnlyAfterTheTimeout) {
  const Deadline deadline(kT0, 2.0);
  EXPECT_FALSE(deadline.Passed(kT0));
  EXPECT_FALSE(deadline.Passed(kT0 + milliseconds(2000)));
  EXPECT_TRUE(deadline.Passed(kT0 + milliseconds(2001)));
  EXPECT_DOUBLE_EQ(deadline.ElapsedSeconds(kT0 + milliseconds(1500)), 1.5);
}

TEST(DeadlineTest, ZeroMeansNoDeadline) {
  const Deadline deadline(kT0, 0);
  EXPECT_FALSE(deadline.Passed(kT0 + std::chrono::hours(1000)));
}

// The destructor's waits share one deadline: the second wait has only what the first left.
TEST(DeadlineTest, SharedByTwoWaitsBoundsTheirSum) {
  const Deadline shared(kT0, 10);
  const auto first_wait_ends = kT0 + seconds(8);
  EXPECT_FALSE(shared.Passed(first_wait_ends));
  EXPECT_TRUE(shared.Passed(first_wait_ends + seconds(3)));
}

TEST(RunningTimeTest, CountsFromTheFirstPollThatSawItStarted) {
  RunningTime running;
  // Queued behind 500 s of compute: never started, never late.
  EXPECT_EQ(running.Poll(false, kT0), 0);
  EXPECT_EQ(running.Poll(false, kT0 + seconds(500)), 0);
  EXPECT_FALSE(running.started());
  EXPECT_EQ(running.Poll(true, kT0 + seconds(501)), 0);
  EXPECT_TRUE(running.started());
  EXPECT_DOUBLE_EQ(running.Poll(true, kT0 + seconds(531)), 30);
  // A completed event stays completed; a poll that could not tell does not restart the clock.
  EXPECT_DOUBLE_EQ(running.Poll(false, kT0 + seconds(541)), 40);
}

TEST(RunningTimeTest, OverdueOnlyPastAPositiveTimeout) {
  EXPECT_FALSE(Overdue(600, 600));
  EXPECT_TRUE(Overdue(600.5, 600));
  EXPECT_FALSE(Overdue(1e9, 0));
  RunningTime running;
  running.Poll(false, kT0);
  EXPECT_FALSE(Overdue(running.Poll(false, kT0 + seconds(700)), 600));
  running.Poll(true, kT0 + seconds(700));
  EXPECT_FALSE(Overdue(running.Poll(true, kT0 + seconds(1299)), 600));
  EXPECT_TRUE(Overdue(running.Poll(true, kT0 + seconds(1301)), 600));
}

TEST(BackgroundTaskTest, WaitReturnsOnceTheWorkIsDone) {
  auto task = BackgroundTask::Start([] { std::this_thread::sleep_for(milliseconds(20)); });
  EXPECT_TRUE(task->WaitFor(seconds(30)));
  EXPECT_TRUE(task->done());
}

// The caller of a stuck call gets control back after the bound, and the work can still end
// later (the task outlives the wait).
TEST(BackgroundTaskTest, AStuckCallDoesNotHoldTheCaller) {
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  auto task = BackgroundTask::Start([released] { released.wait(); });
  const auto start = SteadyClock::now();
  EXPECT_FALSE(task->WaitFor(milliseconds(100)));
  const double waited = std::chrono::duration<double>(SteadyClock::now() - start).count();
  EXPECT_GE(waited, 0.09);
  EXPECT_LT(waited, 5.0);
  EXPECT_FALSE(task->done());
  release.set_value();
  EXPECT_TRUE(task->WaitFor(seconds(30)));
}

TEST(BackgroundTaskTest, AThrowingCallStillCompletes) {
  auto task = BackgroundTask::Start([] { throw std::runtime_error("no"); });
  EXPECT_TRUE(task->WaitFor(seconds(30)));
}

TEST(WaitOrEndProcessTest, ReturnsWhenTheWorkFinishesInTime) {
  auto task = BackgroundTask::Start([] {});
  WaitOrEndProcess(*task, seconds(30), "ncclCommAbort");
  EXPECT_TRUE(task->done());
}

TEST(WaitOrEndProcessDeathTest, EndsTheProcessWhenTheWorkIsStuck) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        auto never = std::make_shared<std::promise<void>>();
        std::shared_future<void> released = never->get_future().share();
        auto task = BackgroundTask::Start([released] { released.wait(); });
        WaitOrEndProcess(*task, milliseconds(100), "rank 3: ncclCommAbort");
      },
      ::testing::ExitedWithCode(1),
      "rank 3: ncclCommAbort did not return within 0.1 s; ending this process");
}

TEST(NcclVersionTest, DecodesBothEncodings) {
  EXPECT_EQ(NcclVersionString(22809), "2.28.9");
  EXPECT_EQ(NcclVersionString(21005), "2.10.5");
  EXPECT_EQ(NcclVersionString(20903), "2.9.3");
  EXPECT_EQ(NcclVersionString(2804), "2.8.4");  // before 2.9
  EXPECT_EQ(NcclVersionString(2708), "2.7.8");
  EXPECT_EQ(NcclVersionString(0), "unknown (code 0)");
  EXPECT_FALSE(DecodeNcclVersion(0).has_value());
}

TEST(NcclVersionTest, SameOrNewerMinorIsFine) {
  EXPECT_EQ(NcclVersionProblem(22809, 22809, "/x/libnccl.so.2"), "");
  EXPECT_EQ(NcclVersionProblem(22809, 22801, "/x/libnccl.so.2"), "");  // older patch
  EXPECT_EQ(NcclVersionProblem(22809, 22903, "/x/libnccl.so.2"), "");
  EXPECT_EQ(NcclVersionProblem(21805, 30001, ""), "");
  EXPECT_EQ(NcclVersionProblem(2804, 21805, ""), "");  // across the change of encoding
}

TEST(NcclVersionTest, OlderMinorNamesBothVersionsAndTheLibrary) {
  const std::string problem =
      NcclVersionProblem(22809, 21803, "/usr/lib/x86_64-linux-gnu/libnccl.so.2");
  EXPECT_NE(problem.find("the NCCL library loaded at run time "
                         "(/usr/lib/x86_64-linux-gnu/libnccl.so.2) is version 2.18.3, older than "
                         "the NCCL headers this program was compiled against (2.28.9)"),
            std::string::npos)
      << problem;
  EXPECT_NE(problem.find("load NCCL 2.28 or newer first"), std::string::npos) << problem;
  EXPECT_NE(NcclVersionProblem(21005, 2804, ""), "");  // 2.8 under 2.10
}

TEST(NcclVersionTest, AnUnreadableLoadedVersionIsAProblem) {
  const std::string problem = NcclVersionProblem(22809, 0, "");
  EXPECT_NE(problem.find("reports no usable version (unknown (code 0))"), std::string::npos)
      << problem;
  EXPECT_NE(problem.find("compiled against NCCL 2.28.9"), std::string::npos) << problem;
}

}  // namespace
}  // namespace rmoe::distributed
