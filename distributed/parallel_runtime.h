// Process groups and the multi-rank training runtime.
//
// world = data-parallel replicas x expert-parallel size. Every rank reads its own data;
// everything that is not an expert (embeddings, attention, norms, routers, shared experts)
// is replicated on every rank and its gradients are averaged over the world. Each MoE
// layer's experts are split over an expert-parallel (EP) group of ranks taken node by node
// (node_layout.h: the all-to-all stays inside a node whenever the group fits in one), and
// an expert's gradients are averaged over the ranks that hold a replica of it.
#pragma once

#include <memory>
#include <vector>

#include <absl/status/statusor.h>
#include <torch/torch.h>

#include "distributed/communicator.h"
#include "distributed/expert_parallel.h"
#include "distributed/node_layout.h"
#include "distributed/timed_communicator.h"
#include "rmoe/train/parallel.h"

namespace rmoe::distributed {

struct ProcessGroups {
  std::shared_ptr<Communicator> world;
  // ExpertParallelGroups(nodes, EP): EP ranks, node by node, that together hold one copy of
  // every expert (consecutive ranks when the launcher numbers ranks node by node).
  std::shared_ptr<Communicator> expert_parallel;
  // Ranks with the same position in their EP group: they hold the same experts.
  std::shared_ptr<Communicator> expert_replicas;
  // The nodes of the world's ranks (for placement and for messages that name hosts).
  NodeLayout nodes;

  // Errors name the sizes when the world or the experts do not divide by the EP size.
  // `nodes` covers the ranks of `world`; without it, all ranks are taken to share one node.
  static absl::StatusOr<ProcessGroups> Create(std::shared_ptr<Communicator> world,
                                              int expert_parallel_size, int num_experts,
                                              NodeLayout nodes = {});
};

// All-reduces `tensors` in place through a few flat buffers of at most `bucket_bytes`
// each (tensors of one dtype per bucket) instead of one call per tensor.
void AllReduceBucketed(Communicator& comm, const std::vector<torch::Tensor>& tensors, ReduceOp op,
                       size_t bucket_bytes);
// Broadcasts `tensors` in place from `root`, bucketed the same way.
void BroadcastBucketed(Communicator& comm, const std::vector<torch::Tensor>& tensors, int root,
                       size_t bucket_bytes);

// Which rank of a group of `group_size` keeps the optimizer state of each of `params`: each
// in turn to the rank holding the fewest bytes so far (the lowest on a tie), so the shares
// differ by at most one parameter. Every rank computes the same answer.
std::vector<int> BalancedOwners(const std::vector<torch::Tensor>& params, int group_size);

class DistributedRuntime : public ParallelRuntime {
 public:
  // `timer`, when given, is the communicator the groups were created from: its clock gives
  // the time spent communicating.
  // local_rank and local_size: this rank's place among the ranks on its machine.
  DistributedRuntime(ProcessGroups groups, int local_rank, int local_size,
                     std::shared_ptr<TimedCommunicator> timer = nullptr,
                     size_t bucket_bytes = 16 << 20);

  int rank() const override { return groups_.world->rank(); }
  int world_size() const override { return groups_.world->size(); }
  int local_size() const override { return local_size_; }
  int local_rank() const override { return local_rank_; }

  void ShardExperts(Transformer& model) override;
  void GatherExperts(Transformer& model) override;
  // With `shard`: replicated parameters are shared out over the world, each expert slice
  // over the ranks that hold a replica of it (BalancedOwners).
  std::vector<torch::Tensor> OptimizerParameters(Transformer& model, bool shard) override;
  void ShareUpdatedParameters(Transformer& model) override;
  void SynchronizeGradients(Transformer& model) override;
  torch::Tensor ClipGradients(Transformer& model, double max_norm) override;
  double Average(double value) override;
  void SumOverRanks(torch::Tensor& tensor) override;
  double TakeCommunicationSeconds() override { return timer_ ? timer_->TakeSeconds() : 0; }

  const ProcessGroups& groups() const { return groups_; }

 private:
  ProcessGroups groups_;
  int local_rank_, local_size_;
  std::shared_ptr<TimedCommunicator> timer_;
  size_t bucket_bytes_;
  ParameterPartition parameters_;
  // Owner of each of parameters_.replicated (a world rank) and parameters_.experts (an
  // expert_replicas rank); empty unless the optimizer state is sharded.
  std::vector<int> replicated_owner_, expert_owner_;
};

}  // namespace rmoe::distributed
