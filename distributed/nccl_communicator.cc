#include "distributed/nccl_communicator.h"

#include "distributed/collective_args.h"
#include "rmoe/util/env.h"

#include <cuda_runtime_api.h>
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
#include <mutex>
#include <numeric>
#include <optional>
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

// Every NCCL and CUDA call goes through one of these (inside NcclCommunicator::Impl): a failure
// throws NcclError naming the call, the rank and the operation `op`.
#define RMOE_NCCL_CHECK(op, call) CheckNccl((call), #call, (op))
#define RMOE_CUDA_CHECK(op, call) CheckCuda((call), #call, (op))

namespace rmoe::distributed {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::chrono::milliseconds kWatchdogPeriod{100};
constexpr std::chrono::seconds kAbortGrace{10};  // how long the watchdog waits for ncclCommAbort

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

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double TimeoutFromEnv() {
  auto seconds = NumberFromEnv("RMOE_NCCL_TIMEOUT_S", 600, {0});
  TORCH_CHECK(seconds.ok(), std::string(seconds.status().message()), " (seconds; 0: no timeout)");
  return *seconds;
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

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  double timeout_seconds() const { return timeout_seconds_.load(); }
  void set_timeout_seconds(double s) {
    TORCH_CHECK(std::isfinite(s) && s >= 0, "NcclCommunicator: timeout must be >= 0, got ", s);
    timeout_seconds_ = s;
  }

 private:
  // ncclGroupStart on construction; End() ends the group and checks; the destructor ends a
  // group left open by an exception, so this thread's NCCL group depth stays right.
  class Group {
   public:
    Group(Impl& impl, const char* op) : impl_(impl), op_(op) {
      impl_.RMOE_NCCL_CHECK(op_, ncclGroupStart());
      open_ = true;
      impl_.in_group_ = true;
    }
    void End() {
      open_ = false;
      impl_.in_group_ = false;
      impl_.RMOE_NCCL_CHECK(op_, ncclGroupEnd());
    }
    ~Group() {
      if (!open_) return;
      impl_.in_group_ = false;
      (void)ncclGroupEnd();
    }

   private:
    Impl& impl_;
    const char* op_;
    bool open_ = false;
  };

  struct Pending {
    cudaEvent_t event;
    const char* op;
    Clock::time_point queued;
  };

  cudaStream_t stream() const { return stream_->stream(); }
  cudaStream_t current_stream() const {
    return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
  }

  [[noreturn]] void Throw(const char* op, const std::string& what, int code) const;
  void CheckNccl(ncclResult_t rc, const char* call, const char* op);
  void CheckCuda(cudaError_t rc, const char* call, const char* op);
  std::string NcclDetail(ncclResult_t rc) const;

  // ncclCommAbort, once; records why, for later calls.
  void AbortComm(const std::string& message);
  // Aborts the communicator and throws, for an asynchronous error or a timeout.
  [[noreturn]] void Fail(const char* op, const std::string& what, int code);
  // Throws if the communicator was aborted or NCCL holds an asynchronous error.
  void CheckAlive(const char* op);
  // One poll of ncclCommGetAsyncError: true when the queued NCCL work is in flight (ncclSuccess),
  // false while NCCL is still queueing it (ncclInProgress); fails on anything else.
  bool PollNccl(const char* op);
  void CheckDeadline(const char* op, Clock::time_point start, const char* waiting);
  static void Backoff(int spins);
  // Polls until NCCL has queued the last call (non-blocking communicators; a no-op otherwise).
  void WaitQueued(const char* op);
  // Polls until `event` has completed on the GPU.
  void WaitEvent(const char* op, cudaEvent_t event, const char* waiting);

  void CheckTensor(const torch::Tensor& tensor, const char* op) const;
  std::string TensorProblem(const torch::Tensor& tensor, const char* op, bool needs_rows) const;

  // Our stream waits for the work queued so far on the current stream.
  void OrderAfterCurrent(const char* op);
  // The current stream waits for the work queued so far on ours.
  void OrderBeforeCurrent(const char* op);
  // The caching allocator will not reuse `t`'s memory before our stream is done with it.
  void KeepAlive(const torch::Tensor& t) const;
  // Hands work queued on our stream to the watchdog.
  void Watch(const char* op);

  // How every collective that moves tensors runs, after its argument checks and CheckAlive:
  // on our device, our stream waits for the current one, `tensors` are kept alive for our
  // stream, `enqueue()` queues the NCCL calls (and copies) on stream(), NCCL finishes queueing
  // them (WaitQueued), the watchdog gets them, and the current stream waits for them. Returns
  // without waiting for the GPU.
  template <typename Enqueue>
  void Collective(const char* op, std::initializer_list<torch::Tensor> tensors, Enqueue&& enqueue);
  // Collective up to WaitQueued, for callers that wait on the host instead (Barrier).
  template <typename Enqueue>
  void Queue(const char* op, std::initializer_list<torch::Tensor> tensors, Enqueue&& enqueue);
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
  [[noreturn]] void Die(const char* op, const std::string& what);

  MpiCommunicator* mpi_;
  std::unique_ptr<MpiCommunicator> owned_mpi_;
  int rank_;
  int size_;
  int world_rank_ = -1;
  int device_;
  std::atomic<double> timeout_seconds_;

  ncclComm_t comm_ = nullptr;
  // A stream from torch's pool: pool streams live as long as the process, which the caching
  // allocator's recorded streams need (a stream of our own, destroyed with the communicator,
  // could still be named by blocks freed later).
  std::optional<c10::cuda::CUDAStream> stream_;
  cudaEvent_t ready_ = nullptr;  // recorded on the current stream, waited on by ours
  cudaEvent_t done_ = nullptr;   // recorded on ours, waited on by the current stream
  cudaEvent_t host_ = nullptr;   // what the host waits for
  int64_t* pinned_ = nullptr;
  size_t pinned_elements_ = 0;
  torch::Tensor scratch_;  // int64, on device_, allocated on our stream

  bool in_group_ = false;   // between ncclGroupStart and ncclGroupEnd (see CheckNccl)
  std::mutex abort_mutex_;  // ncclCommAbort vs the watchdog's ncclCommGetAsyncError
  std::atomic<bool> aborted_{false};
  std::string failure_;  // why it was aborted (under abort_mutex_)

  std::mutex watch_mutex_;
  std::condition_variable watch_cv_;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> spare_events_;
  bool stop_ = false;
  std::thread watchdog_;
};

// ---- errors ---------------------------------------------------------------------------------

void NcclCommunicator::Impl::Throw(const char* op, const std::string& what, int code) const {
  std::ostringstream message;
  message << "rank " << world_rank_ << ": NcclCommunicator::" << op << ": " << what;
  throw NcclError(message.str(), code, world_rank_);
}

std::string NcclCommunicator::Impl::NcclDetail(ncclResult_t rc) const {
  std::string detail = ncclGetErrorString(rc);
#if RMOE_NCCL_HAS_LAST_ERROR
  const char* last = ncclGetLastError(comm_);
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
  // A bad argument leaves the communicator usable; anything else (system, internal, remote
  // errors) does not. Inside a group it is not aborted here: Group's destructor still ends the
  // group, which must not touch an aborted communicator; the next call's ncclCommGetAsyncError
  // poll aborts it.
  if (rc != ncclInvalidArgument && rc != ncclInvalidUsage && !in_group_) Fail(op, what, rc);
  Throw(op, what, rc);
}

void NcclCommunicator::Impl::CheckCuda(cudaError_t rc, const char* call, const char* op) {
  if (rc == cudaSuccess) return;
  Throw(op, CallName(call) + " failed: " + CudaErrorString(rc), rc);
}

void NcclCommunicator::Impl::AbortComm(const std::string& message) {
  std::lock_guard<std::mutex> lock(abort_mutex_);
  if (aborted_) return;
  failure_ = message;
  aborted_ = true;
  if (comm_ != nullptr) (void)ncclCommAbort(comm_);
}

void NcclCommunicator::Impl::Fail(const char* op, const std::string& what, int code) {
  std::ostringstream message;
  message << "rank " << world_rank_ << ": NcclCommunicator::" << op << ": " << what;
  AbortComm(message.str());
  Throw(op, what + " (the NCCL communicator was aborted)", code);
}

void NcclCommunicator::Impl::CheckAlive(const char* op) {
  if (aborted_) {
    std::string failure;
    {
      std::lock_guard<std::mutex> lock(abort_mutex_);
      failure = failure_;
    }
    Throw(op, "the communicator was aborted after an earlier error: " + failure, ncclInvalidUsage);
  }
  (void)PollNccl(op);
}

bool NcclCommunicator::Impl::PollNccl(const char* op) {
  ncclResult_t state = ncclSuccess;
  RMOE_NCCL_CHECK(op, ncclCommGetAsyncError(comm_, &state));
  if (state == ncclSuccess) return true;
#if RMOE_NCCL_NONBLOCKING
  if (state == ncclInProgress) return false;
#endif
  Fail(op, std::string("NCCL reported an asynchronous error (a peer may have died, or the network ") +
               "failed): " + NcclDetail(state),
       state);
}

void NcclCommunicator::Impl::CheckDeadline(const char* op, Clock::time_point start,
                                           const char* waiting) {
  const double timeout = timeout_seconds_.load();
  if (timeout <= 0) return;
  const double elapsed = Seconds(Clock::now() - start);
  if (elapsed <= timeout) return;
  std::ostringstream what;
  what << "timed out after " << elapsed << " s " << waiting
       << " (RMOE_NCCL_TIMEOUT_S = " << timeout
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

void NcclCommunicator::Impl::WaitQueued(const char* op) {
#if RMOE_NCCL_NONBLOCKING
  const auto start = Clock::now();
  for (int spins = 0; !PollNccl(op); ++spins) {
    CheckDeadline(op, start, "waiting for NCCL to queue the operation");
    Backoff(spins);
  }
#else
  (void)op;
#endif
}

void NcclCommunicator::Impl::WaitEvent(const char* op, cudaEvent_t event, const char* waiting) {
  const auto start = Clock::now();
  for (int spins = 0;; ++spins) {
    const cudaError_t q = cudaEventQuery(event);
    if (q == cudaSuccess) return;
    if (q != cudaErrorNotReady) CheckCuda(q, "cudaEventQuery", op);
    (void)cudaGetLastError();  // not ready is not an error: clear it
    (void)PollNccl(op);
    CheckDeadline(op, start, waiting);
    Backoff(spins);
  }
}

// ---- set-up and tear-down -------------------------------------------------------------------

void NcclCommunicator::Impl::Init() {
  constexpr const char* kOp = "Create";
  int count = 0;
  RMOE_CUDA_CHECK(kOp, cudaGetDeviceCount(&count));
  TORCH_CHECK(device_ >= 0 && device_ < count, "NcclCommunicator: CUDA device ", device_,
              " does not exist (", count, " visible)");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  stream_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true,
                                         static_cast<c10::DeviceIndex>(device_));
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
    throw MpiError("rank " + std::to_string(world_rank_) +
                       ": NcclCommunicator::Create: MPI_Bcast failed: " + MpiErrorString(mpi_rc),
                   mpi_rc, world_rank_);
  }
  if (!boot.ok) {
    if (rank_ == 0) Throw(kOp, std::string("ncclGetUniqueId failed: ") + ncclGetErrorString(id_rc), id_rc);
    Throw(kOp, "rank 0 of this communicator could not create the NCCL unique id (it reports why)",
          ncclSystemError);
  }

#if RMOE_NCCL_NONBLOCKING
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every wait is a poll with a deadline: see the header
  RMOE_NCCL_CHECK(kOp, ncclCommInitRankConfig(&comm_, size_, boot.id, rank_, &config));
  WaitQueued(kOp);
#else
  RMOE_NCCL_CHECK(kOp, ncclCommInitRank(&comm_, size_, boot.id, rank_));
#endif
  watchdog_ = std::thread([this] { WatchdogLoop(); });
}

NcclCommunicator::Impl::~Impl() {
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
  if (comm_ != nullptr && !aborted_) {
    constexpr const char* kOp = "~NcclCommunicator";
    try {
      // Let the queued work finish (a dead peer: the wait times out and aborts).
      if (stream_) {
        RMOE_CUDA_CHECK(kOp, cudaEventRecord(host_, stream()));
        WaitEvent(kOp, host_, "waiting for the queued work before destroying the communicator");
      }
#if RMOE_NCCL_NONBLOCKING
      RMOE_NCCL_CHECK(kOp, ncclCommFinalize(comm_));
      WaitQueued(kOp);
#endif
      (void)ncclCommDestroy(comm_);
      comm_ = nullptr;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s\n", e.what());
      AbortComm(e.what());
    }
  }
  {
    std::lock_guard<std::mutex> lock(watch_mutex_);
    for (const Pending& p : pending_) (void)cudaEventDestroy(p.event);
    for (cudaEvent_t e : spare_events_) (void)cudaEventDestroy(e);
    pending_.clear();
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

void NcclCommunicator::Impl::Watch(const char* op) {
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
  std::lock_guard<std::mutex> lock(watch_mutex_);
  if (rc != cudaSuccess) {
    spare_events_.push_back(event);
    RMOE_CUDA_CHECK(op, rc);
  }
  pending_.push_back(Pending{event, op, Clock::now()});
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
    if (aborted_) return;  // the calling thread aborted it and reports why
    // Work on one stream completes in order: drop what has finished from the front.
    while (!pending_.empty()) {
      const cudaError_t q = cudaEventQuery(pending_.front().event);
      if (q == cudaErrorNotReady) {
        (void)cudaGetLastError();
        break;
      }
      if (q != cudaSuccess) Die(pending_.front().op, "cudaEventQuery failed: " + CudaErrorString(q));
      spare_events_.push_back(pending_.front().event);
      pending_.pop_front();
    }
    if (pending_.empty()) continue;
    const Pending oldest = pending_.front();
    lock.unlock();
    std::string problem;
    {
      std::lock_guard<std::mutex> abort_lock(abort_mutex_);
      if (!aborted_) {
        ncclResult_t state = ncclSuccess;
        const ncclResult_t qrc = ncclCommGetAsyncError(comm_, &state);
        if (qrc != ncclSuccess) {
          problem = std::string("ncclCommGetAsyncError failed: ") + ncclGetErrorString(qrc);
        } else if (state != ncclSuccess
#if RMOE_NCCL_NONBLOCKING
                   && state != ncclInProgress
#endif
        ) {
          problem = "NCCL reported an asynchronous error (a peer may have died, or the network "
                    "failed): " + NcclDetail(state);
        }
      }
    }
    const double timeout = timeout_seconds_.load();
    const double age = Seconds(Clock::now() - oldest.queued);
    if (problem.empty() && timeout > 0 && age > timeout) {
      std::ostringstream what;
      what << "not finished " << age << " s after it was queued (RMOE_NCCL_TIMEOUT_S = " << timeout
           << "; a peer may have died, or not called the same collective)";
      problem = what.str();
    }
    if (!problem.empty() && !aborted_) Die(oldest.op, problem);
    lock.lock();
  }
}

void NcclCommunicator::Impl::Die(const char* op, const std::string& what) {
  std::fprintf(stderr,
               "rank %d: NcclCommunicator::%s: %s; watchdog: aborting the NCCL communicator and "
               "ending this process\n",
               world_rank_, op, what.c_str());
  std::fflush(stderr);
  // ncclCommAbort can itself block on a broken network: give it kAbortGrace, then exit anyway.
  auto finished = std::make_shared<std::atomic<bool>>(false);
  std::thread([this, finished, message = std::string(op) + ": " + what] {
    AbortComm("rank " + std::to_string(world_rank_) + ": NcclCommunicator::" + message);
    *finished = true;
  }).detach();
  const auto deadline = Clock::now() + kAbortGrace;
  while (!*finished && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(10));
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
                                   Enqueue&& enqueue) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  OrderAfterCurrent(op);
  for (const torch::Tensor& t : tensors) KeepAlive(t);
  enqueue();
  WaitQueued(op);
}

template <typename Enqueue>
void NcclCommunicator::Impl::Collective(const char* op, std::initializer_list<torch::Tensor> tensors,
                                        Enqueue&& enqueue) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  Queue(op, tensors, std::forward<Enqueue>(enqueue));
  Watch(op);
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
  RMOE_NCCL_CHECK(op, ncclSend(data, static_cast<size_t>(bytes), ncclUint8, peer, comm_, stream()));
}

void NcclCommunicator::Impl::RecvBytes(const char* op, void* data, int64_t bytes, int peer) {
  if (bytes <= 0) return;
  RMOE_NCCL_CHECK(op, ncclRecv(data, static_cast<size_t>(bytes), ncclUint8, peer, comm_, stream()));
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
    RMOE_NCCL_CHECK(kOp, ncclAllReduce(work.data_ptr(), work.data_ptr(),
                                       static_cast<size_t>(work.numel()), reduction->type, nccl_op,
                                       comm_, stream()));
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
    RMOE_NCCL_CHECK(op, ncclAllGather(in, out, k, ncclInt64, comm_, stream()));
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
      RMOE_NCCL_CHECK(kOp, ncclAllGather(src, dst, static_cast<size_t>(bytes[rank_]), ncclUint8,
                                         comm_, stream()));
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
    RMOE_NCCL_CHECK(kOp, ncclBroadcast(work.data_ptr(), work.data_ptr(), bytes, ncclUint8, root,
                                       comm_, stream()));
  });
  if (!work.is_same(tensor) && rank_ != root) tensor.copy_(work);
}

void NcclCommunicator::Impl::Barrier() {
  constexpr const char* kOp = "Barrier";
  CheckAlive(kOp);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  EnsureBuffers(kOp, 1);
  int64_t* one = scratch_.data_ptr<int64_t>();  // its value does not matter
  Queue(kOp, {}, [&] {
    RMOE_NCCL_CHECK(kOp, ncclAllReduce(one, one, 1, ncclInt64, ncclSum, comm_, stream()));
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

std::string NcclBuildInfo() {
  // NCCL_VERSION_CODE (2.9 on): major * 10000 + minor * 100 + patch; CUDART: major * 1000 +
  // minor * 10.
  auto nccl = [](int code) {
    if (code == 0) return std::string("unknown");
    return std::to_string(code / 10000) + "." + std::to_string(code / 100 % 100) + "." +
           std::to_string(code % 100);
  };
  auto cuda = [](int code) {
    return std::to_string(code / 1000) + "." + std::to_string(code % 1000 / 10);
  };
  int runtime = 0;
  const std::string loaded_cuda =
      cudaRuntimeGetVersion(&runtime) == cudaSuccess ? cuda(runtime) : "unknown";
  return "NCCL " + nccl(NcclCommunicator::RuntimeNcclVersion()) + " (built against " +
         nccl(NcclCommunicator::CompiledNcclVersion()) + "), CUDA runtime " + loaded_cuda +
         " (built against " + cuda(CUDART_VERSION) + ")";
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
