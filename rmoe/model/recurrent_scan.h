// The token-recurrent router's scan along the sequence as one autograd node.
//
// Left to autograd, each step of a GRU is ~15 small ATen operations forward and ~30
// backward, and at a few rows per step their dispatch overhead is the whole cost (about
// 260 us per position at batch 1). Here a step is one addmm (the recurrent product) and
// one fused loop over the gates, forward and backward; the recurrent weights' gradient is
// one product over all steps after the backward scan.
#pragma once

#include <torch/torch.h>

#include "proto/job.pb.h"

namespace rmoe {

// States [B, T, H] of h_t = Cell(input_gates[:, t], h_{t-1}) with h_{-1} = h0 [B, H].
// input_gates [B, T, G*H] = W_ih x_t + b_ih (G = 3 for a GRU, gates in PyTorch's order
// reset, update, new; 1 for an Elman RNN with tanh); w_hh [G*H, H], b_hh [G*H]. Gradients
// flow to input_gates, h0, w_hh and b_hh. fp32 or fp64, CPU or any device ATen runs on
// (the gate loop runs on the CPU: CPU tensors only).
torch::Tensor RecurrentScan(RouterSpec::Cell cell, const torch::Tensor& input_gates,
                            const torch::Tensor& h0, const torch::Tensor& w_hh,
                            const torch::Tensor& b_hh);

}  // namespace rmoe
