// Which directories an rmoe program may delete or replace: only those it created, which it
// marks with a file `.rmoe-owner` holding "rmoe <kind> <run id>". Anything else in the way
// (a user's own `model/` folder in output_dir ".", a `step_*` directory copied in from
// elsewhere) is refused with its path named, never deleted.
//
// Kinds in use: "output" (a run's output_dir), "checkpoints" (a checkpoint root, whose run
// id is the run's identity across resumes), "checkpoint" (one step directory, marked with
// its root's run id), "model" (a saved model), "dataset" (a prepared dataset), "export" (a
// model exported for other tools, rmoe/train/model_export.h).
#pragma once

#include <functional>
#include <optional>
#include <string>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

namespace rmoe {

inline constexpr char kOwnerMarkName[] = ".rmoe-owner";

inline constexpr char kOutputDirKind[] = "output";
inline constexpr char kCheckpointRootKind[] = "checkpoints";
inline constexpr char kCheckpointKind[] = "checkpoint";
inline constexpr char kModelKind[] = "model";
inline constexpr char kDatasetKind[] = "dataset";
inline constexpr char kExportKind[] = "export";

struct OwnerMark {
  std::string kind;
  std::string run_id;
};

// 16 hex digits from the random device: unique enough to tell runs apart.
std::string NewRunId();

// The mark of `dir`; nullopt when `dir` has none (or does not exist). A mark that is not a
// regular file (a symbolic link, say) or does not parse is an error naming it.
absl::StatusOr<std::optional<OwnerMark>> ReadOwnerMark(const std::string& dir);

// Writes (or replaces) the mark of the existing directory `dir`, durably.
absl::Status WriteOwnerMark(const std::string& dir, const OwnerMark& mark);

// Creates the directory `dir` and marks it; its parent must exist. AlreadyExists if there is
// anything at `dir`.
absl::Status CreateOwnedDirectory(const std::string& dir, const OwnerMark& mark);

// Whether `dir` is a directory (not a symbolic link to one) marked with `kind` and, when
// `run_id` is not empty, that run.
bool IsOwned(const std::string& dir, absl::string_view kind, absl::string_view run_id = "");

// Removes `dir` with everything in it if IsOwned(dir, kind, run_id); nothing there is fine.
// Anything else at `dir` (unmarked, marked by another kind or run, a symbolic link) is
// refused with FailedPrecondition naming it, and left as it was, except the remains of an
// interrupted CreateOwnedDirectory (nothing in it but the mark or its temporary file),
// whose removal loses nothing. The mark goes last, so an interrupted removal leaves a
// directory that is still recognisably ours.
absl::Status RemoveOwnedDirectory(const std::string& dir, absl::string_view kind,
                                  absl::string_view run_id = "");

// Moves the finished directory `staged` to `target`, replacing what is there: the old
// `target` is kept as `<target>.old` until the new one is in place, then removed. An
// existing `target` or `<target>.old` must be owned with `kind` (any run), else nothing is
// touched and the error names it.
absl::Status ReplaceOwnedDirectory(const std::string& staged, const std::string& target,
                                   absl::string_view kind);

// Writes the directory `dir` of `kind` as a whole: `write` fills a fresh owned staging
// directory `<dir>.tmp` (its parents are created), which then replaces `dir`
// (ReplaceOwnedDirectory), so `dir` is always the old complete directory or the new one. The
// remains of an interrupted write at `<dir>.tmp` are removed first; on failure the staging
// directory is removed and `dir` left as it was.
absl::Status WriteOwnedDirectory(const std::string& dir, absl::string_view kind,
                                 const std::function<absl::Status(const std::string& staging)>& write);

}  // namespace rmoe
