// rmoe_sweep's sweep specs: a SweepSpec (proto/sweep.proto) expanded into its points, each
// a complete job spec, and validated before anything runs. See docs/sweeps.md.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include "proto/job.pb.h"
#include "rmoe/config/job_spec.h"
#include "proto/sweep.pb.h"

namespace rmoe::sweep {

// The pseudo-field of an axis that sets the number of MPI ranks.
inline constexpr char kRanksField[] = "ranks";

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

}  // namespace rmoe::sweep
