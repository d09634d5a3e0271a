// Running a helper program with pipes, without a shell.
#pragma once

#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

namespace rmoe {

struct SubprocessResult {
  // The exit code, or 128 + the signal number when the program was killed by a signal.
  int exit_status = 0;
  std::string stdout_data;
  std::string stderr_data;
};

// Runs the program at path argv[0] (no PATH search, no shell) with arguments argv[1..], feeds
// it `stdin_data` and collects its stdout and stderr until it exits. Fails only when the
// program cannot be started; a non-zero exit is reported in the result. Safe to call from a
// multi-threaded process (posix_spawn, close-on-exec pipes) and immune to the program
// exiting before it has read its input (no SIGPIPE reaches the caller).
absl::StatusOr<SubprocessResult> RunSubprocess(const std::vector<std::string>& argv,
                                               absl::string_view stdin_data);

}  // namespace rmoe
