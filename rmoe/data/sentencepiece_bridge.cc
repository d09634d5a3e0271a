#include "rmoe/data/sentencepiece_bridge.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <unordered_map>

namespace rmoe {
namespace spm_bridge {
namespace {

class VectorIterator : public sentencepiece::SentenceIterator {
 public:
  explicit VectorIterator(const std::vector<std::string>& sentences) : sentences_(sentences) {}
  bool done() const override { return index_ >= sentences_.size(); }
  void Next() override { ++index_; }
  const std::string& value() const override { return sentences_[index_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& sentences_;
  size_t index_ = 0;
};

std::string ErrorOf(const sentencepiece::util::Status& status) {
  return status.ok() ? std::string() : status.ToString();
}

}  // namespace

std::string Train(const std::vector<std::string>& sentences,
                  const std::vector<std::pair<std::string, std::string>>& options,
                  std::string* serialized_model) {
  std::unordered_map<std::string, std::string> kwargs(options.begin(), options.end());
  VectorIterator iterator(sentences);
  return ErrorOf(
      sentencepiece::SentencePieceTrainer::Train(kwargs, &iterator, serialized_model));
}

Model::Model() : processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
Model::~Model() = default;

std::string Model::Load(const std::string& path) { return ErrorOf(processor_->Load(path)); }

int Model::vocab_size() const { return processor_->GetPieceSize(); }

int Model::eos_id() const { return processor_->eos_id(); }

std::string Model::Encode(const std::string& text, std::vector<int>* ids) const {
  return ErrorOf(processor_->Encode(text, ids));
}

std::string Model::Decode(const std::vector<int>& ids, std::string* text) const {
  return ErrorOf(processor_->Decode(ids, text));
}

}  // namespace spm_bridge
}  // namespace rmoe
