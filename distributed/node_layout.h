// Which ranks share a node, and where the expert-parallel groups go. Pure (no MPI, no
// torch), so that tests can lay out made-up clusters; MpiRuntime discovers the real one.
#pragma once

#include <string>
#include <vector>

namespace rmoe::distributed {

struct NodeLayout {
  // The node of each rank, nodes numbered 0, 1, ... in the order of their lowest rank.
  std::vector<int> node_of_rank;
  // The host name of each node (its lowest rank's MPI_Get_processor_name).
  std::vector<std::string> node_names;

  // One node holding `ranks` ranks.
  static NodeLayout SingleNode(int ranks, std::string host = "localhost");
  // From any per-rank node key (e.g. each rank's node leader): renumbered as above.
  static NodeLayout FromNodeKeys(const std::vector<int>& key_of_rank,
                                 const std::vector<std::string>& host_of_rank);

  int ranks() const { return static_cast<int>(node_of_rank.size()); }
  int nodes() const { return static_cast<int>(node_names.size()); }
  // The host name of a rank; "?" outside the layout.
  const std::string& HostOf(int rank) const;
  // The ranks on `node`, ascending.
  std::vector<int> RanksOn(int node) const;
};

// The ranks node by node (on each node by rank). The expert-parallel groups are consecutive
// runs of this order, so a group stays inside a node whenever its size divides the node's
// ranks, however the launcher numbered them (by slot or round-robin over nodes).
std::vector<int> PlacementOrder(const NodeLayout& layout);

// The expert-parallel groups of `group_size` ranks (each ascending in placement order):
// group g is PlacementOrder()[g * group_size, (g + 1) * group_size).
std::vector<std::vector<int>> ExpertParallelGroups(const NodeLayout& layout, int group_size);

// "0-3, 6, 8-9": a set of ranks, ascending, as ranges.
std::string RankRanges(std::vector<int> ranks);
// "rank 3" or "ranks 0-3, 6": RankRanges with its noun.
std::string RankList(const std::vector<int>& ranks);

// The run header's lines: the ranks of each node and, with several ranks, the nodes of each
// expert-parallel group, e.g.
//   layout: 4 ranks on 2 nodes: node1 ranks 0-1, node2 ranks 2-3
//   layout: 2 expert-parallel groups of 2: group 0 ranks 0-1 on node1, group 1 ranks 2-3 on node2
std::vector<std::string> DescribeLayout(const NodeLayout& layout, int expert_parallel_size);

// A warning when an expert-parallel group spans nodes (its all-to-all, the heaviest traffic
// of a step, then crosses the network: NVLink vs the network on GPUs); empty otherwise.
std::string ExpertGroupsSpanNodesWarning(const NodeLayout& layout, int expert_parallel_size);

}  // namespace rmoe::distributed
