// The dense building blocks of the decoder: RMSNorm, the SwiGLU feed-forward network and
// causal multi-head attention with rotary position embeddings and a KV cache.
#pragma once

#include <optional>

#include <torch/torch.h>

#include "proto/job.pb.h"

namespace rmoe {

// Mixed precision (runtime.precision = BF16): while a guard is alive on this thread, the
// matrix products of attention, the dense/shared SwiGLU and the experts run in `dtype`
// (weights are cast on the way in, so the fp32 master weights get fp32 gradients through
// the cast); attention's softmax, norms, the residual stream, routers and the LM head stay
// in the model's dtype. Like torch's autocast, but limited to the products we choose.
class LowPrecisionMatmulGuard {
 public:
  explicit LowPrecisionMatmulGuard(std::optional<torch::ScalarType> dtype);
  ~LowPrecisionMatmulGuard();
  LowPrecisionMatmulGuard(const LowPrecisionMatmulGuard&) = delete;
  LowPrecisionMatmulGuard& operator=(const LowPrecisionMatmulGuard&) = delete;

 private:
  std::optional<torch::ScalarType> previous_;
};
// The dtype of what must not lose precision whatever the activations' dtype: the routers'
// math, the logits and the losses. fp32, or fp64 for a double model.
torch::ScalarType FullPrecisionType(torch::ScalarType activation_dtype);
// The dtype products run in under the innermost guard, or none.
std::optional<torch::ScalarType> LowPrecisionMatmulDtype();
// `t` cast to that dtype (unchanged when no guard is active or `t` is not floating point).
torch::Tensor ToMatmulDtype(const torch::Tensor& t);

// Every weight matrix is initialised N(0, std); the projections that write into the
// residual stream use std / sqrt(2 * num_layers) so the residual variance stays O(1).
struct InitScales {
  double std = 0.02;
  double residual_std = 0.02;
  static InitScales FromSpec(const ModelSpec& model);
};

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  double eps_;
  torch::Tensor weight_;
};
TORCH_MODULE(RMSNorm);

// W2 (silu(W1 x) * W3 x), no biases: the dense FFN, the shared expert, and the reference
// that a one-expert MoE layer must reproduce.
class SwiGLUImpl : public torch::nn::Module {
 public:
  SwiGLUImpl(int64_t d_model, int64_t hidden_dim, const InitScales& init);
  torch::Tensor forward(const torch::Tensor& x);

  torch::nn::Linear w1{nullptr}, w3{nullptr}, w2{nullptr};
};
TORCH_MODULE(SwiGLU);

// Keys and values of the positions decoded so far, for one attention layer.
struct KVCache {
  torch::Tensor k;  // [B, heads, S, head_dim]
  torch::Tensor v;
  int64_t length() const { return k.defined() ? k.size(2) : 0; }
};

// Causal attention of queries q [B, H, T, hd] at absolute positions past..past+T-1 over
// keys/values k, v [B, H, S, hd] at positions 0..S-1 (S = past + T): query i sees keys
// 0..past+i. Runs LibTorch's fused scaled_dot_product_attention where its mask is exactly
// this one (a whole sequence, or one decoding step), otherwise the explicit reference below.
torch::Tensor CausalAttention(const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, int64_t past);
// The same computed step by step (scores, mask, softmax in fp32 or wider, weighted values):
// used for chunks appended to a KV cache, and the reference the fused path is tested against.
torch::Tensor CausalAttentionReference(const torch::Tensor& q, const torch::Tensor& k,
                                       const torch::Tensor& v, int64_t past);

class CausalSelfAttentionImpl : public torch::nn::Module {
 public:
  CausalSelfAttentionImpl(const ModelSpec& model, const InitScales& init);
  // x: [B, T, D] at positions [cache.length(), cache.length() + T). With a cache, the new
  // keys/values are appended to it.
  torch::Tensor forward(const torch::Tensor& x, KVCache* cache = nullptr);

 private:

  int64_t num_heads_, head_dim_;
  torch::nn::Linear qkv_{nullptr}, out_{nullptr};
  torch::Tensor rope_cos_, rope_sin_;  // [max_seq_len, head_dim / 2]
};
TORCH_MODULE(CausalSelfAttention);

}  // namespace rmoe
