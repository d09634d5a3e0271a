#include "distributed/node_layout.h"

#include <algorithm>
#include <map>
#include <set>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>

namespace rmoe::distributed {

NodeLayout NodeLayout::SingleNode(int ranks, std::string host) {
  NodeLayout layout;
  layout.node_of_rank.assign(std::max(ranks, 0), 0);
  layout.node_names.push_back(std::move(host));
  return layout;
}

NodeLayout NodeLayout::FromNodeKeys(const std::vector<int>& key_of_rank,
                                    const std::vector<std::string>& host_of_rank) {
  NodeLayout layout;
  std::map<int, int> node_of_key;  // in the order each key first appears, i.e. by lowest rank
  for (size_t rank = 0; rank < key_of_rank.size(); ++rank) {
    auto [it, inserted] = node_of_key.emplace(key_of_rank[rank], static_cast<int>(node_of_key.size()));
    if (inserted) layout.node_names.push_back(rank < host_of_rank.size() ? host_of_rank[rank] : "?");
    layout.node_of_rank.push_back(it->second);
  }
  return layout;
}

const std::string& NodeLayout::HostOf(int rank) const {
  static const std::string unknown = "?";
  if (rank < 0 || rank >= ranks()) return unknown;
  return node_names[node_of_rank[rank]];
}

std::vector<int> NodeLayout::RanksOn(int node) const {
  std::vector<int> ranks;
  for (int rank = 0; rank < this->ranks(); ++rank) {
    if (node_of_rank[rank] == node) ranks.push_back(rank);
  }
  return ranks;
}

std::vector<int> PlacementOrder(const NodeLayout& layout) {
  std::vector<int> order(layout.ranks());
  for (int rank = 0; rank < layout.ranks(); ++rank) order[rank] = rank;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return layout.node_of_rank[a] < layout.node_of_rank[b];
  });
  return order;
}

std::vector<std::vector<int>> ExpertParallelGroups(const NodeLayout& layout, int group_size) {
  std::vector<std::vector<int>> groups;
  if (group_size < 1) return groups;
  const std::vector<int> order = PlacementOrder(layout);
  for (size_t begin = 0; begin < order.size(); begin += group_size) {
    const size_t end = std::min(order.size(), begin + group_size);
    std::vector<int> group(order.begin() + begin, order.begin() + end);
    std::sort(group.begin(), group.end());
    groups.push_back(std::move(group));
  }
  return groups;
}

std::string RankRanges(std::vector<int> ranks) {
  std::sort(ranks.begin(), ranks.end());
  std::vector<std::string> parts;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    parts.push_back(j == i ? absl::StrCat(ranks[i]) : absl::StrCat(ranks[i], "-", ranks[j]));
    i = j + 1;
  }
  return absl::StrJoin(parts, ", ");
}

std::string RankList(const std::vector<int>& ranks) {
  return absl::StrCat(ranks.size() == 1 ? "rank " : "ranks ", RankRanges(ranks));
}

namespace {

// The names of the nodes `ranks` are on, in node order.
std::vector<std::string> NodesOf(const NodeLayout& layout, const std::vector<int>& ranks) {
  std::set<int> nodes;
  for (int rank : ranks) nodes.insert(layout.node_of_rank[rank]);
  std::vector<std::string> names;
  for (int node : nodes) names.push_back(layout.node_names[node]);
  return names;
}

}  // namespace

std::vector<std::string> DescribeLayout(const NodeLayout& layout, int expert_parallel_size) {
  std::vector<std::string> nodes;
  for (int node = 0; node < layout.nodes(); ++node) {
    nodes.push_back(absl::StrCat(layout.node_names[node], " ", RankList(layout.RanksOn(node))));
  }
  std::vector<std::string> lines = {absl::StrCat(
      "layout: ", layout.ranks(), layout.ranks() == 1 ? " rank" : " ranks", " on ", layout.nodes(),
      layout.nodes() == 1 ? " node: " : " nodes: ", absl::StrJoin(nodes, ", "))};
  if (expert_parallel_size > 1) {
    const auto groups = ExpertParallelGroups(layout, expert_parallel_size);
    std::vector<std::string> described;
    for (size_t g = 0; g < groups.size(); ++g) {
      described.push_back(absl::StrCat("group ", g, " ", RankList(groups[g]), " on ",
                                       absl::StrJoin(NodesOf(layout, groups[g]), "+")));
    }
    lines.push_back(absl::StrCat("layout: ", groups.size(), " expert-parallel group",
                                 groups.size() == 1 ? "" : "s", " of ", expert_parallel_size, ": ",
                                 absl::StrJoin(described, ", ")));
  }
  return lines;
}

std::string ExpertGroupsSpanNodesWarning(const NodeLayout& layout, int expert_parallel_size) {
  if (expert_parallel_size <= 1) return "";
  const auto groups = ExpertParallelGroups(layout, expert_parallel_size);
  std::vector<std::string> spanning;
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto nodes = NodesOf(layout, groups[g]);
    if (nodes.size() > 1) spanning.push_back(absl::StrCat(g, " (", absl::StrJoin(nodes, "+"), ")"));
  }
  if (spanning.empty()) return "";
  size_t fewest = layout.ranks();
  for (int node = 0; node < layout.nodes(); ++node) fewest = std::min(fewest, layout.RanksOn(node).size());
  return absl::StrCat(
      "expert-parallel group", spanning.size() == 1 ? " " : "s ", absl::StrJoin(spanning, ", "),
      " span", spanning.size() == 1 ? "s" : "", " nodes, so every all-to-all crosses the network "
      "(on GPUs: the network instead of NVLink): parallel.expert_parallel_size = ",
      expert_parallel_size, " with ", fewest, fewest == 1 ? " rank" : " ranks",
      " on the smallest node; a size that divides "
      "every node's ranks keeps each group inside a node");
}

}  // namespace rmoe::distributed
