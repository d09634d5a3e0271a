#include "rmoe/util/files.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <utility>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>

namespace rmoe {
namespace {

namespace fs = std::filesystem;

// Streamed reads and writes move at most this much per system call.
constexpr size_t kIoChunk = size_t{8} << 20;

std::string DirectoryOf(const std::string& path) {
  const std::string parent = fs::path(path).parent_path().string();
  return parent.empty() ? "." : parent;
}

// Creates `temp` for writing. O_EXCL|O_NOFOLLOW: a symbolic link planted at the temporary
// name must not redirect the write to a file elsewhere.
absl::StatusOr<int> CreateTemporary(const std::string& temp, const std::string& path) {
  constexpr int kFlags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
  int fd = ::open(temp.c_str(), kFlags, 0644);
  if (fd < 0 && errno == EEXIST) {
    struct stat st;
    if (::lstat(temp.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "refusing to write ", path, ": its temporary file ", temp, " exists and is ",
          S_ISLNK(st.st_mode) ? "a symbolic link" : "not a regular file",
          "; files are never written through one (remove it)"));
    }
    // A leftover of an interrupted write. unlink removes the name, never what it points to,
    // and the second exclusive open refuses whatever may appear there in between.
    if (::unlink(temp.c_str()) != 0 && errno != ENOENT) {
      return ErrnoStatus(errno, "cannot remove the stale temporary file", temp);
    }
    fd = ::open(temp.c_str(), kFlags, 0644);
  }
  if (fd < 0) return ErrnoStatus(errno, "cannot create", temp);
  return fd;
}

}  // namespace

absl::Status ErrnoStatus(int error, absl::string_view what, absl::string_view path) {
  const std::string message = absl::StrCat(what, " ", path, ": ", std::strerror(error));
  switch (error) {
    case ENOENT:
      return absl::NotFoundError(message);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(message);
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return absl::ResourceExhaustedError(message);
    default:
      return absl::InternalError(message);
  }
}

FileDescriptor& FileDescriptor::operator=(FileDescriptor&& other) noexcept {
  if (this != &other) {
    Reset();
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

int FileDescriptor::Close() {
  const int rc = fd_ >= 0 ? ::close(fd_) : 0;
  fd_ = -1;
  return rc;
}

void FileDescriptor::Reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

absl::Status WriteAll(int fd, const void* data, size_t size, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, std::min(size, kIoChunk));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "cannot write", path);
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status PreadAll(int fd, void* data, size_t size, int64_t offset, const std::string& path,
                      size_t* got) {
  char* p = static_cast<char*>(data);
  *got = 0;
  while (*got < size) {
    const ssize_t n = ::pread(fd, p + *got, std::min(size - *got, kIoChunk),
                              static_cast<off_t>(offset + static_cast<int64_t>(*got)));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "cannot read", path);
    }
    if (n == 0) break;
    *got += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFile(const std::string& path, absl::string_view what) {
  const std::string described = absl::StrCat("cannot read ", what);
  FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.ok()) return ErrnoStatus(errno, described, path);
  std::string out;
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, described, path);
    }
    if (n == 0) break;
    out.append(buffer, static_cast<size_t>(n));
  }
  return out;
}

absl::Status FsyncDirectory(const std::string& dir) {
  FileDescriptor fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.ok()) return ErrnoStatus(errno, "cannot open directory", dir);
  // Some file systems cannot fsync a directory; their renames are as durable as they get.
  if (::fsync(fd.get()) != 0 && errno != EINVAL && errno != EROFS) {
    return ErrnoStatus(errno, "cannot fsync directory", dir);
  }
  return absl::OkStatus();
}

AtomicFileWriter::AtomicFileWriter(std::string path, int fd)
    : path_(std::move(path)), temp_(path_ + ".tmp"), fd_(fd) {}

AtomicFileWriter::AtomicFileWriter(AtomicFileWriter&& other) noexcept
    : path_(std::move(other.path_)), temp_(std::move(other.temp_)), fd_(other.fd_) {
  other.fd_ = -1;
  other.temp_.clear();
}

AtomicFileWriter::~AtomicFileWriter() { Abandon(); }

void AtomicFileWriter::Abandon() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!temp_.empty()) ::unlink(temp_.c_str());
  temp_.clear();
}

absl::StatusOr<AtomicFileWriter> AtomicFileWriter::Open(const std::string& path) {
  absl::StatusOr<int> fd = CreateTemporary(path + ".tmp", path);
  if (!fd.ok()) return fd.status();
  return AtomicFileWriter(path, *fd);
}

absl::Status AtomicFileWriter::Append(absl::string_view bytes) {
  if (fd_ < 0) return absl::FailedPreconditionError(absl::StrCat(path_, " is already closed"));
  absl::Status status = WriteAll(fd_, bytes.data(), bytes.size(), temp_);
  if (!status.ok()) Abandon();
  return status;
}

absl::Status AtomicFileWriter::Commit() {
  if (fd_ < 0) return absl::FailedPreconditionError(absl::StrCat(path_, " is already closed"));
  absl::Status status;
  if (::fsync(fd_) != 0) status = ErrnoStatus(errno, "cannot fsync", temp_);
  const int closed = ::close(fd_);
  fd_ = -1;
  if (status.ok() && closed != 0) status = ErrnoStatus(errno, "cannot close", temp_);
  if (status.ok() && ::rename(temp_.c_str(), path_.c_str()) != 0) {
    status = ErrnoStatus(errno, absl::StrCat("cannot rename ", temp_, " to"), path_);
  }
  if (!status.ok()) {
    Abandon();
    return status;
  }
  temp_.clear();  // renamed: nothing left to remove
  return FsyncDirectory(DirectoryOf(path_));
}

absl::Status WriteFileAtomically(const std::string& path, absl::string_view bytes) {
  absl::StatusOr<AtomicFileWriter> writer = AtomicFileWriter::Open(path);
  if (!writer.ok()) return writer.status();
  if (auto status = writer->Append(bytes); !status.ok()) return status;
  return writer->Commit();
}

void ReportFileSizeLimitAsErrors() { ::signal(SIGXFSZ, SIG_IGN); }

std::string FindExecutable(const std::string& program) {
  if (program.find('/') != std::string::npos) return program;
  const char* path = std::getenv("PATH");
  if (path == nullptr) return "";
  for (absl::string_view dir : absl::StrSplit(path, ':', absl::SkipEmpty())) {
    const fs::path candidate = fs::path(std::string(dir)) / program;
    std::error_code error;
    if (fs::is_regular_file(candidate, error) && ::access(candidate.c_str(), X_OK) == 0) {
      return candidate.string();
    }
  }
  return "";
}

}  // namespace rmoe
