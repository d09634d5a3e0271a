#include "distributed/stall_report.h"

#include <algorithm>
#include <map>
#include <sstream>
#include <tuple>

namespace rmoe::distributed {
namespace {

// "rank 2" or "ranks 2, 3" (in the order given).
std::string Ranks(const std::vector<int>& ranks, const char* singular = "rank",
                  const char* plural = "ranks") {
  std::ostringstream out;
  out << (ranks.size() == 1 ? singular : plural) << ' ';
  for (size_t i = 0; i < ranks.size(); ++i) out << (i > 0 ? ", " : "") << ranks[i];
  return out.str();
}

// "world rank 1 on node2" or "world ranks 1, 3 on node2, world rank 5 on node3": the silent
// peers by host, in rank order ("world ranks 1, 3" when the hosts are unknown).
std::string WorldRanksByHost(const std::vector<PeerAnswer>& silent) {
  std::vector<std::string> hosts;
  std::map<std::string, std::vector<int>> ranks_on;
  for (const PeerAnswer& peer : silent) {
    if (!ranks_on.count(peer.host)) hosts.push_back(peer.host);
    ranks_on[peer.host].push_back(peer.world_rank);
  }
  std::ostringstream out;
  for (size_t i = 0; i < hosts.size(); ++i) {
    out << (i > 0 ? ", " : "") << Ranks(ranks_on[hosts[i]], "world rank", "world ranks");
    if (!hosts[i].empty()) out << " on " << hosts[i];
  }
  return out.str();
}

std::string Verb(const std::vector<int>& ranks) { return ranks.size() == 1 ? " is" : " are"; }

// Where answering peers wait, other than in the stalled collective itself.
struct Elsewhere {
  bool same_communicator;
  std::string operation;
  int64_t sequence;
  bool operator<(const Elsewhere& o) const {
    return std::tie(same_communicator, operation, sequence) <
           std::tie(o.same_communicator, o.operation, o.sequence);
  }
};

}  // namespace

std::string DescribeStalledCollective(const StalledCollective& stalled,
                                      const std::vector<PeerAnswer>& peers) {
  std::vector<PeerAnswer> sorted = peers;
  std::sort(sorted.begin(), sorted.end(),
            [](const PeerAnswer& a, const PeerAnswer& b) { return a.rank < b.rank; });
  std::vector<int> silent, alongside;
  std::vector<PeerAnswer> silent_peers;
  std::map<Elsewhere, std::vector<int>> elsewhere;
  for (const PeerAnswer& peer : sorted) {
    if (!peer.answered) {
      silent.push_back(peer.rank);
      silent_peers.push_back(peer);
    } else if (peer.same_communicator && peer.operation == stalled.operation &&
               peer.sequence == stalled.sequence) {
      alongside.push_back(peer.rank);
    } else {
      elsewhere[{peer.same_communicator, peer.operation, peer.sequence}].push_back(peer.rank);
    }
  }

  std::vector<std::string> findings;
  if (!silent.empty()) {
    findings.push_back(Ranks(silent) + " (" + WorldRanksByHost(silent_peers) +
                       ") did not answer (stopped, hung, or computing outside any collective)");
  }
  for (const auto& [where, ranks] : elsewhere) {
    std::ostringstream out;
    out << Ranks(ranks) << Verb(ranks) << " waiting in " << where.operation << " #" << where.sequence;
    if (!where.same_communicator) out << " of another communicator";
    findings.push_back(out.str());
  }
  if (!alongside.empty()) {
    findings.push_back(Ranks(alongside) + Verb(alongside) + " waiting in the same collective");
  }
  if (silent.empty() && elsewhere.empty()) {
    findings.push_back("every rank is in it, yet MPI did not complete it");
  }

  std::ostringstream message;
  message << "rmoe: rank " << stalled.rank;
  if (stalled.world_rank != stalled.rank) message << " (world rank " << stalled.world_rank << ")";
  if (!stalled.host.empty()) message << " on " << stalled.host;
  message << ": collective " << stalled.operation << " #" << stalled.sequence << " ("
          << stalled.mpi_call << ") did not complete within " << stalled.timeout_seconds << " s: ";
  for (size_t i = 0; i < findings.size(); ++i) message << (i > 0 ? "; " : "") << findings[i];
  message << ". Aborting the job (runtime.collective_timeout_seconds sets this deadline).";
  return message.str();
}

}  // namespace rmoe::distributed
