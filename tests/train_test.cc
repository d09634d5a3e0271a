// Training: the learning-rate schedule, the saved model round trip, and an end-to-end run
// on real text (the State of the Union corpus) that must learn far more than unigram
// statistics.
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <iterator>
#include <numeric>
#include <set>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "rmoe/config/job_spec.h"
#include "rmoe/data/dataset.h"
#include "rmoe/train/model_io.h"
#include "rmoe/train/progress.h"
#include "rmoe/train/tensorboard.h"
#include "rmoe/util/crc32c.h"
#include "rmoe/train/trainer.h"
#include "tests/test_util.h"

namespace rmoe {
namespace {
namespace fs = std::filesystem;

using testing::TempDir;

TEST(LearningRate, WarmsUpLinearlyThenDecaysByCosineToTheFloor) {
  JobSpec spec;
  spec.mutable_optimizer()->set_lr(1.0);
  spec.mutable_schedule()->set_steps(110);
  spec.mutable_schedule()->set_warmup_steps(10);
  spec.mutable_schedule()->set_min_lr_ratio(0.1);
  EXPECT_NEAR(LearningRate(spec, 0), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(spec, 4), 0.5, 1e-12);
  EXPECT_NEAR(LearningRate(spec, 9), 1.0, 1e-12);
  EXPECT_NEAR(LearningRate(spec, 10), 1.0, 1e-12);
  // Halfway through the decay the cosine is at its midpoint.
  EXPECT_NEAR(LearningRate(spec, 10 + 99 / 2.0), 0.55, 1e-2);
  EXPECT_NEAR(LearningRate(spec, 109), 0.1, 1e-7);  // min_lr_ratio is a float
  for (int step = 11; step < 110; ++step) {
    EXPECT_LE(LearningRate(spec, step), LearningRate(spec, step - 1) + 1e-12);
  }
}

TEST(LearningRate, ConstantDecayHoldsThePeakAfterTheWarmUp) {
  JobSpec spec;
  spec.mutable_optimizer()->set_lr(0.5);
  spec.mutable_schedule()->set_steps(100);
  spec.mutable_schedule()->set_warmup_steps(4);
  spec.mutable_schedule()->set_lr_decay(ScheduleSpec::CONSTANT);
  EXPECT_NEAR(LearningRate(spec, 1), 0.25, 1e-12);
  for (int step : {3, 4, 50, 99}) EXPECT_EQ(LearningRate(spec, step), 0.5) << step;
}

// With decay_router_weights off, every router parameter (gates, projections, the shared
// cell, an MLP router's layers) is in the group without weight decay, and nothing else moves.
TEST(Optimizer, RouterWeightsCanBeLeftUndecayed) {
  for (const auto& router : {testing::AllRouters()[1], testing::AllRouters()[5]}) {
    SCOPED_TRACE(router.name);
    JobSpec spec;
    *spec.mutable_model() = testing::TinyModel(router);
    spec.mutable_optimizer()->set_weight_decay(0.1);
    Transformer model(spec.model());
    auto decayed_names = [&](const torch::optim::AdamW& optimizer) {
      std::set<void*> decayed;
      for (const auto& group : optimizer.param_groups()) {
        const auto& options = static_cast<const torch::optim::AdamWOptions&>(group.options());
        if (options.weight_decay() == 0) continue;
        for (const auto& p : group.params()) decayed.insert(p.unsafeGetTensorImpl());
      }
      std::set<std::string> names;
      for (const auto& item : model->named_parameters()) {
        if (decayed.count(item.value().unsafeGetTensorImpl())) names.insert(item.key());
      }
      return names;
    };
    const auto with = decayed_names(*MakeOptimizer(spec, model, model->parameters()));
    spec.mutable_optimizer()->set_decay_router_weights(false);
    const auto without = decayed_names(*MakeOptimizer(spec, model, model->parameters()));
    int routers = 0;
    for (const auto& name : with) {
      const bool is_router = IsRouterParameter(name);
      routers += is_router;
      EXPECT_EQ(without.count(name), is_router ? 0u : 1u) << name;
    }
    EXPECT_GE(routers, 3);  // the layers' gates at least
    EXPECT_TRUE(IsRouterParameter("router_cell.w_ih"));
    EXPECT_TRUE(IsRouterParameter("layers.2.moe.router.hidden"));
    EXPECT_FALSE(IsRouterParameter("layers.2.moe.experts.w1"));
  }
}

TEST(Dropout, OnlyWhileTrainingAndRecomputedWithTheSameMasks) {
  ModelSpec spec = testing::TinyModel();
  spec.set_dropout(0.3);
  torch::manual_seed(4);
  Transformer model(spec);
  ModelSpec without = spec;
  without.set_dropout(0);
  Transformer plain(without);
  {
    torch::NoGradGuard no_grad;
    auto from = model->parameters(), to = plain->parameters();
    for (size_t i = 0; i < to.size(); ++i) to[i].copy_(from[i]);
  }
  auto tokens = torch::randint(spec.vocab_size(), {2, 9});
  model->eval();
  plain->eval();
  EXPECT_TRUE(torch::equal(model->forward(tokens).logits, plain->forward(tokens).logits));
  model->train();
  plain->train();
  EXPECT_FALSE(torch::allclose(model->forward(tokens).logits, plain->forward(tokens).logits));

  // The same seed gives the same masks, and recomputation replays them: equal gradients.
  auto gradients = [&](RuntimeSpec::Recompute mode) {
    model->set_recompute(mode);
    model->zero_grad();
    torch::manual_seed(77);
    auto out = model->forward(tokens);
    (out.logits.square().mean() + out.router_loss).backward();
    std::vector<torch::Tensor> grads;
    for (const auto& p : model->parameters()) grads.push_back(p.grad().clone());
    return grads;
  };
  const auto reference = gradients(RuntimeSpec::NONE);
  for (auto mode : {RuntimeSpec::MOE, RuntimeSpec::FULL}) {
    const auto again = gradients(mode);
    for (size_t i = 0; i < reference.size(); ++i) {
      EXPECT_TRUE(torch::allclose(again[i], reference[i], 1e-5, 1e-7))
          << RuntimeSpec::Recompute_Name(mode) << " parameter " << i;
    }
  }
}

TEST(Metrics, JsonRecordsEscapeStringsAndWriteNullForNonFiniteNumbers) {
  JsonObject record;
  record.Add("type", std::string("tr\"ain\n"))
      .Add("step", static_cast<int64_t>(7))
      .Add("loss", 2.5)
      .Add("bad", std::nan(""))
      .Add("counts", std::vector<int64_t>{1, 2})
      .AddRaw("moe", "[]")
      .Add("notes", std::vector<std::string>{"a\"b", ""});
  EXPECT_EQ(record.str(),
            R"({"type":"tr\"ain\u000a","step":7,"loss":2.5,"bad":null,"counts":[1,2],"moe":[],)"
            R"("notes":["a\"b",""]})");
}

TEST(Gradients, ZeroGradLeavesThemUndefinedAndTheRuntimeFillsZeros) {
  torch::manual_seed(3);
  JobSpec spec;
  *spec.mutable_model() = testing::TinyModel();
  spec.mutable_optimizer()->set_lr(0.1);
  spec.mutable_optimizer()->set_weight_decay(0.5);
  Transformer model(spec.model());
  auto optimizer = MakeOptimizer(spec, model, model->parameters());
  auto tokens = torch::randint(spec.model().vocab_size(), {2, 8}, torch::kLong);
  model->forward(tokens).logits.sum().backward();
  for (const auto& p : model->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
  }
  optimizer->zero_grad(/*set_to_none=*/true);
  for (const auto& p : model->named_parameters()) {
    EXPECT_FALSE(p.value().grad().defined()) << p.key();
  }

  // A step in which no parameter was reached: every one still takes AdamW's update for a
  // zero gradient (decoupled decay of matrices), as on any number of ranks.
  ParallelRuntime world_of_one;
  world_of_one.SynchronizeGradients(model);
  std::vector<torch::Tensor> before;
  for (const auto& p : model->parameters()) {
    ASSERT_TRUE(p.grad().defined());
    EXPECT_EQ(p.grad().abs().max().item<double>(), 0.0);
    before.push_back(p.detach().clone());
  }
  optimizer->step();
  const auto params = model->named_parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i].value();
    const bool decayed = p.dim() >= 2;
    const auto expected = decayed ? before[i] * (1 - 0.1 * 0.5) : before[i];
    EXPECT_TRUE(torch::allclose(p.detach(), expected, 1e-6, 1e-7)) << params[i].key();
  }
}

// The fused update must be libtorch's AdamW: same parameters and moments after several
// steps with both weight-decay groups, and the same state layout for checkpoints.
TEST(FusedAdamW, MatchesLibtorchAdamWStepForStep) {
  torch::manual_seed(7);
  const auto options = [](double weight_decay) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(3e-2).betas({0.9, 0.95}).eps(1e-8).weight_decay(weight_decay));
  };
  auto make_params = [] {
    torch::manual_seed(11);
    return std::vector<torch::Tensor>{torch::randn({16, 8}).requires_grad_(),
                                      torch::randn({8}).requires_grad_()};
  };
  auto fused_params = make_params(), reference_params = make_params();
  auto groups = [&](std::vector<torch::Tensor>& p) {
    std::vector<torch::optim::OptimizerParamGroup> g;
    g.emplace_back(std::vector<torch::Tensor>{p[0]}, options(0.1));
    g.emplace_back(std::vector<torch::Tensor>{p[1]}, options(0.0));
    return g;
  };
  FusedAdamW fused(groups(fused_params), torch::optim::AdamWOptions(3e-2));
  torch::optim::AdamW reference(groups(reference_params), torch::optim::AdamWOptions(3e-2));
  for (int step = 0; step < 5; ++step) {
    auto grads = std::vector<torch::Tensor>{torch::randn({16, 8}), torch::randn({8})};
    for (size_t i = 0; i < grads.size(); ++i) {
      fused_params[i].mutable_grad() = grads[i].clone();
      reference_params[i].mutable_grad() = grads[i].clone();
    }
    fused.step();
    reference.step();
  }
  for (size_t i = 0; i < fused_params.size(); ++i) {
    EXPECT_TRUE(torch::allclose(fused_params[i], reference_params[i], 1e-5, 1e-6)) << i;
    const void* key = fused_params[i].unsafeGetTensorImpl();
    const void* reference_key = reference_params[i].unsafeGetTensorImpl();
    auto& a = static_cast<torch::optim::AdamWParamState&>(*fused.state().at(const_cast<void*>(key)));
    auto& b = static_cast<torch::optim::AdamWParamState&>(
        *reference.state().at(const_cast<void*>(reference_key)));
    EXPECT_EQ(a.step(), 5);
    EXPECT_EQ(a.step(), b.step());
    EXPECT_TRUE(torch::allclose(a.exp_avg(), b.exp_avg(), 1e-5, 1e-7)) << i;
    EXPECT_TRUE(torch::allclose(a.exp_avg_sq(), b.exp_avg_sq(), 1e-5, 1e-7)) << i;
  }
  // The parameters moved: a no-op optimizer would pass the comparisons above.
  EXPECT_FALSE(torch::allclose(fused_params[0], make_params()[0]));
}

TEST(FusedAdamW, SquaredGradientNormSumsEveryDefinedGradient) {
  auto a = torch::zeros({3}).requires_grad_(), b = torch::zeros({2, 2}).requires_grad_();
  auto c = torch::zeros({4}).requires_grad_();  // no gradient
  a.mutable_grad() = torch::tensor({1.0f, 2.0f, 2.0f});
  b.mutable_grad() = torch::full({2, 2}, 0.5f);
  EXPECT_NEAR(SquaredGradientNorm({a, b, c}).item<double>(), 9.0 + 1.0, 1e-6);
  EXPECT_EQ(SquaredGradientNorm({c}).item<double>(), 0.0);
}

TEST(ModelIo, SavedModelReloadsToIdenticalLogits) {
  torch::manual_seed(21);
  auto dir = TempDir("io");
  JobSpec spec;
  *spec.mutable_model() = testing::TinyModel(testing::AllRouters()[3]);
  spec.mutable_data()->set_dataset_dir((dir / "no_dataset").string());
  Transformer model(spec.model());
  // meta.pbtxt normally comes from the dataset; write one so the directory is complete.
  fs::create_directories(dir / "no_dataset");
  std::ofstream(dir / "no_dataset" / "meta.pbtxt")
      << "vocab_size: 37 bytes_per_token: 2 document_separator: 10 train_tokens: 100 "
         "val_tokens: 100 tokenizer { kind: BYTE }";
  ASSERT_TRUE(SaveModel((dir / "model").string(), spec, model).ok());
  EXPECT_FALSE(fs::exists(dir / "model.tmp"));

  auto loaded = LoadModel((dir / "model").string());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(JobSpecToText(loaded->spec), JobSpecToText(spec));
  auto tokens = torch::randint(37, {1, 9});
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(model->forward(tokens).logits, loaded->model->forward(tokens).logits));

  // A spec whose shapes differ from the saved tensors is refused, naming the tensor.
  auto other = spec.model();
  other.set_d_model(32);
  Transformer wrong(other);
  auto status = LoadParameters((dir / "model" / "model.pt").string(), wrong);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("embedding.weight"), std::string::npos) << status;
  EXPECT_FALSE(LoadModel((dir / "missing").string()).ok());
  fs::remove_all(dir);
}

// A model saved with its files' checksums: any damaged byte, a truncated or missing file
// is refused by name before anything is loaded.
TEST(ModelIo, ADamagedModelIsRefusedNamingTheFile) {
  torch::manual_seed(3);
  auto dir = TempDir("damaged");
  JobSpec spec;
  *spec.mutable_model() = testing::TinyModel(testing::AllRouters()[0]);
  spec.mutable_data()->set_dataset_dir((dir / "dataset").string());
  fs::create_directories(dir / "dataset");
  std::ofstream(dir / "dataset" / "meta.pbtxt")
      << "vocab_size: 37 bytes_per_token: 2 document_separator: 10 train_tokens: 100 "
         "val_tokens: 100 tokenizer { kind: BYTE }";
  Transformer model(spec.model());
  const std::string saved = (dir / "model").string();
  ASSERT_TRUE(SaveModel(saved, spec, model).ok());
  ASSERT_TRUE(VerifyModelFiles(saved).ok());
  const std::string weights = saved + "/model.pt";
  const auto size = fs::file_size(weights);
  {  // 4 KiB of 0xFF in the middle of the weights
    std::fstream file(weights, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(static_cast<std::streamoff>(size / 2));
    const std::string junk(4096, '\xff');
    file.write(junk.data(), static_cast<std::streamsize>(std::min<uintmax_t>(junk.size(), size / 2)));
  }
  auto loaded = LoadModel(saved);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(loaded.status().message().find(weights + " is damaged"), std::string::npos)
      << loaded.status();
  // Saving again replaces the damaged directory (it is rmoe's), and the result loads.
  ASSERT_TRUE(SaveModel(saved, spec, model).ok());
  ASSERT_TRUE(LoadModel(saved).ok());
  fs::resize_file(saved + "/meta.pbtxt", 5);
  EXPECT_NE(LoadModel(saved).status().message().find("meta.pbtxt is damaged"), std::string::npos);
  fs::remove(saved + "/checksums");
  EXPECT_NE(LoadModel(saved).status().message().find("has no checksums file"), std::string::npos);
  fs::remove_all(dir);
}

// A model directory rmoe did not write is never replaced; the save fails naming it.
TEST(ModelIo, AForeignModelDirectoryIsNeverReplaced) {
  auto dir = TempDir("foreign_model");
  JobSpec spec;
  *spec.mutable_model() = testing::TinyModel(testing::AllRouters()[0]);
  spec.mutable_data()->set_dataset_dir((dir / "dataset").string());
  Transformer model(spec.model());
  fs::create_directories(dir / "model");
  std::ofstream(dir / "model" / "thesis.tex") << "years of work";
  const absl::Status saved = SaveModel((dir / "model").string(), spec, model);
  EXPECT_EQ(saved.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(saved.message().find((dir / "model").string()), std::string::npos) << saved;
  EXPECT_TRUE(fs::exists(dir / "model" / "thesis.tex"));
  EXPECT_FALSE(fs::exists(dir / "model.tmp"));
  // Nor a foreign directory at the temporary name.
  fs::remove_all(dir / "model");
  fs::create_directories(dir / "model.tmp");
  std::ofstream(dir / "model.tmp" / "notes") << "mine";
  EXPECT_FALSE(SaveModel((dir / "model").string(), spec, model).ok());
  EXPECT_TRUE(fs::exists(dir / "model.tmp" / "notes"));
  // Nor anything behind a symbolic link planted at the temporary name.
  fs::rename(dir / "model.tmp", dir / "victim");
  fs::create_directory_symlink(dir / "victim", dir / "model.tmp");
  const absl::Status linked = SaveModel((dir / "model").string(), spec, model);
  EXPECT_NE(linked.message().find("symbolic link"), std::string::npos) << linked;
  EXPECT_TRUE(fs::exists(dir / "victim" / "notes"));
  fs::remove_all(dir);
}

// Trains the tiny config on a byte-level dataset of the real corpus (fetched by
// tools/test.sh), prepared once for the suite by the real rmoe_prepare_data.
class RealText : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(TempDir("real_text"));
    const fs::path corpus = fs::path(RMOE_SOURCE_DIR) / "data" / "raw" / "sotu";
    ASSERT_TRUE(fs::exists(corpus)) << corpus << " is missing: run tools/fetch_corpus.sh";
    std::string command = std::string(RMOE_TOOLS_DIR) + "/rmoe_prepare_data --job " +
                          TinyConfig() + " --set data.dataset_dir=" + (*dir_ / "dataset").string() +
                          " --set data.raw_text=" + corpus.string() + " > " +
                          (*dir_ / "prepare.log").string() + " 2>&1";
    ASSERT_EQ(std::system(command.c_str()), 0) << "failed: " << command;
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
  }
  static std::string TinyConfig() {
    return (fs::path(RMOE_SOURCE_DIR) / "configs" / "tiny_test.pbtxt").string();
  }
  // The tiny job on the prepared dataset, writing under `run_name`, plus `overrides`.
  static JobSpec Job(const std::string& run_name, std::vector<std::string> overrides = {}) {
    overrides.push_back("data.dataset_dir=" + (*dir_ / "dataset").string());
    overrides.push_back("output_dir=" + (*dir_ / run_name).string());
    auto spec = LoadJobSpecWithOverrides(TinyConfig(), overrides);
    EXPECT_TRUE(spec.ok()) << spec.status();
    return spec.ok() ? *spec : JobSpec();
  }
  static fs::path* dir_;
};
fs::path* RealText::dir_ = nullptr;

TEST_F(RealText, TrainingBeatsTheUnigramEntropyByFar) {
  const JobSpec spec = Job("run", {"schedule.eval_interval=0"});
  auto meta = ReadDatasetMeta(spec.data().dataset_dir());
  ASSERT_TRUE(meta.ok()) << meta.status();
  TrainOptions options;
  options.quiet = true;
  auto summary = Train(spec, options);
  ASSERT_TRUE(summary.ok()) << summary.status();
  const double unigram = meta->unigram_entropy_nats();
  EXPECT_GT(unigram, 2.5);  // English text in bytes: about 3 nats
  EXPECT_LT(summary->final_val_loss, unigram - 0.6)
      << "validation loss " << summary->final_val_loss << " vs unigram entropy " << unigram;
  EXPECT_TRUE(fs::exists(fs::path(summary->model_dir) / "model.pt"));
  EXPECT_TRUE(fs::exists(*dir_ / "run" / "metrics.jsonl"));
}

// The same steps on the GPU give the CPU's losses (fp32; the products may be summed in
// another order, nothing else differs).
TEST_F(RealText, CudaLossesMatchTheCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: nothing to compare";
  auto losses_on = [&](const std::string& device) {
    const JobSpec spec = Job("cuda_" + device, {"schedule.steps=20", "schedule.warmup_steps=2",
                                                "checkpoint.interval=0", "runtime.device=" + device});
    TrainOptions options;
    options.quiet = true;
    options.overwrite = true;
    std::vector<double> losses;
    auto trainer = Trainer::Create(spec, options, nullptr, nullptr);
    EXPECT_TRUE(trainer.ok()) << trainer.status();
    if (!trainer.ok()) return losses;
    for (int step = 0; step < 20; ++step) {
      auto result = (*trainer)->Step(step);
      EXPECT_TRUE(result.ok() && (*trainer)->ReadLosses(step + 1, *result).ok());
      if (result.ok()) losses.push_back(result->loss);
    }
    return losses;
  };
  const auto cpu = losses_on("cpu"), cuda = losses_on("cuda");
  ASSERT_EQ(cpu.size(), 20u);
  ASSERT_EQ(cuda.size(), 20u);
  for (size_t i = 0; i < cpu.size(); ++i) {
    EXPECT_NEAR(cuda[i], cpu[i], 1e-3 * cpu[i]) << "step " << i + 1;
  }
}

TEST(Device, CpuResolvesAndAMissingGpuIsNamed) {
  auto cpu = ResolveDevice("CPU", 3);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_TRUE(cpu->is_cpu());
  auto bad = ResolveDevice("gpu", 0);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("\"cuda:N\""), std::string::npos) << bad.status();
  const int gpus = torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0;
  auto any = ResolveDevice("cuda", 5);
  auto out_of_range = ResolveDevice("cuda:" + std::to_string(gpus), 0);
  EXPECT_EQ(out_of_range.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(out_of_range.status().message().find("CUDA device(s)"), std::string::npos)
      << out_of_range.status();
  if (gpus == 0) {
    EXPECT_EQ(any.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(any.status().message().find("no CUDA device is usable here"), std::string::npos)
        << any.status();
  } else {
    ASSERT_TRUE(any.ok()) << any.status();
    EXPECT_EQ(any->index(), 5 % gpus) << "the local rank picks the GPU";
  }
}

TEST(Device, TokenWindowsReuseOneHostBufferOnTheCpu) {
  TokenWindows windows(2, 3, torch::Device(torch::kCPU));
  auto first = windows.Next([](int64_t* tokens) { std::iota(tokens, tokens + 8, 0); });
  EXPECT_EQ(first.sizes(), torch::IntArrayRef({2, 4}));
  EXPECT_EQ(first[1][3].item<int64_t>(), 7);
  auto second = windows.Next([](int64_t* tokens) { std::fill(tokens, tokens + 8, 9); });
  EXPECT_EQ(first.data_ptr(), second.data_ptr());
  EXPECT_TRUE(torch::equal(second, torch::full({2, 4}, 9, torch::kLong)));
}

TEST(Device, CudaTokenWindowsArriveOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  TokenWindows windows(2, 3, torch::Device(torch::kCUDA, 0));
  std::vector<torch::Tensor> seen;
  for (int64_t k = 0; k < 4; ++k) {
    seen.push_back(windows.Next([k](int64_t* tokens) { std::fill(tokens, tokens + 8, k); }));
  }
  for (int64_t k = 0; k < 4; ++k) {
    EXPECT_TRUE(seen[k].is_cuda());
    EXPECT_TRUE(torch::equal(seen[k].cpu(), torch::full({2, 4}, k, torch::kLong))) << k;
  }
}

TEST(Clipping, ScalesOnlyGradientsAboveTheLimit) {
  auto a = torch::zeros({2}).requires_grad_(), b = torch::zeros({2}).requires_grad_();
  a.mutable_grad() = torch::tensor({3.0f, 0.0f});
  b.mutable_grad() = torch::tensor({0.0f, 4.0f});
  // The scaling rule every runtime's ClipGradients applies after its norm.
  const auto norm = SquaredGradientNorm({a, b}).sqrt();
  EXPECT_NEAR(norm.item<double>(), 5.0, 1e-12);
  ScaleGradientsToNorm({a, b}, norm, 10.0);
  EXPECT_TRUE(torch::equal(a.grad(), torch::tensor({3.0f, 0.0f}))) << "below the limit: unchanged";
  ScaleGradientsToNorm({a, b}, norm, 1.0);
  EXPECT_NEAR(SquaredGradientNorm({a, b}).sqrt().item<double>(), 1.0, 1e-6);
  EXPECT_NEAR(a.grad()[0].item<double>(), 3.0 / 5.0, 1e-6);
  ScaleGradientsToNorm({a, b}, norm, 0.0);  // no clipping
  EXPECT_NEAR(a.grad()[0].item<double>(), 3.0 / 5.0, 1e-6);
}

TEST_F(RealText, ADivergingRunStopsWithAMessage) {
  // A learning rate validation refuses, set behind its back to force the divergence.
  JobSpec spec = Job("diverge", {"optimizer.grad_clip=0", "optimizer.weight_decay=0",
                                 "schedule.steps=20", "logging.interval=2"});
  spec.mutable_optimizer()->set_lr(1e30);
  TrainOptions options;
  options.quiet = true;
  auto summary = Train(spec, options);
  ASSERT_FALSE(summary.ok());
  EXPECT_NE(summary.status().message().find("training diverged"), std::string::npos)
      << summary.status();
  EXPECT_FALSE(fs::exists(*dir_ / "diverge" / "model")) << "a diverged model must not be saved";
}


// Stands in for the sharded checkpointer: records what the trainer asks of it. A save
// "commits" at once, or, with `background`, at the next Poll or Finish.
class RecordingCheckpointer : public Checkpointer {
 public:
  absl::StatusOr<std::string> Save(const JobSpec&, const TrainingProgress& progress,
                                   Transformer&, torch::optim::Optimizer&) override {
    saved.push_back(progress);
    const std::string dir = "ckpt/step_" + std::to_string(progress.step);
    CheckpointReport report;
    report.dir = dir;
    report.step = progress.step;
    report.async = background;
    (background ? in_flight : committed).push_back(report);
    return dir;
  }
  absl::Status Poll() override {
    ++polls;
    return Commit();
  }
  absl::Status Finish() override {
    ++finishes;
    return Commit();
  }
  std::vector<CheckpointReport> TakeReports() override { return std::exchange(committed, {}); }
  absl::StatusOr<TrainingProgress> Load(const std::string& path, const JobSpec&, Transformer&,
                                        torch::optim::Optimizer&) override {
    loaded_from = path;
    return restore;
  }
  std::vector<std::string> FindEarlierRun(const JobSpec&) override { return earlier; }
  absl::Status RemoveEarlierRun(const JobSpec&) override {
    ++removals;
    earlier.clear();
    return absl::OkStatus();
  }

  bool background = false;
  absl::Status poll_error = absl::OkStatus();
  TrainingProgress restore;
  std::vector<TrainingProgress> saved;
  std::vector<CheckpointReport> in_flight, committed;
  int polls = 0, finishes = 0;
  std::string loaded_from;
  std::vector<std::string> earlier;  // what FindEarlierRun reports
  int removals = 0;

 private:
  absl::Status Commit() {
    if (!poll_error.ok()) return poll_error;
    for (auto& r : std::exchange(in_flight, {})) committed.push_back(r);
    return absl::OkStatus();
  }
};

std::vector<std::string> RecordsOfType(const fs::path& metrics, const std::string& type) {
  std::vector<std::string> records;
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    if (line.find("\"type\":\"" + type + "\"") != std::string::npos) records.push_back(line);
  }
  return records;
}

TEST(LoggingWindow, SumsStepsAndReportsMeansPerStep) {
  LoggingWindow window;
  EXPECT_EQ(window.TokensPerSecond(), 0);
  EXPECT_EQ(window.PerStep(window.seconds), 0);
  StepResult a, b;
  a.seconds = 1.0, a.forward_seconds = 0.5, a.router_seconds = 0.1;
  a.expert_seconds = 0.2, a.dispatch_seconds = 0.05;
  b.seconds = 3.0, b.forward_seconds = 1.5, b.router_seconds = 0.3;
  b.expert_seconds = 0.6, b.dispatch_seconds = 0.15;
  window.Add(a, 100, 0.2);
  window.Add(b, 100, 0.4);
  EXPECT_EQ(window.steps, 2);
  EXPECT_DOUBLE_EQ(window.TokensPerSecond(), 200 / 4.0);
  EXPECT_DOUBLE_EQ(window.PerStep(window.seconds), 2.0);
  EXPECT_DOUBLE_EQ(window.PerStep(window.comm_seconds), 0.3);
  EXPECT_DOUBLE_EQ(window.PerStep(window.forward_seconds), 1.0);
  EXPECT_DOUBLE_EQ(window.PerStep(window.router_seconds), 0.2);
  EXPECT_DOUBLE_EQ(window.PerStep(window.expert_seconds), 0.4);
  EXPECT_DOUBLE_EQ(window.PerStep(window.dispatch_seconds), 0.1);
}

// Losses are read at logging steps only, yet every save reads them first: a diverged model
// never becomes a checkpoint (which, with keep_last, would replace a good one).
TEST_F(RealText, ADivergedModelIsNeverCheckpointed) {
  JobSpec spec = Job("diverge_ckpt", {"optimizer.grad_clip=0", "optimizer.weight_decay=0",
                                      "schedule.steps=20", "logging.interval=100",
                                      "checkpoint.interval=1", "schedule.eval_interval=0"});
  spec.mutable_optimizer()->set_lr(1e30);
  RecordingCheckpointer checkpointer;
  TrainOptions options;
  options.quiet = true;
  auto summary = Train(spec, options, nullptr, &checkpointer);
  ASSERT_FALSE(summary.ok());
  EXPECT_NE(summary.status().message().find("training diverged"), std::string::npos)
      << summary.status();
  ASSERT_LT(checkpointer.saved.size(), 20u);
  // The failing step is the one after the last save.
  const std::string expected =
      "by step " + std::to_string(checkpointer.saved.size() + 1) + " (last read finite at step " +
      std::to_string(checkpointer.saved.size()) + ";";
  EXPECT_NE(summary.status().message().find(expected), std::string::npos) << summary.status();
}

TEST_F(RealText, CheckpointsNeedACheckpointer) {
  TrainOptions options;
  options.quiet = true;
  auto summary = Train(Job("no_checkpointer", {"checkpoint.interval=5"}), options);
  ASSERT_FALSE(summary.ok());
  EXPECT_EQ(summary.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(summary.status().message().find("checkpoint.interval = 5"), std::string::npos)
      << summary.status();
}

TEST_F(RealText, SavesAtEachIntervalAndTheLastStepWithTheSamplesConsumed) {
  const JobSpec spec = Job("intervals", {"schedule.warmup_steps=1", "schedule.steps=7", "checkpoint.interval=3",
                                         "schedule.eval_interval=0", "schedule.micro_batch_size=4",
                                         "schedule.grad_accum_steps=2"});
  RecordingCheckpointer checkpointer;
  TrainOptions options;
  options.quiet = true;
  auto summary = Train(spec, options, nullptr, &checkpointer);
  ASSERT_TRUE(summary.ok()) << summary.status();
  ASSERT_EQ(checkpointer.saved.size(), 3u);
  const int64_t samples_per_step = 4 * 2;
  for (size_t i = 0; i < 3; ++i) {
    const int64_t step = i < 2 ? 3 * (i + 1) : 7;
    EXPECT_EQ(checkpointer.saved[i].step, step);
    EXPECT_EQ(checkpointer.saved[i].consumed_samples, step * samples_per_step);
  }
  // The last save saw the final validation.
  EXPECT_DOUBLE_EQ(checkpointer.saved.back().last_val_loss, summary->final_val_loss);
  EXPECT_EQ(checkpointer.polls, 7) << "one poll per step boundary";
  EXPECT_EQ(checkpointer.finishes, 1);
  EXPECT_EQ(summary->last_checkpoint, "ckpt/step_7");
  EXPECT_EQ(RecordsOfType(*dir_ / "intervals" / "metrics.jsonl", "checkpoint").size(), 3u);
}

TEST_F(RealText, BackgroundSavesAreReportedWhenTheyCommit) {
  const JobSpec spec = Job("background", {"schedule.warmup_steps=1", "schedule.steps=4", "checkpoint.interval=2",
                                          "schedule.eval_interval=0"});
  RecordingCheckpointer checkpointer;
  checkpointer.background = true;
  TrainOptions options;
  options.quiet = true;
  auto summary = Train(spec, options, nullptr, &checkpointer);
  ASSERT_TRUE(summary.ok()) << summary.status();
  // Step 2's save commits at step 3's poll; step 4's at the end.
  EXPECT_EQ(summary->last_checkpoint, "ckpt/step_4");
  const auto records = RecordsOfType(*dir_ / "background" / "metrics.jsonl", "checkpoint");
  ASSERT_EQ(records.size(), 2u);
  EXPECT_NE(records[0].find("\"step\":2"), std::string::npos) << records[0];
  EXPECT_NE(records[0].find("\"async\":true"), std::string::npos) << records[0];
}

TEST_F(RealText, AFailedBackgroundSaveStopsTraining) {
  RecordingCheckpointer checkpointer;
  checkpointer.poll_error = absl::DataLossError("rank 1: disk full");
  TrainOptions options;
  options.quiet = true;
  auto summary = Train(Job("failed_save", {"schedule.warmup_steps=1", "schedule.steps=3"}), options, nullptr, &checkpointer);
  ASSERT_FALSE(summary.ok());
  EXPECT_EQ(summary.status().message(), "rank 1: disk full");
  EXPECT_EQ(checkpointer.polls, 1);
}

TEST_F(RealText, AStopRequestSavesAfterTheStepInHandAndSavesNoModel) {
  RecordingCheckpointer checkpointer;
  std::atomic<bool> stop{true};
  TrainOptions options;
  options.quiet = true;
  options.stop_requested = &stop;
  auto summary = Train(Job("stopped", {"schedule.steps=50", "checkpoint.interval=0"}), options,
                       nullptr, &checkpointer);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_TRUE(summary->stopped_early);
  EXPECT_EQ(summary->steps, 1);
  ASSERT_EQ(checkpointer.saved.size(), 1u);
  EXPECT_EQ(checkpointer.saved[0].step, 1);
  EXPECT_TRUE(summary->model_dir.empty());
  EXPECT_FALSE(fs::exists(*dir_ / "stopped" / "model"));
}

TEST_F(RealText, AResumedRunContinuesFromTheRestoredStep) {
  RecordingCheckpointer checkpointer;
  checkpointer.restore.step = 5;
  checkpointer.restore.consumed_samples = 5 * 16;
  checkpointer.restore.best_val_loss = 0.5;  // better than this run will reach
  TrainOptions options;
  options.quiet = true;
  options.resume = "somewhere/step_5";
  auto summary = Train(Job("resumed", {"schedule.warmup_steps=1", "schedule.steps=8", "checkpoint.interval=0",
                                    "logging.interval=1"}), options,
                       nullptr, &checkpointer);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(checkpointer.loaded_from, "somewhere/step_5");
  EXPECT_EQ(summary->first_step, 5);
  EXPECT_EQ(summary->steps, 8);
  EXPECT_DOUBLE_EQ(summary->best_val_loss, 0.5);
  const auto records = RecordsOfType(*dir_ / "resumed" / "metrics.jsonl", "train");
  ASSERT_FALSE(records.empty());
  EXPECT_NE(records.front().find("\"step\":6"), std::string::npos) << records.front();

  // A checkpoint at or past schedule.steps leaves nothing to train.
  checkpointer.restore.step = 8;
  auto done = Train(Job("resumed_done", {"schedule.warmup_steps=1", "schedule.steps=8", "checkpoint.interval=0"}), options,
                    nullptr, &checkpointer);
  ASSERT_FALSE(done.ok());
  EXPECT_NE(done.status().message().find("nothing left to train"), std::string::npos)
      << done.status();
}

// TFRecord framing as TensorBoard reads it: little-endian length, its masked CRC-32C, the
// data, the data's masked CRC-32C (mask: rotate right 15, add 0xa282ead8).
TEST(TensorBoard, RecordsAreFramedWithMaskedChecksums) {
  const std::string data = "an event";
  const std::string record = TfRecord(data);
  ASSERT_EQ(record.size(), 8 + 4 + data.size() + 4);
  auto u32 = [&](size_t at) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(record[at + i]);
    return v;
  };
  EXPECT_EQ(record.substr(0, 8), std::string("\x08\0\0\0\0\0\0\0", 8));
  auto masked = [](uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; };
  EXPECT_EQ(u32(8), masked(Crc32c(record.substr(0, 8))));
  EXPECT_EQ(record.substr(12, data.size()), data);
  EXPECT_EQ(u32(12 + data.size()), masked(Crc32c(data)));
  EXPECT_EQ(MaskedCrc32c(data), masked(Crc32c(data)));
}

// A fresh run where an earlier run left its results stops and lists them; --overwrite
// replaces them (and asks the checkpointer to remove the earlier checkpoints); a resumed
// run continues them.
TEST_F(RealText, AFreshRunDoesNotOverwriteAnEarlierOneUnlessTold) {
  const JobSpec spec = Job("twice", {"schedule.warmup_steps=1", "schedule.steps=3", "checkpoint.interval=0"});
  TrainOptions options;
  options.quiet = true;
  ASSERT_TRUE(Train(spec, options).ok());
  const fs::path out = *dir_ / "twice";
  const auto first_metrics = fs::file_size(out / "metrics.jsonl");
  const std::vector<std::string> first_events = FindTensorBoardFiles(out.string());
  ASSERT_EQ(first_events.size(), 1u);
  RecordingCheckpointer checkpointer;
  checkpointer.earlier = {(out / "checkpoints" / "step_00000003").string()};
  auto refused = Train(spec, options, nullptr, &checkpointer);
  ASSERT_FALSE(refused.ok());
  const std::string message(refused.status().message());
  EXPECT_NE(message.find("holds an earlier run"), std::string::npos) << message;
  EXPECT_NE(message.find((out / "model").string()), std::string::npos) << message;
  EXPECT_NE(message.find("step_00000003"), std::string::npos) << message;
  EXPECT_NE(message.find(first_events[0]), std::string::npos) << message;
  EXPECT_NE(message.find("--resume"), std::string::npos) << message;
  EXPECT_NE(message.find("--overwrite"), std::string::npos) << message;
  EXPECT_EQ(fs::file_size(out / "metrics.jsonl"), first_metrics);
  EXPECT_EQ(checkpointer.removals, 0);

  // Marks the earlier run's event file, whose successor may get the same name (same process,
  // same second).
  std::ofstream(first_events[0], std::ios::app) << "earlier run";
  options.overwrite = true;
  ASSERT_TRUE(Train(spec, options, nullptr, &checkpointer).ok());
  EXPECT_EQ(checkpointer.removals, 1);
  EXPECT_EQ(RecordsOfType(out / "metrics.jsonl", "host").size(), 1u) << "metrics start afresh";
  const std::vector<std::string> events = FindTensorBoardFiles(out.string());
  ASSERT_EQ(events.size(), 1u) << "the earlier run's TensorBoard events are replaced";
  std::stringstream written;
  written << std::ifstream(events[0], std::ios::binary).rdbuf();
  EXPECT_EQ(written.str().find("earlier run"), std::string::npos) << "the earlier file was kept";
  EXPECT_TRUE(fs::exists(out / "model" / "checksums"));
}

// A user's own directory where the model would go stops the run before training, whatever
// the flags, and is left as it was.
TEST_F(RealText, AForeignModelDirectoryStopsTheRunBeforeTraining) {
  const JobSpec spec = Job("foreign", {"schedule.warmup_steps=1", "schedule.steps=3", "checkpoint.interval=0"});
  const fs::path out = *dir_ / "foreign";
  fs::create_directories(out / "model");
  std::ofstream(out / "model" / "thesis.tex") << "years of work";
  TrainOptions options;
  options.quiet = true;
  options.overwrite = true;
  auto refused = Train(spec, options);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("rmoe did not write it"), std::string::npos)
      << refused.status();
  EXPECT_TRUE(fs::exists(out / "model" / "thesis.tex"));
  EXPECT_FALSE(fs::exists(out / "metrics.jsonl")) << "refused before anything was written";
}

// metrics.jsonl is never written through a symbolic link: its target stays as it was.
TEST_F(RealText, AMetricsFileThatIsASymlinkIsRefused) {
  const JobSpec spec = Job("metrics_link", {"schedule.warmup_steps=1", "schedule.steps=2", "checkpoint.interval=0"});
  const fs::path out = *dir_ / "metrics_link";
  fs::create_directories(out);
  std::ofstream(*dir_ / "victim.txt") << "precious";
  fs::create_symlink(*dir_ / "victim.txt", out / "metrics.jsonl");
  TrainOptions options;
  options.quiet = true;
  options.overwrite = true;
  auto refused = Train(spec, options);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("symbolic link"), std::string::npos)
      << refused.status();
  std::ifstream victim(*dir_ / "victim.txt");
  std::string text((std::istreambuf_iterator<char>(victim)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "precious");
}

// logging.metrics_file naming a file rmoe did not write (a dataset's val.bin, say) stops a
// fresh run, even with --overwrite, before anything is removed; the file is left as it was.
TEST_F(RealText, AMetricsFileRmoeDidNotWriteIsNeverReplaced) {
  const fs::path out = *dir_ / "metrics_foreign";
  const std::string foreign = (*dir_ / "val.bin").string();
  std::ofstream(foreign) << "tokens, not metrics";
  const JobSpec first = Job("metrics_foreign", {"schedule.warmup_steps=1", "schedule.steps=2", "checkpoint.interval=0"});
  TrainOptions options;
  options.quiet = true;
  ASSERT_TRUE(Train(first, options).ok());  // an earlier run, whose model --overwrite would replace
  const JobSpec spec = Job("metrics_foreign", {"schedule.warmup_steps=1", "schedule.steps=2",
                                               "checkpoint.interval=0", "logging.metrics_file=" + foreign});
  options.overwrite = true;
  auto refused = Train(spec, options);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("not a metrics file rmoe wrote"), std::string::npos)
      << refused.status();
  std::ifstream in(foreign);
  EXPECT_EQ(std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()),
            "tokens, not metrics");
  EXPECT_TRUE(fs::exists(out / "model")) << "the earlier run was removed before the refusal";
}

// The writer refuses a foreign file whether the run is fresh or resumed, and a fresh file
// never truncates the old one in place: a hard link to it keeps its records.
TEST(Metrics, AForeignFileIsRefusedAndAHardLinkKeepsItsContent) {
  auto dir = TempDir("metrics_foreign");
  const std::string foreign = (dir / "notes.txt").string();
  std::ofstream(foreign) << "my notes";
  EXPECT_FALSE(MetricsWriter::Open(foreign).ok());
  EXPECT_FALSE(MetricsWriter::Open(foreign, /*resumed_step=*/3).ok());
  const std::string path = (dir / "metrics.jsonl").string();
  const std::string linked = (dir / "kept.jsonl").string();
  std::ofstream(path) << "{\"type\":\"host\"}\n";
  fs::create_hard_link(path, linked);
  auto writer = MetricsWriter::Open(path);
  ASSERT_TRUE(writer.ok()) << writer.status();
  writer->Write(JsonObject().Add("type", std::string("host")));
  auto read = [](const std::string& p) {
    std::ifstream in(p);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  EXPECT_EQ(read(foreign), "my notes");
  EXPECT_EQ(read(linked), "{\"type\":\"host\"}\n");
  EXPECT_EQ(read(path), "{\"type\":\"host\"}\n");
  fs::remove_all(dir);
}

// A run resumed from step 4 drops the records of later steps an interrupted run had
// written, so every step appears once.
TEST(Metrics, AResumedFileKeepsOnlyRecordsUpToTheResumedStep) {
  auto dir = TempDir("metrics_resume");
  const std::string path = (dir / "metrics.jsonl").string();
  std::ofstream(path) << "{\"type\":\"host\"}\n{\"type\":\"train\",\"step\":2}\n"
                         "{\"type\":\"checkpoint\",\"step\":4}\n{\"type\":\"train\",\"step\":5}\n"
                         "{\"type\":\"train\",\"st";  // torn by the crash
  auto writer = MetricsWriter::Open(path, /*resumed_step=*/4);
  ASSERT_TRUE(writer.ok()) << writer.status();
  writer->Write(JsonObject().Add("type", std::string("train")).Add("step", int64_t{5}));
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text,
            "{\"type\":\"host\"}\n{\"type\":\"train\",\"step\":2}\n"
            "{\"type\":\"checkpoint\",\"step\":4}\n{\"type\":\"train\",\"step\":5}\n");
  fs::remove_all(dir);
}

TEST_F(RealText, StepsFollowTheScheduleAndLowerTheLoss) {
  const JobSpec spec =
      Job("steps", {"schedule.steps=40", "schedule.warmup_steps=4", "checkpoint.interval=0"});
  TrainOptions options;
  options.quiet = true;
  auto trainer = Trainer::Create(spec, options, nullptr, nullptr);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  std::vector<double> losses;
  for (int step = 0; step < 40; ++step) {
    auto result = (*trainer)->Step(step);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_TRUE(std::isnan(result->loss)) << "read back before it was asked for";
    ASSERT_TRUE((*trainer)->ReadLosses(step + 1, *result).ok());
    EXPECT_GT(result->grad_norm, 0);
    EXPECT_GT(result->seconds, 0);
    EXPECT_GE(result->seconds, result->forward_seconds);
    EXPECT_DOUBLE_EQ(result->lr, LearningRate(spec, step));
    losses.push_back(result->loss);
  }
  const double first = (losses[0] + losses[1]) / 2, last = (losses[38] + losses[39]) / 2;
  EXPECT_LT(last, first - 0.5) << "40 steps on one text should lower the loss";
}
}  // namespace
}  // namespace rmoe
