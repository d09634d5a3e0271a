#include "rmoe/train/parallel.h"

#include <cmath>

#include "rmoe/train/optimizer.h"

namespace rmoe {

void FillMissingGradients(const std::vector<torch::Tensor>& params) {
  for (auto p : params) {
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
  }
}

void ScaleGradientsToNorm(const std::vector<torch::Tensor>& params, double norm,
                          double max_norm) {
  if (max_norm <= 0) return;
  const double scale = max_norm / (norm + 1e-6);
  if (scale >= 1.0) return;
  torch::NoGradGuard no_grad;
  for (const auto& p : params) {
    if (p.grad().defined()) p.grad().mul_(scale);
  }
}

void ParallelRuntime::SynchronizeGradients(Transformer& model) {
  FillMissingGradients(model->parameters());
}

double ParallelRuntime::ClipGradients(Transformer& model, double max_norm) {
  const double norm = std::sqrt(SquaredGradientNorm(model->parameters()));
  ScaleGradientsToNorm(model->parameters(), norm, max_norm);
  return norm;
}

}  // namespace rmoe
