// Activation recomputation (runtime.recompute, rmoe/model/recompute.h): the same losses,
// router losses and gradients as without it, for every router, dense layers and shared
// experts, in fp64 and under bf16 products; statistics and decoding are unaffected.
#include <set>
#include <string>

#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>
#include <torch/torch.h>

#include "rmoe/model/layers.h"
#include "rmoe/model/recompute.h"
#include "rmoe/model/transformer.h"
#include "tests/test_util.h"

namespace rmoe {
namespace {

// Autograd nodes named `name` in the graph behind `root`.
int CountNodes(const torch::Tensor& root, const std::string& name) {
  std::vector<torch::autograd::Node*> stack = {root.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  int count = 0;
  while (!stack.empty()) {
    auto* node = stack.back();
    stack.pop_back();
    if (node == nullptr || !seen.insert(node).second) continue;
    if (node->name() == name) ++count;
    for (const auto& edge : node->next_edges()) stack.push_back(edge.function.get());
  }
  return count;
}

struct TrainingPass {
  int recomputed_pieces = 0;
  torch::Tensor loss, router_loss;
  std::vector<torch::Tensor> grads;
  std::vector<torch::Tensor> routed;  // per MoE layer: assignments per expert
};

// One forward and backward of `model` (parameters copied from `source`) under `mode`.
TrainingPass ForwardBackward(const ModelSpec& spec, Transformer& source, RuntimeSpec::Recompute mode,
                    const torch::Tensor& tokens, torch::ScalarType dtype) {
  Transformer model(spec);
  {
    torch::NoGradGuard no_grad;
    auto from = source->parameters();
    auto to = model->parameters();
    for (size_t i = 0; i < to.size(); ++i) to[i].copy_(from[i]);
  }
  model->to(dtype);
  model->train();
  model->set_recompute(mode);
  auto out = model->forward(tokens.narrow(1, 0, tokens.size(1) - 1));
  auto targets = tokens.narrow(1, 1, tokens.size(1) - 1).reshape({-1});
  TrainingPass run;
  run.loss = torch::nn::functional::cross_entropy(out.logits.reshape({targets.size(0), -1}), targets);
  run.router_loss = out.router_loss;
  run.recomputed_pieces = CountNodes(run.loss + run.router_loss, "rmoe::RecomputeBackward");
  (run.loss + run.router_loss).backward();
  for (const auto& p : model->parameters()) {
    EXPECT_TRUE(p.grad().defined());
    run.grads.push_back(p.grad().clone());
  }
  for (const auto& moe : out.moe) run.routed.push_back(moe.routed_per_expert.clone());
  return run;
}

class Recompute : public ::testing::TestWithParam<testing::RouterCase> {};

TEST_P(Recompute, GivesTheSameLossesAndGradientsInEveryMode) {
  ModelSpec spec = testing::TinyModel(GetParam());
  spec.mutable_moe()->add_moe_layers(0);  // layer 1 dense, layers 0 and 2 MoE
  spec.mutable_moe()->add_moe_layers(2);
  spec.mutable_moe()->set_shared_expert(true);
  torch::manual_seed(7);
  Transformer source(spec);
  auto tokens = torch::randint(spec.vocab_size(), {2, 12});
  const TrainingPass plain = ForwardBackward(spec, source, RuntimeSpec::NONE, tokens, torch::kDouble);
  ASSERT_EQ(plain.routed.size(), 2u);
  EXPECT_EQ(plain.recomputed_pieces, 0);
  for (auto mode : {RuntimeSpec::MOE, RuntimeSpec::FULL}) {
    SCOPED_TRACE(RuntimeSpec::Recompute_Name(mode));
    const TrainingPass again = ForwardBackward(spec, source, mode, tokens, torch::kDouble);
    // MOE: the two MoE layers' feed-forward parts; FULL: all three blocks.
    EXPECT_EQ(again.recomputed_pieces, mode == RuntimeSpec::MOE ? 2 : 3);
    EXPECT_TRUE(torch::equal(again.loss, plain.loss));
    EXPECT_TRUE(torch::equal(again.router_loss, plain.router_loss));
    ASSERT_EQ(again.routed.size(), plain.routed.size());
    for (size_t l = 0; l < plain.routed.size(); ++l) {
      EXPECT_TRUE(torch::equal(again.routed[l], plain.routed[l])) << "MoE layer " << l;
    }
    ASSERT_EQ(again.grads.size(), plain.grads.size());
    for (size_t i = 0; i < plain.grads.size(); ++i) {
      // The recomputation runs the same operations; only the order in which a parameter's
      // gradient contributions are summed may differ.
      EXPECT_TRUE(torch::allclose(again.grads[i], plain.grads[i], 1e-12, 1e-14))
          << "parameter " << i << ": max diff "
          << (again.grads[i] - plain.grads[i]).abs().max().item<double>();
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllRouters, Recompute, ::testing::ValuesIn(testing::AllRouters()),
                         [](const auto& info) { return info.param.name; });

// Under bf16 products the recomputation must run in bf16 as the first run did, or the
// gradients would belong to a different forward pass.
TEST(RecomputeMixedPrecision, RecomputesInTheSameLowPrecision) {
  ModelSpec spec = testing::TinyModel();
  torch::manual_seed(8);
  Transformer source(spec);
  auto tokens = torch::randint(spec.vocab_size(), {2, 10});
  const LowPrecisionMatmulGuard bf16(torch::kBFloat16);
  const TrainingPass plain = ForwardBackward(spec, source, RuntimeSpec::NONE, tokens, torch::kFloat);
  const TrainingPass full = ForwardBackward(spec, source, RuntimeSpec::FULL, tokens, torch::kFloat);
  EXPECT_TRUE(torch::equal(full.loss, plain.loss));
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    EXPECT_TRUE(torch::allclose(full.grads[i], plain.grads[i], 1e-5, 1e-7)) << "parameter " << i;
  }
}

// Decoding and evaluation run no backward: recomputation stays out of their way.
TEST(RecomputeInference, DecodingAndEvaluationAreUnchanged) {
  ModelSpec spec = testing::TinyModel(testing::AllRouters()[3]);  // token recurrence
  torch::manual_seed(9);
  Transformer model(spec);
  auto tokens = torch::randint(spec.vocab_size(), {1, 8});
  torch::NoGradGuard no_grad;
  model->eval();
  auto reference = model->forward(tokens).logits;
  model->set_recompute(RuntimeSpec::FULL);
  EXPECT_TRUE(torch::equal(model->forward(tokens).logits, reference));
  auto cache = model->NewCache();
  auto first = model->forward(tokens.narrow(1, 0, 5), &cache).logits;
  auto rest = model->forward(tokens.narrow(1, 5, 3), &cache).logits;
  EXPECT_TRUE(torch::allclose(torch::cat({first, rest}, 1), reference, 1e-5, 1e-6));
}

// The helper itself: gradients reach the inputs through the node and the parameters the
// function uses directly; the function runs once forward and once more in the backward.
TEST(RunWithRecomputation, GradientsReachInputsAndParameters) {
  auto weight = torch::randn({3, 3}, torch::kDouble).requires_grad_();
  auto x = torch::randn({2, 3}, torch::kDouble).requires_grad_();
  int calls = 0;
  RecomputedFunction fn = [&](const std::vector<torch::Tensor>& in) {
    ++calls;
    auto y = torch::tanh(in[0].matmul(weight));
    return std::vector<torch::Tensor>{y, y.square().sum(), torch::Tensor()};
  };
  auto outputs = RunWithRecomputation(fn, {x});
  EXPECT_EQ(calls, 1);
  (outputs[0].sum() + outputs[1]).backward();
  EXPECT_EQ(calls, 2);
  auto x2 = x.detach().clone().requires_grad_();
  auto w2 = weight.detach().clone().requires_grad_();
  auto y = torch::tanh(x2.matmul(w2));
  (y.sum() + y.square().sum()).backward();
  EXPECT_TRUE(torch::allclose(x.grad(), x2.grad()));
  EXPECT_TRUE(torch::allclose(weight.grad(), w2.grad()));
}

}  // namespace
}  // namespace rmoe
