#include "distributed/expert_parallel.h"

#include <algorithm>
#include <numeric>
#include <unordered_set>

namespace rmoe::distributed {
namespace {

class AllToAllFunction : public torch::autograd::Function<AllToAllFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               Communicator* comm, const std::vector<int64_t>& send_splits,
                               const std::vector<int64_t>& recv_splits) {
    ctx->saved_data["comm"] = reinterpret_cast<int64_t>(comm);
    ctx->saved_data["send_splits"] = send_splits;
    ctx->saved_data["recv_splits"] = recv_splits;
    return comm->AllToAll(x, send_splits, recv_splits);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* comm = reinterpret_cast<Communicator*>(ctx->saved_data["comm"].toInt());
    const auto send_splits = ctx->saved_data["send_splits"].toIntVector();
    const auto recv_splits = ctx->saved_data["recv_splits"].toIntVector();
    // What arrived from rank r goes back to rank r.
    auto grad = comm->AllToAll(grads[0].contiguous(), recv_splits, send_splits);
    return {grad, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

int64_t Sum(const std::vector<int64_t>& values) {
  return std::accumulate(values.begin(), values.end(), int64_t{0});
}

}  // namespace

torch::Tensor AllToAllWithGrad(Communicator& comm, const torch::Tensor& x,
                               const std::vector<int64_t>& send_splits,
                               const std::vector<int64_t>& recv_splits) {
  return AllToAllFunction::apply(x, &comm, send_splits, recv_splits);
}

ExpertParallelDispatcher::ExpertParallelDispatcher(std::shared_ptr<Communicator> ep_group,
                                                   int64_t num_experts)
    : ep_group_(std::move(ep_group)), num_experts_(num_experts) {
  TORCH_CHECK(num_experts_ % ep_group_->size() == 0, num_experts_,
              " experts cannot be split evenly over an expert-parallel group of ",
              ep_group_->size());
}

DispatchedTokens ExpertParallelDispatcher::Dispatch(const torch::Tensor& x,
                                                   const DispatchPlan& plan) {
  const int ranks = ep_group_->size();
  const int64_t local_experts = num_experts_ / ranks;
  TORCH_CHECK(static_cast<int64_t>(plan.tokens_per_expert.size()) == num_experts_,
              "the dispatch plan covers ", plan.tokens_per_expert.size(),
              " experts; the expert-parallel group shares ", num_experts_);
  DispatchedTokens out;
  DispatchHandle& handle = out.handle;
  // Sorted by global expert is also sorted by destination rank: experts are contiguous.
  handle.send_splits.assign(ranks, 0);
  for (int64_t e = 0; e < num_experts_; ++e) {
    handle.send_splits[e / local_experts] += plan.tokens_per_expert[e];
  }
  // recv_counts[s * L + e]: tokens rank s sends to local expert e here.
  const std::vector<int64_t> recv_counts = ep_group_->AllToAllCounts(plan.tokens_per_expert);
  handle.recv_splits.assign(ranks, 0);
  for (int s = 0; s < ranks; ++s) {
    for (int64_t e = 0; e < local_experts; ++e) {
      handle.recv_splits[s] += recv_counts[s * local_experts + e];
    }
  }
  auto received = AllToAllWithGrad(*ep_group_, x.index_select(0, plan.token),
                                   handle.send_splits, handle.recv_splits);

  // Arrivals are ordered (source rank, expert); the experts want (expert, source rank): a
  // stable sort of the rows by their block's (expert, source) key, computed where the rows
  // are, so a GPU gets no per-token work from the host.
  out.tokens_per_expert.assign(local_experts, 0);
  for (size_t block = 0; block < recv_counts.size(); ++block) {
    out.tokens_per_expert[block % local_experts] += recv_counts[block];
  }
  const auto on_device = torch::TensorOptions(torch::kLong).device(x.device());
  const int64_t blocks = static_cast<int64_t>(recv_counts.size());
  const auto block_ids = torch::arange(blocks, on_device);
  const auto block_key = block_ids.remainder(local_experts) * ranks + block_ids.div(
      local_experts, /*rounding_mode=*/"floor");
  const auto block_of_row = torch::repeat_interleave(
      block_ids, torch::tensor(recv_counts, torch::kLong).to(x.device(), /*non_blocking=*/true),
      /*dim=*/0, /*output_size=*/Sum(handle.recv_splits));
  handle.by_expert =
      std::get<1>(block_key.index_select(0, block_of_row)
                            .sort(/*stable=*/std::optional<bool>(true), /*dim=*/0));
  out.rows = received.index_select(0, handle.by_expert);
  return out;
}

torch::Tensor ExpertParallelDispatcher::Combine(const torch::Tensor& expert_out,
                                                const DispatchHandle& handle) {
  // Undo the regrouping by expert, then send each row back to the rank it came from.
  auto by_source = torch::empty_like(handle.by_expert);
  by_source.index_put_({handle.by_expert},
                       torch::arange(handle.by_expert.size(0), handle.by_expert.options()));
  return AllToAllWithGrad(*ep_group_, expert_out.index_select(0, by_source), handle.recv_splits,
                          handle.send_splits);
}

namespace {
template <typename Fn>
void ForEachMoELayer(Transformer& model, Fn fn) {
  for (auto& block : model->blocks()) {
    if (block->is_moe()) fn(block->moe());
  }
}
}  // namespace

void ShardExperts(Transformer& model, std::shared_ptr<Communicator> ep_group) {
  const int64_t num_experts = model->spec().moe().num_experts();
  const int64_t local = num_experts / ep_group->size();
  ForEachMoELayer(model, [&](MoELayer& layer) {
    TORCH_CHECK(layer->experts()->num_experts() == num_experts,
                "ShardExperts needs a model that holds all ", num_experts, " experts");
    layer->experts()->KeepExperts(ep_group->rank() * local, local);
    layer->set_dispatcher(std::make_shared<ExpertParallelDispatcher>(ep_group, num_experts));
  });
}

void GatherExperts(Transformer& model, Communicator& ep_group) {
  ForEachMoELayer(model, [&](MoELayer& layer) {
    auto& bank = layer->experts();
    torch::NoGradGuard no_grad;
    // Slices are in rank order, so concatenating them gives experts 0..E-1.
    bank->SetExperts(0, ep_group.AllGather(bank->w1), ep_group.AllGather(bank->w3),
                     ep_group.AllGather(bank->w2));
    layer->set_dispatcher(std::make_shared<LocalDispatcher>());
  });
}

bool ParameterPartition::IsExpert(const torch::Tensor& parameter) const {
  return std::any_of(experts.begin(), experts.end(), [&](const torch::Tensor& p) {
    return p.unsafeGetTensorImpl() == parameter.unsafeGetTensorImpl();
  });
}

ParameterPartition PartitionParameters(Transformer& model) {
  std::unordered_set<const void*> expert_params;
  ForEachMoELayer(model, [&](MoELayer& layer) {
    for (auto& p : layer->experts()->parameters()) expert_params.insert(p.unsafeGetTensorImpl());
  });
  ParameterPartition partition;
  for (auto& p : model->parameters()) {
    (expert_params.count(p.unsafeGetTensorImpl()) ? partition.experts : partition.replicated)
        .push_back(p);
  }
  return partition;
}

}  // namespace rmoe::distributed
