#include "distributed/routing_communicator.h"

#include <exception>

#include <absl/strings/str_cat.h>

#if RMOE_HAVE_NCCL
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "distributed/nccl_communicator.h"
#endif

namespace rmoe::distributed {

RoutingCommunicator::RoutingCommunicator(std::shared_ptr<Communicator> host,
                                         std::shared_ptr<Communicator> device)
    : host_(std::move(host)), device_(std::move(device)) {
  TORCH_CHECK(host_ && device_, "RoutingCommunicator needs a host and a device communicator");
  TORCH_CHECK(host_->rank() == device_->rank() && host_->size() == device_->size(),
              "RoutingCommunicator: the host communicator is rank ", host_->rank(), " of ",
              host_->size(), " but the device communicator is rank ", device_->rank(), " of ",
              device_->size(), "; both must span the same ranks in the same order");
}

Communicator& RoutingCommunicator::For(const torch::Tensor& tensor) {
  return tensor.device().is_cpu() ? *host_ : *device_;
}

void RoutingCommunicator::AllReduce(torch::Tensor& tensor, ReduceOp op) {
  For(tensor).AllReduce(tensor, op);
}

torch::Tensor RoutingCommunicator::AllToAll(const torch::Tensor& send,
                                            const std::vector<int64_t>& send_splits,
                                            const std::vector<int64_t>& recv_splits) {
  return For(send).AllToAll(send, send_splits, recv_splits);
}

std::vector<int64_t> RoutingCommunicator::AllToAllCounts(const std::vector<int64_t>& counts) {
  return host_->AllToAllCounts(counts);
}

torch::Tensor RoutingCommunicator::AllGather(const torch::Tensor& tensor) {
  return For(tensor).AllGather(tensor);
}

void RoutingCommunicator::Broadcast(torch::Tensor& tensor, int root) {
  For(tensor).Broadcast(tensor, root);
}

void RoutingCommunicator::Barrier() {
  device_->Barrier();
  host_->Barrier();
}

std::unique_ptr<Communicator> RoutingCommunicator::Split(int color, int key) {
  std::shared_ptr<Communicator> host = host_->Split(color, key);
  std::shared_ptr<Communicator> device = device_->Split(color, key);
  if (!host || !device) return nullptr;  // color < 0: this rank joins no group
  return std::make_unique<RoutingCommunicator>(std::move(host), std::move(device));
}

absl::StatusOr<std::shared_ptr<Communicator>> MakeTrainingCommunicator(MpiRuntime& mpi,
                                                                       torch::Device device,
                                                                       double timeout_seconds) {
  std::shared_ptr<Communicator> world(&mpi.World(), [](Communicator*) {});
  if (device.is_cpu()) return world;
#if RMOE_HAVE_NCCL
  if (!device.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("no communicator for device ", device.str(), ": only cpu and cuda"));
  }
  try {
    // NCCL binds a communicator to the current device; torch's default device follows it.
    c10::impl::getDeviceGuardImpl(device.type())->setDevice(device);
    auto nccl = std::make_shared<NcclCommunicator>(mpi.World(), device.index());
    nccl->set_timeout_seconds(timeout_seconds);
    return std::shared_ptr<Communicator>(std::make_shared<RoutingCommunicator>(world, nccl));
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot start NCCL on ", device.str(), ": ", e.what()));
  }
#else
  (void)timeout_seconds;
  return absl::FailedPreconditionError(absl::StrCat(
      "runtime.device = ", device.str(), " needs NCCL, and this program was built without "
      "it (a CPU-only LibTorch, or no NCCL found at build time: see docs/gpu.md)"));
#endif
}

void AbortDeviceCommunicators(const std::string& reason) {
#if RMOE_HAVE_NCCL
  AbortAllNcclCommunicators(reason);
#else
  (void)reason;
#endif
}

}  // namespace rmoe::distributed
