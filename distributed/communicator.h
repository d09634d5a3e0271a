// Collective communication over tensors. Everything above this file (the expert-parallel
// dispatcher, gradient synchronisation, the trainer) talks to this interface; MPI (CPU
// tensors, everywhere) and NCCL (CUDA tensors) implement it. rmoe/ never includes it.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <torch/torch.h>

namespace rmoe::distributed {

enum class ReduceOp { kSum, kAvg };

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // In place over every rank's `tensor` (same shape and dtype everywhere).
  virtual void AllReduce(torch::Tensor& tensor, ReduceOp op) = 0;

  // Uneven all-to-all along dim 0. `send` holds send_splits[r] rows for rank r, in rank
  // order; the result holds recv_splits[r] rows from rank r, in rank order. Other dims and
  // the dtype must agree across ranks. recv_splits usually comes from AllToAllCounts.
  virtual torch::Tensor AllToAll(const torch::Tensor& send, const std::vector<int64_t>& send_splits,
                                 const std::vector<int64_t>& recv_splits) = 0;

  // counts[r] is what this rank sends to rank r; returns what each rank sends to this one.
  // `counts` may hold several numbers per rank (counts.size() = k * size()): the k numbers
  // for rank r are exchanged as a block.
  virtual std::vector<int64_t> AllToAllCounts(const std::vector<int64_t>& counts) = 0;

  // Concatenation along dim 0 of every rank's tensor, in rank order (dim 0 may differ).
  virtual torch::Tensor AllGather(const torch::Tensor& tensor) = 0;

  virtual void Broadcast(torch::Tensor& tensor, int root) = 0;
  virtual void Barrier() = 0;

  // Ranks that pass the same `color` form a new group, ordered by `key` (collective over
  // this communicator).
  virtual std::unique_ptr<Communicator> Split(int color, int key) = 0;
};

}  // namespace rmoe::distributed
