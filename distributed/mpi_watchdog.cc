// MpiCommunicator's wait loop and watchdog: completing nonblocking collectives without
// spinning, the deadline, and the report on the side channel (see mpi_communicator.h).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "distributed/mpi_communicator.h"
#include "distributed/stall_report.h"

namespace rmoe::distributed {
namespace {

using Clock = std::chrono::steady_clock;
using Microseconds = std::chrono::microseconds;

// Polling without pause for this long keeps collectives of up to a few milliseconds as fast
// as blocking ones. Each step of MPI's rendezvous protocol needs both ranks to poll, and a
// sleeping rank on a busy machine gets its core back late: with 50 us of polling, the
// benchmark's 1 ms all-to-all exchanges took 5-6x longer (median; rmoe_bench alltoall, np 2).
constexpr Microseconds kSpin{2000};
// Then a pause between polls of 1/16 of the time waited so far, within these bounds: a
// collective that completes is noticed a small fraction of its duration late (doubling
// pauses could double it), and a rank waiting for a stopped peer polls ~1000 times a second,
// using a few percent of a core.
constexpr int kPauseDivisor = 16;
constexpr Microseconds kMinPause{50};
constexpr Microseconds kMaxPause{1000};
constexpr Microseconds kGracePoll{1000};
constexpr double kMaxGraceSeconds = 5;
constexpr int kStallExitCode = 1;

// Tags on the side channel, which carries nothing else.
constexpr int kInquiryTag = 1;
constexpr int kAnswerTag = 2;

// What a waiting rank answers, as raw bytes (every rank runs the same program).
struct InquiryAnswer {
  int64_t sequence;
  int32_t same_communicator;  // waiting in a collective of the communicator asked about
  char operation[44];         // NUL-terminated
};

// The MPI_COMM_WORLD rank of every rank of `comm`.
std::vector<int> WorldRanks(MPI_Comm comm, int size) {
  std::vector<int> ranks(size), world(size, MPI_UNDEFINED);
  for (int i = 0; i < size; ++i) ranks[i] = i;
  MPI_Group group = MPI_GROUP_NULL, world_group = MPI_GROUP_NULL;
  if (MPI_Comm_group(comm, &group) == MPI_SUCCESS &&
      MPI_Comm_group(MPI_COMM_WORLD, &world_group) == MPI_SUCCESS) {
    MPI_Group_translate_ranks(group, size, ranks.data(), world_group, world.data());
  }
  if (group != MPI_GROUP_NULL) MPI_Group_free(&group);
  if (world_group != MPI_GROUP_NULL) MPI_Group_free(&world_group);
  return world;
}

// The host of a world rank, when the process's MpiRuntime knows it ("" otherwise).
std::string HostOf(int world_rank) {
  if (!MpiRuntime::Exists()) return "";
  const NodeLayout& nodes = MpiRuntime::Get().Nodes();
  return world_rank >= 0 && world_rank < nodes.ranks() ? nodes.HostOf(world_rank) : "";
}

// Takes the answers that have arrived into `peers` (indexed by rank); how many came.
int CollectAnswers(MPI_Comm side_channel, std::vector<PeerAnswer>& peers) {
  int collected = 0;
  int pending = 0;
  MPI_Status status;
  while (MPI_Iprobe(MPI_ANY_SOURCE, kAnswerTag, side_channel, &pending, &status) == MPI_SUCCESS &&
         pending) {
    InquiryAnswer answer{};
    MPI_Recv(&answer, sizeof answer, MPI_BYTE, status.MPI_SOURCE, kAnswerTag, side_channel,
             MPI_STATUS_IGNORE);
    answer.operation[sizeof answer.operation - 1] = '\0';
    PeerAnswer& peer = peers[status.MPI_SOURCE];
    if (!peer.answered) ++collected;
    peer.answered = true;
    peer.same_communicator = answer.same_communicator != 0;
    peer.operation = answer.operation;
    peer.sequence = answer.sequence;
  }
  return collected;
}

}  // namespace

std::vector<const MpiCommunicator*>& MpiCommunicator::LiveCommunicators() {
  // Only the MPI thread touches it (MPI_THREAD_FUNNELED).
  static std::vector<const MpiCommunicator*> live;
  return live;
}

void MpiCommunicator::set_collective_timeout_seconds(double seconds) {
  TORCH_CHECK(std::isfinite(seconds) && seconds >= 0,
              "MpiCommunicator::set_collective_timeout_seconds: got ", seconds,
              "; must be a finite number of seconds >= 0 (0 = no deadline)");
  collective_timeout_seconds_ = seconds;
}

void MpiCommunicator::StartCollective(const char* operation) {
  ++sequence_;
  operation_ = operation;
  started_ = Clock::now();
}

bool MpiCommunicator::TestAll(MPI_Request* requests, int count, std::vector<MPI_Status>& statuses,
                              const char* mpi_call) const {
  int done = 0;
  int rc = MPI_Testall(count, requests, &done, statuses.data());
  if (rc == MPI_ERR_IN_STATUS) {
    // The failed request's own error says what went wrong (MPI_ERR_TRUNCATE, ...).
    for (const MPI_Status& status : statuses) {
      if (status.MPI_ERROR != MPI_SUCCESS && status.MPI_ERROR != MPI_ERR_PENDING) {
        rc = status.MPI_ERROR;
        break;
      }
    }
  }
  Check(rc, operation_, mpi_call);
  return done != 0;
}

void MpiCommunicator::Wait(int start_rc, MPI_Request* requests, int count, const char* mpi_call) {
  Check(start_rc, operation_, mpi_call);
  std::vector<MPI_Status> statuses(count);
  const Clock::time_point entered = Clock::now();
  const bool has_deadline = collective_timeout_seconds_ > 0;
  const Clock::time_point deadline =
      started_ + std::chrono::duration_cast<Clock::duration>(
                     std::chrono::duration<double>(collective_timeout_seconds_));
  while (!TestAll(requests, count, statuses, mpi_call)) {
    const Clock::time_point now = Clock::now();
    const auto waited = std::chrono::duration_cast<Microseconds>(now - entered);
    if (waited < kSpin) continue;
    if (has_deadline && now >= deadline) ReportStallAndAbort(mpi_call);
    AnswerInquiries();
    std::this_thread::sleep_for(std::clamp(waited / kPauseDivisor, kMinPause, kMaxPause));
  }
}

void MpiCommunicator::AnswerInquiries() const {
  InquiryAnswer answer{};
  answer.sequence = sequence_;
  std::strncpy(answer.operation, operation_, sizeof answer.operation - 1);
  for (const MpiCommunicator* asked : LiveCommunicators()) {
    int pending = 0;
    MPI_Status status;
    while (MPI_Iprobe(MPI_ANY_SOURCE, kInquiryTag, asked->side_channel_, &pending, &status) ==
               MPI_SUCCESS &&
           pending) {
      MPI_Recv(nullptr, 0, MPI_BYTE, status.MPI_SOURCE, kInquiryTag, asked->side_channel_,
               MPI_STATUS_IGNORE);
      answer.same_communicator = asked == this;
      // A few dozen bytes go out eagerly: MPI_Send returns without the asker's help.
      MPI_Send(&answer, sizeof answer, MPI_BYTE, status.MPI_SOURCE, kAnswerTag,
               asked->side_channel_);
    }
  }
}

void MpiCommunicator::ReportStallAndAbort(const char* mpi_call) const {
  const std::vector<int> world_ranks = WorldRanks(comm_, size_);
  std::vector<PeerAnswer> peers(size_);
  std::vector<MPI_Request> inquiries;  // never completed: a stopped peer never receives
  for (int peer = 0; peer < size_; ++peer) {
    peers[peer].rank = peer;
    peers[peer].world_rank = world_ranks[peer];
    peers[peer].host = HostOf(world_ranks[peer]);
    if (peer == rank_) continue;
    inquiries.emplace_back();
    MPI_Isend(nullptr, 0, MPI_BYTE, peer, kInquiryTag, side_channel_, &inquiries.back());
  }

  // Answer others (they may be past their deadline too) while collecting answers.
  const auto grace = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(
      std::min(kMaxGraceSeconds, collective_timeout_seconds_ / 2)));
  const Clock::time_point grace_end = Clock::now() + grace;
  int answered = 0;
  while (answered < size_ - 1 && Clock::now() < grace_end) {
    AnswerInquiries();
    answered += CollectAnswers(side_channel_, peers);
    std::this_thread::sleep_for(kGracePoll);
  }
  peers.erase(peers.begin() + rank_);

  // A lower rank waiting in this collective reports too; its abort normally ends this
  // process within the extra grace period, and the job prints one report instead of several.
  const bool lower_rank_reports = std::any_of(peers.begin(), peers.end(), [&](const PeerAnswer& p) {
    return p.rank < rank_ && p.answered && p.same_communicator && p.sequence == sequence_ &&
           p.operation == operation_;
  });
  for (const Clock::time_point end = Clock::now() + grace; lower_rank_reports && Clock::now() < end;) {
    AnswerInquiries();
    std::this_thread::sleep_for(kGracePoll);
  }

  StalledCollective stalled;
  stalled.rank = rank_;
  stalled.world_rank = world_ranks[rank_];
  stalled.host = HostOf(world_ranks[rank_]);
  stalled.operation = operation_;
  stalled.sequence = sequence_;
  stalled.mpi_call = mpi_call;
  stalled.timeout_seconds = collective_timeout_seconds_;
  std::fflush(stdout);
  std::fprintf(stderr, "%s\n", DescribeStalledCollective(stalled, peers).c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, kStallExitCode);
  std::_Exit(kStallExitCode);  // MPI_Abort does not return; just in case
}

}  // namespace rmoe::distributed
