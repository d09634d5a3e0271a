// rmoe_sweep: runs a sweep of training jobs (proto/sweep.proto, docs/sweeps.md).
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>
#include <absl/strings/str_split.h>
#include "rmoe/util/cli.h"
#include "tools/sweep/run.h"
#include "tools/sweep/spec.h"

namespace {

constexpr char kUsage[] = R"(Usage: rmoe_sweep --sweep SWEEP.pbtxt [options]

Runs a sweep: many rmoe_train runs ("points") of one base job spec that differ along a
few axes, one after another, and gathers their results. The sweep spec (protobuf text
format, rmoe.SweepSpec in proto/sweep.proto; examples in configs/sweeps/) names:
  base_job { ... } or base_job_path   the job every point starts from (+ base_overrides)
  axes { field values label value_names linked }
                                      a job field path as for rmoe_train --set (e.g.
                                      model.router.kind), or "ranks" (mpirun -np); linked
                                      fields change together with the axis (e.g. ranks with
                                      parallel.expert_parallel_size)
  combination: GRID | ZIP             every combination of the axes, or their i-th values
  repeats: N                          seeds: repeat r trains with seed + r
  output_dir                          default runs/sweeps/<name>
  train_program, mpirun_program, mpirun_args (e.g. "--oversubscribe")

Every point is validated before any runs (a bad value names the point and the field;
the dataset must exist: run rmoe_prepare_data --job <base job> first). Then each point
runs in <output_dir>/<point name>/: job.pbtxt (its full spec), train.log (rmoe_train's
output), metrics.jsonl, checkpoints/, model/, and DONE once it finished. Points of R > 1
ranks run as `mpirun -np R [mpirun_args] rmoe_train --job job.pbtxt --quiet`; points of
one rank run rmoe_train directly. checkpoint.interval, when the base job leaves it unset,
becomes steps/10 (rounded up), so an interrupted point loses little.

Resuming: run the same command again. Finished points (DONE) are skipped, an unfinished
point with a checkpoint continues from it (rmoe_train --resume), others start afresh. A
failed point is reported with the end of its train.log and the sweep goes on (the exit
status is then 1). Ctrl-C lets the running point checkpoint and stops the sweep (exit
status 130); a SIGTERM to rmoe_sweep is passed on to the point in hand.

Results (also after a partial run; --report rewrites them alone) in <output_dir>:
  results.csv      one row per point: axis values, seed, ranks, status, final train loss,
                   final and best validation loss, tokens/s, step_s, comm_s, compute_s and
                   compute share (means over the logged records after the first),
                   parameters (total, active per token, in experts), router entropy (mean
                   over MoE layers), expert load CV (std/mean of tokens per expert, mean
                   over layers) and dropped fraction (last record), the routers' share of
                   the forward pass, and from the last evaluation's routing of the
                   validation set: load CV, mutual information and predictability between
                   consecutive MoE layers' top-1 experts, and their effective number of
                   expert pairs (e to the entropy of the pair's joint top-1 distribution)
  results.md       that table, a per-configuration summary (mean ± sample std over seeds),
                   each configuration against its baseline (the first value of the first
                   axis, the other axes equal): the difference of the mean final validation
                   losses, the seed spread, Welch's t, dof and two-sided p (repeats >= 2),
                   and, when ranks is an axis, a scaling table
  loss_curves.png  training (lines) and validation (dots) loss of every point
  val_curves.png   validation loss per configuration, mean ± std over seeds
  scaling.png      tokens/s and parallel efficiency against ranks (when ranks is an axis)
  (*.gp and *.dat next to the charts; the PNGs need gnuplot, else a warning)

Options:
  --sweep PATH          the sweep spec (required)
  --set FIELD=VALUE     override a field of the base job, after the spec's base_overrides
                        (repeatable), e.g. --set data.dataset_dir=/data/prepared
  --output-dir DIR      replaces the spec's output_dir
  --dry-run             print every point (name, ranks, command, parameter counts, and
                        its job's differences from the base job), validate, run nothing
  --full                with --dry-run: print each point's whole job spec
  --report              only gather the results of what has run so far
  --train-program PATH  the training program (default: the spec's train_program, else
                        rmoe_train of this build tree, else rmoe_train on the PATH)
  --mpirun PATH         the MPI launcher (default: the spec's mpirun_program, "mpirun")
  --help                this text

Exit status: 0 every point done, 1 a point failed, 2 bad arguments or an invalid sweep,
130 stopped by a signal.
)";

int Fail(int code, const std::string& message) {
  std::fprintf(stderr, "rmoe_sweep: %s\n", message.c_str());
  return code;
}

void PrintDryRun(const rmoe::sweep::Sweep& sweep, const rmoe::sweep::RunOptions& options, bool full) {
  using namespace rmoe;
  using namespace rmoe::sweep;
  const SweepSpec& spec = sweep.spec;
  std::printf("sweep %s: %zu points (%s of %d axes x %d repeats), base job %s, output %s\n",
              spec.name().c_str(), sweep.points.size(),
              spec.combination() == SweepSpec::ZIP ? "zip" : "grid", spec.axes_size(), spec.repeats(),
              sweep.base_source.c_str(), sweep.output_dir.c_str());
  std::vector<std::string> table;
  int64_t first_total = -1, first_active = -1;
  for (const Point& point : sweep.points) {
    std::printf("\npoint %d/%zu: %s\n  name: %s\n  ranks: %d\n  command: %s\n", point.index,
                sweep.points.size(), point.description.c_str(), point.name.c_str(), point.ranks,
                absl::StrJoin(TrainCommand(options, point, false), " ").c_str());
    auto counts = CountParameters(options.train_program, point.job);
    if (counts.ok()) {
      std::printf("  # parameters: %lld total, %lld active per token, %lld in experts\n",
                  static_cast<long long>(counts->total), static_cast<long long>(counts->active),
                  static_cast<long long>(counts->expert));
      if (first_total < 0) {
        first_total = counts->total;
        first_active = counts->active;
      }
      table.push_back(absl::StrFormat("  %-4d %-44s %12lld %+8.2f%% %12lld %+8.2f%%", point.index,
                                      point.description, static_cast<long long>(counts->total),
                                      100.0 * (counts->total - first_total) / first_total,
                                      static_cast<long long>(counts->active),
                                      100.0 * (counts->active - first_active) / first_active));
    } else {
      std::printf("  # parameters: unknown (%s)\n", std::string(counts.status().message()).c_str());
    }
    if (full) {
      std::printf("  job:\n");
      for (const auto& line : absl::StrSplit(JobSpecToText(point.job), '\n')) {
        if (!line.empty()) std::printf("    %s\n", std::string(line).c_str());
      }
    } else {
      std::printf("  job (differences from the base job):\n");
      for (const auto& line : JobDiff(sweep.base, point.job)) std::printf("    %s\n", line.c_str());
    }
  }
  if (!table.empty()) {
    std::printf("\nparameters (relative to point 1):\n  %-4s %-44s %12s %9s %12s %9s\n%s\n", "#",
                "point", "total", "", "active", "", absl::StrJoin(table, "\n").c_str());
  }
}

int Run(int argc, char** argv) {
  rmoe::cli::Parser parser;
  parser.Value("--sweep", "a path")
      .Repeated("--set", "FIELD=VALUE")
      .Value("--output-dir", "a directory")
      .Value("--train-program", "a path")
      .Value("--mpirun", "a path")
      .Switch("--dry-run")
      .Switch("--full")
      .Switch("--report");
  const auto args = parser.Parse(rmoe::cli::Arguments(argc, argv));
  if (!args.ok()) return Fail(2, absl::StrCat(args.status().message(), " (see --help)"));
  if (args->help()) return rmoe::cli::PrintUsage(kUsage);
  const std::string sweep_path = args->Get("--sweep");
  const bool dry_run = args->Has("--dry-run"), report = args->Has("--report");
  if (sweep_path.empty()) return Fail(2, "--sweep SWEEP.pbtxt is required (see --help)");
  if (dry_run && report) return Fail(2, "--dry-run and --report exclude each other");

  auto spec = rmoe::sweep::LoadSweepSpec(sweep_path);
  if (!spec.ok()) return Fail(2, std::string(spec.status().message()));
  rmoe::sweep::ExpandOptions expand;
  expand.overrides = args->All("--set");
  expand.output_dir = args->Get("--output-dir");
  auto sweep = rmoe::sweep::ExpandSweep(*spec, sweep_path, expand);
  if (!sweep.ok()) {
    return Fail(2, absl::StrCat("invalid sweep ", sweep_path, ":\n", sweep.status().message()));
  }
  rmoe::sweep::RunOptions options = rmoe::sweep::MakeRunOptions(
      *sweep, args->Get("--train-program"), args->Get("--mpirun"), argv[0]);
  options.interactive = isatty(fileno(stdout));

  if (report) {
    absl::Status s = rmoe::sweep::GatherResults(*sweep, options.train_program, stdout);
    return s.ok() ? 0 : Fail(1, std::string(s.message()));
  }
  const absl::Status valid = rmoe::sweep::ValidatePoints(*sweep);
  if (dry_run) {
    PrintDryRun(*sweep, options, args->Has("--full"));
    if (!valid.ok()) {
      return Fail(2, absl::StrCat("\nthe sweep would not run; every problem:\n", valid.message()));
    }
    std::printf("\nevery point is valid; nothing was run (--dry-run)\n");
    return 0;
  }
  if (!valid.ok()) {
    return Fail(2, absl::StrCat("invalid sweep ", sweep_path, " (nothing was run):\n", valid.message()));
  }

  std::printf("sweep %s: %zu points, output %s, training program %s\n", spec->name().c_str(),
              sweep->points.size(), sweep->output_dir.c_str(), options.train_program.c_str());
  std::fflush(stdout);
  const rmoe::sweep::SweepOutcome outcome = rmoe::sweep::RunSweep(*sweep, options);
  const size_t total = sweep->points.size();
  std::printf("%d of %zu points were already done, %d ran, %d failed%s\n", outcome.already_done, total,
              outcome.ran, outcome.failed, outcome.interrupted ? ", stopped by a signal" : "");
  absl::Status gathered = rmoe::sweep::GatherResults(*sweep, options.train_program, stdout);
  if (!gathered.ok()) Fail(1, std::string(gathered.message()));
  if (outcome.interrupted) {
    std::printf("stopped: run the same command again to resume (finished points are skipped, the "
                "interrupted one continues from its checkpoint)\n");
    return 130;
  }
  if (outcome.failed > 0) return Fail(1, absl::StrCat(outcome.failed, " point(s) failed; see above"));
  return gathered.ok() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    return Fail(1, e.what());
  }
}
