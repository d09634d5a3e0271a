// The model's pieces against references: experts and MoE layer against a naive per-token
// loop, gradients against finite differences, causality, the layer recurrence, the
// auxiliary losses and capacity dropping.
#include <map>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "rmoe/config/resources.h"
#include "rmoe/model/experts.h"
#include "rmoe/model/fused_ops.h"
#include "rmoe/model/layers.h"
#include "rmoe/model/moe_layer.h"
#include "rmoe/model/router.h"
#include "rmoe/model/transformer.h"
#include "tests/test_util.h"

namespace rmoe {
namespace {

using testing::AllRouters;
using testing::ExpectGradientsMatchFiniteDifferences;
using testing::RouterCase;
using testing::TinyModel;

torch::Tensor NaiveSwiGLU(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w3,
                          const torch::Tensor& w2) {
  return (torch::silu(x.matmul(w1)) * x.matmul(w3)).matmul(w2);
}

torch::Tensor Param(torch::nn::Module& module, const std::string& name) {
  auto* found = module.named_parameters().find(name);
  TORCH_CHECK(found, "no parameter ", name);
  return *found;
}

// LibTorch's fused attention (scaled_dot_product_attention) against the explicit masked
// softmax, values and gradients: a whole sequence (its causal mask) and one decoding step
// after a cache (no mask), in fp64, fp32 and bf16.
struct AttentionCase {
  torch::ScalarType dtype;
  double tolerance;
};

class FusedAttention : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(FusedAttention, MatchesTheExplicitMaskedSoftmaxWithGradients) {
  const auto [dtype, tolerance] = GetParam();
  torch::manual_seed(11);
  const int64_t batch = 2, heads = 3, keys = 19, head_dim = 16;
  for (int64_t past : {int64_t{0}, keys - 1}) {
    const int64_t queries = keys - past;
    auto make = [&](int64_t t) {
      return torch::randn({batch, heads, t, head_dim}, torch::kDouble).to(dtype).requires_grad_();
    };
    auto q = make(queries), k = make(keys), v = make(keys);
    auto probe = torch::randn({batch, heads, queries, head_dim}, torch::kDouble).to(dtype);
    auto run = [&](auto attention) {
      for (auto* t : {&q, &k, &v}) t->mutable_grad() = torch::Tensor();
      auto out = attention(q, k, v, past);
      (out.to(torch::kDouble) * probe.to(torch::kDouble)).sum().backward();
      return std::vector<torch::Tensor>{out.to(torch::kDouble), q.grad().to(torch::kDouble),
                                        k.grad().to(torch::kDouble), v.grad().to(torch::kDouble)};
    };
    const auto fused = run(CausalAttention);
    const auto reference = run(CausalAttentionReference);
    const char* names[] = {"output", "grad q", "grad k", "grad v"};
    for (int i = 0; i < 4; ++i) {
      const double difference = (fused[i] - reference[i]).abs().max().item<double>();
      const double scale = reference[i].abs().max().item<double>();
      EXPECT_LE(difference, tolerance * scale)
          << names[i] << " past " << past << " dtype " << dtype;
    }
  }
  // The fused path masks the future: the first query's output is its own value row.
  auto q = torch::randn({1, 1, 4, head_dim}).to(dtype), k = torch::randn({1, 1, 4, head_dim}).to(dtype);
  auto v = torch::randn({1, 1, 4, head_dim}).to(dtype);
  auto out = CausalAttention(q, k, v, 0);
  EXPECT_TRUE(torch::allclose(out.select(2, 0).to(torch::kDouble), v.select(2, 0).to(torch::kDouble),
                              tolerance, tolerance));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, FusedAttention,
                         ::testing::Values(AttentionCase{torch::kDouble, 1e-12},
                                           AttentionCase{torch::kFloat, 2e-6},
                                           AttentionCase{torch::kBFloat16, 3e-2}),
                         [](const auto& info) {
                           return std::string(c10::toString(info.param.dtype));
                         });

TEST(FusedAttention, ACachedChunkUsesTheBottomRightMask) {
  // Two new queries after 3 cached positions: the fused kernel's top-left mask would let
  // the first of them see only 1 key; the right answer sees 4.
  torch::manual_seed(5);
  auto q = torch::randn({1, 2, 2, 8}, torch::kDouble), k = torch::randn({1, 2, 5, 8}, torch::kDouble);
  auto v = torch::randn({1, 2, 5, 8}, torch::kDouble);
  auto chunk = CausalAttention(q, k, v, /*past=*/3);
  auto whole_q = torch::cat({torch::randn({1, 2, 3, 8}, torch::kDouble), q}, 2);
  auto whole = CausalAttention(whole_q, k, v, /*past=*/0).narrow(2, 3, 2);
  EXPECT_TRUE(torch::allclose(chunk, whole, 1e-12, 1e-12));
}

// The fused element-wise nodes against their plain-operator forms (what runs in their place
// on devices other than the CPU): values and the gradients of a random projection of the
// outputs, for every input.

// Gradients of sum(outputs[i] * probes[i]) with respect to `inputs`.
std::vector<torch::Tensor> ProbeGradients(const std::vector<torch::Tensor>& outputs,
                                          const std::vector<torch::Tensor>& probes,
                                          const std::vector<torch::Tensor>& inputs) {
  auto total = torch::zeros({}, outputs[0].options().dtype(torch::kDouble));
  for (size_t i = 0; i < outputs.size(); ++i) {
    total = total + (outputs[i].to(torch::kDouble) * probes[i]).sum();
  }
  return torch::autograd::grad({total}, inputs);
}

TEST(FusedOps, RmsNormMatchesPlainOperatorsWithGradients) {
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    const double tol = dtype == torch::kDouble ? 1e-10 : 2e-5;
    torch::manual_seed(3);
    auto x = torch::randn({5, 7, 24}, dtype).requires_grad_();
    auto w = (torch::rand({24}, dtype) + 0.5).requires_grad_();
    auto probe = torch::randn({5, 7, 24}, torch::kDouble);
    auto fused = FusedRmsNorm(x, w, 1e-5);
    auto reference = RmsNormFromOperators(x, w, 1e-5);
    EXPECT_TRUE(torch::allclose(fused, reference, tol, tol)) << dtype;
    auto g_fused = ProbeGradients({fused}, {probe}, {x, w});
    auto g_reference = ProbeGradients({reference}, {probe}, {x, w});
    for (size_t i = 0; i < 2; ++i) {
      EXPECT_TRUE(torch::allclose(g_fused[i], g_reference[i], tol, 10 * tol))
          << dtype << " input " << i << ": " << (g_fused[i] - g_reference[i]).abs().max();
    }
  }
}

TEST(FusedOps, SplitHeadsWithRotaryMatchesSelectRotateStack) {
  const int64_t batch = 2, t = 6, heads = 3, hd = 8;
  for (auto dtype : {torch::kDouble, torch::kFloat, torch::kBFloat16}) {
    const double tol = dtype == torch::kBFloat16 ? 2e-2 : (dtype == torch::kDouble ? 1e-12 : 1e-6);
    torch::manual_seed(4);
    auto angles = torch::rand({t, hd / 2}) * 6;
    auto cos = angles.cos(), sin = angles.sin();
    auto qkv = torch::randn({batch, t, 3, heads, hd}).to(dtype).requires_grad_();
    auto [q, k, v] = SplitHeadsWithRotary(qkv, cos, sin);
    auto [q_ref, k_ref, v_ref] = SplitHeadsWithRotaryFromOperators(qkv, cos, sin);
    EXPECT_TRUE(q.is_contiguous() && k.is_contiguous() && v.is_contiguous());
    EXPECT_EQ(q.sizes(), torch::IntArrayRef({batch, heads, t, hd}));
    for (auto [a, b] : {std::pair{q, q_ref}, std::pair{k, k_ref}, std::pair{v, v_ref}}) {
      EXPECT_TRUE(torch::allclose(a.to(torch::kDouble), b.to(torch::kDouble), tol, tol)) << dtype;
    }
    std::vector<torch::Tensor> probes;
    for (int i = 0; i < 3; ++i) probes.push_back(torch::randn({batch, heads, t, hd}, torch::kDouble));
    auto g_fused = ProbeGradients({q, k, v}, probes, {qkv})[0];
    auto g_reference = ProbeGradients({q_ref, k_ref, v_ref}, probes, {qkv})[0];
    EXPECT_TRUE(torch::allclose(g_fused.to(torch::kDouble), g_reference.to(torch::kDouble), tol, tol))
        << dtype;
    // Only q is used: k and v get zero gradients, q's still match.
    auto only_q = torch::autograd::grad({(SplitHeadsWithRotary(qkv, cos, sin)[0].to(torch::kDouble) *
                                          probes[0]).sum()},
                                        {qkv})[0];
    auto q_ref_again = SplitHeadsWithRotaryFromOperators(qkv, cos, sin)[0];
    auto only_q_ref =
        torch::autograd::grad({(q_ref_again.to(torch::kDouble) * probes[0]).sum()}, {qkv})[0];
    EXPECT_TRUE(torch::allclose(only_q.to(torch::kDouble), only_q_ref.to(torch::kDouble), tol, tol));
  }
}

TEST(FusedOps, CrossEntropyMatchesLibtorchWithGradients) {
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    const double tol = dtype == torch::kDouble ? 1e-12 : 1e-6;
    torch::manual_seed(5);
    auto logits = (torch::randn({13, 29}, dtype) * 3).requires_grad_();
    auto targets = torch::randint(0, 29, {13}, torch::kLong);
    auto fused = FusedCrossEntropy(logits, targets);
    auto reference = torch::nn::functional::cross_entropy(logits, targets);
    EXPECT_NEAR(fused.item<double>(), reference.item<double>(), tol);
    auto g_fused = torch::autograd::grad({fused * 2.5}, {logits})[0];
    auto g_reference = torch::autograd::grad({reference * 2.5}, {logits})[0];
    EXPECT_TRUE(torch::allclose(g_fused, g_reference, tol, tol)) << dtype;
  }
  // The backward consumes its saved log-probabilities: a second pass is an error, not a
  // silently wrong gradient.
  auto logits = torch::randn({4, 5}).requires_grad_();
  auto loss = FusedCrossEntropy(logits, torch::tensor({0, 1, 2, 3}));
  loss.backward({}, /*retain_graph=*/true);
  EXPECT_THROW(loss.backward(), c10::Error);
  EXPECT_THROW(FusedCrossEntropy(torch::randn({4, 5}), torch::tensor({0, 1, 2})), c10::Error);
}

TEST(ExpertBank, DispatchMatchesNaivePerTokenLoop) {
  torch::manual_seed(1);
  InitScales init{0.3, 0.3};
  ExpertBank experts(5, 6, 7, init);
  LocalDispatcher dispatcher;
  const int64_t tokens = 23, top_k = 2;
  auto x = torch::randn({tokens, 6});
  RoutingDecision decision;
  decision.expert_index = torch::stack({torch::randint(5, {tokens}), torch::randint(5, {tokens})}, 1);
  decision.weight = torch::rand({tokens, top_k});
  const DispatchPlan plan = PlanDispatch(decision, 5, /*capacity=*/0);
  auto y = RunExperts(dispatcher, x, plan, experts);

  auto expected = torch::zeros_like(x);
  for (int64_t n = 0; n < tokens; ++n) {
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t e = decision.expert_index[n][j].item<int64_t>();
      expected[n] += decision.weight[n][j] *
                     NaiveSwiGLU(x[n], experts->w1[e], experts->w3[e], experts->w2[e]);
    }
  }
  EXPECT_TRUE(torch::allclose(y, expected, 1e-5, 1e-6));
  EXPECT_EQ(plan.dropped, 0);
}

TEST(ExpertBank, EveryTokenToOneExpertAndEmptyExperts) {
  torch::manual_seed(2);
  ExpertBank experts(4, 5, 3, InitScales{0.3, 0.3});
  LocalDispatcher dispatcher;
  auto x = torch::randn({9, 5});
  RoutingDecision decision{torch::full({9, 1}, 2, torch::kLong), torch::ones({9, 1})};
  const DispatchPlan plan = PlanDispatch(decision, 4, 0);
  auto y = RunExperts(dispatcher, x, plan, experts);
  EXPECT_EQ(plan.tokens_per_expert, (std::vector<int64_t>{0, 0, 9, 0}));
  EXPECT_TRUE(torch::allclose(y, NaiveSwiGLU(x, experts->w1[2], experts->w3[2], experts->w2[2]),
                              1e-5, 1e-6));
}

// The grouped products' hand-written backward against autograd through the naive per-expert
// formula, in fp64, with an expert that receives no tokens (its gradient must be zero).
TEST(ExpertBank, GradientsMatchAutogradThroughTheNaiveFormula) {
  torch::manual_seed(3);
  ExpertBank experts(4, 5, 6, InitScales{0.3, 0.3});
  experts->to(torch::kDouble);
  const std::vector<int64_t> counts = {3, 0, 5, 2};
  auto x = torch::randn({10, 5}, torch::kDouble).requires_grad_();
  auto probe = torch::randn({10, 5}, torch::kDouble);
  (experts->forward(x, counts) * probe).sum().backward();
  const auto grad_x = x.grad().clone();
  const auto grad_w1 = experts->w1.grad().clone(), grad_w3 = experts->w3.grad().clone();
  const auto grad_w2 = experts->w2.grad().clone();

  auto w1 = experts->w1.detach().requires_grad_(), w3 = experts->w3.detach().requires_grad_();
  auto w2 = experts->w2.detach().requires_grad_();
  auto x2 = x.detach().requires_grad_();
  std::vector<torch::Tensor> rows;
  int64_t offset = 0;
  for (int64_t e = 0; e < 4; ++e) {
    if (counts[e] == 0) continue;
    rows.push_back(NaiveSwiGLU(x2.narrow(0, offset, counts[e]), w1[e], w3[e], w2[e]));
    offset += counts[e];
  }
  (torch::cat(rows) * probe).sum().backward();
  EXPECT_TRUE(torch::allclose(grad_x, x2.grad(), 1e-10, 1e-12));
  EXPECT_TRUE(torch::allclose(grad_w1, w1.grad(), 1e-10, 1e-12));
  EXPECT_TRUE(torch::allclose(grad_w3, w3.grad(), 1e-10, 1e-12));
  EXPECT_TRUE(torch::allclose(grad_w2, w2.grad(), 1e-10, 1e-12));
  EXPECT_EQ(grad_w1[1].abs().sum().item<double>(), 0.0);
  EXPECT_EQ(grad_w2[1].abs().sum().item<double>(), 0.0);
}

// runtime.precision = BF16: products in bf16 (visibly different from fp32, but close), the
// output and every gradient in fp32, routers untouched.
TEST(MixedPrecision, Bf16ProductsKeepFp32OutputsGradientsAndRouters) {
  torch::manual_seed(4);
  auto spec = TinyModel(AllRouters()[1]);
  spec.mutable_moe()->set_shared_expert(true);
  Transformer model(spec);
  auto tokens = torch::randint(37, {2, 8});
  auto reference = model->forward(tokens);
  ModelOutput low;
  {
    LowPrecisionMatmulGuard guard(torch::kBFloat16);
    EXPECT_EQ(LowPrecisionMatmulDtype(), std::optional<torch::ScalarType>(torch::kBFloat16));
    low = model->forward(tokens);
  }
  EXPECT_FALSE(LowPrecisionMatmulDtype().has_value());  // the guard restores fp32
  EXPECT_EQ(low.logits.scalar_type(), torch::kFloat);
  const double difference =
      ((low.logits - reference.logits).norm() / reference.logits.norm()).item<double>();
  EXPECT_GT(difference, 1e-4) << "the products did not run in bf16";
  EXPECT_LT(difference, 3e-2);
  (low.logits.square().mean() + low.router_loss).backward();
  for (const auto& p : model->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_EQ(p.value().grad().scalar_type(), torch::kFloat) << p.key();
  }
  // The router's own products ignore the guard: same input, same logits.
  Router* router = model->named_modules()["layers.0.moe.router"]->as<Router>();
  ASSERT_NE(router, nullptr);
  auto x = torch::randn({2, 8, spec.d_model()});
  RouterCarry plain, guarded;
  auto expected = router->forward(x, plain, nullptr);
  LowPrecisionMatmulGuard guard(torch::kBFloat16);
  EXPECT_TRUE(torch::equal(router->forward(x, guarded, nullptr), expected));
}

// The host loop against the cell stepped one position at a time (ATen's GRU and RNN cells
// under plain autograd), in fp64, from a given initial state: states and every gradient.
TEST(RecurrentScan, HostLoopMatchesTheCellSteppedThroughTheSequence) {
  for (auto kind : {RouterSpec::GRU, RouterSpec::RNN}) {
    SCOPED_TRACE(RouterSpec::Cell_Name(kind));
    const testing::ScanCase scan{kind, /*batch=*/3, /*steps=*/7, /*given_h0=*/true};
    auto host_loop = testing::ScanWithGradients(scan, ScanImplementation::kHostLoop);

    torch::manual_seed(11);  // the cell and inputs ScanWithGradients draws
    RecurrentCell cell(kind, 5, 4);
    cell->to(torch::kDouble);
    auto input = torch::randn({3, 7, 5}, torch::kDouble).requires_grad_();
    auto h0 = torch::randn({3, 4}, torch::kDouble).requires_grad_();
    auto probe = torch::randn({3, 7, 4}, torch::kDouble);
    std::vector<torch::Tensor> steps;
    torch::Tensor h = h0;
    for (int64_t t = 0; t < 7; ++t) {
      h = cell->Step(input.select(1, t), h);
      steps.push_back(h);
    }
    auto states = torch::stack(steps, 1);
    (states * probe).sum().backward();
    testing::NamedTensors stepped = {
        {"states", states}, {"grad input", input.grad()}, {"grad h0", h0.grad()}};
    for (const auto& p : cell->named_parameters()) {
      stepped.push_back({"grad " + p.key(), p.value().grad()});
    }
    testing::ExpectAllClose(host_loop, stepped, 1e-12);
  }
}

// ATen's multi-step RNN (the path for every device but the CPU), forced on the CPU, against
// the host loop in fp64: states and the gradients of the input, h0 and every weight.
class RecurrentScanImplementations : public ::testing::TestWithParam<testing::ScanCase> {};

TEST_P(RecurrentScanImplementations, DeviceOpsMatchTheHostLoopInFp64) {
  auto host_loop = testing::ScanWithGradients(GetParam(), ScanImplementation::kHostLoop);
  auto device_ops = testing::ScanWithGradients(GetParam(), ScanImplementation::kDeviceOps);
  testing::ExpectAllClose(device_ops, host_loop, 1e-10);
  // On the CPU kAuto is the host loop.
  auto automatic = testing::ScanWithGradients(GetParam(), ScanImplementation::kAuto);
  testing::ExpectAllClose(automatic, host_loop, 0);
}

INSTANTIATE_TEST_SUITE_P(AllCases, RecurrentScanImplementations,
                         ::testing::ValuesIn(testing::AllScanCases()),
                         [](const auto& info) {
                           const auto& c = info.param;
                           return RouterSpec::Cell_Name(c.cell) + "_B" + std::to_string(c.batch) +
                                  "_T" + std::to_string(c.steps) +
                                  (c.given_h0 ? "_GivenH0" : "_ZeroH0");
                         });

TEST(RecurrentScan, AutoIsTheHostLoopOnTheCpuAndDeviceOpsElsewhere) {
  EXPECT_EQ(ResolveScanImplementation(ScanImplementation::kAuto, torch::kCPU),
            ScanImplementation::kHostLoop);
  for (auto device : {torch::Device(torch::kCUDA, 0), torch::Device(torch::kMeta)}) {
    EXPECT_EQ(ResolveScanImplementation(ScanImplementation::kAuto, device),
              ScanImplementation::kDeviceOps);
  }
  for (auto forced : {ScanImplementation::kHostLoop, ScanImplementation::kDeviceOps}) {
    EXPECT_EQ(ResolveScanImplementation(forced, torch::Device(torch::kCUDA, 0)), forced);
  }
}

TEST(RecurrentScan, RefusesWhatItCannotRun) {
  // The host loop reads memory on the host; meta tensors stand in for a GPU's here.
  auto meta = [](std::vector<int64_t> shape) { return torch::empty(shape, torch::kMeta); };
  const RecurrentCellWeights on_meta{meta({12, 5}), meta({12}), meta({12, 4}), meta({12})};
  EXPECT_THROW(RecurrentScan(RouterSpec::GRU, meta({2, 3, 5}), meta({2, 4}), on_meta,
                             ScanImplementation::kHostLoop),
               c10::Error);
  RecurrentCell cell(RouterSpec::GRU, 5, 4);
  EXPECT_THROW(cell->Scan(torch::randn({2, 3, 6}), torch::Tensor()), c10::Error);  // width
  EXPECT_THROW(cell->Scan(torch::randn({2, 3, 5}), torch::randn({2, 3})), c10::Error);  // h0
  EXPECT_THROW(cell->Scan(torch::randn({2, 3, 5}, torch::kDouble), torch::Tensor()),
               c10::Error);  // dtype
}

// The token-recurrent router gives the same logits and gradients with either scan, over two
// calls that carry the state from the first to the second (a slice of its states).
TEST(RecurrentScan, TheTokenRouterIsTheSameWithEitherImplementation) {
  for (const auto& router : AllRouters()) {
    if (router.kind != RouterSpec::RECURRENT || router.recurrence != RouterSpec::TOKEN) continue;
    SCOPED_TRACE(router.name);
    auto spec = TinyModel(router);
    auto init = InitScales::FromSpec(spec);
    torch::manual_seed(12);
    auto x = torch::randn({2, 6, spec.d_model()}, torch::kDouble);
    auto run = [&](ScanImplementation implementation) {
      torch::manual_seed(13);
      auto made = MakeRouter(spec, init, RecurrentCell(nullptr), implementation);
      made->to(torch::kDouble);
      auto input = x.clone().requires_grad_();
      torch::Tensor state;
      RouterCarry first_carry, second_carry;
      auto first = made->forward(input.narrow(1, 0, 4), first_carry, &state);
      auto second = made->forward(input.narrow(1, 4, 2), second_carry, &state);
      auto logits = torch::cat({first, second}, 0);
      (logits * torch::linspace(-1, 1, logits.numel(), torch::kDouble).view_as(logits))
          .sum()
          .backward();
      testing::NamedTensors out = {{"logits", logits.detach()}, {"state", state.detach()},
                                   {"grad x", input.grad()}};
      for (const auto& p : made->named_parameters()) {
        out.push_back({"grad " + p.key(), p.value().grad()});
      }
      return out;
    };
    testing::ExpectAllClose(run(ScanImplementation::kDeviceOps),
                            run(ScanImplementation::kHostLoop), 1e-10);
  }
}

TEST(MoELayer, MatchesNaiveReferenceWithLinearRouterAndSharedExpert) {
  torch::manual_seed(3);
  auto model = TinyModel(AllRouters()[0]);
  model.mutable_moe()->set_shared_expert(true);
  model.mutable_moe()->set_moe_weight(0.7);
  model.mutable_moe()->set_shared_expert_weight(0.4);
  model.mutable_moe()->set_renormalize(false);
  MoELayer layer(model, InitScales::FromSpec(model), RecurrentCell(nullptr));
  auto x = torch::randn({2, 5, 16});
  RouterCarry carry;
  auto out = layer->forward(x, carry, nullptr);

  auto gate = Param(*layer, "router.gate");
  auto& e = layer->experts();
  auto flat = x.reshape({-1, 16});
  auto expected = torch::zeros_like(flat);
  for (int64_t n = 0; n < flat.size(0); ++n) {
    auto probs = torch::softmax(flat[n].matmul(gate.t()), 0);
    auto [w, idx] = torch::topk(probs, 2);
    torch::Tensor routed = torch::zeros({16});
    for (int j = 0; j < 2; ++j) {
      const int64_t ex = idx[j].item<int64_t>();
      routed += w[j] * NaiveSwiGLU(flat[n], e->w1[ex], e->w3[ex], e->w2[ex]);
    }
    auto shared = NaiveSwiGLU(flat[n], Param(*layer, "shared_expert.w1.weight").t(),
                              Param(*layer, "shared_expert.w3.weight").t(),
                              Param(*layer, "shared_expert.w2.weight").t());
    expected[n] = 0.7 * routed + 0.4 * shared;
  }
  EXPECT_TRUE(torch::allclose(out.y.reshape({-1, 16}), expected, 1e-5, 1e-6));
}

TEST(MoELayer, OneExpertTopOneEqualsDenseSwiGLU) {
  torch::manual_seed(4);
  auto model = TinyModel();
  model.mutable_moe()->set_num_experts(1);
  model.mutable_moe()->set_top_k(1);
  auto init = InitScales::FromSpec(model);
  MoELayer layer(model, init, MakeSharedRouterCell(model));
  SwiGLU dense(16, 8, init);
  {
    torch::NoGradGuard no_grad;
    dense->w1->weight.copy_(layer->experts()->w1[0].t());
    dense->w3->weight.copy_(layer->experts()->w3[0].t());
    dense->w2->weight.copy_(layer->experts()->w2[0].t());
  }
  auto x = torch::randn({3, 4, 16});
  RouterCarry carry;
  EXPECT_TRUE(torch::allclose(layer->forward(x, carry, nullptr).y, dense(x), 1e-5, 1e-6));
}

class RouterGradient : public ::testing::TestWithParam<RouterCase> {};

TEST_P(RouterGradient, MatchesFiniteDifferencesThroughTwoLayers) {
  torch::manual_seed(5);
  auto model = TinyModel(GetParam());
  auto init = InitScales::FromSpec(model);
  auto cell = MakeSharedRouterCell(model);
  auto first = MakeRouter(model, init, cell);
  auto second = MakeRouter(model, init, cell);
  if (!cell.is_empty()) cell->to(torch::kDouble);
  first->to(torch::kDouble);
  second->to(torch::kDouble);
  auto x0 = torch::randn({2, 5, 16}, torch::kDouble).requires_grad_();
  auto x1 = torch::randn({2, 5, 16}, torch::kDouble).requires_grad_();
  // A detached state is a constant to the second router: finite differences must hold it
  // at its unperturbed value too (RouterDetachedState checks that it really is detached).
  torch::Tensor frozen;
  if (GetParam().detach_state) {
    RouterCarry carry;
    first->forward(x0, carry, nullptr);
    frozen = carry.layer_state.detach().clone();
  }
  auto f = [&] {
    RouterCarry carry;
    auto l0 = first->forward(x0, carry, nullptr);
    if (frozen.defined()) carry.layer_state = frozen;
    auto l1 = second->forward(x1, carry, nullptr);
    return torch::cat({l0, l1}, 1);
  };
  std::vector<torch::Tensor> inputs{x0, x1};
  for (auto& p : first->parameters()) inputs.push_back(p);
  if (!cell.is_empty()) {
    for (auto& p : cell->parameters()) inputs.push_back(p);
  }
  ExpectGradientsMatchFiniteDifferences(f, inputs);
}

INSTANTIATE_TEST_SUITE_P(AllRouters, RouterGradient, ::testing::ValuesIn(AllRouters()),
                         [](const auto& info) { return info.param.name; });

// The paper's controls against the layer-recurrent router they vary: a detached state routes
// exactly as the attached one but passes no gradient back to the earlier layer; without
// recurrence the second layer routes as if it were first; the MLP router is sized to the
// GRU router's parameters.
TEST(RouterControls, DetachedStateRoutesTheSameButPassesNoGradient) {
  auto routers = AllRouters();
  auto x0 = torch::randn({2, 5, 16}, torch::kDouble);
  auto x1 = torch::randn({2, 5, 16}, torch::kDouble);
  std::map<std::string, torch::Tensor> second_logits, gradient_to_first;
  for (const auto& router : {routers[1], routers[7], routers[6]}) {
    torch::manual_seed(5);
    auto model = TinyModel(router);
    auto cell = MakeSharedRouterCell(model);
    auto first = MakeRouter(model, InitScales::FromSpec(model), cell);
    auto second = MakeRouter(model, InitScales::FromSpec(model), cell);
    cell->to(torch::kDouble);
    first->to(torch::kDouble);
    second->to(torch::kDouble);
    auto input = x0.clone().requires_grad_();
    RouterCarry carry;
    first->forward(input, carry, nullptr);
    auto l1 = second->forward(x1, carry, nullptr);
    second_logits[router.name] = l1.detach();
    l1.sum().backward();
    gradient_to_first[router.name] =
        input.grad().defined() ? input.grad() : torch::zeros_like(input);
    if (router.recurrence == RouterSpec::NONE) {
      RouterCarry fresh;
      EXPECT_TRUE(torch::equal(second->forward(x1, fresh, nullptr).detach(), l1.detach()));
    }
  }
  EXPECT_TRUE(torch::equal(second_logits["GruDetached"], second_logits["GruLayer"]));
  EXPECT_GT(gradient_to_first["GruLayer"].abs().max().item<double>(), 1e-6);
  EXPECT_EQ(gradient_to_first["GruDetached"].abs().max().item<double>(), 0.0);
  EXPECT_EQ(gradient_to_first["GruNoState"].abs().max().item<double>(), 0.0);
  EXPECT_FALSE(torch::allclose(second_logits["GruNoState"], second_logits["GruLayer"]));
}

TEST(RouterControls, TheMlpRouterMatchesTheGruRoutersParameters) {
  ModelSpec model = TinyModel(AllRouters()[1]);  // 3 MoE layers, d 16, 4 experts, R 8
  model.mutable_router()->set_hidden_dim(128);
  model.set_d_model(64);
  // R d + E R + (6 R^2 + 6 R) / 3 = 8192 + 512 + 33024 = 41728; / (64 + 1 + 4) = 604.8
  EXPECT_EQ(MlpRouterHiddenDim(model), 605);
  model.mutable_router()->set_mlp_hidden_dim(10);
  EXPECT_EQ(MlpRouterHiddenDim(model), 10);
}

TEST(MoELayerGradient, ExpertsAndLayerMatchFiniteDifferences) {
  torch::manual_seed(6);
  auto model = TinyModel();
  model.mutable_moe()->set_shared_expert(true);
  auto cell = MakeSharedRouterCell(model);
  MoELayer layer(model, InitScales::FromSpec(model), cell);
  layer->to(torch::kDouble);
  cell->to(torch::kDouble);
  auto x = torch::randn({2, 4, 16}, torch::kDouble).requires_grad_();
  auto previous_state = torch::randn({8, 8}, torch::kDouble).requires_grad_();
  auto f = [&] {
    RouterCarry carry;
    carry.layer_state = previous_state;
    auto out = layer->forward(x, carry, nullptr);
    // The auxiliary losses are part of the objective, so their gradients are checked too.
    return torch::cat({out.y.reshape({-1}), out.load_balance.reshape({1}), out.z_loss.reshape({1})});
  };
  std::vector<torch::Tensor> inputs{x, previous_state};
  for (auto& p : layer->parameters()) inputs.push_back(p);
  for (auto& p : cell->parameters()) inputs.push_back(p);
  ExpectGradientsMatchFiniteDifferences(f, inputs, 6);
}

class RouterCausality : public ::testing::TestWithParam<RouterCase> {};

TEST_P(RouterCausality, LaterTokensNeverChangeEarlierOutputsOrRouting) {
  torch::manual_seed(7);
  Transformer model(TinyModel(GetParam()));
  // In double, so that a different grouping of tokens by expert (which changes the shapes
  // of the matrix products, hence their rounding) cannot hide a real leak.
  model->to(torch::kDouble);
  model->eval();
  torch::NoGradGuard no_grad;
  auto tokens = torch::randint(37, {2, 12});
  auto base = model->forward(tokens);
  for (int64_t t : {0, 5, 10}) {
    auto changed = tokens.clone();
    changed.select(1, t + 1).add_(1).remainder_(37);
    auto out = model->forward(changed);
    EXPECT_TRUE(torch::allclose(base.logits.narrow(1, 0, t + 1), out.logits.narrow(1, 0, t + 1),
                                /*rtol=*/0, /*atol=*/1e-12))
        << "logits at positions <= " << t << " changed";
    EXPECT_FALSE(torch::equal(base.logits.narrow(1, t + 1, 1), out.logits.narrow(1, t + 1, 1)));
    for (size_t l = 0; l < base.moe.size(); ++l) {
      auto before = base.moe[l].expert_index.view({2, 12, -1}).narrow(1, 0, t + 1);
      auto after = out.moe[l].expert_index.view({2, 12, -1}).narrow(1, 0, t + 1);
      EXPECT_TRUE(torch::equal(before, after)) << "routing at layer " << l << " changed";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllRouters, RouterCausality, ::testing::ValuesIn(AllRouters()),
                         [](const auto& info) { return info.param.name; });

TEST(LayerRecurrence, RoutingAtALayerDependsOnThePreviousLayersState) {
  torch::manual_seed(8);
  auto model = TinyModel();
  auto init = InitScales::FromSpec(model);
  auto cell = MakeSharedRouterCell(model);
  auto layer0 = MakeRouter(model, init, cell);
  auto layer1 = MakeRouter(model, init, cell);
  auto x0 = torch::randn({1, 6, 16});
  auto x1 = torch::randn({1, 6, 16});

  RouterCarry carry_a, carry_b;
  layer0->forward(x0, carry_a, nullptr);
  layer0->forward(x0 + 0.5 * torch::randn_like(x0), carry_b, nullptr);
  auto logits_a = layer1->forward(x1, carry_a, nullptr);
  auto logits_b = layer1->forward(x1, carry_b, nullptr);
  // Same input at layer 1, different state from layer 0: different logits.
  EXPECT_GT((logits_a - logits_b).abs().max().item<double>(), 1e-3);

  // And gradients reach layer 0's projection through the carried state.
  auto proj0 = Param(*layer0, "proj");
  proj0.mutable_grad() = torch::Tensor();
  RouterCarry carry;
  layer0->forward(x0, carry, nullptr);
  layer1->forward(x1, carry, nullptr).sum().backward();
  ASSERT_TRUE(proj0.grad().defined());
  EXPECT_GT(proj0.grad().abs().sum().item<double>(), 0);
}

TEST(LayerRecurrence, DenseLayersPassTheStateThroughAndTheCellIsShared) {
  auto spec = TinyModel();
  spec.mutable_moe()->add_moe_layers(0);
  spec.mutable_moe()->add_moe_layers(2);
  Transformer model(spec);
  int cells = 0;
  for (const auto& item : model->named_parameters()) {
    if (item.key().find("w_hh") != std::string::npos) ++cells;
  }
  EXPECT_EQ(cells, 1) << "the layer-recurrent cell must be registered once";
  auto out = model->forward(torch::randint(37, {1, 4}));
  EXPECT_EQ(out.moe.size(), 2u);
}

TEST(RouterLosses, LoadBalanceAndZLossMatchHandComputedValues) {
  // Two tokens, two experts, top-1.
  auto logits = torch::tensor({{1.0, 0.0}, {0.0, 2.0}}, torch::kDouble);
  auto routing = RouteTopK(logits, 1, true);
  auto routed = torch::tensor({1, 1}, torch::kLong);  // one token per expert
  // P = mean softmax: p0 = (e/(e+1) + 1/(1+e^2)) / 2.
  const double e = std::exp(1.0), e2 = std::exp(2.0);
  const double p0 = (e / (e + 1) + 1 / (1 + e2)) / 2, p1 = 1 - p0;
  const double expected_lb = 2 * (0.5 * p0 + 0.5 * p1);
  EXPECT_NEAR(LoadBalancingLoss(routing.probs, routed, 1).item<double>(), expected_lb, 1e-12);
  // Everything routed to expert 1: E * (0 * p0 + 1 * p1).
  EXPECT_NEAR(LoadBalancingLoss(routing.probs, torch::tensor({0, 2}, torch::kLong), 1).item<double>(),
              2 * p1, 1e-12);
  const double lse0 = std::log(e + 1), lse1 = std::log(1 + e2);
  EXPECT_NEAR(RouterZLoss(logits).item<double>(), (lse0 * lse0 + lse1 * lse1) / 2, 1e-12);
}

TEST(RouterLosses, TopKWeightsRenormaliseOnlyWhenAsked) {
  auto logits = torch::tensor({{2.0, 1.0, 0.0}}, torch::kDouble);
  auto probs = torch::softmax(logits, -1);
  auto raw = RouteTopK(logits, 2, false);
  EXPECT_TRUE(torch::allclose(raw.decision.weight, probs.narrow(1, 0, 2)));
  auto renormalised = RouteTopK(logits, 2, true);
  EXPECT_NEAR(renormalised.decision.weight.sum().item<double>(), 1.0, 1e-12);
  EXPECT_EQ(renormalised.decision.expert_index[0][0].item<int64_t>(), 0);
}

TEST(Capacity, DropsBeyondCapacityFirstChoicesFirstAndCountsThem) {
  EXPECT_EQ(ExpertCapacity(0, 100, 2, 4), 0);
  EXPECT_EQ(ExpertCapacity(1.0, 10, 2, 4), 5);
  EXPECT_EQ(ExpertCapacity(1.25, 10, 1, 4), 4);  // ceil(3.125)
  // Four tokens; first choices 0,0,0,1; second choices 1,1,2,0.
  RoutingDecision decision;
  decision.expert_index = torch::tensor({{0, 1}, {0, 1}, {0, 2}, {1, 0}}, torch::kLong);
  decision.weight = torch::ones({4, 2});
  auto plan = PlanDispatch(decision, 3, /*capacity=*/2);
  // Expert 0 is chosen by tokens 0,1,2 (first) and 3 (second): keeps tokens 0 and 1.
  // Expert 1 is chosen by token 3 (first) and tokens 0,1 (second): keeps 3 then 0.
  // Expert 2: token 2 (second): kept.
  EXPECT_EQ(plan.tokens_per_expert, (std::vector<int64_t>{2, 2, 1}));
  EXPECT_EQ(plan.dropped, 3);
  EXPECT_TRUE(torch::equal(plan.token, torch::tensor({0, 1, 3, 0, 2}, torch::kLong)));
  EXPECT_TRUE(torch::equal(plan.routed_per_expert, torch::tensor({4, 3, 1}, torch::kLong)));
}

TEST(Capacity, MoELayerReportsDroppedTokens) {
  torch::manual_seed(9);
  auto spec = TinyModel(AllRouters()[0]);
  spec.mutable_moe()->set_capacity_factor(0.5);
  MoELayer layer(spec, InitScales::FromSpec(spec), RecurrentCell(nullptr));
  RouterCarry carry;
  auto out = layer->forward(torch::randn({2, 8, 16}), carry, nullptr);
  // Capacity ceil(0.5 * 16 * 2 / 4) = 4 per expert: at most 16 of 32 assignments kept.
  EXPECT_GE(out.dropped, 16);
  EXPECT_EQ(out.assignments, 32);
}

TEST(Transformer, ParameterCountsSeparateActiveFromTotal) {
  auto spec = TinyModel(AllRouters()[0]);
  Transformer model(spec);
  auto counts = model->CountParameters();
  const int64_t per_expert = 3 * 16 * 8;
  EXPECT_EQ(counts.expert, 3 * 4 * per_expert);
  EXPECT_EQ(counts.total - counts.active, 3 * (4 - 2) * per_expert);

  // FLOPs per training token: 6 x (active less the untied input embedding) + attention.
  const int64_t embedding = spec.tie_embeddings() ? 0 : int64_t{spec.vocab_size()} * spec.d_model();
  EXPECT_DOUBLE_EQ(model->TrainingFlopsPerToken(32),
                   6.0 * (counts.active - embedding) +
                       12.0 * spec.num_layers() * spec.d_model() * 32);
  spec.set_tie_embeddings(!spec.tie_embeddings());
  Transformer other(spec);
  const int64_t other_embedding =
      spec.tie_embeddings() ? 0 : int64_t{spec.vocab_size()} * spec.d_model();
  EXPECT_DOUBLE_EQ(other->TrainingFlopsPerToken(1),
                   6.0 * (other->CountParameters().active - other_embedding) +
                       12.0 * spec.num_layers() * spec.d_model());
}


// --dry-run and the memory check count parameters from the spec alone: the counts must be
// those of the model built from it, for every router and layout.
TEST(SpecParameterCounts, EqualTheBuiltModelsCounts) {
  for (const auto& router : testing::AllRouters()) {
    for (int layout = 0; layout < 3; ++layout) {
      ModelSpec spec = testing::TinyModel(router);
      if (layout >= 1) {
        spec.mutable_moe()->add_moe_layers(1);  // layers 0 and 2 dense
        spec.set_dense_hidden_dim(24);
        spec.mutable_moe()->set_shared_expert(true);
        spec.mutable_moe()->set_shared_expert_hidden_dim(12);
      }
      if (layout == 2) spec.set_tie_embeddings(false);
      SCOPED_TRACE(router.name + " layout " + std::to_string(layout));
      Transformer model(spec);
      const ParameterCounts built = model->CountParameters();
      const SpecParameterCounts counted = CountSpecParameters(spec);
      EXPECT_EQ(counted.total, static_cast<double>(built.total));
      EXPECT_EQ(counted.active, static_cast<double>(built.active));
      EXPECT_EQ(counted.expert, static_cast<double>(built.expert));
    }
  }
}

}  // namespace
}  // namespace rmoe
