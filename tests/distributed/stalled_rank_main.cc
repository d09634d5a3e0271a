// A job in which rank 1 stops or is slow while every other rank enters a collective that
// needs it (`rmoe_stalled_rank MODE`):
//   allreduce | alltoall | barrier   after a barrier, rank 1 stops itself (SIGSTOP: alive but
//       never joining, like a hung rank). With a 2 s collective deadline the other ranks must
//       report rank 1 as missing and abort the job, non-zero, instead of waiting forever.
//       A rank whose collective returns normally prints UNEXPECTED (which fails the test).
//       CTest runs these through expect_failure.sh and checks the report.
//   slow   rank 1 sleeps 2 s before joining an AllReduce (deadline 30 s). The job must
//       succeed, and rank 0 must not have burnt a core while it waited: it fails unless its
//       process used at most 30% of the wall time as CPU time during the AllReduce.
#include <signal.h>
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "distributed/mpi_communicator.h"

using rmoe::distributed::MpiCommunicator;
using rmoe::distributed::MpiRuntime;
using rmoe::distributed::ReduceOp;

namespace {

constexpr double kStalledTimeoutSeconds = 2;
constexpr double kSlowTimeoutSeconds = 30;
constexpr double kMaxCpuShareWhileWaiting = 0.3;

double ProcessCpuSeconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

double Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Runs the collective `mode` names once (big enough not to fit in one eager message).
void RunCollective(MpiCommunicator& world, const std::string& mode) {
  const int size = world.size();
  torch::Tensor t = torch::ones({1 << 20});
  if (mode == "alltoall") {
    std::vector<int64_t> splits(size, (1 << 20) / size);
    splits[0] += (1 << 20) - splits[0] * size;
    world.AllToAll(t, splits, splits);
  } else if (mode == "barrier") {
    world.Barrier();
  } else {
    world.AllReduce(t, ReduceOp::kSum);
  }
}

int Stalled(MpiCommunicator& world, const std::string& mode) {
  world.set_collective_timeout_seconds(kStalledTimeoutSeconds);
  world.Barrier();
  if (world.rank() == 1) {
    std::fprintf(stderr, "rank 1: stopping itself (SIGSTOP)\n");
    std::fflush(stderr);
    raise(SIGSTOP);
    // Only reached if something resumed it: leave the others to their deadline.
    std::this_thread::sleep_for(std::chrono::seconds(60));
    return 0;
  }
  RunCollective(world, mode);
  std::printf("rank %d: UNEXPECTED: the %s returned although rank 1 is stopped\n", world.rank(),
              mode.c_str());
  return 0;
}

int Slow(MpiCommunicator& world) {
  world.set_collective_timeout_seconds(kSlowTimeoutSeconds);
  world.Barrier();
  if (world.rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(2));
  const auto start = std::chrono::steady_clock::now();
  const double cpu_start = ProcessCpuSeconds();
  RunCollective(world, "allreduce");
  const double wall = Since(start), cpu = ProcessCpuSeconds() - cpu_start;
  if (world.rank() != 0) return 0;
  std::printf("rank 0: waited %.2f s in AllReduce for the slow rank 1, using %.3f s of CPU "
              "(%.1f%%)\n", wall, cpu, 100 * cpu / wall);
  if (wall < 1) {
    std::printf("rank 0: FAIL: the AllReduce returned after %.2f s, before rank 1 joined\n", wall);
    return 1;
  }
  if (cpu > kMaxCpuShareWhileWaiting * wall) {
    std::printf("rank 0: FAIL: a waiting rank must sleep, not spin: it used more than %.0f%% of "
                "the wall time as CPU time\n", 100 * kMaxCpuShareWhileWaiting);
    return 1;
  }
  std::printf("slow_rank: PASS\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode != "allreduce" && mode != "alltoall" && mode != "barrier" && mode != "slow") {
    std::fprintf(stderr, "usage: rmoe_stalled_rank allreduce|alltoall|barrier|slow\n");
    return 2;
  }
  MpiRuntime mpi(&argc, &argv);
  auto& world = mpi.World();
  if (world.size() < 2) {
    std::fprintf(stderr, "rmoe_stalled_rank: needs at least 2 ranks\n");
    return 2;
  }
  try {
    return mode == "slow" ? Slow(world) : Stalled(world, mode);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", world.rank(), e.what());
    mpi.Abort(4);
  }
}
