// A job in which rank 1 dies: after a barrier it exits at once (std::_Exit(3): no MPI_Finalize,
// no destructors), while every other rank enters a collective that needs it
// (`rmoe_dead_rank allreduce|alltoall [STATUS]`, STATUS: rank 1's exit status, default 3). The job must end with a non-zero
// status in bounded time rather than hang; CTest checks that through expect_failure.sh.
// A rank whose collective returns normally prints UNEXPECTED (which fails the test).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <thread>

#include "distributed/mpi_communicator.h"

using rmoe::distributed::MpiRuntime;
using rmoe::distributed::ReduceOp;

int main(int argc, char** argv) {
  const bool alltoall = argc > 1 && std::strcmp(argv[1], "alltoall") == 0;
  const int status = argc > 2 ? std::atoi(argv[2]) : 3;
  MpiRuntime mpi(&argc, &argv);
  auto& world = mpi.World();
  const int rank = world.rank(), size = world.size();
  if (size < 2) {
    std::fprintf(stderr, "rmoe_dead_rank: needs at least 2 ranks\n");
    return 2;
  }
  world.Barrier();
  if (rank == 1) {
    std::fprintf(stderr, "rank 1: exiting abruptly with status %d\n", status);
    std::fflush(stderr);
    std::_Exit(status);
  }
  const auto start = std::chrono::steady_clock::now();
  try {
    // Big enough not to fit in one eager message, so the collective must wait for rank 1.
    torch::Tensor t = torch::ones({1 << 20});
    if (alltoall) {
      std::vector<int64_t> splits(size, (1 << 20) / size);
      splits[0] += (1 << 20) - splits[0] * size;
      for (int i = 0; i < 3; ++i) t = world.AllToAll(t, splits, splits);
    } else {
      for (int i = 0; i < 3; ++i) world.AllReduce(t, ReduceOp::kSum);
    }
    std::printf("rank %d: UNEXPECTED: the %s returned although rank 1 is dead\n", rank,
                alltoall ? "AllToAll" : "AllReduce");
    return 0;
  } catch (const std::exception& e) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "rank %d: error after %.2f s: %s\n", rank, s, e.what());
    mpi.Abort(4);
  }
}
