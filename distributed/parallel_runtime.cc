#include "distributed/parallel_runtime.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include <absl/strings/str_cat.h>

#include "distributed/expert_parallel.h"
#include "rmoe/train/optimizer.h"

namespace rmoe::distributed {

absl::StatusOr<ProcessGroups> ProcessGroups::Create(std::shared_ptr<Communicator> world,
                                                    int expert_parallel_size, int num_experts,
                                                    NodeLayout nodes) {
  const int size = world->size();
  if (expert_parallel_size < 1 || size % expert_parallel_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "parallel.expert_parallel_size = ", expert_parallel_size, " must divide the ", size,
        " ranks of the job (world = data-parallel replicas x expert-parallel size)"));
  }
  if (num_experts % expert_parallel_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.moe.num_experts = ", num_experts, " cannot be split evenly over "
        "parallel.expert_parallel_size = ", expert_parallel_size, " ranks"));
  }
  if (nodes.ranks() == 0) nodes = NodeLayout::SingleNode(size);
  if (nodes.ranks() != size) {
    return absl::InvalidArgumentError(absl::StrCat("ProcessGroups: the node layout covers ",
                                                   nodes.ranks(), " ranks, the world has ", size));
  }
  ProcessGroups groups;
  const int rank = world->rank();
  const std::vector<int> order = PlacementOrder(nodes);
  const int position = static_cast<int>(std::find(order.begin(), order.end(), rank) - order.begin());
  groups.expert_parallel = world->Split(position / expert_parallel_size, position);
  groups.expert_replicas = world->Split(position % expert_parallel_size, position);
  groups.world = std::move(world);
  groups.nodes = std::move(nodes);
  return groups;
}

namespace {

// Calls `flush(begin, end)` for consecutive runs of `tensors` of one dtype and at most
// `bucket_bytes` together (at least one tensor each).
template <typename Flush>
void ForEachBucket(const std::vector<torch::Tensor>& tensors, size_t bucket_bytes, Flush flush) {
  size_t begin = 0;
  while (begin < tensors.size()) {
    size_t end = begin, bytes = 0;
    while (end < tensors.size() && tensors[end].scalar_type() == tensors[begin].scalar_type() &&
           (end == begin || bytes + tensors[end].nbytes() <= bucket_bytes)) {
      bytes += tensors[end].nbytes();
      ++end;
    }
    flush(begin, end);
    begin = end;
  }
}

// Copies `flat` back into tensors[begin, end), which it holds back to back.
void Unflatten(const torch::Tensor& flat, const std::vector<torch::Tensor>& tensors, size_t begin,
               size_t end) {
  torch::NoGradGuard no_grad;
  int64_t offset = 0;
  for (size_t i = begin; i < end; ++i) {
    const int64_t n = tensors[i].numel();
    tensors[i].view({-1}).copy_(flat.narrow(0, offset, n));
    offset += n;
  }
}

torch::Tensor Flatten(const std::vector<torch::Tensor>& tensors, size_t begin, size_t end) {
  std::vector<torch::Tensor> parts;
  for (size_t i = begin; i < end; ++i) parts.push_back(tensors[i].detach().reshape({-1}));
  return torch::cat(parts);
}

}  // namespace

void AllReduceBucketed(Communicator& comm, const std::vector<torch::Tensor>& tensors, ReduceOp op,
                       size_t bucket_bytes) {
  ForEachBucket(tensors, bucket_bytes, [&](size_t begin, size_t end) {
    auto flat = Flatten(tensors, begin, end);
    comm.AllReduce(flat, op);
    Unflatten(flat, tensors, begin, end);
  });
}

void BroadcastBucketed(Communicator& comm, const std::vector<torch::Tensor>& tensors, int root,
                       size_t bucket_bytes) {
  ForEachBucket(tensors, bucket_bytes, [&](size_t begin, size_t end) {
    if (comm.rank() == root) {
      auto flat = Flatten(tensors, begin, end);
      comm.Broadcast(flat, root);
      return;
    }
    int64_t elements = 0;
    for (size_t i = begin; i < end; ++i) elements += tensors[i].numel();
    auto flat = torch::empty({elements}, tensors[begin].options().requires_grad(false));
    comm.Broadcast(flat, root);
    Unflatten(flat, tensors, begin, end);
  });
}

std::vector<int> BalancedOwners(const std::vector<torch::Tensor>& params, int group_size) {
  std::vector<int64_t> held(group_size, 0);
  std::vector<int> owners;
  for (const auto& p : params) {
    const int owner = static_cast<int>(std::min_element(held.begin(), held.end()) - held.begin());
    held[owner] += p.numel();
    owners.push_back(owner);
  }
  return owners;
}

DistributedRuntime::DistributedRuntime(ProcessGroups groups, int local_rank, int local_size,
                                       std::shared_ptr<TimedCommunicator> timer,
                                       size_t bucket_bytes)
    : groups_(std::move(groups)),
      local_rank_(local_rank),
      local_size_(local_size),
      timer_(std::move(timer)),
      bucket_bytes_(bucket_bytes) {}

void DistributedRuntime::ShardExperts(Transformer& model) {
  if (groups_.expert_parallel->size() > 1) {
    distributed::ShardExperts(model, groups_.expert_parallel);
  }
  parameters_ = PartitionParameters(model);
}

std::vector<torch::Tensor> DistributedRuntime::OptimizerParameters(Transformer& model, bool shard) {
  replicated_owner_.clear();
  expert_owner_.clear();
  if (!shard) return model->parameters();
  replicated_owner_ = BalancedOwners(parameters_.replicated, world_size());
  expert_owner_ = BalancedOwners(parameters_.experts, groups_.expert_replicas->size());
  // In the model's order, as an unsharded optimizer holds them.
  std::vector<torch::Tensor> mine;
  for (const auto& p : model->parameters()) {
    for (size_t i = 0; i < parameters_.replicated.size(); ++i) {
      if (parameters_.replicated[i].is_same(p) && replicated_owner_[i] == rank()) mine.push_back(p);
    }
    for (size_t i = 0; i < parameters_.experts.size(); ++i) {
      if (parameters_.experts[i].is_same(p) && expert_owner_[i] == groups_.expert_replicas->rank()) {
        mine.push_back(p);
      }
    }
  }
  return mine;
}

void DistributedRuntime::ShareUpdatedParameters(Transformer& model) {
  if (replicated_owner_.empty() && expert_owner_.empty()) return;
  auto owned_by = [](const std::vector<torch::Tensor>& params, const std::vector<int>& owners,
                     int root) {
    std::vector<torch::Tensor> out;
    for (size_t i = 0; i < params.size(); ++i) {
      if (owners[i] == root) out.push_back(params[i]);
    }
    return out;
  };
  for (int root = 0; root < world_size(); ++root) {
    auto params = owned_by(parameters_.replicated, replicated_owner_, root);
    if (!params.empty()) BroadcastBucketed(*groups_.world, params, root, bucket_bytes_);
  }
  Communicator& replicas = *groups_.expert_replicas;
  for (int root = 0; root < replicas.size(); ++root) {
    auto params = owned_by(parameters_.experts, expert_owner_, root);
    if (!params.empty()) BroadcastBucketed(replicas, params, root, bucket_bytes_);
  }
}

void DistributedRuntime::SynchronizeGradients(Transformer& model) {
  auto grads = [](const std::vector<torch::Tensor>& params) {
    // Every rank must contribute every tensor, or the buckets would not line up.
    FillMissingGradients(params);
    std::vector<torch::Tensor> out;
    for (const auto& p : params) out.push_back(p.grad());
    return out;
  };
  AllReduceBucketed(*groups_.world, grads(parameters_.replicated), ReduceOp::kAvg, bucket_bytes_);
  // An expert's gradient here already sums the losses of every rank in this EP group (the
  // all-to-all's backward brought them); summing over the replicas and dividing by the
  // world gives the world average, as for the replicated parameters.
  auto expert_grads = grads(parameters_.experts);
  AllReduceBucketed(*groups_.expert_replicas, expert_grads, ReduceOp::kSum, bucket_bytes_);
  torch::NoGradGuard no_grad;
  for (auto& g : expert_grads) g.div_(static_cast<double>(world_size()));
}

torch::Tensor DistributedRuntime::ClipGradients(Transformer& model, double max_norm) {
  // Replicated gradients are equal everywhere after synchronisation; each expert lives on
  // exactly one rank of an EP group, so the group's sum counts every expert once.
  auto expert_squares = SquaredGradientNorm(parameters_.experts);
  groups_.expert_parallel->AllReduce(expert_squares, ReduceOp::kSum);
  const auto norm = (SquaredGradientNorm(parameters_.replicated) + expert_squares).sqrt();
  ScaleGradientsToNorm(model->parameters(), norm, max_norm);
  return norm;
}

double DistributedRuntime::Average(double value) {
  auto t = torch::tensor({value}, torch::kDouble);
  groups_.world->AllReduce(t, ReduceOp::kAvg);
  return t.item<double>();
}

void DistributedRuntime::SumOverRanks(torch::Tensor& tensor) {
  groups_.world->AllReduce(tensor, ReduceOp::kSum);
}

void DistributedRuntime::GatherExperts(Transformer& model) {
  if (groups_.expert_parallel->size() > 1) {
    distributed::GatherExperts(model, *groups_.expert_parallel);
  }
  parameters_ = PartitionParameters(model);
}

}  // namespace rmoe::distributed
