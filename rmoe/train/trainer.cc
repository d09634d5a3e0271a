#include "rmoe/train/trainer.h"

#include <malloc.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cmath>
#include <filesystem>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>

#include "rmoe/config/job_spec.h"
#include "rmoe/config/resources.h"
#include "rmoe/data/subprocess_tokenizer.h"
#include "rmoe/model/fused_ops.h"
#include "rmoe/platform/cpu_features.h"
#include "rmoe/train/model_io.h"
#include "rmoe/util/ownership.h"

namespace rmoe {
namespace fs = std::filesystem;
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// [B, T+1] tokens -> (inputs [B, T], targets [B, T]).
std::pair<torch::Tensor, torch::Tensor> SplitInputsTargets(const torch::Tensor& window) {
  const int64_t t = window.size(1) - 1;
  return {window.narrow(1, 0, t), window.narrow(1, 1, t)};
}

}  // namespace

int ChooseThreadCount(const JobSpec& spec) {
  if (spec.runtime().num_threads() > 0) return spec.runtime().num_threads();
  return UsableCores();
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

std::vector<MoELayerRecord> MoELayerRecords(const ModelOutput& output, const ModelSpec& model) {
  std::vector<MoELayerRecord> records;
  size_t moe_index = 0;
  for (int layer = 0; layer < model.num_layers(); ++layer) {
    if (!IsMoELayer(model, layer)) continue;
    const auto& moe = output.moe[moe_index++];
    auto routed = moe.routed_per_expert.to(torch::kCPU);
    MoELayerRecord r;
    r.layer = layer;
    r.tokens_per_expert.assign(routed.data_ptr<int64_t>(),
                               routed.data_ptr<int64_t>() + routed.numel());
    r.load_cv = CoefficientOfVariation(
        std::vector<double>(r.tokens_per_expert.begin(), r.tokens_per_expert.end()));
    r.dropped = moe.dropped;
    r.assignments = moe.assignments;
    r.router_entropy = moe.router_entropy.item<double>();
    r.load_balance_loss = moe.load_balance.item<double>();
    r.z_loss = moe.z_loss.item<double>();
    records.push_back(std::move(r));
  }
  return records;
}

std::string MoEMetricsJson(const std::vector<MoELayerRecord>& layers) {
  std::string json = "[";
  for (const auto& r : layers) {
    JsonObject record;
    record.Add("layer", static_cast<int64_t>(r.layer))
        .Add("tokens_per_expert", r.tokens_per_expert)
        .Add("load_cv", r.load_cv)
        .Add("dropped", r.dropped)
        .Add("assignments", r.assignments)
        .Add("router_entropy", r.router_entropy)
        .Add("load_balance_loss", r.load_balance_loss)
        .Add("z_loss", r.z_loss);
    if (json.size() > 1) json += ",";
    json += record.str();
  }
  return json + "]";
}

int EvalBatches(int eval_batches, int micro_batch_size, const EvalSampler& sampler) {
  return std::max(1, std::min(eval_batches, sampler.num_windows() / micro_batch_size));
}

double Evaluate(Transformer& model, const EvalSampler& sampler, int micro_batch_size,
                int seq_len, int batches, ParallelRuntime& runtime, RoutingStatistics* routing) {
  torch::NoGradGuard no_grad;
  model->eval();
  TokenWindows windows(micro_batch_size, seq_len, DeviceOf(model));
  // Rank r takes batches r, r + W, ...; every rank runs the same number of forward passes,
  // because expert parallelism makes each of them a collective.
  const int world = runtime.world_size();
  const int per_rank = (batches + world - 1) / world;
  torch::Tensor total = torch::zeros({1}, torch::TensorOptions(torch::kDouble).device(DeviceOf(model)));
  for (int i = 0; i < per_rank; ++i) {
    const int b = i * world + runtime.rank();
    auto window = windows.Next([&](int64_t* tokens) {
      sampler.FillBatch(b * micro_batch_size, micro_batch_size, tokens);
    });
    auto [inputs, targets] = SplitInputsTargets(window);
    auto output = model->forward(inputs);
    total += LanguageModelLoss(output.logits, targets).to(torch::kDouble);
    if (routing) routing->Add(output.moe);
  }
  model->train();
  if (routing) {
    auto counts = routing->Flatten();
    runtime.SumOverRanks(counts);
    routing->Unflatten(counts);
  }
  runtime.SumOverRanks(total);
  return total.item<double>() / (static_cast<double>(per_rank) * world);
}

void LoggingWindow::Add(const StepResult& step, int64_t step_tokens, double step_comm_seconds) {
  ++steps;
  tokens += step_tokens;
  seconds += step.seconds;
  comm_seconds += step_comm_seconds;
  forward_seconds += step.forward_seconds;
  router_seconds += step.router_seconds;
  expert_seconds += step.expert_seconds;
  dispatch_seconds += step.dispatch_seconds;
}

// ---------------------------------------------------------------------------------------
// Set-up

Trainer::Trainer(const JobSpec& spec, const TrainOptions& options, ParallelRuntime& runtime,
                 Checkpointer* checkpointer)
    : spec_(spec), options_(options), runtime_(runtime), checkpointer_(checkpointer) {}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const JobSpec& spec,
                                                         const TrainOptions& options,
                                                         ParallelRuntime* runtime,
                                                         Checkpointer* checkpointer) {
  static ParallelRuntime world_of_one;
  if (checkpointer == nullptr && (spec.checkpoint().interval() > 0 || !options.resume.empty())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint.interval = ", spec.checkpoint().interval(),
        options.resume.empty() ? "" : " and a resume path",
        " need a checkpointer, and this trainer has none: train with rmoe_train, or set "
        "checkpoint.interval = 0"));
  }
  std::unique_ptr<Trainer> trainer(
      new Trainer(spec, options, runtime ? *runtime : world_of_one, checkpointer));
  // First: a missing GPU is known in a second, before the dataset is read.
  auto device = ResolveDevice(spec.runtime().device(), trainer->runtime_.local_rank());
  if (!device.ok()) return device.status();
  trainer->device_ = *device;
  if (auto status = trainer->OpenData(); !status.ok()) return status;
  // Before the first large allocation or any output: a job that cannot fit stops here.
  // (The estimate is of host memory: on a GPU the host holds little more than the model
  // while it is built.)
  if (trainer->device_.is_cpu()) {
    if (auto status = CheckTrainingMemory(trainer->spec_, trainer->runtime_.local_size(),
                                          AvailableMemoryBytes(),
                                          trainer->runtime_.world_size());
        !status.ok()) {
      return status;
    }
  }
  if (auto status = trainer->OpenOutputs(); !status.ok()) return status;
  if (auto status = trainer->BuildModel(); !status.ok()) return status;
  if (auto status = trainer->OpenMetrics(); !status.ok()) return status;
  trainer->PrintHeader();
  return trainer;
}

absl::Status Trainer::OpenData() {
  auto dataset = Dataset::Open(spec_.data().dataset_dir());
  if (!dataset.ok()) return dataset.status();
  dataset_.emplace(*std::move(dataset));
  if (runtime_.is_main()) {
    // A meta.pbtxt whose vocabulary or separator disagrees with the tokenizer would train a
    // model that generation refuses afterwards: refuse it now.
    auto tokenizer = OpenTokenizer(dataset_->meta(), spec_.data().dataset_dir());
    if (!tokenizer.ok()) return tokenizer.status();
  }
  auto vocab = ResolveVocabSize(spec_);
  if (!vocab.ok()) return vocab.status();
  spec_.mutable_model()->set_vocab_size(*vocab);
  const auto& schedule = spec_.schedule();
  auto eval_sampler = EvalSampler::Create(dataset_->val(), schedule.seq_len());
  if (!eval_sampler.ok()) return eval_sampler.status();
  eval_sampler_.emplace(*std::move(eval_sampler));
  eval_batches_ = EvalBatches(schedule.eval_batches(), schedule.micro_batch_size(), *eval_sampler_);
  windows_.emplace(schedule.micro_batch_size(), schedule.seq_len(), device_);
  const int64_t world = runtime_.world_size();
  samples_per_step_ =
      static_cast<int64_t>(schedule.micro_batch_size()) * schedule.grad_accum_steps() * world;
  tokens_per_step_ = samples_per_step_ * schedule.seq_len();
  return absl::OkStatus();
}

absl::Status Trainer::OpenOutputs() {
  // Ranks on one machine share its cores.
  summary_.threads = spec_.runtime().num_threads() > 0
                         ? spec_.runtime().num_threads()
                         : std::max(1, ChooseThreadCount(spec_) / runtime_.local_size());
  torch::set_num_threads(summary_.threads);
  if (!runtime_.is_main()) return absl::OkStatus();
  // What this run computes on, measured before training starts (about 0.2 s).
  host_ = DescribeHost(/*probe=*/true, spec_.runtime().precision() == RuntimeSpec::BF16,
                       runtime_.local_size());
  return ClaimOutputDir();
}

// The output directory, created and marked when new. A fresh run must not mix its results
// with an earlier run's: it stops unless told to replace them. Whatever rmoe did not write is
// never replaced, and a foreign model directory is refused now rather than after training.
absl::Status Trainer::ClaimOutputDir() {
  const std::string output_dir = spec_.output_dir();
  std::error_code ec;
  if (!fs::exists(output_dir, ec)) {
    const fs::path parent = fs::path(output_dir).lexically_normal().parent_path();
    if (!parent.empty()) fs::create_directories(parent, ec);
    auto created = CreateOwnedDirectory(output_dir, {kOutputDirKind, NewRunId()});
    if (!created.ok() && !absl::IsAlreadyExists(created)) {
      return absl::Status(created.code(), absl::StrCat("output_dir: ", created.message()));
    }
  } else if (!fs::is_directory(output_dir, ec)) {
    return absl::FailedPreconditionError(
        absl::StrCat("output_dir ", output_dir, " exists and is not a directory"));
  }
  const std::string model_dir = ModelDir();
  const bool has_model = fs::exists(fs::symlink_status(model_dir, ec));
  if (has_model && !IsOwned(model_dir, kModelKind)) {
    return absl::FailedPreconditionError(absl::StrCat(
        model_dir, " exists and rmoe did not write it (it has no ", kOwnerMarkName,
        " mark), so the trained model could not be saved there; move it away or choose another "
        "output_dir"));
  }
  if (!options_.resume.empty()) return absl::OkStatus();
  // Before anything is removed: a metrics path that names someone else's file stops here.
  if (auto status = MetricsWriter::CheckMetricsReplaceable(MetricsPath()); !status.ok()) return status;
  std::vector<std::string> earlier;
  if (has_model) earlier.push_back(model_dir);
  if (fs::file_size(MetricsPath(), ec) > 0 && !ec) earlier.push_back(MetricsPath());
  const std::vector<std::string> events = FindTensorBoardFiles(output_dir);
  earlier.insert(earlier.end(), events.begin(), events.end());
  if (checkpointer_ != nullptr) {
    for (const auto& path : checkpointer_->FindEarlierRun(spec_)) earlier.push_back(path);
  }
  if (earlier.empty()) return absl::OkStatus();
  if (!options_.overwrite) {
    return absl::FailedPreconditionError(absl::StrCat(
        "output_dir ", output_dir, " holds an earlier run (", absl::StrJoin(earlier, ", "),
        "): pass --resume to continue it, --overwrite to replace it, or choose another "
        "output_dir"));
  }
  if (checkpointer_ != nullptr) {
    if (auto status = checkpointer_->RemoveEarlierRun(spec_); !status.ok()) return status;
  }
  if (auto status = RemoveOwnedDirectory(model_dir, kModelKind); !status.ok()) return status;
  for (const auto& path : events) {
    if (!fs::remove(path, ec) && ec) return ErrnoStatus(ec.value(), "cannot remove", path);
  }
  std::fprintf(stderr, "rmoe: --overwrite: replacing the earlier run in %s (%s)\n",
               output_dir.c_str(), absl::StrJoin(earlier, ", ").c_str());
  return absl::OkStatus();
}

std::string Trainer::ModelDir() const { return (fs::path(spec_.output_dir()) / "model").string(); }

std::string Trainer::MetricsPath() const {
  return spec_.logging().has_metrics_file()
             ? spec_.logging().metrics_file()
             : (fs::path(spec_.output_dir()) / "metrics.jsonl").string();
}

// After BuildModel: a resumed run's metrics continue from its checkpoint's step.
absl::Status Trainer::OpenMetrics() {
  if (!runtime_.is_main()) return absl::OkStatus();
  auto writer = MetricsWriter::Open(MetricsPath(), options_.resume.empty() ? -1 : position_.step);
  if (!writer.ok()) return writer.status();
  metrics_.emplace(*std::move(writer));
  metrics_->Write(host_->Json());
  if (spec_.logging().tensorboard()) {
    auto events = TensorBoardWriter::Open(spec_.output_dir(),
                                          options_.resume.empty() ? -1 : position_.step);
    if (!events.ok()) return events.status();
    tensorboard_.emplace(*std::move(events));
  }
  return absl::OkStatus();
}

absl::Status Trainer::BuildModel() {
  torch::manual_seed(spec_.seed());
  precision_.emplace(MatmulDtype(spec_));
  if (spec_.runtime().keep_freed_memory() && device_.is_cpu()) KeepFreedMemoryForReuse();
  // Built on the CPU, where the same seed gives every rank the same weights, then moved.
  model_ = Transformer(spec_.model());
  model_->train();
  model_->set_recompute(spec_.runtime().recompute());
  summary_.parameters = model_->CountParameters();
  flops_per_token_ = model_->TrainingFlopsPerToken(spec_.schedule().seq_len());
  runtime_.ShardExperts(model_);
  model_->to(device_);
  optimizer_ = MakeOptimizer(
      spec_, model_, runtime_.OptimizerParameters(model_, spec_.parallel().shard_optimizer_state()));
  if (!options_.resume.empty()) {
    auto restored = checkpointer_->Load(options_.resume, spec_, model_, *optimizer_);
    if (!restored.ok()) return restored.status();
    position_ = *restored;
    if (position_.step >= spec_.schedule().steps()) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "the checkpoint is at step %d and schedule.steps = %d: nothing left to train "
          "(raise schedule.steps to continue)",
          position_.step, spec_.schedule().steps()));
    }
  }
  summary_.first_step = static_cast<int>(position_.step);
  last_val_ = position_.last_val_loss;
  best_val_ = position_.best_val_loss;
  // Every rank reads its own samples; together they read what one rank would read with a
  // world_size times larger batch (see TrainSampler).
  auto train_sampler = TrainSampler::Create(
      dataset_->train(), spec_.schedule().seq_len(), spec_.seed(), runtime_.rank(),
      runtime_.world_size(), static_cast<uint64_t>(position_.consumed_samples));
  if (!train_sampler.ok()) return train_sampler.status();
  train_sampler_.emplace(*std::move(train_sampler));
  return absl::OkStatus();
}

void Trainer::PrintHeader() {
  interactive_ = isatty(fileno(stderr));
  const bool show_progress = !options_.quiet && (interactive_ || options_.progress_to_non_terminal);
  if (host_ && !options_.quiet && !show_progress) {
    // No progress log: the warnings still reach the user.
    for (const auto& warning : host_->warnings) std::fprintf(stderr, "warning: %s\n", warning.c_str());
  }
  if (!runtime_.is_main() || !show_progress) return;
  progress_.emplace(spec_.schedule().steps(), interactive_, summary_.first_step);
  for (const auto& line : host_->Lines()) progress_->Print(line);
  const auto& p = summary_.parameters;
  progress_->Print(absl::StrFormat(
      "%s: %.2fM parameters (%.2fM active per token, %.2fM in experts), %d ranks x %d "
      "threads, %d tokens/step; train %d tokens, val %d tokens",
      spec_.name(), p.total / 1e6, p.active / 1e6, p.expert / 1e6, runtime_.world_size(),
      summary_.threads, tokens_per_step_, dataset_->train().size(), dataset_->val().size()));
}

// ---------------------------------------------------------------------------------------
// The loop

absl::StatusOr<TrainSummary> Train(const JobSpec& spec, const TrainOptions& options,
                                   ParallelRuntime* runtime, Checkpointer* checkpointer) {
  auto trainer = Trainer::Create(spec, options, runtime, checkpointer);
  if (!trainer.ok()) return trainer.status();
  return (*trainer)->Run();
}

absl::StatusOr<TrainSummary> Trainer::Run() {
  const int last_step = spec_.schedule().steps();
  int step = summary_.first_step;
  while (step < last_step) {
    auto result = Step(step);
    if (!result.ok()) return result.status();
    const int done = ++step;
    window_since_log_.Add(*result, tokens_per_step_, runtime_.TakeCommunicationSeconds());
    const bool log_step = done % spec_.logging().interval() == 0 || done == last_step;
    const bool stop = StopRequested();
    // Losses are read where they are reported, and before every save, so that a diverged
    // model never overwrites a good checkpoint.
    if (log_step || (checkpointer_ != nullptr && (stop || CheckpointDue(done)))) {
      if (auto status = ReadLosses(done, *result); !status.ok()) return status;
    }
    if (log_step) LogTrainRecord(done, *result);
    MaybeEvaluate(done);
    // A terminal gets a live bar; a log file gets one line per logging step.
    if (progress_ && (interactive_ || log_step)) {
      progress_->Update(done, last_train_loss_, last_val_, tokens_per_second_);
    }
    if (auto status = CommitFinishedSave(); !status.ok()) return status;
    if (auto status = MaybeCheckpoint(done, stop); !status.ok()) return status;
    if (stop) {
      summary_.stopped_early = true;
      break;
    }
  }
  return Finish(step);
}

absl::StatusOr<StepResult> Trainer::Step(int step) {
  const auto step_start = std::chrono::steady_clock::now();
  const auto& schedule = spec_.schedule();
  const int batch = schedule.micro_batch_size(), accum = schedule.grad_accum_steps();
  StepResult result;
  result.lr = LearningRate(spec_, step);
  SetLearningRate(*optimizer_, result.lr);
  // The model's, not the optimizer's: with a sharded optimizer state it holds only this
  // rank's share, and the other gradients would accumulate across steps.
  model_->zero_grad(/*set_to_none=*/true);
  const auto on_device = torch::TensorOptions(torch::kDouble).device(device_);
  result.device_loss = torch::zeros({}, on_device);
  result.device_router_loss = torch::zeros({}, on_device);
  for (int micro = 0; micro < accum; ++micro) {
    const uint64_t first_sample =
        (static_cast<uint64_t>(step - summary_.first_step) * accum + micro) * batch;
    auto window = windows_->Next([&](int64_t* tokens) {
      train_sampler_->FillBatch(first_sample, batch, tokens);
    });
    auto [inputs, targets] = SplitInputsTargets(window);
    const auto forward_start = std::chrono::steady_clock::now();
    result.output = model_->forward(inputs);
    result.forward_seconds += SecondsSince(forward_start);
    for (const auto& moe : result.output.moe) {
      result.router_seconds += moe.router_seconds;
      result.expert_seconds += moe.expert_seconds;
      result.dispatch_seconds += moe.dispatch_seconds;
    }
    auto lm_loss = LanguageModelLoss(result.output.logits, targets);
    ((lm_loss + result.output.router_loss) / accum).backward();
    result.device_loss += lm_loss.detach().to(torch::kDouble) / accum;
    result.device_router_loss += result.output.router_loss.detach().to(torch::kDouble) / accum;
  }
  runtime_.SynchronizeGradients(model_);
  result.device_grad_norm = runtime_.ClipGradients(model_, spec_.optimizer().grad_clip());
  optimizer_->step();
  runtime_.ShareUpdatedParameters(model_);
  result.seconds = SecondsSince(step_start);
  train_seconds_ += result.seconds;
  return result;
}

// The one read-back of a step (collective: every rank calls it at the same steps).
absl::Status Trainer::ReadLosses(int done, StepResult& result) {
  auto losses = torch::stack({result.device_loss, result.device_router_loss});
  runtime_.SumOverRanks(losses);
  const auto host =
      torch::cat({losses / runtime_.world_size(), result.device_grad_norm.reshape({1})})
          .to(torch::kCPU);
  result.loss = host[0].item<double>();
  result.router_loss = host[1].item<double>();
  result.grad_norm = host[2].item<double>();
  // Every rank sees the same averaged value, so they all stop together.
  if (!std::isfinite(result.loss)) {
    return absl::InternalError(absl::StrFormat(
        "the training loss became %f by step %d (last read finite at step %d; lr %.3g): "
        "training diverged; lower optimizer.lr, raise schedule.warmup_steps or keep "
        "optimizer.grad_clip on",
        result.loss, done, last_finite_loss_step_, result.lr));
  }
  last_finite_loss_step_ = done;
  summary_.final_train_loss = last_train_loss_ = result.loss;
  return absl::OkStatus();
}

void Trainer::LogTrainRecord(int done, const StepResult& result) {
  const LoggingWindow window = std::exchange(window_since_log_, {});
  tokens_per_second_ = window.TokensPerSecond();
  if (!metrics_) return;
  const std::vector<MoELayerRecord> moe = MoELayerRecords(result.output, spec_.model());
  if (tensorboard_) {
    std::vector<std::pair<std::string, double>> scalars = {
        {"train/loss", result.loss},           {"train/router_loss", result.router_loss},
        {"train/lr", result.lr},               {"train/grad_norm", result.grad_norm},
        {"train/tokens_per_s", tokens_per_second_}};
    for (const auto& layer : moe) {
      const std::string prefix = absl::StrCat("moe/layer_", layer.layer, "/");
      scalars.push_back({prefix + "load_cv", layer.load_cv});
      scalars.push_back({prefix + "router_entropy", layer.router_entropy});
    }
    tensorboard_->WriteScalars(done, scalars);
  }
  metrics_->Write(JsonObject()
                      .Add("type", std::string("train"))
                      .Add("step", static_cast<int64_t>(done))
                      .Add("lr", result.lr)
                      .Add("loss", result.loss)
                      .Add("router_loss", result.router_loss)
                      .Add("grad_norm", result.grad_norm)
                      .Add("tokens_per_s", tokens_per_second_)
                      .Add("gflops_per_s", tokens_per_second_ * flops_per_token_ / 1e9)
                      // Means over the steps since the last record: step time, and of it
                      // communication (this rank's view), forward passes, and in them the
                      // routers, the experts and the token dispatch and combine.
                      .Add("step_s", window.PerStep(window.seconds))
                      .Add("comm_s", window.PerStep(window.comm_seconds))
                      .Add("forward_s", window.PerStep(window.forward_seconds))
                      .Add("router_s", window.PerStep(window.router_seconds))
                      .Add("experts_s", window.PerStep(window.expert_seconds))
                      .Add("dispatch_s", window.PerStep(window.dispatch_seconds))
                      .Add("tokens", static_cast<int64_t>(done) * tokens_per_step_)
                      .Add("elapsed_s", train_seconds_)
                      .AddRaw("moe", MoEMetricsJson(moe)));
}

void Trainer::MaybeEvaluate(int done) {
  const int interval = spec_.schedule().eval_interval();
  if (done != spec_.schedule().steps() && !(interval > 0 && done % interval == 0)) return;
  const auto& schedule = spec_.schedule();
  RoutingStatistics routing(MoELayerIndices(spec_.model()), spec_.model().moe().num_experts());
  last_val_ = Evaluate(model_, *eval_sampler_, schedule.micro_batch_size(), schedule.seq_len(),
                       eval_batches_, runtime_, &routing);
  runtime_.TakeCommunicationSeconds();  // evaluation's, not a training step's
  best_val_ = std::min(best_val_, last_val_);
  if (metrics_) {
    metrics_->Write(JsonObject()
                        .Add("type", std::string("eval"))
                        .Add("step", static_cast<int64_t>(done))
                        .Add("val_loss", last_val_)
                        .Add("val_ppl", std::exp(last_val_))
                        .AddRaw("routing", routing.ToJson()));
  }
  if (tensorboard_) {
    std::vector<std::pair<std::string, double>> scalars = {{"val/loss", last_val_},
                                                           {"val/ppl", std::exp(last_val_)}};
    for (const auto& layer : routing.Layers()) {
      const std::string prefix = absl::StrCat("val_moe/layer_", layer.layer, "/");
      scalars.push_back({prefix + "load_cv", layer.load_cv});
      scalars.push_back({prefix + "entropy", layer.entropy});
    }
    tensorboard_->WriteScalars(done, scalars);
  }
  if (progress_) {
    progress_->Print(absl::StrFormat("step %d: val loss %.4f (ppl %.2f)", done, last_val_,
                                     std::exp(last_val_)));
  }
}

bool Trainer::StopRequested() {
  // Every rank must agree to stop (a signal may reach them at different times).
  return options_.stop_requested &&
         runtime_.Average(options_.stop_requested->load() ? 1.0 : 0.0) > 0;
}

// ---------------------------------------------------------------------------------------
// Checkpoints and the end of the run

absl::Status Trainer::CommitFinishedSave() {
  if (checkpointer_ == nullptr) return absl::OkStatus();
  // A background save commits at a step boundary once every rank has written its shard.
  if (auto polled = checkpointer_->Poll(); !polled.ok()) return polled;
  runtime_.TakeCommunicationSeconds();  // the save's, not a training step's
  ReportCheckpoints();
  return absl::OkStatus();
}

bool Trainer::CheckpointDue(int done) const {
  const int interval = spec_.checkpoint().interval();
  return interval > 0 && (done % interval == 0 || done == spec_.schedule().steps());
}

absl::Status Trainer::MaybeCheckpoint(int done, bool stop) {
  if ((!stop && !CheckpointDue(done)) || checkpointer_ == nullptr) return absl::OkStatus();
  position_.consumed_samples += (done - position_.step) * samples_per_step_;
  position_.step = done;
  position_.best_val_loss = best_val_;
  position_.last_val_loss = last_val_;
  auto saved = checkpointer_->Save(spec_, position_, model_, *optimizer_);
  if (!saved.ok()) return saved.status();
  runtime_.TakeCommunicationSeconds();  // the save's, not a training step's
  ReportCheckpoints();
  return absl::OkStatus();
}

void Trainer::ReportCheckpoints() {
  for (const auto& saved : checkpointer_->TakeReports()) {
    summary_.last_checkpoint = saved.dir;
    if (metrics_) {
      metrics_->Write(JsonObject()
                          .Add("type", std::string("checkpoint"))
                          .Add("step", saved.step)
                          .Add("seconds", saved.seconds)
                          .Add("stall_seconds", saved.stall_seconds)
                          .Add("bytes", saved.bytes)
                          .AddRaw("async", saved.async ? "true" : "false"));
    }
    if (progress_) {
      progress_->Print(absl::StrFormat(
          "checkpoint saved to %s (%.2f s%s, %.1f MiB)", saved.dir, saved.seconds,
          saved.async ? absl::StrFormat(" in the background, training stalled %.2f s",
                                        saved.stall_seconds)
                      : "",
          saved.bytes / 1048576.0));
    }
  }
}

absl::StatusOr<TrainSummary> Trainer::Finish(int steps) {
  if (checkpointer_ != nullptr) {
    // A save still in flight commits before the run ends (or stops).
    if (auto finished = checkpointer_->Finish(); !finished.ok()) return finished;
    runtime_.TakeCommunicationSeconds();
    ReportCheckpoints();
  }
  if (progress_) progress_->Finish();
  summary_.steps = steps;
  summary_.final_val_loss = last_val_;
  summary_.best_val_loss = best_val_;
  summary_.tokens_per_second = tokens_per_step_ * (steps - summary_.first_step) / train_seconds_;
  summary_.gflops_per_second = summary_.tokens_per_second * flops_per_token_ / 1e9;
  if (host_) summary_.fp32_probe_gflops = host_->fp32_gflops;
  summary_.wall_seconds = SecondsSince(wall_start_);
  // A stopped run's checkpoint holds it; the run continues later.
  if (summary_.stopped_early) return summary_;
  summary_.model_dir = ModelDir();
  runtime_.GatherExperts(model_);
  if (runtime_.is_main()) {
    if (auto status = SaveModel(summary_.model_dir, spec_, model_); !status.ok()) return status;
  }
  summary_.wall_seconds = SecondsSince(wall_start_);
  return summary_;
}

}  // namespace rmoe
