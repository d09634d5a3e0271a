#include "rmoe/train/tensorboard.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include <absl/strings/match.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>

#include "proto/tensorboard.pb.h"
#include "rmoe/util/crc32c.h"

namespace rmoe {

namespace fs = std::filesystem;

namespace {

constexpr absl::string_view kEventsFilePrefix = "events.out.tfevents.";

double WallTime() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void AppendLittleEndian(std::string* out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

std::string HostName() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

}  // namespace

uint32_t MaskedCrc32c(std::string_view bytes) {
  const uint32_t crc = Crc32c(bytes);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

std::string TfRecord(std::string_view data) {
  std::string record;
  record.reserve(data.size() + 16);
  AppendLittleEndian(&record, data.size(), 8);
  AppendLittleEndian(&record, MaskedCrc32c(record), 4);
  record.append(data);
  AppendLittleEndian(&record, MaskedCrc32c(data), 4);
  return record;
}

absl::StatusOr<TensorBoardWriter> TensorBoardWriter::Open(const std::string& dir,
                                                          int64_t resumed_step) {
  // TensorBoard reads a directory's files in name order, and a resumed run's file must come
  // after the files it supersedes: its time field is later than theirs.
  int64_t seconds = static_cast<int64_t>(WallTime());
  for (const auto& path : FindTensorBoardFiles(dir)) {
    const std::string name = fs::path(path).filename().string().substr(kEventsFilePrefix.size());
    int64_t earlier = 0;
    if (absl::SimpleAtoi(name.substr(0, name.find('.')), &earlier)) {
      seconds = std::max(seconds, earlier + 1);
    }
  }
  TensorBoardWriter writer;
  writer.path_ = (fs::path(dir) / absl::StrFormat("%s%010d.%s.%d", kEventsFilePrefix, seconds,
                                                  HostName(), static_cast<int>(::getpid())))
                     .string();
  const int fd = ::open(writer.path_.c_str(),
                        O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_APPEND, 0644);
  if (fd < 0) return ErrnoStatus(errno, "cannot create the TensorBoard event file", writer.path_);
  writer.fd_ = FileDescriptor(fd);
  tensorboard::Event version;
  version.set_wall_time(WallTime());
  version.set_file_version("brain.Event:2");
  writer.WriteEvent(version.SerializeAsString());
  if (resumed_step >= 0) {
    tensorboard::Event start;
    start.set_wall_time(WallTime());
    start.set_step(resumed_step + 1);
    start.mutable_session_log()->set_status(tensorboard::SessionLog::START);
    writer.WriteEvent(start.SerializeAsString());
  }
  if (!writer.status_.ok()) return writer.status_;
  return writer;
}

void TensorBoardWriter::WriteScalars(int64_t step,
                                     const std::vector<std::pair<std::string, double>>& scalars) {
  tensorboard::Event event;
  event.set_wall_time(WallTime());
  event.set_step(step);
  for (const auto& [tag, value] : scalars) {
    auto* v = event.mutable_summary()->add_value();
    v->set_tag(tag);
    v->set_simple_value(static_cast<float>(value));
  }
  WriteEvent(event.SerializeAsString());
}

void TensorBoardWriter::WriteEvent(const std::string& serialized_event) {
  if (!status_.ok()) return;
  const std::string record = TfRecord(serialized_event);
  status_ = WriteAll(fd_.get(), record.data(), record.size(), path_);
  if (!status_.ok()) {
    std::fprintf(stderr, "rmoe: warning: TensorBoard events are no longer recorded: %s\n",
                 std::string(status_.message()).c_str());
  }
}

std::vector<std::string> FindTensorBoardFiles(const std::string& dir) {
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (absl::StartsWith(entry.path().filename().string(), kEventsFilePrefix) &&
        entry.is_regular_file(ec)) {
      found.push_back(entry.path().string());
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

}  // namespace rmoe
