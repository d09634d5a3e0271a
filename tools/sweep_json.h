// A small JSON reader for rmoe_sweep: enough for rmoe_train's metrics records (objects,
// arrays, numbers, strings, true/false/null; NaN and Infinity leniently), with a depth
// limit. No JSON library is installed, and the records are flat enough for this.
#ifndef RMOE_TOOLS_SWEEP_JSON_H_
#define RMOE_TOOLS_SWEEP_JSON_H_

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"

namespace rmoe::sweep {

struct Json {
  enum Type { kNull, kBool, kNumber, kString, kArray, kObject } type = kNull;
  double number = 0;
  bool boolean = false;
  std::string string;
  std::vector<Json> array;
  std::vector<std::pair<std::string, Json>> object;

  const Json* Get(absl::string_view key) const {
    for (const auto& [k, v] : object) {
      if (k == key) return &v;
    }
    return nullptr;
  }
  // A number member; NaN when missing, null or not a number.
  double Number(absl::string_view key) const {
    const Json* v = Get(key);
    return v != nullptr && v->type == kNumber ? v->number : std::numeric_limits<double>::quiet_NaN();
  }
};

// Parses text that holds exactly one JSON value (surrounding whitespace allowed); false on
// any syntax error.
bool ParseJson(absl::string_view text, Json* out);

}  // namespace rmoe::sweep

#endif  // RMOE_TOOLS_SWEEP_JSON_H_
