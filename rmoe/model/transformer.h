// The decoder-only RMoE language model:
//   embedding -> N x [x += Attn(RMSNorm(x)); x += FFN-or-MoE(RMSNorm(x))] -> RMSNorm -> LM head
// The layer-recurrent router's state flows through the MoE layers in order; dense layers
// pass it through unchanged.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include <torch/torch.h>

#include "proto/job.pb.h"
#include "rmoe/config/job_spec.h"  // IsMoELayer, MoELayerIndices
#include "rmoe/model/layers.h"
#include "rmoe/model/moe_layer.h"

namespace rmoe {

// Everything generation carries from one decoding step to the next.
struct DecodeCache {
  std::vector<KVCache> attention;            // per layer
  std::vector<torch::Tensor> router_token_state;  // per layer: token-recurrent state [B, H]
  int64_t length() const { return attention.empty() ? 0 : attention.front().length(); }
};

struct ModelOutput {
  torch::Tensor logits;  // [B, T, V], fp32 (fp64 for a double model)
  // aux_loss_coef * sum of load-balancing losses + z_loss_coef * sum of z-losses over the
  // MoE layers: add it to the language-model loss.
  torch::Tensor router_loss;
  std::vector<MoEOutput> moe;  // one per MoE layer, in layer order
};

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const ModelSpec& model, const InitScales& init, bool is_moe,
            RecurrentCell shared_router_cell);
  // Appends this block's MoE output (if it is an MoE block) to `moe_outputs`.
  torch::Tensor forward(const torch::Tensor& x, RouterCarry& carry, KVCache* kv_cache,
                        torch::Tensor* router_token_state,
                        std::vector<MoEOutput>* moe_outputs);
  bool is_moe() const { return !moe_.is_empty(); }
  MoELayer& moe() { return moe_; }
  void set_recompute(RuntimeSpec::Recompute mode) { recompute_ = mode; }

 private:
  // The block without recomputation.
  torch::Tensor ForwardPieces(const torch::Tensor& x, RouterCarry& carry, KVCache* kv_cache,
                              torch::Tensor* router_token_state,
                              std::vector<MoEOutput>* moe_outputs);
  // x + FFN-or-MoE(RMSNorm(x)).
  torch::Tensor FeedForward(const torch::Tensor& x, RouterCarry& carry,
                            torch::Tensor* router_token_state, std::vector<MoEOutput>* moe_outputs);
  using Piece = std::function<torch::Tensor(const torch::Tensor&, RouterCarry&,
                                            std::vector<MoEOutput>*)>;
  // `piece` run under RunWithRecomputation: its input, the router state it receives (layer
  // recurrence) and its outputs (the new residual stream, the router state it passes on,
  // the MoE losses) cross the recomputation boundary; the MoE statistics come from the
  // first run.
  torch::Tensor Recomputed(const Piece& piece, const torch::Tensor& x, RouterCarry& carry,
                           std::vector<MoEOutput>* moe_outputs);

  // Residual dropout on an attention or feed-forward output, while training.
  torch::Tensor Dropout(const torch::Tensor& t) const;

  double dropout_ = 0;
  RuntimeSpec::Recompute recompute_ = RuntimeSpec::NONE;
  bool carries_router_state_ = false;  // an MoE block whose router is layer-recurrent
  RMSNorm attn_norm_{nullptr}, ffn_norm_{nullptr};
  CausalSelfAttention attn_{nullptr};
  SwiGLU ffn_{nullptr};
  MoELayer moe_{nullptr};
};
TORCH_MODULE(Block);

struct ParameterCounts {
  int64_t total = 0;
  int64_t active = 0;  // per token: excludes the (E - k) experts a token does not use
  int64_t expert = 0;  // all routed-expert parameters
};

class TransformerImpl : public torch::nn::Module {
 public:
  // `model.vocab_size()` must already be resolved (> 0).
  explicit TransformerImpl(const ModelSpec& model);
  // tokens: [B, T] int64. With a cache, T new tokens are appended to the cached prefix.
  ModelOutput forward(const torch::Tensor& tokens, DecodeCache* cache = nullptr);

  DecodeCache NewCache() const;
  // runtime.recompute for every block: applies while training with gradients, never with
  // a decode cache.
  void set_recompute(RuntimeSpec::Recompute mode);
  ParameterCounts CountParameters() const;
  // Matrix-product FLOPs of one training token (forward + backward) at `seq_len`:
  //   6 N + 12 num_layers d_model seq_len
  // N: the parameters a token multiplies by (active parameters, less the input embedding
  // when it is not tied to the LM head: a lookup); the second term is attention's scores and
  // weighted values without discounting the causal mask (the PaLM convention).
  double TrainingFlopsPerToken(int64_t seq_len) const;
  // That N.
  int64_t MatmulParametersPerToken() const;
  const ModelSpec& spec() const { return spec_; }
  std::vector<Block>& blocks() { return blocks_; }

 private:
  ModelSpec spec_;
  torch::nn::Embedding embedding_{nullptr};
  RecurrentCell router_cell_{nullptr};  // layer recurrence only: shared by every MoE layer
  std::vector<Block> blocks_;
  RMSNorm final_norm_{nullptr};
  torch::nn::Linear lm_head_{nullptr};  // absent when tied to the embedding
};
TORCH_MODULE(Transformer);

}  // namespace rmoe
