// Where training computes: the device a job spec names, and getting host-side token
// windows onto it.
//
// The model is always built on the CPU (the same seed gives the same weights on every
// rank) and then moved. Everything the trainer reads back from the device (losses, the
// gradient norm) is read once per logging step, not per micro-batch, so that a GPU never
// waits for the host in between.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include <absl/status/statusor.h>
#include <torch/torch.h>

#include "rmoe/model/transformer.h"

namespace rmoe {

// runtime.device as a torch device: "cpu"; "cuda" is this process's GPU, local_rank modulo
// the visible devices (one process per GPU); "cuda:N" is device N. Upper or lower case.
// Fails, naming what this process sees, when the device does not exist here (no CUDA
// device or driver, a CPU-only LibTorch, N out of range).
absl::StatusOr<torch::Device> ResolveDevice(const std::string& device, int local_rank);

// The device of the model's parameters.
torch::Device DeviceOf(Transformer& model);

// [batch, seq_len + 1] token windows that the host fills and the model reads on `device`.
// On the CPU one buffer is reused. Elsewhere each window is filled in a page-locked buffer
// from torch's caching host allocator (which hands a buffer out again only after the copy
// from it has finished) and copied without blocking the host.
class TokenWindows {
 public:
  TokenWindows(int64_t batch, int64_t seq_len, torch::Device device);

  // `fill` writes batch * (seq_len + 1) tokens; returns them on the device.
  torch::Tensor Next(const std::function<void(int64_t* tokens)>& fill);

 private:
  int64_t batch_, seq_len_;
  torch::Device device_;
  torch::Tensor host_;  // the CPU case's reused buffer
};

}  // namespace rmoe
