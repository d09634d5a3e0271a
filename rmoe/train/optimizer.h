// AdamW whose update is one fused pass per parameter (PyTorch's _fused_adamw_ kernel)
// instead of libtorch's six element-wise operators, each a full read and write of the
// parameter, its gradient or a moment. Same state (AdamWParamState), same options, same
// update rule as torch::optim::AdamW, so checkpoints and code that read the state work with
// either.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "proto/job.pb.h"
#include "rmoe/model/transformer.h"

namespace rmoe {

class FusedAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;
  torch::Tensor step(LossClosure closure = nullptr) override;
};

// AdamW as the spec says over `params` (`model`'s, or this rank's share of them with a
// sharded optimizer state), with decoupled weight decay on matrices only (decaying norms'
// gains toward zero hurts), and not on the routers' with optimizer.decay_router_weights off.
std::unique_ptr<torch::optim::AdamW> MakeOptimizer(const JobSpec& spec, Transformer& model,
                                                   const std::vector<torch::Tensor>& params);

// Whether the parameter named `name` (as named_parameters() names it) belongs to a router:
// a gate, projection, MLP or cell of a layer's router, or the shared layer-recurrent cell.
bool IsRouterParameter(const std::string& name);

// The learning rate at optimizer step `step` (0-based): linear warm-up to lr over
// warmup_steps, then cosine decay to min_lr_ratio * lr at the last step, or constant
// (schedule.lr_decay).
double LearningRate(const JobSpec& spec, int step);

// Sets every parameter group's learning rate.
void SetLearningRate(torch::optim::Optimizer& optimizer, double lr);

// Sum over `params` of the squared L2 norms of their gradients (undefined ones count 0): a
// 0-dim fp64 tensor on their device (on the CPU when there are none). Nothing is read back.
torch::Tensor SquaredGradientNorm(const std::vector<torch::Tensor>& params);

}  // namespace rmoe
