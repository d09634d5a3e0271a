// Sharded checkpoints (distributed/checkpoint.h): writing, committing, pruning, reading.
//
// On-disk layout of one checkpoint (docs/checkpoints.md has the full story):
//
//   <root>/step_<step:08d>/shard_<rank:05d>.bin
//       The rows this rank writes (ShardedTensor::write), one piece per tensor, back to back
//       with no padding, in the order the tensors were passed. Raw little-endian element
//       bytes of the contiguous tensor (C order). A rank that writes nothing writes no file.
//   <root>/step_<step:08d>/manifest.pb
//       The CheckpointManifest (proto/checkpoint.proto), framed so that truncation and
//       corruption are detected (all integers little-endian):
//         offset  size  field
//              0     8  magic "RMOECKPT"
//              8     4  uint32 format version (= manifest.format_version)
//             12     8  uint64 payload length N
//             20     N  payload: the binary-serialised CheckpointManifest
//           20+N     4  uint32 CRC-32C of the payload
//       The file is exactly 24 + N bytes; anything else is an error.
//   <root>/step_<step:08d>/COMMITTED
//       Written last; its presence makes the directory a checkpoint. Contents: "step N\n".
//   <root>/latest
//       The name of the newest committed step directory plus "\n", replaced atomically.
//
// Commit protocol (SaveCheckpoint = BeginCheckpoint + FinishCheckpoint; every numbered
// step is collective and runs on the caller's (MPI) thread, except the shard write):
//   1. [Begin] Rank 0 prepares the step directory (removes the remains of an earlier,
//      unfinished save of the same step). Everyone learns whether that worked. Every rank
//      then takes what it writes and its torch CPU generator state; for a background save
//      it copies the rows it writes and a thread writes the shard (2a) while the caller
//      trains on.
//   2. [2a] Every rank writes and fsyncs its shard file, computing one CRC-32C per piece.
//      [2b, Finish, after joining the writer] Every rank's piece records, tensor
//      declarations and generator state are gathered on every rank (one AllGather, which
//      doubles as the error flag exchange).
//   3. Rank 0 merges the records, checks that every tensor's rows are covered exactly once,
//      copies CheckpointState::extra_files into the directory (fsynced; not checksummed),
//      writes and fsyncs manifest.pb and the directory. [Test hook: with
//      RMOE_CKPT_TEST_PAUSE_BEFORE_COMMIT_S=<seconds> in the environment rank 0 sleeps here.]
//      Everyone learns whether that worked (the barrier before the commit).
//   4. Rank 0 writes COMMITTED (fsync file and directory), replaces <root>/latest
//      (latest.tmp, fsync, rename, fsync root), then deletes committed checkpoints beyond
//      keep_last and stale unfinished step directories. Everyone learns whether the commit
//      worked.
// A failure in any step makes every rank return an error naming the failing rank(s) and the
// reason; nothing is committed and the previous checkpoint stays what `latest` names.
#include "distributed/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <set>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>

#include "distributed/crc32c.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "Checkpoint files are little-endian raw bytes; this build assumes a little-endian host."
#endif

namespace rmoe::distributed {
namespace {

namespace fs = std::filesystem;

constexpr char kMagic[8] = {'R', 'M', 'O', 'E', 'C', 'K', 'P', 'T'};
constexpr size_t kFrameHeaderBytes = 8 + 4 + 8;
constexpr size_t kFrameTrailerBytes = 4;
constexpr char kManifestName[] = "manifest.pb";
constexpr char kCommittedName[] = "COMMITTED";
constexpr char kLatestName[] = "latest";
constexpr char kPauseEnv[] = "RMOE_CKPT_TEST_PAUSE_BEFORE_COMMIT_S";
constexpr char kWriteDelayEnv[] = "RMOE_CKPT_TEST_DELAY_BACKGROUND_WRITE_S";
constexpr size_t kIoChunk = size_t{8} << 20;  // streamed reads and writes

// ------------------------------------------------------------------------------------------
// dtypes

struct DtypeInfo {
  c10::ScalarType type;
  const char* name;  // torch's Python name without "torch."
};
constexpr DtypeInfo kDtypes[] = {
    {c10::ScalarType::Float, "float32"},
    {c10::ScalarType::Double, "float64"},
    {c10::ScalarType::Half, "float16"},
    {c10::ScalarType::BFloat16, "bfloat16"},
    {c10::ScalarType::Long, "int64"},
    {c10::ScalarType::Int, "int32"},
    {c10::ScalarType::Short, "int16"},
    {c10::ScalarType::Char, "int8"},
    {c10::ScalarType::Byte, "uint8"},
    {c10::ScalarType::Bool, "bool"},
    {c10::ScalarType::ComplexFloat, "complex64"},
    {c10::ScalarType::ComplexDouble, "complex128"},
};

const char* DtypeName(c10::ScalarType type) {
  for (const auto& d : kDtypes) {
    if (d.type == type) return d.name;
  }
  return nullptr;
}

// Bytes per element of a dtype name; 0 if unknown.
int64_t DtypeBytes(const std::string& name) {
  for (const auto& d : kDtypes) {
    if (name == d.name) return static_cast<int64_t>(c10::elementSize(d.type));
  }
  return 0;
}

std::string KnownDtypes() {
  std::vector<std::string> names;
  for (const auto& d : kDtypes) names.push_back(d.name);
  return absl::StrJoin(names, ", ");
}

// ------------------------------------------------------------------------------------------
// shapes: rows are along dim 0; a 0-d tensor is one row of one element.

template <typename Shape>
std::string ShapeString(const Shape& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

template <typename Shape>
int64_t TotalRows(const Shape& shape) {
  return shape.size() == 0 ? 1 : shape[0];
}

template <typename Shape>
int64_t RowElements(const Shape& shape) {
  int64_t n = 1;
  for (int i = 1; i < static_cast<int>(shape.size()); ++i) n *= shape[i];
  return n;
}

std::string RowsString(int64_t begin, int64_t end) {
  return absl::StrCat("rows [", begin, ", ", end, ")");
}

// ------------------------------------------------------------------------------------------
// POSIX I/O with statuses that name the file.

absl::Status ErrnoStatus(int error, const std::string& what, const std::string& path) {
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
  ~Fd() { Reset(); }
  int get() const { return fd_; }
  bool ok() const { return fd_ >= 0; }
  // Closes, reporting the error of close() (a write error can surface only there, e.g. NFS).
  int Close() {
    const int rc = fd_ >= 0 ? ::close(fd_) : 0;
    fd_ = -1;
    return rc;
  }

 private:
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int fd_ = -1;
};

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

// Reads exactly `size` bytes at `offset`; *got is what was there (short at end of file).
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

absl::Status FsyncDir(const std::string& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.ok()) return ErrnoStatus(errno, "cannot open directory", dir);
  if (::fsync(fd.get()) != 0 && errno != EINVAL && errno != EROFS) {
    return ErrnoStatus(errno, "cannot fsync directory", dir);
  }
  return absl::OkStatus();
}

// Creates or truncates `path`, writes `bytes`, fsyncs and closes it.
// Every checkpoint file is created through here. O_NOFOLLOW: a symbolic link planted at one
// of our names must not redirect the write (and the truncation) to a file elsewhere.
Fd CreateForWriting(const std::string& path) {
  return Fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644));
}

// The status for a failed CreateForWriting.
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

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.ok()) return ErrnoStatus(errno, "cannot open", path);
  std::string out;
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "cannot read", path);
    }
    if (n == 0) break;
    out.append(buffer, static_cast<size_t>(n));
  }
  return out;
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

// ------------------------------------------------------------------------------------------
// step directories

std::string StepDirName(int64_t step) { return absl::StrFormat("step_%08d", step); }

// "step_<digits>" -> step.
bool ParseStepDirName(const std::string& name, int64_t* step) {
  constexpr std::string_view kPrefix = "step_";
  if (name.size() <= kPrefix.size() || name.compare(0, kPrefix.size(), kPrefix) != 0) return false;
  if (name.size() - kPrefix.size() > 18) return false;
  int64_t value = 0;
  for (size_t i = kPrefix.size(); i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return false;
    value = value * 10 + (name[i] - '0');
  }
  *step = value;
  return true;
}

bool IsCommitted(const std::string& dir) { return IsRegularFile(JoinPath(dir, kCommittedName)); }

struct StepDir {
  int64_t step;
  std::string name;
  bool committed;
};

// Every step_<N> directory under root, by step.
std::vector<StepDir> ListStepDirs(const std::string& root) {
  std::vector<StepDir> out;
  DIR* d = ::opendir(root.c_str());
  if (d == nullptr) return out;
  while (const dirent* entry = ::readdir(d)) {
    const std::string name = entry->d_name;
    int64_t step = 0;
    if (!ParseStepDirName(name, &step)) continue;
    const std::string path = JoinPath(root, name);
    if (!IsDirectory(path)) continue;
    out.push_back({step, name, IsCommitted(path)});
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const StepDir& a, const StepDir& b) {
    return a.step != b.step ? a.step < b.step : a.name < b.name;
  });
  return out;
}

// A shard file name as the manifest may hold it: a plain name inside the checkpoint directory.
bool IsPlainFileName(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

std::string CommittedList(const std::string& root) {
  std::vector<std::string> names;
  for (const auto& d : ListStepDirs(root)) {
    if (d.committed) names.push_back(d.name);
  }
  if (names.empty()) return "there is no committed checkpoint in " + root;
  return absl::StrCat("committed checkpoints in ", root, ": ", absl::StrJoin(names, ", "));
}

// Removes a step directory so that a crash half-way leaves an uncommitted directory, never
// a committed one with files missing: the COMMITTED marker goes first.
absl::Status RemoveStepDir(const std::string& path) {
  std::error_code ec;
  const std::string marker = JoinPath(path, kCommittedName);
  if (IsRegularFile(marker)) {
    if (::unlink(marker.c_str()) != 0) return ErrnoStatus(errno, "cannot remove", marker);
    if (auto s = FsyncDir(path); !s.ok()) return s;
  }
  fs::remove_all(path, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot remove ", path, ": ", ec.message()));
  return absl::OkStatus();
}

// ------------------------------------------------------------------------------------------
// manifest framing

void AppendLe(std::string* out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((value >> (8 * i)) & 0xFFu));
}

uint64_t LoadLe(const char* p, int bytes) {
  uint64_t value = 0;
  for (int i = 0; i < bytes; ++i)
    value |= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return value;
}

std::string FrameManifest(const CheckpointManifest& manifest) {
  std::string payload;
  manifest.SerializeToString(&payload);
  std::string out(kMagic, sizeof(kMagic));
  AppendLe(&out, static_cast<uint32_t>(manifest.format_version()), 4);
  AppendLe(&out, payload.size(), 8);
  out += payload;
  AppendLe(&out, Crc32c(payload), 4);
  return out;
}

std::string NewerFormatMessage(const std::string& path, int64_t version) {
  return absl::StrFormat(
      "%s was written by a newer RMoE (format %d, this build reads up to %d): use a newer "
      "build to read this checkpoint",
      path, version, kCheckpointFormatVersion);
}

// Semantic checks of a parsed manifest, so that readers can trust offsets and row ranges.
absl::Status ValidateManifest(const CheckpointManifest& m, const std::string& path) {
  std::set<std::string> names;
  for (const auto& t : m.tensors()) {
    const std::string where = absl::StrCat(path, ": tensor '", t.name(), "'");
    if (t.name().empty()) return absl::DataLossError(path + ": a tensor record has no name");
    if (!names.insert(t.name()).second) {
      return absl::DataLossError(absl::StrCat(path, ": tensor '", t.name(), "' is listed twice"));
    }
    const int64_t element = DtypeBytes(t.dtype());
    if (element == 0) {
      return absl::DataLossError(
          absl::StrCat(where, " has dtype \"", t.dtype(),
                       "\", which this build does not know (known: ", KnownDtypes(), ")"));
    }
    for (int64_t d : t.shape()) {
      if (d < 0)
        return absl::DataLossError(
            absl::StrCat(where, " has a negative dimension in ", ShapeString(t.shape())));
    }
    const int64_t rows = TotalRows(t.shape());
    const int64_t row_bytes = RowElements(t.shape()) * element;
    int64_t next = 0;
    for (const auto& p : t.pieces()) {
      const std::string piece =
          absl::StrCat(where, ", piece ", RowsString(p.row_start(), p.row_start() + p.rows()),
                       " in \"", p.file(), "\"");
      if (!IsPlainFileName(p.file())) {
        return absl::DataLossError(piece + ": the shard file must be a plain file name");
      }
      if (p.offset() < 0 || p.rows() <= 0 || p.length() != p.rows() * row_bytes) {
        return absl::DataLossError(absl::StrCat(piece, ": offset ", p.offset(), ", length ",
                                                p.length(), " do not fit ", p.rows(), " rows of ",
                                                row_bytes, " bytes"));
      }
      if (p.row_start() != next) {
        return absl::DataLossError(
            absl::StrCat(where, ": its pieces do not cover ", RowsString(0, rows),
                         " exactly once (a piece starts at row ", p.row_start(), " where row ",
                         next, " was expected)"));
      }
      next = p.row_start() + p.rows();
    }
    if (next != rows) {
      return absl::DataLossError(absl::StrCat(where, ": its pieces cover ", RowsString(0, next),
                                              " of ", RowsString(0, rows)));
    }
  }
  if (m.world_size() > 0 && m.rng_states_size() != 0 && m.rng_states_size() != m.world_size()) {
    return absl::DataLossError(absl::StrCat(path, ": ", m.rng_states_size(),
                                            " generator states for world size ", m.world_size()));
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------------------------------------
// collective agreement

// Every rank contributes its status and a payload. Returns every rank's payload (index =
// rank), or, if any rank failed, the same error on every rank: what failed, on which ranks,
// and each failing rank's own message, then `consequence`.
absl::StatusOr<std::vector<std::string>> Agree(
    Communicator& world, const absl::Status& status, const std::string& payload,
    const std::string& what, const std::string& consequence = "nothing was committed") {
  std::string blob;
  if (status.ok()) {
    blob.push_back('\0');
    blob += payload;
  } else {
    blob.push_back(static_cast<char>(static_cast<int>(status.code())));
    blob += std::string(status.message());
  }
  torch::Tensor size = torch::tensor({static_cast<int64_t>(blob.size())}, torch::kLong);
  const torch::Tensor sizes = world.AllGather(size).contiguous();
  torch::Tensor mine =
      torch::from_blob(blob.data(), {static_cast<int64_t>(blob.size())}, torch::kUInt8);
  const torch::Tensor all = world.AllGather(mine).contiguous();
  const auto* bytes = reinterpret_cast<const char*>(all.data_ptr<uint8_t>());
  const auto* lengths = sizes.data_ptr<int64_t>();

  std::vector<std::string> payloads(world.size());
  std::vector<int> failed;
  std::vector<std::string> messages;
  absl::StatusCode code = absl::StatusCode::kOk;
  int64_t at = 0;
  for (int r = 0; r < world.size(); ++r) {
    const std::string_view one(bytes + at, static_cast<size_t>(lengths[r]));
    at += lengths[r];
    if (one.empty() || one[0] == '\0') {
      payloads[r] = std::string(one.empty() ? one : one.substr(1));
      continue;
    }
    if (failed.empty()) code = static_cast<absl::StatusCode>(static_cast<unsigned char>(one[0]));
    failed.push_back(r);
    messages.push_back(absl::StrCat("rank ", r, ": ", std::string(one.substr(1))));
  }
  if (failed.empty()) return payloads;
  return absl::Status(code, absl::StrCat(what, " failed on rank", failed.size() > 1 ? "s " : " ",
                                         absl::StrJoin(failed, ", "), " of ", world.size(), " (",
                                         absl::StrJoin(messages, "; "), "); ", consequence));
}

// ------------------------------------------------------------------------------------------
// saving

absl::Status CheckLocal(const ShardedTensor& t) {
  const std::string where = absl::StrCat("tensor '", t.name, "'");
  if (t.name.empty()) return absl::InvalidArgumentError("a ShardedTensor has no name");
  if (!t.local.defined())
    return absl::InvalidArgumentError(where + ": the local tensor is undefined");
  if (DtypeName(t.local.scalar_type()) == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": dtype ", c10::toString(t.local.scalar_type()),
                     " cannot be checkpointed (supported: ", KnownDtypes(), ")"));
  }
  const auto& g = t.global_shape;
  for (int64_t d : g) {
    if (d < 0)
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": global shape ", ShapeString(g), " has a negative dimension"));
  }
  const std::string local_desc =
      absl::StrCat("local shape ", ShapeString(t.local.sizes()), " at row_start ", t.row_start,
                   " does not fit global shape ", ShapeString(g));
  if (static_cast<size_t>(t.local.dim()) != g.size()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", local_desc, " (", t.local.dim(),
                                                   " vs ", g.size(), " dimensions)"));
  }
  if (g.empty()) {
    if (t.row_start != 0)
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": a 0-d tensor needs row_start 0, got ", t.row_start));
    return absl::OkStatus();
  }
  for (size_t d = 1; d < g.size(); ++d) {
    if (t.local.size(static_cast<int64_t>(d)) != g[d]) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", local_desc, " (dimension ", d, " must equal the global one)"));
    }
  }
  if (t.row_start < 0 || t.row_start + t.local.size(0) > g[0]) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", local_desc, " (rows ", t.row_start,
                                                   "..", t.row_start + t.local.size(0),
                                                   " exceed [0, ", g[0], "))"));
  }
  return absl::OkStatus();
}

std::string ShardName(int rank) { return absl::StrFormat("shard_%05d.bin", rank); }

std::string RngStateBytes() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  torch::Tensor state;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    state = gen.get_state();
  }
  state = state.contiguous();
  return std::string(reinterpret_cast<const char*>(state.data_ptr()),
                     static_cast<size_t>(state.nbytes()));
}

// What this rank writes into its shard, taken on the calling thread: the tensors are
// validated, their declarations and this rank's generator state recorded in a partial
// manifest, and the data to write held (or copied). The write itself (WriteShardFile) may
// then run on another thread; it touches nothing but this struct and the file.
struct ShardJob {
  struct Piece {
    int record;           // index into partial.tensors()
    torch::Tensor data;   // CPU, contiguous: the rows to write
    int64_t row_start = 0;
    int64_t rows = 0;
  };
  std::string name;  // shard file name
  std::string path;
  std::vector<Piece> pieces;
  int64_t bytes = 0;
  // Tensors with their declarations and (after the write) this rank's pieces, and this
  // rank's generator state.
  CheckpointManifest partial;
};

absl::Status PrepareShard(const std::string& dir, int rank,
                          const std::vector<ShardedTensor>& tensors, bool copy, ShardJob* job) {
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    if (auto s = CheckLocal(t); !s.ok()) return s;
    if (!seen.insert(t.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' is passed twice"));
    }
  }
  job->name = ShardName(rank);
  job->path = JoinPath(dir, job->name);
  for (const auto& t : tensors) {
    TensorRecord* record = job->partial.add_tensors();
    record->set_name(t.name);
    record->set_dtype(DtypeName(t.local.scalar_type()));
    for (int64_t d : t.global_shape) record->add_shape(d);
    if (!t.write) continue;
    const int64_t rows = t.global_shape.empty() ? 1 : t.local.size(0);
    if (rows == 0) continue;
    torch::Tensor data = t.local.detach().to(torch::kCPU);
    // A snapshot for a background write: the caller goes on changing its tensors.
    data = copy ? data.clone(at::MemoryFormat::Contiguous) : data.contiguous();
    job->bytes += static_cast<int64_t>(data.nbytes());
    job->pieces.push_back({job->partial.tensors_size() - 1, std::move(data), t.row_start, rows});
  }
  job->partial.add_rng_states(RngStateBytes());
  return absl::OkStatus();
}

// Writes the shard file of `job` (none when it has no pieces), one CRC-32C per piece,
// fsyncs and closes it, and adds the piece records to job->partial.
absl::Status WriteShardFile(ShardJob* job) {
  const std::string& path = job->path;
  Fd fd;
  int64_t offset = 0;
  for (auto& piece : job->pieces) {
    TensorRecord* record = job->partial.mutable_tensors(piece.record);
    if (!fd.ok()) {
      fd = CreateForWriting(path);
      if (!fd.ok()) {
        const int error = errno;
        absl::Status s = CreateError(error, "cannot create shard file", path);
        if (error == ENOENT) {
          s = absl::NotFoundError(
              absl::StrCat(s.message(), " (every rank must see the checkpoint directory: ",
                           "it has to be on a file system shared by all nodes)"));
        }
        return s;
      }
    }
    const size_t bytes = static_cast<size_t>(piece.data.nbytes());
    const uint32_t crc = Crc32c(piece.data.data_ptr(), bytes);
    if (auto s = WriteAll(fd.get(), piece.data.data_ptr(), bytes, path); !s.ok()) {
      return absl::Status(s.code(),
                          absl::StrCat(s.message(), " (writing tensor '", record->name(), "')"));
    }
    TensorPiece* p = record->add_pieces();
    p->set_file(job->name);
    p->set_offset(offset);
    p->set_length(static_cast<int64_t>(bytes));
    p->set_row_start(piece.row_start);
    p->set_rows(piece.rows);
    p->set_crc32c(crc);
    offset += static_cast<int64_t>(bytes);
    piece.data = torch::Tensor();  // a snapshot's memory goes as soon as it is on disk
  }
  if (fd.ok()) {
    if (::fsync(fd.get()) != 0) return ErrnoStatus(errno, "cannot fsync shard file", path);
    if (fd.Close() != 0) return ErrnoStatus(errno, "cannot close shard file", path);
  }
  return absl::OkStatus();
}

// Names a checkpoint directory uses itself: an extra file may not take them.
bool IsReservedName(const std::string& name) {
  return name == kManifestName || name == kCommittedName || name == kLatestName ||
         name.rfind("shard_", 0) == 0;
}

// Rank 0, before the manifest: copies CheckpointState::extra_files into `dir`, each fsynced
// (the directory is fsynced with the manifest).
absl::Status CopyExtraFiles(const std::string& dir, const std::vector<std::string>& files) {
  std::set<std::string> names;
  for (const auto& source : files) {
    const std::string name = BaseName(source);
    if (!IsPlainFileName(name) || IsReservedName(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "extra file ", source, ": the name \"", name, "\" is taken by the checkpoint itself"));
    }
    if (!names.insert(name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("extra file ", source, ": another extra file is also named \"", name, "\""));
    }
    auto bytes = ReadWholeFile(source);
    if (!bytes.ok()) {
      return absl::Status(bytes.status().code(), absl::StrCat("cannot copy extra file into the "
                                                              "checkpoint: ",
                                                              bytes.status().message()));
    }
    if (auto s = WriteFileDurably(JoinPath(dir, name), *bytes); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// Rank 0: one manifest from every rank's partial one; checks agreement and coverage.
absl::Status MergeManifests(const std::vector<std::string>& partials, CheckpointManifest* out) {
  struct Entry {
    int record;                                       // index into out->tensors()
    int declared_by;                                  // first rank that declared it
    std::vector<std::pair<TensorPiece, int>> pieces;  // with the writing rank
  };
  std::unordered_map<std::string, Entry> entries;
  std::vector<std::string> order;
  for (int r = 0; r < static_cast<int>(partials.size()); ++r) {
    CheckpointManifest partial;
    if (!partial.ParseFromString(partials[r])) {
      return absl::InternalError(
          absl::StrCat("cannot parse the piece records gathered from rank ", r));
    }
    for (const auto& t : partial.tensors()) {
      auto it = entries.find(t.name());
      if (it == entries.end()) {
        TensorRecord* record = out->add_tensors();
        record->set_name(t.name());
        record->set_dtype(t.dtype());
        *record->mutable_shape() = t.shape();
        it = entries.emplace(t.name(), Entry{out->tensors_size() - 1, r, {}}).first;
        order.push_back(t.name());
      } else {
        const TensorRecord& first = out->tensors(it->second.record);
        if (first.dtype() != t.dtype() || !std::equal(first.shape().begin(), first.shape().end(),
                                                      t.shape().begin(), t.shape().end())) {
          return absl::InvalidArgumentError(absl::StrCat(
              "tensor '", t.name(), "': rank ", it->second.declared_by, " declares ", first.dtype(),
              " ", ShapeString(first.shape()), ", rank ", r, " declares ", t.dtype(), " ",
              ShapeString(t.shape()), " (every rank must pass the same global shape and dtype)"));
        }
      }
      for (const auto& p : t.pieces()) it->second.pieces.emplace_back(p, r);
    }
    for (const auto& state : partial.rng_states()) out->add_rng_states(state);
  }
  std::vector<std::string> problems;
  for (const auto& name : order) {
    Entry& e = entries[name];
    TensorRecord* record = out->mutable_tensors(e.record);
    std::sort(e.pieces.begin(), e.pieces.end(), [](const auto& a, const auto& b) {
      return a.first.row_start() != b.first.row_start() ? a.first.row_start() < b.first.row_start()
                                                        : a.second < b.second;
    });
    const int64_t rows = TotalRows(record->shape());
    const std::string where = absl::StrCat("tensor '", name, "' ", ShapeString(record->shape()));
    int64_t next = 0;
    int last_rank = -1;
    for (const auto& [p, rank] : e.pieces) {
      if (p.row_start() > next) {
        problems.push_back(
            absl::StrCat(where, ": ", RowsString(next, p.row_start()),
                         " are written by no rank (set write=true on one rank that holds them)"));
      } else if (p.row_start() < next) {
        problems.push_back(absl::StrCat(
            where, ": ", RowsString(p.row_start(), std::min(next, p.row_start() + p.rows())),
            " are written by more than one rank (ranks ", last_rank, " and ", rank,
            "; set write=true on exactly one replica)"));
      }
      next = std::max(next, p.row_start() + p.rows());
      last_rank = rank;
      *record->add_pieces() = p;
    }
    if (next < rows) {
      problems.push_back(
          absl::StrCat(where, ": ", RowsString(next, rows),
                       " are written by no rank (set write=true on one rank that holds them)"));
    }
  }
  if (!problems.empty()) {
    const size_t shown = std::min<size_t>(problems.size(), 8);
    std::string message =
        absl::StrCat("the tensors' rows are not covered exactly once: ",
                     absl::StrJoin(problems.begin(), problems.begin() + shown, "; "));
    if (shown < problems.size())
      absl::StrAppend(&message, "; and ", problems.size() - shown, " more");
    return absl::InvalidArgumentError(message);
  }
  return absl::OkStatus();
}

double EnvSeconds(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return 0;
  char* end = nullptr;
  const double seconds = std::strtod(value, &end);
  return (end != value && seconds > 0) ? seconds : 0;
}

double PauseSeconds() { return EnvSeconds(kPauseEnv); }

// The step directory `root`'s resolution currently returns, if any.
std::string CurrentCheckpointName(const std::string& root) {
  auto current = ResolveCheckpoint(root);
  return current.ok() ? BaseName(*current) : std::string();
}

// Rank 0, before any shard is written: an empty step directory.
absl::Status PrepareStepDir(const std::string& root, const std::string& dir, int64_t step) {
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec)
    return absl::InternalError(
        absl::StrCat("cannot create checkpoint root ", root, ": ", ec.message()));
  if (fs::exists(dir, ec)) {
    if (IsCommitted(dir)) {
      const std::string current = CurrentCheckpointName(root);
      if (current.empty() || current == BaseName(dir)) {
        return absl::AlreadyExistsError(
            absl::StrCat(dir, " already holds a committed checkpoint of step ", step,
                         ", the one this run would resume from; refusing to overwrite it (do not "
                         "save the same step twice)"));
      }
      // A committed checkpoint that `latest` does not name: left by a run that resumed from
      // an earlier checkpoint (or crashed between COMMITTED and `latest`). Replace it.
    }
    if (auto s = RemoveStepDir(dir); !s.ok()) {
      return absl::Status(
          s.code(), absl::StrCat("cannot remove the remains of an unfinished save: ", s.message()));
    }
  }
  if (::mkdir(dir.c_str(), 0755) != 0)
    return ErrnoStatus(errno, "cannot create checkpoint directory", dir);
  if (auto s = FsyncDir(root); !s.ok()) return s;
  return absl::OkStatus();
}

absl::Status WriteManifest(const std::string& dir, const CheckpointManifest& manifest) {
  if (auto s = WriteFileDurably(JoinPath(dir, kManifestName), FrameManifest(manifest)); !s.ok())
    return s;
  return FsyncDir(dir);
}

absl::Status Commit(const std::string& root, const std::string& dir, int64_t step) {
  if (auto s = WriteFileDurably(JoinPath(dir, kCommittedName), absl::StrCat("step ", step, "\n"));
      !s.ok())
    return s;
  if (auto s = FsyncDir(dir); !s.ok()) return s;
  const std::string tmp = JoinPath(root, std::string(kLatestName) + ".tmp");
  const std::string latest = JoinPath(root, kLatestName);
  if (auto s = WriteFileDurably(tmp, BaseName(dir) + "\n"); !s.ok()) return s;
  if (::rename(tmp.c_str(), latest.c_str()) != 0)
    return ErrnoStatus(errno, "cannot rename " + tmp + " to", latest);
  return FsyncDir(root);
}

// Rank 0 after a commit of `step`: keeps the keep_last newest committed checkpoints up to
// `step` (this one included), and removes unfinished step directories older than it.
// Checkpoints of later steps (left by a run that resumed from an earlier one) are left alone.
// Failures are reported on stderr: the new checkpoint is committed either way.
void Prune(const std::string& root, int64_t step, int keep_last) {
  std::vector<StepDir> committed_before;
  std::vector<std::string> doomed;
  for (const auto& d : ListStepDirs(root)) {
    if (d.step >= step) continue;
    if (d.committed) {
      committed_before.push_back(d);
    } else {
      doomed.push_back(d.name);
    }
  }
  if (keep_last > 0) {
    const int64_t keep_others = keep_last - 1;
    const int64_t excess = static_cast<int64_t>(committed_before.size()) - keep_others;
    for (int64_t i = 0; i < excess; ++i) doomed.push_back(committed_before[i].name);
  }
  for (const auto& name : doomed) {
    if (auto s = RemoveStepDir(JoinPath(root, name)); !s.ok()) {
      std::fprintf(stderr, "rmoe checkpoint: warning: cannot delete old checkpoint directory: %s\n",
                   std::string(s.message()).c_str());
    }
  }
}

// ------------------------------------------------------------------------------------------
// reading

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

// ------------------------------------------------------------------------------------------
// public API

struct PendingCheckpoint::Impl {
  std::string root, dir, what;
  CheckpointState state;
  int keep_last = 0;
  ShardJob shard;
  // Written by the writer before `done` is set; read by the owner after joining it.
  absl::Status status;
  std::atomic<bool> done{false};
  std::thread writer;
  double test_delay_seconds = 0;  // kWriteDelayEnv, read on the caller's thread
  bool finished = false;
  int64_t total_bytes = 0;

  // The shard write, on whichever thread runs it: no collective calls.
  void Write() {
    if (test_delay_seconds > 0)
      std::this_thread::sleep_for(std::chrono::duration<double>(test_delay_seconds));
    try {
      status = WriteShardFile(&shard);
    } catch (const std::exception& e) {  // c10::Error, std::bad_alloc
      status = absl::InternalError(absl::StrCat("writing ", shard.path, ": ", e.what()));
    }
    done.store(true, std::memory_order_release);
  }

  void Join() {
    if (writer.joinable()) writer.join();
  }
};

PendingCheckpoint::PendingCheckpoint(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PendingCheckpoint::~PendingCheckpoint() {
  if (impl_) impl_->Join();
}
const std::string& PendingCheckpoint::dir() const { return impl_->dir; }
int64_t PendingCheckpoint::step() const { return impl_->state.step; }
bool PendingCheckpoint::WriteDone() const {
  return impl_->done.load(std::memory_order_acquire);
}
int64_t PendingCheckpoint::local_bytes() const { return impl_->shard.bytes; }
int64_t PendingCheckpoint::total_bytes() const { return impl_->total_bytes; }

absl::StatusOr<std::unique_ptr<PendingCheckpoint>> BeginCheckpoint(
    const std::string& root, const CheckpointState& state,
    const std::vector<ShardedTensor>& tensors, Communicator& world, int keep_last,
    bool background) {
  const int rank = world.rank();
  auto impl = std::make_unique<PendingCheckpoint::Impl>();
  impl->root = root;
  impl->dir = JoinPath(root, StepDirName(state.step));
  impl->what = absl::StrCat("saving checkpoint ", impl->dir);
  impl->state = state;
  impl->keep_last = keep_last;

  // 1. The step directory.
  absl::Status status = absl::OkStatus();
  if (root.empty()) status = absl::InvalidArgumentError("the checkpoint root directory is empty");
  if (status.ok() && state.step < 0)
    status = absl::InvalidArgumentError(absl::StrCat("step ", state.step, " < 0"));
  if (status.ok() && rank == 0) {
    try {
      status = PrepareStepDir(root, impl->dir, state.step);
    } catch (const std::exception& e) {
      status = absl::InternalError(e.what());
    }
  }
  if (auto agreed = Agree(world, status, "", impl->what); !agreed.ok()) return agreed.status();

  // 2a. What this rank writes, taken here; the write may go on in the background.
  try {
    impl->status = PrepareShard(impl->dir, rank, tensors, background, &impl->shard);
  } catch (const std::exception& e) {  // c10::Error from a tensor conversion or the copy
    impl->status = absl::InternalError(e.what());
  }
  if (!impl->status.ok()) {
    impl->shard.pieces.clear();
    impl->done.store(true);
  } else if (background) {
    // Test hook: the background write starts this much later (training goes on meanwhile).
    impl->test_delay_seconds = EnvSeconds(kWriteDelayEnv);
    try {
      impl->writer = std::thread([p = impl.get()] { p->Write(); });
    } catch (const std::system_error&) {
      impl->Write();  // no thread to be had: write it here
    }
  } else {
    impl->Write();
  }
  return std::unique_ptr<PendingCheckpoint>(new PendingCheckpoint(std::move(impl)));
}

absl::StatusOr<std::string> FinishCheckpoint(PendingCheckpoint& pending, Communicator& world) {
  PendingCheckpoint::Impl& c = *pending.impl_;
  const int rank = world.rank();
  if (c.finished) {
    return absl::FailedPreconditionError(
        absl::StrCat("the save of ", c.dir, " was already finished"));
  }
  c.finished = true;
  c.Join();

  // 2b. Everyone's piece records (the error exchange).
  auto partials =
      Agree(world, c.status, c.status.ok() ? c.shard.partial.SerializeAsString() : "", c.what);
  if (!partials.ok()) {
    if (rank == 0) (void)RemoveStepDir(c.dir);
    return partials.status();
  }

  // 3. The extra files, then the manifest.
  absl::Status status = absl::OkStatus();
  if (rank == 0) {
    CheckpointManifest manifest;
    manifest.set_format_version(kCheckpointFormatVersion);
    *manifest.mutable_job() = c.state.job;
    manifest.set_step(c.state.step);
    manifest.set_consumed_samples(c.state.consumed_samples);
    manifest.set_world_size(world.size());
    manifest.set_expert_parallel_size(c.state.expert_parallel_size);
    for (const auto& [key, value] : c.state.scalars) (*manifest.mutable_scalars())[key] = value;
    status = MergeManifests(*partials, &manifest);
    if (status.ok()) status = CopyExtraFiles(c.dir, c.state.extra_files);
    if (status.ok()) status = WriteManifest(c.dir, manifest);
    if (status.ok()) {
      if (const double pause = PauseSeconds(); pause > 0) {
        std::fprintf(stderr,
                     "rmoe checkpoint: test hook %s: manifest of %s written, pausing %g s before "
                     "the commit\n",
                     kPauseEnv, c.dir.c_str(), pause);
        std::fflush(stderr);
        std::this_thread::sleep_for(std::chrono::duration<double>(pause));
      }
    }
  }
  if (auto agreed = Agree(world, status, "", c.what); !agreed.ok()) {
    if (rank == 0) (void)RemoveStepDir(c.dir);
    return agreed.status();
  }

  // 4. Commit, then prune.
  status = absl::OkStatus();
  if (rank == 0) {
    status = Commit(c.root, c.dir, c.state.step);
    if (status.ok()) {
      try {
        Prune(c.root, c.state.step, c.keep_last);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rmoe checkpoint: warning: pruning %s: %s\n", c.root.c_str(),
                     e.what());
      }
    }
  }
  // COMMITTED may exist while `latest` could not be replaced: readers that follow `latest`
  // still get the previous checkpoint.
  if (auto agreed = Agree(world, status, "", c.what,
                          "the commit did not complete: `latest` still names the previous "
                          "checkpoint");
      !agreed.ok()) {
    return agreed.status();
  }
  c.total_bytes = 0;
  for (const auto& bytes : *partials) {
    CheckpointManifest partial;
    if (!partial.ParseFromString(bytes)) continue;
    for (const auto& t : partial.tensors())
      for (const auto& p : t.pieces()) c.total_bytes += p.length();
  }
  return c.dir;
}

absl::StatusOr<std::string> SaveCheckpoint(const std::string& root, const CheckpointState& state,
                                           const std::vector<ShardedTensor>& tensors,
                                           Communicator& world, int keep_last) {
  auto pending = BeginCheckpoint(root, state, tensors, world, keep_last, /*background=*/false);
  if (!pending.ok()) return pending.status();
  return FinishCheckpoint(**pending, world);
}

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

absl::StatusOr<CheckpointManifest> ReadManifest(const std::string& dir) {
  const std::string path = JoinPath(dir, kManifestName);
  auto bytes = ReadWholeFile(path);
  if (!bytes.ok()) {
    if (absl::IsNotFound(bytes.status())) {
      return absl::NotFoundError(absl::StrCat("checkpoint manifest ", path, " does not exist"));
    }
    return bytes.status();
  }
  const std::string& b = *bytes;
  const size_t magic_checked = std::min(b.size(), sizeof(kMagic));
  if (b.compare(0, magic_checked, std::string(kMagic, magic_checked)) != 0) {
    return absl::DataLossError(absl::StrCat(
        path, " is not an RMoE checkpoint manifest (its first bytes are not \"RMOECKPT\")"));
  }
  if (b.size() < kFrameHeaderBytes) {
    return absl::DataLossError(absl::StrCat(path, " is truncated: ", b.size(),
                                            " bytes, shorter than the ", kFrameHeaderBytes,
                                            "-byte header"));
  }
  const uint64_t version = LoadLe(b.data() + 8, 4);
  if (version > static_cast<uint64_t>(kCheckpointFormatVersion)) {
    return absl::FailedPreconditionError(NewerFormatMessage(path, static_cast<int64_t>(version)));
  }
  if (version == 0)
    return absl::DataLossError(absl::StrCat(path, ": format version 0 is not valid"));
  const uint64_t length = LoadLe(b.data() + 12, 8);
  const uint64_t available = b.size() - kFrameHeaderBytes;
  if (length > available || available - length < kFrameTrailerBytes) {
    return absl::DataLossError(absl::StrCat(
        path, " is truncated: ", b.size(), " bytes, the header announces ", length,
        " bytes of manifest (", kFrameHeaderBytes + kFrameTrailerBytes + length, " bytes in all)"));
  }
  if (available - length > kFrameTrailerBytes) {
    return absl::DataLossError(absl::StrCat(path, " has ", available - length - kFrameTrailerBytes,
                                            " unexpected bytes after the manifest (", b.size(),
                                            " bytes, expected ",
                                            kFrameHeaderBytes + kFrameTrailerBytes + length, ")"));
  }
  const std::string_view payload(b.data() + kFrameHeaderBytes, length);
  const uint32_t saved = static_cast<uint32_t>(LoadLe(b.data() + kFrameHeaderBytes + length, 4));
  const uint32_t actual = Crc32c(payload);
  if (saved != actual) {
    return absl::DataLossError(
        absl::StrFormat("%s is corrupt: CRC-32C of the manifest is 0x%08x, the file says 0x%08x",
                        path, actual, saved));
  }
  CheckpointManifest manifest;
  if (!manifest.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) {
    return absl::DataLossError(
        absl::StrCat(path, " is corrupt: its checksum matches but the manifest does not parse"));
  }
  if (manifest.format_version() > kCheckpointFormatVersion) {
    return absl::FailedPreconditionError(NewerFormatMessage(path, manifest.format_version()));
  }
  if (auto s = ValidateManifest(manifest, path); !s.ok()) return s;
  return manifest;
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
    if (!t.local.device().is_cpu() || !t.local.is_contiguous()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name, "': LoadTensors fills CPU contiguous tensors in place"));
    }
    if (auto s = CheckLocal(t); !s.ok()) return s;
    const int64_t row_bytes = RowElements(r.shape()) * DtypeBytes(r.dtype());
    const int64_t begin = t.row_start;
    const int64_t end = begin + (r.shape_size() == 0 ? 1 : t.local.size(0));
    char* base = static_cast<char*>(t.local.data_ptr());
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
