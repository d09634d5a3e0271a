#include "rmoe/util/ownership.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <random>
#include <system_error>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_split.h>

#include "rmoe/util/files.h"

namespace rmoe {
namespace {

namespace fs = std::filesystem;

std::string MarkPath(const std::string& dir) { return (fs::path(dir) / kOwnerMarkName).string(); }

std::string ParentOf(const std::string& path) {
  const std::string parent = fs::path(path).lexically_normal().parent_path().string();
  return parent.empty() ? "." : parent;
}

// What is at `path`, for messages: "a symbolic link", "a file", "a directory".
std::string Describe(const struct stat& st) {
  if (S_ISLNK(st.st_mode)) return "a symbolic link";
  if (S_ISDIR(st.st_mode)) return "a directory";
  if (S_ISREG(st.st_mode)) return "a file";
  return "a special file";
}

// What a crash inside CreateOwnedDirectory leaves: an empty directory, or one holding only
// the mark's temporary file (the mark itself appears complete, by rename, or not at all).
// Deleting it loses nothing.
bool IsInterruptedCreation(const std::string& dir) {
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(dir, error)) {
    if (entry.path().filename() != std::string(kOwnerMarkName) + ".tmp") return false;
    if (!entry.is_regular_file(error) || entry.is_symlink(error)) return false;
  }
  return !error;
}

absl::Status RemoveInterruptedCreation(const std::string& dir) {
  const std::string temporary = MarkPath(dir) + ".tmp";
  if (::unlink(temporary.c_str()) != 0 && errno != ENOENT) {
    return ErrnoStatus(errno, "cannot delete", temporary);
  }
  if (::rmdir(dir.c_str()) != 0) return ErrnoStatus(errno, "cannot delete directory", dir);
  return FsyncDirectory(ParentOf(dir));
}

}  // namespace

std::string NewRunId() {
  std::random_device device;
  const uint64_t id = (static_cast<uint64_t>(device()) << 32) ^ device();
  return absl::StrFormat("%016x", id);
}

absl::StatusOr<std::optional<OwnerMark>> ReadOwnerMark(const std::string& dir) {
  const std::string path = MarkPath(dir);
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) return std::nullopt;
    return ErrnoStatus(errno, "cannot inspect the ownership mark", path);
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "ownership mark ", path, " is ", Describe(st), ", not a file: it was not written by rmoe"));
  }
  auto text = ReadFile(path, "ownership mark");
  if (!text.ok()) return text.status();
  const std::vector<std::string> words =
      absl::StrSplit(*text, absl::ByAnyChar(" \n"), absl::SkipEmpty());
  if (words.size() != 3 || words[0] != "rmoe") {
    return absl::FailedPreconditionError(absl::StrCat(
        "ownership mark ", path, " does not read \"rmoe <kind> <run id>\": it was not written by rmoe"));
  }
  return OwnerMark{words[1], words[2]};
}

absl::Status WriteOwnerMark(const std::string& dir, const OwnerMark& mark) {
  return WriteFileAtomically(MarkPath(dir), absl::StrCat("rmoe ", mark.kind, " ", mark.run_id, "\n"));
}

absl::Status CreateOwnedDirectory(const std::string& dir, const OwnerMark& mark) {
  if (::mkdir(dir.c_str(), 0755) != 0) {
    if (errno == EEXIST) {
      return absl::AlreadyExistsError(absl::StrCat("cannot create directory ", dir, ": it exists"));
    }
    return ErrnoStatus(errno, "cannot create directory", dir);
  }
  if (auto status = WriteOwnerMark(dir, mark); !status.ok()) return status;
  return FsyncDirectory(ParentOf(dir));
}

bool IsOwned(const std::string& dir, absl::string_view kind, absl::string_view run_id) {
  struct stat st;
  if (::lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return false;
  auto mark = ReadOwnerMark(dir);
  if (!mark.ok() || !mark->has_value()) return false;
  return (*mark)->kind == kind && (run_id.empty() || (*mark)->run_id == run_id);
}

absl::Status RemoveOwnedDirectory(const std::string& dir, absl::string_view kind,
                                  absl::string_view run_id) {
  struct stat st;
  if (::lstat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return ErrnoStatus(errno, "cannot inspect", dir);
  }
  const std::string owner = run_id.empty() ? std::string(kind) : absl::StrCat(kind, " of run ", run_id);
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "refusing to delete ", dir, ": it is ", Describe(st), ", not a directory rmoe created (",
        owner, "); move it away yourself"));
  }
  if (!IsOwned(dir, kind, run_id)) {
    if (IsInterruptedCreation(dir)) return RemoveInterruptedCreation(dir);
    auto mark = ReadOwnerMark(dir);
    const std::string found =
        !mark.ok() ? std::string(mark.status().message())
        : !mark->has_value()
            ? absl::StrCat("it has no ", kOwnerMarkName, " mark, so rmoe did not create it")
            : absl::StrCat("its mark says ", (*mark)->kind, " of run ", (*mark)->run_id);
    return absl::FailedPreconditionError(absl::StrCat("refusing to delete ", dir, " (expected ",
                                                      owner, "): ", found,
                                                      "; move it away yourself"));
  }
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(dir, error)) {
    if (entry.path().filename() == kOwnerMarkName) continue;
    fs::remove_all(entry.path(), error);  // removes links, never what they point to
    if (error) {
      return absl::InternalError(
          absl::StrCat("cannot delete ", entry.path().string(), ": ", error.message()));
    }
  }
  if (error) return absl::InternalError(absl::StrCat("cannot list ", dir, ": ", error.message()));
  const std::string mark = MarkPath(dir);
  if (::unlink(mark.c_str()) != 0 && errno != ENOENT) return ErrnoStatus(errno, "cannot delete", mark);
  if (::rmdir(dir.c_str()) != 0) return ErrnoStatus(errno, "cannot delete directory", dir);
  return FsyncDirectory(ParentOf(dir));
}

absl::Status ReplaceOwnedDirectory(const std::string& staged, const std::string& target,
                                   absl::string_view kind) {
  const std::string old = target + ".old";
  // Check both before replacing either: something foreign there is refused (with its
  // reason) and left as it was; the remains of an interrupted creation go.
  for (const std::string& path : {target, old}) {
    struct stat st;
    if (::lstat(path.c_str(), &st) == 0 && !IsOwned(path, kind)) {
      if (auto status = RemoveOwnedDirectory(path, kind); !status.ok()) return status;
    }
  }
  if (auto status = RemoveOwnedDirectory(old, kind); !status.ok()) return status;
  struct stat st;
  if (::lstat(target.c_str(), &st) == 0 && ::rename(target.c_str(), old.c_str()) != 0) {
    return ErrnoStatus(errno, absl::StrCat("cannot move ", target, " aside to"), old);
  }
  if (::rename(staged.c_str(), target.c_str()) != 0) {
    return ErrnoStatus(errno, absl::StrCat("cannot move ", staged, " to"), target);
  }
  if (auto status = FsyncDirectory(ParentOf(target)); !status.ok()) return status;
  return RemoveOwnedDirectory(old, kind);
}

absl::Status WriteOwnedDirectory(const std::string& dir, absl::string_view kind,
                                 const std::function<absl::Status(const std::string& staging)>& write) {
  const std::string target = fs::path(dir).lexically_normal().string();
  const std::string staging = target + ".tmp";
  std::error_code ec;
  const fs::path parent = fs::path(target).parent_path();
  if (!parent.empty()) fs::create_directories(parent, ec);
  // The remains of an interrupted write are ours to replace; anything else there is not.
  if (auto status = RemoveOwnedDirectory(staging, kind); !status.ok()) return status;
  if (auto status = CreateOwnedDirectory(staging, {std::string(kind), NewRunId()}); !status.ok()) {
    return status;
  }
  absl::Status status = write(staging);
  // The old directory is removed only once the new one is in place.
  if (status.ok()) status = ReplaceOwnedDirectory(staging, target, kind);
  if (!status.ok()) (void)RemoveOwnedDirectory(staging, kind);
  return status;
}

}  // namespace rmoe
