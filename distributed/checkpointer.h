// The trainer's Checkpointer over sharded checkpoints (checkpoint.h): every rank writes the
// rows it owns of the model and AdamW state, in the background when checkpoint.async_save
// is set, and a load reshards whatever layout saved them onto this one.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <torch/torch.h>

#include "distributed/checkpoint.h"
#include "distributed/parallel_runtime.h"
#include "rmoe/train/checkpointer.h"

namespace rmoe::distributed {

// For tests that must catch a save half-way (see CheckpointWriteOptions); 0 disables each.
struct CheckpointTestHooks {
  double pause_before_commit_seconds = 0;
  double delay_background_write_seconds = 0;
};

class ShardedCheckpointer : public Checkpointer {
 public:
  explicit ShardedCheckpointer(ProcessGroups groups, CheckpointTestHooks hooks = {});

  absl::StatusOr<std::string> Save(const JobSpec& job, const TrainingProgress& progress,
                                   Transformer& model, torch::optim::Optimizer& optimizer) override;
  absl::Status Poll() override;
  absl::Status Finish() override;
  std::vector<CheckpointReport> TakeReports() override;
  absl::StatusOr<TrainingProgress> Load(const std::string& path, const JobSpec& job,
                                        Transformer& model,
                                        torch::optim::Optimizer& optimizer) override;
  std::vector<std::string> FindEarlierRun(const JobSpec& job) override;
  absl::Status RemoveEarlierRun(const JobSpec& job) override;

 private:
  // The model's parameters and AdamW moments as this rank holds them, each named and placed
  // in its global tensor, every row marked for exactly one writer in the world. Moments only
  // of the parameters the optimizer updates (with a sharded optimizer state, this rank's
  // share, which only it writes). Creates empty moments first when `create_optimizer_state`
  // (before a load).
  std::vector<ShardedTensor> StateTensors(Transformer& model, torch::optim::Optimizer& optimizer,
                                          bool create_optimizer_state);
  // Whether every rank sees the files rank 0 writes in `dir` (a directory shared by every
  // node); checked once per directory, at the first save there or before a load. The error
  // names the hosts whose ranks do not.
  absl::Status CheckDirectoryShared(const std::string& dir);
  // Commits the save in flight (waiting for this rank's writer) and reports it.
  absl::Status FinishInFlight();
  int rank() const { return groups_.world->rank(); }

  ProcessGroups groups_;
  CheckpointTestHooks hooks_;
  // The save in flight (checkpoint.async_save): begun, not yet committed.
  struct InFlight {
    std::unique_ptr<PendingCheckpoint> pending;
    std::chrono::steady_clock::time_point start;
    double stall_seconds = 0;  // the training loop's share so far
    bool async = false;
  };
  std::optional<InFlight> in_flight_;
  std::vector<CheckpointReport> reports_;
  // Rank 0: the run id of the checkpoint root, from the first save on (CheckpointWriteOptions).
  std::string run_id_;
  std::set<std::string> checked_directories_;
};

}  // namespace rmoe::distributed
