// The message a rank prints when one of its MPI collectives misses its deadline: which peers
// did not answer the rank's inquiry and where those that did answer are waiting. Pure (no MPI),
// so that tests can call it with made-up answers; MpiCommunicator gathers the answers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rmoe::distributed {

// The collective that missed its deadline, as the rank that waited in it sees it.
struct StalledCollective {
  int rank = 0;        // in the collective's communicator
  int world_rank = 0;  // in MPI_COMM_WORLD
  std::string host;    // this rank's host name; empty when unknown
  std::string operation;  // "AllReduce"
  int64_t sequence = 0;   // the communicator's count of collectives, this one included
  std::string mpi_call;   // the nonblocking MPI call being waited for, "MPI_Iallreduce"
  double timeout_seconds = 0;
};

// What one other rank of the communicator answered when asked what it is waiting in.
struct PeerAnswer {
  int rank = 0;  // in the collective's communicator
  int world_rank = 0;
  std::string host;       // the peer's host name; empty when unknown
  bool answered = false;  // false: no answer within the grace period
  // The peer waits in a collective of this communicator (otherwise: of another one, e.g. an
  // expert-parallel group, where `operation` and `sequence` belong to that communicator).
  bool same_communicator = true;
  std::string operation;
  int64_t sequence = 0;
};

// One line (no trailing newline), e.g.
//   rmoe: rank 0 on node1: collective AllReduce #57 (MPI_Iallreduce) did not complete within
//   3 s: rank 1 (world rank 1 on node2) did not answer (stopped, hung, or computing outside any
//   collective); ranks 2, 3 are waiting in the same collective. Aborting the job
//   (runtime.collective_timeout_seconds sets this deadline).
// `peers` are the other ranks of the communicator, in any order.
std::string DescribeStalledCollective(const StalledCollective& stalled,
                                      const std::vector<PeerAnswer>& peers);

}  // namespace rmoe::distributed
