#include "distributed/nccl_supervision.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <thread>
#include <utility>

namespace rmoe::distributed {

// ---- deadlines and running times ------------------------------------------------------------

Deadline::Deadline(SteadyClock::time_point start, double timeout_seconds)
    : start_(start), timeout_seconds_(timeout_seconds) {}

Deadline Deadline::StartingNow(double timeout_seconds) {
  return Deadline(SteadyClock::now(), timeout_seconds);
}

bool Deadline::Passed(SteadyClock::time_point now) const {
  return timeout_seconds_ > 0 && ElapsedSeconds(now) > timeout_seconds_;
}

double Deadline::ElapsedSeconds(SteadyClock::time_point now) const {
  return std::chrono::duration<double>(now - start_).count();
}

double RunningTime::Poll(bool started, SteadyClock::time_point now) {
  if (!started_at_ && started) started_at_ = now;
  if (!started_at_) return 0;
  return std::chrono::duration<double>(now - *started_at_).count();
}

bool Overdue(double running_seconds, double timeout_seconds) {
  return timeout_seconds > 0 && running_seconds > timeout_seconds;
}

// ---- background work ------------------------------------------------------------------------

std::shared_ptr<BackgroundTask> BackgroundTask::Start(std::function<void()> work) {
  std::shared_ptr<BackgroundTask> task(new BackgroundTask());
  std::thread([task, work = std::move(work)] {
    try {
      work();
    } catch (...) {
      // Nobody could catch it on a detached thread; `work` reports its own failures.
    }
    task->MarkDone();
  }).detach();
  return task;
}

void BackgroundTask::MarkDone() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    done_ = true;
  }
  finished_.notify_all();
}

bool BackgroundTask::WaitFor(std::chrono::milliseconds limit) {
  std::unique_lock<std::mutex> lock(mutex_);
  return finished_.wait_for(lock, limit, [this] { return done_; });
}

bool BackgroundTask::done() {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

void WaitOrEndProcess(BackgroundTask& task, std::chrono::milliseconds limit,
                      const std::string& what) {
  if (task.WaitFor(limit)) return;
  std::fprintf(stderr, "%s did not return within %.1f s; ending this process\n", what.c_str(),
               std::chrono::duration<double>(limit).count());
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(1);
}

// ---- versions -------------------------------------------------------------------------------

std::optional<NcclVersion> DecodeNcclVersion(int code) {
  if (code >= 20900) {  // NCCL_VERSION(2, 9, 0) and later: major * 10000 + minor * 100 + patch
    return NcclVersion{code / 10000, code / 100 % 100, code % 100};
  }
  if (code >= 1000 && code < 2900) {  // up to 2.8: major * 1000 + minor * 100 + patch
    return NcclVersion{code / 1000, code / 100 % 10, code % 100};
  }
  return std::nullopt;
}

std::string NcclVersionString(int code) {
  const std::optional<NcclVersion> v = DecodeNcclVersion(code);
  if (!v) return "unknown (code " + std::to_string(code) + ")";
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
}

std::string NcclVersionProblem(int compiled, int loaded, const std::string& library_path) {
  const std::optional<NcclVersion> want = DecodeNcclVersion(compiled);
  const std::optional<NcclVersion> have = DecodeNcclVersion(loaded);
  const std::string where = library_path.empty() ? "" : " (" + library_path + ")";
  std::ostringstream problem;
  if (!have) {
    problem << "the NCCL library loaded at run time" << where << " reports no usable version ("
            << NcclVersionString(loaded) << "); this program was compiled against NCCL "
            << NcclVersionString(compiled);
    return problem.str();
  }
  if (!want) return "";  // nothing to compare with; the build refuses NCCL before 2.7 anyway
  if (have->major > want->major || (have->major == want->major && have->minor >= want->minor)) {
    return "";
  }
  problem << "the NCCL library loaded at run time" << where << " is version "
          << NcclVersionString(loaded) << ", older than the NCCL headers this program was "
          << "compiled against (" << NcclVersionString(compiled) << "); load NCCL "
          << want->major << "." << want->minor << " or newer first (LD_LIBRARY_PATH; PyTorch's "
          << "nvidia-nccl wheel and the system's package both install libnccl.so.2, and the "
          << "first one found wins), or rebuild against the NCCL that is loaded";
  return problem.str();
}

}  // namespace rmoe::distributed
