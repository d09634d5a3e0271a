// Activation recomputation (runtime.recompute): a piece of the forward pass that keeps none
// of its intermediate tensors for the backward pass and runs again there instead. The
// same idea as torch.utils.checkpoint(use_reentrant=True), written against LibTorch's
// autograd nodes because LibTorch has no checkpoint API.
#pragma once

#include <functional>
#include <vector>

#include <torch/torch.h>

namespace rmoe {

// Floating-point (or undefined) tensors in, floating-point (or undefined) tensors out. It
// must compute the same outputs every time it runs on the same inputs (no randomness), and
// must not return one of its inputs unchanged.
using RecomputedFunction =
    std::function<std::vector<torch::Tensor>(const std::vector<torch::Tensor>&)>;

// Runs `fn` on `inputs` without autograd recording anything inside it, and gives the outputs
// one autograd node whose backward runs `fn` again with gradients and backpropagates through
// that run: gradients reach the inputs through the node and the parameters `fn` uses
// directly (accumulated into their .grad, a reentrant backward). The inputs are kept (not
// copied) until then. The low-precision matmul dtype in force now is restored for the
// recomputation, whichever thread the backward runs on, and so are the random-number
// generators' states (CPU, and the inputs' device), so dropout draws the same masks. Without grad mode it is `fn(inputs)`.
std::vector<torch::Tensor> RunWithRecomputation(const RecomputedFunction& fn,
                                                const std::vector<torch::Tensor>& inputs);

}  // namespace rmoe
