// The text form of token ids that rmoe_tokenize reads and writes: decimal ids separated by
// spaces, one line per text. Header-only because both sides need it and they cannot share a
// library: rmoe_tokenize must not link rmoe_data (protobuf), rmoe_data must not link
// SentencePiece.
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/string_view.h>
#include <absl/types/span.h>

namespace rmoe {

// Ids separated by single spaces, without a newline.
inline std::string FormatIds(absl::Span<const int32_t> ids) {
  std::string out;
  out.reserve(ids.size() * 6);
  char buffer[16];
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i > 0) out.push_back(' ');
    const auto result = std::to_chars(buffer, buffer + sizeof(buffer), ids[i]);
    out.append(buffer, result.ptr);
  }
  return out;
}

// All ids in `text`, separated by any whitespace. `what` names the source in errors.
inline absl::StatusOr<std::vector<int32_t>> ParseIds(absl::string_view text,
                                                     absl::string_view what) {
  std::vector<int32_t> ids;
  const char* p = text.data();
  const char* end = p + text.size();
  while (true) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')) ++p;
    if (p == end) return ids;
    int32_t id = 0;
    const auto result = std::from_chars(p, end, id);
    const bool ends_at_space = result.ptr == end || *result.ptr == ' ' ||
                               *result.ptr == '\n' || *result.ptr == '\t' || *result.ptr == '\r';
    if (result.ec != std::errc() || !ends_at_space) {
      const char* word_end = p;
      while (word_end < end && *word_end != ' ' && *word_end != '\n') ++word_end;
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": '", absl::string_view(p, std::min<size_t>(word_end - p, 40)),
          "' at byte ", p - text.data(), " is not a token id (a decimal int32)"));
    }
    ids.push_back(id);
    p = result.ptr;
  }
}

// One id list per '\n'-terminated line (an empty line is an empty list).
inline absl::StatusOr<std::vector<std::vector<int32_t>>> ParseIdLines(absl::string_view text,
                                                                      absl::string_view what) {
  std::vector<std::vector<int32_t>> lines;
  while (!text.empty()) {
    const size_t newline = text.find('\n');
    if (newline == absl::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": the last line is not terminated by a newline (truncated output?)"));
    }
    absl::StatusOr<std::vector<int32_t>> ids = ParseIds(text.substr(0, newline), what);
    if (!ids.ok()) return ids.status();
    lines.push_back(*std::move(ids));
    text.remove_prefix(newline + 1);
  }
  return lines;
}

}  // namespace rmoe
