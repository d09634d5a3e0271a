#include "rmoe/data/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include <absl/strings/str_cat.h>

extern char** environ;

namespace rmoe {
namespace {

// Closes a descriptor once; -1 means closed.
void CloseFd(int* fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

struct Pipe {
  int read_end = -1;
  int write_end = -1;
  ~Pipe() {
    CloseFd(&read_end);
    CloseFd(&write_end);
  }
  bool Open() {
    int fds[2];
    // Close-on-exec, so no other child spawned concurrently inherits our ends and keeps the
    // pipe from reporting end-of-file.
    if (pipe2(fds, O_CLOEXEC) != 0) return false;
    read_end = fds[0];
    write_end = fds[1];
    return true;
  }
};

// Runs on its own thread, so that a program which writes a lot before reading all of its input
// cannot deadlock with us. SIGPIPE is blocked on this thread: a write to a program that has
// exited then fails with EPIPE, and the signal (directed at this thread) dies with it.
void WriteAll(int fd, absl::string_view data) {
  sigset_t block;
  sigemptyset(&block);
  sigaddset(&block, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &block, nullptr);
  while (!data.empty()) {
    const ssize_t n = write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      break;  // EPIPE: the program stopped reading; its exit status tells why.
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  close(fd);
}

}  // namespace

absl::StatusOr<SubprocessResult> RunSubprocess(const std::vector<std::string>& argv,
                                               absl::string_view stdin_data) {
  if (argv.empty()) return absl::InvalidArgumentError("RunSubprocess: empty argv");
  Pipe in, out, err;
  if (!in.Open() || !out.Open() || !err.Open()) {
    return absl::InternalError(absl::StrCat("cannot create pipes: ", std::strerror(errno)));
  }

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in.read_end, STDIN_FILENO);
  posix_spawn_file_actions_adddup2(&actions, out.write_end, STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, err.write_end, STDERR_FILENO);
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int spawn_error =
      posix_spawn(&pid, argv[0].c_str(), &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (spawn_error != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot run '", argv[0], "': ", std::strerror(spawn_error)));
  }
  CloseFd(&in.read_end);
  CloseFd(&out.write_end);
  CloseFd(&err.write_end);

  const int stdin_fd = in.write_end;
  in.write_end = -1;  // The writer thread owns and closes it.
  std::thread writer(WriteAll, stdin_fd, stdin_data);

  SubprocessResult result;
  pollfd fds[2] = {{out.read_end, POLLIN, 0}, {err.read_end, POLLIN, 0}};
  std::string* sinks[2] = {&result.stdout_data, &result.stderr_data};
  int open_streams = 2;
  char buffer[1 << 16];
  while (open_streams > 0) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      const ssize_t n = read(fds[i].fd, buffer, sizeof(buffer));
      if (n > 0) {
        sinks[i]->append(buffer, static_cast<size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        fds[i].fd = -1;  // poll ignores negative descriptors; the Pipe closes it.
        --open_streams;
      }
    }
  }
  writer.join();

  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status)) {
    result.exit_status = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    result.exit_status = 128 + WTERMSIG(status);
  }
  return result;
}

}  // namespace rmoe
