// Sharded checkpoints: every rank writes its own pieces in parallel, a manifest describes
// the whole by global shapes, and a marker written last commits it. Loading reads, for the
// layout at hand, whatever rows each rank needs, whichever layout saved them.
//
//   <root>/step_00000120/shard_00003.bin   rank 3's pieces, back to back
//   <root>/step_00000120/manifest.pb       framed CheckpointManifest (proto/checkpoint.proto)
//   <root>/step_00000120/COMMITTED         written after every shard and the manifest are
//                                          durable; without it the directory is not a checkpoint
//   <root>/latest                          the committed step directory's name, replaced atomically
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <torch/torch.h>

#include "distributed/communicator.h"
#include "proto/checkpoint.pb.h"

namespace rmoe::distributed {

inline constexpr int kCheckpointFormatVersion = 1;

// One tensor as this rank holds it: rows [row_start, row_start + local.size(0)) of a tensor
// of `global_shape` (row_start = 0 and local = everything for a replicated tensor).
struct ShardedTensor {
  std::string name;  // "model/<param>" or "optimizer/<param>/<state>"
  torch::Tensor local;  // CPU, contiguous; LoadTensors fills it in place
  std::vector<int64_t> global_shape;
  int64_t row_start = 0;
  // This rank writes its rows. Across the world every row of every tensor must be written
  // by exactly one rank (replicated tensors: one chosen rank; experts: one replica).
  bool write = false;
};

// Everything except the tensors.
struct CheckpointState {
  JobSpec job;
  int64_t step = 0;
  int64_t consumed_samples = 0;
  int expert_parallel_size = 1;
  std::map<std::string, double> scalars;
};

// Collective over `world`. Each rank writes and fsyncs its shard file; if every rank
// succeeded, rank 0 writes the manifest, and after a barrier the COMMITTED marker and the
// `latest` pointer; then committed checkpoints beyond the newest `keep_last` are deleted.
// An error on any rank makes every rank return an error and nothing is committed.
// Returns the checkpoint directory.
absl::StatusOr<std::string> SaveCheckpoint(const std::string& root, const CheckpointState& state,
                                           const std::vector<ShardedTensor>& tensors,
                                           Communicator& world, int keep_last);

// A checkpoint directory from `path`: a step directory, or a root whose `latest` it follows.
// Refuses a directory without COMMITTED, naming it. NotFound when there is none.
absl::StatusOr<std::string> ResolveCheckpoint(const std::string& path);

// Reads and checks the framing of <dir>/manifest.pb: truncation, corruption and a future
// format_version are errors that name the file.
absl::StatusOr<CheckpointManifest> ReadManifest(const std::string& dir);

// Fills every `tensors[i].local` (its shape and row_start are the new layout's) from the
// checkpoint, reading only the pieces that overlap its rows and checking each piece's
// CRC-32C: a mismatch names the shard file and the tensor. A tensor missing from the
// manifest, or with another global shape or dtype, is an error naming it.
absl::Status LoadTensors(const std::string& dir, const CheckpointManifest& manifest,
                         std::vector<ShardedTensor>& tensors);

// Checks that every piece of every tensor is present and matches its checksum.
absl::Status VerifyCheckpoint(const std::string& dir);

// Committed checkpoint directories under `root`, oldest first.
std::vector<std::string> ListCheckpoints(const std::string& root);

}  // namespace rmoe::distributed
