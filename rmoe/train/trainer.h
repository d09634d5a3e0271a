// Single-process training: AdamW with warm-up + cosine decay, gradient accumulation and
// clipping, periodic evaluation, a progress bar, a JSON-lines metrics file and the trained
// model saved for generation. Structured around one step function so that the
// expert-parallel issue only has to add gradient synchronisation and sharded data.
#pragma once

#include <atomic>
#include <string>

#include <absl/status/statusor.h>
#include <torch/torch.h>

#include "proto/job.pb.h"
#include "rmoe/data/sampler.h"
#include "rmoe/model/routing_stats.h"
#include "rmoe/model/transformer.h"
#include "rmoe/train/optimizer.h"
#include "rmoe/train/parallel.h"

namespace rmoe {

struct TrainOptions {
  // Draw the bar even when stderr is not a terminal (one line per update).
  bool progress_to_non_terminal = true;
  bool quiet = false;  // no progress output at all (tests)
  // Continue from this checkpoint (or checkpoint root: its latest); empty = start afresh.
  std::string resume;
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

// The learning rate at optimizer step `step` (0-based): linear warm-up to lr over
// warmup_steps, then cosine decay to min_lr_ratio * lr at the last step.
double LearningRate(const JobSpec& spec, int step);

// Mean next-token cross-entropy of logits [B, T, V] against targets [B, T], as training
// and evaluation compute it.
torch::Tensor LanguageModelLoss(const torch::Tensor& logits, const torch::Tensor& targets);

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

// Runs the job described by a validated spec, on this rank of `parallel` (null: a world
// of one). Errors (missing data, NaN loss, I/O) come back as a status naming what went wrong.
absl::StatusOr<TrainSummary> Train(const JobSpec& spec, const TrainOptions& options = {},
                                   ParallelRuntime* parallel = nullptr);

// Mean next-token cross-entropy over `batches` micro-batches of the validation split, the
// batches spread over the ranks of `runtime`. `routing`, when given, accumulates the
// routing of every batch, summed over all ranks.
double Evaluate(Transformer& model, const EvalSampler& sampler, int micro_batch_size,
                int seq_len, int batches, ParallelRuntime& runtime,
                RoutingStatistics* routing = nullptr);

}  // namespace rmoe
