// Training scalars as TensorBoard event files (events.out.tfevents.*), written without
// TensorFlow: TFRecord framing (length, masked CRC-32C of the length, an Event protobuf,
// masked CRC-32C of the data) around proto/tensorboard.proto's Event.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <absl/status/statusor.h>

#include "rmoe/util/files.h"

namespace rmoe {

// TFRecord's checksum: CRC-32C rotated right by 15 bits plus 0xa282ead8.
uint32_t MaskedCrc32c(std::string_view bytes);
// One record: uint64 length, uint32 masked CRC of those 8 bytes, the data, uint32 masked CRC
// of the data; all little-endian.
std::string TfRecord(std::string_view data);

// Appends events to a new file in `dir`. Like the metrics file: flushed per event, never
// through a symbolic link, and a failed write is reported once while training goes on.
class TensorBoardWriter {
 public:
  // A new events.out.tfevents.<seconds>.<host>.<pid> in `dir`. A run resumed at
  // `resumed_step` (>= 0) starts with a session START at the next step, which tells
  // TensorBoard to drop what earlier files logged from that step on (the steps the resumed
  // run computes again).
  static absl::StatusOr<TensorBoardWriter> Open(const std::string& dir, int64_t resumed_step = -1);

  // One event of `step` holding every (tag, value) pair; values are stored as float.
  void WriteScalars(int64_t step, const std::vector<std::pair<std::string, double>>& scalars);
  const std::string& path() const { return path_; }

 private:
  void WriteEvent(const std::string& serialized_event);

  std::string path_;
  FileDescriptor fd_;
  absl::Status status_;
};

// The TensorBoard event files directly in `dir` (an earlier run's, for --overwrite).
std::vector<std::string> FindTensorBoardFiles(const std::string& dir);

}  // namespace rmoe
