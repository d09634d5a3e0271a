// What a job will need, computed from its spec alone, before anything is allocated: the
// parameter counts (for --dry-run, equal to what the built model counts) and a memory
// estimate checked against what this machine has, so that a job too large for it stops
// with the numbers instead of dying in the allocator or the OOM killer.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <absl/status/status.h>

#include "proto/job.pb.h"

namespace rmoe {

// Doubles: a spec's int32 sizes can describe counts beyond int64 (which the check refuses).
struct SpecParameterCounts {
  double total = 0;
  double active = 0;  // per token: the top_k routed experts of each MoE layer, not all
  double expert = 0;  // in routed experts
};

// model.vocab_size must be resolved (> 0).
SpecParameterCounts CountSpecParameters(const ModelSpec& model);

// One parameter tensor of the model, in the order the built model lists its parameters
// (Transformer::parameters()).
struct SpecTensor {
  std::string name;    // as the built model names it: "layers.0.moe.experts.w1"
  double numel = 0;    // elements, all experts of a layer for an expert tensor
  bool expert = false; // routed experts' stacked weights: split over expert parallelism
  bool matmul = false; // cast to bf16 for its products under runtime.precision = BF16
};

// Every parameter tensor of `model` (vocab_size resolved); their numels sum to
// CountSpecParameters(model).total.
std::vector<SpecTensor> SpecParameterTensors(const ModelSpec& model);

// Where a rank sits, beyond what the spec says.
struct MemoryLayout {
  // Ranks of the job; 0 = parallel.expert_parallel_size (one data-parallel replica), the
  // least any layout of the spec has, which makes ZeRO-1's division the smallest.
  int world_size = 0;
  // The busiest rank's routed rows over the mean (1 = perfectly balanced routing): scales
  // the received all-to-all rows and the expert activations of that rank.
  double routing_skew = 1;
};

// Bytes one rank needs to train, by what holds them. An estimate: the resident tensors
// exactly (fp32 parameters, gradients, AdamW's two moments divided as ZeRO-1 divides them,
// bf16 weight copies), the activations autograd keeps for one micro-batch from what each
// operator saves (rmoe/model/*.cc; attention through the fused kernel, which keeps no
// seq_len x seq_len scores), under runtime.recompute; the short-lived buffers of the peak;
// allocator slack, libraries and the process itself are not counted.
struct MemoryEstimate {
  double parameters = 0, gradients = 0, optimizer = 0, weight_copies = 0, activations = 0;
  // Held only around one layer at a time, at the peak of the backward pass: the gradients
  // of one layer's activations, the activations of the one layer or block being recomputed.
  double workspace = 0;
  // Expert parallelism: the rows sent and received by one all-to-all (EP > 1).
  double alltoall_buffers = 0;
  // The flat buffers of the bucketed gradient all-reduce and ZeRO-1 broadcasts (world > 1).
  double communication_buffers = 0;
  // `activations` by component, summing to it: {"attention", ...}.
  std::vector<std::pair<std::string, double>> activation_parts;
  double total() const {
    return parameters + gradients + optimizer + weight_copies + activations + workspace +
           alltoall_buffers + communication_buffers;
  }
  // "parameters 1.2 GiB, gradients 1.2 GiB, AdamW moments 2.4 GiB, ...".
  std::string Breakdown() const;
  // "7.2 GiB (" + Breakdown() + ")".
  std::string Describe() const;
};

// Per rank, with each MoE layer's experts split over parallel.expert_parallel_size ranks,
// the optimizer state under parallel.shard_optimizer_state, activations under
// runtime.recompute.
MemoryEstimate EstimateTrainingMemory(const JobSpec& spec, const MemoryLayout& layout = {});

// Elements of one micro-batch's activations per token, by component, as autograd keeps
// them with runtime.recompute = NONE (bytes: `bytes_per_token`), and what one layer
// recomputes. Used by EstimateTrainingMemory and by the step-time model's memory traffic.
struct ActivationProfile {
  double attention_block = 0;  // bytes per token of one block's attention half (norms, q/k/v, output)
  double moe_layer = 0;        // of one MoE layer (router, routing, expert rows and hidden, shared expert)
  double dense_ffn = 0;        // of one dense SwiGLU
  double moe_input = 0;        // what a recomputed MoE layer keeps: its input and router state
  double block_input = 0;      // what a recomputed block keeps
  double head = 0;             // final norm, logits and log-probabilities
  double moe_workspace = 0;    // gradients live during one MoE layer's backward
  double dense_workspace = 0;  // during one dense layer's backward
};
ActivationProfile ProfileActivations(const JobSpec& spec, double routing_skew = 1);

// Bytes this process may still allocate: the least of the kernel's MemAvailable, the
// cgroup's memory limit minus its usage (v2 or v1) and the address-space limit (ulimit -v)
// minus the address space in use. nullopt when none of them can be read.
std::optional<double> AvailableMemoryBytes();

// ResourceExhausted, with the estimate and what is available, when `ranks_on_machine` ranks
// of `spec` would need more than `available` bytes; OK when `available` is unknown. The
// estimate is for a job of `world_size` ranks (0: the least the spec allows, see
// MemoryLayout), which decides ZeRO-1's share.
absl::Status CheckTrainingMemory(const JobSpec& spec, int ranks_on_machine,
                                 std::optional<double> available, int world_size = 0);

// "1.5 GiB", "640.0 MiB", "12.0 KiB", "17 B".
std::string FormatBytes(double bytes);

}  // namespace rmoe
