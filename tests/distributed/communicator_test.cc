// MpiCommunicator on 1, 2 and 4 ranks (comm.np1 / comm.np2 / comm.np4). Every test runs on
// every rank; data is built from (source rank, destination rank, row, column) formulas so
// that each rank can check exactly what it received. Collectives come before assertions, so a
// failed check on one rank does not leave the others blocked.
#include <climits>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "distributed/mpi_communicator.h"
#include "distributed/node_layout.h"
#include "distributed/parallel_runtime.h"
#include "distributed/routing_communicator.h"
#include "distributed/stall_report.h"
#include "tests/distributed/collective_checks.h"

namespace rmoe::distributed {
namespace {

using namespace collective_checks;  // NOLINT(build/namespaces): shared by both suites

MpiCommunicator& World() { return MpiRuntime::Get().World(); }

// Lowers the message limit of `comm` for one scope (the same value on every rank).
class LimitGuard {
 public:
  LimitGuard(MpiCommunicator& comm, int64_t bytes) : comm_(comm), old_(comm.max_message_bytes()) {
    comm_.set_max_message_bytes_for_testing(bytes);
  }
  ~LimitGuard() { comm_.set_max_message_bytes_for_testing(old_); }

 private:
  MpiCommunicator& comm_;
  int64_t old_;
};

const std::vector<torch::ScalarType> kAllDtypes = {torch::kFloat, torch::kDouble, torch::kBFloat16,
                                                   torch::kHalf,  torch::kInt32,  torch::kInt64,
                                                   torch::kUInt8, torch::kBool};

// ---------------------------------------------------------------------------------------------

TEST(MpiRuntimeTest, WorldMatchesMpiCommWorld) {
  int rank = -1, size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_TRUE(MpiRuntime::Exists());
  EXPECT_EQ(World().rank(), rank);
  EXPECT_EQ(World().size(), size);
  // The tests run on one node: every rank is local.
  EXPECT_EQ(MpiRuntime::Get().LocalSize(), size);
  EXPECT_EQ(MpiRuntime::Get().LocalRank(), rank);
  // Under mpirun these came from OMPI_COMM_WORLD_LOCAL_*, in a singleton from
  // MPI_Comm_split_type; either way they agree with the latter.
  MPI_Comm node;
  ASSERT_EQ(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node),
            MPI_SUCCESS);
  int node_rank = -1, node_size = -1;
  MPI_Comm_rank(node, &node_rank);
  MPI_Comm_size(node, &node_size);
  MPI_Comm_free(&node);
  EXPECT_EQ(MpiRuntime::Get().LocalRank(), node_rank);
  EXPECT_EQ(MpiRuntime::Get().LocalSize(), node_size);
  EXPECT_EQ(World().max_message_bytes(), INT_MAX);
  int provided = 0;
  MPI_Query_thread(&provided);
  EXPECT_GE(provided, MPI_THREAD_FUNNELED);
}

TEST(AllToAllTest, UnevenSplitsEveryDtype) {
  for (torch::ScalarType dtype : kAllDtypes) {
    SCOPED_TRACE(c10::toString(dtype));
    CheckUnevenAllToAll(World(), {3}, dtype);
  }
}

TEST(AllToAllTest, OneAndThreeDimensionalRows) {
  CheckUnevenAllToAll(World(), {}, torch::kInt64);
  CheckUnevenAllToAll(World(), {2, 5}, torch::kFloat);
}

TEST(AllToAllTest, NonContiguousInput) {
  CheckUnevenAllToAll(World(), {4}, torch::kFloat, /*non_contiguous=*/true);
  CheckUnevenAllToAll(World(), {2, 3}, torch::kBFloat16, /*non_contiguous=*/true);
}

TEST(AllToAllTest, NothingToSend) {
  const int size = World().size();
  const std::vector<int64_t> zeros(size, 0);
  torch::Tensor out = World().AllToAll(torch::empty({0, 3}), zeros, zeros);
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{0, 3}));
  // Rows of zero bytes.
  std::vector<int64_t> ones(size, 1);
  out = World().AllToAll(torch::empty({size, 0}), ones, ones);
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{size, 0}));
}

// Large receive buffers are recycled, but only once the previous result is no longer held
// (e.g. by autograd for the backward pass), and a recycled buffer holds the new data.
TEST(AllToAllTest, ReceiveBuffersAreReusedOnlyWhenReleased) {
  auto& world = World();
  const int size = world.size();
  const int64_t rows = 1 << 16;  // x 8 floats = 2 MiB per destination: pooled
  const std::vector<int64_t> splits(size, rows);
  auto send_for = [&](float value) {
    return torch::full({rows * size, 8}, value + world.rank(), torch::kFloat);
  };
  auto expected_for = [&](float value) {
    std::vector<torch::Tensor> parts;
    for (int r = 0; r < size; ++r) parts.push_back(torch::full({rows, 8}, value + r, torch::kFloat));
    return torch::cat(parts);
  };
  const int64_t reused_before = world.reused_receive_buffers();
  torch::Tensor held = world.AllToAll(send_for(1), splits, splits);
  torch::Tensor second = world.AllToAll(send_for(10), splits, splits);  // `held` is alive
  EXPECT_EQ(world.reused_receive_buffers(), reused_before);
  EXPECT_FALSE(second.storage().is_alias_of(held.storage()));
  EXPECT_TRUE(torch::equal(held, expected_for(1)));
  const void* released_data = second.data_ptr();
  second = torch::Tensor();
  torch::Tensor third = world.AllToAll(send_for(20), splits, splits);
  EXPECT_EQ(world.reused_receive_buffers(), reused_before + 1);
  EXPECT_EQ(third.data_ptr(), released_data);
  EXPECT_TRUE(torch::equal(third, expected_for(20)));
  EXPECT_TRUE(torch::equal(held, expected_for(1)));  // untouched
}

// Every limit from "each byte its own message" to "everything in one MPI_Alltoallv": the
// result is the same, and the fallback is taken exactly when some rank's total send or receive
// bytes exceed the limit (the logic a message over 2 GiB goes through).
TEST(AllToAllTest, ChunkedFallbackAtEveryLimit) {
  const int size = World().size();
  const int64_t row_bytes = 3 * sizeof(float);
  int64_t largest_total = 0;
  for (int r = 0; r < size; ++r) {
    int64_t send = 0, recv = 0;
    for (int d = 0; d < size; ++d) {
      send += Rows(r, d, size) * row_bytes;
      recv += Rows(d, r, size) * row_bytes;
    }
    largest_total = std::max({largest_total, send, recv});
  }
  for (int64_t limit : {int64_t{1}, int64_t{3}, int64_t{7}, row_bytes, row_bytes * 5,
                        largest_total - 1, largest_total, int64_t{INT_MAX}}) {
    if (limit < 1) continue;
    SCOPED_TRACE("limit " + std::to_string(limit));
    LimitGuard guard(World(), limit);
    const int64_t before = World().chunked_operations();
    CheckUnevenAllToAll(World(), {3}, torch::kFloat);
    EXPECT_EQ(World().chunked_operations() - before, largest_total > limit ? 1 : 0);
  }
  LimitGuard guard(World(), 5);
  CheckUnevenAllToAll(World(), {2, 3}, torch::kBFloat16, /*non_contiguous=*/true);
}

TEST(AllToAllTest, BadSplitsOnOneRankThrowOnEveryRank) {
  const int rank = World().rank(), size = World().size();
  if (size < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<int64_t> splits(size, 1);
  torch::Tensor send = torch::ones({size, 2});
  if (rank == 1) send = torch::ones({size + 1, 2});  // splits no longer sum to the rows
  try {
    World().AllToAll(send, splits, splits);
    ADD_FAILURE() << "no exception";
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    if (rank == 1) {
      EXPECT_NE(what.find("AllToAll: send_splits sum to " + std::to_string(size)), std::string::npos) << what;
    } else {
      EXPECT_NE(what.find("AllToAll: rank 1 of this communicator passed invalid arguments"),
                std::string::npos) << what;
    }
  }
  // The communicator is still usable.
  CheckUnevenAllToAll(World(), {3}, torch::kFloat);
}

TEST(AllToAllTest, DisagreeingDtypesThrowOnEveryRank) {
  const int rank = World().rank(), size = World().size();
  if (size < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<int64_t> splits(size, 1);
  torch::Tensor send = torch::ones({size, 2}, rank == 0 ? torch::kFloat : torch::kDouble);
  try {
    World().AllToAll(send, splits, splits);
    ADD_FAILURE() << "no exception";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("disagree across ranks"), std::string::npos)
        << e.what_without_backtrace();
  }
  // Trailing shapes of the same byte size but different dims.
  send = torch::ones({size, rank == 0 ? 2 : 1, rank == 0 ? 3 : 6});
  EXPECT_THROW(World().AllToAll(send, splits, splits), c10::Error);
}

TEST(AllToAllCountsTest, BlocksOfSeveralNumbers) {
  for (int k : {1, 3}) CheckAllToAllCounts(World(), k);
  if (World().size() > 1) {
    EXPECT_THROW(World().AllToAllCounts(std::vector<int64_t>(World().size() + 1, 0)), c10::Error);
  }
}

TEST(AllGatherTest, DifferentRowCounts) {
  for (torch::ScalarType dtype : {torch::kFloat, torch::kInt64, torch::kBFloat16, torch::kBool}) {
    SCOPED_TRACE(c10::toString(dtype));
    CheckAllGather(World(), dtype, GatherRows, false);
    CheckAllGather(World(), dtype, GatherRows, true);
  }
  // Nobody has rows.
  torch::Tensor none = World().AllGather(torch::empty({0, 4}));
  EXPECT_EQ(none.sizes(), (std::vector<int64_t>{0, 4}));
}

TEST(AllGatherTest, ChunkedFallbackAtEveryLimit) {
  const int size = World().size();
  int64_t total = 0;
  for (int r = 0; r < size; ++r) total += GatherRows(r) * 6 * int64_t{sizeof(float)};
  for (int64_t limit : {int64_t{1}, int64_t{5}, int64_t{24}, total - 1, total, int64_t{INT_MAX}}) {
    SCOPED_TRACE("limit " + std::to_string(limit));
    LimitGuard guard(World(), limit);
    const int64_t before = World().chunked_operations();
    CheckAllGather(World(), torch::kFloat, GatherRows, limit == 5);
    EXPECT_EQ(World().chunked_operations() - before, total > limit ? 1 : 0);
  }
}

TEST(AllGatherTest, DisagreeingShapesThrowOnEveryRank) {
  const int rank = World().rank(), size = World().size();
  if (size < 2) GTEST_SKIP() << "needs 2 ranks";
  torch::Tensor mine = torch::ones({2, rank == size - 1 ? 4 : 3});
  try {
    World().AllGather(mine);
    ADD_FAILURE() << "no exception";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("AllGather: the tensors disagree"),
              std::string::npos) << e.what_without_backtrace();
  }
}

TEST(AllReduceTest, SumAndAverage) {
  const int rank = World().rank(), size = World().size();
  const int64_t n = 37;
  const torch::Tensor sum_factor = (torch::arange(n, torch::kLong) + 1) * (size * (size + 1) / 2);
  for (torch::ScalarType dtype : {torch::kFloat, torch::kDouble, torch::kInt64, torch::kInt32,
                                  torch::kBFloat16, torch::kHalf, torch::kUInt8, torch::kInt8,
                                  torch::kInt16}) {
    SCOPED_TRACE(c10::toString(dtype));
    torch::Tensor t = RankValues(rank, n, dtype);
    World().AllReduce(t, ReduceOp::kSum);
    EXPECT_EQ(t.scalar_type(), dtype);
    EXPECT_TRUE(torch::equal(t, sum_factor.to(dtype))) << t;
    if (at::isFloatingType(dtype)) {
      torch::Tensor a = RankValues(rank, n, dtype);
      World().AllReduce(a, ReduceOp::kAvg);
      const torch::Tensor expected = (sum_factor.to(torch::kDouble) / size).to(dtype);
      EXPECT_TRUE(torch::allclose(a.to(torch::kDouble), expected.to(torch::kDouble), 1e-2, 0))
          << a;
    }
  }
  // Bool sums are a logical or: rank r sets index r.
  torch::Tensor flags = torch::zeros({size + 1}, torch::kBool);
  flags[rank] = true;
  World().AllReduce(flags, ReduceOp::kSum);
  torch::Tensor expected_flags = torch::ones({size + 1}, torch::kBool);
  expected_flags[size] = false;
  EXPECT_TRUE(torch::equal(flags, expected_flags)) << flags;
}

// Overflowing sums of small integers wrap as in torch. (OpenMPI 4.1.4's vectorised MPI_SUM
// saturates 8- and 16-bit integers in the elements it vectorises: 200 + 200 gave 255 for the
// first 32 bytes and 144 for the rest; the communicator reduces them in int32.)
TEST(AllReduceTest, SmallIntegersWrapLikeTorch) {
  const int size = World().size();
  for (auto [dtype, value] : std::vector<std::pair<torch::ScalarType, int64_t>>{
           {torch::kUInt8, 200}, {torch::kInt8, 100}, {torch::kInt16, 30000}, {torch::kInt32, 2000000000}}) {
    SCOPED_TRACE(c10::toString(dtype));
    torch::Tensor t = torch::full({100}, value, torch::kLong).to(dtype);
    World().AllReduce(t, ReduceOp::kSum);
    torch::Tensor expected = torch::full({100}, value, torch::kLong).to(dtype);
    for (int r = 1; r < size; ++r) expected.add_(torch::full({100}, value, torch::kLong).to(dtype));
    EXPECT_TRUE(torch::equal(t, expected)) << t.slice(0, 0, 40);
  }
}

TEST(AllReduceTest, IntegerAverageIsRejected) {
  torch::Tensor t = torch::ones({3}, torch::kInt64);
  try {
    World().AllReduce(t, ReduceOp::kAvg);
    ADD_FAILURE() << "no exception";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("kAvg needs a floating-point tensor"),
              std::string::npos);
  }
}

TEST(AllReduceTest, NonContiguousViewIsUpdatedInPlace) {
  const int rank = World().rank(), size = World().size();
  torch::Tensor grad = torch::zeros({6, 4});
  torch::Tensor view = grad.t();  // [4, 6], not contiguous
  ASSERT_FALSE(view.is_contiguous());
  view.copy_(RankValues(rank, 24, torch::kFloat).reshape({4, 6}));
  void* storage = view.data_ptr();
  World().AllReduce(view, ReduceOp::kAvg);
  EXPECT_EQ(view.data_ptr(), storage);
  const torch::Tensor expected =
      (torch::arange(24, torch::kFloat) + 1).reshape({4, 6}) * ((size + 1) / 2.0);
  EXPECT_TRUE(torch::allclose(grad.t(), expected)) << grad;
}

TEST(AllReduceTest, Chunked) {
  const int rank = World().rank(), size = World().size();
  LimitGuard guard(World(), 5);  // one float per MPI_Allreduce
  const int64_t before = World().chunked_operations();
  torch::Tensor t = RankValues(rank, 11, torch::kFloat);
  World().AllReduce(t, ReduceOp::kSum);
  torch::Tensor b = RankValues(rank, 11, torch::kBFloat16);  // reduced as float
  World().AllReduce(b, ReduceOp::kSum);
  EXPECT_EQ(World().chunked_operations() - before, 2);
  const torch::Tensor expected = (torch::arange(11, torch::kFloat) + 1) * (size * (size + 1) / 2);
  EXPECT_TRUE(torch::equal(t, expected));
  EXPECT_TRUE(torch::equal(b, expected.to(torch::kBFloat16)));
}

TEST(BroadcastTest, FromTheLastRank) {
  const int rank = World().rank(), size = World().size();
  const int root = size - 1;
  for (torch::ScalarType dtype : {torch::kFloat, torch::kInt64, torch::kBFloat16, torch::kBool}) {
    SCOPED_TRACE(c10::toString(dtype));
    torch::Tensor t = Block(rank, 0, 5, {3}, dtype);
    World().Broadcast(t, root);
    EXPECT_TRUE(torch::equal(t, Block(root, 0, 5, {3}, dtype)));
  }
  // Non-contiguous, in chunks of 3 bytes.
  LimitGuard guard(World(), 3);
  torch::Tensor storage = Block(rank, 1, 4, {6}, torch::kFloat);
  torch::Tensor view = storage.t();
  const int64_t before = World().chunked_operations();
  World().Broadcast(view, root);
  EXPECT_EQ(World().chunked_operations() - before, 1);
  EXPECT_TRUE(torch::equal(storage, Block(root, 1, 4, {6}, torch::kFloat)));
}

TEST(BroadcastTest, RejectsBadRoot) {
  torch::Tensor t = torch::ones({2});
  EXPECT_THROW(World().Broadcast(t, World().size()), c10::Error);
  EXPECT_THROW(World().Broadcast(t, -1), c10::Error);
}

TEST(BarrierTest, Repeated) {
  for (int i = 0; i < 5; ++i) World().Barrier();
}

TEST(SplitTest, EvenAndOddRanks) {
  const int rank = World().rank(), size = World().size();
  std::unique_ptr<Communicator> group = World().Split(rank % 2, rank);
  ASSERT_NE(group, nullptr);
  std::vector<int> members;
  for (int r = rank % 2; r < size; r += 2) members.push_back(r);
  EXPECT_EQ(group->size(), static_cast<int>(members.size()));
  EXPECT_EQ(group->rank(), rank / 2);
  // Each group sums its own world ranks.
  torch::Tensor t = torch::full({3}, static_cast<int64_t>(rank), torch::kLong);
  group->AllReduce(t, ReduceOp::kSum);
  const int64_t expected_sum = std::accumulate(members.begin(), members.end(), int64_t{0});
  EXPECT_TRUE(torch::equal(t, torch::full({3}, expected_sum, torch::kLong)));
  // World ranks gathered in group order.
  torch::Tensor gathered = group->AllGather(torch::full({1}, static_cast<int64_t>(rank), torch::kLong));
  EXPECT_TRUE(torch::equal(gathered, torch::tensor(std::vector<int64_t>(members.begin(), members.end()))));
  CheckUnevenAllToAll(*group, {3}, torch::kFloat);
  CheckAllGather(*group, torch::kInt64, GatherRows);
  torch::Tensor b = torch::full({2}, static_cast<int64_t>(rank), torch::kLong);
  group->Broadcast(b, group->size() - 1);
  EXPECT_TRUE(torch::equal(b, torch::full({2}, static_cast<int64_t>(members.back()), torch::kLong)));
  group->Barrier();
}

TEST(SplitTest, ConsecutiveBlocksInReverseOrder) {
  const int rank = World().rank(), size = World().size();
  const int block = std::max(1, size / 2);
  // key = -rank: the highest world rank of a block becomes its rank 0.
  std::unique_ptr<Communicator> group = World().Split(rank / block, -rank);
  ASSERT_NE(group, nullptr);
  std::vector<int64_t> members;
  for (int r = std::min(size, (rank / block + 1) * block) - 1; r >= (rank / block) * block; --r) {
    members.push_back(r);
  }
  EXPECT_EQ(group->size(), static_cast<int>(members.size()));
  const torch::Tensor gathered =
      group->AllGather(torch::full({1}, static_cast<int64_t>(rank), torch::kLong));
  EXPECT_TRUE(torch::equal(gathered, torch::tensor(members))) << gathered;
  EXPECT_EQ(members[group->rank()], rank);
  CheckUnevenAllToAll(*group, {2}, torch::kInt32);
  torch::Tensor x = torch::ones({4}, torch::kDouble);
  group->AllReduce(x, ReduceOp::kAvg);
  EXPECT_TRUE(torch::equal(x, torch::ones({4}, torch::kDouble)));
  // Splitting a split.
  std::unique_ptr<Communicator> single = group->Split(group->rank(), 0);
  ASSERT_NE(single, nullptr);
  EXPECT_EQ(single->size(), 1);
  CheckUnevenAllToAll(*single, {3}, torch::kFloat);
}

TEST(SplitTest, NegativeColorJoinsNoGroupAndLimitIsInherited) {
  const int rank = World().rank(), size = World().size();
  LimitGuard guard(World(), 4);
  std::unique_ptr<Communicator> group = World().Split(rank == 0 ? -1 : 7, rank);
  if (rank == 0) {
    EXPECT_EQ(group, nullptr);
    return;
  }
  ASSERT_NE(group, nullptr);
  EXPECT_EQ(group->size(), size - 1);
  EXPECT_EQ(group->rank(), rank - 1);
  auto* mpi_group = dynamic_cast<MpiCommunicator*>(group.get());
  ASSERT_NE(mpi_group, nullptr);
  EXPECT_EQ(mpi_group->max_message_bytes(), 4);
  CheckUnevenAllToAll(*group, {3}, torch::kFloat);
}

TEST(ErrorsTest, NonCpuTensorsAreRejected) {
  // A "meta" tensor (shape and dtype, no data) stands in for any non-CPU device.
  const int rank = World().rank(), size = World().size();
  torch::Tensor meta = torch::empty({4, 3}, torch::TensorOptions().device(torch::kMeta));
  for (const char* op : {"AllReduce", "Broadcast"}) {
    try {
      if (std::string(op) == "AllReduce") World().AllReduce(meta, ReduceOp::kSum);
      else World().Broadcast(meta, 0);
      ADD_FAILURE() << op << ": no exception";
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      EXPECT_NE(what.find(std::string("MpiCommunicator::") + op + ": the tensor is on meta"),
                std::string::npos) << what;
      EXPECT_NE(what.find("CPU tensors only"), std::string::npos) << what;
    }
  }
  // Only rank 0 passes the bad tensor: every rank throws, none is left waiting. Every rank
  // sends 4 rows to rank 0.
  std::vector<int64_t> send_splits(size, 0), recv_splits(size, 0);
  send_splits[0] = 4;
  if (rank == 0) recv_splits.assign(size, 4);
  const torch::Tensor send = rank == 0 ? meta : torch::ones({4, 3});
  EXPECT_THROW(World().AllToAll(send, send_splits, recv_splits), c10::Error);
  EXPECT_THROW(World().AllGather(send), c10::Error);
  World().Barrier();
}

TEST(ErrorsTest, CudaTensorsAreRejected) {
  if (!torch::cuda::is_available()) {
    GTEST_SKIP() << "torch has no usable CUDA device here, so no CUDA tensor can be made "
                    "(the device check itself is covered by NonCpuTensorsAreRejected)";
  }
  torch::Tensor t = torch::ones({4}, torch::kCUDA);
  try {
    World().AllReduce(t, ReduceOp::kSum);
    ADD_FAILURE() << "no exception";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("the tensor is on cuda"), std::string::npos);
  }
}

// A real MPI failure comes back as an MpiError naming rank, operation and MPI call. Ranks 0
// and 1 broadcast with disagreeing sizes (a caller bug): rank 1 receives 16 bytes into 8.
TEST(ErrorsTest, MpiFailureNamesRankAndOperation) {
  const int rank = World().rank();
  if (World().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  std::unique_ptr<Communicator> pair = World().Split(rank < 2 ? 0 : -1, rank);
  if (rank >= 2) return;
  torch::Tensor t = torch::ones({rank == 0 ? 4 : 2});
  std::string what;
  try {
    pair->Broadcast(t, 0);
  } catch (const MpiError& e) {
    what = e.what();
    EXPECT_EQ(e.rank(), rank);
    EXPECT_NE(e.error_code(), MPI_SUCCESS);
  }
  if (rank == 1) {
    EXPECT_NE(what.find("rank 1: Broadcast: MPI_Ibcast failed: MPI_ERR_TRUNCATE"), std::string::npos)
        << "got: " << what;
  }
  pair->Barrier();
}

TEST(CollectiveTimeoutTest, DefaultCountsAndInheritance) {
  EXPECT_EQ(World().collective_timeout_seconds(),
            MpiCommunicator::kDefaultCollectiveTimeoutSeconds);
  EXPECT_THROW(World().set_collective_timeout_seconds(-1), c10::Error);
  EXPECT_THROW(World().set_collective_timeout_seconds(std::nan("")), c10::Error);
  const int64_t before = World().collectives_started();
  World().Barrier();
  torch::Tensor t = torch::ones({3});
  World().AllReduce(t, ReduceOp::kSum);
  EXPECT_EQ(World().collectives_started(), before + 2);

  World().set_collective_timeout_seconds(12.5);
  std::unique_ptr<Communicator> group = World().Split(0, World().rank());
  World().set_collective_timeout_seconds(MpiCommunicator::kDefaultCollectiveTimeoutSeconds);
  auto* mpi_group = dynamic_cast<MpiCommunicator*>(group.get());
  ASSERT_NE(mpi_group, nullptr);
  EXPECT_EQ(mpi_group->collective_timeout_seconds(), 12.5);
  EXPECT_EQ(mpi_group->collectives_started(), 0);
  mpi_group->Barrier();
}

// The report, from made-up answers (no MPI involved).
StalledCollective AllReduce57() {
  StalledCollective stalled;
  stalled.rank = 0;
  stalled.world_rank = 0;
  stalled.operation = "AllReduce";
  stalled.sequence = 57;
  stalled.mpi_call = "MPI_Iallreduce";
  stalled.timeout_seconds = 3;
  return stalled;
}

PeerAnswer Silent(int rank, int world_rank) {
  PeerAnswer peer;
  peer.rank = rank;
  peer.world_rank = world_rank;
  return peer;
}

PeerAnswer Waiting(int rank, const std::string& operation, int64_t sequence,
                   bool same_communicator = true) {
  PeerAnswer peer;
  peer.rank = rank;
  peer.world_rank = rank;
  peer.answered = true;
  peer.same_communicator = same_communicator;
  peer.operation = operation;
  peer.sequence = sequence;
  return peer;
}

TEST(StallReportTest, NamesSilentRanksAndThoseWaitingAlongside) {
  EXPECT_EQ(DescribeStalledCollective(
                AllReduce57(), {Waiting(3, "AllReduce", 57), Silent(1, 1), Waiting(2, "AllReduce", 57)}),
            "rmoe: rank 0: collective AllReduce #57 (MPI_Iallreduce) did not complete within 3 s: "
            "rank 1 (world rank 1) did not answer (stopped, hung, or computing outside any "
            "collective); ranks 2, 3 are waiting in the same collective. Aborting the job "
            "(runtime.collective_timeout_seconds sets this deadline).");
}

// Across nodes the report says where the silent ranks run, grouped by host.
TEST(StallReportTest, NamesTheHostsOfSilentRanks) {
  StalledCollective stalled = AllReduce57();
  stalled.host = "node1";
  PeerAnswer a = Silent(1, 1), b = Silent(2, 2), c = Silent(3, 3);
  a.host = "node2";
  b.host = "node3";
  c.host = "node2";
  EXPECT_EQ(DescribeStalledCollective(stalled, {c, a, b}),
            "rmoe: rank 0 on node1: collective AllReduce #57 (MPI_Iallreduce) did not complete "
            "within 3 s: ranks 1, 2, 3 (world ranks 1, 3 on node2, world rank 2 on node3) did not "
            "answer (stopped, hung, or computing outside any collective). Aborting the job "
            "(runtime.collective_timeout_seconds sets this deadline).");
}

TEST(StallReportTest, NamesOtherCollectivesWithTheirNumbers) {
  StalledCollective stalled = AllReduce57();
  stalled.rank = 1;
  stalled.world_rank = 5;
  stalled.timeout_seconds = 2.5;
  const std::string report = DescribeStalledCollective(
      stalled, {Silent(0, 4), Silent(3, 7), Waiting(2, "Barrier", 56), Waiting(4, "AllReduce", 58),
                Waiting(5, "AllToAll", 12, /*same_communicator=*/false),
                Waiting(6, "AllReduce", 57)});
  EXPECT_EQ(report,
            "rmoe: rank 1 (world rank 5): collective AllReduce #57 (MPI_Iallreduce) did not "
            "complete within 2.5 s: ranks 0, 3 (world ranks 4, 7) did not answer (stopped, hung, "
            "or computing outside any collective); rank 5 is waiting in AllToAll #12 of another "
            "communicator; rank 4 is waiting in AllReduce #58; rank 2 is waiting in Barrier #56; "
            "rank 6 is waiting in the same collective. Aborting the job "
            "(runtime.collective_timeout_seconds sets this deadline).");
}

TEST(StallReportTest, EveryoneWaitingMeansMpiItselfIsStuck) {
  const std::string report = DescribeStalledCollective(AllReduce57(), {Waiting(1, "AllReduce", 57)});
  EXPECT_NE(report.find("rank 1 is waiting in the same collective; every rank is in it, yet MPI "
                        "did not complete it. Aborting"),
            std::string::npos)
      << report;
}

// Stands in for a device's communicator (NCCL): records which calls reach it.
class RecordingCommunicator : public Communicator {
 public:
  RecordingCommunicator(int rank, int size, std::shared_ptr<std::vector<std::string>> calls)
      : rank_(rank), size_(size), calls_(std::move(calls)) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void AllReduce(torch::Tensor&, ReduceOp) override { calls_->push_back("AllReduce"); }
  torch::Tensor AllToAll(const torch::Tensor& send, const std::vector<int64_t>&,
                         const std::vector<int64_t>&) override {
    calls_->push_back("AllToAll");
    return send;
  }
  std::vector<int64_t> AllToAllCounts(const std::vector<int64_t>& counts) override {
    calls_->push_back("AllToAllCounts");
    return counts;
  }
  torch::Tensor AllGather(const torch::Tensor& tensor) override {
    calls_->push_back("AllGather");
    return tensor;
  }
  void Broadcast(torch::Tensor&, int) override { calls_->push_back("Broadcast"); }
  void Barrier() override { calls_->push_back("Barrier"); }
  std::unique_ptr<Communicator> Split(int color, int key) override {
    calls_->push_back("Split");
    // The same group as MpiCommunicator::Split forms (collective on every rank, joining or
    // not), which the router checks it against.
    auto mpi = World().Split(color, key);
    if (!mpi) return nullptr;
    return std::make_unique<RecordingCommunicator>(mpi->rank(), mpi->size(), calls_);
  }

 private:
  int rank_, size_;
  std::shared_ptr<std::vector<std::string>> calls_;
};

std::shared_ptr<Communicator> BorrowedWorld() {
  return std::shared_ptr<Communicator>(&World(), [](Communicator*) {});
}

TEST(RoutingCommunicatorTest, HostTensorsTakeTheHostCommunicatorAndOthersTheDevices) {
  const int rank = World().rank(), size = World().size();
  auto calls = std::make_shared<std::vector<std::string>>();
  RoutingCommunicator routed(BorrowedWorld(),
                             std::make_shared<RecordingCommunicator>(rank, size, calls));
  // A "meta" tensor stands in for a GPU tensor.
  torch::Tensor on_device = torch::ones({4, 3}, torch::TensorOptions().device(torch::kMeta));
  routed.AllReduce(on_device, ReduceOp::kSum);
  routed.AllToAll(on_device, std::vector<int64_t>(size, 0), std::vector<int64_t>(size, 0));
  routed.AllGather(on_device);
  routed.Broadcast(on_device, 0);
  EXPECT_EQ(*calls, (std::vector<std::string>{"AllReduce", "AllToAll", "AllGather", "Broadcast"}));
  calls->clear();
  // Host tensors and counts go over MPI, and arrive as MPI delivers them.
  torch::Tensor on_host = torch::full({2}, static_cast<int64_t>(rank + 1), torch::kLong);
  routed.AllReduce(on_host, ReduceOp::kSum);
  EXPECT_TRUE(torch::equal(on_host, torch::full({2}, int64_t{size * (size + 1) / 2}, torch::kLong)));
  CheckUnevenAllToAll(routed, {3}, torch::kFloat);
  EXPECT_TRUE(calls->empty()) << "host work reached the device communicator: " << calls->front();
  routed.Barrier();
  EXPECT_EQ(*calls, std::vector<std::string>{"Barrier"});
}

TEST(RoutingCommunicatorTest, SplitGroupsRouteTheSameWay) {
  const int rank = World().rank(), size = World().size();
  auto calls = std::make_shared<std::vector<std::string>>();
  RoutingCommunicator routed(BorrowedWorld(),
                             std::make_shared<RecordingCommunicator>(rank, size, calls));
  std::unique_ptr<Communicator> group = routed.Split(rank % 2, rank);
  ASSERT_NE(group, nullptr);
  EXPECT_NE(dynamic_cast<RoutingCommunicator*>(group.get()), nullptr);
  EXPECT_EQ(group->size(), (size - rank % 2 + 1) / 2);
  EXPECT_EQ(group->rank(), rank / 2);
  calls->clear();
  CheckUnevenAllToAll(*group, {2}, torch::kInt32);
  torch::Tensor on_device = torch::ones({1}, torch::TensorOptions().device(torch::kMeta));
  group->AllReduce(on_device, ReduceOp::kAvg);
  EXPECT_EQ(*calls, std::vector<std::string>{"AllReduce"});
  // A rank that joins no group gets none from either side.
  std::unique_ptr<Communicator> none = routed.Split(rank == 0 ? -1 : 1, rank);
  EXPECT_EQ(none == nullptr, rank == 0);
}

TEST(RoutingCommunicatorTest, MpiOnBothSidesIsAWorkingWorld) {
  // As a GPU run is wired, with MPI standing in for NCCL: the expert-parallel groups of a
  // 2-way split exchange rows and sum, whichever side carries them.
  const int rank = World().rank(), size = World().size();
  RoutingCommunicator routed(BorrowedWorld(), std::shared_ptr<Communicator>(World().Split(0, rank)));
  std::unique_ptr<Communicator> ep = routed.Split(rank / 2, rank);
  ASSERT_NE(ep, nullptr);
  CheckUnevenAllToAll(*ep, {3}, torch::kBFloat16);
  torch::Tensor x = torch::full({3}, 1.0, torch::kDouble);
  routed.AllReduce(x, ReduceOp::kSum);
  EXPECT_TRUE(torch::equal(x, torch::full({3}, static_cast<double>(size), torch::kDouble)));
  routed.Barrier();
}

TEST(RoutingCommunicatorTest, MismatchedSidesAreRefused) {
  auto calls = std::make_shared<std::vector<std::string>>();
  const int size = World().size();
  EXPECT_THROW(RoutingCommunicator(BorrowedWorld(),
                                   std::make_shared<RecordingCommunicator>(0, size + 1, calls)),
               c10::Error);
}

// For the harness, not the communicator: rank 0 skips a barrier the other ranks wait in.
// comm.watchdog runs it (it is disabled otherwise) and expects mpi_test_main's watchdog to end
// the job, naming the test, instead of a hang.
TEST(HarnessTest, DISABLED_WatchdogEndsAHungJob) {
  if (World().rank() != 0) World().Barrier();
}


// --- Node layout: made-up clusters (no MPI), then the job's own ---

NodeLayout RoundRobin(int ranks, int nodes) {
  std::vector<int> keys;
  std::vector<std::string> hosts;
  for (int rank = 0; rank < ranks; ++rank) {
    keys.push_back(rank % nodes);
    hosts.push_back("node" + std::to_string(rank % nodes + 1));
  }
  return NodeLayout::FromNodeKeys(keys, hosts);
}

TEST(NodeLayoutTest, NumbersNodesByTheirLowestRank) {
  const NodeLayout layout = NodeLayout::FromNodeKeys({7, 7, 3, 3, 7}, {"b", "b", "a", "a", "b"});
  EXPECT_EQ(layout.node_of_rank, (std::vector<int>{0, 0, 1, 1, 0}));
  EXPECT_EQ(layout.node_names, (std::vector<std::string>{"b", "a"}));
  EXPECT_EQ(layout.HostOf(3), "a");
  EXPECT_EQ(layout.HostOf(9), "?");
  EXPECT_EQ(layout.RanksOn(0), (std::vector<int>{0, 1, 4}));
}

TEST(NodeLayoutTest, ExpertGroupsStayInsideNodesWhateverTheRankOrder) {
  // Ranks numbered round-robin over 2 nodes (mpirun --map-by node): groups of 2 pair the
  // ranks of one node, not consecutive ranks.
  const NodeLayout layout = RoundRobin(8, 2);
  EXPECT_EQ(PlacementOrder(layout), (std::vector<int>{0, 2, 4, 6, 1, 3, 5, 7}));
  EXPECT_EQ(ExpertParallelGroups(layout, 2),
            (std::vector<std::vector<int>>{{0, 2}, {4, 6}, {1, 3}, {5, 7}}));
  EXPECT_EQ(ExpertGroupsSpanNodesWarning(layout, 4), "");
  EXPECT_EQ(DescribeLayout(layout, 4),
            (std::vector<std::string>{
                "layout: 8 ranks on 2 nodes: node1 ranks 0, 2, 4, 6, node2 ranks 1, 3, 5, 7",
                "layout: 2 expert-parallel groups of 4: group 0 ranks 0, 2, 4, 6 on node1, "
                "group 1 ranks 1, 3, 5, 7 on node2"}));
}

TEST(NodeLayoutTest, WarnsWhenAnExpertGroupMustSpanNodes) {
  const NodeLayout layout = RoundRobin(4, 2);  // 2 ranks per node
  EXPECT_EQ(ExpertGroupsSpanNodesWarning(layout, 2), "");
  EXPECT_EQ(ExpertGroupsSpanNodesWarning(layout, 4),
            "expert-parallel group 0 (node1+node2) spans nodes, so every all-to-all crosses the "
            "network (on GPUs: the network instead of NVLink): parallel.expert_parallel_size = 4 "
            "with 2 ranks on the smallest node; a size that divides every node's ranks keeps "
            "each group inside a node");
  EXPECT_EQ(DescribeLayout(layout, 4)[1],
            "layout: 1 expert-parallel group of 4: group 0 ranks 0-3 on node1+node2");
  EXPECT_EQ(RankRanges({5, 0, 1, 2, 7, 8}), "0-2, 5, 7-8");
  EXPECT_EQ(RankList({4}), "rank 4");
  EXPECT_EQ(RankList({3, 1, 2}), "ranks 1-3");
}

TEST(NodeLayoutTest, TheJobsLayoutCoversEveryRankAndAgreesWithTheLocalRank) {
  MpiRuntime& mpi = MpiRuntime::Get();
  const NodeLayout& nodes = mpi.Nodes();
  ASSERT_EQ(nodes.ranks(), World().size());
  const int node = nodes.node_of_rank[World().rank()];
  const std::vector<int> mine = nodes.RanksOn(node);
  EXPECT_EQ(static_cast<int>(mine.size()), mpi.LocalSize());
  EXPECT_EQ(mine[mpi.LocalRank()], World().rank());
}

// ProcessGroups follow the layout: with ranks round-robin over 2 "nodes", each
// expert-parallel group holds the ranks of one node.
TEST(NodeLayoutTest, ProcessGroupsPlaceExpertGroupsByNode) {
  if (World().size() != 4) GTEST_SKIP() << "needs 4 ranks";
  std::shared_ptr<Communicator> world(&World(), [](Communicator*) {});
  auto groups = ProcessGroups::Create(world, 2, 8, RoundRobin(4, 2));
  ASSERT_TRUE(groups.ok()) << groups.status();
  // Every member of my group is on my node: rank parity is the node.
  auto mine = torch::full({1}, static_cast<double>(World().rank() % 2), torch::kFloat64);
  auto sum = mine.clone();
  groups->expert_parallel->AllReduce(sum, ReduceOp::kSum);
  EXPECT_EQ(sum.item<double>(), 2 * mine.item<double>());
  EXPECT_EQ(groups->expert_parallel->rank(), World().rank() / 2);
  auto wrong = ProcessGroups::Create(world, 2, 8, RoundRobin(3, 2));
  EXPECT_FALSE(wrong.ok());
}

}  // namespace
}  // namespace rmoe::distributed
