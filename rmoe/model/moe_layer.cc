#include "rmoe/model/moe_layer.h"

#include <chrono>

namespace rmoe {
namespace {

double Seconds(std::chrono::steady_clock::duration duration) {
  return std::chrono::duration<double>(duration).count();
}

}  // namespace

TopKRouting RouteTopK(const torch::Tensor& logits, int64_t top_k, bool renormalize) {
  TopKRouting routing;
  routing.probs = torch::softmax(logits, -1);
  auto [weight, index] = torch::topk(routing.probs, top_k, -1);
  if (renormalize) weight = weight / weight.sum(-1, /*keepdim=*/true);
  routing.decision.expert_index = index;
  routing.decision.weight = weight;
  return routing;
}

torch::Tensor LoadBalancingLoss(const torch::Tensor& probs, const torch::Tensor& routed_per_expert,
                                int64_t top_k) {
  const int64_t num_tokens = probs.size(0), num_experts = probs.size(1);
  auto fraction = routed_per_expert.to(probs.scalar_type()) / static_cast<double>(num_tokens * top_k);
  return static_cast<double>(num_experts) * (fraction * probs.mean(0)).sum();
}

torch::Tensor RouterZLoss(const torch::Tensor& logits) {
  return torch::logsumexp(logits, -1).pow(2).mean();
}

MoELayerImpl::MoELayerImpl(const ModelSpec& model, const InitScales& init,
                           RecurrentCell shared_router_cell, ScanImplementation token_scan)
    : spec_(model.moe()), dispatcher_(std::make_shared<LocalDispatcher>()) {
  router_ = register_module(
      "router", MakeRouter(model, init, std::move(shared_router_cell), token_scan));
  experts_ = register_module(
      "experts", ExpertBank(spec_.num_experts(), model.d_model(), spec_.expert_hidden_dim(), init));
  if (spec_.shared_expert()) {
    const int64_t hidden = spec_.shared_expert_hidden_dim() > 0 ? spec_.shared_expert_hidden_dim()
                                                                : spec_.expert_hidden_dim();
    shared_expert_ = register_module("shared_expert", SwiGLU(model.d_model(), hidden, init));
  }
}

MoEOutput MoELayerImpl::forward(const torch::Tensor& x, RouterCarry& carry,
                                torch::Tensor* token_state) {
  const int64_t top_k = spec_.top_k();
  const auto router_start = std::chrono::steady_clock::now();
  auto logits = router_->forward(x, carry, token_state);
  const double router_seconds = Seconds(std::chrono::steady_clock::now() - router_start);
  auto routing = RouteTopK(logits, top_k, spec_.renormalize());

  auto flat = x.reshape({-1, x.size(-1)});
  const int64_t capacity =
      ExpertCapacity(spec_.capacity_factor(), flat.size(0), top_k, spec_.num_experts());
  const DispatchPlan plan = PlanDispatch(routing.decision, spec_.num_experts(), capacity);
  const auto dispatch_start = std::chrono::steady_clock::now();
  auto dispatched = dispatcher_->Dispatch(flat, plan);
  const auto experts_start = std::chrono::steady_clock::now();
  auto expert_out = experts_->forward(dispatched.rows, dispatched.tokens_per_expert);
  const auto combine_start = std::chrono::steady_clock::now();
  auto rows = dispatcher_->Combine(expert_out, dispatched.handle);
  const auto combine_end = std::chrono::steady_clock::now();
  auto routed = WeightedCombine(rows, plan, flat.size(0));
  auto y = routed.view_as(x);
  if (!shared_expert_.is_empty()) {
    y = spec_.moe_weight() * y + spec_.shared_expert_weight() * shared_expert_(x);
  } else if (spec_.moe_weight() != 1.0f) {
    y = spec_.moe_weight() * y;
  }

  MoEOutput out;
  out.y = y;
  out.load_balance = LoadBalancingLoss(routing.probs, plan.routed_per_expert, top_k);
  out.z_loss = RouterZLoss(logits);
  out.expert_index = routing.decision.expert_index;
  out.routed_per_expert = plan.routed_per_expert;
  {
    torch::NoGradGuard no_grad;
    out.router_entropy =
        -(routing.probs * torch::log_softmax(logits, -1)).sum(-1).mean().detach();
  }
  out.dropped = plan.dropped;
  out.assignments = flat.size(0) * top_k;
  out.router_seconds = router_seconds;
  out.expert_seconds = Seconds(combine_start - experts_start);
  out.dispatch_seconds = Seconds(experts_start - dispatch_start) + Seconds(combine_end - combine_start);
  return out;
}

}  // namespace rmoe
