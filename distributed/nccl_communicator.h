// NCCL implementation of Communicator (CUDA tensors), bootstrapped over MPI.
//
// Built only when CMake finds a CUDA build of LibTorch, the CUDA toolkit and NCCL; then
// RMOE_HAVE_NCCL is defined (to 1) for everything that links rmoe_distributed. This header
// itself includes no CUDA or NCCL header, so it can be read anywhere, but its functions only
// exist in such a build. See docs/gpu.md.
//
// Usage, one process per GPU:
//
//   rmoe::distributed::MpiRuntime mpi(&argc, &argv);
//   #if RMOE_HAVE_NCCL
//   // cudaSetDevice(local_rank % device_count), then a communicator over all of mpi.World()
//   auto nccl = rmoe::distributed::MakeNcclCommunicator(mpi.World(), mpi.LocalRank());
//   torch::Device device(torch::kCUDA, nccl->device());   // put the model and data here
//   #endif
//
// Creation. Rank 0 of the MPI communicator calls ncclGetUniqueId and broadcasts it with
// MPI_Bcast on mpi.comm(); every rank then calls ncclCommInitRankConfig (ncclCommInitRank
// before NCCL 2.14). Creation is collective over the MPI communicator. Split() is collective
// over this communicator: it splits the MPI communicator (MPI_Comm_split) and bootstraps a new
// NCCL communicator over the part the same way (one code path for every NCCL version; the
// new communicator owns its MPI sub-communicator). The MPI communicator passed in must outlive
// this one.
//
// Streams. Every communicator of the process on one device, the world communicator and every
// one Split() from it (expert-parallel and replica groups), runs its collectives on one shared
// CUDA stream (a high-priority stream from torch's pool). With a stream per communicator,
// kernels of two communicators could run in different orders on different ranks and deadlock;
// on one stream they run in the order they were called, the same on every rank. Each
// collective is ordered after the work already queued on torch's current stream (an event
// recorded there, waited on by ours) and before the work queued later (an event recorded on
// ours, waited on by the current stream), and every tensor it touches is recorded on our
// stream with CUDACachingAllocator::recordStream, so the caching allocator never hands its
// memory out again before the collective is done. The calls return once the work is queued,
// without waiting for the GPU, except AllToAllCounts, AllGather (both need sizes on the host),
// Barrier and Synchronize. Results are then used like the result of any other CUDA op on the
// current stream. (TimedCommunicator therefore measures the time to queue AllReduce, AllToAll
// and Broadcast, not their run time on the GPU.)
//
// Host synchronisation. AllToAllCounts copies the counts to the device, exchanges them with
// grouped ncclSend/ncclRecv, copies them back into pinned memory and waits for that copy: the
// one host round trip an uneven all-to-all needs. AllGather does the same with five numbers
// per rank (validity, rows, row bytes, dtype, trailing shape), so that a bad or disagreeing
// argument on one rank throws on every rank (as in MpiCommunicator). AllReduce, AllToAll and
// Broadcast check their arguments locally only (no extra round trip on the hot path): a rank
// that throws leaves the others waiting, which the launcher's MPI_Abort or the timeout below
// ends.
//
// Errors and dead peers. Every NCCL and CUDA call is checked; a failure throws NcclError,
// whose what() reads "rank R: NcclCommunicator::<Operation>: <call> failed: <error string>"
// (R being the rank in MPI_COMM_WORLD; for NCCL errors followed by ncclGetLastError's detail
// when NCCL >= 2.13). Bad arguments throw c10::Error (TORCH_CHECK) naming the operation,
// before anything is queued. Any failed NCCL call aborts the communicator: the other ranks
// have queued their side of the operation and cannot complete it without ours.
// With NCCL >= 2.14 the communicator is non-blocking (ncclConfig_t::blocking = 0): NCCL calls
// return at once (ncclInProgress), and every wait is a poll of ncclCommGetAsyncError (and,
// where the host waits for the GPU, cudaEventQuery) under a deadline, timeout_seconds() from
// the start of the wait (env RMOE_NCCL_TIMEOUT_S, default 600; 0 = no deadline); the
// destructor's waits share one deadline. When NCCL reports an asynchronous error (a peer died,
// the network failed: ncclRemoteError, ncclSystemError, ...) or the deadline passes, the
// communicator is aborted and the call throws NcclError naming the rank and the operation;
// every later call throws too.
//
// Aborting. ncclCommAbort runs on a detached thread (it may itself wait for kernels spinning
// on a dead peer, or for NCCL's proxy thread); whoever aborts waits at most 10 s for it, and
// if it has not returned by then prints "... ncclCommAbort ... did not return within 10.0 s;
// ending this process" and ends the process (std::_Exit(1)). Every use of the NCCL
// communicator holds its lock and checks that it was not aborted, so no NCCL call ever sees
// an aborted communicator; an NCCL group holds the lock from ncclGroupStart to ncclGroupEnd.
// A group that fails half-way (an NCCL call or anything else throws between ncclGroupStart
// and ncclGroupEnd) is ended so that NCCL runs none of it (see Impl::Group), and the
// communicator is aborted.
//
// The watchdog. Work that the host does not wait for (AllReduce, AllToAll, Broadcast) is
// watched by a thread per communicator, which every 100 ms checks ncclCommGetAsyncError and
// how long the oldest unfinished operation has been running on the GPU: from when an event
// recorded just before its NCCL kernels completed, not from when it was queued, so a
// collective queued behind long compute is not taken for a hung one. On an error, or past the
// timeout, it prints "rank R: NcclCommunicator::<Operation>: ..." to stderr, aborts the
// communicator (as above) and ends the process with exit status 1 (std::_Exit): a thread
// other than main cannot call MPI (MPI_THREAD_FUNNELED), and under mpirun a process that exits
// without MPI_Finalize ends the whole job. Without this, a peer that died in the middle of a
// gradient all-reduce would leave the others blocked forever in torch's next
// cudaStreamSynchronize (loss.item()). Before NCCL 2.14 communicators are blocking and only
// the polls on the host and the watchdog's checks remain (a blocking NCCL call can still hang).
//
// After an error, the launcher calls AbortAllNcclCommunicators() and then MPI_Abort, before
// any NcclCommunicator is destroyed: the destructor of a communicator that was not aborted
// waits (up to the timeout) for its queued work, which a dead peer never lets finish.
//
// Versions. Creation fails with NcclError when the NCCL library loaded at run time is older
// (major.minor) than the headers this was compiled with, naming both and the library's path;
// NcclBuildInfo() reports them for the launcher.
//
// Dtypes. AllToAll, AllGather and Broadcast move bytes (any dtype). AllReduce reduces float,
// double, half, bfloat16 (NCCL >= 2.10), int32, int64, int8 and uint8 natively (8-bit sums wrap
// like torch's integer arithmetic), int16 in int32, and bool as uint8 with ncclMax (logical or,
// what summing bools gives; as in MpiCommunicator). ReduceOp::kAvg is for floating-point tensors
// only; it is ncclAvg with NCCL >= 2.10, else a sum divided by size(). Non-contiguous tensors are
// accepted; results are copied back into the caller's tensor (views stay views).
//
// Tensors must be CUDA tensors on device(). Not supported: CUDA graph capture.
//
// Threading. One thread at a time may call a communicator. CUDA autograd runs backward on the
// device's autograd thread, so AllToAll may be called from there (the expert-parallel
// dispatcher's backward): that is fine, as long as calls do not overlap. No method calls MPI
// except the constructor and Split().
#pragma once

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "distributed/communicator.h"
#include "distributed/mpi_communicator.h"

namespace rmoe::distributed {

// "NCCL 2.28.9 (built against 2.28.9; /usr/lib/x86_64-linux-gnu/libnccl.so.2), CUDA runtime
// 13.0 (built against 13.0)": the libraries this process loaded, for version reports; "; TOO
// OLD" follows the path when the loaded NCCL is older than the headers (creation then fails).
// Needs no GPU.
std::string NcclBuildInfo();

// Where the dynamic linker found libnccl ("" if unknown).
std::string NcclLibraryPath();

// For the launcher, after an error and before anything is destroyed: aborts every
// NcclCommunicator of this process that is alive and not yet aborted (ncclCommAbort, all at
// once on background threads), waiting at most 10 s in all; ends the process if an abort is
// stuck. Afterwards their methods throw and their destructors wait for nothing, so the
// launcher can go on to MPI_Abort. `reason` is recorded as why they were aborted. Returns how
// many it aborted. Any thread may call it; it calls no MPI.
int AbortAllNcclCommunicators(const std::string& reason);

// A failed NCCL or CUDA call, an asynchronous NCCL error or a timeout.
// what(): "rank R: NcclCommunicator::<operation>: <call> failed: <error string>".
class NcclError : public std::runtime_error {
 public:
  NcclError(const std::string& message, int error_code, int rank)
      : std::runtime_error(message), error_code_(error_code), rank_(rank) {}
  // The ncclResult_t or cudaError_t (0 for a timeout).
  int error_code() const { return error_code_; }
  int rank() const { return rank_; }  // rank in MPI_COMM_WORLD

 private:
  int error_code_;
  int rank_;
};

class NcclCommunicator : public Communicator {
 public:
  // Collective over `mpi`: a communicator of the same ranks on CUDA device `device` (this
  // process's GPU). `mpi` must outlive the new communicator.
  NcclCommunicator(MpiCommunicator& mpi, int device);
  // Waits (at most timeout_seconds() in all) for the queued work and ncclCommFinalize, then
  // frees the NCCL communicator (ncclCommDestroy). After an abort it waits for nothing; when a
  // wait fails it aborts instead. Never throws.
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override;
  int size() const override;

  void AllReduce(torch::Tensor& tensor, ReduceOp op) override;
  torch::Tensor AllToAll(const torch::Tensor& send, const std::vector<int64_t>& send_splits,
                         const std::vector<int64_t>& recv_splits) override;
  std::vector<int64_t> AllToAllCounts(const std::vector<int64_t>& counts) override;
  torch::Tensor AllGather(const torch::Tensor& tensor) override;
  void Broadcast(torch::Tensor& tensor, int root) override;
  // Returns when every rank has reached it and this rank's work queued before it (on the
  // current stream and on the communicator's) is done.
  void Barrier() override;
  // A negative `color` joins no group: this rank gets nullptr. The new communicator uses the
  // same device and timeout.
  std::unique_ptr<Communicator> Split(int color, int key) override;

  // Blocks until everything queued on the communicator's stream so far has finished, with the
  // same deadline and error checks as every other wait.
  void Synchronize();

  // Aborts the NCCL communicator now, without waiting for queued work (see "Aborting" above);
  // every later call throws NcclError naming `reason`. Does nothing if already aborted.
  void Abort(const std::string& reason);
  bool aborted() const;

  int device() const;
  // The deadline of every wait; 0 = none. From RMOE_NCCL_TIMEOUT_S (default 600) at creation.
  double timeout_seconds() const;
  void set_timeout_seconds(double seconds);  // >= 0

  // NCCL's version as NCCL_VERSION_CODE writes it (e.g. 22809 for 2.28.9), of the header
  // this was compiled with and of the library loaded at run time (0 if it cannot tell).
  static int CompiledNcclVersion();
  static int RuntimeNcclVersion();

 private:
  class Impl;
  friend int AbortAllNcclCommunicators(const std::string& reason);
  // Split(): owns its MPI sub-communicator.
  NcclCommunicator(std::unique_ptr<MpiCommunicator> owned_mpi, int device, double timeout_seconds);
  std::unique_ptr<Impl> impl_;
};

// The usual way to make one: selects CUDA device local_rank % (number of visible devices)
// with cudaSetDevice (it stays this thread's current device, so torch's default CUDA device
// is it too), then creates a communicator over `mpi` on it. Throws NcclError when no CUDA
// device is visible. Collective over `mpi`.
std::unique_ptr<NcclCommunicator> MakeNcclCommunicator(MpiCommunicator& mpi, int local_rank);

}  // namespace rmoe::distributed
