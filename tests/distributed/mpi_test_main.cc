// main() of the multi-rank GoogleTest programs (rmoe_add_mpi_test_executable).
//
// - Initialises MPI (MpiRuntime); tests reach the world through MpiRuntime::Get().World().
// - Rank 0 prints gtest's usual output. Other ranks print only their failures, each line
//   prefixed with "[rank R]".
// - Every rank exits non-zero if a test failed on any rank (so mpirun does too), and rank 0
//   names the ranks that failed.
// - A watchdog ends the job if one test runs longer than RMOE_MPI_TEST_TIMEOUT seconds
//   (default 240: below CTest's 300), naming the test and rank, instead of leaving ranks
//   that wait in a collective for a rank that gave up hanging until CTest kills them.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "distributed/mpi_communicator.h"

namespace {

using rmoe::distributed::MpiRuntime;

// Failures only, prefixed with the rank (ranks other than 0).
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}

  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::ostringstream out;
    out << (result.file_name() ? result.file_name() : "unknown file") << ":"
        << result.line_number() << ": Failure\n"
        << result.message();
    std::string text = out.str(), prefixed;
    const std::string prefix = "[rank " + std::to_string(rank_) + "] ";
    size_t begin = 0;
    while (begin <= text.size()) {
      size_t end = text.find('\n', begin);
      if (end == std::string::npos) end = text.size();
      prefixed += prefix + text.substr(begin, end - begin) + "\n";
      begin = end + 1;
    }
    std::fputs(prefixed.c_str(), stdout);
    std::fflush(stdout);
  }

  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (!info.result()->Failed()) return;
    std::printf("[rank %d] [  FAILED  ] %s.%s\n", rank_, info.test_suite_name(), info.name());
    std::fflush(stdout);
  }

 private:
  int rank_;
};

// Ends the process (hence, through mpirun, the job) if one test runs too long.
class Watchdog : public ::testing::EmptyTestEventListener {
 public:
  Watchdog(int rank, double limit_seconds) : rank_(rank), limit_(limit_seconds) {
    thread_ = std::thread([this] { Run(); });
  }
  ~Watchdog() override {
    stop_ = true;
    thread_.join();
  }

  void OnTestStart(const ::testing::TestInfo& info) override {
    std::lock_guard<std::mutex> lock(mutex_);
    current_ = std::string(info.test_suite_name()) + "." + info.name();
    started_ = std::chrono::steady_clock::now();
    running_ = true;
  }
  void OnTestEnd(const ::testing::TestInfo&) override {
    std::lock_guard<std::mutex> lock(mutex_);
    running_ = false;
  }

 private:
  void Run() {
    while (!stop_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      std::lock_guard<std::mutex> lock(mutex_);
      if (!running_) continue;
      const double s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
      if (s > limit_) {
        std::fprintf(stderr,
                     "[rank %d] %s still running after %.0f s (RMOE_MPI_TEST_TIMEOUT): "
                     "probably waiting in a collective for a rank that failed; ending the job\n",
                     rank_, current_.c_str(), s);
        std::fflush(stdout);
        std::fflush(stderr);
        std::_Exit(70);  // EX_SOFTWARE; no MPI call from this thread; mpirun ends the rest
      }
    }
  }

  int rank_;
  double limit_;
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::string current_;
  std::chrono::steady_clock::time_point started_;
  bool running_ = false;
  std::thread thread_;
};

}  // namespace

int main(int argc, char** argv) {
  MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = mpi.World().rank(), size = mpi.World().size();

  ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (rank != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  double limit = 240;
  if (const char* env = std::getenv("RMOE_MPI_TEST_TIMEOUT")) limit = std::atof(env);
  if (limit > 0) listeners.Append(new Watchdog(rank, limit));  // gtest owns and deletes it

  const int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  std::fflush(stdout);

  // Plain MPI on MPI_COMM_WORLD, independent of the code under test.
  std::vector<int> failures(size, 0);
  if (MPI_Allgather(&failed, 1, MPI_INT, failures.data(), 1, MPI_INT, MPI_COMM_WORLD) !=
      MPI_SUCCESS) {
    std::fprintf(stderr, "[rank %d] MPI_Allgather of the test results failed\n", rank);
    mpi.Abort(1);
  }
  std::string failed_ranks;
  for (int r = 0; r < size; ++r) {
    if (failures[r]) failed_ranks += (failed_ranks.empty() ? "" : ", ") + std::to_string(r);
  }
  if (rank == 0) {
    if (failed_ranks.empty()) {
      std::printf("[   MPI    ] all %d rank(s) passed\n", size);
    } else {
      std::printf("[   MPI    ] FAILED on rank(s) %s of %d\n", failed_ranks.c_str(), size);
    }
    std::fflush(stdout);
  }
  return failed_ranks.empty() ? 0 : 1;
}
