#include "rmoe/util/numbers.h"

#include <absl/status/status.h>
#include <absl/strings/ascii.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>

namespace rmoe {
namespace {

constexpr int64_t kMinInt = std::numeric_limits<int64_t>::min();
constexpr int64_t kMaxInt = std::numeric_limits<int64_t>::max();

absl::Status Expected(const std::string& description) {
  return absl::InvalidArgumentError(absl::StrCat("expected ", description));
}

// absl's parsers skip surrounding white space; a value with spaces is a typing mistake.
bool HasSpace(absl::string_view text) {
  return !text.empty() && (absl::ascii_isspace(static_cast<unsigned char>(text.front())) ||
                           absl::ascii_isspace(static_cast<unsigned char>(text.back())));
}

}  // namespace

std::string DescribeInteger(int64_t min, int64_t max) {
  if (min == kMinInt && max == kMaxInt) return "an integer";
  if (max == kMaxInt) return absl::StrCat("an integer >= ", min);
  if (min == kMinInt) return absl::StrCat("an integer <= ", max);
  return absl::StrCat("an integer in [", min, ", ", max, "]");
}

std::string DescribeNumber(const NumberLimits& limits) {
  const bool has_min = std::isfinite(limits.min), has_max = std::isfinite(limits.max);
  const char* above = limits.min_exclusive ? " > " : " >= ";
  if (!has_min && !has_max) return "a number";
  if (!has_max) return absl::StrCat("a number", above, limits.min);
  if (!has_min) return absl::StrCat("a number <= ", limits.max);
  return absl::StrCat("a number in ", limits.min_exclusive ? "(" : "[", limits.min, ", ",
                      limits.max, "]");
}

absl::StatusOr<int64_t> ParseInteger(absl::string_view text, int64_t min, int64_t max) {
  int64_t value = 0;
  if (HasSpace(text) || !absl::SimpleAtoi(text, &value) || value < min || value > max) {
    return Expected(DescribeInteger(min, max));
  }
  return value;
}

absl::StatusOr<double> ParseNumber(absl::string_view text, const NumberLimits& limits) {
  double value = 0;
  if (HasSpace(text) || !absl::SimpleAtod(text, &value) || !std::isfinite(value) ||
      (limits.min_exclusive ? value <= limits.min : value < limits.min) || value > limits.max) {
    return Expected(DescribeNumber(limits));
  }
  return value;
}

}  // namespace rmoe
