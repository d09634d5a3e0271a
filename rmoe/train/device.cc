#include "rmoe/train/device.h"

#include <cstdlib>

#include <ATen/detail/CUDAHooksInterface.h>
#include <absl/strings/ascii.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/strip.h>

namespace rmoe {
namespace {

// What a user needs to see when the GPU they asked for is not there.
std::string VisibleCudaDevices() {
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  return absl::StrCat("this process sees ", torch::cuda::device_count(), " CUDA device(s)",
                      visible ? absl::StrCat(" (CUDA_VISIBLE_DEVICES=\"", visible, "\")") : "",
                      at::detail::getCUDAHooks().isBuilt()
                          ? ""
                          : " and has no CUDA support in LibTorch (a CPU-only build, or "
                            "libtorch_cuda was not linked)");
}

}  // namespace

absl::StatusOr<torch::Device> ResolveDevice(const std::string& device, int local_rank) {
  const std::string name = absl::AsciiStrToLower(device);
  if (name == "cpu") return torch::Device(torch::kCPU);
  absl::string_view index_text = name;
  const bool any_gpu = name == "cuda";
  int index = -1;
  if (!any_gpu && !(absl::ConsumePrefix(&index_text, "cuda:") &&
                    absl::SimpleAtoi(index_text, &index) && index >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "runtime.device = \"", device, "\" is not a device: use \"cpu\", \"cuda\" (this "
        "process's GPU) or \"cuda:N\""));
  }
  const int count = torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0;
  if (count == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "runtime.device = \"", device, "\" but no CUDA device is usable here: ",
        VisibleCudaDevices(), "; run on a machine with a GPU and its driver "
        "(nvidia-smi lists it), or set runtime.device = \"cpu\""));
  }
  if (any_gpu) index = local_rank % count;
  if (index >= count) {
    return absl::FailedPreconditionError(absl::StrCat(
        "runtime.device = \"", device, "\" but ", VisibleCudaDevices(),
        ": use \"cuda\" to take this process's GPU by its local rank, or an index below ",
        count));
  }
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
}

torch::Device DeviceOf(Transformer& model) { return model->parameters().front().device(); }

TokenWindows::TokenWindows(int64_t batch, int64_t seq_len, torch::Device device)
    : batch_(batch), seq_len_(seq_len), device_(device) {
  if (device_.is_cpu()) host_ = torch::empty({batch_, seq_len_ + 1}, torch::kLong);
}

torch::Tensor TokenWindows::Next(const std::function<void(int64_t*)>& fill) {
  if (device_.is_cpu()) {
    fill(host_.data_ptr<int64_t>());
    return host_;
  }
  auto pinned = torch::empty({batch_, seq_len_ + 1},
                             torch::TensorOptions(torch::kLong).pinned_memory(true));
  fill(pinned.data_ptr<int64_t>());
  return pinned.to(device_, /*non_blocking=*/true);
}

}  // namespace rmoe
