#include "rmoe/train/progress.h"

#include <cmath>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>

namespace rmoe {

absl::StatusOr<MetricsWriter> MetricsWriter::Open(const std::string& path, bool append) {
  MetricsWriter writer;
  writer.out_.open(path, std::ios::out | (append ? std::ios::app : std::ios::trunc));
  if (!writer.out_) return absl::InternalError(absl::StrCat("cannot open metrics file ", path));
  return writer;
}

void MetricsWriter::Write(const JsonObject& record) {
  out_ << record.str() << '\n';
  out_.flush();
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
