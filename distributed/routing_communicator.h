// The communicator a training process uses: tensors on the GPU travel over NCCL, host
// tensors and host numbers (the all-to-all's counts, the loss averaged for a stop decision,
// a checkpoint's commit vote) over MPI. The trainer and the expert-parallel dispatcher see
// one Communicator and never ask which library moves their data.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <torch/torch.h>

#include "distributed/communicator.h"
#include "distributed/mpi_communicator.h"

namespace rmoe::distributed {

// Routes each call by the device of its tensor: CPU tensors to `host`, every other device's
// to `device`. Both must span the same ranks in the same order. Split() splits both, so the
// expert-parallel and replica groups route the same way.
class RoutingCommunicator : public Communicator {
 public:
  RoutingCommunicator(std::shared_ptr<Communicator> host, std::shared_ptr<Communicator> device);

  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }

  void AllReduce(torch::Tensor& tensor, ReduceOp op) override;
  torch::Tensor AllToAll(const torch::Tensor& send, const std::vector<int64_t>& send_splits,
                         const std::vector<int64_t>& recv_splits) override;
  // Host numbers: always over `host`.
  std::vector<int64_t> AllToAllCounts(const std::vector<int64_t>& counts) override;
  torch::Tensor AllGather(const torch::Tensor& tensor) override;
  void Broadcast(torch::Tensor& tensor, int root) override;
  // Waits for the device's queued collectives, then for every rank's host.
  void Barrier() override;
  std::unique_ptr<Communicator> Split(int color, int key) override;

  Communicator& host() { return *host_; }
  Communicator& device() { return *device_; }

 private:
  Communicator& For(const torch::Tensor& tensor);

  std::shared_ptr<Communicator> host_, device_;
};

// The world communicator for training on `device` (collective over mpi.World()): on the CPU,
// mpi.World() itself; on a GPU, a RoutingCommunicator over mpi.World() and an NCCL
// communicator on that GPU (which becomes this process's current CUDA device), whose
// collectives get the same deadline as MPI's (timeout_seconds, 0 = none). Fails, naming
// the reason, when this build has no NCCL or NCCL cannot start. `mpi` outlives the result.
absl::StatusOr<std::shared_ptr<Communicator>> MakeTrainingCommunicator(MpiRuntime& mpi,
                                                                       torch::Device device,
                                                                       double timeout_seconds);

// After an error, before MPI_Abort and before any communicator is destroyed: aborts this
// process's GPU communicators (NCCL), so that nothing waits for peers that will never come;
// at most 10 s. Nothing to do in a build without NCCL.
void AbortDeviceCommunicators(const std::string& reason);

}  // namespace rmoe::distributed
