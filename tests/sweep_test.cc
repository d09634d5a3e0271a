// rmoe_sweep's library (tools/sweep_lib.h): expansion, naming, validation, the metrics reader,
// the results tables, and running/resuming with a fake training program. Torch-free.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>
#include "rmoe/util/files.h"
#include "tools/sweep/metrics.h"
#include "tools/sweep/report.h"
#include "tools/sweep/run.h"
#include "tools/sweep/spec.h"

namespace rmoe::sweep {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

// The file's text; "" when it cannot be read (the expectations then say what was missing).
std::string ReadFile(const fs::path& path) { return rmoe::ReadFile(path.string()).value_or(""); }

void WriteFile(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
}

// A fresh empty directory under the test temp dir.
fs::path TempDir(const std::string& name) {
  const fs::path dir = fs::path(::testing::TempDir()) / absl::StrCat("rmoe_sweep_test_", getpid(), "_", name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// A tiny inline base job (the tiny_test model) plus the given sweep text.
SweepSpec Spec(const std::string& body) {
  const std::string text = absl::StrCat(R"pb(
    name: "t"
    base_job {
      seed: 100
      data { dataset_dir: "/nonexistent/rmoe_dataset" }
      model {
        vocab_size: 256 d_model: 32 num_layers: 2 num_heads: 2 max_seq_len: 64
        moe { num_experts: 4 top_k: 2 expert_hidden_dim: 64 }
        router { kind: RECURRENT hidden_dim: 16 }
      }
      schedule { steps: 20 warmup_steps: 2 micro_batch_size: 4 seq_len: 32 }
    }
    output_dir: "/tmp/rmoe_sweep_test_out"
  )pb", body);
  auto spec = ParseSweepSpec(text, "test.pbtxt");
  EXPECT_TRUE(spec.ok()) << spec.status();
  return spec.ok() ? *spec : SweepSpec();
}

Sweep Expand(const std::string& body, const ExpandOptions& options = {}) {
  auto sweep = ExpandSweep(Spec(body), "", options);
  EXPECT_TRUE(sweep.ok()) << sweep.status();
  return sweep.ok() ? *std::move(sweep) : Sweep();
}

std::vector<std::string> Descriptions(const Sweep& sweep) {
  std::vector<std::string> out;
  for (const Point& p : sweep.points) out.push_back(p.description);
  return out;
}

// ---------------------------------------------------------------------------------------
// Expansion and naming

TEST(SweepExpand, GridIsTheCartesianProductFirstAxisSlowest) {
  const Sweep sweep = Expand(R"pb(
    axes { field: "model.router.kind" label: "router" values: "LINEAR" values: "RECURRENT" }
    axes { field: "optimizer.lr" values: "0.01" values: "0.02" values: "0.03" }
  )pb");
  ASSERT_EQ(sweep.points.size(), 6u);
  EXPECT_THAT(Descriptions(sweep),
              ElementsAre("router=LINEAR, lr=0.01, seed=100", "router=LINEAR, lr=0.02, seed=100",
                          "router=LINEAR, lr=0.03, seed=100", "router=RECURRENT, lr=0.01, seed=100",
                          "router=RECURRENT, lr=0.02, seed=100", "router=RECURRENT, lr=0.03, seed=100"));
  EXPECT_EQ(sweep.points[4].job.model().router().kind(), RouterSpec::RECURRENT);
  EXPECT_FLOAT_EQ(sweep.points[4].job.optimizer().lr(), 0.02f);
  EXPECT_EQ(sweep.points[0].job.model().router().kind(), RouterSpec::LINEAR);
  EXPECT_THAT(sweep.points[4].overrides, ElementsAre("model.router.kind=RECURRENT", "optimizer.lr=0.02"));
  for (size_t i = 0; i < sweep.points.size(); ++i) EXPECT_EQ(sweep.points[i].index, static_cast<int>(i) + 1);
  EXPECT_FALSE(sweep.ranks_is_axis);
}

TEST(SweepExpand, ZipTakesTheIthValuesTogether) {
  const Sweep sweep = Expand(R"pb(
    combination: ZIP
    axes { field: "model.d_model" values: "32" values: "64" }
    axes { field: "model.num_heads" values: "2" values: "4" }
  )pb");
  ASSERT_EQ(sweep.points.size(), 2u);
  EXPECT_EQ(sweep.points[1].job.model().d_model(), 64);
  EXPECT_EQ(sweep.points[1].job.model().num_heads(), 4);
  EXPECT_EQ(sweep.points[1].name, "d-model-64_num-heads-4_seed-100");
}

TEST(SweepExpand, ZipRejectsAxesOfDifferentLengths) {
  auto sweep = ExpandSweep(Spec(R"pb(
    combination: ZIP
    axes { field: "model.d_model" values: "32" values: "64" }
    axes { field: "model.num_heads" values: "2" }
  )pb"), "");
  ASSERT_FALSE(sweep.ok());
  EXPECT_THAT(sweep.status().message(), HasSubstr("ZIP needs axes of equal length"));
}

TEST(SweepExpand, RepeatsAreTheOuterLoopAndOffsetTheSeed) {
  const Sweep sweep = Expand(R"pb(
    repeats: 3
    axes { field: "model.router.cell" label: "cell" values: "GRU" values: "RNN" }
  )pb");
  ASSERT_EQ(sweep.points.size(), 6u);
  EXPECT_THAT(Descriptions(sweep),
              ElementsAre("cell=GRU, seed=100", "cell=RNN, seed=100", "cell=GRU, seed=101",
                          "cell=RNN, seed=101", "cell=GRU, seed=102", "cell=RNN, seed=102"));
  EXPECT_EQ(sweep.points[5].repeat, 2);
  EXPECT_EQ(sweep.points[5].job.seed(), 102u);
  // Points that differ only by seed share a configuration.
  EXPECT_EQ(sweep.points[1].config_key, sweep.points[3].config_key);
  EXPECT_EQ(sweep.points[1].config_key, "cell=RNN");
  EXPECT_NE(sweep.points[0].config_key, sweep.points[1].config_key);
}

TEST(SweepExpand, NoAxesIsOneConfigurationPerRepeat) {
  const Sweep sweep = Expand("repeats: 2");
  ASSERT_EQ(sweep.points.size(), 2u);
  EXPECT_EQ(sweep.points[0].name, "seed-100");
  EXPECT_EQ(sweep.points[1].name, "seed-101");
}

TEST(SweepExpand, RanksAxisWithLinkedExpertParallelSize) {
  const Sweep sweep = Expand(R"pb(
    axes {
      field: "ranks" values: "1" values: "2" values: "4"
      linked { field: "parallel.expert_parallel_size" values: "1" values: "2" values: "4" }
    }
  )pb");
  ASSERT_EQ(sweep.points.size(), 3u);
  EXPECT_TRUE(sweep.ranks_is_axis);
  EXPECT_EQ(sweep.points[2].ranks, 4);
  EXPECT_EQ(sweep.points[2].job.parallel().expert_parallel_size(), 4);
  EXPECT_EQ(sweep.points[2].description, "ranks=4, seed=100");
  EXPECT_THAT(sweep.points[2].overrides, ElementsAre("parallel.expert_parallel_size=4"));
}

TEST(SweepExpand, ValueNamesAndLinkedFieldsDescribeCompoundValues) {
  const Sweep sweep = Expand(R"pb(
    axes {
      field: "model.router.kind" label: "router"
      values: "LINEAR" values: "RECURRENT" values: "RECURRENT"
      value_names: "linear" value_names: "gru/layer" value_names: "rnn token"
      linked { field: "model.router.cell" values: "GRU" values: "GRU" values: "RNN" }
      linked { field: "model.router.recurrence" values: "LAYER" values: "LAYER" values: "TOKEN" }
    }
  )pb");
  ASSERT_EQ(sweep.points.size(), 3u);
  const Point& p = sweep.points[2];
  EXPECT_EQ(p.job.model().router().cell(), RouterSpec::RNN);
  EXPECT_EQ(p.job.model().router().recurrence(), RouterSpec::TOKEN);
  EXPECT_EQ(p.description, "router=rnn token, seed=100");
  // Names are filesystem-safe.
  EXPECT_EQ(sweep.points[1].name, "router-gru-layer_seed-100");
  EXPECT_EQ(p.name, "router-rnn-token_seed-100");
  EXPECT_EQ(p.dir, "/tmp/rmoe_sweep_test_out/router-rnn-token_seed-100");
}

TEST(SweepExpand, SafeNames) {
  EXPECT_EQ(SafeName("RECURRENT/GRU/LAYER"), "RECURRENT-GRU-LAYER");
  EXPECT_EQ(SafeName("1,3"), "1-3");
  EXPECT_EQ(SafeName("3e-3"), "3e-3");
  EXPECT_EQ(SafeName("a  b"), "a-b");
  EXPECT_EQ(SafeName("/x/"), "x");
  EXPECT_EQ(SafeName(".."), "x..");
  EXPECT_EQ(SafeName(""), "x");
  EXPECT_EQ(SafeName("hidden_dim"), "hidden-dim");
}

TEST(SweepExpand, CollidingNamesAreMadeUnique) {
  const Sweep sweep = Expand(R"pb(
    axes { field: "model.moe.moe_layers" label: "moe" values: "0,1" values: "1"
           value_names: "0 1" value_names: "0/1" }
  )pb");
  ASSERT_EQ(sweep.points.size(), 2u);
  EXPECT_EQ(sweep.points[0].name, "moe-0-1_seed-100");
  EXPECT_EQ(sweep.points[1].name, "moe-0-1_seed-100_2");
  EXPECT_NE(sweep.points[0].dir, sweep.points[1].dir);
}

TEST(SweepExpand, DefaultLabelsAreTheLastSegmentOrTheWholePathWhenShared) {
  const Sweep sweep = Expand(R"pb(
    axes { field: "model.router.hidden_dim" values: "8" }
    axes { field: "model.moe.top_k" values: "1" }
    axes { field: "model.d_model" values: "32" }
  )pb");
  EXPECT_THAT(sweep.axis_labels, ElementsAre("hidden_dim", "top_k", "d_model"));
  const Sweep clash = Expand(R"pb(
    axes { field: "model.router.hidden_dim" values: "8" }
    axes { field: "model.moe.shared_expert_hidden_dim" values: "8" }
  )pb");
  EXPECT_THAT(clash.axis_labels, ElementsAre("hidden_dim", "shared_expert_hidden_dim"));
}

TEST(SweepExpand, PointJobsGetTheirOwnDirectoriesAndCheckpointInterval) {
  const Sweep sweep = Expand(R"pb(
    axes { field: "schedule.steps" values: "20" values: "95" }
  )pb");
  const JobSpec& job = sweep.points[1].job;
  EXPECT_EQ(job.output_dir(), sweep.points[1].dir);
  EXPECT_EQ(job.name(), absl::StrCat("t/", sweep.points[1].name));
  EXPECT_FALSE(job.checkpoint().has_directory());
  EXPECT_FALSE(job.logging().has_metrics_file());
  // Unset in the base: about ten checkpoints per run.
  EXPECT_EQ(sweep.points[0].job.checkpoint().interval(), 2);
  EXPECT_EQ(job.checkpoint().interval(), 10);
  EXPECT_EQ(CheckpointRootOf(job), sweep.points[1].dir + "/checkpoints");

  // Set in the base (even to 0): kept.
  ExpandOptions options;
  options.overrides = {"checkpoint.interval=0", "checkpoint.directory=/shared/ckpt",
                       "logging.metrics_file=/shared/m.jsonl"};
  const Sweep kept = Expand("", options);
  EXPECT_TRUE(kept.points[0].job.checkpoint().has_interval());
  EXPECT_EQ(kept.points[0].job.checkpoint().interval(), 0);
  EXPECT_FALSE(kept.points[0].job.checkpoint().has_directory());
  EXPECT_FALSE(kept.points[0].job.logging().has_metrics_file());
}

TEST(SweepExpand, OverridesAndOutputDir) {
  ExpandOptions options;
  options.overrides = {"schedule.steps=7"};
  options.output_dir = "/elsewhere";
  const Sweep sweep = Expand(R"pb(base_overrides: "schedule.steps=5" base_overrides: "optimizer.lr=0.5")pb", options);
  EXPECT_EQ(sweep.base.schedule().steps(), 7);  // --set after base_overrides
  EXPECT_FLOAT_EQ(sweep.base.optimizer().lr(), 0.5f);
  EXPECT_EQ(sweep.output_dir, "/elsewhere");
  EXPECT_EQ(sweep.points[0].dir, "/elsewhere/seed-100");

  SweepSpec spec = Spec("");
  spec.clear_output_dir();
  spec.set_name("my sweep");
  auto defaulted = ExpandSweep(spec, "");
  ASSERT_TRUE(defaulted.ok()) << defaulted.status();
  EXPECT_EQ(defaulted->output_dir, "runs/sweeps/my-sweep");
}

TEST(SweepExpand, JobDiffListsTheChangedFields) {
  const Sweep sweep = Expand(R"pb(
    axes { field: "model.moe.moe_layers" values: "1" }
    axes { field: "model.router.kind" values: "LINEAR" }
  )pb");
  const auto diff = JobDiff(sweep.base, sweep.points[0].job);
  EXPECT_THAT(diff, testing::Contains("model.moe.moe_layers: 1"));
  EXPECT_THAT(diff, testing::Contains("model.router.kind: LINEAR"));
  EXPECT_THAT(diff, testing::Contains("checkpoint.interval: 2"));
  EXPECT_THAT(diff, testing::Contains(HasSubstr("output_dir: ")));
  EXPECT_THAT(diff, Not(testing::Contains(HasSubstr("model.d_model"))));
}

// ---------------------------------------------------------------------------------------
// Errors: they name the point and the field

TEST(SweepErrors, BadValueNamesThePointAndTheField) {
  auto sweep = ExpandSweep(Spec(R"pb(
    repeats: 2
    axes { field: "model.router.cell" label: "router" values: "GRU" values: "LSTM" }
  )pb"), "");
  ASSERT_FALSE(sweep.ok());
  const std::string message(sweep.status().message());
  EXPECT_THAT(message, HasSubstr("point 2 (router=LSTM, seed=100): model.router.cell"));
  EXPECT_THAT(message, HasSubstr("point 4 (router=LSTM, seed=101): model.router.cell"));
  EXPECT_THAT(message, HasSubstr("LSTM"));
  EXPECT_THAT(message, Not(HasSubstr("point 1 ")));
}

TEST(SweepErrors, UnknownFieldIsReportedOnceForEveryPoint) {
  auto sweep = ExpandSweep(Spec(R"pb(
    axes { field: "model.router.hiden_dim" values: "8" values: "16" }
  )pb"), "");
  ASSERT_FALSE(sweep.ok());
  const std::string message(sweep.status().message());
  EXPECT_THAT(message, HasSubstr("every point: model.router.hiden_dim: unknown field \"hiden_dim\""));
  EXPECT_THAT(message, Not(HasSubstr("point 1 (")));
}

TEST(SweepErrors, StructuralProblems) {
  auto sweep = ExpandSweep(Spec(R"pb(
    repeats: 0
    axes { field: "ranks" values: "0" values: "two" }
    axes { field: "output_dir" values: "/x" }
    axes { field: "optimizer.lr" values: "1" value_names: "a" value_names: "b" }
    axes { field: "model.d_model" values: "1" values: "2" linked { field: "optimizer.lr" values: "1" } }
    axes { field: "model.num_heads" }
  )pb"), "");
  ASSERT_FALSE(sweep.ok());
  const std::string message(sweep.status().message());
  EXPECT_THAT(message, HasSubstr("repeats = 0 must be >= 1"));
  EXPECT_THAT(message, HasSubstr("ranks = \"0\" must be an integer >= 1"));
  EXPECT_THAT(message, HasSubstr("ranks = \"two\" must be an integer >= 1"));
  EXPECT_THAT(message, HasSubstr("output_dir is set by rmoe_sweep"));
  EXPECT_THAT(message, HasSubstr("2 value_names for 1 values"));
  EXPECT_THAT(message, HasSubstr("linked optimizer.lr has 1 values"));
  EXPECT_THAT(message, HasSubstr("optimizer.lr is set by more than one axis"));
  EXPECT_THAT(message, HasSubstr("(model.num_heads) has no values"));

  SweepSpec no_base;
  no_base.add_axes()->set_field("seed");
  EXPECT_THAT(ExpandSweep(no_base, "").status().message(), HasSubstr("needs a base job"));
}

TEST(SweepErrors, ValidationListsEveryBadPointWithItsField) {
  const Sweep sweep = Expand(R"pb(
    axes { field: "model.moe.top_k" label: "k" values: "2" values: "9" }
    axes { field: "ranks" values: "2" values: "3"
           linked { field: "parallel.expert_parallel_size" values: "2" values: "2" } }
  )pb");
  ValidationOptions no_data;
  no_data.check_data_files = false;
  const absl::Status status = ValidatePoints(sweep, no_data);
  ASSERT_FALSE(status.ok());
  const std::string message(status.message());
  EXPECT_THAT(message, Not(HasSubstr("point 1 (")));
  EXPECT_THAT(message, HasSubstr("point 2 (k=2, ranks=3, seed=100): ranks = 3 must be a multiple of "
                                 "parallel.expert_parallel_size = 2"));
  EXPECT_THAT(message, HasSubstr("point 3 (k=9, ranks=2, seed=100): model.moe.top_k = 9 must be in "
                                 "[1, model.moe.num_experts = 4]"));
  EXPECT_THAT(message, HasSubstr("point 4 (k=9, ranks=3, seed=100): model.moe.top_k = 9"));
  EXPECT_THAT(message, HasSubstr("point 4 (k=9, ranks=3, seed=100): ranks = 3"));
}

TEST(SweepErrors, ExpertsMustDivideOverTheExpertParallelSize) {
  const Sweep sweep = Expand(R"pb(
    axes { field: "ranks" values: "3" linked { field: "parallel.expert_parallel_size" values: "3" } }
  )pb");
  ValidationOptions no_data;
  no_data.check_data_files = false;
  EXPECT_THAT(ValidatePoints(sweep, no_data).message(),
              HasSubstr("point 1 (ranks=3, seed=100): parallel.expert_parallel_size = 3 must divide "
                        "model.moe.num_experts = 4"));
}

TEST(SweepErrors, MissingDatasetTellsToPrepareItWithTheBaseJob) {
  const Sweep sweep = Expand(R"pb(axes { field: "optimizer.lr" values: "0.1" values: "0.2" })pb");
  const absl::Status status = ValidatePoints(sweep);
  ASSERT_FALSE(status.ok());
  const std::string message(status.message());
  EXPECT_THAT(message, HasSubstr("every point: data.dataset_dir = \"/nonexistent/rmoe_dataset\" is not a "
                                 "prepared dataset"));
  EXPECT_THAT(message, HasSubstr("rmoe_prepare_data --job <inline base_job>"));
}

// The shipped sweeps parse and expand; a relative base_job_path is found from the sweep
// file's parents (the tests do not run in the source directory).
TEST(SweepConfigs, ShippedSweepsExpand) {
  const std::string dir = std::string(RMOE_SOURCE_DIR) + "/configs/sweeps/";
  auto smoke_spec = LoadSweepSpec(dir + "smoke.pbtxt");
  ASSERT_TRUE(smoke_spec.ok()) << smoke_spec.status();
  auto smoke = ExpandSweep(*smoke_spec, dir + "smoke.pbtxt");
  ASSERT_TRUE(smoke.ok()) << smoke.status();
  EXPECT_EQ(smoke->points.size(), 4u);
  EXPECT_TRUE(smoke->ranks_is_axis);
  EXPECT_THAT(smoke->base_source, testing::EndsWith("configs/tiny_test.pbtxt"));
  EXPECT_EQ(smoke->points[0].job.schedule().steps(), 20);
  ValidationOptions no_data;
  no_data.check_data_files = false;
  EXPECT_TRUE(ValidatePoints(*smoke, no_data).ok()) << ValidatePoints(*smoke, no_data);

  auto ablation_spec = LoadSweepSpec(dir + "router_ablation.pbtxt");
  ASSERT_TRUE(ablation_spec.ok()) << ablation_spec.status();
  auto ablation = ExpandSweep(*ablation_spec, dir + "router_ablation.pbtxt");
  ASSERT_TRUE(ablation.ok()) << ablation.status();
  ASSERT_EQ(ablation->points.size(), 12u);
  EXPECT_EQ(ablation->points[3].description, "router=gru-token, seed=1234");
  EXPECT_EQ(ablation->points[3].job.model().router().recurrence(), RouterSpec::TOKEN);
  EXPECT_EQ(ablation->points[11].job.seed(), 1236u);
  EXPECT_EQ(ablation->base.data().tokenizer().kind(), TokenizerSpec::BPE);
  EXPECT_TRUE(ValidatePoints(*ablation, no_data).ok()) << ValidatePoints(*ablation, no_data);

  // The paper's controls at two depths: 5 routers x 2 depths x 3 seeds.
  auto paper_spec = LoadSweepSpec(dir + "paper_depth_cpu.pbtxt");
  ASSERT_TRUE(paper_spec.ok()) << paper_spec.status();
  auto paper = ExpandSweep(*paper_spec, dir + "paper_depth_cpu.pbtxt");
  ASSERT_TRUE(paper.ok()) << paper.status();
  ASSERT_EQ(paper->points.size(), 30u);
  std::set<std::string> kinds;
  for (const auto& point : paper->points) {
    const RouterSpec& r = point.job.model().router();
    kinds.insert(absl::StrCat(RouterSpec::Kind_Name(r.kind()), "/",
                              RouterSpec::Recurrence_Name(r.recurrence()), "/", r.detach_state(),
                              "/", point.job.model().num_layers()));
  }
  EXPECT_EQ(kinds.size(), 10u);
  EXPECT_TRUE(kinds.count("RECURRENT/NONE/0/12"));
  EXPECT_TRUE(kinds.count("RECURRENT/LAYER/1/4"));
  EXPECT_TRUE(kinds.count("MLP/LAYER/0/12"));
  EXPECT_TRUE(ValidatePoints(*paper, no_data).ok()) << ValidatePoints(*paper, no_data);
  auto gpu_spec = LoadSweepSpec(dir + "paper_gpu.pbtxt");
  ASSERT_TRUE(gpu_spec.ok()) << gpu_spec.status();
  auto gpu = ExpandSweep(*gpu_spec, dir + "paper_gpu.pbtxt");
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_EQ(gpu->points.size(), 3u);
  EXPECT_TRUE(ValidatePoints(*gpu, no_data).ok()) << ValidatePoints(*gpu, no_data);
}

TEST(SweepConfigs, SyntaxErrorsNameTheLine) {
  auto spec = ParseSweepSpec("name: \"x\"\naxes { feld: \"a\" }\n", "s.pbtxt");
  ASSERT_FALSE(spec.ok());
  EXPECT_THAT(spec.status().message(), HasSubstr("s.pbtxt:2:"));
  EXPECT_THAT(spec.status().message(), HasSubstr("feld"));
  EXPECT_EQ(LoadSweepSpec("/nonexistent/s.pbtxt").status().code(), absl::StatusCode::kNotFound);
  SweepSpec missing = Spec("");
  missing.set_base_job_path("configs/no_such_job.pbtxt");
  EXPECT_THAT(ExpandSweep(missing, "/tmp/x/s.pbtxt").status().message(),
              HasSubstr("base_job_path \"configs/no_such_job.pbtxt\" not found"));
}

// ---------------------------------------------------------------------------------------
// Metrics and results

constexpr char kMetrics[] =
    R"({"type":"train","step":10,"lr":0.001,"loss":4.0,"router_loss":0.02,"grad_norm":1.5,"tokens_per_s":100,"step_s":0.5,"comm_s":0.4,"tokens":1000,"elapsed_s":5,"moe":[]}
{"type":"train","step":20,"lr":0.002,"loss":3.5,"router_loss":0.02,"grad_norm":1.2,"tokens_per_s":1000,"step_s":0.2,"comm_s":0.05,"forward_s":0.1,"router_s":0.01,"tokens":2000,"elapsed_s":7,"moe":[{"layer":0,"tokens_per_expert":[10,10,10,10],"dropped":0,"assignments":40,"router_entropy":1.0,"load_balance_loss":1.0,"z_loss":0.1}]}
{"type":"eval","step":20,"val_loss":3.6,"val_ppl":36.6}
{"type":"checkpoint","step":20,"seconds":0.1,"stall_seconds":0,"bytes":100,"async":false}
{"type":"train","step":30,"lr":0.003,"loss":3.0,"router_loss":0.01,"grad_norm":null,"tokens_per_s":900,"step_s":0.3,"comm_s":0.1,"forward_s":0.2,"router_s":0.02,"tokens":3000,"elapsed_s":9,"moe":[{"layer":0,"tokens_per_expert":[0,0,0,8],"dropped":2,"assignments":10,"router_entropy":0.5,"load_balance_loss":1.0,"z_loss":0.1}]}
{"type":"eval","step":30,"val_loss":3.7,"val_ppl":40.4,"routing":{"tokens":64,"layers":[{"layer":1,"load":[0.5,0.5],"load_cv":0.2,"entropy":0.6},{"layer":3,"load":[0.5,0.5],"load_cv":0.4,"entropy":0.5}],"transitions":[{"from_layer":1,"to_layer":3,"mutual_information":0.3,"predictability":0.45,"top1_counts":[1,2,3,4]}]}}
{"type":"train","step":40,"lr":0.004,"loss":2.5,"router_loss":0.01,"grad_norm":1,"tokens_per_s":500,"step_s":0.4,"comm_s":0.1,"forward_s":0.3,"router_s":0.06,"tokens":4000,"elapsed_s":11,"moe":[{"layer":1,"tokens_per_expert":[5,5,5,5],"dropped":0,"assignments":20,"router_entropy":1.5,"load_balance_loss":1.0,"z_loss":0.1},{"layer":3,"tokens_per_expert":[1,3,1,3],"dropped":1,"assignments":10,"router_entropy":0.5,"load_balance_loss":1.0,"z_loss":0.1}]}
{"type":"eval","step":40,"val_loss":3.4,"val_ppl":30.0}
{"type":"train","step":50,"loss":2.4,"moe":[{"layer":1,"tokens_per_ex
)";

TEST(SweepMetrics, ParsesRecordsAndSkipsBrokenLines) {
  const RunMetrics m = ParseMetrics(kMetrics);
  EXPECT_EQ(m.bad_lines, 1);  // the last line, cut short
  ASSERT_EQ(m.train.size(), 4u);
  ASSERT_EQ(m.eval.size(), 3u);
  EXPECT_EQ(m.train[1].step, 20);
  EXPECT_DOUBLE_EQ(m.train[1].lr, 0.002);
  EXPECT_DOUBLE_EQ(m.train[1].tokens, 2000);
  EXPECT_TRUE(std::isnan(m.train[2].grad_norm));  // null
  ASSERT_EQ(m.train[3].moe.size(), 2u);
  EXPECT_EQ(m.train[3].moe[1].layer, 3);
  EXPECT_THAT(m.train[3].moe[1].tokens_per_expert, ElementsAre(1, 3, 1, 3));
  EXPECT_DOUBLE_EQ(m.eval[2].val_loss, 3.4);
  EXPECT_DOUBLE_EQ(m.train[1].forward_s, 0.1);
  EXPECT_DOUBLE_EQ(m.train[3].router_s, 0.06);
  EXPECT_TRUE(std::isnan(m.train[0].forward_s));  // not logged
  EXPECT_FALSE(m.eval[0].routing.has_value());
  ASSERT_TRUE(m.eval[1].routing.has_value());
  EXPECT_THAT(m.eval[1].routing->load_cv, ElementsAre(0.2, 0.4));
  EXPECT_THAT(m.eval[1].routing->entropy, ElementsAre(0.6, 0.5));
  EXPECT_THAT(m.eval[1].routing->mutual_information, ElementsAre(0.3));
  EXPECT_THAT(m.eval[1].routing->predictability, ElementsAre(0.45));
  // Counts 1, 2, 3, 4: H = -sum p ln p with p = c / 10.
  ASSERT_EQ(m.eval[1].routing->effective_pairs.size(), 1u);
  EXPECT_NEAR(m.eval[1].routing->effective_pairs[0],
              std::exp(-(0.1 * std::log(0.1) + 0.2 * std::log(0.2) + 0.3 * std::log(0.3) + 0.4 * std::log(0.4))),
              1e-12);
}

TEST(SweepMetrics, SummaryNumbers) {
  const PointResult r = SummarizeMetrics(ParseMetrics(kMetrics));
  EXPECT_EQ(r.steps, 40);
  EXPECT_DOUBLE_EQ(r.final_train_loss, 2.5);
  EXPECT_DOUBLE_EQ(r.final_val_loss, 3.4);
  EXPECT_DOUBLE_EQ(r.best_val_loss, 3.4);
  // The first record (warm-up) is left out of the means.
  EXPECT_DOUBLE_EQ(r.tokens_per_s, (1000 + 900 + 500) / 3.0);
  EXPECT_DOUBLE_EQ(r.step_s, 0.3);
  EXPECT_NEAR(r.comm_s, 0.25 / 3, 1e-12);
  EXPECT_NEAR(r.compute_share, (0.3 - 0.25 / 3) / 0.3, 1e-12);
  // The last record's routing: entropy mean over layers, CV of [5,5,5,5] = 0 and of
  // [1,3,1,3] = 1/2, dropped (0 + 1) / (20 + 10).
  EXPECT_DOUBLE_EQ(r.router_entropy, 1.0);
  EXPECT_DOUBLE_EQ(r.expert_load_cv, 0.25);
  EXPECT_DOUBLE_EQ(r.dropped_fraction, 1.0 / 30);
  // Router share: mean router_s over mean forward_s (records after the first).
  EXPECT_NEAR(r.router_share, (0.09 / 3) / (0.6 / 3), 1e-12);
  // Routing analytics from the last evaluation that has them (step 30).
  EXPECT_NEAR(r.val_load_cv, 0.3, 1e-12);
  EXPECT_DOUBLE_EQ(r.layer_mutual_information, 0.3);
  EXPECT_DOUBLE_EQ(r.layer_predictability, 0.45);
  EXPECT_NEAR(r.layer_effective_pairs, EffectiveCount({1, 2, 3, 4}), 1e-12);
}

TEST(SweepMetrics, ResumedRunReplacesTheRelayedSteps) {
  // A run checkpointed at step 20, stopped after logging step 30, resumed from 20.
  const RunMetrics m = ParseMetrics(
      R"({"type":"train","step":10,"loss":4}
{"type":"train","step":20,"loss":3}
{"type":"eval","step":20,"val_loss":3.5}
{"type":"train","step":30,"loss":2.9}
{"type":"eval","step":30,"val_loss":2.0}
{"type":"train","step":30,"loss":2.8}
{"type":"eval","step":30,"val_loss":3.3}
{"type":"train","step":40,"loss":2.7}
)");
  ASSERT_EQ(m.train.size(), 4u);
  EXPECT_DOUBLE_EQ(m.train[2].loss, 2.8);
  ASSERT_EQ(m.eval.size(), 2u);
  EXPECT_DOUBLE_EQ(m.eval[1].val_loss, 3.3);
  const PointResult r = SummarizeMetrics(m);
  EXPECT_DOUBLE_EQ(r.best_val_loss, 3.3);  // the replaced 2.0 does not count
}

TEST(SweepMetrics, JsonDetails) {
  const RunMetrics m = ParseMetrics(
      "  {\"type\" : \"train\", \"step\" : 5, \"note\": \"a \\\"quoted\\\" \\u00e9 \\ud83d\\ude00 {[,]}\", "
      "\"nested\": {\"x\": [1, [2, {\"y\": null}]]}, \"loss\": -1.5e-1, \"ok\": true}  \n"
      "not json\n[1,2]\n{\"type\":\"eval\"}\n{\"type\":\"train\",\"step\":6,}\n\n");
  ASSERT_EQ(m.train.size(), 1u);
  EXPECT_DOUBLE_EQ(m.train[0].loss, -0.15);
  EXPECT_EQ(m.bad_lines, 4);  // "not json", an array, an eval without step, a trailing comma
  const PointResult empty = SummarizeMetrics(RunMetrics{});
  EXPECT_TRUE(std::isnan(empty.final_val_loss));
  EXPECT_TRUE(std::isnan(empty.tokens_per_s));
}

TEST(SweepMetrics, ParameterCountsAndStatistics) {
  auto counts = ParseParameterCounts(
      "name: \"x\"\n# parameters: 3675264 total, 1315968 active per token, 3145728 in experts\n");
  ASSERT_TRUE(counts.has_value());
  EXPECT_EQ(counts->total, 3675264);
  EXPECT_EQ(counts->active, 1315968);
  EXPECT_EQ(counts->expert, 3145728);
  EXPECT_FALSE(ParseParameterCounts("no counts here").has_value());

  auto [mean, std] = MeanAndStd({2.0, 2.2, std::nan("")});
  EXPECT_DOUBLE_EQ(mean, 2.1);
  EXPECT_NEAR(std, std::sqrt(0.02), 1e-12);
  auto [one, none] = MeanAndStd({5});
  EXPECT_DOUBLE_EQ(one, 5);
  EXPECT_TRUE(std::isnan(none));
  EXPECT_EQ(FormatDuration(35), "35s");
  EXPECT_EQ(FormatDuration(300), "5m00s");
  EXPECT_EQ(FormatDuration(3720), "1h02m");
}

TEST(SweepResults, CsvAndMarkdownSummary) {
  const Sweep sweep = Expand(R"pb(
    repeats: 2
    axes { field: "model.router.kind" label: "router" values: "LINEAR" values: "RECURRENT" }
    axes { field: "ranks" values: "1" values: "2"
           linked { field: "parallel.expert_parallel_size" values: "1" values: "2" } }
  )pb");
  ASSERT_EQ(sweep.points.size(), 8u);
  std::vector<PointResult> results(8);
  for (int i = 0; i < 8; ++i) {
    PointResult& r = results[i];
    r.status = i == 7 ? "failed" : "done";
    r.steps = 20;
    r.final_val_loss = 2.0 + 0.2 * sweep.points[i].repeat + (i % 4 >= 2 ? 1 : 0);
    r.best_val_loss = r.final_val_loss - 0.1;
    r.tokens_per_s = sweep.points[i].ranks == 1 ? 1000 : 1500;
    r.step_s = 0.5;
    r.comm_s = 0.1;
    r.compute_s = 0.4;
    r.compute_share = 0.8;
    r.parameters = {1000, 600, 800};
    r.router_entropy = 1.25;
    r.router_share = 0.05;
    r.layer_mutual_information = 0.2;
  }
  const std::string csv = ResultsCsv(sweep, results);
  std::vector<std::string> lines = absl::StrSplit(csv, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 9u);
  EXPECT_EQ(lines[0],
            "point,name,router,seed,ranks,status,steps,final_train_loss,final_val_loss,best_val_loss,"
            "tokens_per_s,step_s,comm_s,compute_s,compute_share,params_total,params_active,"
            "params_experts,router_entropy,expert_load_cv,dropped_fraction,router_share,"
            "val_load_cv,layer_mutual_information,layer_predictability,layer_effective_pairs");
  EXPECT_EQ(lines[6],
            "6,router-LINEAR_ranks-2_seed-101,LINEAR,101,2,done,20,,2.2,2.1,1500.0,0.5,0.1,0.4,0.8000,"
            "1000,600,800,1.25,,,0.0500,,0.2,,");
  EXPECT_THAT(lines[8], HasSubstr(",failed,"));
  EXPECT_EQ(ResultColumns(sweep).size(), 26u);

  const std::string md = ResultsMarkdown(sweep, results);
  // LINEAR ranks=1 over seeds 100, 101: 2.0 and 2.2.
  EXPECT_THAT(md, HasSubstr("| router=LINEAR, ranks=1 | 2 | 2.1000 ± 0.1414 | 2.0000 ± 0.1414 | 1000 ± 0 |"));
  // RECURRENT ranks=2: only the seed-100 point finished.
  EXPECT_THAT(md, HasSubstr("| router=RECURRENT, ranks=2 | 1 | 3.0000 | 2.9000 | 1500 |"));
  EXPECT_THAT(md, HasSubstr("| router=LINEAR | 2 | 1500 | 0.750 |"));  // scaling: 1500 / (2 x 1000)
  EXPECT_THAT(md, HasSubstr("0.001M (0.001M)"));
  // Against router=LINEAR at the same ranks: 3.0, 3.2 vs 2.0, 2.2 gives t = 1 / 0.1 = 7.07
  // on 2 degrees of freedom, p = 1 - t / sqrt(2 + t^2); ranks=2 has one RECURRENT seed.
  EXPECT_THAT(md, HasSubstr("## Against router=LINEAR"));
  EXPECT_THAT(md, HasSubstr("| router=RECURRENT, ranks=1 | router=LINEAR, ranks=1 | +1.0000 | 0.1414 | yes | "
                            "7.07 | 2.0 | 0.019 |"));
  EXPECT_THAT(md, HasSubstr("| router=RECURRENT, ranks=2 | router=LINEAR, ranks=2 | +0.9000 | 0.1414 | yes | - | - | - |"));
  EXPECT_THAT(md, Not(HasSubstr("| router=LINEAR, ranks=1 | router=LINEAR")));
}

TEST(SweepResults, UnfinishedConfigurationsAreListedOnce) {
  const Sweep sweep = Expand(R"pb(
    repeats: 3
    axes { field: "model.router.kind" label: "router" values: "LINEAR" values: "RECURRENT" }
  )pb");
  std::vector<PointResult> results(sweep.points.size());
  for (size_t i = 0; i < results.size(); ++i) {
    results[i].status = sweep.points[i].axis_values[0].second == "LINEAR" ? "done" : "not run";
    results[i].final_val_loss = 2.0 + 0.1 * sweep.points[i].repeat;
  }
  const std::string md = ResultsMarkdown(sweep, results);
  size_t rows = 0;
  for (size_t at = md.find("| router=RECURRENT | 0 |"); at != std::string::npos;
       at = md.find("| router=RECURRENT | 0 |", at + 1)) {
    ++rows;
  }
  EXPECT_EQ(rows, 1u) << md;
  EXPECT_THAT(md, HasSubstr("| router=LINEAR | 3 | 2.1000 ± 0.1000 |"));
  EXPECT_THAT(md, HasSubstr("| router=RECURRENT | router=LINEAR | - | 0.1000 | - | - | - | - |"));
}

TEST(SweepResults, ChartsDrawTenConfigurationsDistinctly) {
  const Sweep sweep = Expand(R"pb(
    axes { field: "seed" values: "1" values: "2" values: "3" values: "4" values: "5"
           values: "6" values: "7" values: "8" values: "9" values: "10" }
  )pb");
  ASSERT_EQ(sweep.points.size(), 10u);
  std::vector<RunMetrics> metrics(10);
  for (RunMetrics& m : metrics) m = ParseMetrics(R"({"type":"eval","step":10,"val_loss":2.5,"val_ppl":12.2})");
  const fs::path dir = fs::path(::testing::TempDir()) / "sweep_chart_styles";
  fs::create_directories(dir);
  FILE* log = std::fopen("/dev/null", "w");
  WritePlots(sweep, std::vector<PointResult>(10), metrics, dir.string(), log);
  std::fclose(log);
  const std::string gp = ReadFile(dir / "val_curves.gp");
  // gnuplot's 8 colours, then the same colours with the second dash type and point shape.
  EXPECT_THAT(gp, HasSubstr("index 0 using ($1+0):2:3 with yerrorlines lw 2 lc 1 dt 1 pt 7 "));
  EXPECT_THAT(gp, HasSubstr("index 7 using ($1+14):2:3 with yerrorlines lw 2 lc 8 dt 1 pt 7 "));
  EXPECT_THAT(gp, HasSubstr("index 8 using ($1+16):2:3 with yerrorlines lw 2 lc 1 dt 2 pt 5 "));
  EXPECT_THAT(gp, HasSubstr("index 9 using ($1+18):2:3 with yerrorlines lw 2 lc 2 dt 2 pt 5 "));
}

TEST(SweepStatistics, StudentTailsMatchClosedFormsAndTables) {
  // One degree of freedom is the Cauchy distribution: P(|T| > t) = 1 - 2 atan(t) / pi.
  for (double t : {0.3, 1.0, 4.0}) EXPECT_NEAR(StudentTwoSidedP(t, 1), 1 - 2 * std::atan(t) / M_PI, 1e-12);
  // Two: 1 - t / sqrt(2 + t^2).
  for (double t : {0.5, 2.0, 9.0}) EXPECT_NEAR(StudentTwoSidedP(-t, 2), 1 - t / std::sqrt(2 + t * t), 1e-12);
  // The 5% two-sided critical values of t tables, and the normal limit.
  EXPECT_NEAR(StudentTwoSidedP(2.776445, 4), 0.05, 1e-6);
  EXPECT_NEAR(StudentTwoSidedP(2.228139, 10), 0.05, 1e-6);
  EXPECT_NEAR(StudentTwoSidedP(1.959964, 1e7), 0.05, 1e-6);
  EXPECT_DOUBLE_EQ(StudentTwoSidedP(0, 3), 1.0);
  EXPECT_TRUE(std::isnan(StudentTwoSidedP(1, 0)));
}

TEST(SweepStatistics, EffectiveCount) {
  EXPECT_NEAR(EffectiveCount({5, 5, 5, 5}), 4.0, 1e-12);   // four equally used pairs
  EXPECT_NEAR(EffectiveCount({0, 7, 0, 0}), 1.0, 1e-12);   // one route
  EXPECT_NEAR(EffectiveCount({1, 1, 0, 2}), std::exp(1.5 * std::log(2.0)), 1e-12);
  EXPECT_TRUE(std::isnan(EffectiveCount({0, 0})));
  EXPECT_TRUE(std::isnan(EffectiveCount({1, -1})));
}

TEST(SweepStatistics, WelchTTest) {
  const WelchResult r = WelchTTest({1, 2, 3}, {4, 5, 6, 7, std::nan("")});
  EXPECT_DOUBLE_EQ(r.difference, -3.5);
  EXPECT_NEAR(r.t, -4.041451884327381, 1e-12);
  EXPECT_NEAR(r.dof, 4.959183673469387, 1e-12);
  EXPECT_NEAR(r.p_two_sided, StudentTwoSidedP(4.041451884327381, 4.959183673469387), 1e-15);
  EXPECT_GT(r.p_two_sided, 0.005);
  EXPECT_LT(r.p_two_sided, 0.02);
  // One value, or no spread at all: the difference only.
  const WelchResult single = WelchTTest({1}, {2, 3});
  EXPECT_DOUBLE_EQ(single.difference, -1.5);
  EXPECT_TRUE(std::isnan(single.t) && std::isnan(single.p_two_sided));
  EXPECT_TRUE(std::isnan(WelchTTest({1, 1}, {2, 2}).t));
}

// ---------------------------------------------------------------------------------------
// Running and resuming with a fake rmoe_train (and a fake mpirun)

// Logs every call to <point dir>/calls ("run" or "resume"), writes metrics and a model,
// prints "model saved to" as rmoe_train does; fails for a job containing $FAKE_FAIL; with
// $FAKE_HANG it waits for SIGTERM, then reports a checkpoint as rmoe_train does.
constexpr char kFakeTrain[] = R"(#!/bin/sh
job="" mode=run dry=no
while [ $# -gt 0 ]; do
  case "$1" in
    --job) job=$2; shift ;;
    --resume) mode=resume ;;
    --dry-run) dry=yes ;;
  esac
  shift
done
if [ $dry = yes ]; then
  echo "# parameters: 1000 total, 600 active per token, 800 in experts"
  exit 0
fi
dir=$(dirname "$job")
echo "$mode" >> "$dir/calls"
if [ -n "${FAKE_FAIL:-}" ] && grep -q "$FAKE_FAIL" "$job"; then
  echo "rmoe_train: something broke"
  exit 3
fi
if [ -n "${FAKE_HANG:-}" ]; then
  trap 'echo "stopped by a signal after step 5"; exit 0' TERM
  while true; do sleep 0.05; done
fi
echo '{"type":"train","step":10,"loss":3.0,"tokens_per_s":100,"step_s":0.1,"comm_s":0.0,"moe":[]}' >> "$dir/metrics.jsonl"
echo '{"type":"eval","step":10,"val_loss":2.5,"val_ppl":12.2}' >> "$dir/metrics.jsonl"
mkdir -p "$dir/model"
echo "model saved to $dir/model"
)";

constexpr char kFakeMpirun[] = R"(#!/bin/sh
# -np N [args] PROGRAM ARGS...: records N, drops launcher arguments.
echo "$2" >> "$FAKE_MPIRUN_LOG"
shift 2
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
)";

class SweepRunTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    train_ = (dir_ / "fake_train.sh").string();
    mpirun_ = (dir_ / "fake_mpirun.sh").string();
    WriteFile(train_, kFakeTrain);
    WriteFile(mpirun_, kFakeMpirun);
    chmod(train_.c_str(), 0755);
    chmod(mpirun_.c_str(), 0755);
    setenv("FAKE_MPIRUN_LOG", (dir_ / "mpirun.log").c_str(), 1);
    unsetenv("FAKE_FAIL");
    unsetenv("FAKE_HANG");
    ExpandOptions options;
    options.output_dir = (dir_ / "out").string();
    sweep_ = Expand(R"pb(
      axes { field: "model.router.kind" label: "router" values: "LINEAR" values: "RECURRENT" }
      axes { field: "ranks" values: "1" values: "2"
             linked { field: "parallel.expert_parallel_size" values: "1" values: "2" } }
      mpirun_args: "--oversubscribe"
    )pb", options);
    options_.train_program = train_;
    options_.mpirun_program = mpirun_;
    options_.mpirun_args = {"--oversubscribe"};
    options_.poll_seconds = 0.02;
  }
  void TearDown() override {
    unsetenv("FAKE_FAIL");
    unsetenv("FAKE_HANG");
    fs::remove_all(dir_);
  }

  // Runs the sweep, capturing its output.
  SweepOutcome Run() {
    char* buffer = nullptr;
    size_t size = 0;
    FILE* out = open_memstream(&buffer, &size);
    options_.out = out;
    SweepOutcome outcome = RunSweep(sweep_, options_);
    std::fclose(out);
    output_.assign(buffer, size);
    std::free(buffer);
    return outcome;
  }
  std::string Calls(int point) { return ReadFile(fs::path(sweep_.points[point].dir) / "calls"); }

  fs::path dir_;
  std::string train_, mpirun_, output_;
  Sweep sweep_;
  RunOptions options_;
};

TEST_F(SweepRunTest, Commands) {
  EXPECT_THAT(TrainCommand(options_, sweep_.points[0], false),
              ElementsAre(train_, "--job", sweep_.points[0].dir + "/job.pbtxt", "--quiet",
                          "--overwrite"));
  EXPECT_THAT(TrainCommand(options_, sweep_.points[1], true),
              ElementsAre(mpirun_, "-np", "2", "--oversubscribe", train_, "--job",
                          sweep_.points[1].dir + "/job.pbtxt", "--quiet", "--resume"));
}

TEST_F(SweepRunTest, RunsEveryPointThenSkipsFinishedOnes) {
  SweepOutcome first = Run();
  EXPECT_EQ(first.ran, 4);
  EXPECT_EQ(first.failed, 0);
  EXPECT_EQ(first.already_done, 0);
  EXPECT_FALSE(first.interrupted);
  EXPECT_THAT(output_, HasSubstr("[1/4] router=LINEAR ranks=1 seed=100: running (elapsed"));
  EXPECT_THAT(output_, HasSubstr("[4/4] router=RECURRENT ranks=2 seed=100: done in"));
  EXPECT_THAT(output_, HasSubstr("(final val loss 2.5000)"));
  for (int i = 0; i < 4; ++i) {
    const fs::path dir = sweep_.points[i].dir;
    EXPECT_TRUE(fs::exists(dir / "DONE")) << dir;
    EXPECT_EQ(Calls(i), "run\n");
    // The job file is the point's spec; the log starts with the command.
    auto job = LoadJobSpec((dir / "job.pbtxt").string());
    ASSERT_TRUE(job.ok()) << job.status();
    EXPECT_EQ(job->output_dir(), sweep_.points[i].dir);
    EXPECT_THAT(ReadFile(dir / "train.log"), HasSubstr("=== rmoe_sweep "));
    EXPECT_THAT(ReadFile(dir / "train.log"), HasSubstr("model saved to"));
    EXPECT_THAT(ReadFile(dir / "parameters.txt"), HasSubstr("1000 total"));
  }
  // Points of 2 ranks went through the launcher, with -np 2.
  EXPECT_EQ(ReadFile(dir_ / "mpirun.log"), "2\n2\n");

  SweepOutcome second = Run();
  EXPECT_EQ(second.already_done, 4);
  EXPECT_EQ(second.ran, 0);
  EXPECT_THAT(output_, HasSubstr("[2/4] router=LINEAR ranks=2 seed=100: done earlier, skipped"));
  for (int i = 0; i < 4; ++i) EXPECT_EQ(Calls(i), "run\n");
  EXPECT_THAT(output_, Not(HasSubstr("warning")));

  // A finished point is not rerun when the spec changes, but the change is pointed out.
  sweep_.points[0].job.mutable_optimizer()->set_lr(0.5);
  Run();
  EXPECT_THAT(output_, HasSubstr("[1/4] router=LINEAR ranks=1 seed=100: done earlier, skipped (warning: "
                                 "it ran with a different job.pbtxt; delete "));
  EXPECT_EQ(Calls(0), "run\n");
}

TEST_F(SweepRunTest, UnfinishedPointsResumeFromTheirCheckpoint) {
  Run();
  // Point 1: interrupted after a checkpoint (no DONE, no model, a committed checkpoint).
  const fs::path p1 = sweep_.points[0].dir;
  fs::remove(p1 / "DONE");
  fs::remove_all(p1 / "model");
  fs::create_directories(p1 / "checkpoints" / "step_00000005");
  WriteFile(p1 / "checkpoints" / "step_00000005" / "COMMITTED", "step 5\n");
  // Point 2: interrupted before its first checkpoint (an uncommitted one does not count).
  const fs::path p2 = sweep_.points[1].dir;
  fs::remove(p2 / "DONE");
  fs::remove_all(p2 / "model");
  fs::create_directories(p2 / "checkpoints" / "step_00000005");
  // Point 3: finished, but stopped before DONE was written: not run again.
  fs::remove(fs::path(sweep_.points[2].dir) / "DONE");
  EXPECT_EQ(InspectPoint(sweep_.points[0]), PointState::kResumable);
  EXPECT_EQ(InspectPoint(sweep_.points[1]), PointState::kFresh);
  EXPECT_EQ(InspectPoint(sweep_.points[3]), PointState::kDone);

  SweepOutcome outcome = Run();
  EXPECT_EQ(outcome.ran, 2);
  EXPECT_EQ(outcome.already_done, 2);
  EXPECT_EQ(Calls(0), "run\nresume\n");
  EXPECT_EQ(Calls(1), "run\nrun\n");
  EXPECT_EQ(Calls(2), "run\n");
  EXPECT_TRUE(fs::exists(fs::path(sweep_.points[2].dir) / "DONE"));
  EXPECT_THAT(output_, HasSubstr("[1/4] router=LINEAR ranks=1 seed=100: resuming from its checkpoint"));
  EXPECT_THAT(ReadFile(p1 / "train.log"), HasSubstr("(resuming): "));
  EXPECT_THAT(ReadFile(p1 / "train.log"), HasSubstr(" --resume\n"));
}

TEST_F(SweepRunTest, FailureIsReportedAndTheSweepGoesOn) {
  setenv("FAKE_FAIL", "kind: LINEAR", 1);
  SweepOutcome outcome = Run();
  EXPECT_EQ(outcome.failed, 2);
  EXPECT_EQ(outcome.ran, 4);
  EXPECT_THAT(output_, HasSubstr("[1/4] router=LINEAR ranks=1 seed=100: FAILED after"));
  EXPECT_THAT(output_, HasSubstr("(exit status 3)"));
  EXPECT_THAT(output_, HasSubstr("    | rmoe_train: something broke"));
  EXPECT_FALSE(fs::exists(fs::path(sweep_.points[0].dir) / "DONE"));
  EXPECT_TRUE(fs::exists(fs::path(sweep_.points[0].dir) / "FAILED"));
  EXPECT_TRUE(fs::exists(fs::path(sweep_.points[2].dir) / "DONE"));

  // The results list every point with its status.
  char* buffer = nullptr;
  size_t size = 0;
  FILE* out = open_memstream(&buffer, &size);
  ASSERT_TRUE(GatherResults(sweep_, train_, out).ok());
  std::fclose(out);
  const std::string printed(buffer, size);
  std::free(buffer);
  EXPECT_THAT(printed, HasSubstr("results.csv"));
  const std::string csv = ReadFile(dir_ / "out" / "results.csv");
  std::vector<std::string> lines = absl::StrSplit(csv, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 5u);
  EXPECT_THAT(lines[1], HasSubstr(",failed,"));
  EXPECT_THAT(lines[3], HasSubstr(",done,10,3,2.5,2.5,"));
  EXPECT_THAT(lines[3], HasSubstr(",1000,600,800,"));
  EXPECT_TRUE(fs::exists(dir_ / "out" / "results.md"));
  EXPECT_TRUE(fs::exists(dir_ / "out" / "loss_curves.gp"));
  EXPECT_TRUE(fs::exists(dir_ / "out" / "scaling.dat"));
  // Validation loss per configuration: mean and std over the finished seeds.
  EXPECT_THAT(ReadFile(dir_ / "out" / "val_curves.dat"), HasSubstr("10 2.5 0 1\n"));
  EXPECT_THAT(ReadFile(dir_ / "out" / "val_curves.gp"), HasSubstr("yerrorlines"));

  // Fixed: the rerun runs only the failed points.
  unsetenv("FAKE_FAIL");
  outcome = Run();
  EXPECT_EQ(outcome.failed, 0);
  EXPECT_EQ(outcome.ran, 2);
  EXPECT_FALSE(fs::exists(fs::path(sweep_.points[0].dir) / "FAILED"));
}

TEST_F(SweepRunTest, SigtermStopsTheSweepAfterThePointCheckpoints) {
  setenv("FAKE_HANG", "1", 1);
  const fs::path calls = fs::path(sweep_.points[0].dir) / "calls";
  std::thread killer([&] {
    for (int i = 0; i < 500 && !fs::exists(calls); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    kill(getpid(), SIGTERM);
  });
  SweepOutcome outcome = Run();
  killer.join();
  EXPECT_TRUE(outcome.interrupted);
  EXPECT_EQ(outcome.ran, 1);
  EXPECT_EQ(outcome.failed, 0);
  EXPECT_THAT(output_, HasSubstr("[1/4] router=LINEAR ranks=1 seed=100: stopped after"));
  EXPECT_THAT(output_, HasSubstr("checkpointed; it resumes from there"));
  EXPECT_FALSE(fs::exists(fs::path(sweep_.points[0].dir) / "DONE"));
  EXPECT_FALSE(fs::exists(fs::path(sweep_.points[1].dir) / "calls"));
}

}  // namespace
}  // namespace rmoe::sweep
