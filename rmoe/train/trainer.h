// Training: AdamW with warm-up + cosine decay, gradient accumulation and clipping, periodic
// evaluation, checkpoints, a progress bar, a JSON-lines metrics file and the trained model
// saved for generation.
//
// The Trainer is a short loop over Step(), MaybeEvaluate() and MaybeCheckpoint(); what a
// multi-rank run adds comes in through ParallelRuntime (gradient sync, expert sharding) and
// Checkpointer (sharded checkpoints), both implemented in distributed/.
#pragma once

#include <atomic>
#include <cmath>
#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include <absl/status/statusor.h>
#include <torch/torch.h>

#include "proto/job.pb.h"
#include "rmoe/data/dataset.h"
#include "rmoe/data/sampler.h"
#include "rmoe/model/layers.h"
#include "rmoe/model/routing_stats.h"
#include "rmoe/model/transformer.h"
#include "rmoe/platform/host_report.h"
#include "rmoe/train/checkpointer.h"
#include "rmoe/train/device.h"
#include "rmoe/train/optimizer.h"
#include "rmoe/train/parallel.h"
#include "rmoe/train/progress.h"
#include "rmoe/train/tensorboard.h"

namespace rmoe {

struct TrainOptions {
  // Draw the bar even when stderr is not a terminal (one line per update).
  bool progress_to_non_terminal = true;
  bool quiet = false;  // no progress output at all (tests)
  // Continue from this checkpoint (or checkpoint root: its latest); empty = start afresh.
  std::string resume;
  // A fresh run where an earlier run left its model, metrics or checkpoints replaces them
  // (only what rmoe wrote; anything else in the way is refused). Without it, such a run
  // stops before training and says what is there.
  bool overwrite = false;
  // Set (e.g. by a SIGTERM handler) to stop after the step in hand, saving a checkpoint.
  const std::atomic<bool>* stop_requested = nullptr;
};

struct TrainSummary {
  int steps = 0;                 // the step training stopped at
  int first_step = 0;            // the step it started from (a resumed run's checkpoint)
  bool stopped_early = false;    // a stop request ended it (a checkpoint was saved)
  std::string last_checkpoint;   // the newest checkpoint this run wrote
  double final_train_loss = 0;   // mean LM loss (nats/token) of the last step
  double final_val_loss = 0;     // nats/token
  double best_val_loss = 0;
  double tokens_per_second = 0;  // training tokens over training time (evaluation excluded)
  double gflops_per_second = 0;  // model FLOPs (TrainingFlopsPerToken) x tokens/s, all ranks
  double fp32_probe_gflops = 0;  // the main rank's fp32 product probe (HostReport), 0 if none
  double wall_seconds = 0;
  int threads = 0;
  ParameterCounts parameters;
  std::string model_dir;
};

// What one optimizer step did.
struct StepResult {
  double lr = 0;
  // Kept on the device, and read back (ReadLosses) only at the steps that need the values:
  // the LM loss and the weighted auxiliary losses (means over the micro-batches; 0-dim
  // fp64) and the gradient norm before clipping.
  torch::Tensor device_loss, device_router_loss, device_grad_norm;
  // What ReadLosses found: the LM loss and auxiliary losses averaged over the ranks
  // (nats/token), the norm. NaN until read.
  double loss = NAN, router_loss = NAN, grad_norm = NAN;
  double seconds = 0;
  double forward_seconds = 0;  // the model's forward passes
  double router_seconds = 0;   // the routers' forward, all MoE layers
  double expert_seconds = 0;   // the experts' forward, all MoE layers
  double dispatch_seconds = 0;  // moving tokens to the experts and back, all MoE layers
  ModelOutput output;          // of the last micro-batch, for the routing metrics
};

// The steps since the last train record: the record reports their means.
struct LoggingWindow {
  int steps = 0;
  int64_t tokens = 0;
  double seconds = 0, comm_seconds = 0, forward_seconds = 0, router_seconds = 0;
  double expert_seconds = 0, dispatch_seconds = 0;

  void Add(const StepResult& step, int64_t step_tokens, double step_comm_seconds);
  double TokensPerSecond() const { return seconds > 0 ? tokens / seconds : 0; }
  // `total` (one of the sums above) per step.
  double PerStep(double total) const { return steps > 0 ? total / steps : 0; }
};

// Intra-op threads: runtime.num_threads, or every core this process may run on.
int ChooseThreadCount(const JobSpec& spec);

// runtime.keep_freed_memory: glibc keeps freed memory in its heap (no mmap, no trimming)
// so each step reuses the last step's large buffers instead of page-faulting new ones.
// Process-wide; lasts until exit.
void KeepFreedMemoryForReuse();

// The dtype runtime.precision asks matrix products to run in (LowPrecisionMatmulGuard), or
// none for fp32.
std::optional<torch::ScalarType> MatmulDtype(const JobSpec& spec);

// Where checkpoints go: checkpoint.directory, or <output_dir>/checkpoints.
std::string CheckpointRoot(const JobSpec& spec);

// Mean next-token cross-entropy of logits [B, T, V] against targets [B, T], as training
// and evaluation compute it.
torch::Tensor LanguageModelLoss(const torch::Tensor& logits, const torch::Tensor& targets);

// The evaluation's batches: schedule.eval_batches, fewer when the split holds fewer
// windows, so that each window counts once.
int EvalBatches(int eval_batches, int micro_batch_size, const EvalSampler& sampler);

// Mean next-token cross-entropy over `batches` micro-batches of the validation split, the
// batches spread over the ranks of `runtime`. `routing`, when given, accumulates the
// routing of every batch, summed over all ranks.
double Evaluate(Transformer& model, const EvalSampler& sampler, int micro_batch_size,
                int seq_len, int batches, ParallelRuntime& runtime,
                RoutingStatistics* routing = nullptr);

// One MoE layer in a train record (the step's last micro-batch).
struct MoELayerRecord {
  int layer = 0;  // the model layer index
  std::vector<int64_t> tokens_per_expert;
  double load_cv = 0;  // std/mean of tokens_per_expert
  int64_t dropped = 0, assignments = 0;
  double router_entropy = 0, load_balance_loss = 0, z_loss = 0;
};
std::vector<MoELayerRecord> MoELayerRecords(const ModelOutput& output, const ModelSpec& model);
// The per-MoE-layer part of a train record: tokens per expert, load, drops, entropy, losses.
std::string MoEMetricsJson(const std::vector<MoELayerRecord>& layers);

class Trainer {
 public:
  // Opens the data, builds the model and optimizer (restoring them when options.resume is
  // set) and the run's outputs. `runtime` null: a world of one. `checkpointer` null: no
  // checkpoints (then checkpoint.interval must be 0 and options.resume empty).
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const JobSpec& spec,
                                                         const TrainOptions& options,
                                                         ParallelRuntime* runtime,
                                                         Checkpointer* checkpointer);

  // Trains to schedule.steps (or a stop request), then saves the model.
  absl::StatusOr<TrainSummary> Run();

  // One optimizer step: accumulate gradients over the micro-batches, synchronise, clip,
  // update. Reads nothing back from the device.
  absl::StatusOr<StepResult> Step(int step);
  // Reads step `done`'s losses and gradient norm into `result` (one device-to-host copy;
  // collective: every rank calls it at the same steps). Fails when the loss is not finite.
  absl::Status ReadLosses(int done, StepResult& result);
  // After step `done`: a validation pass when eval_interval says so or it is the last.
  void MaybeEvaluate(int done);
  // Commits a background save once every rank has written it (a collective poll).
  absl::Status CommitFinishedSave();
  // After step `done`: saves when checkpoint.interval says so, at the last step, or when
  // `stop` asks for it.
  absl::Status MaybeCheckpoint(int done, bool stop);
  // The end of the loop at step `steps`: commits saves in flight, saves the model.
  absl::StatusOr<TrainSummary> Finish(int steps);

  Transformer& model() { return model_; }
  int first_step() const { return summary_.first_step; }

 private:
  Trainer(const JobSpec& spec, const TrainOptions& options, ParallelRuntime& runtime,
          Checkpointer* checkpointer);
  absl::Status OpenData();
  absl::Status OpenOutputs();
  absl::Status ClaimOutputDir();
  absl::Status BuildModel();
  absl::Status OpenMetrics();
  std::string ModelDir() const;
  std::string MetricsPath() const;
  void PrintHeader();
  void LogTrainRecord(int done, const StepResult& result);
  void ReportCheckpoints();
  bool StopRequested();

  bool CheckpointDue(int done) const;

  JobSpec spec_;  // with the vocabulary size resolved
  TrainOptions options_;
  ParallelRuntime& runtime_;
  Checkpointer* checkpointer_;
  std::chrono::steady_clock::time_point wall_start_ = std::chrono::steady_clock::now();

  std::optional<Dataset> dataset_;
  std::optional<TrainSampler> train_sampler_;
  std::optional<EvalSampler> eval_sampler_;
  int eval_batches_ = 1;
  torch::Device device_{torch::kCPU};  // runtime.device, resolved for this rank
  std::optional<TokenWindows> windows_;  // [micro_batch_size, seq_len + 1] tokens

  std::optional<LowPrecisionMatmulGuard> precision_;  // runtime.precision, while training
  Transformer model_{nullptr};
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  TrainingProgress position_;  // where the run started; updated at each save
  int64_t tokens_per_step_ = 0, samples_per_step_ = 0;
  double flops_per_token_ = 0;

  std::optional<HostReport> host_;          // the main rank's
  std::optional<MetricsWriter> metrics_;    // the main rank's
  std::optional<TensorBoardWriter> tensorboard_;  // the main rank's, with logging.tensorboard
  std::optional<ProgressBar> progress_;     // the main rank's, unless quiet
  bool interactive_ = false;                // stderr is a terminal

  LoggingWindow window_since_log_;
  double train_seconds_ = 0;
  double tokens_per_second_ = 0;  // of the last logging window
  double last_val_ = NAN, best_val_ = INFINITY;
  double last_train_loss_ = NAN;  // at the last step whose losses were read
  int last_finite_loss_step_ = 0;  // that step, when its loss was finite
  TrainSummary summary_;
};

// Trainer::Create + Run.
absl::StatusOr<TrainSummary> Train(const JobSpec& spec, const TrainOptions& options = {},
                                   ParallelRuntime* runtime = nullptr,
                                   Checkpointer* checkpointer = nullptr);

}  // namespace rmoe
