// Helpers both communicators use when ranks check that their collective arguments agree.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <sstream>
#include <string>

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

}  // namespace rmoe::distributed
