// A Communicator that forwards to another and adds up the wall time spent in it: how
// training steps are split into computation and communication.
#pragma once

#include <chrono>
#include <memory>

#include "distributed/communicator.h"

namespace rmoe::distributed {

class TimedCommunicator : public Communicator {
 public:
  // `clock_seconds` is shared with the groups split from this one, so one counter sees all
  // of a job's communication.
  explicit TimedCommunicator(std::shared_ptr<Communicator> inner,
                             std::shared_ptr<double> clock_seconds = std::make_shared<double>(0))
      : inner_(std::move(inner)), seconds_(std::move(clock_seconds)) {}

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  void AllReduce(torch::Tensor& tensor, ReduceOp op) override {
    Timed([&] { inner_->AllReduce(tensor, op); });
  }
  torch::Tensor AllToAll(const torch::Tensor& send, const std::vector<int64_t>& send_splits,
                         const std::vector<int64_t>& recv_splits) override {
    torch::Tensor out;
    Timed([&] { out = inner_->AllToAll(send, send_splits, recv_splits); });
    return out;
  }
  std::vector<int64_t> AllToAllCounts(const std::vector<int64_t>& counts) override {
    std::vector<int64_t> out;
    Timed([&] { out = inner_->AllToAllCounts(counts); });
    return out;
  }
  torch::Tensor AllGather(const torch::Tensor& tensor) override {
    torch::Tensor out;
    Timed([&] { out = inner_->AllGather(tensor); });
    return out;
  }
  void Broadcast(torch::Tensor& tensor, int root) override {
    Timed([&] { inner_->Broadcast(tensor, root); });
  }
  void Barrier() override {
    Timed([&] { inner_->Barrier(); });
  }
  std::unique_ptr<Communicator> Split(int color, int key) override {
    auto group = inner_->Split(color, key);
    if (!group) return nullptr;
    return std::make_unique<TimedCommunicator>(std::move(group), seconds_);
  }

  // Seconds spent communicating since the last call.
  double TakeSeconds() {
    const double seconds = *seconds_;
    *seconds_ = 0;
    return seconds;
  }

 private:
  template <typename Fn>
  void Timed(Fn fn) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    *seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

  std::shared_ptr<Communicator> inner_;
  std::shared_ptr<double> seconds_;
};

}  // namespace rmoe::distributed
