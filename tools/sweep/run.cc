// Running a sweep's points one after another, resumably, and gathering their results.
#include "tools/sweep/run.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include <absl/strings/match.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>
#include <absl/strings/str_replace.h>
#include <absl/strings/str_split.h>
#include <absl/strings/strip.h>
#include "rmoe/data/subprocess.h"
#include "rmoe/util/files.h"
#include "tools/sweep/report.h"

extern char** environ;

namespace rmoe::sweep {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr char kFailedFile[] = "FAILED";
// Starts each run's section of train.log.
constexpr char kLogHeader[] = "=== rmoe_sweep ";
// rmoe_train's last line after a complete run.
constexpr char kTrainedMarker[] = "model saved to";

std::atomic<int> g_stop_signal{0};
void OnStopSignal(int signal) { g_stop_signal.store(signal); }

std::string Quote(const std::string& arg) {
  if (!arg.empty() && arg.find_first_of(" \t\n'\"\\$`;&|<>*?()[]{}!#~") == std::string::npos) return arg;
  return "'" + absl::StrReplaceAll(arg, {{"'", "'\\''"}}) + "'";
}

std::string ShellLine(const std::vector<std::string>& argv) {
  std::vector<std::string> quoted;
  for (const auto& a : argv) quoted.push_back(Quote(a));
  return absl::StrJoin(quoted, " ");
}

std::string Now() {
  const std::time_t t = std::time(nullptr);
  char buffer[64];
  std::strftime(buffer, sizeof buffer, "%Y-%m-%d %H:%M:%S", std::localtime(&t));
  return buffer;
}

// Writes a state marker (DONE, FAILED) into the point's directory. A marker that cannot be
// written is not fatal: the point's state is then worked out again from its log next time.
void MarkPoint(const Point& point, const char* marker, const std::string& text) {
  WriteFileAtomically((fs::path(point.dir) / marker).string(), text).IgnoreError();
}

// The text of the last run's section of a train.log.
absl::string_view LastRunSection(absl::string_view log) {
  const size_t at = log.rfind(kLogHeader);
  return at == absl::string_view::npos ? log : log.substr(at);
}

// The last `lines` lines of text, indented.
std::string Tail(absl::string_view text, int lines) {
  std::vector<absl::string_view> all = absl::StrSplit(absl::StripTrailingAsciiWhitespace(text), '\n');
  const size_t start = all.size() > static_cast<size_t>(lines) ? all.size() - lines : 0;
  std::string out;
  for (size_t i = start; i < all.size(); ++i) absl::StrAppend(&out, "    | ", all[i], "\n");
  return out;
}

// The step of the last training record in a metrics file (its last 64 KiB), or -1.
int64_t LastLoggedStep(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return -1;
  const std::streamoff size = in.tellg();
  const std::streamoff start = std::max<std::streamoff>(0, size - 65536);
  in.seekg(start);
  std::string text(static_cast<size_t>(size - start), '\0');
  in.read(&text[0], static_cast<std::streamsize>(text.size()));
  if (start > 0) {
    const size_t newline = text.find('\n');
    text = newline == std::string::npos ? "" : text.substr(newline + 1);
  }
  const RunMetrics metrics = ParseMetrics(text);
  return metrics.train.empty() ? -1 : metrics.train.back().step;
}

// Starts argv with stdout and stderr appended to log_path and stdin from /dev/null.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const std::string& log_path) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int error = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) {
    return absl::UnavailableError(absl::StrCat("cannot start ", argv[0], ": ", std::strerror(error)));
  }
  return pid;
}

// Restores the previous SIGINT/SIGTERM handlers when it goes out of scope.
class StopSignals {
 public:
  StopSignals() {
    g_stop_signal.store(0);
    struct sigaction action {};
    action.sa_handler = OnStopSignal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, &old_int_);
    sigaction(SIGTERM, &action, &old_term_);
  }
  ~StopSignals() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }

 private:
  struct sigaction old_int_ {}, old_term_ {};
};

// The status of a point for the results table.
std::string PointStatus(const Point& point) {
  std::error_code ec;
  if (fs::exists(fs::path(point.dir) / kDoneFile, ec)) return "done";
  if (fs::exists(fs::path(point.dir) / kFailedFile, ec)) return "failed";
  if (fs::exists(fs::path(point.dir) / kJobFile, ec)) return "incomplete";
  return "not run";
}

}  // namespace

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  if (s < 60) return absl::StrCat(s, "s");
  if (s < 3600) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%dh%02dm", s / 3600, (s % 3600) / 60);
}

std::string ResolveTrainProgram(const std::string& from_spec, const std::string& argv0) {
  if (!from_spec.empty()) return from_spec;
  std::error_code ec;
  fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (ec) self = fs::absolute(argv0, ec);
  const fs::path dir = self.parent_path();
  for (const fs::path& candidate : {dir / ".." / "launcher" / "rmoe_train", dir / "rmoe_train"}) {
    if (access(candidate.c_str(), X_OK) == 0) return candidate.lexically_normal().string();
  }
  return "rmoe_train";
}

RunOptions MakeRunOptions(const Sweep& sweep, const std::string& train_program_override,
                          const std::string& mpirun_override, const std::string& argv0) {
  RunOptions options;
  options.train_program = ResolveTrainProgram(
      !train_program_override.empty() ? train_program_override : sweep.spec.train_program(), argv0);
  if (options.train_program.find('/') != std::string::npos) {
    std::error_code ec;
    options.train_program = fs::absolute(options.train_program, ec).lexically_normal().string();
  }
  options.mpirun_program = !mpirun_override.empty() ? mpirun_override : sweep.spec.mpirun_program();
  options.mpirun_args.assign(sweep.spec.mpirun_args().begin(), sweep.spec.mpirun_args().end());
  return options;
}

std::vector<std::string> TrainCommand(const RunOptions& options, const Point& point, bool resume) {
  std::vector<std::string> argv;
  if (point.ranks > 1) {
    argv = {options.mpirun_program, "-np", absl::StrCat(point.ranks)};
    argv.insert(argv.end(), options.mpirun_args.begin(), options.mpirun_args.end());
  }
  argv.insert(argv.end(), {options.train_program, "--job", (fs::path(point.dir) / kJobFile).string(), "--quiet"});
  // A point that starts afresh replaces what an earlier, unfinished attempt left in its
  // directory (the sweep owns it).
  argv.push_back(resume ? "--resume" : "--overwrite");
  return argv;
}

std::string CheckpointRootOf(const JobSpec& job) {
  if (job.checkpoint().has_directory()) return job.checkpoint().directory();
  return (fs::path(job.output_dir()) / "checkpoints").string();
}

PointState InspectPoint(const Point& point) {
  std::error_code ec;
  if (fs::exists(fs::path(point.dir) / kDoneFile, ec)) return PointState::kDone;
  const fs::path root = CheckpointRootOf(point.job);
  if (fs::is_directory(root, ec)) {
    for (const auto& entry : fs::directory_iterator(root, ec)) {
      if (absl::StartsWith(entry.path().filename().string(), "step_") &&
          fs::exists(entry.path() / "COMMITTED", ec)) {
        return PointState::kResumable;
      }
    }
  }
  return PointState::kFresh;
}

absl::StatusOr<ParameterCounts> CountParameters(const std::string& train_program, const JobSpec& job) {
  // The counts depend on the model and the dataset's vocabulary only.
  static std::map<std::string, ParameterCounts>* cache = new std::map<std::string, ParameterCounts>;
  const std::string key = absl::StrCat(train_program, "\n", job.data().dataset_dir(), "\n",
                                       job.model().SerializeAsString());
  if (auto it = cache->find(key); it != cache->end()) return it->second;
  const std::string program = FindExecutable(train_program);
  if (program.empty()) return absl::NotFoundError(absl::StrCat("training program ", train_program, " not found"));
  JobSpec one_rank = job;
  one_rank.mutable_parallel()->set_expert_parallel_size(1);
  char path[] = "/tmp/rmoe_sweep_job_XXXXXX";
  const int fd = mkstemp(path);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot create a temporary file: ", std::strerror(errno)));
  close(fd);
  const bool written = WriteFileAtomically(path, JobSpecToText(one_rank)).ok();
  auto run = written ? RunSubprocess({program, "--job", path, "--dry-run"}, "")
                     : absl::StatusOr<SubprocessResult>(absl::InternalError("cannot write the job"));
  unlink(path);
  if (!run.ok()) return run.status();
  auto counts = ParseParameterCounts(run->stdout_data);
  if (run->exit_status != 0 || !counts) {
    return absl::InternalError(absl::StrCat(train_program, " --dry-run (exit ", run->exit_status,
                                            ") gave no parameter counts: ",
                                            absl::StripTrailingAsciiWhitespace(run->stderr_data)));
  }
  (*cache)[key] = *counts;
  return *counts;
}

absl::StatusOr<ParameterCounts> PointParameters(const std::string& train_program, const Point& point,
                                                bool cache) {
  const std::string file = (fs::path(point.dir) / kParametersFile).string();
  if (auto counts = ParseParameterCounts(ReadFile(file).value_or(""))) return *counts;
  if (train_program.empty()) return absl::NotFoundError(absl::StrCat("no ", file));
  auto counts = CountParameters(train_program, point.job);
  if (counts.ok() && cache) {
    std::error_code ec;
    fs::create_directories(point.dir, ec);
    // Only a cache: without it the counts are asked for again next time.
    WriteFileAtomically(file, absl::StrFormat("# parameters: %d total, %d active per token, %d in experts\n",
                                              counts->total, counts->active, counts->expert))
        .IgnoreError();
  }
  return counts;
}

namespace {

// Elapsed time and the remaining-time estimate over the points this session runs.
struct SweepClock {
  Clock::time_point start = Clock::now();
  int to_run = 0;         // points not done when the session started
  double work_done = 0;  // points run in this session, fractions included

  double Elapsed() const { return std::chrono::duration<double>(Clock::now() - start).count(); }
  double Eta(double current_fraction) const {
    const double done = work_done + current_fraction;
    return done > 0.02 ? Elapsed() / done * (to_run - done) : std::nan("");
  }
};

// The point's state, counting a run that finished but was cut off before DONE was written
// (its last checkpoint is the final step, so it cannot resume) as done.
PointState SettledState(const Point& point, const std::string& log_path) {
  const PointState state = InspectPoint(point);
  if (state != PointState::kDone &&
      absl::StrContains(LastRunSection(ReadFile(log_path).value_or("")), kTrainedMarker) &&
      fs::exists(fs::path(point.dir) / "model")) {
    MarkPoint(point, kDoneFile, absl::StrCat("done ", Now(), "\n"));
    return PointState::kDone;
  }
  return state;
}

void ReportSkipped(const Point& point, const std::string& prefix, FILE* out) {
  const std::string saved = ReadFile((fs::path(point.dir) / kJobFile).string()).value_or("");
  std::fprintf(out, "%s: done earlier, skipped%s\n", prefix.c_str(),
               !saved.empty() && saved != JobSpecToText(point.job)
                   ? absl::StrCat(" (warning: it ran with a different ", kJobFile, "; delete ",
                                  point.dir, " to run it again)").c_str()
                   : "");
}

// Waits for the point's training process, forwarding a SIGTERM and, on a terminal, showing
// its step. Returns its exit status (128 + signal when killed).
int WaitForPoint(pid_t pid, const Point& point, const std::string& prefix,
                 const RunOptions& options, const SweepClock& clock) {
  const auto point_start = Clock::now();
  const std::string metrics_path = (fs::path(point.dir) / "metrics.jsonl").string();
  const int steps = std::max(1, point.job.schedule().steps());
  bool forwarded = false;
  std::string shown;  // the progress line on the terminal
  int exit_status = 127;
  while (true) {
    int status = 0;
    const pid_t done = waitpid(pid, &status, WNOHANG);
    if (done == pid) {
      exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      break;
    }
    if (done < 0 && errno != EINTR) break;
    // A terminal's Ctrl-C reaches the whole process group already (rmoe_train then
    // checkpoints and exits); a SIGTERM to this process alone is passed on.
    if (g_stop_signal.load() == SIGTERM && !forwarded) {
      kill(pid, SIGTERM);
      forwarded = true;
    }
    // Short runs end within the first polls; long ones are polled every poll_seconds.
    const double waited = std::chrono::duration<double>(Clock::now() - point_start).count();
    std::this_thread::sleep_for(std::chrono::duration<double>(
        std::min(options.poll_seconds, std::max(0.02, waited / 10))));
    if (options.interactive && waited >= 1) {
      const int64_t step = LastLoggedStep(metrics_path);
      const double fraction = step > 0 ? std::min(1.0, static_cast<double>(step) / steps) : 0;
      const std::string line = absl::StrFormat(
          "%s: step %s/%d (elapsed %s, ETA %s)", prefix, step > 0 ? absl::StrCat(step) : "-",
          steps, FormatDuration(clock.Elapsed()), FormatDuration(clock.Eta(fraction)));
      if (line != shown) {
        std::fprintf(options.out, "\r%s\033[K", line.c_str());
        std::fflush(options.out);
        shown = line;
      }
    }
  }
  if (options.interactive) std::fprintf(options.out, "\r\033[K");
  return exit_status;
}

// Marks and reports how the point's run ended: done, stopped by a signal, or failed.
void ReportRunEnd(const Point& point, const std::string& prefix, const std::string& log_path,
                  int exit_status, double seconds, FILE* out, SweepOutcome* outcome) {
  const std::string section(LastRunSection(ReadFile(log_path).value_or("")));
  if (exit_status == 0 && absl::StrContains(section, kTrainedMarker)) {
    MarkPoint(point, kDoneFile, absl::StrCat("done ", Now(), "\n"));
    auto metrics = ReadMetricsFile((fs::path(point.dir) / "metrics.jsonl").string());
    const double val = metrics.ok() ? SummarizeMetrics(*metrics).final_val_loss : std::nan("");
    std::fprintf(out, "%s: done in %s (final val loss %s)\n", prefix.c_str(),
                 FormatDuration(seconds).c_str(),
                 std::isfinite(val) ? absl::StrFormat("%.4f", val).c_str() : "?");
  } else if (g_stop_signal.load() != 0) {
    // rmoe_train checkpoints on the signal; mpirun may still exit non-zero.
    const bool saved = absl::StrContains(section, "stopped by a signal after step");
    std::fprintf(out, "%s: stopped after %s (%s)\n", prefix.c_str(), FormatDuration(seconds).c_str(),
                 saved ? "checkpointed; it resumes from there"
                       : absl::StrCat("exit status ", exit_status,
                                      "; it resumes from its last checkpoint, if any").c_str());
  } else {
    ++outcome->failed;
    MarkPoint(point, kFailedFile, absl::StrCat("exit status ", exit_status, "\n"));
    std::string hint;
    if (absl::StrContains(section, "allow-run-as-root") || absl::StrContains(section, "as root")) {
      hint = "  (as root, Open MPI needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)\n";
    }
    std::fprintf(out, "%s: FAILED after %s (exit status %d); the end of %s:\n%s%s", prefix.c_str(),
                 FormatDuration(seconds).c_str(), exit_status, log_path.c_str(),
                 Tail(section, 15).c_str(), hint.c_str());
  }
  std::fflush(out);
}

// Runs (or resumes) one point that is not done. Returns false when it could not start.
bool RunPoint(const Point& point, PointState state, const std::string& prefix,
              const RunOptions& options, SweepClock& clock, SweepOutcome* outcome) {
  const std::string log_path = (fs::path(point.dir) / kLogFile).string();
  std::error_code ec;
  fs::create_directories(point.dir, ec);
  fs::remove(fs::path(point.dir) / kFailedFile, ec);
  if (!WriteFileAtomically((fs::path(point.dir) / kJobFile).string(), JobSpecToText(point.job)).ok()) {
    std::fprintf(options.out, "%s: FAILED: cannot write %s/%s\n", prefix.c_str(), point.dir.c_str(), kJobFile);
    ++outcome->failed;
    return false;
  }
  auto params = PointParameters(options.train_program, point, /*cache=*/true);
  if (!params.ok()) {
    std::fprintf(options.out, "%s: warning: no parameter counts: %s\n", prefix.c_str(),
                 std::string(params.status().message()).c_str());
  }
  const bool resume = state == PointState::kResumable;
  const std::vector<std::string> argv = TrainCommand(options, point, resume);
  {
    std::ofstream log(log_path, std::ios::app);
    log << kLogHeader << Now() << (resume ? " (resuming)" : "") << ": " << ShellLine(argv) << "\n";
  }
  std::fprintf(options.out, "%s: %s (elapsed %s, ETA %s)\n", prefix.c_str(),
               resume ? "resuming from its checkpoint" : "running",
               FormatDuration(clock.Elapsed()).c_str(), FormatDuration(clock.Eta(0)).c_str());
  std::fflush(options.out);
  const auto point_start = Clock::now();
  auto pid = Spawn(argv, log_path);
  int exit_status = 127;
  if (pid.ok()) {
    exit_status = WaitForPoint(*pid, point, prefix, options, clock);
  } else {
    std::ofstream(log_path, std::ios::app) << pid.status().message() << "\n";
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - point_start).count();
  clock.work_done += 1;
  ++outcome->ran;
  ReportRunEnd(point, prefix, log_path, exit_status, seconds, options.out, outcome);
  return true;
}

}  // namespace

SweepOutcome RunSweep(const Sweep& sweep, const RunOptions& options) {
  SweepOutcome outcome;
  StopSignals signals;
  SweepClock clock;
  const int total = static_cast<int>(sweep.points.size());
  for (const Point& p : sweep.points) clock.to_run += InspectPoint(p) == PointState::kDone ? 0 : 1;
  for (const Point& point : sweep.points) {
    const std::string prefix = absl::StrFormat(
        "[%d/%d] %s", point.index, total, absl::StrReplaceAll(point.description, {{", ", " "}}));
    const PointState state = SettledState(point, (fs::path(point.dir) / kLogFile).string());
    if (state == PointState::kDone) {
      ++outcome.already_done;
      ReportSkipped(point, prefix, options.out);
      continue;
    }
    RunPoint(point, state, prefix, options, clock, &outcome);
    if (g_stop_signal.load() != 0) {
      outcome.interrupted = true;
      break;
    }
  }
  return outcome;
}

absl::Status GatherResults(const Sweep& sweep, const std::string& train_program, FILE* out) {
  std::vector<PointResult> results;
  std::vector<RunMetrics> metrics;
  bool warned = false;
  for (const Point& point : sweep.points) {
    auto m = ReadMetricsFile((fs::path(point.dir) / "metrics.jsonl").string());
    metrics.push_back(m.ok() ? *std::move(m) : RunMetrics{});
    PointResult r = SummarizeMetrics(metrics.back());
    r.status = PointStatus(point);
    auto params = PointParameters(r.status == "not run" ? "" : train_program, point,
                                  /*cache=*/r.status != "not run");
    if (params.ok()) {
      r.parameters = *params;
    } else if (!warned && r.status != "not run") {
      std::fprintf(out, "rmoe_sweep: warning: parameter counts missing: %s\n",
                   std::string(params.status().message()).c_str());
      warned = true;
    }
    results.push_back(std::move(r));
  }
  std::error_code ec;
  fs::create_directories(sweep.output_dir, ec);
  const std::string csv = (fs::path(sweep.output_dir) / "results.csv").string();
  const std::string md = (fs::path(sweep.output_dir) / "results.md").string();
  if (auto s = WriteFileAtomically(csv, ResultsCsv(sweep, results)); !s.ok()) return s;
  if (auto s = WriteFileAtomically(md, ResultsMarkdown(sweep, results)); !s.ok()) return s;
  const std::vector<std::string> pngs = WritePlots(sweep, results, metrics, sweep.output_dir, out);
  std::fprintf(out, "results: %s, %s%s%s\n", csv.c_str(), md.c_str(), pngs.empty() ? "" : "; charts: ",
               absl::StrJoin(pngs, ", ").c_str());
  return absl::OkStatus();
}

}  // namespace rmoe::sweep
