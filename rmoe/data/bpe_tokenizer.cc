#include "rmoe/data/bpe_tokenizer.h"

#include <utility>

#include <absl/strings/str_cat.h>
#include "rmoe/data/sentencepiece_bridge.h"
#include "rmoe/util/files.h"

namespace rmoe {
namespace {

bool IsUtf8Continuation(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

// Appends `text` cut into pieces of at most max_bytes, preferring to cut just before a space
// (so the space starts the next piece, as SentencePiece's word boundaries expect) and
// otherwise at a UTF-8 character boundary.
void AppendPieces(absl::string_view text, size_t max_bytes, std::vector<std::string>* out) {
  while (!text.empty()) {
    size_t cut = text.size();
    if (cut > max_bytes) {
      cut = text.rfind(' ', max_bytes);
      if (cut == absl::string_view::npos || cut == 0) {
        cut = max_bytes;
        while (cut > 1 && IsUtf8Continuation(text[cut])) --cut;
      }
    }
    out->emplace_back(text.substr(0, cut));
    text.remove_prefix(cut);
  }
}

}  // namespace

std::vector<std::string> SelectBpeTrainingText(absl::Span<const std::string> documents,
                                               int64_t max_chars, size_t max_piece_bytes) {
  std::vector<std::string> pieces;
  int64_t total = 0;
  for (const std::string& document : documents) {
    AppendPieces(document, max_piece_bytes, &pieces);
    total += static_cast<int64_t>(document.size());
  }
  if (total <= max_chars) return pieces;
  // Keep piece i when the running sum of the kept fraction crosses an integer: an evenly
  // spaced, deterministic selection of about max_chars bytes.
  const double keep = static_cast<double>(max_chars) / static_cast<double>(total);
  std::vector<std::string> selected;
  double credit = 0;
  int64_t kept_chars = 0;
  for (std::string& piece : pieces) {
    credit += keep;
    if (credit < 1.0) continue;
    credit -= 1.0;
    kept_chars += static_cast<int64_t>(piece.size());
    if (kept_chars > max_chars) break;
    selected.push_back(std::move(piece));
  }
  return selected;
}

absl::Status BpeTokenizer::Train(absl::Span<const std::string> documents,
                                 const BpeTrainOptions& options, const std::string& model_path) {
  const std::vector<std::string> sentences =
      SelectBpeTrainingText(documents, options.max_training_chars);
  if (sentences.empty()) {
    return absl::InvalidArgumentError(
        "BPE training: no training text (the corpus is empty or max_training_chars is 0)");
  }
  const std::vector<std::pair<std::string, std::string>> trainer_options = {
      {"model_type", "bpe"},
      {"vocab_size", absl::StrCat(options.vocab_size)},
      // Unseen characters become byte pieces instead of <unk>, so any text round-trips.
      {"byte_fallback", "true"},
      {"character_coverage", "0.9995"},
      {"add_dummy_prefix", "true"},
      // No NFKC and no whitespace squeezing: decoding must give back the exact text.
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"max_sentence_length", "16384"},
      // Exactly vocab_size pieces or a clear error, rather than a silently smaller model.
      {"hard_vocab_limit", "true"},
      {"num_threads", absl::StrCat(options.num_threads)},
      // Only warnings and errors; the per-iteration progress is noise.
      {"minloglevel", "1"},
  };
  std::string model;
  const std::string error = spm_bridge::Train(sentences, trainer_options, &model);
  if (!error.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "BPE training with vocab_size ", options.vocab_size, " on ", sentences.size(),
        " text pieces failed: ", error));
  }
  return WriteFileAtomically(model_path, model);
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Load(const std::string& model_path) {
  auto model = std::make_unique<spm_bridge::Model>();
  const std::string error = model->Load(model_path);
  if (!error.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot load the SentencePiece model '", model_path, "': ", error));
  }
  if (model->eos_id() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SentencePiece model '", model_path, "' has no </s> piece to separate documents"));
  }
  return std::unique_ptr<BpeTokenizer>(new BpeTokenizer(std::move(model), model_path));
}

BpeTokenizer::BpeTokenizer(std::unique_ptr<spm_bridge::Model> model, std::string path)
    : model_(std::move(model)),
      path_(std::move(path)),
      vocab_size_(model_->vocab_size()),
      separator_(model_->eos_id()) {}

BpeTokenizer::~BpeTokenizer() = default;

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::Encode(absl::string_view text) const {
  std::vector<int> ids;
  const std::string error = model_->Encode(std::string(text), &ids);
  if (!error.empty()) {
    return absl::InternalError(absl::StrCat("BPE encode with '", path_, "' failed: ", error));
  }
  return std::vector<int32_t>(ids.begin(), ids.end());
}

absl::StatusOr<std::string> BpeTokenizer::Decode(absl::Span<const int32_t> ids) const {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size_) {
      return absl::InvalidArgumentError(absl::StrCat("BPE decode: id ", ids[i], " at position ",
                                                     i, " is outside the vocabulary [0, ",
                                                     vocab_size_, ") of '", path_, "'"));
    }
  }
  std::string text;
  const std::string error = model_->Decode(std::vector<int>(ids.begin(), ids.end()), &text);
  if (!error.empty()) {
    return absl::InternalError(absl::StrCat("BPE decode with '", path_, "' failed: ", error));
  }
  return text;
}

}  // namespace rmoe
