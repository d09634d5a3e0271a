#include "distributed/nccl_communicator.h"

#include "distributed/collective_args.h"
#include "distributed/nccl_supervision.h"
#include "rmoe/util/env.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <initializer_list>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <type_traits>

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 7, 0)
#error "NcclCommunicator needs NCCL 2.7 or newer (ncclSend / ncclRecv)"
#endif
// Non-blocking communicators (ncclConfig_t::blocking = 0, ncclInProgress).
#define RMOE_NCCL_NONBLOCKING (NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0))
#define RMOE_NCCL_HAS_AVG (NCCL_VERSION_CODE >= NCCL_VERSION(2, 10, 0))
#define RMOE_NCCL_HAS_LAST_ERROR (NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0))
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 10, 0) && defined(__CUDA_BF16_TYPES_EXIST__)
#define RMOE_NCCL_HAS_BF16 1
#else
#define RMOE_NCCL_HAS_BF16 0
#endif

// Every CUDA call goes through this (inside NcclCommunicator::Impl), and every NCCL call on the
// communicator through RMOE_NCCL_COMM_CHECK (below, with the communicator's lock): a failure
// throws NcclError naming the call, the rank and the operation `op`.
#define RMOE_CUDA_CHECK(op, call) CheckCuda((call), #call, (op))

namespace rmoe::distributed {
namespace {

using Clock = SteadyClock;

constexpr std::chrono::milliseconds kWatchdogPeriod{100};
// How long whoever aborts a communicator waits for ncclCommAbort before ending the process.
constexpr std::chrono::milliseconds kAbortGrace{10000};

// "ncclSend(buffer, count, ...)" -> "ncclSend".
std::string CallName(const char* call) {
  const char* paren = std::strchr(call, '(');
  return paren == nullptr ? std::string(call) : std::string(call, paren - call);
}

std::string MpiErrorString(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(rc);
  return std::string(text, length);
}

std::string CudaErrorString(cudaError_t rc) {
  return std::string(cudaGetErrorName(rc)) + ": " + cudaGetErrorString(rc);
}

double TimeoutFromEnv() {
  auto seconds = NumberFromEnv("RMOE_NCCL_TIMEOUT_S", 600, {0});
  TORCH_CHECK(seconds.ok(), std::string(seconds.status().message()), " (seconds; 0: no timeout)");
  return *seconds;
}

// The stream every communicator of this process uses on `device`: the world communicator and
// every one Split() from it. With a stream each, two communicators' kernels could run in
// either order, and in different orders on different ranks: rank 0 running an expert-parallel
// all-to-all while rank 1 runs a replica all-reduce, each waiting for the other, deadlocks
// once nothing on the host orders them. One stream runs them in the order they were called,
// which is the same on every rank. A high-priority stream from torch's pool: pool streams
// live as long as the process, which the caching allocator's recorded streams need.
c10::cuda::CUDAStream SharedNcclStream(int device) {
  static std::mutex mutex;
  static auto* streams = new std::map<int, c10::cuda::CUDAStream>();  // never destroyed
  std::lock_guard<std::mutex> lock(mutex);
  auto it = streams->find(device);
  if (it == streams->end()) {
    it = streams
             ->emplace(device, c10::cuda::getStreamFromPool(/*isHighPriority=*/true,
                                                            static_cast<c10::DeviceIndex>(device)))
             .first;
  }
  return it->second;
}

// Where the dynamic linker found libnccl (the library that defines ncclGetVersion).
std::string LoadedNcclPath() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&ncclGetVersion), &info) == 0 || info.dli_fname == nullptr) {
    return "";
  }
  return info.dli_fname;
}

// How AllReduce reduces a dtype: the NCCL type and "sum" op, and the dtype the data is
// reduced in (the tensor's own, or a wider one it is converted to and back).
struct Reduction {
  ncclDataType_t type;
  ncclRedOp_t sum;
  c10::ScalarType work_dtype;
};

std::optional<Reduction> ReductionFor(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat: return Reduction{ncclFloat32, ncclSum, dtype};
    case torch::kDouble: return Reduction{ncclFloat64, ncclSum, dtype};
    case torch::kHalf: return Reduction{ncclFloat16, ncclSum, dtype};
#if RMOE_NCCL_HAS_BF16
    case torch::kBFloat16: return Reduction{ncclBfloat16, ncclSum, dtype};
#else
    case torch::kBFloat16: return Reduction{ncclFloat32, ncclSum, torch::kFloat};
#endif
    case torch::kInt32: return Reduction{ncclInt32, ncclSum, dtype};
    case torch::kInt64: return Reduction{ncclInt64, ncclSum, dtype};
    case torch::kInt8: return Reduction{ncclInt8, ncclSum, dtype};
    case torch::kUInt8: return Reduction{ncclUint8, ncclSum, dtype};
    case torch::kInt16: return Reduction{ncclInt32, ncclSum, torch::kInt32};
    // One byte per bool; the maximum of 0/1 bytes is the logical or.
    case torch::kBool: return Reduction{ncclUint8, ncclMax, dtype};
    default: return std::nullopt;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// NcclCommunicator::Impl

class NcclCommunicator::Impl {
 public:
  Impl(MpiCommunicator& mpi, std::unique_ptr<MpiCommunicator> owned_mpi, int device, double timeout)
      : mpi_(&mpi), owned_mpi_(std::move(owned_mpi)), rank_(mpi.rank()), size_(mpi.size()),
        device_(device), timeout_seconds_(timeout) {
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  }
  ~Impl();
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  // Everything that can fail; the destructor cleans up whatever it got to.
  void Init();

  void AllReduce(torch::Tensor& tensor, ReduceOp op);
  torch::Tensor AllToAll(const torch::Tensor& send, const std::vector<int64_t>& send_splits,
                         const std::vector<int64_t>& recv_splits);
  std::vector<int64_t> AllToAllCounts(const std::vector<int64_t>& counts);
  torch::Tensor AllGather(const torch::Tensor& tensor);
  void Broadcast(torch::Tensor& tensor, int root);
  void Barrier();
  void Synchronize();
  // The MPI half of Split(): this rank's MPI sub-communicator, or nullptr.
  std::unique_ptr<MpiCommunicator> SplitMpi(int color, int key);

  // ncclCommAbort on a background thread, once; records `why` for later calls. Returns the
  // abort, which callers wait for with a bound (see AbortAndWait). Never blocks for long: it
  // takes no lock that an NCCL call holds.
  std::shared_ptr<BackgroundTask> BeginAbort(const std::string& why);
  // BeginAbort, then waits kAbortGrace for it; ends the process if ncclCommAbort is stuck.
  void AbortAndWait(const std::string& why);
  bool aborted() const { return aborted_.load(); }
  std::string Describe(const char* op, const std::string& what) const;

  // Every communicator of this process that is alive, for AbortAllNcclCommunicators.
  static std::mutex& LiveMutex();
  static std::set<Impl*>& Live();

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  double timeout_seconds() const { return timeout_seconds_.load(); }
  void set_timeout_seconds(double s) {
    TORCH_CHECK(std::isfinite(s) && s >= 0, "NcclCommunicator: timeout must be >= 0, got ", s);
    timeout_seconds_ = s;
  }

 private:
  class Group;

  // The NCCL communicator and the lock that every use of it holds. Shared with the background
  // abort, which takes the handle (under the lock) before calling ncclCommAbort and may
  // outlive this Impl. Whoever holds the lock and finds the communicator not aborted may call
  // NCCL on it: the abort cannot free it meanwhile.
  struct CommHandle {
    std::mutex mutex;
    ncclComm_t comm = nullptr;  // nullptr before creation, once aborted, once destroyed
  };

  // One operation the watchdog watches: events recorded on the stream before and after its
  // NCCL calls.
  struct Watched {
    cudaEvent_t start;
    cudaEvent_t end;
    const char* op;
    RunningTime running;
  };

  cudaStream_t stream() const { return stream_->stream(); }
  cudaStream_t current_stream() const {
    return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
  }

  [[noreturn]] void Throw(const char* op, const std::string& what, int code) const;
  void CheckNccl(ncclResult_t rc, const char* call, const char* op);
  void CheckCuda(cudaError_t rc, const char* call, const char* op);
  static std::string NcclDetail(ncclResult_t rc);

  // Aborts the communicator and throws, for an NCCL failure, an asynchronous error or a timeout.
  [[noreturn]] void Fail(const char* op, const std::string& what, int code);
  // Throws if the communicator was aborted (or, `comm` given, no longer exists).
  void ThrowIfAborted(const char* op) const;
  // Throws if the communicator was aborted or NCCL holds an asynchronous error.
  void CheckAlive(const char* op);
  // `call(comm)` with the communicator's lock held (already held inside a Group), after
  // checking that it was not aborted; returns what the NCCL call returned.
  template <typename Call>
  ncclResult_t OnComm(const char* op, Call&& call);
  // One poll of ncclCommGetAsyncError: true when the queued NCCL work is in flight (ncclSuccess),
  // false while NCCL is still queueing it (ncclInProgress); fails on anything else.
  bool PollNccl(const char* op);
  void CheckDeadline(const char* op, const Deadline& deadline, const char* waiting);
  static void Backoff(int spins);
  // Polls until NCCL has queued the last call (non-blocking communicators; a no-op otherwise).
  void WaitQueued(const char* op, const Deadline& deadline);
  void WaitQueued(const char* op) { WaitQueued(op, Deadline::StartingNow(timeout_seconds())); }
  // Polls until `event` has completed on the GPU.
  void WaitEvent(const char* op, cudaEvent_t event, const Deadline& deadline, const char* waiting);
  void WaitEvent(const char* op, cudaEvent_t event, const char* waiting) {
    WaitEvent(op, event, Deadline::StartingNow(timeout_seconds()), waiting);
  }
  // The destructor's orderly end: waits for the queued work, ncclCommFinalize, ncclCommDestroy,
  // all within one timeout; aborts instead when a wait fails.
  void Close();

  void CheckTensor(const torch::Tensor& tensor, const char* op) const;
  std::string TensorProblem(const torch::Tensor& tensor, const char* op, bool needs_rows) const;

  // Our stream waits for the work queued so far on the current stream.
  void OrderAfterCurrent(const char* op);
  // The current stream waits for the work queued so far on ours.
  void OrderBeforeCurrent(const char* op);
  // The caching allocator will not reuse `t`'s memory before our stream is done with it.
  void KeepAlive(const torch::Tensor& t) const;
  // An event from the spares (or a new one), recorded on our stream now.
  cudaEvent_t RecordEvent(const char* op);
  void ReturnEvent(cudaEvent_t event);
  // Hands the work queued on our stream since `start` was recorded to the watchdog.
  void Watch(const char* op, cudaEvent_t start);

  // How every collective runs, after its argument checks and CheckAlive: on our device, our
  // stream waits for the current one, `tensors` are kept alive for our stream, `enqueue()`
  // queues the NCCL calls (and copies) on stream() and NCCL finishes queueing them
  // (WaitQueued). With `watch` (work the host does not wait for) the watchdog gets it, and the
  // current stream waits for it; returns without waiting for the GPU.
  template <typename Enqueue>
  void Queue(const char* op, std::initializer_list<torch::Tensor> tensors, bool watch,
             Enqueue&& enqueue);
  template <typename Enqueue>
  void Collective(const char* op, std::initializer_list<torch::Tensor> tensors, Enqueue&& enqueue) {
    Queue(op, tensors, /*watch=*/true, std::forward<Enqueue>(enqueue));
  }
  // In one NCCL group, `send(to)` and `recv(from)` for every other rank, paired so that no two
  // ranks wait on each other (rank + i sends, rank - i receives); then WaitQueued, so that
  // whatever the caller queues next on our stream comes after the group.
  template <typename Send, typename Recv>
  void WithEveryPeer(const char* op, Send&& send, Recv&& recv);
  // ncclSend / ncclRecv of `bytes` bytes on our stream; nothing for 0 bytes.
  void SendBytes(const char* op, const void* data, int64_t bytes, int peer);
  void RecvBytes(const char* op, void* data, int64_t bytes, int peer);
  // A device-to-device copy on our stream; nothing for 0 bytes.
  void CopyOnStream(const char* op, void* dst, const void* src, int64_t bytes);

  // Pinned host and device int64 buffers of at least `elements` each.
  void EnsureBuffers(const char* op, size_t elements);
  // AllToAll (`gather` false: values.size() = k * size(), the k values for rank r go to rank r)
  // or AllGather (`gather` true: every rank's values, in rank order) of host int64 values, through
  // the device; waits for the result.
  std::vector<int64_t> HostExchange(const char* op, const std::vector<int64_t>& values, bool gather);
  // Every rank's CollectiveMeta, in rank order (through HostExchange).
  std::vector<CollectiveMeta> ExchangeMeta(const char* op, const CollectiveMeta& local);

  void WatchdogLoop();
  // Under watch_mutex_: drops the finished operations from the front of watched_ and polls
  // the oldest unfinished one. Returns a problem to die of (a failed event query, or the
  // oldest operation running past the timeout), or "".
  std::string PollWatched(const char** op);
  // ncclCommGetAsyncError for the watchdog, without waiting for the lock: "" when fine, busy or
  // aborted.
  std::string WatchdogAsyncError();
  [[noreturn]] void Die(const char* op, const std::string& what);

  MpiCommunicator* mpi_;
  std::unique_ptr<MpiCommunicator> owned_mpi_;
  int rank_;
  int size_;
  int world_rank_ = -1;
  int device_;
  std::atomic<double> timeout_seconds_;

  std::shared_ptr<CommHandle> handle_ = std::make_shared<CommHandle>();
  std::optional<c10::cuda::CUDAStream> stream_;  // SharedNcclStream(device_)
  cudaEvent_t ready_ = nullptr;  // recorded on the current stream, waited on by ours
  cudaEvent_t done_ = nullptr;   // recorded on ours, waited on by the current stream
  cudaEvent_t host_ = nullptr;   // what the host waits for
  int64_t* pinned_ = nullptr;
  size_t pinned_elements_ = 0;
  torch::Tensor scratch_;  // int64, on device_, allocated on our stream

  // Between ncclGroupStart and ncclGroupEnd (a Group holds handle_->mutex): NCCL calls use the
  // communicator without locking again, and their failures are left to the Group.
  bool in_group_ = false;
  std::atomic<bool> aborted_{false};
  mutable std::mutex failure_mutex_;
  std::string failure_;                          // why it was aborted (under failure_mutex_)
  std::shared_ptr<BackgroundTask> abort_task_;   // under failure_mutex_

  std::mutex watch_mutex_;
  std::condition_variable watch_cv_;
  std::deque<Watched> watched_;
  std::vector<cudaEvent_t> spare_events_;
  bool stop_ = false;
  std::thread watchdog_;
};

// ncclGroupStart .. ncclGroupEnd, holding the communicator's lock all along (NCCL keeps the
// group's operations on the communicator until ncclGroupEnd launches them, so an abort in
// between would leave ncclGroupEnd a freed communicator). End() launches the group.
//
// A failure half-way (an NCCL call that fails, any exception between start and End()) must
// not launch the operations queued so far: the peers would receive some of our sends and wait
// forever for the rest. NCCL launches nothing at ncclGroupEnd once an NCCL call inside the
// group has failed its checks (it records the failure, ncclGroupError, and ncclGroupEnd only
// frees the group's operations). So the destructor of a group left open makes one such
// failing call, ends the group (this thread's group depth must return to 0, or every later
// NCCL call of the thread would be swallowed by a group that never ends), releases the lock
// and aborts the communicator: the other ranks' halves of the group cannot complete.
class NcclCommunicator::Impl::Group {
 public:
  Group(Impl& impl, const char* op);
  void End();
  ~Group();
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

 private:
  // An NCCL call that fails its argument checks and touches no communicator state that
  // matters (NCCL >= 2.14: a null communicator; before, an invalid peer on ours).
  void MakeNcclDropTheGroup();

  Impl& impl_;
  const char* op_;
  std::unique_lock<std::mutex> lock_;
};

// ---- errors and aborts ----------------------------------------------------------------------

std::string NcclCommunicator::Impl::Describe(const char* op, const std::string& what) const {
  std::ostringstream message;
  message << "rank " << world_rank_ << ": NcclCommunicator::" << op << ": " << what;
  return message.str();
}

void NcclCommunicator::Impl::Throw(const char* op, const std::string& what, int code) const {
  throw NcclError(Describe(op, what), code, world_rank_);
}

std::string NcclCommunicator::Impl::NcclDetail(ncclResult_t rc) {
  std::string detail = ncclGetErrorString(rc);
#if RMOE_NCCL_HAS_LAST_ERROR
  // The communicator argument is unused by NCCL (the text is per thread): passing none keeps
  // this safe on an aborted communicator.
  const char* last = ncclGetLastError(nullptr);
  if (last != nullptr && *last != '\0') detail += std::string(" (") + last + ")";
#endif
  return detail;
}

void NcclCommunicator::Impl::CheckNccl(ncclResult_t rc, const char* call, const char* op) {
  if (rc == ncclSuccess) return;
#if RMOE_NCCL_NONBLOCKING
  if (rc == ncclInProgress) return;  // non-blocking: WaitQueued polls for the outcome
#endif
  const std::string what = CallName(call) + " failed: " + NcclDetail(rc);
  // Inside a group the lock is held, so the abort must wait for the Group's destructor,
  // which drops the group and aborts.
  if (in_group_) {
    Throw(op, what + " (inside an NCCL group: none of the group runs, and the NCCL communicator "
                     "is aborted)", rc);
  }
  // Even a bad argument aborts: the other ranks have queued their side of the operation and
  // would wait for ours forever (and a non-blocking communicator records the failure as its
  // asynchronous error anyway).
  Fail(op, what, rc);
}

void NcclCommunicator::Impl::CheckCuda(cudaError_t rc, const char* call, const char* op) {
  if (rc == cudaSuccess) return;
  Throw(op, CallName(call) + " failed: " + CudaErrorString(rc), rc);
}

std::shared_ptr<BackgroundTask> NcclCommunicator::Impl::BeginAbort(const std::string& why) {
  std::lock_guard<std::mutex> lock(failure_mutex_);
  if (abort_task_) return abort_task_;
  failure_ = why;
  // Before the abort starts: whoever takes the communicator's lock from now on sees it.
  aborted_ = true;
  abort_task_ = BackgroundTask::Start([handle = handle_] {
    ncclComm_t comm = nullptr;
    {
      std::lock_guard<std::mutex> comm_lock(handle->mutex);  // waits for a call in progress
      std::swap(comm, handle->comm);
    }
    if (comm != nullptr) (void)ncclCommAbort(comm);
  });
  return abort_task_;
}

void NcclCommunicator::Impl::AbortAndWait(const std::string& why) {
  std::shared_ptr<BackgroundTask> abort = BeginAbort(why);
  WaitOrEndProcess(*abort, kAbortGrace,
                   "rank " + std::to_string(world_rank_) + ": ncclCommAbort (after: " + why + ")");
}

void NcclCommunicator::Impl::Fail(const char* op, const std::string& what, int code) {
  AbortAndWait(Describe(op, what));
  Throw(op, what + " (the NCCL communicator was aborted)", code);
}

void NcclCommunicator::Impl::ThrowIfAborted(const char* op) const {
  if (!aborted_) return;
  std::string failure;
  {
    std::lock_guard<std::mutex> lock(failure_mutex_);
    failure = failure_;
  }
  Throw(op, "the communicator was aborted after an earlier error: " + failure, ncclInvalidUsage);
}

void NcclCommunicator::Impl::CheckAlive(const char* op) {
  ThrowIfAborted(op);
  (void)PollNccl(op);
}

template <typename Call>
ncclResult_t NcclCommunicator::Impl::OnComm(const char* op, Call&& call) {
  if (in_group_) return call(handle_->comm);  // the Group holds the lock and checked
  std::unique_lock<std::mutex> lock(handle_->mutex);
  ThrowIfAborted(op);
  if (handle_->comm == nullptr) {
    Throw(op, "the NCCL communicator was destroyed, or never created", ncclInvalidUsage);
  }
  return call(handle_->comm);
}

// An NCCL call that uses the communicator (as `comm`), through OnComm, checked.
#define RMOE_NCCL_COMM_CHECK(op, call) \
  CheckNccl(OnComm((op), [&](ncclComm_t comm) { return (call); }), #call, (op))

bool NcclCommunicator::Impl::PollNccl(const char* op) {
  ncclResult_t state = ncclSuccess;
  RMOE_NCCL_COMM_CHECK(op, ncclCommGetAsyncError(comm, &state));
  if (state == ncclSuccess) return true;
#if RMOE_NCCL_NONBLOCKING
  if (state == ncclInProgress) return false;
#endif
  Fail(op, std::string("NCCL reported an asynchronous error (a peer may have died, or the network ") +
               "failed): " + NcclDetail(state),
       state);
}

void NcclCommunicator::Impl::CheckDeadline(const char* op, const Deadline& deadline,
                                           const char* waiting) {
  const auto now = Clock::now();
  if (!deadline.Passed(now)) return;
  std::ostringstream what;
  what << "timed out after " << deadline.ElapsedSeconds(now) << " s " << waiting
       << " (RMOE_NCCL_TIMEOUT_S = " << deadline.timeout_seconds()
       << "; a peer may have died, or not called the same collective)";
  Fail(op, what.str(), 0);
}

void NcclCommunicator::Impl::Backoff(int spins) {
  // Spin briefly (host round trips on the MoE path take microseconds), then sleep a little.
  if (spins < 2000) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void NcclCommunicator::Impl::WaitQueued(const char* op, const Deadline& deadline) {
#if RMOE_NCCL_NONBLOCKING
  for (int spins = 0; !PollNccl(op); ++spins) {
    CheckDeadline(op, deadline, "waiting for NCCL to queue the operation");
    Backoff(spins);
  }
#else
  (void)op;
  (void)deadline;
#endif
}

void NcclCommunicator::Impl::WaitEvent(const char* op, cudaEvent_t event, const Deadline& deadline,
                                       const char* waiting) {
  for (int spins = 0;; ++spins) {
    const cudaError_t q = cudaEventQuery(event);
    if (q == cudaSuccess) return;
    if (q != cudaErrorNotReady) CheckCuda(q, "cudaEventQuery", op);
    (void)cudaGetLastError();  // not ready is not an error: clear it
    (void)PollNccl(op);
    CheckDeadline(op, deadline, waiting);
    Backoff(spins);
  }
}

// ---- groups ---------------------------------------------------------------------------------

NcclCommunicator::Impl::Group::Group(Impl& impl, const char* op)
    : impl_(impl), op_(op), lock_(impl.handle_->mutex) {
  impl_.ThrowIfAborted(op_);
  if (impl_.handle_->comm == nullptr) {
    impl_.Throw(op_, "the NCCL communicator was destroyed, or never created", ncclInvalidUsage);
  }
  const ncclResult_t rc = ncclGroupStart();
  if (rc != ncclSuccess) {
    lock_.unlock();  // CheckNccl aborts, which needs the lock
    impl_.CheckNccl(rc, "ncclGroupStart()", op_);
  }
  impl_.in_group_ = true;
}

void NcclCommunicator::Impl::Group::End() {
  const ncclResult_t rc = ncclGroupEnd();
  impl_.in_group_ = false;
  lock_.unlock();
  impl_.CheckNccl(rc, "ncclGroupEnd()", op_);
}

void NcclCommunicator::Impl::Group::MakeNcclDropTheGroup() {
#if RMOE_NCCL_NONBLOCKING
  (void)ncclSend(nullptr, 0, ncclUint8, 0, nullptr, impl_.stream());
#else
  // Before 2.14 NCCL returns before recording a null communicator in the group.
  (void)ncclSend(nullptr, 1, ncclUint8, -1, impl_.handle_->comm, impl_.stream());
#endif
}

NcclCommunicator::Impl::Group::~Group() {
  if (!impl_.in_group_) return;  // ended, or never started
  MakeNcclDropTheGroup();
  (void)ncclGroupEnd();
  impl_.in_group_ = false;
  lock_.unlock();
  try {
    impl_.AbortAndWait(impl_.Describe(
        op_, "an operation inside an NCCL group failed; none of the group ran, and the other "
             "ranks' part of it cannot complete"));
  } catch (const std::exception& e) {  // could not even start the abort (no thread)
    std::fprintf(stderr, "%s\n", e.what());
  }
}

// ---- set-up and tear-down -------------------------------------------------------------------

std::mutex& NcclCommunicator::Impl::LiveMutex() {
  static auto* mutex = new std::mutex();  // never destroyed: usable during exit
  return *mutex;
}

std::set<NcclCommunicator::Impl*>& NcclCommunicator::Impl::Live() {
  static auto* live = new std::set<Impl*>();
  return *live;
}

void NcclCommunicator::Impl::Init() {
  constexpr const char* kOp = "Create";
  const std::string version_problem = NcclVersionProblem(
      NcclCommunicator::CompiledNcclVersion(), NcclCommunicator::RuntimeNcclVersion(),
      LoadedNcclPath());
  if (!version_problem.empty()) Throw(kOp, version_problem, ncclInvalidUsage);
  int count = 0;
  RMOE_CUDA_CHECK(kOp, cudaGetDeviceCount(&count));
  TORCH_CHECK(device_ >= 0 && device_ < count, "NcclCommunicator: CUDA device ", device_,
              " does not exist (", count, " visible)");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  stream_ = SharedNcclStream(device_);
  RMOE_CUDA_CHECK(kOp, cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  RMOE_CUDA_CHECK(kOp, cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  RMOE_CUDA_CHECK(kOp, cudaEventCreateWithFlags(&host_, cudaEventDisableTiming));

  // Rank 0 makes the unique id and broadcasts it over MPI, with a flag saying whether it could,
  // so that a failure there makes every rank throw instead of waiting in ncclCommInitRank.
  struct {
    int64_t ok = 0;
    ncclUniqueId id;
  } boot;
  std::memset(&boot.id, 0, sizeof(boot.id));
  ncclResult_t id_rc = ncclSuccess;
  if (rank_ == 0) {
    id_rc = ncclGetUniqueId(&boot.id);
    boot.ok = id_rc == ncclSuccess;
  }
  const int mpi_rc = MPI_Bcast(&boot, static_cast<int>(sizeof(boot)), MPI_BYTE, 0, mpi_->comm());
  if (mpi_rc != MPI_SUCCESS) {
    throw MpiError(Describe(kOp, "MPI_Bcast failed: " + MpiErrorString(mpi_rc)), mpi_rc,
                   world_rank_);
  }
  if (!boot.ok) {
    if (rank_ == 0) Throw(kOp, std::string("ncclGetUniqueId failed: ") + ncclGetErrorString(id_rc), id_rc);
    Throw(kOp, "rank 0 of this communicator could not create the NCCL unique id (it reports why)",
          ncclSystemError);
  }

  ncclComm_t comm = nullptr;
#if RMOE_NCCL_NONBLOCKING
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every wait is a poll with a deadline: see the header
  const ncclResult_t init_rc = ncclCommInitRankConfig(&comm, size_, boot.id, rank_, &config);
#else
  const ncclResult_t init_rc = ncclCommInitRank(&comm, size_, boot.id, rank_);
#endif
  if (init_rc == ncclSuccess || init_rc == ncclInProgress) {
    std::lock_guard<std::mutex> lock(handle_->mutex);
    handle_->comm = comm;  // from here on only through the lock
  }
  CheckNccl(init_rc, "ncclCommInitRank", kOp);
  WaitQueued(kOp);
  {
    std::lock_guard<std::mutex> lock(LiveMutex());
    Live().insert(this);
  }
  watchdog_ = std::thread([this] { WatchdogLoop(); });
}

void NcclCommunicator::Impl::Close() {
  constexpr const char* kOp = "~NcclCommunicator";
  // One deadline for every wait here: a dead peer costs one timeout, not one per wait.
  const Deadline deadline = Deadline::StartingNow(timeout_seconds());
  try {
    // Let the queued work finish (a dead peer: the wait times out and aborts).
    RMOE_CUDA_CHECK(kOp, cudaEventRecord(host_, stream()));
    WaitEvent(kOp, host_, deadline, "waiting for the queued work before destroying the communicator");
#if RMOE_NCCL_NONBLOCKING
    RMOE_NCCL_COMM_CHECK(kOp, ncclCommFinalize(comm));
    WaitQueued(kOp, deadline);
#endif
    ncclComm_t comm = nullptr;
    {
      std::lock_guard<std::mutex> lock(handle_->mutex);
      std::swap(comm, handle_->comm);
    }
    if (comm != nullptr) (void)ncclCommDestroy(comm);
  } catch (const std::exception& e) {
    // Timeouts and NCCL failures have aborted the communicator already; a CUDA failure has not.
    std::fprintf(stderr, "%s\n", e.what());
    AbortAndWait(e.what());
  }
}

NcclCommunicator::Impl::~Impl() {
  {
    std::lock_guard<std::mutex> lock(LiveMutex());
    Live().erase(this);
  }
  {
    std::lock_guard<std::mutex> lock(watch_mutex_);
    stop_ = true;
  }
  watch_cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  if (!stream_) return;  // Init() failed before it created anything on the device

  // cudaSetDevice, not CUDAGuard: nothing here may throw.
  int previous_device = -1;
  (void)cudaGetDevice(&previous_device);
  (void)cudaSetDevice(device_);
  bool has_comm = false;
  {
    std::lock_guard<std::mutex> lock(handle_->mutex);
    has_comm = handle_->comm != nullptr;
  }
  // After an abort (ours, or AbortAllNcclCommunicators) nothing is waited for.
  if (has_comm && !aborted_) Close();
  {
    std::lock_guard<std::mutex> lock(watch_mutex_);
    for (const Watched& w : watched_) {
      (void)cudaEventDestroy(w.start);
      (void)cudaEventDestroy(w.end);
    }
    for (cudaEvent_t e : spare_events_) (void)cudaEventDestroy(e);
    watched_.clear();
    spare_events_.clear();
  }
  for (cudaEvent_t e : {ready_, done_, host_}) {
    if (e != nullptr) (void)cudaEventDestroy(e);
  }
  if (pinned_ != nullptr) (void)cudaFreeHost(pinned_);
  scratch_.reset();
  if (previous_device >= 0) (void)cudaSetDevice(previous_device);
}

// ---- streams, buffers, watchdog -------------------------------------------------------------

void NcclCommunicator::Impl::OrderAfterCurrent(const char* op) {
  RMOE_CUDA_CHECK(op, cudaEventRecord(ready_, current_stream()));
  RMOE_CUDA_CHECK(op, cudaStreamWaitEvent(stream(), ready_, 0));
}

void NcclCommunicator::Impl::OrderBeforeCurrent(const char* op) {
  RMOE_CUDA_CHECK(op, cudaEventRecord(done_, stream()));
  RMOE_CUDA_CHECK(op, cudaStreamWaitEvent(current_stream(), done_, 0));
}

void NcclCommunicator::Impl::KeepAlive(const torch::Tensor& t) const {
  if (!t.defined() || !t.has_storage()) return;
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), *stream_);
}

cudaEvent_t NcclCommunicator::Impl::RecordEvent(const char* op) {
  cudaEvent_t event = nullptr;
  {
    std::lock_guard<std::mutex> lock(watch_mutex_);
    if (!spare_events_.empty()) {
      event = spare_events_.back();
      spare_events_.pop_back();
    }
  }
  if (event == nullptr) RMOE_CUDA_CHECK(op, cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  const cudaError_t rc = cudaEventRecord(event, stream());
  if (rc != cudaSuccess) {
    ReturnEvent(event);
    CheckCuda(rc, "cudaEventRecord", op);
  }
  return event;
}

void NcclCommunicator::Impl::ReturnEvent(cudaEvent_t event) {
  if (event == nullptr) return;
  std::lock_guard<std::mutex> lock(watch_mutex_);
  spare_events_.push_back(event);
}

void NcclCommunicator::Impl::Watch(const char* op, cudaEvent_t start) {
  cudaEvent_t end = nullptr;
  try {
    end = RecordEvent(op);
  } catch (...) {
    ReturnEvent(start);
    throw;
  }
  std::lock_guard<std::mutex> lock(watch_mutex_);
  watched_.push_back(Watched{start, end, op, RunningTime()});
}

void NcclCommunicator::Impl::EnsureBuffers(const char* op, size_t elements) {
  if (pinned_elements_ < elements) {
    const size_t capacity = std::max<size_t>(256, 2 * elements);
    if (pinned_ != nullptr) RMOE_CUDA_CHECK(op, cudaFreeHost(pinned_));
    pinned_ = nullptr;
    pinned_elements_ = 0;
    void* p = nullptr;
    RMOE_CUDA_CHECK(op, cudaHostAlloc(&p, capacity * sizeof(int64_t), cudaHostAllocDefault));
    pinned_ = static_cast<int64_t*>(p);
    pinned_elements_ = capacity;
  }
  if (!scratch_.defined() || scratch_.numel() < static_cast<int64_t>(elements)) {
    // Allocated while our stream is current, so the block belongs to it.
    c10::cuda::CUDAStreamGuard on_ours(*stream_);
    scratch_ = torch::empty({static_cast<int64_t>(std::max<size_t>(256, 2 * elements))},
                            torch::TensorOptions(torch::kLong).device(torch::kCUDA, device_));
  }
}

std::string NcclCommunicator::Impl::PollWatched(const char** op) {
  const auto now = Clock::now();
  // Work on one stream completes in order: drop what has finished from the front. Only the
  // front can have started: a later operation's start event follows the front's kernels.
  while (!watched_.empty()) {
    Watched& oldest = watched_.front();
    *op = oldest.op;
    const cudaError_t end = cudaEventQuery(oldest.end);
    if (end == cudaSuccess) {
      spare_events_.push_back(oldest.start);
      spare_events_.push_back(oldest.end);
      watched_.pop_front();
      continue;
    }
    if (end != cudaErrorNotReady) return "cudaEventQuery failed: " + CudaErrorString(end);
    (void)cudaGetLastError();
    const cudaError_t start = cudaEventQuery(oldest.start);
    if (start != cudaSuccess && start != cudaErrorNotReady) {
      return "cudaEventQuery failed: " + CudaErrorString(start);
    }
    (void)cudaGetLastError();
    const double running = oldest.running.Poll(start == cudaSuccess, now);
    const double timeout = timeout_seconds_.load();
    if (!Overdue(running, timeout)) return "";
    std::ostringstream what;
    what << "not finished " << running << " s after it started on the GPU (RMOE_NCCL_TIMEOUT_S = "
         << timeout << "; a peer may have died, or not called the same collective)";
    return what.str();
  }
  return "";
}

std::string NcclCommunicator::Impl::WatchdogAsyncError() {
  // try_lock: the watchdog must keep watching even while a (blocking) NCCL call holds the lock.
  std::unique_lock<std::mutex> lock(handle_->mutex, std::try_to_lock);
  if (!lock.owns_lock() || aborted_ || handle_->comm == nullptr) return "";
  ncclResult_t state = ncclSuccess;
  const ncclResult_t rc = ncclCommGetAsyncError(handle_->comm, &state);
  lock.unlock();
  if (rc != ncclSuccess) return std::string("ncclCommGetAsyncError failed: ") + ncclGetErrorString(rc);
  if (state == ncclSuccess) return "";
#if RMOE_NCCL_NONBLOCKING
  if (state == ncclInProgress) return "";
#endif
  return "NCCL reported an asynchronous error (a peer may have died, or the network failed): " +
         NcclDetail(state);
}

void NcclCommunicator::Impl::WatchdogLoop() {
  // cudaEventQuery needs this thread to use the communicator's device.
  const cudaError_t rc = cudaSetDevice(device_);
  if (rc != cudaSuccess) {
    std::fprintf(stderr, "rank %d: NcclCommunicator: watchdog: cudaSetDevice failed: %s; no watchdog\n",
                 world_rank_, CudaErrorString(rc).c_str());
    return;
  }
  std::unique_lock<std::mutex> lock(watch_mutex_);
  while (!stop_) {
    watch_cv_.wait_for(lock, kWatchdogPeriod);
    if (stop_) break;
    if (aborted_) return;  // whoever aborted it reports why
    const char* op = "";
    std::string problem = PollWatched(&op);
    if (watched_.empty() && problem.empty()) continue;
    lock.unlock();
    // An asynchronous error is worth reporting first: it says why the operation is late.
    const std::string async_error = WatchdogAsyncError();
    if (!async_error.empty()) problem = async_error;
    if (!problem.empty() && !aborted_) Die(op, problem);
    lock.lock();
  }
}

void NcclCommunicator::Impl::Die(const char* op, const std::string& what) {
  std::fprintf(stderr,
               "rank %d: NcclCommunicator::%s: %s; watchdog: aborting the NCCL communicator and "
               "ending this process\n",
               world_rank_, op, what.c_str());
  std::fflush(stderr);
  AbortAndWait(Describe(op, what));  // ends the process itself if ncclCommAbort is stuck
  std::fflush(stdout);
  // Not MPI_Abort: only the main thread may call MPI. mpirun ends the job when a rank exits
  // without MPI_Finalize.
  std::_Exit(1);
}

// ---- argument checks ------------------------------------------------------------------------

std::string NcclCommunicator::Impl::TensorProblem(const torch::Tensor& tensor, const char* op,
                                                  bool needs_rows) const {
  return TensorArgumentProblem(
      "NcclCommunicator", op, tensor, needs_rows,
      [this](const torch::Tensor& t) { return t.is_cuda() && t.device().index() == device_; },
      "this communicator communicates tensors on cuda:" + std::to_string(device_) +
          " (CPU tensors go through the MPI communicator)");
}

void NcclCommunicator::Impl::CheckTensor(const torch::Tensor& tensor, const char* op) const {
  const std::string problem = TensorProblem(tensor, op, /*needs_rows=*/false);
  TORCH_CHECK(problem.empty(), problem);
}

// ---- the shape of every collective ----------------------------------------------------------

template <typename Enqueue>
void NcclCommunicator::Impl::Queue(const char* op, std::initializer_list<torch::Tensor> tensors,
                                   bool watch, Enqueue&& enqueue) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  OrderAfterCurrent(op);
  for (const torch::Tensor& t : tensors) KeepAlive(t);
  // After the wait for the current stream: it completes when the operation starts running.
  cudaEvent_t start = watch ? RecordEvent(op) : nullptr;
  try {
    enqueue();
    WaitQueued(op);
  } catch (...) {
    ReturnEvent(start);
    throw;
  }
  if (!watch) return;
  Watch(op, start);
  OrderBeforeCurrent(op);
}

template <typename Send, typename Recv>
void NcclCommunicator::Impl::WithEveryPeer(const char* op, Send&& send, Recv&& recv) {
  if (size_ == 1) return;
  Group group(*this, op);
  for (int i = 1; i < size_; ++i) {
    send((rank_ + i) % size_);
    recv((rank_ - i + size_) % size_);
  }
  group.End();
  WaitQueued(op);
}

void NcclCommunicator::Impl::SendBytes(const char* op, const void* data, int64_t bytes, int peer) {
  if (bytes <= 0) return;
  RMOE_NCCL_COMM_CHECK(op, ncclSend(data, static_cast<size_t>(bytes), ncclUint8, peer, comm, stream()));
}

void NcclCommunicator::Impl::RecvBytes(const char* op, void* data, int64_t bytes, int peer) {
  if (bytes <= 0) return;
  RMOE_NCCL_COMM_CHECK(op, ncclRecv(data, static_cast<size_t>(bytes), ncclUint8, peer, comm, stream()));
}

void NcclCommunicator::Impl::CopyOnStream(const char* op, void* dst, const void* src, int64_t bytes) {
  if (bytes <= 0) return;
  RMOE_CUDA_CHECK(op, cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice,
                                      stream()));
}

// ---- collectives ----------------------------------------------------------------------------

void NcclCommunicator::Impl::AllReduce(torch::Tensor& tensor, ReduceOp op) {
  constexpr const char* kOp = "AllReduce";
  CheckTensor(tensor, kOp);
  const c10::ScalarType dtype = tensor.scalar_type();
  const std::optional<Reduction> reduction = ReductionFor(dtype);
  TORCH_CHECK(reduction.has_value(), "NcclCommunicator::AllReduce: unsupported dtype ", dtype);
  TORCH_CHECK(op == ReduceOp::kSum || at::isFloatingType(dtype),
              "NcclCommunicator::AllReduce: ReduceOp::kAvg needs a floating-point tensor, got ",
              dtype, " (use kSum and divide as the caller needs)");
  CheckAlive(kOp);
  if (tensor.numel() == 0) return;

  torch::NoGradGuard no_grad;
  torch::Tensor work = reduction->work_dtype != dtype ? tensor.to(reduction->work_dtype)
                                                      : tensor.contiguous();
  ncclRedOp_t nccl_op = reduction->sum;
  bool divide = op == ReduceOp::kAvg;
#if RMOE_NCCL_HAS_AVG
  if (op == ReduceOp::kAvg) {
    nccl_op = ncclAvg;
    divide = false;
  }
#endif
  Collective(kOp, {work}, [&] {
    RMOE_NCCL_COMM_CHECK(kOp, ncclAllReduce(work.data_ptr(), work.data_ptr(),
                                            static_cast<size_t>(work.numel()), reduction->type,
                                            nccl_op, comm, stream()));
  });
  if (divide) work.div_(size_);
  if (!work.is_same(tensor)) tensor.copy_(work);
}

torch::Tensor NcclCommunicator::Impl::AllToAll(const torch::Tensor& send,
                                               const std::vector<int64_t>& send_splits,
                                               const std::vector<int64_t>& recv_splits) {
  constexpr const char* kOp = "AllToAll";
  std::string problem = TensorProblem(send, kOp, /*needs_rows=*/true);
  if (problem.empty()) {
    problem = SplitsProblem("NcclCommunicator", rank_, size_, send, send_splits, recv_splits);
  }
  // Checked on this rank only (see the header): no extra round trip on the hot path.
  TORCH_CHECK(problem.empty(), problem);
  CheckAlive(kOp);

  std::vector<int64_t> out_shape = send.sizes().vec();
  out_shape[0] = std::accumulate(recv_splits.begin(), recv_splits.end(), int64_t{0});
  torch::Tensor result = torch::empty(out_shape, send.options());
  const int64_t row_bytes = RowBytes(send);
  if (row_bytes == 0) return result;

  const AllToAllLayout layout = LayOutAllToAll(send_splits, recv_splits, row_bytes);
  if (layout.send_total == 0 && layout.recv_total == 0) return result;
  const std::vector<int64_t>& send_bytes = layout.send_bytes;
  const std::vector<int64_t>& recv_bytes = layout.recv_bytes;
  const std::vector<int64_t>& send_offsets = layout.send_offsets;
  const std::vector<int64_t>& recv_offsets = layout.recv_offsets;
  bool peers = false;  // anything to or from another rank
  for (int r = 0; r < size_; ++r) {
    if (r != rank_ && (send_bytes[r] > 0 || recv_bytes[r] > 0)) peers = true;
  }

  const torch::Tensor source = send.contiguous();
  const char* src = static_cast<const char*>(source.data_ptr());
  char* dst = static_cast<char*>(result.data_ptr());
  Collective(kOp, {source, result}, [&] {
    if (peers) {
      WithEveryPeer(
          kOp, [&](int to) { SendBytes(kOp, src + send_offsets[to], send_bytes[to], to); },
          [&](int from) { RecvBytes(kOp, dst + recv_offsets[from], recv_bytes[from], from); });
    }
    CopyOnStream(kOp, dst + recv_offsets[rank_], src + send_offsets[rank_], send_bytes[rank_]);
  });
  return result;
}

std::vector<int64_t> NcclCommunicator::Impl::HostExchange(const char* op,
                                                          const std::vector<int64_t>& values,
                                                          bool gather) {
  const size_t n_in = values.size();
  const size_t k = gather ? n_in : n_in / static_cast<size_t>(size_);
  const size_t n_out = gather ? n_in * static_cast<size_t>(size_) : n_in;
  const int64_t block = static_cast<int64_t>(k * sizeof(int64_t));
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  EnsureBuffers(op, n_in + n_out);
  std::memcpy(pinned_, values.data(), n_in * sizeof(int64_t));
  int64_t* in = scratch_.data_ptr<int64_t>();
  int64_t* out = in + n_in;
  RMOE_CUDA_CHECK(op, cudaMemcpyAsync(in, pinned_, n_in * sizeof(int64_t), cudaMemcpyHostToDevice,
                                      stream()));
  if (gather) {
    RMOE_NCCL_COMM_CHECK(op, ncclAllGather(in, out, k, ncclInt64, comm, stream()));
    WaitQueued(op);
  } else {
    WithEveryPeer(
        op, [&](int to) { SendBytes(op, in + to * k, block, to); },
        [&](int from) { RecvBytes(op, out + from * k, block, from); });
    CopyOnStream(op, out + rank_ * k, in + rank_ * k, block);
  }
  RMOE_CUDA_CHECK(op, cudaMemcpyAsync(pinned_ + n_in, out, n_out * sizeof(int64_t),
                                      cudaMemcpyDeviceToHost, stream()));
  RMOE_CUDA_CHECK(op, cudaEventRecord(host_, stream()));
  WaitEvent(op, host_, "waiting for the exchanged sizes");
  return std::vector<int64_t>(pinned_ + n_in, pinned_ + n_in + n_out);
}

std::vector<int64_t> NcclCommunicator::Impl::AllToAllCounts(const std::vector<int64_t>& counts) {
  constexpr const char* kOp = "AllToAllCounts";
  TORCH_CHECK(!counts.empty() && counts.size() % static_cast<size_t>(size_) == 0,
              "NcclCommunicator::AllToAllCounts: counts.size() = ", counts.size(),
              " must be a positive multiple of size() = ", size_);
  CheckAlive(kOp);
  return HostExchange(kOp, counts, /*gather=*/false);
}

std::vector<CollectiveMeta> NcclCommunicator::Impl::ExchangeMeta(const char* op,
                                                                 const CollectiveMeta& local) {
  std::vector<int64_t> mine(kCollectiveMetaFields);
  std::memcpy(mine.data(), &local, sizeof(local));
  const std::vector<int64_t> raw = HostExchange(op, mine, /*gather=*/true);
  static_assert(std::is_trivially_copyable_v<CollectiveMeta>);
  std::vector<CollectiveMeta> all(size_);
  std::memcpy(static_cast<void*>(all.data()), raw.data(), all.size() * sizeof(CollectiveMeta));
  return all;
}

torch::Tensor NcclCommunicator::Impl::AllGather(const torch::Tensor& tensor) {
  constexpr const char* kOp = "AllGather";
  const std::string problem = TensorProblem(tensor, kOp, /*needs_rows=*/true);
  const CollectiveMeta local = LocalMeta(problem, tensor);
  CheckAlive(kOp);
  const std::vector<CollectiveMeta> all = ExchangeMeta(kOp, local);
  CheckAgreement("NcclCommunicator", kOp, rank_, problem, local, all, "an invalid tensor");
  const int64_t row_bytes = local.row_bytes;
  const AllGatherLayout layout = LayOutAllGather(all, row_bytes);

  std::vector<int64_t> out_shape = tensor.sizes().vec();
  out_shape[0] = layout.total_rows;
  torch::Tensor result = torch::empty(out_shape, tensor.options());
  if (row_bytes == 0 || layout.total_rows == 0) return result;

  const torch::Tensor source = tensor.contiguous();
  const char* src = static_cast<const char*>(source.data_ptr());
  char* dst = static_cast<char*>(result.data_ptr());
  const std::vector<int64_t>& bytes = layout.bytes;
  const std::vector<int64_t>& offsets = layout.offsets;
  Collective(kOp, {source, result}, [&] {
    if (layout.even) {
      // Every rank knows every size, so all take the same path.
      RMOE_NCCL_COMM_CHECK(kOp, ncclAllGather(src, dst, static_cast<size_t>(bytes[rank_]),
                                              ncclUint8, comm, stream()));
      return;
    }
    WithEveryPeer(
        kOp, [&](int to) { SendBytes(kOp, src, bytes[rank_], to); },
        [&](int from) { RecvBytes(kOp, dst + offsets[from], bytes[from], from); });
    CopyOnStream(kOp, dst + offsets[rank_], src, bytes[rank_]);
  });
  return result;
}

void NcclCommunicator::Impl::Broadcast(torch::Tensor& tensor, int root) {
  constexpr const char* kOp = "Broadcast";
  CheckTensor(tensor, kOp);
  TORCH_CHECK(root >= 0 && root < size_, "NcclCommunicator::Broadcast: root ", root,
              " is not a rank of this communicator (size ", size_, ")");
  CheckAlive(kOp);
  if (tensor.numel() == 0) return;
  torch::NoGradGuard no_grad;
  torch::Tensor work = tensor.contiguous();
  const size_t bytes = static_cast<size_t>(work.numel()) * work.element_size();
  Collective(kOp, {work}, [&] {
    RMOE_NCCL_COMM_CHECK(kOp, ncclBroadcast(work.data_ptr(), work.data_ptr(), bytes, ncclUint8,
                                            root, comm, stream()));
  });
  if (!work.is_same(tensor) && rank_ != root) tensor.copy_(work);
}

void NcclCommunicator::Impl::Barrier() {
  constexpr const char* kOp = "Barrier";
  CheckAlive(kOp);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  EnsureBuffers(kOp, 1);
  int64_t* one = scratch_.data_ptr<int64_t>();  // its value does not matter
  Queue(kOp, {}, /*watch=*/false, [&] {
    RMOE_NCCL_COMM_CHECK(kOp, ncclAllReduce(one, one, 1, ncclInt64, ncclSum, comm, stream()));
  });
  RMOE_CUDA_CHECK(kOp, cudaEventRecord(host_, stream()));
  WaitEvent(kOp, host_, "waiting for every rank to reach the barrier");
}

void NcclCommunicator::Impl::Synchronize() {
  constexpr const char* kOp = "Synchronize";
  CheckAlive(kOp);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  RMOE_CUDA_CHECK(kOp, cudaEventRecord(host_, stream()));
  WaitEvent(kOp, host_, "waiting for the queued collectives");
}

std::unique_ptr<MpiCommunicator> NcclCommunicator::Impl::SplitMpi(int color, int key) {
  CheckAlive("Split");
  MPI_Comm part = MPI_COMM_NULL;
  const int rc = MPI_Comm_split(mpi_->comm(), color < 0 ? MPI_UNDEFINED : color, key, &part);
  if (rc != MPI_SUCCESS) {
    throw MpiError("rank " + std::to_string(world_rank_) +
                       ": NcclCommunicator::Split: MPI_Comm_split failed: " + MpiErrorString(rc),
                   rc, world_rank_);
  }
  if (part == MPI_COMM_NULL) return nullptr;
  try {
    return std::make_unique<MpiCommunicator>(part, /*owned=*/true);
  } catch (...) {
    MPI_Comm_free(&part);
    throw;
  }
}

// ---------------------------------------------------------------------------------------------
// NcclCommunicator

NcclCommunicator::NcclCommunicator(MpiCommunicator& mpi, int device)
    : impl_(std::make_unique<Impl>(mpi, nullptr, device, TimeoutFromEnv())) {
  impl_->Init();
}

NcclCommunicator::NcclCommunicator(std::unique_ptr<MpiCommunicator> owned_mpi, int device,
                                   double timeout_seconds) {
  MpiCommunicator& mpi = *owned_mpi;
  impl_ = std::make_unique<Impl>(mpi, std::move(owned_mpi), device, timeout_seconds);
  impl_->Init();
}

NcclCommunicator::~NcclCommunicator() = default;

void NcclCommunicator::Abort(const std::string& reason) {
  impl_->AbortAndWait(impl_->Describe("Abort", reason));
}

bool NcclCommunicator::aborted() const { return impl_->aborted(); }

int NcclCommunicator::rank() const { return impl_->rank(); }
int NcclCommunicator::size() const { return impl_->size(); }
int NcclCommunicator::device() const { return impl_->device(); }
double NcclCommunicator::timeout_seconds() const { return impl_->timeout_seconds(); }
void NcclCommunicator::set_timeout_seconds(double seconds) { impl_->set_timeout_seconds(seconds); }

void NcclCommunicator::AllReduce(torch::Tensor& tensor, ReduceOp op) { impl_->AllReduce(tensor, op); }

torch::Tensor NcclCommunicator::AllToAll(const torch::Tensor& send,
                                         const std::vector<int64_t>& send_splits,
                                         const std::vector<int64_t>& recv_splits) {
  return impl_->AllToAll(send, send_splits, recv_splits);
}

std::vector<int64_t> NcclCommunicator::AllToAllCounts(const std::vector<int64_t>& counts) {
  return impl_->AllToAllCounts(counts);
}

torch::Tensor NcclCommunicator::AllGather(const torch::Tensor& tensor) {
  return impl_->AllGather(tensor);
}

void NcclCommunicator::Broadcast(torch::Tensor& tensor, int root) { impl_->Broadcast(tensor, root); }
void NcclCommunicator::Barrier() { impl_->Barrier(); }
void NcclCommunicator::Synchronize() { impl_->Synchronize(); }

std::unique_ptr<Communicator> NcclCommunicator::Split(int color, int key) {
  std::unique_ptr<MpiCommunicator> part = impl_->SplitMpi(color, key);
  if (!part) return nullptr;
  return std::unique_ptr<NcclCommunicator>(
      new NcclCommunicator(std::move(part), impl_->device(), impl_->timeout_seconds()));
}

int NcclCommunicator::CompiledNcclVersion() { return NCCL_VERSION_CODE; }

int NcclCommunicator::RuntimeNcclVersion() {
  int version = 0;
  if (ncclGetVersion(&version) != ncclSuccess) return 0;
  return version;
}

std::string NcclLibraryPath() { return LoadedNcclPath(); }

std::string NcclBuildInfo() {
  // CUDART_VERSION and cudaRuntimeGetVersion: major * 1000 + minor * 10.
  auto cuda = [](int code) {
    return std::to_string(code / 1000) + "." + std::to_string(code % 1000 / 10);
  };
  int runtime = 0;
  const std::string loaded_cuda =
      cudaRuntimeGetVersion(&runtime) == cudaSuccess ? cuda(runtime) : "unknown";
  const std::string library = NcclLibraryPath();
  const std::string problem = NcclVersionProblem(NcclCommunicator::CompiledNcclVersion(),
                                                 NcclCommunicator::RuntimeNcclVersion(), library);
  return "NCCL " + NcclVersionString(NcclCommunicator::RuntimeNcclVersion()) + " (built against " +
         NcclVersionString(NcclCommunicator::CompiledNcclVersion()) +
         (library.empty() ? "" : "; " + library) + (problem.empty() ? "" : "; TOO OLD") +
         "), CUDA runtime " + loaded_cuda + " (built against " + cuda(CUDART_VERSION) + ")";
}

int AbortAllNcclCommunicators(const std::string& reason) {
  constexpr const char* kOp = "AbortAllNcclCommunicators";
  // The tasks, not the communicators: a task outlives its communicator.
  std::vector<std::pair<std::string, std::shared_ptr<BackgroundTask>>> aborts;
  {
    std::lock_guard<std::mutex> lock(NcclCommunicator::Impl::LiveMutex());
    for (NcclCommunicator::Impl* impl : NcclCommunicator::Impl::Live()) {
      if (impl->aborted()) continue;
      aborts.emplace_back(impl->Describe(kOp, "ncclCommAbort"),
                          impl->BeginAbort(impl->Describe(kOp, reason)));
    }
  }
  // All aborts run at once; together they get one grace period.
  const auto deadline = std::chrono::steady_clock::now() + kAbortGrace;
  for (auto& [what, abort] : aborts) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    WaitOrEndProcess(*abort, std::max(left, std::chrono::milliseconds(0)), what);
  }
  return static_cast<int>(aborts.size());
}

std::unique_ptr<NcclCommunicator> MakeNcclCommunicator(MpiCommunicator& mpi, int local_rank) {
  int world_rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  auto fail = [&](const std::string& what, int code) {
    throw NcclError("rank " + std::to_string(world_rank) + ": MakeNcclCommunicator: " + what, code,
                    world_rank);
  };
  TORCH_CHECK(local_rank >= 0, "MakeNcclCommunicator: local_rank must be >= 0, got ", local_rank);
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) {
    (void)cudaGetLastError();
    fail("no usable CUDA device: cudaGetDeviceCount failed: " + CudaErrorString(rc), rc);
  }
  if (count == 0) fail("no CUDA device is visible to this process", 0);
  const int device = local_rank % count;
  rc = cudaSetDevice(device);
  if (rc != cudaSuccess) {
    fail("cudaSetDevice(" + std::to_string(device) + ") failed: " + CudaErrorString(rc), rc);
  }
  return std::make_unique<NcclCommunicator>(mpi, device);
}

}  // namespace rmoe::distributed
