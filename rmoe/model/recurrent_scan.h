// The token-recurrent router's scan along the sequence, in one of two implementations.
//
// On the CPU, left to autograd, each step of a GRU is ~15 small ATen operations forward and
// ~30 backward, and at a few rows per step their dispatch overhead is the whole cost (about
// 260 us per position at batch 1). The host loop is one autograd node instead: the input
// half of the cell is one product over all tokens, a step is one addmm (the recurrent
// product) and one fused loop over the gates, forward and backward, and the recurrent
// weights' gradient is one product over all steps after the backward scan. Its gate loop
// dereferences the tensors' memory on the host, so it runs on CPU tensors only.
//
// On any other device the scan is ATen's own multi-step RNN (at::gru, at::rnn_tanh), which
// is cuDNN's fused kernel on CUDA and a plain per-step loop of ATen operations elsewhere.
// On the CPU that loop is the slow form above, hence the host loop there
// (docs/benchmarks.md has both timed). In fp32 cuDNN follows PyTorch's setting for RNN
// products, which by default lets them run in TF32.
#pragma once

#include <torch/torch.h>

#include "proto/job.pb.h"

namespace rmoe {

enum class ScanImplementation {
  kAuto,       // kHostLoop for CPU tensors, kDeviceOps for any other device
  kHostLoop,   // the fused autograd node with the gate loop on the host; CPU tensors only
  kDeviceOps,  // at::gru / at::rnn_tanh: runs wherever ATen runs (CPU included, slowly)
};

// A GRU or Elman RNN cell's parameters in PyTorch's layout: w_ih [G*H, I], b_ih [G*H],
// w_hh [G*H, H], b_hh [G*H], G = 3 for a GRU (gates reset, update, new, with
// n = tanh(W_in x + b_in + r * (W_hn h + b_hn))) and 1 for an Elman RNN with tanh.
struct RecurrentCellWeights {
  torch::Tensor w_ih, b_ih, w_hh, b_hh;
};

// The implementation `requested` stands for on tensors of `device`: kAuto resolved, the
// others as they are.
ScanImplementation ResolveScanImplementation(ScanImplementation requested,
                                             const torch::Device& device);

// States [B, T, H] of h_t = Cell(input[:, t], h_{t-1}) with h_{-1} = h0 [B, H], for input
// [B, T, I]. Gradients flow to input, h0 and every weight. fp32 or fp64; all tensors on one
// device.
torch::Tensor RecurrentScan(RouterSpec::Cell cell, const torch::Tensor& input,
                            const torch::Tensor& h0, const RecurrentCellWeights& weights,
                            ScanImplementation implementation = ScanImplementation::kAuto);

}  // namespace rmoe
