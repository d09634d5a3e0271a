// POSIX file helpers of the checkpoint code (checkpoint_*.cc), with statuses that name the
// file. Internal to distributed/: not part of the checkpoint API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include <absl/status/status.h>
#include <absl/status/statusor.h>

namespace rmoe::distributed::checkpoint_internal {

// Streamed reads and writes move at most this much per system call.
inline constexpr size_t kIoChunk = size_t{8} << 20;

// The status for a failed system call on `path`: "<what> <path>: <strerror>", with a code
// that says what kind of failure it was (NotFound, PermissionDenied, ResourceExhausted, ...).
absl::Status ErrnoStatus(int error, const std::string& what, const std::string& path);

// Owns a file descriptor; closes it on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      Reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { Reset(); }
  int get() const { return fd_; }
  bool ok() const { return fd_ >= 0; }
  // Closes, reporting the error of close() (a write error can surface only there, e.g. NFS).
  int Close();

 private:
  void Reset();
  int fd_ = -1;
};

absl::Status WriteAll(int fd, const void* data, size_t size, const std::string& path);

// Reads exactly `size` bytes at `offset`; *got is what was there (short at end of file).
absl::Status PreadAll(int fd, void* data, size_t size, int64_t offset, const std::string& path,
                      size_t* got);

absl::Status FsyncDir(const std::string& dir);

// Creates or truncates `path` for writing. Every checkpoint file is created through here.
// O_NOFOLLOW: a symbolic link planted at one of our names must not redirect the write (and
// the truncation) to a file elsewhere. Check ok(); errno says why it failed.
Fd CreateForWriting(const std::string& path);

// The status for a failed CreateForWriting: a symbolic link is refused by name.
absl::Status CreateError(int error, const std::string& what, const std::string& path);

// Creates or truncates `path`, writes `bytes`, fsyncs and closes it.
absl::Status WriteFileDurably(const std::string& path, std::string_view bytes);

absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

bool IsRegularFile(const std::string& path);
bool IsDirectory(const std::string& path);

std::string JoinPath(const std::string& dir, const std::string& name);
// The last component of `path`, trailing slashes ignored.
std::string BaseName(std::string path);
// The directory that holds `path` ("." for a bare name, "/" for a top-level one).
std::string ParentDir(std::string path);

}  // namespace rmoe::distributed::checkpoint_internal
