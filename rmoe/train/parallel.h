// What running on several ranks adds to a training step. The trainer calls these hooks at
// fixed points; this default is a world of one, and distributed/ implements the real thing
// (expert sharding, gradient averaging) without rmoe/ knowing about MPI or NCCL.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <torch/torch.h>

#include "proto/job.pb.h"
#include "rmoe/model/transformer.h"

namespace rmoe {

// Where a run stands: what a checkpoint holds besides the tensors.
struct TrainingProgress {
  int64_t step = 0;              // optimizer steps completed
  int64_t consumed_samples = 0;  // training samples read, over all ranks
  double best_val_loss = INFINITY;
  double last_val_loss = NAN;
};

// A checkpoint save that committed: for the progress line and the metrics file.
struct CheckpointReport {
  std::string dir;
  int64_t step = 0;
  double seconds = 0;        // wall time from the start of the save to its commit
  double stall_seconds = 0;  // of which the training loop waited (all of it when synchronous)
  int64_t bytes = 0;         // shard bytes of all ranks together
  bool async = false;        // written in the background (checkpoint.async_save)
};

// Gives every parameter that the backward passes did not reach a zero gradient. The
// optimizer's zero_grad leaves gradients undefined (LibTorch 2.x), and AdamW skips a
// parameter without one (no moment decay, no weight decay); filling zeros makes every
// parameter take the same update rule on every layout, since a multi-rank reduction needs a
// tensor from every rank for every parameter anyway.
inline void FillMissingGradients(const std::vector<torch::Tensor>& params) {
  for (auto p : params) {
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
  }
}

class ParallelRuntime {
 public:
  virtual ~ParallelRuntime() = default;

  virtual int rank() const { return 0; }
  virtual int world_size() const { return 1; }
  // Ranks on this machine: the cores are shared among them.
  virtual int local_size() const { return 1; }
  // The one rank that prints progress and writes metrics and the model.
  bool is_main() const { return rank() == 0; }

  // Called once on the freshly built model (the same on every rank: same seed).
  virtual void PrepareModel(Transformer& model) {}
  // Called after the backward passes of a step, before clipping. Every parameter has a
  // gradient afterwards (FillMissingGradients).
  virtual void SynchronizeGradients(Transformer& model) {
    FillMissingGradients(model->parameters());
  }
  // Global L2 norm of all gradients (each parameter counted once across ranks); scales
  // them so the norm is at most `max_norm` when max_norm > 0. Returns the norm before.
  virtual double ClipGradients(Transformer& model, double max_norm);
  // The mean of `value` over all ranks (every rank must call it).
  virtual double Average(double value) { return value; }
  // Sums `tensor` element-wise over all ranks, in place (every rank must call it).
  virtual void SumOverRanks(torch::Tensor& tensor) {}
  // Makes the main rank's `model` whole before it is saved (every rank must call it).
  virtual void PrepareForSave(Transformer& model) {}
  // Wall time spent in communication since the last call (for the compute/communication
  // split of a step).
  virtual double TakeCommunicationSeconds() { return 0; }

  // Sharded checkpoints of the model and optimizer (every rank must call these, at the
  // same step boundary). Finishes a save in flight first. Returns the checkpoint directory:
  // committed when this returns, or, with checkpoint.async_save, being written in the
  // background (the model and optimizer may change as soon as this returns) and committed
  // by a later PollCheckpoint or FinishCheckpoints.
  virtual absl::StatusOr<std::string> SaveCheckpoint(const JobSpec& job,
                                                     const TrainingProgress& progress,
                                                     Transformer& model,
                                                     torch::optim::Optimizer& optimizer);
  // At a step boundary (every rank): while a background save is in flight, the ranks agree
  // (one small all-reduce) whether every rank's write is done, and if so commit it. Errors
  // of the background write surface here or in FinishCheckpoints, on every rank.
  virtual absl::Status PollCheckpoint() { return absl::OkStatus(); }
  // Waits for a save in flight and commits it (every rank): before the end of training.
  virtual absl::Status FinishCheckpoints() { return absl::OkStatus(); }
  // The saves committed since the last call, oldest first.
  virtual std::vector<CheckpointReport> TakeCheckpointReports() { return {}; }
  // Restores model and optimizer from `path` (a checkpoint, or a checkpoint root to take its
  // latest), whatever layout saved it; refuses a checkpoint whose model differs from `job`'s.
  // Finishes a save in flight first.
  virtual absl::StatusOr<TrainingProgress> LoadCheckpoint(const std::string& path,
                                                          const JobSpec& job, Transformer& model,
                                                          torch::optim::Optimizer& optimizer);
};

// Scales `grads` by max_norm / (norm + 1e-6) when that is below 1 (as torch's
// clip_grad_norm_ does), given their global `norm`.
void ScaleGradientsToNorm(const std::vector<torch::Tensor>& params, double norm, double max_norm);

}  // namespace rmoe
