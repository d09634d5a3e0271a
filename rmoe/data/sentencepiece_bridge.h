// A thin, std-only wall around SentencePiece, for bpe_tokenizer.cc.
//
// sentencepiece_processor.h declares `namespace absl { using std::string_view; }`, which
// clashes with the real Abseil's absl::string_view class, so no file may include both. Only
// sentencepiece_bridge.cc includes SentencePiece; this header includes neither library.
// Errors are returned as messages (empty = success).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}  // namespace sentencepiece

namespace rmoe {
namespace spm_bridge {

// Trains a model on `sentences` with SentencePieceTrainer options given as (name, value)
// pairs, e.g. {"model_type", "bpe"}; the serialized ModelProto goes to *serialized_model.
std::string Train(const std::vector<std::string>& sentences,
                  const std::vector<std::pair<std::string, std::string>>& options,
                  std::string* serialized_model);

class Model {
 public:
  Model();
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  std::string Load(const std::string& path);
  int vocab_size() const;
  int eos_id() const;
  std::string Encode(const std::string& text, std::vector<int>* ids) const;
  std::string Decode(const std::vector<int>& ids, std::string* text) const;

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
};

}  // namespace spm_bridge
}  // namespace rmoe
