// The tokenizer interface shared by the data tools, the trainer and the generator.
//
// Two implementations exist: ByteTokenizer (byte_tokenizer.h) and SentencePiece BPE. BPE has
// two faces because libsentencepiece bundles its own protobuf, which crashes any process that
// also loads libprotobuf (and so libtorch or the job-spec protos): BpeTokenizer
// (bpe_tokenizer.h, target rmoe_bpe) runs SentencePiece in-process and is used only by the
// proto-free rmoe_tokenize program; every other process reaches BPE through
// SubprocessTokenizer (subprocess_tokenizer.h), which talks to rmoe_tokenize.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/types/span.h>

namespace rmoe {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids of `text`, without any separator or special token added.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text) const = 0;

  // Encode() of each text. Implementations with a per-call cost (a subprocess) override this
  // so that tokenizing a corpus pays that cost once.
  virtual absl::StatusOr<std::vector<std::vector<int32_t>>> EncodeBatch(
      absl::Span<const std::string> texts) const {
    std::vector<std::vector<int32_t>> out;
    out.reserve(texts.size());
    for (const std::string& text : texts) {
      absl::StatusOr<std::vector<int32_t>> ids = Encode(text);
      if (!ids.ok()) return ids.status();
      out.push_back(*std::move(ids));
    }
    return out;
  }

  // Text of `ids`; Decode(Encode(text)) == text (for BPE: see BpeTokenizer::Train). The
  // document separator decodes to '\n' for bytes and to nothing for BPE, where every encoded
  // text starts with a space marker that Decode drops only at the start of `ids`: decoding
  // documents joined by separators gives "doc1 doc2". Ids outside [0, vocab_size()) are an
  // InvalidArgument error.
  virtual absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const = 0;

  // Every id is in [0, vocab_size()).
  virtual int vocab_size() const = 0;

  // The token placed between documents in train.bin / val.bin.
  virtual int document_separator() const = 0;
};

// The text `continuation` adds after `context` (the ids that precede it), as it reads in
// the decoded whole. Decoding the continuation alone would drop the space marker of its
// first BPE piece ("Union" + "of the"), so it is decoded with its context and the context's
// own text is cut off. Where the context's text is not a prefix of the whole, the
// continuation is decoded alone.
absl::StatusOr<std::string> DecodeContinuation(const Tokenizer& tokenizer,
                                               absl::Span<const int32_t> context,
                                               absl::Span<const int32_t> continuation);

}  // namespace rmoe
