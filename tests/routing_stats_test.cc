// Routing analytics against hand-computed values: load and its CV, the token-weighted
// entropy, and the mutual information / predictability between consecutive MoE layers.
#include <cmath>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "rmoe/model/routing_stats.h"

namespace rmoe {
namespace {

// One MoE layer's output with the given routing ([N, k] expert indices) and mean entropy.
MoEOutput Routed(std::vector<std::vector<int64_t>> experts, double entropy) {
  MoEOutput out;
  const int64_t k = static_cast<int64_t>(experts[0].size());
  auto index = torch::empty({static_cast<int64_t>(experts.size()), k}, torch::kLong);
  for (size_t i = 0; i < experts.size(); ++i) {
    for (int64_t j = 0; j < k; ++j) index[i][j] = experts[i][j];
  }
  out.expert_index = index;
  out.router_entropy = torch::tensor(entropy, torch::kFloat);
  return out;
}

TEST(RoutingStatistics, ADeterminedNextLayerHasPredictabilityOneAndEvenLoadHasCvZero) {
  // Layer 2's top-1 expert is always (layer 1's + 1) mod 4; every expert equally loaded.
  RoutingStatistics stats({1, 3}, 4);
  std::vector<std::vector<int64_t>> first, second;
  for (int64_t token = 0; token < 8; ++token) {
    first.push_back({token % 4, (token + 2) % 4});
    second.push_back({(token + 1) % 4, (token + 3) % 4});
  }
  stats.Add({Routed(first, 1.0), Routed(second, 0.5)});
  const auto layers = stats.Layers();
  ASSERT_EQ(layers.size(), 2u);
  EXPECT_EQ(layers[0].layer, 1);
  EXPECT_EQ(layers[1].layer, 3);
  for (double load : layers[0].load) EXPECT_DOUBLE_EQ(load, 0.25);
  EXPECT_NEAR(layers[0].load_cv, 0, 1e-12);
  const auto transitions = stats.Transitions();
  ASSERT_EQ(transitions.size(), 1u);
  EXPECT_EQ(transitions[0].from_layer, 1);
  EXPECT_EQ(transitions[0].to_layer, 3);
  EXPECT_NEAR(transitions[0].mutual_information, std::log(4.0), 1e-12);
  EXPECT_NEAR(transitions[0].predictability, 1.0, 1e-12);
  EXPECT_EQ(transitions[0].top1_counts[0 * 4 + 1], 2);  // 2 tokens went 0 -> 1
  EXPECT_EQ(transitions[0].top1_counts[0 * 4 + 0], 0);
}

TEST(RoutingStatistics, IndependentChoicesHaveNoMutualInformation) {
  RoutingStatistics stats({0, 1}, 4);
  std::vector<std::vector<int64_t>> first, second;
  for (int64_t a = 0; a < 4; ++a) {
    for (int64_t b = 0; b < 4; ++b) {
      first.push_back({a});
      second.push_back({b});
    }
  }
  stats.Add({Routed(first, 1.0), Routed(second, 1.0)});
  EXPECT_NEAR(stats.Transitions()[0].mutual_information, 0, 1e-12);
  EXPECT_NEAR(stats.Transitions()[0].predictability, 0, 1e-12);
}

TEST(RoutingStatistics, MatchesHandComputedValuesAcrossPasses) {
  // Top-1 pairs (0,0) (0,0) (1,0) (1,1): p(a) = (1/2, 1/2), p(b) = (3/4, 1/4).
  RoutingStatistics stats({0, 1}, 2);
  stats.Add({Routed({{0, 1}, {0, 1}, {1, 0}}, 0.6), Routed({{0, 1}, {0, 1}, {0, 1}}, 0.2)});
  stats.Add({Routed({{1, 1}}, 0.2), Routed({{1, 1}}, 0.6)});
  const double mi = 0.5 * std::log(0.5 / (0.5 * 0.75)) + 0.25 * std::log(0.25 / (0.5 * 0.75)) +
                    0.25 * std::log(0.25 / (0.5 * 0.25));
  const double h_next = -(0.75 * std::log(0.75) + 0.25 * std::log(0.25));
  EXPECT_NEAR(stats.Transitions()[0].mutual_information, mi, 1e-12);
  EXPECT_NEAR(stats.Transitions()[0].predictability, mi / h_next, 1e-12);
  // Layer 0 assignments over both top-k columns: expert 0 three times, expert 1 five.
  const auto layers = stats.Layers();
  EXPECT_DOUBLE_EQ(layers[0].load[0], 3.0 / 8);
  EXPECT_DOUBLE_EQ(layers[0].load[1], 5.0 / 8);
  EXPECT_NEAR(layers[0].load_cv, 0.25, 1e-12);  // std 1/8 over mean 1/2
  // Entropy is weighted by tokens: (3 * 0.6 + 1 * 0.2) / 4.
  EXPECT_NEAR(layers[0].entropy, 0.5, 1e-7);
  EXPECT_NEAR(layers[1].entropy, 0.3, 1e-7);
  EXPECT_EQ(stats.tokens(), 4);
}

TEST(RoutingStatistics, SummedFlatCountsEqualTheStatisticsOfAllTokens) {
  // What Evaluate does across ranks: each rank counts its own tokens, the counts are summed.
  auto a = std::vector<MoEOutput>{Routed({{0}, {1}, {2}}, 0.4), Routed({{1}, {1}, {0}}, 0.1)};
  auto b = std::vector<MoEOutput>{Routed({{2}, {2}}, 0.9), Routed({{2}, {0}}, 0.3)};
  RoutingStatistics rank0({0, 1}, 3), rank1({0, 1}, 3), together({0, 1}, 3);
  rank0.Add(a);
  rank1.Add(b);
  together.Add(a);
  together.Add(b);
  rank0.Unflatten(rank0.Flatten() + rank1.Flatten());
  EXPECT_EQ(rank0.ToJson(), together.ToJson());
  EXPECT_THROW(rank0.Unflatten(torch::zeros({3}, torch::kDouble)), c10::Error);
}

TEST(RoutingStatistics, RefusesAPassWithTheWrongNumberOfLayers) {
  RoutingStatistics stats({0, 1}, 2);
  EXPECT_THROW(stats.Add({Routed({{0}}, 0.1)}), c10::Error);
}

}  // namespace
}  // namespace rmoe
