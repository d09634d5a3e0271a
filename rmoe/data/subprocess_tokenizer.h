// Tokenizers for processes that must not load SentencePiece (everything linking libtorch or
// protobuf; see tokenizer.h): BPE runs in the rmoe_tokenize program, one process per call.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "proto/dataset.pb.h"
#include "rmoe/data/tokenizer.h"

namespace rmoe {

// Path of the rmoe_tokenize program. Looks in `tools_dir` when given, else in
// $RMOE_TOOLS_DIR when set, else next to the running program and in ../tools from it (the
// build tree's layout). The error lists every place tried.
absl::StatusOr<std::string> FindTokenizeProgram(const std::string& tools_dir = "");

// BPE through `rmoe_tokenize`. Each call starts one process (a few milliseconds plus loading
// the model), so encode a corpus with EncodeBatch, not text by text. Errors include the
// program's stderr.
class SubprocessTokenizer : public Tokenizer {
 public:
  // Asks `rmoe_tokenize info` for the model's vocabulary size and separator.
  static absl::StatusOr<std::unique_ptr<SubprocessTokenizer>> Open(
      const std::string& model_path, const std::string& tools_dir = "");

  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text) const override;
  // One process for all texts. Texts must not contain NUL bytes (the record separator).
  absl::StatusOr<std::vector<std::vector<int32_t>>> EncodeBatch(
      absl::Span<const std::string> texts) const override;
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const override;
  int vocab_size() const override { return vocab_size_; }
  int document_separator() const override { return separator_; }

  const std::string& model_path() const { return model_path_; }

 private:
  SubprocessTokenizer(std::string program, std::string model_path)
      : program_(std::move(program)), model_path_(std::move(model_path)) {}

  // Runs `rmoe_tokenize <command> --model <model> <extra_args...>` and returns its stdout.
  absl::StatusOr<std::string> Run(const std::string& command,
                                  const std::vector<std::string>& extra_args,
                                  absl::string_view input) const;

  std::string program_;
  std::string model_path_;
  int vocab_size_ = 0;
  int separator_ = 0;
};

// The tokenizer a prepared dataset was made with: ByteTokenizer for BYTE, a
// SubprocessTokenizer on <dataset_dir>/tokenizer.model for BPE. Checks that it agrees with
// the metadata (vocab_size, document_separator), which catches a model from another run.
absl::StatusOr<std::unique_ptr<Tokenizer>> OpenTokenizer(const DatasetMeta& meta,
                                                         const std::string& dataset_dir,
                                                         const std::string& tools_dir = "");

// BpeTokenizer::Train run inside `rmoe_tokenize train`, for processes that cannot load
// SentencePiece (rmoe_prepare_data reads the protobuf job spec). Documents must not contain
// NUL bytes.
absl::Status TrainBpeInSubprocess(absl::Span<const std::string> documents, int vocab_size,
                                  int64_t max_training_chars, const std::string& model_path,
                                  const std::string& tools_dir = "");

}  // namespace rmoe
