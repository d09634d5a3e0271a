// The planner (rmoe/plan/plan.h) and the memory estimate it shares with rmoe_train
// (rmoe/config/resources.h): counts, the effect of each option, layouts, the alpha-beta
// formulas on hand-computed cases, hardware profiles and calibration.
#include "rmoe/plan/plan.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>
#include <google/protobuf/text_format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "rmoe/config/job_spec.h"
#include "rmoe/config/resources.h"
#include "rmoe/util/json.h"

namespace rmoe::plan {
namespace {

using ::testing::HasSubstr;

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

JobSpec Spec(const std::string& path, const std::vector<std::string>& sets = {}) {
  ValidationOptions options;
  options.check_data_files = false;
  auto spec = LoadJobSpecWithOverrides(std::string(RMOE_SOURCE_DIR) + "/" + path, sets, options);
  EXPECT_TRUE(spec.ok()) << spec.status();
  JobSpec s = *spec;
  if (s.model().vocab_size() == 0) s.mutable_model()->set_vocab_size(256);
  return s;
}

std::string TempPath(const std::string& name) {
  return (std::filesystem::temp_directory_path() / absl::StrCat("rmoe_plan_test_", ::getpid(), "_", name))
      .string();
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
}

HardwareProfile H100() {
  auto p = LoadHardwareProfile(std::string(RMOE_SOURCE_DIR) + "/configs/hardware/h100_sxm.pbtxt");
  EXPECT_TRUE(p.ok()) << p.status();
  return *p;
}

// ---------------------------------------------------------------- counts

TEST(PlanCounts, TinyTestByHand) {
  // d 32, 2 layers, 4 experts of 64, GRU router of 16 across layers, byte vocabulary.
  const JobSpec spec = Spec("configs/tiny_test.pbtxt");
  const double embedding = 256 * 32, final_norm = 32;
  const double attention = 2 * (4 * 32 * 32 + 2 * 32);
  const double experts = 2 * 4 * 3 * 32 * 64;
  const double routers = 2 * (16 * 32 + 4 * 16);
  const double cell = 3 * 16 * (16 + 16) + 2 * 3 * 16;
  const SpecParameterCounts counts = CountSpecParameters(spec.model());
  EXPECT_EQ(counts.total, embedding + final_norm + attention + experts + routers + cell);
  EXPECT_EQ(counts.total, 68480);
  EXPECT_EQ(counts.expert, experts);
  EXPECT_EQ(counts.active, counts.total - 2 * 2 * 3 * 32 * 64);
}

TEST(PlanCounts, TensorListSumsToTheCountForEveryRouterAndLayout) {
  for (const char* router : {"kind: LINEAR", "kind: RECURRENT recurrence: LAYER",
                             "kind: RECURRENT recurrence: TOKEN cell: RNN",
                             "kind: RECURRENT recurrence: NONE", "kind: MLP"}) {
    for (int layout = 0; layout < 3; ++layout) {
      JobSpec spec = Spec("configs/quickstart.pbtxt");
      spec.mutable_model()->mutable_router()->Clear();
      ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(router, spec.mutable_model()->mutable_router()));
      if (layout >= 1) {
        spec.mutable_model()->mutable_moe()->add_moe_layers(1);
        spec.mutable_model()->set_dense_hidden_dim(24);
        spec.mutable_model()->mutable_moe()->set_shared_expert(true);
        spec.mutable_model()->mutable_moe()->set_shared_expert_hidden_dim(12);
      }
      if (layout == 2) spec.mutable_model()->set_tie_embeddings(false);
      double sum = 0, expert = 0;
      for (const SpecTensor& t : SpecParameterTensors(spec.model())) {
        sum += t.numel;
        if (t.expert) expert += t.numel;
      }
      const SpecParameterCounts counts = CountSpecParameters(spec.model());
      EXPECT_EQ(sum, counts.total) << router << " layout " << layout;
      EXPECT_EQ(expert, counts.expert) << router << " layout " << layout;
    }
  }
}

TEST(PlanCounts, MlpAndStatelessRoutersByHand) {
  // MLP router of 10 hidden units: hidden 10 x 32 + bias 10 + gate 4 x 10 per MoE layer.
  JobSpec mlp = Spec("configs/tiny_test.pbtxt", {"model.router.kind=MLP", "model.router.mlp_hidden_dim=10"});
  const double base = 256 * 32 + 32 + 2 * (4 * 32 * 32 + 2 * 32) + 2 * 4 * 3 * 32 * 64;
  EXPECT_EQ(CountSpecParameters(mlp.model()).total, base + 2 * (10 * 32 + 10 + 4 * 10));
  // Recurrence NONE: the layer router's projections and gates and the one shared cell.
  JobSpec none = Spec("configs/tiny_test.pbtxt", {"model.router.recurrence=NONE"});
  EXPECT_EQ(CountSpecParameters(none.model()).total, 68480);
}

TEST(PlanCounts, Scale15bIsFifteenBillionTotalAndTwoPointSevenActive) {
  const JobSpec spec = Spec("configs/scale_15b.pbtxt");
  const SpecParameterCounts counts = CountSpecParameters(spec.model());
  EXPECT_NEAR(counts.total / 1e9, 15.0, 0.25);
  EXPECT_NEAR(counts.active / 1e9, 2.7, 0.1);
}

// ---------------------------------------------------------------- memory

TEST(PlanMemory, ResidentTensorsAndAttentionActivationsByHand) {
  JobSpec spec = Spec("configs/tiny_test.pbtxt", {"model.router.kind=LINEAR"});
  const double total = CountSpecParameters(spec.model()).total;
  const MemoryEstimate m = EstimateTrainingMemory(spec);
  EXPECT_EQ(m.parameters, 4 * total);
  EXPECT_EQ(m.gradients, 4 * total);
  EXPECT_EQ(m.optimizer, 8 * total);
  EXPECT_EQ(m.weight_copies, 0);
  EXPECT_EQ(m.alltoall_buffers, 0);
  EXPECT_EQ(m.communication_buffers, 0);
  // Attention half per token (d 32, 2 heads, fp32): norm inputs and 1/rms 2 (d + 1), the
  // normed input d, q/k/v 3 d, output d, one log-sum-exp per head.
  const ActivationProfile a = ProfileActivations(spec);
  EXPECT_EQ(a.attention_block, 4 * (2 * 33 + 32 + 96 + 32 + 2));
  // LM head: final norm input + 1/rms, its output, logits and log-probabilities (V 256).
  EXPECT_EQ(a.head, 4 * (33 + 32 + 2 * 256));
  // MoE layer, linear router (E 4, k 2, h 64): input d, logits + probs + lse, routing 28 k
  // bytes, per routed copy row + 3 hidden + output row.
  EXPECT_EQ(a.moe_layer, 4 * 32 + 4 * (2 * 4 + 1) + 28 * 2 + 2 * 4 * (32 + 3 * 64 + 32));
  const double tokens = 16 * 64;
  EXPECT_DOUBLE_EQ(m.activations, tokens * (2 * a.attention_block + 2 * a.moe_layer + a.head));
}

TEST(PlanMemory, ExpertParallelismSplitsExpertsAndAddsAllToAllBuffers) {
  JobSpec spec = Spec("configs/tiny_test.pbtxt");
  const SpecParameterCounts counts = CountSpecParameters(spec.model());
  spec.mutable_parallel()->set_expert_parallel_size(4);
  const MemoryEstimate m = EstimateTrainingMemory(spec);
  EXPECT_EQ(m.parameters, 4 * (counts.total - counts.expert + counts.expert / 4));
  // Rows sent and received: tokens x k x d fp32 each.
  EXPECT_EQ(m.alltoall_buffers, 16 * 64 * 2 * 32 * 4 * 2.0);
  EXPECT_GT(m.communication_buffers, 0);
  // Skewed routing: the busiest rank receives more.
  EXPECT_GT(EstimateTrainingMemory(spec, {4, 1.5}).alltoall_buffers, m.alltoall_buffers);
  EXPECT_GT(EstimateTrainingMemory(spec, {4, 1.5}).activations, m.activations);
}

TEST(PlanMemory, ZeroOneDividesTheMomentsOverTheReplicasGreedily) {
  JobSpec spec = Spec("configs/quickstart.pbtxt", {"model.vocab_size=2048"});
  const double full = EstimateTrainingMemory(spec, {4, 1}).optimizer;
  spec.mutable_parallel()->set_shard_optimizer_state(true);
  double largest = 0;
  for (const SpecTensor& t : SpecParameterTensors(spec.model())) largest = std::max(largest, t.numel);
  for (int world : {2, 4, 8}) {
    const double sharded = EstimateTrainingMemory(spec, {world, 1}).optimizer;
    EXPECT_GE(sharded, full / world - 1e-6) << world;
    // Greedy leaves at most one tensor of imbalance in each of the two lists.
    EXPECT_LE(sharded, full / world + 2 * 8 * largest) << world;
  }
  // One rank: nothing to share with.
  EXPECT_EQ(EstimateTrainingMemory(spec, {1, 1}).optimizer, full);
  // Experts are divided over their replicas only: EP 8 of 8 ranks leaves them whole.
  spec.mutable_parallel()->set_expert_parallel_size(8);
  const MemoryEstimate ep8 = EstimateTrainingMemory(spec, {8, 1});
  double expert_local = 0;
  for (const SpecTensor& t : SpecParameterTensors(spec.model())) {
    if (t.expert) expert_local += t.numel / 8;
  }
  EXPECT_GE(ep8.optimizer, 8 * expert_local);
  // The default layout (world = EP) is the least divided.
  EXPECT_EQ(EstimateTrainingMemory(spec).optimizer, EstimateTrainingMemory(spec, {8, 1}).optimizer);
}

TEST(PlanMemory, ExactGreedyOwnersOnTwoRanks) {
  // Tensors in model order go to the least loaded rank (ties: the lowest rank), as
  // DistributedRuntime's BalancedOwners does, replicated tensors and expert slices each
  // over their own group (here both the two ranks). Tiny LINEAR: embedding 8192, norms 32,
  // qkv 3072, out 1024, gate 128, experts 3 x 8192 per layer.
  JobSpec spec = Spec("configs/tiny_test.pbtxt", {"model.router.kind=LINEAR"});
  spec.mutable_parallel()->set_shard_optimizer_state(true);
  // Replicated, in order: emb 8192 -> r0; norm 32 -> r1; qkv 3072 -> r1 (3104); out 1024
  // -> r1 (4128); norm 32 -> r1 (4160); gate 128 -> r1 (4288); layer 1: norm -> r1 (4320),
  // qkv -> r1 (7392), out -> r1 (8416); norm -> r0 (8224); gate -> r0 (8352); final norm
  // -> r0 (8384). Experts: 6 x 8192 alternate, 24576 each.
  const double rank0 = 8384 + 24576, rank1 = 8416 + 24576;
  EXPECT_EQ(EstimateTrainingMemory(spec, {2, 1}).optimizer, 8 * std::max(rank0, rank1));
}

TEST(PlanMemory, RecomputeKeepsLessAndRecomputesOneLayer) {
  JobSpec spec = Spec("configs/quickstart.pbtxt", {"model.vocab_size=2048"});
  const MemoryEstimate none = EstimateTrainingMemory(spec);
  spec.mutable_runtime()->set_recompute(RuntimeSpec::MOE);
  const MemoryEstimate moe = EstimateTrainingMemory(spec);
  spec.mutable_runtime()->set_recompute(RuntimeSpec::FULL);
  const MemoryEstimate full = EstimateTrainingMemory(spec);
  EXPECT_LT(moe.activations, none.activations);
  EXPECT_LT(full.activations, moe.activations);
  EXPECT_GT(moe.workspace, none.workspace);
  EXPECT_GT(full.workspace, moe.workspace);
  EXPECT_LT(moe.total(), none.total());
  EXPECT_LT(full.total(), moe.total());
  // What MOE drops is every MoE layer's activations but its input and router state.
  const ActivationProfile a = ProfileActivations(spec);
  const double tokens = 16.0 * 128;
  EXPECT_NEAR(none.activations - moe.activations, tokens * 4 * (a.moe_layer - a.moe_input),
              1e-6 * none.activations);
  // Parameters and optimizer state do not change.
  EXPECT_EQ(full.parameters + full.optimizer, none.parameters + none.optimizer);
}

TEST(PlanMemory, Bf16AddsWeightCopiesOfTheProductsOnly) {
  JobSpec spec = Spec("configs/tiny_test.pbtxt", {"runtime.precision=BF16"});
  double matmul = 0;
  for (const SpecTensor& t : SpecParameterTensors(spec.model())) {
    if (t.matmul) matmul += t.numel;
  }
  EXPECT_EQ(EstimateTrainingMemory(spec).weight_copies, 2 * matmul);
  EXPECT_LT(matmul, CountSpecParameters(spec.model()).total);  // not the embedding or routers
}

// ---------------------------------------------------------------- layouts

TEST(PlanLayouts, EveryDivisorOfExpertsAndRanks) {
  auto layouts = EnumerateLayouts(8, 8, 8);
  ASSERT_TRUE(layouts.ok());
  std::vector<int> eps;
  for (const Layout& l : *layouts) {
    eps.push_back(l.ep);
    EXPECT_EQ(l.ep * l.dp, 8);
    EXPECT_FALSE(l.world_spans_nodes);
  }
  EXPECT_THAT(eps, ::testing::ElementsAre(1, 2, 4, 8));
  auto six = EnumerateLayouts(6, 4, 8);
  ASSERT_TRUE(six.ok());
  ASSERT_EQ(six->size(), 2u);  // EP 1 and 2: 4 does not divide 6
  EXPECT_EQ((*six)[1].ep, 2);
  EXPECT_EQ((*six)[1].ranks_per_node, 4);
  auto big = EnumerateLayouts(64, 64, 8);
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(big->size(), 7u);
  for (const Layout& l : *big) {
    EXPECT_EQ(l.nodes, 8);
    EXPECT_TRUE(l.world_spans_nodes);
    EXPECT_EQ(l.ep_spans_nodes, l.ep > 8);
  }
}

TEST(PlanLayouts, ImpossibleInputIsRefused) {
  EXPECT_THAT(Msg(EnumerateLayouts(8, 12, 8).status()), HasSubstr("do not fill whole nodes of 8"));
  EXPECT_FALSE(EnumerateLayouts(8, 0, 8).ok());
  EXPECT_FALSE(EnumerateLayouts(8, 8, 0).ok());
}

// ---------------------------------------------------------------- collectives

TEST(PlanCollectives, AlphaBetaByHand) {
  LinkSpec intra, inter;
  intra.set_bandwidth_bytes_per_s(1e11);
  intra.set_latency_s(1e-5);
  inter.set_bandwidth_bytes_per_s(1e10);
  inter.set_latency_s(2e-5);
  // Ring within a node: 2 (p - 1) latencies + 2 (p - 1) / p of the bytes.
  EXPECT_NEAR(RingAllReduceSeconds(1e9, 8, 8, intra, inter, 1e10), 14 * 1e-5 + 1.75e9 / 1e11, 1e-12);
  // Two buckets: latencies twice.
  EXPECT_NEAR(RingAllReduceSeconds(1e9, 8, 8, intra, inter, 6e8), 28 * 1e-5 + 1.75e9 / 1e11, 1e-12);
  // Over 2 nodes of 8: 14 intra + 2 inter latency steps, at the node's 8 network links
  // together (8 x 1e10, below the intra-node 1e11).
  EXPECT_NEAR(RingAllReduceSeconds(1e9, 16, 8, intra, inter, 1e10),
              14 * 1e-5 + 2 * 2e-5 + 2.0 * 15 / 16 * 1e9 / 8e10, 1e-12);
  EXPECT_EQ(AllReduceBusBandwidth(16, 8, intra, inter), 8e10);
  EXPECT_EQ(AllReduceBusBandwidth(16, 1, intra, inter), 1e10);  // one device per node
  EXPECT_EQ(AllReduceBusBandwidth(32, 16, intra, inter), 1e11);  // capped by the node's link
  EXPECT_EQ(AllReduceBusBandwidth(8, 8, intra, inter), 1e11);
  EXPECT_EQ(RingAllReduceSeconds(1e9, 1, 8, intra, inter, 1e10), 0);
  // The charged all-reduce: the tree's 2 log2 p latency steps where they are fewer. Over
  // 4096 ranks in nodes of 8, one bucket: ring 14 intra + 1022 inter steps, tree 24 inter.
  const double bandwidth = 2.0 * 4095 / 4096 * 1e9 / 8e10;
  EXPECT_NEAR(RingAllReduceSeconds(1e9, 4096, 8, intra, inter, 1e10), 14e-5 + 1022 * 2e-5 + bandwidth, 1e-12);
  EXPECT_NEAR(AllReduceSeconds(1e9, 4096, 8, intra, inter, 1e10), 24 * 2e-5 + bandwidth, 1e-12);
  // Within a node of 2 the ring's 2 steps beat the tree's 2 (a tie) and stay.
  EXPECT_NEAR(AllReduceSeconds(1e6, 2, 8, intra, inter, 1e10), RingAllReduceSeconds(1e6, 2, 8, intra, inter, 1e10),
              1e-15);
  // nccl-tests' bus bandwidth factors.
  EXPECT_DOUBLE_EQ(BusBandwidthFactor(true, 4), 1.5);
  EXPECT_DOUBLE_EQ(BusBandwidthFactor(false, 4), 0.75);
  EXPECT_DOUBLE_EQ(BusBandwidthFactor(true, 1), 1);
  // The argument agreement of an MPI communicator: ceil(log2 p) latencies of the slowest
  // link, only where the profile says its collectives agree on their arguments.
  HardwareProfile hw;
  *hw.mutable_intra_node() = intra;
  *hw.mutable_inter_node() = inter;
  EXPECT_EQ(AgreementSeconds(hw, 16, 8), 0);
  hw.set_collectives_agree_arguments(true);
  EXPECT_NEAR(AgreementSeconds(hw, 16, 8), 4 * 2e-5, 1e-15);
  EXPECT_NEAR(AgreementSeconds(hw, 8, 8), 3 * 1e-5, 1e-15);
  EXPECT_EQ(AgreementSeconds(hw, 1, 8), 0);
  // All-to-all of 8 MB over 16 ranks on 2 nodes: 7/16 in the node, 8/16 over the network.
  EXPECT_NEAR(AllToAllSeconds(8e6, 16, 8, intra, inter), 15 * 2e-5 + std::max(3.5e6 / 1e11, 4e6 / 1e10),
              1e-12);
  // Within a node: 7/8 of it over the intra-node link.
  EXPECT_NEAR(AllToAllSeconds(8e6, 8, 8, intra, inter), 7 * 1e-5 + 7e6 / 1e11, 1e-12);
  EXPECT_NEAR(BroadcastSeconds(1e6, 8, inter), 3 * 2e-5 + 1e6 / 1e10, 1e-12);
  EXPECT_EQ(BroadcastSeconds(1e6, 1, inter), 0);
}

// ---------------------------------------------------------------- routing statistics

TEST(PlanRouting, SkewFromCountsOrFromTheCv) {
  RoutingLoads loads;
  loads.tokens_per_expert = {{30, 10, 10, 10}, {10, 10, 10, 10}};
  EXPECT_DOUBLE_EQ(RoutingSkew(loads, 4, 1), 1);
  // EP 2: slices of 40 and 20 (mean 30) and 20 and 20.
  EXPECT_DOUBLE_EQ(RoutingSkew(loads, 4, 2), (40.0 / 30 + 1) / 2);
  EXPECT_DOUBLE_EQ(RoutingSkew(loads, 4, 4), (30.0 / 15 + 1) / 2);
  RoutingLoads cv_only;
  cv_only.load_cv = {0.5};
  EXPECT_NEAR(RoutingSkew(cv_only, 16, 4), 1 + 0.5 / 2 * std::sqrt(2 * std::log(4.0)), 1e-12);
}

TEST(PlanRouting, ReadsMetricsJsonl) {
  const std::string path = TempPath("metrics.jsonl");
  WriteText(path,
            "{\"type\":\"config\"}\n"
            "{\"type\":\"train\",\"step\":10,\"moe\":[{\"layer\":0,\"tokens_per_expert\":[3,1],\"load_cv\":0.5}]}\n"
            "{\"type\":\"train\",\"step\":20,\"moe\":[{\"layer\":0,\"tokens_per_expert\":[5,3],\"load_cv\":0.25}]}\n");
  auto loads = ReadRoutingLoads(path);
  ASSERT_TRUE(loads.ok()) << loads.status();
  EXPECT_EQ(loads->records, 2);
  ASSERT_EQ(loads->tokens_per_expert.size(), 1u);
  EXPECT_THAT(loads->tokens_per_expert[0], ::testing::ElementsAre(4, 2));
  EXPECT_DOUBLE_EQ(loads->load_cv[0], 0.375);
  WriteText(path, "{\"type\":\"eval\"}\n");
  EXPECT_THAT(Msg(ReadRoutingLoads(path).status()), HasSubstr("no training record"));
  std::filesystem::remove(path);
  EXPECT_FALSE(ReadRoutingLoads(path).ok());
}

// ---------------------------------------------------------------- step time

TEST(PlanStep, EachOptionCostsWhatItShould) {
  const HardwareProfile hw = H100();
  JobSpec spec = Spec("configs/rmoe_seed.pbtxt");
  auto layouts = EnumerateLayouts(8, 8, 8);
  ASSERT_TRUE(layouts.ok());
  const Layout dp8 = (*layouts)[0], ep8 = (*layouts)[3];
  const StepEstimate none = EstimateStep(spec, dp8, hw, 1);
  EXPECT_EQ(none.alltoall_s, 0);  // no expert parallelism
  EXPECT_GT(none.allreduce_s, 0);
  EXPECT_EQ(none.broadcast_s, 0);
  // Forward 2 FLOPs per matmul parameter per token, backward 4: the experts' share.
  const double tokens = 8 * 2048;
  double experts = 0;
  for (const auto& [name, flops] : none.flops_parts) {
    if (name == "experts") experts = flops;
  }
  EXPECT_DOUBLE_EQ(experts, 12 * 2 * 6.0 * 768 * 3072 * tokens * 3);

  JobSpec with_ep = spec;
  with_ep.mutable_parallel()->set_expert_parallel_size(8);
  const StepEstimate ep = EstimateStep(with_ep, ep8, hw, 1);
  EXPECT_GT(ep.alltoall_s, 0);
  EXPECT_LT(ep.allreduce_s, none.allreduce_s);  // expert gradients are not all-reduced
  EXPECT_GT(EstimateStep(with_ep, ep8, hw, 1.5).step_s, ep.step_s);  // skew

  JobSpec zero = spec;
  zero.mutable_parallel()->set_shard_optimizer_state(true);
  EXPECT_GT(EstimateStep(zero, dp8, hw, 1).broadcast_s, 0);

  JobSpec moe = spec;
  moe.mutable_runtime()->set_recompute(RuntimeSpec::MOE);
  JobSpec full = spec;
  full.mutable_runtime()->set_recompute(RuntimeSpec::FULL);
  const StepEstimate m = EstimateStep(moe, dp8, hw, 1), f = EstimateStep(full, dp8, hw, 1);
  // MOE runs the MoE layers' forward once more: a third of their forward + backward.
  double moe_parts_none = 0;
  for (const auto& [name, flops] : none.flops_parts) {
    if (name == "experts" || name == "shared expert" || name == "router") moe_parts_none += flops;
  }
  EXPECT_NEAR(m.matmul_flops - none.matmul_flops, moe_parts_none / 3, 1e-6 * none.matmul_flops);
  EXPECT_GT(f.matmul_flops, m.matmul_flops);
  EXPECT_GT(f.step_s, m.step_s);
  EXPECT_GT(m.step_s, none.step_s);
}

TEST(PlanStep, WaitingInCollectivesByHand) {
  HardwareProfile hw = H100();
  hw.set_collective_wait_fraction(0.1);
  hw.set_collective_sync_s(1e-3);
  JobSpec spec = Spec("configs/rmoe_seed.pbtxt", {"parallel.expert_parallel_size=2"});
  auto layouts = EnumerateLayouts(8, 2, 8);
  ASSERT_TRUE(layouts.ok());
  const StepEstimate s = EstimateStep(spec, (*layouts)[1], hw, 1);
  // 12 MoE layers x (count exchange + 4 row all-to-alls), 3 small all-reduces, the
  // replicated gradients' 16 MiB buckets; no expert replicas (DP 1).
  double replicated = 0;
  for (const SpecTensor& t : SpecParameterTensors(spec.model())) {
    if (!t.expert) replicated += t.numel;
  }
  const double buckets = std::ceil(4 * replicated / (16 << 20));
  EXPECT_EQ(s.collectives, 12 * 5 + 3 + buckets);
  EXPECT_NEAR(s.wait_s, 0.1 * s.compute_s + s.collectives * 1e-3, 1e-12);
  EXPECT_NEAR(s.step_s, s.compute_s + s.alltoall_s + s.allreduce_s + s.broadcast_s + s.wait_s, 1e-12);
  // One rank waits for nobody.
  JobSpec alone = Spec("configs/rmoe_seed.pbtxt");
  auto one = EnumerateLayouts(8, 1, 8);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(EstimateStep(alone, (*one)[0], hw, 1).wait_s, 0);
}

TEST(PlanStep, CpuRanksShareTheCores) {
  HardwareProfile cpu = H100();
  cpu.set_ranks_share_node(true);
  cpu.set_devices_per_node(2);
  cpu.set_thread_scaling(0.5);
  cpu.set_op_overhead_s(0);
  cpu.set_memory_bandwidth_bytes_per_s(1e30);
  JobSpec spec = Spec("configs/tiny_test.pbtxt");
  Layout l;
  l.ranks_per_node = 1;
  const double single = spec.model().d_model() > 0 ? EstimateStep(spec, l, [&] {
    HardwareProfile one = cpu;
    one.set_devices_per_node(1);
    return one;
  }(), 1).compute_s : 0;
  // One rank on 2 cores: 1 + 0.5 cores' worth; 4 ranks on 2 cores: half a core each.
  EXPECT_NEAR(EstimateStep(spec, l, cpu, 1).compute_s, single / 1.5, 1e-12);
  l.ranks_per_node = 4;
  l.world = 4;
  l.dp = 4;
  EXPECT_NEAR(EstimateStep(spec, l, cpu, 1).compute_s, single * 2, 1e-12);
}

TEST(PlanStep, RecommendsTheFastestThatFits) {
  HardwareProfile hw = H100();
  JobSpec spec = Spec("configs/rmoe_seed.pbtxt");
  PlanOptions options;
  options.world = 8;
  auto rows = Plan(spec, hw, options);
  ASSERT_TRUE(rows.ok());
  EXPECT_EQ(rows->size(), 4u * 6u);  // 4 layouts x 3 recompute modes x ZeRO-1 off/on
  const int best = Recommend(*rows);
  ASSERT_GE(best, 0);
  for (const PlanRow& r : *rows) {
    if (r.fits) EXPECT_GE(r.step.step_s, (*rows)[best].step.step_s);
  }
  hw.set_memory_bytes(1e9);
  rows = Plan(spec, hw, options);
  ASSERT_TRUE(rows.ok());
  EXPECT_EQ(Recommend(*rows), -1);
  options.world = 12;
  EXPECT_FALSE(Plan(spec, hw, options).ok());
}

// ---------------------------------------------------------------- profiles

TEST(PlanProfiles, ShippedProfilesParse) {
  for (const char* name : {"h100_sxm", "h200_sxm", "this_cpu"}) {
    auto p = LoadHardwareProfile(absl::StrCat(RMOE_SOURCE_DIR, "/configs/hardware/", name, ".pbtxt"));
    EXPECT_TRUE(p.ok()) << name << ": " << p.status();
  }
  EXPECT_EQ(H100().peak_flops_bf16(), 989e12);
}

TEST(PlanProfiles, ErrorsNameTheProblem) {
  auto missing = LoadHardwareProfile("/nonexistent/profile.pbtxt");
  EXPECT_FALSE(missing.ok());
  EXPECT_THAT(Msg(missing.status()), HasSubstr("/nonexistent/profile.pbtxt"));
  auto malformed = ParseHardwareProfile("peak_flops_fp32: [1\n", "bad.pbtxt");
  EXPECT_THAT(Msg(malformed.status()), HasSubstr("bad.pbtxt is not a valid hardware profile"));
  EXPECT_THAT(Msg(malformed.status()), HasSubstr("line 1"));
  auto unknown = ParseHardwareProfile("peak_flops: 1\n", "u.pbtxt");
  EXPECT_THAT(Msg(unknown.status()), HasSubstr("peak_flops"));
  auto incomplete = ParseHardwareProfile("peak_flops_fp32: 1e12 matmul_efficiency: 1.5\n", "i.pbtxt");
  EXPECT_THAT(Msg(incomplete.status()), HasSubstr("matmul_efficiency = 1.5 must be in (0, 1]"));
  EXPECT_THAT(Msg(incomplete.status()), HasSubstr("memory_bytes is required"));
  EXPECT_THAT(Msg(incomplete.status()), HasSubstr("intra_node"));
  HardwareProfile round_trip = H100();
  auto reparsed = ParseHardwareProfile(HardwareProfileToText(round_trip), "round trip");
  ASSERT_TRUE(reparsed.ok());
  EXPECT_EQ(reparsed->SerializeAsString(), round_trip.SerializeAsString());
}

// ---------------------------------------------------------------- calibration

// rmoe_bench-like JSON of a one-rank step whose computation time is what `truth` predicts.
std::string StepJson(const std::string& overrides, HardwareProfile truth, double rss_extra, int threads = 1) {
  const std::vector<std::string> sets = absl::StrSplit(overrides, ' ', absl::SkipEmpty());
  JobSpec spec = Spec("configs/tiny_test.pbtxt", sets);
  Layout one;
  one.ranks_per_node = 1;
  truth.set_devices_per_node(threads);
  const double compute = EstimateStep(spec, one, truth, 1).compute_s;
  JsonObject result;
  result.Add("job", std::string(RMOE_SOURCE_DIR) + "/configs/tiny_test.pbtxt")
      .Add("overrides", overrides)
      .Add("ranks", int64_t{1})
      .Add("expert_parallel_size", int64_t{1})
      .Add("vocab_size", int64_t{256})
      .Add("compute_s", compute)
      .Add("peak_rss_bytes", EstimateTrainingMemory(spec, {1, 1}).total() + rss_extra);
  return JsonObject()
      .Add("benchmark", std::string("step"))
      .AddRaw("context", JsonObject().Add("threads_per_rank", int64_t{threads}).Add("cores", int64_t{2})
                             .Add("local_size", int64_t{1}).Add("world_size", int64_t{1}).str())
      .AddRaw("result", result.str())
      .str();
}

TEST(PlanCalibrate, RecoversAKnownProfile) {
  HardwareProfile truth;
  truth.set_peak_flops_fp32(100e9);
  truth.set_peak_flops_bf16(100e9);
  truth.set_matmul_efficiency(0.5);
  truth.set_memory_bandwidth_bytes_per_s(10e9);
  truth.set_op_overhead_s(20e-6);
  truth.set_thread_scaling(0.6);
  truth.set_devices_per_node(1);
  truth.set_ranks_share_node(true);
  truth.set_memory_bytes(1e9);
  std::vector<std::string> paths;
  auto write = [&](const std::string& name, const std::string& text) {
    paths.push_back(TempPath(name));
    WriteText(paths.back(), text);
  };
  write("matmul.json",
        R"({"benchmark":"matmul","context":{"threads_per_rank":1,"cores":1},"result":{"matmul":[{"dtype":"fp32","n":256,"gflops_per_s":80},{"dtype":"fp32","n":512,"gflops_per_s":100}]}})");
  // Round trips of 2 ranks: per all-to-all 1e-5 s + remote bytes / 1e9.
  for (double remote : {4e5, 4e6}) {
    write(absl::StrCat("a2a", remote, ".json"),
          absl::StrCat(R"({"benchmark":"alltoall","context":{"world_size":2,"cores":1},"result":{"remote_bytes_per_rank":)",
                       remote, R"(,"exchange":[{"variant":"raw-tokens","median_s":)",
                       2 * (1e-5 + remote / 4 / 1e9), "}]}}"));
  }
  write("s1.json", StepJson("", truth, 3e8));
  write("s2.json", StepJson("model.d_model=128 model.num_heads=4 model.moe.expert_hidden_dim=512", truth, 3e8));
  write("s3.json", StepJson("schedule.micro_batch_size=2 schedule.seq_len=16 model.num_layers=6", truth, 3e8));
  write("s4.json", StepJson("model.d_model=128 model.num_heads=4", truth, 3e8, /*threads=*/2));
  auto profile = Calibrate(paths, HardwareProfile());
  ASSERT_TRUE(profile.ok()) << profile.status();
  EXPECT_DOUBLE_EQ(profile->peak_flops_fp32(), 100e9);
  EXPECT_NEAR(profile->matmul_efficiency(), 0.5, 1e-6);
  EXPECT_NEAR(profile->memory_bandwidth_bytes_per_s(), 10e9, 1e3);
  EXPECT_NEAR(profile->op_overhead_s(), 20e-6, 1e-12);
  EXPECT_NEAR(profile->intra_node().bandwidth_bytes_per_s(), 1e9, 1);
  EXPECT_NEAR(profile->intra_node().latency_s(), 1e-5, 1e-12);
  EXPECT_NEAR(profile->runtime_overhead_bytes(), 3e8, 1);
  EXPECT_TRUE(profile->ranks_share_node());
  EXPECT_NEAR(profile->thread_scaling(), 0.6, 1e-9);
  EXPECT_EQ(profile->devices_per_node(), 2);
  // Too little to fit: one step run.
  auto short_of_steps = Calibrate({paths[0], paths[1], paths[2], paths[3], paths[6]}, HardwareProfile());
  EXPECT_THAT(Msg(short_of_steps.status()), HasSubstr("at least two"));
  WriteText(paths[0], "not json");
  EXPECT_THAT(Msg(Calibrate(paths, HardwareProfile()).status()), HasSubstr("is not JSON"));
  for (const auto& p : paths) std::filesystem::remove(p);
}

}  // namespace
}  // namespace rmoe::plan
