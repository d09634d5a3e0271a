#include "distributed/parallel_runtime.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <unordered_set>
#include <utility>

#include <absl/strings/str_cat.h>

#include "distributed/expert_parallel.h"
#include "rmoe/config/job_spec.h"
#include "rmoe/train/trainer.h"

namespace rmoe::distributed {
namespace fs = std::filesystem;

absl::StatusOr<ProcessGroups> ProcessGroups::Create(std::shared_ptr<Communicator> world,
                                                    int expert_parallel_size, int num_experts) {
  const int size = world->size();
  if (expert_parallel_size < 1 || size % expert_parallel_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "parallel.expert_parallel_size = ", expert_parallel_size, " must divide the ", size,
        " ranks of the job (world = data-parallel replicas x expert-parallel size)"));
  }
  if (num_experts % expert_parallel_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.moe.num_experts = ", num_experts, " cannot be split evenly over "
        "parallel.expert_parallel_size = ", expert_parallel_size, " ranks"));
  }
  ProcessGroups groups;
  const int rank = world->rank();
  groups.expert_parallel = world->Split(rank / expert_parallel_size, rank);
  groups.expert_replicas = world->Split(rank % expert_parallel_size, rank);
  groups.world = std::move(world);
  return groups;
}

void AllReduceBucketed(Communicator& comm, const std::vector<torch::Tensor>& tensors, ReduceOp op,
                       size_t bucket_bytes) {
  size_t begin = 0;
  while (begin < tensors.size()) {
    // A bucket: consecutive tensors of one dtype up to bucket_bytes (at least one tensor).
    size_t end = begin, bytes = 0;
    while (end < tensors.size() && tensors[end].scalar_type() == tensors[begin].scalar_type() &&
           (end == begin || bytes + tensors[end].nbytes() <= bucket_bytes)) {
      bytes += tensors[end].nbytes();
      ++end;
    }
    std::vector<torch::Tensor> flat_parts;
    for (size_t i = begin; i < end; ++i) flat_parts.push_back(tensors[i].reshape({-1}));
    auto flat = torch::cat(flat_parts);
    comm.AllReduce(flat, op);
    int64_t offset = 0;
    for (size_t i = begin; i < end; ++i) {
      const int64_t n = tensors[i].numel();
      tensors[i].view({-1}).copy_(flat.narrow(0, offset, n));
      offset += n;
    }
    begin = end;
  }
}

DistributedRuntime::DistributedRuntime(ProcessGroups groups, int local_size,
                                       std::shared_ptr<TimedCommunicator> timer,
                                       size_t bucket_bytes)
    : groups_(std::move(groups)),
      local_size_(local_size),
      timer_(std::move(timer)),
      bucket_bytes_(bucket_bytes) {}

void DistributedRuntime::Classify(Transformer& model) {
  std::unordered_set<const void*> expert_params;
  for (auto& block : model->blocks()) {
    if (!block->is_moe()) continue;
    for (auto& p : block->moe()->experts()->parameters()) {
      expert_params.insert(p.unsafeGetTensorImpl());
    }
  }
  replicated_.clear();
  experts_.clear();
  for (auto& p : model->parameters()) {
    (expert_params.count(p.unsafeGetTensorImpl()) ? experts_ : replicated_).push_back(p);
  }
}

void DistributedRuntime::PrepareModel(Transformer& model) {
  if (groups_.expert_parallel->size() > 1) ShardExperts(model, groups_.expert_parallel);
  Classify(model);
}

void DistributedRuntime::SynchronizeGradients(Transformer& model) {
  auto grads = [](const std::vector<torch::Tensor>& params) {
    // Every rank must contribute every tensor, or the buckets would not line up.
    FillMissingGradients(params);
    std::vector<torch::Tensor> out;
    for (const auto& p : params) out.push_back(p.grad());
    return out;
  };
  AllReduceBucketed(*groups_.world, grads(replicated_), ReduceOp::kAvg, bucket_bytes_);
  // An expert's gradient here already sums the losses of every rank in this EP group (the
  // all-to-all's backward brought them); summing over the replicas and dividing by the
  // world gives the world average, as for the replicated parameters.
  auto expert_grads = grads(experts_);
  AllReduceBucketed(*groups_.expert_replicas, expert_grads, ReduceOp::kSum, bucket_bytes_);
  torch::NoGradGuard no_grad;
  for (auto& g : expert_grads) g.div_(static_cast<double>(world_size()));
}

double DistributedRuntime::ClipGradients(Transformer& model, double max_norm) {
  const auto squares = SquaredGradientNorm;
  // Replicated gradients are equal everywhere after synchronisation; each expert lives on
  // exactly one rank of an EP group, so the group's sum counts every expert once.
  auto expert_squares = torch::tensor({squares(experts_)}, torch::kDouble);
  groups_.expert_parallel->AllReduce(expert_squares, ReduceOp::kSum);
  const double norm = std::sqrt(squares(replicated_) + expert_squares.item<double>());
  ScaleGradientsToNorm(model->parameters(), norm, max_norm);
  return norm;
}

double DistributedRuntime::Average(double value) {
  auto t = torch::tensor({value}, torch::kDouble);
  groups_.world->AllReduce(t, ReduceOp::kAvg);
  return t.item<double>();
}

void DistributedRuntime::SumOverRanks(torch::Tensor& tensor) {
  groups_.world->AllReduce(tensor, ReduceOp::kSum);
}

void DistributedRuntime::PrepareForSave(Transformer& model) {
  if (groups_.expert_parallel->size() > 1) GatherExperts(model, *groups_.expert_parallel);
  Classify(model);
}

std::vector<ShardedTensor> DistributedRuntime::StateTensors(Transformer& model,
                                                            torch::optim::Optimizer& optimizer,
                                                            bool create_optimizer_state) {
  std::unordered_set<const void*> expert_params;
  for (const auto& p : experts_) expert_params.insert(p.unsafeGetTensorImpl());
  const int64_t num_experts = model->spec().moe().num_experts();
  const int64_t local_experts = num_experts / groups_.expert_parallel->size();
  const int64_t first_expert = groups_.expert_parallel->rank() * local_experts;

  std::vector<ShardedTensor> tensors;
  int index = 0;
  for (auto& item : model->named_parameters()) {
    const auto& param = item.value();
    ShardedTensor model_tensor;
    model_tensor.name = "model/" + item.key();
    model_tensor.local = param.detach();
    model_tensor.global_shape = param.sizes().vec();
    if (expert_params.count(param.unsafeGetTensorImpl())) {
      // Expert slices: rows are global expert ids; one replica of each writes them.
      model_tensor.global_shape[0] = num_experts;
      model_tensor.row_start = first_expert;
      model_tensor.write = groups_.expert_replicas->rank() == 0;
    } else {
      // Replicated: spread the writing over the ranks so the shards fill in parallel.
      model_tensor.write = index % world_size() == rank();
    }
    ++index;

    auto& states = optimizer.state();
    void* const key = param.unsafeGetTensorImpl();
    if (create_optimizer_state && !states.count(key)) {
      auto state = std::make_unique<torch::optim::AdamWParamState>();
      state->exp_avg(torch::zeros_like(param, torch::MemoryFormat::Preserve));
      state->exp_avg_sq(torch::zeros_like(param, torch::MemoryFormat::Preserve));
      states[key] = std::move(state);
    }
    auto found = states.find(key);
    TORCH_CHECK(found != states.end(), "no optimizer state for ", item.key(),
                ": checkpoints are taken after at least one step");
    auto& adam = static_cast<torch::optim::AdamWParamState&>(*found->second);
    for (auto [moment, name] : {std::pair{adam.exp_avg(), "exp_avg"},
                                std::pair{adam.exp_avg_sq(), "exp_avg_sq"}}) {
      ShardedTensor state_tensor = model_tensor;
      state_tensor.name = "optimizer/" + item.key() + "/" + name;
      state_tensor.local = moment;
      tensors.push_back(std::move(state_tensor));
    }
    tensors.push_back(std::move(model_tensor));
  }
  return tensors;
}

namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

absl::StatusOr<std::string> DistributedRuntime::SaveCheckpoint(const JobSpec& job,
                                                               const TrainingProgress& progress,
                                                               Transformer& model,
                                                               torch::optim::Optimizer& optimizer) {
  if (auto status = FinishCheckpoints(); !status.ok()) return status;
  const auto start = std::chrono::steady_clock::now();
  const bool async = job.checkpoint().async_save();
  CheckpointState state;
  state.job = job;
  state.step = progress.step;
  state.consumed_samples = progress.consumed_samples;
  state.expert_parallel_size = groups_.expert_parallel->size();
  state.scalars["best_val_loss"] = progress.best_val_loss;
  state.scalars["last_val_loss"] = progress.last_val_loss;
  if (rank() == 0) {
    // What generation needs besides the weights: the checkpoint is then enough on its own.
    for (const char* name : {"meta.pbtxt", "tokenizer.model"}) {
      const fs::path file = fs::path(job.data().dataset_dir()) / name;
      std::error_code ec;
      if (fs::is_regular_file(file, ec)) state.extra_files.push_back(file.string());
    }
  }
  auto pending = BeginCheckpoint(CheckpointRoot(job), state, StateTensors(model, optimizer, false),
                                 *groups_.world,
                                 CheckpointWriteOptions{job.checkpoint().keep_last(), async});
  if (!pending.ok()) return pending.status();
  const std::string dir = (*pending)->dir();
  in_flight_ = InFlight{*std::move(pending), start, SecondsSince(start), async};
  if (!async) {
    if (auto status = FinishInFlight(); !status.ok()) return status;
  }
  return dir;
}

absl::Status DistributedRuntime::FinishInFlight() {
  if (!in_flight_) return absl::OkStatus();
  const auto finish_start = std::chrono::steady_clock::now();
  InFlight saving = std::move(*in_flight_);
  in_flight_.reset();
  auto dir = FinishCheckpoint(*saving.pending, *groups_.world);
  if (!dir.ok()) return dir.status();
  CheckpointReport report;
  report.dir = *dir;
  report.step = saving.pending->step();
  report.seconds = SecondsSince(saving.start);
  report.stall_seconds = saving.stall_seconds + SecondsSince(finish_start);
  report.bytes = saving.pending->total_bytes();
  report.async = saving.async;
  reports_.push_back(std::move(report));
  return absl::OkStatus();
}

absl::Status DistributedRuntime::PollCheckpoint() {
  if (!in_flight_) return absl::OkStatus();
  // Every rank has the same save in flight (they began it together); the commit is
  // collective, so they finish it together: once every rank's writer is done.
  const auto start = std::chrono::steady_clock::now();
  auto done = torch::tensor({in_flight_->pending->WriteDone() ? int64_t{1} : int64_t{0}},
                            torch::kInt64);
  groups_.world->AllReduce(done, ReduceOp::kSum);
  in_flight_->stall_seconds += SecondsSince(start);
  if (done.item<int64_t>() < world_size()) return absl::OkStatus();
  return FinishInFlight();
}

absl::Status DistributedRuntime::FinishCheckpoints() { return FinishInFlight(); }

std::vector<CheckpointReport> DistributedRuntime::TakeCheckpointReports() {
  return std::exchange(reports_, {});
}

absl::StatusOr<TrainingProgress> DistributedRuntime::LoadCheckpoint(
    const std::string& path, const JobSpec& job, Transformer& model,
    torch::optim::Optimizer& optimizer) {
  if (auto status = FinishCheckpoints(); !status.ok()) return status;
  auto dir = ResolveCheckpoint(path);
  if (!dir.ok()) return dir.status();
  if (is_main()) {
    // A save that was interrupted leaves a newer directory without a commit marker.
    const fs::path chosen(*dir);
    for (const auto& entry : fs::directory_iterator(chosen.parent_path())) {
      const auto name = entry.path().filename().string();
      if (entry.is_directory() && name.rfind("step_", 0) == 0 &&
          name > chosen.filename().string() && !fs::exists(entry.path() / "COMMITTED")) {
        std::fprintf(stderr, "rmoe: ignoring %s: not committed (a save was interrupted)\n",
                     entry.path().c_str());
      }
    }
    std::fprintf(stderr, "rmoe: resuming from %s\n", dir->c_str());
  }
  auto manifest = ReadManifest(*dir);
  if (!manifest.ok()) return manifest.status();
  if (auto status = CheckResumable(manifest->job(), job); !status.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot resume from ", *dir, ": ", status.message()));
  }
  const auto load_start = std::chrono::steady_clock::now();
  auto tensors = StateTensors(model, optimizer, /*create_optimizer_state=*/true);
  {
    torch::NoGradGuard no_grad;
    if (auto status = LoadTensors(*dir, *manifest, tensors); !status.ok()) return status;
  }
  if (is_main()) {
    int64_t bytes = 0;
    for (const auto& t : tensors) bytes += static_cast<int64_t>(t.local.nbytes());
    std::fprintf(stderr, "rmoe: loaded step %lld: %.1f MiB on rank 0 in %.3f s\n",
                 static_cast<long long>(manifest->step()), bytes / 1048576.0,
                 SecondsSince(load_start));
  }
  // Nothing in training draws random numbers today, but a rank's generator continues where
  // it stopped when it exists in the saved layout.
  if (rank() < manifest->rng_states_size()) {
    const std::string& bytes = manifest->rng_states(rank());
    auto state = torch::empty({static_cast<int64_t>(bytes.size())}, torch::kUInt8);
    std::memcpy(state.data_ptr(), bytes.data(), bytes.size());
    auto generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(state);
  }
  // AdamW's bias correction counts the steps each parameter was updated: every step.
  for (auto& item : optimizer.state()) {
    static_cast<torch::optim::AdamWParamState&>(*item.second).step(manifest->step());
  }
  TrainingProgress progress;
  progress.step = manifest->step();
  progress.consumed_samples = manifest->consumed_samples();
  auto scalar = [&](const char* key, double fallback) {
    auto found = manifest->scalars().find(key);
    return found == manifest->scalars().end() ? fallback : found->second;
  };
  progress.best_val_loss = scalar("best_val_loss", INFINITY);
  progress.last_val_loss = scalar("last_val_loss", NAN);
  return progress;
}

}  // namespace rmoe::distributed
