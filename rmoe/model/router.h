// Routers: map each token's hidden state to logits over the experts of one MoE layer.
//
//   LINEAR            logits = W_g x                                  (SMoE baseline)
//   RECURRENT/LAYER   h^l = Cell(W_proj^l x, h^{l-1}); logits = W_g^l h^l
//                     one cell shared by all MoE layers, h carried per token from layer to
//                     layer (RMoE, arXiv 2408.06793); gradients flow through the carry.
//   RECURRENT/TOKEN   h_t = Cell(W_proj x_t, h_{t-1}) scanned along the sequence inside a
//                     layer (the seed prototype); the last h is carried across decoding steps.
//   RECURRENT/NONE    h^l = Cell(W_proj^l x, 0): LAYER without passing the state (RMoE-NP)
//   detach_state      LAYER with the state passed on as a constant (no gradient through it)
//   MLP               logits = W_g tanh(W_h x + b_h)                  (SMoE-MLP)
//
// Router math runs in fp32 whatever the model's dtype (fp64 when the model is fp64, so
// gradients can be checked against finite differences).
#pragma once

#include <memory>

#include <torch/torch.h>

#include "proto/job.pb.h"
#include "rmoe/model/layers.h"
#include "rmoe/model/recurrent_scan.h"

namespace rmoe {

// State that flows between routers during one forward pass.
struct RouterCarry {
  // Layer recurrence: [B*T, H], the state left by the previous MoE layer; undefined before
  // the first MoE layer (= zeros).
  torch::Tensor layer_state;
};

// A GRU or Elman RNN cell with PyTorch's parameters and gate order (w_ih, b_ih, w_hh, b_hh).
class RecurrentCellImpl : public torch::nn::Module {
 public:
  RecurrentCellImpl(RouterSpec::Cell cell, int64_t input_dim, int64_t hidden_dim);
  // One step: input [N, input_dim], h [N, hidden_dim] (undefined = zeros) -> [N, hidden_dim].
  torch::Tensor Step(const torch::Tensor& input, const torch::Tensor& h) const;
  // Every step of a sequence, input [B, T, input_dim] from h0 [B, H] (undefined = zeros):
  // the states [B, T, H] (rmoe/model/recurrent_scan.h says how each implementation runs).
  torch::Tensor Scan(const torch::Tensor& input, const torch::Tensor& h0,
                     ScanImplementation implementation = ScanImplementation::kAuto) const;
  int64_t hidden_dim() const { return hidden_dim_; }

 private:
  RouterSpec::Cell cell_;
  int64_t hidden_dim_;
  torch::Tensor w_ih_, b_ih_, w_hh_, b_hh_;
};
TORCH_MODULE(RecurrentCell);

class Router : public torch::nn::Module {
 public:
  // x: [B, T, D]. Returns logits [B*T, E] in FullPrecisionType(x). `token_state`, when
  // given, is the token-recurrent router's [B, H] state from earlier decoding steps,
  // replaced by the state after this call's last position (ignored by other routers).
  virtual torch::Tensor forward(const torch::Tensor& x, RouterCarry& carry,
                                torch::Tensor* token_state) = 0;
};

// Builds the router of one MoE layer. `shared_cell` is the layer-recurrent cell owned by
// the model (registered there once, so its parameters are not duplicated per layer).
// `token_scan` is how the token-recurrent router scans (ignored by other routers).
std::shared_ptr<Router> MakeRouter(const ModelSpec& model, const InitScales& init,
                                   RecurrentCell shared_cell,
                                   ScanImplementation token_scan = ScanImplementation::kAuto);

// The cell the model owns for layer recurrence, or an empty holder for other routers.
RecurrentCell MakeSharedRouterCell(const ModelSpec& model);

}  // namespace rmoe
