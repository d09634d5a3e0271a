#include "rmoe/train/progress.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_split.h>

namespace rmoe {

namespace {

// The records of `text` (JSON lines) up to `step`: a record with a larger "step" goes, one
// without a step (the host record) stays, and a last line without its newline (cut short
// by a crash) goes.
std::string RecordsUpToStep(absl::string_view text, int64_t step) {
  std::string kept;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || &line.back() + 1 == text.data() + text.size()) continue;
    JsonValue record;
    if (!ParseJson(line, &record)) continue;
    const double record_step = record.Number("step");
    if (std::isfinite(record_step) && record_step > static_cast<double>(step)) continue;
    absl::StrAppend(&kept, line, "\n");
  }
  return kept;
}

}  // namespace

absl::Status MetricsWriter::CheckMetricsReplaceable(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) {
    return absl::OkStatus();  // missing, or not a regular file: Open says why it refuses that
  }
  constexpr char kFirstRecord[] = "{\"type\":\"host\"";
  char head[sizeof kFirstRecord - 1] = {};
  FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  const bool ours = fd.ok() && ::read(fd.get(), head, sizeof head) == static_cast<ssize_t>(sizeof head) &&
                    std::equal(head, head + sizeof head, kFirstRecord);
  if (ours) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "refusing to replace ", path, " (the metrics file, logging.metrics_file): it is not a "
      "metrics file rmoe wrote (its first line is not the \"host\" record every run writes "
      "first); choose another logging.metrics_file, or move the file away"));
}

absl::StatusOr<MetricsWriter> MetricsWriter::Open(const std::string& path, int64_t resumed_step) {
  if (auto s = CheckMetricsReplaceable(path); !s.ok()) return s;
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "refusing to write the metrics file ", path, ": it is ",
        S_ISLNK(st.st_mode) ? "a symbolic link" : "not a regular file",
        ", and metrics are never written through one (remove it, or set logging.metrics_file)"));
  }
  int flags = O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC;
  if (resumed_step >= 0) {
    auto earlier = ReadFile(path, "metrics file");
    if (earlier.ok()) {
      if (auto s = WriteFileAtomically(path, RecordsUpToStep(*earlier, resumed_step)); !s.ok()) {
        return s;
      }
    } else if (!absl::IsNotFound(earlier.status())) {
      return earlier.status();
    }
    flags |= O_APPEND;
  } else {
    // A new file, not the old one truncated: a hard link to it elsewhere keeps its content.
    flags |= O_EXCL;
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return ErrnoStatus(errno, "cannot replace metrics file", path);
    }
  }
  MetricsWriter writer;
  writer.path_ = path;
  writer.fd_ = FileDescriptor(::open(path.c_str(), flags, 0644));
  if (!writer.fd_.ok()) return ErrnoStatus(errno, "cannot open metrics file", path);
  return writer;
}

void MetricsWriter::Write(const JsonObject& record) {
  if (!status_.ok()) return;
  const std::string line = record.str() + "\n";
  status_ = WriteAll(fd_.get(), line.data(), line.size(), path_);
  if (!status_.ok()) {
    std::fprintf(stderr, "rmoe: warning: metrics are no longer recorded: %s\n",
                 std::string(status_.message()).c_str());
  }
}

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, (s / 60) % 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%ds", s);
}

ProgressBar::ProgressBar(int total_steps, bool interactive, int first_step, FILE* out)
    : total_(total_steps), interactive_(interactive), first_step_(first_step), out_(out) {}

void ProgressBar::Update(int step, double loss, double val_loss, double tokens_per_second) {
  const double fraction = total_ > 0 ? static_cast<double>(step) / total_ : 1.0;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const int done_here = step - first_step_;
  const double eta = done_here > 0 ? elapsed * (total_ - step) / done_here : NAN;
  constexpr int kWidth = 24;
  const int filled = static_cast<int>(fraction * kWidth);
  std::string line = absl::StrFormat("step %d/%d [%s%s] %3.0f%% | loss %.4f", step, total_,
                                     std::string(filled, '#'), std::string(kWidth - filled, '.'),
                                     100 * fraction, loss);
  if (std::isfinite(val_loss)) absl::StrAppendFormat(&line, " | val %.4f", val_loss);
  absl::StrAppendFormat(&line, " | %.1fk tok/s | ETA %s", tokens_per_second / 1000,
                        FormatDuration(eta));
  if (interactive_) {
    std::fprintf(out_, "\r%s\033[K", line.c_str());
    drawn_ = true;
  } else {
    std::fprintf(out_, "%s\n", line.c_str());
  }
  std::fflush(out_);
}

void ProgressBar::Print(const std::string& line) {
  if (drawn_) std::fprintf(out_, "\r\033[K");
  std::fprintf(out_, "%s\n", line.c_str());
  drawn_ = false;
  std::fflush(out_);
}

void ProgressBar::Finish() {
  if (drawn_) std::fprintf(out_, "\n");
  drawn_ = false;
  std::fflush(out_);
}

}  // namespace rmoe
