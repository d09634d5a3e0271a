#include "rmoe/train/parallel.h"

#include <cmath>

#include "rmoe/train/optimizer.h"

namespace rmoe {

void FillMissingGradients(const std::vector<torch::Tensor>& params) {
  for (auto p : params) {
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
  }
}

void ScaleGradientsToNorm(const std::vector<torch::Tensor>& params, const torch::Tensor& norm,
                          double max_norm) {
  if (max_norm <= 0) return;
  std::vector<torch::Tensor> grads;
  for (const auto& p : params) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  if (grads.empty()) return;
  torch::NoGradGuard no_grad;
  // Multiplying by exactly 1 when the norm is within bounds costs one pass over the
  // gradients, and spares the host a read of the norm.
  const auto scale = (max_norm / (norm + 1e-6)).clamp_max(1.0).to(grads.front().options());
  at::_foreach_mul_(grads, scale);
}

void ParallelRuntime::SynchronizeGradients(Transformer& model) {
  FillMissingGradients(model->parameters());
}

torch::Tensor ParallelRuntime::ClipGradients(Transformer& model, double max_norm) {
  const auto norm = SquaredGradientNorm(model->parameters()).sqrt();
  ScaleGradientsToNorm(model->parameters(), norm, max_norm);
  return norm;
}

}  // namespace rmoe
