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

// Where dispatch put the rows of a plan, for combine to bring them back. The local
// dispatcher needs none of it; the expert-parallel one fills it.
struct DispatchHandle {
  std::vector<int64_t> send_splits;  // rows sent to each rank of the expert-parallel group
  std::vector<int64_t> recv_splits;  // rows received from each
  torch::Tensor by_expert;           // received row -> row of the experts' input
};

// The experts' input: rows grouped by the experts held here.
struct DispatchedTokens {
  torch::Tensor rows;                      // [M, D]
  std::vector<int64_t> tokens_per_expert;  // rows per local expert, in order
  DispatchHandle handle;
};

// Moves tokens to the experts that hold them and the experts' outputs back, in two
// separate steps so that communication and expert time can be measured (and later
// overlapped) apart:
//   plan (PlanDispatch) -> Dispatch -> ExpertBank::forward -> Combine -> WeightedCombine.
class Dispatcher {
 public:
  virtual ~Dispatcher() = default;
  // x: [N, D]; `plan` over the layer's global experts.
  virtual DispatchedTokens Dispatch(const torch::Tensor& x, const DispatchPlan& plan) = 0;
  // The experts' output rows [M, D] -> one row per kept assignment of the plan, in plan
  // order ([plan.token.size(0), D]).
  virtual torch::Tensor Combine(const torch::Tensor& expert_out, const DispatchHandle& handle) = 0;
};

// Every expert lives in this process: rows in plan order are already grouped by expert.
class LocalDispatcher : public Dispatcher {
 public:
  DispatchedTokens Dispatch(const torch::Tensor& x, const DispatchPlan& plan) override;
  torch::Tensor Combine(const torch::Tensor& expert_out, const DispatchHandle& handle) override {
    return expert_out;
  }
};

// sum_j weight[n, j] * rows of token n: the plan-ordered rows of Combine scattered back to
// their tokens ([num_tokens, D]); dropped assignments contribute nothing.
torch::Tensor WeightedCombine(const torch::Tensor& rows, const DispatchPlan& plan,
                              int64_t num_tokens);

// The whole path for callers that need no timing: dispatch, run `experts`, combine, weight.
torch::Tensor RunExperts(Dispatcher& dispatcher, const torch::Tensor& x, const DispatchPlan& plan,
                         ExpertBank& experts);

}  // namespace rmoe
