// The experts of one MoE layer and the dispatch of tokens to them.
//
// Expert weights are stacked ([E, d_model, hidden]) rather than a list of modules: tokens
// sorted by expert run as one matrix product per expert, and checkpoints slice experts by
// index. The MoE layer talks only to the Dispatcher interface; the local dispatcher (all
// experts in this process) lives here, the expert-parallel one in distributed/.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include "rmoe/model/layers.h"

namespace rmoe {

// SwiGLU experts with stacked weights: expert e maps x to (silu(x W1[e]) * x W3[e]) W2[e].
class ExpertBankImpl : public torch::nn::Module {
 public:
  ExpertBankImpl(int64_t num_experts, int64_t d_model, int64_t hidden_dim,
                 const InitScales& init);
  // x: [M, D], rows grouped by expert: the first tokens_per_expert[0] rows go to expert 0,
  // and so on. Returns [M, D].
  torch::Tensor forward(const torch::Tensor& x, const std::vector<int64_t>& tokens_per_expert);
  // Experts held here; with expert parallelism a slice of the layer's experts.
  int64_t num_experts() const { return w1.size(0); }
  // Global id of the first expert held here.
  int64_t first_expert() const { return first_expert_; }
  // Keeps experts [first, first + count) only: how expert parallelism shards a layer.
  void KeepExperts(int64_t first, int64_t count);
  // Replaces the held experts by `w1`, `w3`, `w2` holding experts from `first` on.
  void SetExperts(int64_t first, const torch::Tensor& w1, const torch::Tensor& w3,
                  const torch::Tensor& w2);

  torch::Tensor w1, w3;  // [E, D, H]
  torch::Tensor w2;      // [E, H, D]

 private:
  int64_t first_expert_ = 0;
};
TORCH_MODULE(ExpertBank);

// What the router decided for a batch of N tokens.
struct RoutingDecision {
  torch::Tensor expert_index;  // [N, k] int64
  torch::Tensor weight;        // [N, k], the combine weights (model dtype)
};

// Assignments (token, expert) sorted by expert, after capacity dropping.
struct DispatchPlan {
  torch::Tensor token;   // [M] int64: source token of each kept assignment, grouped by expert
  torch::Tensor weight;  // [M]: its combine weight
  std::vector<int64_t> tokens_per_expert;  // kept assignments per expert (host)
  torch::Tensor routed_per_expert;         // [E] int64: assignments before dropping
  int64_t dropped = 0;
};

// Tokens an expert accepts: ceil(capacity_factor * N * k / E); 0 means unlimited.
int64_t ExpertCapacity(double capacity_factor, int64_t num_tokens, int64_t top_k,
                       int64_t num_experts);

// Sorts assignments by expert and drops those beyond `capacity` (0 = dropless). Priority
// follows GShard: every token's first choice before any second choice, then token order,
// so a token's best expert is the last thing it loses.
DispatchPlan PlanDispatch(const RoutingDecision& decision, int64_t num_experts,
                          int64_t capacity);

class Dispatcher {
 public:
  virtual ~Dispatcher() = default;
  // x: [N, D]. Returns sum_j weight[n, j] * expert_{index[n, j]}(x[n]) for each token
  // (dropped assignments contribute nothing), and fills `plan` for metrics.
  virtual torch::Tensor Dispatch(const torch::Tensor& x, const RoutingDecision& decision,
                                 int64_t capacity, ExpertBank& experts, DispatchPlan* plan) = 0;
};

// Every expert lives in this process: permute, run grouped, weight, scatter-add back.
class LocalDispatcher : public Dispatcher {
 public:
  torch::Tensor Dispatch(const torch::Tensor& x, const RoutingDecision& decision,
                         int64_t capacity, ExpertBank& experts, DispatchPlan* plan) override;
};

}  // namespace rmoe
