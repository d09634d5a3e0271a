// The model on a CUDA device against the same model on the CPU: the token-recurrent
// router's scan (ATen's multi-step RNN, cuDNN's kernel) against the CPU's host loop in fp64
// and fp32, and a tiny Transformer's forward, backward and cached decoding with every
// router, and the host waits of an MoE layer. Every test here skips, saying so, where no
// CUDA device is available.
#include <string>
#include <vector>

#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#if __has_include(<c10/cuda/CUDAFunctions.h>)
#include <c10/cuda/CUDAFunctions.h>
#define RMOE_TEST_HAS_C10_CUDA 1
#endif

#include "rmoe/model/moe_layer.h"
#include "rmoe/model/recurrent_scan.h"
#include "rmoe/model/transformer.h"
#include "tests/test_util.h"

namespace rmoe {
namespace {

using testing::AllRouters;
using testing::AllScanCases;
using testing::ExpectAllClose;
using testing::NamedTensors;
using testing::ScanWithGradients;
using testing::TinyModel;

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) {
      GTEST_SKIP() << "no CUDA device here: the CUDA paths are compiled but not run";
    }
  }
};

// cuDNN may run fp32 RNN products in TF32 (PyTorch's default allows it), which rounds
// their inputs to 10 mantissa bits; these comparisons hold the scan to fp32 rounding.
class Fp32RnnProductsGuard {
 public:
  Fp32RnnProductsGuard()
      : previous_(at::globalContext().float32Precision(at::Float32Backend::CUDA,
                                                       at::Float32Op::RNN)) {
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::RNN,
                                            at::Float32Precision::IEEE);
  }
  ~Fp32RnnProductsGuard() {
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::RNN,
                                            previous_);
  }

 private:
  at::Float32Precision previous_;
};

using CudaRecurrentScan = CudaTest;

TEST_F(CudaRecurrentScan, MatchesHostScanInFp64) {
  for (const auto& scan : AllScanCases()) {
    SCOPED_TRACE(::testing::PrintToString(scan));
    auto host_loop = ScanWithGradients(scan, ScanImplementation::kHostLoop);
    auto cuda = ScanWithGradients(scan, ScanImplementation::kAuto, torch::kCUDA);
    ExpectAllClose(cuda, host_loop, 1e-10);
  }
}

// Against the fp64 host loop as the exact answer. Every state is bounded by 1 (tanh, and a
// GRU's convex mix of tanh and the previous state), so a step's error is a few fp32
// roundings (2^-24 ~ 6e-8) of sums of 5-9 terms of order 1; the recurrence contracts, so
// over 9 steps the states and the gradients (sums over at most 27 positions) stay within
// about 1e-6 of the scale; 1e-5 leaves a margin without hiding a wrong gate (order 1e-1).
TEST_F(CudaRecurrentScan, MatchesHostScanInFp32) {
  Fp32RnnProductsGuard fp32_products;
  for (const auto& scan : AllScanCases()) {
    SCOPED_TRACE(::testing::PrintToString(scan));
    auto exact = ScanWithGradients(scan, ScanImplementation::kHostLoop);
    auto cuda = ScanWithGradients(scan, ScanImplementation::kAuto, torch::kCUDA, torch::kFloat);
    ExpectAllClose(cuda, exact, 1e-5);
  }
}

// The cell's weights are separate parameters, not views into cuDNN's flat buffer; the scan
// accepts the per-call copy that costs (a router cell is small) and keeps its warning out
// of the log.
TEST_F(CudaRecurrentScan, DoesNotWarnAboutWeightLayout) {
  class Recorder : public c10::WarningHandler {
   public:
    void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
    std::vector<std::string> messages;
  } recorder;
  c10::WarningUtils::WarningHandlerGuard guard(&recorder);
  ScanWithGradients(AllScanCases().front(), ScanImplementation::kAuto, torch::kCUDA,
                    torch::kFloat);
  EXPECT_TRUE(recorder.messages.empty()) << recorder.messages.front();
}

// A model's logits, router loss, routing and every parameter's gradient after a forward
// and backward of `tokens`, then the logits of a prefill and single decoding steps through
// the cache (the token-recurrent router's carried state included): on the CPU in fp64.
NamedTensors ForwardBackwardAndDecode(const testing::RouterCase& router, torch::Device device) {
  auto host = [](const torch::Tensor& t) { return t.to(torch::kCPU, torch::kDouble); };
  torch::manual_seed(21);
  Transformer model(TinyModel(router));
  model->to(device, torch::kDouble);
  torch::manual_seed(22);
  auto tokens = torch::randint(37, {2, 12}).to(device);
  auto out = model->forward(tokens);
  (out.logits.square().mean() + out.router_loss).backward();
  NamedTensors result = {{"logits", host(out.logits)}, {"router loss", host(out.router_loss)}};
  for (size_t l = 0; l < out.moe.size(); ++l) {
    result.push_back({"experts chosen at MoE layer " + std::to_string(l),
                      host(out.moe[l].expert_index)});
  }
  for (const auto& p : model->named_parameters()) {
    const auto& grad = p.value().grad();
    result.push_back({"grad " + p.key(), grad.defined() ? host(grad) : torch::zeros({1})});
  }
  model->eval();
  torch::NoGradGuard no_grad;
  auto cache = model->NewCache();
  result.push_back({"prefill logits", host(model->forward(tokens.narrow(1, 0, 8), &cache).logits)});
  for (int64_t t = 8; t < 12; ++t) {
    result.push_back({"decoded logits at " + std::to_string(t),
                      host(model->forward(tokens.narrow(1, t, 1), &cache).logits)});
  }
  return result;
}

using CudaTransformer = CudaTest;

TEST_F(CudaTransformer, ForwardBackwardAndDecodingMatchTheCpuWithEveryRouter) {
  for (const auto& router : AllRouters()) {
    SCOPED_TRACE(router.name);
    ExpectAllClose(ForwardBackwardAndDecode(router, torch::kCUDA),
                   ForwardBackwardAndDecode(router, torch::kCPU), 1e-9);
  }
}

using CudaRecompute = CudaTest;

// On a GPU the backward pass runs on the device's autograd thread: the recomputation must
// still run the bf16 products and draw the dropout masks of the first run (the generator of
// the inputs' device is restored), or its gradients would belong to another forward pass.
TEST_F(CudaRecompute, MatchesNoRecomputationWithBf16ProductsAndDropout) {
  ModelSpec spec = TinyModel(AllRouters()[1]);
  spec.set_dropout(0.2);
  torch::manual_seed(3);
  Transformer model(spec);
  model->to(torch::kCUDA);
  model->train();
  auto tokens = torch::randint(spec.vocab_size(), {2, 12}).to(torch::kCUDA);
  const LowPrecisionMatmulGuard bf16(torch::kBFloat16);
  auto gradients = [&](RuntimeSpec::Recompute mode) {
    model->set_recompute(mode);
    model->zero_grad();
    torch::manual_seed(5);  // every device's generator
    auto out = model->forward(tokens);
    (out.logits.square().mean() + out.router_loss).backward();
    NamedTensors grads;
    for (const auto& item : model->named_parameters()) {
      grads.emplace_back(item.key(), item.value().grad().to(torch::kCPU).clone());
    }
    return grads;
  };
  const auto reference = gradients(RuntimeSpec::NONE);
  for (auto mode : {RuntimeSpec::MOE, RuntimeSpec::FULL}) {
    SCOPED_TRACE(RuntimeSpec::Recompute_Name(mode));
    ExpectAllClose(gradients(mode), reference, 1e-4);
  }
}

#if RMOE_TEST_HAS_C10_CUDA
// Counts, in its scope, the calls that make the host wait for the GPU, through PyTorch's
// sync debug mode (which warns at each); other warnings are kept.
class HostWaitCounter : public c10::WarningHandler {
 public:
  HostWaitCounter() : previous_(c10::cuda::warning_state().get_sync_debug_mode()) {
    c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_WARN);
  }
  ~HostWaitCounter() override { c10::cuda::warning_state().set_sync_debug_mode(previous_); }
  void process(const c10::Warning& warning) override {
    if (warning.msg().find("synchronizing") != std::string::npos) {
      ++waits;
    } else {
      others.push_back(warning.msg());
    }
  }
  int waits = 0;
  std::vector<std::string> others;

 private:
  c10::cuda::SyncDebugMode previous_;
};
#endif

using CudaMoELayer = CudaTest;

// An MoE layer's forward and backward wait for the GPU once: to read how many assignments
// each expert keeps, which sizes the grouped expert products. With every router, with and
// without a capacity limit.
TEST_F(CudaMoELayer, WaitsForTheDeviceOncePerForwardAndBackward) {
#if RMOE_TEST_HAS_C10_CUDA
  for (const auto& router : AllRouters()) {
    for (double capacity_factor : {0.0, 1.0}) {
      SCOPED_TRACE(router.name + ", capacity factor " + std::to_string(capacity_factor));
      torch::manual_seed(23);
      auto spec = TinyModel(router);
      spec.mutable_moe()->set_capacity_factor(static_cast<float>(capacity_factor));
      MoELayer layer(spec, InitScales::FromSpec(spec), MakeSharedRouterCell(spec));
      layer->to(torch::kCUDA);
      auto x = torch::randn({2, 12, spec.d_model()}, torch::kCUDA).requires_grad_();
      HostWaitCounter counter;
      {
        c10::WarningUtils::WarningHandlerGuard guard(&counter);
        RouterCarry carry;
        auto out = layer->forward(x, carry, nullptr);
        (out.y.square().mean() + out.load_balance + out.z_loss).backward();
      }
      torch::cuda::synchronize();
      EXPECT_EQ(counter.waits, 1);
      EXPECT_TRUE(counter.others.empty()) << counter.others.front();
    }
  }
#else
  GTEST_SKIP() << "this LibTorch has no c10/cuda headers";
#endif
}

}  // namespace
}  // namespace rmoe
