// Saving and restoring a run's training state. The trainer calls these at step boundaries;
// distributed/ implements them with sharded, resharding checkpoints (ShardedCheckpointer),
// so rmoe/ never learns how the files are laid out or which ranks write them.
#pragma once

#include <cmath>
#include <cstdint>
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

// Every method but the last two is collective: every rank calls it at the same step boundary.
class Checkpointer {
 public:
  virtual ~Checkpointer() = default;

  // Saves model and optimizer after finishing a save in flight. Returns the checkpoint
  // directory: committed when this returns, or, with checkpoint.async_save, being written in
  // the background (the model and optimizer may change as soon as this returns) and
  // committed by a later Poll or Finish.
  virtual absl::StatusOr<std::string> Save(const JobSpec& job, const TrainingProgress& progress,
                                           Transformer& model,
                                           torch::optim::Optimizer& optimizer) = 0;
  // While a background save is in flight, the ranks agree whether every rank's write is
  // done, and if so commit it. Errors of the background write surface here or in Finish.
  virtual absl::Status Poll() = 0;
  // Waits for a save in flight and commits it: before the end of training.
  virtual absl::Status Finish() = 0;
  // The saves committed since the last call, oldest first.
  virtual std::vector<CheckpointReport> TakeReports() = 0;
  // Restores model and optimizer from `path` (a checkpoint, or a checkpoint root to take its
  // latest), whatever layout saved it; refuses a checkpoint whose model differs from `job`'s.
  virtual absl::StatusOr<TrainingProgress> Load(const std::string& path, const JobSpec& job,
                                                Transformer& model,
                                                torch::optim::Optimizer& optimizer) = 0;

  // Not collective; the main rank calls these before training. What an earlier run left
  // where `job` saves its checkpoints (paths; empty when nothing), and their removal for a
  // fresh run that replaces it, which refuses (deleting nothing) anything rmoe did not write.
  virtual std::vector<std::string> FindEarlierRun(const JobSpec& job) = 0;
  virtual absl::Status RemoveEarlierRun(const JobSpec& job) = 0;
};

}  // namespace rmoe
