// Whole-file reads and crash-safe writes, shared by every library and program.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

namespace rmoe {

// "<what> <path>: <strerror>", with a code that says what kind of failure it was: NotFound,
// PermissionDenied, ResourceExhausted (disk or quota full, file too large), else Internal.
absl::Status ErrnoStatus(int error, absl::string_view what, absl::string_view path);

// Owns a file descriptor; closes it on destruction.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(FileDescriptor&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  FileDescriptor& operator=(FileDescriptor&& other) noexcept;
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() { Reset(); }

  int get() const { return fd_; }
  bool ok() const { return fd_ >= 0; }
  // Closes, reporting the error of close() (a write error can surface only there, e.g. NFS).
  int Close();

 private:
  void Reset();
  int fd_ = -1;
};

// Writes all `size` bytes, in chunks, retrying interrupted calls.
absl::Status WriteAll(int fd, const void* data, size_t size, const std::string& path);
// Reads exactly `size` bytes at `offset`; *got is what was there (short at end of file).
absl::Status PreadAll(int fd, void* data, size_t size, int64_t offset, const std::string& path,
                      size_t* got);

// The bytes of `path`. Errors carry the errno's code (NotFound for a missing file) and say
// "cannot read <what> <path>: <strerror>"; `what` names the file's role ("job spec").
absl::StatusOr<std::string> ReadFile(const std::string& path, absl::string_view what = "file");

// Replaces `path` with `bytes` so that a reader, or the file after a crash, holds either the
// old or the new contents, never a mix: the bytes go to `<path>.tmp` (created exclusively and
// never through a symbolic link), are fsynced, renamed over `path`, and the directory is
// fsynced. On failure `path` is untouched and the temporary file removed. A regular file left
// at `<path>.tmp` by an interrupted write is replaced; anything else there (a symbolic link,
// a directory) is refused with FailedPrecondition.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view bytes);

// WriteFileAtomically for a file written piece by piece (too large to hold in memory): the
// same temporary file, checks and commit. Until Commit succeeds `path` is untouched, and a
// writer dropped without committing removes its temporary file.
class AtomicFileWriter {
 public:
  static absl::StatusOr<AtomicFileWriter> Open(const std::string& path);
  AtomicFileWriter(AtomicFileWriter&& other) noexcept;
  AtomicFileWriter& operator=(AtomicFileWriter&&) = delete;
  ~AtomicFileWriter();

  absl::Status Append(absl::string_view bytes);
  // fsyncs, renames over `path`, fsyncs the directory. Call at most once.
  absl::Status Commit();
  const std::string& temp_path() const { return temp_; }

 private:
  AtomicFileWriter(std::string path, int fd);
  void Abandon();

  std::string path_, temp_;
  int fd_ = -1;
};

// fsyncs the directory `dir`, making the names created or renamed in it durable.
absl::Status FsyncDirectory(const std::string& dir);

// Makes a write past the file-size limit (ulimit -f) fail with EFBIG, which the write's
// error reports with the file's name, instead of SIGXFSZ killing the process without a
// word. Programs that write files call it first thing in main().
void ReportFileSizeLimitAsErrors();

// `program` itself when it contains a '/'; otherwise the first executable regular file of
// that name in a $PATH directory; "" when there is none.
std::string FindExecutable(const std::string& program);

}  // namespace rmoe
