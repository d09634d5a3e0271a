// The planner behind rmoe_plan: for a job spec, a number of devices and a hardware profile,
// every expert-parallel x data-parallel layout with its per-rank memory (the one estimate
// of rmoe/config/resources.h) and a predicted step time (FLOPs at a calibrated efficiency,
// alpha-beta collectives), and hardware profiles calibrated from rmoe_bench's JSON.
// Torch-free.
//
// Assumptions of the step-time model (docs/scaling.md says them with the numbers):
//  - nothing overlaps: a step is compute + all-to-all + gradient all-reduce + ZeRO-1
//    broadcasts, in sequence, as the trainer runs them;
//  - the busiest rank sets the pace: its routed rows are `routing_skew` times the mean, for
//    its expert products and for the rows it receives;
//  - collectives are alpha-beta: an all-reduce of 2 (p - 1) / p of the bytes over the
//    slowest link the group crosses, bucketed, each bucket's latency that of a ring or a
//    tree, whichever is less; an all-to-all ((p - 1) / p of the rows leave the
//    rank, the inter-node share over the network link), a broadcast (bytes / bandwidth,
//    latency log2 p);
//  - element-wise work (norms, softmax, gates, copies, the optimizer) moves bytes at the
//    profile's memory bandwidth, and every operator costs op_overhead_s;
//  - ranks drift apart between collectives: a rank waits collective_wait_fraction of its
//    computation and collective_sync_s per blocking collective (calibrated on CPUs,
//    assumed on GPUs).
#pragma once

#include <string>
#include <vector>

#include <absl/status/statusor.h>

#include "proto/hardware.pb.h"
#include "proto/job.pb.h"
#include "rmoe/config/resources.h"

namespace rmoe::plan {

// ---- hardware profiles

// Checks what the planner needs: positive peaks, bandwidths and memory; efficiencies in
// (0, 1]; non-negative latencies and overheads. Every problem at once.
absl::Status ValidateHardwareProfile(const HardwareProfile& profile);
// Reads and validates a profile in protobuf text format.
absl::StatusOr<HardwareProfile> LoadHardwareProfile(const std::string& path);
absl::StatusOr<HardwareProfile> ParseHardwareProfile(const std::string& text, const std::string& name);
std::string HardwareProfileToText(const HardwareProfile& profile);

// ---- layouts

struct Layout {
  int world = 1, ep = 1, dp = 1;
  int ranks_per_node = 1;  // ranks that share one node
  int nodes = 1;
  bool ep_spans_nodes = false;    // the all-to-all group crosses the network
  bool world_spans_nodes = false; // the all-reduce over the world does
};

// Every layout of `world` ranks: EP divides num_experts and world, DP = world / EP, EP
// groups of ranks taken node by node (as ProcessGroups makes them). `ranks_per_node` > 0;
// a world larger than a node must fill whole nodes.
absl::StatusOr<std::vector<Layout>> EnumerateLayouts(int num_experts, int world, int ranks_per_node);

// ---- collectives (alpha-beta), seconds

// The bytes per second each rank's share of an all-reduce moves at (its bus bandwidth):
// within a node the intra-node link's; across nodes the node's network links together
// (ranks_per_node x inter, as NCCL runs one ring per device and its network link), but
// never more than the intra-node link.
double AllReduceBusBandwidth(int p, int ranks_per_node, const LinkSpec& intra, const LinkSpec& inter);
// Ring all-reduce of `bytes` over p ranks in buckets of at most `bucket_bytes`: per bucket
// 2 (p - 1) / p of it at AllReduceBusBandwidth and 2 (p - 1) latency steps (a two-level
// ring: steps within a node at the intra-node latency, across nodes at the inter-node one).
double RingAllReduceSeconds(double bytes, int p, int ranks_per_node, const LinkSpec& intra,
                            const LinkSpec& inter, double bucket_bytes);
// What EstimateStep charges for an all-reduce: per bucket the faster of the ring above and
// a tree (2 ceil(log2 p) latency steps of the slowest link, the same bandwidth term), as
// NCCL and MPI switch to trees where latency dominates.
double AllReduceSeconds(double bytes, int p, int ranks_per_node, const LinkSpec& intra,
                        const LinkSpec& inter, double bucket_bytes);
// All-to-all where each rank sends (and the busiest receives) `bytes`, spread evenly over
// the p ranks of a group laid over nodes of `ranks_per_node`: what stays in the node goes
// at the intra-node bandwidth, the rest at the inter-node one, the two at once; latency
// (p - 1) messages of the slowest link used.
double AllToAllSeconds(double bytes, int p, int ranks_per_node, const LinkSpec& intra,
                       const LinkSpec& inter);
// nccl-tests' bus bandwidth over algorithm bandwidth (bytes per rank / time) of a
// collective of p ranks: 2 (p - 1) / p for an all-reduce, (p - 1) / p for an all-to-all;
// the bytes each rank moves over its link, comparable with the link's rate whatever p is.
double BusBandwidthFactor(bool all_reduce, int p);
// The argument agreement before each collective of p ranks (HardwareProfile::
// collectives_agree_arguments): ceil(log2 p) latencies of the slowest link; 0 without it.
double AgreementSeconds(const HardwareProfile& hw, int p, int ranks_per_node);
// Broadcast of `bytes` from one rank to p: bytes / bandwidth + ceil(log2 p) latencies.
double BroadcastSeconds(double bytes, int p, const LinkSpec& link);

// ---- routing statistics

// Per MoE layer, the mean tokens per expert over the training records of a metrics.jsonl
// (rmoe_train's "moe" array), or only each layer's load CV when the counts are missing.
struct RoutingLoads {
  std::vector<std::vector<double>> tokens_per_expert;  // [layer][expert], may be empty
  std::vector<double> load_cv;                         // [layer]
  int records = 0;
};
absl::StatusOr<RoutingLoads> ReadRoutingLoads(const std::string& metrics_path);
// The busiest of `ep` ranks' routed rows over the mean, averaged over layers: from the
// counts (experts in contiguous slices per rank) or, without them, from the CV (a rank's
// CV = cv / sqrt(E / ep), the busiest of ep about sqrt(2 ln ep) of those above the mean).
// 1 for ep = 1 or no statistics.
double RoutingSkew(const RoutingLoads& loads, int num_experts, int ep);

// ---- the step

struct StepEstimate {
  // Per rank per optimizer step.
  double matmul_flops = 0;         // including the recomputed forward
  double elementwise_bytes = 0;    // memory traffic outside the products
  double ops = 0;                  // operators run
  // compute_s = compute_matmul_s + compute_memory_s + compute_overhead_s.
  double compute_matmul_s = 0, compute_memory_s = 0, compute_overhead_s = 0;
  double compute_s = 0, alltoall_s = 0, allreduce_s = 0, broadcast_s = 0;
  // Blocking collectives per step, and the waiting in them beyond alpha-beta
  // (collective_wait_fraction x compute_s + collectives x collective_sync_s).
  double collectives = 0, wait_s = 0;
  double step_s = 0, tokens_per_s = 0;
  // FLOPs per rank per step by component: "attention products", "attention projections",
  // "experts", "shared expert", "dense FFN", "router", "LM head".
  std::vector<std::pair<std::string, double>> flops_parts;
};

// Compute per rank is the device's rate, or with ranks_share_node (CPU cores) the node's
// rate split over its ranks; op overheads grow when ranks outnumber cores.
StepEstimate EstimateStep(const JobSpec& spec, const Layout& layout, const HardwareProfile& hw,
                          double routing_skew);

// ---- the plan

struct PlanRow {
  Layout layout;
  RuntimeSpec::Recompute recompute = RuntimeSpec::NONE;
  bool zero1 = false;
  double skew = 1;
  MemoryEstimate memory;
  double memory_per_rank = 0;  // memory.total() + the profile's runtime overhead
  double memory_available = 0;
  bool fits = false;
  StepEstimate step;
};

struct PlanOptions {
  int world = 1;
  int ranks_per_node = 0;  // 0 = the profile's devices_per_node
  const RoutingLoads* routing = nullptr;
  // Also plan each layout under every combination of runtime.recompute and ZeRO-1.
  bool variants = true;
};

// Rows per layout: the spec as given first, then (variants) the other combinations of
// recompute NONE / MOE / FULL and ZeRO-1 off / on (ZeRO-1 only where world > 1).
absl::StatusOr<std::vector<PlanRow>> Plan(const JobSpec& spec, const HardwareProfile& hw,
                                          const PlanOptions& options);
// The fastest row that fits; -1 when none does.
int Recommend(const std::vector<PlanRow>& rows);

// ---- calibration

// A profile from rmoe_bench JSON outputs (each file's "benchmark": "matmul", "alltoall" or
// "step"): the fp32 peak per core from matmul (the best product over sizes, one thread, or
// the threads' share); the intra-node alpha-beta from alltoall runs (raw-tokens medians,
// at least two sizes for both, one gives the bandwidth with the base latency); from step
// runs (one rank needs at least two of different shapes; more ranks check, not fit), the
// matmul efficiency, memory bandwidth and operator overhead by non-negative least squares
// of the computation times, and the runtime overhead from any "peak_rss_bytes" they carry;
// from step runs of several ranks, the collective wait fraction and sync cost, by the same
// least squares of the communication time beyond alpha-beta, after the computation
// factors of several ranks on their own cores and on shared ones (measured over predicted).
// Fields the files do not determine come from `base`.
absl::StatusOr<HardwareProfile> Calibrate(const std::vector<std::string>& json_paths,
                                          const HardwareProfile& base);

}  // namespace rmoe::plan
