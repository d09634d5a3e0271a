// One MoE layer: router -> top-k -> plan -> dispatch -> stacked SwiGLU experts -> combine ->
// weighted sum, plus an optional shared expert and the router's auxiliary losses.
#pragma once

#include <memory>

#include <torch/torch.h>

#include "proto/job.pb.h"
#include "rmoe/model/experts.h"
#include "rmoe/model/router.h"

namespace rmoe {

struct MoEOutput {
  torch::Tensor y;               // [B, T, D]
  torch::Tensor load_balance;    // E * sum_i f_i P_i (1 at perfect balance); unweighted
  torch::Tensor z_loss;          // mean(logsumexp(logits)^2); unweighted
  // Detached statistics for logging and tests.
  torch::Tensor expert_index;       // [B*T, k]
  torch::Tensor routed_per_expert;  // [E] assignments before capacity dropping
  torch::Tensor router_entropy;     // mean over tokens of the routing distribution's entropy
  int64_t dropped = 0;              // assignments dropped by the capacity limit
  int64_t assignments = 0;          // B*T*k
  // Wall time of the router's forward (logits only; top-k and the losses excluded). CPU
  // kernels run synchronously, so this is the router's cost; on CUDA it is launch time.
  double router_seconds = 0;
  // Wall time of the experts' forward, and of moving tokens to them and back (dispatch and
  // combine: the all-to-alls with expert parallelism). Same caveat on CUDA.
  double expert_seconds = 0;
  double dispatch_seconds = 0;
};

// Computes top-k routing from router logits [N, E]: probabilities in the logits' dtype,
// combine weights renormalised over the k choices when `renormalize`.
struct TopKRouting {
  torch::Tensor probs;  // [N, E]
  RoutingDecision decision;
};
TopKRouting RouteTopK(const torch::Tensor& logits, int64_t top_k, bool renormalize);

// The Switch-Transformer load-balancing loss E * sum_i f_i * P_i, with f_i the fraction of
// the N*k assignments that chose expert i and P_i the mean router probability of expert i.
torch::Tensor LoadBalancingLoss(const torch::Tensor& probs, const torch::Tensor& routed_per_expert,
                                int64_t top_k);
// ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2.
torch::Tensor RouterZLoss(const torch::Tensor& logits);

class MoELayerImpl : public torch::nn::Module {
 public:
  // `token_scan`: how a token-recurrent router scans (MakeRouter).
  MoELayerImpl(const ModelSpec& model, const InitScales& init, RecurrentCell shared_router_cell,
               ScanImplementation token_scan = ScanImplementation::kAuto);
  MoEOutput forward(const torch::Tensor& x, RouterCarry& carry, torch::Tensor* token_state);

  // Expert parallelism swaps in a dispatcher that exchanges tokens across ranks.
  void set_dispatcher(std::shared_ptr<Dispatcher> dispatcher) { dispatcher_ = std::move(dispatcher); }
  ExpertBank& experts() { return experts_; }
  Router& router() { return *router_; }

 private:
  MoESpec spec_;
  std::shared_ptr<Router> router_;
  ExpertBank experts_{nullptr};
  SwiGLU shared_expert_{nullptr};
  std::shared_ptr<Dispatcher> dispatcher_;
};
TORCH_MODULE(MoELayer);

}  // namespace rmoe
