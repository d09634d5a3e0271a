#include "rmoe/train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <string>

namespace rmoe {

torch::Tensor FusedAdamW::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  for (auto& group : param_groups()) {
    const auto& options = static_cast<const torch::optim::AdamWOptions&>(group.options());
    TORCH_CHECK(!options.amsgrad(), "FusedAdamW does not implement amsgrad");
    std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      TORCH_CHECK(!p.grad().is_sparse(), "AdamW does not support sparse gradients");
      auto& slot = state()[p.unsafeGetTensorImpl()];
      if (!slot) {
        auto fresh = std::make_unique<torch::optim::AdamWParamState>();
        fresh->step(0);
        fresh->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        fresh->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        slot = std::move(fresh);
      }
      auto& adam = static_cast<torch::optim::AdamWParamState&>(*slot);
      adam.step(adam.step() + 1);
      params.push_back(p);
      grads.push_back(p.grad());
      exp_avgs.push_back(adam.exp_avg());
      exp_avg_sqs.push_back(adam.exp_avg_sq());
      // The kernel reads the step count (for the bias corrections) from a float tensor on
      // the parameter's device, as torch.optim.AdamW(fused=True) keeps it.
      steps.push_back(torch::full({}, static_cast<double>(adam.step()),
                                  p.options().dtype(torch::kFloat)));
    }
    if (params.empty()) continue;
    const auto [beta1, beta2] = options.betas();
    at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps,
                      options.lr(), beta1, beta2, options.weight_decay(), options.eps(),
                      /*amsgrad=*/false, /*maximize=*/false);
  }
  return loss;
}

std::unique_ptr<torch::optim::AdamW> MakeOptimizer(const JobSpec& spec, Transformer& model,
                                                   const std::vector<torch::Tensor>& params) {
  std::set<void*> undecayed_routers;
  if (!spec.optimizer().decay_router_weights()) {
    for (const auto& item : model->named_parameters()) {
      if (IsRouterParameter(item.key())) undecayed_routers.insert(item.value().unsafeGetTensorImpl());
    }
  }
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : params) {
    const bool decays = p.dim() >= 2 && !undecayed_routers.count(p.unsafeGetTensorImpl());
    (decays ? decay : no_decay).push_back(p);
  }
  const auto& opt = spec.optimizer();
  auto options = [&](double weight_decay) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(opt.lr())
            .betas({opt.beta1(), opt.beta2()})
            .eps(opt.eps())
            .weight_decay(weight_decay));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, options(opt.weight_decay()));
  groups.emplace_back(no_decay, options(0.0));
  return std::make_unique<FusedAdamW>(std::move(groups), torch::optim::AdamWOptions(opt.lr()));
}

bool IsRouterParameter(const std::string& name) {
  return name.rfind("router_cell.", 0) == 0 || name.find(".router.") != std::string::npos;
}

torch::Tensor SquaredGradientNorm(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : params) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  if (grads.empty()) return torch::zeros({}, torch::kDouble);
  torch::NoGradGuard no_grad;
  // One reduction per gradient (no squared temporary), summed in fp64 on their device.
  auto norms = torch::stack(at::_foreach_norm(grads, 2)).to(torch::kDouble);
  return norms.square().sum();
}

double LearningRate(const JobSpec& spec, int step) {
  const double peak = spec.optimizer().lr();
  const int warmup = spec.schedule().warmup_steps();
  const int total = spec.schedule().steps();
  if (step < warmup) return peak * (step + 1) / warmup;
  if (spec.schedule().lr_decay() == ScheduleSpec::CONSTANT) return peak;
  const double floor = peak * spec.schedule().min_lr_ratio();
  const int decay_steps = std::max(total - 1 - warmup, 1);
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / decay_steps);
  return floor + 0.5 * (peak - floor) * (1.0 + std::cos(M_PI * progress));
}

void SetLearningRate(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) {
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
  }
}

}  // namespace rmoe
