// SentencePiece BPE, in-process (target rmoe_bpe).
//
// Link this only into processes that load neither libprotobuf nor libtorch: libsentencepiece
// bundles its own protobuf and such a process crashes at start-up (see tokenizer.h). In this
// project that is rmoe_tokenize alone; everything else uses SubprocessTokenizer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rmoe/data/tokenizer.h"

namespace rmoe {

namespace spm_bridge {
class Model;
}  // namespace spm_bridge

struct BpeTrainOptions {
  // The trained model has exactly this many pieces, or training fails saying what the corpus
  // allows. It includes <unk>, <s>, </s> and the 256 byte-fallback pieces.
  int vocab_size = 4096;
  // Characters (bytes) of the documents given to the trainer; spread over the whole corpus
  // when it is larger.
  int64_t max_training_chars = 20000000;
  int num_threads = 2;
};

class BpeTokenizer : public Tokenizer {
 public:
  // Trains on `documents` and writes the model to `model_path` (replaced atomically).
  // The model falls back to bytes for unseen characters and does no normalisation, so
  // Decode(Encode(text)) == text for any valid UTF-8 without U+2581 ('▁', SentencePiece's
  // space marker); invalid UTF-8 decodes with U+FFFD in place of the bad bytes.
  static absl::Status Train(absl::Span<const std::string> documents,
                            const BpeTrainOptions& options, const std::string& model_path);

  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Load(const std::string& model_path);

  ~BpeTokenizer() override;

  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text) const override;
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const override;
  int vocab_size() const override { return vocab_size_; }
  // The end-of-sentence id </s>; Decode renders it as nothing.
  int document_separator() const override { return separator_; }

 private:
  BpeTokenizer(std::unique_ptr<spm_bridge::Model> model, std::string path);

  std::unique_ptr<spm_bridge::Model> model_;
  std::string path_;
  int vocab_size_;
  int separator_;
};

// The sentences the trainer sees: documents cut at spaces into pieces of at most
// `max_piece_bytes` (SentencePiece silently skips sentences over ~4 KB, and BPE pieces never
// cross a space anyway), then, when the total exceeds `max_chars`, an evenly spaced subset
// of pieces so that the sample covers the whole corpus rather than its beginning.
std::vector<std::string> SelectBpeTrainingText(absl::Span<const std::string> documents,
                                               int64_t max_chars, size_t max_piece_bytes = 2048);

}  // namespace rmoe
