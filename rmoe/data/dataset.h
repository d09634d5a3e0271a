// A prepared dataset on disk (written by rmoe_prepare_data):
//   <dataset_dir>/meta.pbtxt      DatasetMeta (proto/dataset.proto) in text format
//   <dataset_dir>/train.bin       the train documents' tokens, separator between documents
//   <dataset_dir>/val.bin         the same for the validation documents
//   <dataset_dir>/tokenizer.model the SentencePiece model (BPE only)
// Token files are flat arrays of little-endian uint16 (vocabulary <= 65536) or uint32.
#pragma once

#include <cstdint>
#include <string>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/types/span.h>
#include "proto/dataset.pb.h"

namespace rmoe {

// Token files are read by reinterpreting the mapped bytes, which is only right on a
// little-endian machine.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "token files are little-endian");

// The DatasetMeta.format_version this build reads and writes.
inline constexpr int kDatasetFormatVersion = 1;

// 2 when every id fits in a uint16, else 4.
int BytesPerTokenForVocab(int vocab_size);

// A read-only, memory-mapped token file: the OS pages it in on demand and shares it between
// processes, so opening a large file is free and data-parallel ranks on one machine hold one
// copy.
class TokenFile {
 public:
  // Errors: the file is missing or unreadable, its size is not a multiple of
  // bytes_per_token, it is empty, or bytes_per_token is not 2 or 4.
  static absl::StatusOr<TokenFile> Open(const std::string& path, int bytes_per_token);

  TokenFile() = default;  // An empty file; size() == 0.
  TokenFile(TokenFile&& other) noexcept;
  TokenFile& operator=(TokenFile&& other) noexcept;
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;
  ~TokenFile();

  int64_t size() const { return size_; }
  int bytes_per_token() const { return bytes_per_token_; }
  const std::string& path() const { return path_; }

  // Token i, for 0 <= i < size() (not checked).
  int32_t operator[](int64_t i) const { return Get(i); }
  int32_t Get(int64_t i) const {
    return bytes_per_token_ == 2 ? static_cast<int32_t>(reinterpret_cast<const uint16_t*>(data_)[i])
                                 : static_cast<int32_t>(reinterpret_cast<const uint32_t*>(data_)[i]);
  }
  // Tokens [start, start + count) widened to int64 (the dtype of torch index tensors);
  // requires 0 <= start and start + count <= size().
  void Read(int64_t start, int64_t count, int64_t* out) const;
  // The largest id in the file (reads all of it).
  int64_t MaxToken() const;

 private:
  void Unmap();

  std::string path_;
  const unsigned char* data_ = nullptr;
  size_t mapped_bytes_ = 0;
  int64_t size_ = 0;
  int bytes_per_token_ = 2;
};

// Writes `tokens` as a token file (via a temporary file and a rename). Every id must fit the
// width; InvalidArgument naming the first that does not.
absl::Status WriteTokenFile(const std::string& path, absl::Span<const int32_t> tokens,
                            int bytes_per_token);

// Appends the documents of the raw text file `path` to `documents`: every non-blank line, a
// trailing '\r' dropped. Adds the file's size to `*bytes`. A line with a NUL byte is an
// error naming the file and line (text files have none, and the subprocess tokenizer frames
// texts with it).
absl::Status ReadTextDocuments(const std::string& path, std::vector<std::string>* documents,
                               int64_t* bytes);

// Parses <dataset_dir>/meta.pbtxt and checks it is self-consistent and of a format_version
// this build knows (it does not open the token files).
absl::StatusOr<DatasetMeta> ReadDatasetMeta(const std::string& dataset_dir);

class Dataset {
 public:
  // ReadDatasetMeta, then both token files, checking their lengths equal the metadata's
  // train_tokens / val_tokens and that every id is below vocab_size.
  static absl::StatusOr<Dataset> Open(const std::string& dataset_dir);

  const std::string& dir() const { return dir_; }
  const DatasetMeta& meta() const { return meta_; }
  const TokenFile& train() const { return train_; }
  const TokenFile& val() const { return val_; }

 private:
  std::string dir_;
  DatasetMeta meta_;
  TokenFile train_;
  TokenFile val_;
};

}  // namespace rmoe
