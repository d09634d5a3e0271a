#include "distributed/mpi_communicator.h"

#include "distributed/collective_args.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <numeric>
#include <optional>
#include <sstream>

namespace rmoe::distributed {
namespace {

// Tag of the point-to-point messages of the AllToAll fallback. Communicators made here are
// private (a duplicate of MPI_COMM_WORLD, or Split()); other code sending point-to-point on
// them must not use this tag.
constexpr int kFallbackTag = 0x524d;  // "RM"

int WorldRank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

std::string ErrorString(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(rc);
  return std::string(text, length);
}

constexpr char kWho[] = "MpiCommunicator";

// Empty if `tensor` can be communicated; otherwise why not, naming the operation.
std::string TensorProblem(const torch::Tensor& tensor, const char* op, bool needs_rows) {
  return TensorArgumentProblem(
      kWho, op, tensor, needs_rows, [](const torch::Tensor& t) { return t.device().is_cpu(); },
      "MPI communicates CPU tensors only (CUDA tensors go through the NCCL communicator and are "
      "never copied to the host)");
}

void CheckTensor(const torch::Tensor& tensor, const char* op) {
  const std::string problem = TensorProblem(tensor, op, /*needs_rows=*/false);
  TORCH_CHECK(problem.empty(), problem);
}

// Frees an MPI_Comm on scope exit unless released.
struct CommGuard {
  MPI_Comm comm;
  ~CommGuard() {
    if (comm != MPI_COMM_NULL) MPI_Comm_free(&comm);
  }
};

struct ReduceType {
  MPI_Datatype type;
  MPI_Op sum;
};

// The dtype a tensor is reduced in: half and bfloat16 in float (rounded once at the end);
// 8- and 16-bit integers in int32, because OpenMPI 4.1's vectorised (op/avx) MPI_SUM
// saturates them instead of wrapping, and only for the elements it vectorises. Converting back
// wraps the way torch's own integer arithmetic does.
c10::ScalarType ReductionDtype(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kHalf:
    case torch::kBFloat16: return torch::kFloat;
    case torch::kInt8:
    case torch::kUInt8:
    case torch::kInt16: return torch::kInt;
    default: return dtype;
  }
}

// The MPI type and "sum" op for reducing `dtype`; nullopt if unsupported.
std::optional<ReduceType> NativeReduceType(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat: return ReduceType{MPI_FLOAT, MPI_SUM};
    case torch::kDouble: return ReduceType{MPI_DOUBLE, MPI_SUM};
    case torch::kInt32: return ReduceType{MPI_INT32_T, MPI_SUM};
    case torch::kInt64: return ReduceType{MPI_INT64_T, MPI_SUM};
    case torch::kBool: return ReduceType{MPI_C_BOOL, MPI_LOR};
    default: return std::nullopt;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// MpiCommunicator

MpiCommunicator::MpiCommunicator(MPI_Comm comm, bool owned)
    : comm_(comm), owned_(owned), max_message_bytes_(INT_MAX) {
  TORCH_CHECK(comm != MPI_COMM_NULL, "MpiCommunicator: MPI_COMM_NULL");
  Check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MpiCommunicator", "MPI_Comm_set_errhandler");
  Check(MPI_Comm_rank(comm_, &rank_), "MpiCommunicator", "MPI_Comm_rank");
  Check(MPI_Comm_size(comm_, &size_), "MpiCommunicator", "MPI_Comm_size");
  Check(MPI_Comm_dup(comm_, &side_channel_), "MpiCommunicator", "MPI_Comm_dup");
  MPI_Comm_set_errhandler(side_channel_, MPI_ERRORS_RETURN);
  LiveCommunicators().push_back(this);
}

MpiCommunicator::~MpiCommunicator() {
  std::vector<const MpiCommunicator*>& live = LiveCommunicators();
  live.erase(std::remove(live.begin(), live.end(), this), live.end());
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (side_channel_ != MPI_COMM_NULL) MPI_Comm_free(&side_channel_);
  if (owned_ && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void MpiCommunicator::set_max_message_bytes_for_testing(int64_t bytes) {
  TORCH_CHECK(bytes >= 1 && bytes <= INT_MAX, "max_message_bytes must be in [1, INT_MAX], got ", bytes);
  max_message_bytes_ = bytes;
}

void MpiCommunicator::Check(int rc, const char* operation, const char* mpi_call) const {
  if (rc == MPI_SUCCESS) return;
  const int world_rank = WorldRank();
  std::ostringstream message;
  message << "rank " << world_rank << ": " << operation << ": " << mpi_call
          << " failed: " << ErrorString(rc);
  throw MpiError(message.str(), rc, world_rank);
}

void MpiCommunicator::AllReduce(torch::Tensor& tensor, ReduceOp op) {
  StartCollective("AllReduce");
  CheckTensor(tensor, "AllReduce");
  const c10::ScalarType dtype = tensor.scalar_type();
  const c10::ScalarType reduce_dtype = ReductionDtype(dtype);
  std::optional<ReduceType> reduce = NativeReduceType(reduce_dtype);
  TORCH_CHECK(reduce.has_value(), "MpiCommunicator::AllReduce: unsupported dtype ", dtype);
  TORCH_CHECK(op == ReduceOp::kSum || at::isFloatingType(dtype),
              "MpiCommunicator::AllReduce: ReduceOp::kAvg needs a floating-point tensor, got ",
              dtype, " (use kSum and divide as the caller needs)");
  if (tensor.numel() == 0) return;

  torch::NoGradGuard no_grad;
  torch::Tensor work = reduce_dtype != dtype ? tensor.to(reduce_dtype) : tensor.contiguous();
  char* data = static_cast<char*>(work.data_ptr());
  const int64_t element_bytes = work.element_size();
  const int64_t numel = work.numel();
  const int64_t per_call = std::max<int64_t>(1, max_message_bytes_ / element_bytes);
  if (numel > per_call) ++chunked_operations_;
  for (int64_t offset = 0; offset < numel; offset += per_call) {
    const int count = static_cast<int>(std::min(per_call, numel - offset));
    MPI_Request request;
    Wait(MPI_Iallreduce(MPI_IN_PLACE, data + offset * element_bytes, count, reduce->type,
                        reduce->sum, comm_, &request),
         &request, 1, "MPI_Iallreduce");
  }
  if (op == ReduceOp::kAvg) work.div_(size_);
  if (!work.is_same(tensor)) tensor.copy_(work);
}

torch::Tensor ReceiveBufferPool::Get(const std::vector<int64_t>& shape,
                                     const torch::TensorOptions& options) {
  const int64_t bytes = Product(shape, 0) * c10::elementSize(options.dtype().toScalarType());
  if (bytes < kMinBytes || options.device().type() != c10::DeviceType::CPU) {
    return torch::empty(shape, options);
  }
  // The smallest free buffer that fits: "free" = the pool holds its storage's only reference.
  torch::Tensor* best = nullptr;
  for (auto& buffer : buffers_) {
    if (buffer.storage().use_count() == 1 && buffer.numel() >= bytes &&
        (best == nullptr || buffer.numel() < best->numel())) {
      best = &buffer;
    }
  }
  torch::Tensor backing;
  if (best != nullptr) {
    backing = *best;
    ++reused_;
  } else {
    // Headroom, so that the next step's slightly different token counts still fit.
    backing = torch::empty({bytes + bytes / 4}, torch::TensorOptions().dtype(torch::kUInt8));
    if (buffers_.size() < kMaxBuffers) buffers_.push_back(backing);
  }
  std::vector<int64_t> strides(shape.size(), 1);
  for (int i = static_cast<int>(shape.size()) - 2; i >= 0; --i) strides[i] = strides[i + 1] * shape[i + 1];
  return torch::empty({0}, options).set_(backing.storage(), 0, shape, strides);
}

std::vector<CollectiveMeta> MpiCommunicator::ExchangeMeta(const CollectiveMeta& local) {
  std::vector<CollectiveMeta> all(size_);
  MPI_Request request;
  Wait(MPI_Iallgather(&local, kCollectiveMetaFields, MPI_INT64_T, all.data(), kCollectiveMetaFields,
                      MPI_INT64_T, comm_, &request),
       &request, 1, "MPI_Iallgather");
  return all;
}

torch::Tensor MpiCommunicator::AllToAll(const torch::Tensor& send,
                                         const std::vector<int64_t>& send_splits,
                                         const std::vector<int64_t>& recv_splits) {
  StartCollective("AllToAll");
  // Local checks first; their outcome is shared with every rank below, so that a bad argument
  // on one rank makes all of them throw rather than leaving the others in the collective.
  std::string problem = TensorProblem(send, "AllToAll", /*needs_rows=*/true);
  if (problem.empty()) {
    problem = SplitsProblem("MpiCommunicator", rank_, size_, send, send_splits, recv_splits);
  }

  CollectiveMeta local = LocalMeta(problem, send);
  const int64_t row_bytes = local.row_bytes;
  AllToAllLayout layout;
  if (problem.empty()) {
    layout = LayOutAllToAll(send_splits, recv_splits, row_bytes);
    // Counts and displacements are at most the totals.
    local.needs_fallback =
        layout.send_total > max_message_bytes_ || layout.recv_total > max_message_bytes_;
  }

  const std::vector<CollectiveMeta> all = ExchangeMeta(local);
  CheckAgreement(kWho, "AllToAll", rank_, problem, local, all, "invalid arguments");
  bool fallback = false;
  for (const CollectiveMeta& m : all) fallback = fallback || m.needs_fallback;

  const std::vector<int64_t>& send_bytes = layout.send_bytes;
  const std::vector<int64_t>& recv_bytes = layout.recv_bytes;
  const std::vector<int64_t>& send_offsets = layout.send_offsets;
  const std::vector<int64_t>& recv_offsets = layout.recv_offsets;
  const torch::Tensor source = send.contiguous();
  std::vector<int64_t> out_shape = send.sizes().vec();
  out_shape[0] = std::accumulate(recv_splits.begin(), recv_splits.end(), int64_t{0});
  torch::Tensor result = receive_buffers_.Get(out_shape, send.options());
  if (row_bytes == 0) return result;  // nothing to move anywhere (the same on every rank)
  const char* send_data = static_cast<const char*>(source.data_ptr());
  char* recv_data = static_cast<char*>(result.data_ptr());

  if (!fallback) {
    auto to_int = [](const std::vector<int64_t>& v) { return std::vector<int>(v.begin(), v.end()); };
    const std::vector<int> sc = to_int(send_bytes), sd = to_int(send_offsets);
    const std::vector<int> rc = to_int(recv_bytes), rd = to_int(recv_offsets);
    MPI_Request request;
    Wait(MPI_Ialltoallv(send_data, sc.data(), sd.data(), MPI_BYTE, recv_data, rc.data(), rd.data(),
                        MPI_BYTE, comm_, &request),
         &request, 1, "MPI_Ialltoallv");
    return result;
  }

  // Fallback: every message as chunks of at most max_message_bytes_, point to point. Both ends
  // cut a message the same way (its size is send_splits[dst] * row_bytes on the sender,
  // recv_splits[src] * row_bytes on the receiver), and messages between two ranks with one tag
  // are matched in order, so chunk i lands on chunk i.
  ++chunked_operations_;
  std::vector<MPI_Request> requests;
  const int64_t chunk = max_message_bytes_;
  for (int i = 1; i < size_; ++i) {
    const int src = (rank_ - i + size_) % size_;
    for (int64_t off = 0; off < recv_bytes[src]; off += chunk) {
      requests.emplace_back();
      Check(MPI_Irecv(recv_data + recv_offsets[src] + off,
                      static_cast<int>(std::min(chunk, recv_bytes[src] - off)), MPI_BYTE, src,
                      kFallbackTag, comm_, &requests.back()),
            "AllToAll", "MPI_Irecv");
    }
  }
  for (int i = 1; i < size_; ++i) {
    const int dst = (rank_ + i) % size_;
    for (int64_t off = 0; off < send_bytes[dst]; off += chunk) {
      requests.emplace_back();
      Check(MPI_Isend(send_data + send_offsets[dst] + off,
                      static_cast<int>(std::min(chunk, send_bytes[dst] - off)), MPI_BYTE, dst,
                      kFallbackTag, comm_, &requests.back()),
            "AllToAll", "MPI_Isend");
    }
  }
  if (send_bytes[rank_] > 0) {
    std::memcpy(recv_data + recv_offsets[rank_], send_data + send_offsets[rank_], send_bytes[rank_]);
  }
  Wait(MPI_SUCCESS, requests.data(), static_cast<int>(requests.size()), "MPI_Isend/MPI_Irecv");
  return result;
}

std::vector<int64_t> MpiCommunicator::AllToAllCounts(const std::vector<int64_t>& counts) {
  StartCollective("AllToAllCounts");
  TORCH_CHECK(!counts.empty() && counts.size() % size_ == 0, "MpiCommunicator::AllToAllCounts: ",
              "counts.size() = ", counts.size(), " must be a positive multiple of size() = ", size_);
  const int64_t k = static_cast<int64_t>(counts.size()) / size_;
  TORCH_CHECK(k <= INT_MAX, "MpiCommunicator::AllToAllCounts: too many counts per rank");
  std::vector<int64_t> result(counts.size());
  MPI_Request request;
  Wait(MPI_Ialltoall(counts.data(), static_cast<int>(k), MPI_INT64_T, result.data(),
                     static_cast<int>(k), MPI_INT64_T, comm_, &request),
       &request, 1, "MPI_Ialltoall");
  return result;
}

torch::Tensor MpiCommunicator::AllGather(const torch::Tensor& tensor) {
  StartCollective("AllGather");
  const std::string problem = TensorProblem(tensor, "AllGather", /*needs_rows=*/true);
  const CollectiveMeta local = LocalMeta(problem, tensor);
  const std::vector<CollectiveMeta> all = ExchangeMeta(local);
  CheckAgreement(kWho, "AllGather", rank_, problem, local, all, "an invalid tensor");
  const int64_t row_bytes = local.row_bytes;
  const AllGatherLayout layout = LayOutAllGather(all, row_bytes);

  const torch::Tensor source = tensor.contiguous();
  std::vector<int64_t> out_shape = tensor.sizes().vec();
  out_shape[0] = layout.total_rows;
  torch::Tensor result = torch::empty(out_shape, tensor.options());
  if (row_bytes == 0 || layout.total_rows == 0) return result;
  char* out = static_cast<char*>(result.data_ptr());
  const std::vector<int64_t>& bytes = layout.bytes;
  const std::vector<int64_t>& offsets = layout.offsets;

  // Every rank knows every size, so all take the same path without further agreement.
  if (layout.total_bytes <= max_message_bytes_) {
    const std::vector<int> counts(bytes.begin(), bytes.end()), displs(offsets.begin(), offsets.end());
    MPI_Request request;
    Wait(MPI_Iallgatherv(source.data_ptr(), counts[rank_], MPI_BYTE, out, counts.data(),
                         displs.data(), MPI_BYTE, comm_, &request),
         &request, 1, "MPI_Iallgatherv");
    return result;
  }
  // Fallback: each rank's part is broadcast from it, in chunks of at most max_message_bytes_.
  ++chunked_operations_;
  if (bytes[rank_] > 0) std::memcpy(out + offsets[rank_], source.data_ptr(), bytes[rank_]);
  for (int root = 0; root < size_; ++root) {
    for (int64_t off = 0; off < bytes[root]; off += max_message_bytes_) {
      MPI_Request request;
      Wait(MPI_Ibcast(out + offsets[root] + off,
                      static_cast<int>(std::min(max_message_bytes_, bytes[root] - off)), MPI_BYTE,
                      root, comm_, &request),
           &request, 1, "MPI_Ibcast");
    }
  }
  return result;
}

void MpiCommunicator::Broadcast(torch::Tensor& tensor, int root) {
  StartCollective("Broadcast");
  CheckTensor(tensor, "Broadcast");
  TORCH_CHECK(root >= 0 && root < size_, "MpiCommunicator::Broadcast: root ", root,
              " is not a rank of this communicator (size ", size_, ")");
  torch::NoGradGuard no_grad;
  torch::Tensor work = tensor.contiguous();
  char* data = static_cast<char*>(work.data_ptr());
  const int64_t total = work.numel() * work.element_size();
  if (total > max_message_bytes_) ++chunked_operations_;
  for (int64_t off = 0; off < total; off += max_message_bytes_) {
    MPI_Request request;
    Wait(MPI_Ibcast(data + off, static_cast<int>(std::min(max_message_bytes_, total - off)), MPI_BYTE,
                    root, comm_, &request),
         &request, 1, "MPI_Ibcast");
  }
  if (!work.is_same(tensor) && rank_ != root) tensor.copy_(work);
}

void MpiCommunicator::Barrier() {
  StartCollective("Barrier");
  MPI_Request request;
  Wait(MPI_Ibarrier(comm_, &request), &request, 1, "MPI_Ibarrier");
}

std::unique_ptr<Communicator> MpiCommunicator::Split(int color, int key) {
  MPI_Comm new_comm = MPI_COMM_NULL;
  Check(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &new_comm), "Split",
        "MPI_Comm_split");
  if (new_comm == MPI_COMM_NULL) return nullptr;
  CommGuard guard{new_comm};
  auto result = std::make_unique<MpiCommunicator>(new_comm, /*owned=*/true);
  guard.comm = MPI_COMM_NULL;
  result->max_message_bytes_ = max_message_bytes_;
  result->collective_timeout_seconds_ = collective_timeout_seconds_;
  return result;
}

// ---------------------------------------------------------------------------------------------
// MpiRuntime

namespace {
MpiRuntime* g_runtime = nullptr;

void CheckInit(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  throw MpiError(std::string("MpiRuntime: ") + call + " failed: " + ErrorString(rc), rc, -1);
}
}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  TORCH_CHECK(g_runtime == nullptr, "MpiRuntime: there is already one in this process");
  int finalized = 0;
  MPI_Finalized(&finalized);
  TORCH_CHECK(!finalized, "MpiRuntime: MPI was already finalized and cannot be initialised again");
  int initialized = 0;
  MPI_Initialized(&initialized);
  int provided = 0;
  if (!initialized) {
    // Open MPI's nonblocking all-reduce (libnbc) reduces to one rank and broadcasts back
    // when the buffer is reduced in place (every gradient bucket): 2 log2(p) times the bytes
    // over each link instead of 2 (p - 1) / p, half the link's rate at 2 ranks and 27% at 4
    // (measured on the test cluster, docs/multinode.md). Rabenseifner's reduce-scatter +
    // all-gather moves the minimum; a user's own setting of the parameter wins.
    setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "3", /*overwrite=*/0);
    CheckInit(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    finalize_ = true;
    // Errors on MPI_COMM_WORLD come back as codes too (the default aborts without a word
    // about which call failed). Only when we own MPI.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  } else {
    MPI_Query_thread(&provided);
  }
  TORCH_CHECK(provided >= MPI_THREAD_FUNNELED,
              "MpiRuntime: the MPI library does not provide MPI_THREAD_FUNNELED (got ", provided, ")");

  MPI_Comm dup = MPI_COMM_NULL;
  CheckInit(MPI_Comm_dup(MPI_COMM_WORLD, &dup), "MPI_Comm_dup");
  world_ = std::make_unique<MpiCommunicator>(dup, /*owned=*/true);

  DiscoverNodes();
  g_runtime = this;
}

void MpiRuntime::DiscoverNodes() {
  const int rank = world_->rank(), size = world_->size();
  MPI_Comm node = MPI_COMM_NULL;
  CheckInit(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node),
            "MPI_Comm_split_type");
  CommGuard guard{node};
  MPI_Comm_rank(node, &local_rank_);
  MPI_Comm_size(node, &local_size_);
  // A node is known by its lowest world rank (local rank 0, as the split keeps rank order).
  int leader = rank;
  CheckInit(MPI_Bcast(&leader, 1, MPI_INT, 0, node), "MPI_Bcast");
  std::vector<int> leaders(size);
  CheckInit(MPI_Allgather(&leader, 1, MPI_INT, leaders.data(), 1, MPI_INT, MPI_COMM_WORLD),
            "MPI_Allgather");
  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int length = 0;
  MPI_Get_processor_name(name, &length);
  std::vector<char> names(static_cast<size_t>(size) * MPI_MAX_PROCESSOR_NAME);
  CheckInit(MPI_Allgather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, names.data(),
                          MPI_MAX_PROCESSOR_NAME, MPI_CHAR, MPI_COMM_WORLD),
            "MPI_Allgather");
  std::vector<std::string> hosts;
  for (int r = 0; r < size; ++r) {
    const char* begin = names.data() + static_cast<size_t>(r) * MPI_MAX_PROCESSOR_NAME;
    hosts.emplace_back(begin, strnlen(begin, MPI_MAX_PROCESSOR_NAME));
  }
  nodes_ = NodeLayout::FromNodeKeys(leaders, hosts);
}

MpiRuntime::~MpiRuntime() {
  world_.reset();
  g_runtime = nullptr;
  if (!finalize_) return;
  if (std::uncaught_exceptions() > 0) {
    // Unwinding: other ranks may be waiting in a collective for this one, and MPI_Finalize
    // would wait for them. End the job instead.
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
}

MpiRuntime& MpiRuntime::Get() {
  TORCH_CHECK(g_runtime != nullptr, "MpiRuntime::Get: no MpiRuntime exists (create one in main)");
  return *g_runtime;
}

bool MpiRuntime::Exists() { return g_runtime != nullptr; }

void MpiRuntime::Abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return; just in case
}

}  // namespace rmoe::distributed
