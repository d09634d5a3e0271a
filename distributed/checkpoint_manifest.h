// What the checkpoint writer and reader share (checkpoint_*.cc): the names of a checkpoint's
// files, dtypes and row shapes, step directories, the manifest's framing, its checks and the
// merge of every rank's partial manifest. Internal to distributed/: not part of the
// checkpoint API (distributed/checkpoint.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <torch/torch.h>

#include "distributed/checkpoint.h"
#include "proto/checkpoint.pb.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "Checkpoint files are little-endian raw bytes; this build assumes a little-endian host."
#endif

namespace rmoe::distributed::checkpoint_internal {

inline constexpr char kManifestName[] = "manifest.pb";
inline constexpr char kCommittedName[] = "COMMITTED";
inline constexpr char kLatestName[] = "latest";

// ---- dtypes: torch's Python names without "torch.", as the manifest records them ----------

// nullptr for a dtype checkpoints do not support.
const char* DtypeName(c10::ScalarType type);
// Bytes per element of a dtype name; 0 if unknown.
int64_t DtypeBytes(const std::string& name);
// "float32, float64, ...", for messages.
std::string KnownDtypes();

// ---- shapes: rows are along dim 0; a 0-d tensor is one row of one element -----------------

template <typename Shape>
std::string ShapeString(const Shape& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

template <typename Shape>
int64_t TotalRows(const Shape& shape) {
  return shape.size() == 0 ? 1 : shape[0];
}

template <typename Shape>
int64_t RowElements(const Shape& shape) {
  int64_t n = 1;
  for (int i = 1; i < static_cast<int>(shape.size()); ++i) n *= shape[i];
  return n;
}

std::string RowsString(int64_t begin, int64_t end);

// ---- step directories ------------------------------------------------------------------------

std::string StepDirName(int64_t step);  // step_<step:08d>
// "step_<digits>" -> step.
bool ParseStepDirName(const std::string& name, int64_t* step);
bool IsCommitted(const std::string& dir);

struct StepDir {
  int64_t step;
  std::string name;
  bool committed;
};
// Every step_<N> directory under root, by step.
std::vector<StepDir> ListStepDirs(const std::string& root);
// "committed checkpoints in <root>: step_..., ...", for messages.
std::string CommittedList(const std::string& root);
// A shard file name as the manifest may hold it: a plain name inside the checkpoint directory.
bool IsPlainFileName(const std::string& name);
// Removes a step directory that run `run_id` wrote (any run's when empty), so that a crash
// half-way leaves an uncommitted directory, never a committed one with files missing: the
// COMMITTED marker goes first. A directory without that ownership mark is refused, naming
// it, and left alone.
absl::Status RemoveStepDir(const std::string& path, const std::string& run_id);

// ---- the manifest ----------------------------------------------------------------------------

// manifest.pb's bytes: the framing is described in distributed/checkpoint.h.
std::string FrameManifest(const CheckpointManifest& manifest);

// What is wrong with this rank's ShardedTensor (name, dtype, global shape, where its local
// rows sit), or OK.
absl::Status CheckLocal(const ShardedTensor& t);

// Rank 0 of a save: one manifest from every rank's partial one (index = rank), appended to
// `out`. Fails when ranks declare a tensor differently or its rows are not written by
// exactly one rank.
absl::Status MergeManifests(const std::vector<std::string>& partials, CheckpointManifest* out);

}  // namespace rmoe::distributed::checkpoint_internal
