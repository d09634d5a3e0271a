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
// Streams. Every collective runs on the communicator's own CUDA stream (a high-priority stream
// from torch's pool, on device()). It is ordered after the work already queued on torch's
// current stream (an event recorded there, waited on by ours) and before the work queued later
// (an event recorded on ours, waited on by the current stream), and every tensor it touches is
// recorded on our stream with CUDACachingAllocator::recordStream, so the caching allocator
// never hands its memory out again before the collective is done. The calls return once the
// work is queued, without waiting for the GPU, except AllToAllCounts, AllGather (both need
// sizes on the host), Barrier and Synchronize. Results are then used like the result of any
// other CUDA op on the current stream. (TimedCommunicator therefore measures the time to queue
// AllReduce, AllToAll and Broadcast, not their run time on the GPU.)
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
// when NCCL >= 2.13). Bad arguments throw c10::Error (TORCH_CHECK) naming the operation.
// With NCCL >= 2.14 the communicator is non-blocking (ncclConfig_t::blocking = 0): NCCL calls
// return at once (ncclInProgress), and every wait is a poll of ncclCommGetAsyncError (and,
// where the host waits for the GPU, cudaEventQuery) under a deadline, timeout_seconds() from
// the start of the wait (env RMOE_NCCL_TIMEOUT_S, default 600; 0 = no deadline). When NCCL
// reports an asynchronous error (a peer died, the network failed: ncclRemoteError,
// ncclSystemError, ...) or the deadline passes, the communicator is aborted (ncclCommAbort)
// and the call throws NcclError naming the rank and the operation; every later call throws
// too. Work that the host does not wait for (AllReduce, AllToAll, Broadcast) is watched by a
// watchdog thread, one per communicator, which every 100 ms checks ncclCommGetAsyncError and
// whether the oldest unfinished operation is older than the timeout; if so it prints
// "rank R: NcclCommunicator::<Operation>: ..." to stderr, aborts the communicator (waiting at
// most 10 s for ncclCommAbort) and ends the process with exit status 1 (std::_Exit): a thread
// other than main cannot call MPI (MPI_THREAD_FUNNELED), and under mpirun a process that exits
// without MPI_Finalize ends the whole job. Without this, a peer that died in the middle of a
// gradient all-reduce would leave the others blocked forever in torch's next
// cudaStreamSynchronize (loss.item()). Before NCCL 2.14 communicators are blocking and only
// the polls on the host and the watchdog's checks remain (a blocking NCCL call can still hang).
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

// "NCCL 2.28.9 (built against 2.28.9), CUDA runtime 13.0 (built against 13.0)": the
// libraries this process loaded, for version reports. Needs no GPU.
std::string NcclBuildInfo();

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
  // Waits (at most timeout_seconds()) for the queued work, then frees the NCCL communicator
  // (ncclCommFinalize + ncclCommDestroy; ncclCommAbort after an error). Never throws.
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

  int device() const;
  // The deadline of every wait; 0 = none. From RMOE_NCCL_TIMEOUT_S (default 600) at creation.
  double timeout_seconds() const;
  void set_timeout_seconds(double seconds);  // >= 0

  // NCCL's version as NCCL_VERSION_CODE writes it (e.g. 22809 for 2.28.9), of the header
  // this was compiled with and of the library loaded at run time.
  static int CompiledNcclVersion();
  static int RuntimeNcclVersion();

 private:
  class Impl;
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
