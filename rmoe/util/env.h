// Numbers from environment variables (timeouts, test hooks, what a launcher tells a rank).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include <absl/status/statusor.h>

#include "rmoe/util/numbers.h"

namespace rmoe {

// The integer in environment variable `name`, or `fallback` when it is unset or empty.
// A value that is not an integer in [min, max] is an InvalidArgument naming the variable,
// its value and what was expected: `RMOE_X="abc": expected an integer >= 0`.
absl::StatusOr<int64_t> IntFromEnv(const char* name, int64_t fallback,
                                   int64_t min = std::numeric_limits<int64_t>::min(),
                                   int64_t max = std::numeric_limits<int64_t>::max());

// The same for a finite real number within `limits`.
absl::StatusOr<double> NumberFromEnv(const char* name, double fallback,
                                     const NumberLimits& limits = {});

}  // namespace rmoe
