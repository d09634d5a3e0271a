// The parts of NcclCommunicator's failure handling that need neither CUDA nor NCCL, kept apart
// so that they are tested on every machine (tests/nccl_supervision_test.cc): deadlines of host
// waits, the watchdog's measure of how long an operation has been running on the GPU, work
// that may never return run on a detached thread with a bounded wait, and the check of the
// NCCL library loaded at run time against the headers compiled with.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

namespace rmoe::distributed {

using SteadyClock = std::chrono::steady_clock;

// A bound on one or several host waits: `timeout_seconds` after `start`; 0 means none. Waits
// that share one Deadline are bounded together (the destructor's waits for queued work and
// for ncclCommFinalize add up to one timeout, not one each).
class Deadline {
 public:
  Deadline(SteadyClock::time_point start, double timeout_seconds);
  static Deadline StartingNow(double timeout_seconds);

  bool Passed(SteadyClock::time_point now) const;  // never, without a timeout
  double ElapsedSeconds(SteadyClock::time_point now) const;
  double timeout_seconds() const { return timeout_seconds_; }

 private:
  SteadyClock::time_point start_;
  double timeout_seconds_;
};

// How long the oldest unfinished operation on a stream has been running on the GPU. It counts
// from the first poll that finds the operation's start event complete (an event recorded on
// the stream just before its kernels), not from when it was queued: a collective queued behind
// minutes of compute is not late, one that has spun for minutes is. The start is known to
// within one polling period, which is far below any sensible timeout.
class RunningTime {
 public:
  // One poll: `started` says whether the start event had completed at `now`. Returns the
  // seconds the operation has been running (0 until it starts).
  double Poll(bool started, SteadyClock::time_point now);
  bool started() const { return started_at_.has_value(); }

 private:
  std::optional<SteadyClock::time_point> started_at_;
};

// Whether an operation running for `running_seconds` has passed the timeout (0: none).
bool Overdue(double running_seconds, double timeout_seconds);

// Work run on a detached thread, which callers wait for with a bound: for calls that may
// never return (ncclCommAbort with a kernel spinning on a dead peer, or a stuck proxy thread),
// so that whoever needs them done (the watchdog, the thread that saw the error) can still end
// the process. The thread keeps the task alive, so it may outlive every caller.
class BackgroundTask {
 public:
  // Starts `work` on a new detached thread. An exception from `work` is swallowed (there is
  // nobody to hand it to); `work` must report its own failures.
  static std::shared_ptr<BackgroundTask> Start(std::function<void()> work);

  // True once the work has returned; waits at most `limit` for that.
  bool WaitFor(std::chrono::milliseconds limit);
  bool done();

 private:
  BackgroundTask() = default;
  void MarkDone();

  std::mutex mutex_;
  std::condition_variable finished_;
  bool done_ = false;
};

// Waits up to `limit` for `task`. If it has not returned by then, prints "<what> did not
// return within <limit> s; ending this process" to stderr and ends the process with
// std::_Exit(1): destructors and atexit handlers could wait on the same stuck call, and under
// mpirun a rank that exits without MPI_Finalize ends the whole job.
void WaitOrEndProcess(BackgroundTask& task, std::chrono::milliseconds limit,
                      const std::string& what);

// NCCL_VERSION_CODE or ncclGetVersion's number, in either of NCCL's encodings:
// major * 10000 + minor * 100 + patch from 2.9 on, major * 1000 + minor * 100 + patch before.
struct NcclVersion {
  int major = 0;
  int minor = 0;
  int patch = 0;
};
// std::nullopt for codes that are neither encoding (0: the version could not be read).
std::optional<NcclVersion> DecodeNcclVersion(int code);
// "2.28.9", or "unknown (code N)".
std::string NcclVersionString(int code);

// Empty when the NCCL library loaded at run time can serve a program compiled against the
// `compiled` headers: the same or a newer major.minor (patch releases do not change the API).
// Otherwise what is wrong and how to fix it, naming both versions and `library_path` (where
// the loaded library was found; may be empty when unknown).
std::string NcclVersionProblem(int compiled, int loaded, const std::string& library_path);

}  // namespace rmoe::distributed
