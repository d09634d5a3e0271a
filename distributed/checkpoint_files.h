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

#include "rmoe/util/files.h"

namespace rmoe::distributed::checkpoint_internal {

// Streamed reads and writes move at most this much per system call.
inline constexpr size_t kIoChunk = size_t{8} << 20;

// The POSIX pieces every file writer shares (rmoe/util/files.h).
using rmoe::ErrnoStatus;
using rmoe::PreadAll;
using rmoe::WriteAll;
using Fd = rmoe::FileDescriptor;
inline absl::Status FsyncDir(const std::string& dir) { return rmoe::FsyncDirectory(dir); }

// Creates `path` for writing, as a new file: one already there is unlinked, never truncated
// (a hard link planted at one of our names keeps the linked file's content). Every
// checkpoint file is created through here. O_NOFOLLOW: a symbolic link planted at one of
// our names must not redirect the write to a file elsewhere. Check ok(); errno says why it
// failed.
Fd CreateForWriting(const std::string& path);

// The status for a failed CreateForWriting: a symbolic link is refused by name.
absl::Status CreateError(int error, const std::string& what, const std::string& path);

// Creates or truncates `path`, writes `bytes`, fsyncs and closes it.
absl::Status WriteFileDurably(const std::string& path, std::string_view bytes);

inline absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  return rmoe::ReadFile(path);
}

bool IsRegularFile(const std::string& path);
bool IsDirectory(const std::string& path);

std::string JoinPath(const std::string& dir, const std::string& name);
// The last component of `path`, trailing slashes ignored.
std::string BaseName(std::string path);
// The directory that holds `path` ("." for a bare name, "/" for a top-level one).
std::string ParentDir(std::string path);

}  // namespace rmoe::distributed::checkpoint_internal
