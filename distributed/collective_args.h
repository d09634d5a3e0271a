// Helpers both communicators (MPI, NCCL) use to check a collective's arguments on this rank
// and to make ranks agree on them before any data moves.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace rmoe::distributed {

// A hash of the dims after the first, so that ranks can check they agree.
inline int64_t TrailingShapeHash(const torch::Tensor& t) {
  uint64_t h = 1469598103934665603ull;
  for (int64_t d = 1; d < t.dim(); ++d) h = (h ^ static_cast<uint64_t>(t.size(d))) * 1099511628211ull;
  h = (h ^ static_cast<uint64_t>(t.dim())) * 1099511628211ull;
  return static_cast<int64_t>(h & 0x7fffffffffffffffull);
}

// "Float rows of 512 bytes": how a rank's rows are described in a disagreement message.
inline std::string DescribeRows(int64_t dtype, int64_t row_bytes) {
  std::ostringstream out;
  out << c10::toString(static_cast<c10::ScalarType>(dtype)) << " rows of " << row_bytes << " bytes";
  return out.str();
}

// What is wrong with one rank's AllToAll splits, or "" when they are usable: one entry per
// rank in each, none negative, the rows a rank keeps for itself the same on both sides, and
// send_splits summing to the rows of `send`. `who` names the communicator ("MpiCommunicator").
inline std::string SplitsProblem(const char* who, int rank, int size, const torch::Tensor& send,
                                 const std::vector<int64_t>& send_splits,
                                 const std::vector<int64_t>& recv_splits) {
  std::ostringstream out;
  auto negative = [](const std::vector<int64_t>& v) {
    return std::any_of(v.begin(), v.end(), [](int64_t s) { return s < 0; });
  };
  if (static_cast<int>(send_splits.size()) != size || static_cast<int>(recv_splits.size()) != size) {
    out << who << "::AllToAll: send_splits and recv_splits need one entry per rank (" << size
        << "), got " << send_splits.size() << " and " << recv_splits.size();
  } else if (negative(send_splits) || negative(recv_splits)) {
    out << who << "::AllToAll: negative split";
  } else if (send_splits[rank] != recv_splits[rank]) {
    out << who << "::AllToAll: rank " << rank << " sends " << send_splits[rank]
        << " rows to itself but expects " << recv_splits[rank];
  } else if (const int64_t total = std::accumulate(send_splits.begin(), send_splits.end(), int64_t{0});
             total != send.size(0)) {
    out << who << "::AllToAll: send_splits sum to " << total << " but the tensor has "
        << send.size(0) << " rows";
  }
  return out.str();
}

// Product of sizes[from:]; the elements of one row for from = 1.
inline int64_t Product(c10::IntArrayRef sizes, size_t from) {
  int64_t p = 1;
  for (size_t i = from; i < sizes.size(); ++i) p *= sizes[i];
  return p;
}

// Bytes of one row (everything after dim 0) of `t`.
inline int64_t RowBytes(const torch::Tensor& t) {
  return Product(t.sizes(), 1) * static_cast<int64_t>(t.element_size());
}

// Empty if `tensor` can be communicated by `who` ("MpiCommunicator") in `op`; otherwise why
// not. `on_device(tensor)` says whether a defined tensor is where the communicator needs it;
// `device_rule` follows the tensor's device in the message and says where tensors must be.
// `needs_rows`: the operation works along dim 0, so a scalar is refused.
template <typename OnDevice>
std::string TensorArgumentProblem(const char* who, const char* op, const torch::Tensor& tensor,
                                  bool needs_rows, OnDevice&& on_device,
                                  const std::string& device_rule) {
  std::ostringstream out;
  if (!tensor.defined()) {
    out << who << "::" << op << ": the tensor is undefined";
  } else if (!on_device(tensor)) {
    out << who << "::" << op << ": the tensor is on " << tensor.device() << "; " << device_rule;
  } else if (needs_rows && tensor.dim() == 0) {
    out << who << "::" << op << ": needs a tensor with at least one dimension (rows "
        << "along dim 0), got a scalar";
  }
  return out.str();
}

// What each rank contributes to the argument agreement of AllToAll and AllGather: every rank
// gathers every rank's, so that a bad argument on one rank makes all of them throw rather
// than leaving the others waiting in the collective. Exchanged as kCollectiveMetaFields
// int64 values.
struct CollectiveMeta {
  int64_t error = 0;           // 1: this rank's arguments are invalid (it throws its reason)
  int64_t needs_fallback = 0;  // 1: a message of this rank exceeds the communicator's limit
  int64_t rows = 0;            // dim 0
  int64_t row_bytes = 0;
  int64_t dtype = 0;
  int64_t shape_hash = 0;
};
inline constexpr int kCollectiveMetaFields = sizeof(CollectiveMeta) / sizeof(int64_t);

// This rank's contribution: `problem` is its argument check's outcome ("" when usable).
inline CollectiveMeta LocalMeta(const std::string& problem, const torch::Tensor& tensor) {
  CollectiveMeta local;
  if (!problem.empty()) {
    local.error = 1;
    return local;
  }
  local.rows = tensor.size(0);
  local.row_bytes = RowBytes(tensor);
  local.dtype = static_cast<int64_t>(tensor.scalar_type());
  local.shape_hash = TrailingShapeHash(tensor);
  return local;
}

// After the exchange: throws this rank's own `problem`, else the first rank (in rank order)
// whose arguments were invalid (`invalid`: "invalid arguments", "an invalid tensor") or
// whose rows disagree with this rank's in dtype or trailing dims.
inline void CheckAgreement(const char* who, const char* op, int rank, const std::string& problem,
                           const CollectiveMeta& local, const std::vector<CollectiveMeta>& all,
                           const char* invalid) {
  TORCH_CHECK(problem.empty(), problem);
  for (int r = 0; r < static_cast<int>(all.size()); ++r) {
    TORCH_CHECK(!all[r].error, who, "::", op, ": rank ", r, " of this communicator passed ",
                invalid, " (it reports why)");
    TORCH_CHECK(all[r].dtype == local.dtype && all[r].shape_hash == local.shape_hash, who, "::",
                op, ": the tensors disagree across ranks: rank ", rank, " has ",
                DescribeRows(local.dtype, local.row_bytes), ", rank ", r, " has ",
                DescribeRows(all[r].dtype, all[r].row_bytes),
                " (the dims after the first and the dtype must agree)");
  }
}

// Where each rank's block of an AllToAll of rows of `row_bytes` bytes lies: bytes to send to
// and receive from rank r, at these offsets of the send and receive buffers. The splits must
// have been checked (SplitsProblem).
struct AllToAllLayout {
  std::vector<int64_t> send_bytes, recv_bytes, send_offsets, recv_offsets;
  int64_t send_total = 0, recv_total = 0;
};

inline AllToAllLayout LayOutAllToAll(const std::vector<int64_t>& send_splits,
                                     const std::vector<int64_t>& recv_splits, int64_t row_bytes) {
  const size_t size = send_splits.size();
  AllToAllLayout l{std::vector<int64_t>(size), std::vector<int64_t>(size),
                   std::vector<int64_t>(size), std::vector<int64_t>(size)};
  for (size_t r = 0; r < size; ++r) {
    l.send_offsets[r] = l.send_total;
    l.recv_offsets[r] = l.recv_total;
    l.send_bytes[r] = send_splits[r] * row_bytes;
    l.recv_bytes[r] = recv_splits[r] * row_bytes;
    l.send_total += l.send_bytes[r];
    l.recv_total += l.recv_bytes[r];
  }
  return l;
}

// Where each rank's rows land in the result of an AllGather of rows of `row_bytes` bytes,
// from every rank's CollectiveMeta (in rank order).
struct AllGatherLayout {
  std::vector<int64_t> bytes, offsets;  // rank r's rows, in bytes, and where they start
  int64_t total_rows = 0;
  int64_t total_bytes = 0;
  bool even = true;  // every rank contributes as many rows as rank 0
};

inline AllGatherLayout LayOutAllGather(const std::vector<CollectiveMeta>& all, int64_t row_bytes) {
  AllGatherLayout l{std::vector<int64_t>(all.size()), std::vector<int64_t>(all.size())};
  for (size_t r = 0; r < all.size(); ++r) {
    l.bytes[r] = all[r].rows * row_bytes;
    l.offsets[r] = l.total_bytes;
    l.total_bytes += l.bytes[r];
    l.total_rows += all[r].rows;
    l.even = l.even && all[r].rows == all[0].rows;
  }
  return l;
}

}  // namespace rmoe::distributed
