// rmoe_sweep's library: expanding a SweepSpec (proto/sweep.proto) into points, validating
// them, running them one after another through rmoe_train (resumably), and gathering their
// metrics into results.csv, results.md and gnuplot charts. Torch-free: rmoe_train runs as a
// separate program. See docs/sweeps.md.
#ifndef RMOE_TOOLS_SWEEP_LIB_H_
#define RMOE_TOOLS_SWEEP_LIB_H_

#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "job.pb.h"
#include "rmoe/config/job_spec.h"
#include "sweep.pb.h"

namespace rmoe::sweep {

// The pseudo-field of an axis that sets the number of MPI ranks.
inline constexpr char kRanksField[] = "ranks";

// ---------------------------------------------------------------------------------------
// Expansion (tools/sweep_spec.cc)

// One run of the sweep.
struct Point {
  int index = 0;   // 1-based, in running order
  int repeat = 0;  // 0-based repeat (seed offset)
  uint64_t seed = 0;
  int ranks = 1;
  // (axis label, value's display name) for every axis, in axis order.
  std::vector<std::pair<std::string, std::string>> axis_values;
  // Every FIELD=VALUE the axes applied to the base job (the ranks pseudo-field excluded).
  std::vector<std::string> overrides;
  // Filesystem-safe directory name, e.g. "router-gru-layer_ranks-2_seed-1234".
  std::string name;
  // "router=gru-layer, ranks=2, seed=1234" (errors, progress).
  std::string description;
  // The axis values without the seed: points that differ only by seed share it.
  std::string config_key;
  std::string dir;  // <sweep output_dir>/<name>
  JobSpec job;      // the point's complete job spec (output_dir = dir)
};

struct Sweep {
  SweepSpec spec;
  std::string spec_path;    // the sweep file ("" when parsed from text)
  std::string base_source;  // the base job's path, or "<inline base_job>"
  JobSpec base;             // after base_overrides and --set
  std::string output_dir;
  std::vector<std::string> axis_labels;
  bool ranks_is_axis = false;
  std::vector<Point> points;
};

struct ExpandOptions {
  // rmoe_sweep --set: applied to the base job after the spec's base_overrides.
  std::vector<std::string> overrides;
  // rmoe_sweep --output-dir: replaces the spec's output_dir.
  std::string output_dir;
};

absl::StatusOr<SweepSpec> LoadSweepSpec(const std::string& path);
absl::StatusOr<SweepSpec> ParseSweepSpec(absl::string_view text, absl::string_view source_name);

// Expands the spec into its points. Fails (InvalidArgument listing every problem) on a
// malformed spec (axes of different lengths under ZIP, an empty axis, a bad rank count...),
// a base job that cannot be loaded, or a value the job spec does not accept ("point 3
// (router=RNN, seed=2): model.router.cell=LSTM: ..."). spec_path locates a relative
// base_job_path (see proto/sweep.proto).
absl::StatusOr<Sweep> ExpandSweep(const SweepSpec& spec, const std::string& spec_path,
                                  const ExpandOptions& options = {});

// Every point's job through ValidateJobSpec, plus the layout: ranks must be a multiple of
// parallel.expert_parallel_size and so must model.moe.num_experts. One InvalidArgument lists
// every bad point ("point 3 (router=rnn, seed=2): model.router.hidden_dim = 0 must be > 0");
// a problem shared by every point is listed once. A missing dataset adds the hint to run
// rmoe_prepare_data with the base job.
absl::Status ValidatePoints(const Sweep& sweep, const ValidationOptions& options = {});

// Letters, digits, '.', '+' and '-' kept; every other run of characters becomes one '-'.
std::string SafeName(absl::string_view text);

// The FIELD=VALUE lines in which the point's job differs from the base (text format).
std::vector<std::string> JobDiff(const JobSpec& base, const JobSpec& job);

// ---------------------------------------------------------------------------------------
// Metrics and results (tools/sweep_report.cc)

struct MoELayerRecord {
  int layer = 0;
  std::vector<double> tokens_per_expert;
  double dropped = 0, assignments = 0, router_entropy = 0, load_balance_loss = 0, z_loss = 0;
};

struct TrainRecord {
  int64_t step = 0;
  double lr = 0, loss = 0, router_loss = 0, grad_norm = 0, tokens_per_s = 0, step_s = 0,
         comm_s = 0, tokens = 0, elapsed_s = 0;
  double forward_s = 0, router_s = 0;  // NaN in metrics from before they were logged
  std::vector<MoELayerRecord> moe;
};

// An evaluation's routing analytics (rmoe/model/routing_stats.h), over the validation set.
struct RoutingRecord {
  std::vector<double> load_cv, entropy;                     // per MoE layer
  std::vector<double> mutual_information, predictability;  // per consecutive MoE layer pair
};

struct EvalRecord {
  int64_t step = 0;
  double val_loss = 0, val_ppl = 0;
  std::optional<RoutingRecord> routing;
};

struct RunMetrics {
  std::vector<TrainRecord> train;  // by step; a resumed run's repeated steps replace the old
  std::vector<EvalRecord> eval;
  int bad_lines = 0;  // lines that are not JSON objects (e.g. one cut short by a crash)
};

// Parses metrics.jsonl text. Records of other types (e.g. "checkpoint") are ignored. When a
// record's step is not after the previous record of its type (a run resumed from an earlier
// checkpoint appends to the file), the earlier records from that step on are dropped.
RunMetrics ParseMetrics(absl::string_view text);
// NotFound when the file does not exist.
absl::StatusOr<RunMetrics> ReadMetricsFile(const std::string& path);

struct ParameterCounts {
  int64_t total = -1, active = -1, expert = -1;
};
// Finds "# parameters: T total, A active per token, E in experts" in rmoe_train --dry-run's
// output.
std::optional<ParameterCounts> ParseParameterCounts(absl::string_view dry_run_output);

// One point's row of the results. NaN = not available.
struct PointResult {
  std::string status;  // "done", "failed", "incomplete", "not run"
  int64_t steps = 0;   // the last logged training step
  double final_train_loss, final_val_loss, best_val_loss;
  double tokens_per_s;  // mean over train records, the first (warm-up) one excluded
  double step_s, comm_s, compute_s, compute_share;  // means, likewise; share = compute/step
  double router_entropy;    // last record: mean over MoE layers
  double expert_load_cv;    // last record: std/mean of tokens per expert, mean over layers
  double dropped_fraction;  // last record: dropped / assignments over all layers
  // Router forward time / model forward time (means over the train records after the first).
  double router_share;
  // From the last evaluation's routing analytics (validation set), means over MoE layers or
  // consecutive MoE layer pairs: load CV, mutual information (nats) between the top-1
  // experts of consecutive MoE layers, and that information over the next layer's entropy.
  double val_load_cv, layer_mutual_information, layer_predictability;
  ParameterCounts parameters;
  PointResult();
};

// The numbers above from one run's metrics (status and parameters left to the caller).
PointResult SummarizeMetrics(const RunMetrics& metrics);

// The columns of results.csv, and the file's text: one row per point, in point order.
std::vector<std::string> ResultColumns(const Sweep& sweep);
std::string ResultsCsv(const Sweep& sweep, const std::vector<PointResult>& results);
// results.md: the per-point table and the per-configuration summary (mean and sample std
// over repeats).
std::string ResultsMarkdown(const Sweep& sweep, const std::vector<PointResult>& results);

// Mean and sample standard deviation (n - 1) of the finite values; NaN where undefined.
std::pair<double, double> MeanAndStd(const std::vector<double>& values);

// Writes loss_curves.{dat,gp,png} (and scaling.{dat,gp,png} when ranks is an axis) into
// dir, running gnuplot when it is on the PATH (else a warning on `log` and only the .dat
// and .gp files). Returns the PNGs drawn.
std::vector<std::string> WritePlots(const Sweep& sweep, const std::vector<PointResult>& results,
                                    const std::vector<RunMetrics>& metrics,
                                    const std::string& dir, FILE* log);

// ---------------------------------------------------------------------------------------
// Running (tools/sweep_run.cc)

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

#endif  // RMOE_TOOLS_SWEEP_LIB_H_
