// Shared pieces of the checkpoint writer and reader (distributed/checkpoint_manifest.h), and
// ReadManifest.
#include "distributed/checkpoint_manifest.h"

#include <absl/strings/str_format.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <set>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>

#include "distributed/checkpoint_files.h"
#include "rmoe/util/crc32c.h"
#include "rmoe/util/ownership.h"

namespace rmoe::distributed {
namespace checkpoint_internal {
namespace {

namespace fs = std::filesystem;

// The frame around the serialised manifest (see distributed/checkpoint.h).
constexpr char kMagic[8] = {'R', 'M', 'O', 'E', 'C', 'K', 'P', 'T'};
constexpr size_t kFrameHeaderBytes = 8 + 4 + 8;
constexpr size_t kFrameTrailerBytes = 4;


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
  for (const auto& [count, what] : {std::pair{m.rng_states_size(), "generator states"},
                                    std::pair{m.device_rng_states_size(), "device generator states"}}) {
    if (m.world_size() > 0 && count != 0 && count != m.world_size()) {
      return absl::DataLossError(
          absl::StrCat(path, ": ", count, " ", what, " for world size ", m.world_size()));
    }
  }
  return absl::OkStatus();
}

// One tensor of a merge: its record in the merged manifest, and every rank's pieces.
struct MergeEntry {
  int record;                                       // index into the merged tensors()
  int declared_by;                                  // first rank that declared it
  std::vector<std::pair<TensorPiece, int>> pieces;  // with the writing rank
};

// Adds `entry`'s pieces to `record` in row order, and what is wrong with their coverage of
// the tensor's rows (gaps, overlaps) to `problems`.
void AddPiecesInOrder(const std::string& name, MergeEntry& entry, TensorRecord* record,
                      std::vector<std::string>* problems) {
  std::sort(entry.pieces.begin(), entry.pieces.end(), [](const auto& a, const auto& b) {
    return a.first.row_start() != b.first.row_start() ? a.first.row_start() < b.first.row_start()
                                                      : a.second < b.second;
  });
  const int64_t rows = TotalRows(record->shape());
  const std::string where = absl::StrCat("tensor '", name, "' ", ShapeString(record->shape()));
  int64_t next = 0;
  int last_rank = -1;
  for (const auto& [p, rank] : entry.pieces) {
    if (p.row_start() > next) {
      problems->push_back(
          absl::StrCat(where, ": ", RowsString(next, p.row_start()),
                       " are written by no rank (set write=true on one rank that holds them)"));
    } else if (p.row_start() < next) {
      problems->push_back(absl::StrCat(
          where, ": ", RowsString(p.row_start(), std::min(next, p.row_start() + p.rows())),
          " are written by more than one rank (ranks ", last_rank, " and ", rank,
          "; set write=true on exactly one replica)"));
    }
    next = std::max(next, p.row_start() + p.rows());
    last_rank = rank;
    *record->add_pieces() = p;
  }
  if (next < rows) {
    problems->push_back(
        absl::StrCat(where, ": ", RowsString(next, rows),
                     " are written by no rank (set write=true on one rank that holds them)"));
  }
}

// Reads manifest.pb at `path` and checks its frame, then its contents (ValidateManifest).
absl::StatusOr<CheckpointManifest> ReadFramedManifest(const std::string& path) {
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

}  // namespace

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

std::string RowsString(int64_t begin, int64_t end) {
  return absl::StrCat("rows [", begin, ", ", end, ")");
}


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

absl::Status RemoveStepDir(const std::string& path, const std::string& run_id) {
  if (!IsOwned(path, kCheckpointKind, run_id)) {
    return RemoveOwnedDirectory(path, kCheckpointKind, run_id);  // refused, or nothing there
  }
  const std::string marker = JoinPath(path, kCommittedName);
  if (IsRegularFile(marker)) {
    if (::unlink(marker.c_str()) != 0) return ErrnoStatus(errno, "cannot remove", marker);
    if (auto s = FsyncDir(path); !s.ok()) return s;
  }
  return RemoveOwnedDirectory(path, kCheckpointKind, run_id);
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

absl::Status MergeManifests(const std::vector<std::string>& partials, CheckpointManifest* out) {
  std::unordered_map<std::string, MergeEntry> entries;
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
        it = entries.emplace(t.name(), MergeEntry{out->tensors_size() - 1, r, {}}).first;
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
    for (const auto& state : partial.device_rng_states()) out->add_device_rng_states(state);
  }
  std::vector<std::string> problems;
  for (const auto& name : order) {
    MergeEntry& entry = entries[name];
    AddPiecesInOrder(name, entry, out->mutable_tensors(entry.record), &problems);
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

}  // namespace checkpoint_internal

absl::StatusOr<CheckpointManifest> ReadManifest(const std::string& dir) {
  return checkpoint_internal::ReadFramedManifest(
      checkpoint_internal::JoinPath(dir, checkpoint_internal::kManifestName));
}

}  // namespace rmoe::distributed
