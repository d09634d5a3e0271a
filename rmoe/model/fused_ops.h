// Element-wise parts of the model as single autograd nodes with hand-written backward
// passes. Left to autograd, each is a chain of small operators (RMSNorm: 6 forward and 8
// backward; rotary embedding: 2 selects, 4 products, a stack and their backward zero-fills)
// whose per-operator cost, not arithmetic, dominates at the sizes a CPU trains. The fused
// loops read the tensors' memory on the host, so on any other device each function runs
// its plain-operator form instead (the ...FromOperators functions, which
// tests/model_test.cc compares with the fused nodes, gradients included).
#pragma once

#include <array>

#include <torch/torch.h>

namespace rmoe {

// x * rsqrt(mean(x^2, -1) + eps) * weight, over the last dimension, in x's dtype (bf16
// accumulates in fp32).
torch::Tensor FusedRmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor RmsNormFromOperators(const torch::Tensor& x, const torch::Tensor& weight,
                                   double eps);

// Splits the attention's fused projection qkv [B, T, 3, H, hd] into q, k and v, each
// [B, H, T, hd] and contiguous, with q and k rotated pairwise (channels 2i, 2i+1) by the
// angles whose cosines and sines are cos, sin [T, hd / 2] (used in fp32).
std::array<torch::Tensor, 3> SplitHeadsWithRotary(const torch::Tensor& qkv,
                                                  const torch::Tensor& cos,
                                                  const torch::Tensor& sin);
std::array<torch::Tensor, 3> SplitHeadsWithRotaryFromOperators(const torch::Tensor& qkv,
                                                               const torch::Tensor& cos,
                                                               const torch::Tensor& sin);

// Mean next-token cross-entropy of logits [N, V] (fp32 or fp64) against targets [N] in
// [0, V). Its backward reuses the forward's log-probabilities as the gradient's storage.
torch::Tensor FusedCrossEntropy(const torch::Tensor& logits, const torch::Tensor& targets);

}  // namespace rmoe
