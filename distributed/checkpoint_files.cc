// POSIX file helpers of the checkpoint code (distributed/checkpoint_files.h).
#include "distributed/checkpoint_files.h"

#include <absl/strings/str_cat.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace rmoe::distributed::checkpoint_internal {

Fd CreateForWriting(const std::string& path) {
  // Exclusively: a file already at `path` (a stale write, or a hard link a user planted to
  // a file of theirs) is unlinked, never truncated, so whatever else links to it keeps its
  // content; O_NOFOLLOW refuses a symbolic link (ELOOP), and the second exclusive open
  // whatever appears at the name in between.
  constexpr int kFlags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW;
  int fd = ::open(path.c_str(), kFlags, 0644);
  if (fd < 0 && errno == EEXIST) {
    struct stat st;
    if (::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode)) {
      errno = ELOOP;
      return Fd(-1);
    }
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Fd(-1);
    fd = ::open(path.c_str(), kFlags, 0644);
  }
  return Fd(fd);
}

absl::Status CreateError(int error, const std::string& what, const std::string& path) {
  if (error == ELOOP) {
    return absl::FailedPreconditionError(absl::StrCat(
        "refusing to write ", path, ": it is a symbolic link, and checkpoint files are never "
        "written through one (remove it, or use another checkpoint directory)"));
  }
  return ErrnoStatus(error, what, path);
}

absl::Status WriteFileDurably(const std::string& path, std::string_view bytes) {
  Fd fd = CreateForWriting(path);
  if (!fd.ok()) return CreateError(errno, "cannot create", path);
  if (auto s = WriteAll(fd.get(), bytes.data(), bytes.size(), path); !s.ok()) return s;
  if (::fsync(fd.get()) != 0) return ErrnoStatus(errno, "cannot fsync", path);
  if (fd.Close() != 0) return ErrnoStatus(errno, "cannot close", path);
  return absl::OkStatus();
}

bool IsRegularFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  if (dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

std::string BaseName(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string ParentDir(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace rmoe::distributed::checkpoint_internal
