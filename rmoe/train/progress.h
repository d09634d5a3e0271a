// Terminal progress bar and the JSON-lines metrics file: the two ways a run reports itself.
#pragma once

#include <chrono>
#include <cstdio>
#include <string>

#include <absl/status/statusor.h>

// JsonObject, which the metrics records are built with, lives with the other shared
// plumbing; including it here keeps it in reach of every user of MetricsWriter.
#include "rmoe/util/files.h"
#include "rmoe/util/json.h"

namespace rmoe {

// Appends one record per line and flushes, so a crash loses at most the line in hand. The
// file is never written through a symbolic link.
class MetricsWriter {
 public:
  // A fresh file (a new file replacing an earlier one) when `resumed_step` is negative.
  // Otherwise a run resumed from that step continues the file: records of later steps, which
  // the resumed run computes again, are dropped first (atomically), so no step is recorded
  // twice. Either way a file at `path` that rmoe did not write is refused
  // (CheckMetricsReplaceable), never replaced.
  static absl::StatusOr<MetricsWriter> Open(const std::string& path, int64_t resumed_step = -1);
  // OK when `path` is missing, empty, or a metrics file rmoe wrote (its first line is the
  // "host" record every run writes first); otherwise an error naming the file.
  static absl::Status CheckMetricsReplaceable(const std::string& path);
  // A failed write (disk full) is reported on stderr once; training goes on.
  void Write(const JsonObject& record);
  const absl::Status& status() const { return status_; }

 private:
  std::string path_;
  FileDescriptor fd_;
  absl::Status status_;
};

// "step 120/300 [#####.....] 40% | loss 3.214 | val 3.402 | 25.1k tok/s | ETA 1m20s".
// On a terminal it redraws one line; elsewhere (logs, CI) it prints a line per update.
class ProgressBar {
 public:
  // `first_step` > 0 for a resumed run: the ETA counts only the steps done since.
  ProgressBar(int total_steps, bool interactive, int first_step = 0, FILE* out = stderr);
  void Update(int step, double loss, double val_loss, double tokens_per_second);
  void Finish();
  void Print(const std::string& line);  // a message that does not tear the bar

 private:
  int total_;
  bool interactive_;
  int first_step_;
  FILE* out_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

std::string FormatDuration(double seconds);

}  // namespace rmoe
