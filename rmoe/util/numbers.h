// Numbers from text that a person typed (flags, environment variables), checked against the
// range the caller accepts. Errors say only what was expected ("an integer >= 1"), for the
// caller to put after where the text came from ("--threads x: expected an integer >= 1").
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

namespace rmoe {

// Limits of a real number; `min_exclusive` makes the lower one strict, as in (0, 1].
struct NumberLimits {
  double min = -HUGE_VAL;
  double max = HUGE_VAL;
  bool min_exclusive = false;
};

// A decimal integer in [min, max] (an optional sign, digits, nothing else).
absl::StatusOr<int64_t> ParseInteger(absl::string_view text,
                                     int64_t min = std::numeric_limits<int64_t>::min(),
                                     int64_t max = std::numeric_limits<int64_t>::max());
// A finite number within `limits` ("2", "0.5", "1e-3"; not "nan" or "inf").
absl::StatusOr<double> ParseNumber(absl::string_view text, const NumberLimits& limits = {});

// "an integer >= 1", "an integer in [0, 7]", "an integer".
std::string DescribeInteger(int64_t min, int64_t max);
// "a number > 0", "a number in (0, 1]", "a number".
std::string DescribeNumber(const NumberLimits& limits);

}  // namespace rmoe
