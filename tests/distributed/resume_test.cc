// Checkpoint and resume through the real trainer, under mpirun with 4 ranks: a resume on the
// same layout continues bit for bit; a resume on another layout (EP 4 -> EP 2 -> EP 1, data
// parallelism changing with it) continues the loss curve; model changes are refused.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <iterator>
#include <regex>
#include <vector>

#include <gtest/gtest.h>

#include "distributed/checkpoint.h"
#include "distributed/checkpointer.h"
#include "distributed/parallel_runtime.h"
#include "rmoe/config/job_spec.h"
#include "rmoe/train/trainer.h"
#include "tests/distributed/mpi_test_env.h"

namespace rmoe::distributed {
namespace {
namespace fs = std::filesystem;

// A directory every rank agrees on (rank 0 creates it).
std::string SharedTempDir(Communicator& world, const std::string& name) {
  auto dir = fs::temp_directory_path() /
             ("rmoe_resume_" + name + "_np" + std::to_string(world.size()));
  if (world.rank() == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  world.Barrier();
  return dir.string();
}

JobSpec TinyJob(const std::string& out, std::vector<std::string> overrides) {
  const char* dataset = std::getenv("RMOE_TEST_DATASET");
  EXPECT_NE(dataset, nullptr) << "RMOE_TEST_DATASET must name a prepared byte dataset";
  overrides.insert(overrides.begin(),
                   {std::string("data.dataset_dir=") + (dataset ? dataset : ""),
                    "output_dir=" + out, "model.moe.num_experts=8", "schedule.steps=12",
                    "schedule.warmup_steps=2", "schedule.micro_batch_size=2",
                    "schedule.eval_interval=0", "schedule.eval_batches=2", "logging.interval=1",
                    "checkpoint.interval=6", "checkpoint.keep_last=5",
                    "runtime.num_threads=1"});
  auto spec = LoadJobSpecWithOverrides(std::string(RMOE_SOURCE_DIR) + "/configs/tiny_test.pbtxt",
                                       overrides);
  EXPECT_TRUE(spec.ok()) << spec.status();
  return spec.ok() ? *spec : JobSpec();
}

// Trains `spec` on the first `ranks` ranks of the world with the given EP size (the other
// ranks wait). Returns the status on the participating ranks, OK elsewhere.
absl::Status TrainOn(int ranks, const JobSpec& spec, const std::string& resume = "",
                     CheckpointTestHooks hooks = {}) {
  auto world = rmoe::testing::MpiWorld();
  std::shared_ptr<Communicator> group = world->Split(world->rank() < ranks ? 0 : -1, world->rank());
  absl::Status result = absl::OkStatus();
  if (group) {
    auto groups = ProcessGroups::Create(group, spec.parallel().expert_parallel_size(),
                                        spec.model().moe().num_experts());
    if (!groups.ok()) return groups.status();
    ShardedCheckpointer checkpointer(*groups, hooks);
    DistributedRuntime runtime(*groups, 0, 1);
    TrainOptions options;
    options.quiet = true;
    options.resume = resume;
    auto summary = Train(spec, options, &runtime, &checkpointer);
    result = summary.status();
  }
  world->Barrier();
  return result;
}

// step -> training loss, from a metrics file.
std::map<int, double> Losses(const std::string& metrics_path) {
  std::map<int, double> losses;
  std::ifstream in(metrics_path);
  std::string line;
  const std::regex pattern(R"re("type":"train","step":(\d+),"lr":[^,]*,"loss":([^,]*),)re");
  std::smatch match;
  while (std::getline(in, line)) {
    if (std::regex_search(line, match, pattern)) {
      losses[std::stoi(match[1])] = std::stod(match[2]);
    }
  }
  return losses;
}

TEST(Resume, OnTheSameLayoutContinuesBitForBit) {
  auto world = rmoe::testing::MpiWorld();
  const int ranks = world->size();
  const std::string dir = SharedTempDir(*world, "same_layout");
  const std::string ep = "parallel.expert_parallel_size=" + std::to_string(ranks);
  ASSERT_TRUE(TrainOn(ranks, TinyJob(dir + "/full", {ep})).ok());
  // Resume from the step-6 checkpoint of the uninterrupted run, in another directory.
  const std::string step6 = dir + "/full/checkpoints/step_00000006";
  ASSERT_TRUE(TrainOn(ranks, TinyJob(dir + "/resumed", {ep}), step6).ok());
  if (world->rank() != 0) return;
  auto full = Losses(dir + "/full/metrics.jsonl");
  auto resumed = Losses(dir + "/resumed/metrics.jsonl");
  ASSERT_EQ(full.size(), 12u);
  ASSERT_EQ(resumed.size(), 6u);
  for (const auto& [step, loss] : resumed) {
    EXPECT_EQ(loss, full.at(step)) << "step " << step << " differs after resuming";
  }
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Line numbers (0-based) of the metrics records that contain `needle`.
std::vector<int> RecordLines(const std::string& metrics_path, const std::string& needle) {
  std::ifstream in(metrics_path);
  std::string line;
  std::vector<int> lines;
  for (int i = 0; std::getline(in, line); ++i) {
    if (line.find(needle) != std::string::npos) lines.push_back(i);
  }
  return lines;
}

// Every tensor of a checkpoint, read in full.
std::map<std::string, torch::Tensor> AllTensors(const std::string& dir) {
  std::map<std::string, torch::Tensor> out;
  auto manifest = ReadManifest(dir);
  EXPECT_TRUE(manifest.ok()) << manifest.status();
  if (!manifest.ok()) return out;
  std::vector<ShardedTensor> tensors;
  for (const auto& record : manifest->tensors()) {
    EXPECT_EQ(record.dtype(), "float32") << record.name();
    ShardedTensor t;
    t.name = record.name();
    t.global_shape.assign(record.shape().begin(), record.shape().end());
    t.local = torch::empty(t.global_shape, torch::kFloat);
    tensors.push_back(std::move(t));
  }
  auto status = LoadTensors(dir, *manifest, tensors);
  EXPECT_TRUE(status.ok()) << status;
  for (auto& t : tensors) out.emplace(t.name, t.local);
  return out;
}

// checkpoint.async_save: the model and optimizer are copied at the save and written in the
// background while training goes on. The files are the same as a synchronous save's, the
// training is unchanged, and a resume from them continues bit for bit.
TEST(Resume, AsyncSaveWritesTheSameCheckpointAndResumesBitForBit) {
  auto world = rmoe::testing::MpiWorld();
  const int ranks = world->size();
  const std::string dir = SharedTempDir(*world, "async");
  const std::string ep = "parallel.expert_parallel_size=" + std::to_string(ranks);
  // Synchronous saves at steps 6 and 12.
  ASSERT_TRUE(TrainOn(ranks, TinyJob(dir + "/sync", {ep})).ok());
  // Background saves at 3, 6, 9, 12, each write held back 1 s (a test hook), so that every
  // save is still in flight when the next is due: training changes the parameters meanwhile,
  // and each save finishes the one before it (the last: the end of training).
  CheckpointTestHooks slow_writes;
  slow_writes.delay_background_write_seconds = 1;
  const absl::Status slow = TrainOn(
      ranks, TinyJob(dir + "/async_slow", {ep, "checkpoint.async_save=true", "checkpoint.interval=3"}),
      "", slow_writes);
  ASSERT_TRUE(slow.ok()) << slow;
  // Background saves that commit at the first step boundary where every rank is done.
  ASSERT_TRUE(
      TrainOn(ranks, TinyJob(dir + "/async", {ep, "checkpoint.async_save=true"})).ok());
  // Resume from an asynchronous checkpoint (and save asynchronously again).
  ASSERT_TRUE(TrainOn(ranks, TinyJob(dir + "/resumed", {ep, "checkpoint.async_save=true"}),
                      dir + "/async_slow/checkpoints/step_00000006")
                  .ok());
  if (world->rank() != 0) return;

  for (const std::string run : {"async_slow", "async"}) {
    SCOPED_TRACE(run);
    EXPECT_EQ(ReadBytes(dir + "/" + run + "/checkpoints/latest"), "step_00000012\n");
    for (const std::string step : {"step_00000006", "step_00000012"}) {
      SCOPED_TRACE(step);
      const std::string a = dir + "/sync/checkpoints/" + step;
      const std::string b = dir + "/" + run + "/checkpoints/" + step;
      ASSERT_TRUE(fs::exists(b + "/COMMITTED"));
      int files = 0;
      for (const auto& entry : fs::directory_iterator(a)) {
        const std::string name = entry.path().filename().string();
        if (name == "manifest.pb") continue;  // its job spec differs (async_save, output_dir)
        if (name == ".rmoe-owner") continue;  // each run has its own id
        ++files;
        const std::string bytes = ReadBytes(entry.path().string());
        EXPECT_FALSE(bytes.empty()) << name;
        EXPECT_TRUE(bytes == ReadBytes(b + "/" + name)) << name << " differs";
      }
      // The shards, COMMITTED, and the dataset's meta.pbtxt copied for generation.
      EXPECT_TRUE(fs::exists(a + "/meta.pbtxt"));
      EXPECT_GE(files, 1 + 2);
      auto ma = ReadManifest(a), mb = ReadManifest(b);
      ASSERT_TRUE(ma.ok() && mb.ok());
      EXPECT_EQ(ma->step(), mb->step());
      EXPECT_EQ(ma->consumed_samples(), mb->consumed_samples());
      ASSERT_EQ(ma->tensors_size(), mb->tensors_size());
      for (int i = 0; i < ma->tensors_size(); ++i) {
        EXPECT_EQ(ma->tensors(i).SerializeAsString(), mb->tensors(i).SerializeAsString())
            << ma->tensors(i).name();
      }
      ASSERT_EQ(ma->rng_states_size(), mb->rng_states_size());
      for (int i = 0; i < ma->rng_states_size(); ++i)
        EXPECT_EQ(ma->rng_states(i), mb->rng_states(i));
      EXPECT_TRUE(mb->job().checkpoint().async_save());
      auto ta = AllTensors(a), tb = AllTensors(b);
      ASSERT_EQ(ta.size(), tb.size());
      for (const auto& [name, tensor] : ta) {
        EXPECT_TRUE(torch::equal(tensor, tb.at(name))) << name;
      }
    }
    // Saving in the background does not change the training.
    EXPECT_EQ(Losses(dir + "/" + run + "/metrics.jsonl"), Losses(dir + "/sync/metrics.jsonl"));
  }
  // Every save is reported once, with its timings; the slow ones committed after training
  // went on (step 3's after step 4 was logged).
  const std::string slow_metrics = dir + "/async_slow/metrics.jsonl";
  for (int step : {3, 6, 9, 12}) {
    const auto lines = RecordLines(
        slow_metrics, "\"type\":\"checkpoint\",\"step\":" + std::to_string(step) + ",");
    ASSERT_EQ(lines.size(), 1u) << "step " << step;
  }
  const auto step3 = RecordLines(slow_metrics, "\"type\":\"checkpoint\",\"step\":3,");
  const auto train4 = RecordLines(slow_metrics, "\"type\":\"train\",\"step\":4,");
  ASSERT_EQ(train4.size(), 1u);
  EXPECT_GT(step3[0], train4[0]) << "the step-3 save did not run in the background";
  const std::regex timings(
      R"re("type":"checkpoint","step":(\d+),"seconds":([^,]*),"stall_seconds":([^,]*),"bytes":(\d+),"async":true)re");
  std::ifstream in(slow_metrics);
  std::string line;
  std::smatch match;
  int records = 0;
  while (std::getline(in, line)) {
    if (!std::regex_search(line, match, timings)) continue;
    ++records;
    EXPECT_GE(std::stod(match[2]), 1.0) << line;  // the held-back write
    EXPECT_GT(std::stoll(match[4]), 0) << line;
  }
  EXPECT_EQ(records, 4);

  auto full = Losses(dir + "/sync/metrics.jsonl");
  auto resumed = Losses(dir + "/resumed/metrics.jsonl");
  ASSERT_EQ(full.size(), 12u);
  ASSERT_EQ(resumed.size(), 6u);
  for (const auto& [step, loss] : resumed) {
    EXPECT_EQ(loss, full.at(step)) << "step " << step << " differs after resuming";
  }
  // The resumed run's own save at step 12 equals the uninterrupted run's.
  auto ta = AllTensors(dir + "/sync/checkpoints/step_00000012");
  auto tb = AllTensors(dir + "/resumed/checkpoints/step_00000012");
  ASSERT_EQ(ta.size(), tb.size());
  for (const auto& [name, tensor] : ta) EXPECT_TRUE(torch::equal(tensor, tb.at(name))) << name;
}

TEST(Resume, OnFewerRanksAndSmallerExpertGroupsContinuesTheCurve) {
  auto world = rmoe::testing::MpiWorld();
  if (world->size() < 4) GTEST_SKIP() << "needs 4 ranks";
  const std::string dir = SharedTempDir(*world, "reshard");
  // The same global batch on every layout: 4 ranks x 1 micro-batch, 2 x 2, 1 x 4. The
  // router losses are per micro-batch, so they would differ with the grouping by design;
  // without them, what remains is the order of floating-point sums.
  const std::vector<std::string> common = {"model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0",
                                           "optimizer.lr=0.005"};
  auto with = [&](std::vector<std::string> more) {
    more.insert(more.end(), common.begin(), common.end());
    return more;
  };
  ASSERT_TRUE(TrainOn(4, TinyJob(dir + "/ep4", with({"parallel.expert_parallel_size=4",
                                                     "schedule.steps=18"}))).ok());
  // (schedule.steps stays 18 everywhere: it shapes the learning-rate schedule.)
  ASSERT_TRUE(TrainOn(2, TinyJob(dir + "/ep2", with({"parallel.expert_parallel_size=2",
                                                     "schedule.grad_accum_steps=2",
                                                     "schedule.steps=18"})),
                      dir + "/ep4/checkpoints/step_00000006")
                  .ok());
  ASSERT_TRUE(TrainOn(1, TinyJob(dir + "/ep1", with({"parallel.expert_parallel_size=1",
                                                     "schedule.grad_accum_steps=4",
                                                     "schedule.steps=18"})),
                      dir + "/ep2/checkpoints/step_00000012")
                  .ok());
  if (world->rank() != 0) return;
  auto reference = Losses(dir + "/ep4/metrics.jsonl");
  auto ep2 = Losses(dir + "/ep2/metrics.jsonl");
  auto ep1 = Losses(dir + "/ep1/metrics.jsonl");
  ep2.erase(ep2.upper_bound(12), ep2.end());  // EP 1 took over from step 12
  ASSERT_EQ(ep2.size(), 6u);
  ASSERT_EQ(ep1.size(), 6u);
  double worst = 0;
  for (const auto* run : {&ep2, &ep1}) {
    for (const auto& [step, loss] : *run) {
      const double relative = std::abs(loss - reference.at(step)) / reference.at(step);
      worst = std::max(worst, relative);
      // Measured: 5.6e-8 (fp32 summation order only).
      EXPECT_LT(relative, 1e-5) << "step " << step;
    }
  }
  std::printf("[resharding] largest relative loss difference vs the uninterrupted run: %.3g\n",
              worst);
}

TEST(ShardedOptimizerState, OwnersBalanceTheBytes) {
  std::vector<torch::Tensor> params = {torch::zeros({100}), torch::zeros({10}), torch::zeros({60}),
                                       torch::zeros({50}), torch::zeros({5})};
  // 100 -> 0; 10 -> 1; 60 -> 1 (10 < 100); 50 -> 1 (70 < 100); 5 -> 0 (100 < 120).
  EXPECT_EQ(BalancedOwners(params, 2), (std::vector<int>{0, 1, 1, 1, 0}));
  EXPECT_EQ(BalancedOwners(params, 1), (std::vector<int>{0, 0, 0, 0, 0}));
  EXPECT_EQ(BalancedOwners(params, 8), (std::vector<int>{0, 1, 2, 3, 4}));
}

// ZeRO-1 changes where the AdamW moments live, not the arithmetic: the same losses bit for
// bit. Its checkpoints hold every moment once and resume without it (and the other way
// round) on another layout, continuing the curve.
TEST(ShardedOptimizerState, TrainsTheSameAndResumesOnAnyLayout) {
  auto world = rmoe::testing::MpiWorld();
  if (world->size() < 4) GTEST_SKIP() << "needs 4 ranks";
  const std::string dir = SharedTempDir(*world, "zero1");
  const std::vector<std::string> common = {"model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0",
                                           "optimizer.lr=0.005", "schedule.steps=18"};
  auto with = [&](std::vector<std::string> more) {
    more.insert(more.end(), common.begin(), common.end());
    return more;
  };
  const std::string sharded = "parallel.shard_optimizer_state=true";
  ASSERT_TRUE(TrainOn(4, TinyJob(dir + "/plain", with({"parallel.expert_parallel_size=2"}))).ok());
  ASSERT_TRUE(TrainOn(4, TinyJob(dir + "/sharded", with({"parallel.expert_parallel_size=2", sharded}))).ok());
  ASSERT_TRUE(TrainOn(2, TinyJob(dir + "/to_plain", with({"parallel.expert_parallel_size=1",
                                                          "schedule.grad_accum_steps=2"})),
                      dir + "/sharded/checkpoints/step_00000006")
                  .ok());
  ASSERT_TRUE(TrainOn(2, TinyJob(dir + "/to_sharded", with({"parallel.expert_parallel_size=2",
                                                            "schedule.grad_accum_steps=2", sharded})),
                      dir + "/plain/checkpoints/step_00000012")
                  .ok());
  if (world->rank() != 0) return;
  auto plain = Losses(dir + "/plain/metrics.jsonl");
  auto zero1 = Losses(dir + "/sharded/metrics.jsonl");
  ASSERT_EQ(plain.size(), 18u);
  EXPECT_EQ(zero1, plain) << "sharding the optimizer state changed the losses";

  // Every moment of every parameter is in the sharded checkpoint, once (the commit checks
  // that each tensor's rows are covered exactly once).
  auto names = [](const std::string& step_dir) {
    std::vector<std::string> out;
    auto manifest = ReadManifest(step_dir);
    EXPECT_TRUE(manifest.ok()) << manifest.status();
    if (manifest.ok()) {
      for (const auto& t : manifest->tensors()) out.push_back(t.name());
    }
    std::sort(out.begin(), out.end());
    return out;
  };
  EXPECT_EQ(names(dir + "/sharded/checkpoints/step_00000006"),
            names(dir + "/plain/checkpoints/step_00000006"));

  double worst = 0;
  for (const auto& [run, first] : {std::pair{dir + "/to_plain", 7}, std::pair{dir + "/to_sharded", 13}}) {
    auto resumed = Losses(run + "/metrics.jsonl");
    ASSERT_EQ(resumed.size(), static_cast<size_t>(18 - first + 1)) << run;
    for (const auto& [step, loss] : resumed) {
      const double relative = std::abs(loss - plain.at(step)) / plain.at(step);
      worst = std::max(worst, relative);
      EXPECT_LT(relative, 1e-5) << run << " step " << step;
    }
  }
  std::printf("[sharded optimizer] largest relative loss difference after resharding: %.3g\n",
              worst);
}

// Recomputation inside expert parallelism runs the all-to-alls again in the backward pass,
// in the same order on every rank: the same curve as without it (the first step's loss bit
// for bit, later ones up to the order of gradient sums), with and without ZeRO-1.
TEST(RecomputeUnderExpertParallelism, TrainsTheSameCurve) {
  auto world = rmoe::testing::MpiWorld();
  if (world->size() < 4) GTEST_SKIP() << "needs 4 ranks";
  const std::string dir = SharedTempDir(*world, "recompute");
  auto job = [&](const std::string& name, std::vector<std::string> more) {
    more.insert(more.end(), {"parallel.expert_parallel_size=2", "checkpoint.interval=0",
                             "model.router.recurrence=LAYER"});
    return TinyJob(dir + "/" + name, more);
  };
  ASSERT_TRUE(TrainOn(4, job("plain", {})).ok());
  ASSERT_TRUE(TrainOn(4, job("moe", {"runtime.recompute=MOE"})).ok());
  ASSERT_TRUE(TrainOn(4, job("full", {"runtime.recompute=FULL",
                                      "parallel.shard_optimizer_state=true"})).ok());
  if (world->rank() != 0) return;
  auto plain = Losses(dir + "/plain/metrics.jsonl");
  ASSERT_EQ(plain.size(), 12u);
  for (const std::string name : {"moe", "full"}) {
    auto losses = Losses(dir + "/" + name + "/metrics.jsonl");
    ASSERT_EQ(losses.size(), plain.size()) << name;
    EXPECT_EQ(losses.at(1), plain.at(1)) << name;
    for (const auto& [step, loss] : losses) {
      EXPECT_LT(std::abs(loss - plain.at(step)) / plain.at(step), 1e-5) << name << " step " << step;
    }
  }
}

TEST(Resume, RefusesAChangedModelAndNamesTheFields) {
  auto world = rmoe::testing::MpiWorld();
  const std::string dir = SharedTempDir(*world, "refuse");
  ASSERT_TRUE(TrainOn(1, TinyJob(dir + "/run", {"schedule.steps=6"})).ok());
  auto status = TrainOn(1, TinyJob(dir + "/changed", {"model.d_model=64", "model.num_heads=4",
                                                      "optimizer.lr=0.001"}),
                        dir + "/run/checkpoints");
  if (world->rank() != 0) return;
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("d_model"), std::string::npos) << status;
  EXPECT_NE(status.message().find("num_heads"), std::string::npos) << status;
  EXPECT_EQ(status.message().find("lr"), std::string::npos) << "lr may change: " << status;
}

}  // namespace
}  // namespace rmoe::distributed
