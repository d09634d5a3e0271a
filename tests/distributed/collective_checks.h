// Data and exact checks shared by the communicator tests: the MPI communicator on CPU
// tensors (communicator_test.cc) and the NCCL communicator on CUDA tensors
// (nccl_communicator_test.cc). Every rank builds what it sends and what it must receive from
// the same (source rank, destination rank, row, column) formulas, so results compare exactly
// for every dtype. The collective comes before any assertion, so a failed check on one rank
// does not leave the others waiting.
#pragma once

#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "distributed/communicator.h"

namespace rmoe::distributed::collective_checks {

inline int64_t Value(int64_t src, int64_t dst, int64_t row, int64_t col) {
  return src * 1000 + dst * 100 + row * 7 + col;
}

// Rows rank `src` sends to rank `dst`: uneven, and zero for dst = src + 1 (mod size).
inline int64_t Rows(int src, int dst, int size) {
  return dst == (src + 1) % size ? 0 : src + dst + 1;
}

// `rows` rows of Value(src, dst, row, col) with trailing shape `trailing`, as `dtype` (int64
// values cast: both sides cast the same way, so comparisons are exact for any dtype), on the
// CPU.
inline torch::Tensor Block(int src, int dst, int64_t rows, const std::vector<int64_t>& trailing,
                           torch::ScalarType dtype) {
  const int64_t cols = std::accumulate(trailing.begin(), trailing.end(), int64_t{1},
                                       std::multiplies<int64_t>());
  torch::Tensor t = torch::empty({rows, cols}, torch::kLong);
  auto a = t.accessor<int64_t, 2>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) a[r][c] = Value(src, dst, r, c);
  }
  std::vector<int64_t> shape{rows};
  shape.insert(shape.end(), trailing.begin(), trailing.end());
  if (dtype == torch::kBool) t = t.remainder(3) == 0;
  return t.reshape(shape).to(dtype);
}

// Rank r holds (r + 1) * (1 + i) at index i: the sum is size(size+1)/2 * (1 + i).
inline torch::Tensor RankValues(int rank, int64_t n, torch::ScalarType dtype) {
  return (torch::arange(n, torch::kLong) + 1).mul_(rank + 1).to(dtype);
}

// Rank r holds GatherRows(r) rows in the uneven all-gathers (rank 1 none).
inline int64_t GatherRows(int r) { return r == 1 ? 0 : r + 2; }

// The uneven exchange on `comm`, its tensors on `device`, checked exactly on the host.
inline void CheckUnevenAllToAll(Communicator& comm, const std::vector<int64_t>& trailing,
                                torch::ScalarType dtype, bool non_contiguous = false,
                                torch::Device device = torch::kCPU) {
  const int rank = comm.rank(), size = comm.size();
  std::vector<torch::Tensor> parts, expected_parts;
  std::vector<int64_t> send_splits, expected_recv;
  for (int d = 0; d < size; ++d) {
    send_splits.push_back(Rows(rank, d, size));
    parts.push_back(Block(rank, d, send_splits.back(), trailing, dtype));
    expected_recv.push_back(Rows(d, rank, size));
    expected_parts.push_back(Block(d, rank, expected_recv.back(), trailing, dtype));
  }
  torch::Tensor send = torch::cat(parts).to(device);
  if (non_contiguous) {
    // Same values, transposed storage.
    send = send.transpose(0, send.dim() - 1).contiguous().transpose(0, send.dim() - 1);
    if (send.size(0) > 1) {
      ASSERT_FALSE(send.is_contiguous());
    }
  }
  const std::vector<int64_t> recv_splits = comm.AllToAllCounts(send_splits);
  const torch::Tensor received = comm.AllToAll(send, send_splits, recv_splits).cpu();
  EXPECT_EQ(recv_splits, expected_recv);
  const torch::Tensor expected = torch::cat(expected_parts);
  EXPECT_EQ(received.sizes(), expected.sizes());
  EXPECT_EQ(received.scalar_type(), dtype);
  EXPECT_TRUE(torch::equal(received, expected)) << "rank " << rank << " dtype " << dtype;
}

// An all-gather of rows_of(rank) rows of [2, 3] per rank, on `device`, checked exactly.
inline void CheckAllGather(Communicator& comm, torch::ScalarType dtype,
                           const std::function<int64_t(int)>& rows_of, bool non_contiguous = false,
                           torch::Device device = torch::kCPU) {
  const int rank = comm.rank(), size = comm.size();
  const std::vector<int64_t> trailing{2, 3};
  torch::Tensor mine = Block(rank, 0, rows_of(rank), trailing, dtype).to(device);
  if (non_contiguous) mine = mine.transpose(1, 2).contiguous().transpose(1, 2);
  const torch::Tensor gathered = comm.AllGather(mine).cpu();
  std::vector<torch::Tensor> parts;
  for (int r = 0; r < size; ++r) parts.push_back(Block(r, 0, rows_of(r), trailing, dtype));
  const torch::Tensor expected = torch::cat(parts);
  EXPECT_EQ(gathered.sizes(), expected.sizes());
  EXPECT_TRUE(torch::equal(gathered, expected)) << "rank " << rank << " dtype " << dtype;
}

// AllToAllCounts with k numbers per peer (values past 32 bits), checked exactly.
inline void CheckAllToAllCounts(Communicator& comm, int k) {
  const int rank = comm.rank(), size = comm.size();
  std::vector<int64_t> counts;
  for (int d = 0; d < size; ++d) {
    for (int i = 0; i < k; ++i) counts.push_back(Value(rank, d, i, 0) + (int64_t{1} << 40));
  }
  const std::vector<int64_t> received = comm.AllToAllCounts(counts);
  std::vector<int64_t> expected;
  for (int s = 0; s < size; ++s) {
    for (int i = 0; i < k; ++i) expected.push_back(Value(s, rank, i, 0) + (int64_t{1} << 40));
  }
  EXPECT_EQ(received, expected) << "k = " << k;
}

}  // namespace rmoe::distributed::collective_checks
