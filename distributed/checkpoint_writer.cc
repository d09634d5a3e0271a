// Saving sharded checkpoints (distributed/checkpoint.h): BeginCheckpoint, FinishCheckpoint,
// SaveCheckpoint. The on-disk layout is described in checkpoint.h.
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
//      writes and fsyncs manifest.pb and the directory. [Test hook: rank 0 sleeps here for
//      CheckpointWriteOptions::pause_before_commit_seconds.]
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
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <set>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>

#include "distributed/checkpoint_files.h"
#include "distributed/checkpoint_manifest.h"
#include "rmoe/util/crc32c.h"
#include "rmoe/util/ownership.h"

namespace rmoe::distributed {

// The helpers shared with the reader (checkpoint_files.h, checkpoint_manifest.h).
using namespace checkpoint_internal;  // NOLINT(build/namespaces)

namespace {

namespace fs = std::filesystem;

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
// the shard of this rank

std::string ShardName(int rank) { return absl::StrFormat("shard_%05d.bin", rank); }

std::string GeneratorStateBytes(at::Generator generator) {
  torch::Tensor state;
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    state = generator.get_state();
  }
  state = state.contiguous();
  return std::string(reinterpret_cast<const char*>(state.data_ptr()),
                     static_cast<size_t>(state.nbytes()));
}

// The generator of the device the tensors live on; empty when they are on the CPU.
std::string DeviceGeneratorStateBytes(const std::vector<ShardedTensor>& tensors) {
  for (const auto& t : tensors) {
    if (t.local.defined() && !t.local.device().is_cpu()) {
      return GeneratorStateBytes(at::globalContext().defaultGenerator(t.local.device()));
    }
  }
  return "";
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
    // Device tensors are staged on the host by this copy, which is already a snapshot.
    torch::Tensor data = t.local.detach().to(torch::kCPU);
    // A snapshot for a background write: the caller goes on changing its tensors.
    const bool snapshot = copy && t.local.device().is_cpu();
    data = snapshot ? data.clone(at::MemoryFormat::Contiguous) : data.contiguous();
    job->bytes += static_cast<int64_t>(data.nbytes());
    job->pieces.push_back({job->partial.tensors_size() - 1, std::move(data), t.row_start, rows});
  }
  job->partial.add_rng_states(GeneratorStateBytes(at::detail::getDefaultCPUGenerator()));
  job->partial.add_device_rng_states(DeviceGeneratorStateBytes(tensors));
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

// ------------------------------------------------------------------------------------------
// committing

// The step directory `root`'s resolution currently returns, if any.
std::string CurrentCheckpointName(const std::string& root) {
  auto current = ResolveCheckpoint(root);
  return current.ok() ? BaseName(*current) : std::string();
}

// The run id in the checkpoint root's ownership mark, creating and marking the root if
// needed. A root that exists without a mark (made by hand, or by an older rmoe) is marked
// now: the step directories already in it carry no mark of this run, so none is ever
// deleted. With `expected_run_id`, the root must carry that one: a different mark means the
// path now leads elsewhere (the directory was replaced, or a component swapped for a
// symbolic link) since this run first saved there.
absl::StatusOr<std::string> OpenCheckpointRoot(const std::string& root,
                                               const std::string& expected_run_id) {
  std::error_code ec;
  fs::create_directories(ParentDir(root), ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot create the parent of checkpoint root ", root,
                                            ": ", ec.message()));
  }
  if (!IsDirectory(root)) {
    auto created = CreateOwnedDirectory(root, {kCheckpointRootKind, NewRunId()});
    if (!created.ok() && created.code() != absl::StatusCode::kAlreadyExists) {
      return absl::Status(created.code(),
                          absl::StrCat("cannot create checkpoint root: ", created.message()));
    }
  }
  auto mark = ReadOwnerMark(root);
  if (!mark.ok()) return mark.status();
  if (!mark->has_value()) {
    const std::string run_id = NewRunId();
    if (auto s = WriteOwnerMark(root, {kCheckpointRootKind, run_id}); !s.ok()) return s;
    return run_id;
  }
  const OwnerMark& found = **mark;
  if (found.kind != kCheckpointRootKind) {
    return absl::FailedPreconditionError(
        absl::StrCat("refusing to save checkpoints in ", root, ": it is marked as rmoe's ",
                     found.kind, " directory, not a checkpoint root (choose another "
                     "checkpoint.directory)"));
  }
  if (!expected_run_id.empty() && found.run_id != expected_run_id) {
    return absl::FailedPreconditionError(absl::StrCat(
        "refusing to save in checkpoint root ", root, ": it now leads to the checkpoints of run ",
        found.run_id, ", not to the directory this run (", expected_run_id,
        ") saved in before; was it replaced, or a path component swapped for a symbolic link?"));
  }
  return found.run_id;
}

// Rank 0, before any shard is written: an empty step directory marked as this run's.
// Returns the run id.
absl::StatusOr<std::string> PrepareStepDir(const std::string& root, const std::string& dir,
                                           int64_t step, const std::string& expected_run_id) {
  auto run_id = OpenCheckpointRoot(root, expected_run_id);
  if (!run_id.ok()) return run_id.status();
  struct stat st;
  if (::lstat(dir.c_str(), &st) == 0) {
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
    if (auto s = RemoveStepDir(dir, *run_id); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("cannot save step ", step, ": ", s.message()));
    }
  }
  if (auto s = CreateOwnedDirectory(dir, {kCheckpointKind, *run_id}); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("cannot create checkpoint directory: ", s.message()));
  }
  return run_id;
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

// Rank 0 after a commit of `step`: keeps the keep_last newest committed checkpoints of this
// run up to `step` (this one included), and removes this run's unfinished step directories
// older than it. Checkpoints of later steps (left by a run that resumed from an earlier one)
// and every directory this run did not write are left alone. Failures are reported on
// stderr: the new checkpoint is committed either way.
void Prune(const std::string& root, int64_t step, int keep_last, const std::string& run_id) {
  std::vector<StepDir> committed_before;
  std::vector<std::string> doomed;
  for (const auto& d : ListStepDirs(root)) {
    if (d.step >= step || !IsOwned(JoinPath(root, d.name), kCheckpointKind, run_id)) continue;
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
    if (auto s = RemoveStepDir(JoinPath(root, name), run_id); !s.ok()) {
      std::fprintf(stderr, "rmoe checkpoint: warning: cannot delete old checkpoint directory: %s\n",
                   std::string(s.message()).c_str());
    }
  }
}

// The shard bytes of all ranks together, from their partial manifests.
int64_t ShardBytes(const std::vector<std::string>& partials) {
  int64_t total = 0;
  for (const auto& bytes : partials) {
    CheckpointManifest partial;
    if (!partial.ParseFromString(bytes)) continue;
    for (const auto& t : partial.tensors())
      for (const auto& p : t.pieces()) total += p.length();
  }
  return total;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// the API

struct PendingCheckpoint::Impl {
  std::string root, dir, what;
  std::string run_id;  // of the checkpoint root (rank 0 only)
  CheckpointState state;
  CheckpointWriteOptions options;
  ShardJob shard;
  // Written by the writer before `done` is set; read by the owner after joining it.
  absl::Status status;
  std::atomic<bool> done{false};
  std::thread writer;
  double write_delay_seconds = 0;  // the test hook, for a background write only
  bool finished = false;
  int64_t total_bytes = 0;

  // The shard write, on whichever thread runs it: no collective calls.
  void Write() {
    if (write_delay_seconds > 0)
      std::this_thread::sleep_for(std::chrono::duration<double>(write_delay_seconds));
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

  // Rank 0, step 3: merges every rank's partial manifest (index = rank), copies the extra
  // files, writes the manifest; then the test pause before the commit.
  absl::Status WriteManifestAndExtraFiles(const std::vector<std::string>& partials,
                                          int world_size) {
    CheckpointManifest manifest;
    manifest.set_format_version(kCheckpointFormatVersion);
    *manifest.mutable_job() = state.job;
    manifest.set_step(state.step);
    manifest.set_consumed_samples(state.consumed_samples);
    manifest.set_world_size(world_size);
    manifest.set_expert_parallel_size(state.expert_parallel_size);
    for (const auto& [key, value] : state.scalars) (*manifest.mutable_scalars())[key] = value;
    if (auto s = MergeManifests(partials, &manifest); !s.ok()) return s;
    if (auto s = CopyExtraFiles(dir, state.extra_files); !s.ok()) return s;
    if (auto s = WriteManifest(dir, manifest); !s.ok()) return s;
    if (const double pause = options.pause_before_commit_seconds; pause > 0) {
      std::fprintf(stderr,
                   "rmoe checkpoint: test hook pause_before_commit_seconds: manifest of %s "
                   "written, pausing %g s before the commit\n",
                   dir.c_str(), pause);
      std::fflush(stderr);
      std::this_thread::sleep_for(std::chrono::duration<double>(pause));
    }
    return absl::OkStatus();
  }

  // Rank 0, step 4. Pruning failures are only reported: the checkpoint is committed.
  absl::Status CommitAndPrune() {
    if (auto s = Commit(root, dir, state.step); !s.ok()) return s;
    try {
      Prune(root, state.step, options.keep_last, run_id);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "rmoe checkpoint: warning: pruning %s: %s\n", root.c_str(), e.what());
    }
    return absl::OkStatus();
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
    const std::vector<ShardedTensor>& tensors, Communicator& world,
    const CheckpointWriteOptions& options) {
  const bool background = options.background;
  const int rank = world.rank();
  auto impl = std::make_unique<PendingCheckpoint::Impl>();
  impl->root = root;
  impl->dir = JoinPath(root, StepDirName(state.step));
  impl->what = absl::StrCat("saving checkpoint ", impl->dir);
  impl->state = state;
  impl->options = options;

  // 1. The step directory.
  absl::Status status = absl::OkStatus();
  if (root.empty()) status = absl::InvalidArgumentError("the checkpoint root directory is empty");
  if (status.ok() && state.step < 0)
    status = absl::InvalidArgumentError(absl::StrCat("step ", state.step, " < 0"));
  if (status.ok() && rank == 0) {
    try {
      auto run_id = PrepareStepDir(root, impl->dir, state.step, options.run_id);
      status = run_id.status();
      if (run_id.ok()) impl->run_id = *run_id;
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
    impl->write_delay_seconds = options.delay_background_write_seconds;
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
    if (rank == 0) (void)RemoveStepDir(c.dir, c.run_id);
    return partials.status();
  }

  // 3. The extra files, then the manifest.
  const absl::Status status =
      rank == 0 ? c.WriteManifestAndExtraFiles(*partials, world.size()) : absl::OkStatus();
  if (auto agreed = Agree(world, status, "", c.what); !agreed.ok()) {
    if (rank == 0) (void)RemoveStepDir(c.dir, c.run_id);
    return agreed.status();
  }

  // 4. Commit, then prune. COMMITTED may exist while `latest` could not be replaced: readers
  // that follow `latest` still get the previous checkpoint.
  const absl::Status committed = rank == 0 ? c.CommitAndPrune() : absl::OkStatus();
  if (auto agreed = Agree(world, committed, "", c.what,
                          "the commit did not complete: `latest` still names the previous "
                          "checkpoint");
      !agreed.ok()) {
    return agreed.status();
  }
  c.total_bytes = ShardBytes(*partials);
  return c.dir;
}

absl::StatusOr<std::string> SaveCheckpoint(const std::string& root, const CheckpointState& state,
                                           const std::vector<ShardedTensor>& tensors,
                                           Communicator& world,
                                           const CheckpointWriteOptions& options) {
  CheckpointWriteOptions synchronous = options;
  synchronous.background = false;  // it would wait for the write at once anyway
  auto pending = BeginCheckpoint(root, state, tensors, world, synchronous);
  if (!pending.ok()) return pending.status();
  return FinishCheckpoint(**pending, world);
}

absl::StatusOr<std::string> SaveCheckpoint(const std::string& root, const CheckpointState& state,
                                           const std::vector<ShardedTensor>& tensors,
                                           Communicator& world, int keep_last) {
  CheckpointWriteOptions options;
  options.keep_last = keep_last;
  return SaveCheckpoint(root, state, tensors, world, options);
}

std::vector<std::string> PreviousCheckpoints(const std::string& root) {
  std::vector<std::string> found;
  const std::string latest = JoinPath(root, kLatestName);
  struct stat st;
  if (::lstat(latest.c_str(), &st) == 0) found.push_back(latest);
  for (const auto& d : ListStepDirs(root)) found.push_back(JoinPath(root, d.name));
  return found;
}

absl::Status RemovePreviousCheckpoints(const std::string& root) {
  if (!IsDirectory(root)) return absl::OkStatus();
  const std::vector<StepDir> dirs = ListStepDirs(root);
  for (const auto& d : dirs) {
    const std::string dir = JoinPath(root, d.name);
    if (IsOwned(dir, kCheckpointKind)) continue;
    // Refused (and why), unless it is what an interrupted creation left, which goes.
    if (const absl::Status refused = RemoveStepDir(dir, ""); !refused.ok()) {
      return absl::Status(refused.code(),
                          absl::StrCat("cannot replace the earlier run's checkpoints in ", root,
                                       ": ", refused.message(), "; nothing was deleted"));
    }
  }
  const std::string latest = JoinPath(root, kLatestName);
  if (::unlink(latest.c_str()) != 0 && errno != ENOENT) {
    return ErrnoStatus(errno, "cannot delete", latest);
  }
  if (auto s = FsyncDir(root); !s.ok()) return s;
  for (const auto& d : dirs) {
    const std::string dir = JoinPath(root, d.name);
    if (!IsDirectory(dir)) continue;  // an interrupted creation, removed above
    if (auto s = RemoveStepDir(dir, ""); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace rmoe::distributed
