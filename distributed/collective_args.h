// Helpers both communicators use when ranks check that their collective arguments agree.
#pragma once

#include <cstdint>
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

}  // namespace rmoe::distributed
