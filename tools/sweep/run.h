// Running a sweep's points one after another through rmoe_train (under mpirun for several
// ranks), resumably, and gathering their results. Torch-free: rmoe_train runs as a program.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include "rmoe/config/job_spec.h"
#include "tools/sweep/metrics.h"
#include "tools/sweep/spec.h"

namespace rmoe::sweep {

// The files that mark a point's state in its directory.
inline constexpr char kDoneFile[] = "DONE";
inline constexpr char kJobFile[] = "job.pbtxt";
inline constexpr char kLogFile[] = "train.log";
inline constexpr char kParametersFile[] = "parameters.txt";

struct RunOptions {
  std::string train_program;   // resolved (ResolveTrainProgram)
  std::string mpirun_program;  // "mpirun" unless the spec or --mpirun says otherwise
  std::vector<std::string> mpirun_args;
  FILE* out = stdout;
  // Redraw the progress line in place (a terminal); otherwise one line per event.
  bool interactive = false;
  // Seconds between polls of a running point.
  double poll_seconds = 1.0;
};

RunOptions MakeRunOptions(const Sweep& sweep, const std::string& train_program_override,
                          const std::string& mpirun_override, const std::string& argv0);

// The program rmoe_sweep runs for training: the override, else the spec's train_program,
// else rmoe_train in <directory of this executable>/../launcher, then next to it, else
// "rmoe_train" (looked up on the PATH).
std::string ResolveTrainProgram(const std::string& from_spec, const std::string& argv0);

// The command line of one point's training run: "[mpirun -np R ARGS...] TRAIN --job
// <dir>/job.pbtxt --quiet [--resume]".
std::vector<std::string> TrainCommand(const RunOptions& options, const Point& point, bool resume);

enum class PointState { kFresh, kResumable, kDone };
// kDone when <dir>/DONE exists; kResumable when its checkpoint root holds a committed
// checkpoint (a step_* directory with COMMITTED); else kFresh.
PointState InspectPoint(const Point& point);
// The checkpoint root of the point (checkpoint.directory or <output_dir>/checkpoints).
std::string CheckpointRootOf(const JobSpec& job);

// The parameter counts of a job from `TRAIN --job TMP --dry-run` (run without mpirun, with
// the layout set to one rank: the counts do not depend on it).
absl::StatusOr<ParameterCounts> CountParameters(const std::string& train_program,
                                                const JobSpec& job);
// From <dir>/parameters.txt, else by CountParameters (then cached there when `cache`).
absl::StatusOr<ParameterCounts> PointParameters(const std::string& train_program,
                                                const Point& point, bool cache);

struct SweepOutcome {
  int already_done = 0, ran = 0, failed = 0;
  bool interrupted = false;
};
// Runs every unfinished point in order (resuming those with a checkpoint), printing
// progress to options.out. A failing point is reported with its log's tail and the sweep
// goes on. On SIGINT/SIGTERM the point in hand is left to checkpoint and the sweep stops.
SweepOutcome RunSweep(const Sweep& sweep, const RunOptions& options);

// Reads every point's metrics, writes results.csv, results.md and the plots into the
// sweep's output_dir, and prints where they are. Parameter counts come from parameters.txt,
// or from the training program when train_program is not empty.
absl::Status GatherResults(const Sweep& sweep, const std::string& train_program, FILE* out);

// "35s", "5m", "1h02m".
std::string FormatDuration(double seconds);

}  // namespace rmoe::sweep
