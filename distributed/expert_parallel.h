// Expert parallelism: the experts of every MoE layer are split evenly over the ranks of an
// expert-parallel (EP) group, rank r holding global experts [r * E/P, (r + 1) * E/P); tokens
// travel to the rank of their expert and back with uneven all-to-alls.
#pragma once

#include <memory>
#include <vector>

#include <torch/torch.h>

#include "distributed/communicator.h"
#include "rmoe/model/experts.h"
#include "rmoe/model/transformer.h"

namespace rmoe::distributed {

// All-to-all that autograd can differentiate: the backward pass sends the gradients back
// along the reverse splits. Every rank of `comm` must call it, also with zero rows.
torch::Tensor AllToAllWithGrad(Communicator& comm, const torch::Tensor& x,
                               const std::vector<int64_t>& send_splits,
                               const std::vector<int64_t>& recv_splits);

// The expert-parallel twin of LocalDispatcher, behind the same interface:
//   Dispatch: exchange per-expert counts -> send tokens to their experts' ranks -> regroup
//             by local expert;
//   Combine:  undo the regrouping -> send results back to the ranks they came from.
// The plan (and so every capacity decision) is made before any exchange, from the
// layer's global experts, so it equals a single rank's.
class ExpertParallelDispatcher : public Dispatcher {
 public:
  ExpertParallelDispatcher(std::shared_ptr<Communicator> ep_group, int64_t num_experts);
  DispatchedTokens Dispatch(const torch::Tensor& x, const DispatchPlan& plan) override;
  torch::Tensor Combine(const torch::Tensor& expert_out, const DispatchHandle& handle) override;

 private:
  std::shared_ptr<Communicator> ep_group_;
  int64_t num_experts_;
};

// Keeps this rank's slice of every MoE layer's experts and routes through `ep_group`.
// The model must hold all experts (every rank built it from the same seed).
void ShardExperts(Transformer& model, std::shared_ptr<Communicator> ep_group);

// The inverse of ShardExperts: every rank gets all experts back (for saving a whole model).
void GatherExperts(Transformer& model, Communicator& ep_group);

// The model's parameters split by how they are synchronised and saved: replicated on every
// rank, or the experts this rank holds (a slice of each MoE layer's experts when sharded).
struct ParameterPartition {
  std::vector<torch::Tensor> replicated;
  std::vector<torch::Tensor> experts;
  bool IsExpert(const torch::Tensor& parameter) const;
};
ParameterPartition PartitionParameters(Transformer& model);

}  // namespace rmoe::distributed
