#include "rmoe/train/trainer.h"

#include <malloc.h>
#include <unistd.h>

#include <climits>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <optional>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>

#include "rmoe/config/job_spec.h"
#include "rmoe/data/dataset.h"
#include "rmoe/model/fused_ops.h"
#include "rmoe/model/routing_stats.h"
#include "rmoe/platform/host_report.h"
#include "rmoe/train/model_io.h"
#include "rmoe/train/optimizer.h"
#include "rmoe/train/progress.h"

namespace rmoe {
namespace fs = std::filesystem;

double LearningRate(const JobSpec& spec, int step) {
  const double peak = spec.optimizer().lr();
  const int warmup = spec.schedule().warmup_steps();
  const int total = spec.schedule().steps();
  if (step < warmup) return peak * (step + 1) / warmup;
  const double floor = peak * spec.schedule().min_lr_ratio();
  const int decay_steps = std::max(total - 1 - warmup, 1);
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / decay_steps);
  return floor + 0.5 * (peak - floor) * (1.0 + std::cos(M_PI * progress));
}

int ChooseThreadCount(const JobSpec& spec) {
  if (spec.runtime().num_threads() > 0) return spec.runtime().num_threads();
  return UsableCores();
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

double ParallelRuntime::ClipGradients(Transformer& model, double max_norm) {
  const double norm = std::sqrt(SquaredGradientNorm(model->parameters()));
  ScaleGradientsToNorm(model->parameters(), norm, max_norm);
  return norm;
}

absl::StatusOr<std::string> ParallelRuntime::SaveCheckpoint(const JobSpec&,
                                                            const TrainingProgress&,
                                                            Transformer&,
                                                            torch::optim::Optimizer&) {
  return absl::UnimplementedError(
      "checkpoints are written by rmoe_train's distributed runtime (distributed/)");
}

absl::StatusOr<TrainingProgress> ParallelRuntime::LoadCheckpoint(const std::string&,
                                                                 const JobSpec&, Transformer&,
                                                                 torch::optim::Optimizer&) {
  return absl::UnimplementedError(
      "checkpoints are read by rmoe_train's distributed runtime (distributed/)");
}

std::string CheckpointRoot(const JobSpec& spec) {
  if (spec.checkpoint().has_directory()) return spec.checkpoint().directory();
  return (fs::path(spec.output_dir()) / "checkpoints").string();
}

void KeepFreedMemoryForReuse() {
  // Without mmap, a freed block stays in the heap for the next allocation of its size; the
  // trim threshold keeps glibc from handing the heap's top back to the kernel.
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, INT_MAX);
}

std::optional<torch::ScalarType> MatmulDtype(const JobSpec& spec) {
  if (spec.runtime().precision() == RuntimeSpec::BF16) return torch::kBFloat16;
  return std::nullopt;
}

torch::Tensor LanguageModelLoss(const torch::Tensor& logits, const torch::Tensor& targets) {
  return FusedCrossEntropy(logits.reshape({-1, logits.size(-1)}), targets.reshape({-1}));
}

namespace {

void SetLearningRate(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) {
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
  }
}

// [B, T+1] tokens -> (inputs [B, T], targets [B, T]).
std::pair<torch::Tensor, torch::Tensor> SplitInputsTargets(const torch::Tensor& window) {
  const int64_t t = window.size(1) - 1;
  return {window.narrow(1, 0, t), window.narrow(1, 1, t)};
}


std::string MoEMetricsJson(const ModelOutput& output, const ModelSpec& model) {
  std::string json = "[";
  size_t moe_index = 0;
  for (int layer = 0; layer < model.num_layers(); ++layer) {
    if (!IsMoELayer(model, layer)) continue;
    const auto& moe = output.moe[moe_index++];
    auto routed = moe.routed_per_expert.to(torch::kCPU);
    const std::vector<int64_t> per_expert(routed.data_ptr<int64_t>(),
                                          routed.data_ptr<int64_t>() + routed.numel());
    JsonObject record;
    record.Add("layer", static_cast<int64_t>(layer))
        .Add("tokens_per_expert", per_expert)
        .Add("load_cv", CoefficientOfVariation(std::vector<double>(per_expert.begin(), per_expert.end())))
        .Add("dropped", moe.dropped)
        .Add("assignments", moe.assignments)
        .Add("router_entropy", moe.router_entropy.item<double>())
        .Add("load_balance_loss", moe.load_balance.item<double>())
        .Add("z_loss", moe.z_loss.item<double>());
    if (json.size() > 1) json += ",";
    json += record.str();
  }
  return json + "]";
}

}  // namespace

double Evaluate(Transformer& model, const EvalSampler& sampler, int micro_batch_size,
                int seq_len, int batches, ParallelRuntime& runtime, RoutingStatistics* routing) {
  torch::NoGradGuard no_grad;
  model->eval();
  auto window = torch::empty({micro_batch_size, seq_len + 1}, torch::kLong);
  // Rank r takes batches r, r + W, ...; every rank runs the same number of forward passes,
  // because expert parallelism makes each of them a collective.
  const int world = runtime.world_size();
  const int per_rank = (batches + world - 1) / world;
  double total = 0;
  for (int i = 0; i < per_rank; ++i) {
    const int b = i * world + runtime.rank();
    sampler.FillBatch(b * micro_batch_size, micro_batch_size, window.data_ptr<int64_t>());
    auto [inputs, targets] = SplitInputsTargets(window);
    auto output = model->forward(inputs);
    total += LanguageModelLoss(output.logits, targets).item<double>();
    if (routing) routing->Add(output.moe);
  }
  model->train();
  if (routing) {
    auto counts = routing->Flatten();
    runtime.SumOverRanks(counts);
    routing->Unflatten(counts);
  }
  return runtime.Average(total / per_rank);
}

absl::StatusOr<TrainSummary> Train(const JobSpec& job, const TrainOptions& options,
                                   ParallelRuntime* parallel) {
  const auto wall_start = std::chrono::steady_clock::now();
  ParallelRuntime single_process;
  ParallelRuntime& runtime = parallel ? *parallel : single_process;
  JobSpec spec = job;
  auto dataset = Dataset::Open(spec.data().dataset_dir());
  if (!dataset.ok()) return dataset.status();
  auto vocab = ResolveVocabSize(spec);
  if (!vocab.ok()) return vocab.status();
  spec.mutable_model()->set_vocab_size(*vocab);

  TrainSummary summary;
  // Ranks on one machine share its cores.
  summary.threads = spec.runtime().num_threads() > 0
                        ? spec.runtime().num_threads()
                        : std::max(1, ChooseThreadCount(spec) / runtime.local_size());
  torch::set_num_threads(summary.threads);
  // What this run computes on, measured before training starts (about 0.2 s).
  std::optional<HostReport> host;
  if (runtime.is_main()) {
    host = DescribeHost(/*probe=*/true, spec.runtime().precision() == RuntimeSpec::BF16,
                        runtime.local_size());
  }

  torch::manual_seed(spec.seed());
  const LowPrecisionMatmulGuard precision(MatmulDtype(spec));
  if (spec.runtime().keep_freed_memory()) KeepFreedMemoryForReuse();

  const fs::path output_dir(spec.output_dir());
  std::optional<MetricsWriter> metrics;  // the main rank's
  if (runtime.is_main()) {
    std::error_code ec;
    fs::create_directories(output_dir, ec);
    if (ec) {
      return absl::InternalError(absl::StrCat("cannot create output_dir ", output_dir.string(),
                                              ": ", ec.message()));
    }
    auto writer = MetricsWriter::Open(spec.logging().has_metrics_file()
                                          ? spec.logging().metrics_file()
                                          : (output_dir / "metrics.jsonl").string(),
                                      /*append=*/!options.resume.empty());
    if (!writer.ok()) return writer.status();
    metrics.emplace(*std::move(writer));
    metrics->Write(host->Json());
  }

  Transformer model(spec.model());
  model->train();
  summary.parameters = model->CountParameters();
  runtime.PrepareModel(model);
  auto optimizer = MakeOptimizer(spec, model);
  TrainingProgress position;
  if (!options.resume.empty()) {
    auto restored = runtime.LoadCheckpoint(options.resume, spec, model, *optimizer);
    if (!restored.ok()) return restored.status();
    position = *restored;
    if (position.step >= spec.schedule().steps()) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "the checkpoint is at step %d and schedule.steps = %d: nothing left to train "
          "(raise schedule.steps to continue)",
          position.step, spec.schedule().steps()));
    }
  }
  const int first_step = static_cast<int>(position.step);
  summary.first_step = first_step;

  const auto& schedule = spec.schedule();
  const int batch = schedule.micro_batch_size(), seq_len = schedule.seq_len();
  const int accum = schedule.grad_accum_steps();
  // Every rank reads its own samples; together they read what one rank would read with a
  // world_size times larger batch (see TrainSampler).
  auto train_sampler =
      TrainSampler::Create(dataset->train(), seq_len, spec.seed(), runtime.rank(),
                           runtime.world_size(), static_cast<uint64_t>(position.consumed_samples));
  if (!train_sampler.ok()) return train_sampler.status();
  auto eval_sampler = EvalSampler::Create(dataset->val(), seq_len);
  if (!eval_sampler.ok()) return eval_sampler.status();
  // Each validation window counts once, even when the split is smaller than
  // eval_batches * micro_batch_size windows.
  const int eval_batches =
      std::max(1, std::min(schedule.eval_batches(), eval_sampler->num_windows() / batch));
  auto window = torch::empty({batch, seq_len + 1}, torch::kLong);

  const bool interactive = isatty(fileno(stderr));
  if (host && !options.quiet && !(interactive || options.progress_to_non_terminal)) {
    // No progress log: the warnings still reach the user.
    for (const auto& warning : host->warnings) std::fprintf(stderr, "warning: %s\n", warning.c_str());
  }
  std::optional<ProgressBar> progress;
  if (runtime.is_main() && !options.quiet && (interactive || options.progress_to_non_terminal)) {
    progress.emplace(schedule.steps(), interactive, first_step);
    for (const auto& line : host->Lines()) progress->Print(line);
    const auto& p = summary.parameters;
    progress->Print(absl::StrFormat(
        "%s: %.2fM parameters (%.2fM active per token, %.2fM in experts), %d ranks x %d "
        "threads, %d tokens/step; train %d tokens, val %d tokens",
        spec.name(), p.total / 1e6, p.active / 1e6, p.expert / 1e6, runtime.world_size(),
        summary.threads, batch * seq_len * accum * runtime.world_size(),
        dataset->train().size(), dataset->val().size()));
  }

  double last_val = position.last_val_loss, best_val = position.best_val_loss, train_seconds = 0;
  int64_t tokens_since_log = 0;
  double seconds_since_log = 0, comm_seconds_since_log = 0, tokens_per_second = 0;
  double forward_seconds_since_log = 0, router_seconds_since_log = 0;
  int steps_since_log = 0;
  const int64_t tokens_per_step =
      static_cast<int64_t>(batch) * seq_len * accum * runtime.world_size();
  const int64_t samples_per_step = static_cast<int64_t>(batch) * accum * runtime.world_size();
  const double flops_per_token = model->TrainingFlopsPerToken(seq_len);
  const int64_t consumed_at_start = position.consumed_samples;
  // Saves that committed (during a save, or later for a background one): progress, metrics.
  auto report_checkpoints = [&] {
    for (const auto& saved : runtime.TakeCheckpointReports()) {
      summary.last_checkpoint = saved.dir;
      if (metrics) metrics->Write(JsonObject()
                                      .Add("type", std::string("checkpoint"))
                                      .Add("step", saved.step)
                                      .Add("seconds", saved.seconds)
                                      .Add("stall_seconds", saved.stall_seconds)
                                      .Add("bytes", saved.bytes)
                                      .AddRaw("async", saved.async ? "true" : "false"));
      if (progress) {
        progress->Print(absl::StrFormat(
            "checkpoint saved to %s (%.2f s%s, %.1f MiB)", saved.dir, saved.seconds,
            saved.async ? absl::StrFormat(" in the background, training stalled %.2f s",
                                          saved.stall_seconds)
                        : "",
            saved.bytes / 1048576.0));
      }
    }
  };
  int step = first_step;
  for (; step < schedule.steps(); ++step) {
    const auto step_start = std::chrono::steady_clock::now();
    const double lr = LearningRate(spec, step);
    SetLearningRate(*optimizer, lr);
    optimizer->zero_grad(/*set_to_none=*/true);
    double step_loss = 0, step_router_loss = 0;
    ModelOutput output;
    for (int micro = 0; micro < accum; ++micro) {
      const uint64_t first_sample =
          (static_cast<uint64_t>(step - first_step) * accum + micro) * batch;
      train_sampler->FillBatch(first_sample, batch, window.data_ptr<int64_t>());
      auto [inputs, targets] = SplitInputsTargets(window);
      const auto forward_start = std::chrono::steady_clock::now();
      output = model->forward(inputs);
      forward_seconds_since_log +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - forward_start).count();
      for (const auto& moe : output.moe) router_seconds_since_log += moe.router_seconds;
      auto lm_loss = LanguageModelLoss(output.logits, targets);
      // Averaged over ranks so that every rank sees a divergence and stops together.
      const double lm_value = runtime.Average(lm_loss.item<double>());
      if (!std::isfinite(lm_value)) {
        return absl::InternalError(absl::StrFormat(
            "the training loss became %f at step %d (micro-batch %d, lr %.3g): training "
            "diverged; lower optimizer.lr, raise schedule.warmup_steps or keep "
            "optimizer.grad_clip on",
            lm_value, step, micro, lr));
      }
      ((lm_loss + output.router_loss) / accum).backward();
      step_loss += lm_value / accum;
      step_router_loss += output.router_loss.item<double>() / accum;
    }
    runtime.SynchronizeGradients(model);
    const double grad_norm = runtime.ClipGradients(model, spec.optimizer().grad_clip());
    optimizer->step();

    const double step_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
    train_seconds += step_seconds;
    tokens_since_log += tokens_per_step;
    seconds_since_log += step_seconds;
    comm_seconds_since_log += runtime.TakeCommunicationSeconds();
    ++steps_since_log;
    const int done = step + 1;
    const bool last = done == schedule.steps();
    const bool log_step = done % spec.logging().interval() == 0 || last;
    if (log_step) {
      tokens_per_second = tokens_since_log / seconds_since_log;
      const double step_s = seconds_since_log / steps_since_log;
      const double comm_s = comm_seconds_since_log / steps_since_log;
      const double forward_s = forward_seconds_since_log / steps_since_log;
      const double router_s = router_seconds_since_log / steps_since_log;
      forward_seconds_since_log = 0;
      router_seconds_since_log = 0;
      tokens_since_log = 0;
      seconds_since_log = 0;
      comm_seconds_since_log = 0;
      steps_since_log = 0;
      JsonObject record;
      record.Add("type", std::string("train"))
          .Add("step", static_cast<int64_t>(done))
          .Add("lr", lr)
          .Add("loss", step_loss)
          .Add("router_loss", step_router_loss)
          .Add("grad_norm", grad_norm)
          .Add("tokens_per_s", tokens_per_second)
          .Add("gflops_per_s", tokens_per_second * flops_per_token / 1e9)  // all ranks
          .Add("step_s", step_s)  // mean over the steps since the last record
          .Add("comm_s", comm_s)  // of which communication (this rank's view)
          .Add("forward_s", forward_s)  // of which the model's forward passes
          .Add("router_s", router_s)    // of which the routers' forward (all MoE layers)
          .Add("tokens", static_cast<int64_t>(done) * tokens_per_step)
          .Add("elapsed_s", train_seconds)
          .AddRaw("moe", MoEMetricsJson(output, spec.model()));
      if (metrics) metrics->Write(record);
    }
    const int eval_interval = schedule.eval_interval();
    if (last || (eval_interval > 0 && done % eval_interval == 0)) {
      RoutingStatistics routing(MoELayerIndices(spec.model()), spec.model().moe().num_experts());
      last_val = Evaluate(model, *eval_sampler, batch, seq_len, eval_batches, runtime, &routing);
      runtime.TakeCommunicationSeconds();  // evaluation's, not a training step's
      best_val = std::min(best_val, last_val);
      if (metrics) metrics->Write(JsonObject()
                         .Add("type", std::string("eval"))
                         .Add("step", static_cast<int64_t>(done))
                         .Add("val_loss", last_val)
                         .Add("val_ppl", std::exp(last_val))
                         .AddRaw("routing", routing.ToJson()));
      if (progress) {
        progress->Print(absl::StrFormat("step %d: val loss %.4f (ppl %.2f)", done, last_val,
                                        std::exp(last_val)));
      }
    }
    // A terminal gets a live bar; a log file gets one line per logging step.
    if (progress && (interactive || log_step)) {
      progress->Update(done, step_loss, last_val, tokens_per_second);
    }
    summary.final_train_loss = step_loss;

    // A background save commits at a step boundary once every rank has written its shard.
    if (auto polled = runtime.PollCheckpoint(); !polled.ok()) return polled;
    runtime.TakeCommunicationSeconds();  // the save's, not a training step's
    report_checkpoints();

    // Every rank must agree to stop (a signal may reach them at different times).
    const bool stop = options.stop_requested &&
                      runtime.Average(options.stop_requested->load() ? 1.0 : 0.0) > 0;
    const int interval = spec.checkpoint().interval();
    if (stop || (interval > 0 && (done % interval == 0 || last))) {
      position.step = done;
      position.consumed_samples = consumed_at_start + (done - first_step) * samples_per_step;
      position.best_val_loss = best_val;
      position.last_val_loss = last_val;
      auto saved = runtime.SaveCheckpoint(spec, position, model, *optimizer);
      if (!saved.ok()) return saved.status();
      runtime.TakeCommunicationSeconds();  // the save's, not a training step's
      report_checkpoints();
    }
    if (stop) {
      summary.stopped_early = true;
      ++step;
      break;
    }
  }
  // A save still in flight commits before the run ends (or stops).
  if (auto finished = runtime.FinishCheckpoints(); !finished.ok()) return finished;
  runtime.TakeCommunicationSeconds();
  report_checkpoints();
  if (progress) progress->Finish();

  summary.steps = step;
  summary.final_val_loss = last_val;
  summary.best_val_loss = best_val;
  summary.tokens_per_second = tokens_per_step * (step - first_step) / train_seconds;
  summary.gflops_per_second = summary.tokens_per_second * flops_per_token / 1e9;
  if (host) summary.fp32_probe_gflops = host->fp32_gflops;
  summary.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  if (summary.stopped_early) return summary;  // the checkpoint holds it; the run continues later
  summary.model_dir = (output_dir / "model").string();
  runtime.PrepareForSave(model);
  if (runtime.is_main()) {
    if (auto status = SaveModel(summary.model_dir, spec, model); !status.ok()) return status;
  }
  summary.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  return summary;
}

}  // namespace rmoe
