// Routing analytics accumulated over many forward passes (the validation set at every
// evaluation): how evenly each MoE layer spreads its tokens over its experts, how sure its
// router is, and how much the expert a token takes at one MoE layer tells about the expert
// it takes at the next MoE layer (the inter-layer correlation the RMoE paper studies; a
// layer-recurrent router can raise it, an independent linear router per layer has no
// mechanism to).
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

#include "rmoe/model/moe_layer.h"

namespace rmoe {

struct LayerRouting {
  int layer = 0;                 // the model layer index
  std::vector<double> load;      // fraction of the top-k assignments each expert received
  double load_cv = 0;            // std/mean of `load` over experts (0 = perfectly even)
  double entropy = 0;            // mean entropy of the routing distribution, nats
};

// Between MoE layer l (top-1 expert A) and the next MoE layer (top-1 expert B).
struct LayerTransition {
  int from_layer = 0, to_layer = 0;
  double mutual_information = 0;  // I(A; B) in nats
  // I(A; B) / H(B): the share of the uncertainty about B that knowing A removes (Theil's
  // uncertainty coefficient): 0 = independent choices, 1 = A determines B.
  double predictability = 0;
  std::vector<int64_t> top1_counts;  // [E*E] row-major: tokens with A = row, B = column
};

class RoutingStatistics {
 public:
  // `moe_layers`: the model layer index of each MoE layer, in order.
  RoutingStatistics(std::vector<int> moe_layers, int64_t num_experts);

  // Adds one forward pass's routing (ModelOutput::moe).
  void Add(const std::vector<MoEOutput>& moe);

  // Every count as one fp64 vector, and back: to sum them over data-parallel ranks.
  torch::Tensor Flatten() const;
  void Unflatten(const torch::Tensor& flat);

  int64_t tokens() const;  // tokens seen per MoE layer
  std::vector<LayerRouting> Layers() const;
  std::vector<LayerTransition> Transitions() const;
  // {"tokens":N,"layers":[...],"transitions":[...]} for the metrics file.
  std::string ToJson() const;

 private:
  std::vector<int> moe_layers_;
  int64_t num_experts_;
  torch::Tensor assignments_;  // [L, E] top-k assignments
  torch::Tensor entropy_sum_;  // [L] sum over tokens of the routing entropy
  torch::Tensor tokens_;       // [L]
  torch::Tensor top1_joint_;   // [max(L-1, 0), E, E]
};

// Population std / mean of `values` (0 when the mean is 0).
double CoefficientOfVariation(const std::vector<double>& values);

}  // namespace rmoe
