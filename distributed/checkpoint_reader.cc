// Reading sharded checkpoints (distributed/checkpoint.h): ResolveCheckpoint, LoadTensors,
// VerifyCheckpoint, ListCheckpoints. ReadManifest is in checkpoint_manifest.cc.
#include "distributed/checkpoint.h"

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_map>
#include <utility>

#include "distributed/checkpoint_files.h"
#include "distributed/checkpoint_manifest.h"
#include "rmoe/util/crc32c.h"

namespace rmoe::distributed {

// The helpers shared with the writer (checkpoint_files.h, checkpoint_manifest.h).
using namespace checkpoint_internal;  // NOLINT(build/namespaces)

namespace {

// Open shard files of one checkpoint, by name.
class ShardFiles {
 public:
  explicit ShardFiles(std::string dir) : dir_(std::move(dir)) {}

  struct File {
    Fd fd;
    int64_t size = 0;
    std::string path;
  };

  absl::StatusOr<File*> Get(const std::string& name, const std::string& tensor,
                            const TensorPiece& p) {
    auto it = files_.find(name);
    if (it != files_.end()) return &it->second;
    File f;
    f.path = JoinPath(dir_, name);
    f.fd = Fd(::open(f.path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!f.fd.ok()) {
      const int error = errno;
      const absl::Status s = ErrnoStatus(error, "cannot open shard file", f.path);
      if (error == ENOENT) {
        return absl::NotFoundError(absl::StrCat("shard file ", f.path, " is missing (it holds ",
                                                RowsString(p.row_start(), p.row_start() + p.rows()),
                                                " of tensor '", tensor,
                                                "'): the checkpoint is incomplete"));
      }
      return s;
    }
    struct stat st;
    if (::fstat(f.fd.get(), &st) != 0) return ErrnoStatus(errno, "cannot stat", f.path);
    f.size = st.st_size;
    return &files_.emplace(name, std::move(f)).first->second;
  }

 private:
  std::string dir_;
  std::unordered_map<std::string, File> files_;
};

std::string PieceDesc(const ShardFiles::File& f, const std::string& tensor, const TensorPiece& p) {
  return absl::StrCat(f.path, " (bytes [", p.offset(), ", ", p.offset() + p.length(), "): tensor '",
                      tensor, "' ", RowsString(p.row_start(), p.row_start() + p.rows()), ")");
}

// Reads piece `p` of `tensor`, checks its CRC-32C, and copies the bytes [copy_begin,
// copy_end) of the piece to `dest` (nothing when dest is null). Reads the piece once.
absl::Status ReadPiece(ShardFiles& files, const std::string& tensor, const TensorPiece& p,
                       int64_t copy_begin, int64_t copy_end, char* dest,
                       std::vector<char>* buffer) {
  auto file = files.Get(p.file(), tensor, p);
  if (!file.ok()) return file.status();
  ShardFiles::File& f = **file;
  if (f.size < p.offset() + p.length()) {
    return absl::DataLossError(absl::StrCat("shard file ", PieceDesc(f, tensor, p),
                                            " is truncated: it has only ", f.size, " bytes"));
  }
  uint32_t crc = 0;
  size_t got = 0;
  if (dest != nullptr && copy_begin == 0 && copy_end == p.length()) {
    // The whole piece goes to the destination: read it there, check it there.
    if (auto s =
            PreadAll(f.fd.get(), dest, static_cast<size_t>(p.length()), p.offset(), f.path, &got);
        !s.ok())
      return s;
    if (got != static_cast<size_t>(p.length())) {
      return absl::DataLossError(
          absl::StrCat("shard file ", PieceDesc(f, tensor, p), " is truncated"));
    }
    crc = Crc32c(dest, got);
  } else {
    buffer->resize(
        std::min<size_t>(kIoChunk, static_cast<size_t>(std::max<int64_t>(p.length(), 1))));
    for (int64_t at = 0; at < p.length();) {
      const size_t n = static_cast<size_t>(
          std::min<int64_t>(static_cast<int64_t>(buffer->size()), p.length() - at));
      if (auto s = PreadAll(f.fd.get(), buffer->data(), n, p.offset() + at, f.path, &got); !s.ok())
        return s;
      if (got != n)
        return absl::DataLossError(
            absl::StrCat("shard file ", PieceDesc(f, tensor, p), " is truncated"));
      crc = Crc32cExtend(crc, buffer->data(), n);
      if (dest != nullptr) {
        const int64_t lo = std::max(copy_begin, at),
                      hi = std::min(copy_end, at + static_cast<int64_t>(n));
        if (lo < hi)
          std::memcpy(dest + (lo - copy_begin), buffer->data() + (lo - at),
                      static_cast<size_t>(hi - lo));
      }
      at += static_cast<int64_t>(n);
    }
  }
  if (crc != p.crc32c()) {
    return absl::DataLossError(
        absl::StrFormat("checksum mismatch in shard file %s: CRC-32C 0x%08x, the manifest says "
                        "0x%08x; the file is corrupt "
                        "(restore it, or resume from another checkpoint)",
                        PieceDesc(f, tensor, p), crc, p.crc32c()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> ResolveCheckpoint(const std::string& path) {
  if (path.empty()) return absl::InvalidArgumentError("no checkpoint path given");
  if (!IsDirectory(path)) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      return absl::NotFoundError(absl::StrCat("no checkpoint at ", path, ": it does not exist"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     " is not a directory: pass a checkpoint directory (step_<N>) or the directory "
                     "that holds them"));
  }
  int64_t step = 0;
  const bool looks_like_step = ParseStepDirName(BaseName(path), &step) ||
                               IsRegularFile(JoinPath(path, kManifestName)) || IsCommitted(path);
  if (looks_like_step) {
    if (IsCommitted(path)) return path;
    return absl::FailedPreconditionError(
        absl::StrCat(path, " is not a committed checkpoint: it has no ", kCommittedName,
                     " marker (the save did not finish); ", CommittedList(ParentDir(path))));
  }
  // A root.
  const std::string latest = JoinPath(path, kLatestName);
  struct stat latest_stat;
  if (::stat(latest.c_str(), &latest_stat) == 0 && !S_ISREG(latest_stat.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        latest, " is ", S_ISDIR(latest_stat.st_mode) ? "a directory" : "not a regular file",
        ", not the file that names the latest checkpoint; remove it, or pass a checkpoint "
        "directory explicitly (", CommittedList(path), ")"));
  }
  if (IsRegularFile(latest)) {
    auto text = ReadWholeFile(latest);
    if (!text.ok()) return text.status();
    std::string name = *text;
    while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' '))
      name.pop_back();
    const std::string target = JoinPath(path, name);
    if (IsPlainFileName(name) && IsDirectory(target) && IsCommitted(target)) return target;
    return absl::FailedPreconditionError(
        absl::StrCat(latest, " names \"", name, "\", which is not a committed checkpoint; ",
                     CommittedList(path), " (pass one of them explicitly)"));
  }
  const auto dirs = ListStepDirs(path);
  for (auto it = dirs.rbegin(); it != dirs.rend(); ++it) {
    if (it->committed) return JoinPath(path, it->name);
  }
  std::vector<std::string> unfinished;
  for (const auto& d : dirs) unfinished.push_back(d.name);
  return absl::NotFoundError(absl::StrCat(
      "no committed checkpoint in ", path,
      unfinished.empty() ? std::string()
                         : absl::StrCat(" (unfinished saves without a COMMITTED marker: ",
                                        absl::StrJoin(unfinished, ", "), ")")));
}

absl::Status LoadTensors(const std::string& dir, const CheckpointManifest& manifest,
                         std::vector<ShardedTensor>& tensors) {
  std::unordered_map<std::string, const TensorRecord*> records;
  for (const auto& t : manifest.tensors()) records.emplace(t.name(), &t);
  ShardFiles files(dir);
  std::vector<char> buffer;
  for (auto& t : tensors) {
    const auto it = records.find(t.name);
    if (it == records.end()) {
      return absl::NotFoundError(absl::StrCat(
          "checkpoint ", dir, " has no tensor '", t.name, "' (it holds ", manifest.tensors_size(),
          " tensors; `rmoe_ckpt inspect ", dir, " --tensors` lists them)"));
    }
    const TensorRecord& r = *it->second;
    if (!t.local.defined())
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name, "': the local tensor is undefined"));
    const char* dtype = DtypeName(t.local.scalar_type());
    const bool same_shape = std::equal(r.shape().begin(), r.shape().end(), t.global_shape.begin(),
                                       t.global_shape.end());
    if (dtype == nullptr || r.dtype() != dtype || !same_shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", t.name, "' in ", dir, " was saved as ", r.dtype(), " ",
          ShapeString(r.shape()), ", expected ",
          dtype ? dtype : c10::toString(t.local.scalar_type()), " ", ShapeString(t.global_shape)));
    }
    if (auto s = CheckLocal(t); !s.ok()) return s;
    // A device tensor (or a strided view) is filled through a contiguous host copy.
    const bool staged = !t.local.device().is_cpu() || !t.local.is_contiguous();
    torch::Tensor host = staged ? torch::empty(t.local.sizes(), t.local.options().device(torch::kCPU))
                                : t.local;
    const int64_t row_bytes = RowElements(r.shape()) * DtypeBytes(r.dtype());
    const int64_t begin = t.row_start;
    const int64_t end = begin + (r.shape_size() == 0 ? 1 : t.local.size(0));
    char* base = static_cast<char*>(host.data_ptr());
    for (const auto& p : r.pieces()) {
      const int64_t lo = std::max(begin, p.row_start());
      const int64_t hi = std::min(end, p.row_start() + p.rows());
      if (lo >= hi) continue;
      const int64_t copy_begin = (lo - p.row_start()) * row_bytes;
      const int64_t copy_end = (hi - p.row_start()) * row_bytes;
      if (auto s = ReadPiece(files, t.name, p, copy_begin, copy_end,
                             base + (lo - begin) * row_bytes, &buffer);
          !s.ok()) {
        return s;
      }
    }
    if (staged) t.local.copy_(host);
  }
  return absl::OkStatus();
}

absl::Status VerifyCheckpoint(const std::string& dir) {
  auto manifest = ReadManifest(dir);
  if (!manifest.ok()) return manifest.status();
  ShardFiles files(dir);
  std::vector<char> buffer;
  std::vector<std::string> problems;
  absl::StatusCode code = absl::StatusCode::kOk;
  int64_t pieces = 0;
  for (const auto& t : manifest->tensors()) {
    for (const auto& p : t.pieces()) {
      ++pieces;
      absl::Status s = ReadPiece(files, t.name(), p, 0, 0, nullptr, &buffer);
      if (s.ok()) continue;
      if (problems.empty()) code = s.code();
      problems.emplace_back(s.message());
    }
  }
  if (problems.empty()) return absl::OkStatus();
  const size_t shown = std::min<size_t>(problems.size(), 10);
  std::string message = absl::StrCat(
      "checkpoint ", dir, ": ", problems.size(), " of ", pieces, " pieces failed verification: ",
      absl::StrJoin(problems.begin(), problems.begin() + shown, "; "));
  if (shown < problems.size())
    absl::StrAppend(&message, "; and ", problems.size() - shown, " more");
  return absl::Status(code, message);
}

std::vector<std::string> ListCheckpoints(const std::string& root) {
  std::vector<std::string> out;
  for (const auto& d : ListStepDirs(root)) {
    if (d.committed) out.push_back(JoinPath(root, d.name));
  }
  return out;
}

}  // namespace rmoe::distributed
