// What running on several ranks adds to a training step. The trainer calls these hooks at
// fixed points; this default is a world of one, and distributed/ implements the real thing
// (expert sharding, gradient averaging) without rmoe/ knowing about MPI or NCCL.
// Checkpoints have their own interface (checkpointer.h).
#pragma once

#include <vector>

#include <torch/torch.h>

#include "rmoe/model/transformer.h"

namespace rmoe {

// Gives every parameter that the backward passes did not reach a zero gradient. The
// optimizer's zero_grad leaves gradients undefined (LibTorch 2.x), and AdamW skips a
// parameter without one (no moment decay, no weight decay); filling zeros makes every
// parameter take the same update rule on every layout, since a multi-rank reduction needs a
// tensor from every rank for every parameter anyway.
void FillMissingGradients(const std::vector<torch::Tensor>& params);

// Scales the gradients of `params` by min(1, max_norm / (norm + 1e-6)), as torch's
// clip_grad_norm_ does, given their global `norm` (a 0-dim tensor, on any device). The
// factor stays on the device: clipping never waits for the GPU. max_norm <= 0: no clipping.
void ScaleGradientsToNorm(const std::vector<torch::Tensor>& params, const torch::Tensor& norm,
                          double max_norm);

class ParallelRuntime {
 public:
  virtual ~ParallelRuntime() = default;

  virtual int rank() const { return 0; }
  virtual int world_size() const { return 1; }
  // Ranks on this machine: the cores are shared among them.
  virtual int local_size() const { return 1; }
  // This rank's index among them (which GPU it takes).
  virtual int local_rank() const { return 0; }
  // The one rank that prints progress and writes metrics and the model.
  bool is_main() const { return rank() == 0; }

  // Keeps this rank's share of the experts of the freshly built model (the same on every
  // rank: same seed) and routes tokens to the other ranks' experts.
  virtual void ShardExperts(Transformer& model) {}
  // The inverse of ShardExperts: every rank holds every expert again, as a saved model
  // needs (every rank must call it).
  virtual void GatherExperts(Transformer& model) {}
  // The parameters whose optimizer state this rank keeps and which its optimizer updates:
  // all of them, or with `shard` (parallel.shard_optimizer_state) this rank's share, every
  // parameter being some rank's. Call after ShardExperts, once.
  virtual std::vector<torch::Tensor> OptimizerParameters(Transformer& model, bool shard) {
    return model->parameters();
  }
  // After the optimizer step: every rank gets the parameters other ranks updated (with a
  // sharded optimizer state; nothing to do otherwise).
  virtual void ShareUpdatedParameters(Transformer& model) {}
  // Called after the backward passes of a step, before clipping. Every parameter has a
  // gradient afterwards (FillMissingGradients).
  virtual void SynchronizeGradients(Transformer& model);
  // Global L2 norm of all gradients (each parameter counted once across ranks); scales
  // them so the norm is at most `max_norm` when max_norm > 0. Returns the norm before, a
  // 0-dim fp64 tensor on the gradients' device (read it only when it is needed).
  virtual torch::Tensor ClipGradients(Transformer& model, double max_norm);
  // The mean of `value` over all ranks (every rank must call it).
  virtual double Average(double value) { return value; }
  // Sums `tensor` element-wise over all ranks, in place (every rank must call it). Any
  // device: host and device tensors each travel over their own communicator.
  virtual void SumOverRanks(torch::Tensor& tensor) {}
  // Wall time spent in communication since the last call (for the compute/communication
  // split of a step).
  virtual double TakeCommunicationSeconds() { return 0; }
};

}  // namespace rmoe
