// What a job will need, computed from its spec alone, before anything is allocated: the
// parameter counts (for --dry-run, equal to what the built model counts) and a memory
// estimate checked against what this machine has, so that a job too large for it stops
// with the numbers instead of dying in the allocator or the OOM killer.
#pragma once

#include <optional>
#include <string>

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

// Bytes one rank needs to train, by what holds them. An estimate: the resident tensors
// exactly (fp32 parameters, gradients, AdamW's two moments, bf16 weight copies), the
// activations autograd keeps for one micro-batch approximately (attention scores, the
// tensors each layer saves, the logits); allocator slack and libraries are not counted.
struct MemoryEstimate {
  double parameters = 0, gradients = 0, optimizer = 0, weight_copies = 0, activations = 0;
  double total() const { return parameters + gradients + optimizer + weight_copies + activations; }
  // "parameters 1.2 GiB, gradients 1.2 GiB, AdamW moments 2.4 GiB, ...".
  std::string Breakdown() const;
  // "7.2 GiB (" + Breakdown() + ")".
  std::string Describe() const;
};

// Per rank, with each MoE layer's experts split over parallel.expert_parallel_size ranks.
MemoryEstimate EstimateTrainingMemory(const JobSpec& spec);

// Bytes this process may still allocate: the least of the kernel's MemAvailable, the
// cgroup's memory limit minus its usage (v2 or v1) and the address-space limit (ulimit -v)
// minus the address space in use. nullopt when none of them can be read.
std::optional<double> AvailableMemoryBytes();

// ResourceExhausted, with the estimate and what is available, when `ranks_on_machine` ranks
// of `spec` would need more than `available` bytes; OK when `available` is unknown.
absl::Status CheckTrainingMemory(const JobSpec& spec, int ranks_on_machine,
                                 std::optional<double> available);

// "1.5 GiB", "640.0 MiB", "12.0 KiB", "17 B".
std::string FormatBytes(double bytes);

}  // namespace rmoe
