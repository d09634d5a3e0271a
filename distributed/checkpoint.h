// Sharded checkpoints: every rank writes its own pieces in parallel, a manifest describes
// the whole by global shapes, and a marker written last commits it. Loading reads, for the
// layout at hand, whatever rows each rank needs, whichever layout saved them.
//
// On-disk layout of one checkpoint (docs/checkpoints.md has the full story):
//
//   <root>/step_<step:08d>/shard_<rank:05d>.bin
//       The rows this rank writes (ShardedTensor::write), one piece per tensor, back to back
//       with no padding, in the order the tensors were passed. Raw little-endian element
//       bytes of the contiguous tensor (C order). A rank that writes nothing writes no file.
//   <root>/step_<step:08d>/manifest.pb
//       The CheckpointManifest (proto/checkpoint.proto), framed so that truncation and
//       corruption are detected (all integers little-endian):
//         offset  size  field
//              0     8  magic "RMOECKPT"
//              8     4  uint32 format version (= manifest.format_version)
//             12     8  uint64 payload length N
//             20     N  payload: the binary-serialised CheckpointManifest
//           20+N     4  uint32 CRC-32C of the payload
//       The file is exactly 24 + N bytes; anything else is an error.
//   <root>/step_<step:08d>/COMMITTED
//       Written last; its presence makes the directory a checkpoint. Contents: "step N\n".
//   <root>/latest
//       The name of the newest committed step directory plus "\n", replaced atomically.
//
// How a save commits (the protocol, step by step) is described in checkpoint_writer.cc;
// checkpoint_reader.cc reads, checkpoint_manifest.cc frames and checks the manifest.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
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
  torch::Tensor local;  // any device; LoadTensors fills it (through a host copy off the CPU)
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
  // Files rank 0 copies (by base name, fsynced) into the step directory before the manifest
  // and the COMMITTED marker, e.g. the dataset's meta.pbtxt and tokenizer.model so that a
  // checkpoint is enough to generate text. They are not in the manifest and not checksummed.
  // A missing file, or a base name that a checkpoint uses itself (manifest.pb, COMMITTED,
  // shard_*), fails the save. Only rank 0's list is used.
  std::vector<std::string> extra_files;
};

// How a save is written (BeginCheckpoint, SaveCheckpoint).
struct CheckpointWriteOptions {
  // After the commit, committed checkpoints beyond the newest `keep_last` (this one
  // included) are deleted; 0 keeps them all.
  int keep_last = 0;
  // BeginCheckpoint copies the rows this rank writes and writes its shard on a background
  // thread (see there). SaveCheckpoint waits for the write either way.
  bool background = false;

  // Test hooks, for tests that must catch a save half-way; 0 (the default) disables them.
  // Rank 0 sleeps this long after the manifest is durable and before COMMITTED, saying so on
  // stderr ("rmoe checkpoint: test hook pause_before_commit_seconds: manifest of DIR
  // written, pausing S s before the commit"), so that a fault test can kill a rank while
  // the save is pending.
  double pause_before_commit_seconds = 0;
  // A background writer sleeps this long before it writes, so that a save stays in flight
  // while the caller goes on (no effect without `background`).
  double delay_background_write_seconds = 0;

  // The run id the checkpoint root's ownership mark (rmoe/util/ownership.h) must hold: that
  // of this run's earlier saves, so that a root replaced since then (or reached through a
  // path component swapped for a symbolic link) is refused. Empty: any; a root without a
  // mark gets a new one. Step directories are marked with it, and pruning deletes only
  // directories with this run's mark.
  std::string run_id;
};

// Collective over `world`. Each rank writes and fsyncs its shard file; if every rank
// succeeded, rank 0 writes the manifest, and after a barrier the COMMITTED marker and the
// `latest` pointer; then committed checkpoints beyond the newest `options.keep_last` are
// deleted. An error on any rank makes every rank return an error and nothing is committed.
// Returns the checkpoint directory. (BeginCheckpoint + FinishCheckpoint.)
absl::StatusOr<std::string> SaveCheckpoint(const std::string& root, const CheckpointState& state,
                                           const std::vector<ShardedTensor>& tensors,
                                           Communicator& world,
                                           const CheckpointWriteOptions& options);
// The same with the default options but `keep_last`.
absl::StatusOr<std::string> SaveCheckpoint(const std::string& root, const CheckpointState& state,
                                           const std::vector<ShardedTensor>& tensors,
                                           Communicator& world, int keep_last);

// A save in flight: its step directory is prepared, this rank's shard is being (or has
// been) written; nothing collective has happened since. Destroying it without
// FinishCheckpoint waits for the writer and commits nothing (an uncommitted directory is
// left, which readers ignore and the next save of that step removes).
class PendingCheckpoint {
 public:
  ~PendingCheckpoint();
  PendingCheckpoint(const PendingCheckpoint&) = delete;
  PendingCheckpoint& operator=(const PendingCheckpoint&) = delete;

  const std::string& dir() const;
  int64_t step() const;
  // Whether this rank's shard write has ended (successfully or not); never blocks. Always
  // true for a synchronous save. Not collective: ranks agree on it before finishing.
  bool WriteDone() const;
  // Bytes this rank writes into its shard file (what a background save holds in memory).
  int64_t local_bytes() const;
  // After a successful FinishCheckpoint: the shard bytes of all ranks together.
  int64_t total_bytes() const;

  struct Impl;

 private:
  friend absl::StatusOr<std::unique_ptr<PendingCheckpoint>> BeginCheckpoint(
      const std::string&, const CheckpointState&, const std::vector<ShardedTensor>&,
      Communicator&, const CheckpointWriteOptions&);
  friend absl::StatusOr<std::string> FinishCheckpoint(PendingCheckpoint&, Communicator&);
  explicit PendingCheckpoint(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The first half of SaveCheckpoint, collective over `world`, on the thread that makes MPI
// calls: rank 0 prepares the step directory (everyone learns whether that worked), then
// every rank takes what it writes and this rank's generator state. With
// `options.background`, the rows this rank writes are copied (cloned) first, so the caller
// may change its tensors as soon as this returns, and a background thread writes and fsyncs
// the shard file; this thread calls nothing collective. Without it, the shard is written
// before this returns and the tensors must stay unchanged until then. Errors of the shard
// write (including invalid tensors) surface in FinishCheckpoint, on every rank; an error
// here is the same on every rank and leaves nothing in flight. Only rank 0's keep_last and
// pause_before_commit_seconds matter.
absl::StatusOr<std::unique_ptr<PendingCheckpoint>> BeginCheckpoint(
    const std::string& root, const CheckpointState& state,
    const std::vector<ShardedTensor>& tensors, Communicator& world,
    const CheckpointWriteOptions& options);

// The second half, collective over the same `world` and on the MPI thread: waits for this
// rank's writer, then gathers every rank's piece records (the error exchange), rank 0 copies
// the extra files and writes the manifest, a barrier, COMMITTED, `latest`, pruning. Returns
// the checkpoint directory. Call it once per pending checkpoint.
absl::StatusOr<std::string> FinishCheckpoint(PendingCheckpoint& pending, Communicator& world);

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

// What an earlier run left in `root`: its `latest` pointer and step directories (committed
// or not), as paths; empty when there is nothing there.
std::vector<std::string> PreviousCheckpoints(const std::string& root);

// Deletes them, for a fresh run told to replace an earlier one. Every step directory must
// carry rmoe's checkpoint mark; if one does not, nothing is deleted and the error names it.
// `latest` goes first, so a crash half-way never leaves it naming a deleted checkpoint.
absl::Status RemovePreviousCheckpoints(const std::string& root);

}  // namespace rmoe::distributed
