#include "rmoe/model/recompute.h"

#include <mutex>
#include <optional>
#include <string>

#include <ATen/CPUGeneratorImpl.h>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include "rmoe/model/layers.h"

namespace rmoe {
namespace {

// The random-number generators a piece draws from (dropout): the CPU's and, when its inputs
// live on an accelerator, that device's. The recomputation starts from the states the first
// run started from, so it draws the same numbers, and leaves them as it found them.
struct GeneratorStates {
  at::Tensor cpu;
  std::optional<c10::Device> device;
  at::Tensor device_state;

  static GeneratorStates Capture(const std::vector<torch::Tensor>& inputs) {
    GeneratorStates states;
    states.cpu = Get(at::detail::getDefaultCPUGenerator());
    for (const auto& input : inputs) {
      if (input.defined() && !input.device().is_cpu()) {
        states.device = input.device();
        states.device_state = Get(at::globalContext().defaultGenerator(input.device()));
        break;
      }
    }
    return states;
  }
  void Restore() const {
    Set(at::detail::getDefaultCPUGenerator(), cpu);
    if (device) Set(at::globalContext().defaultGenerator(*device), device_state);
  }

 private:
  static at::Tensor Get(at::Generator generator) {
    std::lock_guard<std::mutex> lock(generator.mutex());
    return generator.get_state();
  }
  static void Set(at::Generator generator, const at::Tensor& state) {
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(state);
  }
};

// The backward of a recomputed piece: runs it again with gradients, then backpropagates the
// incoming gradients through that run.
class RecomputeBackward : public torch::autograd::Node {
 public:
  RecomputeBackward(RecomputedFunction fn, std::vector<torch::Tensor> inputs,
                    std::optional<torch::ScalarType> matmul_dtype, GeneratorStates generators)
      : fn_(std::move(fn)), matmul_dtype_(matmul_dtype), generators_(std::move(generators)) {
    for (const auto& input : inputs) {
      needs_grad_.push_back(input.defined() && input.requires_grad());
      // Detached: the node keeps the values, not the graph that made them.
      inputs_.push_back(input.defined() ? input.detach() : torch::Tensor());
    }
  }

  std::string name() const override { return "rmoe::RecomputeBackward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    TORCH_CHECK(!released_, "backward through a recomputed piece twice: retain_graph is not "
                            "supported with runtime.recompute");
    std::vector<torch::Tensor> inputs;
    for (size_t i = 0; i < inputs_.size(); ++i) {
      inputs.push_back(inputs_[i].defined() ? inputs_[i].detach().requires_grad_(needs_grad_[i])
                                            : torch::Tensor());
    }
    std::vector<torch::Tensor> outputs;
    {
      const GeneratorStates now = GeneratorStates::Capture(inputs);
      generators_.Restore();
      const LowPrecisionMatmulGuard precision(matmul_dtype_);
      at::AutoGradMode enable_grad(true);
      outputs = fn_(inputs);
      now.Restore();
    }
    TORCH_CHECK(outputs.size() == grads.size(), "a recomputed piece returned ", outputs.size(),
                " outputs, the first run ", grads.size());
    std::vector<torch::Tensor> roots, root_grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (outputs[i].defined() && outputs[i].requires_grad() && grads[i].defined()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grads[i]);
      }
    }
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    torch::autograd::variable_list input_grads;
    for (size_t i = 0; i < inputs.size(); ++i) {
      input_grads.push_back(needs_grad_[i] ? inputs[i].grad() : torch::Tensor());
    }
    release_variables();
    return input_grads;
  }

  void release_variables() override {
    inputs_.clear();
    released_ = true;
  }

 private:
  RecomputedFunction fn_;
  std::vector<torch::Tensor> inputs_;
  std::vector<bool> needs_grad_;
  std::optional<torch::ScalarType> matmul_dtype_;
  GeneratorStates generators_;
  bool released_ = false;
};

}  // namespace

std::vector<torch::Tensor> RunWithRecomputation(const RecomputedFunction& fn,
                                                const std::vector<torch::Tensor>& inputs) {
  if (!at::GradMode::is_enabled()) return fn(inputs);
  GeneratorStates generators = GeneratorStates::Capture(inputs);
  std::vector<torch::Tensor> outputs;
  {
    torch::NoGradGuard no_grad;
    outputs = fn(inputs);
  }
  auto node = std::shared_ptr<RecomputeBackward>(
      new RecomputeBackward(fn, inputs, LowPrecisionMatmulDtype(), std::move(generators)),
      torch::autograd::deleteNode);
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  for (auto& output : outputs) {
    TORCH_CHECK(!output.defined() || output.is_floating_point(),
                "a recomputed piece may only return floating-point tensors, got ",
                output.scalar_type());
    torch::autograd::set_history(output, node);
  }
  return outputs;
}

}  // namespace rmoe
