#include "rmoe/data/tokenizer.h"

#include <vector>

#include <absl/strings/match.h>

namespace rmoe {

absl::StatusOr<std::string> DecodeContinuation(const Tokenizer& tokenizer,
                                               absl::Span<const int32_t> context,
                                               absl::Span<const int32_t> continuation) {
  if (context.empty()) return tokenizer.Decode(continuation);
  std::vector<int32_t> whole(context.begin(), context.end());
  whole.insert(whole.end(), continuation.begin(), continuation.end());
  auto whole_text = tokenizer.Decode(whole);
  if (!whole_text.ok()) return whole_text.status();
  auto context_text = tokenizer.Decode(context);
  if (!context_text.ok()) return context_text.status();
  if (!absl::StartsWith(*whole_text, *context_text)) return tokenizer.Decode(continuation);
  return whole_text->substr(context_text->size());
}

}  // namespace rmoe
