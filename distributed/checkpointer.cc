#include "distributed/checkpointer.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>
#include <utility>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <unistd.h>

#include "distributed/expert_parallel.h"
#include "rmoe/config/job_spec.h"
#include "rmoe/train/device.h"
#include "rmoe/train/trainer.h"
#include "rmoe/util/files.h"
#include "rmoe/util/ownership.h"
#include "distributed/node_layout.h"

namespace rmoe::distributed {
namespace fs = std::filesystem;
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// A save that was interrupted leaves a directory newer than `chosen` without a commit
// marker: say that it is passed over.
void ReportInterruptedSaves(const std::string& chosen_dir) {
  const fs::path chosen(chosen_dir);
  for (const auto& entry : fs::directory_iterator(chosen.parent_path())) {
    const auto name = entry.path().filename().string();
    if (entry.is_directory() && name.rfind("step_", 0) == 0 &&
        name > chosen.filename().string() && !fs::exists(entry.path() / "COMMITTED")) {
      std::fprintf(stderr, "rmoe: ignoring %s: not committed (a save was interrupted)\n",
                   entry.path().c_str());
    }
  }
}

void RestoreGenerator(at::Generator generator, const std::string& bytes) {
  auto state = torch::empty({static_cast<int64_t>(bytes.size())}, torch::kUInt8);
  std::memcpy(state.data_ptr(), bytes.data(), bytes.size());
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

TrainingProgress ProgressOf(const CheckpointManifest& manifest) {
  TrainingProgress progress;
  progress.step = manifest.step();
  progress.consumed_samples = manifest.consumed_samples();
  auto scalar = [&](const char* key, double fallback) {
    auto found = manifest.scalars().find(key);
    return found == manifest.scalars().end() ? fallback : found->second;
  };
  progress.best_val_loss = scalar("best_val_loss", INFINITY);
  progress.last_val_loss = scalar("last_val_loss", NAN);
  return progress;
}

// `text` from `root` to every rank of `comm`.
std::string BroadcastString(Communicator& comm, const std::string& text, int root) {
  auto length = torch::tensor({static_cast<int64_t>(text.size())}, torch::kInt64);
  comm.Broadcast(length, root);
  auto bytes = torch::zeros({length.item<int64_t>()}, torch::kUInt8);
  if (comm.rank() == root && !text.empty()) std::memcpy(bytes.data_ptr(), text.data(), text.size());
  comm.Broadcast(bytes, root);
  return std::string(static_cast<const char*>(bytes.data_ptr()), bytes.numel());
}

// The directory itself or, when it does not exist yet, its nearest existing ancestor.
fs::path NearestExisting(fs::path dir) {
  std::error_code ec;
  dir = fs::absolute(dir, ec);
  while (!fs::is_directory(dir, ec) && dir.has_parent_path() && dir.parent_path() != dir) {
    dir = dir.parent_path();
  }
  return dir;
}

}  // namespace

absl::Status ShardedCheckpointer::CheckDirectoryShared(const std::string& root) {
  Communicator& world = *groups_.world;
  if (world.size() == 1 || !checked_directories_.insert(root).second) return absl::OkStatus();
  // Rank 0 leaves a file of unique content in the directory (or the ancestor that exists);
  // every other rank must read the same content under the same path.
  std::string probe, content;
  if (rank() == 0) {
    content = absl::StrCat("rmoe shared-directory probe ", ::getpid(), " ",
                           std::chrono::steady_clock::now().time_since_epoch().count());
    probe = (NearestExisting(root) / absl::StrCat(".rmoe-shared-probe-", ::getpid())).string();
    if (auto status = WriteFileAtomically(probe, content); !status.ok()) probe.clear();
  }
  probe = BroadcastString(world, probe, 0);
  content = BroadcastString(world, content, 0);
  if (probe.empty()) return absl::OkStatus();  // rank 0 could not write: the save will say why
  bool sees = true;
  if (rank() != 0) {
    auto read = ReadFile(probe);
    sees = read.ok() && *read == content;
  }
  const auto seen = world.AllGather(torch::tensor({static_cast<int64_t>(sees)}, torch::kInt64));
  if (rank() == 0) {
    std::error_code ec;
    fs::remove(probe, ec);
  }
  std::vector<int> blind;
  std::set<std::string> blind_hosts;
  for (int r = 0; r < world.size(); ++r) {
    if (seen[r].item<int64_t>() == 0) {
      blind.push_back(r);
      blind_hosts.insert(groups_.nodes.HostOf(r));
    }
  }
  if (blind.empty()) return absl::OkStatus();
  std::vector<std::string> hosts(blind_hosts.begin(), blind_hosts.end());
  return absl::FailedPreconditionError(absl::StrCat(
      "the checkpoint directory ", root, " is not shared between nodes: ",
      RankList(blind), " on ", absl::StrJoin(hosts, ", "),
      blind.size() == 1 ? " does" : " do", " not see the file rank 0 on ", groups_.nodes.HostOf(0), " wrote in ",
      fs::path(probe).parent_path().string(),
      ". Every rank must see the same checkpoint directory (a shared file system such as NFS "
      "or Lustre, mounted at the same path on every node), or the shards could never be "
      "resumed together; set checkpoint.directory to such a path"));
}

ShardedCheckpointer::ShardedCheckpointer(ProcessGroups groups, CheckpointTestHooks hooks)
    : groups_(std::move(groups)), hooks_(hooks) {}

std::vector<ShardedTensor> ShardedCheckpointer::StateTensors(Transformer& model,
                                                            torch::optim::Optimizer& optimizer,
                                                            bool create_optimizer_state) {
  const ParameterPartition partition = PartitionParameters(model);
  const int world_size = groups_.world->size();
  const int64_t num_experts = model->spec().moe().num_experts();
  const int64_t local_experts = num_experts / groups_.expert_parallel->size();
  const int64_t first_expert = groups_.expert_parallel->rank() * local_experts;

  // The parameters this rank's optimizer updates: all of them, or with a sharded optimizer
  // state its share, whose moments this rank alone holds and so writes.
  std::set<void*> optimized;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) optimized.insert(p.unsafeGetTensorImpl());
  }
  const bool sharded_optimizer = optimized.size() < model->parameters().size();

  std::vector<ShardedTensor> tensors;
  int index = 0;
  for (auto& item : model->named_parameters()) {
    const auto& param = item.value();
    ShardedTensor model_tensor;
    model_tensor.name = "model/" + item.key();
    model_tensor.local = param.detach();
    model_tensor.global_shape = param.sizes().vec();
    if (partition.IsExpert(param)) {
      // Expert slices: rows are global expert ids; one replica of each writes them.
      model_tensor.global_shape[0] = num_experts;
      model_tensor.row_start = first_expert;
      model_tensor.write = groups_.expert_replicas->rank() == 0;
    } else {
      // Replicated: spread the writing over the ranks so the shards fill in parallel.
      model_tensor.write = index % world_size == rank();
    }
    ++index;

    void* const key = param.unsafeGetTensorImpl();
    if (!optimized.count(key)) {
      tensors.push_back(std::move(model_tensor));
      continue;
    }
    auto& states = optimizer.state();
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
      if (sharded_optimizer) state_tensor.write = true;
      tensors.push_back(std::move(state_tensor));
    }
    tensors.push_back(std::move(model_tensor));
  }
  return tensors;
}

absl::StatusOr<std::string> ShardedCheckpointer::Save(const JobSpec& job,
                                                               const TrainingProgress& progress,
                                                               Transformer& model,
                                                               torch::optim::Optimizer& optimizer) {
  if (auto status = Finish(); !status.ok()) return status;
  if (auto status = CheckDirectoryShared(CheckpointRoot(job)); !status.ok()) return status;
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
  CheckpointWriteOptions options;
  options.keep_last = job.checkpoint().keep_last();
  options.background = async;
  options.pause_before_commit_seconds = hooks_.pause_before_commit_seconds;
  options.delay_background_write_seconds = hooks_.delay_background_write_seconds;
  options.run_id = run_id_;
  const std::string root = CheckpointRoot(job);
  auto pending =
      BeginCheckpoint(root, state, StateTensors(model, optimizer, false), *groups_.world, options);
  if (!pending.ok()) return pending.status();
  if (rank() == 0 && run_id_.empty()) {
    // Later saves must find the same root (the first save created or marked it).
    auto mark = ReadOwnerMark(root);
    if (mark.ok() && mark->has_value()) run_id_ = (*mark)->run_id;
  }
  const std::string dir = (*pending)->dir();
  in_flight_ = InFlight{*std::move(pending), start, SecondsSince(start), async};
  if (!async) {
    if (auto status = FinishInFlight(); !status.ok()) return status;
  }
  return dir;
}

absl::Status ShardedCheckpointer::FinishInFlight() {
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

absl::Status ShardedCheckpointer::Poll() {
  if (!in_flight_) return absl::OkStatus();
  // Every rank has the same save in flight (they began it together); the commit is
  // collective, so they finish it together: once every rank's writer is done.
  const auto start = std::chrono::steady_clock::now();
  auto done = torch::tensor({in_flight_->pending->WriteDone() ? int64_t{1} : int64_t{0}},
                            torch::kInt64);
  groups_.world->AllReduce(done, ReduceOp::kSum);
  in_flight_->stall_seconds += SecondsSince(start);
  if (done.item<int64_t>() < groups_.world->size()) return absl::OkStatus();
  return FinishInFlight();
}

absl::Status ShardedCheckpointer::Finish() { return FinishInFlight(); }

std::vector<CheckpointReport> ShardedCheckpointer::TakeReports() {
  return std::exchange(reports_, {});
}

absl::StatusOr<TrainingProgress> ShardedCheckpointer::Load(
    const std::string& path, const JobSpec& job, Transformer& model,
    torch::optim::Optimizer& optimizer) {
  if (auto status = Finish(); !status.ok()) return status;
  // Ranks that cannot see the checkpoint would each fail on their own; all say why at once.
  if (auto status = CheckDirectoryShared(path); !status.ok()) return status;
  auto dir = ResolveCheckpoint(path);
  if (!dir.ok()) return dir.status();
  if (rank() == 0) {
    ReportInterruptedSaves(*dir);
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
  if (rank() == 0) {
    int64_t bytes = 0;
    for (const auto& t : tensors) bytes += static_cast<int64_t>(t.local.nbytes());
    std::fprintf(stderr, "rmoe: loaded step %lld: %.1f MiB on rank 0 in %.3f s\n",
                 static_cast<long long>(manifest->step()), bytes / 1048576.0,
                 SecondsSince(load_start));
  }
  // Nothing in training draws random numbers today, but a rank's generator continues where
  // it stopped when it exists in the saved layout.
  if (rank() < manifest->rng_states_size()) {
    RestoreGenerator(at::detail::getDefaultCPUGenerator(), manifest->rng_states(rank()));
  }
  const torch::Device device = DeviceOf(model);
  if (!device.is_cpu() && rank() < manifest->device_rng_states_size() &&
      !manifest->device_rng_states(rank()).empty()) {
    RestoreGenerator(at::globalContext().defaultGenerator(device),
                     manifest->device_rng_states(rank()));
  }
  // AdamW's bias correction counts the steps each parameter was updated: every step.
  for (auto& item : optimizer.state()) {
    static_cast<torch::optim::AdamWParamState&>(*item.second).step(manifest->step());
  }
  return ProgressOf(*manifest);
}

std::vector<std::string> ShardedCheckpointer::FindEarlierRun(const JobSpec& job) {
  return PreviousCheckpoints(CheckpointRoot(job));
}

absl::Status ShardedCheckpointer::RemoveEarlierRun(const JobSpec& job) {
  return RemovePreviousCheckpoints(CheckpointRoot(job));
}

}  // namespace rmoe::distributed
