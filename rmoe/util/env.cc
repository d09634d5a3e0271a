#include "rmoe/util/env.h"

#include <cstdlib>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>

namespace rmoe {
namespace {

// The variable's value; nullptr when it is unset or empty (both mean "use the default").
const char* Lookup(const char* name) {
  const char* text = std::getenv(name);
  return text == nullptr || *text == '\0' ? nullptr : text;
}

absl::Status Malformed(const char* name, const char* text, const absl::Status& why) {
  return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, "=\"", text,
                                                 "\": ", why.message(), ", or unset"));
}

}  // namespace

absl::StatusOr<int64_t> IntFromEnv(const char* name, int64_t fallback, int64_t min, int64_t max) {
  const char* text = Lookup(name);
  if (text == nullptr) return fallback;
  absl::StatusOr<int64_t> value = ParseInteger(text, min, max);
  if (!value.ok()) return Malformed(name, text, value.status());
  return value;
}

absl::StatusOr<double> NumberFromEnv(const char* name, double fallback,
                                     const NumberLimits& limits) {
  const char* text = Lookup(name);
  if (text == nullptr) return fallback;
  absl::StatusOr<double> value = ParseNumber(text, limits);
  if (!value.ok()) return Malformed(name, text, value.status());
  return value;
}

}  // namespace rmoe
