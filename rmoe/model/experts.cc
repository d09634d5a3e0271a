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

namespace {

// The grouped SwiGLU products of every expert as one autograd node. Left to autograd, each
// `w[e]` slice's backward materialises a zero-filled gradient of the whole [E, D, H] stack
// and then sums E of them: O(E^2 D H) memory traffic per step (15x slower than the products
// themselves at 32 experts of 512 x 2048). Here every expert's weight gradients are written
// straight into its slice of one stacked gradient, and the forward keeps the two
// pre-activations and silu(gate) per token.
class GroupedSwiGLU : public torch::autograd::Function<GroupedSwiGLU> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w1, const torch::Tensor& w3,
                               const torch::Tensor& w2, std::vector<int64_t> counts) {
    auto gate = torch::empty({x.size(0), w1.size(2)}, x.options());
    auto up = torch::empty_like(gate), silu_gate = torch::empty_like(gate);
    auto y = torch::empty({x.size(0), w2.size(2)}, x.options());
    int64_t offset = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      if (counts[e] == 0) continue;
      auto xe = x.narrow(0, offset, counts[e]);
      auto gate_e = gate.narrow(0, offset, counts[e]), up_e = up.narrow(0, offset, counts[e]);
      torch::mm_out(gate_e, xe, w1[e]);
      torch::mm_out(up_e, xe, w3[e]);
      auto y_e = y.narrow(0, offset, counts[e]);
      auto silu_e = silu_gate.narrow(0, offset, counts[e]);
      torch::silu_out(silu_e, gate_e);
      torch::mm_out(y_e, silu_e * up_e, w2[e]);
      offset += counts[e];
    }
    ctx->save_for_backward({x, w1, w3, w2, gate, up, silu_gate});
    ctx->saved_data["counts"] = counts;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w1 = saved[1], &w3 = saved[2], &w2 = saved[3];
    const auto &gate = saved[4], &up = saved[5], &silu_gate = saved[6];
    const auto counts = ctx->saved_data["counts"].toIntVector();
    const auto grad_y = grads[0].contiguous();
    auto grad_x = torch::empty_like(x);
    auto grad_w1 = torch::empty_like(w1), grad_w3 = torch::empty_like(w3);
    auto grad_w2 = torch::empty_like(w2);
    int64_t offset = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      if (counts[e] == 0) {  // no tokens: no gradient for this expert
        grad_w1[e].zero_();
        grad_w3[e].zero_();
        grad_w2[e].zero_();
        continue;
      }
      const int64_t n = counts[e];
      auto xe = x.narrow(0, offset, n), gy = grad_y.narrow(0, offset, n);
      auto a = gate.narrow(0, offset, n), b = up.narrow(0, offset, n);
      // Four element-wise passes over [n, hidden]: silu(a) is kept from the forward, and
      // silu_backward is one vectorised kernel for g sig(a) (1 + a (1 - sig(a))), which as
      // separate operators took seven.
      auto silu = silu_gate.narrow(0, offset, n);
      auto grad_w1_e = grad_w1[e], grad_w3_e = grad_w3[e], grad_w2_e = grad_w2[e];
      torch::mm_out(grad_w2_e, (silu * b).t(), gy);
      auto grad_hidden = gy.mm(w2[e].t());
      auto grad_b = grad_hidden * silu;
      auto grad_a = torch::silu_backward(grad_hidden.mul_(b), a);
      torch::mm_out(grad_w1_e, xe.t(), grad_a);
      torch::mm_out(grad_w3_e, xe.t(), grad_b);
      auto gx = grad_x.narrow(0, offset, n);
      torch::mm_out(gx, grad_a, w1[e].t());
      gx.addmm_(grad_b, w3[e].t());
      offset += n;
    }
    return {grad_x, grad_w1, grad_w3, grad_w2, torch::Tensor()};
  }
};

}  // namespace

torch::Tensor ExpertBankImpl::forward(const torch::Tensor& x,
                                      const std::vector<int64_t>& tokens_per_expert) {
  TORCH_CHECK(static_cast<int64_t>(tokens_per_expert.size()) == num_experts(),
              "tokens_per_expert has ", tokens_per_expert.size(), " entries for ",
              num_experts(), " experts");
  int64_t total = 0;
  for (int64_t count : tokens_per_expert) total += count;
  TORCH_CHECK(total == x.size(0), "tokens_per_expert sums to ", total, " but x has ", x.size(0),
              " rows");
  if (total == 0) return x * 0;  // keeps the graph connected for a rank with no tokens
  return GroupedSwiGLU::apply(ToMatmulDtype(x).contiguous(), ToMatmulDtype(w1),
                              ToMatmulDtype(w3), ToMatmulDtype(w2), tokens_per_expert)
      .to(x.scalar_type());
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
  // Counted with index_add_: bincount reads the largest index back to the host first.
  plan.routed_per_expert = torch::zeros({num_experts}, expert.options())
                               .index_add_(0, expert, torch::ones_like(expert));
  auto order = std::get<1>(torch::sort(expert, /*stable=*/std::optional<bool>(true), /*dim=*/0));
  // The plan's one read from the device (on a GPU, the layer's one wait for it): how many
  // assignments each expert keeps, which sizes its grouped product.
  const auto kept = capacity > 0 ? plan.routed_per_expert.clamp_max(capacity)
                                 : plan.routed_per_expert;
  const auto kept_on_host = kept.to(torch::kCPU);
  plan.tokens_per_expert.assign(kept_on_host.data_ptr<int64_t>(),
                                kept_on_host.data_ptr<int64_t>() + num_experts);
  if (capacity > 0) {
    // Rank of each assignment within its expert = position - start of its expert's group.
    auto sorted_expert = expert.index_select(0, order);
    auto group_start = torch::cumsum(plan.routed_per_expert, 0) - plan.routed_per_expert;
    auto rank_in_expert =
        torch::arange(sorted_expert.size(0), expert.options()) - group_start.index_select(0, sorted_expert);
    // How many are kept is known on the host, so selecting them waits for nothing.
    int64_t total_kept = 0;
    for (int64_t count : plan.tokens_per_expert) total_kept += count;
    auto kept_positions = at::nonzero_static(rank_in_expert < capacity, total_kept).squeeze(1);
    order = order.index_select(0, kept_positions);
  }
  plan.token = token.index_select(0, order);
  plan.weight = weight.index_select(0, order);
  plan.dropped = num_tokens * top_k - plan.token.size(0);
  return plan;
}

DispatchedTokens LocalDispatcher::Dispatch(const torch::Tensor& x, const DispatchPlan& plan) {
  DispatchedTokens out;
  out.rows = x.index_select(0, plan.token);
  out.tokens_per_expert = plan.tokens_per_expert;
  return out;
}

torch::Tensor WeightedCombine(const torch::Tensor& rows, const DispatchPlan& plan,
                              int64_t num_tokens) {
  auto weighted = rows * plan.weight.unsqueeze(1).to(rows.scalar_type());
  return torch::zeros({num_tokens, rows.size(1)}, rows.options()).index_add(0, plan.token, weighted);
}

torch::Tensor RunExperts(Dispatcher& dispatcher, const torch::Tensor& x, const DispatchPlan& plan,
                         ExpertBank& experts) {
  auto dispatched = dispatcher.Dispatch(x, plan);
  auto expert_out = experts->forward(dispatched.rows, dispatched.tokens_per_expert);
  return WeightedCombine(dispatcher.Combine(expert_out, dispatched.handle), plan, x.size(0));
}

}  // namespace rmoe
