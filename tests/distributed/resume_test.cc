// Checkpoint and resume through the real trainer, under mpirun with 4 ranks: a resume on the
// same layout continues bit for bit; a resume on another layout (EP 4 -> EP 2 -> EP 1, data
// parallelism changing with it) continues the loss curve; model changes are refused.
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>

#include <gtest/gtest.h>

#include "distributed/parallel_runtime.h"
#include "launcher/job_spec.h"
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
absl::Status TrainOn(int ranks, const JobSpec& spec, const std::string& resume = "") {
  auto world = rmoe::testing::MpiWorld();
  std::shared_ptr<Communicator> group = world->Split(world->rank() < ranks ? 0 : -1, world->rank());
  absl::Status result = absl::OkStatus();
  if (group) {
    auto groups = ProcessGroups::Create(group, spec.parallel().expert_parallel_size(),
                                        spec.model().moe().num_experts());
    if (!groups.ok()) return groups.status();
    DistributedRuntime runtime(*groups, 1);
    TrainOptions options;
    options.quiet = true;
    options.resume = resume;
    auto summary = Train(spec, options, &runtime);
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
