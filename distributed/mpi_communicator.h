// MPI implementation of Communicator (CPU tensors) and the process-wide MPI runtime.
//
// Usage in a program:
//
//   int main(int argc, char** argv) {
//     rmoe::distributed::MpiRuntime mpi(&argc, &argv);   // MPI_Init_thread (FUNNELED)
//     auto& world = mpi.World();                         // rank(), size(), collectives
//     try { ... } catch (const std::exception& e) {
//       std::fprintf(stderr, "rank %d: %s\n", world.rank(), e.what());
//       mpi.Abort(1);  // never return normally while other ranks may sit in a collective
//     }
//   }                                                    // ~MpiRuntime: MPI_Finalize
//
// A program started without mpirun is a world of one (OpenMPI singleton init).
//
// Errors. Communicators use MPI_ERRORS_RETURN, and every failed MPI call throws MpiError,
// whose what() reads "rank R: <Operation>: MPI_Xxx failed: <MPI's error string>", R being the
// rank in MPI_COMM_WORLD (e.g. "rank 1: Broadcast: MPI_Bcast failed: MPI_ERR_TRUNCATE: message
// truncated"). Bad arguments (a CUDA tensor, wrong split counts, ...) throw c10::Error
// (TORCH_CHECK) naming the operation. AllToAll and AllGather first exchange a few numbers
// per rank (one MPI_Allgather: argument validity, dtype, trailing shape, sizes), so a bad or
// disagreeing argument on one rank throws on every rank instead of leaving the others
// blocked; AllReduce and Broadcast do not (that would cost a second collective on the
// gradient path): there shape and dtype must agree across ranks (a size mismatch usually
// surfaces as MPI_ERR_TRUNCATE). AllToAll cannot check that recv_splits match the senders'
// send_splits; a mismatch is an MPI error or wrong data.
// A rank that dies (exits without MPI_Finalize) makes OpenMPI's mpirun kill the whole job
// with a non-zero exit status within about a second; see tests/distributed/dead_rank_main.cc.
//
// Stopped or hung ranks. A rank that stays alive but never joins (SIGSTOPped, deadlocked,
// stuck in a loop) would keep the others in the collective forever. So every collective runs
// as nonblocking MPI calls (MPI_Iallreduce, MPI_Ialltoallv, MPI_Iallgather, MPI_Ibcast,
// MPI_Ibarrier, ...) completed by one wait loop, which
//   - polls MPI_Testall without pause for the first 2 ms (collectives of a few ms keep
//     their speed: MPI's protocol needs both ranks polling) and then sleeps between polls,
//     a pause of 1/16 of the time already waited, 50 us to 1 ms: a rank waiting for a slow
//     peer uses a few percent of a core instead of all of it;
//   - answers other ranks' inquiries (below) while it waits;
//   - gives up after collective_timeout_seconds() (300 s by default, 0 = never; communicators
//     from Split() inherit it; rmoe_train sets it from runtime.collective_timeout_seconds),
//     counted from the start of the collective.
// A rank past the deadline asks every other rank, on a private duplicate of the communicator
// (the side channel), which collective it is waiting in; each communicator numbers its
// collectives (AllReduce #57), so "the same collective" is well defined. Ranks waiting in a
// collective of any communicator of the process answer; stopped, hung or computing ranks do
// not. After a grace period (min(5 s, timeout / 2)) it prints one line on stderr naming the
// collective, the ranks that did not answer and where the others wait (see stall_report.h),
// and ends the job with MPI_Abort(MPI_COMM_WORLD, 1). When several ranks time out together,
// the lowest rank reports and the others hold back for one more grace period, so the job
// normally prints one report. See tests/distributed/stalled_rank_main.cc.
//
// Messages of 2 GiB or more. MPI-3 counts and displacements are int (OpenMPI 4.1 has no
// MPI-4 large-count calls). Data moves as MPI_BYTE (AllReduce: as elements of the reduction
// type), and no MPI call gets more than max_message_bytes() bytes (INT_MAX by default).
// AllReduce and Broadcast run as several MPI calls over chunks of at most that many bytes.
// AllToAll and AllGather use one MPI_Alltoallv / MPI_Allgatherv when every count and
// displacement fits, and otherwise a fallback that moves each message as chunks of at most
// that many bytes (AllToAll: MPI_Isend/MPI_Irecv between each pair of ranks, tag
// kFallbackTag in the .cc; AllGather: one MPI_Bcast per rank and chunk). The path is chosen
// from every rank's totals, which the argument exchange above carries, so all ranks take the
// same one. set_max_message_bytes_for_testing() lowers the limit so that tests cover the
// fallback with tensors of a few bytes; the real path was checked once by hand with 2.25 GiB
// messages on 2 ranks (AllToAll, AllGather, AllReduce, Broadcast).
//
// Threading: MPI_THREAD_FUNNELED. Call every method from the thread that created the
// MpiRuntime (torch's intra-op threads never call MPI). The watchdog runs on that thread
// too, inside the wait loop: there is no helper thread.
#pragma once

#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1  // the C API only: no deprecated C++ bindings
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "distributed/communicator.h"
#include "distributed/node_layout.h"

namespace rmoe::distributed {

struct CollectiveMeta;  // collective_args.h

// A failed MPI call. what(): "rank R: <operation>: MPI_Xxx failed: <MPI error string>".
class MpiError : public std::runtime_error {
 public:
  MpiError(const std::string& message, int error_code, int rank)
      : std::runtime_error(message), error_code_(error_code), rank_(rank) {}
  int error_code() const { return error_code_; }  // the MPI return code
  int rank() const { return rank_; }              // rank in MPI_COMM_WORLD

 private:
  int error_code_;
  int rank_;
};

// Receive buffers of AllToAll that outlive the call (the experts keep their input for the
// backward pass), recycled once nobody else holds them. A fresh large tensor per call costs
// more than the exchange itself: glibc hands out large blocks with mmap, so every byte is
// page-faulted again on each call (3.5x the raw MPI_Alltoallv at 134 MB per rank).
class ReceiveBufferPool {
 public:
  // An uninitialised tensor of `shape` and `options`, backed by a pooled buffer whose
  // storage only the pool holds, or by a new one (kept for later when the pool has room).
  torch::Tensor Get(const std::vector<int64_t>& shape, const torch::TensorOptions& options);
  int64_t reused() const { return reused_; }

 private:
  static constexpr size_t kMaxBuffers = 64;     // about 4 per MoE layer in flight
  static constexpr int64_t kMinBytes = 1 << 20;  // smaller ones are cheap to allocate
  std::vector<torch::Tensor> buffers_;           // uint8, 1-D
  int64_t reused_ = 0;
};

// Collectives over an MPI communicator, for CPU tensors of any dtype (AllToAll, AllGather and
// Broadcast move raw bytes). Reductions: float, double, int32, int64 natively; bool as
// logical or (what summing bools gives); half and bfloat16 are converted to float, reduced in
// float and rounded back once (more accurate than summing in 16 bits, at the cost of a float
// copy); int8, uint8 and int16 are reduced in int32 and wrap on the way back like torch's own
// integer arithmetic (OpenMPI 4.1's vectorised MPI_SUM saturates 8- and 16-bit integers). ReduceOp::kAvg is sum / size() and is for floating-point tensors
// only: an integer or bool tensor with kAvg throws (use kSum and divide as you need).
// Non-contiguous tensors are accepted: results are copied back into the caller's tensor,
// whose storage is kept (views of parameters stay views).
class MpiCommunicator : public Communicator {
 public:
  // Wraps `comm` and sets MPI_ERRORS_RETURN on it; duplicates it for the watchdog's side
  // channel (a collective over `comm`: every member must construct its MpiCommunicator).
  // With `owned`, MPI_Comm_free on destruction (skipped if MPI is already finalized).
  MpiCommunicator(MPI_Comm comm, bool owned);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void AllReduce(torch::Tensor& tensor, ReduceOp op) override;
  torch::Tensor AllToAll(const torch::Tensor& send, const std::vector<int64_t>& send_splits,
                         const std::vector<int64_t>& recv_splits) override;
  std::vector<int64_t> AllToAllCounts(const std::vector<int64_t>& counts) override;
  torch::Tensor AllGather(const torch::Tensor& tensor) override;
  void Broadcast(torch::Tensor& tensor, int root) override;
  void Barrier() override;
  // A negative `color` (e.g. MPI_UNDEFINED) joins no group: this rank gets nullptr.
  // The new communicator owns its MPI_Comm and inherits max_message_bytes() and
  // collective_timeout_seconds().
  std::unique_ptr<Communicator> Split(int color, int key) override;

  MPI_Comm comm() const { return comm_; }

  // How long one collective may take before this rank reports the missing ranks and aborts
  // the job; 0 = no deadline. Default kDefaultCollectiveTimeoutSeconds. Set it to the same
  // value on every rank, before Split() (new communicators copy it).
  static constexpr double kDefaultCollectiveTimeoutSeconds = 300;
  double collective_timeout_seconds() const { return collective_timeout_seconds_; }
  void set_collective_timeout_seconds(double seconds);
  // Collectives started on this communicator so far (the number the report gives them).
  int64_t collectives_started() const { return sequence_; }

  // Largest count (in bytes) passed to one MPI call; INT_MAX unless a test lowers it.
  int64_t max_message_bytes() const { return max_message_bytes_; }
  // Test hook: must be set to the same value on every rank; >= 1.
  void set_max_message_bytes_for_testing(int64_t bytes);
  // How many AllToAll / AllGather calls took the chunked fallback, and how many AllReduce /
  // Broadcast calls needed more than one chunk (for tests).
  int64_t chunked_operations() const { return chunked_operations_; }
  // AllToAll results served from a pooled buffer vs freshly allocated ones (for tests).
  int64_t reused_receive_buffers() const { return receive_buffers_.reused(); }

 private:
  void Check(int rc, const char* operation, const char* mpi_call) const;
  // Every rank's CollectiveMeta, in rank order (MPI_Iallgather).
  std::vector<CollectiveMeta> ExchangeMeta(const CollectiveMeta& local);

  // The watchdog (mpi_watchdog.cc). Every public collective calls StartCollective first; every
  // nonblocking MPI call it makes is completed by Wait.
  void StartCollective(const char* operation);
  // Checks `start_rc` (the return code of the call that produced `requests`), then completes
  // them: polls without spinning, answers inquiries, and past the deadline reports and aborts.
  void Wait(int start_rc, MPI_Request* requests, int count, const char* mpi_call);
  bool TestAll(MPI_Request* requests, int count, std::vector<MPI_Status>& statuses,
               const char* mpi_call) const;
  // Answers inquiries on the side channel of every live communicator of this process, with
  // the collective this one (the communicator being waited in) is in.
  void AnswerInquiries() const;
  [[noreturn]] void ReportStallAndAbort(const char* mpi_call) const;
  static std::vector<const MpiCommunicator*>& LiveCommunicators();

  MPI_Comm comm_;
  bool owned_;
  MPI_Comm side_channel_ = MPI_COMM_NULL;  // a duplicate of comm_, for the watchdog only
  int rank_ = 0;
  int size_ = 1;
  int64_t max_message_bytes_;
  int64_t chunked_operations_ = 0;
  ReceiveBufferPool receive_buffers_;
  double collective_timeout_seconds_ = kDefaultCollectiveTimeoutSeconds;
  int64_t sequence_ = 0;            // collectives started; the current one's number
  const char* operation_ = "none";  // the current (or last) collective
  std::chrono::steady_clock::time_point started_;  // when the current collective started
};

// The process's MPI: MPI_Init_thread(MPI_THREAD_FUNNELED) in the constructor (unless MPI is
// already initialised, in which case it is left to its owner), MPI_Finalize in the
// destructor. One instance per process, normally a local of main(). MPI cannot be
// initialised again after it was finalized.
class MpiRuntime {
 public:
  explicit MpiRuntime(int* argc = nullptr, char*** argv = nullptr);
  // Frees World() and finalizes MPI. If an exception is propagating through it (so other
  // ranks may be blocked in a collective, and MPI_Finalize would wait for them), it calls
  // MPI_Abort instead. Communicators from Split() must be destroyed before this runs.
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  // The live instance; throws if there is none.
  static MpiRuntime& Get();
  static bool Exists();

  // All processes of the job, over a duplicate of MPI_COMM_WORLD (so that library traffic
  // never matches a user's messages on MPI_COMM_WORLD).
  MpiCommunicator& World() { return *world_; }

  // This process's index among the job's processes on the same node and their number, from
  // MPI_Comm_split_type(MPI_COMM_TYPE_SHARED): the same under mpirun, srun or any other
  // launcher. For thread counts and GPU selection.
  int LocalRank() const { return local_rank_; }
  int LocalSize() const { return local_size_; }
  // Which world ranks share a node, and the nodes' host names (found once, at start-up).
  const NodeLayout& Nodes() const { return nodes_; }

  // MPI_Abort(MPI_COMM_WORLD, code): ends every process of the job. For fatal errors on one
  // rank while others may be waiting for it.
  [[noreturn]] void Abort(int code);

 private:
  void DiscoverNodes();

  bool finalize_ = false;  // we initialised MPI, so we finalize it
  std::unique_ptr<MpiCommunicator> world_;
  int local_rank_ = 0;
  int local_size_ = 1;
  NodeLayout nodes_;
};

}  // namespace rmoe::distributed
