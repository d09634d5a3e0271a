// The safetensors file format (https://github.com/huggingface/safetensors), written and read
// without the safetensors library:
//   8 bytes   little-endian uint64 N, the header's length
//   N bytes   a JSON object: "__metadata__" (string to string) and, per tensor,
//             {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, offsets
//             relative to the data section; padded with spaces to a multiple of 8
//   the data  every tensor's bytes in C order, little-endian, back to back
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <torch/torch.h>

namespace rmoe {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct SafetensorsFile {
  NamedTensors tensors;  // in the order of their data in the file
  std::map<std::string, std::string> metadata;
};

// Writes `tensors` (any device; copied to the host one at a time) atomically (rmoe/util/
// files.h): a reader sees the old file or the whole new one. Largest element size first, so
// each tensor starts at a multiple of its element size, as the reference writer does for
// zero-copy readers. Errors: a dtype safetensors cannot hold, a duplicate or empty name, I/O.
absl::Status WriteSafetensors(const std::string& path, const NamedTensors& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Reads every tensor onto the CPU. A file that is short, whose header is not JSON, names an
// unknown dtype, or whose offsets do not tile the data section exactly is a DataLoss error
// naming the file and the tensor.
absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);

// The safetensors name of `type` ("F32", "BF16", ...), or "" when it has none.
std::string SafetensorsDtype(torch::ScalarType type);

}  // namespace rmoe
