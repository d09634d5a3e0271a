// NcclCommunicator on CUDA tensors: the expectations communicator_test.cc has of
// MpiCommunicator, plus what only NCCL has (aborts, the watchdog's clock, the shared stream).
// CTest runs it as nccl.np1 and nccl.np2 under the label `cuda`, which CI's CPU runs leave out;
// every test skips, with a message, where torch sees no CUDA device. Suites are named Cuda* so
// that a GPU bring-up script can select them with --gtest_filter='Cuda*'.
//
// Two ranks on one GPU: NCCL refuses two ranks of one communicator on the same GPU of one host
// ("Duplicate GPU detected") unless each rank has its own NCCL_HOSTID, so the script that runs
// nccl.np2 on a one-GPU machine gives each rank a distinct one, e.g.
//   mpirun -np 2 sh -c 'NCCL_HOSTID=rank$OMPI_COMM_WORLD_RANK exec rmoe_nccl_tests'
//
// Collectives come before assertions, so that a failed check on one rank does not leave the
// others waiting.
#include <chrono>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include <ATen/cuda/Sleep.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "distributed/mpi_communicator.h"
#include "distributed/nccl_communicator.h"
#include "distributed/nccl_supervision.h"
#include "tests/distributed/collective_checks.h"

namespace rmoe::distributed {
namespace {

using namespace collective_checks;  // NOLINT(build/namespaces): shared by both suites

// The world's NcclCommunicator, created on first use (collectively: every rank runs the same
// tests in the same order) and destroyed after the last test, while MPI and CUDA still work.
class NcclWorld : public ::testing::Environment {
 public:
  static NcclCommunicator& Get() {
    if (!comm_) comm_ = MakeNcclCommunicator(MpiRuntime::Get().World(), MpiRuntime::Get().LocalRank());
    return *comm_;
  }
  void TearDown() override { comm_.reset(); }
  // For a test that aborts it: the next Get() creates a new one.
  static void Recreate() { comm_.reset(); }

 private:
  static inline std::unique_ptr<NcclCommunicator> comm_;
};
[[maybe_unused]] ::testing::Environment* const kNcclWorld =
    ::testing::AddGlobalTestEnvironment(new NcclWorld);

class CudaNccl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) {
      GTEST_SKIP() << "torch sees no CUDA device here: NcclCommunicator needs one GPU per rank";
    }
  }
  NcclCommunicator& World() { return NcclWorld::Get(); }
  torch::Device device() { return torch::Device(torch::kCUDA, World().device()); }
};

TEST_F(CudaNccl, VersionsAreCompatibleAndReported) {
  EXPECT_EQ(NcclVersionProblem(NcclCommunicator::CompiledNcclVersion(),
                               NcclCommunicator::RuntimeNcclVersion(), NcclLibraryPath()),
            "");
  EXPECT_NE(NcclLibraryPath().find("libnccl"), std::string::npos) << NcclLibraryPath();
  EXPECT_NE(NcclBuildInfo().find("NCCL " + NcclVersionString(NcclCommunicator::RuntimeNcclVersion())),
            std::string::npos)
      << NcclBuildInfo();
  EXPECT_EQ(World().size(), MpiRuntime::Get().World().size());
}

TEST_F(CudaNccl, AllReduceSumAndAverageEveryDtype) {
  const int rank = World().rank(), size = World().size();
  const int64_t n = 37;
  const torch::Tensor sum_factor = (torch::arange(n, torch::kLong) + 1) * (size * (size + 1) / 2);
  for (torch::ScalarType dtype : {torch::kFloat, torch::kDouble, torch::kInt64, torch::kInt32,
                                  torch::kBFloat16, torch::kHalf, torch::kUInt8, torch::kInt8,
                                  torch::kInt16}) {
    SCOPED_TRACE(c10::toString(dtype));
    torch::Tensor t = RankValues(rank, n, dtype).to(device());
    World().AllReduce(t, ReduceOp::kSum);
    EXPECT_EQ(t.scalar_type(), dtype);
    EXPECT_TRUE(torch::equal(t.cpu(), sum_factor.to(dtype))) << t;
    if (at::isFloatingType(dtype)) {
      torch::Tensor a = RankValues(rank, n, dtype).to(device());
      World().AllReduce(a, ReduceOp::kAvg);
      const torch::Tensor expected = (sum_factor.to(torch::kDouble) / size).to(dtype);
      EXPECT_TRUE(torch::allclose(a.cpu().to(torch::kDouble), expected.to(torch::kDouble), 1e-2, 0))
          << a;
    }
  }
  // Bool sums are a logical or: rank r sets index r.
  torch::Tensor flags = torch::zeros({size + 1}, torch::kBool);
  flags[rank] = true;
  flags = flags.to(device());
  World().AllReduce(flags, ReduceOp::kSum);
  torch::Tensor expected_flags = torch::ones({size + 1}, torch::kBool);
  expected_flags[size] = false;
  EXPECT_TRUE(torch::equal(flags.cpu(), expected_flags)) << flags;
}

TEST_F(CudaNccl, AllReduceUpdatesANonContiguousViewInPlace) {
  const int rank = World().rank(), size = World().size();
  torch::Tensor grad = torch::zeros({6, 4}, device());
  torch::Tensor view = grad.t();
  view.copy_(RankValues(rank, 24, torch::kFloat).reshape({4, 6}).to(device()));
  void* storage = view.data_ptr();
  World().AllReduce(view, ReduceOp::kAvg);
  EXPECT_EQ(view.data_ptr(), storage);
  const torch::Tensor expected =
      (torch::arange(24, torch::kFloat) + 1).reshape({4, 6}) * ((size + 1) / 2.0);
  EXPECT_TRUE(torch::allclose(grad.t().cpu(), expected)) << grad;
}

TEST_F(CudaNccl, UnevenAllToAllEveryDtype) {
  for (torch::ScalarType dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kHalf,
                                  torch::kInt32, torch::kInt64, torch::kUInt8, torch::kBool}) {
    SCOPED_TRACE(c10::toString(dtype));
    CheckUnevenAllToAll(World(), {3}, dtype, false, device());
  }
  CheckUnevenAllToAll(World(), {}, torch::kInt64, false, device());
  CheckUnevenAllToAll(World(), {2, 5}, torch::kFloat, false, device());
}

TEST_F(CudaNccl, AllToAllWithNothingToSend) {
  const int size = World().size();
  const std::vector<int64_t> zeros(size, 0);
  torch::Tensor out = World().AllToAll(torch::empty({0, 3}, device()), zeros, zeros);
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{0, 3}));
  EXPECT_TRUE(out.is_cuda());
}

TEST_F(CudaNccl, AllToAllCountsInBlocksOfSeveralNumbers) {
  for (int k : {1, 3}) CheckAllToAllCounts(World(), k);
}

TEST_F(CudaNccl, AllGatherEvenAndUneven) {
  for (torch::ScalarType dtype : {torch::kFloat, torch::kInt64, torch::kBFloat16, torch::kBool}) {
    SCOPED_TRACE(c10::toString(dtype));
    const auto three_rows = [](int) { return int64_t{3}; };
    CheckAllGather(World(), dtype, three_rows, false, device());  // one ncclAllGather
    CheckAllGather(World(), dtype, GatherRows, false, device());  // grouped send/recv
  }
  torch::Tensor none = World().AllGather(torch::empty({0, 4}, device()));
  EXPECT_EQ(none.sizes(), (std::vector<int64_t>{0, 4}));
}

TEST_F(CudaNccl, BroadcastFromEveryRoot) {
  const int rank = World().rank(), size = World().size();
  for (int root = 0; root < size; ++root) {
    for (torch::ScalarType dtype : {torch::kFloat, torch::kInt64, torch::kBFloat16, torch::kBool}) {
      torch::Tensor t = Block(rank, 0, 5, {3}, dtype).to(device());
      World().Broadcast(t, root);
      EXPECT_TRUE(torch::equal(t.cpu(), Block(root, 0, 5, {3}, dtype))) << "root " << root;
    }
  }
  torch::Tensor storage = Block(rank, 1, 4, {6}, torch::kFloat).to(device());
  torch::Tensor view = storage.t();
  World().Broadcast(view, size - 1);
  EXPECT_TRUE(torch::equal(storage.cpu(), Block(size - 1, 1, 4, {6}, torch::kFloat)));
}

TEST_F(CudaNccl, BarrierAndSynchronize) {
  for (int i = 0; i < 3; ++i) World().Barrier();
  torch::Tensor t = torch::ones({1 << 20}, device());
  World().AllReduce(t, ReduceOp::kSum);
  World().Synchronize();
  EXPECT_EQ(t[0].item<float>(), static_cast<float>(World().size()));
}

TEST_F(CudaNccl, SplitIntoGroupsThatShareTheStream) {
  const int rank = World().rank(), size = World().size();
  std::unique_ptr<Communicator> group = World().Split(rank % 2, rank);
  ASSERT_NE(group, nullptr);
  std::vector<int64_t> members;
  for (int r = rank % 2; r < size; r += 2) members.push_back(r);
  EXPECT_EQ(group->size(), static_cast<int>(members.size()));
  EXPECT_EQ(group->rank(), rank / 2);
  // World and group collectives interleaved with no host wait in between.
  torch::Tensor in_group = torch::full({3}, static_cast<int64_t>(rank), torch::kLong).to(device());
  torch::Tensor in_world = torch::ones({3}, torch::kLong).to(device());
  group->AllReduce(in_group, ReduceOp::kSum);
  World().AllReduce(in_world, ReduceOp::kSum);
  group->AllReduce(in_group, ReduceOp::kSum);
  const int64_t group_sum = std::accumulate(members.begin(), members.end(), int64_t{0});
  EXPECT_TRUE(torch::equal(in_group.cpu(), torch::full({3}, group_sum * group->size(), torch::kLong)));
  EXPECT_TRUE(torch::equal(in_world.cpu(), torch::full({3}, int64_t{size}, torch::kLong)));
  const torch::Tensor gathered =
      group->AllGather(torch::full({1}, static_cast<int64_t>(rank), torch::kLong).to(device())).cpu();
  EXPECT_TRUE(torch::equal(gathered, torch::tensor(members)));
  CheckUnevenAllToAll(*group, {3}, torch::kFloat, false, device());
  group->Barrier();
  // A split of a split, and a rank that joins no group.
  std::unique_ptr<Communicator> single = group->Split(group->rank(), 0);
  ASSERT_NE(single, nullptr);
  EXPECT_EQ(single->size(), 1);
  CheckUnevenAllToAll(*single, {2}, torch::kInt32, false, device());
  std::unique_ptr<Communicator> without_0 = World().Split(rank == 0 ? -1 : 7, rank);
  EXPECT_EQ(without_0 == nullptr, rank == 0);
  if (without_0) EXPECT_EQ(without_0->size(), size - 1);
}

TEST_F(CudaNccl, ArgumentErrorsThrowAndLeaveTheCommunicatorUsable) {
  const int size = World().size();
  torch::Tensor cpu = torch::ones({4});
  try {
    World().AllReduce(cpu, ReduceOp::kSum);
    ADD_FAILURE() << "no exception";
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    EXPECT_NE(what.find("NcclCommunicator::AllReduce: the tensor is on cpu"), std::string::npos)
        << what;
  }
  torch::Tensor ints = torch::ones({3}, torch::TensorOptions(torch::kInt64).device(device()));
  EXPECT_THROW(World().AllReduce(ints, ReduceOp::kAvg), c10::Error);
  torch::Tensor t = torch::ones({2}, device());
  EXPECT_THROW(World().Broadcast(t, size), c10::Error);
  EXPECT_THROW(World().Broadcast(t, -1), c10::Error);
  EXPECT_THROW(World().AllToAllCounts({}), c10::Error);
  const std::vector<int64_t> splits(size, 1);
  EXPECT_THROW(World().AllToAll(torch::ones({size + 1, 2}, device()), splits, splits), c10::Error);
  // Disagreeing shapes in AllGather throw on every rank (its sizes are exchanged first).
  if (size > 1) {
    const int rank = World().rank();
    EXPECT_THROW(World().AllGather(torch::ones({2, rank == size - 1 ? 4 : 3}, device())),
                 c10::Error);
  }
  EXPECT_FALSE(World().aborted());
  CheckUnevenAllToAll(World(), {3}, torch::kFloat, false, device());
}

// An operation queued behind minutes of compute is not late: the watchdog counts from when it
// starts on the GPU. With a 1 s timeout and 3 s of compute ahead of the all-reduce, a watchdog
// counting from the enqueue would end this process.
TEST_F(CudaNccl, WatchdogCountsFromTheStartOnTheGpu) {
  std::unique_ptr<Communicator> everyone = World().Split(0, World().rank());
  auto* nccl = dynamic_cast<NcclCommunicator*>(everyone.get());
  ASSERT_NE(nccl, nullptr);
  nccl->set_timeout_seconds(1);
  int clock_khz = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, nccl->device()), cudaSuccess);
  at::cuda::sleep(int64_t{clock_khz} * 1000 * 3);  // about 3 s on torch's current stream
  torch::Tensor t = torch::ones({8}, device());
  nccl->AllReduce(t, ReduceOp::kSum);
  EXPECT_EQ(t.sum().item<float>(), 8.0f * World().size());
}

TEST_F(CudaNccl, AfterAnAbortCallsThrowAndDestructionDoesNotWait) {
  std::unique_ptr<Communicator> everyone = World().Split(0, World().rank());
  auto* nccl = dynamic_cast<NcclCommunicator*>(everyone.get());
  ASSERT_NE(nccl, nullptr);
  torch::Tensor t = torch::ones({8}, device());
  nccl->AllReduce(t, ReduceOp::kSum);
  nccl->Synchronize();
  nccl->Abort("the test aborts it");
  EXPECT_TRUE(nccl->aborted());
  try {
    nccl->AllReduce(t, ReduceOp::kSum);
    ADD_FAILURE() << "no exception";
  } catch (const NcclError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("AllReduce: the communicator was aborted after an earlier error"),
              std::string::npos) << what;
    EXPECT_NE(what.find("the test aborts it"), std::string::npos) << what;
  }
  nccl->Abort("again");  // nothing happens
  const auto start = std::chrono::steady_clock::now();
  everyone.reset();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
  World().Barrier();  // the world communicator is untouched
}

TEST_F(CudaNccl, AbortAllNcclCommunicatorsAbortsEveryLiveOneOnce) {
  std::unique_ptr<Communicator> first = World().Split(0, World().rank());
  std::unique_ptr<Communicator> second = World().Split(0, World().rank());
  dynamic_cast<NcclCommunicator&>(*first).Abort("first");
  const auto start = std::chrono::steady_clock::now();
  const int aborted = AbortAllNcclCommunicators("the test ends them all");
  EXPECT_EQ(aborted, 2);  // `second` and the world: `first` was aborted already
  EXPECT_TRUE(dynamic_cast<NcclCommunicator&>(*second).aborted());
  EXPECT_TRUE(World().aborted());
  try {
    World().Barrier();
    ADD_FAILURE() << "no exception";
  } catch (const NcclError& e) {
    EXPECT_NE(std::string(e.what()).find("the test ends them all"), std::string::npos) << e.what();
  }
  first.reset();
  second.reset();
  NcclWorld::Recreate();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 10.0);
  World().Barrier();  // a new world communicator
}

}  // namespace
}  // namespace rmoe::distributed
