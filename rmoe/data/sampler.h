// Which token windows the trainer and the evaluator read.
//
// Training samples are random windows whose positions are a pure function of (seed, sample
// index): there is no sampler state to checkpoint, and resuming at step s only needs the index
// of its first sample. Evaluation uses fixed windows that do not depend on the seed, so losses
// of differently seeded runs are comparable.
#pragma once

#include <cstdint>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include "rmoe/data/dataset.h"

namespace rmoe {

// splitmix64's output function: a bijective 64-bit mixer with good avalanche.
uint64_t SplitMix64(uint64_t x);

// Training windows of seq_len + 1 tokens (inputs are the first seq_len, targets the last
// seq_len), starting anywhere in [0, size - seq_len - 1], uniformly and independently per
// sample.
//
// Data parallelism: every rank reads its own local stream 0, 1, 2, ... and local index i of
// rank r (of D) is global sample i * D + r. So when every rank takes the same local indices,
// as it does when each step consumes batch_size rows per micro-batch, the ranks' samples are
// disjoint and together they are exactly the global samples a single rank would read with a
// D times larger batch: row b of micro-batch m of step s (grad_accum_steps A, micro_batch_size
// B) is local index (s * A + m) * B + b and global index ((s * A + m) * B + b) * D + r.
//
// Resuming: the global stream starts at `first_global_sample` (the samples a checkpoint says
// were consumed), and local index i of rank r is global first_global_sample + i * D + r. On
// the same layout this continues the uninterrupted stream exactly; on another layout (D, B or
// A changed, global batch kept) every step still reads the same set of global samples.
class TrainSampler {
 public:
  // Errors: seq_len < 1, a file shorter than seq_len + 1 tokens, or rank not in [0, size).
  static absl::StatusOr<TrainSampler> Create(const TokenFile& tokens, int seq_len, uint64_t seed,
                                             int data_parallel_rank = 0,
                                             int data_parallel_size = 1,
                                             uint64_t first_global_sample = 0);
  // As Create, for arguments already known to be valid: aborts with Create's message if not.
  // `tokens` must outlive the sampler.
  TrainSampler(const TokenFile& tokens, int seq_len, uint64_t seed, int data_parallel_rank = 0,
               int data_parallel_size = 1, uint64_t first_global_sample = 0);

  // Writes batch_size rows of seq_len + 1 tokens to out (row-major); row b is local sample
  // first_sample_index + b.
  void FillBatch(uint64_t first_sample_index, int batch_size, int64_t* out) const;

  uint64_t GlobalIndex(uint64_t local_index) const {
    return first_ + local_index * static_cast<uint64_t>(size_) + static_cast<uint64_t>(rank_);
  }
  // First token of global sample `global_index`.
  int64_t WindowStart(uint64_t global_index) const;
  int seq_len() const { return seq_len_; }

 private:
  const TokenFile* tokens_;
  int seq_len_;
  uint64_t key_;
  int rank_;
  int size_;
  uint64_t first_;
};

// Evaluation windows: the file cut into num_windows() = (size - 1) / seq_len consecutive
// windows of seq_len + 1 tokens (each overlapping the next by one token), so a full pass
// predicts every token after the first exactly once. Window w is slot (w * stride) mod n for a
// stride near n / golden ratio and coprime to n: a permutation whose every prefix is spread
// over the whole file, so evaluating only the first few windows still samples all of it.
class EvalSampler {
 public:
  // Errors: seq_len < 1 or a file shorter than seq_len + 1 tokens.
  static absl::StatusOr<EvalSampler> Create(const TokenFile& tokens, int seq_len);
  // As Create, aborting on invalid arguments. `tokens` must outlive the sampler.
  EvalSampler(const TokenFile& tokens, int seq_len);

  int num_windows() const { return num_windows_; }
  // First token of window `window` (taken modulo num_windows()).
  int64_t WindowStart(int64_t window) const;
  // Row b is window first_window + b, wrapping around after the last window.
  void FillBatch(int first_window, int batch_size, int64_t* out) const;
  int seq_len() const { return seq_len_; }

 private:
  const TokenFile* tokens_;
  int seq_len_;
  int num_windows_;
  int64_t stride_;
};

}  // namespace rmoe
