#include "rmoe/model/experts.h"

#include <cmath>

namespace rmoe {

ExpertBankImpl::ExpertBankImpl(int64_t num_experts, int64_t d_model, int64_t hidden_dim,
                               const InitScales& init) {
  w1 = register_parameter("w1", torch::randn({num_experts, d_model, hidden_dim}) * init.std);
  w3 = register_parameter("w3", torch::randn({num_experts, d_model, hidden_dim}) * init.std);
  w2 = register_parameter("w2",
                          torch::randn({num_experts, hidden_dim, d_model}) * init.residual_std);
}

void ExpertBankImpl::KeepExperts(int64_t first, int64_t count) {
  TORCH_CHECK(first >= first_expert_ && first + count <= first_expert_ + num_experts(),
              "experts [", first, ", ", first + count, ") are not all held here");
  const int64_t offset = first - first_expert_;
  SetExperts(first, w1.narrow(0, offset, count), w3.narrow(0, offset, count),
             w2.narrow(0, offset, count));
}

void ExpertBankImpl::SetExperts(int64_t first, const torch::Tensor& new_w1,
                                const torch::Tensor& new_w3, const torch::Tensor& new_w2) {
  torch::NoGradGuard no_grad;
  // set_data keeps the registered parameter objects, so optimizers and name lookups that
  // already hold them stay valid; clone() so a slice does not pin the full tensor.
  w1.set_data(new_w1.detach().clone());
  w3.set_data(new_w3.detach().clone());
  w2.set_data(new_w2.detach().clone());
  first_expert_ = first;
}

torch::Tensor ExpertBankImpl::forward(const torch::Tensor& x,
                                      const std::vector<int64_t>& tokens_per_expert) {
  TORCH_CHECK(static_cast<int64_t>(tokens_per_expert.size()) == num_experts(),
              "tokens_per_expert has ", tokens_per_expert.size(), " entries for ",
              num_experts(), " experts");
  std::vector<torch::Tensor> outputs;
  outputs.reserve(tokens_per_expert.size());
  int64_t offset = 0;
  for (int64_t e = 0; e < num_experts(); ++e) {
    const int64_t count = tokens_per_expert[e];
    if (count == 0) continue;
    auto xe = x.narrow(0, offset, count);
    auto hidden = torch::silu(xe.mm(w1[e])) * xe.mm(w3[e]);
    outputs.push_back(hidden.mm(w2[e]));
    offset += count;
  }
  TORCH_CHECK(offset == x.size(0), "tokens_per_expert sums to ", offset, " but x has ",
              x.size(0), " rows");
  if (outputs.empty()) return x * 0;  // keeps the graph connected for a rank with no tokens
  return torch::cat(outputs, 0);
}

int64_t ExpertCapacity(double capacity_factor, int64_t num_tokens, int64_t top_k,
                       int64_t num_experts) {
  if (capacity_factor <= 0) return 0;
  return static_cast<int64_t>(
      std::ceil(capacity_factor * static_cast<double>(num_tokens * top_k) / num_experts));
}

DispatchPlan PlanDispatch(const RoutingDecision& decision, int64_t num_experts,
                          int64_t capacity) {
  const int64_t num_tokens = decision.expert_index.size(0);
  const int64_t top_k = decision.expert_index.size(1);
  // Choice-major order (all first choices, then all second choices) so that a stable sort
  // by expert ranks first choices ahead of second choices.
  auto expert = decision.expert_index.t().reshape({-1});
  auto weight = decision.weight.t().reshape({-1});
  auto token = torch::arange(num_tokens, expert.options()).repeat({top_k});

  DispatchPlan plan;
  plan.routed_per_expert = torch::bincount(expert, {}, num_experts);
  auto order = std::get<1>(torch::sort(expert, /*stable=*/c10::optional<bool>(true), /*dim=*/0));
  auto sorted_expert = expert.index_select(0, order);
  if (capacity > 0) {
    // Rank of each assignment within its expert = position - start of its expert's group.
    auto group_start = torch::cumsum(plan.routed_per_expert, 0) - plan.routed_per_expert;
    auto rank_in_expert =
        torch::arange(sorted_expert.size(0), expert.options()) - group_start.index_select(0, sorted_expert);
    auto keep = rank_in_expert < capacity;
    order = order.masked_select(keep);
    sorted_expert = sorted_expert.masked_select(keep);
  }
  plan.token = token.index_select(0, order);
  plan.weight = weight.index_select(0, order);
  auto kept = torch::bincount(sorted_expert, {}, num_experts).to(torch::kCPU);
  plan.tokens_per_expert.assign(kept.data_ptr<int64_t>(), kept.data_ptr<int64_t>() + num_experts);
  plan.dropped = num_tokens * top_k - plan.token.size(0);
  return plan;
}

torch::Tensor LocalDispatcher::Dispatch(const torch::Tensor& x, const RoutingDecision& decision,
                                        int64_t capacity, ExpertBank& experts,
                                        DispatchPlan* plan) {
  *plan = PlanDispatch(decision, experts->num_experts(), capacity);
  auto expert_out = experts->forward(x.index_select(0, plan->token), plan->tokens_per_expert);
  auto weighted = expert_out * plan->weight.unsqueeze(1).to(expert_out.scalar_type());
  return torch::zeros_like(x).index_add(0, plan->token, weighted);
}

}  // namespace rmoe
