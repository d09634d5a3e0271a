// One token per byte: vocabulary 256, no training, every byte string round-trips.
#pragma once

#include "rmoe/data/tokenizer.h"

namespace rmoe {

class ByteTokenizer : public Tokenizer {
 public:
  static constexpr int kVocabSize = 256;
  // '\n': documents are lines of the raw text, so a newline is what naturally ends one.
  static constexpr int kSeparator = '\n';

  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text) const override;
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const override;
  int vocab_size() const override { return kVocabSize; }
  int document_separator() const override { return kSeparator; }
};

}  // namespace rmoe
